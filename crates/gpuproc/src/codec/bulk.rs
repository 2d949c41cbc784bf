//! Sequences with a known layout, encoded and decoded whole.
//!
//! serde has no specialisation: `Vec<f32>`'s `Serialize` calls `collect_seq(&vec)` and its
//! `Deserialize` calls `deserialize_seq(VecVisitor::<f32>)`, and a serializer only sees type
//! parameters. So types are recognised by their `TypeId`, taken with the `typeid` crate
//! (serde's types carry lifetimes, which `std::any::TypeId` refuses):
//!
//! - encoding: `collect_seq`'s iterator is `&[T]` (slices, `Box<[T]>`) or `&Vec<T>`;
//! - decoding: the visitor is the one `Vec<T>` (and so `Box<[T]>`) deserialises with. serde
//!   does not name that type, so it is learnt once per `T` by handing `Vec<T>` a probe
//!   deserializer that records its visitor's `TypeId` ([`visitor_of_vec`]). Matching the
//!   visitor, not only the value type, keeps custom visitors that build a `Vec<T>` (with
//!   `deserialize_with`, say) on the element-by-element path they were written for.
//!
//! Each cast below is guarded by an equality of type ids, which hold between types that
//! differ at most in lifetimes; the casts only ever shorten a lifetime.

use std::any::TypeId;
use std::fmt;
use std::mem::{size_of, size_of_val, ManuallyDrop};
use std::sync::OnceLock;

use serde::de::{self, Deserialize, Visitor};

use super::de::Deserializer;
use super::ser::{len_u64, Output, Serializer};
use super::{varint, Result};
use postcard::Error as Pe;

/// Element types whose bytes are their encoding: no padding, every byte initialised, and
/// (for the floats) a little-endian machine, as postcard writes little-endian.
///
/// # Safety
/// Implementors must be plain old data of the above kind; any bytes that pass
/// [`Raw::valid`] must be a valid value.
unsafe trait Raw: Copy + 'static {
    /// Whether `bytes` (a whole number of elements) are valid values.
    fn valid(_bytes: &[u8]) -> bool {
        true
    }
}

// SAFETY: one byte, every bit pattern valid.
unsafe impl Raw for u8 {}
// SAFETY: one byte, every bit pattern valid.
unsafe impl Raw for i8 {}
// SAFETY: one byte; only 0 and 1 are valid, which `valid` checks.
unsafe impl Raw for bool {
    fn valid(bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| b <= 1)
    }
}
#[cfg(target_endian = "little")]
// SAFETY: four bytes, every bit pattern a valid f32, little-endian here.
unsafe impl Raw for f32 {}
#[cfg(target_endian = "little")]
// SAFETY: eight bytes, every bit pattern a valid f64, little-endian here.
unsafe impl Raw for f64 {}

/// The bytes of a slice of plain values.
fn raw_bytes<T: Raw>(s: &[T]) -> &[u8] {
    // SAFETY: `T: Raw` has no padding and every byte initialised; the length is the
    // slice's size in bytes, and u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), size_of_val(s)) }
}

