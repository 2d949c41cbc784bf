//! Managers: Python's `multiprocessing.Manager()`, a process that owns shared objects and
//! serves them to other processes through proxies. Here: dicts ([`ManagedDict`]), lists
//! ([`ManagedList`]), namespaces ([`ManagedNamespace`]), values ([`ManagedValue`]), queues
//! ([`ManagedQueue`]), locks ([`ManagedLock`]), events ([`ManagedEvent`]), instances of
//! your own types ([`Served`], [`ManagedObject`]: Python's `BaseManager.register`), and
//! named shared memory that is unlinked with the manager ([`SharedMemoryManager`]).
//!
//! | Python | gpuproc |
//! |---|---|
//! | `Manager()`, `SyncManager().start()` | [`Manager::start`] |
//! | `BaseManager(address, authkey)`, `.start()` | [`Manager::builder`], [`ManagerBuilder::address`], [`ManagerBuilder::authkey`], [`ManagerBuilder::start`] |
//! | `BaseManager(address, authkey)`, `.connect()` | [`Manager::connect`] |
//! | `manager.dict()`, `list()`, `Namespace()`, `Value()` | [`Manager::dict`], [`Manager::list`], [`Manager::namespace`], [`Manager::value`] |
//! | `manager.Queue()`, `Lock()`, `Event()` | [`Manager::queue`], [`Manager::lock`], [`Manager::event`] |
//! | `BaseManager.register(typeid, callable)` | [`ManagerBuilder::register`] with a [`Served`] type; `manager.TypeId()` is [`Manager::create`] |
//! | `register('get_queue', callable=lambda: q)` for remote clients | [`Manager::publish`] on the serving side, [`Manager::lookup`] on the client |
//! | `manager.shutdown()`, `with Manager() as m:` | [`Manager::shutdown`], dropping the [`Manager`] |
//! | `managers.SharedMemoryManager` | [`SharedMemoryManager`] |
//! | `Condition`, `Barrier`, `Semaphore`, `Pool` proxies | none: gpuproc's own [`sync`](crate::sync) objects can be sent to any process started from this one |
//!
//! The manager is a gpuproc [`Process`] listening on an abstract Unix socket with a random
//! name (or on the address given to [`ManagerBuilder::address`], TCP included); proxies
//! connect to it through [`connection`](crate::connection)'s authenticated connections
//! (Python's HMAC handshake, with a random 32-byte key unless one is given). After the
//! handshake, requests and answers go as gpuproc's own frames on the same socket (one
//! `sendmsg` each way; a proxy waiting for an answer polls briefly before it sleeps, as
//! channels do). Every request is one message and its answer; a proxy keeps its idle
//! connections (one per call in flight at once, so a blocking call blocks only its own
//! thread; reconnecting in a forked child), and a proxy sent to another process (as a
//! task's argument, a `Process`'s argument, through a queue) connects there on first use.
//! The manager serves each connection on a thread of its own: a request that waits (a
//! queue's `get`, a lock's acquire, an event's `wait`) blocks no other client.
//!
//! # Dicts in place
//!
//! A dict lives in shared memory that the manager makes (a hash table in a memfd, under a
//! robust process-shared mutex), and a proxy on the manager's machine maps it on first use
//! and works on it in place: a `get` or `set` is a lock, a lookup and a copy, with no
//! message to the manager and back (about 15-25x Python's `Manager().dict()` on a loaded
//! 2-core machine, where a round trip per operation gave 3.5x; see `bench_managers`).
//! Before each operation the proxy looks (without waiting) whether the manager closed its
//! connection, so a dict whose manager is gone fails with [`ManagerError::Lost`] as the
//! other proxies do; a dict keeps working while its manager is stopped (`SIGSTOP`), since
//! the manager takes no part. A process killed in the middle of an operation leaves the
//! table consistent (each change is published by one store; the next user is told by the
//! mutex and recounts), at worst leaking one block. The proxy's timeout bounds the wait for
//! the dict's lock ([`ManagerError::Busy`]). A dict holds at most 4 GiB (address space
//! only until used; less where `ulimit -v` limits the address space, and a proxy that
//! cannot map it sends requests instead). Proxies on other machines, connected over TCP, send requests and the
//! manager runs them on the same table. Any process holding the memory can write it, so it
//! is trusted as the manager's clients are; every offset and length read from it is
//! checked, so damage gives errors, not crashes.
//!
//! Differences from Python: keys, values and items are any serde types (without
//! descriptors), each object typed by its proxy; an operation whose manager is gone (shut
//! down, killed) fails with [`ManagerError::Lost`] at once, and one the manager does not
//! answer within the proxy's timeout (default 60 s, for a stopped manager; a blocking
//! operation waits that long on top of its own timeout) with [`ManagerError::Timeout`]. A
//! lock held by a process that dies is released (Python keeps it locked: see
//! [`ManagedLock`]).
//!
//! # Remote managers
//!
//! A manager started with [`ManagerBuilder::address`] on a TCP address (and an authkey)
//! serves other programs, on this machine or others: they [`Manager::connect`] with the
//! address and the key, and [`Manager::lookup`] the objects the serving side
//! [`publish`](Manager::publish)ed by name (or receive proxies as data: a proxy carries
//! the manager's address and key). The connection's security is that of
//! [`connection`](crate::connection): the key is checked both ways and never sent, but
//! nothing is encrypted, so use a private network or a tunnel for data that must stay
//! secret. A peer that knows the key is trusted: it can read and change every object the
//! manager holds. The manager runs one handshake at a time, as Python's does: a peer
//! without the key can delay new connections by at most the handshake timeout (20 s), and
//! connections already made are not affected.
//!
//! A proxy made by the manager's own handle carries the address the manager listens on
//! (`0.0.0.0` stays `0.0.0.0`): to send proxies to other machines, listen on an address
//! they reach; proxies from [`Manager::lookup`] carry the address that was connected to.
//!
//! Anyone on this machine can connect to a local manager's abstract socket, but without
//! the key the handshake fails: only processes that were given a proxy (which carries the
//! key) or the [`Manager`] can use it.
//!
//! ```
//! # gpuproc::init();
//! use std::time::Duration;
//! use gpuproc::managers::{ManagedQueue, Manager};
//!
//! fn worker(q: ManagedQueue<u64>) {
//!     q.put(&42).unwrap();
//! }
//!
//! let manager = Manager::start()?;
//! let q = manager.queue::<u64>(0)?;
//! let mut p = gpuproc::Process::new(worker, q.clone());
//! p.start()?;
//! assert_eq!(q.get_timeout(Duration::from_secs(30))?, 42);
//! p.join()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod proxy;
mod served;
mod server;
mod shared_memory;
mod sync;
mod table;
mod wire;

