//! What every proxy holds (the manager's endpoint, the object's id, this process's
//! connections), the macro that makes typed proxies of it, and the container proxies:
//! dicts, lists, namespaces, values.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::table::{Table, TableError};
use super::wire::{decode, encode, lost, Endpoint, Link, Reply, Request, Where};
use super::ManagerError;

/// How long a proxy waits for an answer by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

pub(super) fn unexpected(r: Reply) -> ManagerError {
    match r {
        Reply::Refused(reason) => ManagerError::Refused { reason },
        other => ManagerError::Refused {
            reason: format!("an unexpected answer: {other:?}"),
        },
    }
}

/// What every proxy holds: the manager, the object's id, and this process's connections
/// (one per call in flight at once: a call that blocks, such as a queue's `get`, blocks
/// only the thread that made it).
pub struct Proxy {
    pub(super) endpoint: Endpoint,
    pub(super) id: u64,
    pub(super) timeout: Duration,
    /// Idle connections of this process (the pid that made them).
    conns: Mutex<(u32, Vec<Link>)>,
    /// A dict's table as this process uses it (the pid that mapped it).
    local: Mutex<(u32, Local)>,
}

/// How a dict proxy reaches its dict in this process.
#[derive(Clone)]
enum Local {
    /// Not asked yet.
    Unknown,
    /// Through requests to the manager (it is on another machine).
    Requests,
    /// In place: the table mapped here.
    Mapped(Arc<InPlace>),
}

/// A dict's table mapped in this process, and a connection that tells when the manager is
/// gone.
pub(super) struct InPlace {
    table: Table,
    watch: Link,
    timeout: Duration,
}

impl InPlace {
    /// Runs `op` on the table, unless the manager is gone: as with requests, a dict whose
    /// manager ended (shut down, killed) fails with [`ManagerError::Lost`].
    fn run<R>(
        &self,
        op: impl FnOnce(&Table, Option<std::time::Instant>) -> Result<R, TableError>,
    ) -> Result<R, ManagerError> {
        if self.watch.closed() {
            return Err(lost("the manager closed the connection"));
        }
        op(&self.table, crate::time::deadline(self.timeout)).map_err(|e| match e {
            TableError::Busy => ManagerError::Busy {
                waited: self.timeout,
            },
            e => ManagerError::Refused {
                reason: e.to_string(),
            },
        })
    }
}

impl Proxy {
    pub(super) fn new(endpoint: Endpoint, id: u64, timeout: Duration) -> Self {
        Proxy {
            endpoint,
            id,
            timeout,
            conns: Mutex::new((0, Vec::new())),
            local: Mutex::new((0, Local::Unknown)),
        }
    }

    /// The dict's table, mapped in this process; `None` when the manager is on another
    /// machine (then requests go to it). Asked of the manager once per process.
    fn in_place(&self) -> Result<Option<Arc<InPlace>>, ManagerError> {
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let me = std::process::id();
        if local.0 != me {
            // Inherited through a fork: map it again (the mapping is there, but the
            // connection that watches the manager is the parent's).
            *local = (me, Local::Unknown);
        }
        match &local.1 {
            Local::Mapped(p) => return Ok(Some(p.clone())),
            Local::Requests => return Ok(None),
            Local::Unknown => {}
        }
        if matches!(self.endpoint.at, Where::Tcp(..)) {
            local.1 = Local::Requests;
            return Ok(None);
        }
        let mut link = self.endpoint.connect()?;
        link.send(&Request::DictTable { dict: self.id })?;
        let (reply, mut fds) =
            link.recv_with_fds::<Reply>(crate::time::deadline(self.timeout), self.timeout)?;
        let fd = match (reply, fds.pop()) {
            (Reply::Table(_), Some(fd)) if fds.is_empty() => fd,
            (Reply::Table(_), _) => return Err(lost("the dict's table came without its memory")),
            (other, _) => return Err(unexpected(other)),
        };
        let Ok(table) = Table::open(fd) else {
            // (It cannot be mapped here, under `ulimit -v`, say: the manager does the work.)
            local.1 = Local::Requests;
            return Ok(None);
        };
        let p = Arc::new(InPlace {
            table,
            watch: link,
            timeout: self.timeout,
        });
        local.1 = Local::Mapped(p.clone());
        Ok(Some(p))
    }

    /// A proxy of a new object, made by `req`.
    pub(super) fn create(endpoint: &Endpoint, req: Request) -> Result<Proxy, ManagerError> {
        let mut p = Proxy::new(endpoint.clone(), 0, DEFAULT_TIMEOUT);
        match p.call(req)? {
            Reply::Id(id) => p.id = id,
            other => return Err(unexpected(other)),
        }
        Ok(p)
    }

