//! Framed messages over Unix stream sockets, with file descriptors riding along.
//!
//! A frame is a 12-byte header (payload length as a little-endian `u64`, descriptor count
//! as a little-endian `u32`) followed by the payload; the frame's descriptors travel as `SCM_RIGHTS` with its first
//! byte. Payloads are postcard-encoded serde values. Values that own a descriptor (pipes,
//! queues, shared memory) serialise it through [`serialize_fd`]/[`deserialize_fd`], which
//! move it into and out of the frame's descriptor list: this is how handles are passed to
//! child processes with every start method.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::codec;
use crate::sys;

pub(crate) const HEADER: usize = 12;

/// One received message.
#[derive(Debug)]
pub(crate) struct Frame {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// The header of a frame whose payload is `len` bytes with `nfds` descriptors.
pub(crate) fn frame_header(len: usize, nfds: usize) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(&(len as u64).to_le_bytes());
    h[8..].copy_from_slice(&(nfds as u32).to_le_bytes());
    h
}

/// Appends one frame (header and payload, given in pieces) to `buf`; its `nfds`
/// descriptors must be sent with the frame's first byte.
pub(crate) fn append_frame_parts(buf: &mut Vec<u8>, parts: &[&[u8]], nfds: usize) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    buf.reserve(HEADER + len);
    buf.extend_from_slice(&frame_header(len, nfds));
    for p in parts {
        buf.extend_from_slice(p);
    }
}

/// Sends one frame.
pub(crate) fn send_frame(sock: BorrowedFd<'_>, payload: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    send_frame_borrowed(sock, payload, &borrowed)
}

/// Sends one frame with borrowed descriptors (the kernel duplicates them into the message).
pub(crate) fn send_frame_borrowed(
    sock: BorrowedFd<'_>,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    sys::send_all(
        sock,
        &[&frame_header(payload.len(), fds.len()), payload],
        fds,
    )
}

/// What [`FrameReader::read`] found.
#[derive(Debug)]
pub(crate) enum Read {
    Frame(Frame),
    /// The peer closed its end (a partial frame, if any, is dropped).
    Eof,
    /// The deadline passed first.
    TimedOut,
}

/// Reassembles frames from a stream socket; reads never block past a deadline.
///
/// Received bytes are kept in one buffer that is reused from read to read: it is zero-filled
/// only when it grows, never per read, and a frame can be looked at in place
/// ([`next_frame_ref`](Self::next_frame_ref)) instead of being copied out.
#[derive(Debug, Default)]
pub(crate) struct FrameReader {
    /// All initialised; the unread bytes are `buf[pos..end]`.
    buf: Vec<u8>,
    /// Where the next unread frame starts (consumed bytes are dropped in bulk, not one
    /// frame at a time, so reading many small frames stays linear).
    pos: usize,
    end: usize,
    fds: VecDeque<OwnedFd>,
    eof: bool,
}

/// The smallest free space a read is given.
const MIN_READ: usize = 16 * 1024;
/// A buffer larger than this is given back once it is empty.
const KEEP_BUFFER: usize = 16 << 20;

impl FrameReader {
    /// Whether the peer has closed its end.
    pub fn at_eof(&self) -> bool {
        self.eof
    }

    /// Takes everything available now, without blocking.
    pub fn fill(&mut self, sock: BorrowedFd<'_>) -> io::Result<()> {
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        if self.end == 0 && self.buf.len() > KEEP_BUFFER {
            self.buf = Vec::new();
        }
        let mut fds = Vec::new();
        while !self.eof {
            if self.buf.len() - self.end < MIN_READ {
                // Doubling, so that a large frame costs few reads and few zero-fills.
                let want = (self.end + MIN_READ).max(self.buf.len() * 2);
                self.buf.resize(want, 0);
            }
            match sys::recv_nonblocking(sock, &mut self.buf[self.end..], &mut fds)? {
                sys::Received::Data(n) => self.end += n,
                sys::Received::WouldBlock => break,
                sys::Received::Eof => self.eof = true,
            }
        }
        self.fds.extend(fds);
        Ok(())
    }

