//! [`Connection`]: one end of a socket stream, with Python's message framing.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::frame::{self, Parsed};
use super::ConnectionError;
use crate::channel::DEFAULT_MAX_MESSAGE_SIZE;
use crate::sys::{self, Received};

/// How long a call may wait.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Wait {
    /// For ever.
    Forever,
    /// Not at all: take what has arrived.
    Never,
    /// Until `deadline`, which is `timeout` after the call began.
    Until {
        deadline: Instant,
        timeout: Duration,
        waiting_for: &'static str,
    },
}

impl Wait {
    /// At most `timeout` (a timeout past the clock's range is for ever).
    pub(crate) fn at_most(timeout: Duration, waiting_for: &'static str) -> Wait {
        match crate::time::deadline(timeout) {
            Some(deadline) => Wait::Until {
                deadline,
                timeout,
                waiting_for,
            },
            None => Wait::Forever,
        }
    }

    fn deadline(self) -> Option<Instant> {
        match self {
            Wait::Forever => None,
            Wait::Never => Some(Instant::now()),
            Wait::Until { deadline, .. } => Some(deadline),
        }
    }

    fn expired(self) -> ConnectionError {
        match self {
            Wait::Until {
                timeout,
                waiting_for,
                ..
            } => ConnectionError::Timeout {
                waiting_for,
                after: timeout,
            },
            Wait::Forever | Wait::Never => ConnectionError::Empty,
        }
    }
}

/// The smallest piece of a payload read at once.
const READ_CHUNK: usize = 64 * 1024;

/// A message being received: the header bytes so far, then the payload so far.
#[derive(Default)]
struct Rx {
    head: Vec<u8>,
    len: Option<u64>,
    payload: Vec<u8>,
    /// Why this end cannot receive any more.
    broken: Option<&'static str>,
}

#[derive(Default)]
struct Tx {
    /// Why this end cannot send any more.
    broken: Option<&'static str>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One end of a connection made by a [`Listener`](super::Listener) or a
/// [`Client`](super::Client); Python's `multiprocessing.connection.Connection` over a socket.
///
/// The API is that of [`channel::Connection`](crate::channel::Connection): serde values
/// (postcard-encoded) with [`send`](Self::send)/[`recv`](Self::recv), raw bytes with
/// [`send_bytes`](Self::send_bytes)/[`recv_bytes`](Self::recv_bytes), `_timeout` and `try_`
/// forms, [`poll`](Self::poll). Each message is framed as Python frames it, so bytes sent
/// with `send_bytes` reach a Python peer's `recv_bytes` and the reverse; values are
/// postcard, not pickle, so only bytes interoperate with Python.
///
/// Values that hold file descriptors (pipes, queues, locks, shared memory) cannot cross a
/// socket: sending one is a [`ConnectionError::CarriesDescriptors`] error.
///
/// One thread may send while another receives; concurrent sends (or receives) take turns,
/// a whole message each.
///
/// # Timeouts
/// A receive that times out part-way through a message keeps what arrived: the next
/// receive goes on from there. A send that times out before any byte went out leaves the
/// connection usable; one that times out part-way leaves the stream out of step, so later
/// sends fail with [`ConnectionError::Broken`] (receiving still works).
#[doc(alias = "multiprocessing.connection.Connection")]
pub struct Connection {
    fd: OwnedFd,
    max_message_size: usize,
    rx: Mutex<Rx>,
    tx: Mutex<Tx>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("fd", &self.fd)
            .field("max_message_size", &self.max_message_size)
            .finish_non_exhaustive()
    }
}

fn send_error(e: io::Error) -> ConnectionError {
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => ConnectionError::Disconnected,
        _ => ConnectionError::Io {
            context: "sending on a socket connection".into(),
            source: e,
        },
    }
}

fn recv_error(e: io::Error) -> ConnectionError {
    ConnectionError::Io {
        context: "receiving on a socket connection".into(),
        source: e,
    }
}

impl Connection {
    /// The socket, for a protocol of its own after the handshake. (Only between whole
    /// messages, when nothing more has arrived: the caller's protocol must alternate.)
    pub(crate) fn into_fd(self) -> OwnedFd {
        self.fd
    }

