//! `Queue`, `JoinableQueue` and `SimpleQueue`: Python's multi-producer, multi-consumer
//! queues between processes.
//!
//! All handles to one queue share one `SOCK_SEQPACKET` socket pair (puts send on one end,
//! gets receive on the other; each receive takes exactly one whole message, so any number of
//! processes can put and get without a lock) and one page of shared memory with counters:
//! the approximate size, the free slots of a bounded queue, and the unfinished tasks of a
//! joinable one, each waited on with a futex.
//!
//! # A producer that dies inside `put`
//! A put takes a free slot (bounded queues) and counts an unfinished task (joinable ones)
//! before its item is queued, so that a consumer never sees an item that is not yet
//! counted. A producer killed in between would keep them for ever (Python's queues do):
//! the queue would stay full, and `join` would wait for ever. So each put records, in the
//! shared page, its process and what it has taken ([`PutRecord`]); a waiter for a free slot
//! or for `join` looks every [`RECLAIM_EVERY`] for records of processes that have ended (or
//! are zombies) and gives back what they had taken. A record is cleared just before each
//! attempt to queue the datagram (a non-blocking `sendmsg`) and set again if the socket had
//! no room, so an item that was queued is never given back twice. What is left: a producer
//! killed in the few instructions between taking the slot and recording it, or during a
//! `sendmsg` that found no room, keeps what it took, as before; so does one whose process
//! id a new process took before a waiter looked (ids are reused only after a full cycle);
//! and more than [`RECORDS`] puts holding something at once go unrecorded.

use std::marker::PhantomData;
use std::ops::Deref;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::wire::{self, Wait};
use super::{
    Bytes, BytesRef, ChannelError, FdRef, SendError, SharedBytes, DEFAULT_MAX_MESSAGE_SIZE,
};
use crate::connection::Waitable;
use crate::sys::seqpacket::{self as sp, MapCache};
use crate::sys::shm::{self, Mapping};

/// The shared page: these 32-bit words.
const WORDS: usize = 6;
const STATE_LEN: usize = 4096;
/// Messages in the queue (signed, may dip below zero for a moment).
const ITEMS: usize = 0;
/// Free slots of a bounded queue.
const FREE: usize = 1;
/// Processes waiting for a free slot.
const FREE_WAITERS: usize = 2;
/// Items put and not yet marked done (joinable queues).
const UNFINISHED: usize = 3;
/// 1 if the queue is joinable.
const JOINABLE: usize = 4;
/// [`OPEN`], [`SHUT`] or [`SHUT_NOW`]: whether and how the queue was shut down.
const SHUTDOWN: usize = 5;

/// The queue works as usual.
const OPEN: u32 = 0;
/// `shutdown(false)`: puts fail, gets take what is left and then fail.
const SHUT: u32 = 1;
/// `shutdown(true)`: puts and gets fail at once; what was queued is gone.
const SHUT_NOW: u32 = 2;

/// The largest bound a queue accepts.
const MAX_BOUND: usize = i32::MAX as usize;

/// Where the put records start in the shared page (64-bit words).
const RECORDS_AT: usize = 64;
/// How many puts in progress can be recorded at once.
const RECORDS: usize = 128;
const _: () = assert!(RECORDS_AT + RECORDS * 8 <= STATE_LEN && RECORDS_AT >= WORDS * 4);
/// How often a waiter for a free slot or for `join` looks for puts of ended processes.
const RECLAIM_EVERY: Duration = Duration::from_millis(100);

/// A record's flag: the put has taken a free slot.
const HOLDS_SLOT: u32 = 1;
/// A record's flag: the put has counted an unfinished task.
const HOLDS_TASK: u32 = 2;

/// What a put records in progress: its process id (high 32 bits) and what it holds (low 32
/// bits, [`HOLDS_SLOT`] and [`HOLDS_TASK`]); zero when free.
fn record_word(pid: u32, holds: u32) -> u64 {
    (u64::from(pid) << 32) | u64::from(holds)
}

/// A record's process and what it holds.
fn record_parts(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

/// A put's record in the shared page (see the module docs): taken when the put first holds
/// something, freed on drop.
struct PutRecord<'a> {
    shared: &'a Shared,
    word: std::cell::Cell<Option<&'a AtomicU64>>,
    pid: u32,
    holds: std::cell::Cell<u32>,
}

