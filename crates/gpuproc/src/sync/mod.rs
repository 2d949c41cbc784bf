//! Locks and other synchronisation primitives that work across processes: Python's
//! `multiprocessing.Lock`, `RLock`, `Semaphore`, `BoundedSemaphore`, `Event`, `Condition` and
//! `Barrier`.
//!
//! Each object's state lives in its own small shared memory file (a memfd, mapped
//! `MAP_SHARED`). A handle is cheap to clone (clones are the same object) and can be passed to
//! a child process as (part of) its argument with every start method: the memfd travels with
//! the message and the child maps it. Waiting uses futexes on the shared words, so nothing
//! makes a system call unless it has to wait or wake someone.
//!
//! ```
//! # gpuproc::init();
//! use gpuproc::sync::Lock;
//!
//! fn work(lock: Lock) -> bool {
//!     let guard = lock.lock().unwrap();
//!     guard.owner_died()
//! }
//!
//! let lock = Lock::new()?;
//! let mut p = gpuproc::Process::new(work, lock.clone());
//! p.start()?;
//! assert!(!p.join()?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # A holder that dies
//!
//! [`Lock`] and [`RLock`] (and so [`Condition`]) are robust: when the process (or thread)
//! holding one ends without releasing it, however it ends (SIGKILL included), the kernel
//! releases it and the next locker gets it, with [`LockGuard::owner_died`] (or
//! [`Acquired::owner_died`]) saying so, like a pthread robust mutex's `EOWNERDEAD`. The lock
//! itself is usable again at once; whatever it protected may be half-updated, which is for
//! the caller to judge. This uses the kernel's robust-futex lists through process-shared
//! robust pthread mutexes, so it is exact and race-free: no polling of pids, no pid reuse.
//!
//! Semaphores, events, conditions' wait queues and barriers have no owner: a process that
//! dies while waiting on one is simply gone, and one that dies instead of releasing a
//! semaphore or reaching a barrier leaves the others to their timeouts, as in Python.
//!
//! # Differences from Python
//!
//! - A [`Lock`] is released by the thread that acquired it (Python allows any thread or
//!   process); releasing it elsewhere is [`SyncError::NotOwner`]. Guards therefore cannot be
//!   sent to other threads. Locking it twice from one thread is [`SyncError::WouldDeadlock`]
//!   rather than a hang.
//! - A [`Condition`] uses a plain [`Lock`] (Python's default is an `RLock`), and its `wait`
//!   may return early without a notification, as condition variables may: check the
//!   condition in a loop, or use [`Condition::wait_for`].
//! - Timed waits for a [`Lock`] or [`RLock`] measure their deadline on the real-time clock (the
//!   C library's `pthread_mutex_timedlock`), so a jump of the system clock can shorten or
//!   lengthen them; the other primitives use the monotonic clock.

use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::sys::shm::{self as sys, Locked, Mapping, MutexError, RobustMutex};

/// Why a synchronisation operation failed.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The calling thread already holds this (non-recursive) lock: waiting would never end.
    #[error("this thread already holds the lock: acquiring it again would wait for ever")]
    WouldDeadlock,
    /// A lock was released by a thread that does not hold it.
    #[error("the lock is not held by this thread, so it cannot release it")]
    NotOwner,
    /// A [`BoundedSemaphore`] was released more times than it was acquired.
    #[error("semaphore released too many times: its value would exceed its initial value {max}")]
    OverReleased {
        /// The semaphore's initial (and largest) value.
        max: u32,
    },
    /// A [`Barrier`] was broken (by a timeout or [`Barrier::abort`]) while or before waiting;
    /// Python's `BrokenBarrierError`.
    #[error("the barrier is broken (a party timed out or it was aborted)")]
    BrokenBarrier,
    /// [`Condition::wait`] was given the guard of another lock.
    #[error(
        "the guard passed to Condition::wait belongs to a different lock than the condition's"
    )]
    WrongLock,
    /// An argument is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A handle received from another process is not what was expected.
    #[error("the shared object received is not a {expected}: {reason}")]
    WrongObject {
        /// What the receiver expected.
        expected: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A system call failed.
    #[error("{op} failed")]
    Os {
        /// What was being done.
        op: &'static str,
        /// The system's error.
        #[source]
        source: io::Error,
    },
}

impl SyncError {
    /// Whether acquiring would have deadlocked this thread.
    pub fn is_deadlock(&self) -> bool {
        matches!(self, SyncError::WouldDeadlock)
    }
    /// Whether a release came from a thread not holding the lock.
    pub fn is_not_owner(&self) -> bool {
        matches!(self, SyncError::NotOwner)
    }
    /// Whether a bounded semaphore was released too often.
    pub fn is_over_released(&self) -> bool {
        matches!(self, SyncError::OverReleased { .. })
    }
    /// Whether a barrier is broken (Python's `BrokenBarrierError`).
    pub fn is_broken_barrier(&self) -> bool {
        matches!(self, SyncError::BrokenBarrier)
    }
    /// Whether a system call failed.
    pub fn is_os(&self) -> bool {
        matches!(self, SyncError::Os { .. })
    }

    fn os(op: &'static str) -> impl FnOnce(io::Error) -> SyncError {
        move |source| SyncError::Os { op, source }
    }
}

impl From<MutexError> for SyncError {
    fn from(e: MutexError) -> Self {
        match e {
            MutexError::Busy => SyncError::Os {
                op: "locking",
                source: io::Error::from(io::ErrorKind::WouldBlock),
            },
            MutexError::Deadlock => SyncError::WouldDeadlock,
            MutexError::NotOwner => SyncError::NotOwner,
            MutexError::Os(source) => SyncError::Os {
                op: "locking",
                source,
            },
        }
    }
}

// --- the shared file behind each object ---------------------------------------------------

