//! Managers: Python's `multiprocessing.Manager()`, a process that owns shared containers
//! and serves them to other processes through proxies. Here: shared dicts
//! ([`ManagedDict`]), lists ([`ManagedList`]), namespaces ([`ManagedNamespace`]) and values
//! ([`ManagedValue`]).
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
//! Differences from Python: no `Queue`, `Lock`, `Event`, `Condition` or `Barrier` proxies
//! yet (gpuproc's own [`Queue`] and [`sync`](crate::sync) objects can be sent
//! to any process started from this one); keys and values are any serde types (without descriptors),
//! each container typed by its proxy; an operation on a dict whose manager is gone (shut down,
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
}

#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Done,
    Id(u64),
    Value(Option<Vec<u8>>),
    Len(u64),
    Items(Vec<(Vec<u8>, Vec<u8>)>),
    Values(Vec<Vec<u8>>),
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

/// What a manager holds.
#[derive(Default)]
struct State {
    dicts: HashMap<u64, HashMap<Vec<u8>, Vec<u8>>>,
    lists: HashMap<u64, Vec<Vec<u8>>>,
    next_id: u64,
}

type Shared = Arc<Mutex<State>>;

fn answer(state: &Shared, req: Request) -> Reply {
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    let State {
        dicts: all,
        lists,
        next_id,
    } = &mut *state;
    let unknown = |d: u64| Reply::Refused(format!("no dict {d}"));
    let no_list = |l: u64| Reply::Refused(format!("no list {l}"));
    let at = |index: u64, len: usize| usize::try_from(index).ok().filter(|&i| i < len);
    match req {
        Request::NewDict => {
            *next_id += 1;
            all.insert(*next_id, HashMap::new());
            Reply::Id(*next_id)
        }
        Request::NewList => {
            *next_id += 1;
            lists.insert(*next_id, Vec::new());
            Reply::Id(*next_id)
        }
        Request::Append { list, value } => match lists.get_mut(&list) {
            Some(l) => {
                l.push(value);
                Reply::Done
            }
            None => no_list(list),
        },
        Request::ListGet { list, index } => match lists.get(&list) {
            Some(l) => Reply::Value(at(index, l.len()).map(|i| l[i].clone())),
            None => no_list(list),
        },
        Request::ListSet { list, index, value } => match lists.get_mut(&list) {
            Some(l) => match at(index, l.len()) {
                Some(i) => {
                    l[i] = value;
                    Reply::Done
                }
                None => Reply::Refused(format!(
                    "list assignment index {index} out of range (the list has {} items)",
                    l.len()
                )),
            },
            None => no_list(list),
        },
        Request::Pop { list } => match lists.get_mut(&list) {
            Some(l) => Reply::Value(l.pop()),
            None => no_list(list),
        },
        Request::ListLen { list } => match lists.get(&list) {
            Some(l) => Reply::Len(l.len() as u64),
            None => no_list(list),
        },
        Request::ListAll { list } => match lists.get(&list) {
            Some(l) => Reply::Values(l.clone()),
            None => no_list(list),
        },
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
    let state: Shared = Default::default();
    loop {
        // A failed handshake (a stranger without the key) ends that connection only.
        let Ok(conn) = listener.accept() else {
            continue;
        };
        let state = state.clone();
        let mut link = Link {
            sock: conn.into_fd(),
            reader: FrameReader::default(),
        };
        let _ = std::thread::Builder::new()
            .name("gpuproc-manager".into())
            .spawn(move || {
                while let Ok(req) = link.recv::<Request>(None, Duration::MAX) {
                    if link.send(&answer(&state, req)).is_err() {
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
        Ok(ManagedDict {
            proxy: Proxy::create(&self.endpoint, Request::NewDict)?,
            _t: PhantomData,
        })
    }

    /// A new, empty namespace; Python's `manager.Namespace()`.
    pub fn namespace(&self) -> Result<ManagedNamespace, ManagerError> {
        Ok(ManagedNamespace {
            proxy: Proxy::create(&self.endpoint, Request::NewDict)?,
        })
    }

    /// A shared value, set to `value`; Python's `manager.Value(typecode, value)`.
    pub fn value<T>(&self, value: &T) -> Result<ManagedValue<T>, ManagerError>
    where
        T: Serialize + DeserializeOwned,
    {
        let v = ManagedValue {
            proxy: Proxy::create(&self.endpoint, Request::NewDict)?,
            _t: PhantomData,
        };
        v.set(value)?;
        Ok(v)
    }

    /// A new, empty shared list; Python's `manager.list()`.
    pub fn list<T>(&self) -> Result<ManagedList<T>, ManagerError>
    where
        T: Serialize + DeserializeOwned,
    {
        Ok(ManagedList {
            proxy: Proxy::create(&self.endpoint, Request::NewList)?,
            _t: PhantomData,
        })
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

/// What every proxy holds: the manager, the object's id, and this process's connection.
struct Proxy {
    endpoint: Endpoint,
    id: u64,
    timeout: Duration,
    /// This process's connection (the pid that made it).
    conn: Mutex<Option<(u32, Link)>>,
}

impl Proxy {
    fn new(endpoint: Endpoint, id: u64, timeout: Duration) -> Self {
        Proxy {
            endpoint,
            id,
            timeout,
            conn: Mutex::new(None),
        }
    }

    /// A proxy of a new object, made by `req`.
    fn create(endpoint: &Endpoint, req: Request) -> Result<Proxy, ManagerError> {
        let mut p = Proxy::new(endpoint.clone(), 0, DEFAULT_TIMEOUT);
        match p.call(req)? {
            Reply::Id(id) => p.id = id,
            other => return Err(unexpected(other)),
        }
        Ok(p)
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
}

impl Clone for Proxy {
    fn clone(&self) -> Self {
        Proxy::new(self.endpoint.clone(), self.id, self.timeout)
    }
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("manager", &self.endpoint)
            .field("id", &self.id)
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
struct ProxyWire {
    endpoint: Endpoint,
    id: u64,
    timeout: Duration,
}

impl Serialize for Proxy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ProxyWire {
            endpoint: self.endpoint.clone(),
            id: self.id,
            timeout: self.timeout,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Proxy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = ProxyWire::deserialize(d)?;
        Ok(Proxy::new(w.endpoint, w.id, w.timeout))
    }
}

/// Proxy types: typed wrappers of a [`Proxy`], cloned and sent as it is.
macro_rules! proxy_type {
    ($(#[$doc:meta])* $name:ident <$($t:ident),+>) => {
        $(#[$doc])*
        pub struct $name<$($t),+> {
            proxy: Proxy,
            _t: PhantomData<fn($($t),+)>,
        }

        impl<$($t),+> std::fmt::Debug for $name<$($t),+> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("manager", &self.proxy.endpoint)
                    .field("id", &self.proxy.id)
                    .finish()
            }
        }

        impl<$($t),+> Clone for $name<$($t),+> {
            fn clone(&self) -> Self {
                $name { proxy: self.proxy.clone(), _t: PhantomData }
            }
        }

        impl<$($t),+> Serialize for $name<$($t),+> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                self.proxy.serialize(s)
            }
        }

        impl<'de, $($t),+> Deserialize<'de> for $name<$($t),+> {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Ok($name { proxy: Proxy::deserialize(d)?, _t: PhantomData })
            }
        }

        impl<$($t),+> $name<$($t),+> {
            /// How long each operation waits for the manager's answer (default 60 s).
            pub fn with_timeout(mut self, timeout: Duration) -> Self {
                self.proxy.timeout = timeout;
                self
            }

            fn call(&self, req: Request) -> Result<Reply, ManagerError> {
                self.proxy.call(req)
            }
        }
    };
}

proxy_type!(
    /// A proxy of a dict held by a [`Manager`]; Python's `DictProxy`. Cloning it, or sending
    /// it to another process, gives another proxy of the same dict.
    ManagedDict<K, V>
);

/// A proxy of a namespace held by a [`Manager`]; Python's `manager.Namespace()`: named
/// attributes of any serde type (`ns.x = 1` is `ns.set("x", &1)`, `ns.x` is
/// `ns.get::<i64>("x")`). Cloning it, or sending it to another process, gives another proxy
/// of the same namespace.
pub struct ManagedNamespace {
    proxy: Proxy,
}

impl std::fmt::Debug for ManagedNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedNamespace")
            .field("manager", &self.proxy.endpoint)
            .field("id", &self.proxy.id)
            .finish()
    }
}

impl Clone for ManagedNamespace {
    fn clone(&self) -> Self {
        ManagedNamespace {
            proxy: self.proxy.clone(),
        }
    }
}

impl Serialize for ManagedNamespace {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.proxy.serialize(s)
    }
}

impl<'de> Deserialize<'de> for ManagedNamespace {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(ManagedNamespace {
            proxy: Proxy::deserialize(d)?,
        })
    }
}

impl ManagedNamespace {
    /// How long each operation waits for the manager's answer (default 60 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.proxy.timeout = timeout;
        self
    }

    /// The attribute `name` as a `T` (`None` if unset; Python raises `AttributeError`). An
    /// attribute set as another type is [`ManagerError::Codec`] (or, for types that share
    /// an encoding, read as this one).
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, ManagerError> {
        let key = encode("key", name)?;
        match self.proxy.call(Request::Get {
            dict: self.proxy.id,
            key,
        })? {
            Reply::Value(Some(v)) => decode("value", &v).map(Some),
            Reply::Value(None) => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    /// Sets the attribute `name`; Python's `ns.name = value`.
    pub fn set<T: Serialize + ?Sized>(&self, name: &str, value: &T) -> Result<(), ManagerError> {
        let (key, value) = (encode("key", name)?, encode("value", value)?);
        match self.proxy.call(Request::Set {
            dict: self.proxy.id,
            key,
            value,
        })? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Removes the attribute `name`; Python's `del ns.name`. Whether it was set.
    pub fn remove(&self, name: &str) -> Result<bool, ManagerError> {
        let key = encode("key", name)?;
        match self.proxy.call(Request::Del {
            dict: self.proxy.id,
            key,
        })? {
            Reply::Value(v) => Ok(v.is_some()),
            other => Err(unexpected(other)),
        }
    }
}

proxy_type!(
    /// A proxy of a value held by a [`Manager`]; Python's `manager.Value(typecode, value)`
    /// (its `value` attribute is [`get`](Self::get) and [`set`](Self::set)). Each call is
    /// one step: hold a lock around a read and a write that must go together.
    ManagedValue<T>
);

impl<T: Serialize + DeserializeOwned> ManagedValue<T> {
    /// The value; Python's `v.value`.
    pub fn get(&self) -> Result<T, ManagerError> {
        match self.call(Request::Get {
            dict: self.proxy.id,
            key: Vec::new(),
        })? {
            Reply::Value(Some(v)) => decode("value", &v),
            other => Err(unexpected(other)),
        }
    }

    /// Sets the value; Python's `v.value = x`.
    pub fn set(&self, value: &T) -> Result<(), ManagerError> {
        let value = encode("value", value)?;
        match self.call(Request::Set {
            dict: self.proxy.id,
            key: Vec::new(),
            value,
        })? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

proxy_type!(
    /// A proxy of a list held by a [`Manager`]; Python's `ListProxy`. Cloning it, or sending
    /// it to another process, gives another proxy of the same list.
    ManagedList<T>
);

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
    /// The value of `key`; Python's `d.get(key)`.
    pub fn get(&self, key: &K) -> Result<Option<V>, ManagerError> {
        let key = encode("key", key)?;
        match self.call(Request::Get {
            dict: self.proxy.id,
            key,
        })? {
            Reply::Value(Some(v)) => decode("value", &v).map(Some),
            Reply::Value(None) => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    /// Sets `key` to `value`; Python's `d[key] = value`.
    pub fn set(&self, key: &K, value: &V) -> Result<(), ManagerError> {
        let (key, value) = (encode("key", key)?, encode("value", value)?);
        match self.call(Request::Set {
            dict: self.proxy.id,
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
        match self.call(Request::Del {
            dict: self.proxy.id,
            key,
        })? {
            Reply::Value(Some(v)) => decode("value", &v).map(Some),
            Reply::Value(None) => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    /// The number of keys; Python's `len(d)`.
    pub fn len(&self) -> Result<usize, ManagerError> {
        match self.call(Request::Len {
            dict: self.proxy.id,
        })? {
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
        match self.call(Request::Items {
            dict: self.proxy.id,
        })? {
            Reply::Items(items) => items
                .iter()
                .map(|(k, v)| Ok((decode("key", k)?, decode("value", v)?)))
                .collect(),
            other => Err(unexpected(other)),
        }
    }

    /// Removes every key; Python's `d.clear()`.
    pub fn clear(&self) -> Result<(), ManagerError> {
        match self.call(Request::Clear {
            dict: self.proxy.id,
        })? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

impl<T> ManagedList<T>
where
    T: Serialize + DeserializeOwned,
{
    /// Appends `value`; Python's `l.append(value)`.
    pub fn append(&self, value: &T) -> Result<(), ManagerError> {
        let value = encode("value", value)?;
        match self.call(Request::Append {
            list: self.proxy.id,
            value,
        })? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The item at `index` (`None` past the end, where Python raises `IndexError`).
    pub fn get(&self, index: usize) -> Result<Option<T>, ManagerError> {
        match self.call(Request::ListGet {
            list: self.proxy.id,
            index: index as u64,
        })? {
            Reply::Value(Some(v)) => decode("value", &v).map(Some),
            Reply::Value(None) => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    /// Sets the item at `index`; Python's `l[index] = value` (past the end:
    /// [`ManagerError::Refused`], Python's `IndexError`).
    pub fn set(&self, index: usize, value: &T) -> Result<(), ManagerError> {
        let value = encode("value", value)?;
        match self.call(Request::ListSet {
            list: self.proxy.id,
            index: index as u64,
            value,
        })? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Removes and returns the last item; Python's `l.pop()` (`None` when empty).
    pub fn pop(&self) -> Result<Option<T>, ManagerError> {
        match self.call(Request::Pop {
            list: self.proxy.id,
        })? {
            Reply::Value(Some(v)) => decode("value", &v).map(Some),
            Reply::Value(None) => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    /// The number of items; Python's `len(l)`.
    pub fn len(&self) -> Result<usize, ManagerError> {
        match self.call(Request::ListLen {
            list: self.proxy.id,
        })? {
            Reply::Len(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
            other => Err(unexpected(other)),
        }
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> Result<bool, ManagerError> {
        Ok(self.len()? == 0)
    }

    /// Every item, in order; Python's `l[:]`.
    pub fn to_vec(&self) -> Result<Vec<T>, ManagerError> {
        match self.call(Request::ListAll {
            list: self.proxy.id,
        })? {
            Reply::Values(items) => items.iter().map(|v| decode("value", v)).collect(),
            other => Err(unexpected(other)),
        }
    }
}
