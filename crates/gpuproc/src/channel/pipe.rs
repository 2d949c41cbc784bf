//! `Pipe` and `Connection`: Python's `multiprocessing.Pipe`.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::wire::{self, Wait};
use super::{ChannelError, FdRef, SharedBytes, DEFAULT_MAX_MESSAGE_SIZE};
use crate::sys::seqpacket::{self as sp, MapCache};

/// Creates connected pairs of [`Connection`]s; Python's `multiprocessing.Pipe()`.
///
/// ```
/// # gpuproc::init();
/// fn child(conn: gpuproc::channel::Connection) {
///     conn.send(&(42, None::<i32>, "hello")).unwrap();
/// }
///
/// let (parent_conn, child_conn) = gpuproc::channel::Pipe::new()?;
/// let mut p = gpuproc::Process::new(child, child_conn);
/// p.start()?;
/// let got: (i32, Option<i32>, String) = parent_conn.recv()?;
/// assert_eq!(got, (42, None, "hello".to_string()));
/// p.join()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
#[doc(alias = "multiprocessing.Pipe")]
pub enum Pipe {}

impl Pipe {
    /// A duplex pipe: both ends send and receive; Python's `Pipe()` (`duplex=True`).
    // Python's `Pipe()` returns the two ends; `new` reads as Python users expect.
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> Result<(Connection, Connection), ChannelError> {
        let (a, b) = sp::socketpair().map_err(ChannelError::io("creating a socket pair"))?;
        Ok((
            Connection::new(a, true, true),
            Connection::new(b, true, true),
        ))
    }

    /// A one-way pipe: `(receiver, sender)`; Python's `Pipe(duplex=False)`.
    pub fn simplex() -> Result<(Connection, Connection), ChannelError> {
        let (a, b) = sp::socketpair().map_err(ChannelError::io("creating a socket pair"))?;
        Ok((
            Connection::new(a, true, false),
            Connection::new(b, false, true),
        ))
    }
}

/// One end of a [`Pipe`]; Python's `multiprocessing.connection.Connection`.
///
/// Messages are any serde values (postcard-encoded), sent with [`send`](Self::send) and
/// received with [`recv`](Self::recv) as the type the receiver names; like Python's
/// connections, one connection can carry values of different types in turn, and a value of
/// the wrong type is a [`ChannelError::Decode`] error, not undefined behaviour. Payloads
/// over 64 KiB travel through shared memory (a sealed memfd). Handles such as another
/// `Connection` or a [`Queue`](super::Queue) can be sent inside messages.
///
/// A `Connection` can be passed to a child as (part of) the argument of
/// [`Process::new`](crate::Process::new), with every start method; the child gets its own
/// descriptor for the same end.
///
/// # Dropping
/// Dropping (or [`close`](Self::close)) closes this process's descriptor. The other end
/// sees [`ChannelError::Disconnected`] once every process holding this end has closed it;
/// so, as in Python, a parent that passed an end to a child should drop its own copy.
/// Messages still in flight towards a closed end are lost, and their sender gets
/// `Disconnected`.
#[derive(Debug)]
#[doc(alias = "multiprocessing.connection.Connection")]
pub struct Connection {
    fd: OwnedFd,
    readable: bool,
    writable: bool,
    max_message_size: usize,
    /// This end's mappings of the reused memfds that large messages come in.
    maps: MapCache,
}

impl Connection {
    fn new(fd: OwnedFd, readable: bool, writable: bool) -> Self {
        Connection {
            fd,
            readable,
            writable,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            maps: MapCache::default(),
        }
    }

    /// Sets the largest message this handle sends or accepts (default 4 GiB). A larger one
    /// is a [`ChannelError::TooLarge`] error; the connection stays usable.
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// The largest message this handle sends or accepts.
    pub fn max_message_size(&self) -> usize {
        self.max_message_size
    }

    /// Whether this end can receive; Python's `conn.readable`.
    pub fn readable(&self) -> bool {
        self.readable
    }

    /// Whether this end can send; Python's `conn.writable`.
    pub fn writable(&self) -> bool {
        self.writable
    }

    fn check_send(&self) -> Result<(), ChannelError> {
        if self.writable {
            Ok(())
        } else {
            Err(ChannelError::Unsupported(
                "this is the receiving end of a one-way pipe: it cannot send",
            ))
        }
    }

    fn check_recv(&self) -> Result<(), ChannelError> {
        if self.readable {
            Ok(())
        } else {
            Err(ChannelError::Unsupported(
                "this is the sending end of a one-way pipe: it cannot receive",
            ))
        }
    }

