//! Shared memory mappings (memfd, /dev/shm, mmap), futexes and process-shared robust mutexes.
//!
//! Everything `sync` and `shm` need from the kernel and the C library is here; they see a
//! small safe API: a [`Mapping`] of a shared file, futex wait/wake on a word inside it, and a
//! [`RobustMutex`] living in it.
//!
//! Why pthread mutexes for locks: a lock whose holder dies must not stay held. The kernel's
//! mechanism for that is the per-thread robust-futex list (`set_robust_list`), which the C
//! library registers for every thread and owns; adding entries to it behind its back is not
//! possible safely. glibc's process-shared robust mutexes use exactly that list, so the
//! kernel marks a mutex `FUTEX_OWNER_DIED` and wakes a waiter when its holder exits, however
//! it exits (SIGKILL included); the next locker gets `EOWNERDEAD`. Uncontended they are one
//! compare-and-swap plus list bookkeeping, no system call.

use std::cell::RefCell;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};
use rustix::thread::futex;

/// Where named shared memory blocks live (what `shm_open` uses on Linux).
pub(crate) const SHM_DIR: &str = "/dev/shm";

/// A shared, read-write mapping of a whole file (a memfd or a file in /dev/shm).
///
/// Unmapped on drop. The file descriptor is kept so that the mapping can be sent to another
/// process, which maps the same file.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is plain shared memory, valid until drop wherever the handle goes; all
// access to its contents goes through atomics or the C library's process-shared primitives.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only hands out raw pointers and atomics.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// A new anonymous memory file of `len` bytes (zero-filled), mapped, and sealed against
    /// any change of size: whoever receives it can map it without risk of a fault (see
    /// [`map_existing`](Self::map_existing)).
    pub fn anonymous(name: &str, len: usize) -> io::Result<Mapping> {
        let fd = rustix::fs::memfd_create(
            name,
            rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
        )?;
        rustix::fs::ftruncate(&fd, len as u64)?;
        rustix::fs::fcntl_add_seals(
            &fd,
            rustix::fs::SealFlags::SHRINK
                | rustix::fs::SealFlags::GROW
                | rustix::fs::SealFlags::SEAL,
        )?;
        Mapping::map(fd, len)
    }

    /// Maps the whole of the file behind `fd`, whose size is `len`.
    pub fn map(fd: OwnedFd, len: usize) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cannot map an empty file",
            ));
        }
        let ptr = map_fresh(
            fd.as_fd(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::SHARED,
        )?;
        Ok(Mapping { ptr, len, fd })
    }

    /// Maps the whole of a memfd received from another process, checking that it is sealed
    /// against shrinking (as [`anonymous`](Self::anonymous) makes them: otherwise any holder
    /// could cut it short under our mapping, and touching the lost pages would fault) and
    /// that it has at least `min` bytes. The size mapped is the memfd's own (`fstat`), never
    /// one read from its contents.
    pub fn map_existing(fd: OwnedFd, min: usize) -> io::Result<Mapping> {
        let seals = rustix::fs::fcntl_get_seals(&fd).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the descriptor received is not a memfd ({e})"),
            )
        })?;
        if !seals.contains(rustix::fs::SealFlags::SHRINK) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the memfd received is not sealed against shrinking",
            ));
        }
        let len = file_size(fd.as_fd())?;
        if len < min {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the shared memory has {len} bytes, {min} expected"),
            ));
        }
        Mapping::map(fd, len)
    }

    /// The start of the mapping.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The file behind the mapping.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The `u64` at byte `offset` (8-aligned, in bounds), as an atomic.
    pub fn atomic_u64(&self, offset: usize) -> &AtomicU64 {
        assert!(
            offset % 8 == 0 && offset + 8 <= self.len,
            "bad offset {offset}"
        );
        // SAFETY: in bounds and aligned (mappings are page-aligned), valid for the life of
        // `self`; shared memory is only ever accessed atomically.
        unsafe { AtomicU64::from_ptr(self.ptr().add(offset).cast()) }
    }

    /// The `u32` at byte `offset` (4-aligned, in bounds), as an atomic.
    pub fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        assert!(
            offset % 4 == 0 && offset + 4 <= self.len,
            "bad offset {offset}"
        );
        // SAFETY: in bounds and aligned (mappings are page-aligned), valid for the life of
        // `self`; shared memory is only ever accessed atomically or by the C library.
        unsafe { AtomicU32::from_ptr(self.ptr().add(offset).cast()) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range in `map`; every reference into it borrows
        // `self`, so none outlives it.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The seals a [`SealedMapping`] carries: no write, no change of size, no change of seals.
fn all_seals() -> rustix::fs::SealFlags {
    use rustix::fs::SealFlags;
    SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL
}

/// A read-only mapping of a whole memfd that is sealed against every write and every change
/// of size: nobody (no process, no descriptor, no mapping) can change its bytes any more,
/// so they can be handed out as a plain `&[u8]`.
///
/// Mapped private and read-only: the pages are the memfd's own (nothing is copied unless
/// written, which the mapping's protection forbids), and kernels before 6.7 refuse a shared
/// mapping of a write-sealed memfd through a read-write descriptor.
#[derive(Debug)]
pub(crate) struct SealedMapping {
    /// Null when `len` is 0 (nothing is mapped).
    ptr: *const u8,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the memory cannot change (sealed) and is unmapped only on drop; `&SealedMapping`
// hands out shared slices only.
unsafe impl Send for SealedMapping {}
// SAFETY: as above.
unsafe impl Sync for SealedMapping {}

impl SealedMapping {
    /// A new memfd of `len` bytes (zero-filled), given to `fill` as a plain mutable slice
    /// (no one else can see it yet), then sealed and mapped read-only.
    pub fn create_with<R>(
        name: &str,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> R,
    ) -> io::Result<(SealedMapping, R)> {
        let fd = new_sealable_memfd(name, len)?;
        let r = if len == 0 {
            fill(&mut [])
        } else {
            // A memfd created above that no one else holds; unmapped below before the memfd
            // is sealed.
            let ptr = map_fresh(
                fd.as_fd(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
            )?
            .as_ptr()
            .cast::<std::ffi::c_void>();
            struct Unmap(*mut std::ffi::c_void, usize);
            impl Drop for Unmap {
                fn drop(&mut self) {
                    // SAFETY: the mapping made above; the slice into it is gone by now.
                    let _ = unsafe { rustix::mm::munmap(self.0, self.1) };
                }
            }
            let unmap = Unmap(ptr, len);
            // SAFETY: `len` bytes, mapped read-write above, zero-filled (a new memfd), and
            // reachable only through this slice until it is unmapped.
            let buf = unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u8>(), len) };
            let r = fill(buf);
            drop(unmap);
            r
        };
        Ok((SealedMapping::seal_and_map(fd, len)?, r))
    }

    /// A new memfd holding `parts` back to back (written with `pwrite`: one copy, by the
    /// kernel), sealed and mapped read-only.
    pub fn create_from(name: &str, parts: &[&[u8]]) -> io::Result<SealedMapping> {
        let len = parts
            .iter()
            .try_fold(0usize, |n, p| n.checked_add(p.len()))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "too many bytes"))?;
        let fd = new_sealable_memfd(name, len)?;
        let mut at = 0u64;
        for part in parts {
            write_all_at(fd.as_fd(), part, at)?;
            at += part.len() as u64;
        }
        SealedMapping::seal_and_map(fd, len)
    }

    fn seal_and_map(fd: OwnedFd, len: usize) -> io::Result<SealedMapping> {
        rustix::fs::fcntl_add_seals(&fd, all_seals())?;
        SealedMapping::map(fd, len, MapFlags::empty())
    }

    /// Maps a memfd received from another process, which must carry every seal that
    /// [`create_with`](Self::create_with) puts on (write, shrink, grow, seal): otherwise
    /// someone could change it under the slice handed out. Its size is the kernel's
    /// (`fstat`).
    /// `populate` maps every page in the same call (`MAP_POPULATE`): one system call instead
    /// of a page fault per few pages, for a receiver that will read it all.
    pub fn open(fd: OwnedFd, populate: impl FnOnce(usize) -> bool) -> io::Result<SealedMapping> {
        let seals = rustix::fs::fcntl_get_seals(&fd).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the descriptor received is not a memfd ({e})"),
            )
        })?;
        if !seals.contains(all_seals()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the memfd received is not sealed against writing and resizing",
            ));
        }
        let len = file_size(fd.as_fd())?;
        let flags = if populate(len) {
            MapFlags::POPULATE
        } else {
            MapFlags::empty()
        };
        SealedMapping::map(fd, len, flags)
    }

    fn map(fd: OwnedFd, len: usize, flags: MapFlags) -> io::Result<SealedMapping> {
        if len == 0 {
            return Ok(SealedMapping {
                ptr: std::ptr::null(),
                len,
                fd,
            });
        }
        // Private and read-only, of a sealed memfd whose size cannot change.
        let ptr = map_fresh(fd.as_fd(), len, ProtFlags::READ, MapFlags::PRIVATE | flags)?;
        Ok(SealedMapping {
            ptr: ptr.as_ptr().cast_const(),
            len,
            fd,
        })
    }

    /// The bytes (page-aligned).
    pub fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `len` bytes mapped read-only for the life of `self`, which nobody can
        // change (the memfd is sealed against writes and resizing).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The memfd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for SealedMapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: we mapped exactly this range in `map`; every slice into it borrows
            // `self`, so none outlives it.
            let _ = unsafe { rustix::mm::munmap(self.ptr.cast_mut().cast(), self.len) };
        }
    }
}

