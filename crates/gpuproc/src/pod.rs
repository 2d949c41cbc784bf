//! Vectors of plain structs as one block of bytes: `#[serde(with = "gpuproc::pod")]`.
//!
//! gpuproc's encoder takes vectors of numbers whole (see the crate guide's "Big data"), but
//! a vector of structs goes element by element: serde gives an encoder no way to know a
//! struct's layout, and guessing it from the values would be unsound. A field marked
//! `#[serde(with = "gpuproc::pod")]` says what serde cannot: its elements are plain old
//! data ([`bytemuck::Pod`]: `Copy`, `#[repr(C)]` or `#[repr(transparent)]`, no padding,
//! every bit pattern a value), so the vector is sent as the bytes it holds (one copy into
//! the message, one out) and checked for a whole number of elements when it is read.
//!
//! ```
//! use bytemuck::{Pod, Zeroable};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
//! #[repr(C)]
//! struct Point {
//!     x: f32,
//!     y: f32,
//!     id: u32,
//! }
//!
//! #[derive(Serialize, Deserialize)]
//! struct Cloud {
//!     name: String,
//!     #[serde(with = "gpuproc::pod")]
//!     points: Vec<Point>,
//! }
//!
//! fn count(c: Cloud) -> usize {
//!     c.points.iter().filter(|p| p.x > 0.5).count()
//! }
//!
//! # fn main() -> Result<(), gpuproc::PoolError> {
//! # gpuproc::init();
//! let clouds: Vec<Cloud> = (0..4)
//!     .map(|i| Cloud {
//!         name: format!("cloud {i}"),
//!         points: (0..1000u32)
//!             .map(|k| Point { x: k as f32 / 1000.0, y: 0.0, id: k })
//!             .collect(),
//!     })
//!     .collect();
//! let pool = gpuproc::Pool::new(2)?;
//! assert_eq!(pool.map(count, clouds)?, vec![499; 4]);
//! # Ok(())
//! # }
//! ```
//!
//! The bytes are the values as they lie in memory, so both sides must agree on the type's
//! definition and byte order: the processes of one program on one machine always do, and
//! every machine a gpuproc pool reaches over SSH or Slurm is little-endian in practice (a
//! mismatch gives wrong values, never undefined behaviour). With a self-describing format
//! (JSON, say) the field is a list of byte values.

use std::fmt;
use std::marker::PhantomData;
use std::mem::size_of;

use bytemuck::Pod;
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserializer, Serializer};

/// Writes `values` as one block of bytes (the `serialize` of `#[serde(with = ...)]`). A
/// zero-sized `T` has no bytes to send, so its vectors are refused (send their length).
pub fn serialize<T: Pod, S: Serializer>(values: &[T], serializer: S) -> Result<S::Ok, S::Error> {
    if size_of::<T>() == 0 {
        return Err(serde::ser::Error::custom(format_args!(
            "gpuproc::pod cannot send a vector of {}: a zero-sized type has no bytes (send \
             the vector's length instead)",
            std::any::type_name::<T>()
        )));
    }
    serializer.serialize_bytes(bytemuck::cast_slice(values))
}

/// Reads a block written by [`serialize`] back into a vector (the `deserialize` of
/// `#[serde(with = ...)]`). A block that is not a whole number of `T` is an error.
pub fn deserialize<'de, T: Pod, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<T>, D::Error> {
    deserializer.deserialize_byte_buf(PodVisitor(PhantomData))
}

struct PodVisitor<T>(PhantomData<fn() -> T>);

impl<T: Pod> PodVisitor<T> {
    fn from_bytes<E: de::Error>(bytes: &[u8]) -> Result<Vec<T>, E> {
        let size = size_of::<T>();
        if size == 0 {
            return if bytes.is_empty() {
                Ok(Vec::new())
            } else {
                Err(E::custom("bytes for a vector of a zero-sized type"))
            };
        }
        if bytes.len() % size != 0 {
            return Err(E::custom(format_args!(
                "{} bytes are not a whole number of {} ({size} bytes each)",
                bytes.len(),
                std::any::type_name::<T>()
            )));
        }
        // Zeroed first (calloc: fresh pages for large vectors, no extra pass), then copied:
        // the vector has `T`'s alignment, which the bytes may lack.
        let mut out = bytemuck::zeroed_vec::<T>(bytes.len() / size);
        bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(bytes);
        Ok(out)
    }
}

impl<'de, T: Pod> Visitor<'de> for PodVisitor<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the bytes of a vector of {}", std::any::type_name::<T>())
    }

    fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Vec<T>, E> {
        Self::from_bytes(bytes)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
        while let Some(b) = seq.next_element::<u8>()? {
            bytes.push(b);
        }
        Self::from_bytes(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use bytemuck::{Pod, Zeroable};
    use serde::{Deserialize, Serialize};

    #[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
    #[repr(C)]
    struct P {
        a: f64,
        b: u16,
        c: [u8; 6],
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Holder {
        before: String,
        #[serde(with = "crate::pod")]
        points: Vec<P>,
        after: u32,
    }

    fn points(n: usize) -> Vec<P> {
        (0..n)
            .map(|i| P {
                a: i as f64 * 0.25,
                b: i as u16,
                c: [i as u8; 6],
            })
            .collect()
    }

    #[test]
    fn vectors_of_plain_structs_round_trip_as_their_bytes() {
        for n in [0, 1, 7, 10_000] {
            let h = Holder {
                before: "x".into(),
                points: points(n),
                after: 9,
            };
            let bytes = crate::codec::to_vec(&h).unwrap();
            // The points' bytes as they lie in memory, just before the last field.
            let body = bytemuck::cast_slice::<P, u8>(&h.points);
            let at = bytes.len() - 1 - body.len();
            assert_eq!(&bytes[at..bytes.len() - 1], body);
            assert_eq!(crate::codec::from_bytes::<Holder>(&bytes).unwrap(), h);
            // Self-describing formats work too.
            let json = serde_json::to_string(&h).unwrap();
            assert_eq!(serde_json::from_str::<Holder>(&json).unwrap(), h);
        }
    }

    #[test]
    fn a_vector_of_a_zero_sized_type_is_refused_not_a_panic() {
        #[derive(Serialize, Deserialize, Debug)]
        struct Units(#[serde(with = "crate::pod")] Vec<()>);
        let err = crate::codec::to_vec(&Units(vec![(); 3])).unwrap_err();
        assert!(err.to_string().contains("zero-sized type"), "{err}");
        // Bytes for one, however made, are refused too; none make an empty vector.
        let bytes = crate::codec::to_vec(&vec![7u8]).unwrap();
        assert!(crate::codec::from_bytes::<Units>(&bytes).is_err());
        let empty = crate::codec::to_vec(&Vec::<u8>::new()).unwrap();
        assert!(crate::codec::from_bytes::<Units>(&empty)
            .unwrap()
            .0
            .is_empty());
    }

    #[test]
    fn a_block_that_is_not_a_whole_number_of_elements_is_refused() {
        #[derive(Serialize)]
        struct Bytes {
            before: String,
            #[serde(with = "serde_bytes_like")]
            points: Vec<u8>,
            after: u32,
        }
        mod serde_bytes_like {
            pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(v)
            }
        }
        let bad = Bytes {
            before: "x".into(),
            points: vec![0; 17],
            after: 9,
        };
        let bytes = crate::codec::to_vec(&bad).unwrap();
        let err = crate::codec::from_bytes::<Holder>(&bytes).unwrap_err();
        assert!(
            matches!(err.kind(), postcard::Error::SerdeDeCustom),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("17 bytes are not a whole number"),
            "{err}"
        );
    }
}