/// Every object's memory starts with this word, then its kind.
const MAGIC: u32 = 0x6770_7379; // "gpsy"
const PAGE: usize = 4096;
/// Where a mutex sits in a lock's page (past the header, cache-line aligned).
const MUTEX_AT: usize = 64;
/// The first state word after the header.
const WORD0: usize = 8;
const WORD1: usize = 12;
const WORD2: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum Kind {
    Lock = 1,
    RLock = 2,
    Semaphore = 3,
    Event = 4,
    Condition = 5,
    Barrier = 6,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Lock => "Lock",
            Kind::RLock => "RLock",
            Kind::Semaphore => "Semaphore",
            Kind::Event => "Event",
            Kind::Condition => "Condition",
            Kind::Barrier => "Barrier",
        }
    }
}

fn create(kind: Kind) -> Result<Arc<Mapping>, SyncError> {
    let name = format!("gpuproc-{}", kind.name());
    let map = Mapping::anonymous(&name, PAGE).map_err(SyncError::os("creating shared memory"))?;
    map.atomic_u32(4).store(kind as u32, SeqCst);
    map.atomic_u32(0).store(MAGIC, SeqCst);
    Ok(Arc::new(map))
}

fn open(fd: OwnedFd, kind: Kind) -> Result<Arc<Mapping>, SyncError> {
    let wrong = |reason: String| SyncError::WrongObject {
        expected: kind.name(),
        reason,
    };
    let map = Mapping::map_existing(fd, PAGE).map_err(|e| wrong(e.to_string()))?;
    if map.atomic_u32(0).load(SeqCst) != MAGIC {
        return Err(wrong("it is not a gpuproc synchronisation object".into()));
    }
    let found = map.atomic_u32(4).load(SeqCst);
    if found != kind as u32 {
        return Err(wrong(format!("its kind number is {found}")));
    }
    Ok(Arc::new(map))
}

fn ser_map<S: Serializer>(map: &Mapping, s: S) -> Result<S::Ok, S::Error> {
    crate::ipc::serialize_fd(map.fd(), s)
}

fn de_map<'de, D: Deserializer<'de>>(d: D, kind: Kind) -> Result<Arc<Mapping>, D::Error> {
    let fd = crate::ipc::deserialize_fd(d)?;
    open(fd, kind).map_err(serde::de::Error::custom)
}

// --- Lock -----------------------------------------------------------------------------------

/// How an acquisition went: whether the previous holder died holding the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Acquired {
    owner_died: bool,
}

impl Acquired {
    /// Whether the previous holder ended (died, or its thread exited) without releasing the
    /// lock; what it protected may be inconsistent.
    pub fn owner_died(self) -> bool {
        self.owner_died
    }
}

fn acquired(l: Locked) -> Acquired {
    Acquired {
        owner_died: l == Locked::OwnerDied,
    }
}

