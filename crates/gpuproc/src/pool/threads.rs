//! `ThreadPool`: the [`Pool`](super::Pool) API on threads of this process; Python's
//! `multiprocessing.pool.ThreadPool` (and `multiprocessing.dummy.Pool`), for I/O-bound work
//! and for tests.
//!
//! Tasks are closures (nothing is encoded: arguments and results move between threads), run
//! in chunks by a fixed set of threads that take them from one queue. It shares the
//! process pool's error type, chunking policy and callback thread.

use std::collections::{BTreeMap, VecDeque};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::callbacks::{CallbackThread, Callbacks, Collect};
use super::{panic_message, policy, AsyncResult, Input, PoolError};

/// A queued chunk of tasks.
type Task = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct State {
    tasks: VecDeque<Task>,
    closed: bool,
    terminated: bool,
}

#[derive(Default)]
struct Queue {
    state: Mutex<State>,
    ready: Condvar,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next task, or `None` once the pool is terminated, or closed and drained.
    fn next(&self) -> Option<Task> {
        let mut state = self.lock();
        loop {
            if state.terminated {
                return None;
            }
            if let Some(t) = state.tasks.pop_front() {
                return Some(t);
            }
            if state.closed {
                return None;
            }
            state = self.ready.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A pool of threads with [`Pool`](super::Pool)'s API; Python's `ThreadPool`
/// (`multiprocessing.dummy.Pool`).
///
/// Tasks are any `Fn(A) -> R + Send + Sync + 'static` (closures included); arguments and
/// results are moved, not encoded. A task that panics fails alone with
/// [`PoolError::Panicked`] (without a location) and its thread goes on.
///
/// Differences from [`Pool`](super::Pool), as in Python: there are no processes, so no
/// worker deaths, task timeouts or GPU settings; [`terminate`](Self::terminate) drops the
/// queued tasks (they fail with [`PoolError::Terminated`]) but cannot stop a running task: it
/// waits for the running ones to return. Dropping a `ThreadPool` terminates it. Its threads
/// are threads of this program: a [`StartMethod::Fork`](crate::StartMethod::Fork) process
/// or pool started while it lives needs `allow_fork_with_threads`.
///
/// ```
/// let pool = gpuproc::pool::ThreadPool::new(4)?;
/// let offset = 10;
/// assert_eq!(pool.map(move |x: u32| x + offset, 0..4)?, [10, 11, 12, 13]);
/// # Ok::<(), gpuproc::PoolError>(())
/// ```
pub struct ThreadPool {
    queue: Arc<Queue>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    processes: usize,
    callbacks: CallbackThread,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.queue.lock();
        f.debug_struct("ThreadPool")
            .field("threads", &self.processes)
            .field("queued", &state.tasks.len())
            .field("closed", &state.closed)
            .field("terminated", &state.terminated)
            .finish()
    }
}

/// Where a chunk's outcomes go.
trait Sink<R>: Send + 'static {
    fn put(&self, first: u64, outcomes: Vec<Result<R, PoolError>>);
}

impl<R: Send + 'static> Sink<R> for Sender<(u64, Vec<Result<R, PoolError>>)> {
    fn put(&self, first: u64, outcomes: Vec<Result<R, PoolError>>) {
        let _ = self.send((first, outcomes));
    }
}

impl<R: Send + 'static> Sink<R> for Arc<Mutex<Collect<R>>> {
    fn put(&self, first: u64, outcomes: Vec<Result<R, PoolError>>) {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(first, outcomes);
    }
}

/// A chunk's promise of outcomes: dropped without them (the pool terminated before the
/// chunk ran), it reports each of its tasks as [`PoolError::Terminated`].
struct Reply<R, S: Sink<R>> {
    sink: Option<S>,
    first: u64,
    n: usize,
    _r: std::marker::PhantomData<fn() -> R>,
}

impl<R, S: Sink<R>> Reply<R, S> {
    fn send(mut self, outcomes: Vec<Result<R, PoolError>>) {
        if let Some(sink) = self.sink.take() {
            sink.put(self.first, outcomes);
        }
    }
}

impl<R, S: Sink<R>> Drop for Reply<R, S> {
    fn drop(&mut self) {
        if let Some(sink) = self.sink.take() {
            let first = self.first;
            let lost = (0..self.n as u64)
                .map(|k| {
                    Err(PoolError::Terminated {
                        index: first.saturating_add(k),
                    })
                })
                .collect();
            sink.put(first, lost);
        }
    }
}

/// Runs `f` on each item, catching panics.
fn run_chunk<A, R>(
    f: &(dyn Fn(A) -> R + Sync),
    first: u64,
    items: Vec<A>,
) -> Vec<Result<R, PoolError>> {
    items
        .into_iter()
        .enumerate()
        .map(|(k, a)| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(a))).map_err(|payload| {
                PoolError::Panicked {
                    index: first.saturating_add(k as u64),
                    message: panic_message(payload.as_ref()),
                    location: None,
                }
            })
        })
        .collect()
}

