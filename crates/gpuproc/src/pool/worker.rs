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

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::lens::{self, u32_block, Lens};
use super::plain;
use super::shm_args::{self, ShmArgs, ShmPool};
use super::PoolError;
use crate::codec;
use crate::ipc::{self, FrameReader};
use crate::process::child::run_catching;
use crate::process::wire::{self, Failure};
use crate::sys;
use crate::sys::seqpacket::MapCache;
use crate::sys::shm::Mapping;

/// The size of the status page shared with the parent.
pub(crate) const PAGE_LEN: usize = 4096;
/// Byte offset in the status page of the running task's sequence number + 1 (0: idle).
pub(crate) const RUNNING_AT: usize = 0;
/// Byte offset of when that task started, in [`sys::monotonic_ns`] (only with a task timeout).
pub(crate) const STARTED_AT: usize = 8;
/// Byte offset of the worker's phase: 0 until its main function runs, then
/// [`PHASE_INIT`], then [`PHASE_READY`].
pub(crate) const PHASE_AT: usize = 16;
/// The worker is running the pool's initializer (if any).
pub(crate) const PHASE_INIT: u64 = 1;
/// The worker is in its loop, ready for tasks.
pub(crate) const PHASE_READY: u64 = 2;

/// How long finished results may wait in the worker before they are sent.
const FLUSH_EVERY: Duration = Duration::from_millis(5);
/// Send results once this many bytes have piled up.
const FLUSH_BYTES: usize = 1 << 20;

/// Runs a chunk's tasks from `state.next` on (see [`chunk_trampoline`]).
pub(crate) type ChunkTrampoline =
    fn(target: usize, state: &mut ChunkState<'_>) -> Result<(), String>;

/// A function in this executable, by offsets (see `process::wire`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct FnRef {
    pub trampoline: isize,
    pub target: isize,
}

impl FnRef {
    /// The task trampoline and target for `f`.
    pub fn task<A: DeserializeOwned, R: Serialize + DeserializeOwned>(f: fn(A) -> R) -> FnRef {
        FnRef {
            trampoline: wire::offset_of(chunk_trampoline::<A, R> as ChunkTrampoline as usize),
            target: wire::offset_of(f as usize),
        }
    }

    /// Checks that the function and its trampoline lie in gpuproc's own loaded object, so
    /// that a worker that is not a fork finds them at the same offsets (remembers the last
    /// function that passed, per thread, so a loop of `apply_async` calls looks once).
    pub fn check(self) -> Result<(), PoolError> {
        thread_local! {
            static LAST_OK: std::cell::Cell<(isize, isize)> = const { std::cell::Cell::new((0, 0)) };
        }
        let key = (self.trampoline, self.target);
        if LAST_OK.get() == key {
            return Ok(());
        }
        let code = [
            wire::address_of(self.trampoline),
            wire::address_of(self.target),
        ];
        if let Some(object) = crate::process::foreign_object(wire::anchor as fn() as usize, &code) {
            return Err(PoolError::ForeignTarget { object });
        }
        LAST_OK.set(key);
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
    if codec::append(value, out).is_ok() {
        return Ok(Vec::new());
    }
    out.truncate(start);
    let (res, fds) = ipc::encode_with(|| codec::append(value, out));
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
        ipc::decode_without_fds(bytes)
    } else {
        ipc::decode(bytes, fds)
    }
}

/// A chunk being run: its tasks, where the worker is in them, and where results go.
pub(crate) struct ChunkState<'a> {
    header: &'a ChunkHeader,
    /// The tasks' arguments, back to back.
    args: &'a [u8],
    fds: std::vec::IntoIter<OwnedFd>,
    /// The status page, where each task's sequence number (and start time) is written
    /// before it runs (none for the initializer).
    page: Option<&'a Mapping>,
    track_time: bool,
    out: &'a mut Outbox,
    /// Where results are flushed to while the chunk runs (none for the initializer).
    conn: Option<&'a OwnedFd>,
    /// The next task to run (offset in the chunk), and where its argument starts.
    next: usize,
    pos: usize,
    /// Where the running task's result starts in `out.results`.
    start: usize,
    /// Tasks finished (successfully or not).
    done: u64,
}