/// A sequence recognised for bulk encoding.
pub(crate) enum Slice<'a> {
    /// `count` plain elements whose encoding is `bytes`.
    Raw {
        count: usize,
        bytes: &'a [u8],
    },
    Unsigned(Unsigned<'a>),
    Signed(Signed<'a>),
}

/// Slices of unsigned integers (varints).
pub(crate) enum Unsigned<'a> {
    U16(&'a [u16]),
    U32(&'a [u32]),
    U64(&'a [u64]),
    Usize(&'a [usize]),
    U128(&'a [u128]),
}

/// Slices of signed integers (zigzag varints).
pub(crate) enum Signed<'a> {
    I16(&'a [i16]),
    I32(&'a [i32]),
    I64(&'a [i64]),
    Isize(&'a [isize]),
    I128(&'a [i128]),
}

/// `iter` as a `&[T]`, when its type is `&[T]` or `&Vec<T>`.
#[inline]
fn slice_of<'a, I, T: 'static>(iter: &'a I, id: TypeId) -> Option<&'a [T]> {
    if id == typeid::of::<&[T]>() {
        // SAFETY: `I` is `&'x [T]` for some 'x (the ids are equal up to lifetimes), and 'x
        // outlives 'a because `iter: &'a I`: reading it as `&'a [T]` shortens the lifetime.
        return Some(unsafe { *(iter as *const I).cast::<&'a [T]>() });
    }
    if id == typeid::of::<&Vec<T>>() {
        // SAFETY: as above, with `I` being `&'x Vec<T>`.
        let v: &'a Vec<T> = unsafe { *(iter as *const I).cast::<&'a Vec<T>>() };
        return Some(v.as_slice());
    }
    None
}

impl<'a> Slice<'a> {
    /// The sequence `iter` (a `collect_seq` argument) when it has a bulk encoding.
    #[inline]
    pub(crate) fn of<I>(iter: &'a I) -> Option<Slice<'a>> {
        // Only references qualify: a slice reference is two words, `&Vec` one.
        let size = size_of::<I>();
        if size != size_of::<&[u8]>() && size != size_of::<&Vec<u8>>() {
            return None;
        }
        let id = typeid::of::<I>();
        macro_rules! raw {
            ($($t:ty),*) => {$(
                if let Some(s) = slice_of::<I, $t>(iter, id) {
                    return Some(Slice::Raw { count: s.len(), bytes: raw_bytes(s) });
                }
            )*};
        }
        macro_rules! int {
            ($($outer:ident :: $variant:ident($t:ty)),*) => {$(
                if let Some(s) = slice_of::<I, $t>(iter, id) {
                    return Some(Slice::$outer($outer::$variant(s)));
                }
            )*};
        }
        raw!(u8, i8, bool);
        #[cfg(target_endian = "little")]
        raw!(f32, f64);
        int!(
            Unsigned::U16(u16),
            Unsigned::U32(u32),
            Unsigned::U64(u64),
            Unsigned::Usize(usize),
            Unsigned::U128(u128),
            Signed::I16(i16),
            Signed::I32(i32),
            Signed::I64(i64),
            Signed::Isize(isize),
            Signed::I128(i128)
        );
        None
    }

    /// Writes the sequence: its length, then its elements, as postcard would.
    pub(crate) fn encode<O: Output>(self, ser: &mut Serializer<O>) -> Result<()> {
        match self {
            Slice::Raw { count, bytes } => {
                ser.varint(len_u64(count))?;
                ser.out.extend(bytes)
            }
            Slice::Unsigned(u) => match u {
                Unsigned::U16(s) => varints(ser, s.len(), s.iter().map(|&v| u64::from(v))),
                Unsigned::U32(s) => varints(ser, s.len(), s.iter().map(|&v| u64::from(v))),
                Unsigned::U64(s) => varints(ser, s.len(), s.iter().copied()),
                Unsigned::Usize(s) => varints(ser, s.len(), s.iter().map(|&v| len_u64(v))),
                Unsigned::U128(s) => varints128(ser, s.len(), s.iter().copied()),
            },
            Slice::Signed(i) => match i {
                Signed::I16(s) => varints(ser, s.len(), s.iter().map(|&v| zigzag(v.into()))),
                Signed::I32(s) => varints(ser, s.len(), s.iter().map(|&v| zigzag(v.into()))),
                Signed::I64(s) => varints(ser, s.len(), s.iter().map(|&v| zigzag(v))),
                Signed::Isize(s) => varints(ser, s.len(), s.iter().map(|&v| zigzag(v as i64))),
                Signed::I128(s) => {
                    varints128(ser, s.len(), s.iter().map(|&v| varint::zigzag128(v)))
                }
            },
        }
    }
}

use varint::zigzag;

macro_rules! varints {
    ($name:ident, $t:ty) => {
        /// Writes `len`, then each value as a varint, through a stack buffer: one `extend`
        /// per 4 KiB, not one per element.
        #[inline]
        fn $name<O: Output>(
            ser: &mut Serializer<O>,
            len: usize,
            values: impl Iterator<Item = $t>,
        ) -> Result<()> {
            ser.varint(len_u64(len))?;
            let mut buf = [0u8; 4096];
            let mut n = 0;
            for mut v in values {
                if n + varint::MAX_U128 > buf.len() {
                    ser.out.extend(&buf[..n])?;
                    n = 0;
                }
                while v >= 0x80 {
                    buf[n] = (v as u8) | 0x80;
                    v >>= 7;
                    n += 1;
                }
                buf[n] = v as u8;
                n += 1;
            }
            ser.out.extend(&buf[..n])
        }
    };
}

varints!(varints, u64);
varints!(varints128, u128);

/// The element types with a bulk decoding.
#[derive(Clone, Copy, Debug)]
enum Kind {
    U8,
    I8,
    Bool,
    #[cfg(target_endian = "little")]
    F32,
    #[cfg(target_endian = "little")]
    F64,
    U16,
    U32,
    U64,
    Usize,
    U128,
    I16,
    I32,
    I64,
    Isize,
    I128,
}

/// Decodes a sequence of `len` elements in one piece when `V` is the visitor of `Vec<T>`
/// for a bulk `T`; `None` when it is not (the caller then goes element by element; nothing
/// has been read).
#[inline]
pub(crate) fn decode<'de, V: Visitor<'de>>(
    de: &mut Deserializer<'de>,
    len: usize,
) -> Option<Result<V::Value>> {
    let id = typeid::of::<V>();
    let kind = vec_visitors().iter().find(|(v, _)| *v == id)?.1;
    match kind {
        Kind::U8 => raw::<u8, V>(de, len),
        Kind::I8 => raw::<i8, V>(de, len),
        Kind::Bool => raw::<bool, V>(de, len),
        #[cfg(target_endian = "little")]
        Kind::F32 => raw::<f32, V>(de, len),
        #[cfg(target_endian = "little")]
        Kind::F64 => raw::<f64, V>(de, len),
        Kind::U16 => ints::<u16, V>(de, len, |d| d.varint_u16()),
        Kind::U32 => ints::<u32, V>(de, len, |d| d.varint_u32()),
        Kind::U64 => ints::<u64, V>(de, len, |d| d.varint_u64()),
        Kind::Usize => ints::<usize, V>(de, len, |d| {
            usize::try_from(d.varint_u64()?).map_err(|_| Pe::DeserializeBadVarint.into())
        }),
        Kind::U128 => ints::<u128, V>(de, len, |d| d.varint_u128()),
        Kind::I16 => ints::<i16, V>(de, len, |d| Ok(unzigzag16(d.varint_u16()?))),
        Kind::I32 => ints::<i32, V>(de, len, |d| Ok(unzigzag32(d.varint_u32()?))),
        Kind::I64 => ints::<i64, V>(de, len, |d| Ok(varint::unzigzag(d.varint_u64()?))),
        Kind::Isize => ints::<isize, V>(de, len, |d| {
            isize::try_from(varint::unzigzag(d.varint_u64()?))
                .map_err(|_| Pe::DeserializeBadVarint.into())
        }),
        Kind::I128 => ints::<i128, V>(de, len, |d| Ok(varint::unzigzag128(d.varint_u128()?))),
    }
}

fn unzigzag16(n: u16) -> i16 {
    ((n >> 1) as i16) ^ (-((n & 1) as i16))
}

fn unzigzag32(n: u32) -> i32 {
    ((n >> 1) as i32) ^ (-((n & 1) as i32))
}

/// Whether `V::Value` is `Vec<T>`, which makes [`cast`] from one to the other sound.
fn produces_vec_of<'de, T: 'static, V: Visitor<'de>>() -> bool {
    typeid::of::<V::Value>() == typeid::of::<Vec<T>>()
}

/// `a` as a `B`. Only called when [`produces_vec_of`] said `A` and `B` are one type.
fn cast<A, B>(a: A) -> B {
    let a = ManuallyDrop::new(a);
    // SAFETY: the caller checked that `A` and `B` have the same type id; `Vec<T>` for the
    // bulk `T`s has no lifetimes, so they are the same type. `a` is not dropped.
    unsafe { std::ptr::read((&*a as *const A).cast::<B>()) }
}

/// `len` plain elements: the same errors in the same order as element by element (a bad
/// value before the end of the input, then the end of the input).
fn raw<'de, T: Raw, V: Visitor<'de>>(
    de: &mut Deserializer<'de>,
    len: usize,
) -> Option<Result<V::Value>> {
    if !produces_vec_of::<T, V>() {
        return None;
    }
    let available = de.remaining() / size_of::<T>();
    let n = len.min(available);
    let bytes = &de.peek()[..n * size_of::<T>()];
    if !T::valid(bytes) {
        return Some(Err(Pe::DeserializeBadBool.into()));
    }
    if len > available {
        return Some(Err(Pe::DeserializeUnexpectedEnd.into()));
    }
    let mut v: Vec<T> = Vec::with_capacity(len);
    // SAFETY: `bytes` holds exactly `len` elements' bytes (checked above), valid values of
    // `T` (`T::valid`); the vector has room for `len` elements and does not overlap them.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr().cast::<u8>(), bytes.len());
        v.set_len(len);
    }
    de.advance(bytes.len());
    Some(Ok(cast::<Vec<T>, V::Value>(v)))
}

/// `len` integers, each read by `take`, in one loop.
#[inline]
fn ints<'de, T: 'static, V: Visitor<'de>>(
    de: &mut Deserializer<'de>,
    len: usize,
    take: impl Fn(&mut Deserializer<'de>) -> Result<T>,
) -> Option<Result<V::Value>> {
    if !produces_vec_of::<T, V>() {
        return None;
    }
    // Every element takes at least a byte: no more room than the input could fill.
    let mut v = Vec::with_capacity(len.min(de.remaining()));
    for _ in 0..len {
        match take(de) {
            Ok(x) => v.push(x),
            Err(e) => return Some(Err(e)),
        }
    }
    Some(Ok(cast::<Vec<T>, V::Value>(v)))
}

/// The type ids of the visitors `Vec<T>` deserialises with, for each bulk `T`, learnt once.
fn vec_visitors() -> &'static [(TypeId, Kind)] {
    static TABLE: OnceLock<Vec<(TypeId, Kind)>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = Vec::new();
        let mut add = |id: Option<TypeId>, kind| {
            if let Some(id) = id {
                table.push((id, kind));
            }
        };
        add(visitor_of_vec::<u8>(), Kind::U8);
        add(visitor_of_vec::<i8>(), Kind::I8);
        add(visitor_of_vec::<bool>(), Kind::Bool);
        #[cfg(target_endian = "little")]
        add(visitor_of_vec::<f32>(), Kind::F32);
        #[cfg(target_endian = "little")]
        add(visitor_of_vec::<f64>(), Kind::F64);
        add(visitor_of_vec::<u16>(), Kind::U16);
        add(visitor_of_vec::<u32>(), Kind::U32);
        add(visitor_of_vec::<u64>(), Kind::U64);
        add(visitor_of_vec::<usize>(), Kind::Usize);
        add(visitor_of_vec::<u128>(), Kind::U128);
        add(visitor_of_vec::<i16>(), Kind::I16);
        add(visitor_of_vec::<i32>(), Kind::I32);
        add(visitor_of_vec::<i64>(), Kind::I64);
        add(visitor_of_vec::<isize>(), Kind::Isize);
        add(visitor_of_vec::<i128>(), Kind::I128);
        table
    })
}

/// The type id of the visitor `Vec<T>::deserialize` hands to `deserialize_seq`, or `None`
/// if it asks for something else (then `Vec<T>` is decoded element by element).
fn visitor_of_vec<T: for<'de> Deserialize<'de>>() -> Option<TypeId> {
    let seen = std::cell::Cell::new(None);
    let _ = Vec::<T>::deserialize(Probe(&seen));
    seen.get()
}

/// A deserializer that only records the type of the visitor given to `deserialize_seq`.
struct Probe<'a>(&'a std::cell::Cell<Option<TypeId>>);

#[derive(Debug)]
struct ProbeError;

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("probe")
    }
}

impl std::error::Error for ProbeError {}

impl de::Error for ProbeError {
    fn custom<M: fmt::Display>(_: M) -> Self {
        ProbeError
    }
}

impl<'de> de::Deserializer<'de> for Probe<'_> {
    type Error = ProbeError;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> std::result::Result<V::Value, ProbeError> {
        Err(ProbeError)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, _: V) -> std::result::Result<V::Value, ProbeError> {
        self.0.set(Some(typeid::of::<V>()));
        Err(ProbeError)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct tuple tuple_struct map struct enum identifier
        ignored_any
    }
}

/// How many element types `Vec<T>` decodes in bulk (all of them, unless serde changed how
/// `Vec<T>` deserialises).
#[cfg(test)]
pub(crate) fn bulk_vec_kinds() -> usize {
    vec_visitors().len()
}