impl<'a> PutRecord<'a> {
    fn new(shared: &'a Shared) -> Self {
        PutRecord {
            shared,
            word: std::cell::Cell::new(None),
            pid: crate::sys::getpid(),
            holds: std::cell::Cell::new(0),
        }
    }

    /// Adds `flag` to what the put holds (taking a free record, if there is one, the first
    /// time).
    fn hold(&self, flag: u32) {
        self.holds.set(self.holds.get() | flag);
        if self.word.get().is_none() {
            let v = record_word(self.pid, self.holds.get());
            let free = (0..RECORDS)
                .map(|i| self.shared.record(i))
                .find(|w| w.load(SeqCst) == 0 && w.compare_exchange(0, v, SeqCst, SeqCst).is_ok());
            self.word.set(free);
        } else {
            self.show(true);
        }
    }

    /// Shows what the put holds (`true`), or nothing (`false`: just before the datagram may
    /// be queued).
    fn show(&self, holding: bool) {
        if let Some(w) = self.word.get() {
            let holds = if holding { self.holds.get() } else { 0 };
            w.store(record_word(self.pid, holds), SeqCst);
        }
    }
}

impl Drop for PutRecord<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.word.get() {
            w.store(0, SeqCst);
        }
    }
}

/// Test hook: from now on every put in this process stops for ever once it has taken its
/// slot and counted its task, before it sends (so that a test can kill it there).
#[doc(hidden)]
pub fn stall_puts_after_taking_slot() {
    STALL.store(true, SeqCst);
}

static STALL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(Debug)]
struct Shared {
    tx: OwnedFd,
    rx: OwnedFd,
    /// The shared page of counters (its memfd travels with the queue).
    state: Mapping,
    maxsize: usize,
    /// This process's mappings of the reused memfds that large items come in.
    maps: MapCache,
}

impl Shared {
    fn create(maxsize: usize, joinable: bool) -> Result<Self, ChannelError> {
        let (tx, rx) = sp::socketpair().map_err(ChannelError::io("creating a socket pair"))?;
        let state = Mapping::anonymous("gpuproc-queue", STATE_LEN)
            .map_err(ChannelError::io("creating shared memory"))?;
        let shared = Shared {
            tx,
            rx,
            state,
            maxsize,
            maps: MapCache::default(),
        };
        shared.word(FREE).store(maxsize as u32, SeqCst);
        shared.word(JOINABLE).store(joinable as u32, SeqCst);
        Ok(shared)
    }

    fn word(&self, i: usize) -> &AtomicU32 {
        debug_assert!(i < WORDS);
        self.state.atomic_u32(i * 4)
    }

    fn bounded(&self) -> bool {
        self.maxsize > 0
    }

    fn record(&self, i: usize) -> &AtomicU64 {
        self.state.atomic_u64(RECORDS_AT + i * 8)
    }

    /// Gives back the slots and tasks that puts of ended processes held, and frees their
    /// records (see the module docs). Called by waiters when they find nothing free, at
    /// most every [`RECLAIM_EVERY`] each while they wait.
    fn reclaim(&self) {
        for i in 0..RECORDS {
            let w = self.record(i);
            let v = w.load(SeqCst);
            if v == 0 {
                continue;
            }
            let (pid, holds) = record_parts(v);
            if !sp::process_ended(pid) || w.compare_exchange(v, 0, SeqCst, SeqCst).is_err() {
                continue;
            }
            if holds & HOLDS_TASK != 0 {
                let _ = self.task_done();
            }
            if holds & HOLDS_SLOT != 0 && self.bounded() {
                self.release_slot();
            }
        }
    }

    /// Takes a free slot of a bounded queue; `false` if none came before `deadline`.
    fn acquire_slot(&self, wait: Wait) -> Result<bool, ChannelError> {
        let free = self.word(FREE);
        let deadline = match wait {
            Wait::Forever => None,
            Wait::Never => Some(Instant::now()),
            Wait::For(d) => crate::time::deadline(d),
        };
        loop {
            if self.shutdown_state() != OPEN {
                return Err(ChannelError::ShutDown);
            }
            let v = free.load(SeqCst);
            if v > 0 {
                if free.compare_exchange(v, v - 1, SeqCst, SeqCst).is_ok() {
                    return Ok(true);
                }
                continue;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                // A last look for slots that producers killed inside `put` held.
                self.reclaim();
                if free.load(SeqCst) > 0 {
                    continue;
                }
                return Ok(false);
            }
            let waiters = self.word(FREE_WAITERS);
            waiters.fetch_add(1, SeqCst);
            // A timeout shows in the next round's deadline check.
            let woken = shm::futex_wait(free, 0, Some(reclaim_deadline(deadline)));
            waiters.fetch_sub(1, SeqCst);
            if !woken {
                // Every RECLAIM_EVERY: slots that producers killed inside `put` held.
                self.reclaim();
            }
        }
    }