fn lock_until(m: &RobustMutex, deadline: Option<Instant>) -> Result<Option<Acquired>, SyncError> {
    match m.lock(deadline) {
        Ok(l) => Ok(Some(acquired(l))),
        Err(MutexError::Busy) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A lock shared between processes; Python's `multiprocessing.Lock`.
///
/// Use [`lock`](Self::lock) for a guard that releases it when dropped, or Python's
/// [`acquire`](Self::acquire)/[`release`](Self::release) pair. Clones are the same lock.
/// If the holder dies, the next locker gets the lock with [`LockGuard::owner_died`] set (see
/// the [module documentation](self)).
///
/// ```
/// let lock = gpuproc::sync::Lock::new()?;
/// {
///     let guard = lock.lock()?;
///     assert!(!guard.owner_died());
///     // Locking it again from this thread would never return: it is an error instead.
///     assert!(lock.try_lock().unwrap_err().is_deadlock());
/// } // released here
/// assert!(lock.acquire_timeout(std::time::Duration::from_secs(1))?.is_some());
/// lock.release()?;
/// # Ok::<(), gpuproc::sync::SyncError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Lock {
    mutex: RobustMutex,
}

impl Lock {
    /// A new, unlocked lock.
    pub fn new() -> Result<Lock, SyncError> {
        Lock::create(Kind::Lock, false).map(|mutex| Lock { mutex })
    }

    fn create(kind: Kind, recursive: bool) -> Result<RobustMutex, SyncError> {
        let map = create(kind)?;
        RobustMutex::init(map, MUTEX_AT, recursive).map_err(SyncError::os("initialising a mutex"))
    }
}

// --- RLock ----------------------------------------------------------------------------------

/// A re-entrant lock shared between processes; Python's `multiprocessing.RLock`.
///
/// The holding thread may acquire it again; it is free once released as many times. If the
/// holder dies, the next locker gets it (at depth one) with the owner-died indication.
#[derive(Clone, Debug)]
pub struct RLock {
    mutex: RobustMutex,
}

impl RLock {
    /// A new, unlocked re-entrant lock.
    pub fn new() -> Result<RLock, SyncError> {
        Lock::create(Kind::RLock, true).map(|mutex| RLock { mutex })
    }

    /// How many times the calling thread holds the lock (0 when it does not hold it):
    /// Python's `_recursion_count()` (of `threading.RLock`; `multiprocessing`'s
    /// `_semlock._count()`).
    ///
    /// ```
    /// let l = gpuproc::sync::RLock::new()?;
    /// assert_eq!((l.count(), l.is_owned(), l.locked()), (0, false, false));
    /// let a = l.lock()?;
    /// let b = l.lock()?;
    /// assert_eq!((l.count(), l.is_owned(), l.locked()), (2, true, true));
    /// drop((a, b));
    /// assert_eq!(l.count(), 0);
    /// # Ok::<(), gpuproc::sync::SyncError>(())
    /// ```
    #[doc(alias = "_recursion_count")]
    #[doc(alias = "_count")]
    pub fn count(&self) -> usize {
        self.mutex.depth_here()
    }
}

/// The locking methods, serde support and guard of a lock type around a robust mutex
/// ([`Lock`] and [`RLock`] differ only in the mutex's kind and recursion).
macro_rules! robust_lock {
    ($ty:ident, $guard:ident, $kind:expr, $py:literal, $guard_doc:literal) => {
        impl $ty {
            /// Waits for the lock and returns a guard that releases it (one level, for an
            /// `RLock`) when dropped.
            pub fn lock(&self) -> Result<$guard<'_>, SyncError> {
                let a = lock_until(&self.mutex, None)?.expect("no deadline");
                Ok($guard::new(self, a))
            }

            /// Like [`lock`](Self::lock), giving up after `timeout` (`Ok(None)`).
            pub fn lock_timeout(&self, timeout: Duration) -> Result<Option<$guard<'_>>, SyncError> {
                Ok(lock_until(&self.mutex, crate::time::deadline(timeout))?
                    .map(|a| $guard::new(self, a)))
            }

            /// Takes the lock if it can be had now (`Ok(None)` if not).
            pub fn try_lock(&self) -> Result<Option<$guard<'_>>, SyncError> {
                Ok(lock_until(&self.mutex, Some(Instant::now()))?.map(|a| $guard::new(self, a)))
            }

            #[doc = concat!("Waits for the lock; Python's `", $py, ".acquire()`. Release it with")]
            /// [`release`](Self::release) from the same thread.
            pub fn acquire(&self) -> Result<Acquired, SyncError> {
                Ok(lock_until(&self.mutex, None)?.expect("no deadline"))
            }

            /// Waits at most `timeout` for the lock; `Ok(None)` if another holder kept it.
            #[doc = concat!("Python's `", $py, ".acquire(timeout=...)`.")]
            pub fn acquire_timeout(
                &self,
                timeout: Duration,
            ) -> Result<Option<Acquired>, SyncError> {
                lock_until(&self.mutex, crate::time::deadline(timeout))
            }

            /// Takes the lock if it can be had now;
            #[doc = concat!("Python's `", $py, ".acquire(block=False)`.")]
            pub fn try_acquire(&self) -> Result<Option<Acquired>, SyncError> {
                lock_until(&self.mutex, Some(Instant::now()))
            }

            /// Releases the lock (one level, for an `RLock`) taken with
            #[doc = concat!("[`acquire`](Self::acquire); Python's `", $py, ".release()`. Only the")]
            /// thread holding it may ([`SyncError::NotOwner`]).
            pub fn release(&self) -> Result<(), SyncError> {
                Ok(self.mutex.unlock()?)
            }

            /// Whether some thread, of any process, holds the lock now;
            #[doc = concat!("Python's `", $py, ".locked()`. A holder that died without")]
            /// releasing it does not count (the next locker gets it). Another process may
            /// take or release it at any moment: the answer is a snapshot.
            pub fn locked(&self) -> bool {
                self.mutex.is_locked()
            }

            /// Whether the calling thread holds the lock; Python's `_is_owned()` (of
            /// `threading.RLock`; `multiprocessing`'s `_semlock._is_mine()`).
            #[doc(alias = "_is_owned")]
            pub fn is_owned(&self) -> bool {
                self.mutex.held_here()
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                ser_map(self.mutex.mapping(), s)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let map = de_map(d, $kind)?;
                Ok($ty {
                    mutex: RobustMutex::existing(map, MUTEX_AT),
                })
            }
        }

        #[doc = $guard_doc]
        #[must_use = "the lock is released as soon as the guard is dropped"]
        pub struct $guard<'a> {
            lock: &'a $ty,
            owner_died: bool,
            _not_send: PhantomData<*const ()>,
        }

        impl<'a> $guard<'a> {
            fn new(lock: &'a $ty, a: Acquired) -> Self {
                $guard {
                    lock,
                    owner_died: a.owner_died,
                    _not_send: PhantomData,
                }
            }

            /// Whether the previous holder ended without releasing the lock (see
            /// [`Acquired::owner_died`]).
            pub fn owner_died(&self) -> bool {
                self.owner_died
            }
        }

        impl fmt::Debug for $guard<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($guard))
                    .field("owner_died", &self.owner_died)
                    .finish()
            }
        }

        impl Drop for $guard<'_> {
            fn drop(&mut self) {
                // Fails only if the lock was already released through `release`.
                let _ = self.lock.mutex.unlock();
            }
        }
    };
}

robust_lock!(
    Lock,
    LockGuard,
    Kind::Lock,
    "lock",
    "Holds a [`Lock`]; releases it when dropped. Stays on the thread that locked it."
);
robust_lock!(
    RLock,
    RLockGuard,
    Kind::RLock,
    "rlock",
    "Holds one level of an [`RLock`]; releases it when dropped. Stays on the thread that \
     locked it."
);

// --- Semaphore ------------------------------------------------------------------------------

/// A counter shared between processes; Python's `multiprocessing.Semaphore`.
///
/// [`acquire`](Self::acquire) waits until the value is above zero and decrements it;
/// [`release`](Self::release) increments it. Any process may release.
#[derive(Clone, Debug)]
pub struct Semaphore {
    map: Arc<Mapping>,
}

// Words: WORD0 the value, WORD1 the number of sleepers, WORD2 the maximum (u32::MAX: none).
impl Semaphore {
    /// A semaphore with the given initial value (Python's default is 1).
    pub fn new(value: u32) -> Result<Semaphore, SyncError> {
        Semaphore::with_max(value, u32::MAX)
    }

    fn with_max(value: u32, max: u32) -> Result<Semaphore, SyncError> {
        let map = create(Kind::Semaphore)?;
        map.atomic_u32(WORD0).store(value, SeqCst);
        map.atomic_u32(WORD2).store(max, SeqCst);
        Ok(Semaphore { map })
    }

    fn value_word(&self) -> &AtomicU32 {
        self.map.atomic_u32(WORD0)
    }

    fn sleepers(&self) -> &AtomicU32 {
        self.map.atomic_u32(WORD1)
    }

    fn max(&self) -> u32 {
        self.map.atomic_u32(WORD2).load(SeqCst)
    }

    /// Waits until the value is positive, then decrements it; Python's `acquire()`.
    pub fn acquire(&self) {
        self.acquire_until(None);
    }

    /// Like [`acquire`](Self::acquire), giving up after `timeout`; `false` if it did.
    pub fn acquire_timeout(&self, timeout: Duration) -> bool {
        self.acquire_until(crate::time::deadline(timeout))
    }

