//! Every system call the runner makes: spawning jobs in their own process groups, reaping
//! them, signalling groups, and turning signals into something a loop can wait on.
//! No `unsafe` here: signal-hook installs the handlers, rustix makes the calls, and
//! [`crate::gate`] holds a GPU job back until it holds its lease.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::gate::{self, Gate};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::process::{kill_process_group, wait, Pid, Signal, WaitOptions};

/// How a job's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

/// Starts `sh -c command` as the leader of a new process group, with stdin from
/// `/dev/null`, the given environment additions and output, and returns its pid.
///
/// The job's own group lets the runner signal everything the job started at once, and
/// keeps the terminal's Ctrl-C from reaching jobs directly: the runner decides what they
/// get.
///
/// # Errors
/// When `sh` cannot be started.
pub fn spawn(
    command: &str,
    env: &BTreeMap<String, String>,
    stdout: Stdio,
    stderr: Stdio,
) -> io::Result<u32> {
    let mut sh = Command::new(SH);
    sh.arg("-c").arg(command);
    // The runner reaps with waitpid(-1); the `Child` handle is not needed (dropping it
    // neither waits nor kills).
    Ok(job(sh, env, stdout, stderr).spawn()?.id())
}

/// As [`spawn`], but behind a [gate](crate::gate): the job's process exists (and can be
/// made a holder of its GPU lease) but runs `sh` only once the gate is opened. Dropping
/// the gate instead makes the process exit with
/// [`EXIT_GATE_CLOSED`](crate::gate::EXIT_GATE_CLOSED) without running anything.
///
/// # Errors
/// When the process cannot be started.
pub fn spawn_gated(
    command: &str,
    env: &BTreeMap<String, String>,
    stdout: Stdio,
    stderr: Stdio,
) -> io::Result<(u32, Gate)> {
    let mut gated = job(gate::command(SH, ["-c", command]), env, stdout, stderr);
    let (child, gate) = gate::spawn(&mut gated)?;
    Ok((child.id(), gate))
}

const SH: &str = "/bin/sh";

fn job(
    mut command: Command,
    env: &BTreeMap<String, String>,
    stdout: Stdio,
    stderr: Stdio,
) -> Command {
    command
        .envs(env)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    command
}

/// Reaps one finished child without blocking; `None` when none has finished (or there
/// are no children).
///
/// # Errors
/// An unexpected `waitpid` failure.
pub fn reap_any() -> io::Result<Option<(u32, Exit)>> {
    match wait(WaitOptions::NOHANG) {
        Ok(Some((pid, status))) => {
            let exit = match (status.exit_status(), status.terminating_signal()) {
                (Some(code), _) => Exit::Code(code),
                (None, Some(sig)) => Exit::Signal(sig),
                (None, None) => return Ok(None),
            };
            Ok(Some((pid.as_raw_nonzero().get() as u32, exit)))
        }
        Ok(None) => Ok(None),
        Err(rustix::io::Errno::CHILD) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The signals the runner sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    /// SIGINT, forwarded on the first Ctrl-C.
    Int,
    /// SIGTERM, on a timeout or when the runner is asked to terminate.
    Term,
    /// SIGKILL, when a job ignores the above, or on the second Ctrl-C.
    Kill,
}

/// Sends `sig` to process group `pgid`. A group that no longer exists is not an error.
pub fn signal_group(pgid: u32, sig: Sig) {
    let sig = match sig {
        Sig::Int => Signal::INT,
        Sig::Term => Signal::TERM,
        Sig::Kill => Signal::KILL,
    };
    if let Some(pid) = Pid::from_raw(pgid as i32) {
        // ESRCH (already gone) and EPERM (pid reused by another user) both mean "not ours".
        let _ = kill_process_group(pid, sig);
    }
}

/// What the runner was asked to do by signals since the last look.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// SIGINT arrived.
    pub interrupt: bool,
    /// SIGTERM or SIGHUP arrived.
    pub terminate: bool,
}

/// SIGCHLD, SIGINT, SIGTERM and SIGHUP turned into a wake-up on a socket, so that one
/// `poll` waits for "a job ended", "the user pressed Ctrl-C" and the next deadline.
/// The handlers are removed on drop.
#[derive(Debug)]
pub struct Signals {
    wake: UnixStream,
    interrupt: Arc<AtomicBool>,
    terminate: Arc<AtomicBool>,
    ids: Vec<signal_hook::SigId>,
}

