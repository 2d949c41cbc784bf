//! A pool worker: a process that runs chunks of tasks from its connection until told to stop.
//!
//! A chunk arrives as one frame: a small header (first sequence number, each task's encoded
//! length and descriptor count) followed by the tasks' encoded arguments back to back. The
//! worker decodes each argument in place, calls the function, and appends the encoded result
//! to an outgoing buffer: no allocation per task. Results go back as frames that each cover a
//! contiguous run of a chunk, in as few writes as the load allows (everything finished while
//! more input was waiting, and at least every few milliseconds).
//!
//! Before each task the worker writes the task's sequence number (and, when the pool has a
//! task timeout, its start time) into a page shared with the parent, so that when the worker
//! dies the parent knows which task killed it, without a message per task.

use std::cell::Cell;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ipc::{self, FrameReader};
use crate::process::child::run_catching;
use crate::process::wire::{self, Failure};
use crate::sys;
use crate::sys::shm::Mapping;

/// The size of the status page shared with the parent.
pub(crate) const PAGE_LEN: usize = 4096;
/// Byte offset in the status page of the running task's sequence number + 1 (0: idle).
pub(crate) const RUNNING_AT: usize = 0;
/// Byte offset of when that task started, in [`sys::monotonic_ns`] (only with a task timeout).
pub(crate) const STARTED_AT: usize = 8;

/// How long finished results may wait in the worker before they are sent.
const FLUSH_EVERY: Duration = Duration::from_millis(5);
/// Send results once this many bytes have piled up.
const FLUSH_BYTES: usize = 1 << 20;

/// Runs one task: decodes the argument from `args` (with its descriptors), calls the target,
/// appends the encoded result to `out` and returns the result's descriptors.
pub(crate) type TaskTrampoline = fn(
    target: usize,
    args: &[u8],
    fds: Vec<OwnedFd>,
    out: &mut Vec<u8>,
) -> Result<Vec<OwnedFd>, Failure>;

/// A function in this executable, by offsets (see `process::wire`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct FnRef {
    pub trampoline: isize,
    pub target: isize,
}

impl FnRef {
    /// The task trampoline and target for `f`.
    pub fn task<A: DeserializeOwned, R: Serialize>(f: fn(A) -> R) -> FnRef {
        FnRef {
            trampoline: wire::offset_of(task_trampoline::<A, R> as TaskTrampoline as usize),
            target: wire::offset_of(f as usize),
        }
    }
}

/// A postcard output that appends to a borrowed `Vec` (postcard's own take theirs by value,
/// and its `Extend` one pushes byte by byte through an iterator).
struct Append<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Append<'_> {
    type Output = ();

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        // Varints and small values are a few bytes: a call to memcpy for each costs more
        // than copying them here.
        if data.len() <= 16 {
            self.0.reserve(data.len());
            for &b in data {
                self.0.push(b);
            }
        } else {
            self.0.extend_from_slice(data);
        }
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Appends `value`'s encoding to `out`; returns the descriptors of handles inside it.
pub(crate) fn encode_into<T: Serialize>(
    out: &mut Vec<u8>,
    value: &T,
) -> Result<Vec<OwnedFd>, String> {
    let start = out.len();
    // Fast path: plain data. A handle refuses to serialise outside a gpuproc message, so on
    // error try again with the descriptor table in place.
    if postcard::serialize_with_flavor(value, Append(out)).is_ok() {
        return Ok(Vec::new());
    }
    out.truncate(start);
    let (res, fds) = ipc::encode_with(|| postcard::serialize_with_flavor(value, Append(out)));
    match res {
        Ok(()) => Ok(fds),
        Err(e) => {
            out.truncate(start);
            Err(e.to_string())
        }
    }
}