impl<'a> ChunkState<'a> {
    fn new(
        header: &'a ChunkHeader,
        args: &'a [u8],
        fds: Vec<OwnedFd>,
        out: &'a mut Outbox,
    ) -> Self {
        ChunkState {
            header,
            args,
            fds: fds.into_iter(),
            page: None,
            track_time: false,
            out,
            conn: None,
            next: 0,
            pos: 0,
            start: 0,
            done: 0,
        }
    }

    /// Counts task `seq` as done, and sends the results if they are due.
    #[inline(always)]
    fn finish_task(&mut self, seq: u64) -> Result<(), String> {
        self.done += 1;
        if self.out.due() {
            if let Some(conn) = self.conn {
                self.out.flush(conn).map_err(|e| e.to_string())?;
            }
            self.out.begin(seq + 1);
        }
        Ok(())
    }

    /// Records a panic in the running task (the one before `next`) and drops any part of
    /// its result.
    fn panicked(&mut self, f: Failure) {
        self.out.results.truncate(self.start);
        self.out.push_err(f);
        self.done += 1;
    }
}

/// The loop over a chunk's tasks, compiled for each task type: decodes each argument (plain
/// data or postcard), calls the target, appends the result, and flushes results when due.
/// `state.next` moves past a task before it runs, so that after a panic the loop can be
/// entered again for the rest of the chunk.
fn chunk_trampoline<A: DeserializeOwned, R: Serialize + DeserializeOwned>(
    target: usize,
    st: &mut ChunkState<'_>,
) -> Result<(), String> {
    // SAFETY: the parent computed `target` from a `fn(A) -> R` in this same executable image
    // (see `process::wire`), and this trampoline was instantiated with the same A and R.
    let f: fn(A) -> R = unsafe { std::mem::transmute::<usize, fn(A) -> R>(target) };
    let header = st.header;
    let count = header.lens.len();
    let shape = header.shape.as_deref();
    let page = st.page;
    let running = page.map(|p| p.atomic_u64(RUNNING_AT));
    let started = page
        .filter(|_| st.track_time)
        .map(|p| p.atomic_u64(STARTED_AT));
    while st.next < count {
        // Plain arguments and a plain run of results: the tight loop, for as long as it
        // goes (a task it stops at is run below).
        if let (Some(shape), RunCodec::Plain(_), None) = (shape, &st.out.codec, started) {
            let before = st.next;
            plain_tasks(f, st, shape, running)?;
            if st.next != before {
                continue;
            }
        }
        let i = st.next;
        let len = header.lens.get(i);
        let item = st.args.get(st.pos..st.pos + len).unwrap_or_default();
        st.pos += len;
        st.next = i + 1;
        st.start = st.out.results.len();
        let seq = header.first_seq + i as u64;
        if let Some(started) = started {
            started.store(sys::monotonic_ns(), Ordering::Relaxed);
        }
        if let Some(running) = running {
            running.store(seq + 1, Ordering::Release);
        }
        let arg: Result<A, String> = match shape {
            // A plain chunk carries no descriptors.
            Some(shape) => plain::decode(item, shape).map_err(|e| e.to_string()),
            None => {
                let n = header.nfds.get(i).copied().unwrap_or(0) as usize;
                let fds = if n == 0 {
                    Vec::new()
                } else {
                    st.fds.by_ref().take(n).collect()
                };
                decode_from(item, fds).map_err(|e| e.to_string())
            }
        };
        match arg {
            Ok(a) => {
                let r = f(a);
                st.out.push_result_or_failure(&r);
            }
            Err(reason) => st.out.push_err(Failure::BadArgument {
                type_name: std::any::type_name::<A>().to_string(),
                reason,
            }),
        }
        st.finish_task(seq)?;
    }
    Ok(())
}