impl ThreadPool {
    /// A pool of `threads` threads; `0` is an error ([`PoolError::InvalidArgument`]), as
    /// Python's `ThreadPool(0)` raises `ValueError`.
    pub fn new(threads: usize) -> Result<ThreadPool, PoolError> {
        policy::check_counts(threads, None)?;
        let queue = Arc::new(Queue::default());
        let pool = ThreadPool {
            queue: queue.clone(),
            threads: Mutex::new(Vec::new()),
            processes: threads,
            callbacks: CallbackThread::default(),
        };
        for i in 0..threads {
            let queue = queue.clone();
            let handle = std::thread::Builder::new()
                .name(format!("gpuproc-thread-pool-{i}"))
                .spawn(move || {
                    while let Some(task) = queue.next() {
                        task();
                    }
                })
                .map_err(|source| PoolError::Io {
                    context: "starting a thread pool's thread",
                    source,
                })?;
            pool.threads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(handle);
        }
        Ok(pool)
    }

    /// The number of threads.
    pub fn processes(&self) -> usize {
        self.processes
    }

    fn submit(&self, tasks: Vec<Task>) -> Result<(), PoolError> {
        let mut state = self.queue.lock();
        if state.closed || state.terminated {
            return Err(PoolError::Closed);
        }
        let n = tasks.len();
        state.tasks.extend(tasks);
        drop(state);
        if n == 1 {
            self.queue.ready.notify_one();
        } else {
            self.queue.ready.notify_all();
        }
        Ok(())
    }

    /// The tasks of `items` in chunks of `chunksize`, their outcomes going to `sink`.
    fn chunks<A, R, S>(
        f: &Arc<dyn Fn(A) -> R + Send + Sync>,
        items: impl Iterator<Item = A>,
        first: u64,
        chunksize: usize,
        sink: &S,
    ) -> (Vec<Task>, u64)
    where
        A: Send + 'static,
        R: Send + 'static,
        S: Sink<R> + Clone,
    {
        let mut tasks: Vec<Task> = Vec::new();
        let mut next = first;
        let mut items = items.peekable();
        while items.peek().is_some() {
            let chunk: Vec<A> = items.by_ref().take(chunksize.max(1)).collect();
            let reply = Reply {
                sink: Some(sink.clone()),
                first: next,
                n: chunk.len(),
                _r: std::marker::PhantomData,
            };
            let f = f.clone();
            let at = next;
            next = next.saturating_add(chunk.len() as u64);
            tasks.push(Box::new(move || {
                let outcomes = run_chunk(&*f, at, chunk);
                reply.send(outcomes);
            }));
        }
        (tasks, next)
    }

    /// Calls `f` on every item and returns the results in order (or the first failed
    /// task's error); Python's `ThreadPool.map`, with its automatic chunk size.
    pub fn map<A, R, I>(
        &self,
        f: impl Fn(A) -> R + Send + Sync + 'static,
        items: I,
    ) -> Result<Vec<R>, PoolError>
    where
        A: Send + 'static,
        R: Send + 'static,
        I: IntoIterator<Item = A>,
    {
        self.map_async(f, items)?.get()
    }

    /// Python's `starmap`: several arguments travel as a tuple; this is [`map`](Self::map).
    pub fn starmap<A, R, I>(
        &self,
        f: impl Fn(A) -> R + Send + Sync + 'static,
        items: I,
    ) -> Result<Vec<R>, PoolError>
    where
        A: Send + 'static,
        R: Send + 'static,
        I: IntoIterator<Item = A>,
    {
        self.map(f, items)
    }

    /// Queues every item and returns at once; Python's `ThreadPool.map_async`.
    pub fn map_async<A, R, I>(
        &self,
        f: impl Fn(A) -> R + Send + Sync + 'static,
        items: I,
    ) -> Result<AsyncResult<Vec<R>>, PoolError>
    where
        A: Send + 'static,
        R: Send + 'static,
        I: IntoIterator<Item = A>,
    {
        self.map_async_with(f, items, Callbacks::new())
    }

    /// Python's `starmap_async`: [`map_async`](Self::map_async).
    pub fn starmap_async<A, R, I>(
        &self,
        f: impl Fn(A) -> R + Send + Sync + 'static,
        items: I,
    ) -> Result<AsyncResult<Vec<R>>, PoolError>
    where
        A: Send + 'static,
        R: Send + 'static,
        I: IntoIterator<Item = A>,
    {
        self.map_async(f, items)
    }

