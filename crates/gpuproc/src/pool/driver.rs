//! The pool's driver thread: owns the workers, sends them work, collects results, replaces
//! the dead, enforces task timeouts.
//!
//! API calls hand chunks of encoded tasks to the driver through a queue and an eventfd; each
//! task's outcome goes back on its job's channel. The driver never blocks on a worker: sends
//! are non-blocking with a per-worker outbox, and one `poll` covers every descriptor.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::policy::{self, AfterDeath};
use super::worker::{
    self, Batch, Done, FnRef, Item, ToWorker, WorkerArgs, WORD_RUNNING, WORD_STARTED,
};
use super::{Config, PoolError};
use crate::ipc::{self, Frame, FrameReader};
use crate::process::wire::Failure;
use crate::process::{Process, ProcessError};
use crate::sys::{self, ExitStatus, SharedWords, Waker};

/// One task's outcome, as sent to the API side.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub index: u64,
    pub result: Result<Frame, PoolError>,
}

/// A submission (`map`, `imap`, `apply_async`): where its outcomes go.
#[derive(Debug)]
pub(crate) struct Job {
    pub tx: Mutex<Sender<Outcome>>,
    /// Set when nobody waits for the results any more: pending tasks are dropped.
    pub cancelled: AtomicBool,
    pub arg_type: &'static str,
}

impl Job {
    fn send(&self, index: u64, result: Result<Frame, PoolError>) {
        if let Ok(tx) = self.tx.lock() {
            let _ = tx.send(Outcome { index, result });
        }
    }
}

/// A task waiting to be run.
#[derive(Debug)]
pub(crate) struct Task {
    pub index: u64,
    pub args: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    /// Runs started so far (for the retry policy).
    pub attempts: u32,
}

/// Tasks of one job that go to a worker together.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub job: Arc<Job>,
    pub func: FnRef,
    pub tasks: Vec<Task>,
}

/// What API calls ask of the driver.
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    pub chunks: VecDeque<Chunk>,
    pub close: bool,
    pub terminate: bool,
}

/// The state shared between the `Pool` handle and its driver.
#[derive(Debug)]
pub(crate) struct Shared {
    pub inbox: Mutex<Inbox>,
    pub waker: Waker,
    /// The driver is (about to be) blocked in `poll`: submitters must wake it.
    pub sleeping: AtomicBool,
    pub pids: Mutex<Vec<u32>>,
}

struct InFlight {
    job: Arc<Job>,
    func: FnRef,
    task: Task,
    /// The batch it was sent in.
    batch: u64,
}

struct Worker {
    process: Process<WorkerArgs, Result<(), String>>,
    pid: u32,
    conn: OwnedFd,
    page: SharedWords,
    reader: FrameReader,
    /// Frames not yet (fully) sent: bytes, descriptors, bytes already sent.
    outbox: VecDeque<(Vec<u8>, Vec<OwnedFd>, usize)>,
    inflight: HashMap<u64, InFlight>,
    /// Order in which in-flight tasks were sent (the worker runs them in this order).
    order: VecDeque<u64>,
    /// Tasks not yet done, per batch sent.
    batches: HashMap<u64, usize>,
    /// Tasks it may still be sent before it exits (`max_tasks_per_child`).
    budget: Option<u64>,
    /// The task it was killed for exceeding the timeout, if any.
    timed_out: Option<u64>,
    eof: bool,
}

