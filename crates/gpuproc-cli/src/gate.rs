//! The gate in front of a command that must hold a GPU lease before it runs.
//!
//! A lease is recorded against processes (pid and start time). To make the command's own
//! process a holder *before* the command runs, gpuproc starts itself (`/proc/self/exe`)
//! with [`ENV`] naming the read end of a pipe: that process, the gate, waits on the pipe.
//! The starter adds the gate's pid as a holder of the lease, then [opens](Gate::open) the
//! gate, and the gate execs the command, which keeps the pid and start time. If the starter
//! goes away first, or drops the [`Gate`] because the process could not be made a holder,
//! the gate exits with [`EXIT_GATE_CLOSED`] and the command never runs.
//!
//! `gpuproc pick --hold` and every job of a GPU `gpuproc run` go through a gate.

use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

/// Set in a gate's environment: the number of the pipe descriptor to wait on.
pub const ENV: &str = "GPUPROC_HOLD_GATE";
/// A gate's exit status when it closed without running the command.
pub const EXIT_GATE_CLOSED: u8 = 125;
/// Exit status when the command cannot be executed.
pub const EXIT_CANNOT_RUN: u8 = 126;
/// Exit status when the command does not exist.
pub const EXIT_NOT_FOUND: u8 = 127;

/// `program args` behind a gate: gpuproc itself, which runs them once the gate opens.
/// Start it with [`spawn`].
pub fn command<I, S>(program: impl AsRef<OsStr>, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new("/proc/self/exe");
    command.arg(program).args(args);
    command
}

/// The starter's end of a gate: [`open`](Self::open) lets the command run; dropping it
/// closes the gate, and the gated process exits with [`EXIT_GATE_CLOSED`].
#[derive(Debug)]
pub struct Gate {
    writer: OwnedFd,
}

impl Gate {
    /// Lets the gated process run its command.
    ///
    /// # Errors
    /// When the gated process is gone (it cannot run the command any more).
    pub fn open(self) -> io::Result<()> {
        match rustix::io::write(&self.writer, b"\n") {
            Ok(1) => Ok(()),
            Ok(_) => Err(io::Error::new(io::ErrorKind::WriteZero, "gate pipe")),
            Err(e) => Err(e.into()),
        }
    }
}

/// Starts `command` (normally from [`command`]) with a closed gate: its process exists,
/// and can be made a lease holder, but runs nothing until [`Gate::open`].
///
/// # Errors
/// When the pipe or the process cannot be created.
pub fn spawn(command: &mut Command) -> io::Result<(Child, Gate)> {
    // Close-on-exec in this process, so no other child inherits either end; only the gated
    // child keeps the read end, by clearing the flag between fork and exec.
    let (reader, writer) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let fd = reader.as_raw_fd();
    command.env(ENV, fd.to_string());
    // SAFETY: between fork and exec the closure makes one async-signal-safe system call
    // (fcntl) on a descriptor this process owns until after the spawn.
    unsafe {
        command.pre_exec(move || {
            let fd = BorrowedFd::borrow_raw(fd);
            Ok(rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?)
        });
    }
    let child = command.spawn()?;
    drop(reader);
    Ok((child, Gate { writer }))
}

/// If this process is a gate, waits for it to open and becomes the command (or exits with
/// 126/127 and a message if it cannot run it, [`EXIT_GATE_CLOSED`] if the gate closed).
/// Returns when this process is not a gate. Call it first thing in `main`.
pub fn gate_if_asked() {
    let Some(fd) = std::env::var(ENV).ok().and_then(|v| v.parse::<i32>().ok()) else {
        return;
    };
    std::env::remove_var(ENV);
    // A gate's descriptor is a pipe; anything else (a stray variable naming an unrelated
    // descriptor) is not adopted, and this process is not a gate.
    if fd < 0 {
        return;
    }
    // SAFETY: the descriptor is only inspected here; fstat on a closed number fails.
    let is_pipe = rustix::fs::fstat(unsafe { BorrowedFd::borrow_raw(fd) })
        .is_ok_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_fifo());
    if !is_pipe {
        return;
    }
    // SAFETY: the starter passed this pipe to us for this purpose; nothing else in this
    // process uses it.
    let gate = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut byte = [0u8; 1];
    let opened = loop {
        match rustix::io::read(&gate, &mut byte) {
            Err(rustix::io::Errno::INTR) => continue,
            other => break matches!(other, Ok(1)),
        }
    };
    if !opened {
        std::process::exit(EXIT_GATE_CLOSED.into());
    }
    drop(gate);
    let mut args = std::env::args_os().skip(1);
    let Some(program) = args.next() else {
        std::process::exit(EXIT_CANNOT_RUN.into())
    };
    let e = Command::new(&program).args(args).exec();
    let code = if e.kind() == io::ErrorKind::NotFound {
        EXIT_NOT_FOUND
    } else {
        EXIT_CANNOT_RUN
    };
    let _ = writeln!(
        io::stderr(),
        "gpuproc: cannot run {}: {e}",
        program.to_string_lossy()
    );
    std::process::exit(code.into());
}
