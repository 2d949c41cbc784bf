//! What travels between proxies and their manager: requests, answers, where a manager
//! listens, and the framed link that carries them after the authenticated handshake.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::ManagerError;
use crate::channel::spin;
use crate::connection::{Address, Client, ConnectionError};
use crate::ipc::{self, FrameReader, Read};
use crate::shm::Item;

/// How long making a connection to a manager (with its handshake) may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Request {
    NewList,
    Append {
        list: u64,
        value: Vec<u8>,
    },
    ListGet {
        list: u64,
        index: u64,
    },
    ListSet {
        list: u64,
        index: u64,
        value: Vec<u8>,
    },
    Pop {
        list: u64,
    },
    ListLen {
        list: u64,
    },
    ListAll {
        list: u64,
    },
    NewDict,
    Get {
        dict: u64,
        key: Vec<u8>,
    },
    Set {
        dict: u64,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Del {
        dict: u64,
        key: Vec<u8>,
    },
    Len {
        dict: u64,
    },
    Items {
        dict: u64,
    },
    Clear {
        dict: u64,
    },
    /// The dict's table, to use in place (its memfd comes with the answer).
    DictTable {
        dict: u64,
    },
    /// A queue holding at most `maxsize` items (0: no limit).
    NewQueue {
        maxsize: u64,
    },
    /// Waits up to `timeout` (`None`: for ever) for room.
    Put {
        queue: u64,
        item: Vec<u8>,
        timeout: Option<Duration>,
    },
    /// Waits up to `timeout` (`None`: for ever) for an item.
    Take {
        queue: u64,
        timeout: Option<Duration>,
    },
    QueueLen {
        queue: u64,
    },
    NewLock,
    /// Waits up to `timeout` for the lock; it is then held by this connection.
    Acquire {
        lock: u64,
        timeout: Option<Duration>,
    },
    Release {
        lock: u64,
    },
    Locked {
        lock: u64,
    },
    NewEvent,
    SetEvent {
        event: u64,
        set: bool,
    },
    IsSet {
        event: u64,
    },
    WaitEvent {
        event: u64,
        timeout: Option<Duration>,
    },
    /// An instance of a registered type, made from its encoded arguments.
    NewObject {
        typeid: String,
        args: Vec<u8>,
    },
    /// A method call on an instance of a registered type.
    CallObject {
        object: u64,
        call: Vec<u8>,
    },
    /// Makes object `id` (of proxy type `kind`) known under `name`.
    Publish {
        name: String,
        id: u64,
        kind: String,
    },
    /// The object published under `name`.
    Lookup {
        name: String,
    },
    /// A named shared memory block of `size` bytes, owned by the manager.
    NewBlock {
        size: u64,
    },
    /// A `ShareableList` of these items, owned by the manager.
    NewShareableList {
        items: Vec<Item>,
        capacity: u64,
    },
    /// Unlinks every block the manager made (before it stops).
    UnlinkAll,
    /// Checks that the manager answers.
    Ping,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Reply {
    Done,
    Id(u64),
    Value(Option<Vec<u8>>),
    Len(u64),
    Items(Vec<(Vec<u8>, Vec<u8>)>),
    Values(Vec<Vec<u8>>),
    Refused(String),
    /// Whether a wait succeeded (an acquire, an event wait) or a flag's state.
    Flag(bool),
    /// A queue stayed empty for the whole timeout.
    Empty,
    /// A queue stayed full for the whole timeout.
    Full,
    /// A published object: its id and proxy type.
    Found(u64, String),
    /// The name of a block the manager made.
    Name(String),
    /// Dict `id`'s table: its memfd comes with this answer.
    Table(u64),
}

/// Where a manager listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Where {
    Abstract(Vec<u8>),
    Unix(PathBuf),
    Tcp(String, u16),
}

impl Where {
    pub fn address(&self) -> Address {
        match self {
            Where::Abstract(n) => Address::abstract_name(n.clone()),
            Where::Unix(p) => Address::unix(p.clone()),
            Where::Tcp(h, p) => Address::tcp(h.clone(), *p),
        }
    }

    pub fn from_address(a: &Address) -> Where {
        match a {
            Address::Abstract(n) => Where::Abstract(n.clone()),
            Address::Unix(p) => Where::Unix(p.clone()),
            Address::Tcp { host, port } => Where::Tcp(host.clone(), *port),
        }
    }
}

