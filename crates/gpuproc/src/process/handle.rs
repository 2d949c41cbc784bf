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
}

#[derive(Debug)]
struct State {
    ctrl: OwnedFd,
    /// Set for our own children (not the fork server's): the pidfd we poll and `waitpid`.
    pidfd: Option<OwnedFd>,
    reader: FrameReader,
    report: Option<Report>,
    status: Option<ExitStatus>,
    /// The fork server vanished before reporting the child's status.
    server_lost: bool,
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
            state: Mutex::new(State {
                ctrl,
                pidfd,
                reader: FrameReader::default(),
                report: None,
                status: None,
                server_lost: false,
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
        let st = self.lock();
        ipc::send_frame(st.ctrl.as_fd(), bytes, fds)
    }

    /// Waits until the child has ended or `deadline` passes; returns whether it has ended.
    pub fn wait(&self, deadline: Option<Instant>) -> io::Result<bool> {
        let mut st = self.lock();
        loop {
            st.absorb()?;
            if st.finished(self.via_server) {
                return Ok(true);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
            let st_ref = &*st;
            let mut fds: Vec<BorrowedFd<'_>> = Vec::with_capacity(2);
            if !st_ref.reader.at_eof() {
                fds.push(st_ref.ctrl.as_fd());
            }
            let pid_index = st_ref.pidfd.as_ref().map(|p| {
                fds.push(p.as_fd());
                fds.len() - 1
            });
            if fds.is_empty() {
                // Only possible for the fork server's children: the socket is closed and no
                // status came. The server died.
                st.server_lost = true;
                return Ok(true);
            }
            let ready = sys::poll_readable(&fds, deadline)?;
            if pid_index.is_some_and(|i| ready[i]) {
                st.reap(self.pid, false)?;
            }
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
    /// Reads what has arrived, without blocking.
    fn absorb(&mut self) -> io::Result<()> {
        if !self.reader.at_eof() {
            self.reader.fill(self.ctrl.as_fd())?;
        }
        while let Some(frame) = self.reader.next_frame()? {
            let Frame { bytes, fds } = frame;
            match ipc::decode::<ChildMsg>(&bytes, Vec::new()) {
                Ok(ChildMsg::Returned(result)) => {
                    self.report = Some(Report::Returned(Frame { bytes: result, fds }))
                }
                Ok(ChildMsg::Failed(f)) => self.report = Some(Report::Failed(f)),
                Ok(ChildMsg::Exited(status)) => self.status = Some(status),
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

    fn finished(&self, via_server: bool) -> bool {
        self.status.is_some() || self.server_lost || (via_server && self.reader.at_eof())
    }

    fn reap(&mut self, pid: u32, block: bool) -> io::Result<()> {
        if self.status.is_none() {
            if let Some(st) = sys::waitpid(pid, block)? {
                self.status = Some(st);
                self.pidfd = None;
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
            let _ = self.wait(Some(Instant::now() + Duration::from_secs(5)));
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