    fn release_slot(&self) {
        let free = self.word(FREE);
        free.fetch_add(1, SeqCst);
        if self.word(FREE_WAITERS).load(SeqCst) > 0 {
            shm::futex_wake(free, 1);
        }
    }

    fn joinable(&self) -> bool {
        self.word(JOINABLE).load(SeqCst) == 1
    }

    fn task_done(&self) -> Result<(), ChannelError> {
        let unfinished = self.word(UNFINISHED);
        loop {
            let v = unfinished.load(SeqCst);
            if v == 0 {
                return Err(ChannelError::TaskDoneTooOften);
            }
            if unfinished
                .compare_exchange(v, v - 1, SeqCst, SeqCst)
                .is_ok()
            {
                if v == 1 {
                    shm::futex_wake(unfinished, u32::MAX);
                }
                return Ok(());
            }
        }
    }

    fn join(&self, wait: Wait) -> Result<(), ChannelError> {
        let unfinished = self.word(UNFINISHED);
        let deadline = match wait {
            Wait::Forever | Wait::Never => None,
            Wait::For(d) => crate::time::deadline(d),
        };
        loop {
            let v = unfinished.load(SeqCst);
            if v == 0 {
                return Ok(());
            }
            let in_time = shm::futex_wait(unfinished, v, Some(reclaim_deadline(deadline)));
            if in_time {
                continue;
            }
            // Every RECLAIM_EVERY (and at the deadline): tasks that producers killed inside
            // `put` counted.
            self.reclaim();
            let expired = deadline.is_some_and(|d| Instant::now() >= d);
            if expired && unfinished.load(SeqCst) != 0 {
                return Err(wait.expired(ChannelError::Empty));
            }
        }
    }

    fn shutdown_state(&self) -> u32 {
        self.word(SHUTDOWN).load(SeqCst)
    }

    /// After a shutdown, the sending socket is shut down too: an error from it (or the
    /// end of the stream on the receiving one) is the shutdown.
    fn or_shutdown(&self, e: ChannelError) -> ChannelError {
        if e.is_disconnected() && self.shutdown_state() != OPEN {
            ChannelError::ShutDown
        } else {
            e
        }
    }

    fn shutdown(&self, immediate: bool) -> Result<(), ChannelError> {
        self.word(SHUTDOWN)
            .fetch_max(if immediate { SHUT_NOW } else { SHUT }, SeqCst);
        // Putters waiting for a slot look at the state again; putters waiting for room in
        // the socket and getters waiting for an item wake with the socket's shutdown.
        shm::futex_wake(self.word(FREE), u32::MAX);
        sp::shutdown_both(self.tx.as_fd()).map_err(ChannelError::io("shutting a queue down"))?;
        if immediate {
            // Python's `shutdown(immediate=True)`: what is queued is dropped, and each item
            // counts as a task done, so that `join` returns.
            loop {
                let got = wire::recv_with(
                    self.rx.as_fd(),
                    &self.maps,
                    usize::MAX,
                    Wait::Never,
                    || {
                        self.taken();
                        if self.joinable() {
                            let _ = self.task_done();
                        }
                    },
                    |_, _| Ok(()),
                );
                match got {
                    Ok(()) => {}
                    Err(e) if e.is_malformed() || e.is_too_large() => {}
                    Err(_) => break,
                }
            }
        }
        Ok(())
    }

