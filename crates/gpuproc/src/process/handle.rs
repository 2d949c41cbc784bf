//! The parent's view of one running child: its control socket, its pidfd, what it sent, and
//! how it ended. Shared between a `Process` and the registry behind `active_children()`.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::wire::ChildMsg;
use crate::ipc::{self, Frame, FrameReader};
use crate::sys::{self, ExitStatus, Sig};

/// What the child said about its call.
#[derive(Debug)]
pub(crate) enum Report {
    Returned(Frame),
    Failed(super::wire::Failure),
    /// A process on another machine could not be started (`node`: `None`) or was lost.
    Lost {
        node: Option<String>,
        reason: String,
    },
}

/// What has been read from the child and learnt about its end. Never locked across a
/// blocking call: threads that wait poll the descriptors without it.
#[derive(Debug)]
struct State {
    reader: FrameReader,
    report: Option<Report>,
    status: Option<ExitStatus>,
    /// The code the child passed to `exit`, as it reported it.
    exiting: Option<i32>,
    /// The fork server vanished before reporting the child's status.
    server_lost: bool,
    /// Where a process started through a launcher runs: its node and its pid there.
    runs_on: Option<(String, u32)>,
}

/// A started child, as its parent sees it.
#[derive(Debug)]
pub(crate) struct ChildHandle {
    pub pid: u32,
    pub name: String,
    pub daemon: bool,
    /// The fork server, not this process, is the child's parent and reaps it.
    via_server: bool,
    /// The process that started it (a forked child inherits the registry, not the children).
    owner: u32,
    /// A pidfd for signalling; for the fork server's children it is opened after the fact.
    signal_fd: Option<OwnedFd>,
    /// The control socket: the call goes out on it, the report (and, from the fork server,
    /// the exit status) comes back.
    ctrl: OwnedFd,
    /// Set for our own children (not the fork server's): the pidfd we poll and `waitpid`.
    pidfd: Option<OwnedFd>,
    state: Mutex<State>,
}

static REGISTRY: Mutex<Vec<Weak<ChildHandle>>> = Mutex::new(Vec::new());

impl ChildHandle {
    /// Registers a child this process forked or spawned itself.
    pub fn direct(pid: u32, name: String, daemon: bool, ctrl: OwnedFd) -> io::Result<Arc<Self>> {
        let pidfd = sys::pidfd_open(pid)?;
        let signal_fd = sys::dup(pidfd.as_fd()).ok();
        Ok(Self::register(
            pid,
            name,
            daemon,
            ctrl,
            Some(pidfd),
            signal_fd,
            false,
        ))
    }

    /// Registers a child the fork server forked for us.
    pub fn via_server(pid: u32, name: String, daemon: bool, ctrl: OwnedFd) -> Arc<Self> {
        // The child may already be gone (and the pid reused): then there is nothing to signal.
        let signal_fd = sys::pidfd_open(pid).ok();
        Self::register(pid, name, daemon, ctrl, None, signal_fd, true)
    }