fn new_sealable_memfd(name: &str, len: usize) -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(
        name,
        rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
    )?;
    let size = u64::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many bytes"))?;
    rustix::fs::ftruncate(&fd, size)?;
    Ok(fd)
}

/// Writes all of `bytes` to `fd` at `offset`.
pub(crate) fn write_all_at(
    fd: BorrowedFd<'_>,
    mut bytes: &[u8],
    mut offset: u64,
) -> io::Result<()> {
    while !bytes.is_empty() {
        match rustix::io::pwrite(fd, bytes, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                bytes = &bytes[n..];
                offset += n as u64;
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The size of the file behind `fd`.
pub(crate) fn file_size(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let size = rustix::fs::fstat(fd)?.st_size;
    usize::try_from(size).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a file size of {size} bytes"),
        )
    })
}

/// `(device, inode)`: what identifies a file, whatever its name.
pub(crate) fn file_id(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let st = rustix::fs::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// Creates `/dev/shm/<name>` exclusively with `len` bytes (owner read-write).
pub(crate) fn shm_create(name: &str, len: usize) -> io::Result<OwnedFd> {
    let path = format!("{SHM_DIR}/{name}");
    let fd = rustix::fs::open(
        path.as_str(),
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::RUSR | Mode::WUSR,
    )?;
    if let Err(e) = rustix::fs::ftruncate(&fd, len as u64) {
        let _ = rustix::fs::unlink(path.as_str());
        return Err(e.into());
    }
    Ok(fd)
}

/// Opens an existing `/dev/shm/<name>` read-write.
pub(crate) fn shm_open(name: &str) -> io::Result<OwnedFd> {
    let path = format!("{SHM_DIR}/{name}");
    Ok(rustix::fs::open(
        path.as_str(),
        OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )?)
}

/// Removes the name `/dev/shm/<name>`, if it still names the file `id`.
///
/// `Ok(false)`: the name is gone, or names another block now (left alone).
pub(crate) fn shm_unlink_if(name: &str, id: (u64, u64)) -> io::Result<bool> {
    let path = format!("{SHM_DIR}/{name}");
    let st = match rustix::fs::stat(path.as_str()) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    if (st.st_dev, st.st_ino) != id {
        return Ok(false);
    }
    match rustix::fs::unlink(path.as_str()) {
        Ok(()) => Ok(true),
        Err(Errno::NOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// A number for generated names: different in each call and each process (not secret: only
/// uniqueness matters, and creation is exclusive anyway).
pub(crate) fn unique_u64() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // A cheap mix (splitmix64's finaliser) so that names do not look sequential.
    let mut x = t ^ (u64::from(super::getpid()) << 40) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Sleeps while `*word == expected`, until woken or `deadline` (`None`: no limit).
///
/// Returns `false` if the deadline passed. Spurious returns happen; callers re-check.
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, deadline: Option<Instant>) -> bool {
    let timeout = match deadline {
        None => None,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            Some(timespec(left))
        }
    };
    match futex::wait(word, futex::Flags::empty(), expected, timeout.as_ref()) {
        Err(Errno::TIMEDOUT) => false,
        // Woken, value changed (AGAIN) or interrupted: the caller looks again.
        _ => true,
    }
}

/// Wakes at most `n` processes or threads sleeping on `word`.
pub(crate) fn futex_wake(word: &AtomicU32, n: u32) {
    // Errors are impossible for a valid shared word; nothing useful to do with one anyway.
    let _ = futex::wake(word, futex::Flags::empty(), n.min(i32::MAX as u32));
}

fn timespec(d: Duration) -> rustix::thread::futex::Timespec {
    rustix::thread::futex::Timespec {
        tv_sec: d.as_secs() as _,
        tv_nsec: d.subsec_nanos() as _,
    }
}

/// What locking a [`RobustMutex`] gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Locked {
    /// Locked; the previous holder released it.
    Clean,
    /// Locked; the previous holder died holding it (the mutex is consistent again).
    OwnerDied,
}

/// Why a [`RobustMutex`] operation failed.
#[derive(Debug)]
pub(crate) enum MutexError {
    /// A timed or try lock found it held.
    Busy,
    /// This thread holds it already (and it is not recursive).
    Deadlock,
    /// Unlock by a thread that does not hold it.
    NotOwner,
    /// Recursion too deep, or an unexpected error.
    Os(io::Error),
}

/// A process-shared, robust pthread mutex placed in a [`Mapping`].
///
/// While a thread holds one, the C library keeps it on that thread's robust list, so its
/// mapping must stay mapped: each lock keeps a reference to the mapping in a per-thread list
/// (released by the matching unlock, leaked if the thread ends holding it).
#[derive(Debug, Clone)]
pub(crate) struct RobustMutex {
    map: Arc<Mapping>,
    offset: usize,
}

thread_local! {
    static HELD: RefCell<Held> = const { RefCell::new(Held(Vec::new())) };
}

/// Mappings of mutexes the current thread holds.
struct Held(Vec<Arc<Mapping>>);

impl Drop for Held {
    fn drop(&mut self) {
        // The thread ends holding these: the kernel walks its robust list after this, so they
        // must stay mapped. Leak them.
        for m in self.0.drain(..) {
            std::mem::forget(m);
        }
    }
}

/// Where the lock word (the owner's thread id) is in the C library's `pthread_mutex_t`.
#[cfg(target_env = "musl")]
const LOCK_WORD_AT: usize = 4;
#[cfg(not(target_env = "musl"))]
const LOCK_WORD_AT: usize = 0;
/// The thread-id bits of a robust futex word (`linux/futex.h`).
const FUTEX_TID_MASK: u32 = 0x3fff_ffff;

/// Room a mutex takes in a mapping.
pub(crate) const MUTEX_SIZE: usize = std::mem::size_of::<libc::pthread_mutex_t>();

impl RobustMutex {
    /// Initialises a mutex at `offset` (8-aligned) in a fresh, zeroed mapping.
    pub fn init(map: Arc<Mapping>, offset: usize, recursive: bool) -> io::Result<RobustMutex> {
        assert!(offset % 8 == 0 && offset + MUTEX_SIZE <= map.len());
        let m = RobustMutex { map, offset };
        let mut attr = MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
        let kind = if recursive {
            libc::PTHREAD_MUTEX_RECURSIVE
        } else {
            libc::PTHREAD_MUTEX_ERRORCHECK
        };
        // SAFETY: `attr` is initialised by pthread_mutexattr_init before any other use and
        // destroyed after; the mutex memory is in bounds, aligned, and not yet in use by
        // anyone (the mapping was just created and not shared).
        unsafe {
            check(libc::pthread_mutexattr_init(attr.as_mut_ptr()))?;
            let a = attr.as_mut_ptr();
            let r = check(libc::pthread_mutexattr_setpshared(
                a,
                libc::PTHREAD_PROCESS_SHARED,
            ))
            .and_then(|_| {
                check(libc::pthread_mutexattr_setrobust(
                    a,
                    libc::PTHREAD_MUTEX_ROBUST,
                ))
            })
            .and_then(|_| check(libc::pthread_mutexattr_settype(a, kind)))
            .and_then(|_| check(libc::pthread_mutex_init(m.raw(), a)));
            libc::pthread_mutexattr_destroy(a);
            r?;
        }
        Ok(m)
    }

    /// A mutex that another process initialised at `offset` of `map`.
    pub fn existing(map: Arc<Mapping>, offset: usize) -> RobustMutex {
        assert!(offset % 8 == 0 && offset + MUTEX_SIZE <= map.len());
        RobustMutex { map, offset }
    }

    /// Whether two handles are the same mutex (the same shared file).
    pub fn same_as(&self, other: &RobustMutex) -> bool {
        Arc::ptr_eq(&self.map, &other.map)
            || file_id(self.map.fd()).ok() == file_id(other.map.fd()).ok()
    }

    /// The mapping the mutex lives in.
    pub fn mapping(&self) -> &Mapping {
        &self.map
    }

    fn raw(&self) -> *mut libc::pthread_mutex_t {
        // SAFETY: in bounds, checked at construction.
        unsafe { self.map.ptr().add(self.offset).cast() }
    }

    /// Locks, waiting until `deadline` (`None`: no limit; `Some(past)`: try once).
    pub fn lock(&self, deadline: Option<Instant>) -> Result<Locked, MutexError> {
        // SAFETY: the mutex was initialised as process-shared and robust; the mapping lives
        // as long as `self`, and while locked it is kept alive by the HELD list.
        let rc = unsafe {
            match deadline {
                None => libc::pthread_mutex_lock(self.raw()),
                Some(d) if d <= Instant::now() => libc::pthread_mutex_trylock(self.raw()),
                Some(d) => {
                    // pthread_mutex_timedlock counts in CLOCK_REALTIME.
                    let left = d.saturating_duration_since(Instant::now());
                    let at = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default()
                        + left;
                    let ts = libc::timespec {
                        tv_sec: at.as_secs() as _,
                        tv_nsec: at.subsec_nanos() as _,
                    };
                    libc::pthread_mutex_timedlock(self.raw(), &ts)
                }
            }
        };
        let locked = match rc {
            0 => Locked::Clean,
            libc::EOWNERDEAD => {
                // SAFETY: we hold the mutex (EOWNERDEAD means it was given to us).
                unsafe { libc::pthread_mutex_consistent(self.raw()) };
                Locked::OwnerDied
            }
            libc::EBUSY | libc::ETIMEDOUT => return Err(MutexError::Busy),
            libc::EDEADLK => return Err(MutexError::Deadlock),
            e => return Err(MutexError::Os(io::Error::from_raw_os_error(e))),
        };
        HELD.with(|h| h.borrow_mut().0.push(self.map.clone()));
        Ok(locked)
    }

    /// The mutex's lock word: the C library keeps the owner's thread id there, as the
    /// kernel's robust-futex protocol requires (0 when free; on the owner's death the
    /// kernel clears the id and sets `FUTEX_OWNER_DIED`).
    fn lock_word(&self) -> &AtomicU32 {
        self.map.atomic_u32(self.offset + LOCK_WORD_AT)
    }

    /// Whether some thread (of any process) holds the mutex now. A holder that died does
    /// not count: the next locker gets the mutex.
    pub fn is_locked(&self) -> bool {
        self.lock_word().load(Ordering::SeqCst) & FUTEX_TID_MASK != 0
    }

    /// Whether the calling thread holds the mutex.
    pub fn held_here(&self) -> bool {
        let tid = rustix::thread::gettid().as_raw_nonzero().get() as u32;
        self.lock_word().load(Ordering::SeqCst) & FUTEX_TID_MASK == tid
    }

    /// How many times the calling thread holds the mutex (its recursion depth; 0 when it
    /// does not hold it).
    pub fn depth_here(&self) -> usize {
        if !self.held_here() {
            return 0;
        }
        let me = file_id(self.map.fd()).ok();
        HELD.with(|h| {
            h.borrow()
                .0
                .iter()
                .filter(|m| {
                    Arc::ptr_eq(m, &self.map) || (me.is_some() && file_id(m.fd()).ok() == me)
                })
                .count()
        })
        .max(1)
    }

    /// Unlocks (one level, if recursive). Only the holding thread may.
    pub fn unlock(&self) -> Result<(), MutexError> {
        // SAFETY: as in `lock`; an unlock by a non-owner is reported (EPERM), not undefined,
        // for robust mutexes.
        match unsafe { libc::pthread_mutex_unlock(self.raw()) } {
            0 => {
                HELD.with(|h| {
                    let mut h = h.borrow_mut();
                    if let Some(i) = h.0.iter().rposition(|m| Arc::ptr_eq(m, &self.map)) {
                        h.0.swap_remove(i);
                    }
                });
                Ok(())
            }
            libc::EPERM => Err(MutexError::NotOwner),
            e => Err(MutexError::Os(io::Error::from_raw_os_error(e))),
        }
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Maps `len` bytes of `fd` at an address the kernel chooses, so that no existing memory is
/// replaced or aliased. The caller makes sure the file is at least `len` bytes long and
/// cannot shrink while mapped, so that no access faults.
pub(crate) fn map_fresh(
    fd: BorrowedFd<'_>,
    len: usize,
    prot: ProtFlags,
    flags: MapFlags,
) -> io::Result<NonNull<u8>> {
    // SAFETY: a null hint asks for a new range; the kernel never places it over an existing
    // mapping, so nothing in this process already refers to it.
    let ptr = unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0)? };
    NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutex_reports_deadlock_and_non_owner() {
        let map = Arc::new(Mapping::anonymous("t", 4096).unwrap());
        let m = RobustMutex::init(map, 64, false).unwrap();
        assert_eq!(m.lock(None).unwrap(), Locked::Clean);
        assert!(matches!(m.lock(None), Err(MutexError::Deadlock)));
        let m2 = m.clone();
        std::thread::spawn(move || {
            assert!(matches!(m2.unlock(), Err(MutexError::NotOwner)));
            let soon = Some(Instant::now() + Duration::from_millis(20));
            assert!(matches!(m2.lock(soon), Err(MutexError::Busy)));
        })
        .join()
        .unwrap();
        m.unlock().unwrap();
    }

    #[test]
    fn a_thread_that_ends_holding_the_mutex_hands_it_on() {
        let map = Arc::new(Mapping::anonymous("t", 4096).unwrap());
        let m = RobustMutex::init(map, 0, false).unwrap();
        let m2 = m.clone();
        std::thread::spawn(move || m2.lock(None).map(|_| ()).unwrap())
            .join()
            .unwrap();
        assert_eq!(m.lock(None).unwrap(), Locked::OwnerDied);
        m.unlock().unwrap();
        assert_eq!(m.lock(None).unwrap(), Locked::Clean);
        m.unlock().unwrap();
    }
}
