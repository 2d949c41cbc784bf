//! The serializer: postcard's format, with sequences of numbers written in bulk.

use serde::ser::{self, Serialize};

use super::{bulk, varint, Error, Result};
use postcard::Error as Pe;

/// Where encoded bytes go.
pub(crate) trait Output {
    fn push(&mut self, byte: u8) -> Result<()>;
    fn extend(&mut self, bytes: &[u8]) -> Result<()>;

    /// Appends `head` then `body` (a length and the bytes it counts), which an output may
    /// do with one check of its room.
    #[inline]
    fn extend_pair(&mut self, head: &[u8], body: &[u8]) -> Result<()> {
        self.extend(head)?;
        self.extend(body)
    }
}

impl Output for Vec<u8> {
    #[inline]
    fn push(&mut self, byte: u8) -> Result<()> {
        Vec::push(self, byte);
        Ok(())
    }

    #[inline]
    fn extend(&mut self, bytes: &[u8]) -> Result<()> {
        self.extend_from_slice(bytes);
        Ok(())
    }

    #[inline]
    fn extend_pair(&mut self, head: &[u8], body: &[u8]) -> Result<()> {
        self.reserve(head.len() + body.len());
        self.extend_from_slice(head);
        self.extend_from_slice(body);
        Ok(())
    }
}

impl<O: Output + ?Sized> Output for &mut O {
    #[inline]
    fn push(&mut self, byte: u8) -> Result<()> {
        (**self).push(byte)
    }

    #[inline]
    fn extend(&mut self, bytes: &[u8]) -> Result<()> {
        (**self).extend(bytes)
    }

    #[inline]
    fn extend_pair(&mut self, head: &[u8], body: &[u8]) -> Result<()> {
        (**self).extend_pair(head, body)
    }
}

/// A fixed buffer; writing past its end is [`Pe::SerializeBufferFull`].
pub(crate) struct SliceOutput<'b> {
    pub buf: &'b mut [u8],
    pub len: usize,
}

impl Output for SliceOutput<'_> {
    #[inline]
    fn push(&mut self, byte: u8) -> Result<()> {
        let slot = self.buf.get_mut(self.len).ok_or(Pe::SerializeBufferFull)?;
        *slot = byte;
        self.len += 1;
        Ok(())
    }

    #[inline]
    fn extend(&mut self, bytes: &[u8]) -> Result<()> {
        let end = self
            .len
            .checked_add(bytes.len())
            .ok_or(Pe::SerializeBufferFull)?;
        let dst = self
            .buf
            .get_mut(self.len..end)
            .ok_or(Pe::SerializeBufferFull)?;
        dst.copy_from_slice(bytes);
        self.len = end;
        Ok(())
    }
}

/// Counts bytes without keeping them.
pub(crate) struct SizeOutput(pub usize);

impl Output for SizeOutput {
    #[inline]
    fn push(&mut self, _: u8) -> Result<()> {
        self.0 += 1;
        Ok(())
    }

    #[inline]
    fn extend(&mut self, bytes: &[u8]) -> Result<()> {
        self.0 += bytes.len();
        Ok(())
    }
}

/// The serializer over an [`Output`].
pub(crate) struct Serializer<O> {
    pub out: O,
}

impl<O: Output> Serializer<O> {
    #[inline]
    pub(super) fn varint(&mut self, v: u64) -> Result<()> {
        let mut buf = [0u8; varint::MAX_U64];
        let n = varint::put_u64(v, &mut buf);
        self.out.extend(&buf[..n])
    }

    #[inline]
    fn varint128(&mut self, v: u128) -> Result<()> {
        let mut buf = [0u8; varint::MAX_U128];
        let n = varint::put_u128(v, &mut buf);
        self.out.extend(&buf[..n])
    }
}

impl<O: Output> ser::Serializer for &mut Serializer<O> {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn is_human_readable(&self) -> bool {
        false
    }

    #[inline]
    fn serialize_bool(self, v: bool) -> Result<()> {
        self.out.push(u8::from(v))
    }

    #[inline]
    fn serialize_i8(self, v: i8) -> Result<()> {
        self.out.push(v as u8)
    }

    #[inline]
    fn serialize_i16(self, v: i16) -> Result<()> {
        self.varint(varint::zigzag(v.into()))
    }

    #[inline]
    fn serialize_i32(self, v: i32) -> Result<()> {
        self.varint(varint::zigzag(v.into()))
    }

    #[inline]
    fn serialize_i64(self, v: i64) -> Result<()> {
        self.varint(varint::zigzag(v))
    }

    #[inline]
    fn serialize_i128(self, v: i128) -> Result<()> {
        self.varint128(varint::zigzag128(v))
    }

    #[inline]
    fn serialize_u8(self, v: u8) -> Result<()> {
        self.out.push(v)
    }

    #[inline]
    fn serialize_u16(self, v: u16) -> Result<()> {
        self.varint(v.into())
    }

    #[inline]
    fn serialize_u32(self, v: u32) -> Result<()> {
        self.varint(v.into())
    }

    #[inline]
    fn serialize_u64(self, v: u64) -> Result<()> {
        self.varint(v)
    }

    #[inline]
    fn serialize_u128(self, v: u128) -> Result<()> {
        self.varint128(v)
    }

    #[inline]
    fn serialize_f32(self, v: f32) -> Result<()> {
        self.out.extend(&v.to_le_bytes())
    }

    #[inline]
    fn serialize_f64(self, v: f64) -> Result<()> {
        self.out.extend(&v.to_le_bytes())
    }