    /// Decrements the value if it is positive now; Python's `acquire(block=False)`.
    pub fn try_acquire(&self) -> bool {
        let v = self.value_word();
        let mut cur = v.load(SeqCst);
        while cur > 0 {
            match v.compare_exchange_weak(cur, cur - 1, SeqCst, SeqCst) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
        false
    }

    fn acquire_until(&self, deadline: Option<Instant>) -> bool {
        loop {
            if self.try_acquire() {
                return true;
            }
            // Announce ourselves before sleeping: a releaser increments the value, then looks
            // at the sleepers (both SeqCst), so either it sees us or our futex wait sees the
            // new value and does not sleep.
            self.sleepers().fetch_add(1, SeqCst);
            let in_time = sys::futex_wait(self.value_word(), 0, deadline);
            self.sleepers().fetch_sub(1, SeqCst);
            if !in_time {
                return self.try_acquire();
            }
        }
    }

    /// Increments the value by one, waking a waiter; Python's `release()`.
    pub fn release(&self) -> Result<(), SyncError> {
        self.release_n(1)
    }

    /// Increments the value by `n`, waking up to `n` waiters; Python's `release(n)`.
    pub fn release_n(&self, n: u32) -> Result<(), SyncError> {
        let max = self.max();
        let v = self.value_word();
        let mut cur = v.load(SeqCst);
        loop {
            let new = match cur.checked_add(n) {
                Some(new) if new <= max => new,
                _ if max == u32::MAX => {
                    return Err(SyncError::InvalidArgument(format!(
                        "releasing {n} would overflow the semaphore's value {cur}"
                    )))
                }
                _ => return Err(SyncError::OverReleased { max }),
            };
            match v.compare_exchange_weak(cur, new, SeqCst, SeqCst) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        if self.sleepers().load(SeqCst) > 0 {
            sys::futex_wake(v, n);
        }
        Ok(())
    }

    /// The current value; Python's `get_value()`.
    pub fn get_value(&self) -> u32 {
        self.value_word().load(SeqCst)
    }
}

impl Serialize for Semaphore {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ser_map(&self.map, s)
    }
}

impl<'de> Deserialize<'de> for Semaphore {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Semaphore {
            map: de_map(d, Kind::Semaphore)?,
        })
    }
}

/// A [`Semaphore`] that may not be released above its initial value; Python's
/// `multiprocessing.BoundedSemaphore`. Too many releases are [`SyncError::OverReleased`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BoundedSemaphore {
    inner: Semaphore,
}

impl BoundedSemaphore {
    /// A bounded semaphore whose value starts at (and never exceeds) `value`.
    pub fn new(value: u32) -> Result<BoundedSemaphore, SyncError> {
        if value == u32::MAX {
            return Err(SyncError::InvalidArgument(format!(
                "a bounded semaphore's value must be below {}",
                u32::MAX
            )));
        }
        Ok(BoundedSemaphore {
            inner: Semaphore::with_max(value, value)?,
        })
    }

    /// See [`Semaphore::acquire`].
    pub fn acquire(&self) {
        self.inner.acquire()
    }

    /// See [`Semaphore::acquire_timeout`].
    pub fn acquire_timeout(&self, timeout: Duration) -> bool {
        self.inner.acquire_timeout(timeout)
    }

    /// See [`Semaphore::try_acquire`].
    pub fn try_acquire(&self) -> bool {
        self.inner.try_acquire()
    }

    /// Increments the value; [`SyncError::OverReleased`] if it is at its initial value.
    pub fn release(&self) -> Result<(), SyncError> {
        self.inner.release()
    }

    /// The current value.
    pub fn get_value(&self) -> u32 {
        self.inner.get_value()
    }
}

// --- Event ----------------------------------------------------------------------------------

/// A flag shared between processes that others can wait for; Python's `multiprocessing.Event`.
#[derive(Clone, Debug)]
pub struct Event {
    map: Arc<Mapping>,
}

impl Event {
    /// A new event, not set.
    pub fn new() -> Result<Event, SyncError> {
        Ok(Event {
            map: create(Kind::Event)?,
        })
    }

    fn flag(&self) -> &AtomicU32 {
        self.map.atomic_u32(WORD0)
    }

    /// Sets the flag and wakes every waiter; Python's `set()`.
    pub fn set(&self) {
        if self.flag().swap(1, SeqCst) == 0 {
            sys::futex_wake(self.flag(), u32::MAX);
        }
    }

    /// Clears the flag; Python's `clear()`.
    pub fn clear(&self) {
        self.flag().store(0, SeqCst);
    }

    /// Whether the flag is set; Python's `is_set()`.
    pub fn is_set(&self) -> bool {
        self.flag().load(SeqCst) != 0
    }

    /// Waits until the flag is set; Python's `wait()`.
    pub fn wait(&self) {
        self.wait_until(None);
    }

    /// Waits at most `timeout` for the flag; returns whether it is set. Python's
    /// `wait(timeout)`.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.wait_until(crate::time::deadline(timeout))
    }

    fn wait_until(&self, deadline: Option<Instant>) -> bool {
        loop {
            if self.is_set() {
                return true;
            }
            if !sys::futex_wait(self.flag(), 0, deadline) {
                return self.is_set();
            }
        }
    }
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ser_map(&self.map, s)
    }
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Event {
            map: de_map(d, Kind::Event)?,
        })
    }
}

// --- Condition ------------------------------------------------------------------------------

/// A condition variable shared between processes; Python's `multiprocessing.Condition`.
///
/// It owns a [`Lock`] (its own, or one given to [`with_lock`](Self::with_lock)). Lock it with
/// [`lock`](Self::lock), then [`wait`](Self::wait) with the guard: the lock is released while
/// waiting and taken again before returning. [`notify`](Self::notify) wakes waiters.
///
/// ```
/// use gpuproc::sync::Condition;
/// use std::time::Duration;
///
/// let cond = Condition::new()?;
/// let mut guard = cond.lock()?;
/// // Nobody notifies: the wait times out (or returns early: check your condition).
/// let notified = cond.wait_for(&mut guard, || false, Some(Duration::from_millis(10)))?;
/// assert!(!notified);
/// # Ok::<(), gpuproc::sync::SyncError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Condition {
    lock: Lock,
    map: Arc<Mapping>,
}