use std::any::type_name;
use std::marker::PhantomData;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use self::proxy::sealed::Sealed;
use self::proxy::Proxy;
use self::wire::{Endpoint, Reply, Request, Where};
use crate::connection::Address;
use crate::process::{Process, ProcessError};
use crate::{Queue, StartMethod};

pub use self::proxy::{
    ManagedDict, ManagedList, ManagedNamespace, ManagedValue, Proxied, DEFAULT_TIMEOUT,
};
pub use self::served::{ManagedObject, Registered, Registry, Served};
pub use self::shared_memory::SharedMemoryManager;
pub use self::sync::{ManagedEvent, ManagedLock, ManagedLockGuard, ManagedQueue};

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
    /// The manager and this side do not share the authkey (Python's
    /// `AuthenticationError`).
    #[error("the manager refused the connection: {reason}")]
    Authentication {
        /// What the handshake said.
        reason: String,
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
    /// Another process held the dict's lock for the whole of the proxy's timeout (a
    /// process stopped in the middle of an operation, say).
    #[error("the dict stayed locked by another process for {waited:?}")]
    Busy {
        /// The timeout.
        waited: Duration,
    },
    /// A managed queue stayed empty for the whole timeout (Python's `queue.Empty`).
    #[error("the queue is empty")]
    Empty,
    /// A managed queue stayed full for the whole timeout (Python's `queue.Full`).
    #[error("the queue is full")]
    Full,
}