    /// The next complete frame, if one has arrived: its payload, in place in the buffer,
    /// and its descriptors.
    pub fn next_frame_ref(&mut self) -> io::Result<Option<(&[u8], Vec<OwnedFd>)>> {
        let rest = &self.buf[self.pos..self.end];
        if rest.len() < HEADER {
            return Ok(None);
        }
        let len = u64::from_le_bytes(rest[0..8].try_into().expect("8 bytes"));
        let nfds = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes")) as usize;
        let Some(len) = usize::try_from(len)
            .ok()
            .filter(|&l| l <= isize::MAX as usize)
        else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("malformed frame: a length of {len} bytes"),
            ));
        };
        if rest.len() - HEADER < len {
            return Ok(None);
        }
        if self.fds.len() < nfds {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "malformed frame: header announces {nfds} file descriptors, {} arrived",
                    self.fds.len()
                ),
            ));
        }
        let start = self.pos + HEADER;
        self.pos = start + len;
        let fds = self.fds.drain(..nfds).collect();
        Ok(Some((&self.buf[start..start + len], fds)))
    }

    /// A complete frame, if one has arrived (copied out of the buffer).
    pub fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        Ok(self.next_frame_ref()?.map(|(bytes, fds)| Frame {
            bytes: bytes.to_vec(),
            fds,
        }))
    }

    /// Waits until more data (or EOF) arrives, then takes what is there.
    pub fn wait_and_fill(&mut self, sock: BorrowedFd<'_>) -> io::Result<()> {
        if !self.eof {
            sys::poll_readable(&[sock], None)?;
            self.fill(sock)?;
        }
        Ok(())
    }

    /// Waits for the next frame until `deadline` (`None`: for ever).
    pub fn read(&mut self, sock: BorrowedFd<'_>, deadline: Option<Instant>) -> io::Result<Read> {
        loop {
            if let Some(f) = self.next_frame()? {
                return Ok(Read::Frame(f));
            }
            if self.eof {
                return Ok(Read::Eof);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                // One last look: the data may be there already.
                self.fill(sock)?;
                if let Some(f) = self.next_frame()? {
                    return Ok(Read::Frame(f));
                }
                return Ok(if self.eof { Read::Eof } else { Read::TimedOut });
            }
            sys::poll_readable(&[sock], deadline)?;
            self.fill(sock)?;
        }
    }
}

thread_local! {
    /// Descriptors collected while serialising a message, or handed out while deserialising one.
    static FDS: RefCell<Option<FdTable>> = const { RefCell::new(None) };
}

#[derive(Debug)]
enum FdTable {
    Outgoing(Vec<OwnedFd>),
    Incoming(Vec<Option<OwnedFd>>),
}

/// Restores the previous table even when serialisation panics.
struct TableGuard(Option<FdTable>);

impl TableGuard {
    fn install(table: FdTable) -> Self {
        TableGuard(FDS.with(|t| t.borrow_mut().replace(table)))
    }
    fn take(mut self) -> Option<FdTable> {
        let prev = self.0.take();
        FDS.with(|t| std::mem::replace(&mut *t.borrow_mut(), prev))
    }
}

impl Drop for TableGuard {
    fn drop(&mut self) {
        let prev = self.0.take();
        FDS.with(|t| *t.borrow_mut() = prev);
    }
}

/// Encodes `value`, gathering the descriptors of any handles inside it.
pub(crate) fn encode<T: Serialize + ?Sized>(
    value: &T,
) -> Result<(Vec<u8>, Vec<OwnedFd>), codec::Error> {
    let guard = TableGuard::install(FdTable::Outgoing(Vec::new()));
    let bytes = codec::to_vec(value);
    let fds = match guard.take() {
        Some(FdTable::Outgoing(fds)) => fds,
        _ => Vec::new(),
    };
    Ok((bytes?, fds))
}

/// Runs `f`, which serialises something, gathering the descriptors of any handles it meets
/// (as [`encode`] does, for serialisers other than postcard's `Vec` one).
pub(crate) fn encode_with<R>(f: impl FnOnce() -> R) -> (R, Vec<OwnedFd>) {
    let guard = TableGuard::install(FdTable::Outgoing(Vec::new()));
    let r = f();
    let fds = match guard.take() {
        Some(FdTable::Outgoing(fds)) => fds,
        _ => Vec::new(),
    };
    (r, fds)
}

/// Decodes a `T`, handing the frame's descriptors to the handles inside it.
pub(crate) fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<T, DecodeError> {
    let guard = TableGuard::install(FdTable::Incoming(fds.into_iter().map(Some).collect()));
    let value = decode_without_fds(bytes);
    drop(guard);
    value
}

/// Decodes a `T` that carries no descriptors (a handle inside it is an error).
pub(crate) fn decode_without_fds<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    codec::from_bytes(bytes).map_err(DecodeError)
}

/// Why bytes did not decode as the expected type.
#[derive(Debug)]
pub(crate) struct DecodeError(codec::Error);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use postcard::Error as E;
        // postcard's own texts are terse.
        match (self.0.kind(), self.0.message()) {
            (E::SerdeDeCustom, Some(d)) => write!(
                f,
                "the type's Deserialize implementation rejected the value: {d}"
            ),
            (E::SerdeDeCustom, None) => {
                f.write_str("the type's Deserialize implementation rejected the value")
            }
            (E::DeserializeUnexpectedEnd, _) => {
                f.write_str("the data ended early (was a different type sent?)")
            }
            (other, _) => write!(f, "the data does not match the type ({other})"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Serialises a descriptor: a duplicate travels with the message; the original stays here.
///
/// Only meaningful inside a gpuproc message (arguments, results, channel messages); any other
/// serializer gets an error.
pub fn serialize_fd<S: Serializer>(fd: BorrowedFd<'_>, s: S) -> Result<S::Ok, S::Error> {
    let index = FDS.with(|t| match t.borrow_mut().as_mut() {
        Some(FdTable::Outgoing(fds)) => {
            let dup =
                sys::dup(fd).map_err(|e| format!("cannot duplicate a file descriptor: {e}"))?;
            fds.push(dup);
            Ok(fds.len() - 1)
        }
        _ => Err("a gpuproc handle can only be serialised inside a gpuproc message".to_string()),
    });
    match index {
        Ok(i) => (i as u32).serialize(s),
        Err(msg) => Err(serde::ser::Error::custom(msg)),
    }
}

/// A borrowed descriptor that serialises with [`serialize_fd`].
pub(crate) struct FdRef<'a>(pub(crate) BorrowedFd<'a>);

impl Serialize for FdRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_fd(self.0, s)
    }
}