impl Condition {
    /// A condition with a new lock of its own.
    pub fn new() -> Result<Condition, SyncError> {
        Condition::with_lock(Lock::new()?)
    }

    /// A condition using `lock` (Python's `Condition(lock)`).
    pub fn with_lock(lock: Lock) -> Result<Condition, SyncError> {
        Ok(Condition {
            lock,
            map: create(Kind::Condition)?,
        })
    }

    /// The condition's lock.
    pub fn get_lock(&self) -> &Lock {
        &self.lock
    }

    /// Takes the condition's lock; see [`Lock::lock`].
    pub fn lock(&self) -> Result<LockGuard<'_>, SyncError> {
        self.lock.lock()
    }

    /// Takes the condition's lock, waiting at most `timeout`; see [`Lock::lock_timeout`].
    pub fn lock_timeout(&self, timeout: Duration) -> Result<Option<LockGuard<'_>>, SyncError> {
        self.lock.lock_timeout(timeout)
    }

    fn seq(&self) -> &AtomicU32 {
        self.map.atomic_u32(WORD0)
    }

    /// Releases the lock, waits for a notification, and takes the lock again; Python's
    /// `wait()`. May return without a notification: re-check what you wait for.
    ///
    /// If a holder died while this waited, the guard's [`LockGuard::owner_died`] becomes true.
    pub fn wait(&self, guard: &mut LockGuard<'_>) -> Result<(), SyncError> {
        self.wait_until(guard, None).map(|_| ())
    }

    /// Like [`wait`](Self::wait), for at most `timeout`; `Ok(false)` if the time ran out.
    /// The lock is taken again either way.
    pub fn wait_timeout(
        &self,
        guard: &mut LockGuard<'_>,
        timeout: Duration,
    ) -> Result<bool, SyncError> {
        self.wait_until(guard, crate::time::deadline(timeout))
    }

    /// Waits until `predicate` (called with the lock held) is true, or `timeout` (if any) runs
    /// out; returns the predicate's last value. Python's `wait_for(predicate, timeout)`.
    pub fn wait_for(
        &self,
        guard: &mut LockGuard<'_>,
        mut predicate: impl FnMut() -> bool,
        timeout: Option<Duration>,
    ) -> Result<bool, SyncError> {
        let deadline = timeout.and_then(crate::time::deadline);
        loop {
            if predicate() {
                return Ok(true);
            }
            if !self.wait_until(guard, deadline)? {
                return Ok(predicate());
            }
        }
    }

    fn wait_until(
        &self,
        guard: &mut LockGuard<'_>,
        deadline: Option<Instant>,
    ) -> Result<bool, SyncError> {
        if !guard.lock.mutex.same_as(&self.lock.mutex) {
            return Err(SyncError::WrongLock);
        }
        // Read the sequence while holding the lock: a notify after we release it changes the
        // sequence, so the futex wait below does not sleep through it.
        let seq = self.seq().load(SeqCst);
        guard.lock.mutex.unlock()?;
        let in_time = sys::futex_wait(self.seq(), seq, deadline);
        // Python takes the lock back whatever the timeout; so do we.
        let again = lock_until(&guard.lock.mutex, None)?.expect("no deadline");
        if again.owner_died {
            guard.owner_died = true;
        }
        Ok(in_time)
    }

    /// Wakes up to `n` waiters; Python's `notify(n)`. Call it holding the lock.
    pub fn notify(&self, n: u32) {
        self.seq().fetch_add(1, SeqCst);
        sys::futex_wake(self.seq(), n);
    }

    /// Wakes every waiter; Python's `notify_all()`.
    pub fn notify_all(&self) {
        self.notify(u32::MAX)
    }
}

impl Serialize for Condition {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Wire<'a>(
            &'a Lock,
            #[serde(serialize_with = "ser_arc")] &'a Arc<Mapping>,
        );
        fn ser_arc<S: Serializer>(m: &&Arc<Mapping>, s: S) -> Result<S::Ok, S::Error> {
            ser_map(m, s)
        }
        Wire(&self.lock, &self.map).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire(Lock, #[serde(deserialize_with = "de_cond")] Arc<Mapping>);
        fn de_cond<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<Mapping>, D::Error> {
            de_map(d, Kind::Condition)
        }
        let Wire(lock, map) = Wire::deserialize(d)?;
        Ok(Condition { lock, map })
    }
}

// --- Barrier --------------------------------------------------------------------------------

// The barrier's state word: bit 31 broken, bit 30 "a generation is being ended" (its action
// runs, or a reset is under way), bits 16..=27 the generation, bits 0..=15 the number of
// parties waiting. WORD1 holds the number of parties. From OUTCOMES_AT, one bit per
// generation says how it ended: set when it was reset (or broke), clear when it passed.
// A waiter reads its generation's bit once it sees the generation change; the bit is
// written before the change, by the one party that set the ending bit.
const BROKEN: u32 = 1 << 31;
const ENDING: u32 = 1 << 30;
const GEN_SHIFT: u32 = 16;
const GEN_MASK: u32 = 0xfff;
const COUNT_MASK: u32 = 0xffff;
/// Where the generations' outcome bits start (one per generation: 512 bytes).
const OUTCOMES_AT: usize = 1024;
const _: () = assert!(OUTCOMES_AT + (GEN_MASK as usize + 1) / 8 <= PAGE);

fn generation(state: u32) -> u32 {
    (state >> GEN_SHIFT) & GEN_MASK
}

/// The state that starts the generation after `gen`: nobody waiting, not broken.
fn next_generation(gen: u32) -> u32 {
    ((gen + 1) & GEN_MASK) << GEN_SHIFT
}