    fn put<T: Serialize>(&self, value: T, max: usize, wait: Wait) -> Result<(), SendError<T>> {
        if self.shutdown_state() != OPEN {
            return Err(SendError::new(value, ChannelError::ShutDown));
        }
        let record = PutRecord::new(self);
        if self.bounded() {
            match self.acquire_slot(wait) {
                Ok(true) => record.hold(HOLDS_SLOT),
                Ok(false) => {
                    let full = ChannelError::Full {
                        maxsize: self.maxsize,
                    };
                    return Err(SendError::new(value, wait.expired(full)));
                }
                Err(e) => return Err(SendError::new(value, e)),
            }
        }
        let joinable = self.joinable();
        if joinable {
            self.word(UNFINISHED).fetch_add(1, SeqCst);
            record.hold(HOLDS_TASK);
        }
        if STALL.load(SeqCst) {
            loop {
                std::thread::park();
            }
        }
        let attempt = |sending: bool| record.show(!sending);
        match wire::send_value(self.tx.as_fd(), &value, max, wait, Some(&attempt)) {
            Ok(()) => {
                self.word(ITEMS).fetch_add(1, SeqCst);
                Ok(())
            }
            Err(e) => {
                if joinable {
                    let _ = self.task_done();
                }
                if self.bounded() {
                    self.release_slot();
                }
                let e = match e {
                    // The socket itself was full: for a caller that is the queue being full.
                    ChannelError::Full { .. } => ChannelError::Full {
                        maxsize: self.maxsize,
                    },
                    other => self.or_shutdown(other),
                };
                Err(SendError::new(value, e))
            }
        }
    }

    fn get<T: DeserializeOwned>(&self, max: usize, wait: Wait) -> Result<T, ChannelError> {
        if self.shutdown_state() == SHUT_NOW {
            return Err(ChannelError::ShutDown);
        }
        let got = wire::recv_with(
            self.rx.as_fd(),
            &self.maps,
            max,
            wait,
            || self.taken(),
            wire::decode,
        );
        self.got(got)
    }

    /// Takes the next item, which must be a [`Bytes`], as [`SharedBytes`].
    fn get_shared(&self, max: usize, wait: Wait) -> Result<SharedBytes, ChannelError> {
        if self.shutdown_state() == SHUT_NOW {
            return Err(ChannelError::ShutDown);
        }
        let got = wire::recv_shared(
            self.rx.as_fd(),
            &self.maps,
            max,
            wait,
            || self.taken(),
            wire::bytes_in_payload,
        );
        self.got(got)
    }

    /// A message has been taken off the socket.
    fn taken(&self) {
        self.word(ITEMS).fetch_sub(1, SeqCst);
        if self.bounded() {
            self.release_slot();
        }
    }

    fn got<R>(&self, got: Result<R, ChannelError>) -> Result<R, ChannelError> {
        let got = got.map_err(|e| self.or_shutdown(e));
        if let Err(e) = &got {
            // A message that was taken but cannot be used counts as done, so that join()
            // does not wait for it for ever.
            if (e.is_malformed() || e.is_too_large()) && self.joinable() {
                let _ = self.task_done();
            }
        }
        got
    }

    fn qsize(&self) -> usize {
        (self.word(ITEMS).load(SeqCst) as i32).max(0) as usize
    }
}

/// When a waiter wakes to look for puts of ended processes: [`RECLAIM_EVERY`] from now, or
/// its deadline if sooner.
fn reclaim_deadline(deadline: Option<Instant>) -> Instant {
    let next = crate::time::saturating_add(Instant::now(), RECLAIM_EVERY);
    deadline.map_or(next, |d| d.min(next))
}

fn check_bound(maxsize: usize) -> Result<(), ChannelError> {
    if maxsize == 0 || maxsize > MAX_BOUND {
        return Err(ChannelError::InvalidArgument(format!(
            "a queue's maxsize must be between 1 and {MAX_BOUND}, not {maxsize} \
             (use new() for an unbounded queue)"
        )));
    }
    Ok(())
}

