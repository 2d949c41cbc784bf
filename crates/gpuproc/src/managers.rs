//! Managers: Python's `multiprocessing.Manager()`, a process that owns shared containers
//! and serves them to other processes through proxies. Here: shared dicts
//! ([`ManagedDict`]).
//!
//! The manager is a gpuproc [`Process`] listening on an abstract Unix socket with a random
//! name; proxies connect to it through [`connection`](crate::connection)'s authenticated
//! connections (Python's HMAC handshake, with a random 32-byte key), so the same transport
//! can serve remote clients once the manager listens on TCP. After the handshake, requests
//! and answers go as gpuproc's own frames on the same socket (one `sendmsg` each way; a
//! proxy waiting for an answer polls briefly before it sleeps, as channels do). Every
//! request is one message and its answer; a proxy keeps one connection per process
//! (reconnecting in a forked child), and a proxy sent to another process (as a task's
//! argument, a `Process`'s argument, through a queue) connects there on first use.
//!
//! Differences from Python: only dicts for now (no `list`, `Namespace`, `Queue`, `Lock`,
//! `Event`, `Value` proxies); keys and values are any serde types (without descriptors),
//! each dict typed by its proxy; an operation on a dict whose manager is gone (shut down,
//! killed) fails with [`ManagerError::Lost`] at once, and one the manager does not answer
//! within the proxy's timeout (default 60 s, for a stopped manager) with
//! [`ManagerError::Timeout`].
//!
//! Anyone on this machine can connect to the abstract socket, but without the key the
//! handshake fails: only processes that were given a proxy (which carries the key) or the
//! [`Manager`] can use it.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use crate::channel::spin;
use crate::connection::{Address, Client, Listener};
use crate::ipc::{self, FrameReader, Read};
use crate::process::{Process, ProcessError};
use crate::Queue;

/// Why a manager or a proxy failed.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum ManagerError {
    /// The manager process could not be started.
    #[error("starting the manager failed: {reason}")]
    Start {
        /// What went wrong.
        reason: String,
    },
    /// The manager is gone (shut down, killed, or unreachable): nothing more can be done
    /// through this proxy.
    #[error("the manager is gone: {reason}")]
    Lost {
        /// What the connection said.
        reason: String,
    },
    /// The manager did not answer within the proxy's timeout.
    #[error("the manager did not answer within {waited:?}")]
    Timeout {
        /// The timeout.
        waited: Duration,
    },
    /// A key or value could not be encoded or decoded as its type.
    #[error("a {what} could not be {action}: {reason}")]
    Codec {
        /// `key` or `value`.
        what: &'static str,
        /// `encoded` or `decoded`.
        action: &'static str,
        /// What the codec said.
        reason: String,
    },
    /// The manager refused the request (an unknown dict, say).
    #[error("the manager refused: {reason}")]
    Refused {
        /// Why.
        reason: String,
    },
}

impl ManagerError {
    /// Whether the manager is gone.
    pub fn is_lost(&self) -> bool {
        matches!(self, ManagerError::Lost { .. })
    }

    /// Whether the manager did not answer in time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ManagerError::Timeout { .. })
    }
}

fn lost(e: impl std::fmt::Display) -> ManagerError {
    ManagerError::Lost {
        reason: e.to_string(),
    }
}

#[derive(Debug, Serialize, Deserialize)]
enum Request {
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
}

#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Done,
    Id(u64),
    Value(Option<Vec<u8>>),
    Len(u64),
    Items(Vec<(Vec<u8>, Vec<u8>)>),
    Refused(String),
}

/// Where a manager listens, and its key.
#[derive(Clone, Serialize, Deserialize)]
struct Endpoint {
    name: Vec<u8>,
    authkey: Vec<u8>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("name", &String::from_utf8_lossy(&self.name))
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    fn address(&self) -> Address {
        Address::abstract_name(self.name.clone())
    }

    fn connect(&self) -> Result<Link, ManagerError> {
        let conn = Client::builder(self.address())
            .authkey(&self.authkey)
            .timeout(CONNECT_TIMEOUT)
            .connect()
            .map_err(lost)?;
        Ok(Link {
            sock: conn.into_fd(),
            reader: FrameReader::default(),
        })
    }
}