/// Decodes a `T` from `bytes`, handing it `fds`.
pub(crate) fn decode_from<T: DeserializeOwned>(
    bytes: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<T, ipc::DecodeError> {
    if fds.is_empty() {
        postcard::from_bytes(bytes).map_err(ipc::DecodeError)
    } else {
        ipc::decode(bytes, fds)
    }
}

fn task_trampoline<A: DeserializeOwned, R: Serialize>(
    target: usize,
    args: &[u8],
    fds: Vec<OwnedFd>,
    out: &mut Vec<u8>,
) -> Result<Vec<OwnedFd>, Failure> {
    let a: A = decode_from(args, fds).map_err(|e| Failure::BadArgument {
        type_name: std::any::type_name::<A>().to_string(),
        reason: e.to_string(),
    })?;
    // SAFETY: the parent computed `target` from a `fn(A) -> R` in this same executable image
    // (see `process::wire`), and this trampoline was instantiated with the same A and R.
    let f: fn(A) -> R = unsafe { std::mem::transmute::<usize, fn(A) -> R>(target) };
    let r = f(a);
    encode_into(out, &r).map_err(|reason| Failure::BadResult {
        type_name: std::any::type_name::<R>().to_string(),
        reason,
    })
}

/// Parent → worker.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ToWorker {
    /// A chunk of tasks; the header is followed in the frame by the arguments' bytes.
    Chunk(ChunkHeader),
    /// Finish and exit (closing the connection means the same, but a forked sibling may
    /// hold a copy of it).
    Stop,
}

/// The description of a chunk's tasks.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ChunkHeader {
    pub func: FnRef,
    /// Sequence number of the first task; the others follow consecutively.
    pub first_seq: u64,
    /// Each task's encoded argument length.
    #[serde(with = "u32_block")]
    pub lens: Vec<u32>,
    /// Each task's descriptor count (empty: none has any).
    #[serde(with = "u32_block")]
    pub nfds: Vec<u32>,
}

/// Worker → parent: the outcomes of tasks `first_seq .. first_seq + count`; followed in the
/// frame by the successful results' bytes, back to back.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct DoneHeader {
    pub first_seq: u64,
    pub count: u32,
    /// Each task's result length (0 for a failed task).
    #[serde(with = "u32_block")]
    pub lens: Vec<u32>,
    /// Each task's result descriptor count (empty: none has any).
    #[serde(with = "u32_block")]
    pub nfds: Vec<u32>,
    /// The tasks (offsets in this run) that failed, and why.
    pub failures: Vec<(u32, Failure)>,
}

/// A `Vec<u32>` as one block of little-endian bytes: postcard would write a varint per
/// element, which costs more than a trivial task itself.
mod u32_block {
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u32], s: S) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::with_capacity(v.len() * 4);
        for x in v {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        s.serialize_bytes(&bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
        struct Block;
        impl Visitor<'_> for Block {
            type Value = Vec<u32>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a block of little-endian u32s")
            }
            fn visit_bytes<E: Error>(self, b: &[u8]) -> Result<Vec<u32>, E> {
                if b.len() % 4 != 0 {
                    return Err(E::custom(format!(
                        "{} bytes is not a whole number of u32s",
                        b.len()
                    )));
                }
                Ok(b.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect())
            }
        }
        d.deserialize_bytes(Block)
    }
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
    /// Record each task's start time (the pool has a task timeout).
    pub track_time: bool,
}

fn ser_fd<S: serde::Serializer>(fd: &OwnedFd, s: S) -> Result<S::Ok, S::Error> {
    ipc::serialize_fd(fd.as_fd(), s)
}

fn resolve(func: FnRef) -> (TaskTrampoline, usize) {
    // SAFETY: the parent computed these offsets from a `TaskTrampoline` and a target of the
    // matching types in this same executable image (see `process::wire`).
    let t =
        unsafe { std::mem::transmute::<usize, TaskTrampoline>(wire::address_of(func.trampoline)) };
    (t, wire::address_of(func.target))
}

