//! [`SharedBytes`]: a received payload read in place, in the sender's shared memory.

use std::fmt;
use std::ops::Deref;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use crate::sys::seqpacket::{self as sp, Mapping};

/// The bytes of a received message, read where the sender wrote them: a large payload (over
/// 64 KiB) is not copied out of the sender's shared memory but mapped read-only, so that it
/// is copied once in all (by the sender, into shared memory) instead of twice. Derefs to
/// `&[u8]`; a small payload is held in an owned buffer.
///
/// Returned by [`Connection::recv_bytes_shared`](super::Connection::recv_bytes_shared) and
/// [`Queue::<Bytes>::get_shared`](super::Queue::get_shared).
///
/// # Holding it
/// While a `SharedBytes` lives, its sender cannot reuse the shared memory it lies in (so
/// the bytes never change under it); dropping it hands that memory back. A receiver that
/// holds many at once makes its senders create new shared memory for their next messages
/// (each sender thread keeps at most 16 buffers or 512 MiB of them, then lets go of the
/// oldest still held: its memory lives on until the receiver drops it), so keep one for as
/// long as it is being read, and copy out ([`to_vec`](Self::to_vec)) what must live longer.
///
/// # The contract with the sender
/// A reused memfd carries a control word after its payload. The sender sets it to "in use"
/// with a compare-and-swap from "free" before it writes a message, and never writes a
/// memfd whose word is "in use"; the receiver sets it back to "free" (through `pwrite` on
/// the descriptor) only when this `SharedBytes` is dropped. Every gpuproc sender (and every
/// process forked from one, which shares its memfds) keeps to this; the memfd is sealed
/// against shrinking, so that however a sender behaves, reading the mapping cannot fault.
pub struct SharedBytes {
    inner: Inner,
}

enum Inner {
    Owned(Vec<u8>),
    Mapped {
        map: Arc<Mapping>,
        start: usize,
        len: usize,
        /// Dropped after `map` is last read: hands the memfd back to its sender.
        _release: Release,
    },
}

/// Hands a reused memfd back to its sender when dropped (see [`SharedBytes`]).
pub(crate) struct Release {
    memfd: OwnedFd,
    /// The control word's offset; `None` for a memfd sent once (nothing to hand back).
    control: Option<u64>,
}

impl Release {
    pub(crate) fn new(memfd: OwnedFd, control: Option<u64>) -> Self {
        Release { memfd, control }
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        if let Some(c) = self.control {
            sp::release_pooled(self.memfd.as_fd(), c);
        }
    }
}

impl SharedBytes {
    pub(crate) fn owned(bytes: Vec<u8>) -> Self {
        SharedBytes {
            inner: Inner::Owned(bytes),
        }
    }

    /// `len` bytes at `start` of `map`, held until `release` is dropped.
    ///
    /// The caller has checked that `start + len` lies within the mapping (it panics
    /// otherwise) and that the memfd behind it is sealed against shrinking.
    pub(crate) fn mapped(map: Arc<Mapping>, start: usize, len: usize, release: Release) -> Self {
        assert!(
            start
                .checked_add(len)
                .is_some_and(|end| end <= map.bytes().len()),
            "shared bytes outside their mapping"
        );
        SharedBytes {
            inner: Inner::Mapped {
                map,
                start,
                len,
                _release: release,
            },
        }
    }

    /// Whether the bytes are read in place in shared memory (a large payload) rather than
    /// held in an owned buffer (a small one).
    pub fn is_shared(&self) -> bool {
        matches!(self.inner, Inner::Mapped { .. })
    }

    /// A copy of the bytes in a `Vec`, which lets the sender reuse its memory once `self`
    /// is dropped.
    pub fn to_vec(&self) -> Vec<u8> {
        super::copy_to_vec(self)
    }
}

impl Deref for SharedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.inner {
            Inner::Owned(v) => v,
            // No `unsafe` here (`Mapping::bytes` holds it), but the bytes stay unchanged only
            // by the contract above: `mapped` checked the range, and the sender writes this
            // memory again only after `_release` (dropped with `self`, so after every
            // borrow handed out here has ended) marks it free.
            Inner::Mapped {
                map, start, len, ..
            } => &map.bytes()[*start..*start + *len],
        }
    }
}

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl PartialEq<[u8]> for SharedBytes {
    fn eq(&self, other: &[u8]) -> bool {
        **self == *other
    }
}

impl fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedBytes")
            .field("len", &self.len())
            .field("shared", &self.is_shared())
            .finish()
    }
}