/// A queue between processes; Python's `multiprocessing.Queue`.
///
/// Any number of processes (and threads) can [`put`](Self::put) and [`get`](Self::get);
/// each item is received exactly once. Items are serde values; payloads over 64 KiB travel
/// through shared memory. Pass the queue to a child as (part of) the argument of
/// [`Process::new`](crate::Process::new), with any start method; clone it to share it
/// between threads (clones are cheap handles to the same queue).
///
/// An unbounded queue holds as many items as the kernel's socket buffer has room for
/// (4 MiB where the system allows, several thousand small items); beyond that `put` waits,
/// like a full pipe. A [`bounded`](Self::bounded) queue holds at most `maxsize` items.
///
/// ```
/// # gpuproc::init();
/// fn worker(q: gpuproc::channel::Queue<Vec<u32>>) {
///     q.put(vec![1, 2, 3]).unwrap();
/// }
///
/// let q = gpuproc::channel::Queue::new()?;
/// let mut p = gpuproc::Process::new(worker, q.clone());
/// p.start()?;
/// assert_eq!(q.get_timeout(std::time::Duration::from_secs(60))?, vec![1, 2, 3]);
/// p.join()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # A producer that dies inside `put`
/// Unlike Python's, a producer killed while it puts (SIGKILL included) does not leave a
/// bounded queue full or a [`JoinableQueue::join`] waiting for ever: waiters give back what
/// its put held within about 100 ms (see the module source for the exact guarantees).
///
/// # Dropping
/// Dropping the last handle in a process (or [`close`](Self::close)) releases this process's
/// descriptors; the queue lives on while any process holds a handle. Items put and not yet
/// taken when the last handle anywhere goes are lost.
#[doc(alias = "multiprocessing.Queue")]
pub struct Queue<T> {
    shared: Arc<Shared>,
    max_message_size: usize,
    _items: PhantomData<fn(T) -> T>,
}

impl<T> std::fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("maxsize", &self.shared.maxsize)
            .field("qsize", &self.shared.qsize())
            .finish()
    }
}

impl<T> Clone for Queue<T> {
    fn clone(&self) -> Self {
        Queue {
            shared: Arc::clone(&self.shared),
            max_message_size: self.max_message_size,
            _items: PhantomData,
        }
    }
}

impl<T: Serialize + DeserializeOwned> Queue<T> {
    /// An unbounded queue; Python's `Queue()`.
    pub fn new() -> Result<Self, ChannelError> {
        Self::create(0, false)
    }

    /// A queue holding at most `maxsize` items (at least 1); Python's `Queue(maxsize)`.
    pub fn bounded(maxsize: usize) -> Result<Self, ChannelError> {
        check_bound(maxsize)?;
        Self::create(maxsize, false)
    }

    fn create(maxsize: usize, joinable: bool) -> Result<Self, ChannelError> {
        Ok(Queue {
            shared: Arc::new(Shared::create(maxsize, joinable)?),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            _items: PhantomData,
        })
    }

    /// Sets the largest item this handle puts or accepts (default 4 GiB); see
    /// [`Connection::with_max_message_size`](super::Connection::with_max_message_size).
    /// Applies to this handle and the ones cloned or sent from it afterwards.
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Puts an item, waiting for room; Python's `q.put(obj)`. On failure the item comes
    /// back inside the error.
    pub fn put(&self, item: T) -> Result<(), SendError<T>> {
        self.shared.put(item, self.max_message_size, Wait::Forever)
    }

    /// Puts an item if there is room now, else [`ChannelError::Full`]; Python's
    /// `q.put_nowait(obj)`.
    #[doc(alias = "put_nowait")]
    pub fn try_put(&self, item: T) -> Result<(), SendError<T>> {
        self.shared.put(item, self.max_message_size, Wait::Never)
    }

    /// Puts an item, waiting at most `timeout` for room ([`ChannelError::Timeout`]);
    /// Python's `q.put(obj, timeout=...)`.
    pub fn put_timeout(&self, item: T, timeout: Duration) -> Result<(), SendError<T>> {
        self.shared
            .put(item, self.max_message_size, Wait::For(timeout))
    }

    /// Takes the next item, waiting for one; Python's `q.get()`. While it waits it first
    /// polls briefly, then sleeps (see [`set_max_spin`](super::set_max_spin)).
    pub fn get(&self) -> Result<T, ChannelError> {
        self.shared.get(self.max_message_size, Wait::Forever)
    }

    /// Takes the next item if there is one, else [`ChannelError::Empty`]; Python's
    /// `q.get_nowait()`.
    #[doc(alias = "get_nowait")]
    pub fn try_get(&self) -> Result<T, ChannelError> {
        self.shared.get(self.max_message_size, Wait::Never)
    }

    /// Takes the next item, waiting at most `timeout` ([`ChannelError::Timeout`]); Python's
    /// `q.get(timeout=...)`.
    pub fn get_timeout(&self, timeout: Duration) -> Result<T, ChannelError> {
        self.shared.get(self.max_message_size, Wait::For(timeout))
    }
}

