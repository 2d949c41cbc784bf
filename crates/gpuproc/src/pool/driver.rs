//! The pool's driver thread: owns the workers, sends them work, collects results, replaces
//! the dead, enforces task timeouts.
//!
//! API calls hand chunks of encoded tasks to the driver through a queue and an eventfd; the
//! outcomes go back on each job's channel, a batch of runs per wake-up. The driver never
//! blocks on a worker: sends are non-blocking with a per-worker outbox, and one `poll`
//! covers every descriptor.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::buffers::Buffers;
use super::lens::Lens;
use super::policy::{self, AfterDeath};
use super::shm_args::{ShmArgs, ShmPool};
use super::worker::{
    self, ChunkHeader, DoneHeader, FnRef, ToWorker, WorkerArgs, WorkerError, PHASE_AT, RUNNING_AT,
    STARTED_AT,
};
use super::{Config, PoolError};
use crate::ipc::{self, FrameReader};
use crate::process::wire::Failure;
use crate::process::{Process, ProcessError, StartMethod};
use crate::sys::seqpacket::MapCache;
use crate::sys::shm::Mapping;
use crate::sys::{self, ExitStatus, Waker};

/// Outcomes of consecutive tasks of one job: the successful ones' encoded results back to
/// back, and the failures.
#[derive(Debug, Default)]
pub(crate) struct Run {
    pub first_index: u64,
    /// Each task's result length (0 for a failure).
    pub lens: Lens,
    /// Each task's result descriptor count (empty: none).
    pub nfds: Vec<u32>,
    pub results: Results,
    /// The shape of the results when they are plain data (see `plain`), else postcard.
    pub shape: Option<Vec<u8>>,
    pub fds: Vec<OwnedFd>,
    /// Failed tasks, by offset in the run.
    pub errors: Vec<(u32, PoolError)>,
    /// Each task's GPU memory peak as sampled while it ran (empty: no samples).
    pub peaks: Vec<u64>,
    /// Each task's GPU accounting from the sampler (empty: none; local workers only).
    pub accounting: Vec<crate::gpu::GpuAccounting>,
}

impl Run {
    fn failure(index: u64, err: PoolError) -> Run {
        Run {
            first_index: index,
            lens: Lens::Fixed { len: 0, count: 1 },
            errors: vec![(0, err)],
            ..Run::default()
        }
    }
}

/// A run's encoded results: a buffer of their own (results that came in the worker's
/// frame), or a range of the memfd a worker lent them in, read in place.
///
/// A lent memfd is handed back to its worker (see [`Lent`]) once every run that reads from
/// it is dropped, so the bytes stay put while they are decoded: the worker never writes a
/// memfd it has lent. (Only code running in the worker process with the memfd's descriptor
/// could; decoding still checks every length and validates strings, so changed bytes could
/// give wrong values or a decode error, never a bad memory access.)
#[derive(Debug)]
pub(crate) enum Results {
    Owned(Vec<u8>),
    Lent {
        map: Arc<crate::sys::seqpacket::Mapping>,
        at: usize,
        len: usize,
        _lent: Arc<Lent>,
    },
}

impl Default for Results {
    fn default() -> Self {
        Results::Owned(Vec::new())
    }
}

impl Results {
    /// The encoded results, back to back.
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Results::Owned(v) => v,
            Results::Lent { map, at, len, .. } => map
                .bytes()
                .get(*at..at.saturating_add(*len))
                .unwrap_or_default(),
        }
    }

    /// Gives an owned buffer back to `buffers` for reuse (a lent memfd goes back to its
    /// worker when the last run reading it is dropped).
    pub(crate) fn recycle(self, buffers: &Buffers) {
        if let Results::Owned(v) = self {
            buffers.give(v);
        }
    }
}

/// What a job's channel carries.
#[derive(Debug)]
pub(crate) enum ToJob {
    /// Outcomes of tasks.
    Runs(Vec<Run>),
    /// The driver thread panicked (the message): no more outcomes will come.
    DriverDied(String),
}

/// A submission (`map`, `imap`, `apply_async`): where its outcomes go.
pub(crate) struct Job {
    pub tx: Mutex<Sender<ToJob>>,
    /// Set when nobody waits for the results any more: pending tasks are dropped.
    pub cancelled: AtomicBool,
    /// When set, messages go here instead of `tx` (jobs with callbacks: the closure hands
    /// them to the pool's callback thread, never blocking the driver).
    pub forward: Option<Box<dyn Fn(ToJob) + Send + Sync>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("cancelled", &self.cancelled)
            .field("forwarded", &self.forward.is_some())
            .finish_non_exhaustive()
    }
}

impl Job {
    fn send(&self, runs: Vec<Run>) {
        self.send_raw(ToJob::Runs(runs));
    }

    fn send_raw(&self, msg: ToJob) {
        if let Some(forward) = &self.forward {
            return forward(msg);
        }
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.send(msg);
    }
}

/// The jobs that may still wait for outcomes, so that a dying driver can tell them (the
/// waiting side holds a sender of its own channel, which therefore never disconnects).
#[derive(Debug, Default)]
pub(crate) struct Jobs {
    live: Vec<Weak<Job>>,
    /// Forget finished jobs when `live` reaches this length.
    prune_at: usize,
}

impl Jobs {
    pub fn register(&mut self, job: &Arc<Job>) {
        if self.live.len() >= self.prune_at {
            self.live.retain(|j| j.strong_count() > 0);
            self.prune_at = (self.live.len() * 2).max(64);
        }
        self.live.push(Arc::downgrade(job));
    }
}

/// The driver thread panicked with `message`: refuse new work, and fail every job that may
/// still wait (their tasks, queued or running, are lost with the driver's state; its
/// workers were killed as it unwound).
pub(crate) fn driver_died(shared: &Shared, message: String) {
    let queued = {
        let mut inbox = shared.inbox();
        inbox.dead = Some(message.clone());
        std::mem::take(&mut inbox.chunks)
    };
    drop(queued);
    let jobs = std::mem::take(&mut shared.jobs.lock().unwrap_or_else(|p| p.into_inner()).live);
    for job in jobs.iter().filter_map(Weak::upgrade) {
        job.send_raw(ToJob::DriverDied(message.clone()));
    }
    if let Ok(mut p) = shared.pids.lock() {
        p.clear();
    }
}

