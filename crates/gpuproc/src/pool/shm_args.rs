//! Large task arguments and results in shared memory.
//!
//! A chunk's encoded arguments, and a run's encoded results, normally travel in their frame
//! through the worker's socket: a copy into the kernel and one out of it. Once they pass
//! [`SPILL_AT`] bytes, the encoder ([`Spill`]) moves what it has into a memfd from a
//! [`ShmPool`] and writes the rest straight there; the frame then carries the memfd (its
//! last descriptor) and the receiver reads the bytes in place from its mapping (cached per
//! memfd, so a reused memfd costs no `mmap`). The bytes are written once by the encoder and
//! read once by the decoder.
//!
//! The memfds are sealed against shrinking (a receiver can never fault reading one) and are
//! reused. Arguments: a chunk's memfd goes back to the parent's pool when all its tasks have
//! been reported, or when the chunk is dropped (failed, or its pool terminated); a worker
//! that dies mid-task takes nothing with it: the parent still owns the memfd, and the chunk
//! keeps it for the retry or returns it. Results: the worker marks the memfd lent (a word
//! after the payload, see [`memfd_pooled`]); the parent decodes the results in place and
//! writes zero there once the last of them is decoded (or dropped); until then the worker
//! does not reuse it, and makes or takes another memfd for its next results. A pool keeps at most
//! [`KEEP`] idle memfds, [`KEEP_BYTES`] in all.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::codec;
use crate::ipc;
use crate::sys::seqpacket::{memfd_pooled, Mapping};

/// Arguments past this many bytes (in one chunk) go through shared memory.
pub(crate) const SPILL_AT: usize = 256 << 10;
/// Memfd sizes are multiples of this.
const GRAIN: usize = 1 << 20;
/// The most idle memfds a pool keeps for reuse...
const KEEP: usize = 8;
/// ...and their most bytes.
const KEEP_BYTES: usize = 512 << 20;

/// A memfd for arguments, mapped read-write here.
#[derive(Debug)]
pub(crate) struct ShmBuf {
    fd: OwnedFd,
    map: Mapping,
    cap: usize,
}

impl ShmBuf {
    /// Whether the receiver of the last results sent in it still reads them.
    fn lent(&self) -> bool {
        self.map.word_at(self.cap).load(Ordering::Acquire) != 0
    }
}

/// The idle memfds of one pool.
#[derive(Debug, Default)]
pub(crate) struct ShmPool {
    idle: Mutex<Vec<ShmBuf>>,
}

impl ShmPool {
    /// A memfd with room for `need` bytes: the smallest idle one that fits, else a new one;
    /// `None` if none can be made (the caller keeps the bytes on the heap).
    fn take(&self, need: usize) -> Option<ShmBuf> {
        {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let best = idle
                .iter()
                .enumerate()
                .filter(|(_, b)| b.cap >= need && !b.lent())
                .min_by_key(|(_, b)| b.cap)
                .map(|(i, _)| i);
            if let Some(i) = best {
                return Some(idle.swap_remove(i));
            }
        }
        let cap = need.checked_next_multiple_of(GRAIN)?.max(GRAIN);
        let (fd, map) = memfd_pooled("gpuproc-task-args", cap).ok()?;
        Some(ShmBuf { fd, map, cap })
    }

