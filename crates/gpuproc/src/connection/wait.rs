//! Waiting on many objects at once: Python's `multiprocessing.connection.wait`.
//!
//! Anything with a descriptor that becomes readable when it is ready implements
//! [`Waitable`]: both kinds of connection, queues (their reading end), process
//! [`Sentinel`](crate::Sentinel)s, and plain descriptors. [`wait`] polls them
//! together and returns the ready ones.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use super::ConnectionError;

/// An object [`wait`] can wait on: it is ready when its descriptor is readable (or closed),
/// or when [`ready_now`](Self::ready_now) says so. Python's "object with a `fileno()`".
///
/// Implemented for [`channel::Connection`](crate::channel::Connection) (a message or the
/// other end's closing is waiting), [`connection::Connection`](super::Connection) (part of
/// a message or the other end's closing is waiting), [`Queue`](crate::channel::Queue),
/// [`JoinableQueue`](crate::channel::JoinableQueue) and
/// [`SimpleQueue`](crate::channel::SimpleQueue) (an item is waiting, or the queue was
/// [shut down](crate::channel::Queue::shutdown)), a process's
/// [`Sentinel`](crate::Sentinel) (the process has ended), and [`OwnedFd`] and
/// [`BorrowedFd`] (readable). Implement it for your own types to mix them in.
pub trait Waitable {
    /// The descriptor that becomes readable when this object is ready.
    fn wait_fd(&self) -> BorrowedFd<'_>;

    /// Whether the object is ready without its descriptor being readable (something it
    /// buffered in this process, say). The default is `false`.
    fn ready_now(&self) -> bool {
        false
    }
}

impl Waitable for OwnedFd {
    fn wait_fd(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }
}

impl Waitable for BorrowedFd<'_> {
    fn wait_fd(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }
}

impl<W: Waitable + ?Sized> Waitable for &W {
    fn wait_fd(&self) -> BorrowedFd<'_> {
        (**self).wait_fd()
    }

    fn ready_now(&self) -> bool {
        (**self).ready_now()
    }
}

impl<W: Waitable + ?Sized> Waitable for Box<W> {
    fn wait_fd(&self) -> BorrowedFd<'_> {
        (**self).wait_fd()
    }

    fn ready_now(&self) -> bool {
        (**self).ready_now()
    }
}

/// Waits until at least one of `objects` is ready, or `timeout` passes (`None`: for ever),
/// and returns the ready ones, in the order given (empty on timeout); Python's
/// `multiprocessing.connection.wait(object_list, timeout)`.
///
/// The objects may be of one type (`wait(&receivers, ..)` over a `Vec<Connection>`), or of
/// several, as `&dyn Waitable`; [`wait_indices`] returns positions instead, which is
/// simpler when the kinds differ. As in Python, "ready" means a receive would not wait at
/// that moment: with several readers of one queue or pipe, another may take the message
/// first, so receive with `try_` or `_timeout` forms when that can happen.
///
/// ```
/// # gpuproc::init();
/// use gpuproc::channel::{Pipe, Queue};
/// use gpuproc::connection::{wait, Waitable};
/// use std::time::Duration;
///
/// fn child(q: Queue<u32>) {
///     q.put(7).unwrap();
/// }
///
/// let (a, _b) = Pipe::new()?;
/// let q = Queue::new()?;
/// let mut p = gpuproc::Process::new(child, q.clone());
/// p.start()?;
/// let sentinel = p.sentinel()?;
/// // The queue gets an item; the pipe stays quiet; the process ends.
/// let mut pending: Vec<&dyn Waitable> = vec![&a, &q, &sentinel];
/// let ready = wait(pending.iter().copied(), Some(Duration::from_secs(60)))?;
/// assert!(!ready.is_empty());
/// assert_eq!(q.get_timeout(Duration::from_secs(60))?, 7);
/// p.join()?;
/// assert!(wait([&sentinel], Some(Duration::ZERO))?.len() == 1);
/// // Nothing comes on the pipe: a timeout returns nothing.
/// pending.truncate(1);
/// assert!(wait(pending, Some(Duration::from_millis(10)))?.is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Differences from Python
/// Python returns the ready objects themselves; here they are references to them (for
/// objects of several types, `&dyn Waitable`, which [`wait_indices`] avoids). Waiting on
/// nothing with no timeout is an error rather than a wait for ever.
pub fn wait<'a, W>(
    objects: impl IntoIterator<Item = &'a W>,
    timeout: Option<Duration>,
) -> Result<Vec<&'a W>, ConnectionError>
where
    W: Waitable + ?Sized + 'a,
{
    let objects: Vec<&'a W> = objects.into_iter().collect();
    let ready = ready_among(&objects, timeout)?;
    Ok(objects
        .into_iter()
        .zip(ready)
        .filter_map(|(o, r)| r.then_some(o))
        .collect())
}