pub(crate) struct Driver {
    config: Arc<Config>,
    shared: Arc<Shared>,
    workers: Vec<Worker>,
    pending: VecDeque<Chunk>,
    next_seq: u64,
    next_batch: u64,
    closing: bool,
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
            next_seq: 0,
            next_batch: 0,
            closing: false,
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
    }

    fn start_worker(&self, slot: usize) -> Result<Worker, PoolError> {
        let (ours, theirs) = sys::socketpair().map_err(|source| PoolError::Io {
            context: "creating a worker connection",
            source,
        })?;
        let page = SharedWords::new("gpuproc-pool-worker").map_err(|source| PoolError::Io {
            context: "creating a worker status page",
            source,
        })?;
        let page_fd = sys::dup(page.fd()).map_err(|source| PoolError::Io {
            context: "sharing the status page",
            source,
        })?;
        let args = WorkerArgs {
            conn: theirs,
            page: page_fd,
            init: self.config.init.clone(),
            max_tasks: self.config.max_tasks_per_child,
        };
        let mut p = Process::new(worker::worker_main, args)
            .with_name(format!("PoolWorker-{}", slot + 1))
            .with_start_method(self.config.start_method)
            // Replacements start from the driver thread; `Fork` was chosen knowingly.
            .allow_fork_with_threads(true);
        for (k, v) in &self.config.env {
            p = p.with_env(k.clone(), v.clone());
        }
        if let Some(f) = &self.config.worker_env {
            for (k, v) in f(slot) {
                p = p.with_env(k, v);
            }
        }
        p.start().map_err(PoolError::Start)?;
        let pid = p.pid().expect("started");
        Ok(Worker {
            process: p,
            pid,
            conn: ours,
            page,
            reader: FrameReader::default(),
            outbox: VecDeque::new(),
            inflight: HashMap::new(),
            order: VecDeque::new(),
            batches: HashMap::new(),
            budget: self.config.max_tasks_per_child,
            timed_out: None,
            eof: false,
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
                && self.workers.iter().all(|w| w.inflight.is_empty())
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
        let mut inbox = self.shared.inbox.lock().unwrap_or_else(|p| p.into_inner());
        self.pending.extend(inbox.chunks.drain(..));
        (inbox.terminate, inbox.close)
    }

    /// Sends pending chunks to workers with room, least loaded first.
    fn dispatch(&mut self) {
        while let Some(chunk) = self.pending.front() {
            if chunk.job.cancelled.load(Ordering::Relaxed) {
                self.pending.pop_front();
                continue;
            }
            let len = chunk.tasks.len();
            let best = self
                .workers
                .iter()
                .enumerate()
                .filter(|(_, w)| !w.eof && w.budget != Some(0))
                .filter(|(_, w)| {
                    policy::may_dispatch(
                        w.batches.len(),
                        w.inflight.len(),
                        len.min(policy::MAX_ITEMS_IN_FLIGHT),
                    )
                })
                .min_by_key(|(_, w)| w.inflight.len())
                .map(|(i, _)| i);
            let Some(wi) = best else { break };
            let mut chunk = self.pending.pop_front().expect("front exists");
            let take = policy::take_for_budget(chunk.tasks.len(), self.workers[wi].budget);
            if take < chunk.tasks.len() {
                let rest = chunk.tasks.split_off(take);
                self.pending.push_front(Chunk {
                    job: chunk.job.clone(),
                    func: chunk.func,
                    tasks: rest,
                });
            }
            self.send_chunk(wi, chunk);
        }
    }

    fn send_chunk(&mut self, wi: usize, chunk: Chunk) {
        let mut items = Vec::with_capacity(chunk.tasks.len());
        let mut fds = Vec::new();
        let mut flights = Vec::with_capacity(chunk.tasks.len());
        for mut task in chunk.tasks {
            let seq = self.next_seq;
            self.next_seq += 1;
            items.push(Item {
                seq,
                args: std::mem::take(&mut task.args),
                nfds: task.fds.len() as u32,
            });
            fds.append(&mut task.fds);
            task.attempts += 1;
            flights.push((seq, task));
        }
        let msg = ToWorker::Batch(Batch {
            func: chunk.func,
            items,
        });
        let w = &mut self.workers[wi];
        match postcard::to_stdvec(&msg) {
            Ok(payload) => {
                let mut frame = Vec::with_capacity(payload.len() + 8);
                ipc::append_frame(&mut frame, &payload, fds.len());
                w.outbox.push_back((frame, fds, 0));
            }
            Err(e) => {
                for (_, task) in flights {
                    chunk.job.send(
                        task.index,
                        Err(PoolError::Encode {
                            index: task.index,
                            type_name: chunk.job.arg_type.to_string(),
                            reason: e.to_string(),
                        }),
                    );
                }
                return;
            }
        }
        // Keep the arguments to re-send if the worker dies before running them.
        let batch_id = self.next_batch;
        self.next_batch += 1;
        let sent = flights.len();
        let ToWorker::Batch(batch) = msg else {
            unreachable!("built above")
        };
        for ((seq, mut task), item) in flights.into_iter().zip(batch.items) {
            task.args = item.args;
            w.order.push_back(seq);
            let f = InFlight {
                job: chunk.job.clone(),
                func: chunk.func,
                task,
                batch: batch_id,
            };
            w.inflight.insert(seq, f);
        }
        w.batches.insert(batch_id, sent);
        if let Some(b) = w.budget.as_mut() {
            *b = b.saturating_sub(sent as u64);
        }
    }

    /// One round: poll every descriptor, then read results, write outboxes, handle deaths
    /// and timeouts.
    fn wait_and_handle(&mut self) -> std::io::Result<()> {
        let deadline = self.next_timeout_check();
        // Announce the sleep, then look once more: a submitter either sees the flag and
        // wakes us, or its work is already in the inbox (both sides use SeqCst).
        self.shared.sleeping.store(true, Ordering::SeqCst);
        let queued = {
            let inbox = self.shared.inbox.lock().unwrap_or_else(|p| p.into_inner());
            !inbox.chunks.is_empty() || inbox.close || inbox.terminate
        };
        let no_wait = Some(Instant::now());
        let ready = {
            let mut fds: Vec<(BorrowedFd<'_>, bool)> = vec![(self.shared.waker.fd(), false)];
            for w in &self.workers {
                fds.push((w.conn.as_fd(), !w.outbox.is_empty()));
            }
            sys::poll(&fds, if queued { no_wait } else { deadline })?
        };
        self.shared.sleeping.store(false, Ordering::SeqCst);
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
                while let Ok(Some(frame)) = w.reader.next_frame() {
                    deliver(w, frame);
                }
                if w.reader.at_eof() {
                    w.eof = true;
                }
            }
            if w.eof {
                dead.push(i);
            }
        }
        self.check_timeouts();
        for i in dead.into_iter().rev() {
            self.replace(i);
        }
        Ok(())
    }

    fn next_timeout_check(&self) -> Option<Instant> {
        let timeout = self.config.task_timeout?;
        let now_ns = sys::monotonic_ns();
        let mut next: Option<Instant> = Some(Instant::now() + timeout);
        for w in &self.workers {
            if w.page.word(WORD_RUNNING).load(Ordering::Acquire) != 0 {
                let started = w.page.word(WORD_STARTED).load(Ordering::Relaxed);
                let ran = Duration::from_nanos(now_ns.saturating_sub(started));
                let at = Instant::now() + timeout.saturating_sub(ran);
                next = next.map(|n| n.min(at));
            }
        }
        next
    }

    fn check_timeouts(&mut self) {
        let Some(timeout) = self.config.task_timeout else {
            return;
        };
        let now_ns = sys::monotonic_ns();
        for w in &mut self.workers {
            let running = w.page.word(WORD_RUNNING).load(Ordering::Acquire);
            if running == 0 || w.timed_out.is_some() {
                continue;
            }
            let started = w.page.word(WORD_STARTED).load(Ordering::Relaxed);
            if Duration::from_nanos(now_ns.saturating_sub(started)) >= timeout {
                w.timed_out = Some(running - 1);
                let _ = w.process.kill();
            }
        }
    }

    /// A worker's connection closed: learn how it ended, settle its tasks, start another.
    fn replace(&mut self, i: usize) {
        let status = match self.workers[i]
            .process
            .join_timeout(Duration::from_secs(10))
        {
            Ok(_) => ExitStatus::Code(0),
            Err(e) => match e {
                ProcessError::Killed { signal, .. } => ExitStatus::Signal(signal),
                ProcessError::Exited { code, .. } => ExitStatus::Code(code),
                _ => {
                    let _ = self.workers[i].process.kill();
                    ExitStatus::Signal(9)
                }
            },
        };
        let mut w = self.workers.swap_remove(i);
        let running = w
            .page
            .word(WORD_RUNNING)
            .load(Ordering::Acquire)
            .checked_sub(1);
        let mut requeue: Vec<InFlight> = Vec::new();
        for seq in w.order.drain(..) {
            let Some(f) = w.inflight.remove(&seq) else {
                continue;
            };
            let culprit =
                w.timed_out == Some(seq) || (w.timed_out.is_none() && running == Some(seq));
            if !culprit {
                requeue.push(f);
                continue;
            }
            let index = f.task.index;
            match policy::after_worker_death(f.task.attempts, self.config.retries) {
                AfterDeath::Retry => requeue.push(f),
                AfterDeath::Fail => {
                    let err = match (w.timed_out, self.config.task_timeout) {
                        (Some(_), Some(timeout)) => PoolError::TimedOut { index, timeout },
                        _ => PoolError::WorkerDied {
                            index,
                            pid: w.pid,
                            status,
                        },
                    };
                    f.job.send(index, Err(err));
                }
            }
        }
        // Back to the front of the queue, in their order, one chunk per run of the same job.
        for f in requeue.into_iter().rev() {
            let InFlight {
                job, func, task, ..
            } = f;
            match self.pending.front_mut() {
                Some(c) if Arc::ptr_eq(&c.job, &job) => c.tasks.insert(0, task),
                _ => self.pending.push_front(Chunk {
                    job,
                    func,
                    tasks: vec![task],
                }),
            }
        }
        let slot = i;
        if !self.closing || !self.pending.is_empty() {
            match self.start_worker(slot) {
                Ok(nw) => self.workers.push(nw),
                Err(e) => {
                    eprintln!("gpuproc pool: {e}");
                    if self.workers.is_empty() {
                        self.fail_all_pending(|index| PoolError::WorkerDied {
                            index,
                            pid: w.pid,
                            status,
                        });
                    }
                }
            }
        }
        self.publish_pids();
    }

    fn fail_all_pending(&mut self, err: impl Fn(u64) -> PoolError) {
        for chunk in self.pending.drain(..) {
            for t in chunk.tasks {
                chunk.job.send(t.index, Err(err(t.index)));
            }
        }
    }

    fn terminate(&mut self) {
        for w in &self.workers {
            let _ = w.process.kill();
        }
        for mut w in self.workers.drain(..) {
            let _ = w.process.join_timeout(Duration::from_secs(10));
            for (_, f) in w.inflight.drain() {
                f.job.send(
                    f.task.index,
                    Err(PoolError::Terminated {
                        index: f.task.index,
                    }),
                );
            }
        }
        self.fail_all_pending(|index| PoolError::Terminated { index });
        self.publish_pids();
    }

    /// All work is done: closing each connection tells its worker to exit.
    fn shutdown(&mut self) {
        for w in self.workers.drain(..) {
            let Worker {
                mut process, conn, ..
            } = w;
            if let Ok(stop) = postcard::to_stdvec(&ToWorker::Stop) {
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

fn flush_outbox(w: &mut Worker) -> std::io::Result<()> {
    while let Some((bytes, fds, sent)) = w.outbox.front_mut() {
        let borrowed: Vec<BorrowedFd<'_>> = if *sent == 0 {
            fds.iter().map(|f| f.as_fd()).collect()
        } else {
            Vec::new()
        };
        let n = sys::send_nonblocking(w.conn.as_fd(), &bytes[*sent..], &borrowed)?;
        if n == 0 {
            return Ok(());
        }
        *sent += n;
        if *sent == bytes.len() {
            w.outbox.pop_front();
        } else {
            return Ok(());
        }
    }
    Ok(())
}

fn deliver(w: &mut Worker, frame: Frame) {
    let Ok(done) = ipc::decode::<Done>(&frame.bytes, Vec::new()) else {
        return;
    };
    let Some(f) = w.inflight.remove(&done.seq) else {
        return;
    };
    // Results come back in the order tasks were sent, so this is nearly always the front.
    if let Some(pos) = w.order.iter().position(|s| *s == done.seq) {
        w.order.remove(pos);
    }
    if let Some(left) = w.batches.get_mut(&f.batch) {
        *left -= 1;
        if *left == 0 {
            w.batches.remove(&f.batch);
        }
    }
    let index = f.task.index;
    let result = match done.outcome {
        Ok(bytes) => Ok(Frame {
            bytes,
            fds: frame.fds,
        }),
        Err(Failure::Panicked {
            message, location, ..
        }) => Err(PoolError::Panicked {
            index,
            message,
            location,
        }),
        Err(Failure::BadArgument { type_name, reason }) => Err(PoolError::BadArgument {
            index,
            type_name,
            reason,
        }),
        Err(Failure::BadResult { type_name, reason }) => Err(PoolError::BadResult {
            index,
            type_name,
            reason,
        }),
    };
    f.job.send(index, result);
}
