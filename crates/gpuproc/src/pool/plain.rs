//! A fixed-width encoding for plain data, used for the arguments and results of pool tasks
//! when every item of a chunk (or run) has the same shape.
//!
//! Postcard writes integers as varints and needs each item's length beside it; for a
//! trivial task on a `u64` that costs more than the task. Plain data — numbers, `bool`,
//! `char`, `()` and tuples, arrays and structs of them — has a fixed layout instead: its
//! *shape* is the list of primitive kinds its `Serialize` writes, and each item is those
//! primitives' little-endian bytes, one after another, with no framing.
//!
//! The encoder records the first item's shape and checks every later item against it, so a
//! chunk is plain only if all its items have exactly the same shape; anything else (strings,
//! sequences, options, enums, maps, handles with descriptors) is refused and the item goes
//! through postcard. The decoder is driven by the shape, not by the type: each primitive is
//! read as the kind that was written and handed to the visitor as such (serde's visitors
//! accept any integer that fits), so it never misreads a width.

use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, SeqAccess, Visitor};
use serde::ser::{self, Impossible, Serialize};

/// The kinds of primitive in a shape, one byte each.
mod kind {
    pub const UNIT: u8 = 0;
    pub const BOOL: u8 = 1;
    pub const U8: u8 = 2;
    pub const U16: u8 = 3;
    pub const U32: u8 = 4;
    pub const U64: u8 = 5;
    pub const U128: u8 = 6;
    pub const I8: u8 = 7;
    pub const I16: u8 = 8;
    pub const I32: u8 = 9;
    pub const I64: u8 = 10;
    pub const I128: u8 = 11;
    pub const F32: u8 = 12;
    pub const F64: u8 = 13;
    pub const CHAR: u8 = 14;
}

/// Items longer than this many primitives are not worth the shape check: postcard.
const MAX_SHAPE: usize = 64;

/// Why a value is not plain, or bytes do not decode. (Boxed, so that the results of the
/// per-primitive calls stay one word wide.)
#[derive(Debug)]
#[allow(
    clippy::box_collection,
    reason = "a thin pointer keeps `Result<(), Error>` one word"
)]
pub(crate) struct Error(Box<String>);

impl Error {
    #[cold]
    fn new(msg: String) -> Self {
        Error(Box::new(msg))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl ser::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error::new(msg.to_string())
    }
}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error::new(msg.to_string())
    }
}

#[cold]
fn not_plain<T>(what: &str) -> Result<T, Error> {
    Err(Error::new(format!("{what} is not plain data")))
}

/// Encodes items of one shape back to back (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Encoder {
    /// The shape every item must have (recorded from the first one).
    shape: Vec<u8>,
    /// Each item's encoded length (fixed by the shape).
    stride: usize,
    /// Whether an item has been encoded, fixing the shape.
    fixed: bool,
}

impl Encoder {
    /// The shape, once an item has been encoded.
    pub fn shape(&self) -> Option<&[u8]> {
        self.fixed.then_some(&self.shape[..])
    }

    /// Appends `value` to `out` if it is plain data of this encoder's shape (the first
    /// value sets the shape); returns whether it did (if not, `out` is as it was).
    #[inline(always)]
    pub fn push<T: Serialize + ?Sized>(&mut self, out: &mut Vec<u8>, value: &T) -> bool {
        let start = out.len();
        out.reserve(self.stride);
        if !self.fixed {
            // (A panic in an earlier `serialize` may have left part of a shape.)
            self.shape.clear();
        }
        let mut s = Writer {
            out,
            shape: &mut self.shape,
            at: 0,
            record: !self.fixed,
        };
        let ok = value.serialize(&mut s).is_ok() && (s.record || s.at == s.shape.len());
        if !ok {
            out.truncate(start);
            if !self.fixed {
                self.shape.clear();
            }
            return false;
        }
        if !self.fixed {
            self.fixed = true;
            self.stride = out.len() - start;
        }
        true
    }
}

/// Decodes one item of `shape` from the start of `bytes`.
#[inline(always)]
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8], shape: &[u8]) -> Result<T, Error> {
    let mut d = Reader {
        bytes,
        shape,
        at: 0,
    };
    let v = T::deserialize(&mut d)?;
    if d.at != shape.len() {
        return Err(Error::new(format!(
            "the value took {} of the {} primitives it was sent with",
            d.at,
            shape.len()
        )));
    }
    Ok(v)
}

struct Writer<'a> {
    out: &'a mut Vec<u8>,
    shape: &'a mut Vec<u8>,
    /// Primitives written so far.
    at: usize,
    /// Recording the shape (first item) rather than checking against it.
    record: bool,
}