/// A meeting point for a fixed number of parties; Python's `multiprocessing.Barrier`.
///
/// Each of `parties` processes (or threads) calls [`wait`](Self::wait); all return together
/// once the last arrives, each with a different index in `0..parties`, and the barrier is
/// ready for the next round (the next generation). A timeout or [`abort`](Self::abort)
/// breaks it: every waiter, and every later caller, gets [`SyncError::BrokenBarrier`]
/// (Python's `BrokenBarrierError`) until [`reset`](Self::reset).
///
/// [`with_action`](Self::with_action) gives it an action that the last party to arrive
/// runs, once per generation, before any party is released; [`with_timeout`](Self::with_timeout)
/// a default timeout for [`wait`](Self::wait). Both travel with the handle to other
/// processes.
///
/// ```
/// use gpuproc::sync::Barrier;
/// use std::time::Duration;
///
/// let b = Barrier::new(2)?.with_timeout(Duration::from_secs(60));
/// let b2 = b.clone();
/// let t = std::thread::spawn(move || b2.wait());
/// let mine = b.wait()?;
/// let theirs = t.join().unwrap()?;
/// assert_eq!(mine + theirs, 1); // indices 0 and 1
/// # Ok::<(), gpuproc::sync::SyncError>(())
/// ```
///
/// # Differences from Python
/// - The action is a plain `fn()` (it crosses to other processes as its place in the
///   executable, as a [`Process`](crate::Process) target does), so it reaches shared state
///   through statics. If it panics, the barrier breaks, the other parties get
///   `BrokenBarrier` and the panic goes on in the party that ran it (Python's action
///   raising: the same).
/// - A timeout or abort while the action runs breaks the barrier, and the party running
///   the action gets `BrokenBarrier` too once it is done (Python lets that party through).
/// - [`reset`](Self::reset) waits for a running action to finish.
#[derive(Clone)]
pub struct Barrier {
    map: Arc<Mapping>,
    action: Option<fn()>,
    timeout: Option<Duration>,
}

impl fmt::Debug for Barrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Barrier")
            .field("parties", &self.parties())
            .field("n_waiting", &self.n_waiting())
            .field("broken", &self.broken())
            .field("action", &self.action.is_some())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Barrier {
    /// A barrier for `parties` parties (1 to 65535); Python's `Barrier(parties)`.
    pub fn new(parties: u32) -> Result<Barrier, SyncError> {
        if parties == 0 || parties > COUNT_MASK {
            return Err(SyncError::InvalidArgument(format!(
                "a barrier needs between 1 and {COUNT_MASK} parties, not {parties}"
            )));
        }
        let map = create(Kind::Barrier)?;
        map.atomic_u32(WORD1).store(parties, SeqCst);
        Ok(Barrier {
            map,
            action: None,
            timeout: None,
        })
    }

    /// Sets the action the last party to arrive runs, once per generation, before the
    /// parties are released; Python's `Barrier(parties, action)`. It applies to this handle
    /// and the handles cloned or sent from it afterwards (give it before sharing the
    /// barrier, so that every party runs the same one).
    pub fn with_action(mut self, action: fn()) -> Self {
        self.action = Some(action);
        self
    }

    /// Sets the default timeout of [`wait`](Self::wait); Python's `Barrier(parties,
    /// timeout=...)`. Like the action, it travels with the handle.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The default timeout of [`wait`](Self::wait), if any.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    fn state(&self) -> &AtomicU32 {
        self.map.atomic_u32(WORD0)
    }

    fn outcome_word(&self, gen: u32) -> (&AtomicU32, u32) {
        let word = self.map.atomic_u32(OUTCOMES_AT + (gen as usize / 32) * 4);
        (word, 1 << (gen % 32))
    }

    /// Records how generation `gen` ended. Only the party that set [`ENDING`] calls it.
    fn set_outcome(&self, gen: u32, broken: bool) {
        let (word, bit) = self.outcome_word(gen);
        if broken {
            word.fetch_or(bit, SeqCst);
        } else {
            word.fetch_and(!bit, SeqCst);
        }
    }

    fn ended_broken(&self, gen: u32) -> bool {
        let (word, bit) = self.outcome_word(gen);
        word.load(SeqCst) & bit != 0
    }

    /// The number of parties needed to pass; Python's `parties`.
    pub fn parties(&self) -> u32 {
        self.map.atomic_u32(WORD1).load(SeqCst)
    }

    /// The number of parties waiting now; Python's `n_waiting`.
    pub fn n_waiting(&self) -> u32 {
        self.state().load(SeqCst) & COUNT_MASK
    }

    /// Whether the barrier is broken; Python's `broken`.
    pub fn broken(&self) -> bool {
        self.state().load(SeqCst) & BROKEN != 0
    }

    /// Breaks the barrier: current and later waiters get [`SyncError::BrokenBarrier`] until
    /// [`reset`](Self::reset); Python's `abort()`.
    pub fn abort(&self) {
        self.state().fetch_or(BROKEN, SeqCst);
        sys::futex_wake(self.state(), u32::MAX);
    }

    /// Returns the barrier to its empty, unbroken state; Python's `reset()`. Parties
    /// waiting in it get [`SyncError::BrokenBarrier`]; the next `parties` callers of
    /// [`wait`](Self::wait) pass together. If the last party's action is running, this
    /// waits for it to finish first (so an action must not reset its own barrier).
    pub fn reset(&self) {
        let state = self.state();
        loop {
            let cur = state.load(SeqCst);
            if cur & ENDING != 0 {
                sys::futex_wait(state, cur, None);
                continue;
            }
            if state
                .compare_exchange(cur, cur | ENDING, SeqCst, SeqCst)
                .is_err()
            {
                continue;
            }
            let gen = generation(cur);
            self.set_outcome(gen, true);
            state.store(next_generation(gen), SeqCst);
            sys::futex_wake(state, u32::MAX);
            return;
        }
    }

    /// Waits for all parties, at most the default [`timeout`](Self::timeout) if one was
    /// set; returns this party's index. Python's `wait()`.
    pub fn wait(&self) -> Result<u32, SyncError> {
        self.wait_until(self.timeout.and_then(crate::time::deadline))
    }

    /// Waits at most `timeout` for all parties; on timeout the barrier breaks and this (and
    /// every other waiter) gets [`SyncError::BrokenBarrier`]. Python's `wait(timeout)`.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<u32, SyncError> {
        self.wait_until(crate::time::deadline(timeout))
    }

    fn wait_until(&self, deadline: Option<Instant>) -> Result<u32, SyncError> {
        let parties = self.parties();
        let state = self.state();
        let (index, gen) = loop {
            let cur = state.load(SeqCst);
            if cur & BROKEN != 0 {
                return Err(SyncError::BrokenBarrier);
            }
            if cur & ENDING != 0 {
                // The previous generation is being released (or reset): wait for the next.
                if !sys::futex_wait(state, cur, deadline) {
                    self.abort();
                    return Err(SyncError::BrokenBarrier);
                }
                continue;
            }
            let count = cur & COUNT_MASK;
            let gen = generation(cur);
            if count + 1 >= parties {
                // The last to arrive: this party ends the generation.
                if state
                    .compare_exchange(cur, cur | ENDING, SeqCst, SeqCst)
                    .is_ok()
                {
                    return self.release(gen, count);
                }
            } else if state.compare_exchange(cur, cur + 1, SeqCst, SeqCst).is_ok() {
                break (count, gen);
            }
        };
        loop {
            let cur = state.load(SeqCst);
            if generation(cur) != gen {
                return self.outcome(gen, index);
            }
            if cur & BROKEN != 0 {
                return Err(SyncError::BrokenBarrier);
            }
            if !sys::futex_wait(state, cur, deadline) {
                // Out of time: break this generation, unless it ended meanwhile.
                let mut cur = state.load(SeqCst);
                loop {
                    if generation(cur) != gen {
                        return self.outcome(gen, index);
                    }
                    match state.compare_exchange(cur, cur | BROKEN, SeqCst, SeqCst) {
                        Ok(_) => break,
                        Err(now) => cur = now,
                    }
                }
                sys::futex_wake(state, u32::MAX);
                return Err(SyncError::BrokenBarrier);
            }
        }
    }

    fn outcome(&self, gen: u32, index: u32) -> Result<u32, SyncError> {
        if self.ended_broken(gen) {
            Err(SyncError::BrokenBarrier)
        } else {
            Ok(index)
        }
    }

    /// Ends generation `gen` as the last party (holding [`ENDING`]): runs the action, then
    /// lets everyone go, unless the barrier broke meanwhile.
    fn release(&self, gen: u32, index: u32) -> Result<u32, SyncError> {
        let state = self.state();
        self.set_outcome(gen, false);
        if let Some(action) = self.action {
            /// Breaks the barrier if the action panics, so that nobody waits for ever.
            struct BreakOnUnwind<'a>(&'a AtomicU32);
            impl Drop for BreakOnUnwind<'_> {
                fn drop(&mut self) {
                    if std::thread::panicking() {
                        let _ = self
                            .0
                            .fetch_update(SeqCst, SeqCst, |v| Some((v | BROKEN) & !ENDING));
                        sys::futex_wake(self.0, u32::MAX);
                    }
                }
            }
            let guard = BreakOnUnwind(state);
            action();
            drop(guard);
        }
        let mut cur = state.load(SeqCst);
        loop {
            let (next, result) = if cur & BROKEN != 0 {
                (cur & !ENDING, Err(SyncError::BrokenBarrier))
            } else {
                (next_generation(gen), Ok(index))
            };
            match state.compare_exchange(cur, next, SeqCst, SeqCst) {
                Ok(_) => {
                    sys::futex_wake(state, u32::MAX);
                    return result;
                }
                Err(now) => cur = now,
            }
        }
    }
}