/// One side of an authenticated connection, carrying gpuproc frames.
struct Link {
    sock: OwnedFd,
    reader: FrameReader,
}

impl Link {
    fn send<T: Serialize>(&self, value: &T) -> Result<(), ManagerError> {
        let bytes = crate::codec::to_vec(value).map_err(|e| ManagerError::Codec {
            what: "request",
            action: "encoded",
            reason: e.to_string(),
        })?;
        ipc::send_frame(self.sock.as_fd(), &bytes, &[]).map_err(lost)
    }

    /// The next message, waiting until `deadline` (`None`: for ever); polls for up to the
    /// thread's spin budget before sleeping (see `channel::spin`).
    fn recv<T: DeserializeOwned>(
        &mut self,
        deadline: Option<Instant>,
        timeout: Duration,
    ) -> Result<T, ManagerError> {
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
        decode("message", &frame.bytes)
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a proxy waits for an answer by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

type Dicts = Arc<Mutex<HashMap<u64, HashMap<Vec<u8>, Vec<u8>>>>>;

fn answer(dicts: &Dicts, next_id: &Mutex<u64>, req: Request) -> Reply {
    let mut all = dicts.lock().unwrap_or_else(|p| p.into_inner());
    let unknown = |d: u64| Reply::Refused(format!("no dict {d}"));
    match req {
        Request::NewDict => {
            let mut next = next_id.lock().unwrap_or_else(|p| p.into_inner());
            *next += 1;
            all.insert(*next, HashMap::new());
            Reply::Id(*next)
        }
        Request::Get { dict, key } => match all.get(&dict) {
            Some(d) => Reply::Value(d.get(&key).cloned()),
            None => unknown(dict),
        },
        Request::Set { dict, key, value } => match all.get_mut(&dict) {
            Some(d) => {
                d.insert(key, value);
                Reply::Done
            }
            None => unknown(dict),
        },
        Request::Del { dict, key } => match all.get_mut(&dict) {
            Some(d) => Reply::Value(d.remove(&key)),
            None => unknown(dict),
        },
        Request::Len { dict } => match all.get(&dict) {
            Some(d) => Reply::Len(d.len() as u64),
            None => unknown(dict),
        },
        Request::Items { dict } => match all.get(&dict) {
            Some(d) => Reply::Items(d.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
            None => unknown(dict),
        },
        Request::Clear { dict } => match all.get_mut(&dict) {
            Some(d) => {
                d.clear();
                Reply::Done
            }
            None => unknown(dict),
        },
    }
}

/// The manager process: binds, says so, and serves each connection on a thread.
fn serve((endpoint, ready): (Endpoint, Queue<String>)) {
    let listener = match Listener::builder(endpoint.address())
        .authkey(&endpoint.authkey)
        .bind()
    {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.put(format!("binding: {e}"));
            return;
        }
    };
    if ready.put(String::new()).is_err() {
        return;
    }
    drop(ready);
    let dicts: Dicts = Default::default();
    let next_id = Arc::new(Mutex::new(0u64));
    loop {
        // A failed handshake (a stranger without the key) ends that connection only.
        let Ok(conn) = listener.accept() else {
            continue;
        };
        let (dicts, next_id) = (dicts.clone(), next_id.clone());
        let mut link = Link {
            sock: conn.into_fd(),
            reader: FrameReader::default(),
        };
        let _ = std::thread::Builder::new()
            .name("gpuproc-manager".into())
            .spawn(move || {
                while let Ok(req) = link.recv::<Request>(None, Duration::MAX) {
                    if link.send(&answer(&dicts, &next_id, req)).is_err() {
                        break;
                    }
                }
            });
    }
}

/// A manager process; Python's `multiprocessing.Manager()` (a started `SyncManager`).
///
/// Dropping it shuts the manager down, as leaving Python's `with Manager() as m:` does;
/// proxies then fail with [`ManagerError::Lost`].
///
/// ```
/// # gpuproc::init();
/// use gpuproc::managers::{ManagedDict, Manager};
///
/// fn record((d, i): (ManagedDict<u32, String>, u32)) {
///     d.set(&i, &format!("task {i}")).unwrap();
/// }
///
/// let manager = Manager::start()?;
/// let d: ManagedDict<u32, String> = manager.dict()?;
/// let pool = gpuproc::Pool::new(2)?;
/// pool.map(record, (0..4).map(|i| (d.clone(), i)))?;
/// assert_eq!(d.len()?, 4);
/// assert_eq!(d.get(&2)?.as_deref(), Some("task 2"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Manager {
    process: Option<Process<(Endpoint, Queue<String>), ()>>,
    endpoint: Endpoint,
}

impl Manager {
    /// Starts a manager process; Python's `Manager()` (or `SyncManager().start()`).
    pub fn start() -> Result<Manager, ManagerError> {
        let start_err = |e: &dyn std::fmt::Display| ManagerError::Start {
            reason: e.to_string(),
        };
        let mut authkey = vec![0u8; 32];
        getrandom::fill(&mut authkey).map_err(|e| start_err(&e))?;
        let mut tag = [0u8; 8];
        getrandom::fill(&mut tag).map_err(|e| start_err(&e))?;
        let endpoint = Endpoint {
            name: format!(
                "gpuproc-manager-{}-{:016x}",
                std::process::id(),
                u64::from_le_bytes(tag)
            )
            .into_bytes(),
            authkey,
        };
        let ready: Queue<String> = Queue::new().map_err(|e| start_err(&e))?;
        let mut process =
            Process::new(serve, (endpoint.clone(), ready.clone())).with_name("gpuproc-manager");
        process.start().map_err(|e: ProcessError| start_err(&e))?;
        match ready.get_timeout(START_TIMEOUT) {
            Ok(s) if s.is_empty() => {}
            Ok(reason) => {
                let _ = process.kill();
                let _ = process.join_timeout(START_TIMEOUT);
                return Err(ManagerError::Start { reason });
            }
            Err(e) => {
                let _ = process.kill();
                let _ = process.join_timeout(START_TIMEOUT);
                return Err(start_err(&e));
            }
        }
        Ok(Manager {
            process: Some(process),
            endpoint,
        })
    }