impl Signals {
    /// Installs the handlers.
    ///
    /// # Errors
    /// When the socket pair or a handler cannot be set up.
    pub fn install() -> io::Result<Signals> {
        use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
        let (wake, writer) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        writer.set_nonblocking(true)?;
        let interrupt = Arc::new(AtomicBool::new(false));
        let terminate = Arc::new(AtomicBool::new(false));
        let mut ids = vec![
            signal_hook::flag::register(SIGINT, Arc::clone(&interrupt))?,
            signal_hook::flag::register(SIGTERM, Arc::clone(&terminate))?,
            signal_hook::flag::register(SIGHUP, Arc::clone(&terminate))?,
        ];
        for sig in [SIGCHLD, SIGINT, SIGTERM, SIGHUP] {
            ids.push(signal_hook::low_level::pipe::register(
                sig,
                writer.try_clone()?,
            )?);
        }
        Ok(Signals {
            wake,
            interrupt,
            terminate,
            ids,
        })
    }

    /// Waits until a signal arrives or `timeout` passes (`None`: no limit), then reports
    /// (and clears) the interrupt and terminate requests.
    ///
    /// # Errors
    /// An unexpected `poll` or `read` failure.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<Received> {
        self.wait_or_watch(timeout, None)
            .map(|(received, _)| received)
    }

    /// [`wait`](Self::wait), also waking when `watch` has events; the `bool` says whether
    /// it has (read them with [`DirWatch::drain`]).
    ///
    /// # Errors
    /// An unexpected `poll` or `read` failure.
    pub fn wait_or_watch(
        &mut self,
        timeout: Option<Duration>,
        watch: Option<&DirWatch>,
    ) -> io::Result<(Received, bool)> {
        let timeout = timeout.map(|t| Timespec {
            tv_sec: t.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: i64::from(t.subsec_nanos()),
        });
        let mut fds = vec![PollFd::new(&self.wake, PollFlags::IN)];
        if let Some(w) = watch {
            fds.push(PollFd::new(&w.fd, PollFlags::IN));
        }
        match poll(&mut fds, timeout.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        let watched = fds.get(1).is_some_and(|f| !f.revents().is_empty());
        let mut buf = [0u8; 256];
        loop {
            match self.wake.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok((
            Received {
                interrupt: self.interrupt.swap(false, Ordering::SeqCst),
                terminate: self.terminate.swap(false, Ordering::SeqCst),
            },
            watched,
        ))
    }
}

/// Makes `dir` (mode 0700) unless it exists, then checks what `lstat` says of it with
/// `refusal(is_dir, uid, mode, our uid)`; a refusal is a `PermissionDenied` error that
/// says why.
///
/// # Errors
/// When it cannot be made or inspected, or is refused.
pub fn private_dir(
    dir: &std::path::Path,
    refusal: impl FnOnce(bool, u32, u32, u32) -> Option<String>,
) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    let me = rustix::process::getuid().as_raw();
    match refusal(meta.is_dir(), meta.uid(), meta.mode(), me) {
        None => Ok(()),
        Some(why) => Err(io::Error::new(io::ErrorKind::PermissionDenied, why)),
    }
}

/// Files renamed into one directory, as inotify tells them: how a Slurm run sees a task's
/// record the moment its wrapper renames it into place, rather than at the next `squeue`.
/// Where the writer is on another node of a network filesystem, the kernel sees no rename
/// and this stays silent; `squeue` polls find those tasks' ends as before.
#[derive(Debug)]
pub struct DirWatch {
    fd: rustix::fd::OwnedFd,
    buf: Vec<std::mem::MaybeUninit<u8>>,
}

/// What [`DirWatch::drain`] read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Renamed {
    /// Names renamed into the directory, in order.
    pub names: Vec<std::ffi::OsString>,
    /// The kernel's queue overflowed: some names are missing, look at every file.
    pub overflowed: bool,
}

impl DirWatch {
    /// Watches `dir` for files renamed into it.
    ///
    /// # Errors
    /// Where inotify is missing or its limits are reached (`fs.inotify.max_user_*`).
    pub fn new(dir: &std::path::Path) -> io::Result<DirWatch> {
        use rustix::fs::inotify;
        let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
        inotify::add_watch(
            &fd,
            dir,
            inotify::WatchFlags::MOVED_TO | inotify::WatchFlags::ONLYDIR,
        )?;
        Ok(DirWatch {
            fd,
            buf: vec![std::mem::MaybeUninit::uninit(); 16 * 1024],
        })
    }

    /// Reads every event queued so far, without waiting.
    ///
    /// # Errors
    /// An unexpected `read` failure.
    pub fn drain(&mut self) -> io::Result<Renamed> {
        use rustix::fs::inotify::{ReadFlags, Reader};
        let mut renamed = Renamed::default();
        let mut reader = Reader::new(&self.fd, &mut self.buf);
        loop {
            match reader.next() {
                Ok(event) => {
                    if event.events().contains(ReadFlags::QUEUE_OVERFLOW) {
                        renamed.overflowed = true;
                    }
                    if let Some(name) = event.file_name() {
                        use std::os::unix::ffi::OsStrExt;
                        renamed
                            .names
                            .push(std::ffi::OsStr::from_bytes(name.to_bytes()).to_owned());
                    }
                }
                Err(rustix::io::Errno::AGAIN) => return Ok(renamed),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}
