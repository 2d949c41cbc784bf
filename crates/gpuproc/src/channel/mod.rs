//! Pipes and queues between processes: Python's `Pipe`, `Queue`, `SimpleQueue` and
//! `JoinableQueue`.
//!
//! - [`Pipe::new`] returns two connected [`Connection`]s (duplex; [`Pipe::simplex`] for one
//!   way). Values of any serde type go through `send`/`recv`; raw bytes through
//!   `send_bytes`/`recv_bytes`.
//! - [`Queue<T>`] is multi-producer, multi-consumer across processes, unbounded or
//!   [`bounded`](Queue::bounded); [`JoinableQueue<T>`] adds `task_done`/`join`;
//!   [`SimpleQueue<T>`] is the minimal form.
//!
//! All of them can be passed to child processes as arguments of
//! [`Process::new`](crate::Process::new) (with every start method) and sent inside messages.
//! Every blocking call has `try_` and `_timeout` forms; errors are one type,
//! [`ChannelError`] (with [`SendError`] handing back a value that was not put).
//!
//! # How it works
//! Each pipe or queue is a `SOCK_SEQPACKET` Unix socket pair: one receive takes exactly one
//! whole message, so any number of processes can share one end without locks. Payloads
//! over 64 KiB are written into a sealed memfd whose descriptor travels with the message,
//! so large values cross through shared memory rather than through the socket. For bulk
//! bytes use [`Bytes`]: a `Vec<u8>` is encoded element by element, `Bytes` in one copy.
//! To read a large payload where its sender wrote it, without copying it out, receive it as
//! [`SharedBytes`] ([`Connection::recv_bytes_shared`], [`Queue::get_shared`]).
//!
//! A blocking receive polls the socket for a short, adaptive while (at most [`MAX_SPIN`])
//! before it sleeps, so that a reply that comes at once is taken without the cost of waking
//! a sleeping process; a thread whose messages come rarely soon stops polling.
//! [`set_max_spin`] changes the limit or turns polling off.

mod error;
mod pipe;
mod queue;
mod shared;
pub(crate) mod spin;
mod wire;

use std::ops::{Deref, DerefMut};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use self::error::{ChannelError, SendError};
pub use self::pipe::{Connection, Pipe};
#[doc(hidden)]
pub use self::queue::stall_puts_after_taking_slot;
pub use self::queue::{JoinableQueue, Queue, SimpleQueue};
pub use self::shared::SharedBytes;
pub use self::spin::{max_spin, set_max_spin, MAX_SPIN};

/// The default `max_message_size` of every handle: 4 GiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 4 << 30;

/// A copy of `bytes` in a new `Vec`: one `memcpy` into memory that is not zero-filled
/// first (a large one backed by huge pages where the kernel allows, see
/// [`sys::vec_for_bulk`](crate::sys::vec_for_bulk)). A received payload is copied out, so
/// that its sender can reuse the shared memory at once; [`SharedBytes`] is the exception.
pub(crate) fn copy_to_vec(bytes: &[u8]) -> Vec<u8> {
    let mut v: Vec<u8> = crate::sys::vec_for_bulk(bytes.len());
    v.extend_from_slice(bytes);
    v
}

pub(crate) use crate::ipc::FdRef;

/// Borrowed bytes that serialise like [`Bytes`].
pub(crate) struct BytesRef<'a>(pub(crate) &'a [u8]);

impl Serialize for BytesRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// A byte buffer that serialises as bytes, in one copy; Python's `bytes`.
///
/// serde encodes a `Vec<u8>` as a sequence, one element at a time; `Bytes` is encoded as a
/// single block, so a `Queue<Bytes>` moves large buffers at close to memory-copy speed.
///
/// ```
/// let b = gpuproc::channel::Bytes::from(vec![1u8, 2, 3]);
/// assert_eq!(&b[..], &[1, 2, 3]);
/// let v: Vec<u8> = b.into();
/// assert_eq!(v.len(), 3);
/// ```
#[doc(alias = "bytes")]
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bytes(pub Vec<u8>);

impl Bytes {
    /// The bytes, as a `Vec`.
    pub fn into_vec(self) -> Vec<u8> {
        self.0
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Self {
        Bytes(v)
    }
}

impl From<&[u8]> for Bytes {
    fn from(v: &[u8]) -> Self {
        Bytes(v.to_vec())
    }
}

impl From<Bytes> for Vec<u8> {
    fn from(b: Bytes) -> Self {
        b.0
    }
}

impl Deref for Bytes {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl DerefMut for Bytes {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Bytes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes(copy_to_vec(v)))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Bytes, A::Error> {
                let mut v = Vec::with_capacity(a.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(b) = a.next_element()? {
                    v.push(b);
                }
                Ok(Bytes(v))
            }
        }
        d.deserialize_byte_buf(Visitor)
    }
}
