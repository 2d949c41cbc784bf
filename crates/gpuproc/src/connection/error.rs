//! The one error type of listeners, clients and their connections.

use std::io;
use std::time::Duration;

/// Why a [`Listener`](super::Listener), [`Client`](super::Client) or socket
/// [`Connection`](super::Connection) call failed.
///
/// Python users find the cases they branch on as `AuthenticationError`
/// ([`is_authentication`](Self::is_authentication)), `EOFError`
/// ([`is_disconnected`](Self::is_disconnected)) and `TimeoutError`
/// ([`is_timeout`](Self::is_timeout)).
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionError {
    /// The handshake failed: a wrong authkey on either side, a peer that does not speak the
    /// protocol, or one that sent more than the handshake allows. Python's
    /// `multiprocessing.AuthenticationError`. The connection was closed; a listener stays
    /// open and its next [`accept`](super::Listener::accept) works.
    #[error("authentication failed: {0}")]
    Authentication(String),
    /// The other end closed the connection (Python's `EOFError`, or `BrokenPipeError` on a
    /// send).
    #[error("the other end of the connection is closed")]
    Disconnected,
    /// A call with a timeout waited this long: no client came to `accept_timeout`, no
    /// message to `recv_timeout`, no connection in time. (A peer that runs out of time in
    /// the handshake is an [`Authentication`](Self::Authentication) error, see
    /// [`handshake_timeout`](super::ListenerBuilder::handshake_timeout).)
    #[error("timed out after {after:?} waiting for {waiting_for}")]
    Timeout {
        /// What did not happen in time.
        waiting_for: &'static str,
        /// How long it was waited for.
        after: Duration,
    },
    /// A `try_` receive found no whole message waiting.
    #[error("nothing to receive: no whole message has arrived")]
    Empty,
    /// A message is larger than the connection's `max_message_size` (on the receiving side,
    /// announced larger: nothing of it was read or allocated). A refused send leaves the
    /// connection usable; after a refused receive it cannot receive any more, as in Python
    /// (the rest of the message is still in the stream).
    #[error("a message of {size} bytes is larger than max_message_size ({limit} bytes)")]
    TooLarge {
        /// The message's size.
        size: u64,
        /// The limit it broke.
        limit: usize,
    },
    /// The value holds file descriptors (a pipe, queue, lock, shared memory or another
    /// gpuproc handle): those cross only between processes of one machine, inside gpuproc's
    /// own messages, never over a socket connection.
    #[error(
        "cannot send a {type_name} over a socket connection: it holds {count} file \
         descriptor(s) (a pipe, queue, lock, shared memory or other gpuproc handle), which \
         can only be passed between processes of one machine, not through a socket stream"
    )]
    CarriesDescriptors {
        /// The type of the value that was sent.
        type_name: &'static str,
        /// How many descriptors it holds.
        count: usize,
    },
    /// The value could not be serialised.
    #[error("cannot encode the message: {0}")]
    Encode(String),
    /// A message arrived but does not decode as the type asked for (it was consumed).
    #[error("cannot decode the message as {type_name}: {reason}")]
    Decode {
        /// The Rust type the receiver asked for.
        type_name: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// Bytes on the wire that no sender of this protocol produces; the connection cannot
    /// receive any more.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The connection cannot be used in this direction any more, for the reason given (an
    /// earlier send that timed out part-way, say).
    #[error("the connection cannot be used: {0}")]
    Broken(&'static str),
    /// The address cannot be used as given.
    #[error("invalid address {address:?}: {reason}")]
    InvalidAddress {
        /// The address, as given.
        address: String,
        /// Why it is not valid.
        reason: String,
    },
    /// A TCP listener or client was given no authkey (or an empty one). Unlike Python, which
    /// falls back to the process's `current_process().authkey`, gpuproc refuses: a TCP port
    /// can be reached by anybody on the network.
    #[error(
        "a TCP {side} needs an authkey (at {address}): without one, anybody who can reach \
         the port could connect; pass a secret of at least one byte"
    )]
    AuthkeyRequired {
        /// `"listener"` or `"client"`.
        side: &'static str,
        /// The address.
        address: String,
    },
    /// A message did not fit in the buffer given to
    /// [`Connection::recv_bytes_into`](super::Connection::recv_bytes_into); it was
    /// consumed and is here. Python's `multiprocessing.BufferTooShort`, whose argument is
    /// the message.
    #[error("a message of {size} bytes does not fit in the {room} bytes of buffer given")]
    BufferTooShort {
        /// The message's length.
        size: usize,
        /// The room there was (the buffer's length past the offset).
        room: usize,
        /// The whole message.
        message: Vec<u8>,
    },
    /// An argument is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A system call failed.
    #[error("{context}")]
    Io {
        /// What gpuproc was doing.
        context: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

impl ConnectionError {
    /// The handshake failed (Python's `AuthenticationError`).
    pub fn is_authentication(&self) -> bool {
        matches!(self, ConnectionError::Authentication(_))
    }

    /// The other end is closed (Python's `EOFError` / `BrokenPipeError`).
    pub fn is_disconnected(&self) -> bool {
        matches!(self, ConnectionError::Disconnected)
    }

    /// A timeout expired.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ConnectionError::Timeout { .. })
    }

    /// A `try_` receive found nothing.
    pub fn is_empty(&self) -> bool {
        matches!(self, ConnectionError::Empty)
    }

    /// The message broke `max_message_size`.
    pub fn is_too_large(&self) -> bool {
        matches!(self, ConnectionError::TooLarge { .. })
    }

    /// The message did not fit the buffer (Python's `BufferTooShort`).
    pub fn is_buffer_too_short(&self) -> bool {
        matches!(self, ConnectionError::BufferTooShort { .. })
    }

    /// The message that did not fit the buffer given to `recv_bytes_into` (Python's
    /// `e.args[0]` of `BufferTooShort`).
    pub fn too_short_message(&self) -> Option<&[u8]> {
        match self {
            ConnectionError::BufferTooShort { message, .. } => Some(message),
            _ => None,
        }
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> ConnectionError {
        let context = context.into();
        move |source| ConnectionError::Io { context, source }
    }
}
