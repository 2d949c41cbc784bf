//! The fork server: a single-threaded copy of this executable, started on first use, that
//! forks children on request.
//!
//! Forking a multi-threaded program is unsafe (another thread may hold a lock the child will
//! need), and re-running the executable for every child is slow. The fork server is the
//! middle way Python's `forkserver` takes: it is an exec of `/proc/self/exe` that enters its
//! loop from [`crate::init`] before `main` does anything, so it never has a second thread, and
//! forking it is both safe and cheap.
//!
//! The parent sends each request with the child's control socket and its own standard
//! input, output and error; the server forks, the child serves the call over that socket, and
//! when the child ends the server reaps it and writes [`ChildMsg::Exited`] on the same socket,
//! after everything the child wrote. The server exits when its own control socket reaches EOF
//! (the parent died), and its children die with it (their parent-death signal, SIGKILL), so
//! nothing outlives the program. A server killed by someone else takes its running children
//! along: their parent then gets [`ProcessError::ForkServer`] saying so, with `exitcode()`
//! -9; a child that had already reported keeps its result and exit code. The server ignores
//! SIGINT, as Python's does (a terminal's Ctrl-C is the program's to handle); its children
//! get SIGINT's disposition back.
//!
//! The server refuses to fork when it has more than one thread: that happens when a thread
//! (an async runtime's, typically) started before [`crate::init`] ran; see
//! [`crate::init_before_main`].

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::child::{self, ParentWatch};
use super::wire::{ChildMsg, ForkReply, ForkRequest};
use super::ProcessError;
use crate::ipc::{self, FrameReader, Read};
use crate::sys::{self, Forked};

/// The environment variable that tells [`crate::init`] to become the fork server.
pub(crate) const SERVER_FD_ENV: &str = "GPUPROC_FORKSERVER_FD";
/// The fork server's first argument (after `argv[0]`).
pub(crate) const SERVER_ARG: &str = "--gpuproc-fork-server";
/// The fork server's process name, as `ps` and `/proc/PID/comm` show it.
pub(crate) const SERVER_COMM: &str = "gpuproc-forksrv";

/// How long to wait for the server's reply before declaring it lost.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// The parent's connection to its fork server.
///
/// Requests are numbered and pipelined: a request is sent under a short lock, and no lock
/// is held while its reply is awaited, so one slow reply does not hold up other threads'
/// requests (the first waiter reads replies for everybody, the others wait on a condition
/// variable, each until its own deadline).
#[derive(Debug)]
struct Client {
    sock: OwnedFd,
    /// The process that started this server; a forked child must start its own.
    owner: u32,
    /// The server's pid, to reap it if it dies before we do.
    pid: u32,
    /// The next request's number.
    next: Mutex<u64>,
    replies: Mutex<Replies>,
    arrived: Condvar,
}

#[derive(Debug, Default)]
struct Replies {
    reader: FrameReader,
    /// Replies read by one waiter for another, by request number.
    got: HashMap<u64, ForkReply>,
    /// Some waiter is reading the socket.
    reading: bool,
    /// The server is gone (or spoke nonsense): every waiter fails with this.
    lost: Option<String>,
}

static SERVER: Mutex<Option<Arc<Client>>> = Mutex::new(None);

