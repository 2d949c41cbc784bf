//! System calls behind `gpuproc::channel`: `SOCK_SEQPACKET` sockets (one `recv`, one whole
//! message, so many readers and writers can share a socket without locks), sealed memfd
//! mappings for large messages, and futexes on counters in shared memory.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::io::{Errno, IoSliceMut};
use rustix::mm::{MapFlags, ProtFlags};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

use super::MAX_FDS_PER_MESSAGE;

/// The socket buffer asked for: it bounds how many bytes of messages can be in flight.
const SOCKET_BUFFER: usize = 4 << 20;

/// A connected pair of `AF_UNIX` `SOCK_SEQPACKET` sockets, close-on-exec, with large buffers.
pub(crate) fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    for s in [&a, &b] {
        // A larger buffer holds more messages in flight; the kernel caps what it grants
        // (net.core.wmem_max) unless the caller may force it, so failures are not errors.
        if rustix::net::sockopt::set_socket_send_buffer_size_force(s, SOCKET_BUFFER).is_err() {
            let _ = rustix::net::sockopt::set_socket_send_buffer_size(s, SOCKET_BUFFER);
        }
    }
    Ok((a, b))
}

/// Shuts a socket of a pair down both ways, for every process that holds it: sends on it
/// fail (`EPIPE`), and its peer reads what is queued, then the end. Waiters on either side
/// wake (`POLLHUP` here, `POLLRDHUP` on the peer).
pub(crate) fn shutdown_both(sock: BorrowedFd<'_>) -> io::Result<()> {
    match rustix::net::shutdown(sock, rustix::net::Shutdown::Both) {
        // Already shut down by the peer's side, or never connected: nothing left to do.
        Ok(()) | Err(Errno::NOTCONN) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// What a send or receive with a deadline ended with.
#[derive(Debug)]
pub(crate) enum Outcome<T> {
    Done(T),
    /// The peer has closed its end.
    Closed,
    /// The deadline passed first.
    TimedOut,
}

use super::{check_parts, io_slices, wait_ready};

/// Sends one message (`parts` concatenated, at most four), `fds` riding along, waiting for buffer space
/// until `deadline` (`None`: for ever). Never raises SIGPIPE.
///
/// With `attempt`, every try is a non-blocking `sendmsg`: `attempt(true)` is called just
/// before each, and `attempt(false)` after one that found no room (before waiting for some).
pub(crate) fn send(
    sock: BorrowedFd<'_>,
    parts: &[&[u8]],
    fds: &[BorrowedFd<'_>],
    deadline: Option<Instant>,
    attempt: Option<&dyn Fn(bool)>,
) -> io::Result<Outcome<()>> {
    // On the stack: a send allocates nothing.
    check_parts(parts, fds)?;
    let (iov_buf, n) = io_slices(parts, 0);
    let iov = &iov_buf[..n];
    let mut space =
        [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    loop {
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(io::Error::other("ancillary buffer too small"));
        }
        // Without a deadline, one blocking call (the common case, and the fastest).
        let flags = if deadline.is_some() || attempt.is_some() {
            SendFlags::NOSIGNAL | SendFlags::DONTWAIT
        } else {
            SendFlags::NOSIGNAL
        };
        if let Some(a) = attempt {
            a(true);
        }
        match rustix::net::sendmsg(sock, iov, &mut control, flags) {
            Ok(_) => return Ok(Outcome::Done(())),
            Err(Errno::INTR) => continue,
            Err(Errno::AGAIN) => {
                if let Some(a) = attempt {
                    a(false);
                }
                if !wait_ready(sock, true, deadline)? {
                    return Ok(Outcome::TimedOut);
                }
            }
            Err(Errno::PIPE) | Err(Errno::CONNRESET) | Err(Errno::NOTCONN) => {
                return Ok(Outcome::Closed)
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// One received message.
#[derive(Debug)]
pub(crate) struct Message {
    /// Its length (it is in the first `len` bytes of the buffer).
    pub len: usize,
    /// The descriptors that came with it.
    pub fds: Vec<OwnedFd>,
    /// Whether it was longer than the buffer (the rest is lost) or lost descriptors.
    pub truncated: bool,
}

/// Receives one whole message into `buf`, waiting until `deadline` (`None`: for ever;
/// a deadline in the past: just look). Until `spin_until` (if any, and not past the
/// deadline) it polls without sleeping, so that a message that comes soon is taken without
/// the cost of waking a sleeping process.
pub(crate) fn recv(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    deadline: Option<Instant>,
    spin_until: Option<Instant>,
) -> io::Result<Outcome<Message>> {
    // On the stack: a receive allocates nothing unless descriptors come with the message.
    let mut space =
        [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let spin_until = match (spin_until, deadline) {
        (Some(s), Some(d)) => Some(s.min(d)),
        (s, _) => s,
    };
    loop {
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let spinning = spin_until.is_some_and(|t| Instant::now() < t);
        // Without a deadline, once done spinning, one blocking call.
        let mut flags = RecvFlags::CMSG_CLOEXEC | RecvFlags::TRUNC;
        if deadline.is_some() || spinning {
            flags |= RecvFlags::DONTWAIT;
        }
        let res = rustix::net::recvmsg(sock, &mut [IoSliceMut::new(buf)], &mut control, flags);
        let mut fds = Vec::new();
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = msg {
                fds.extend(received);
            }
        }
        match res {
            // Zero bytes is the peer's end, or an empty datagram (which channels never send,
            // but anyone holding the socket can): it is the end only if the peer has shut
            // down and nothing more is queued (see `at_end`).
            Ok(m) if m.bytes == 0 && fds.is_empty() && at_end(sock) => return Ok(Outcome::Closed),
            Ok(m) => {
                let truncated = m.bytes > buf.len()
                    || m.flags.intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC);
                return Ok(Outcome::Done(Message {
                    len: m.bytes.min(buf.len()),
                    fds,
                    truncated,
                }));
            }
            Err(Errno::INTR) => continue,
            Err(Errno::AGAIN) if spinning => std::hint::spin_loop(),
            Err(Errno::AGAIN) => {
                if !wait_ready(sock, false, deadline)? {
                    return Ok(Outcome::TimedOut);
                }
            }
            Err(Errno::CONNRESET) => return Ok(Outcome::Closed),
            Err(e) => return Err(e.into()),
        }
    }
}

/// After a receive of zero bytes: whether that was the end of the stream rather than an
/// empty datagram. `recvmsg` returns zero for both; the end comes only once the peer has
/// shut down (it closed its end: `POLLRDHUP`) and no byte is left queued (`FIONREAD`).
/// An empty datagram that raced with the peer's close, with nothing after it, reads as the
/// end, which it then is.
fn at_end(sock: BorrowedFd<'_>) -> bool {
    let mut pfd = [rustix::event::PollFd::new(
        &sock,
        rustix::event::PollFlags::RDHUP,
    )];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let hung_up = match rustix::event::poll(&mut pfd, Some(&zero)) {
        Ok(_) => pfd[0]
            .revents()
            .intersects(rustix::event::PollFlags::RDHUP | rustix::event::PollFlags::HUP),
        // Cannot tell: the end, as before (a receive on a broken socket fails next anyway).
        Err(_) => true,
    };
    hung_up && rustix::io::ioctl_fionread(sock).map_or(true, |queued| queued == 0)
}

/// The contents of `/proc/loadavg` (`"0.52 0.58 0.59 3/1234 5678\n"`), read into `buf`
/// without allocating: the bytes read, or `None` if it cannot be read (no `/proc`).
pub(crate) fn read_loadavg(buf: &mut [u8; 128]) -> Option<usize> {
    let fd = rustix::fs::open(
        "/proc/loadavg",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ok()?;
    rustix::io::read(&fd, &mut buf[..]).ok()
}

/// Whether process `pid` has ended: it no longer exists, or it is a zombie (ended, not yet
/// reaped by its parent). A process this one cannot see (another PID namespace) counts as
/// running.
pub(crate) fn process_ended(pid: u32) -> bool {
    let mut buf = [0u8; 512];
    let path = format!("/proc/{pid}/stat");
    let fd = match rustix::fs::open(
        path.as_str(),
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) | Err(Errno::SRCH) => return true,
        Err(_) => return false,
    };
    let n = match rustix::io::read(&fd, &mut buf[..]) {
        Ok(n) => n,
        Err(Errno::SRCH) => return true,
        Err(_) => return false,
    };
    stat_says_ended(&buf[..n])
}

/// Whether the contents of `/proc/<pid>/stat` (`"123 (name) S ..."`) show an ended
/// process: state `Z` (zombie) or `X` (dead). The name may hold spaces and parentheses: the
/// state follows the last `)`.
fn stat_says_ended(stat: &[u8]) -> bool {
    let Some(close) = stat.iter().rposition(|&b| b == b')') else {
        return false;
    };
    matches!(stat.get(close + 2), Some(b'Z' | b'X'))
}

/// A shared memory mapping of a memfd (or of a part of one), unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain shared memory; access to it goes through `&`/`&mut` methods
// (bytes) or atomics, so moving or sharing the handle between threads is sound.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&self` only hands out `&[u8]` or atomics.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `fd` (`len` > 0), shared, readable (and writable if
    /// asked); `populate` faults the pages in up front, in one system call.
    fn map(fd: BorrowedFd<'_>, len: usize, writable: bool, populate: bool) -> io::Result<Self> {
        let prot = if writable {
            ProtFlags::READ | ProtFlags::WRITE
        } else {
            ProtFlags::READ
        };
        let mut flags = MapFlags::SHARED;
        if populate {
            flags |= MapFlags::POPULATE;
        }
        // The callers checked that the file is at least `len` bytes long and cannot shrink
        // (or created it so), so no access can fault.
        let ptr = super::shm::map_fresh(fd, len, prot, flags)?;
        Ok(Mapping { ptr, len, writable })
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` is a live mapping for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The mapped bytes, for writing (the mapping must be writable).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        assert!(self.writable, "a read-only mapping was written");
        // SAFETY: a live, writable mapping for as long as `self` lives; `&mut self` makes
        // this the only reference through this handle.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The first `len` mapped bytes, for writing (the mapping must be writable).
    pub fn prefix_mut(&mut self, len: usize) -> &mut [u8] {
        &mut self.bytes_mut()[..len]
    }

    /// The 32-bit word at byte `offset` (4-aligned, inside the mapping), as an atomic shared
    /// with other processes.
    pub fn word_at(&self, offset: usize) -> &AtomicU32 {
        assert!(
            offset % 4 == 0 && offset + 4 <= self.len,
            "word at {offset} outside a mapping of {} bytes",
            self.len
        );
        // SAFETY: in bounds and 4-aligned (the mapping is page-aligned); `AtomicU32` has the
        // layout of `u32` and every bit pattern is valid; the word is only ever accessed
        // through atomics (here) or whole-word writes by the kernel (`pwrite`).
        unsafe { &*self.ptr.as_ptr().add(offset).cast::<AtomicU32>() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range and no reference into it outlives `self`.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A new memfd of `len` bytes (`len` > 0) mapped read-write; the caller fills it and then
/// calls [`seal`], which unmaps it and makes it immutable.
pub(crate) fn memfd_for_writing(name: &str, len: usize) -> io::Result<(OwnedFd, Mapping)> {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    rustix::fs::ftruncate(&fd, len as u64)?;
    let map = Mapping::map(fd.as_fd(), len, true, true)?;
    Ok((fd, map))
}

/// A new memfd for reuse across many messages: `cap` payload bytes (a multiple of the page
/// size), then one page whose first word says whether a receiver still uses it (see
/// [`release_pooled`]). Sealed against resizing at once and kept mapped read-write.
pub(crate) fn memfd_pooled(name: &str, cap: usize) -> io::Result<(OwnedFd, Mapping)> {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    rustix::fs::ftruncate(&fd, (cap + PAGE) as u64)?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    let map = Mapping::map(fd.as_fd(), cap + PAGE, true, true)?;
    Ok((fd, map))
}

/// The page size assumed for the layout of pooled memfds (mappings need only 4-byte
/// alignment of the control word; this just keeps payload and control apart).
pub(crate) const PAGE: usize = 4096;

/// Tells the sender of a pooled memfd that this receiver is done with it: writes a zero
/// word at `offset` (through the descriptor, so no writable mapping is needed). Best effort:
/// a memfd sealed against writing simply stays in use for its sender.
pub(crate) fn release_pooled(fd: BorrowedFd<'_>, offset: u64) {
    let _ = rustix::io::pwrite(fd, &0u32.to_ne_bytes(), offset);
}

/// Unmaps `map` and seals `fd`'s size, so that a receiver can map it without risk of a
/// fault. (Not `F_SEAL_WRITE`: a child forked meanwhile may still hold a writable mapping.)
pub(crate) fn seal(fd: &OwnedFd, map: Mapping) -> io::Result<()> {
    drop(map);
    Ok(rustix::fs::fcntl_add_seals(
        fd,
        SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
    )?)
}

/// Checks that a received memfd is sealed against shrinking and holds at least `len`
/// (> 0) and `min_size` bytes, so that reading that much of it can never fault; returns
/// its `fstat`.
fn check_sealed(fd: BorrowedFd<'_>, len: usize, min_size: u64) -> io::Result<rustix::fs::Stat> {
    let seals = rustix::fs::fcntl_get_seals(fd).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the descriptor sent with the message is not a memfd ({e})"),
        )
    })?;
    if !seals.contains(SealFlags::SHRINK) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the memfd sent with the message is not sealed against shrinking",
        ));
    }
    let st = rustix::fs::fstat(fd)?;
    let size = st.st_size as u64;
    if size < len as u64 || size < min_size || len == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the message announces {} bytes but its memfd holds {size}",
                (len as u64).max(min_size)
            ),
        ));
    }
    Ok(st)
}

/// Maps a received memfd read-only after checking that it is sealed against shrinking and
/// holds at least `len` bytes (so that reading it can never fault).
pub(crate) fn map_sealed(fd: BorrowedFd<'_>, len: usize, min_size: u64) -> io::Result<Mapping> {
    check_sealed(fd, len, min_size)?;
    Mapping::map(fd, len, false, true)
}

/// How many memfd mappings one [`MapCache`] keeps.
const CACHE_ENTRIES: usize = 8;
/// How many bytes of mappings one [`MapCache`] keeps (a cached mapping keeps its memfd's
/// memory alive after the sender has dropped it, so this bounds what a receiver retains).
const CACHE_BYTES: usize = 512 << 20;

/// A receiver's read-only mappings of the reused (pooled) memfds that senders send again
/// and again, so that a message costs no `mmap`/`munmap` of its pages: the first message
/// through a memfd maps the whole memfd, later ones find that mapping by the memfd's
/// identity. Bounded (least recently used first out); dropped with its channel handle.
#[derive(Debug, Default)]
pub(crate) struct MapCache {
    /// Most recently used first.
    entries: Mutex<Vec<CacheEntry>>,
}

#[derive(Debug)]
struct CacheEntry {
    dev: u64,
    ino: u64,
    size: u64,
    map: Arc<Mapping>,
}

impl MapCache {
    /// How many mappings are cached.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// A read-only mapping of at least the first `len` bytes of a received memfd: checked
    /// on every call like [`map_sealed`] (sealed against shrinking, at least `len` and
    /// `min_size` bytes), then taken from the cache or mapped whole and cached.
    ///
    /// A cached mapping is found by the memfd's device, inode and size. While it is
    /// cached its memfd stays alive, so no other live file can have the same device and
    /// inode (short of the kernel's 32-bit inode counter wrapping round onto a live memfd
    /// of exactly the same size, which would give wrong bytes, never a bad memory access:
    /// every cached mapping lies within a memfd that was checked, when it was mapped, to
    /// be sealed against shrinking — a seal that can never be removed).
    pub(crate) fn map(
        &self,
        fd: BorrowedFd<'_>,
        len: usize,
        min_size: u64,
    ) -> io::Result<Arc<Mapping>> {
        let st = check_sealed(fd, len, min_size)?;
        let (dev, ino, size) = (st.st_dev as u64, st.st_ino as u64, st.st_size as u64);
        let lock = || self.entries.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut entries = lock();
            if let Some(i) = entries
                .iter()
                .position(|e| e.dev == dev && e.ino == ino && e.size == size)
            {
                if entries[i].map.len >= len {
                    let e = entries.remove(i);
                    let map = Arc::clone(&e.map);
                    entries.insert(0, e);
                    return Ok(map);
                }
                entries.remove(i);
            }
        }
        // Mapped without the lock held, so that other receivers are not held up.
        let whole = usize::try_from(size).unwrap_or(usize::MAX);
        if whole > CACHE_BYTES {
            return Ok(Arc::new(Mapping::map(fd, len, false, true)?));
        }
        // The whole memfd: `check_sealed` saw `size` bytes, and it cannot shrink.
        let map = Arc::new(Mapping::map(fd, whole, false, true)?);
        let mut entries = lock();
        // Another thread may have mapped the same memfd meanwhile: keep one entry.
        entries.retain(|e| !(e.dev == dev && e.ino == ino && e.size == size));
        entries.insert(
            0,
            CacheEntry {
                dev,
                ino,
                size,
                map: Arc::clone(&map),
            },
        );
        let mut total = 0usize;
        let keep = entries
            .iter()
            .take_while(|e| {
                total = total.saturating_add(e.map.len);
                total <= CACHE_BYTES
            })
            .count()
            .clamp(1, CACHE_ENTRIES);
        entries.truncate(keep);
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_processes_are_read_from_their_stat() {
        assert!(stat_says_ended(b"12 (worker) Z 1 12 12 0"));
        assert!(stat_says_ended(b"12 (a) b) X 1"));
        assert!(!stat_says_ended(b"12 (x Z y) S 1 12"));
        assert!(!stat_says_ended(b"12 (sleepy) S 1"));
        assert!(!stat_says_ended(b"garbage"));
        assert!(!stat_says_ended(b"12 (cut)"));
        assert!(!process_ended(std::process::id()));
    }
}