    /// An idle connection of this process, or a new one.
    pub(super) fn take_link(&self) -> Result<Link, ManagerError> {
        let idle = {
            let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            let me = std::process::id();
            if conns.0 != me {
                // Inherited from the parent (a fork): not ours to use.
                conns.1.clear();
                conns.0 = me;
            }
            conns.1.pop()
        };
        match idle {
            Some(link) => Ok(link),
            None => self.endpoint.connect(),
        }
    }

    /// Gives back a connection whose last exchange went through.
    pub(super) fn put_link(&self, link: Link) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if conns.0 == std::process::id() {
            conns.1.push(link);
        }
    }

    /// One request and its answer on `link`. `waits`: how long the manager may wait
    /// before answering (a blocking request's timeout; `None`: for ever), on top of the
    /// proxy's timeout. On an error the link is dropped: it may hold half a message.
    pub(super) fn exchange(
        &self,
        link: &mut Link,
        req: &Request,
        waits: Option<Duration>,
    ) -> Result<Reply, ManagerError> {
        let (deadline, waited) = match waits {
            None => (None, Duration::MAX),
            Some(w) => {
                let total = w.saturating_add(self.timeout);
                (crate::time::deadline(total), total)
            }
        };
        link.send(req)?;
        link.recv::<Reply>(deadline, waited)
    }

    pub(super) fn call(&self, req: Request) -> Result<Reply, ManagerError> {
        self.call_waiting(req, Some(Duration::ZERO))
    }

    /// A request the manager may hold for up to `waits` before answering.
    pub(super) fn call_waiting(
        &self,
        req: Request,
        waits: Option<Duration>,
    ) -> Result<Reply, ManagerError> {
        let mut link = self.take_link()?;
        let got = self.exchange(&mut link, &req, waits)?;
        self.put_link(link);
        Ok(got)
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

pub(super) mod sealed {
    /// Implemented by the proxy types only.
    pub trait Sealed {
        fn proxy(&self) -> &super::Proxy;
        fn from_proxy(p: super::Proxy) -> Self;
    }
}

/// A proxy type: what [`Manager::publish`](super::Manager::publish) and
/// [`Manager::lookup`](super::Manager::lookup) take and give. Implemented by every proxy
/// of this module.
pub trait Proxied: sealed::Sealed + Sized {}

/// Proxy types: typed wrappers of a [`Proxy`], cloned and sent as it is.
macro_rules! proxy_type {
    ($(#[$doc:meta])* $name:ident <$($t:ident),*>) => {
        $(#[$doc])*
        pub struct $name<$($t),*> {
            proxy: $crate::managers::proxy::Proxy,
            _t: ::std::marker::PhantomData<fn($($t),*)>,
        }

        impl<$($t),*> ::std::fmt::Debug for $name<$($t),*> {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("manager", &self.proxy.endpoint)
                    .field("id", &self.proxy.id)
                    .finish()
            }
        }

        impl<$($t),*> Clone for $name<$($t),*> {
            fn clone(&self) -> Self {
                $name { proxy: self.proxy.clone(), _t: ::std::marker::PhantomData }
            }
        }

        impl<$($t),*> ::serde::Serialize for $name<$($t),*> {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                self.proxy.serialize(s)
            }
        }

        impl<'de, $($t),*> ::serde::Deserialize<'de> for $name<$($t),*> {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Ok($name {
                    proxy: $crate::managers::proxy::Proxy::deserialize(d)?,
                    _t: ::std::marker::PhantomData,
                })
            }
        }

        impl<$($t),*> $crate::managers::proxy::sealed::Sealed for $name<$($t),*> {
            fn proxy(&self) -> &$crate::managers::proxy::Proxy {
                &self.proxy
            }
            fn from_proxy(proxy: $crate::managers::proxy::Proxy) -> Self {
                $name { proxy, _t: ::std::marker::PhantomData }
            }
        }

        impl<$($t),*> $crate::managers::Proxied for $name<$($t),*> {}

        impl<$($t),*> $name<$($t),*> {
            /// How long each operation waits for the manager's answer (default 60 s; a
            /// blocking operation waits this long on top of its own timeout).
            pub fn with_timeout(mut self, timeout: ::std::time::Duration) -> Self {
                self.proxy.timeout = timeout;
                self
            }

            #[allow(dead_code)]
            fn request(
                &self,
                req: $crate::managers::wire::Request,
            ) -> Result<$crate::managers::wire::Reply, $crate::managers::ManagerError> {
                self.proxy.call(req)
            }
        }
    };
}
pub(super) use proxy_type;

proxy_type!(
    /// A proxy of a dict held by a [`Manager`](super::Manager); Python's `DictProxy`.
    /// Cloning it, or sending it to another process, gives another proxy of the same dict.
    ManagedDict<K, V>
);