impl ManagerError {
    /// Whether the manager is gone.
    pub fn is_lost(&self) -> bool {
        matches!(self, ManagerError::Lost { .. })
    }

    /// Whether the manager did not answer in time.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            ManagerError::Timeout { .. } | ManagerError::Busy { .. }
        )
    }

    /// Whether the handshake failed: the authkey is not the manager's.
    pub fn is_authentication(&self) -> bool {
        matches!(self, ManagerError::Authentication { .. })
    }

    /// Whether a queue's `get` found no item in time (Python's `queue.Empty`).
    pub fn is_queue_empty(&self) -> bool {
        matches!(self, ManagerError::Empty)
    }

    /// Whether a queue's `put` found no room in time (Python's `queue.Full`).
    pub fn is_queue_full(&self) -> bool {
        matches!(self, ManagerError::Full)
    }
}

const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings of a manager: where it listens, its key, the types it serves; from
/// [`Manager::builder`]. Python's `BaseManager(address, authkey)` and its subclass with
/// `register`ed types.
#[must_use = "a builder does nothing until .start()"]
pub struct ManagerBuilder<R = ()> {
    address: Option<Address>,
    authkey: Option<Vec<u8>>,
    start_method: Option<StartMethod>,
    _registry: PhantomData<fn() -> R>,
}

impl<R> std::fmt::Debug for ManagerBuilder<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagerBuilder")
            .field("address", &self.address)
            .field("start_method", &self.start_method)
            .field("registry", &type_name::<R>())
            .finish_non_exhaustive()
    }
}

impl<R: Registry> ManagerBuilder<R> {
    /// Listens on `address` (a Unix socket path, an abstract name, or TCP
    /// `("0.0.0.0", 50000)`; port 0 picks a free one, see [`Manager::address`]) instead of
    /// a random abstract name; Python's `BaseManager(address=...)`. A TCP address needs an
    /// [`authkey`](Self::authkey) given here, for the other programs to connect with.
    pub fn address(mut self, address: impl Into<Address>) -> Self {
        self.address = Some(address.into());
        self
    }

    /// The key clients must prove they hold (default: 32 random bytes, which only proxies
    /// carry); Python's `authkey`.
    pub fn authkey(mut self, key: &[u8]) -> Self {
        self.authkey = Some(key.to_vec());
        self
    }

    /// How the manager process is started (default: the program's start method).
    pub fn start_method(mut self, method: StartMethod) -> Self {
        self.start_method = Some(method);
        self
    }

    /// Serves instances of `T` too ([`Manager::create`]); Python's
    /// `MyManager.register(typeid, T)`. See [`Served`].
    #[doc(alias = "BaseManager.register")]
    pub fn register<T: Served>(self) -> ManagerBuilder<Registered<T, R>> {
        ManagerBuilder {
            address: self.address,
            authkey: self.authkey,
            start_method: self.start_method,
            _registry: PhantomData,
        }
    }