    pub(crate) fn new(fd: OwnedFd, max_message_size: usize) -> Self {
        Connection {
            fd,
            max_message_size,
            rx: Mutex::default(),
            tx: Mutex::default(),
        }
    }

    /// Sets the largest message this end sends or accepts (default 4 GiB, as
    /// [`channel::DEFAULT_MAX_MESSAGE_SIZE`](crate::channel::DEFAULT_MAX_MESSAGE_SIZE)). A
    /// larger one is a [`ConnectionError::TooLarge`] error; an incoming one is refused from
    /// its header, before anything is allocated for it.
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// The largest message this end sends or accepts.
    pub fn max_message_size(&self) -> usize {
        self.max_message_size
    }

    pub(crate) fn default_max() -> usize {
        DEFAULT_MAX_MESSAGE_SIZE
    }

    /// Sends one framed message of at most `limit` bytes.
    pub(crate) fn send_frame(
        &self,
        payload: &[u8],
        wait: Wait,
        limit: usize,
    ) -> Result<(), ConnectionError> {
        let len = payload.len() as u64;
        if payload.len() > limit {
            return Err(ConnectionError::TooLarge { size: len, limit });
        }
        let mut tx = lock(&self.tx);
        if let Some(why) = tx.broken {
            return Err(ConnectionError::Broken(why));
        }
        let (head, head_len) = frame::header(len);
        let total = head_len + payload.len();
        let parts: [&[u8]; 2] = [&head[..head_len], payload];
        let mut sent = 0;
        let deadline = wait.deadline();
        while sent < total {
            let n = sys::send_nonblocking(self.fd.as_fd(), &parts, sent, &[]).map_err(|e| {
                if sent > 0 {
                    tx.broken = Some("a send failed part-way through a message");
                }
                send_error(e)
            })?;
            sent += n;
            if sent < total && n == 0 {
                let ready = sys::wait_ready(self.fd.as_fd(), true, deadline).map_err(send_error)?;
                if !ready {
                    if sent > 0 {
                        tx.broken = Some(
                            "a send timed out part-way through a message, so the stream is \
                             out of step",
                        );
                    }
                    return Err(wait.expired());
                }
            }
        }
        Ok(())
    }

    /// Receives one framed message of at most `limit` bytes.
    pub(crate) fn recv_frame(&self, wait: Wait, limit: usize) -> Result<Vec<u8>, ConnectionError> {
        let mut rx = lock(&self.rx);
        if let Some(why) = rx.broken {
            return Err(ConnectionError::Broken(why));
        }
        let deadline = wait.deadline();
        loop {
            let got = match rx.len {
                None => {
                    let need = match frame::parse(&rx.head) {
                        Parsed::Need(n) => n,
                        Parsed::Len(len) => {
                            if len > limit as u64 {
                                rx.broken = Some(
                                    "an earlier message was larger than max_message_size, and \
                                     its bytes are still in the stream",
                                );
                                return Err(ConnectionError::TooLarge { size: len, limit });
                            }
                            rx.len = Some(len);
                            continue;
                        }
                        Parsed::Bad(n) => {
                            rx.broken = Some("a malformed message header arrived earlier");
                            return Err(ConnectionError::Malformed(format!(
                                "a message header with the length {n}"
                            )));
                        }
                    };
                    let have = rx.head.len();
                    sys::net::recv_append(self.fd.as_fd(), &mut rx.head, need - have)
                        .map_err(recv_error)?
                }
                Some(len) => {
                    // `len <= limit`, a usize.
                    let len = len as usize;
                    let have = rx.payload.len();
                    if have == len {
                        let payload = std::mem::take(&mut rx.payload);
                        rx.head.clear();
                        rx.len = None;
                        return Ok(payload);
                    }
                    let left = len - have;
                    let spare = rx.payload.capacity() - have;
                    if spare < left.min(READ_CHUNK) {
                        // Grow by doubling, never past the message: memory follows the bytes
                        // that arrive, not the length announced.
                        let cap = rx.payload.capacity();
                        let target = cap.saturating_mul(2).max(have + READ_CHUNK).min(len);
                        rx.payload.reserve_exact(target - have);
                    }
                    let spare = rx.payload.capacity() - have;
                    let Rx { payload, .. } = &mut *rx;
                    sys::net::recv_append(self.fd.as_fd(), payload, left.min(spare))
                        .map_err(recv_error)?
                }
            };
            match got {
                Received::Data(_) => {}
                Received::Eof => {
                    if rx.head.is_empty() {
                        return Err(ConnectionError::Disconnected);
                    }
                    rx.broken =
                        Some("the other end closed the connection part-way through a message");
                    return Err(ConnectionError::Malformed(
                        "the other end closed the connection part-way through a message".into(),
                    ));
                }
                Received::WouldBlock => {
                    let ready =
                        sys::wait_ready(self.fd.as_fd(), false, deadline).map_err(recv_error)?;
                    if !ready {
                        return Err(wait.expired());
                    }
                }
            }
        }
    }

    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, ConnectionError> {
        let (bytes, fds) = crate::ipc::encode_with(|| postcard::to_stdvec(value));
        if !fds.is_empty() {
            return Err(ConnectionError::CarriesDescriptors {
                type_name: std::any::type_name::<T>(),
                count: fds.len(),
            });
        }
        bytes.map_err(|e| ConnectionError::Encode(e.to_string()))
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ConnectionError> {
        crate::ipc::decode_without_fds(bytes).map_err(|e| ConnectionError::Decode {
            type_name: std::any::type_name::<T>(),
            reason: e.to_string(),
        })
    }

    /// Sends a value (postcard-encoded), waiting while the socket is full; Python's
    /// `conn.send(obj)`, but not pickle: a Python peer receives it with `recv_bytes`.
    pub fn send<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), ConnectionError> {
        self.send_frame(&Self::encode(value)?, Wait::Forever, self.max_message_size)
    }