    /// Sends a value, waiting while the pipe is full; Python's `conn.send(obj)`.
    ///
    /// The value is borrowed, so after a failed send the caller still has it.
    pub fn send<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), ChannelError> {
        self.check_send()?;
        wire::send_value(
            self.fd.as_fd(),
            value,
            self.max_message_size,
            Wait::Forever,
            None,
        )
    }

    /// [`send`](Self::send), waiting at most `timeout` for room in the pipe.
    pub fn send_timeout<T: Serialize + ?Sized>(
        &self,
        value: &T,
        timeout: Duration,
    ) -> Result<(), ChannelError> {
        self.check_send()?;
        wire::send_value(
            self.fd.as_fd(),
            value,
            self.max_message_size,
            Wait::For(timeout),
            None,
        )
    }

    /// Sends raw bytes, not encoded; Python's `conn.send_bytes(buf)`.
    pub fn send_bytes(&self, bytes: &[u8]) -> Result<(), ChannelError> {
        self.check_send()?;
        wire::send_raw(
            self.fd.as_fd(),
            bytes,
            self.max_message_size,
            Wait::Forever,
            None,
        )
    }

    /// [`send_bytes`](Self::send_bytes), waiting at most `timeout` for room in the pipe.
    pub fn send_bytes_timeout(&self, bytes: &[u8], timeout: Duration) -> Result<(), ChannelError> {
        self.check_send()?;
        wire::send_raw(
            self.fd.as_fd(),
            bytes,
            self.max_message_size,
            Wait::For(timeout),
            None,
        )
    }

    /// Receives one message and hands its payload (and descriptors) to `f`.
    fn recv_as<R>(
        &self,
        wait: Wait,
        f: impl FnOnce(&[u8], Vec<OwnedFd>) -> Result<R, ChannelError>,
    ) -> Result<R, ChannelError> {
        self.check_recv()?;
        wire::recv_with(
            self.fd.as_fd(),
            &self.maps,
            self.max_message_size,
            wait,
            || {},
            f,
        )
    }

    fn recv_wait<T: DeserializeOwned>(&self, wait: Wait) -> Result<T, ChannelError> {
        self.recv_as(wait, wire::decode)
    }

    /// Receives the next value as a `T`, waiting for it; Python's `conn.recv()`.
    ///
    /// [`ChannelError::Disconnected`] once the other end is closed and nothing is left.
    /// While it waits it first polls briefly, then sleeps (see
    /// [`set_max_spin`](super::set_max_spin)).
    pub fn recv<T: DeserializeOwned>(&self) -> Result<T, ChannelError> {
        self.recv_wait(Wait::Forever)
    }

    /// The next value if one is waiting, else [`ChannelError::Empty`].
    pub fn try_recv<T: DeserializeOwned>(&self) -> Result<T, ChannelError> {
        self.recv_wait(Wait::Never)
    }

    /// [`recv`](Self::recv), waiting at most `timeout` ([`ChannelError::Timeout`]).
    pub fn recv_timeout<T: DeserializeOwned>(&self, timeout: Duration) -> Result<T, ChannelError> {
        self.recv_wait(Wait::For(timeout))
    }

    fn recv_bytes_wait(&self, wait: Wait) -> Result<Vec<u8>, ChannelError> {
        self.recv_as(wait, |payload, _fds| Ok(super::copy_to_vec(payload)))
    }

    /// Receives the next message's bytes as they are; Python's `conn.recv_bytes()`.
    pub fn recv_bytes(&self) -> Result<Vec<u8>, ChannelError> {
        self.recv_bytes_wait(Wait::Forever)
    }

    /// [`recv_bytes`](Self::recv_bytes), waiting at most `timeout`.
    pub fn recv_bytes_timeout(&self, timeout: Duration) -> Result<Vec<u8>, ChannelError> {
        self.recv_bytes_wait(Wait::For(timeout))
    }

    fn recv_bytes_shared_wait(&self, wait: Wait) -> Result<SharedBytes, ChannelError> {
        self.check_recv()?;
        wire::recv_shared(
            self.fd.as_fd(),
            &self.maps,
            self.max_message_size,
            wait,
            || {},
            |payload, _fds| Ok((0, payload.len())),
        )
    }

    /// Receives the next message's bytes as they are, like [`recv_bytes`](Self::recv_bytes),
    /// but reads a large one (over 64 KiB) in place in the sender's shared memory instead
    /// of copying it out. The sender reuses that memory only once the [`SharedBytes`] is
    /// dropped (see there).
    pub fn recv_bytes_shared(&self) -> Result<SharedBytes, ChannelError> {
        self.recv_bytes_shared_wait(Wait::Forever)
    }

    /// [`recv_bytes_shared`](Self::recv_bytes_shared), waiting at most `timeout`.
    pub fn recv_bytes_shared_timeout(
        &self,
        timeout: Duration,
    ) -> Result<SharedBytes, ChannelError> {
        self.recv_bytes_shared_wait(Wait::For(timeout))
    }

    /// Receives the next message's bytes into `buf`, from `offset` on, and returns its
    /// length; Python's `conn.recv_bytes_into(buf, offset)`.
    ///
    /// A message longer than the room after `offset` is a [`ChannelError::BufferTooShort`]
    /// error that carries the whole message and its size (Python's `BufferTooShort`, whose
    /// argument is the message); the message is consumed either way. An `offset` past the
    /// end of `buf` is a [`ChannelError::InvalidArgument`] error, and nothing is received.
    ///
    /// ```
    /// use gpuproc::channel::Pipe;
    /// let (a, b) = Pipe::new()?;
    /// b.send_bytes(b"hello")?;
    /// let mut buf = [0u8; 8];
    /// assert_eq!(a.recv_bytes_into(&mut buf, 2)?, 5);
    /// assert_eq!(&buf, b"\0\0hello\0");
    /// b.send_bytes(b"too long for it")?;
    /// let e = a.recv_bytes_into(&mut buf, 0).unwrap_err();
    /// assert_eq!(e.too_short_message(), Some(&b"too long for it"[..]));
    /// # Ok::<(), gpuproc::ChannelError>(())
    /// ```
    pub fn recv_bytes_into(&self, buf: &mut [u8], offset: usize) -> Result<usize, ChannelError> {
        self.recv_bytes_into_wait(buf, offset, Wait::Forever)
    }

    /// [`recv_bytes_into`](Self::recv_bytes_into), waiting at most `timeout`.
    pub fn recv_bytes_into_timeout(
        &self,
        buf: &mut [u8],
        offset: usize,
        timeout: Duration,
    ) -> Result<usize, ChannelError> {
        self.recv_bytes_into_wait(buf, offset, Wait::For(timeout))
    }

    fn recv_bytes_into_wait(
        &self,
        buf: &mut [u8],
        offset: usize,
        wait: Wait,
    ) -> Result<usize, ChannelError> {
        let Some(room) = buf.get_mut(offset..) else {
            return Err(ChannelError::InvalidArgument(format!(
                "offset {offset} is past the end of a buffer of {} bytes",
                buf.len()
            )));
        };
        self.recv_as(wait, |payload, _fds| {
            let size = payload.len();
            match room.get_mut(..size) {
                Some(to) => {
                    to.copy_from_slice(payload);
                    Ok(size)
                }
                None => Err(ChannelError::BufferTooShort {
                    size,
                    room: room.len(),
                    message: super::copy_to_vec(payload),
                }),
            }
        })
    }

    /// Whether a message (or the other end's closing) is waiting, after waiting at most
    /// `timeout`; Python's `conn.poll(timeout)`.
    ///
    /// The sending end of a one-way pipe cannot receive: polling it is a
    /// [`ChannelError::Unsupported`] error, as Python's `poll` on a write-only connection
    /// raises `OSError`.
    pub fn poll(&self, timeout: Duration) -> Result<bool, ChannelError> {
        self.check_recv()?;
        crate::sys::wait_ready(self.fd.as_fd(), false, crate::time::deadline(timeout))
            .map_err(ChannelError::io("polling a connection"))
    }

    /// Closes this end; Python's `conn.close()`. The same as dropping it.
    pub fn close(self) {}
}

