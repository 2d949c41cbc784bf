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
//! (the parent died), and its children follow through `PR_SET_PDEATHSIG`.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::child::{self, ParentWatch};
use super::wire::{ChildMsg, ForkReply, ForkRequest};
use super::ProcessError;
use crate::ipc::{self, FrameReader, Read};
use crate::sys::{self, Forked};

/// The environment variable that tells [`crate::init`] to become the fork server.
pub(crate) const SERVER_FD_ENV: &str = "GPUPROC_FORKSERVER_FD";

/// How long to wait for the server's reply before declaring it lost.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Client {
    sock: OwnedFd,
    reader: FrameReader,
    /// The process that started this server; a forked child must start its own.
    owner: u32,
    /// The server's pid, to reap it if it dies before we do.
    pid: u32,
}

static SERVER: Mutex<Option<Client>> = Mutex::new(None);

fn lost(reason: impl Into<String>) -> ProcessError {
    ProcessError::ForkServer {
        reason: reason.into(),
    }
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
        cmd.arg("--gpuproc-fork-server")
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
            reader: FrameReader::default(),
            owner: sys::getpid(),
            pid,
        })
    }

    fn request(&mut self, child_ctrl: &OwnedFd) -> Result<u32, ProcessError> {
        let (bytes, _) = ipc::encode(&ForkRequest {
            parent_pid: sys::getpid(),
        })
        .map_err(|e| lost(e.to_string()))?;
        let [stdin, stdout, stderr] = sys::stdio_fds();
        let fds = [child_ctrl.as_fd(), stdin, stdout, stderr];
        ipc::send_frame_borrowed(self.sock.as_fd(), &bytes, &fds)
            .map_err(|e| lost(format!("cannot send it a request: {e}")))?;
        match self
            .reader
            .read(self.sock.as_fd(), Some(Instant::now() + REPLY_TIMEOUT))
            .map_err(|e| lost(e.to_string()))?
        {
            Read::Frame(f) => {
                match ipc::decode(&f.bytes, f.fds).map_err(|e| lost(e.to_string()))? {
                    ForkReply::Forked { pid } => Ok(pid),
                    ForkReply::Failed { reason } => Err(lost(reason)),
                }
            }
            Read::Eof => Err(lost("it exited")),
            Read::TimedOut => Err(lost(format!("no answer within {REPLY_TIMEOUT:?}"))),
        }
    }
}

/// Asks the fork server (starting it if needed) for a child that will serve the call sent
/// on `child_ctrl`'s peer. Returns the child's pid.
pub(crate) fn fork_child(child_ctrl: OwnedFd) -> Result<u32, ProcessError> {
    let mut guard = SERVER.lock().unwrap_or_else(|p| p.into_inner());
    if guard.as_ref().is_some_and(|c| c.owner != sys::getpid()) {
        // Inherited through a fork: that server belongs to our parent (closing our copy of
        // its socket does not affect the parent's).
        *guard = None;
    }
    // A server that died since the last request (killed by someone) is replaced once.
    for attempt in 0..2 {
        if guard.is_none() {
            *guard = Some(Client::start()?);
        }
        let client = guard.as_mut().expect("just set");
        match client.request(&child_ctrl) {
            Err(ProcessError::ForkServer { reason }) => {
                // Make sure the old server is gone and reaped (no zombie), then start afresh.
                if let Some(old) = guard.take() {
                    let _ = sys::signal(old.pid, sys::Sig::Kill);
                    let _ = sys::waitpid(old.pid, true);
                }
                if attempt == 1 {
                    return Err(ProcessError::ForkServer { reason });
                }
            }
            other => return other,
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

/// The fork server's loop. Never returns.
pub(crate) fn serve(ctl: OwnedFd) -> ! {
    let my_pid = sys::getpid();
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
                if let Ok(bytes) = postcard::to_stdvec(&ChildMsg::Exited(status)) {
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
            let reply = fork_one(frame, &ctl, my_pid, &mut running);
            let bytes = postcard::to_stdvec(&reply).unwrap_or_default();
            if ipc::send_frame(ctl.as_fd(), &bytes, &[]).is_err() {
                sys::exit_now(0);
            }
        }
        if reader.at_eof() {
            // The parent is gone; our children follow through their death signal.
            sys::exit_now(0);
        }
    }
}

fn fork_one(
    frame: ipc::Frame,
    ctl: &OwnedFd,
    my_pid: u32,
    running: &mut Vec<Running>,
) -> ForkReply {
    let failed = |reason: String| ForkReply::Failed { reason };
    if let Err(e) = ipc::decode::<ForkRequest>(&frame.bytes, Vec::new()) {
        return failed(format!("malformed request: {e}"));
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
    // SAFETY: the fork server is single-threaded (it entered this loop from `init` before any
    // other thread could start), so the child may do anything.
    match unsafe { sys::fork() } {
        Err(e) => failed(format!("fork: {e}")),
        Ok(Forked::Child) => {
            let _ = sys::kill_me_with_parent();
            if sys::getppid() != Some(my_pid) {
                sys::exit_now(1);
            }
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
                ForkReply::Forked { pid }
            }
            Err(e) => {
                let _ = sys::signal(pid, sys::Sig::Kill);
                let _ = sys::waitpid(pid, true);
                failed(format!("pidfd_open: {e}"))
            }
        },
    }
}