/// A proxy of a namespace held by a [`Manager`](super::Manager); Python's
/// `manager.Namespace()`: named attributes of any serde type (`ns.x = 1` is
/// `ns.set("x", &1)`, `ns.x` is `ns.get::<i64>("x")`). Cloning it, or sending it to another
/// process, gives another proxy of the same namespace.
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

impl sealed::Sealed for ManagedNamespace {
    fn proxy(&self) -> &Proxy {
        &self.proxy
    }
    fn from_proxy(proxy: Proxy) -> Self {
        ManagedNamespace { proxy }
    }
}

impl Proxied for ManagedNamespace {}

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
    /// A proxy of a value held by a [`Manager`](super::Manager); Python's
    /// `manager.Value(typecode, value)` (its `value` attribute is [`get`](Self::get) and
    /// [`set`](Self::set)). Each call is one step: hold a lock around a read and a write
    /// that must go together.
    ManagedValue<T>
);

impl<T: Serialize + DeserializeOwned> ManagedValue<T> {
    /// The value; Python's `v.value`.
    pub fn get(&self) -> Result<T, ManagerError> {
        match self.request(Request::Get {
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
        match self.request(Request::Set {
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
    /// A proxy of a list held by a [`Manager`](super::Manager); Python's `ListProxy`.
    /// Cloning it, or sending it to another process, gives another proxy of the same list.
    ManagedList<T>
);

/// A dict's answer holding a value or none.
fn optional_value<V: DeserializeOwned>(reply: Reply) -> Result<Option<V>, ManagerError> {
    match reply {
        Reply::Value(Some(v)) => decode("value", &v).map(Some),
        Reply::Value(None) => Ok(None),
        other => Err(unexpected(other)),
    }
}

impl<K, V> ManagedDict<K, V>
where
    K: Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
{
    /// The value of `key`; Python's `d.get(key)`.
    pub fn get(&self, key: &K) -> Result<Option<V>, ManagerError> {
        let key = encode("key", key)?;
        if let Some(t) = self.proxy.in_place()? {
            return t
                .run(|t, by| t.get(&key, by, |v| decode::<V>("value", v)))?
                .transpose();
        }
        optional_value(self.request(Request::Get {
            dict: self.proxy.id,
            key,
        })?)
    }

    /// Sets `key` to `value`; Python's `d[key] = value`.
    pub fn set(&self, key: &K, value: &V) -> Result<(), ManagerError> {
        let (key, value) = (encode("key", key)?, encode("value", value)?);
        if let Some(t) = self.proxy.in_place()? {
            return t.run(|t, by| t.set(&key, &value, by));
        }
        match self.request(Request::Set {
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
        if let Some(t) = self.proxy.in_place()? {
            return t
                .run(|t, by| t.remove(&key, by, |v| decode::<V>("value", v)))?
                .transpose();
        }
        optional_value(self.request(Request::Del {
            dict: self.proxy.id,
            key,
        })?)
    }

    /// The number of keys; Python's `len(d)`.
    pub fn len(&self) -> Result<usize, ManagerError> {
        if let Some(t) = self.proxy.in_place()? {
            return t.run(|t, by| t.len(by));
        }
        match self.request(Request::Len {
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
        let items = match self.proxy.in_place()? {
            Some(t) => t.run(|t, by| {
                let mut items = Vec::new();
                t.for_each(by, |k, v| items.push((k.to_vec(), v.to_vec())))?;
                Ok(items)
            })?,
            None => match self.request(Request::Items {
                dict: self.proxy.id,
            })? {
                Reply::Items(items) => items,
                other => return Err(unexpected(other)),
            },
        };
        items
            .iter()
            .map(|(k, v)| Ok((decode("key", k)?, decode("value", v)?)))
            .collect()
    }

    /// Removes every key; Python's `d.clear()`.
    pub fn clear(&self) -> Result<(), ManagerError> {
        if let Some(t) = self.proxy.in_place()? {
            return t.run(|t, by| t.clear(by));
        }
        match self.request(Request::Clear {
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
        match self.request(Request::Append {
            list: self.proxy.id,
            value,
        })? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The item at `index` (`None` past the end, where Python raises `IndexError`).
    pub fn get(&self, index: usize) -> Result<Option<T>, ManagerError> {
        match self.request(Request::ListGet {
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
        match self.request(Request::ListSet {
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
        match self.request(Request::Pop {
            list: self.proxy.id,
        })? {
            Reply::Value(Some(v)) => decode("value", &v).map(Some),
            Reply::Value(None) => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    /// The number of items; Python's `len(l)`.
    pub fn len(&self) -> Result<usize, ManagerError> {
        match self.request(Request::ListLen {
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
        match self.request(Request::ListAll {
            list: self.proxy.id,
        })? {
            Reply::Values(items) => items.iter().map(|v| decode("value", v)).collect(),
            other => Err(unexpected(other)),
        }
    }
}