/// Where a manager listens, and its key.
#[derive(Clone, Serialize, Deserialize)]
pub(super) struct Endpoint {
    pub at: Where,
    pub authkey: Vec<u8>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("address", &self.at.address().to_string())
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    pub fn connect(&self) -> Result<Link, ManagerError> {
        let conn = Client::builder(self.at.address())
            .authkey(&self.authkey)
            .timeout(CONNECT_TIMEOUT)
            .connect()
            .map_err(connect_error)?;
        Ok(Link {
            sock: conn.into_fd(),
            reader: FrameReader::default(),
        })
    }
}

fn connect_error(e: ConnectionError) -> ManagerError {
    if e.is_authentication() {
        ManagerError::Authentication {
            reason: e.to_string(),
        }
    } else {
        lost(e)
    }
}

pub(super) fn lost(e: impl std::fmt::Display) -> ManagerError {
    ManagerError::Lost {
        reason: e.to_string(),
    }
}

/// One side of an authenticated connection, carrying gpuproc frames.
pub(super) struct Link {
    pub sock: OwnedFd,
    pub reader: FrameReader,
}

impl Link {
    pub fn send<T: Serialize>(&self, value: &T) -> Result<(), ManagerError> {
        self.send_with(value, &[])
    }

    /// Sends `value` with descriptors (over Unix sockets only).
    pub fn send_with<T: Serialize>(
        &self,
        value: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ManagerError> {
        let bytes = encode("request", value)?;
        ipc::send_frame_borrowed(self.sock.as_fd(), &bytes, fds).map_err(lost)
    }

    /// The next message, waiting until `deadline` (`None`: for ever); polls for up to the
    /// thread's spin budget before sleeping (see `channel::spin`).
    pub fn recv<T: DeserializeOwned>(
        &mut self,
        deadline: Option<Instant>,
        timeout: Duration,
    ) -> Result<T, ManagerError> {
        let frame = self.recv_frame(deadline, timeout)?;
        decode("message", &frame.bytes)
    }

    /// [`recv`](Self::recv), with the descriptors that came with the message.
    pub fn recv_with_fds<T: DeserializeOwned>(
        &mut self,
        deadline: Option<Instant>,
        timeout: Duration,
    ) -> Result<(T, Vec<OwnedFd>), ManagerError> {
        let frame = self.recv_frame(deadline, timeout)?;
        Ok((decode("message", &frame.bytes)?, frame.fds))
    }

    fn recv_frame(
        &mut self,
        deadline: Option<Instant>,
        timeout: Duration,
    ) -> Result<ipc::Frame, ManagerError> {
        let start = Instant::now();
        let budget = spin::budget();
        let frame = loop {
            if let Some(f) = self.reader.next_frame().map_err(lost)? {
                break f;
            }
            if self.reader.at_eof() {
                return Err(lost("the manager closed the connection"));
            }
            if start.elapsed() >= budget {
                match self
                    .reader
                    .read(self.sock.as_fd(), deadline)
                    .map_err(lost)?
                {
                    Read::Frame(f) => break f,
                    Read::Eof => return Err(lost("the manager closed the connection")),
                    Read::TimedOut => return Err(ManagerError::Timeout { waited: timeout }),
                }
            }
            self.reader.fill(self.sock.as_fd()).map_err(lost)?;
        };
        spin::record(start.elapsed());
        Ok(frame)
    }

    /// Whether the manager closed this connection (it never sends unasked, so anything to
    /// read means it is gone). Does not wait.
    pub fn closed(&self) -> bool {
        crate::sys::wait_ready(self.sock.as_fd(), false, Some(Instant::now())).unwrap_or(true)
    }
}

pub(super) fn encode<T: Serialize + ?Sized>(
    what: &'static str,
    v: &T,
) -> Result<Vec<u8>, ManagerError> {
    crate::codec::to_vec(v).map_err(|e| ManagerError::Codec {
        what,
        action: "encoded",
        reason: e.to_string(),
    })
}

pub(super) fn decode<T: DeserializeOwned>(what: &'static str, b: &[u8]) -> Result<T, ManagerError> {
    crate::codec::from_bytes(b).map_err(|e| ManagerError::Codec {
        what,
        action: "decoded",
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn where_round_trips_through_address() {
        for w in [
            Where::Abstract(b"m".to_vec()),
            Where::Unix("/tmp/m.sock".into()),
            Where::Tcp("127.0.0.1".into(), 5000),
        ] {
            assert_eq!(Where::from_address(&w.address()), w);
        }
    }
}
