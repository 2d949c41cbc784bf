//! What parent, child and fork server say to each other, and how a target crosses over.
//!
//! A target is a plain `fn(A) -> R`. Parent and child run the same executable image (the
//! child is a fork, or an exec of `/proc/self/exe`), so a function's distance from a fixed
//! anchor function is the same in both, whatever the load address: the parent sends that
//! distance for the target and for a monomorphised trampoline that decodes `A`, calls the
//! target and encodes `R`.

use std::any::type_name;
use std::os::fd::OwnedFd;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ipc;
use crate::sys::ExitStatus;

/// The call a child is asked to make.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Call {
    /// Offset of the trampoline from [`anchor`].
    pub trampoline: isize,
    /// Offset of the target from [`anchor`].
    pub target: isize,
    /// The encoded argument; its descriptors ride in the frame.
    pub args: Vec<u8>,
    /// Who the child is and who its parent is.
    pub identity: Identity,
    /// Environment changes to make before the target runs (`None` removes the variable).
    pub env: Vec<(String, Option<String>)>,
}

/// Names and ids a child learns about itself and its parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Identity {
    pub name: String,
    pub daemon: bool,
    pub parent_pid: u32,
    pub parent_name: String,
    /// The start method that started the child (see `StartMethod::to_u8`): the child's own
    /// default, as Python forces it.
    pub start_method: u8,
    /// The child's operating-system process name (`/proc/PID/comm`).
    pub comm: String,
}

/// A message from a child (or, for `Exited`, from the fork server about a child).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ChildMsg {
    /// The target returned; the encoded result (its descriptors ride in the frame).
    Returned(Vec<u8>),
    /// The target did not return a value.
    Failed(Failure),
    /// Sent by the fork server once it has reaped the child.
    Exited(ExitStatus),
    /// Sent by a fork-server child from its exit handler when something calls `exit`
    /// (`std::process::exit`, say): its exit code, known even if the server is gone.
    Exiting(i32),
    /// Sent by the relay of a process started through a launcher once the process on the
    /// other machine has connected: its node and its pid there.
    RunsOn { node: String, pid: u32 },
    /// Sent by the relay of a process started through a launcher when that process could
    /// not be started (`node` is `None`) or was lost before it reported.
    Lost {
        node: Option<String>,
        reason: String,
    },
}

/// Why a child produced no result, as data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Failure {
    /// The target panicked.
    Panicked {
        message: String,
        location: Option<String>,
        backtrace: Option<String>,
    },
    /// The argument could not be decoded as the target's argument type.
    BadArgument { type_name: String, reason: String },
    /// The result could not be encoded.
    BadResult { type_name: String, reason: String },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Panicked {
                message, location, ..
            } => match location {
                Some(l) => write!(f, "panicked at {l}: {message}"),
                None => write!(f, "panicked: {message}"),
            },
            Failure::BadArgument { type_name, reason } => {
                write!(
                    f,
                    "could not decode its argument as `{type_name}`: {reason}"
                )
            }
            Failure::BadResult { type_name, reason } => {
                write!(f, "could not encode its result (`{type_name}`): {reason}")
            }
        }
    }
}

/// A request to the fork server. The frame carries the child's control socket and this
/// process's standard input, output and error, in that order.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ForkRequest {
    pub parent_pid: u32,
    /// The request's number, repeated in the reply (requests are pipelined).
    pub seq: u64,
}

/// The fork server's answer.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ForkReply {
    Forked {
        seq: u64,
        pid: u32,
    },
    /// The server failed (and a new one might not).
    Failed {
        seq: u64,
        reason: String,
    },
    /// The server refuses every request, for a reason a new server would share.
    Refused {
        seq: u64,
        reason: String,
    },
}

impl ForkReply {
    /// The number of the request this answers.
    pub fn seq(&self) -> u64 {
        match self {
            ForkReply::Forked { seq, .. }
            | ForkReply::Failed { seq, .. }
            | ForkReply::Refused { seq, .. } => *seq,
        }
    }
}

/// The fixed point that function offsets are measured from.
#[inline(never)]
pub(crate) fn anchor() {
    std::hint::black_box(());
}

pub(crate) fn offset_of(addr: usize) -> isize {
    (addr as isize).wrapping_sub(anchor as fn() as usize as isize)
}

pub(crate) fn address_of(offset: isize) -> usize {
    (anchor as fn() as usize as isize).wrapping_add(offset) as usize
}

/// What a trampoline produced: an encoded result with its descriptors, or a failure.
pub(crate) type Outcome = Result<(Vec<u8>, Vec<OwnedFd>), Failure>;

/// Decodes `A`, calls the target at `target`, encodes `R`. Panics propagate to the caller.
pub(crate) type Trampoline = fn(target: usize, args: &[u8], fds: Vec<OwnedFd>) -> Outcome;

pub(crate) fn trampoline<A: DeserializeOwned, R: Serialize>(
    target: usize,
    args: &[u8],
    fds: Vec<OwnedFd>,
) -> Outcome {
    let args: A = ipc::decode(args, fds).map_err(|e| Failure::BadArgument {
        type_name: type_name::<A>().to_string(),
        reason: e.to_string(),
    })?;
    // SAFETY: `target` was computed by the parent from a `fn(A) -> R` in this same executable
    // image (see the module docs), and this trampoline was instantiated with the same A and R.
    let f: fn(A) -> R = unsafe { std::mem::transmute::<usize, fn(A) -> R>(target) };
    encode_result(&f(args))
}

/// Encodes a target's result.
pub(crate) fn encode_result<R: Serialize>(r: &R) -> Outcome {
    let fail = |reason: String| Failure::BadResult {
        type_name: type_name::<R>().to_string(),
        reason,
    };
    let (bytes, fds) = ipc::encode(r).map_err(|e| fail(e.to_string()))?;
    if !fds.is_empty() && super::child::on_another_machine() {
        return Err(fail(
            "it holds a descriptor (a queue, lock, pipe or shared memory), which cannot go \
             back from another machine"
                .into(),
        ));
    }
    Ok((bytes, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn double(x: u32) -> u32 {
        x * 2
    }

    #[test]
    fn offsets_round_trip_to_a_callable_target() {
        let t = offset_of(trampoline::<u32, u32> as Trampoline as usize);
        let f = offset_of(double as fn(u32) -> u32 as usize);
        // SAFETY: the offset was taken from a `Trampoline` in this image just above.
        let tr: Trampoline = unsafe { std::mem::transmute::<usize, Trampoline>(address_of(t)) };
        let (args, fds) = ipc::encode(&21u32).unwrap();
        let (out, _) = tr(address_of(f), &args, fds).unwrap();
        assert_eq!(ipc::decode::<u32>(&out, Vec::new()).unwrap(), 42);
    }

    #[test]
    fn bad_argument_names_the_type() {
        let (args, fds) = ipc::encode(&()).unwrap();
        let err = trampoline::<(u64, u64, u64), u32>(0, &args, fds).unwrap_err();
        match err {
            Failure::BadArgument { type_name, .. } => assert!(type_name.contains("u64")),
            other => panic!("unexpected {other:?}"),
        }
    }
}