/// Consecutive tasks of one job, encoded, that go to a worker together.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub job: Arc<Job>,
    pub func: FnRef,
    pub first_index: u64,
    /// The arguments, back to back, unless they are in `shm`.
    pub args: Vec<u8>,
    /// The arguments, when they grew large enough to go through shared memory.
    pub shm: Option<ShmArgs>,
    /// The shape of the arguments when they are plain data (see `plain`), else postcard.
    pub shape: Option<Vec<u8>>,
    pub lens: Lens,
    /// Descriptor count per task (empty: none).
    pub nfds: Vec<u32>,
    pub fds: Vec<OwnedFd>,
    /// Runs of these tasks that ended with a worker dying under them.
    pub attempts: u32,
}

impl Chunk {
    pub fn len(&self) -> usize {
        self.lens.len()
    }

    /// The arguments' bytes, wherever they are.
    pub fn arg_bytes(&self) -> &[u8] {
        match &self.shm {
            Some(shm) => shm.bytes(),
            None => &self.args,
        }
    }

    /// How many bytes of arguments the chunk holds.
    pub fn args_len(&self) -> usize {
        self.arg_bytes().len()
    }

    /// Forgets the arguments' bytes from `len` on.
    pub fn truncate_args(&mut self, len: usize) {
        match &mut self.shm {
            Some(shm) => shm.truncate(len),
            None => self.args.truncate(len),
        }
    }

    /// Splits off the tasks from `k` on. (Arguments in shared memory come back to the heap
    /// first: this is the rare path of a worker that left in the middle of a chunk.)
    pub fn split_off(&mut self, k: usize) -> Chunk {
        if let Some(shm) = self.shm.take() {
            self.args = shm.bytes().to_vec();
        }
        let bytes = self.lens.bytes_before(k);
        let nfds_before: usize = self.nfds.iter().take(k).map(|&n| n as usize).sum();
        Chunk {
            job: self.job.clone(),
            func: self.func,
            first_index: self.first_index + k as u64,
            args: self.args.split_off(bytes),
            shm: None,
            shape: self.shape.clone(),
            lens: self.lens.split_off(k),
            nfds: if self.nfds.is_empty() {
                Vec::new()
            } else {
                self.nfds.split_off(k)
            },
            fds: self.fds.split_off(nfds_before),
            attempts: self.attempts,
        }
    }
}

/// How many pools' driver threads are running in this process (counted from before each
/// starts until its pool has joined it): threads a `Fork` pool may fork beside.
pub(crate) static DRIVER_THREADS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// Refuses [`StartMethod::Fork`] now if this process has threads other than the caller and
/// pools' driver threads, unless the pool allows it (see
/// [`PoolBuilder::allow_fork_with_threads`](super::PoolBuilder::allow_fork_with_threads)).
pub(crate) fn check_fork(config: &Config) -> Result<(), PoolError> {
    if config.start_method != StartMethod::Fork || config.allow_fork_with_threads {
        return Ok(());
    }
    let threads = sys::thread_count().map_err(io("counting threads"))?;
    if policy::fork_refused(threads, DRIVER_THREADS.load(Ordering::SeqCst)) {
        return Err(PoolError::ForkUnsafe { threads });
    }
    Ok(())
}

/// What API calls ask of the driver.
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    pub chunks: VecDeque<Chunk>,
    pub close: bool,
    pub terminate: bool,
    /// Set when the driver thread has died (its panic message): nothing is taken any more.
    pub dead: Option<String>,
    /// Fault injection for tests: the driver panics when it next looks at the inbox.
    pub panic_driver: bool,
}

/// The state shared between the `Pool` handle and its driver.
#[derive(Debug)]
pub(crate) struct Shared {
    pub inbox: Mutex<Inbox>,
    /// Chunk and run buffers for reuse.
    pub buffers: Buffers,
    /// Memfds for large chunk arguments, for reuse.
    pub shm: Arc<ShmPool>,
    pub waker: Waker,
    /// The driver is (about to be) blocked in `poll`: submitters must wake it.
    pub sleeping: AtomicBool,
    pub pids: Mutex<Vec<u32>>,
    /// Every job that may still wait for outcomes.
    pub jobs: Mutex<Jobs>,
    /// Per worker slot: its GPUs and the GPU memory the sampler saw.
    pub usage: Mutex<Vec<super::WorkerGpuUsage>>,
    /// How many chunks (one frame each) have been sent to workers, for tests.
    pub chunks_sent: AtomicU64,
}