    /// [`send`](Self::send), waiting at most `timeout` for room in the socket.
    pub fn send_timeout<T: Serialize + ?Sized>(
        &self,
        value: &T,
        timeout: Duration,
    ) -> Result<(), ConnectionError> {
        let bytes = Self::encode(value)?;
        let wait = Wait::at_most(timeout, "room to send");
        self.send_frame(&bytes, wait, self.max_message_size)
    }

    /// Sends raw bytes as one message; Python's `conn.send_bytes(buf)`.
    pub fn send_bytes(&self, bytes: &[u8]) -> Result<(), ConnectionError> {
        self.send_frame(bytes, Wait::Forever, self.max_message_size)
    }

    /// [`send_bytes`](Self::send_bytes), waiting at most `timeout` for room in the socket.
    pub fn send_bytes_timeout(
        &self,
        bytes: &[u8],
        timeout: Duration,
    ) -> Result<(), ConnectionError> {
        let wait = Wait::at_most(timeout, "room to send");
        self.send_frame(bytes, wait, self.max_message_size)
    }

    /// Receives the next message as a `T`, waiting for it; Python's `conn.recv()`.
    ///
    /// [`ConnectionError::Disconnected`] once the other end is closed and nothing is left.
    pub fn recv<T: DeserializeOwned>(&self) -> Result<T, ConnectionError> {
        Self::decode(&self.recv_frame(Wait::Forever, self.max_message_size)?)
    }

    /// The next value if a whole message has arrived, else [`ConnectionError::Empty`].
    pub fn try_recv<T: DeserializeOwned>(&self) -> Result<T, ConnectionError> {
        Self::decode(&self.recv_frame(Wait::Never, self.max_message_size)?)
    }

    /// [`recv`](Self::recv), waiting at most `timeout` ([`ConnectionError::Timeout`]).
    pub fn recv_timeout<T: DeserializeOwned>(
        &self,
        timeout: Duration,
    ) -> Result<T, ConnectionError> {
        let wait = Wait::at_most(timeout, "a message");
        Self::decode(&self.recv_frame(wait, self.max_message_size)?)
    }

    /// Receives the next message's bytes as they are; Python's `conn.recv_bytes()`.
    pub fn recv_bytes(&self) -> Result<Vec<u8>, ConnectionError> {
        self.recv_frame(Wait::Forever, self.max_message_size)
    }