    /// Starts the manager process; Python's `manager.start()`.
    pub fn start(self) -> Result<Manager, ManagerError> {
        let start_err = |e: &dyn std::fmt::Display| ManagerError::Start {
            reason: e.to_string(),
        };
        let authkey = match self.authkey {
            Some(k) if !k.is_empty() => k,
            Some(_) => return Err(start_err(&"an empty authkey")),
            None => {
                let mut k = vec![0u8; 32];
                getrandom::fill(&mut k).map_err(|e| start_err(&e))?;
                k
            }
        };
        let at = match &self.address {
            Some(a) => Where::from_address(a),
            None => {
                let mut tag = [0u8; 8];
                getrandom::fill(&mut tag).map_err(|e| start_err(&e))?;
                Where::Abstract(
                    format!(
                        "gpuproc-manager-{}-{:016x}",
                        std::process::id(),
                        u64::from_le_bytes(tag)
                    )
                    .into_bytes(),
                )
            }
        };
        let ready: Queue<Result<Where, String>> = Queue::new().map_err(|e| start_err(&e))?;
        let start = server::Start {
            at,
            authkey: authkey.clone(),
            ready: ready.clone(),
        };
        let mut process = Process::new(server::serve::<R>, start).with_name("gpuproc-manager");
        if let Some(m) = self.start_method {
            process = process.with_start_method(m);
        }
        process.start().map_err(|e: ProcessError| start_err(&e))?;
        let failed = |process: &mut Process<server::Start, ()>, e: ManagerError| {
            let _ = process.kill();
            let _ = process.join_timeout(START_TIMEOUT);
            Err(e)
        };
        let at = match ready.get_timeout(START_TIMEOUT) {
            Ok(Ok(at)) => at,
            Ok(Err(reason)) => return failed(&mut process, ManagerError::Start { reason }),
            Err(e) => return failed(&mut process, start_err(&e)),
        };
        Ok(Manager {
            process: Some(process),
            endpoint: Endpoint { at, authkey },
        })
    }
}

/// A manager process; Python's `multiprocessing.Manager()` (a started `SyncManager`), or a
/// connection to one another program started ([`Manager::connect`]).
///
/// Dropping a started manager shuts it down, as leaving Python's `with Manager() as m:`
/// does; proxies then fail with [`ManagerError::Lost`].
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
    process: Option<Process<server::Start, ()>>,
    endpoint: Endpoint,
}

impl Manager {
    /// Starts a manager process; Python's `Manager()` (or `SyncManager().start()`).
    pub fn start() -> Result<Manager, ManagerError> {
        Manager::builder().start()
    }

    /// A manager with settings: address, authkey, registered types.
    pub fn builder() -> ManagerBuilder {
        ManagerBuilder {
            address: None,
            authkey: None,
            start_method: None,
            _registry: PhantomData,
        }
    }

    /// Connects to a manager another program (or machine) started on `address` with
    /// `authkey`; Python's `BaseManager(address, authkey).connect()`. Fails at once with
    /// [`ManagerError::Authentication`] for a wrong key, [`ManagerError::Lost`] if nothing
    /// answers there. The result makes proxies and looks up published objects as the
    /// manager's own handle does; dropping it (or [`shutdown`](Self::shutdown)) leaves the
    /// manager running.
    ///
    /// ```no_run
    /// use gpuproc::managers::{ManagedQueue, Manager};
    /// let m = Manager::connect(("10.0.0.5", 50000), b"abracadabra")?;
    /// let jobs: ManagedQueue<String> = m.lookup("jobs")?;
    /// println!("{}", jobs.get()?);
    /// # Ok::<(), gpuproc::managers::ManagerError>(())
    /// ```
    pub fn connect(address: impl Into<Address>, authkey: &[u8]) -> Result<Manager, ManagerError> {
        let endpoint = Endpoint {
            at: Where::from_address(&address.into()),
            authkey: authkey.to_vec(),
        };
        match Proxy::new(endpoint.clone(), 0, DEFAULT_TIMEOUT).call(Request::Ping)? {
            Reply::Done => Ok(Manager {
                process: None,
                endpoint,
            }),
            other => Err(proxy::unexpected(other)),
        }
    }

    /// Where the manager listens (with the real port where port 0 was asked for); Python's
    /// `manager.address`.
    pub fn address(&self) -> Address {
        self.endpoint.at.address()
    }

    fn make<P: Sealed>(&self, req: Request) -> Result<P, ManagerError> {
        Ok(P::from_proxy(Proxy::create(&self.endpoint, req)?))
    }

    /// A new, empty shared dict; Python's `manager.dict()`.
    pub fn dict<K, V>(&self) -> Result<ManagedDict<K, V>, ManagerError>
    where
        K: Serialize + DeserializeOwned,
        V: Serialize + DeserializeOwned,
    {
        self.make(Request::NewDict)
    }

    /// A new, empty namespace; Python's `manager.Namespace()`.
    pub fn namespace(&self) -> Result<ManagedNamespace, ManagerError> {
        self.make(Request::NewDict)
    }