impl Shared {
    /// The inbox, also after a thread panicked holding it (its state stays consistent: every
    /// change is a single assignment or push).
    pub fn inbox(&self) -> std::sync::MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Chunk arguments up to this size are copied into the outbox (so that many small chunks
/// go out in one write); larger ones are sent from the chunk itself.
const COPY_MAX: usize = 64 * 1024;

/// Bytes waiting in a worker's outbox: `head` (whole small frames, or the start of a large
/// chunk's frame), then, for a large chunk, its arguments, sent in place from the chunk in
/// `Worker::sent` whose first sequence number is `body`.
struct OutFrame {
    head: Vec<u8>,
    body: Option<u64>,
    /// The descriptors, sent with the first byte.
    fds: Vec<OwnedFd>,
    /// Bytes already sent.
    sent: usize,
}

/// A chunk a worker is working on.
struct Sent {
    chunk: Chunk,
    /// The worker's sequence number of its first task.
    first_seq: u64,
    /// How many of its tasks have reported (always a prefix: workers run in order).
    done: usize,
}

struct Worker {
    process: Process<WorkerArgs, Result<(), WorkerError>>,
    /// Its slot (0-based); a replacement takes the slot of the worker it replaces.
    slot: usize,
    pid: u32,
    conn: OwnedFd,
    page: Mapping,
    reader: FrameReader,
    /// Frames not yet (fully) sent.
    outbox: VecDeque<OutFrame>,
    sent: VecDeque<Sent>,
    /// Tasks sent and not yet reported.
    tasks_inflight: usize,
    next_seq: u64,
    /// Tasks it may still be sent before it exits (`max_tasks_per_child`).
    budget: Option<u64>,
    /// The task (sequence number) it was killed for exceeding the timeout, if any.
    timed_out: Option<u64>,
    /// Since when (in [`sys::monotonic_ns`]) it has had a task to start and not started it
    /// (see [`policy::not_started`]).
    waiting_since: Option<u64>,
    eof: bool,
    /// GPU memory peaks a remote worker's node sampled while tasks ran, by sequence
    /// number, until reported (a local worker's are in `task_acct`).
    task_peaks: std::collections::HashMap<u64, u64>,
    /// The sampler's accounting of each task while it ran, by sequence number, until
    /// reported.
    task_acct: std::collections::HashMap<u64, crate::gpu::GpuAccountant>,
    /// Its GPU accounting over its lifetime, from the sampler.
    accountant: crate::gpu::GpuAccountant,
}

pub(crate) struct Driver {
    config: Arc<Config>,
    shared: Arc<Shared>,
    workers: Vec<Worker>,
    pending: VecDeque<Chunk>,
    closing: bool,
    /// When the GPU memory sampler runs next.
    next_sample: Option<Instant>,
    /// Workers in a row whose initializer failed, with no task finished since.
    init_failures: u32,
    /// Slots whose worker could not be replaced (tried again when no worker is left).
    missing: Vec<usize>,
    /// Set once the initializer has failed too often (see
    /// [`policy::initializer_broken`]): no more workers are started, and tasks fail.
    broken: Option<String>,
    /// Mappings of the memfds that large results come in, kept for their reuse.
    memfds: MapCache,
}

fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> PoolError {
    move |source| PoolError::Io { context, source }
}

impl Driver {
    /// Starts `config.processes` workers (from the calling thread, so that a `Fork` pool in a
    /// single-threaded program forks safely).
    pub fn new(config: Arc<Config>, shared: Arc<Shared>) -> Result<Self, PoolError> {
        let mut d = Driver {
            config,
            shared,
            workers: Vec::new(),
            pending: VecDeque::new(),
            closing: false,
            next_sample: None,
            init_failures: 0,
            missing: Vec::new(),
            broken: None,
            memfds: MapCache::default(),
        };
        for i in 0..d.config.processes {
            let w = d.start_worker(i)?;
            d.workers.push(w);
        }
        d.publish_pids();
        Ok(d)
    }

    fn publish_pids(&self) {
        if let Ok(mut p) = self.shared.pids.lock() {
            *p = self.workers.iter().map(|w| w.pid).collect();
        }
        if let Ok(mut usage) = self.shared.usage.lock() {
            let devices = |slot: usize| -> Vec<String> {
                let Some(g) = &self.config.gpus else {
                    return Vec::new();
                };
                g.slots()
                    .get(slot)
                    .map(|s| s.iter().map(|d| d.uuid.clone()).collect())
                    .unwrap_or_default()
            };
            let mut next: Vec<super::WorkerGpuUsage> = self
                .workers
                .iter()
                .map(|w| {
                    let old = usage.iter().find(|u| u.pid == w.pid);
                    super::WorkerGpuUsage {
                        slot: w.slot,
                        pid: w.pid,
                        devices: devices(w.slot),
                        memory: old.map_or(0, |u| u.memory),
                        peak_memory: old.map_or(0, |u| u.peak_memory),
                        mean_memory: old.map_or(0, |u| u.mean_memory),
                        mean_sm_percent: old.and_then(|u| u.mean_sm_percent),
                        energy_mj: old.and_then(|u| u.energy_mj),
                        node: old.map(|u| u.node.clone()).unwrap_or_default(),
                        gpus: old.map(|u| u.gpus.clone()).unwrap_or_default(),
                    }
                })
                .collect();
            next.sort_by_key(|u| u.slot);
            *usage = next;
        }
    }

    /// Reads each worker's GPU use through NVML: keeps the peaks and its accounting
    /// (remote workers': their memory as their nodes last sampled it).
    fn sample_gpu_memory(&mut self) {
        if self.config.launcher.is_some() {
            return self.sample_remote_gpu_memory();
        }
        let Ok(gpus) = crate::gpu::global() else {
            return;
        };
        let Ok(mut usage) = self.shared.usage.lock() else {
            return;
        };
        for w in &mut self.workers {
            let Ok(now) = gpus.usage_detailed(w.pid, true) else {
                continue;
            };
            let t_ms = crate::gpu::now_ms();
            w.accountant.record(t_ms, &now);
            let memory: u64 = now.devices.iter().map(|d| d.used_memory).sum();
            if let Some(u) = usage.iter_mut().find(|u| u.pid == w.pid) {
                u.memory = memory;
                u.peak_memory = u.peak_memory.max(memory);
                u.set_accounting(&w.accountant.accounting());
            }
            // Charge the sample to the task running now.
            if let Some(seq) = w
                .page
                .atomic_u64(RUNNING_AT)
                .load(Ordering::Acquire)
                .checked_sub(1)
            {
                w.task_acct.entry(seq).or_default().record(t_ms, &now);
            }
        }
    }

    /// Reads each remote worker's latest GPU sample (see `remote_gpu`) and keeps the peaks.
    fn sample_remote_gpu_memory(&mut self) {
        let Ok(mut usage) = self.shared.usage.lock() else {
            return;
        };
        for w in &mut self.workers {
            let mut u = usage.iter_mut().find(|u| u.pid == w.pid);
            let Some((memory, running)) = super::remote_gpu::read_into(&w.page, u.as_deref_mut())
            else {
                continue;
            };
            if let Some(u) = u {
                u.memory = memory;
                u.peak_memory = u.peak_memory.max(memory);
            }
            // Charge the sample to the task the worker was running when it took it.
            if let Some(seq) = running.checked_sub(1) {
                let peak = w.task_peaks.entry(seq).or_insert(0);
                *peak = (*peak).max(memory);
            }
        }
    }

    fn start_worker(&self, slot: usize) -> Result<Worker, PoolError> {
        let (ours, theirs) = sys::socketpair().map_err(io("creating a worker connection"))?;
        // Chunks and runs of results are up to a few MiB: each should take few writes.
        for end in [&ours, &theirs] {
            sys::set_send_buffer(end.as_fd(), 4 << 20);
        }
        let page = Mapping::anonymous("gpuproc-pool-worker", worker::PAGE_LEN)
            .map_err(io("creating a worker status page"))?;
        let page_fd = sys::dup(page.fd()).map_err(io("sharing the status page"))?;
        let args = WorkerArgs {
            conn: theirs,
            page: page_fd,
            init: self.config.init.clone(),
            max_tasks: self.config.max_tasks_per_child,
            track_time: self.config.task_timeout.is_some(),
            launcher: self.config.launcher.clone(),
            remote: false,
        };
        // Checked here, with the pools' own threads left out (replacements fork from the
        // driver thread).
        check_fork(&self.config)?;
        let mut p = Process::new(worker::worker_main, args)
            .with_name(format!("PoolWorker-{}", slot + 1))
            .with_start_method(self.config.start_method)
            .allow_fork_with_threads(true);
        for (k, v) in &self.config.env {
            p = p.with_env(k.clone(), v.clone());
        }
        if let Some(f) = &self.config.worker_env {
            for (k, v) in f(slot) {
                p = p.with_env(k, v);
            }
        }
        if let Some(g) = &self.config.gpus {
            for (k, v) in g.env(slot) {
                p = p.with_env(k, v);
            }
        }
        p.start().map_err(PoolError::Start)?;
        let pid = p.pid().expect("started");
        Ok(Worker {
            process: p,
            slot,
            pid,
            conn: ours,
            page,
            reader: FrameReader::default(),
            outbox: VecDeque::new(),
            sent: VecDeque::new(),
            tasks_inflight: 0,
            next_seq: 0,
            budget: self.config.max_tasks_per_child,
            timed_out: None,
            waiting_since: None,
            eof: false,
            task_peaks: std::collections::HashMap::new(),
            task_acct: std::collections::HashMap::new(),
            accountant: crate::gpu::GpuAccountant::default(),
        })
    }

    /// The driver loop; returns when the pool is joined or terminated.
    pub fn run(mut self) {
        loop {
            let (terminate, close) = self.take_inbox();
            if terminate {
                self.terminate();
                return;
            }
            self.closing |= close;
            self.dispatch();
            if self.closing
                && self.pending.is_empty()
                && self.workers.iter().all(|w| w.sent.is_empty())
            {
                self.shutdown();
                return;
            }
            if let Err(e) = self.wait_and_handle() {
                eprintln!("gpuproc pool: {e}");
                self.terminate();
                return;
            }
        }
    }

    fn take_inbox(&mut self) -> (bool, bool) {
        self.shared.waker.reset();
        let mut inbox = self.shared.inbox();
        self.pending.extend(inbox.chunks.drain(..));
        let (terminate, close, fault) = (inbox.terminate, inbox.close, inbox.panic_driver);
        drop(inbox);
        if fault {
            panic!("a fault injected for tests");
        }
        (terminate, close)
    }

    /// Sends pending chunks to workers with room, least loaded first.
    fn dispatch(&mut self) {
        if self.workers.is_empty() {
            if let Some(message) = self.broken.clone() {
                self.fail_all_pending(|index| PoolError::InitializerFailed {
                    index,
                    message: message.clone(),
                });
                return;
            }
            if !self.pending.is_empty() && !self.missing.is_empty() {
                // Workers that could not be replaced (a `Fork` pool refused to fork beside
                // threads started since, say): try again, or fail the work, never hang.
                let mut reason = String::new();
                for slot in std::mem::take(&mut self.missing) {
                    match self.start_worker(slot) {
                        Ok(w) => self.workers.push(w),
                        Err(e) => {
                            reason = e.to_string();
                            self.missing.push(slot);
                        }
                    }
                }
                self.publish_pids();
                if self.workers.is_empty() {
                    self.fail_all_pending(|index| PoolError::NoWorker {
                        index,
                        reason: reason.clone(),
                    });
                    return;
                }
            }
        }
        while let Some(chunk) = self.pending.front() {
            if chunk.job.cancelled.load(Ordering::Relaxed) {
                self.pending.pop_front();
                continue;
            }
            let len = chunk.len();
            let best = self
                .workers
                .iter()
                .enumerate()
                .filter(|(_, w)| !w.eof && w.budget != Some(0))
                .filter(|(_, w)| {
                    policy::may_dispatch(
                        w.sent.len(),
                        w.tasks_inflight,
                        len.min(policy::MAX_ITEMS_IN_FLIGHT),
                    )
                })
                .min_by_key(|(_, w)| w.tasks_inflight)
                .map(|(i, _)| i);
            let Some(wi) = best else { break };
            let mut chunk = self.pending.pop_front().expect("front exists");
            let take = policy::take_for_budget(chunk.len(), self.workers[wi].budget);
            if take < chunk.len() {
                let rest = chunk.split_off(take);
                self.pending.push_front(rest);
            }
            send_chunk(&mut self.workers[wi], chunk);
            self.shared.chunks_sent.fetch_add(1, Ordering::Relaxed);
        }
        // One write per worker for everything queued this round.
        for w in &mut self.workers {
            if !w.outbox.is_empty() && flush_outbox(w).is_err() {
                w.eof = true;
            }
        }
    }

    /// One round: poll every descriptor, then read results, write outboxes, handle deaths
    /// and timeouts.
    fn wait_and_handle(&mut self) -> std::io::Result<()> {
        let mut deadline = self.next_timeout_check();
        if let Some(every) = self.config.gpu_sampling {
            let now = Instant::now();
            let at = *self.next_sample.get_or_insert(now);
            if at <= now {
                self.sample_gpu_memory();
                self.next_sample = Some(crate::time::saturating_add(now, every));
            }
            let next = self.next_sample.expect("set above");
            deadline = Some(deadline.map_or(next, |d| d.min(next)));
        }
        // Announce the sleep, then look once more: a submitter either sees the flag and
        // wakes us, or its work is already in the inbox (both sides use SeqCst).
        self.shared.sleeping.store(true, Ordering::SeqCst);
        let queued = {
            let inbox = self.shared.inbox();
            !inbox.chunks.is_empty() || inbox.close || inbox.terminate
        };
        let ready = {
            let mut fds: Vec<(BorrowedFd<'_>, bool)> = vec![(self.shared.waker.fd(), false)];
            for w in &self.workers {
                fds.push((w.conn.as_fd(), !w.outbox.is_empty()));
            }
            sys::poll(
                &fds,
                if queued {
                    Some(Instant::now())
                } else {
                    deadline
                },
            )?
        };
        self.shared.sleeping.store(false, Ordering::SeqCst);
        let mut deliveries: Vec<(Arc<Job>, Vec<Run>)> = Vec::new();
        let mut dead = Vec::new();
        for (i, r) in ready.iter().skip(1).enumerate() {
            let w = &mut self.workers[i];
            if r.write && flush_outbox(w).is_err() {
                w.eof = true;
            }
            if r.read {
                if w.reader.fill(w.conn.as_fd()).is_err() {
                    w.eof = true;
                }
                // Frames are read in place: the reader is set aside meanwhile.
                let mut reader = std::mem::take(&mut w.reader);
                while let Ok(Some((bytes, fds))) = reader.next_frame_ref() {
                    let got = receive(
                        w,
                        bytes,
                        fds,
                        &self.shared.buffers,
                        &self.memfds,
                        &mut deliveries,
                    );
                    if let Err(e) = got {
                        eprintln!(
                            "gpuproc pool: worker pid {} sent a malformed result ({e}); \
                             replacing it",
                            w.pid
                        );
                        let _ = w.process.kill();
                        w.eof = true;
                        break;
                    }
                }
                w.reader = reader;
                if !deliveries.is_empty() {
                    // A worker got past its initializer and ran tasks.
                    self.init_failures = 0;
                }
                if w.reader.at_eof() {
                    w.eof = true;
                }
            }
            if w.eof {
                dead.push(i);
            }
        }
        deliver(deliveries);
        self.check_timeouts();
        for i in dead.into_iter().rev() {
            self.replace(i);
        }
        Ok(())
    }

    fn next_timeout_check(&mut self) -> Option<Instant> {
        let timeout = self.config.task_timeout?;
        let now_ns = sys::monotonic_ns();
        self.note_waiting(now_ns);
        // A timeout past the clock's range never expires: no check is ever due.
        let mut next = crate::time::deadline(timeout)?;
        for w in &self.workers {
            let since = if w.page.atomic_u64(RUNNING_AT).load(Ordering::Acquire) != 0 {
                Some(w.page.atomic_u64(STARTED_AT).load(Ordering::Relaxed))
            } else {
                None
            };
            for since in since.into_iter().chain(w.waiting_since) {
                let ran = Duration::from_nanos(now_ns.saturating_sub(since));
                if let Some(due) = crate::time::deadline(timeout.saturating_sub(ran)) {
                    next = next.min(due);
                }
            }
        }
        Some(next)
    }

    /// Notes, for each worker, since when it has had a task to start and not started it.
    fn note_waiting(&mut self, now_ns: u64) {
        let forked = self.config.start_method == StartMethod::Fork;
        for w in &mut self.workers {
            let next_seq = w
                .sent
                .iter()
                .find(|s| s.done < s.chunk.len())
                .and_then(|s| s.first_seq.checked_add(s.done as u64));
            let waiting = next_seq.filter(|&seq| {
                let phase = w.page.atomic_u64(PHASE_AT).load(Ordering::Acquire);
                let running = w.page.atomic_u64(RUNNING_AT).load(Ordering::Acquire);
                policy::not_started(phase, running, seq, forked)
            });
            if waiting.is_none() {
                w.waiting_since = None;
            } else if w.waiting_since.is_none() {
                w.waiting_since = Some(now_ns);
            }
        }
    }

    fn check_timeouts(&mut self) {
        let Some(timeout) = self.config.task_timeout else {
            return;
        };
        let now_ns = sys::monotonic_ns();
        self.note_waiting(now_ns);
        let expired = |since: u64| Duration::from_nanos(now_ns.saturating_sub(since)) >= timeout;
        for w in &mut self.workers {
            if w.timed_out.is_some() {
                continue;
            }
            let running = w.page.atomic_u64(RUNNING_AT).load(Ordering::Acquire);
            if let Some(seq) = running.checked_sub(1) {
                if expired(w.page.atomic_u64(STARTED_AT).load(Ordering::Relaxed)) {
                    w.timed_out = Some(seq);
                    let _ = w.process.kill();
                    continue;
                }
            }
            // Hung before it started its next task: that task is the one that timed out.
            if w.waiting_since.is_some_and(expired) {
                w.timed_out = w
                    .sent
                    .iter()
                    .find(|s| s.done < s.chunk.len())
                    .and_then(|s| s.first_seq.checked_add(s.done as u64));
                let _ = w.process.kill();
            }
        }
    }

    /// A worker's connection closed: learn how it ended, settle its tasks, start another.
    fn replace(&mut self, i: usize) {
        let mut init_failed = None;
        // A worker on another machine that was lost: all it had in flight fails (or runs
        // again), since which of its tasks was running is not known here.
        let mut lost = None;
        let status = match self.workers[i]
            .process
            .join_timeout(Duration::from_secs(10))
        {
            Ok(Err(WorkerError::Initializer(message))) => {
                init_failed = Some(message);
                ExitStatus::Code(0)
            }
            Ok(Err(WorkerError::Lost { node, reason })) => {
                lost = Some((node, reason));
                ExitStatus::Code(0)
            }
            Ok(_) => ExitStatus::Code(0),
            Err(ProcessError::Killed { signal, .. }) => ExitStatus::Signal(signal),
            Err(ProcessError::Exited { code, .. }) => ExitStatus::Code(code),
            Err(_) => {
                let _ = self.workers[i].process.kill();
                ExitStatus::Signal(9)
            }
        };
        let mut w = self.workers.swap_remove(i);
        let slot = w.slot;
        let running = w
            .page
            .atomic_u64(RUNNING_AT)
            .load(Ordering::Acquire)
            .checked_sub(1);
        let culprit_seq = w.timed_out.or(running);
        let mut requeue: Vec<Chunk> = Vec::new();
        for sent in w.sent.drain(..) {
            let Sent {
                mut chunk,
                first_seq,
                done,
            } = sent;
            // Tasks that reported are settled; the rest never ran, ran and lost their
            // results with the worker (they run again), or killed it.
            let mut rest = chunk.split_off(done);
            if rest.len() == 0 {
                continue;
            }
            if let Some((node, reason)) = &lost {
                rest.attempts += 1;
                match policy::after_worker_death(rest.attempts, self.config.retries) {
                    AfterDeath::Retry => requeue.push(rest),
                    AfterDeath::Fail => {
                        let runs = (rest.first_index..rest.first_index + rest.len() as u64)
                            .map(|index| {
                                let err = PoolError::WorkerLost {
                                    index,
                                    node: node.clone(),
                                    reason: reason.clone(),
                                };
                                Run::failure(index, err)
                            })
                            .collect();
                        rest.job.send(runs);
                    }
                }
                continue;
            }
            let start = first_seq + done as u64;
            match culprit_seq.filter(|&c| c >= start && c < start + rest.len() as u64) {
                None => requeue.push(rest),
                Some(c) => {
                    let k = (c - start) as usize;
                    let mut culprit = rest.split_off(k);
                    let after = culprit.split_off(1);
                    if !rest.lens.is_empty() {
                        requeue.push(rest);
                    }
                    culprit.attempts += 1;
                    let index = culprit.first_index;
                    match policy::after_worker_death(culprit.attempts, self.config.retries) {
                        AfterDeath::Retry => requeue.push(culprit),
                        AfterDeath::Fail => {
                            let err = match (w.timed_out, self.config.task_timeout) {
                                (Some(_), Some(timeout)) => PoolError::TimedOut { index, timeout },
                                _ => PoolError::WorkerDied {
                                    index,
                                    pid: w.pid,
                                    status,
                                },
                            };
                            culprit.job.send(vec![Run::failure(index, err)]);
                        }
                    }
                    if !after.lens.is_empty() {
                        requeue.push(after);
                    }
                }
            }
        }
        // Back to the front of the queue, in their order.
        for c in requeue.into_iter().rev() {
            self.pending.push_front(c);
        }
        if let Some(message) = init_failed {
            eprintln!(
                "gpuproc pool: the initializer failed in worker pid {}: {message}",
                w.pid
            );
            self.init_failures += 1;
            if policy::initializer_broken(self.init_failures, self.config.processes) {
                self.broken = Some(message);
            }
        }
        if self.broken.is_some() {
            // No more workers; once none is left, every queued task fails (see `dispatch`).
            self.publish_pids();
            return;
        }
        if !self.closing || !self.pending.is_empty() {
            match self.start_worker(slot) {
                Ok(nw) => self.workers.push(nw),
                Err(e) => {
                    eprintln!("gpuproc pool: {e:?}"); // the message and its causes
                    self.missing.push(slot);
                    if self.workers.is_empty() {
                        let reason = format!("{e:?}");
                        self.fail_all_pending(|index| PoolError::NoWorker {
                            index,
                            reason: reason.clone(),
                        });
                    }
                }
            }
        }
        self.publish_pids();
    }

    fn fail_all_pending(&mut self, err: impl Fn(u64) -> PoolError) {
        for chunk in self.pending.drain(..) {
            let runs = (0..chunk.len() as u64)
                .map(|k| Run::failure(chunk.first_index + k, err(chunk.first_index + k)))
                .collect();
            chunk.job.send(runs);
        }
    }

    fn terminate(&mut self) {
        for w in &self.workers {
            let _ = w.process.kill();
        }
        let mut unfinished = Vec::new();
        for mut w in self.workers.drain(..) {
            let _ = w.process.join_timeout(Duration::from_secs(10));
            for mut sent in w.sent.drain(..) {
                unfinished.push(sent.chunk.split_off(sent.done));
            }
        }
        for c in unfinished.into_iter().rev() {
            self.pending.push_front(c);
        }
        self.fail_all_pending(|index| PoolError::Terminated { index });
        self.publish_pids();
    }

    /// All work is done: ask each worker to exit, and wait for it.
    fn shutdown(&mut self) {
        for w in self.workers.drain(..) {
            let Worker {
                mut process, conn, ..
            } = w;
            if let Ok(stop) = crate::codec::to_vec(&ToWorker::Stop) {
                let _ = ipc::send_frame(conn.as_fd(), &stop, &[]);
            }
            drop(conn);
            if process.join_timeout(Duration::from_secs(30)).is_err() {
                let _ = process.kill();
            }
        }
        self.publish_pids();
    }
}

/// Queues one chunk for a worker (coalescing with what is not yet on the wire).
fn send_chunk(w: &mut Worker, mut chunk: Chunk) {
    let header = ToWorker::Chunk(ChunkHeader {
        func: chunk.func,
        first_seq: w.next_seq,
        shape: chunk.shape.clone(),
        lens: chunk.lens.clone(),
        nfds: chunk.nfds.clone(),
        in_memfd: chunk.shm.is_some(),
    });
    let Ok(header) = crate::codec::to_vec(&header) else {
        // A header of integers always encodes.
        return;
    };
    let mut fds: Vec<OwnedFd> = std::mem::take(&mut chunk.fds);
    // Keep our own copies of the descriptors, to send again if the worker dies.
    chunk.fds = fds
        .iter()
        .filter_map(|f| sys::dup(f.as_fd()).ok())
        .collect();
    // Arguments in a memfd: it goes last among the frame's descriptors, and the frame
    // carries no arguments itself.
    if let Some(fd) = chunk.shm.as_ref().and_then(|s| s.fd()) {
        match sys::dup(fd) {
            Ok(fd) => fds.push(fd),
            Err(_) => {
                if let Some(shm) = chunk.shm.take() {
                    chunk.args = shm.bytes().to_vec();
                }
                return send_chunk(w, chunk);
            }
        }
    }
    let frame_len = header.len() + chunk.args.len();
    match w.outbox.back_mut() {
        Some(f) if f.sent == 0 && f.body.is_none() && chunk.args.len() <= COPY_MAX => {
            ipc::append_frame_parts(&mut f.head, &[&header, &chunk.args], fds.len());
            f.fds.extend(fds);
        }
        _ if chunk.args.len() <= COPY_MAX => {
            let mut head = Vec::new();
            ipc::append_frame_parts(&mut head, &[&header, &chunk.args], fds.len());
            w.outbox.push_back(OutFrame {
                head,
                body: None,
                fds,
                sent: 0,
            });
        }
        _ => {
            let mut head = ipc::frame_header(frame_len, fds.len()).to_vec();
            head.extend_from_slice(&header);
            w.outbox.push_back(OutFrame {
                head,
                body: Some(w.next_seq),
                fds,
                sent: 0,
            });
        }
    }
    let n = chunk.len();
    w.sent.push_back(Sent {
        chunk,
        first_seq: w.next_seq,
        done: 0,
    });
    w.next_seq += n as u64;
    w.tasks_inflight += n;
    if let Some(b) = w.budget.as_mut() {
        *b = b.saturating_sub(n as u64);
    }
}

fn flush_outbox(w: &mut Worker) -> std::io::Result<()> {
    while let Some(f) = w.outbox.front_mut() {
        let body: &[u8] = match f.body {
            None => &[],
            Some(seq) => match w.sent.iter().find(|s| s.first_seq == seq) {
                Some(s) => &s.chunk.args,
                None => return Err(std::io::Error::other("a queued chunk went missing")),
            },
        };
        let borrowed: Vec<BorrowedFd<'_>> = if f.sent == 0 {
            f.fds.iter().map(|f| f.as_fd()).collect()
        } else {
            Vec::new()
        };
        let n = sys::send_nonblocking(w.conn.as_fd(), &[&f.head, body], f.sent, &borrowed)?;
        if n == 0 {
            return Ok(());
        }
        f.sent += n;
        if f.sent < f.head.len() + body.len() {
            return Ok(());
        }
        w.outbox.pop_front();
    }
    Ok(())
}

/// A worker's memfd of results, handed back (see `shm_args`) when dropped.
#[derive(Debug)]
pub(crate) struct Lent(OwnedFd, u64);

impl Drop for Lent {
    fn drop(&mut self) {
        sys::seqpacket::release_pooled(self.0.as_fd(), self.1);
    }
}

/// Checks a run of results from a worker before it is split over chunks: a worker's frame
/// is not trusted to be well formed (its process may be broken, or not ours). `expected_seq`
/// is the worker's first unreported task, `inflight` how many it has; `results` and `fds`
/// what came with the header.
fn check_run(
    done: &DoneHeader,
    expected_seq: Option<u64>,
    inflight: usize,
    results: usize,
    fds: usize,
) -> Result<(), String> {
    let count = usize::try_from(done.count).map_err(|e| e.to_string())?;
    if count == 0 {
        return Err("an empty run".into());
    }
    if expected_seq != Some(done.first_seq) {
        return Err(format!(
            "a run from task {} when task {expected_seq:?} was due",
            done.first_seq
        ));
    }
    if count > inflight {
        return Err(format!("{count} results for {inflight} tasks sent"));
    }
    if done.lens.len() != count {
        return Err(format!("{} lengths for {count} results", done.lens.len()));
    }
    if !done.nfds.is_empty() && done.nfds.len() != count {
        return Err(format!(
            "{} descriptor counts for {count} results",
            done.nfds.len()
        ));
    }
    let total = done.lens.checked_total();
    if total != Some(results) {
        return Err(format!(
            "lengths adding up to {total:?} for {results} bytes"
        ));
    }
    let nfds = done
        .nfds
        .iter()
        .try_fold(0usize, |sum, &n| sum.checked_add(n as usize));
    if nfds != Some(fds) {
        return Err(format!("{nfds:?} descriptors counted, {fds} received"));
    }
    let mut last = None;
    for &(off, _) in &done.failures {
        if usize::try_from(off).map_or(true, |o| o >= count) || last.is_some_and(|l| off <= l) {
            return Err(format!("a failure at offset {off} in a run of {count}"));
        }
        last = Some(off);
    }
    Ok(())
}

/// A worker reported a run of results: split it over the chunks it covers. A malformed run
/// is an error (the worker is then treated as broken: killed, its tasks settled as for a
/// dead worker).
fn receive(
    w: &mut Worker,
    bytes: &[u8],
    mut fds: Vec<OwnedFd>,
    buffers: &Buffers,
    memfds: &MapCache,
    out: &mut Vec<(Arc<Job>, Vec<Run>)>,
) -> Result<(), String> {
    let (done, mut results) =
        crate::codec::take_from_bytes::<DoneHeader>(bytes).map_err(|e| e.to_string())?;
    // Results in a memfd: read in place by the runs made below, and handed back to the
    // worker when the last of them is dropped.
    let map;
    let mut lent = None;
    if let Some(at) = done.results_memfd {
        let fd = fds.pop().ok_or("a run without its results' memfd")?;
        let l = Arc::new(Lent(fd, at));
        if !results.is_empty() {
            return Err("a run with results both in its frame and in a memfd".into());
        }
        let total = done
            .lens
            .checked_total()
            .ok_or("a run whose result lengths overflow")?;
        map = memfds
            .map(l.0.as_fd(), total.max(1), 0)
            .map_err(|e| format!("mapping a run's results: {e}"))?;
        results = map.bytes().get(..total).ok_or("a short results memfd")?;
        lent = Some((Arc::clone(&map), l));
    }
    let mut offset = 0usize; // of `results` in the memfd
    let expected = w
        .sent
        .front()
        .and_then(|s| s.first_seq.checked_add(s.done as u64));
    check_run(&done, expected, w.tasks_inflight, results.len(), fds.len())?;
    let mut fds = fds.into_iter();
    let mut failures = done.failures.into_iter().peekable();
    let mut pos = 0usize; // offset in the run
    let count = done.count as usize;
    while pos < count {
        let seq = done.first_seq + pos as u64;
        let Some(sent) = w.sent.front_mut() else {
            return Err("results for tasks never sent".into());
        };
        if sent.first_seq.checked_add(sent.done as u64) != Some(seq) {
            return Err(format!("out of step at task {seq}"));
        }
        let take = (sent.chunk.len() - sent.done).min(count - pos);
        let lens = done.lens.slice(pos, take);
        let nfds: Vec<u32> = done.nfds.get(pos..pos + take).unwrap_or_default().to_vec();
        let bytes = lens.bytes_before(take);
        let (mine, tail) = results.split_at(bytes.min(results.len()));
        results = tail;
        let at = offset;
        offset += mine.len();
        let nfd_total: usize = nfds.iter().map(|&n| n as usize).sum();
        let first_index = sent.chunk.first_index + sent.done as u64;
        let mut errors = Vec::new();
        while let Some((off, _)) = failures.peek() {
            let off = *off as usize;
            if off >= pos + take {
                break;
            }
            let (_, f) = failures.next().expect("peeked");
            // (Offsets are increasing and at least `pos`: checked above.)
            let k = off.saturating_sub(pos);
            errors.push((
                u32::try_from(k).unwrap_or(u32::MAX),
                failure_error(first_index + k as u64, f),
            ));
        }
        let accounting = if w.task_acct.is_empty() {
            Vec::new()
        } else {
            (0..take as u64)
                .map(|k| {
                    (w.task_acct.remove(&(seq + k)))
                        .map(|a| a.accounting())
                        .unwrap_or_default()
                })
                .collect()
        };
        // Local workers' peaks are their accountings'; remote workers' come as memory alone.
        let peaks = if !accounting.is_empty() {
            accounting
                .iter()
                .map(|a| a.peak_memory.unwrap_or(0))
                .collect()
        } else if w.task_peaks.is_empty() {
            Vec::new()
        } else {
            (0..take as u64)
                .map(|k| w.task_peaks.remove(&(seq + k)).unwrap_or(0))
                .collect()
        };
        let run = Run {
            first_index,
            lens,
            nfds,
            results: match &lent {
                Some((map, l)) => Results::Lent {
                    map: Arc::clone(map),
                    at,
                    len: mine.len(),
                    _lent: Arc::clone(l),
                },
                None => {
                    let mut v = buffers.take(mine.len());
                    v.extend_from_slice(mine);
                    Results::Owned(v)
                }
            },
            shape: done.shape.clone(),
            fds: fds.by_ref().take(nfd_total).collect(),
            errors,
            peaks,
            accounting,
        };
        let job = sent.chunk.job.clone();
        sent.done += take;
        w.tasks_inflight -= take;
        if sent.done == sent.chunk.len() {
            if let Some(done) = w.sent.pop_front() {
                buffers.give(done.chunk.args);
            }
        }
        match out.iter_mut().find(|(j, _)| Arc::ptr_eq(j, &job)) {
            Some((_, runs)) => runs.push(run),
            None => out.push((job, vec![run])),
        }
        pos += take;
    }
    Ok(())
}

fn failure_error(index: u64, f: Failure) -> PoolError {
    match f {
        Failure::Panicked {
            message, location, ..
        } => PoolError::Panicked {
            index,
            message,
            location,
        },
        Failure::BadArgument { type_name, reason } => PoolError::BadArgument {
            index,
            type_name,
            reason,
        },
        Failure::BadResult { type_name, reason } => PoolError::BadResult {
            index,
            type_name,
            reason,
        },
    }
}

fn deliver(deliveries: Vec<(Arc<Job>, Vec<Run>)>) {
    for (job, runs) in deliveries {
        job.send(runs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(first_seq: u64, lens: &[u32]) -> DoneHeader {
        let mut l = Lens::default();
        for &x in lens {
            l.push(x);
        }
        DoneHeader {
            first_seq,
            count: lens.len() as u32,
            lens: l,
            ..DoneHeader::default()
        }
    }

    fn failed(off: u32) -> (u32, Failure) {
        let f = Failure::BadResult {
            type_name: "T".into(),
            reason: "r".into(),
        };
        (off, f)
    }

    #[test]
    fn a_well_formed_run_passes() {
        let mut r = run(5, &[8, 0, 8]);
        r.failures = vec![failed(1)];
        assert_eq!(check_run(&r, Some(5), 3, 16, 0), Ok(()));
        r.nfds = vec![0, 0, 2];
        assert_eq!(check_run(&r, Some(5), 10, 16, 2), Ok(()));
    }

    #[test]
    fn malformed_runs_are_errors_not_panics() {
        let ok = run(5, &[8, 8]);
        // Sequence numbers: before, after, or with nothing due.
        assert!(check_run(&ok, Some(6), 2, 16, 0).is_err());
        assert!(check_run(&ok, Some(4), 2, 16, 0).is_err());
        assert!(check_run(&ok, None, 2, 16, 0).is_err());
        assert!(check_run(&run(u64::MAX, &[8]), Some(5), 2, 8, 0).is_err());
        // More results than tasks sent, or none.
        assert!(check_run(&ok, Some(5), 1, 16, 0).is_err());
        assert!(check_run(&run(5, &[]), Some(5), 1, 0, 0).is_err());
        // Lengths that do not match the bytes, or the count.
        assert!(check_run(&ok, Some(5), 2, 15, 0).is_err());
        assert!(check_run(&ok, Some(5), 2, 17, 0).is_err());
        let mut r = run(5, &[8, 8]);
        r.count = 3;
        assert!(check_run(&r, Some(5), 3, 16, 0).is_err());
        let huge = DoneHeader {
            first_seq: 5,
            count: 2,
            lens: Lens::Each(vec![u32::MAX, u32::MAX]),
            ..DoneHeader::default()
        };
        assert!(check_run(&huge, Some(5), 2, 16, 0).is_err());
        // Descriptor counts.
        let mut r = run(5, &[8, 8]);
        r.nfds = vec![1];
        assert!(check_run(&r, Some(5), 2, 16, 1).is_err());
        r.nfds = vec![1, 1];
        assert!(check_run(&r, Some(5), 2, 16, 1).is_err());
        r.nfds = vec![u32::MAX, u32::MAX];
        assert!(check_run(&r, Some(5), 2, 16, 0).is_err());
        // Failures out of range or out of order.
        let mut r = run(5, &[8, 0, 0]);
        r.failures = vec![failed(3)];
        assert!(check_run(&r, Some(5), 3, 8, 0).is_err());
        r.failures = vec![failed(2), failed(1)];
        assert!(check_run(&r, Some(5), 3, 8, 0).is_err());
        r.failures = vec![failed(1), failed(1)];
        assert!(check_run(&r, Some(5), 3, 8, 0).is_err());
    }
}