/// The worker's main loop: the target of each worker `Process`.
pub(crate) fn worker_main(args: WorkerArgs) -> Result<(), String> {
    let page = Mapping::map_existing(args.page, PAGE_LEN)
        .map_err(|e| format!("mapping the status page: {e}"))?;
    if let Some(init) = args.init {
        let (t, target) = resolve(init.func);
        let mut sink = Vec::new();
        if let Err(f) = run_catching(|| t(target, &init.args, Vec::new(), &mut sink)) {
            return Err(format!("the initializer failed: {f:?}"));
        }
    }
    let (conn, track_time, max_tasks) = (args.conn, args.track_time, args.max_tasks);
    let err = |e: std::io::Error| e.to_string();
    let mut reader = FrameReader::default();
    let mut out = Outbox::default();
    let mut done: u64 = 0;
    loop {
        while let Some(frame) = reader.next_frame().map_err(err)? {
            let (msg, rest) =
                postcard::take_from_bytes::<ToWorker>(&frame.bytes).map_err(|e| e.to_string())?;
            let chunk = match msg {
                ToWorker::Chunk(c) => c,
                ToWorker::Stop => {
                    out.flush(&conn).map_err(err)?;
                    return Ok(());
                }
            };
            let (t, target) = resolve(chunk.func);
            let mut fds = frame.fds.into_iter();
            let rest: &[u8] = rest;
            out.begin(chunk.first_seq);
            // One panic guard for the whole chunk (a guard per task costs more than a trivial
            // task): after a panic, record it against the task that was running and go on
            // with the next one.
            let count = chunk.lens.len();
            let (mut next, mut pos) = (0usize, 0usize);
            while next < count {
                let cursor = Cell::new((next, pos, out.results.len()));
                let res = run_catching(|| {
                    let mut pos = pos;
                    for i in next..count {
                        let len = chunk.lens[i] as usize;
                        let item = rest.get(pos..pos + len).unwrap_or_default();
                        pos += len;
                        let n = chunk.nfds.get(i).copied().unwrap_or(0) as usize;
                        let item_fds: Vec<OwnedFd> = if n == 0 {
                            Vec::new()
                        } else {
                            fds.by_ref().take(n).collect()
                        };
                        let seq = chunk.first_seq + i as u64;
                        let start = out.results.len();
                        cursor.set((i, pos, start));
                        if track_time {
                            page.atomic_u64(STARTED_AT)
                                .store(sys::monotonic_ns(), Ordering::Relaxed);
                        }
                        page.atomic_u64(RUNNING_AT)
                            .store(seq + 1, Ordering::Release);
                        match t(target, item, item_fds, &mut out.results) {
                            Ok(result_fds) => out.push_ok(out.results.len() - start, result_fds),
                            Err(f) => {
                                out.results.truncate(start);
                                out.push_err(f);
                            }
                        }
                        done += 1;
                        if out.due() {
                            if let Err(e) = out.flush(&conn) {
                                return Ok(Err(e.to_string()));
                            }
                            out.begin(seq + 1);
                        }
                    }
                    Ok(Ok(()))
                });
                match res {
                    Ok(Ok(())) => next = count,
                    Ok(Err(e)) => return Err(e),
                    Err(panicked) => {
                        let (i, after, start) = cursor.get();
                        out.results.truncate(start);
                        out.push_err(panicked);
                        done += 1;
                        (next, pos) = (i + 1, after);
                    }
                }
            }
            page.atomic_u64(RUNNING_AT).store(0, Ordering::Release);
            if max_tasks.is_some_and(|m| done >= m) {
                out.flush(&conn).map_err(err)?;
                return Ok(());
            }
        }
        out.flush(&conn).map_err(err)?;
        if reader.at_eof() {
            return Ok(());
        }
        reader.wait_and_fill(conn.as_fd()).map_err(err)?;
    }
}

/// Results waiting to be sent: finished frames, and the run being filled.
#[derive(Default)]
struct Outbox {
    /// Complete frames, back to back.
    frames: Vec<u8>,
    /// Their descriptors, in frame order (all ride with the first byte of the write).
    fds: Vec<OwnedFd>,
    /// The run being filled: its header, results and descriptors.
    run: DoneHeader,
    results: Vec<u8>,
    run_fds: Vec<OwnedFd>,
    since: Option<Instant>,
    /// The clock is read every `stride` tasks: rarely while tasks are trivial.
    stride: u32,
    tick: u32,
    last_check: Option<Instant>,
}

