//! Every system call gpuproc makes, in one place.
//!
//! The rest of the crate sees a small, safe API over file descriptors, process ids and
//! sockets. Everything here is Linux-only; syscalls go through `rustix`, except `fork` and
//! `_exit`, which must go through the C library so that its `atfork` handlers (malloc's
//! locks, stdio) run and its exit handlers do not.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::{FdFlags, IoSlice, IoSliceMut};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use rustix::process::{Pid, Signal, WaitOptions};

pub(crate) mod flock;
pub(crate) mod net;
pub(crate) mod seqpacket;
pub(crate) mod shm;

/// The most descriptors one message may carry (Linux's `SCM_MAX_FD`).
pub(crate) const MAX_FDS_PER_MESSAGE: usize = 253;

/// How a process ended, as `waitpid` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExitStatus {
    /// It called `exit` (or returned from `main`) with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// Python's `exitcode`: the exit code, or minus the signal number.
    pub fn exitcode(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => -s,
        }
    }
}

/// This process's id.
pub(crate) fn getpid() -> u32 {
    // A pid is always positive, so `unsigned_abs` is exact.
    rustix::process::getpid()
        .as_raw_nonzero()
        .get()
        .unsigned_abs()
}

/// The parent's process id, if there is one.
pub(crate) fn getppid() -> Option<u32> {
    rustix::process::getppid().map(|p| p.as_raw_nonzero().get().unsigned_abs())
}

/// Whether the calling thread is the process's main thread.
pub(crate) fn on_main_thread() -> bool {
    rustix::thread::gettid() == rustix::process::getpid()
}

/// The number of threads in this process, from `/proc/self/task`.
pub(crate) fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// A process id for the kernel; ids that are not a positive `i32` are an error, never a
/// negative number (which would mean a process group, or every process).
fn pid(p: u32) -> io::Result<Pid> {
    i32::try_from(p)
        .ok()
        .filter(|&raw| raw > 0)
        .and_then(Pid::from_raw)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{p} is not a valid process id"),
            )
        })
}

/// Sets the calling thread's name (for the main thread: the process's name, as `ps` and
/// `/proc/PID/comm` show it). The kernel keeps 15 bytes: longer names are cut, at a
/// character boundary; a NUL byte ends the name.
pub(crate) fn set_process_name(name: &str) {
    let name = comm_name(name);
    if let Ok(c) = std::ffi::CString::new(name) {
        let _ = rustix::thread::set_name(&c);
    }
}

/// The first 15 bytes of `name` (cut at a character boundary and at a NUL byte): what fits
/// in a process name.
pub(crate) fn comm_name(name: &str) -> &str {
    let name = name.split('\0').next().unwrap_or_default();
    let mut end = name.len().min(15);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// The base address of the loaded object (executable or shared library) that contains
/// `addr`, or `None` if no loaded object does.
pub(crate) fn object_base(addr: usize) -> Option<usize> {
    let mut info = MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: dladdr only reads its address argument as a number and fills `info`, which is
    // valid for writes; it returns 0 when the address is in no loaded object.
    let found = unsafe { libc::dladdr(addr as *const libc::c_void, info.as_mut_ptr()) };
    if found == 0 {
        return None;
    }
    // SAFETY: dladdr returned non-zero, so it filled `info`.
    let info = unsafe { info.assume_init() };
    Some(info.dli_fbase as usize).filter(|&b| b != 0)
}

/// Makes this process ignore SIGINT (a terminal's Ctrl-C), returning whether it was ignored
/// before, so that a forked child can restore it with [`restore_sigint`].
pub(crate) fn ignore_sigint() -> bool {
    // SAFETY: SIG_IGN is a valid disposition; no handler function is installed.
    let old = unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    old == libc::SIG_IGN
}

/// Makes this process ignore SIGINT and SIGTERM (what a resource tracker does, so that it
/// outlives the program it cleans up after).
pub(crate) fn ignore_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: SIG_IGN is a valid disposition; no handler function is installed.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
}

