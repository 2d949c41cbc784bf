//! The one error type of pipes and queues, and the wrapper that hands a value back when a
//! send fails.

use std::fmt;
use std::io;
use std::time::Duration;

/// Why a pipe or queue operation failed.
///
/// The `is_*` predicates name the cases callers branch on; Python users find them as
/// `EOFError` ([`is_disconnected`](Self::is_disconnected)), `queue.Empty`
/// ([`is_empty`](Self::is_empty)), `queue.Full` ([`is_full`](Self::is_full)) and
/// `TimeoutError` ([`is_timeout`](Self::is_timeout)).
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// The other end is closed: every process holding it dropped or closed it (or died).
    #[error("the other end of the pipe is closed")]
    Disconnected,
    /// A `_timeout` call waited this long and nothing happened.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// A `try_` receive found nothing waiting.
    #[error("nothing to receive: the queue or pipe is empty")]
    Empty,
    /// A `try_` put found a bounded queue full.
    #[error("the queue is full (maxsize {maxsize})")]
    Full {
        /// The queue's bound.
        maxsize: usize,
    },
    /// A message is larger than the handle's `max_message_size`. The channel stays usable;
    /// on the receiving side the message was discarded.
    #[error("a message of {size} bytes is larger than max_message_size ({limit} bytes)")]
    TooLarge {
        /// The message's encoded size.
        size: usize,
        /// The limit it broke.
        limit: usize,
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
    /// Bytes on the wire that no gpuproc sender produces (it was consumed).
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The call does not apply to this handle (sending on the read end of a one-way pipe,
    /// say).
    #[error("{0}")]
    Unsupported(&'static str),
    /// An argument is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The queue was shut down ([`Queue::shutdown`](super::Queue::shutdown)): a put after
    /// it, or a get once nothing is left to take (at once after an immediate shutdown);
    /// Python's `queue.ShutDown`.
    #[error("the queue has been shut down")]
    ShutDown,
    /// A message did not fit in the buffer given to
    /// [`Connection::recv_bytes_into`](super::Connection::recv_bytes_into); the message
    /// was consumed and is here. Python's `multiprocessing.BufferTooShort`, whose argument
    /// is the message.
    #[error("a message of {size} bytes does not fit in the {room} bytes of buffer given")]
    BufferTooShort {
        /// The message's length.
        size: usize,
        /// The room there was (the buffer's length past the offset).
        room: usize,
        /// The whole message.
        message: Vec<u8>,
    },
    /// `task_done` was called more times than items were put; Python's `ValueError`.
    #[error("task_done() called more times than there were items put in the queue")]
    TaskDoneTooOften,
    /// A system call failed.
    #[error("{context}")]
    Io {
        /// What gpuproc was doing.
        context: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

impl ChannelError {
    /// The other end is closed (Python's `EOFError` / `BrokenPipeError`).
    pub fn is_disconnected(&self) -> bool {
        matches!(self, ChannelError::Disconnected)
    }

    /// A timeout expired.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ChannelError::Timeout(_))
    }

    /// A `try_` receive found nothing (Python's `queue.Empty`).
    pub fn is_empty(&self) -> bool {
        matches!(self, ChannelError::Empty)
    }

    /// A `try_` put found the queue full (Python's `queue.Full`).
    pub fn is_full(&self) -> bool {
        matches!(self, ChannelError::Full { .. })
    }

    /// The message broke `max_message_size`.
    pub fn is_too_large(&self) -> bool {
        matches!(self, ChannelError::TooLarge { .. })
    }

    /// A message arrived that was malformed or not of the expected type.
    pub fn is_malformed(&self) -> bool {
        matches!(
            self,
            ChannelError::Malformed(_) | ChannelError::Decode { .. }
        )
    }

    /// The queue was shut down (Python's `queue.ShutDown`).
    pub fn is_shutdown(&self) -> bool {
        matches!(self, ChannelError::ShutDown)
    }

    /// The message did not fit the buffer (Python's `BufferTooShort`).
    pub fn is_buffer_too_short(&self) -> bool {
        matches!(self, ChannelError::BufferTooShort { .. })
    }

    /// The message that did not fit the buffer given to `recv_bytes_into` (Python's
    /// `e.args[0]` of `BufferTooShort`).
    pub fn too_short_message(&self) -> Option<&[u8]> {
        match self {
            ChannelError::BufferTooShort { message, .. } => Some(message),
            _ => None,
        }
    }

    pub(crate) fn io(context: &'static str) -> impl FnOnce(io::Error) -> ChannelError {
        move |source| ChannelError::Io { context, source }
    }
}

/// A failed send or put: the error, and the value that was not sent, handed back.
///
/// Converts into [`ChannelError`] with `?` when the value is not wanted.
pub struct SendError<T> {
    value: T,
    error: ChannelError,
}

impl<T> SendError<T> {
    pub(crate) fn new(value: T, error: ChannelError) -> Self {
        SendError { value, error }
    }

    /// The value that was not sent.
    pub fn into_inner(self) -> T {
        self.value
    }

    /// Why it was not sent.
    pub fn error(&self) -> &ChannelError {
        &self.error
    }

    /// Why it was not sent, dropping the value.
    pub fn into_error(self) -> ChannelError {
        self.error
    }

    /// See [`ChannelError::is_timeout`].
    pub fn is_timeout(&self) -> bool {
        self.error.is_timeout()
    }

    /// See [`ChannelError::is_full`].
    pub fn is_full(&self) -> bool {
        self.error.is_full()
    }

    /// See [`ChannelError::is_disconnected`].
    pub fn is_disconnected(&self) -> bool {
        self.error.is_disconnected()
    }

    /// See [`ChannelError::is_shutdown`].
    pub fn is_shutdown(&self) -> bool {
        self.error.is_shutdown()
    }

    /// See [`ChannelError::is_too_large`].
    pub fn is_too_large(&self) -> bool {
        self.error.is_too_large()
    }
}

/// Reads like `Display`, then the causes; the value is not shown.
impl<T> fmt::Debug for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::errors::write_chain(self, f)
    }
}

impl<T> fmt::Display for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not sent: {}", self.error)
    }
}

/// The message includes the [`ChannelError`]'s, so the source is that error's own source.
impl<T> std::error::Error for SendError<T> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}

impl<T> From<SendError<T>> for ChannelError {
    fn from(e: SendError<T>) -> Self {
        e.error
    }
}