    fn register(
        pid: u32,
        name: String,
        daemon: bool,
        ctrl: OwnedFd,
        pidfd: Option<OwnedFd>,
        signal_fd: Option<OwnedFd>,
        via_server: bool,
    ) -> Arc<Self> {
        let handle = Arc::new(ChildHandle {
            pid,
            name,
            daemon,
            via_server,
            owner: sys::getpid(),
            signal_fd,
            ctrl,
            pidfd,
            state: Mutex::new(State {
                reader: FrameReader::default(),
                report: None,
                status: None,
                exiting: None,
                server_lost: false,
                runs_on: None,
            }),
        });
        let mut reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        reg.retain(|w| w.strong_count() > 0);
        reg.push(Arc::downgrade(&handle));
        handle
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends the call frame.
    pub fn send(&self, bytes: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
        ipc::send_frame(self.ctrl.as_fd(), bytes, fds)
    }

    /// Waits until the child has ended or `deadline` passes; returns whether it has ended.
    ///
    /// The state's lock is taken only to read what has arrived, never across the poll, so
    /// other threads (`active_children`, `is_alive`, `exitcode`) are never held up by a
    /// thread that waits here.
    pub fn wait(&self, deadline: Option<Instant>) -> io::Result<bool> {
        loop {
            let watch_ctrl = {
                let mut st = self.lock();
                if self.pidfd.is_some() && st.status.is_none() {
                    // Reaping without blocking is cheap, and catches an end that another
                    // thread's poll saw first. Reap before reading: once the child is
                    // reaped, everything it wrote is already in the socket.
                    st.reap(self.pid, false)?;
                }
                st.absorb(self.ctrl.as_fd())?;
                if st.finished(self.via_server) {
                    return Ok(true);
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(false);
                }
                !st.reader.at_eof()
            };
            let mut fds: Vec<BorrowedFd<'_>> = Vec::with_capacity(2);
            if watch_ctrl {
                fds.push(self.ctrl.as_fd());
            }
            if let Some(p) = &self.pidfd {
                fds.push(p.as_fd());
            }
            if fds.is_empty() {
                // Only possible for the fork server's children: the socket is closed and no
                // status came. The server died.
                self.lock().server_lost = true;
                return Ok(true);
            }
            sys::poll_readable(&fds, deadline)?;
        }
    }

    /// A descriptor of its own that becomes readable once the child has ended: a pidfd.
    /// A fork-server child that had already ended when it was registered (no pidfd could
    /// be opened for it) gets one that is readable at once.
    pub fn sentinel(&self) -> io::Result<OwnedFd> {
        match self.pidfd.as_ref().or(self.signal_fd.as_ref()) {
            Some(fd) => sys::dup(fd.as_fd()),
            None => sys::always_readable(),
        }
    }

    /// Whether the child is still running (never blocks).
    pub fn is_alive(&self) -> bool {
        !matches!(self.wait(Some(Instant::now())), Ok(true))
    }

    /// The exit status, once known.
    pub fn status(&self) -> Option<ExitStatus> {
        self.lock().status
    }

    /// Whether the child was killed by its fork server's death, before it reported.
    pub fn lost_with_server(&self) -> bool {
        self.lock().server_lost
    }

    /// Where a process started through a launcher runs (its node and its pid there), once
    /// its relay has said so; reads what has arrived first.
    pub fn runs_on(&self) -> Option<(String, u32)> {
        let mut st = self.lock();
        if st.runs_on.is_none() {
            let _ = st.absorb(self.ctrl.as_fd());
        }
        st.runs_on.clone()
    }

    /// Takes the child's report (its result or failure), if it sent one.
    pub fn take_report(&self) -> Option<Report> {
        self.lock().report.take()
    }

    /// Sends `sig` unless the child is known to have ended.
    pub fn signal(&self, sig: Sig) -> io::Result<()> {
        if self.lock().status.is_some() {
            return Ok(());
        }
        match &self.signal_fd {
            Some(fd) => sys::pidfd_signal(fd.as_fd(), sig),
            None => Ok(()),
        }
    }
}

impl State {
    /// Reads what has arrived on `ctrl`, without blocking.
    fn absorb(&mut self, ctrl: BorrowedFd<'_>) -> io::Result<()> {
        if !self.reader.at_eof() {
            self.reader.fill(ctrl)?;
        }
        while let Some(frame) = self.reader.next_frame()? {
            let Frame { bytes, fds } = frame;
            match ipc::decode::<ChildMsg>(&bytes, Vec::new()) {
                Ok(ChildMsg::Returned(result)) => {
                    self.report = Some(Report::Returned(Frame { bytes: result, fds }))
                }
                Ok(ChildMsg::Failed(f)) => self.report = Some(Report::Failed(f)),
                Ok(ChildMsg::Exited(status)) => self.status = Some(status),
                Ok(ChildMsg::Exiting(code)) => self.exiting = Some(code),
                Ok(ChildMsg::RunsOn { node, pid }) => self.runs_on = Some((node, pid)),
                Ok(ChildMsg::Lost { node, reason }) => {
                    self.report = Some(Report::Lost { node, reason })
                }
                Err(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("malformed message from a child: {e}"),
                    ))
                }
            }
        }
        Ok(())
    }

    fn finished(&mut self, via_server: bool) -> bool {
        if via_server && self.status.is_none() && self.reader.at_eof() {
            // Every copy of the child's end is closed, and the fork server never said how
            // the child ended: the server was killed. A child that reported exits with a
            // known code (see `child::report_and_exit`), and so does one that called `exit`
            // (its exit handler reports the code); otherwise it was still running, and the
            // server's death killed it (its parent-death signal, SIGKILL).
            self.status = Some(match (&self.report, self.exiting) {
                (_, Some(code)) => ExitStatus::Code(code),
                (Some(Report::Returned(_)), None) => ExitStatus::Code(0),
                (Some(Report::Failed(_)), None) => ExitStatus::Code(1),
                (Some(Report::Lost { .. }), None) => ExitStatus::Code(super::remote::LOST_EXITCODE),
                (None, None) => {
                    self.server_lost = true;
                    ExitStatus::Signal(libc::SIGKILL)
                }
            });
        }
        self.status.is_some() || self.server_lost
    }

    fn reap(&mut self, pid: u32, block: bool) -> io::Result<()> {
        if self.status.is_none() {
            if let Some(st) = sys::waitpid(pid, block)? {
                self.status = Some(st);
            }
        }
        Ok(())
    }
}

impl Drop for ChildHandle {
    /// A child whose handle goes away is killed and reaped, so it neither outlives its
    /// `Process` nor lingers as a zombie.
    fn drop(&mut self) {
        if self.owner != sys::getpid() {
            return;
        }
        let finished = matches!(self.wait(Some(Instant::now())), Ok(true));
        if !finished {
            let _ = self.signal(Sig::Kill);
            let _ = self.wait(crate::time::deadline(Duration::from_secs(5)));
        }
    }
}

/// The children this process started that are still running.
pub(crate) fn active() -> Vec<Arc<ChildHandle>> {
    let live: Vec<Arc<ChildHandle>> = {
        let mut reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        reg.retain(|w| w.strong_count() > 0);
        reg.iter().filter_map(Weak::upgrade).collect()
    };
    let me = sys::getpid();
    live.into_iter()
        .filter(|c| c.owner == me && c.is_alive())
        .collect()
}

/// How this process's child `pid` ended, if it is one of them and has ended.
pub(crate) fn status_of(pid: u32) -> Option<ExitStatus> {
    let me = sys::getpid();
    let reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let child = reg
        .iter()
        .filter_map(Weak::upgrade)
        .find(|c| c.owner == me && c.pid == pid)?;
    drop(reg);
    if child.is_alive() {
        return None;
    }
    child.status()
}