/// Ready when a message (or the other end's closing) is waiting. The sending end of a
/// one-way pipe is ready only once the receiving end is closed everywhere.
impl crate::connection::Waitable for Connection {
    fn wait_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Python's `conn.fileno()`.
impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[derive(Serialize)]
struct ConnectionOut<'a> {
    fd: FdRef<'a>,
    readable: bool,
    writable: bool,
    max_message_size: u64,
}

#[derive(Deserialize)]
struct ConnectionIn {
    #[serde(deserialize_with = "crate::ipc::deserialize_fd")]
    fd: OwnedFd,
    readable: bool,
    writable: bool,
    max_message_size: u64,
}

/// A connection serialises as a duplicate of its descriptor: it can be sent to a child
/// process (or over another connection) inside a gpuproc message, and only there.
impl Serialize for Connection {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ConnectionOut {
            fd: FdRef(self.fd.as_fd()),
            readable: self.readable,
            writable: self.writable,
            max_message_size: self.max_message_size as u64,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Connection {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let c = ConnectionIn::deserialize(d)?;
        Ok(Connection {
            fd: c.fd,
            readable: c.readable,
            writable: c.writable,
            max_message_size: usize::try_from(c.max_message_size).unwrap_or(usize::MAX),
            maps: MapCache::default(),
        })
    }
}