    /// Takes `buf` back for reuse, or drops it (the smallest go first) past the limits.
    fn give(&self, buf: ShmBuf) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.push(buf);
        idle.sort_by_key(|b| std::cmp::Reverse(b.cap));
        let mut total = 0usize;
        let keep = idle
            .iter()
            .take_while(|b| {
                total = total.saturating_add(b.cap);
                total <= KEEP_BYTES
            })
            .count()
            .min(KEEP);
        idle.truncate(keep);
    }

    /// How many memfds are idle (for tests).
    #[cfg(test)]
    pub(crate) fn idle(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A chunk's arguments in a memfd: its first `len` bytes. Goes back to its pool when
/// dropped.
#[derive(Debug)]
pub(crate) struct ShmArgs {
    buf: Option<ShmBuf>,
    len: usize,
    pool: Arc<ShmPool>,
}

impl ShmArgs {
    /// The arguments.
    pub(crate) fn bytes(&self) -> &[u8] {
        match &self.buf {
            Some(b) => &b.map.bytes()[..self.len],
            None => &[],
        }
    }

    /// The memfd, to send with the chunk.
    pub(crate) fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.buf.as_ref().map(|b| b.fd.as_fd())
    }

    /// Marks the memfd lent to a receiver, which hands it back by writing a zero word at the
    /// offset returned (see `sys::seqpacket::release_pooled`); until then it is not reused.
    pub(crate) fn lend(&self) -> Option<(BorrowedFd<'_>, u64)> {
        let b = self.buf.as_ref()?;
        b.map.word_at(b.cap).store(1, Ordering::Release);
        Some((b.fd.as_fd(), b.cap as u64))
    }

    /// Forgets the bytes from `len` on.
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Appends `bytes`, moving to a larger memfd when full; `false` if none could be had
    /// (nothing was appended).
    fn extend(&mut self, bytes: &[u8]) -> bool {
        self.extend_pair(&[], bytes)
    }

    /// Appends `head` then `body`, as [`extend`](Self::extend) does.
    fn extend_pair(&mut self, head: &[u8], body: &[u8]) -> bool {
        let Some(need) = (self.len)
            .checked_add(head.len())
            .and_then(|n| n.checked_add(body.len()))
        else {
            return false;
        };
        let Some(buf) = self.buf.as_mut() else {
            return false;
        };
        if need > buf.cap {
            let Some(mut bigger) = self.pool.take(need.max(buf.cap.saturating_mul(2))) else {
                return false;
            };
            bigger.map.bytes_mut()[..self.len].copy_from_slice(&buf.map.bytes()[..self.len]);
            if let Some(old) = self.buf.replace(bigger) {
                self.pool.give(old);
            }
        }
        let Some(buf) = self.buf.as_mut() else {
            return false;
        };
        let (dst_head, dst_body) = buf.map.bytes_mut()[self.len..need].split_at_mut(head.len());
        dst_head.copy_from_slice(head);
        dst_body.copy_from_slice(body);
        self.len = need;
        true
    }
}

impl Drop for ShmArgs {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.give(buf);
        }
    }
}

/// What an encoder expects to write in all, when it knows: a memfd it moves to gets room
/// for that much, so that it does not outgrow it (copying what it holds to a larger one);
/// and with `start_in_shm`, bytes go to a memfd from the first, not through the heap.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Expect {
    pub bytes: usize,
    pub start_in_shm: bool,
}

impl Expect {
    /// A worker's run of results: it is sent once past `flush_at` bytes, so room for twice
    /// that keeps its memfd from being outgrown by the result that crosses the mark.
    pub(crate) const fn run(flush_at: usize) -> Self {
        Expect {
            bytes: 2 * flush_at,
            start_in_shm: false,
        }
    }

    /// A chunk of arguments expected to take `bytes`: in shared memory from the start when
    /// that is past [`SPILL_AT`].
    pub(crate) fn chunk(bytes: usize) -> Self {
        Expect {
            bytes,
            start_in_shm: bytes > SPILL_AT,
        }
    }
}

/// Appends `value`'s encoding to `heap`, or to `shm` once the bytes are large (see
/// [`Spill`]); returns the descriptors of handles inside it. On error nothing is appended.
pub(crate) fn encode<T: Serialize>(
    heap: &mut Vec<u8>,
    shm: &mut Option<ShmArgs>,
    pool: &Arc<ShmPool>,
    expect: Expect,
    value: &T,
) -> Result<Vec<OwnedFd>, String> {
    let start = heap.len() + shm.as_ref().map_or(0, |s| s.len);
    let truncate = |heap: &mut Vec<u8>, shm: &mut Option<ShmArgs>| match shm {
        Some(s) => s.truncate(start),
        None => heap.truncate(start),
    };
    let append = |heap: &mut Vec<u8>, shm: &mut Option<ShmArgs>| {
        let mut out = Spill {
            heap,
            shm,
            pool,
            expect,
        };
        codec::append_to(value, &mut out)
    };
    // Fast path: no handles. A handle refuses to serialise outside a gpuproc message, so on
    // error try again with the descriptor table in place.
    if append(heap, shm).is_ok() {
        return Ok(Vec::new());
    }
    truncate(heap, shm);
    let (res, fds) = ipc::encode_with(|| append(heap, shm));
    match res {
        Ok(()) => Ok(fds),
        Err(e) => {
            truncate(heap, shm);
            Err(e.to_string())
        }
    }
}