    #[inline]
    fn serialize_char(self, v: char) -> Result<()> {
        let mut buf = [0u8; 4];
        self.serialize_str(v.encode_utf8(&mut buf))
    }

    #[inline]
    fn serialize_str(self, v: &str) -> Result<()> {
        self.serialize_bytes(v.as_bytes())
    }

    #[inline]
    fn serialize_bytes(self, v: &[u8]) -> Result<()> {
        let mut buf = [0u8; varint::MAX_U64];
        let n = varint::put_u64(len_u64(v.len()), &mut buf);
        self.out.extend_pair(&buf[..n], v)
    }

    #[inline]
    fn serialize_none(self) -> Result<()> {
        self.out.push(0)
    }

    #[inline]
    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> Result<()> {
        self.out.push(1)?;
        value.serialize(self)
    }

    #[inline]
    fn serialize_unit(self) -> Result<()> {
        Ok(())
    }

    #[inline]
    fn serialize_unit_struct(self, _name: &'static str) -> Result<()> {
        Ok(())
    }

    #[inline]
    fn serialize_unit_variant(self, _: &'static str, index: u32, _: &'static str) -> Result<()> {
        self.varint(index.into())
    }

    #[inline]
    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<()> {
        value.serialize(self)
    }

    #[inline]
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _name: &'static str,
        index: u32,
        _variant: &'static str,
        value: &T,
    ) -> Result<()> {
        self.varint(index.into())?;
        value.serialize(self)
    }

    #[inline]
    fn serialize_seq(self, len: Option<usize>) -> Result<Self> {
        self.varint(len_u64(len.ok_or(Pe::SerializeSeqLengthUnknown)?))?;
        Ok(self)
    }

    #[inline]
    fn serialize_tuple(self, _len: usize) -> Result<Self> {
        Ok(self)
    }

    #[inline]
    fn serialize_tuple_struct(self, _name: &'static str, _len: usize) -> Result<Self> {
        Ok(self)
    }

    #[inline]
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self> {
        self.varint(index.into())?;
        Ok(self)
    }

    #[inline]
    fn serialize_map(self, len: Option<usize>) -> Result<Self> {
        self.varint(len_u64(len.ok_or(Pe::SerializeSeqLengthUnknown)?))?;
        Ok(self)
    }

    #[inline]
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Self> {
        Ok(self)
    }

    #[inline]
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self> {
        self.varint(index.into())?;
        Ok(self)
    }

    /// Sequences with a known layout in one piece ([`bulk`]); others element by element,
    /// as serde's default does.
    fn collect_seq<I>(self, iter: I) -> Result<()>
    where
        I: IntoIterator,
        I::Item: Serialize,
    {
        if let Some(slice) = bulk::Slice::of(&iter) {
            return slice.encode(self);
        }
        let iter = iter.into_iter();
        let len = match iter.size_hint() {
            (lo, Some(hi)) if lo == hi => Some(lo),
            _ => None,
        };
        let mut seq = ser::Serializer::serialize_seq(&mut *self, len)?;
        for item in iter {
            ser::SerializeSeq::serialize_element(&mut seq, &item)?;
        }
        Ok(())
    }

    /// Formats `value` twice: once to count its bytes (the length comes first), once to
    /// write them (as postcard does).
    fn collect_str<T: core::fmt::Display + ?Sized>(self, value: &T) -> Result<()> {
        use core::fmt::Write;

        struct Count(usize);
        impl Write for Count {
            fn write_str(&mut self, s: &str) -> core::fmt::Result {
                self.0 += s.len();
                Ok(())
            }
        }
        struct Sink<'a, O>(&'a mut O);
        impl<O: Output> Write for Sink<'_, O> {
            fn write_str(&mut self, s: &str) -> core::fmt::Result {
                self.0.extend(s.as_bytes()).map_err(|_| core::fmt::Error)
            }
        }

        let mut count = Count(0);
        write!(count, "{value}").map_err(|_| Pe::CollectStrError)?;
        self.varint(len_u64(count.0))?;
        write!(Sink(&mut self.out), "{value}").map_err(|_| Pe::CollectStrError.into())
    }
}

/// A length as the `u64` its varint holds (lossless: `usize` is at most 64 bits here).
#[inline]
pub(super) fn len_u64(len: usize) -> u64 {
    len as u64
}

macro_rules! compound {
    ($($trait:ident :: $method:ident $(($key:ident))?),* $(,)?) => {$(
        impl<O: Output> ser::$trait for &mut Serializer<O> {
            type Ok = ();
            type Error = Error;

            #[inline]
            fn $method<T: ?Sized + Serialize>(
                &mut self,
                $($key: &'static str,)?
                value: &T,
            ) -> Result<()> {
                $(let _ = $key;)?
                value.serialize(&mut **self)
            }

            #[inline]
            fn end(self) -> Result<()> {
                Ok(())
            }
        }
    )*};
}

compound!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field,
    SerializeStruct::serialize_field(key),
    SerializeStructVariant::serialize_field(key),
);

impl<O: Output> ser::SerializeMap for &mut Serializer<O> {
    type Ok = ();
    type Error = Error;

    #[inline]
    fn serialize_key<K: ?Sized + Serialize>(&mut self, key: &K) -> Result<()> {
        key.serialize(&mut **self)
    }

    #[inline]
    fn serialize_value<V: ?Sized + Serialize>(&mut self, value: &V) -> Result<()> {
        value.serialize(&mut **self)
    }

    #[inline]
    fn end(self) -> Result<()> {
        Ok(())
    }
}
