//! Proxies of a manager's queues, locks and events: Python's `manager.Queue()`,
//! `manager.Lock()` and `manager.Event()`. Their blocking calls wait in the manager, on a
//! thread of their own connection, so they block neither the manager nor the other
//! threads of the calling process.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::proxy::{proxy_type, unexpected};
use super::wire::{decode, encode, Link, Reply, Request};
use super::ManagerError;

proxy_type!(
    /// A proxy of a queue held by a [`Manager`](super::Manager); Python's
    /// `manager.Queue(maxsize)`. Items are any serde type (without descriptors); any
    /// process that received the proxy (or looked it up on a remote manager) can put and
    /// get, in FIFO order.
    ///
    /// A `get` that waits does so in the manager, on its connection's own thread: other
    /// clients, and other threads of this process using the same proxy, go on meanwhile.
    /// An item taken for a client found gone when the answer is sent (its process died
    /// while waiting) is put back at the front of the queue (Python loses it).
    ///
    /// ```
    /// # gpuproc::init();
    /// use std::time::Duration;
    /// use gpuproc::managers::Manager;
    ///
    /// let manager = Manager::start()?;
    /// let q = manager.queue::<String>(2)?;
    /// q.put(&"one".to_string())?;
    /// assert_eq!(q.qsize()?, 1);
    /// assert_eq!(q.get_timeout(Duration::from_secs(10))?, "one");
    /// assert!(q.get_timeout(Duration::from_millis(10)).unwrap_err().is_queue_empty());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[doc(alias = "Queue")]
    ManagedQueue<T>
);

impl<T: Serialize + DeserializeOwned> ManagedQueue<T> {
    /// Puts `item`, waiting for room in a bounded queue; Python's `q.put(item)`.
    pub fn put(&self, item: &T) -> Result<(), ManagerError> {
        self.put_until(item, None)
    }

    /// Puts `item`, waiting at most `timeout` for room: [`ManagerError::Full`] after that
    /// (Python's `queue.Full`); Python's `q.put(item, timeout=timeout)`.
    pub fn put_timeout(&self, item: &T, timeout: Duration) -> Result<(), ManagerError> {
        self.put_until(item, Some(timeout))
    }

    /// Puts `item` if there is room now; Python's `q.put_nowait(item)`.
    pub fn try_put(&self, item: &T) -> Result<(), ManagerError> {
        self.put_until(item, Some(Duration::ZERO))
    }

    fn put_until(&self, item: &T, timeout: Option<Duration>) -> Result<(), ManagerError> {
        let item = encode("item", item)?;
        match self.proxy.call_waiting(
            Request::Put {
                queue: self.proxy.id,
                item,
                timeout,
            },
            timeout,
        )? {
            Reply::Done => Ok(()),
            Reply::Full => Err(ManagerError::Full),
            other => Err(unexpected(other)),
        }
    }

    /// Takes the oldest item, waiting for one; Python's `q.get()`.
    pub fn get(&self) -> Result<T, ManagerError> {
        self.get_until(None)
    }

    /// Takes the oldest item, waiting at most `timeout`: [`ManagerError::Empty`] after that
    /// (Python's `queue.Empty`); Python's `q.get(timeout=timeout)`.
    pub fn get_timeout(&self, timeout: Duration) -> Result<T, ManagerError> {
        self.get_until(Some(timeout))
    }

    /// Takes the oldest item if there is one now; Python's `q.get_nowait()`.
    pub fn try_get(&self) -> Result<T, ManagerError> {
        self.get_until(Some(Duration::ZERO))
    }

    fn get_until(&self, timeout: Option<Duration>) -> Result<T, ManagerError> {
        match self.proxy.call_waiting(
            Request::Take {
                queue: self.proxy.id,
                timeout,
            },
            timeout,
        )? {
            Reply::Value(Some(v)) => decode("item", &v),
            Reply::Empty => Err(ManagerError::Empty),
            other => Err(unexpected(other)),
        }
    }

    /// The number of items; Python's `q.qsize()`.
    pub fn qsize(&self) -> Result<usize, ManagerError> {
        match self.request(Request::QueueLen {
            queue: self.proxy.id,
        })? {
            Reply::Len(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
            other => Err(unexpected(other)),
        }
    }

    /// Whether the queue is empty; Python's `q.empty()`.
    pub fn empty(&self) -> Result<bool, ManagerError> {
        Ok(self.qsize()? == 0)
    }
}

proxy_type!(
    /// A proxy of a lock held by a [`Manager`](super::Manager); Python's `manager.Lock()`.
    /// [`lock`](Self::lock) gives a guard that releases it when dropped (or with
    /// [`release`](ManagedLockGuard::release), which reports errors).
    ///
    /// A lock belongs to the connection that acquired it (the guard keeps that connection).
    /// **Difference from Python:** when that connection closes (the holder's process died,
    /// or was killed, while holding the lock) the manager releases the lock, and the next
    /// waiter gets it; Python's manager keeps it locked for ever, and every other process
    /// waiting on it hangs. As in Python, the data the lock protected may be half-updated
    /// by the holder that died.
    ///
    /// ```
    /// # gpuproc::init();
    /// use std::time::Duration;
    /// use gpuproc::managers::Manager;
    ///
    /// let manager = Manager::start()?;
    /// let lock = manager.lock()?;
    /// let guard = lock.lock()?;
    /// assert!(lock.locked()?);
    /// assert!(lock.lock_timeout(Duration::from_millis(10))?.is_none());
    /// guard.release()?;
    /// assert!(!lock.locked()?);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[doc(alias = "Lock")]
    ManagedLock<>
);

/// A held [`ManagedLock`]: released when dropped, or by [`release`](Self::release).
#[must_use = "the lock is released when the guard is dropped"]
pub struct ManagedLockGuard<'a> {
    lock: &'a ManagedLock,
    /// The connection that holds the lock.
    link: Option<Link>,
}