/// The encoder's output for a chunk's arguments or a run's results: the chunk's heap buffer until the bytes
/// pass [`SPILL_AT`], then a memfd.
pub(crate) struct Spill<'a> {
    pub heap: &'a mut Vec<u8>,
    pub shm: &'a mut Option<ShmArgs>,
    pub pool: &'a Arc<ShmPool>,
    pub expect: Expect,
}

impl Spill<'_> {
    /// Moves the heap bytes, `head` and `body` into a memfd; `false` (nothing moved) if
    /// none could be had.
    fn spill(&mut self, head: &[u8], body: &[u8]) -> bool {
        let Some(need) = (self.heap.len())
            .checked_add(head.len())
            .and_then(|n| n.checked_add(body.len()))
        else {
            return false;
        };
        let Some(buf) = self.pool.take(need.max(self.expect.bytes)) else {
            return false;
        };
        let mut args = ShmArgs {
            buf: Some(buf),
            len: 0,
            pool: Arc::clone(self.pool),
        };
        if !(args.extend(self.heap) && args.extend_pair(head, body)) {
            return false;
        }
        self.heap.clear();
        *self.shm = Some(args);
        true
    }
}

impl Spill<'_> {
    /// Whether the next `more` bytes go to a memfd rather than the heap (while none is in
    /// use): once the heap would pass [`SPILL_AT`], or from the first byte when expected.
    #[inline]
    fn spills_at(&self, more: usize) -> bool {
        self.heap.len().saturating_add(more) > SPILL_AT
            || (self.expect.start_in_shm && self.heap.is_empty())
    }
}

impl codec::Output for Spill<'_> {
    #[inline]
    fn push(&mut self, byte: u8) -> codec::Result<()> {
        match self.shm {
            None if !self.spills_at(1) => {
                self.heap.push(byte);
                Ok(())
            }
            _ => self.extend(&[byte]),
        }
    }

    #[inline]
    fn extend(&mut self, bytes: &[u8]) -> codec::Result<()> {
        self.extend_pair(&[], bytes)
    }

    #[inline]
    fn extend_pair(&mut self, head: &[u8], body: &[u8]) -> codec::Result<()> {
        if let Some(shm) = self.shm.as_mut() {
            if shm.extend_pair(head, body) {
                return Ok(());
            }
            // No larger memfd: back to the heap.
            self.heap.extend_from_slice(shm.bytes());
            *self.shm = None;
        } else if self.spills_at(head.len().saturating_add(body.len())) && self.spill(head, body) {
            return Ok(());
        }
        self.heap.extend_from_slice(head);
        self.heap.extend_from_slice(body);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(pool: &Arc<ShmPool>, values: &[Vec<f32>]) -> (Vec<u8>, Option<ShmArgs>) {
        let mut heap = Vec::new();
        let mut shm = None;
        for v in values {
            let mut out = Spill {
                heap: &mut heap,
                shm: &mut shm,
                pool,
                expect: Expect::default(),
            };
            codec::append_to(v, &mut out).unwrap();
        }
        (heap, shm)
    }

    #[test]
    fn small_arguments_stay_on_the_heap_and_large_ones_move_to_a_memfd() {
        let pool = Arc::new(ShmPool::default());
        let small = vec![vec![1.0f32; 100]; 3];
        let (heap, shm) = encode(&pool, &small);
        assert!(shm.is_none());
        let expected: Vec<u8> = small
            .iter()
            .flat_map(|v| codec::to_vec(v).unwrap())
            .collect();
        assert_eq!(heap, expected);

        // The third item passes SPILL_AT: everything ends up in one memfd, in order, and a
        // later item larger than the memfd moves it to a bigger one.
        let mixed = vec![
            vec![1.0f32; 1000],
            vec![2.0; 30_000],
            vec![3.0; 100_000],
            vec![4.0; 400_000],
        ];
        let (heap, shm) = encode(&pool, &mixed);
        assert!(heap.is_empty());
        let shm = shm.expect("spilled");
        let expected: Vec<u8> = mixed
            .iter()
            .flat_map(|v| codec::to_vec(v).unwrap())
            .collect();
        assert_eq!(shm.bytes(), &expected[..]);
        // The memfd outgrown on the way is idle in the pool; the one in use returns on drop.
        assert_eq!(pool.idle(), 1);
        drop(shm);
        assert_eq!(pool.idle(), 2);
        // And is reused, not made again.
        let (_, shm) = encode(&pool, &[vec![5.0f32; 100_000]]);
        assert!(shm.is_some());
        assert_eq!(pool.idle(), 1);
    }
}
