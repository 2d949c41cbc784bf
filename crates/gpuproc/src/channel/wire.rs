//! How one channel message looks on a `SOCK_SEQPACKET` socket.
//!
//! Every message is one datagram whose first byte says where the payload is:
//! - [`TAG_INLINE`]: the postcard payload follows in the datagram;
//! - [`TAG_MEMFD`]: a little-endian `u64` length follows, and the first descriptor is a
//!   sealed memfd holding the payload (for payloads over [`INLINE_MAX`] bytes, which then
//!   travel through shared memory instead of byte by byte through the socket).
//!
//! - [`TAG_MEMFD_POOLED`]: like [`TAG_MEMFD`], then a second little-endian `u64`: the
//!   offset of a control word in the memfd, which the receiver sets to zero (through
//!   `pwrite`) once it has copied the payload out (or, for a payload received as
//!   [`SharedBytes`], once that is dropped), so that the sender can reuse the memfd
//!   for a later message instead of creating, filling with fresh pages and freeing one
//!   per message.
//!
//! Any further descriptors belong to handles inside the payload (see `crate::ipc`).

use std::cell::{Cell, RefCell};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering::{Acquire, Relaxed, SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::shared::{Release, SharedBytes};
use super::spin;
use super::ChannelError;
use crate::codec;
use crate::ipc;
use crate::sys::seqpacket::{self as sp, MapCache, Mapping, Outcome};

pub(crate) const TAG_INLINE: u8 = 0xA1;
pub(crate) const TAG_MEMFD: u8 = 0xA2;
pub(crate) const TAG_MEMFD_POOLED: u8 = 0xA3;
/// The largest payload sent inside the datagram itself.
pub(crate) const INLINE_MAX: usize = 64 * 1024;
/// A receive buffer one byte larger than any valid datagram, so that truncation shows.
const RECV_BUF: usize = INLINE_MAX + 16;

/// What a send or receive waits for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Wait {
    /// Block until it can be done.
    Forever,
    /// Do not block at all.
    Never,
    /// Block for at most this long.
    For(Duration),
}

impl Wait {
    fn deadline(self) -> Option<Instant> {
        match self {
            Wait::Forever => None,
            Wait::Never => Some(Instant::now()),
            Wait::For(d) => crate::time::deadline(d),
        }
    }

    /// The error for "waited and nothing happened".
    pub(crate) fn expired(self, try_error: ChannelError) -> ChannelError {
        match self {
            Wait::For(d) => ChannelError::Timeout(d),
            _ => try_error,
        }
    }
}

fn encode_error(e: crate::codec::Error) -> ChannelError {
    ChannelError::Encode(e.to_string())
}