fn lost(reason: impl Into<String>) -> ProcessError {
    ProcessError::ForkServer {
        reason: reason.into(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a request failed.
enum Failed {
    /// The server is broken or gone: replace it and try again.
    Lost(String),
    /// The server works but refuses, for a reason a new server would share.
    Refused(String),
}

impl Client {
    fn start() -> Result<Client, ProcessError> {
        let (ours, theirs) =
            sys::socketpair().map_err(ProcessError::io("creating a socket pair"))?;
        let raw = theirs.as_raw_fd();
        let mut cmd = Command::new("/proc/self/exe");
        if let Some(arg0) = std::env::args_os().next() {
            cmd.arg0(arg0);
        }
        cmd.arg(SERVER_ARG)
            .env(SERVER_FD_ENV, raw.to_string())
            .env_remove(super::CHILD_FD_ENV)
            .stdin(Stdio::null());
        // SAFETY: the closure runs between fork and exec and only makes one fcntl system call
        // on a descriptor this process owns, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let fd = std::os::fd::BorrowedFd::borrow_raw(raw);
                sys::clear_cloexec(fd)
            });
        }
        let child = cmd.spawn().map_err(ProcessError::io(
            "starting the fork server (/proc/self/exe)",
        ))?;
        // The server lives as long as this process (init reaps it after we exit); if it dies
        // first, `fork_child` reaps it. std's handle neither waits nor kills on drop.
        let pid = child.id();
        drop(child);
        drop(theirs);
        Ok(Client {
            sock: ours,
            owner: sys::getpid(),
            pid,
            next: Mutex::new(0),
            replies: Mutex::new(Replies::default()),
            arrived: Condvar::new(),
        })
    }

    fn request(&self, child_ctrl: &OwnedFd) -> Result<u32, Failed> {
        let seq = {
            let mut next = lock(&self.next);
            let seq = *next;
            *next = next.wrapping_add(1);
            let (bytes, _) = ipc::encode(&ForkRequest {
                parent_pid: sys::getpid(),
                seq,
            })
            .map_err(|e| Failed::Lost(e.to_string()))?;
            let [stdin, stdout, stderr] = sys::stdio_fds();
            let fds = [child_ctrl.as_fd(), stdin, stdout, stderr];
            ipc::send_frame_borrowed(self.sock.as_fd(), &bytes, &fds)
                .map_err(|e| Failed::Lost(format!("cannot send it a request: {e}")))?;
            seq
        };
        match self.wait_reply(seq, crate::time::deadline(REPLY_TIMEOUT))? {
            ForkReply::Forked { pid, .. } => Ok(pid),
            ForkReply::Failed { reason, .. } => Err(Failed::Lost(reason)),
            ForkReply::Refused { reason, .. } => Err(Failed::Refused(reason)),
        }
    }

    /// Waits for the reply to request `seq`, reading the socket when no other thread does.
    fn wait_reply(&self, seq: u64, deadline: Option<Instant>) -> Result<ForkReply, Failed> {
        let mut st = lock(&self.replies);
        loop {
            if let Some(reply) = st.got.remove(&seq) {
                return Ok(reply);
            }
            if let Some(why) = &st.lost {
                return Err(Failed::Lost(why.clone()));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Failed::Lost(format!("no answer within {REPLY_TIMEOUT:?}")));
            }
            if st.reading {
                st = match deadline {
                    Some(d) => {
                        let left = d.saturating_duration_since(Instant::now());
                        self.arrived
                            .wait_timeout(st, left)
                            .unwrap_or_else(|p| p.into_inner())
                            .0
                    }
                    None => self.arrived.wait(st).unwrap_or_else(|p| p.into_inner()),
                };
                continue;
            }
            // Read for everybody, without the lock.
            st.reading = true;
            let mut reader = std::mem::take(&mut st.reader);
            drop(st);
            let read = reader.read(self.sock.as_fd(), deadline);
            st = lock(&self.replies);
            st.reader = reader;
            st.reading = false;
            match read {
                Ok(Read::Frame(f)) => match ipc::decode::<ForkReply>(&f.bytes, f.fds) {
                    Ok(reply) => {
                        st.got.insert(reply.seq(), reply);
                    }
                    Err(e) => st.lost = Some(format!("malformed reply: {e}")),
                },
                Ok(Read::Eof) => st.lost = Some("it exited".into()),
                Ok(Read::TimedOut) => {}
                Err(e) => st.lost = Some(e.to_string()),
            }
            self.arrived.notify_all();
        }
    }
}

