//! The encoding of every serde value gpuproc sends between processes (pipes, queues, pool
//! tasks and results, process arguments): postcard's wire format (version 1), byte for byte,
//! written and read by gpuproc's own serde serializer so that sequences of numbers move in
//! bulk.
//!
//! Why not postcard's own serializer: serde hands a `Vec<f32>` to a serializer one element
//! at a time, and postcard encodes and decodes it so, one call per element; for the batches
//! of tensors and token arrays that feed GPU workers that call is most of the cost. Here
//! [`Serializer::collect_seq`](serde::Serializer::collect_seq) and
//! [`Deserializer::deserialize_seq`](serde::Deserializer::deserialize_seq) recognise the
//! sequences whose layout is known and take them whole (see [`bulk`]):
//!
//! | element type | encoding | bulk path |
//! |---|---|---|
//! | `u8`, `i8`, `f32`, `f64` | the little-endian bytes | one copy each way |
//! | `bool` | one byte, 0 or 1 | one copy, checked on decode |
//! | `u16`..`u128`, `i16`..`i128`, `usize`, `isize` | varints (zigzag if signed) | one tight loop, no per-element serde call |
//!
//! for `Vec<T>`, `&[T]`, `Box<[T]>` and everything that serialises through them, wherever
//! they sit inside a value (a field of a struct, an enum's payload, an element of a tuple).
//! Other sequences (`VecDeque`, sets, arrays, vectors of structs) go element by element, as
//! postcard does. The bytes are exactly postcard's either way, so the bulk path is a pure
//! speed-up: the tests encode random values with both and compare bytes and decoded values.
//!
//! Errors are postcard's kinds ([`postcard::Error`]) with, for a custom error (serde's
//! `Error::custom`, which a type's own `Serialize` or `Deserialize` raises: a `try_from`
//! that refuses a value, say), its message, which postcard's error type drops.

pub(crate) mod bulk;
mod de;
mod ser;

use serde::{Deserialize, Serialize};

/// Why a value did not encode or decode: postcard's kind of error and, for a custom
/// error, its message. (Boxed: errors are rare, and results stay small on the hot paths.)
#[derive(Debug)]
pub(crate) struct Error(Box<(postcard::Error, Option<String>)>);

impl Error {
    /// postcard's kind of error.
    pub(crate) fn kind(&self) -> &postcard::Error {
        &self.0 .0
    }

    /// The message of a custom error.
    pub(crate) fn message(&self) -> Option<&str> {
        self.0 .1.as_deref()
    }

    fn custom(kind: postcard::Error, msg: impl std::fmt::Display) -> Self {
        Error(Box::new((kind, Some(msg.to_string()))))
    }
}

impl From<postcard::Error> for Error {
    fn from(kind: postcard::Error) -> Self {
        Error(Box::new((kind, None)))
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.message() {
            Some(m) => f.write_str(m),
            None => self.kind().fmt(f),
        }
    }
}

impl std::error::Error for Error {}

impl serde::ser::Error for Error {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Error::custom(postcard::Error::SerdeSerCustom, msg)
    }
}

impl serde::de::Error for Error {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Error::custom(postcard::Error::SerdeDeCustom, msg)
    }
}
pub(crate) use ser::Output;

/// The result of an encoding or decoding step.
pub(crate) type Result<T> = std::result::Result<T, Error>;

/// Encodes `value` into a new vector.
pub(crate) fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    append(value, &mut out)?;
    Ok(out)
}

/// Appends the encoding of `value` to `out`. On error, `out` may hold part of it.
pub(crate) fn append<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<()> {
    value.serialize(&mut ser::Serializer { out })
}

/// Appends the encoding of `value` to any [`Output`].
pub(crate) fn append_to<T: Serialize + ?Sized, O: Output>(value: &T, out: &mut O) -> Result<()> {
    value.serialize(&mut ser::Serializer { out })
}

/// Encodes `value` into `buf`, returning the part written; [`postcard::Error::SerializeBufferFull`]
/// if it does not fit.
pub(crate) fn to_slice<'b, T: Serialize + ?Sized>(
    value: &T,
    buf: &'b mut [u8],
) -> Result<&'b mut [u8]> {
    let mut out = ser::SliceOutput { buf, len: 0 };
    value.serialize(&mut ser::Serializer { out: &mut out })?;
    let len = out.len;
    Ok(&mut out.buf[..len])
}

/// The length of `value`'s encoding, without writing it.
pub(crate) fn encoded_len<T: Serialize + ?Sized>(value: &T) -> Result<usize> {
    let mut out = ser::SizeOutput(0);
    value.serialize(&mut ser::Serializer { out: &mut out })?;
    Ok(out.0)
}

/// Decodes a `T` from the start of `bytes`; bytes after it are ignored (as postcard's
/// `from_bytes` does).
pub(crate) fn from_bytes<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T> {
    take_from_bytes(bytes).map(|(v, _)| v)
}

/// Decodes a `T` from the start of `bytes`, returning it and the bytes after it.
pub(crate) fn take_from_bytes<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<(T, &'a [u8])> {
    let mut de = de::Deserializer::new(bytes);
    let value = T::deserialize(&mut de)?;
    Ok((value, de.rest()))
}

/// LEB128 varints, as postcard writes them.
mod varint {
    /// The longest varint of a `u64`.
    pub const MAX_U64: usize = 10;
    /// The longest varint of a `u128`.
    pub const MAX_U128: usize = 19;

    macro_rules! put {
        ($name:ident, $t:ty, $max:ident) => {
            /// Writes `v` into `buf`, returning the number of bytes used.
            #[inline]
            pub fn $name(mut v: $t, buf: &mut [u8; $max]) -> usize {
                let mut i = 0;
                while v >= 0x80 {
                    buf[i] = (v as u8) | 0x80;
                    v >>= 7;
                    i += 1;
                }
                buf[i] = v as u8;
                i + 1
            }
        };
    }

    put!(put_u64, u64, MAX_U64);
    put!(put_u128, u128, MAX_U128);

    /// Zigzag: small magnitudes of either sign become small unsigned numbers.
    #[inline]
    pub fn zigzag(v: i64) -> u64 {
        ((v << 1) ^ (v >> 63)) as u64
    }

    #[inline]
    pub fn zigzag128(v: i128) -> u128 {
        ((v << 1) ^ (v >> 127)) as u128
    }

    #[inline]
    pub fn unzigzag(n: u64) -> i64 {
        ((n >> 1) as i64) ^ (-((n & 1) as i64))
    }

    #[inline]
    pub fn unzigzag128(n: u128) -> i128 {
        ((n >> 1) as i128) ^ (-((n & 1) as i128))
    }

    /// The most bytes a varint of a `bits`-bit integer may have, and the largest last byte
    /// (postcard's checks, so that both accept the same inputs).
    pub const fn limits(bits: u32) -> (usize, u8) {
        let n = bits.div_ceil(7) as usize;
        (n, (1u8 << (bits % 7)) - 1)
    }
}

#[cfg(test)]
mod tests;
