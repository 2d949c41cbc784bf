//! A pool worker: a process that runs task batches from its connection until it closes.
//!
//! Tasks arrive pipelined; results go back in as few writes as the load allows (everything
//! finished while more input was waiting, flushed at least every few milliseconds). Before
//! each task the worker writes the task's sequence number and start time into a page shared
//! with the parent, so that when the worker dies the parent knows which task killed it, and
//! can enforce a task timeout, without a message per task.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::ipc::{self, FrameReader};
use crate::process::child::run_catching;
use crate::process::wire::{self, Failure, Trampoline};
use crate::sys::{self, SharedWords};

/// Word 0 of the shared page: sequence number + 1 of the running task (0: idle).
pub(crate) const WORD_RUNNING: usize = 0;
/// Word 1: when that task started, in [`sys::monotonic_ns`].
pub(crate) const WORD_STARTED: usize = 1;

/// How long finished results may wait in the worker before they are sent.
const FLUSH_EVERY: Duration = Duration::from_millis(5);
/// Send results once this many bytes have piled up.
const FLUSH_BYTES: usize = 256 * 1024;

/// A function in this executable, by offsets (see `process::wire`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct FnRef {
    pub trampoline: isize,
    pub target: isize,
}

/// Parent → worker.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ToWorker {
    /// Tasks to run, in order.
    Batch(Batch),
    /// Finish and exit (closing the connection means the same, but a forked sibling may
    /// hold a copy of it).
    Stop,
}

/// Tasks to run, in order.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Batch {
    pub func: FnRef,
    pub items: Vec<Item>,
}

/// One task of a batch. Its descriptors follow the previous items' in the frame.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Item {
    pub seq: u64,
    pub args: Vec<u8>,
    pub nfds: u32,
}

/// Worker → parent: one task's outcome (the result's descriptors ride in the frame).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Done {
    pub seq: u64,
    pub outcome: Result<Vec<u8>, Failure>,
}

/// An initializer: a function and its encoded argument, run once when the worker starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Init {
    pub func: FnRef,
    pub args: Vec<u8>,
}

/// What a worker is started with.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WorkerArgs {
    #[serde(serialize_with = "ser_fd", deserialize_with = "ipc::deserialize_fd")]
    pub conn: OwnedFd,
    #[serde(serialize_with = "ser_fd", deserialize_with = "ipc::deserialize_fd")]
    pub page: OwnedFd,
    pub init: Option<Init>,
    /// Exit after this many tasks (`max_tasks_per_child`).
    pub max_tasks: Option<u64>,
}

fn ser_fd<S: serde::Serializer>(fd: &OwnedFd, s: S) -> Result<S::Ok, S::Error> {
    ipc::serialize_fd(fd.as_fd(), s)
}

fn trampoline_at(func: FnRef) -> (Trampoline, usize) {
    // SAFETY: the parent computed these offsets from a `Trampoline` and a target of the
    // matching types in this same executable image (see `process::wire`).
    let t = unsafe { std::mem::transmute::<usize, Trampoline>(wire::address_of(func.trampoline)) };
    (t, wire::address_of(func.target))
}

/// The worker's main loop: the target of each worker `Process`.
pub(crate) fn worker_main(args: WorkerArgs) -> Result<(), String> {
    let page = SharedWords::map(args.page).map_err(|e| format!("mapping the status page: {e}"))?;
    if let Some(init) = args.init {
        let (t, target) = trampoline_at(init.func);
        if let Err(f) = run_catching(|| t(target, &init.args, Vec::new())) {
            return Err(format!("the initializer failed: {f:?}"));
        }
    }
    let conn = args.conn;
    let mut reader = FrameReader::default();
    let mut out = Outbox::default();
    let mut done: u64 = 0;
    loop {
        // Run everything that has arrived.
        while let Some(frame) = reader.next_frame().map_err(|e| e.to_string())? {
            let batch = match ipc::decode(&frame.bytes, Vec::new()).map_err(|e| e.to_string())? {
                ToWorker::Batch(b) => b,
                ToWorker::Stop => {
                    out.flush(&conn).map_err(|e| e.to_string())?;
                    return Ok(());
                }
            };
            let mut fds = frame.fds.into_iter();
            let (t, target) = trampoline_at(batch.func);
            for item in batch.items {
                let item_fds: Vec<OwnedFd> = fds.by_ref().take(item.nfds as usize).collect();
                page.word(WORD_STARTED)
                    .store(sys::monotonic_ns(), Ordering::Relaxed);
                page.word(WORD_RUNNING)
                    .store(item.seq + 1, Ordering::Release);
                let outcome = run_catching(|| t(target, &item.args, item_fds));
                page.word(WORD_RUNNING).store(0, Ordering::Release);
                out.push(&conn, item.seq, outcome)
                    .map_err(|e| e.to_string())?;
                done += 1;
                if out.due() {
                    out.flush(&conn).map_err(|e| e.to_string())?;
                }
            }
        }
        out.flush(&conn).map_err(|e| e.to_string())?;
        if args.max_tasks.is_some_and(|m| done >= m) {
            return Ok(());
        }
        if reader.at_eof() {
            return Ok(());
        }
        reader
            .wait_and_fill(conn.as_fd())
            .map_err(|e| e.to_string())?;
    }
}

/// Results waiting to be sent, as ready-made frames.
#[derive(Default)]
struct Outbox {
    bytes: Vec<u8>,
    since: Option<Instant>,
}

impl Outbox {
    fn push(&mut self, conn: &OwnedFd, seq: u64, outcome: wire::Outcome) -> std::io::Result<()> {
        let (msg, fds) = match outcome {
            Ok((bytes, fds)) => (
                Done {
                    seq,
                    outcome: Ok(bytes),
                },
                fds,
            ),
            Err(f) => (
                Done {
                    seq,
                    outcome: Err(f),
                },
                Vec::new(),
            ),
        };
        let payload = postcard::to_stdvec(&msg).map_err(std::io::Error::other)?;
        if !fds.is_empty() {
            // Descriptors must ride with their own frame's first byte: send in order, now.
            self.flush(conn)?;
            return ipc::send_frame(conn.as_fd(), &payload, &fds);
        }
        ipc::append_frame(&mut self.bytes, &payload, 0);
        self.since.get_or_insert_with(Instant::now);
        Ok(())
    }

    fn due(&self) -> bool {
        self.bytes.len() >= FLUSH_BYTES || self.since.is_some_and(|s| s.elapsed() >= FLUSH_EVERY)
    }

    fn flush(&mut self, conn: &OwnedFd) -> std::io::Result<()> {
        if !self.bytes.is_empty() {
            sys::send_all(conn.as_fd(), &self.bytes, &[])?;
            self.bytes.clear();
        }
        self.since = None;
        Ok(())
    }
}