impl Writer<'_> {
    /// Notes that the next primitive is of kind `k`: records it (first item) or checks it.
    #[inline(always)]
    fn kind(&mut self, k: u8) -> Result<(), Error> {
        if !self.record && self.shape.get(self.at) == Some(&k) {
            self.at += 1;
            return Ok(());
        }
        self.kind_slow(k)
    }

    #[cold]
    #[inline(never)]
    fn kind_slow(&mut self, k: u8) -> Result<(), Error> {
        if !self.record {
            return Err(Error::new("a value of another shape".into()));
        }
        if self.shape.len() >= MAX_SHAPE {
            return not_plain("a value this large");
        }
        self.shape.push(k);
        self.at += 1;
        Ok(())
    }

    #[inline(always)]
    fn put<const N: usize>(&mut self, k: u8, bytes: [u8; N]) -> Result<(), Error> {
        self.kind(k)?;
        self.out.extend_from_slice(&bytes);
        Ok(())
    }
}

impl<'a> ser::Serializer for &mut Writer<'a> {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = Impossible<(), Error>;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Impossible<(), Error>;
    type SerializeMap = Impossible<(), Error>;
    type SerializeStruct = Self;
    type SerializeStructVariant = Impossible<(), Error>;

    #[inline]
    fn serialize_bool(self, v: bool) -> Result<(), Error> {
        self.put(kind::BOOL, [v as u8])
    }
    #[inline]
    fn serialize_i8(self, v: i8) -> Result<(), Error> {
        self.put(kind::I8, v.to_le_bytes())
    }
    #[inline]
    fn serialize_i16(self, v: i16) -> Result<(), Error> {
        self.put(kind::I16, v.to_le_bytes())
    }
    #[inline]
    fn serialize_i32(self, v: i32) -> Result<(), Error> {
        self.put(kind::I32, v.to_le_bytes())
    }
    #[inline]
    fn serialize_i64(self, v: i64) -> Result<(), Error> {
        self.put(kind::I64, v.to_le_bytes())
    }
    #[inline]
    fn serialize_i128(self, v: i128) -> Result<(), Error> {
        self.put(kind::I128, v.to_le_bytes())
    }
    #[inline]
    fn serialize_u8(self, v: u8) -> Result<(), Error> {
        self.put(kind::U8, v.to_le_bytes())
    }
    #[inline]
    fn serialize_u16(self, v: u16) -> Result<(), Error> {
        self.put(kind::U16, v.to_le_bytes())
    }
    #[inline]
    fn serialize_u32(self, v: u32) -> Result<(), Error> {
        self.put(kind::U32, v.to_le_bytes())
    }
    #[inline]
    fn serialize_u64(self, v: u64) -> Result<(), Error> {
        self.put(kind::U64, v.to_le_bytes())
    }
    #[inline]
    fn serialize_u128(self, v: u128) -> Result<(), Error> {
        self.put(kind::U128, v.to_le_bytes())
    }
    #[inline]
    fn serialize_f32(self, v: f32) -> Result<(), Error> {
        self.put(kind::F32, v.to_le_bytes())
    }
    #[inline]
    fn serialize_f64(self, v: f64) -> Result<(), Error> {
        self.put(kind::F64, v.to_le_bytes())
    }
    #[inline]
    fn serialize_char(self, v: char) -> Result<(), Error> {
        self.put(kind::CHAR, u32::from(v).to_le_bytes())
    }
    fn serialize_unit(self) -> Result<(), Error> {
        self.kind(kind::UNIT)
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), Error> {
        self.kind(kind::UNIT)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        value.serialize(self)
    }
    fn serialize_tuple(self, _: usize) -> Result<Self, Error> {
        Ok(self)
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self, Error> {
        Ok(self)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self, Error> {
        Ok(self)
    }

    fn serialize_str(self, _: &str) -> Result<(), Error> {
        not_plain("a string")
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<(), Error> {
        not_plain("a byte string")
    }
    fn serialize_none(self) -> Result<(), Error> {
        not_plain("an option")
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<(), Error> {
        not_plain("an option")
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> Result<(), Error> {
        not_plain("an enum")
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<(), Error> {
        not_plain("an enum")
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, Error> {
        not_plain("a sequence")
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, Error> {
        not_plain("an enum")
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Error> {
        not_plain("a map")
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, Error> {
        not_plain("an enum")
    }
    fn is_human_readable(&self) -> bool {
        false
    }
}

impl ser::SerializeTuple for &mut Writer<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), Error> {
        Ok(())
    }
}

impl ser::SerializeTupleStruct for &mut Writer<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), Error> {
        Ok(())
    }
}

impl ser::SerializeStruct for &mut Writer<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        _: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        value.serialize(&mut **self)
    }
    fn skip_field(&mut self, _: &'static str) -> Result<(), Error> {
        // A skipped field changes the shape from item to item.
        not_plain("a struct with skipped fields")
    }
    fn end(self) -> Result<(), Error> {
        Ok(())
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    shape: &'a [u8],
    /// Primitives read so far.
    at: usize,
}

impl<'a> Reader<'a> {
    #[inline(always)]
    fn take<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        match self.bytes.split_first_chunk::<N>() {
            Some((head, rest)) => {
                self.bytes = rest;
                Ok(*head)
            }
            None => Err(Error::new("the item is shorter than its shape".into())),
        }
    }

    /// Reads the next primitive as the kind it was written and hands it to `v` (the slow
    /// path of the typed `deserialize_*`, and the path of `deserialize_any`).
    #[cold]
    #[inline(never)]
    fn visit<'de, V: Visitor<'de>>(&mut self, v: V) -> Result<V::Value, Error> {
        let k = *self
            .shape
            .get(self.at)
            .ok_or_else(|| Error::new("the value wants more primitives than were sent".into()))?;
        self.at += 1;
        match k {
            kind::U64 => v.visit_u64(u64::from_le_bytes(self.take()?)),
            kind::I64 => v.visit_i64(i64::from_le_bytes(self.take()?)),
            kind::F64 => v.visit_f64(f64::from_le_bytes(self.take()?)),
            kind::U32 => v.visit_u32(u32::from_le_bytes(self.take()?)),
            kind::I32 => v.visit_i32(i32::from_le_bytes(self.take()?)),
            kind::F32 => v.visit_f32(f32::from_le_bytes(self.take()?)),
            kind::U8 => v.visit_u8(u8::from_le_bytes(self.take()?)),
            kind::I8 => v.visit_i8(i8::from_le_bytes(self.take()?)),
            kind::U16 => v.visit_u16(u16::from_le_bytes(self.take()?)),
            kind::I16 => v.visit_i16(i16::from_le_bytes(self.take()?)),
            kind::U128 => v.visit_u128(u128::from_le_bytes(self.take()?)),
            kind::I128 => v.visit_i128(i128::from_le_bytes(self.take()?)),
            kind::BOOL => match self.take::<1>()? {
                [0] => v.visit_bool(false),
                [1] => v.visit_bool(true),
                [b] => Err(Error::new(format!("{b} is not a bool"))),
            },
            kind::CHAR => {
                let c = u32::from_le_bytes(self.take()?);
                match char::from_u32(c) {
                    Some(c) => v.visit_char(c),
                    None => Err(Error::new(format!("{c:#x} is not a char"))),
                }
            }
            kind::UNIT => v.visit_unit(),
            other => Err(Error::new(format!("unknown primitive kind {other}"))),
        }
    }
}

/// The elements of a tuple, array or struct, read one primitive group at a time.
struct Elements<'r, 'a> {
    reader: &'r mut Reader<'a>,
    left: usize,
}

impl<'de> SeqAccess<'de> for Elements<'_, '_> {
    type Error = Error;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.reader).map(Some)
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

macro_rules! visit_primitive {
    ($($name:ident)*) => {$(
        #[inline]
        fn $name<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
            self.visit(v)
        }
    )*};
}

macro_rules! refuse {
    ($($name:ident: $what:literal)*) => {$(
        fn $name<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
            not_plain($what)
        }
    )*};
}

/// A number read straight as the type asked for when the shape has exactly that kind
/// (the common case), else through [`Reader::visit`].
macro_rules! number {
    ($($name:ident: $kind:ident $visit:ident $ty:ty)*) => {$(
        #[inline(always)]
        fn $name<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
            if self.shape.get(self.at) == Some(&kind::$kind) {
                self.at += 1;
                return v.$visit(<$ty>::from_le_bytes(self.take()?));
            }
            self.visit(v)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for &mut Reader<'_> {
    type Error = Error;

    visit_primitive! {
        deserialize_any deserialize_bool deserialize_char deserialize_unit
        deserialize_ignored_any
    }

    number! {
        deserialize_i8: I8 visit_i8 i8
        deserialize_i16: I16 visit_i16 i16
        deserialize_i32: I32 visit_i32 i32
        deserialize_i64: I64 visit_i64 i64
        deserialize_i128: I128 visit_i128 i128
        deserialize_u8: U8 visit_u8 u8
        deserialize_u16: U16 visit_u16 u16
        deserialize_u32: U32 visit_u32 u32
        deserialize_u64: U64 visit_u64 u64
        deserialize_u128: U128 visit_u128 u128
        deserialize_f32: F32 visit_f32 f32
        deserialize_f64: F64 visit_f64 f64
    }

    refuse! {
        deserialize_str: "a string" deserialize_string: "a string"
        deserialize_bytes: "a byte string" deserialize_byte_buf: "a byte string"
        deserialize_option: "an option" deserialize_seq: "a sequence" deserialize_map: "a map"
        deserialize_identifier: "an identifier"
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        v: V,
    ) -> Result<V::Value, Error> {
        self.visit(v)
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        v: V,
    ) -> Result<V::Value, Error> {
        v.visit_newtype_struct(self)
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, Error> {
        v.visit_seq(Elements {
            reader: self,
            left: len,
        })
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        len: usize,
        v: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_tuple(len, v)
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_tuple(fields.len(), v)
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Error> {
        not_plain("an enum")
    }
    fn is_human_readable(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Point {
        x: f32,
        y: f32,
        tag: (u8, bool, char),
        id: Id,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
    struct Id(i128);

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + fmt::Debug>(items: &[T]) {
        let mut enc = Encoder::default();
        let mut out = Vec::new();
        for it in items {
            assert!(enc.push(&mut out, it), "{it:?} is plain");
        }
        let shape = enc.shape().unwrap().to_vec();
        let stride = out.len() / items.len();
        assert_eq!(out.len(), stride * items.len());
        for (i, it) in items.iter().enumerate() {
            let back: T = decode(&out[i * stride..], &shape).unwrap();
            assert_eq!(&back, it);
        }
    }

    #[test]
    fn plain_values_round_trip_at_a_fixed_stride() {
        round_trip(&[0u64, 1, u64::MAX]);
        round_trip(&[(-1i8, 2u16, -3i32, 4.5f64), (0, 0, 0, -0.0)]);
        round_trip(&[[1.0f32; 4], [2.0; 4]]);
        round_trip(&[(), ()]);
        round_trip(&[Point {
            x: 1.0,
            y: -2.0,
            tag: (7, true, 'é'),
            id: Id(-5),
        }]);
        round_trip(&[u128::MAX, 0]);
    }

    #[test]
    fn anything_else_is_refused_and_leaves_the_buffer_as_it_was() {
        let mut out = vec![9u8];
        assert!(!Encoder::default().push(&mut out, &"text"));
        assert!(!Encoder::default().push(&mut out, &vec![1u32, 2]));
        assert!(!Encoder::default().push(&mut out, &Some(1u8)));
        assert!(!Encoder::default().push(&mut out, &(1u8, None::<u8>)));
        assert!(!Encoder::default().push(&mut out, &[[0u64; 32]; 3]));
        assert_eq!(out, [9]);
    }

    #[test]
    fn an_item_of_another_shape_is_refused() {
        #[derive(Serialize)]
        #[serde(untagged)]
        enum Either {
            Small(u8),
            Big(u64),
        }
        let mut enc = Encoder::default();
        let mut out = Vec::new();
        assert!(enc.push(&mut out, &Either::Small(1)));
        assert!(!enc.push(&mut out, &Either::Big(1)));
        assert!(enc.push(&mut out, &Either::Small(2)));
        assert_eq!(out, [1, 2]);
    }

    #[test]
    fn decoding_follows_the_shape_not_the_type() {
        // A u32 decodes where a u64 is wanted (as with postcard's varints)...
        let mut enc = Encoder::default();
        let mut out = Vec::new();
        assert!(enc.push(&mut out, &7u32));
        assert_eq!(decode::<u64>(&out, enc.shape().unwrap()).unwrap(), 7);
        // ...but a value that does not fit, too few bytes, or leftover primitives do not.
        assert!(decode::<u8>(&300u32.to_le_bytes(), &[kind::U32]).is_err());
        assert!(decode::<u64>(&[1, 2, 3], &[kind::U64]).is_err());
        assert!(decode::<u8>(&[1, 2], &[kind::U8, kind::U8]).is_err());
        assert!(decode::<(u8, u8)>(&[1], &[kind::U8]).is_err());
        assert!(decode::<bool>(&[2], &[kind::BOOL]).is_err());
        assert!(decode::<char>(&0xD800u32.to_le_bytes(), &[kind::CHAR]).is_err());
        assert!(decode::<String>(&[], &[]).is_err());
        assert!(decode::<u8>(&[1], &[99]).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_and_shapes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            shape in proptest::collection::vec(0u8..20, 0..8),
        ) {
            let _ = decode::<(u64, f32, bool, char)>(&bytes, &shape);
            let _ = decode::<Point>(&bytes, &shape);
        }

        #[test]
        fn tuples_round_trip(items in proptest::collection::vec(
            (any::<i64>(), any::<u16>(), any::<bool>(), any::<char>()), 1..20)) {
            round_trip(&items);
        }
    }
}