    /// A shared value, set to `value`; Python's `manager.Value(typecode, value)`.
    pub fn value<T>(&self, value: &T) -> Result<ManagedValue<T>, ManagerError>
    where
        T: Serialize + DeserializeOwned,
    {
        let v: ManagedValue<T> = self.make(Request::NewDict)?;
        v.set(value)?;
        Ok(v)
    }

    /// A new, empty shared list; Python's `manager.list()`.
    pub fn list<T>(&self) -> Result<ManagedList<T>, ManagerError>
    where
        T: Serialize + DeserializeOwned,
    {
        self.make(Request::NewList)
    }

    /// A new queue holding at most `maxsize` items (0: no limit); Python's
    /// `manager.Queue(maxsize)`.
    pub fn queue<T>(&self, maxsize: usize) -> Result<ManagedQueue<T>, ManagerError>
    where
        T: Serialize + DeserializeOwned,
    {
        self.make(Request::NewQueue {
            maxsize: maxsize as u64,
        })
    }

    /// A new, free lock; Python's `manager.Lock()`.
    pub fn lock(&self) -> Result<ManagedLock, ManagerError> {
        self.make(Request::NewLock)
    }

    /// A new event, not set; Python's `manager.Event()`.
    pub fn event(&self) -> Result<ManagedEvent, ManagerError> {
        self.make(Request::NewEvent)
    }

    /// A new instance of `T`, made from `args` in the manager process; Python's
    /// `manager.TypeId(*args)` for a registered type. `T` must have been
    /// [`register`](ManagerBuilder::register)ed ([`ManagerError::Refused`] otherwise).
    pub fn create<T: Served>(&self, args: &T::Args) -> Result<ManagedObject<T>, ManagerError> {
        self.make(Request::NewObject {
            typeid: type_name::<T>().to_string(),
            args: wire::encode("argument", args)?,
        })
    }

    /// Makes `proxy`'s object known under `name`, for [`lookup`](Self::lookup) by other
    /// programs ([`Manager::connect`]); Python's `register(name, callable=lambda: obj)` on
    /// the serving side. A name published again names the new object.
    pub fn publish<P: Proxied>(&self, name: &str, proxy: &P) -> Result<(), ManagerError> {
        let p = proxy.proxy();
        if p.endpoint.at != self.endpoint.at {
            return Err(ManagerError::Refused {
                reason: format!("{name:?}: the object belongs to another manager"),
            });
        }
        match p.call(Request::Publish {
            name: name.to_string(),
            id: p.id,
            kind: type_name::<P>().to_string(),
        })? {
            Reply::Done => Ok(()),
            other => Err(proxy::unexpected(other)),
        }
    }

    /// A proxy of the object [`publish`](Self::publish)ed under `name`; Python's
    /// `manager.get_queue()` for a name registered with a callable. It must be asked as the
    /// proxy type it was published as ([`ManagerError::Refused`] otherwise, naming both).
    pub fn lookup<P: Proxied>(&self, name: &str) -> Result<P, ManagerError> {
        let p = Proxy::new(self.endpoint.clone(), 0, DEFAULT_TIMEOUT);
        match p.call(Request::Lookup {
            name: name.to_string(),
        })? {
            Reply::Found(id, kind) if kind == type_name::<P>() => Ok(P::from_proxy(Proxy::new(
                self.endpoint.clone(),
                id,
                DEFAULT_TIMEOUT,
            ))),
            Reply::Found(_, kind) => Err(ManagerError::Refused {
                reason: format!("{name:?} was published as {kind}, not {}", type_name::<P>()),
            }),
            other => Err(proxy::unexpected(other)),
        }
    }

    /// The manager process's pid (`None` for a manager this program connected to, or one
    /// shut down).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(|p| p.pid())
    }

    /// Stops the manager process (its objects are gone; proxies fail with
    /// [`ManagerError::Lost`]); Python's `shutdown()`. Calling it again does nothing, nor
    /// does calling it on a manager this program [`connect`](Self::connect)ed to.
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