    /// The next message's bytes if a whole message has arrived, else
    /// [`ConnectionError::Empty`].
    pub fn try_recv_bytes(&self) -> Result<Vec<u8>, ConnectionError> {
        self.recv_frame(Wait::Never, self.max_message_size)
    }

    /// [`recv_bytes`](Self::recv_bytes), waiting at most `timeout`.
    pub fn recv_bytes_timeout(&self, timeout: Duration) -> Result<Vec<u8>, ConnectionError> {
        self.recv_frame(Wait::at_most(timeout, "a message"), self.max_message_size)
    }

    /// Receives the next message's bytes into `buf`, from `offset` on, and returns its
    /// length; Python's `conn.recv_bytes_into(buf, offset)`.
    ///
    /// A message longer than the room after `offset` is a
    /// [`ConnectionError::BufferTooShort`] error carrying the whole message (Python's
    /// `BufferTooShort`); it was consumed. An `offset` past the end of `buf` is a
    /// [`ConnectionError::InvalidArgument`] error, and nothing is received.
    pub fn recv_bytes_into(&self, buf: &mut [u8], offset: usize) -> Result<usize, ConnectionError> {
        self.recv_bytes_into_wait(buf, offset, Wait::Forever)
    }

    /// [`recv_bytes_into`](Self::recv_bytes_into), waiting at most `timeout`.
    pub fn recv_bytes_into_timeout(
        &self,
        buf: &mut [u8],
        offset: usize,
        timeout: Duration,
    ) -> Result<usize, ConnectionError> {
        self.recv_bytes_into_wait(buf, offset, Wait::at_most(timeout, "a message"))
    }

    fn recv_bytes_into_wait(
        &self,
        buf: &mut [u8],
        offset: usize,
        wait: Wait,
    ) -> Result<usize, ConnectionError> {
        let len = buf.len();
        let Some(room) = buf.get_mut(offset..) else {
            return Err(ConnectionError::InvalidArgument(format!(
                "offset {offset} is past the end of a buffer of {len} bytes"
            )));
        };
        let message = self.recv_frame(wait, self.max_message_size)?;
        let size = message.len();
        match room.get_mut(..size) {
            Some(to) => {
                to.copy_from_slice(&message);
                Ok(size)
            }
            None => Err(ConnectionError::BufferTooShort {
                size,
                room: room.len(),
                message,
            }),
        }
    }

    /// Whether something (part of a message, or the other end's closing) is waiting, after
    /// waiting at most `timeout`; Python's `conn.poll(timeout)`. A failure to poll reports
    /// `true`, so that the next receive reports the error.
    pub fn poll(&self, timeout: Duration) -> bool {
        // (While another thread is receiving, the socket alone says.)
        if let Ok(rx) = self.rx.try_lock() {
            if rx.broken.is_some() {
                return true;
            }
        }
        sys::wait_ready(self.fd.as_fd(), false, crate::time::deadline(timeout)).unwrap_or(true)
    }

    /// Closes the connection; Python's `conn.close()`. The same as dropping it.
    pub fn close(self) {}
}

/// Ready when part of a message (or the other end's closing) is waiting, or when the
/// connection can receive no more (the next receive reports why).
impl super::Waitable for Connection {
    fn wait_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn ready_now(&self) -> bool {
        self.rx.try_lock().is_ok_and(|rx| rx.broken.is_some())
    }
}