impl Outbox {
    /// Starts a run at task `first_seq`, closing the current one unless this continues it
    /// (consecutive chunks to one worker have consecutive sequence numbers).
    fn begin(&mut self, first_seq: u64) {
        if self.run.count > 0 && self.run.first_seq + u64::from(self.run.count) == first_seq {
            return;
        }
        self.close_run();
        self.run.first_seq = first_seq;
    }

    fn push_ok(&mut self, len: usize, fds: Vec<OwnedFd>) {
        if !fds.is_empty() && self.run.nfds.is_empty() {
            self.run.nfds.resize(self.run.count as usize, 0);
        }
        if !self.run.nfds.is_empty() {
            self.run.nfds.push(fds.len() as u32);
        }
        self.run.lens.push(len as u32);
        self.run.count += 1;
        self.run_fds.extend(fds);
        self.since.get_or_insert_with(Instant::now);
    }

    fn push_err(&mut self, f: Failure) {
        self.run.failures.push((self.run.count, f));
        if !self.run.nfds.is_empty() {
            self.run.nfds.push(0);
        }
        self.run.lens.push(0);
        self.run.count += 1;
        self.since.get_or_insert_with(Instant::now);
    }

    fn close_run(&mut self) {
        if self.run.count == 0 {
            return;
        }
        let header = std::mem::take(&mut self.run);
        let header = postcard::to_stdvec(&header).unwrap_or_default();
        ipc::append_frame_parts(
            &mut self.frames,
            &[&header, &self.results],
            self.run_fds.len(),
        );
        self.results.clear();
        self.fds.append(&mut self.run_fds);
    }

    fn due(&mut self) -> bool {
        if self.frames.len() + self.results.len() >= FLUSH_BYTES {
            return true;
        }
        self.tick += 1;
        if self.tick < self.stride {
            return false;
        }
        self.tick = 0;
        let now = Instant::now();
        let quick = self
            .last_check
            .is_some_and(|l| now - l < Duration::from_micros(100));
        self.last_check = Some(now);
        self.stride = if quick {
            (self.stride * 2).clamp(1, 1024)
        } else {
            1
        };
        self.since.is_some_and(|s| now - s >= FLUSH_EVERY)
    }

    fn flush(&mut self, conn: &OwnedFd) -> std::io::Result<()> {
        self.close_run();
        if !self.frames.is_empty() {
            let fds: Vec<_> = self.fds.iter().map(|f| f.as_fd()).collect();
            sys::send_all(conn.as_fd(), &self.frames, &fds)?;
            self.frames.clear();
            self.fds.clear();
        }
        self.since = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_with_u32_blocks() {
        let h = DoneHeader {
            first_seq: 7,
            count: 3,
            lens: vec![0, 1, u32::MAX],
            nfds: Vec::new(),
            failures: vec![(
                1,
                Failure::BadResult {
                    type_name: "T".into(),
                    reason: "r".into(),
                },
            )],
        };
        let bytes = postcard::to_stdvec(&h).unwrap();
        let (back, rest) = postcard::take_from_bytes::<DoneHeader>(&bytes).unwrap();
        assert!(rest.is_empty());
        assert_eq!((back.first_seq, back.count), (7, 3));
        assert_eq!(back.lens, [0, 1, u32::MAX]);
        assert!(back.nfds.is_empty());
        assert_eq!(back.failures.len(), 1);
    }

    #[test]
    fn a_ragged_u32_block_is_an_error() {
        // A byte block of 5 bytes where the lengths should be.
        let mut bytes = postcard::to_stdvec(&(7u64, 1u32)).unwrap();
        bytes.push(5);
        bytes.extend_from_slice(&[1, 2, 3, 4, 5]);
        bytes.push(0);
        assert!(postcard::from_bytes::<DoneHeader>(&bytes).is_err());
    }
}
