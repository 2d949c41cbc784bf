//! Large byte buffers passed round between the API thread and the driver: a chunk's
//! arguments and a run's results. Reusing them means a map does not zero-fill and fault in
//! fresh memory for every chunk and every run.

use std::sync::Mutex;

use crate::sys;

/// Buffers smaller than this are not kept.
const MIN: usize = 64 * 1024;
/// At most this many buffers are kept...
const KEEP: usize = 16;
/// ...and at most this many bytes of them.
const KEEP_BYTES: usize = 32 << 20;

/// Free buffers, for reuse.
#[derive(Debug, Default)]
pub(crate) struct Buffers {
    free: Mutex<Vec<Vec<u8>>>,
}

impl Buffers {
    /// An empty buffer with room for at least `n` bytes: a kept one if one is large enough.
    pub fn take(&self, n: usize) -> Vec<u8> {
        if n >= MIN {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = free.iter().position(|b| b.capacity() >= n) {
                return free.swap_remove(i);
            }
        }
        sys::vec_for_bulk(n)
    }

    /// Keeps `buf` for a later [`take`](Self::take), within the limits (else drops it).
    pub fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() < MIN {
            return;
        }
        buf.clear();
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let bytes: usize = free.iter().map(Vec::capacity).sum();
        if free.len() < KEEP && bytes + buf.capacity() <= KEEP_BYTES {
            free.push(buf);
        }
    }

    /// How many buffers are kept.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.free.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_reused_small_ones_are_not() {
        let b = Buffers::default();
        let mut v = b.take(MIN);
        v.extend_from_slice(&[1; 10]);
        let ptr = v.as_ptr();
        b.give(v);
        assert_eq!(b.kept(), 1);
        let again = b.take(MIN / 2 + MIN / 2);
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), ptr);
        b.give(Vec::with_capacity(10));
        assert_eq!(b.kept(), 0);
    }

    #[test]
    fn what_is_kept_is_bounded() {
        let b = Buffers::default();
        for _ in 0..KEEP + 4 {
            b.give(Vec::with_capacity(MIN));
        }
        assert_eq!(b.kept(), KEEP);
        let b = Buffers::default();
        b.give(Vec::with_capacity(KEEP_BYTES + 1));
        assert_eq!(b.kept(), 0);
    }
}