/// Reads what `fd` has (blocking), retrying on EINTR; 0 at end of file.
pub(crate) fn read_some(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match rustix::io::read(fd, &mut *buf) {
            Err(rustix::io::Errno::INTR) => continue,
            other => return Ok(other?),
        }
    }
}

/// Gives SIGINT its default action again (unless `ignored`, what it was before
/// [`ignore_sigint`]).
pub(crate) fn restore_sigint(ignored: bool) {
    let action = if ignored {
        libc::SIG_IGN
    } else {
        libc::SIG_DFL
    };
    // SAFETY: SIG_IGN and SIG_DFL are valid dispositions; no handler function is installed.
    unsafe { libc::signal(libc::SIGINT, action) };
}

/// A connected pair of `AF_UNIX` stream sockets, close-on-exec.
pub(crate) fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Asks for `bytes` of send buffer on `sock`, so that a large frame goes out in few
/// writes (the kernel caps what it grants at `net.core.wmem_max` unless the caller may
/// force it; what it grants is fine either way).
pub(crate) fn set_send_buffer(sock: BorrowedFd<'_>, bytes: usize) {
    if rustix::net::sockopt::set_socket_send_buffer_size_force(sock, bytes).is_err() {
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(sock, bytes);
    }
}

/// Clears close-on-exec so that `fd` survives an `exec`.
pub(crate) fn clear_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::io::fcntl_setfd(fd, FdFlags::empty())?)
}

/// Duplicates `fd` (close-on-exec).
pub(crate) fn dup(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    Ok(rustix::io::fcntl_dupfd_cloexec(fd, 0)?)
}

/// Makes `target` (0, 1 or 2, say) refer to the same file as `fd`.
pub(crate) fn dup_onto(fd: BorrowedFd<'_>, target: RawFd) -> io::Result<()> {
    // SAFETY: `target` is a descriptor number this process owns by convention (stdio); wrapping
    // it in ManuallyDrop keeps us from closing it, `dup2` only replaces what it refers to.
    let mut t = std::mem::ManuallyDrop::new(unsafe { OwnedFd::from_raw_fd(target) });
    rustix::io::dup2(fd, &mut t)?;
    Ok(())
}

/// Takes ownership of an inherited descriptor number, once it is known to be what a gpuproc
/// parent leaves: one end of a Unix stream socket pair made by process `creator` (our
/// parent). Anything else (a closed number, a file, a pipe, a socket made by another
/// process) is an error and stays untouched: it is neither adopted nor closed.
pub(crate) fn take_inherited_fd(raw: RawFd, creator: u32) -> io::Result<OwnedFd> {
    let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
    if raw < 0 {
        return Err(invalid(format!("{raw} is not a file descriptor")));
    }
    // SAFETY: fcntl(F_GETFD) on a plain number reads no memory; it fails with EBADF when the
    // number is not open. Nothing is owned or closed here.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is open (checked just above) and stays open for this borrow: nothing in
    // this function closes it.
    let fd = unsafe { BorrowedFd::borrow_raw(raw) };
    let stat = rustix::fs::fstat(fd)?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::Socket {
        return Err(invalid(format!("descriptor {raw} is not a socket")));
    }
    let stream = rustix::net::sockopt::socket_type(fd)? == SocketType::STREAM;
    let unix = rustix::net::sockopt::socket_domain(fd)? == AddressFamily::UNIX;
    if !(stream && unix) {
        return Err(invalid(format!(
            "descriptor {raw} is not a Unix stream socket"
        )));
    }
    let peer = rustix::net::sockopt::socket_peercred(fd)?;
    let peer_pid = peer.pid.as_raw_nonzero().get().unsigned_abs();
    if peer_pid != creator {
        return Err(invalid(format!(
            "descriptor {raw} was made by process {peer_pid}, not by the parent ({creator})"
        )));
    }
    // SAFETY: `raw` is an open socket that our parent left for us (checked above); nothing
    // else in this process owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    rustix::io::fcntl_setfd(&fd, FdFlags::CLOEXEC)?;
    Ok(fd)
}

/// Closes a raw descriptor.
///
/// # Safety
/// No `OwnedFd` or other owner of `raw` may be used or dropped afterwards.
pub(crate) unsafe fn close_raw(raw: RawFd) {
    // SAFETY: forwarded to the caller.
    unsafe { libc::close(raw) };
}