#[derive(Serialize)]
struct BarrierOut<'a> {
    #[serde(serialize_with = "ser_ref_map")]
    map: &'a Mapping,
    /// The action's offset from the anchor function (see `process::wire`).
    action: Option<i64>,
    timeout: Option<Duration>,
}

fn ser_ref_map<S: Serializer>(map: &&Mapping, s: S) -> Result<S::Ok, S::Error> {
    ser_map(map, s)
}

#[derive(Deserialize)]
struct BarrierIn {
    #[serde(deserialize_with = "de_barrier")]
    map: Arc<Mapping>,
    action: Option<i64>,
    timeout: Option<Duration>,
}

fn de_barrier<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<Mapping>, D::Error> {
    de_map(d, Kind::Barrier)
}

/// The action whose offset from the anchor is `offset`, if that lies in this executable.
fn action_at(offset: i64) -> Result<fn(), String> {
    use crate::process::wire;
    let offset = isize::try_from(offset).map_err(|_| "its action's offset is out of range")?;
    let addr = wire::address_of(offset);
    if let Some(object) = crate::process::foreign_object(wire::anchor as fn() as usize, &[addr]) {
        return Err(format!("its action would lie in {object}"));
    }
    // SAFETY: `addr` is the address of a `fn()` in this executable image: the sender, a
    // process of the same executable (every gpuproc process is), took the offset of a
    // `fn()` from the same anchor, and the address was checked to lie in this executable.
    Ok(unsafe { std::mem::transmute::<usize, fn()>(addr) })
}