/// [`chunk_trampoline`]'s loop for plain arguments while the results go into a plain run:
/// the same steps with less bookkeeping. Returns at the end of the chunk, or when a task's
/// argument or result is not plain data of the expected shape (that task is left for the
/// general loop, which handles it), or after a result that was not (it is kept). Not used
/// when tasks' start times are tracked.
#[inline(always)]
fn plain_tasks<A: DeserializeOwned, R: Serialize + DeserializeOwned>(
    f: fn(A) -> R,
    st: &mut ChunkState<'_>,
    shape: &[u8],
    running: Option<&std::sync::atomic::AtomicU64>,
) -> Result<(), String> {
    let header = st.header;
    let count = header.lens.len();
    while st.next < count {
        let i = st.next;
        let len = header.lens.get(i);
        let Some(item) = st.args.get(st.pos..st.pos + len) else {
            return Ok(());
        };
        let Ok(a) = plain::decode::<A>(item, shape) else {
            return Ok(());
        };
        st.pos += len;
        st.next = i + 1;
        let start = st.out.results.len();
        st.start = start;
        let seq = header.first_seq + i as u64;
        if let Some(running) = running {
            running.store(seq + 1, Ordering::Release);
        }
        let r = f(a);
        let out = &mut *st.out;
        let pushed = match &mut out.codec {
            RunCodec::Plain(enc) => enc.push(&mut out.results, &r),
            _ => false,
        };
        if pushed {
            out.push_plain_ok(out.results.len() - start);
        } else {
            out.push_result_or_failure(&r);
        }
        st.finish_task(seq)?;
        if !pushed {
            return Ok(());
        }
    }
    Ok(())
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
    /// The arguments' shape when they are plain data (see `plain`), else postcard.
    pub shape: Option<Vec<u8>>,
    /// Each task's encoded argument length.
    pub lens: Lens,
    /// Each task's descriptor count (empty: none has any).
    #[serde(with = "u32_block")]
    pub nfds: Vec<u32>,
    /// The arguments are not in the frame but in a memfd, the frame's last descriptor
    /// (see `shm_args`).
    pub in_memfd: bool,
}

/// Worker → parent: the outcomes of tasks `first_seq .. first_seq + count`; followed in the
/// frame by the successful results' bytes, back to back.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct DoneHeader {
    pub first_seq: u64,
    pub count: u32,
    /// The results' shape when they are plain data (see `plain`), else postcard.
    pub shape: Option<Vec<u8>>,
    /// Each task's result length (0 for a failed task).
    pub lens: Lens,
    /// Each task's result descriptor count (empty: none has any).
    #[serde(with = "u32_block")]
    pub nfds: Vec<u32>,
    /// The tasks (offsets in this run) that failed, and why.
    pub failures: Vec<(u32, Failure)>,
    /// The results are not in the frame but in a memfd, the frame's last descriptor, lent
    /// until the parent writes zero at this offset (see `shm_args`).
    pub results_memfd: Option<u64>,
}

/// An initializer: a function and its encoded argument, run once when the worker starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Init {
    pub func: FnRef,
    pub args: Vec<u8>,
    /// The descriptors of the handles inside `args` (queues, locks, ...).
    pub fds: InitFds,
}

impl Init {
    /// The initializer `func` with its encoded argument; an error if the argument is too long
    /// to send (see [`lens::checked_len`]).
    pub fn new(func: FnRef, args: Vec<u8>, fds: Vec<OwnedFd>) -> Result<Init, String> {
        Init::header(args.len(), fds.len())?;
        Ok(Init {
            func,
            args,
            fds: InitFds(std::sync::Arc::new(fds)),
        })
    }

    /// The lengths the initializer is run with, as a chunk of one task.
    /// (Takes lengths, not the bytes, so that the check is testable without 4 GiB.)
    fn header(args_len: usize, nfds: usize) -> Result<(Lens, Vec<u32>), String> {
        let what = "the initializer's argument";
        let len = lens::checked_len(args_len, what)?;
        let nfds = lens::checked_fds(nfds, what)?;
        Ok((Lens::Fixed { len, count: 1 }, vec![nfds]))
    }
}

/// The initializer's descriptors: kept once by the pool, and sent (duplicated, as handles
/// are) with the start of every worker, replacements included.
#[derive(Debug, Clone, Default)]
pub(crate) struct InitFds(pub std::sync::Arc<Vec<OwnedFd>>);