    /// Python's `starmap_async` with `callback` and `error_callback`:
    /// [`map_async_with`](Self::map_async_with).
    pub fn starmap_async_with<A, R, I>(
        &self,
        f: impl Fn(A) -> R + Send + Sync + 'static,
        items: I,
        callbacks: Callbacks<Vec<R>>,
    ) -> Result<AsyncResult<Vec<R>>, PoolError>
    where
        A: Send + 'static,
        R: Send + 'static,
        I: IntoIterator<Item = A>,
    {
        self.map_async_with(f, items, callbacks)
    }

    /// [`map_async`](Self::map_async) with Python's `callback` and `error_callback`, run on
    /// the pool's callback thread as [`Pool::apply_async_with`](super::Pool::apply_async_with)
    /// runs them.
    pub fn map_async_with<A, R, I>(
        &self,
        f: impl Fn(A) -> R + Send + Sync + 'static,
        items: I,
        callbacks: Callbacks<Vec<R>>,
    ) -> Result<AsyncResult<Vec<R>>, PoolError>
    where
        A: Send + 'static,
        R: Send + 'static,
        I: IntoIterator<Item = A>,
    {
        let items = Input::new(items.into_iter());
        let len = items.len;
        let (tx, rx) = mpsc::channel();
        let collect = if callbacks.is_empty() {
            Collect::new(len, move |all| {
                let _ = tx.send(all);
            })
        } else {
            let events = self.callbacks.sender()?;
            Collect::new(len, move |all| {
                let _ = events.send(Box::new(move || {
                    callbacks.run(&all);
                    let _ = tx.send(all);
                }));
            })
        };
        let f: Arc<dyn Fn(A) -> R + Send + Sync> = Arc::new(f);
        let chunksize = policy::auto_chunksize(len, self.processes);
        let (tasks, _) = Self::chunks(&f, items, 0, chunksize, &collect);
        if tasks.is_empty() {
            collect
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .finish_if_empty();
        } else {
            self.submit(tasks)?;
        }
        Ok(AsyncResult::decoded(rx))
    }

    /// Runs one task and waits for its result; Python's `apply`.
    pub fn apply<A, R>(
        &self,
        f: impl Fn(A) -> R + Send + Sync + 'static,
        args: A,
    ) -> Result<R, PoolError>
    where
        A: Send + 'static,
        R: Send + 'static,
    {
        self.apply_async(f, args)?.get()
    }

    /// Queues one task and returns at once; Python's `apply_async`.
    pub fn apply_async<A, R>(
        &self,
        f: impl Fn(A) -> R + Send + Sync + 'static,
        args: A,
    ) -> Result<AsyncResult<R>, PoolError>
    where
        A: Send + 'static,
        R: Send + 'static,
    {
        self.apply_async_with(f, args, Callbacks::new())
    }