/// Bulk bytes: put from a borrowed slice, and got without copying a large item out of
/// shared memory. Items put either way can be got either way.
impl Queue<Bytes> {
    /// Puts `bytes` as a [`Bytes`] item (one copy, straight into shared memory for a large
    /// one), waiting for room; the caller keeps its buffer.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<(), ChannelError> {
        self.shared
            .put(BytesRef(bytes), self.max_message_size, Wait::Forever)
            .map_err(SendError::into_error)
    }

    /// [`put_bytes`](Self::put_bytes), waiting at most `timeout` for room.
    pub fn put_bytes_timeout(&self, bytes: &[u8], timeout: Duration) -> Result<(), ChannelError> {
        self.shared
            .put(BytesRef(bytes), self.max_message_size, Wait::For(timeout))
            .map_err(SendError::into_error)
    }

    /// Takes the next item like [`get`](Self::get), but reads a large one (over 64 KiB) in
    /// place in its sender's shared memory instead of copying it out. The sender reuses
    /// that memory only once the [`SharedBytes`] is dropped (see there).
    pub fn get_shared(&self) -> Result<SharedBytes, ChannelError> {
        self.shared.get_shared(self.max_message_size, Wait::Forever)
    }

    /// [`get_shared`](Self::get_shared) if an item is waiting, else [`ChannelError::Empty`].
    pub fn try_get_shared(&self) -> Result<SharedBytes, ChannelError> {
        self.shared.get_shared(self.max_message_size, Wait::Never)
    }

    /// [`get_shared`](Self::get_shared), waiting at most `timeout`
    /// ([`ChannelError::Timeout`]).
    pub fn get_shared_timeout(&self, timeout: Duration) -> Result<SharedBytes, ChannelError> {
        self.shared
            .get_shared(self.max_message_size, Wait::For(timeout))
    }
}

impl<T> Queue<T> {
    /// The approximate number of items in the queue; Python's `q.qsize()`. Other processes
    /// may change it at any moment.
    pub fn qsize(&self) -> usize {
        self.shared.qsize()
    }

    /// Whether the queue is (approximately) empty; Python's `q.empty()`.
    pub fn empty(&self) -> bool {
        self.qsize() == 0
    }

    /// Whether a bounded queue is (approximately) full; Python's `q.full()`.
    pub fn full(&self) -> bool {
        self.shared.bounded() && self.shared.word(FREE).load(SeqCst) == 0
    }

    /// The bound, or `None` for an unbounded queue; Python's `q._maxsize`.
    pub fn maxsize(&self) -> Option<usize> {
        self.shared.bounded().then_some(self.shared.maxsize)
    }

    /// The largest item this handle puts or accepts.
    pub fn max_message_size(&self) -> usize {
        self.max_message_size
    }

    /// Shuts the queue down, for every process; Python 3.13's `queue.Queue.shutdown()`.
    ///
    /// Afterwards every [`put`](Self::put) fails with [`ChannelError::ShutDown`]. With
    /// `immediate` false, [`get`](Self::get) takes the items still queued, then fails with
    /// `ShutDown` instead of waiting; with `immediate` true, the items still queued are
    /// dropped (each counts as a task done for a [`JoinableQueue`], so that
    /// [`join`](JoinableQueue::join) returns) and every get fails at once. Puts and gets
    /// that are waiting, in any process, wake up and fail the same way. A second call can
    /// make a shutdown immediate; a queue cannot be reopened.
    ///
    /// ```
    /// let q = gpuproc::channel::Queue::<u32>::new()?;
    /// q.put(1).unwrap();
    /// q.shutdown(false)?;
    /// assert!(q.put(2).unwrap_err().is_shutdown());
    /// assert_eq!(q.get()?, 1);
    /// assert!(q.get().unwrap_err().is_shutdown());
    /// # Ok::<(), gpuproc::ChannelError>(())
    /// ```
    ///
    /// # Differences from Python
    /// Python's `multiprocessing.Queue` has no `shutdown` (its `queue.Queue` and
    /// `asyncio.Queue` do, since 3.13); this follows `queue.Queue`'s. An item whose put was
    /// under way in another process when the queue was shut down may still be queued, and
    /// got, after the shutdown.
    pub fn shutdown(&self, immediate: bool) -> Result<(), ChannelError> {
        self.shared.shutdown(immediate)
    }