impl Serialize for Barrier {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let action = self
            .action
            .map(|f| crate::process::wire::offset_of(f as usize) as i64);
        BarrierOut {
            map: &self.map,
            action,
            timeout: self.timeout,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Barrier {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let b = BarrierIn::deserialize(d)?;
        let action = match b.action {
            None => None,
            Some(offset) => Some(action_at(offset).map_err(|reason| {
                serde::de::Error::custom(SyncError::WrongObject {
                    expected: "Barrier",
                    reason,
                })
            })?),
        };
        Ok(Barrier {
            map: b.map,
            action,
            timeout: b.timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_in_one_process() {
        let lock = Lock::new().unwrap();
        let g = lock.lock().unwrap();
        assert!(!g.owner_died());
        assert!(lock.lock().unwrap_err().is_deadlock());
        drop(g);
        assert!(lock.release().unwrap_err().is_not_owner());
        assert!(lock.try_acquire().unwrap().is_some());
        lock.release().unwrap();
    }

    #[test]
    fn rlock_nests() {
        let l = RLock::new().unwrap();
        let a = l.lock().unwrap();
        let b = l.lock().unwrap();
        drop(b);
        let l2 = l.clone();
        let held = std::thread::spawn(move || l2.try_acquire().unwrap().is_none())
            .join()
            .unwrap();
        assert!(held);
        drop(a);
        assert!(l.release().unwrap_err().is_not_owner());
    }

    #[test]
    fn semaphore_counts_between_threads() {
        let s = Semaphore::new(0).unwrap();
        assert!(!s.try_acquire());
        assert!(!s.acquire_timeout(Duration::from_millis(5)));
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.acquire_timeout(Duration::from_secs(60)));
        s.release().unwrap();
        assert!(t.join().unwrap());
        assert_eq!(s.get_value(), 0);
        let b = BoundedSemaphore::new(1).unwrap();
        assert!(b.release().unwrap_err().is_over_released());
    }

    #[test]
    fn locked_and_owned_say_who_holds_a_lock() {
        let lock = Lock::new().unwrap();
        assert!(!lock.locked() && !lock.is_owned());
        let g = lock.lock().unwrap();
        assert!(lock.locked() && lock.is_owned());
        let l2 = lock.clone();
        let seen = std::thread::spawn(move || (l2.locked(), l2.is_owned()))
            .join()
            .unwrap();
        assert_eq!(seen, (true, false));
        drop(g);
        assert!(!lock.locked() && !lock.is_owned());
        // A holder that ended without releasing it leaves it free for the next locker.
        let l3 = lock.clone();
        std::thread::spawn(move || std::mem::forget(l3.lock().unwrap()))
            .join()
            .unwrap();
        assert!(!lock.locked());
        assert!(lock.lock().unwrap().owner_died());
    }

    #[test]
    fn rlock_counts_its_depth_per_thread() {
        let l = RLock::new().unwrap();
        let a = l.lock().unwrap();
        let _ = l.acquire().unwrap();
        assert_eq!(l.count(), 2);
        let l2 = l.clone();
        let other = std::thread::spawn(move || (l2.count(), l2.is_owned(), l2.locked()))
            .join()
            .unwrap();
        assert_eq!(other, (0, false, true));
        l.release().unwrap();
        assert_eq!(l.count(), 1);
        drop(a);
        assert_eq!((l.count(), l.is_owned(), l.locked()), (0, false, false));
    }

    static ACTIONS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

    fn count_action() {
        ACTIONS.fetch_add(1, SeqCst);
    }

    /// Runs `f(barrier, i)` on `n` threads and collects what they return.
    fn on_threads<T: Send + 'static>(b: &Barrier, n: u32, f: fn(Barrier, u32) -> T) -> Vec<T> {
        let ts: Vec<_> = (0..n)
            .map(|i| {
                let b = b.clone();
                std::thread::spawn(move || f(b, i))
            })
            .collect();
        ts.into_iter().map(|t| t.join().unwrap()).collect()
    }

    #[test]
    fn the_action_runs_once_per_generation_before_anyone_passes() {
        let b = Barrier::new(4)
            .unwrap()
            .with_action(count_action)
            .with_timeout(Duration::from_secs(60));
        let seen = on_threads(&b, 4, |b, _| {
            b.wait().unwrap();
            let first = ACTIONS.load(SeqCst);
            b.wait().unwrap();
            (first, ACTIONS.load(SeqCst))
        });
        assert!(seen.iter().all(|&s| s == (1, 2)), "{seen:?}");
    }

    fn panicking_action() {
        panic!("the action failed");
    }

    #[test]
    fn a_panicking_action_breaks_the_barrier() {
        let b = Barrier::new(3)
            .unwrap()
            .with_action(panicking_action)
            .with_timeout(Duration::from_secs(60));
        let seen = on_threads(&b, 3, |b, _| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.wait()))
                .map(|r| r.map_err(|e| e.is_broken_barrier()))
        });
        let panics = seen.iter().filter(|r| r.is_err()).count();
        let broken = seen.iter().filter(|r| matches!(r, Ok(Err(true)))).count();
        assert_eq!((panics, broken), (1, 2), "{seen:?}");
        assert!(b.broken());
        b.reset();
        assert!(!b.broken());
    }

    #[test]
    fn reset_sends_waiters_away_broken_and_the_barrier_works_again() {
        let b = Barrier::new(3).unwrap();
        let b2 = b.clone();
        let t = std::thread::spawn(move || b2.wait_timeout(Duration::from_secs(60)));
        let deadline = crate::time::deadline(Duration::from_secs(60));
        while b.n_waiting() < 1 && crate::time::remaining(deadline) != Some(Duration::ZERO) {
            std::thread::yield_now();
        }
        assert_eq!(b.n_waiting(), 1);
        b.reset();
        assert!(t.join().unwrap().unwrap_err().is_broken_barrier());
        assert!(!b.broken());
        assert_eq!(b.n_waiting(), 0);
        let mut again = on_threads(&b, 3, |b, _| {
            b.wait_timeout(Duration::from_secs(60)).unwrap()
        });
        again.sort();
        assert_eq!(again, [0, 1, 2]);
    }

    #[test]
    fn a_default_timeout_breaks_a_lonely_wait() {
        let b = Barrier::new(2)
            .unwrap()
            .with_timeout(Duration::from_millis(10));
        assert!(b.wait().unwrap_err().is_broken_barrier());
        assert!(b.broken());
        b.reset();
        assert!(!b.broken());
    }

    #[test]
    fn barrier_between_threads() {
        let b = Barrier::new(3).unwrap();
        let ts: Vec<_> = (0..2)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || b.wait_timeout(Duration::from_secs(60)).unwrap())
            })
            .collect();
        let me = b.wait_timeout(Duration::from_secs(60)).unwrap();
        let mut all: Vec<u32> = ts.into_iter().map(|t| t.join().unwrap()).collect();
        all.push(me);
        all.sort();
        assert_eq!(all, [0, 1, 2]);
        // A second round works too; then a timeout breaks it.
        assert!(b
            .wait_timeout(Duration::from_millis(10))
            .unwrap_err()
            .is_broken_barrier());
        assert!(b.broken());
        assert!(b.wait().unwrap_err().is_broken_barrier());
    }
}