/// What `fork` returned.
pub(crate) enum Forked {
    /// In the parent: the child's pid.
    Parent(u32),
    /// In the child.
    Child,
}

/// `fork()` through the C library.
///
/// # Safety
/// The child may only call async-signal-safe functions if the parent had other threads; the
/// caller checks the thread count (or the user explicitly accepted the risk).
pub(crate) unsafe fn fork() -> io::Result<Forked> {
    // SAFETY: forwarded to the caller, see above.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        p => u32::try_from(p)
            .map(Forked::Parent)
            .map_err(|_| io::Error::other(format!("fork returned {p}"))),
    }
}

/// Registers `handler` to run when this process calls `exit` (not `_exit`), with the exit
/// code and `arg`. Returns whether it was registered (only the GNU C library has
/// `on_exit`).
pub(crate) fn on_exit(handler: extern "C" fn(libc::c_int, *mut libc::c_void)) -> bool {
    #[cfg(target_env = "gnu")]
    {
        extern "C" {
            fn on_exit(
                f: extern "C" fn(libc::c_int, *mut libc::c_void),
                arg: *mut libc::c_void,
            ) -> libc::c_int;
        }
        // SAFETY: glibc's `on_exit` stores the function pointer and argument (null, unused)
        // and calls it from `exit`; `handler` is a plain `extern "C"` function.
        unsafe { on_exit(handler, std::ptr::null_mut()) == 0 }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        let _ = handler;
        false
    }
}

