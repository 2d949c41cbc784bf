//! The encoded length of each task's argument (in a chunk) or result (in a run).
//!
//! Tasks' bytes lie back to back, so their lengths say where each one starts. When every
//! length is the same — always for plain data (see `plain`), often for postcard — they are
//! kept as one length and a count: nothing per task to store, send or read. The first
//! different length turns them into a list.

use serde::{Deserialize, Serialize};

/// Lengths of consecutive tasks' bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Lens {
    /// `count` tasks of `len` bytes each.
    Fixed { len: u32, count: u64 },
    /// Each task's length.
    Each(#[serde(with = "u32_block")] Vec<u32>),
}

impl Default for Lens {
    fn default() -> Self {
        Lens::Fixed { len: 0, count: 0 }
    }
}

impl Lens {
    /// How many tasks.
    #[inline]
    pub fn len(&self) -> usize {
        match self {
            Lens::Fixed { count, .. } => *count as usize,
            Lens::Each(v) => v.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Task `i`'s length (`i` < [`len`](Self::len)).
    #[inline]
    pub fn get(&self, i: usize) -> usize {
        match self {
            Lens::Fixed { len, .. } => *len as usize,
            Lens::Each(v) => v[i] as usize,
        }
    }

    /// Adds a task of `len` bytes.
    #[inline(always)]
    pub fn push(&mut self, len: u32) {
        match self {
            Lens::Fixed { len: l, count } if *count == 0 || *l == len => {
                *l = len;
                *count += 1;
            }
            _ => self.push_slow(len),
        }
    }

    #[cold]
    fn push_slow(&mut self, len: u32) {
        match self {
            Lens::Fixed { len: l, count } => {
                let mut v = vec![*l; *count as usize];
                v.push(len);
                *self = Lens::Each(v);
            }
            Lens::Each(v) => v.push(len),
        }
    }

    /// Removes every task.
    pub fn clear(&mut self) {
        *self = Lens::default();
    }

    /// The total length of the first `k` tasks.
    pub fn bytes_before(&self, k: usize) -> usize {
        match self {
            Lens::Fixed { len, count } => *len as usize * k.min(*count as usize),
            Lens::Each(v) => v[..k.min(v.len())].iter().map(|&l| l as usize).sum(),
        }
    }

    /// The total length of every task, `None` if it overflows a `usize`.
    pub fn checked_total(&self) -> Option<usize> {
        match self {
            Lens::Fixed { len, count } => {
                (*len as usize).checked_mul(usize::try_from(*count).ok()?)
            }
            Lens::Each(v) => v
                .iter()
                .try_fold(0usize, |sum, &l| sum.checked_add(l as usize)),
        }
    }

    /// Tasks `from .. from + n`.
    pub fn slice(&self, from: usize, n: usize) -> Lens {
        match self {
            Lens::Fixed { len, count } => Lens::Fixed {
                len: *len,
                count: n.min((*count as usize).saturating_sub(from)) as u64,
            },
            Lens::Each(v) => Lens::Each(v[from..from + n].to_vec()),
        }
    }

    /// Splits off the tasks from `k` on.
    pub fn split_off(&mut self, k: usize) -> Lens {
        match self {
            Lens::Fixed { len, count } => {
                let rest = count.saturating_sub(k as u64);
                *count -= rest;
                Lens::Fixed {
                    len: *len,
                    count: rest,
                }
            }
            Lens::Each(v) => Lens::Each(v.split_off(k)),
        }
    }
}

/// The length of `what` (a task's argument or result, the initializer's argument) as it
/// travels, in a `u32`; an error that says so when it is longer.
pub(crate) fn checked_len(len: usize, what: &str) -> Result<u32, String> {
    u32::try_from(len).map_err(|_| {
        format!(
            "{what} encodes to {len} bytes; at most {} bytes (4 GiB - 1) can be sent",
            u32::MAX
        )
    })
}

/// A descriptor count as it travels, in a `u32` (far more than a message can carry).
pub(crate) fn checked_fds(n: usize, what: &str) -> Result<u32, String> {
    u32::try_from(n).map_err(|_| format!("{what} holds {n} descriptors, too many to send"))
}

/// A `Vec<u32>` as one block of little-endian bytes: postcard would write a varint per
/// element, which costs more than a trivial task itself.
pub(crate) mod u32_block {
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u32], s: S) -> Result<S::Ok, S::Error> {
        if cfg!(target_endian = "little") {
            // SAFETY: `u32` has no padding and every byte of it is initialised; `u8` needs
            // no alignment; the slice covers exactly the memory of `v`, borrowed as long.
            let bytes = unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len() * 4) };
            return s.serialize_bytes(bytes);
        }
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        s.serialize_bytes(&bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
        struct Block;
        impl Visitor<'_> for Block {
            type Value = Vec<u32>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a block of little-endian u32s")
            }
            fn visit_bytes<E: Error>(self, b: &[u8]) -> Result<Vec<u32>, E> {
                if b.len() % 4 != 0 {
                    return Err(E::custom(format!(
                        "{} bytes is not a whole number of u32s",
                        b.len()
                    )));
                }
                Ok(b.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect())
            }
        }
        d.deserialize_bytes(Block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lens(v: &[u32]) -> Lens {
        let mut l = Lens::default();
        for &x in v {
            l.push(x);
        }
        l
    }

    #[test]
    fn equal_lengths_stay_one_length_and_a_count() {
        let l = lens(&[8, 8, 8]);
        assert_eq!(l, Lens::Fixed { len: 8, count: 3 });
        assert_eq!((l.len(), l.get(2), l.bytes_before(2)), (3, 8, 16));
        assert_eq!(lens(&[]).len(), 0);
    }

    #[test]
    fn a_different_length_makes_a_list() {
        let mut l = lens(&[8, 8, 0, 8]);
        assert_eq!(l, Lens::Each(vec![8, 8, 0, 8]));
        assert_eq!(l.bytes_before(3), 16);
        assert_eq!(l.slice(1, 2), Lens::Each(vec![8, 0]));
        let rest = l.split_off(2);
        assert_eq!((l, rest), (Lens::Each(vec![8, 8]), Lens::Each(vec![0, 8])));
    }

    #[test]
    fn fixed_lengths_slice_and_split() {
        let mut l = lens(&[4; 10]);
        assert_eq!(l.slice(8, 5), Lens::Fixed { len: 4, count: 2 });
        let rest = l.split_off(7);
        assert_eq!(l, Lens::Fixed { len: 4, count: 7 });
        assert_eq!(rest, Lens::Fixed { len: 4, count: 3 });
        assert_eq!(l.checked_total(), Some(28));
        assert_eq!(lens(&[1, 2, 3]).checked_total(), Some(6));
        let huge = Lens::Fixed {
            len: u32::MAX,
            count: u64::MAX,
        };
        assert_eq!(huge.checked_total(), None);
        l.clear();
        assert!(l.is_empty());
        l.push(5);
        assert_eq!(l, Lens::Fixed { len: 5, count: 1 });
    }

    #[test]
    fn lengths_past_u32_are_errors_that_say_so() {
        assert_eq!(checked_len(0, "x"), Ok(0));
        assert_eq!(checked_len(u32::MAX as usize, "x"), Ok(u32::MAX));
        let e = checked_len(u32::MAX as usize + 1, "the initializer's argument").unwrap_err();
        assert_eq!(
            e,
            "the initializer's argument encodes to 4294967296 bytes; at most 4294967295 bytes \
             (4 GiB - 1) can be sent"
        );
        assert!(checked_len(usize::MAX, "a task's result").is_err());
        assert_eq!(checked_fds(3, "x"), Ok(3));
        assert!(checked_fds(u32::MAX as usize + 1, "x")
            .unwrap_err()
            .contains("too many"));
    }

    #[test]
    fn both_forms_round_trip_and_a_ragged_block_is_an_error() {
        for l in [lens(&[3, 3]), lens(&[1, 2, u32::MAX])] {
            let bytes = postcard::to_stdvec(&l).unwrap();
            assert_eq!(postcard::from_bytes::<Lens>(&bytes).unwrap(), l);
        }
        // Variant 1 (a list) with a block of 5 bytes.
        assert!(postcard::from_bytes::<Lens>(&[1, 5, 1, 2, 3, 4, 5]).is_err());
    }
}