    /// A new, empty shared dict; Python's `manager.dict()`.
    pub fn dict<K, V>(&self) -> Result<ManagedDict<K, V>, ManagerError>
    where
        K: Serialize + DeserializeOwned,
        V: Serialize + DeserializeOwned,
    {
        let mut d = ManagedDict {
            endpoint: self.endpoint.clone(),
            id: 0,
            timeout: DEFAULT_TIMEOUT,
            conn: Mutex::new(None),
            _t: PhantomData,
        };
        match d.call(Request::NewDict)? {
            Reply::Id(id) => d.id = id,
            other => return Err(unexpected(other)),
        }
        Ok(d)
    }

    /// The manager process's pid.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(|p| p.pid())
    }

    /// Stops the manager process (its containers are gone; proxies fail with
    /// [`ManagerError::Lost`]); Python's `shutdown()`. Calling it again does nothing.
    pub fn shutdown(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.kill();
            let _ = p.join_timeout(START_TIMEOUT);
        }
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn unexpected(r: Reply) -> ManagerError {
    match r {
        Reply::Refused(reason) => ManagerError::Refused { reason },
        other => ManagerError::Refused {
            reason: format!("an unexpected answer: {other:?}"),
        },
    }
}

/// A proxy of a dict held by a [`Manager`]; Python's `DictProxy`. Cloning it, or sending
/// it to another process, gives another proxy of the same dict.
pub struct ManagedDict<K, V> {
    endpoint: Endpoint,
    id: u64,
    timeout: Duration,
    /// This process's connection (the pid that made it).
    conn: Mutex<Option<(u32, Link)>>,
    _t: PhantomData<fn(K, V)>,
}

impl<K, V> std::fmt::Debug for ManagedDict<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedDict")
            .field("manager", &self.endpoint)
            .field("id", &self.id)
            .finish()
    }
}