/// Ends this process at once with `code`, running no exit handlers and no destructors.
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` is always safe to call; it never returns.
    unsafe { libc::_exit(code) }
}

/// Asks the kernel to send SIGKILL to this process when the thread that created it exits.
pub(crate) fn kill_me_with_parent() -> io::Result<()> {
    Ok(rustix::process::set_parent_process_death_signal(Some(
        Signal::KILL,
    ))?)
}

/// Makes the command, once spawned, receive `signal` when the thread that spawned it ends
/// (as its parent process dies, for a single-threaded spawner).
pub(crate) fn die_with_parent(cmd: &mut std::process::Command, signal: Signal) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and makes one async-signal-safe
    // system call (prctl).
    unsafe {
        cmd.pre_exec(move || {
            Ok(rustix::process::set_parent_process_death_signal(Some(
                signal,
            ))?)
        });
    }
}

/// Turns on TCP keep-alive for `fd`: probes after `idle` of silence, every `interval`,
/// and the connection fails after `count` unanswered ones.
pub(crate) fn set_keepalive(
    fd: BorrowedFd<'_>,
    (idle, interval, count): (std::time::Duration, std::time::Duration, u32),
) -> io::Result<()> {
    use rustix::net::sockopt;
    sockopt::set_socket_keepalive(fd, true)?;
    sockopt::set_tcp_keepidle(fd, idle)?;
    sockopt::set_tcp_keepintvl(fd, interval)?;
    sockopt::set_tcp_keepcnt(fd, count)?;
    Ok(())
}

/// Blocks until the peer of the socket `fd` has closed its end (or the socket failed);
/// `false` if it could not be watched. Reads nothing.
pub(crate) fn wait_for_hangup(fd: BorrowedFd<'_>) -> bool {
    matches!(
        poll_events(&[(fd, PollFlags::RDHUP)], None),
        Ok(ev) if ev.iter().any(|e| e.intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR))
    )
}

/// Makes writes to a pipe whose reader is gone fail with `EPIPE` in this process instead
/// of killing it with SIGPIPE (for processes of gpuproc's own that write to commands they
/// start: a command may exit before it reads). Commands started afterwards get the default
/// back (the standard library resets it for them).
pub(crate) fn ignore_sigpipe() {
    // SAFETY: setting a signal's disposition to "ignore" installs no handler and touches
    // no memory.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// Sends SIGKILL to this process.
pub(crate) fn kill_self() -> ! {
    let _ = rustix::process::kill_process(rustix::process::getpid(), Signal::KILL);
    exit_now(137)
}

/// The signals gpuproc sends.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Sig {
    Term,
    Kill,
}

impl Sig {
    fn to_rustix(self) -> Signal {
        match self {
            Sig::Term => Signal::TERM,
            Sig::Kill => Signal::KILL,
        }
    }
}

/// A `pidfd` for process `p`: a handle that cannot be confused with a later process that
/// reuses the pid, and that polls readable when the process ends.
pub(crate) fn pidfd_open(p: u32) -> io::Result<OwnedFd> {
    Ok(rustix::process::pidfd_open(
        pid(p)?,
        rustix::process::PidfdFlags::empty(),
    )?)
}

/// A descriptor that is readable from the start and stays so (an eventfd holding 1): the
/// sentinel of something that has already happened.
pub(crate) fn always_readable() -> io::Result<OwnedFd> {
    use rustix::event::EventfdFlags;
    Ok(rustix::event::eventfd(1, EventfdFlags::CLOEXEC)?)
}

/// Sends `sig` to the process behind `pidfd`. A process that already ended is not an error.
pub(crate) fn pidfd_signal(pidfd: BorrowedFd<'_>, sig: Sig) -> io::Result<()> {
    match rustix::process::pidfd_send_signal(pidfd, sig.to_rustix()) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Sends `sig` to process `p`. A process that already ended is not an error.
pub(crate) fn signal(p: u32, sig: Sig) -> io::Result<()> {
    match rustix::process::kill_process(pid(p)?, sig.to_rustix()) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Reaps child `p`: `Some(status)` once it has ended, `None` if `block` is false and it runs on.
pub(crate) fn waitpid(p: u32, block: bool) -> io::Result<Option<ExitStatus>> {
    let opts = if block {
        WaitOptions::empty()
    } else {
        WaitOptions::NOHANG
    };
    loop {
        match rustix::process::waitpid(Some(pid(p)?), opts) {
            Ok(Some((_, st))) => {
                if let Some(c) = st.exit_status() {
                    return Ok(Some(ExitStatus::Code(c)));
                }
                if let Some(s) = st.terminating_signal() {
                    return Ok(Some(ExitStatus::Signal(s)));
                }
                // Stopped or continued: not an end; keep waiting if asked to.
                if !block {
                    return Ok(None);
                }
            }
            Ok(None) => return Ok(None),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// `poll(2)` on `fds` with the given interests until one is ready or `deadline` passes
/// (`None`: for ever); returns each descriptor's events (all empty on timeout).
fn poll_events(
    fds: &[(BorrowedFd<'_>, PollFlags)],
    deadline: Option<Instant>,
) -> io::Result<Vec<PollFlags>> {
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|(fd, flags)| PollFd::new(fd, *flags))
        .collect();
    loop {
        let timeout = deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            Timespec {
                tv_sec: left.as_secs() as _,
                tv_nsec: left.subsec_nanos() as _,
            }
        });
        match rustix::event::poll(&mut pfds, timeout.as_ref()) {
            // The kernel may round a timeout down: a wake-up before the deadline is not one.
            Ok(0) if deadline.is_some_and(|d| Instant::now() < d) => continue,
            Ok(_) => return Ok(pfds.iter().map(|p| p.revents()).collect()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Which of the polled descriptors are readable (or closed) before `deadline`.
pub(crate) fn poll_readable(
    fds: &[BorrowedFd<'_>],
    deadline: Option<Instant>,
) -> io::Result<Vec<bool>> {
    let fds: Vec<_> = fds.iter().map(|fd| (*fd, PollFlags::IN)).collect();
    Ok(poll_events(&fds, deadline)?
        .iter()
        .map(|r| !r.is_empty())
        .collect())
}

/// Waits until `sock` is readable (or writable, if `write`) or `deadline` passes; `false` on
/// timeout.
pub(crate) fn wait_ready(
    sock: BorrowedFd<'_>,
    write: bool,
    deadline: Option<Instant>,
) -> io::Result<bool> {
    let flags = if write { PollFlags::OUT } else { PollFlags::IN };
    Ok(!poll_events(&[(sock, flags)], deadline)?[0].is_empty())
}

/// The most parts one vectored send gathers.
const MAX_PARTS: usize = 4;

/// `parts` (at most [`MAX_PARTS`]) as I/O slices, without their first `skip` bytes.
fn io_slices<'a>(parts: &[&'a [u8]], mut skip: usize) -> ([IoSlice<'a>; MAX_PARTS], usize) {
    let mut iov = [IoSlice::new(&[]); MAX_PARTS];
    let mut n = 0;
    for p in parts.iter().take(MAX_PARTS) {
        if skip >= p.len() {
            skip -= p.len();
            continue;
        }
        iov[n] = IoSlice::new(&p[skip..]);
        skip = 0;
        n += 1;
    }
    (iov, n)
}

/// One `sendmsg` of `parts` from byte `skip` on, `fds` riding along (when not empty).
fn send_parts(
    sock: BorrowedFd<'_>,
    parts: &[&[u8]],
    skip: usize,
    fds: &[BorrowedFd<'_>],
    flags: SendFlags,
) -> rustix::io::Result<usize> {
    let (iov, n) = io_slices(parts, skip);
    if fds.is_empty() {
        return rustix::net::sendmsg(sock, &iov[..n], &mut SendAncillaryBuffer::default(), flags);
    }
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(rustix::io::Errno::NOBUFS);
    }
    rustix::net::sendmsg(sock, &iov[..n], &mut control, flags)
}

fn check_parts(parts: &[&[u8]], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a message can carry at most {MAX_FDS_PER_MESSAGE} file descriptors, not {}",
                fds.len()
            ),
        ));
    }
    if parts.len() > MAX_PARTS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "at most {MAX_PARTS} parts are sent at once, not {}",
                parts.len()
            ),
        ));
    }
    Ok(parts.iter().map(|p| p.len()).sum())
}

/// Sends `parts` (at most four, back to back, without joining them first) on a stream
/// socket, the descriptors `fds` riding with the first byte.
///
/// Never raises SIGPIPE: a closed peer is an `io::ErrorKind::BrokenPipe` error.
pub(crate) fn send_all(
    sock: BorrowedFd<'_>,
    parts: &[&[u8]],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let total = check_parts(parts, fds)?;
    let mut sent = 0;
    let mut fds = fds;
    while sent < total || !fds.is_empty() {
        match send_parts(sock, parts, sent, fds, SendFlags::NOSIGNAL) {
            Ok(n) => {
                sent += n;
                fds = &[];
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => {
                wait_ready(sock, true, None)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Sends what the socket takes now of `parts` from byte `skip` on, without blocking;
/// `fds` ride with the first byte sent (pass them only when `skip` is 0). Returns the
/// number of bytes sent (0 when the socket is full).
pub(crate) fn send_nonblocking(
    sock: BorrowedFd<'_>,
    parts: &[&[u8]],
    skip: usize,
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    check_parts(parts, fds)?;
    let flags = SendFlags::NOSIGNAL | SendFlags::DONTWAIT;
    loop {
        match send_parts(sock, parts, skip, fds, flags) {
            Ok(n) => return Ok(n),
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => return Ok(0),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Readiness of one descriptor after [`poll`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ready {
    /// Readable, closed by the peer, or in error.
    pub read: bool,
    /// Writable.
    pub write: bool,
}

/// Waits until one of `fds` is ready: each is polled for reading, and for writing too when
/// its flag is set. `deadline: None` waits for ever.
pub(crate) fn poll(
    fds: &[(BorrowedFd<'_>, bool)],
    deadline: Option<Instant>,
) -> io::Result<Vec<Ready>> {
    let interests: Vec<_> = fds
        .iter()
        .map(|(fd, write)| {
            (
                *fd,
                if *write {
                    PollFlags::IN | PollFlags::OUT
                } else {
                    PollFlags::IN
                },
            )
        })
        .collect();
    Ok(poll_events(&interests, deadline)?
        .into_iter()
        .map(|r| Ready {
            read: r.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR),
            write: r.intersects(PollFlags::OUT | PollFlags::ERR),
        })
        .collect())
}

/// An eventfd: one thread's way to wake another's `poll`.
#[derive(Debug)]
pub(crate) struct Waker(OwnedFd);

impl Waker {
    pub fn new() -> io::Result<Self> {
        use rustix::event::EventfdFlags;
        Ok(Waker(rustix::event::eventfd(
            0,
            EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK,
        )?))
    }

    /// Makes the descriptor readable.
    pub fn wake(&self) {
        let _ = rustix::io::write(&self.0, &1u64.to_ne_bytes());
    }

    /// Makes it unreadable again.
    pub fn reset(&self) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.0, &mut buf);
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Nanoseconds on the monotonic clock, comparable between processes of one machine.
pub(crate) fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// What one non-blocking receive brought.
pub(crate) enum Received {
    /// This many bytes (at least one) were received.
    Data(usize),
    /// Nothing is there yet.
    WouldBlock,
    /// The peer has closed its end.
    Eof,
}

/// Receives what is available without blocking into `buf` (as much as fits; `buf` must not
/// be empty), and the descriptors that came with it into `fds`.
pub(crate) fn recv_nonblocking(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<Received> {
    let mut space =
        [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let res = loop {
        let mut iov = [IoSliceMut::new(&mut *buf)];
        match rustix::net::recvmsg(
            sock,
            &mut iov,
            &mut control,
            RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            other => break other,
        }
    };
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = msg {
            fds.extend(received);
        }
    }
    match res {
        Ok(m) if m.bytes == 0 => Ok(Received::Eof),
        Ok(m) => Ok(Received::Data(m.bytes)),
        Err(rustix::io::Errno::AGAIN) => Ok(Received::WouldBlock),
        Err(rustix::io::Errno::CONNRESET) => Ok(Received::Eof),
        Err(e) => Err(e.into()),
    }
}

/// Blocks until `sock`'s peer closes it (or it errors). Reads and discards anything sent.
pub(crate) fn wait_for_eof(sock: BorrowedFd<'_>) {
    let mut buf = [0u8; 256];
    loop {
        match rustix::io::read(sock, &mut buf) {
            Ok(0) => return,
            Ok(_) | Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::AGAIN) => continue,
            Err(_) => return,
        }
    }
}

/// The number of CPUs online on this machine.
pub(crate) fn cpus_online() -> Option<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    parse_cpu_list(text.trim())
}

/// The number of CPUs this process may run on (its affinity mask).
pub(crate) fn cpus_allowed() -> Option<usize> {
    rustix::thread::sched_getaffinity(None)
        .ok()
        .map(|set| set.count() as usize)
}

/// Counts the CPUs in a kernel CPU list such as `0-3,8,10-11`.
pub(crate) fn parse_cpu_list(list: &str) -> Option<usize> {
    let mut n = 0;
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                n += b.checked_sub(a)? + 1;
            }
            None => {
                part.parse::<usize>().ok()?;
                n += 1;
            }
        }
    }
    (n > 0).then_some(n)
}

/// A borrowed view of standard input, output and error, to hand to a fork server.
pub(crate) fn stdio_fds() -> [BorrowedFd<'static>; 3] {
    [
        std::io::stdin().as_fd(),
        std::io::stdout().as_fd(),
        std::io::stderr().as_fd(),
    ]
    .map(|fd| {
        // SAFETY: descriptors 0, 1 and 2 stay open for the life of the process.
        unsafe { BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(&fd)) }
    })
}

/// The conventional name of signal `sig`, such as `SIGKILL`.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        17 => "SIGCHLD",
        18 => "SIGCONT",
        19 => "SIGSTOP",
        20 => "SIGTSTP",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        31 => "SIGSYS",
        _ => "unknown signal",
    }
}

/// Allocations of at least this many bytes ask for transparent huge pages.
const HUGE_ALLOC: usize = 4 << 20;
/// The size of a transparent huge page (x86-64, arm64 with 4 KiB pages).
const HUGE_PAGE: usize = 2 << 20;

/// An empty `Vec` with room for `n` items. When that is large (4 MiB or more), the whole
/// 2 MiB pages inside the allocation are offered transparent huge pages (`MADV_HUGEPAGE`),
/// so that the kernel faults them in 2 MiB at a time instead of 4 KiB: filling a fresh
/// buffer of many MiB then costs a few page faults instead of thousands. Where the kernel
/// has no huge pages this changes nothing.
pub(crate) fn vec_for_bulk<T>(n: usize) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    let bytes = v.capacity().saturating_mul(std::mem::size_of::<T>());
    if bytes >= HUGE_ALLOC {
        let base = v.as_mut_ptr().cast::<u8>();
        let addr = base as usize;
        let start = addr.next_multiple_of(HUGE_PAGE);
        let end = (addr + bytes) / HUGE_PAGE * HUGE_PAGE;
        if start < end {
            // SAFETY: the range lies inside the allocation `v` owns, and MADV_HUGEPAGE only
            // changes how the kernel backs the pages, never their contents or whether they
            // can be accessed. A refusal (no THP) changes nothing.
            let _ = unsafe {
                rustix::mm::madvise(
                    base.wrapping_add(start - addr).cast(),
                    end - start,
                    rustix::mm::Advice::LinuxHugepage,
                )
            };
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-3"), Some(4));
        assert_eq!(parse_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn pids_out_of_range_are_errors_not_process_groups() {
        // 2^31 would be i32::MIN and u32::MAX would be -1 ("every process") if cast.
        for p in [0, 1 << 31, u32::MAX] {
            let err = signal(p, Sig::Term).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{p}");
            assert!(waitpid(p, false).is_err());
            assert!(pidfd_open(p).is_err());
        }
    }

    #[test]
    fn inherited_descriptors_are_checked_before_they_are_adopted() {
        use std::os::fd::{AsRawFd, IntoRawFd};
        let me = getpid();
        // A pipe is refused, and stays open (not adopted, not closed).
        let (r, _w) = rustix::pipe::pipe().unwrap();
        let err = take_inherited_fd(r.as_raw_fd(), me).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert!(rustix::io::fcntl_getfd(&r).is_ok());
        // A datagram socket is refused.
        let (d, _d2) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let err = take_inherited_fd(d.as_raw_fd(), me).unwrap_err();
        assert!(err.to_string().contains("stream"), "{err}");
        // A socket pair made by another process than the expected parent is refused.
        let (a, _b) = socketpair().unwrap();
        let err = take_inherited_fd(a.as_raw_fd(), me + 1).unwrap_err();
        assert!(err.to_string().contains("not by the parent"), "{err}");
        assert!(rustix::io::fcntl_getfd(&a).is_ok());
        // A closed number and a negative one are refused.
        assert!(take_inherited_fd(-1, me).is_err());
        // The real thing is adopted.
        let raw = a.into_raw_fd();
        let owned = take_inherited_fd(raw, me).unwrap();
        assert_eq!(owned.as_raw_fd(), raw);
        drop(owned);
        assert!(take_inherited_fd(raw, me).is_err());
    }

    #[test]
    fn process_names_fit_the_kernel() {
        assert_eq!(comm_name("gpuproc-forksrv"), "gpuproc-forksrv");
        assert_eq!(comm_name("a-very-long-worker-name"), "a-very-long-wor");
        assert_eq!(comm_name("ab\0cd"), "ab");
        // 14 ASCII bytes then a two-byte character: cut before it.
        assert_eq!(comm_name("abcdefghijklmné"), "abcdefghijklmn");
    }

    #[test]
    fn object_bases_tell_the_executable_from_a_library() {
        let here = object_base(tests::object_base_probe as fn() as usize).unwrap();
        let again = object_base(object_base as fn(usize) -> Option<usize> as usize).unwrap();
        assert_eq!(here, again);
        let libc_fn = object_base(libc::getpid as *const () as usize).unwrap();
        assert_ne!(here, libc_fn);
        assert_eq!(object_base(0), None);
    }

    #[inline(never)]
    fn object_base_probe() {
        std::hint::black_box(());
    }

    #[test]
    fn exitcode_follows_python() {
        assert_eq!(ExitStatus::Code(3).exitcode(), 3);
        assert_eq!(ExitStatus::Signal(9).exitcode(), -9);
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(15), "SIGTERM");
    }
}
