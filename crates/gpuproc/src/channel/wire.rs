//! How one channel message looks on a `SOCK_SEQPACKET` socket.
//!
//! Every message is one datagram whose first byte says where the payload is:
//! - [`TAG_INLINE`]: the postcard payload follows in the datagram;
//! - [`TAG_MEMFD`]: a little-endian `u64` length follows, and the first descriptor is a
//!   sealed memfd holding the payload (for payloads over [`INLINE_MAX`] bytes, which then
//!   travel through shared memory instead of byte by byte through the socket).
//!
//! Any further descriptors belong to handles inside the payload (see `crate::ipc`).

use std::cell::Cell;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use postcard::ser_flavors::Size;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::ChannelError;
use crate::ipc;
use crate::sys::seqpacket::{self as sp, Outcome};

pub(crate) const TAG_INLINE: u8 = 0xA1;
pub(crate) const TAG_MEMFD: u8 = 0xA2;
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
            Wait::For(d) => Some(Instant::now() + d),
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

fn encode_error(e: postcard::Error) -> ChannelError {
    ChannelError::Encode(e.to_string())
}

/// Encodes `value` into an inline datagram: the tag, then the payload.
pub(crate) fn inline_frame<T: Serialize + ?Sized>(
    value: &T,
    size: usize,
) -> Result<(Vec<u8>, Vec<OwnedFd>), ChannelError> {
    let mut buf = vec![0u8; size + 1];
    buf[0] = TAG_INLINE;
    let (n, fds) = ipc::encode_with(|| postcard::to_slice(value, &mut buf[1..]).map(|s| s.len()));
    let n = n.map_err(encode_error)?;
    buf.truncate(n + 1);
    Ok((buf, fds))
}

/// Sends `value` (postcard-encoded) on `sock`.
pub(crate) fn send_value<T: Serialize + ?Sized>(
    sock: BorrowedFd<'_>,
    value: &T,
    max: usize,
    wait: Wait,
) -> Result<(), ChannelError> {
    let deadline = wait.deadline();
    // Measuring first lets a large payload be encoded straight into shared memory.
    let (size, _measuring_fds) =
        ipc::encode_with(|| postcard::serialize_with_flavor(value, Size::default()));
    let size = size.map_err(encode_error)?;
    if size > max {
        return Err(ChannelError::TooLarge { size, limit: max });
    }
    if size <= INLINE_MAX {
        let (frame, fds) = inline_frame(value, size)?;
        return finish(sock, &[&frame], None, &fds, deadline, wait);
    }
    let (memfd, mut map) = sp::memfd_for_writing("gpuproc-message", size)
        .map_err(ChannelError::io("creating a memfd"))?;
    let (n, fds) = ipc::encode_with(|| postcard::to_slice(value, map.bytes_mut()).map(|s| s.len()));
    let n = n.map_err(|e| {
        ChannelError::Encode(format!(
            "the value encoded to a different size the second time ({e})"
        ))
    })?;
    sp::seal(&memfd, map).map_err(ChannelError::io("sealing a memfd"))?;
    let header = memfd_header(n);
    finish(sock, &[&header], Some(memfd), &fds, deadline, wait)
}

/// Sends `bytes` as they are (no encoding) on `sock`.
pub(crate) fn send_raw(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    max: usize,
    wait: Wait,
) -> Result<(), ChannelError> {
    let deadline = wait.deadline();
    if bytes.len() > max {
        return Err(ChannelError::TooLarge {
            size: bytes.len(),
            limit: max,
        });
    }
    if bytes.len() <= INLINE_MAX {
        return finish(sock, &[&[TAG_INLINE], bytes], None, &[], deadline, wait);
    }
    let (memfd, mut map) = sp::memfd_for_writing("gpuproc-message", bytes.len())
        .map_err(ChannelError::io("creating a memfd"))?;
    map.bytes_mut().copy_from_slice(bytes);
    sp::seal(&memfd, map).map_err(ChannelError::io("sealing a memfd"))?;
    let header = memfd_header(bytes.len());
    finish(sock, &[&header], Some(memfd), &[], deadline, wait)
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
    memfd: Option<OwnedFd>,
    fds: &[OwnedFd],
    deadline: Option<Instant>,
    wait: Wait,
) -> Result<(), ChannelError> {
    let all: Vec<BorrowedFd<'_>> = memfd.iter().chain(fds.iter()).map(|f| f.as_fd()).collect();
    match sp::send(sock, parts, &all, deadline).map_err(ChannelError::io("sending a message"))? {
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
    max: usize,
    wait: Wait,
    on_message: impl FnOnce(),
    f: impl FnOnce(&[u8], Vec<OwnedFd>) -> Result<R, ChannelError>,
) -> Result<R, ChannelError> {
    let mut buf = BUF.with(|b| b.take());
    buf.resize(RECV_BUF, 0);
    let got = sp::recv(sock, &mut buf, wait.deadline());
    let result = match got.map_err(ChannelError::io("receiving a message")) {
        Err(e) => Err(e),
        Ok(Outcome::Closed) => Err(ChannelError::Disconnected),
        Ok(Outcome::TimedOut) => Err(wait.expired(ChannelError::Empty)),
        Ok(Outcome::Done(m)) => {
            on_message();
            with_payload(&buf[..m.len], m.fds, m.truncated, max, f)
        }
    };
    BUF.with(|b| b.set(buf));
    result
}

/// Finds a datagram's payload (inline, or in its memfd) and hands it to `f`.
pub(crate) fn with_payload<R>(
    msg: &[u8],
    mut fds: Vec<OwnedFd>,
    truncated: bool,
    max: usize,
    f: impl FnOnce(&[u8], Vec<OwnedFd>) -> Result<R, ChannelError>,
) -> Result<R, ChannelError> {
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
            f(payload, fds)
        }
        Some(&TAG_MEMFD) => {
            let len: [u8; 8] = msg[1..].try_into().map_err(|_| {
                ChannelError::Malformed(format!(
                    "a shared-memory message header of {} bytes, expected 9",
                    msg.len()
                ))
            })?;
            let len = u64::from_le_bytes(len);
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
            let map = sp::map_sealed(memfd.as_fd(), len as usize)
                .map_err(|e| ChannelError::Malformed(e.to_string()))?;
            drop(memfd);
            f(map.bytes(), fds)
        }
        Some(other) => Err(ChannelError::Malformed(format!(
            "unknown message tag 0x{other:02x}"
        ))),
    }
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
        with_payload(msg, Vec::new(), false, 1 << 20, decode::<Value>)
    }

    #[test]
    fn a_valid_inline_frame_round_trips() {
        let v: Value = (42, None, vec![(-1, true)]);
        let size = postcard::to_stdvec(&v).unwrap().len();
        let (frame, fds) = inline_frame(&v, size).unwrap();
        assert!(fds.is_empty());
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
            let size = postcard::to_stdvec(&v).unwrap().len();
            let (frame, _) = inline_frame(&v, size).unwrap();
            prop_assert_eq!(decode_datagram(&frame).unwrap(), v);
            let at = cut.index(frame.len());
            prop_assert!(decode_datagram(&frame[..at]).is_err());
        }
    }
}