impl<K, V> Clone for ManagedDict<K, V> {
    fn clone(&self) -> Self {
        ManagedDict {
            endpoint: self.endpoint.clone(),
            id: self.id,
            timeout: self.timeout,
            conn: Mutex::new(None),
            _t: PhantomData,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct DictWire {
    endpoint: Endpoint,
    id: u64,
    timeout: Duration,
}

impl<K, V> Serialize for ManagedDict<K, V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        DictWire {
            endpoint: self.endpoint.clone(),
            id: self.id,
            timeout: self.timeout,
        }
        .serialize(s)
    }
}

impl<'de, K, V> Deserialize<'de> for ManagedDict<K, V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = DictWire::deserialize(d)?;
        Ok(ManagedDict {
            endpoint: w.endpoint,
            id: w.id,
            timeout: w.timeout,
            conn: Mutex::new(None),
            _t: PhantomData,
        })
    }
}

fn encode<T: Serialize + ?Sized>(what: &'static str, v: &T) -> Result<Vec<u8>, ManagerError> {
    crate::codec::to_vec(v).map_err(|e| ManagerError::Codec {
        what,
        action: "encoded",
        reason: e.to_string(),
    })
}

fn decode<T: DeserializeOwned>(what: &'static str, b: &[u8]) -> Result<T, ManagerError> {
    crate::codec::from_bytes(b).map_err(|e| ManagerError::Codec {
        what,
        action: "decoded",
        reason: e.to_string(),
    })
}

impl<K, V> ManagedDict<K, V>
where
    K: Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
{
    /// How long each operation waits for the manager's answer (default 60 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn call(&self, req: Request) -> Result<Reply, ManagerError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let me = std::process::id();
        if conn.as_ref().is_none_or(|(pid, _)| *pid != me) {
            *conn = Some((me, self.endpoint.connect()?));
        }
        let Some((_, link)) = conn.as_mut() else {
            return Err(lost("no connection"));
        };
        let deadline = crate::time::deadline(self.timeout);
        let got = link
            .send(&req)
            .and_then(|()| link.recv::<Reply>(deadline, self.timeout));
        if got.is_err() {
            // The connection may hold half a message: start again next time.
            *conn = None;
        }
        got
    }

    /// The value of `key`; Python's `d.get(key)`.
    pub fn get(&self, key: &K) -> Result<Option<V>, ManagerError> {
        let key = encode("key", key)?;
        match self.call(Request::Get { dict: self.id, key })? {
            Reply::Value(Some(v)) => decode("value", &v).map(Some),
            Reply::Value(None) => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    /// Sets `key` to `value`; Python's `d[key] = value`.
    pub fn set(&self, key: &K, value: &V) -> Result<(), ManagerError> {
        let (key, value) = (encode("key", key)?, encode("value", value)?);
        match self.call(Request::Set {
            dict: self.id,
            key,
            value,
        })? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Removes `key`, returning its value; Python's `d.pop(key, None)`.
    pub fn remove(&self, key: &K) -> Result<Option<V>, ManagerError> {
        let key = encode("key", key)?;
        match self.call(Request::Del { dict: self.id, key })? {
            Reply::Value(Some(v)) => decode("value", &v).map(Some),
            Reply::Value(None) => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    /// The number of keys; Python's `len(d)`.
    pub fn len(&self) -> Result<usize, ManagerError> {
        match self.call(Request::Len { dict: self.id })? {
            Reply::Len(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
            other => Err(unexpected(other)),
        }
    }

    /// Whether the dict is empty.
    pub fn is_empty(&self) -> Result<bool, ManagerError> {
        Ok(self.len()? == 0)
    }

    /// Every key and value (in no particular order); Python's `d.items()`.
    pub fn items(&self) -> Result<Vec<(K, V)>, ManagerError> {
        match self.call(Request::Items { dict: self.id })? {
            Reply::Items(items) => items
                .iter()
                .map(|(k, v)| Ok((decode("key", k)?, decode("value", v)?)))
                .collect(),
            other => Err(unexpected(other)),
        }
    }

    /// Removes every key; Python's `d.clear()`.
    pub fn clear(&self) -> Result<(), ManagerError> {
        match self.call(Request::Clear { dict: self.id })? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}
