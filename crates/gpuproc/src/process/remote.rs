//! A [`Process`](super::Process) whose target runs on another machine, started through a
//! [`Launcher`] (a Slurm step, `ssh host`, ...).
//!
//! How: the process is started here as a *relay*, a local child like any other (so its
//! handle, `join`, `is_alive`, `exitcode`, `terminate`, `kill` and the sentinel work
//! unchanged). The relay starts the launcher's command for the remote process and checks
//! it exactly as a pool's relay checks a remote worker (the key on standard input, the
//! mutual HMAC handshake, the build id: see `pool::remote`), then hands it the encoded call
//! that a local child would have got. The remote process runs it as a local child does
//! (`child::serve_remote_call`) and reports on the connection; the relay passes every
//! report on to this process unchanged and then exits with the code the remote process
//! exited with (0 after a result, 1 after a panic, the code given to `exit`).
//!
//! When the remote process is lost before it reported (its step was cancelled, its node
//! died, it was killed, the connection dropped), or cannot be started, the relay reports
//! that (`ChildMsg::Lost`: `ProcessError::WorkerLost` or `ProcessError::LaunchFailed`) and
//! exits with [`LOST_EXITCODE`]. Killing the relay (`terminate`, `kill`, or this process's
//! death) sends SIGTERM to the launcher's command (`srun` then cancels its step, `ssh`
//! closes the connection) and closes the connection, which the remote process watches:
//! it ends as soon as its connection does.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use serde::{Deserialize, Serialize};

use super::child;
use super::wire::ChildMsg;
use crate::ipc::{self, FrameReader};
use crate::pool::remote::{end_launcher, start_remote, Launcher, Start, Started, KEEPALIVE};
use crate::sys;

/// The exit code of a process on another machine that could not be started or was lost
/// before it reported (as `ssh` exits with 255 when its connection fails).
pub const LOST_EXITCODE: i32 = 255;

/// What the relay is given: how to start the remote process, and its encoded call.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RelayArgs {
    pub launcher: Launcher,
    pub call: Vec<u8>,
}

/// The relay's target: never returns (it exits with the remote process's code).
pub(crate) fn relay(args: RelayArgs) {
    let Some(ctrl) = child::control_socket() else {
        sys::exit_now(1)
    };
    let code = run(ctrl, args);
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    sys::exit_now(code)
}

fn report(ctrl: BorrowedFd<'_>, msg: &ChildMsg) {
    if let Ok(bytes) = crate::codec::to_vec(msg) {
        let _ = ipc::send_frame(ctrl, &bytes, &[]);
    }
}

fn run(ctrl: BorrowedFd<'_>, args: RelayArgs) -> i32 {
    let Started {
        conn,
        launcher: mut child,
        node,
        pid,
        ..
    } = match start_remote(&args.launcher, Start::Call(args.call)) {
        Ok(started) => started,
        Err(reason) => {
            report(ctrl, &ChildMsg::Lost { node: None, reason });
            return LOST_EXITCODE;
        }
    };
    report(
        ctrl,
        &ChildMsg::RunsOn {
            node: node.clone(),
            pid,
        },
    );
    let remote = conn.into_fd();
    // A node that dies, or a network that drops, sends nothing: keep-alive probes find it.
    let _ = sys::set_keepalive(remote.as_fd(), KEEPALIVE);
    let (code, error) = pass_reports(&remote, ctrl);
    drop(remote);
    let status = end_launcher(&mut child);
    if let Some(code) = code {
        return code;
    }
    let reason = lost_reason(status.map(|s| (s.success(), s.to_string())), error);
    report(
        ctrl,
        &ChildMsg::Lost {
            node: Some(node),
            reason,
        },
    );
    LOST_EXITCODE
}

/// Why a remote process that never reported was lost: how its launcher ended (`(success,
/// description)`, when known) says more than what the connection saw (a reset, say).
fn lost_reason(launcher: Option<(bool, String)>, connection: Option<String>) -> String {
    match (launcher, connection) {
        (Some((false, s)), Some(e)) => format!("its launcher ended: {s} ({e})"),
        (Some((false, s)), None) => format!("its launcher ended: {s}"),
        (_, Some(e)) => e,
        (Some((true, _)), None) => {
            "its connection ended before it reported, and its launcher exited with 0".into()
        }
        (None, None) => "its connection ended before it reported".into(),
    }
}

/// Passes the remote process's reports on to this process's parent until its connection
/// ends. Returns the exit code its reports imply (`None`: it never reported how it ended)
/// and what went wrong with the connection, if anything.
fn pass_reports(remote: &OwnedFd, ctrl: BorrowedFd<'_>) -> (Option<i32>, Option<String>) {
    let mut reader = FrameReader::default();
    let mut code = None;
    loop {
        loop {
            let (bytes, _) = match reader.next_frame_ref() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => return (code, Some(format!("a malformed message: {e}"))),
            };
            match ipc::decode::<ChildMsg>(bytes, Vec::new()) {
                Ok(ChildMsg::Returned(_)) => code = Some(0),
                Ok(ChildMsg::Failed(_)) => code = Some(1),
                Ok(ChildMsg::Exiting(c)) => code = Some(c),
                // Only the relay says these.
                Ok(ChildMsg::Exited(_) | ChildMsg::RunsOn { .. } | ChildMsg::Lost { .. }) => {
                    continue
                }
                Err(e) => return (code, Some(format!("a malformed message: {e}"))),
            }
            if let Err(e) = ipc::send_frame(ctrl, bytes, &[]) {
                return (code, Some(format!("passing its report on: {e}")));
            }
        }
        if reader.at_eof() {
            return (code, None);
        }
        if let Err(e) = reader.wait_and_fill(remote.as_fd()) {
            return (code, Some(format!("the connection was lost: {e}")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_process_is_explained_by_its_launcher_first() {
        let killed = Some((false, "signal: 9 (SIGKILL)".to_string()));
        assert_eq!(
            lost_reason(
                killed.clone(),
                Some("the connection was lost: reset".into())
            ),
            "its launcher ended: signal: 9 (SIGKILL) (the connection was lost: reset)"
        );
        assert_eq!(
            lost_reason(killed, None),
            "its launcher ended: signal: 9 (SIGKILL)"
        );
        assert_eq!(
            lost_reason(Some((true, "exit status: 0".into())), Some("reset".into())),
            "reset"
        );
        assert!(lost_reason(Some((true, "exit status: 0".into())), None).contains("exited with 0"));
        assert!(lost_reason(None, None).contains("before it reported"));
    }
}