impl Serialize for InitFds {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for fd in self.0.iter() {
            seq.serialize_element(&ipc::FdRef(fd.as_fd()))?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for InitFds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct One(#[serde(deserialize_with = "ipc::deserialize_fd")] OwnedFd);
        let fds: Vec<One> = Vec::deserialize(d)?;
        Ok(InitFds(std::sync::Arc::new(
            fds.into_iter().map(|one| one.0).collect(),
        )))
    }
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
    /// Start the worker on another machine through this launcher: this process is then its
    /// relay (see `remote`).
    pub launcher: Option<super::remote::Launcher>,
    /// This worker runs on another machine: results never go through shared memory.
    pub remote: bool,
}

fn ser_fd<S: serde::Serializer>(fd: &OwnedFd, s: S) -> Result<S::Ok, S::Error> {
    ipc::serialize_fd(fd.as_fd(), s)
}

fn resolve(func: FnRef) -> (ChunkTrampoline, usize) {
    // SAFETY: the parent computed these offsets from a `ChunkTrampoline` and a target of the
    // matching types in this same executable image (see `process::wire`).
    let t =
        unsafe { std::mem::transmute::<usize, ChunkTrampoline>(wire::address_of(func.trampoline)) };
    (t, wire::address_of(func.target))
}

/// Why a worker ended early.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum WorkerError {
    /// The pool's initializer failed in it (the text says how).
    Initializer(String),
    /// Its connection to the pool failed.
    Connection(String),
    /// It relayed for a worker on another machine, which was lost (see `remote`).
    Lost { node: String, reason: String },
}

impl From<String> for WorkerError {
    fn from(e: String) -> Self {
        WorkerError::Connection(e)
    }
}

/// The worker's main loop: the target of each worker `Process`.
pub(crate) fn worker_main(args: WorkerArgs) -> Result<(), WorkerError> {
    if let Some(launcher) = args.launcher.clone() {
        return super::remote::relay_main(args, launcher);
    }
    let page = Mapping::map_existing(args.page, PAGE_LEN)
        .map_err(|e| format!("mapping the status page: {e}"))?;
    let phase = page.atomic_u64(PHASE_AT);
    phase.store(PHASE_INIT, Ordering::Release);
    if let Some(init) = args.init {
        run_initializer(init)?;
    }
    phase.store(PHASE_READY, Ordering::Release);
    serve(
        args.conn,
        &page,
        args.track_time,
        args.max_tasks,
        args.remote,
    )
}

/// Runs the pool's initializer in this worker.
pub(crate) fn run_initializer(init: Init) -> Result<(), WorkerError> {
    {
        // Run like a chunk of one task whose result is dropped.
        let (t, target) = resolve(init.func);
        // Received with this worker's start (spawn, fork server), or inherited with the
        // pool's memory (fork): then still shared, so duplicated.
        let fds = std::sync::Arc::try_unwrap(init.fds.0).unwrap_or_else(|shared| {
            shared
                .iter()
                .filter_map(|fd| sys::dup(fd.as_fd()).ok())
                .collect()
        });
        let (lens, nfds) =
            Init::header(init.args.len(), fds.len()).map_err(WorkerError::Initializer)?;
        let header = ChunkHeader {
            func: init.func,
            first_seq: 0,
            shape: None,
            lens,
            nfds,
            in_memfd: false,
        };
        let mut sink = Outbox::default();
        let mut st = ChunkState::new(&header, &init.args, fds, &mut sink);
        let failure = match run_catching(|| Ok(t(target, &mut st))) {
            Ok(Ok(())) => sink.run.failures.pop().map(|(_, f)| f),
            Ok(Err(e)) => return Err(e.into()),
            Err(f) => Some(f),
        };
        if let Some(f) = failure {
            return Err(WorkerError::Initializer(f.to_string()));
        }
    }
    Ok(())
}