/// Asks the fork server (starting it if needed) for a child that will serve the call sent
/// on `child_ctrl`'s peer. Returns the child's pid.
pub(crate) fn fork_child(child_ctrl: OwnedFd) -> Result<u32, ProcessError> {
    // A server that died since the last request (killed by someone) is replaced once.
    for attempt in 0..2 {
        let client = {
            let mut guard = lock(&SERVER);
            if guard.as_ref().is_some_and(|c| c.owner != sys::getpid()) {
                // Inherited through a fork: that server belongs to our parent (closing our
                // copy of its socket does not affect the parent's).
                *guard = None;
            }
            match guard.as_ref() {
                Some(c) => Arc::clone(c),
                None => {
                    let c = Arc::new(Client::start()?);
                    *guard = Some(Arc::clone(&c));
                    c
                }
            }
        };
        // No lock is held while the server answers.
        match client.request(&child_ctrl) {
            Ok(pid) => return Ok(pid),
            Err(Failed::Refused(reason)) => return Err(lost(reason)),
            Err(Failed::Lost(reason)) => {
                // Make sure the old server is gone and reaped (no zombie), then start afresh
                // (unless another thread already did).
                let mut guard = lock(&SERVER);
                if guard.as_ref().is_some_and(|c| Arc::ptr_eq(c, &client)) {
                    *guard = None;
                    let _ = sys::signal(client.pid, sys::Sig::Kill);
                    let _ = sys::waitpid(client.pid, true);
                }
                drop(guard);
                if attempt == 1 {
                    return Err(lost(reason));
                }
            }
        }
    }
    unreachable!("the loop returns on its second attempt")
}

struct Running {
    pid: u32,
    pidfd: OwnedFd,
    /// A copy of the child's control socket, to report its exit status on.
    ctrl: OwnedFd,
}

/// Why a fork server that has other threads refuses to fork.
fn threads_reason(threads: usize) -> String {
    format!(
        "the fork server has {threads} threads, so forking it could deadlock a child: a \
         thread was started before gpuproc::init() ran (an async runtime such as \
         #[tokio::main] does this); put gpuproc::init_before_main!() at the top level of \
         the program (it runs init before main and any runtime), or call gpuproc::init() \
         before the runtime starts, or use StartMethod::Spawn"
    )
}

/// The fork server's loop. Never returns.
pub(crate) fn serve(ctl: OwnedFd) -> ! {
    sys::set_process_name(SERVER_COMM);
    // As Python's fork server: a terminal's Ctrl-C goes to the whole foreground process
    // group, and the program decides what it means for its children; the server's children
    // get the disposition back.
    let sigint_was_ignored = sys::ignore_sigint();
    // Threads started before `init` (an async runtime's, say) make forking unsafe.
    let threads = sys::thread_count().unwrap_or(1);
    let me = Server {
        pid: sys::getpid(),
        threads,
        sigint_was_ignored,
    };
    let mut reader = FrameReader::default();
    let mut running: Vec<Running> = Vec::new();
    loop {
        let mut watched = vec![ctl.as_fd()];
        watched.extend(running.iter().map(|r| r.pidfd.as_fd()));
        let ready = match sys::poll_readable(&watched, None) {
            Ok(r) => r,
            Err(_) => sys::exit_now(1),
        };
        // Children that ended: reap them and report their status, newest index first so
        // that removing one does not shift the others.
        for i in (0..running.len()).rev() {
            if !ready[i + 1] {
                continue;
            }
            if let Ok(Some(status)) = sys::waitpid(running[i].pid, false) {
                let r = running.swap_remove(i);
                if let Ok(bytes) = crate::codec::to_vec(&ChildMsg::Exited(status)) {
                    // The parent may have dropped its handle already; that is fine.
                    let _ = ipc::send_frame(r.ctrl.as_fd(), &bytes, &[]);
                }
            }
        }
        if !ready[0] {
            continue;
        }
        if reader.fill(ctl.as_fd()).is_err() {
            sys::exit_now(1);
        }
        loop {
            let frame = match reader.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => sys::exit_now(1),
            };
            let reply = fork_one(frame, &ctl, &me, &mut running);
            let bytes = crate::codec::to_vec(&reply).unwrap_or_default();
            if ipc::send_frame(ctl.as_fd(), &bytes, &[]).is_err() {
                sys::exit_now(0);
            }
        }
        if reader.at_eof() {
            // The parent is gone; our children follow through their own watch on it.
            sys::exit_now(0);
        }
    }
}

