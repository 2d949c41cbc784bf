//! The error type for starting, joining and signalling processes.

use std::io;
use std::time::Duration;

use crate::gpu::PickError;
use crate::sys::signal_name;

/// Why a process could not be started, or produced no result.
///
/// A child's panic, exit code and fatal signal are data here, never a hang: see
/// [`is_panic`](Self::is_panic), [`exitcode`](Self::exitcode) and friends.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    /// The target panicked in the child.
    #[error("process {name:?} panicked{}: {message}", location.as_deref().map(|l| format!(" at {l}")).unwrap_or_default())]
    Panicked {
        /// The process's name.
        name: String,
        /// The panic message.
        message: String,
        /// `file:line:column` of the panic, when known.
        location: Option<String>,
        /// The child's backtrace, when `RUST_BACKTRACE` asked for one.
        backtrace: Option<String>,
    },
    /// The child was killed by a signal before it returned a result.
    #[error("process {name:?} (pid {pid}) was killed by signal {signal} ({})", signal_name(*signal))]
    Killed {
        /// The process's name.
        name: String,
        /// Its pid.
        pid: u32,
        /// The signal number.
        signal: i32,
    },
    /// The child exited before it returned a result (for example through `std::process::exit`).
    #[error("process {name:?} (pid {pid}) exited with code {code} before returning a result")]
    Exited {
        /// The process's name.
        name: String,
        /// Its pid.
        pid: u32,
        /// The exit code.
        code: i32,
    },
    /// A process started through a [`Launcher`](crate::Launcher) was lost on its node before
    /// it reported: its Slurm step was cancelled, it or its node was killed, or the
    /// connection dropped. Its [`exitcode`](crate::Process::exitcode) is
    /// [`LOST_EXITCODE`](crate::LOST_EXITCODE).
    #[error("process {name:?} was lost on {node}: {reason}")]
    WorkerLost {
        /// The process's name.
        name: String,
        /// The node it ran on.
        node: String,
        /// What happened: how its launcher ended, or what the connection saw.
        reason: String,
    },
    /// A process could not be started through its [`Launcher`](crate::Launcher): the
    /// launcher's command failed, the process did not connect back in time, it runs
    /// another build, or GPUs were asked in a way the launcher cannot give. Its
    /// [`exitcode`](crate::Process::exitcode), once started, is
    /// [`LOST_EXITCODE`](crate::LOST_EXITCODE).
    #[error("process {name:?} could not be started through its launcher: {reason}")]
    LaunchFailed {
        /// The process's name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The argument could not be decoded in the child as the target's argument type.
    #[error("process {name:?} could not decode its argument as `{type_name}`: {reason}")]
    BadArgument {
        /// The process's name.
        name: String,
        /// The target's argument type.
        type_name: String,
        /// What the decoder said.
        reason: String,
    },
    /// The argument could not be encoded in the parent.
    #[error("cannot encode the argument of process {name:?} (`{type_name}`): {reason}")]
    Encode {
        /// The process's name.
        name: String,
        /// The argument type.
        type_name: String,
        /// What the encoder said.
        reason: String,
    },
    /// The result could not be encoded in the child or decoded in the parent.
    #[error("the result of process {name:?} (`{type_name}`) could not be transferred: {reason}")]
    BadResult {
        /// The process's name.
        name: String,
        /// The target's result type.
        type_name: String,
        /// What the encoder or decoder said.
        reason: String,
    },
    /// `join_timeout` gave up; the process runs on and can be joined again.
    #[error("process {name:?} is still running after {waited:?}")]
    Timeout {
        /// The process's name.
        name: String,
        /// How long the call waited.
        waited: Duration,
    },
    /// `start` was called on a process that was already started.
    #[error("process {name:?} cannot be started twice")]
    AlreadyStarted {
        /// The process's name.
        name: String,
    },
    /// `join` was called before `start`.
    #[error("process {name:?} can only be joined after it is started")]
    NotStarted {
        /// The process's name.
        name: String,
    },
    /// `join` was called again after it returned the result.
    #[error("process {name:?} was already joined and its result taken")]
    AlreadyJoined {
        /// The process's name.
        name: String,
    },
    /// The process was closed with [`Process::close`](crate::Process::close) and cannot be
    /// used any more; Python's `ValueError: process object is closed`.
    #[error("process {name:?} is closed: it cannot be used after Process::close")]
    Closed {
        /// The process's name.
        name: String,
    },
    /// [`Process::close`](crate::Process::close) was called while the process runs;
    /// Python's `ValueError: Cannot close a process while it is still running`.
    #[error("process {name:?} is still running: join, terminate or kill it before closing it")]
    StillRunning {
        /// The process's name.
        name: String,
    },
    /// The `Fork` start method was refused because this process has other threads.
    #[error(
        "refusing to fork: this process has {threads} threads, and a forked child of a \
         multi-threaded process can deadlock; use StartMethod::ForkServer or Spawn, or \
         allow it with Process::allow_fork_with_threads(true)"
    )]
    ForkUnsafe {
        /// How many threads the process had.
        threads: usize,
    },
    /// A start method that re-runs this executable was used, but the executable never
    /// called [`init`](crate::init).
    #[error(
        "the {method} start method re-runs this executable, which must call gpuproc::init() \
         at the top of main (or gpuproc::enable_test_support!() in tests); \
         StartMethod::Fork works without it"
    )]
    NotInitialized {
        /// The start method that was asked for.
        method: &'static str,
    },
    /// The target (or its trampoline) is not in the same loaded object as gpuproc, so the
    /// child could not find it: a function from a dynamically loaded library or plugin.
    #[error(
        "the target of process {name:?} lives in another loaded object ({object}) than \
         gpuproc's code, so a re-run child cannot find it; use a function compiled into the \
         executable (wrap the library's function in one), or StartMethod::Fork"
    )]
    ForeignTarget {
        /// The process's name.
        name: String,
        /// Which object: `"a shared library"` or `"no loaded object"`.
        object: &'static str,
    },
    /// A daemonic process tried to start a child (as in Python, they may not).
    #[error("daemonic processes are not allowed to have children")]
    DaemonChildren,
    /// The fork server stopped answering.
    #[error("the fork server failed: {reason}")]
    ForkServer {
        /// What went wrong.
        reason: String,
    },
    /// The GPUs asked for with [`Process::with_gpus`](crate::Process::with_gpus) (or its
    /// siblings) could not be picked; the process was not started.
    #[error("process {name:?} could not get its GPUs")]
    Gpu {
        /// The process's name.
        name: String,
        /// Why: [`PickError::is_none_free`] when too few GPUs qualify.
        #[source]
        source: PickError,
    },
    /// A system call failed.
    #[error("{context}")]
    Io {
        /// What gpuproc was doing.
        context: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

impl ProcessError {
    pub(crate) fn io(context: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| ProcessError::Io { context, source }
    }

    /// The target panicked.
    pub fn is_panic(&self) -> bool {
        matches!(self, ProcessError::Panicked { .. })
    }

    /// The child was killed by a signal.
    pub fn is_killed(&self) -> bool {
        matches!(self, ProcessError::Killed { .. })
    }

    /// A `join_timeout` expired.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ProcessError::Timeout { .. })
    }

    /// The process was used after [`Process::close`](crate::Process::close) (Python's
    /// `ValueError: process object is closed`).
    pub fn is_closed(&self) -> bool {
        matches!(self, ProcessError::Closed { .. })
    }

    /// The child ended without a result: Python's `exitcode` (negative signal number when
    /// killed; [`LOST_EXITCODE`](crate::LOST_EXITCODE) for a process on another machine that
    /// was lost or could not be started), or `None` for other errors.
    pub fn exitcode(&self) -> Option<i32> {
        match self {
            ProcessError::Killed { signal, .. } => Some(-signal),
            ProcessError::Exited { code, .. } => Some(*code),
            ProcessError::WorkerLost { .. } | ProcessError::LaunchFailed { .. } => {
                Some(super::LOST_EXITCODE)
            }
            _ => None,
        }
    }

    /// A process on another machine was lost before it reported
    /// ([`ProcessError::WorkerLost`]) or could not be started there
    /// ([`ProcessError::LaunchFailed`]).
    pub fn is_lost(&self) -> bool {
        matches!(
            self,
            ProcessError::WorkerLost { .. } | ProcessError::LaunchFailed { .. }
        )
    }

    /// The signal that killed the child, if that is what happened.
    pub fn signal(&self) -> Option<i32> {
        match self {
            ProcessError::Killed { signal, .. } => Some(*signal),
            _ => None,
        }
    }

    /// Why the process's GPUs could not be picked, if that is what happened.
    pub fn gpu_error(&self) -> Option<&PickError> {
        match self {
            ProcessError::Gpu { source, .. } => Some(source),
            _ => None,
        }
    }

    /// The panic message, if the target panicked.
    pub fn panic_message(&self) -> Option<&str> {
        match self {
            ProcessError::Panicked { message, .. } => Some(message),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_happened() {
        let e = ProcessError::Killed {
            name: "w".into(),
            pid: 7,
            signal: 9,
        };
        assert_eq!(
            e.to_string(),
            "process \"w\" (pid 7) was killed by signal 9 (SIGKILL)"
        );
        assert_eq!(e.exitcode(), Some(-9));
        assert!(e.is_killed());
        let e = ProcessError::Panicked {
            name: "w".into(),
            message: "boom".into(),
            location: Some("src/x.rs:1:2".into()),
            backtrace: None,
        };
        assert_eq!(
            e.to_string(),
            "process \"w\" panicked at src/x.rs:1:2: boom"
        );
        assert_eq!(e.panic_message(), Some("boom"));
    }
}
