//! `get_context`: Python's context objects, the library's constructors bound to one start
//! method.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::channel::{ChannelError, Connection, JoinableQueue, Pipe, Queue, SimpleQueue};
use crate::pool::PoolBuilder;
use crate::process::{Process, StartMethod};
use crate::shm::{Scalar, SharedArray, SharedValue, ShmError};
use crate::sync::{Barrier, BoundedSemaphore, Condition, Event, Lock, RLock, Semaphore, SyncError};

/// The library's constructors with `method` as the start method of the processes and pools
/// they make; Python's `multiprocessing.get_context(method)`.
///
/// Use it where one part of a program needs another start method than the default
/// ([`set_start_method`](crate::set_start_method)) without changing it for the rest.
///
/// ```
/// # gpuproc::init();
/// use gpuproc::StartMethod;
///
/// let ctx = gpuproc::get_context(StartMethod::Spawn);
/// let q = ctx.queue::<u32>()?;
/// let mut p = ctx.process(|q: gpuproc::Queue<u32>| q.put(3).unwrap(), q.clone());
/// assert_eq!(p.start_method(), StartMethod::Spawn);
/// p.start()?;
/// assert_eq!(q.get_timeout(std::time::Duration::from_secs(60))?, 3);
/// p.join()?;
/// let pool = ctx.pool().processes(2).build()?;
/// assert_eq!(pool.map(|x: u32| x * 2, [1, 2])?, [2, 4]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn get_context(method: StartMethod) -> Context {
    Context { method }
}

/// Constructors bound to one start method; Python's `multiprocessing` context objects
/// (`SpawnContext`, `ForkServerContext`, `ForkContext`), from [`get_context`].
///
/// Only processes and pools start processes; the queues, pipes, locks and shared values
/// made here are the same as those made directly (in Python, too, they differ only in the
/// context they start helper processes with, which gpuproc does not need).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    method: StartMethod,
}

impl Context {
    /// The context's start method; Python's `ctx.get_start_method()`.
    pub fn get_start_method(&self) -> StartMethod {
        self.method
    }

    /// A process started with this context's method; Python's `ctx.Process(target, args)`.
    pub fn process<A, R>(&self, target: fn(A) -> R, args: A) -> Process<A, R>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        Process::new(target, args).with_start_method(self.method)
    }

    /// A pool builder whose workers start with this context's method; Python's
    /// `ctx.Pool(...)` (set the rest on the builder, then [`build`](PoolBuilder::build)).
    pub fn pool(&self) -> PoolBuilder {
        crate::Pool::builder().start_method(self.method)
    }

    /// Python's `ctx.Queue()`: see [`Queue::new`].
    pub fn queue<T: Serialize + DeserializeOwned>(&self) -> Result<Queue<T>, ChannelError> {
        Queue::new()
    }

    /// Python's `ctx.Queue(maxsize)`: see [`Queue::bounded`].
    pub fn bounded_queue<T: Serialize + DeserializeOwned>(
        &self,
        maxsize: usize,
    ) -> Result<Queue<T>, ChannelError> {
        Queue::bounded(maxsize)
    }

    /// Python's `ctx.JoinableQueue()`: see [`JoinableQueue::new`].
    pub fn joinable_queue<T: Serialize + DeserializeOwned>(
        &self,
    ) -> Result<JoinableQueue<T>, ChannelError> {
        JoinableQueue::new()
    }

    /// Python's `ctx.SimpleQueue()`: see [`SimpleQueue::new`].
    pub fn simple_queue<T: Serialize + DeserializeOwned>(
        &self,
    ) -> Result<SimpleQueue<T>, ChannelError> {
        SimpleQueue::new()
    }

    /// Python's `ctx.Pipe()`: see [`Pipe::new`] (and [`Pipe::simplex`] for
    /// `duplex=False`).
    pub fn pipe(&self) -> Result<(Connection, Connection), ChannelError> {
        Pipe::new()
    }

    /// Python's `ctx.Lock()`.
    pub fn lock(&self) -> Result<Lock, SyncError> {
        Lock::new()
    }

    /// Python's `ctx.RLock()`.
    pub fn rlock(&self) -> Result<RLock, SyncError> {
        RLock::new()
    }

    /// Python's `ctx.Semaphore(value)`.
    pub fn semaphore(&self, value: u32) -> Result<Semaphore, SyncError> {
        Semaphore::new(value)
    }

    /// Python's `ctx.BoundedSemaphore(value)`.
    pub fn bounded_semaphore(&self, value: u32) -> Result<BoundedSemaphore, SyncError> {
        BoundedSemaphore::new(value)
    }

    /// Python's `ctx.Event()`.
    pub fn event(&self) -> Result<Event, SyncError> {
        Event::new()
    }

    /// Python's `ctx.Condition()`.
    pub fn condition(&self) -> Result<Condition, SyncError> {
        Condition::new()
    }

    /// Python's `ctx.Barrier(parties)`.
    pub fn barrier(&self, parties: u32) -> Result<Barrier, SyncError> {
        Barrier::new(parties)
    }

    /// Python's `ctx.Value(typecode, value)`: see [`SharedValue::new`].
    pub fn value<T: Scalar>(&self, value: T) -> Result<SharedValue<T>, ShmError> {
        SharedValue::new(value)
    }

    /// Python's `ctx.Array(typecode, values)`: see [`SharedArray::from_slice`].
    pub fn array<T: Scalar>(&self, values: &[T]) -> Result<SharedArray<T>, ShmError> {
        SharedArray::from_slice(values)
    }
}

impl Default for Context {
    /// The context of the current default start method
    /// ([`get_start_method`](crate::get_start_method)); Python's `get_context()`.
    fn default() -> Self {
        get_context(crate::get_start_method())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_binds_its_start_method() {
        for m in StartMethod::all() {
            let ctx = get_context(m);
            assert_eq!(ctx.get_start_method(), m);
            assert_eq!(ctx.process(|x: u32| x, 1).start_method(), m);
        }
        assert_eq!(
            Context::default().get_start_method(),
            crate::get_start_method()
        );
    }
}