    /// [`apply_async`](Self::apply_async) with Python's `callback` and `error_callback`.
    pub fn apply_async_with<A, R>(
        &self,
        f: impl Fn(A) -> R + Send + Sync + 'static,
        args: A,
        callbacks: Callbacks<R>,
    ) -> Result<AsyncResult<R>, PoolError>
    where
        A: Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        let one = |all: Result<Vec<R>, PoolError>| {
            all.and_then(|mut v| v.pop().ok_or(PoolError::Terminated { index: 0 }))
        };
        let collect = if callbacks.is_empty() {
            Collect::new(1, move |all| {
                let _ = tx.send(one(all));
            })
        } else {
            let events = self.callbacks.sender()?;
            Collect::new(1, move |all| {
                let _ = events.send(Box::new(move || {
                    let r = one(all);
                    callbacks.run(&r);
                    let _ = tx.send(r);
                }));
            })
        };
        let f: Arc<dyn Fn(A) -> R + Send + Sync> = Arc::new(f);
        let (tasks, _) = Self::chunks(&f, std::iter::once(args), 0, 1, &collect);
        self.submit(tasks)?;
        Ok(AsyncResult::decoded(rx))
    }

    /// A lazy, ordered iterator of results; Python's `imap` (chunk size 1 by default).
    pub fn imap<A, R, I>(
        &self,
        f: impl Fn(A) -> R + Send + Sync + 'static,
        items: I,
    ) -> ThreadImap<'_, A, R, I::IntoIter>
    where
        A: Send + 'static,
        R: Send + 'static,
        I: IntoIterator<Item = A>,
    {
        ThreadImap::new(self, Arc::new(f), items.into_iter(), true)
    }

    /// Like [`imap`](Self::imap), yielding results as they finish; Python's
    /// `imap_unordered`.
    pub fn imap_unordered<A, R, I>(
        &self,
        f: impl Fn(A) -> R + Send + Sync + 'static,
        items: I,
    ) -> ThreadImap<'_, A, R, I::IntoIter>
    where
        A: Send + 'static,
        R: Send + 'static,
        I: IntoIterator<Item = A>,
    {
        ThreadImap::new(self, Arc::new(f), items.into_iter(), false)
    }

    /// No more tasks will be submitted; queued ones still run. Python's `close`.
    pub fn close(&self) {
        self.queue.lock().closed = true;
        self.queue.ready.notify_all();
    }

    /// Waits for the queued tasks to finish and the threads to end, and for every
    /// callback; closes the pool first. Python's `join`.
    pub fn join(&self) {
        self.close();
        self.join_threads();
    }

    fn join_threads(&self) {
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        let me = std::thread::current().id();
        for t in threads {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
        self.callbacks.stop();
    }

    /// Drops the queued tasks (they fail with [`PoolError::Terminated`]) and waits for the
    /// running ones to return (a thread cannot be killed); Python's `terminate`.
    pub fn terminate(&self) {
        let dropped = {
            let mut state = self.queue.lock();
            state.terminated = true;
            std::mem::take(&mut state.tasks)
        };
        self.queue.ready.notify_all();
        drop(dropped);
        self.join_threads();
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Outcomes of a chunk, on an imap's channel.
type ChunkOutcomes<R> = (u64, Vec<Result<R, PoolError>>);

/// The iterator behind [`ThreadPool::imap`] and [`ThreadPool::imap_unordered`]: yields each
/// task's result or error, taking input only as results are consumed.
#[must_use = "a ThreadImap does nothing until it is iterated"]
pub struct ThreadImap<'p, A, R, I> {
    pool: &'p ThreadPool,
    f: Arc<dyn Fn(A) -> R + Send + Sync>,
    input: std::iter::Fuse<I>,
    ordered: bool,
    chunksize: usize,
    tx: Sender<ChunkOutcomes<R>>,
    rx: Receiver<ChunkOutcomes<R>>,
    next_index: u64,
    next_yield: u64,
    outstanding: usize,
    done: BTreeMap<u64, Result<R, PoolError>>,
}

impl<A, R, I> std::fmt::Debug for ThreadImap<'_, A, R, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadImap")
            .field("ordered", &self.ordered)
            .field("chunksize", &self.chunksize)
            .field("submitted", &self.next_index)
            .field("outstanding", &self.outstanding)
            .finish()
    }
}

impl<'p, A, R, I> ThreadImap<'p, A, R, I>
where
    A: Send + 'static,
    R: Send + 'static,
    I: Iterator<Item = A>,
{
    fn new(
        pool: &'p ThreadPool,
        f: Arc<dyn Fn(A) -> R + Send + Sync>,
        input: I,
        ordered: bool,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        ThreadImap {
            pool,
            f,
            input: input.fuse(),
            ordered,
            chunksize: 1,
            tx,
            rx,
            next_index: 0,
            next_yield: 0,
            outstanding: 0,
            done: BTreeMap::new(),
        }
    }

    /// Hands tasks to threads in chunks of `n` (Python's `chunksize`; default 1).
    pub fn chunksize(mut self, n: usize) -> Self {
        self.chunksize = n.max(1);
        self
    }

    fn fill(&mut self) -> Result<(), PoolError> {
        let window = policy::imap_window(self.pool.processes, self.chunksize);
        let room = window.saturating_sub(self.outstanding);
        if room == 0 {
            return Ok(());
        }
        let items = self.input.by_ref().take(room);
        let (tasks, next) =
            ThreadPool::chunks(&self.f, items, self.next_index, self.chunksize, &self.tx);
        if tasks.is_empty() {
            return Ok(());
        }
        let n = usize::try_from(next - self.next_index).unwrap_or(usize::MAX);
        self.pool.submit(tasks)?;
        self.next_index = next;
        self.outstanding = self.outstanding.saturating_add(n);
        Ok(())
    }
}

impl<A, R, I> Iterator for ThreadImap<'_, A, R, I>
where
    A: Send + 'static,
    R: Send + 'static,
    I: Iterator<Item = A>,
{
    type Item = Result<R, PoolError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let ready = if self.ordered {
                self.done.remove(&self.next_yield)
            } else {
                self.done.pop_first().map(|(_, r)| r)
            };
            if let Some(r) = ready {
                self.next_yield += 1;
                self.outstanding = self.outstanding.saturating_sub(1);
                return Some(r);
            }
            if let Err(e) = self.fill() {
                return Some(Err(e));
            }
            if self.outstanding == 0 {
                return None;
            }
            // (Each chunk sends its outcomes, or Terminated errors when it is dropped
            // unrun, so this always ends.)
            match self.rx.recv() {
                Ok((first, outcomes)) => {
                    for (k, r) in outcomes.into_iter().enumerate() {
                        self.done.insert(first.saturating_add(k as u64), r);
                    }
                }
                Err(_) => return None,
            }
        }
    }
}
