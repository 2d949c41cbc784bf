//! Callbacks of `apply_async`/`map_async` (Python's `callback` and `error_callback`): one
//! thread per pool, started with the first callback, runs them in the order the tasks
//! complete, never on the caller's thread nor on the pool's driver thread.
//!
//! A job with callbacks forwards its outcomes (see `driver::Job::forward`) as events to this
//! thread, which decodes them, runs the callback, and then hands the result to the job's
//! [`AsyncResult`](super::AsyncResult).

use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, ThreadId};

use serde::de::DeserializeOwned;

use super::driver::ToJob;
use super::{panic_message, PoolError, RunReader};

/// A callback given a result.
type OnResult<R> = Box<dyn FnOnce(&R) + Send>;
/// A callback given an error.
type OnError = Box<dyn FnOnce(&PoolError) + Send>;
/// What a [`Collect`] calls when done.
type Finish<R> = Box<dyn FnOnce(Result<Vec<R>, PoolError>) + Send>;

/// Work for the callback thread.
pub(crate) type Event = Box<dyn FnOnce() + Send>;

/// Python's `callback` and `error_callback` of `apply_async` and `map_async`: what to run,
/// on the pool's callback thread, when the task (or, for `map_async`, every task) has
/// finished.
///
/// Unlike Python, the callbacks get the result by reference: the result itself still goes
/// to [`AsyncResult::get`](super::AsyncResult::get), after the callback has returned (as in
/// Python, where the result is ready only once the callback has run).
///
/// ```
/// # gpuproc::init();
/// use std::sync::mpsc;
/// use gpuproc::pool::Callbacks;
///
/// fn square(x: u64) -> u64 { x * x }
///
/// let pool = gpuproc::Pool::new(2)?;
/// let (tx, rx) = mpsc::channel();
/// let result = pool.map_async_with(
///     square,
///     0..4u64,
///     Callbacks::new().callback(move |squares: &Vec<u64>| {
///         let _ = tx.send(squares.iter().sum::<u64>());
///     }),
/// )?;
/// assert_eq!(result.get()?, [0, 1, 4, 9]);
/// assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(60))?, 14);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use = "callbacks do nothing until given to apply_async_with or map_async_with"]
pub struct Callbacks<R> {
    callback: Option<OnResult<R>>,
    error_callback: Option<OnError>,
}

impl<R> Default for Callbacks<R> {
    fn default() -> Self {
        Callbacks {
            callback: None,
            error_callback: None,
        }
    }
}

impl<R> std::fmt::Debug for Callbacks<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callbacks")
            .field("callback", &self.callback.is_some())
            .field("error_callback", &self.error_callback.is_some())
            .finish()
    }
}