    /// Whether [`shutdown`](Self::shutdown) was called, in any process; Python's
    /// `q.is_shutdown`.
    pub fn is_shutdown(&self) -> bool {
        self.shared.shutdown_state() != OPEN
    }

    /// Drops this handle; Python's `q.close()` (this process will put no more through it).
    pub fn close(self) {}
}

/// Ready when an item is waiting, or the queue is shut down.
impl<T> Waitable for Queue<T> {
    fn wait_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.shared.rx.as_fd()
    }

    fn ready_now(&self) -> bool {
        self.shared.shutdown_state() == SHUT_NOW
    }
}

/// Ready when an item is waiting, or the queue is shut down.
impl<T> Waitable for JoinableQueue<T> {
    fn wait_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.queue.wait_fd()
    }

    fn ready_now(&self) -> bool {
        self.queue.ready_now()
    }
}

/// Ready when an item is waiting.
impl<T> Waitable for SimpleQueue<T> {
    fn wait_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.queue.wait_fd()
    }
}

#[derive(Serialize)]
struct QueueOut<'a> {
    tx: FdRef<'a>,
    rx: FdRef<'a>,
    state: FdRef<'a>,
    maxsize: u64,
    max_message_size: u64,
}

#[derive(Deserialize)]
struct QueueIn {
    #[serde(deserialize_with = "crate::ipc::deserialize_fd")]
    tx: OwnedFd,
    #[serde(deserialize_with = "crate::ipc::deserialize_fd")]
    rx: OwnedFd,
    #[serde(deserialize_with = "crate::ipc::deserialize_fd")]
    state: OwnedFd,
    maxsize: u64,
    max_message_size: u64,
}

/// A queue serialises as duplicates of its descriptors: it can be passed to a child process
/// (or sent through a pipe or queue) inside a gpuproc message, and only there.
impl<T> Serialize for Queue<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let sh = &self.shared;
        QueueOut {
            tx: FdRef(sh.tx.as_fd()),
            rx: FdRef(sh.rx.as_fd()),
            state: FdRef(sh.state.fd()),
            maxsize: sh.maxsize as u64,
            max_message_size: self.max_message_size as u64,
        }
        .serialize(s)
    }
}

impl<'de, T> Deserialize<'de> for Queue<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let q = QueueIn::deserialize(d)?;
        let maxsize = usize::try_from(q.maxsize)
            .ok()
            .filter(|&m| m <= MAX_BOUND)
            .ok_or_else(|| serde::de::Error::custom("a queue's maxsize is out of range"))?;
        let state = Mapping::map_existing(q.state, STATE_LEN)
            .map_err(|e| serde::de::Error::custom(format!("cannot map a queue's state: {e}")))?;
        Ok(Queue {
            shared: Arc::new(Shared {
                tx: q.tx,
                rx: q.rx,
                state,
                maxsize,
                maps: MapCache::default(),
            }),
            max_message_size: usize::try_from(q.max_message_size).unwrap_or(usize::MAX),
            _items: PhantomData,
        })
    }
}

/// A [`Queue`] that counts unfinished tasks; Python's `multiprocessing.JoinableQueue`.
///
/// Every [`put`](Queue::put) adds a task; a consumer calls [`task_done`](Self::task_done)
/// after processing each item it got; [`join`](Self::join) waits until every task is done.
/// It derefs to [`Queue`] (in Python it is a subclass) for `put`, `get` and the rest.
/// An item that was taken but failed to decode counts as done at once.
#[doc(alias = "multiprocessing.JoinableQueue")]
#[derive(Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JoinableQueue<T> {
    queue: Queue<T>,
}

impl<T> Clone for JoinableQueue<T> {
    fn clone(&self) -> Self {
        JoinableQueue {
            queue: self.queue.clone(),
        }
    }
}

impl<T: Serialize + DeserializeOwned> JoinableQueue<T> {
    /// An unbounded joinable queue; Python's `JoinableQueue()`.
    pub fn new() -> Result<Self, ChannelError> {
        Ok(JoinableQueue {
            queue: Queue::create(0, true)?,
        })
    }