/// The worker loop: runs the chunks that come on `conn` and sends their results, until told
/// to stop, the connection ends, or `max_tasks` are done. A `remote` worker (on another
/// machine) sends every result in its frames, never in shared memory.
pub(crate) fn serve(
    conn: OwnedFd,
    page: &Mapping,
    track_time: bool,
    max_tasks: Option<u64>,
    remote: bool,
) -> Result<(), WorkerError> {
    let err = |e: std::io::Error| e.to_string();
    let mut reader = FrameReader::default();
    let mut out = Outbox {
        spill: !remote,
        ..Outbox::default()
    };
    // Mappings of the memfds that large arguments come in, kept for their reuse.
    let memfds = MapCache::default();
    let mut done: u64 = 0;
    loop {
        while let Some((bytes, mut frame_fds)) = reader.next_frame_ref().map_err(err)? {
            let (msg, rest) =
                codec::take_from_bytes::<ToWorker>(bytes).map_err(|e| e.to_string())?;
            let chunk = match msg {
                ToWorker::Chunk(c) => c,
                ToWorker::Stop => {
                    out.flush(&conn).map_err(err)?;
                    return Ok(());
                }
            };
            let (t, target) = resolve(chunk.func);
            let map;
            let args = if chunk.in_memfd {
                let len = chunk
                    .lens
                    .checked_total()
                    .ok_or_else(|| "a chunk whose argument lengths overflow".to_string())?;
                let fd = frame_fds
                    .pop()
                    .ok_or_else(|| "a chunk without its arguments' memfd".to_string())?;
                map = memfds
                    .map(fd.as_fd(), len.max(1), 0)
                    .map_err(|e| format!("mapping a chunk's arguments: {e}"))?;
                &map.bytes()[..len]
            } else {
                rest
            };
            out.begin(chunk.first_seq);
            let mut st = ChunkState::new(&chunk, args, frame_fds, &mut out);
            st.page = Some(page);
            st.track_time = track_time;
            st.conn = Some(&conn);
            // One panic guard for the whole chunk (a guard per task costs more than a trivial
            // task): after a panic, record it against the task that was running and go on
            // with the next one.
            while st.next < chunk.lens.len() {
                match run_catching(|| Ok(t(target, &mut st))) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e.into()),
                    Err(panicked) => st.panicked(panicked),
                }
            }
            done += st.done;
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

/// A result's length and descriptor count as they travel.
fn result_sizes(len: usize, fds: usize) -> Result<(u32, u32), String> {
    let what = "the result";
    Ok((lens::checked_len(len, what)?, lens::checked_fds(fds, what)?))
}

/// How the results of the run being filled are encoded.
#[derive(Default)]
enum RunCodec {
    /// No result yet: the first one decides.
    #[default]
    Untried,
    /// Plain data of the encoder's shape.
    Plain(plain::Encoder),
    /// Postcard.
    Postcard,
}

/// Results waiting to be sent: finished frames, and the run being filled.
#[derive(Default)]
pub(crate) struct Outbox {
    /// Complete frames, back to back.
    frames: Vec<u8>,
    /// Their descriptors, in frame order (all ride with the first byte of the write).
    fds: Vec<OwnedFd>,
    /// The run being filled: its header, results and descriptors.
    run: DoneHeader,
    results: Vec<u8>,
    /// The run's results instead of `results`, once they are large.
    results_shm: Option<ShmArgs>,
    /// Memfds for large results.
    shm: Arc<ShmPool>,
    /// Whether large results may go through memfds (not from another machine).
    spill: bool,
    run_fds: Vec<OwnedFd>,
    codec: RunCodec,
    /// The encoded header of the run being closed (kept for its capacity).
    header: Vec<u8>,
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

    /// Appends a task's result to the run: as plain data while the results have one shape
    /// (the first result decides, and must decode again), else as postcard. A result of
    /// another shape ends the plain run; the rest of it becomes a postcard run. On error
    /// nothing is appended.
    #[inline(always)]
    fn push_result<R: Serialize + DeserializeOwned>(&mut self, r: &R) -> Result<(), String> {
        let start = self.results.len();
        if self.results_shm.is_some() {
            // Large results so far: the rest of the run goes there too.
            self.codec = RunCodec::Postcard;
        }
        match &mut self.codec {
            RunCodec::Plain(enc) => {
                if enc.push(&mut self.results, r) {
                    self.push_plain_ok(self.results.len() - start);
                    return Ok(());
                }
                let mut bytes = Vec::new();
                let fds = encode_into(&mut bytes, r)?;
                self.check_fds(&fds)?;
                let sizes = result_sizes(bytes.len(), fds.len())?;
                let next = self.run.first_seq + u64::from(self.run.count);
                self.close_run();
                self.run.first_seq = next;
                self.codec = RunCodec::Postcard;
                self.results.extend_from_slice(&bytes);
                self.push_ok(sizes, fds);
                return Ok(());
            }
            RunCodec::Untried => {
                let mut enc = plain::Encoder::default();
                let shape = enc
                    .push(&mut self.results, r)
                    .then(|| enc.shape())
                    .flatten()
                    .filter(|shape| plain::decode::<R>(&self.results[start..], shape).is_ok())
                    .map(<[u8]>::to_vec);
                if let Some(shape) = shape {
                    self.run.shape = Some(shape);
                    self.codec = RunCodec::Plain(enc);
                    self.push_plain_ok(self.results.len() - start);
                    return Ok(());
                }
                self.results.truncate(start);
                self.codec = RunCodec::Postcard;
            }
            RunCodec::Postcard => {}
        }
        let start = self.results_len();
        let fds = if self.spill {
            let expect = shm_args::Expect::run(FLUSH_BYTES);
            shm_args::encode(
                &mut self.results,
                &mut self.results_shm,
                &self.shm,
                expect,
                r,
            )?
        } else {
            encode_into(&mut self.results, r)?
        };
        let sizes = self
            .check_fds(&fds)
            .and_then(|()| result_sizes(self.results_len() - start, fds.len()));
        match sizes {
            Ok(sizes) => {
                self.push_ok(sizes, fds);
                Ok(())
            }
            Err(e) => {
                match &mut self.results_shm {
                    Some(shm) => shm.truncate(start),
                    None => self.results.truncate(start),
                }
                Err(e)
            }
        }
    }

    /// Refuses descriptors in a remote worker's result (it has no shared memory to spill
    /// to): they cannot go back to another machine.
    fn check_fds(&self, fds: &[OwnedFd]) -> Result<(), String> {
        if self.spill || fds.is_empty() {
            return Ok(());
        }
        Err(
            "it holds a descriptor (a queue, lock, pipe or shared memory), which cannot go \
             back from another machine"
                .into(),
        )
    }

    /// [`push_result`](Self::push_result), or the task's failure if its result does not
    /// encode.
    #[inline(always)]
    fn push_result_or_failure<R: Serialize + DeserializeOwned>(&mut self, r: &R) {
        if let Err(reason) = self.push_result(r) {
            self.push_err(Failure::BadResult {
                type_name: std::any::type_name::<R>().to_string(),
                reason,
            });
        }
    }

    /// Counts a plain result of `len` bytes, already appended (a plain value is at most a
    /// few hundred bytes; see `plain`).
    #[inline(always)]
    fn push_plain_ok(&mut self, len: usize) {
        // (Were it ever longer, the lengths would not add up and the pool would reject the
        // run as malformed: no wrong result either way.)
        self.push_len(u32::try_from(len).unwrap_or(u32::MAX));
    }

    /// Counts a result of `len` bytes, already appended, that carries no descriptors while
    /// the run has none either.
    #[inline(always)]
    fn push_len(&mut self, len: u32) {
        if self.since.is_none() {
            self.since = Some(Instant::now());
        }
        self.run.lens.push(len);
        self.run.count += 1;
    }

    /// Counts a result of `len` bytes with `fds` (`nfds` of them), already appended.
    #[inline]
    fn push_ok(&mut self, (len, nfds): (u32, u32), fds: Vec<OwnedFd>) {
        if fds.is_empty() && self.run.nfds.is_empty() {
            return self.push_len(len);
        }
        // Descriptor counts are kept once any result has descriptors (earlier ones: 0).
        self.run.nfds.resize(self.run.count as usize, 0);
        self.run.nfds.push(nfds);
        self.run_fds.extend(fds);
        self.push_len(len);
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

    /// How many bytes of results the run holds.
    fn results_len(&self) -> usize {
        self.results_shm
            .as_ref()
            .map_or(self.results.len(), |s| s.bytes().len())
    }

    /// Encodes the run's header into `self.header` and starts a new, empty run (its results
    /// and descriptors stay in `results` and `run_fds`; results in a memfd are lent to the
    /// parent, the memfd last in `run_fds`); false if the run was empty.
    fn end_run(&mut self) -> bool {
        self.codec = RunCodec::Untried;
        if self.run.count == 0 {
            self.run.shape = None;
            return false;
        }
        if let Some(shm) = self.results_shm.take() {
            let lent = shm
                .lend()
                .and_then(|(fd, at)| Some((sys::dup(fd).ok()?, at)));
            match lent {
                Some((fd, at)) => {
                    self.run_fds.push(fd);
                    self.run.results_memfd = Some(at);
                }
                // No descriptor to spare: the results go in the frame after all.
                None => self.results.extend_from_slice(shm.bytes()),
            }
        }
        // Encoded in place and then cleared, so that the run's vectors keep their capacity.
        let mut header = std::mem::take(&mut self.header);
        header.clear();
        if codec::append(&self.run, &mut header).is_err() {
            header.clear();
        }
        self.header = header;
        self.run.count = 0;
        self.run.shape = None;
        self.run.lens.clear();
        self.run.nfds.clear();
        self.run.failures.clear();
        self.run.results_memfd = None;
        true
    }

    /// Ends the run and moves it into `frames`.
    fn close_run(&mut self) {
        if !self.end_run() {
            return;
        }
        ipc::append_frame_parts(
            &mut self.frames,
            &[&self.header, &self.results],
            self.run_fds.len(),
        );
        self.results.clear();
        self.fds.append(&mut self.run_fds);
    }

    #[inline]
    fn due(&mut self) -> bool {
        if self.frames.len() + self.results_len() >= FLUSH_BYTES {
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
        if self.frames.is_empty() {
            // The common case, one run: sent from where its results are, without a copy.
            if self.end_run() {
                let len = self.header.len() + self.results.len();
                let prefix = ipc::frame_header(len, self.run_fds.len());
                let fds: Vec<_> = self.run_fds.iter().map(|f| f.as_fd()).collect();
                sys::send_all(conn.as_fd(), &[&prefix, &self.header, &self.results], &fds)?;
                self.results.clear();
                self.run_fds.clear();
            }
        } else {
            self.close_run();
            let fds: Vec<_> = self.fds.iter().map(|f| f.as_fd()).collect();
            sys::send_all(conn.as_fd(), &[&self.frames], &fds)?;
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
    fn an_initializer_argument_past_4_gib_is_refused_not_truncated() {
        let (lens, nfds) = Init::header(7, 2).unwrap();
        assert_eq!((lens, nfds), (Lens::Fixed { len: 7, count: 1 }, vec![2]));
        let e = Init::header(u32::MAX as usize + 8, 0).unwrap_err();
        assert!(
            e.starts_with("the initializer's argument encodes to 4294967303 bytes"),
            "{e}"
        );
        assert!(Init::header(1, usize::MAX).is_err());
        // And so is a result.
        assert!(result_sizes(u32::MAX as usize + 1, 0).is_err());
        assert_eq!(result_sizes(16, 1), Ok((16, 1)));
    }

    #[test]
    fn headers_round_trip_with_u32_blocks() {
        let h = DoneHeader {
            first_seq: 7,
            count: 3,
            shape: None,
            lens: Lens::Each(vec![0, 1, u32::MAX]),
            nfds: Vec::new(),
            failures: vec![(
                1,
                Failure::BadResult {
                    type_name: "T".into(),
                    reason: "r".into(),
                },
            )],
            results_memfd: Some(1 << 20),
        };
        let bytes = postcard::to_stdvec(&h).unwrap();
        let (back, rest) = postcard::take_from_bytes::<DoneHeader>(&bytes).unwrap();
        assert!(rest.is_empty());
        assert_eq!((back.first_seq, back.count), (7, 3));
        assert_eq!(back.lens, Lens::Each(vec![0, 1, u32::MAX]));
        assert!(back.nfds.is_empty());
        assert_eq!(back.failures.len(), 1);
    }

    #[test]
    fn a_result_of_another_layout_ends_the_plain_run() {
        let mut out = Outbox::default();
        out.begin(10);
        out.push_result(&1u64).unwrap();
        out.push_result(&2u64).unwrap();
        out.push_result(&"three".to_string()).unwrap();
        out.push_result(&4u64).unwrap();
        out.close_run();
        // Two frames: a plain run of tasks 10-11, then a postcard run of tasks 12-13.
        let mut frames = &out.frames[..];
        let mut runs = Vec::new();
        while !frames.is_empty() {
            let len = u64::from_le_bytes(frames[..8].try_into().unwrap()) as usize;
            let body = &frames[ipc::HEADER..ipc::HEADER + len];
            let (h, results) = postcard::take_from_bytes::<DoneHeader>(body).unwrap();
            runs.push((h.first_seq, h.count, h.shape.is_some(), results.len()));
            frames = &frames[ipc::HEADER + len..];
        }
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert_eq!(runs[0], (10, 2, true, 16));
        let (first, count, plain, _) = runs[1];
        assert_eq!((first, count, plain), (12, 2, false));
    }
}