impl<R> Callbacks<R> {
    /// No callbacks (add them with [`callback`](Self::callback) and
    /// [`error_callback`](Self::error_callback)).
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` with the result when the work succeeded; Python's `callback`.
    pub fn callback(mut self, f: impl FnOnce(&R) + Send + 'static) -> Self {
        self.callback = Some(Box::new(f));
        self
    }

    /// Runs `f` with the error when the work failed; Python's `error_callback`.
    pub fn error_callback(mut self, f: impl FnOnce(&PoolError) + Send + 'static) -> Self {
        self.error_callback = Some(Box::new(f));
        self
    }

    /// Whether neither callback is set.
    pub(crate) fn is_empty(&self) -> bool {
        self.callback.is_none() && self.error_callback.is_none()
    }

    /// Runs the callback that matches `outcome`. A panicking callback is caught: its message
    /// goes to standard error, and the pool, its callback thread and `outcome` go on.
    pub(crate) fn run(self, outcome: &Result<R, PoolError>) {
        let call = std::panic::AssertUnwindSafe(|| match outcome {
            Ok(r) => {
                if let Some(f) = self.callback {
                    f(r)
                }
            }
            Err(e) => {
                if let Some(f) = self.error_callback {
                    f(e)
                }
            }
        });
        if let Err(payload) = std::panic::catch_unwind(call) {
            eprintln!(
                "gpuproc: a pool callback panicked: {}; the pool goes on",
                panic_message(payload.as_ref())
            );
        }
    }
}

/// A pool's callback thread, started with the first job that has callbacks.
#[derive(Debug, Default)]
pub(crate) struct CallbackThread {
    inner: Mutex<Option<(Sender<Event>, JoinHandle<()>)>>,
}

impl CallbackThread {
    /// Where to send events (starting the thread if needed).
    pub fn sender(&self) -> Result<Sender<Event>, PoolError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((tx, _)) = inner.as_ref() {
            return Ok(tx.clone());
        }
        let (tx, rx) = mpsc::channel::<Event>();
        let handle = std::thread::Builder::new()
            .name("gpuproc-callbacks".into())
            .spawn(move || {
                for event in rx {
                    event();
                }
            })
            .map_err(|source| PoolError::Io {
                context: "starting the pool's callback thread",
                source,
            })?;
        *inner = Some((tx.clone(), handle));
        Ok(tx)
    }

    /// Lets the thread run the events already sent and end, and waits for it (unless this
    /// is that thread: a callback that ends its own pool).
    pub fn stop(&self) {
        let taken = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((tx, handle)) = taken {
            drop(tx);
            if handle.thread().id() != current() {
                let _ = handle.join();
            }
        }
    }
}

fn current() -> ThreadId {
    std::thread::current().id()
}

/// Collects the outcomes of a job's `n` tasks (in any order), then calls `finish` once with
/// all the results in order, or with the first error.
pub(crate) struct Collect<R> {
    slots: Vec<Option<R>>,
    missing: usize,
    finish: Option<Finish<R>>,
}

impl<R: Send + 'static> Collect<R> {
    pub fn new(
        n: usize,
        finish: impl FnOnce(Result<Vec<R>, PoolError>) + Send + 'static,
    ) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Collect {
            slots: std::iter::repeat_with(|| None).take(n).collect(),
            missing: n,
            finish: Some(Box::new(finish)),
        }))
    }

    /// Takes the outcomes of tasks `first..`: a failure finishes at once.
    pub fn put(&mut self, first: u64, outcomes: Vec<Result<R, PoolError>>) {
        if self.finish.is_none() {
            return;
        }
        for (k, outcome) in outcomes.into_iter().enumerate() {
            match outcome {
                Ok(v) => self.fill(first, k, v),
                Err(e) => return self.done(Err(e)),
            }
        }
        self.done_if_full();
    }

    fn fill(&mut self, first: u64, k: usize, v: R) {
        let slot = first
            .checked_add(k as u64)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.slots.get_mut(i));
        if let Some(slot) = slot {
            if slot.replace(v).is_none() {
                self.missing = self.missing.saturating_sub(1);
            }
        }
    }

    fn done_if_full(&mut self) {
        if self.missing == 0 && self.finish.is_some() {
            let all: Option<Vec<R>> = self.slots.drain(..).collect();
            self.done(all.ok_or(PoolError::Terminated { index: 0 }));
        }
    }

    /// Finishes at once if no task is expected (an empty `map_async`).
    pub fn finish_if_empty(&mut self) {
        if self.missing == 0 {
            self.done(Ok(Vec::new()));
        }
    }

    fn done(&mut self, outcome: Result<Vec<R>, PoolError>) {
        self.slots = Vec::new();
        if let Some(finish) = self.finish.take() {
            finish(outcome);
        }
    }
}

impl<R: DeserializeOwned + Send + 'static> Collect<R> {
    /// The closure for `Job::forward`: each message becomes an event on `events`.
    pub fn forwarder(
        this: Arc<Mutex<Self>>,
        events: Sender<Event>,
    ) -> Box<dyn Fn(ToJob) + Send + Sync> {
        let events = Mutex::new(events);
        Box::new(move |msg| {
            let this = this.clone();
            let event: Event = Box::new(move || {
                this.lock().unwrap_or_else(|p| p.into_inner()).take(msg);
            });
            let _ = events.lock().unwrap_or_else(|p| p.into_inner()).send(event);
        })
    }

    fn take(&mut self, msg: ToJob) {
        if self.finish.is_none() {
            return;
        }
        match msg {
            ToJob::Runs(runs) => {
                for run in runs {
                    let first = run.first_index;
                    let n = run.lens.len();
                    let mut reader = RunReader::new(run);
                    for k in 0..n {
                        match reader.next::<R>() {
                            Ok(v) => self.fill(first, k, v),
                            Err(e) => return self.done(Err(e)),
                        }
                    }
                }
            }
            ToJob::DriverDied(message) => return self.done(Err(PoolError::DriverDied { message })),
        }
        self.done_if_full();
    }
}