impl std::fmt::Debug for ManagedLockGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedLockGuard")
            .field("lock", &self.lock)
            .finish()
    }
}

impl ManagedLock {
    /// Acquires the lock, waiting as long as it takes; Python's `lock.acquire()`.
    pub fn lock(&self) -> Result<ManagedLockGuard<'_>, ManagerError> {
        match self.acquire(None)? {
            Some(g) => Ok(g),
            None => Err(ManagerError::Refused {
                reason: "the manager gave up waiting for the lock".into(),
            }),
        }
    }

    /// Acquires the lock, waiting at most `timeout`; `None` if it stayed held; Python's
    /// `lock.acquire(timeout=timeout)`.
    pub fn lock_timeout(
        &self,
        timeout: Duration,
    ) -> Result<Option<ManagedLockGuard<'_>>, ManagerError> {
        self.acquire(Some(timeout))
    }

    /// Acquires the lock if it is free now; Python's `lock.acquire(blocking=False)`.
    pub fn try_lock(&self) -> Result<Option<ManagedLockGuard<'_>>, ManagerError> {
        self.acquire(Some(Duration::ZERO))
    }

    fn acquire(
        &self,
        timeout: Option<Duration>,
    ) -> Result<Option<ManagedLockGuard<'_>>, ManagerError> {
        let mut link = self.proxy.take_link()?;
        let req = Request::Acquire {
            lock: self.proxy.id,
            timeout,
        };
        match self.proxy.exchange(&mut link, &req, timeout)? {
            Reply::Flag(true) => Ok(Some(ManagedLockGuard {
                lock: self,
                link: Some(link),
            })),
            Reply::Flag(false) => {
                self.proxy.put_link(link);
                Ok(None)
            }
            other => Err(unexpected(other)),
        }
    }

    /// Whether the lock is held (by anyone); Python 3.13's `lock.locked()`.
    pub fn locked(&self) -> Result<bool, ManagerError> {
        match self.request(Request::Locked {
            lock: self.proxy.id,
        })? {
            Reply::Flag(held) => Ok(held),
            other => Err(unexpected(other)),
        }
    }
}

impl ManagedLockGuard<'_> {
    /// Releases the lock; Python's `lock.release()`. An error says the manager could not
    /// be told (it is gone, or did not answer in time: then it releases the lock itself,
    /// since this guard's connection is closed).
    pub fn release(mut self) -> Result<(), ManagerError> {
        self.release_now()
    }

    fn release_now(&mut self) -> Result<(), ManagerError> {
        let Some(mut link) = self.link.take() else {
            return Ok(());
        };
        let proxy = &self.lock.proxy;
        let release = Request::Release { lock: proxy.id };
        match proxy.exchange(&mut link, &release, Some(Duration::ZERO))? {
            Reply::Done => {
                proxy.put_link(link);
                Ok(())
            }
            other => Err(unexpected(other)),
        }
    }
}

impl Drop for ManagedLockGuard<'_> {
    fn drop(&mut self) {
        // On an error the connection is closed, which releases the lock in the manager.
        let _ = self.release_now();
    }
}

proxy_type!(
    /// A proxy of an event held by a [`Manager`](super::Manager); Python's
    /// `manager.Event()`: a flag that processes [`set`](Self::set), [`clear`](Self::clear)
    /// and [`wait`](Self::wait) for.
    ///
    /// ```
    /// # gpuproc::init();
    /// use std::time::Duration;
    /// use gpuproc::managers::Manager;
    ///
    /// let manager = Manager::start()?;
    /// let event = manager.event()?;
    /// assert!(!event.wait_timeout(Duration::from_millis(10))?);
    /// event.set()?;
    /// assert!(event.is_set()? && event.wait_timeout(Duration::from_secs(10))?);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[doc(alias = "Event")]
    ManagedEvent<>
);

impl ManagedEvent {
    /// Sets the flag and wakes every waiter; Python's `event.set()`.
    pub fn set(&self) -> Result<(), ManagerError> {
        self.set_to(true)
    }

    /// Clears the flag; Python's `event.clear()`.
    pub fn clear(&self) -> Result<(), ManagerError> {
        self.set_to(false)
    }

    fn set_to(&self, set: bool) -> Result<(), ManagerError> {
        match self.request(Request::SetEvent {
            event: self.proxy.id,
            set,
        })? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Whether the flag is set; Python's `event.is_set()`.
    pub fn is_set(&self) -> Result<bool, ManagerError> {
        match self.request(Request::IsSet {
            event: self.proxy.id,
        })? {
            Reply::Flag(set) => Ok(set),
            other => Err(unexpected(other)),
        }
    }

    /// Waits until the flag is set; Python's `event.wait()`.
    pub fn wait(&self) -> Result<(), ManagerError> {
        self.wait_until(None).map(|_| ())
    }

    /// Waits at most `timeout` for the flag; whether it was set; Python's
    /// `event.wait(timeout)`.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<bool, ManagerError> {
        self.wait_until(Some(timeout))
    }

    fn wait_until(&self, timeout: Option<Duration>) -> Result<bool, ManagerError> {
        match self.proxy.call_waiting(
            Request::WaitEvent {
                event: self.proxy.id,
                timeout,
            },
            timeout,
        )? {
            Reply::Flag(set) => Ok(set),
            other => Err(unexpected(other)),
        }
    }
}
