//! The child's side: receive the call, run the target, catch its panic, report, exit.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
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
    /// The parent is on another machine: a watcher thread waits for the (non-blocking)
    /// connection to it to be hung up.
    Hangup,
}

impl ParentWatch {
    pub(crate) fn as_env(self) -> &'static str {
        match self {
            ParentWatch::DeathSignal => "signal",
            ParentWatch::EofWatcher | ParentWatch::Hangup => "eof",
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
    run_call(ctrl, frame, watch)
}

/// Runs in a process started on another machine through a launcher (see
/// `process::remote`): runs the encoded [`Call`] that came over `conn`, the authenticated
/// connection to its relay, and reports on it as a local child reports on its control
/// socket. Never returns; the process ends when the connection does.
pub(crate) fn serve_remote_call(conn: OwnedFd, call: Vec<u8>) -> ! {
    ON_ANOTHER_MACHINE.store(true, Ordering::SeqCst);
    let frame = ipc::Frame {
        bytes: call,
        fds: Vec::new(),
    };
    run_call(conn, frame, ParentWatch::Hangup)
}

/// Set in a process that runs a call for a parent on another machine.
static ON_ANOTHER_MACHINE: AtomicBool = AtomicBool::new(false);

/// Whether this process runs a call for a parent on another machine (its result must not
/// hold descriptors).
pub(crate) fn on_another_machine() -> bool {
    ON_ANOTHER_MACHINE.load(Ordering::SeqCst)
}

/// The control socket of the call this process runs (-1: none), for a target that
/// reports itself (the relay of a process on another machine).
static CONTROL_FD: AtomicI32 = AtomicI32::new(-1);

/// Records `ctrl` as the socket the running call reports on; it must stay open until the
/// process exits.
pub(crate) fn set_control_socket(ctrl: &OwnedFd) {
    CONTROL_FD.store(ctrl.as_raw_fd(), Ordering::SeqCst);
}

/// The control socket of the call this process runs, if it runs one.
pub(crate) fn control_socket() -> Option<BorrowedFd<'static>> {
    let raw = CONTROL_FD.load(Ordering::SeqCst);
    // SAFETY: `set_control_socket` was given a socket that stays open until the process
    // exits (the one `serve_call` or a forked child owns and never drops).
    (raw >= 0).then(|| unsafe { BorrowedFd::borrow_raw(raw) })
}

fn run_call(ctrl: OwnedFd, frame: ipc::Frame, watch: ParentWatch) -> ! {
    set_control_socket(&ctrl);
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
    report_exit_code_on(&ctrl);
    match watch {
        ParentWatch::EofWatcher => watch_parent(&ctrl),
        ParentWatch::Hangup => watch_hangup(&ctrl),
        ParentWatch::DeathSignal => {}
    }
    // SAFETY: the parent computed this offset from a `Trampoline` in this same executable image
    // (a fork of it, or an exec of its /proc/self/exe); see `wire`'s module docs.
    let trampoline: Trampoline =
        unsafe { std::mem::transmute::<usize, Trampoline>(wire::address_of(call.trampoline)) };
    let target = wire::address_of(call.target);
    let outcome = run_catching(|| trampoline(target, &call.args, frame.fds));
    report_and_exit(&ctrl, outcome)
}

/// The control socket the exit handler reports on (-1: none).
static EXIT_REPORT_FD: AtomicI32 = AtomicI32::new(-1);

/// Makes a call to `exit` (not the `_exit` that ends a reported call) send its exit code to
/// the parent first, so that the parent knows it even when no fork server reaps the child
/// (the server was killed after the child had called `exit`).
fn report_exit_code_on(ctrl: &OwnedFd) {
    EXIT_REPORT_FD.store(ctrl.as_raw_fd(), Ordering::SeqCst);
    sys::on_exit(report_exit_code);
}

extern "C" fn report_exit_code(code: libc::c_int, _: *mut libc::c_void) {
    let raw = EXIT_REPORT_FD.swap(-1, Ordering::SeqCst);
    if raw < 0 {
        return;
    }
    // SAFETY: `raw` is the control socket `serve_call` owns; `serve_call` never returns or
    // drops it, so it is open while the process exits.
    let ctrl = unsafe { BorrowedFd::borrow_raw(raw) };
    if let Ok(bytes) = crate::codec::to_vec(&ChildMsg::Exiting(code)) {
        let _ = ipc::send_frame(ctrl, &bytes, &[]);
    }
}

/// How many parent-watch threads this process runs (see [`watch_parent`]).
static WATCHERS: AtomicUsize = AtomicUsize::new(0);

/// The threads of this process that gpuproc started to watch its parent. They only ever
/// block in `read` on a socket, holding no lock, so forking while they run is safe:
/// `StartMethod::Fork` does not count them as "other threads".
pub(crate) fn watcher_threads() -> usize {
    WATCHERS.load(Ordering::SeqCst)
}

/// In a forked child: the parent's watcher threads were not copied.
pub(crate) fn forget_watchers() {
    WATCHERS.store(0, Ordering::SeqCst);
}

/// Starts a thread that kills this process when the parent closes the control socket, and
/// returns once it is waiting (so that a fork right after never copies it half-started).
pub(crate) fn watch_parent(ctrl: &OwnedFd) {
    if let Ok(dup) = sys::dup(ctrl.as_fd()) {
        let (ready, started) = std::sync::mpsc::sync_channel::<()>(1);
        let spawned = std::thread::Builder::new()
            .name("gpuproc-parent-watch".into())
            .spawn(move || {
                let _ = ready.send(());
                drop(ready);
                sys::wait_for_eof(dup.as_fd());
                sys::kill_self()
            });
        if spawned.is_ok() && started.recv().is_ok() {
            WATCHERS.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Starts a thread that kills this process when its connection to a parent on another
/// machine is hung up (the parent, its relay or the network is gone).
fn watch_hangup(conn: &OwnedFd) {
    if let Ok(dup) = sys::dup(conn.as_fd()) {
        let _ = std::thread::Builder::new()
            .name("gpuproc-parent-watch".into())
            .spawn(move || {
                if sys::wait_for_hangup(dup.as_fd()) {
                    sys::kill_self()
                }
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

/// Sends the outcome to the parent, flushes standard output and error, and exits: with 0
/// when the target returned, with 1 when it failed (a panic, as Python's uncaught
/// exception) or the report could not be sent.
///
/// The exit is `_exit`, at once: other threads the target started end with the process,
/// without running; `atexit` handlers and destructors of statics do not run.
pub(crate) fn report_and_exit(ctrl: &OwnedFd, outcome: Outcome) -> ! {
    let failed = outcome.is_err();
    let (msg, fds) = match outcome {
        Ok((bytes, fds)) => (ChildMsg::Returned(bytes), fds),
        Err(f) => (ChildMsg::Failed(f), Vec::new()),
    };
    let sent = crate::codec::to_vec(&msg)
        .map_err(std::io::Error::other)
        .and_then(|bytes| ipc::send_frame(ctrl.as_fd(), &bytes, &fds));
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    sys::exit_now(if sent.is_ok() && !failed { 0 } else { 1 })
}