/// Deserialises a descriptor sent with [`serialize_fd`].
pub fn deserialize_fd<'de, D: Deserializer<'de>>(d: D) -> Result<OwnedFd, D::Error> {
    let index = u32::deserialize(d)? as usize;
    FDS.with(|t| match t.borrow_mut().as_mut() {
        Some(FdTable::Incoming(fds)) => {
            fds.get_mut(index).and_then(Option::take).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "file descriptor #{index} is missing from the message (or used twice)"
                ))
            })
        }
        _ => Err(serde::de::Error::custom(
            "a gpuproc handle can only be deserialised inside a gpuproc message",
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::os::fd::{FromRawFd, IntoRawFd};
    use std::time::Duration;

    #[derive(Debug, Serialize, Deserialize)]
    struct WithFd {
        label: String,
        #[serde(serialize_with = "ser_owned", deserialize_with = "deserialize_fd")]
        fd: OwnedFd,
    }

    fn ser_owned<S: Serializer>(fd: &OwnedFd, s: S) -> Result<S::Ok, S::Error> {
        serialize_fd(fd.as_fd(), s)
    }

    #[test]
    fn frames_carry_bytes_and_descriptors() {
        let (a, b) = sys::socketpair().unwrap();
        let (pipe_r, pipe_w) = rustix::pipe::pipe().unwrap();
        let msg = WithFd {
            label: "hello".into(),
            fd: pipe_w,
        };
        let (bytes, fds) = encode(&msg).unwrap();
        assert_eq!(fds.len(), 1);
        send_frame(a.as_fd(), &bytes, &fds).unwrap();
        send_frame(a.as_fd(), b"second", &[]).unwrap();
        let mut r = FrameReader::default();
        let deadline = Some(Instant::now() + Duration::from_secs(10));
        let Read::Frame(f) = r.read(b.as_fd(), deadline).unwrap() else {
            panic!("no frame")
        };
        let got: WithFd = decode(&f.bytes, f.fds).unwrap();
        assert_eq!(got.label, "hello");
        // The received descriptor is the pipe's write end: writing to it reaches the read end.
        // SAFETY: we own both descriptors and move them into std files.
        let mut w = unsafe { std::fs::File::from_raw_fd(got.fd.into_raw_fd()) };
        // SAFETY: as above.
        let mut rd = unsafe { std::fs::File::from_raw_fd(pipe_r.into_raw_fd()) };
        w.write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        rd.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
        let Read::Frame(f) = r.read(b.as_fd(), deadline).unwrap() else {
            panic!("no frame")
        };
        assert_eq!(f.bytes, b"second");
        drop(a);
        assert!(matches!(r.read(b.as_fd(), deadline).unwrap(), Read::Eof));
    }

    #[test]
    fn read_times_out_without_data() {
        let (_a, b) = sys::socketpair().unwrap();
        let mut r = FrameReader::default();
        let got = r
            .read(b.as_fd(), Some(Instant::now() + Duration::from_millis(20)))
            .unwrap();
        assert!(matches!(got, Read::TimedOut));
    }

    #[test]
    fn missing_descriptor_is_an_error() {
        let (a, b) = sys::socketpair().unwrap();
        // A header announcing one descriptor that never came.
        let raw = frame_header(0, 1);
        sys::send_all(a.as_fd(), &[&raw], &[]).unwrap();
        let mut r = FrameReader::default();
        let err = r
            .read(b.as_fd(), Some(Instant::now() + Duration::from_secs(10)))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_rejected_handle_says_why() {
        let (pipe_r, _pipe_w) = rustix::pipe::pipe().unwrap();
        let msg = WithFd {
            label: "x".into(),
            fd: pipe_r,
        };
        let (bytes, fds) = encode(&msg).unwrap();
        assert_eq!(fds.len(), 1);
        // Decoded without its descriptors: postcard alone would only say "custom error".
        let err = decode_without_fds::<WithFd>(&bytes)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("only be deserialised inside a gpuproc message"),
            "{err}"
        );
        // A later, unrelated failure does not inherit that text.
        let err = decode_without_fds::<(u8, u8)>(&[1])
            .unwrap_err()
            .to_string();
        assert!(!err.contains("gpuproc message"), "{err}");
    }

    #[test]
    fn handles_outside_messages_are_refused() {
        let (a, _b) = sys::socketpair().unwrap();
        let msg = WithFd {
            label: "x".into(),
            fd: a,
        };
        assert!(postcard::to_stdvec(&msg).is_err());
    }
}