/// What the fork server knows about itself.
struct Server {
    pid: u32,
    /// Its thread count when it started serving: more than one and it refuses to fork.
    threads: usize,
    /// Whether SIGINT was ignored before the server ignored it (children get that back).
    sigint_was_ignored: bool,
}

fn fork_one(
    frame: ipc::Frame,
    ctl: &OwnedFd,
    me: &Server,
    running: &mut Vec<Running>,
) -> ForkReply {
    let request = match ipc::decode::<ForkRequest>(&frame.bytes, Vec::new()) {
        Ok(r) => r,
        Err(e) => {
            return ForkReply::Failed {
                seq: u64::MAX,
                reason: format!("malformed request: {e}"),
            }
        }
    };
    let seq = request.seq;
    let failed = |reason: String| ForkReply::Failed { seq, reason };
    if me.threads > 1 {
        return ForkReply::Refused {
            seq,
            reason: threads_reason(me.threads),
        };
    }
    let mut fds = frame.fds.into_iter();
    let (Some(child_ctrl), Some(stdin), Some(stdout), Some(stderr)) =
        (fds.next(), fds.next(), fds.next(), fds.next())
    else {
        return failed("request without its four descriptors".into());
    };
    let ctrl_copy = match sys::dup(child_ctrl.as_fd()) {
        Ok(c) => c,
        Err(e) => return failed(format!("dup: {e}")),
    };
    // SAFETY: the fork server is single-threaded (checked above: it entered this loop from
    // `init` before any other thread started), so the child may do anything.
    match unsafe { sys::fork() } {
        Err(e) => failed(format!("fork: {e}")),
        Ok(Forked::Child) => {
            // The child dies with this server (its parent-death signal), which lives as long
            // as the program: a watch of its own would cost a thread per child. A server
            // killed from outside takes its running children along, and their parent is told
            // so (see `ChildHandle`); the server ignores SIGINT, so a terminal's Ctrl-C is
            // the program's alone.
            if sys::kill_me_with_parent().is_err() || sys::getppid() != Some(me.pid) {
                sys::exit_now(1);
            }
            sys::restore_sigint(me.sigint_was_ignored);
            for (fd, target) in [(&stdin, 0), (&stdout, 1), (&stderr, 2)] {
                let _ = sys::dup_onto(fd.as_fd(), target);
            }
            // Close what belongs to the server and to other children.
            drop((stdin, stdout, stderr, ctrl_copy));
            for r in running.drain(..) {
                drop(r);
            }
            // SAFETY: `serve_call` never returns, so the server's `OwnedFd` for its control
            // socket is never dropped in this child; closing the descriptor here is the only
            // close it gets in this process.
            unsafe { sys::close_raw(ctl.as_raw_fd()) };
            child::serve_call(child_ctrl, ParentWatch::DeathSignal)
        }
        Ok(Forked::Parent(pid)) => match sys::pidfd_open(pid) {
            Ok(pidfd) => {
                running.push(Running {
                    pid,
                    pidfd,
                    ctrl: ctrl_copy,
                });
                ForkReply::Forked { seq, pid }
            }
            Err(e) => {
                let _ = sys::signal(pid, sys::Sig::Kill);
                let _ = sys::waitpid(pid, true);
                failed(format!("pidfd_open: {e}"))
            }
        },
    }
}