/// [`wait`], returning the positions of the ready objects in `objects`, in increasing
/// order (empty on timeout).
///
/// ```
/// use gpuproc::channel::Pipe;
/// use gpuproc::connection::{wait_indices, Waitable};
/// use std::time::Duration;
///
/// let (a, b) = Pipe::new()?;
/// let (c, _d) = Pipe::new()?;
/// b.send(&1u8)?;
/// let ready = wait_indices(&[&a as &dyn Waitable, &c], Some(Duration::from_secs(60)))?;
/// assert_eq!(ready, [0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn wait_indices<W>(
    objects: &[W],
    timeout: Option<Duration>,
) -> Result<Vec<usize>, ConnectionError>
where
    W: Waitable,
{
    let refs: Vec<&W> = objects.iter().collect();
    let ready = ready_among(&refs, timeout)?;
    Ok(ready
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| r.then_some(i))
        .collect())
}

/// Which of `objects` are ready, waiting at most `timeout` for one to be.
fn ready_among<W: Waitable + ?Sized>(
    objects: &[&W],
    timeout: Option<Duration>,
) -> Result<Vec<bool>, ConnectionError> {
    if objects.is_empty() {
        return match timeout {
            None => Err(ConnectionError::InvalidArgument(
                "wait() was given no objects and no timeout: it would wait for ever".into(),
            )),
            // Nothing can become ready: Python sleeps out the timeout; so do we.
            Some(t) => {
                std::thread::sleep(t.min(Duration::from_secs(u32::MAX.into())));
                Ok(Vec::new())
            }
        };
    }
    let buffered: Vec<bool> = objects.iter().map(|o| o.ready_now()).collect();
    // Something is ready already: only look at the others, without waiting.
    let deadline = if buffered.iter().any(|&b| b) {
        Some(Instant::now())
    } else {
        timeout.and_then(crate::time::deadline)
    };
    let fds: Vec<BorrowedFd<'_>> = objects.iter().map(|o| o.wait_fd()).collect();
    let readable =
        crate::sys::poll_readable(&fds, deadline).map_err(|source| ConnectionError::Io {
            context: "waiting for objects to become ready".into(),
            source,
        })?;
    Ok(buffered
        .into_iter()
        .zip(readable)
        .map(|(b, r)| b || r)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::Waker;

    #[test]
    fn ready_descriptors_are_returned_in_order() {
        let a = Waker::new().unwrap();
        let b = Waker::new().unwrap();
        let c = Waker::new().unwrap();
        b.wake();
        c.wake();
        let fds = [a.fd(), b.fd(), c.fd()];
        assert_eq!(
            wait_indices(&fds, Some(Duration::from_secs(60))).unwrap(),
            [1, 2]
        );
        let got = wait(&fds, Some(Duration::ZERO)).unwrap();
        assert_eq!(got.len(), 2);
        b.reset();
        c.reset();
        assert!(wait(&fds, Some(Duration::ZERO)).unwrap().is_empty());
        assert!(wait_indices(&fds, Some(Duration::from_millis(5)))
            .unwrap()
            .is_empty());
    }

    struct Buffered<'a>(BorrowedFd<'a>);

    impl Waitable for Buffered<'_> {
        fn wait_fd(&self) -> BorrowedFd<'_> {
            self.0
        }
        fn ready_now(&self) -> bool {
            true
        }
    }

    #[test]
    fn objects_ready_without_their_descriptor_do_not_wait() {
        let a = Waker::new().unwrap();
        let b = Waker::new().unwrap();
        let objs: [&dyn Waitable; 2] = [&a.fd(), &Buffered(b.fd())];
        // With no timeout this would wait for ever if the buffered one were not seen.
        assert_eq!(wait_indices(&objs, None).unwrap(), [1]);
    }

    #[test]
    fn nothing_to_wait_on() {
        let none: [&dyn Waitable; 0] = [];
        assert!(wait(none, None).is_err());
        assert!(wait(none, Some(Duration::ZERO)).unwrap().is_empty());
    }
}
