//! The child's side: receive the call, run the target, catch its panic, report, exit.

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Mutex, Once};

use super::wire::{self, Call, ChildMsg, Failure, Outcome, Trampoline};
use crate::ipc::{self, FrameReader, Read};
use crate::sys;

/// How a child learns that its parent died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ParentWatch {
    /// `PR_SET_PDEATHSIG` is set and reliable: the parent's starting thread lives as long as
    /// the parent (its main thread, or the single-threaded fork server).
    DeathSignal,
    /// The starting thread may exit before the parent does, so a watcher thread waits for
    /// EOF on the control socket instead.
    EofWatcher,
}

impl ParentWatch {
    pub(crate) fn as_env(self) -> &'static str {
        match self {
            ParentWatch::DeathSignal => "signal",
            ParentWatch::EofWatcher => "eof",
        }
    }

    pub(crate) fn from_env(s: &str) -> Self {
        if s == "signal" {
            ParentWatch::DeathSignal
        } else {
            ParentWatch::EofWatcher
        }
    }
}

/// Runs in a spawned or fork-server child: waits for the [`Call`], runs it, never returns.
pub(crate) fn serve_call(ctrl: OwnedFd, watch: ParentWatch) -> ! {
    let mut reader = FrameReader::default();
    let frame = match reader.read(ctrl.as_fd(), None) {
        Ok(Read::Frame(f)) => f,
        // The parent went away before sending the call: nothing to do.
        _ => sys::exit_now(1),
    };
    let call: Call = match ipc::decode(&frame.bytes, Vec::new()) {
        Ok(c) => c,
        Err(e) => {
            let failure = Failure::BadArgument {
                type_name: "gpuproc call".into(),
                reason: e.to_string(),
            };
            report_and_exit(&ctrl, Err(failure))
        }
    };
    super::enter_child(&call.identity, &call.env);
    if watch == ParentWatch::EofWatcher {
        watch_parent(&ctrl);
    }
    // SAFETY: the parent computed this offset from a `Trampoline` in this same executable image
    // (a fork of it, or an exec of its /proc/self/exe); see `wire`'s module docs.
    let trampoline: Trampoline =
        unsafe { std::mem::transmute::<usize, Trampoline>(wire::address_of(call.trampoline)) };
    let target = wire::address_of(call.target);
    let outcome = run_catching(|| trampoline(target, &call.args, frame.fds));
    report_and_exit(&ctrl, outcome)
}

/// Starts a thread that kills this process when the parent closes the control socket.
pub(crate) fn watch_parent(ctrl: &OwnedFd) {
    if let Ok(dup) = sys::dup(ctrl.as_fd()) {
        let _ = std::thread::Builder::new()
            .name("gpuproc-parent-watch".into())
            .spawn(move || {
                sys::wait_for_eof(dup.as_fd());
                sys::kill_self()
            });
    }
}

#[derive(Debug)]
struct PanicReport {
    message: String,
    location: Option<String>,
    backtrace: Option<String>,
}

static LAST_PANIC: Mutex<Option<PanicReport>> = Mutex::new(None);
static HOOK: Once = Once::new();

/// Runs `f`, turning a panic into [`Failure::Panicked`] with its message and location.
/// The default hook still prints the panic on this process's stderr, as Python prints a
/// child's traceback.
pub(crate) fn run_catching<T>(f: impl FnOnce() -> Result<T, Failure>) -> Result<T, Failure> {
    HOOK.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "Box<dyn Any>".to_string());
            let location = info
                .location()
                .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
            let bt = std::backtrace::Backtrace::capture();
            let backtrace =
                (bt.status() == std::backtrace::BacktraceStatus::Captured).then(|| bt.to_string());
            if let Ok(mut last) = LAST_PANIC.lock() {
                *last = Some(PanicReport {
                    message,
                    location,
                    backtrace,
                });
            }
            default(info);
        }));
    });
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(outcome) => outcome,
        Err(_) => {
            let report = LAST_PANIC.lock().ok().and_then(|mut l| l.take());
            let report = report.unwrap_or(PanicReport {
                message: "panic payload lost".into(),
                location: None,
                backtrace: None,
            });
            Err(Failure::Panicked {
                message: report.message,
                location: report.location,
                backtrace: report.backtrace,
            })
        }
    }
}

/// Sends the outcome to the parent, flushes standard output and error, and exits with 0.
pub(crate) fn report_and_exit(ctrl: &OwnedFd, outcome: Outcome) -> ! {
    let (msg, fds) = match outcome {
        Ok((bytes, fds)) => (ChildMsg::Returned(bytes), fds),
        Err(f) => (ChildMsg::Failed(f), Vec::new()),
    };
    let sent = postcard::to_stdvec(&msg)
        .map_err(std::io::Error::other)
        .and_then(|bytes| ipc::send_frame(ctrl.as_fd(), &bytes, &fds));
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    sys::exit_now(if sent.is_ok() { 0 } else { 1 })
}
