//! Your own types served by a manager: Python's `BaseManager.register(typeid, callable)`.
//!
//! The mapping to Python is on [`Served`].

use std::any::type_name;
use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::proxy::{proxy_type, unexpected};
use super::wire::{decode, encode, Reply, Request};
use super::ManagerError;

/// A type whose instances live in a manager process, called through a [`ManagedObject`]
/// proxy: Python's classes given to `BaseManager.register`.
///
/// A served type says how it is made (`Args`), the calls it takes (`Call`,
/// usually an enum of its methods) and what they return (`Reply`). It is registered with
/// [`ManagerBuilder::register`](super::ManagerBuilder::register); the manager process
/// then makes instances ([`Manager::create`](super::Manager::create)) and runs their calls,
/// and every process holding the [`ManagedObject`] proxy calls them.
///
/// | Python | gpuproc |
/// |---|---|
/// | `class MyManager(BaseManager): pass` | [`Manager::builder()`](super::Manager::builder) |
/// | `MyManager.register('Counter', Counter)` | `.register::<Counter>()` (`Counter: Served`) |
/// | `m = MyManager(); m.start()` | `let m = ....start()?` |
/// | `c = m.Counter(5)` | `let c = m.create::<Counter>(&5)?` (a [`ManagedObject<Counter>`]) |
/// | `c.increment(2)` (an exposed method) | `c.call(&CounterCall::Increment(2))?` |
/// | `typeid` (the registered name) | [`std::any::type_name`] of the type |
/// | `exposed=` | the variants of `Call` |
/// | `proxytype=`, `method_to_typeid=` | none: replies are data; a proxy is data too, so one given in `Args` can be kept and returned in a reply |
///
/// The registry is part of the builder's type, and the manager process runs a function
/// compiled for it: nothing is looked up by name but the type's, and an instance of a type
/// this manager was not built with is refused ([`ManagerError::Refused`]).
///
/// Calls on one instance run one at a time (each instance has its own lock); calls on
/// different instances, and blocking requests of other proxies, run side by side. A call
/// that panics answers [`ManagerError::Refused`] with the panic's message; the instance
/// stays, as the panic left it.
///
/// ```
/// # gpuproc::init();
/// use serde::{Deserialize, Serialize};
/// use gpuproc::managers::{Manager, Served};
///
/// struct Counter(i64);
///
/// #[derive(Serialize, Deserialize)]
/// enum CounterCall {
///     Add(i64),
///     Get,
/// }
///
/// impl Served for Counter {
///     type Args = i64;
///     type Call = CounterCall;
///     type Reply = i64;
///     fn create(start: i64) -> Self {
///         Counter(start)
///     }
///     fn call(&mut self, call: CounterCall) -> i64 {
///         if let CounterCall::Add(n) = call {
///             self.0 += n;
///         }
///         self.0
///     }
/// }
///
/// let manager = Manager::builder().register::<Counter>().start()?;
/// let counter = manager.create::<Counter>(&5)?;
/// assert_eq!(counter.call(&CounterCall::Add(2))?, 7);
/// assert_eq!(counter.call(&CounterCall::Get)?, 7);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[doc(alias = "register")]
#[doc(alias = "BaseManager")]
pub trait Served: Send + 'static {
    /// What an instance is made from ([`Manager::create`](super::Manager::create)'s
    /// argument; Python's arguments to `manager.TypeId(...)`).
    type Args: Serialize + DeserializeOwned;
    /// A call: which method, with its arguments (an enum, usually).
    type Call: Serialize + DeserializeOwned;
    /// What a call returns.
    type Reply: Serialize + DeserializeOwned;
    /// Makes an instance, in the manager process.
    fn create(args: Self::Args) -> Self;
    /// Runs one call, in the manager process.
    fn call(&mut self, call: Self::Call) -> Self::Reply;
}

/// An instance held by the manager, called with encoded calls.
pub trait Object: Send {
    fn call(&mut self, call: &[u8]) -> Result<Vec<u8>, String>;
}

/// The adapter from a [`Served`] type to [`Object`].
struct Instance<T>(T);

impl<T: Served> Object for Instance<T> {
    fn call(&mut self, call: &[u8]) -> Result<Vec<u8>, String> {
        let call = decode::<T::Call>("call", call).map_err(|e| e.to_string())?;
        encode("reply", &self.0.call(call)).map_err(|e| e.to_string())
    }
}

/// The types a manager was built with (a list in the type:
/// [`Registered`]`<T, Registered<U, ()>>`); built by
/// [`ManagerBuilder::register`](super::ManagerBuilder::register).
pub trait Registry: 'static {
    #[doc(hidden)]
    /// An instance of the type named `typeid`, made from `args`; `None` if no type of this
    /// registry has that name.
    fn make(typeid: &str, args: &[u8]) -> Option<Result<Box<dyn Object>, String>>;
}

impl Registry for () {
    fn make(_: &str, _: &[u8]) -> Option<Result<Box<dyn Object>, String>> {
        None
    }
}

/// A registry holding `T` and then `Rest`.
pub struct Registered<T, Rest>(PhantomData<fn() -> (T, Rest)>);

impl<T, Rest> std::fmt::Debug for Registered<T, Rest> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Registered<{}, {}>",
            type_name::<T>(),
            type_name::<Rest>()
        )
    }
}

impl<T: Served, Rest: Registry> Registry for Registered<T, Rest> {
    fn make(typeid: &str, args: &[u8]) -> Option<Result<Box<dyn Object>, String>> {
        if typeid != type_name::<T>() {
            return Rest::make(typeid, args);
        }
        Some(
            decode::<T::Args>("argument", args)
                .map(|a| Box::new(Instance(T::create(a))) as Box<dyn Object>)
                .map_err(|e| e.to_string()),
        )
    }
}

proxy_type!(
    /// A proxy of an instance of a [`Served`] type held by a manager: Python's proxy of a
    /// registered type. Cloning it, or sending it to another process, gives another proxy
    /// of the same instance.
    ManagedObject<T>
);

impl<T: Served> ManagedObject<T> {
    /// Runs `call` on the instance, in the manager process; Python's `proxy.method(...)`.
    pub fn call(&self, call: &T::Call) -> Result<T::Reply, ManagerError> {
        let call = encode("call", call)?;
        match self.request(Request::CallObject {
            object: self.proxy.id,
            call,
        })? {
            Reply::Value(Some(v)) => decode("reply", &v),
            other => Err(unexpected(other)),
        }
    }
}