    /// A joinable queue holding at most `maxsize` items; Python's `JoinableQueue(maxsize)`.
    pub fn bounded(maxsize: usize) -> Result<Self, ChannelError> {
        check_bound(maxsize)?;
        Ok(JoinableQueue {
            queue: Queue::create(maxsize, true)?,
        })
    }
}

impl<T> JoinableQueue<T> {
    /// Marks one item taken with `get` as processed; Python's `q.task_done()`.
    /// [`ChannelError::TaskDoneTooOften`] if called more times than items were put.
    pub fn task_done(&self) -> Result<(), ChannelError> {
        self.queue.shared.task_done()
    }

    /// Waits until every item put has been marked done; Python's `q.join()`.
    pub fn join(&self) -> Result<(), ChannelError> {
        self.queue.shared.join(Wait::Forever)
    }

    /// [`join`](Self::join), waiting at most `timeout` ([`ChannelError::Timeout`]).
    pub fn join_timeout(&self, timeout: Duration) -> Result<(), ChannelError> {
        self.queue.shared.join(Wait::For(timeout))
    }

    /// Drops this handle; Python's `q.close()`.
    pub fn close(self) {}
}

impl<T> Deref for JoinableQueue<T> {
    type Target = Queue<T>;
    fn deref(&self) -> &Queue<T> {
        &self.queue
    }
}

/// A plain queue with only `put`, `get` and `empty`; Python's `multiprocessing.SimpleQueue`.
///
/// The same machinery as an unbounded [`Queue`] (there is no feeder thread to leave out).
#[doc(alias = "multiprocessing.SimpleQueue")]
#[derive(Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SimpleQueue<T> {
    queue: Queue<T>,
}

impl<T> Clone for SimpleQueue<T> {
    fn clone(&self) -> Self {
        SimpleQueue {
            queue: self.queue.clone(),
        }
    }
}

impl<T: Serialize + DeserializeOwned> SimpleQueue<T> {
    /// A new queue; Python's `SimpleQueue()`.
    pub fn new() -> Result<Self, ChannelError> {
        Ok(SimpleQueue {
            queue: Queue::new()?,
        })
    }

    /// Puts an item; Python's `q.put(obj)`. See [`Queue::put`].
    pub fn put(&self, item: T) -> Result<(), SendError<T>> {
        self.queue.put(item)
    }

    /// [`put`](Self::put), waiting at most `timeout` for room in the socket buffer.
    pub fn put_timeout(&self, item: T, timeout: Duration) -> Result<(), SendError<T>> {
        self.queue.put_timeout(item, timeout)
    }

    /// Takes the next item, waiting for one; Python's `q.get()`.
    pub fn get(&self) -> Result<T, ChannelError> {
        self.queue.get()
    }

    /// The next item if there is one, else [`ChannelError::Empty`].
    pub fn try_get(&self) -> Result<T, ChannelError> {
        self.queue.try_get()
    }

    /// [`get`](Self::get), waiting at most `timeout`.
    pub fn get_timeout(&self, timeout: Duration) -> Result<T, ChannelError> {
        self.queue.get_timeout(timeout)
    }
}

impl<T> SimpleQueue<T> {
    /// Whether the queue is (approximately) empty; Python's `q.empty()`.
    pub fn empty(&self) -> bool {
        self.queue.empty()
    }

    /// Drops this handle; Python's `q.close()`.
    pub fn close(self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_holds_a_process_and_what_it_took() {
        let w = record_word(u32::MAX, HOLDS_SLOT | HOLDS_TASK);
        assert_eq!(record_parts(w), (u32::MAX, 3));
        assert_eq!(record_parts(record_word(7, 0)), (7, 0));
        assert_ne!(record_word(1, 0), 0);
    }

    #[test]
    fn a_finished_put_leaves_no_record() {
        let q = JoinableQueue::<u32>::bounded(2).unwrap();
        q.put(1).unwrap();
        q.try_put(2).unwrap();
        assert!(q.try_put(3).is_err());
        let sh = &q.shared;
        assert!((0..RECORDS).all(|i| sh.record(i).load(SeqCst) == 0));
        // Records of this (running) process are never taken back.
        sh.record(5)
            .store(record_word(std::process::id(), HOLDS_SLOT), SeqCst);
        sh.reclaim();
        assert!(q.full());
        sh.record(5).store(0, SeqCst);
    }
}