thread_local! {
    /// Each thread's buffer for encoding inline datagrams, kept between calls (taken out
    /// while in use). It only ever grows, to `INLINE_MAX + 1` bytes, zeroed once.
    static SEND_BUF: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Encodes `value` as an inline datagram (the tag, then the payload) into the start of
/// `buf`, if its payload fits in [`INLINE_MAX`] bytes: the datagram's length and the
/// descriptors of the handles inside it, or `None` if it is larger.
fn encode_inline<T: Serialize + ?Sized>(
    buf: &mut Vec<u8>,
    value: &T,
) -> Result<Option<(usize, Vec<OwnedFd>)>, ChannelError> {
    if buf.len() < INLINE_MAX + 1 {
        buf.resize(INLINE_MAX + 1, 0);
    }
    buf[0] = TAG_INLINE;
    let slot = &mut buf[1..INLINE_MAX + 1];
    let (n, fds) = ipc::encode_with(|| codec::to_slice(value, slot).map(|s| s.len()));
    match n {
        Ok(n) => Ok(Some((n + 1, fds))),
        Err(e) if matches!(e.kind(), postcard::Error::SerializeBufferFull) => Ok(None),
        Err(e) => Err(encode_error(e)),
    }
}

/// Sends `value` (postcard-encoded) on `sock`.
///
/// `attempt`, if given, is told around each try to queue the datagram (see [`sp::send`]).
pub(crate) fn send_value<T: Serialize + ?Sized>(
    sock: BorrowedFd<'_>,
    value: &T,
    max: usize,
    wait: Wait,
    attempt: Option<&dyn Fn(bool)>,
) -> Result<(), ChannelError> {
    let deadline = wait.deadline();
    // A small value: one encoding, into this thread's reused buffer, and one `sendmsg`.
    let mut buf = SEND_BUF.with(|b| b.take());
    let small = encode_inline(&mut buf, value);
    let large = matches!(small, Ok(None));
    let result = match small {
        Ok(Some((len, _))) if len - 1 > max => Err(ChannelError::TooLarge {
            size: len - 1,
            limit: max,
        }),
        Ok(Some((len, fds))) => finish(sock, &[&buf[..len]], None, &fds, deadline, wait, attempt),
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    SEND_BUF.with(|b| b.set(buf));
    if !large {
        return result;
    }
    // A large value: measuring first lets it be encoded straight into shared memory.
    let (size, _measuring_fds) = ipc::encode_with(|| codec::encoded_len(value));
    let size = size.map_err(encode_error)?;
    if size > max {
        return Err(ChannelError::TooLarge { size, limit: max });
    }
    if size <= INLINE_MAX {
        return Err(ChannelError::Encode(format!(
            "the value encoded to more than {INLINE_MAX} bytes, then to {size}"
        )));
    }
    let encode = |buf: &mut [u8]| {
        let (n, fds) = ipc::encode_with(|| codec::to_slice(value, buf).map(|s| s.len()));
        let n = n.map_err(|e| {
            ChannelError::Encode(format!(
                "the value encoded to a different size the second time ({e})"
            ))
        })?;
        Ok((n, fds))
    };
    if size <= POOL_MAX_CAP {
        let mut slot = Pooled::claim(size)?;
        let (n, fds) = match encode(slot.map.prefix_mut(size)) {
            Ok(r) => r,
            Err(e) => {
                slot.give_back(true);
                return Err(e);
            }
        };
        let header = pooled_header(n, slot.cap);
        let sent = finish(
            sock,
            &[&header],
            Some(slot.fd.as_fd()),
            &fds,
            deadline,
            wait,
            attempt,
        );
        // A message that did not go out leaves the memfd free for the next one.
        slot.give_back(sent.is_err());
        return sent;
    }
    let (memfd, mut map) = sp::memfd_for_writing("gpuproc-message", size)
        .map_err(ChannelError::io("creating a memfd"))?;
    let (n, fds) = encode(map.prefix_mut(size))?;
    sp::seal(&memfd, map).map_err(ChannelError::io("sealing a memfd"))?;
    let header = memfd_header(n);
    finish(
        sock,
        &[&header],
        Some(memfd.as_fd()),
        &fds,
        deadline,
        wait,
        attempt,
    )
}

/// Payloads up to this size go through reused memfds (larger ones get a fresh memfd each).
const POOL_MAX_CAP: usize = 256 << 20;
/// How many free reusable memfds each thread keeps for later messages.
const POOL_SLOTS: usize = 4;
/// How many memfds each thread keeps at most, counting those that receivers still read: a
/// sender that runs ahead of its receivers then reuses them once they are released instead
/// of creating (and zero-filling) a new memfd per message, within [`POOL_BYTES`].
const POOL_TRACKED: usize = 16;
/// How many bytes of memfds each thread keeps at most (beyond [`POOL_SLOTS`] of them).
const POOL_BYTES: usize = 512 << 20;
/// The control word of a pooled memfd: a receiver may still be reading it.
const IN_USE: u32 = 1;
/// The control word of a pooled memfd: free for the next message.
const FREE: u32 = 0;

/// A memfd this thread reuses for large messages: `cap` payload bytes, then the control
/// word (see [`TAG_MEMFD_POOLED`]). Kept mapped read-write and sealed against resizing.
struct Pooled {
    fd: OwnedFd,
    map: Mapping,
    cap: usize,
}

thread_local! {
    /// This thread's reusable memfds (a slot is taken out while a message is written).
    static POOL: RefCell<Vec<Pooled>> = const { RefCell::new(Vec::new()) };
}

impl Pooled {
    fn word(&self) -> &std::sync::atomic::AtomicU32 {
        self.map.word_at(self.cap)
    }

    /// Claims the word (another process forked from this one may hold the same memfd).
    fn try_claim(&self) -> bool {
        self.word()
            .compare_exchange(FREE, IN_USE, Acquire, Relaxed)
            .is_ok()
    }

    /// A memfd of at least `size` bytes that no receiver uses, marked in use: a free one
    /// from the pool, else a new one.
    fn claim(size: usize) -> Result<Pooled, ChannelError> {
        let found = POOL.with(|p| {
            let mut pool = p.borrow_mut();
            let i = pool.iter().position(|s| s.cap >= size && s.try_claim())?;
            Some(pool.swap_remove(i))
        });
        if let Some(slot) = found {
            return Ok(slot);
        }
        let cap = size.div_ceil(sp::PAGE) * sp::PAGE;
        let (fd, map) = sp::memfd_pooled("gpuproc-message", cap)
            .map_err(ChannelError::io("creating a memfd"))?;
        let slot = Pooled { fd, map, cap };
        slot.word().store(IN_USE, SeqCst);
        Ok(slot)
    }

    /// Returns the slot to the pool (marked free again if `unused`), then trims the pool:
    /// at most [`POOL_SLOTS`] free slots (dropping the smallest), and at most
    /// [`POOL_TRACKED`] slots or [`POOL_BYTES`] in all (dropping the oldest in use: its
    /// receiver may be gone; one that still holds it keeps its memory alive).
    fn give_back(self, unused: bool) {
        if unused {
            self.word().store(FREE, SeqCst);
        }
        POOL.with(|p| {
            let mut pool = p.borrow_mut();
            pool.push(self);
            loop {
                let free = |s: &Pooled| s.word().load(Relaxed) == FREE;
                let bytes: usize = pool.iter().map(|s| s.cap).sum();
                let victim = if pool.iter().filter(|s| free(s)).count() > POOL_SLOTS {
                    (0..pool.len())
                        .filter(|&i| free(&pool[i]))
                        .min_by_key(|&i| pool[i].cap)
                } else if pool.len() > POOL_SLOTS
                    && (pool.len() > POOL_TRACKED || bytes > POOL_BYTES)
                {
                    Some(pool.iter().position(|s| !free(s)).unwrap_or(0))
                } else {
                    None
                };
                match victim {
                    Some(i) => drop(pool.remove(i)),
                    None => break,
                }
            }
        });
    }
}

fn pooled_header(len: usize, control: usize) -> [u8; 17] {
    let mut h = [0u8; 17];
    h[0] = TAG_MEMFD_POOLED;
    h[1..9].copy_from_slice(&(len as u64).to_le_bytes());
    h[9..].copy_from_slice(&(control as u64).to_le_bytes());
    h
}

/// Sends `bytes` as they are (no encoding) on `sock`.
pub(crate) fn send_raw(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    max: usize,
    wait: Wait,
    attempt: Option<&dyn Fn(bool)>,
) -> Result<(), ChannelError> {
    let deadline = wait.deadline();
    if bytes.len() > max {
        return Err(ChannelError::TooLarge {
            size: bytes.len(),
            limit: max,
        });
    }
    if bytes.len() <= INLINE_MAX {
        return finish(
            sock,
            &[&[TAG_INLINE], bytes],
            None,
            &[],
            deadline,
            wait,
            attempt,
        );
    }
    if bytes.len() <= POOL_MAX_CAP {
        let mut slot = Pooled::claim(bytes.len())?;
        slot.map.prefix_mut(bytes.len()).copy_from_slice(bytes);
        let header = pooled_header(bytes.len(), slot.cap);
        let sent = finish(
            sock,
            &[&header],
            Some(slot.fd.as_fd()),
            &[],
            deadline,
            wait,
            attempt,
        );
        slot.give_back(sent.is_err());
        return sent;
    }
    let (memfd, mut map) = sp::memfd_for_writing("gpuproc-message", bytes.len())
        .map_err(ChannelError::io("creating a memfd"))?;
    map.prefix_mut(bytes.len()).copy_from_slice(bytes);
    sp::seal(&memfd, map).map_err(ChannelError::io("sealing a memfd"))?;
    let header = memfd_header(bytes.len());
    finish(
        sock,
        &[&header],
        Some(memfd.as_fd()),
        &[],
        deadline,
        wait,
        attempt,
    )
}

fn memfd_header(len: usize) -> [u8; 9] {
    let mut h = [0u8; 9];
    h[0] = TAG_MEMFD;
    h[1..].copy_from_slice(&(len as u64).to_le_bytes());
    h
}

fn finish(
    sock: BorrowedFd<'_>,
    parts: &[&[u8]],
    memfd: Option<BorrowedFd<'_>>,
    fds: &[OwnedFd],
    deadline: Option<Instant>,
    wait: Wait,
    attempt: Option<&dyn Fn(bool)>,
) -> Result<(), ChannelError> {
    let one: [BorrowedFd<'_>; 1];
    let many: Vec<BorrowedFd<'_>>;
    // No allocation unless the value itself carries descriptors.
    let all: &[BorrowedFd<'_>] = match (memfd, fds.is_empty()) {
        (None, true) => &[],
        (Some(m), true) => {
            one = [m];
            &one
        }
        (m, false) => {
            many = m.into_iter().chain(fds.iter().map(|f| f.as_fd())).collect();
            &many
        }
    };
    match sp::send(sock, parts, all, deadline, attempt)
        .map_err(ChannelError::io("sending a message"))?
    {
        Outcome::Done(()) => Ok(()),
        Outcome::Closed => Err(ChannelError::Disconnected),
        Outcome::TimedOut => Err(wait.expired(ChannelError::Full { maxsize: 0 })),
    }
}

thread_local! {
    /// Each thread's receive buffer, kept between calls (taken out while in use).
    static BUF: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Receives one message and hands its payload to `f`; `on_message` runs as soon as a
/// message has been taken off the socket, whatever it turns out to contain.
pub(crate) fn recv_with<R>(
    sock: BorrowedFd<'_>,
    cache: &MapCache,
    max: usize,
    wait: Wait,
    on_message: impl FnOnce(),
    f: impl FnOnce(&[u8], Vec<OwnedFd>) -> Result<R, ChannelError>,
) -> Result<R, ChannelError> {
    recv_message(sock, wait, on_message, |msg, fds, truncated| {
        with_payload(msg, fds, truncated, max, Some(cache), f)
    })
}

/// Receives one message into this thread's reusable buffer and hands it (bytes, descriptors,
/// whether it was cut short) to `f`; `on_message` runs once a message has been taken.
fn recv_message<R>(
    sock: BorrowedFd<'_>,
    wait: Wait,
    on_message: impl FnOnce(),
    f: impl FnOnce(&[u8], Vec<OwnedFd>, bool) -> Result<R, ChannelError>,
) -> Result<R, ChannelError> {
    let mut buf = BUF.with(|b| b.take());
    buf.resize(RECV_BUF, 0);
    let start = Instant::now();
    let deadline = match wait {
        Wait::Forever => None,
        Wait::Never => Some(start),
        Wait::For(d) => start.checked_add(d),
    };
    // Only a receive that may wait polls first (see `spin`), and tells how long it waited.
    let may_wait = !matches!(wait, Wait::Never);
    let budget = if may_wait {
        spin::budget()
    } else {
        Duration::ZERO
    };
    let spin_until = start.checked_add(budget).filter(|_| !budget.is_zero());
    let got = sp::recv(sock, &mut buf, deadline, spin_until);
    if may_wait && matches!(got, Ok(Outcome::Done(_) | Outcome::TimedOut)) {
        spin::record(start.elapsed());
    }
    let result = match got.map_err(ChannelError::io("receiving a message")) {
        Err(e) => Err(e),
        Ok(Outcome::Closed) => Err(ChannelError::Disconnected),
        Ok(Outcome::TimedOut) => Err(wait.expired(ChannelError::Empty)),
        Ok(Outcome::Done(m)) => {
            on_message();
            f(&buf[..m.len], m.fds, m.truncated)
        }
    };
    BUF.with(|b| b.set(buf));
    result
}

/// Where a received message's payload is.
pub(crate) enum Payload<'a> {
    /// In the datagram itself.
    Inline(&'a [u8]),
    /// The first `len` bytes of a read-only mapping of the message's memfd, which goes
    /// back to its sender when `release` is dropped.
    Mapped {
        map: Arc<Mapping>,
        len: usize,
        release: Release,
    },
}

/// Finds a datagram's payload (inline, or in its memfd), and the descriptors that came
/// with it for handles inside the payload. Reused (pooled) memfds are mapped through
/// `cache` when there is one.
pub(crate) fn payload<'a>(
    msg: &'a [u8],
    mut fds: Vec<OwnedFd>,
    truncated: bool,
    max: usize,
    cache: Option<&MapCache>,
) -> Result<(Payload<'a>, Vec<OwnedFd>), ChannelError> {
    if truncated {
        return Err(ChannelError::Malformed(format!(
            "a datagram longer than {} bytes, or with too many descriptors",
            RECV_BUF - 1
        )));
    }
    match msg.first() {
        None => Err(ChannelError::Malformed("an empty datagram".into())),
        Some(&TAG_INLINE) => {
            let payload = &msg[1..];
            if payload.len() > max {
                return Err(ChannelError::TooLarge {
                    size: payload.len(),
                    limit: max,
                });
            }
            Ok((Payload::Inline(payload), fds))
        }
        Some(&tag @ (TAG_MEMFD | TAG_MEMFD_POOLED)) => {
            let expected = if tag == TAG_MEMFD { 9 } else { 17 };
            if msg.len() != expected {
                return Err(ChannelError::Malformed(format!(
                    "a shared-memory message header of {} bytes, expected {expected}",
                    msg.len()
                )));
            }
            let word = |i: usize| u64::from_le_bytes(msg[i..i + 8].try_into().unwrap_or([0; 8]));
            let len = word(1);
            // Where the receiver signals that it is done (pooled memfds only).
            let control = (tag == TAG_MEMFD_POOLED).then(|| word(9));
            if len > max as u64 {
                return Err(ChannelError::TooLarge {
                    size: usize::try_from(len).unwrap_or(usize::MAX),
                    limit: max,
                });
            }
            if fds.is_empty() {
                return Err(ChannelError::Malformed(
                    "a shared-memory message came without its memfd".into(),
                ));
            }
            let memfd = fds.remove(0);
            if let Some(c) = control {
                if c < len || c % 4 != 0 || c > u64::MAX - 4 {
                    return Err(ChannelError::Malformed(format!(
                        "a shared-memory message with its control word at {c}, inside or \
                         misaligned with its {len} bytes of payload"
                    )));
                }
            }
            let min_size = control.map_or(0, |c| c + 4);
            let malformed = |e: std::io::Error| ChannelError::Malformed(e.to_string());
            let map = match cache.filter(|_| control.is_some()) {
                Some(cache) => cache.map(memfd.as_fd(), len as usize, min_size),
                None => sp::map_sealed(memfd.as_fd(), len as usize, min_size).map(Arc::new),
            };
            // Hands the memfd back to its sender once the payload has been read (or at
            // once, here, if it is rejected).
            let release = Release::new(memfd, control);
            let map = map.map_err(malformed)?;
            Ok((
                Payload::Mapped {
                    map,
                    len: len as usize,
                    release,
                },
                fds,
            ))
        }
        Some(other) => Err(ChannelError::Malformed(format!(
            "unknown message tag 0x{other:02x}"
        ))),
    }
}

/// Finds a datagram's payload (inline, or in its memfd) and hands it to `f`, then hands a
/// reused memfd back to its sender. Reused (pooled) memfds are mapped through `cache` when
/// there is one.
pub(crate) fn with_payload<R>(
    msg: &[u8],
    fds: Vec<OwnedFd>,
    truncated: bool,
    max: usize,
    cache: Option<&MapCache>,
    f: impl FnOnce(&[u8], Vec<OwnedFd>) -> Result<R, ChannelError>,
) -> Result<R, ChannelError> {
    match payload(msg, fds, truncated, max, cache)? {
        (Payload::Inline(p), fds) => f(p, fds),
        (Payload::Mapped { map, len, release }, fds) => {
            let result = f(&map.bytes()[..len], fds);
            // The payload has been copied out (or rejected): the sender may reuse the memfd.
            drop(release);
            result
        }
    }
}

/// Receives one message, `on_message` as in [`recv_with`], and returns its payload without
/// copying a large one out of shared memory: `f` gets the payload's bytes and returns the
/// part of them (`start`, `len`) to keep.
pub(crate) fn recv_shared(
    sock: BorrowedFd<'_>,
    cache: &MapCache,
    max: usize,
    wait: Wait,
    on_message: impl FnOnce(),
    f: impl FnOnce(&[u8], Vec<OwnedFd>) -> Result<(usize, usize), ChannelError>,
) -> Result<SharedBytes, ChannelError> {
    recv_message(sock, wait, on_message, |msg, fds, truncated| match payload(
        msg,
        fds,
        truncated,
        max,
        Some(cache),
    )? {
        (Payload::Inline(p), fds) => {
            f(p, fds).map(|(start, len)| SharedBytes::owned(p[start..start + len].to_vec()))
        }
        (Payload::Mapped { map, len, release }, fds) => {
            let (start, n) = f(&map.bytes()[..len], fds)?;
            Ok(SharedBytes::mapped(map, start, n, release))
        }
    })
}

/// The bytes inside a postcard-encoded [`Bytes`](super::Bytes) payload, as (start, len):
/// the whole payload must be one length-prefixed byte string.
pub(crate) fn bytes_in_payload(
    payload: &[u8],
    _fds: Vec<OwnedFd>,
) -> Result<(usize, usize), ChannelError> {
    let malformed = |reason: String| ChannelError::Decode {
        type_name: std::any::type_name::<super::Bytes>(),
        reason,
    };
    let (inner, rest) =
        codec::take_from_bytes::<&[u8]>(payload).map_err(|e| malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(malformed(format!(
            "{} bytes left over after the byte string",
            rest.len()
        )));
    }
    let start = inner.as_ptr() as usize - payload.as_ptr() as usize;
    Ok((start, inner.len()))
}

/// Decodes a payload as a `T`.
pub(crate) fn decode<T: DeserializeOwned>(
    payload: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<T, ChannelError> {
    ipc::decode(payload, fds).map_err(|e| ChannelError::Decode {
        type_name: std::any::type_name::<T>(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Value = (u32, Option<String>, Vec<(i64, bool)>);

    fn decode_datagram(msg: &[u8]) -> Result<Value, ChannelError> {
        with_payload(msg, Vec::new(), false, 1 << 20, None, decode::<Value>)
    }

    fn inline_frame(v: &Value) -> Vec<u8> {
        let mut buf = Vec::new();
        let (n, fds) = encode_inline(&mut buf, v).unwrap().unwrap();
        assert!(fds.is_empty());
        buf.truncate(n);
        buf
    }

    #[test]
    fn a_valid_inline_frame_round_trips() {
        let v: Value = (42, None, vec![(-1, true)]);
        let frame = inline_frame(&v);
        assert_eq!(frame.len(), postcard::to_stdvec(&v).unwrap().len() + 1);
        assert_eq!(decode_datagram(&frame).unwrap(), v);
    }

    #[test]
    fn bad_headers_are_errors() {
        assert!(decode_datagram(&[]).unwrap_err().is_malformed());
        assert!(decode_datagram(&[0x00, 1, 2]).unwrap_err().is_malformed());
        assert!(decode_datagram(&[TAG_MEMFD, 1]).unwrap_err().is_malformed());
        let mut h = memfd_header(100).to_vec();
        assert!(decode_datagram(&h).unwrap_err().is_malformed());
        h = memfd_header(usize::MAX).to_vec();
        assert!(decode_datagram(&h).unwrap_err().is_too_large());
    }

    #[test]
    fn pooled_memfds_are_reused_once_the_receiver_is_done() {
        let (a, b) = sp::socketpair().unwrap();
        let cache = MapCache::default();
        let recv = || {
            recv_with(
                b.as_fd(),
                &cache,
                1 << 30,
                Wait::Forever,
                || {},
                |p, _| Ok(p.to_vec()),
            )
        };
        for i in 0..5u8 {
            let msg = vec![i; INLINE_MAX * 3 + 7];
            send_raw(a.as_fd(), &msg, 1 << 30, Wait::Forever, None).unwrap();
            assert_eq!(recv().unwrap(), msg);
            // The receiver released it, so the one pooled memfd serves every message,
            // and the receiver maps it once.
            assert_eq!(POOL.with(|p| p.borrow().len()), 1);
            assert_eq!(cache.len(), 1);
        }
        // A shorter message through the same memfd uses the same mapping.
        send_raw(
            a.as_fd(),
            &[9; INLINE_MAX + 1],
            1 << 30,
            Wait::Forever,
            None,
        )
        .unwrap();
        assert_eq!(recv().unwrap(), vec![9; INLINE_MAX + 1]);
        assert_eq!(cache.len(), 1);
        let h = pooled_header(10, 6);
        assert!(with_payload(&h, Vec::new(), false, 1 << 20, None, decode::<Value>).is_err());
    }

    #[test]
    fn the_map_cache_checks_every_memfd_every_time() {
        let cache = MapCache::default();
        let got = |fd: &OwnedFd, header: &[u8]| {
            let fds = vec![fd.try_clone().unwrap()];
            with_payload(
                header,
                fds,
                false,
                1 << 20,
                Some(&cache),
                |p, _| Ok(p.len()),
            )
        };
        // Not sealed: refused, and not cached.
        let unsealed = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&unsealed, 8192).unwrap();
        assert!(got(&unsealed, &pooled_header(100, 4096))
            .unwrap_err()
            .is_malformed());
        assert_eq!(cache.len(), 0);
        // Sealed: mapped once, then found again for the next message.
        let (fd, _map) = sp::memfd_pooled("t", sp::PAGE).unwrap();
        assert_eq!(got(&fd, &pooled_header(100, 4096)).unwrap(), 100);
        assert_eq!(got(&fd, &pooled_header(4096, 4096)).unwrap(), 4096);
        assert_eq!(cache.len(), 1);
        // A header claiming more than the memfd holds is refused although it is cached.
        assert!(got(&fd, &pooled_header(4096, 8192))
            .unwrap_err()
            .is_malformed());
        let (other, _map) = sp::memfd_pooled("t", sp::PAGE).unwrap();
        assert_eq!(got(&other, &pooled_header(1, 4096)).unwrap(), 1);
        assert_eq!(cache.len(), 2);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_datagram(&bytes);
            let mut tagged = vec![TAG_INLINE];
            tagged.extend_from_slice(&bytes);
            let _ = decode_datagram(&tagged);
        }

        #[test]
        fn truncated_frames_are_errors_not_crashes(
            n in any::<u32>(),
            s in proptest::option::of(".{0,40}"),
            pairs in proptest::collection::vec((any::<i64>(), any::<bool>()), 0..20),
            cut in any::<proptest::sample::Index>(),
        ) {
            let v: Value = (n, s, pairs);
            let frame = inline_frame(&v);
            prop_assert_eq!(decode_datagram(&frame).unwrap(), v);
            let at = cut.index(frame.len());
            prop_assert!(decode_datagram(&frame[..at]).is_err());
        }
    }
}