/// Python's `conn.fileno()`.
impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, Connection) {
        let (a, b) = sys::socketpair().unwrap();
        (
            Connection::new(a, Connection::default_max()),
            Connection::new(b, Connection::default_max()),
        )
    }

    const T: Duration = Duration::from_secs(30);

    #[test]
    fn bytes_and_values_cross() {
        let (a, b) = pair();
        a.send_bytes(b"hello").unwrap();
        a.send_bytes(b"").unwrap();
        a.send(&(1u32, "two".to_string())).unwrap();
        assert_eq!(b.recv_bytes_timeout(T).unwrap(), b"hello");
        assert_eq!(b.recv_bytes_timeout(T).unwrap(), b"");
        let v: (u32, String) = b.recv_timeout(T).unwrap();
        assert_eq!(v, (1, "two".to_string()));
        assert!(b.try_recv_bytes().unwrap_err().is_empty());
        drop(a);
        assert!(b.recv_bytes_timeout(T).unwrap_err().is_disconnected());
    }

    #[test]
    fn recv_bytes_into_fills_a_buffer_or_hands_the_message_back() {
        let (a, b) = pair();
        a.send_bytes(b"hello").unwrap();
        a.send_bytes(b"far too long").unwrap();
        a.send_bytes(b"next").unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(b.recv_bytes_into_timeout(&mut buf, 3, T).unwrap(), 5);
        assert_eq!(&buf, b"\0\0\0hello");
        let e = b.recv_bytes_into(&mut buf, 0).unwrap_err();
        assert!(e.is_buffer_too_short(), "{e}");
        assert_eq!(e.too_short_message(), Some(&b"far too long"[..]));
        assert!(matches!(
            e,
            ConnectionError::BufferTooShort {
                size: 12,
                room: 8,
                ..
            }
        ));
        // An offset past the end receives nothing.
        let e = b.recv_bytes_into(&mut buf, 9).unwrap_err();
        assert!(matches!(e, ConnectionError::InvalidArgument(_)), "{e}");
        assert_eq!(
            b.recv_bytes_into(&mut buf, 8)
                .unwrap_err()
                .too_short_message(),
            Some(&b"next"[..])
        );
    }

    #[test]
    fn the_wire_is_pythons() {
        let (a, b) = sys::socketpair().unwrap();
        let a = Connection::new(a, Connection::default_max());
        a.send_bytes(b"abc").unwrap();
        let mut buf = [0u8; 16];
        let n = rustix::io::read(&b, &mut buf).unwrap();
        assert_eq!(&buf[..n], &[0, 0, 0, 3, b'a', b'b', b'c']);
    }

    #[test]
    fn a_partial_message_is_kept_across_timeouts() {
        let (a, b) = sys::socketpair().unwrap();
        let b = Connection::new(b, Connection::default_max());
        // The header and half the payload, then nothing.
        sys::send_all(a.as_fd(), &[&[0, 0, 0, 4], b"ab"], &[]).unwrap();
        let e = b.recv_bytes_timeout(Duration::from_millis(20)).unwrap_err();
        assert!(e.is_timeout(), "{e}");
        assert!(b.try_recv_bytes().unwrap_err().is_empty());
        // What arrived is taken: nothing more to read until the rest comes.
        assert!(!b.poll(Duration::ZERO));
        sys::send_all(a.as_fd(), &[b"cd", &[0, 0, 0, 1], b"e"], &[]).unwrap();
        assert_eq!(b.recv_bytes_timeout(T).unwrap(), b"abcd");
        assert_eq!(b.recv_bytes_timeout(T).unwrap(), b"e");
        // A message cut off by the peer's closing.
        sys::send_all(a.as_fd(), &[&[0, 0, 0, 9], b"xy"], &[]).unwrap();
        drop(a);
        let e = b.recv_bytes_timeout(T).unwrap_err();
        assert!(e.to_string().contains("part-way"), "{e}");
    }

    #[test]
    fn an_oversize_header_is_refused_before_allocating() {
        let (a, b) = sys::socketpair().unwrap();
        let b = Connection::new(b, Connection::default_max()).with_max_message_size(1000);
        // The long form announcing 1 TiB: refused from the header alone.
        let mut h = vec![0xff; 4];
        h.extend_from_slice(&(1u64 << 40).to_be_bytes());
        sys::send_all(a.as_fd(), &[&h], &[]).unwrap();
        let e = b.recv_bytes_timeout(T).unwrap_err();
        assert!(
            matches!(e, ConnectionError::TooLarge { size, limit: 1000 } if size == 1 << 40),
            "{e}"
        );
        assert!(lock(&b.rx).payload.capacity() == 0);
        // Like Python, the connection does not receive any more; it still sends.
        let e = b.recv_bytes_timeout(T).unwrap_err();
        assert!(matches!(e, ConnectionError::Broken(_)), "{e}");
        b.send_bytes(b"ok").unwrap();
        // A negative length is malformed.
        let (a, b) = sys::socketpair().unwrap();
        let b = Connection::new(b, Connection::default_max());
        sys::send_all(a.as_fd(), &[&(-5i32).to_be_bytes()], &[]).unwrap();
        let e = b.recv_bytes_timeout(T).unwrap_err();
        assert!(matches!(e, ConnectionError::Malformed(_)), "{e}");
    }

    #[test]
    fn an_oversize_send_is_refused_and_the_connection_stays_usable() {
        let (a, b) = pair();
        let a = a.with_max_message_size(4);
        let e = a.send_bytes(b"12345").unwrap_err();
        assert!(e.is_too_large(), "{e}");
        a.send_bytes(b"1234").unwrap();
        assert_eq!(b.recv_bytes_timeout(T).unwrap(), b"1234");
    }

    #[test]
    fn values_with_descriptors_are_refused() {
        let (a, _b) = pair();
        let (p, _q) = crate::channel::Pipe::new().unwrap();
        let e = a.send(&("x", p)).unwrap_err();
        assert!(
            matches!(e, ConnectionError::CarriesDescriptors { count: 1, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("Connection)"), "{e}");
    }

    #[test]
    fn threads_share_a_connection_a_whole_message_each() {
        use std::sync::Arc;
        let (a, b) = pair();
        let a = Arc::new(a);
        // Two threads send on the same end at once; messages of up to 200 KB each.
        let senders: Vec<_> = (0..2u8)
            .map(|t| {
                let a = Arc::clone(&a);
                std::thread::spawn(move || {
                    for i in 0..50usize {
                        let len = 1 + (i * 4099 + usize::from(t) * 70_001) % 200_000;
                        a.send_bytes_timeout(&vec![t; len], T).unwrap();
                    }
                })
            })
            .collect();
        // A third receives on it meanwhile.
        let receiver = {
            let a = Arc::clone(&a);
            std::thread::spawn(move || {
                (0..100)
                    .map(|_| a.recv_timeout::<u32>(T).unwrap())
                    .sum::<u32>()
            })
        };
        let mut counts = [0; 2];
        for n in 0..100u32 {
            let m = b.recv_bytes_timeout(T).unwrap();
            // Whole: one sender's bytes only.
            assert!(m.iter().all(|&x| x == m[0]), "message {n} is mixed");
            counts[usize::from(m[0])] += 1;
            b.send_timeout(&n, T).unwrap();
        }
        assert_eq!(counts, [50, 50]);
        for s in senders {
            s.join().unwrap();
        }
        assert_eq!(receiver.join().unwrap(), (0..100).sum::<u32>());
    }

    #[test]
    fn send_timeouts_keep_the_stream_in_step() {
        let (a, b) = pair();
        // Nobody reads: a message larger than the socket's buffer goes out in part.
        let big = vec![7u8; 16 << 20];
        let e = a
            .send_bytes_timeout(&big, Duration::from_millis(20))
            .unwrap_err();
        assert!(e.is_timeout(), "{e}");
        // The stream is out of step: later sends say so instead of sending garbage.
        let e = a.send_bytes(b"x").unwrap_err();
        assert!(matches!(e, ConnectionError::Broken(_)), "{e}");
        assert!(e.to_string().contains("part-way"), "{e}");
        // Receiving still works.
        b.send_bytes(b"back").unwrap();
        assert_eq!(a.recv_bytes_timeout(T).unwrap(), b"back");
        // A send that times out before any byte went out leaves the connection usable: a
        // 5-byte message goes into a Unix socket whole or not at all.
        let (a, b) = pair();
        let mut whole = 0;
        let e = loop {
            match a.send_bytes_timeout(b"x", Duration::from_millis(20)) {
                Ok(()) => whole += 1,
                Err(e) => break e,
            }
        };
        assert!(e.is_timeout(), "{e}");
        for _ in 0..whole {
            assert_eq!(b.recv_bytes_timeout(T).unwrap(), b"x");
        }
        a.send_bytes_timeout(b"after", T).unwrap();
        assert_eq!(b.recv_bytes_timeout(T).unwrap(), b"after");
    }
}
