//! The error type for pools and their tasks.

use std::io;
use std::time::Duration;

use crate::process::ProcessError;
use crate::sys::{signal_name, ExitStatus};

/// Why a pool task produced no result, or why the pool could not do what was asked.
///
/// Errors about one task carry its index in the input ([`index`](Self::index)).
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// The task panicked; the worker survived.
    #[error("task {index} panicked{}: {message}", location.as_deref().map(|l| format!(" at {l}")).unwrap_or_default())]
    Panicked {
        /// The task's index.
        index: u64,
        /// The panic message.
        message: String,
        /// `file:line:column` of the panic.
        location: Option<String>,
    },
    /// The worker running the task died (killed by a signal, `exit`, out of memory).
    #[error("task {index} was running in worker pid {pid} when it {}", describe(*status))]
    WorkerDied {
        /// The task's index.
        index: u64,
        /// The worker's pid.
        pid: u32,
        /// How the worker ended.
        status: ExitStatus,
    },
    /// The task was sent to a worker on another machine (see
    /// [`PoolBuilder::launcher`](super::PoolBuilder::launcher)) that was lost before
    /// reporting it: its process ended, its Slurm step was cancelled, its node or the
    /// network failed. Every task in flight on that worker fails so (or runs again, with
    /// [`retries`](super::PoolBuilder::retries)); the worker is replaced.
    #[error("task {index} was in flight on the worker on {node}, which was lost: {reason}")]
    WorkerLost {
        /// The task's index.
        index: u64,
        /// The worker's host name.
        node: String,
        /// What happened to it.
        reason: String,
    },
    /// The task ran longer than the pool's task timeout; its worker was killed and replaced.
    #[error(
        "task {index} did not finish within the task timeout of {timeout:?}; its worker was killed"
    )]
    TimedOut {
        /// The task's index.
        index: u64,
        /// The pool's task timeout.
        timeout: Duration,
    },
    /// The task's argument could not be decoded in the worker.
    #[error("task {index}: could not decode the argument as `{type_name}`: {reason}")]
    BadArgument {
        /// The task's index.
        index: u64,
        /// The argument type.
        type_name: String,
        /// What the decoder said.
        reason: String,
    },
    /// The task's argument could not be encoded.
    #[error("task {index}: cannot encode the argument (`{type_name}`): {reason}")]
    Encode {
        /// The task's index.
        index: u64,
        /// The argument type.
        type_name: String,
        /// What the encoder said.
        reason: String,
    },
    /// The task's result could not be transferred back.
    #[error("task {index}: the result (`{type_name}`) could not be transferred: {reason}")]
    BadResult {
        /// The task's index.
        index: u64,
        /// The result type.
        type_name: String,
        /// What the encoder or decoder said.
        reason: String,
    },
    /// The task was not run: the pool's initializer failed in every worker started for it,
    /// several times running, so the pool stopped starting workers.
    #[error("task {index} was not run: the pool's initializer failed in every worker: {message}")]
    InitializerFailed {
        /// The task's index.
        index: u64,
        /// How the initializer failed (its panic message, say).
        message: String,
    },
    /// The task was not run: the pool has no worker left, and none could be started.
    #[error("task {index} was not run: the pool has no worker and cannot start one: {reason}")]
    NoWorker {
        /// The task's index.
        index: u64,
        /// Why the last attempt to start a worker failed.
        reason: String,
    },
    /// The pool was terminated before the task finished.
    #[error("task {index} was cancelled: the pool was terminated")]
    Terminated {
        /// The task's index.
        index: u64,
    },
    /// The pool is closed (or terminated) and takes no new tasks.
    #[error("the pool is closed and takes no new tasks")]
    Closed,
    /// A wait with a timeout gave up; the task or pool goes on.
    #[error("not ready after {waited:?}")]
    Timeout {
        /// How long the call waited.
        waited: Duration,
    },
    /// The result was already taken by an earlier `get`.
    #[error("the result was already taken")]
    AlreadyTaken,
    /// GPUs for the workers could not be picked, or read.
    #[error(transparent)]
    Gpu(crate::gpu::PickError),
    /// A worker process could not be started.
    #[error("cannot start a pool worker")]
    Start(#[source] ProcessError),
    /// A pool setting has a value the pool cannot work with (Python raises `ValueError`).
    #[error("{setting}({value}) is invalid: {expected}")]
    InvalidArgument {
        /// The builder method or argument, e.g. `processes`.
        setting: &'static str,
        /// The value given.
        value: String,
        /// What is expected instead.
        expected: &'static str,
    },
    /// The pool's driver thread (which owns the workers) panicked: every task pending then
    /// and every later one fails with this, and the workers were killed.
    #[error(
        "the pool's driver thread panicked ({message}); its workers were killed and it takes \
         no tasks: build a new pool"
    )]
    DriverDied {
        /// The panic message.
        message: String,
    },
    /// The `Fork` start method was refused because this process has other threads (see
    /// [`PoolBuilder::allow_fork_with_threads`](crate::pool::PoolBuilder::allow_fork_with_threads)).
    #[error(
        "refusing to fork pool workers: this process has {threads} threads, and a forked child \
         of a multi-threaded process can deadlock; use StartMethod::ForkServer or Spawn, or \
         allow it with PoolBuilder::allow_fork_with_threads(true)"
    )]
    ForkUnsafe {
        /// How many threads the process had, besides the pool's own.
        threads: usize,
    },
    /// The task's function (or the initializer) lives in another loaded object (a shared
    /// library, a plugin) than gpuproc's code, so a worker that is not a fork cannot find it.
    #[error(
        "the pool's function lives in another loaded object ({object}) than gpuproc's code, \
         so a worker cannot find it; use a function compiled into the executable (wrap the \
         library's function in one), or StartMethod::Fork"
    )]
    ForeignTarget {
        /// Which object: `"a shared library"` or `"no loaded object"`.
        object: &'static str,
    },
    /// A system call failed.
    #[error("{context}")]
    Io {
        /// What the pool was doing.
        context: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

fn describe(status: ExitStatus) -> String {
    match status {
        ExitStatus::Signal(s) => format!("was killed by signal {s} ({})", signal_name(s)),
        ExitStatus::Code(c) => format!("exited with code {c}"),
    }
}

impl PoolError {
    /// The index of the task this error is about, if it is about one.
    pub fn index(&self) -> Option<u64> {
        match self {
            PoolError::Panicked { index, .. }
            | PoolError::WorkerDied { index, .. }
            | PoolError::WorkerLost { index, .. }
            | PoolError::TimedOut { index, .. }
            | PoolError::BadArgument { index, .. }
            | PoolError::Encode { index, .. }
            | PoolError::BadResult { index, .. }
            | PoolError::InitializerFailed { index, .. }
            | PoolError::NoWorker { index, .. }
            | PoolError::Terminated { index } => Some(*index),
            _ => None,
        }
    }

    /// The task was not run because the pool's initializer kept failing.
    pub fn is_initializer_failed(&self) -> bool {
        matches!(self, PoolError::InitializerFailed { .. })
    }

    /// The task panicked.
    pub fn is_panic(&self) -> bool {
        matches!(self, PoolError::Panicked { .. })
    }

    /// The task's worker died under it (on this machine, or on another: [`PoolError::WorkerLost`]).
    pub fn is_worker_died(&self) -> bool {
        matches!(
            self,
            PoolError::WorkerDied { .. } | PoolError::WorkerLost { .. }
        )
    }

    /// The task exceeded the pool's task timeout.
    pub fn is_task_timeout(&self) -> bool {
        matches!(self, PoolError::TimedOut { .. })
    }

    /// A `get_timeout`/`join_timeout` gave up.
    pub fn is_timeout(&self) -> bool {
        matches!(self, PoolError::Timeout { .. })
    }

    /// A pool setting was invalid (Python's `ValueError`).
    pub fn is_invalid(&self) -> bool {
        matches!(self, PoolError::InvalidArgument { .. })
    }

    /// The pool's driver thread died (see [`PoolError::DriverDied`]).
    pub fn is_driver_died(&self) -> bool {
        matches!(self, PoolError::DriverDied { .. })
    }

    /// `Fork` was refused because the process has other threads.
    pub fn is_fork_unsafe(&self) -> bool {
        matches!(self, PoolError::ForkUnsafe { .. })
    }

    /// The pool was terminated (or closed) under the task.
    pub fn is_terminated(&self) -> bool {
        matches!(self, PoolError::Terminated { .. } | PoolError::Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_death_names_task_signal_and_pid() {
        let e = PoolError::WorkerDied {
            index: 17,
            pid: 4242,
            status: ExitStatus::Signal(9),
        };
        assert_eq!(
            e.to_string(),
            "task 17 was running in worker pid 4242 when it was killed by signal 9 (SIGKILL)"
        );
        assert_eq!(e.index(), Some(17));
        let e = PoolError::WorkerDied {
            index: 3,
            pid: 1,
            status: ExitStatus::Code(3),
        };
        assert!(e.to_string().ends_with("exited with code 3"));
        assert_eq!(PoolError::Closed.index(), None);
    }
}
