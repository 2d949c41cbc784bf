//! `Pool`: Python's `multiprocessing.Pool`, which never hangs when a worker dies.
//!
//! Each worker is a long-lived process with one connection to the pool; tasks are sent to it
//! pipelined, in chunks, and results stream back as they finish. A background driver thread
//! owns the workers (see `driver`). A worker that dies mid-task fails that task alone (with
//! its index and the signal or exit code), is replaced, and the rest of the work goes on.
//!
//! Arguments and results are encoded in postcard's format by the crate's serializer (which
//! copies vectors of numbers whole), except plain data — numbers, `bool`, `char`, and
//! tuples, arrays and structs of them — which goes at a fixed width with one length for a
//! whole chunk (see `plain`), so that a `map` over a million numbers costs a few
//! nanoseconds per item in encoding. A chunk's arguments or a run's results past 256 KiB
//! travel in a reused memfd instead of the socket (see `shm_args`).
//!
//! ```
//! # gpuproc::init();
//! fn square(x: u64) -> u64 { x * x }
//!
//! let pool = gpuproc::Pool::new(2)?;
//! let squares = pool.map(square, 0..10u64)?;
//! assert_eq!(squares, [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]);
//! # Ok::<(), gpuproc::PoolError>(())
//! ```
//!
//! # Dropping
//! Dropping a `Pool` terminates it, as leaving Python's `with Pool() as p:` block does: its
//! workers are killed and unfinished tasks fail with [`PoolError::Terminated`]. Call
//! [`Pool::close`] and [`Pool::join`] first to let queued work finish.

mod buffers;
mod callbacks;
mod driver;
mod error;
mod lens;
mod plain;
pub(crate) mod policy;
pub(crate) mod remote;
mod remote_gpu;
mod shm_args;
mod threads;

pub use self::callbacks::Callbacks;
pub use self::threads::{ThreadImap, ThreadPool};
pub(crate) use remote::serve_if_remote_worker;
pub use remote::{Launcher, Slurm};
pub(crate) mod worker;

use std::any::type_name;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use self::driver::{Chunk, Driver, Inbox, Job, Run, Shared, ToJob};
pub use self::error::PoolError;
use self::lens::Lens;
use self::shm_args::ShmPool;
use self::worker::{FnRef, Init};
use crate::gpu;
use crate::ipc;
use crate::process::{get_start_method, StartMethod};
use crate::sys::{self, Waker};

type WorkerEnv = Box<dyn Fn(usize) -> Vec<(String, String)> + Send + Sync>;

/// Everything a pool is built with.
pub(crate) struct Config {
    pub processes: usize,
    pub start_method: StartMethod,
    /// `Fork` may fork while this process has other threads.
    pub allow_fork_with_threads: bool,
    pub init: Option<Init>,
    pub max_tasks_per_child: Option<u64>,
    pub task_timeout: Option<Duration>,
    pub retries: u32,
    pub env: Vec<(String, String)>,
    pub worker_env: Option<WorkerEnv>,
    pub progress: bool,
    /// GPUs leased for the workers (held as long as the pool lives).
    pub gpus: Option<gpu::WorkerGpus>,
    /// How often the driver samples each worker's GPU memory through NVML.
    pub gpu_sampling: Option<Duration>,
    /// Where workers run (`None`: here).
    pub launcher: Option<remote::Launcher>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("processes", &self.processes)
            .field("start_method", &self.start_method)
            .field("allow_fork_with_threads", &self.allow_fork_with_threads)
            .field("max_tasks_per_child", &self.max_tasks_per_child)
            .field("task_timeout", &self.task_timeout)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

fn fn_ref<A: DeserializeOwned, R: Serialize + DeserializeOwned>(f: fn(A) -> R) -> FnRef {
    FnRef::task(f)
}

/// Configures a [`Pool`]; Python's `Pool(processes, initializer, initargs, maxtasksperchild)`
/// and more. Finish with [`build`](Self::build).
#[must_use = "a builder does nothing until build() is called"]
pub struct PoolBuilder {
    config: Config,
    init_error: Option<PoolError>,
    gpu_share: Option<gpu::Share>,
    gpu_criteria: gpu::Criteria,
}

impl std::fmt::Debug for PoolBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.config.fmt(f)
    }
}

impl Default for PoolBuilder {
    fn default() -> Self {
        PoolBuilder {
            config: Config {
                processes: crate::process_cpu_count(),
                start_method: get_start_method(),
                allow_fork_with_threads: false,
                init: None,
                max_tasks_per_child: None,
                task_timeout: None,
                retries: 0,
                env: Vec::new(),
                worker_env: None,
                progress: false,
                gpus: None,
                gpu_sampling: None,
                launcher: None,
            },
            init_error: None,
            gpu_share: None,
            gpu_criteria: gpu::Criteria::new(),
        }
    }
}

impl PoolBuilder {
    /// The number of worker processes (default: the CPUs this process may use). `0` makes
    /// [`build`](Self::build) fail with [`PoolError::InvalidArgument`], as Python's
    /// `Pool(0)` raises `ValueError`.
    pub fn processes(mut self, n: usize) -> Self {
        self.config.processes = n;
        self
    }

    /// How workers are started (default: [`get_start_method`]). With `Fork`, replacement
    /// workers are forked from the pool's driver thread.
    ///
    /// `Fork` is refused, as [`Process`](crate::Process) refuses it, when this process has
    /// threads other than the pools' own (see
    /// [`allow_fork_with_threads`](Self::allow_fork_with_threads)): `build` fails with
    /// [`PoolError::ForkUnsafe`].
    pub fn start_method(mut self, method: StartMethod) -> Self {
        self.config.start_method = method;
        self
    }

    /// Lets a [`StartMethod::Fork`] pool fork its workers even when this process has other
    /// threads (default: refused). A worker then has only the forking thread; a lock that
    /// another thread held at that moment stays held for ever in the worker, which can hang
    /// it: a [`task_timeout`](Self::task_timeout) then kills it and fails the task it never
    /// started.
    ///
    /// Without it, a `Fork` pool is built only in a process whose threads are the caller and
    /// gpuproc pools' driver threads; a replacement worker (after a death, a timeout or
    /// [`max_tasks_per_child`](Self::max_tasks_per_child)) is forked from the pool's driver
    /// thread only under the same condition, and otherwise not started: the pool goes on
    /// with the workers it has (the refusal is printed on standard error), and with none
    /// left, tasks fail with [`PoolError::NoWorker`] until one can be started again.
    pub fn allow_fork_with_threads(mut self, allow: bool) -> Self {
        self.config.allow_fork_with_threads = allow;
        self
    }

    /// A function each worker runs once when it starts; Python's `initializer`/`initargs`.
    /// The arguments may hold handles — queues, locks, shared values — as in Python, where
    /// `initargs` is the way to give every worker the same lock: each worker, replacements
    /// included, gets its own copy, which the initializer can keep (in a `static`, say).
    ///
    /// ```
    /// # gpuproc::init();
    /// use std::sync::OnceLock;
    /// use gpuproc::{shm::SharedValue, sync::Lock, Pool};
    ///
    /// static SHARED: OnceLock<(Lock, SharedValue<u64>)> = OnceLock::new();
    ///
    /// fn keep(shared: (Lock, SharedValue<u64>)) {
    ///     let _ = SHARED.set(shared);
    /// }
    ///
    /// fn add(x: u64) {
    ///     let (lock, total) = SHARED.get().expect("the initializer ran");
    ///     let _held = lock.lock().unwrap();
    ///     total.set(total.get() + x);
    /// }
    ///
    /// let (lock, total) = (Lock::new()?, SharedValue::new(0u64)?);
    /// let pool = Pool::builder()
    ///     .processes(2)
    ///     .initializer(keep, (lock, total.clone()))
    ///     .build()?;
    /// pool.map(add, 1..=100u64)?;
    /// assert_eq!(total.get(), 5050);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn initializer<A: Serialize + DeserializeOwned>(mut self, f: fn(A), args: A) -> Self {
        match ipc::encode(&args)
            .map_err(|e| e.to_string())
            .and_then(|(bytes, fds)| worker::Init::new(fn_ref(f), bytes, fds))
        {
            Ok(init) => self.config.init = Some(init),
            Err(reason) => {
                self.init_error = Some(PoolError::Encode {
                    index: 0,
                    type_name: type_name::<A>().to_string(),
                    reason,
                })
            }
        }
        self
    }

    /// Replace each worker after it has run this many tasks; Python's `maxtasksperchild`.
    /// `0` makes [`build`](Self::build) fail with [`PoolError::InvalidArgument`] (Python:
    /// `ValueError`).
    pub fn max_tasks_per_child(mut self, n: u64) -> Self {
        self.config.max_tasks_per_child = Some(n);
        self
    }

    /// Kill a worker whose current task has run this long; the task fails with
    /// [`PoolError::TimedOut`] and the worker is replaced. A worker that has had a task to
    /// start for this long without starting it (hung, say on a lock after a fork with
    /// threads, or stopped) is killed too, and that task fails the same way (or runs again,
    /// with [`retries`](Self::retries)). The time a worker takes to start and run the
    /// [`initializer`](Self::initializer) does not count, except the start of a forked one
    /// (a fork, and nothing more). `Duration::MAX` (or any timeout past the clock's range)
    /// means no timeout.
    pub fn task_timeout(mut self, timeout: Duration) -> Self {
        self.config.task_timeout = Some(timeout);
        self
    }

    /// Where the workers run: on this machine (the default), as Slurm job steps, or started
    /// by any command line such as `ssh host` (see [`Launcher`] and the
    /// crate guide, "Remote computers"). Workers elsewhere run the same executable, connect
    /// back over an authenticated TCP connection, and behave as local ones, except that a
    /// worker that is lost fails the tasks it had in flight ([`PoolError::WorkerLost`]) and
    /// is replaced; nothing is left running when the pool ends. Their arguments and results are copied over the network, so values that hold
    /// descriptors (queues, locks, shared memory) cannot be sent to them: such a task is
    /// refused when it is submitted, naming the type. Not with a task timeout or GPUs leased
    /// through [`workers_per_gpu`](Self::workers_per_gpu) or chosen by
    /// [`gpu_criteria`](Self::gpu_criteria); with a Slurm launcher,
    /// [`gpus_per_worker`](Self::gpus_per_worker) asks Slurm for the GPUs with each step
    /// (as [`Slurm::gpus`] does), and other launchers cannot give GPUs. Each remote worker
    /// samples its GPUs on its node (every [`gpu_sampling`](Self::gpu_sampling) interval,
    /// default 1 s) for [`Pool::gpu_usage`].
    pub fn launcher(mut self, launcher: remote::Launcher) -> Self {
        self.config.launcher = (!launcher.is_local()).then_some(launcher);
        self
    }

    /// Run a task again, up to `n` times, when its worker dies under it (default 0: report
    /// the failure). Tasks that fail by panicking are never retried.
    pub fn retries(mut self, n: u32) -> Self {
        self.config.retries = n;
        self
    }

    /// Sets an environment variable in every worker.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.env.push((key.into(), value.into()));
        self
    }

    /// Environment variables per worker slot (0-based; a replacement gets its slot's).
    pub fn worker_env(
        mut self,
        f: impl Fn(usize) -> Vec<(String, String)> + Send + Sync + 'static,
    ) -> Self {
        self.config.worker_env = Some(Box::new(f));
        self
    }

    /// Show a progress bar (indicatif, on standard error when it is a terminal) during
    /// `map` and `imap`.
    pub fn progress(mut self, show: bool) -> Self {
        self.config.progress = show;
        self
    }

    /// Gives each worker `n` GPUs of its own, picked (and leased, so that other pools and
    /// `gpuproc pick` cannot take them) when the pool is built: each worker sees them in
    /// `CUDA_VISIBLE_DEVICES` (by UUID) and through [`gpu::assigned`].
    pub fn gpus_per_worker(mut self, n: usize) -> Self {
        self.gpu_share = Some(gpu::Share::GpusPerWorker(n));
        self
    }

    /// Lets `k` workers share each GPU (worker `i` gets GPU `i % gpus`).
    pub fn workers_per_gpu(mut self, k: usize) -> Self {
        self.gpu_share = Some(gpu::Share::WorkersPerGpu(k));
        self
    }

    /// Which GPUs qualify (free memory, utilisation, an explicit list, waiting, ...); used
    /// with [`gpus_per_worker`](Self::gpus_per_worker) or
    /// [`workers_per_gpu`](Self::workers_per_gpu) (alone it means one GPU per worker).
    pub fn gpu_criteria(mut self, criteria: gpu::Criteria) -> Self {
        self.gpu_criteria = criteria;
        self.gpu_share.get_or_insert(gpu::Share::GpusPerWorker(1));
        self
    }

    /// Samples each worker's GPU use through NVML every `interval`, for
    /// [`Pool::gpu_usage`]'s peaks and accounting (mean memory, mean SM utilisation,
    /// energy: see [`WorkerGpuUsage`]). Each sample reads, per worker, its processes on
    /// every GPU and, on its GPUs, the per-process utilisation and energy counter.
    pub fn gpu_sampling(mut self, interval: Duration) -> Self {
        self.config.gpu_sampling = Some(interval);
        self
    }

    /// Starts the workers.
    pub fn build(mut self) -> Result<Pool, PoolError> {
        if let Some(e) = self.init_error.take() {
            return Err(e);
        }
        policy::check_counts(self.config.processes, self.config.max_tasks_per_child)?;
        if self.config.launcher.is_some() {
            let remote_refuses = |setting, value: String, expected| {
                Err(PoolError::InvalidArgument {
                    setting,
                    value,
                    expected,
                })
            };
            if let Some(t) = self.config.task_timeout {
                return remote_refuses(
                    "task_timeout",
                    format!("{t:?}"),
                    "no task timeout with remote workers (a launcher other than local)",
                );
            }
            // Remote workers sample their GPUs on their nodes and send the samples back.
            let every = *self.config.gpu_sampling.get_or_insert(REMOTE_GPU_SAMPLING);
            if let Some(l) = self.config.launcher.as_mut() {
                l.sample_every = Some(every);
            }
            if self.gpu_criteria != gpu::Criteria::new() {
                return remote_refuses(
                    "gpu_criteria",
                    format!("{:?}", self.gpu_criteria),
                    "no GPU criteria with remote workers: GPUs cannot be picked or leased on \
                     another machine (with a Slurm launcher, ask for a count with \
                     gpus_per_worker)",
                );
            }
            // On Slurm, GPUs per worker are Slurm's to give: asked with each step.
            match (self.gpu_share.take(), self.config.launcher.as_mut()) {
                (None, _) => {}
                (Some(gpu::Share::GpusPerWorker(n)), Some(l)) if l.asks_slurm() => {
                    let n = u32::try_from(n).unwrap_or(u32::MAX);
                    *l = l.clone().with_slurm_gpus(n);
                }
                (Some(share), _) => {
                    return remote_refuses(
                        "gpus_per_worker",
                        format!("{share:?}"),
                        "GPUs per worker only with a Slurm launcher, which asks Slurm for \
                         them (GPUs cannot be leased on another machine)",
                    );
                }
            }
            if self
                .config
                .init
                .as_ref()
                .is_some_and(|i| !i.fds.0.is_empty())
            {
                return remote_refuses(
                    "initializer",
                    "an argument holding descriptors (a queue, lock or shared memory)".into(),
                    "an initializer argument without descriptors: they cannot cross machines",
                );
            }
        }
        if let Some(init) = self.config.init.as_ref() {
            if self.config.start_method != StartMethod::Fork {
                init.func.check()?;
            }
        }
        // (Again before each worker; here, before GPUs are leased for nothing.)
        driver::check_fork(&self.config)?;
        if let Some(share) = self.gpu_share {
            let picked = gpu::pick_for_workers(self.config.processes, share, &self.gpu_criteria)
                .map_err(PoolError::Gpu)?;
            self.config.gpus = Some(picked);
        }
        let config = Arc::new(self.config);
        let shared = Arc::new(Shared {
            inbox: Mutex::new(Inbox::default()),
            waker: Waker::new().map_err(|source| PoolError::Io {
                context: "creating an eventfd",
                source,
            })?,
            pids: Mutex::new(Vec::new()),
            jobs: Default::default(),
            buffers: Default::default(),
            shm: Default::default(),
            usage: Mutex::new(Vec::new()),
            sleeping: AtomicBool::new(false),
            chunks_sent: Default::default(),
        });
        let driver = Driver::new(config.clone(), shared.clone())?;
        let on_death = shared.clone();
        let counted = DriverCount::new();
        let thread = std::thread::Builder::new()
            .name("gpuproc-pool".into())
            .spawn(move || {
                // The driver (and with it every worker) is dropped as it unwinds; then every
                // job still waiting is told.
                let run = std::panic::AssertUnwindSafe(move || driver.run());
                if let Err(payload) = std::panic::catch_unwind(run) {
                    driver::driver_died(&on_death, panic_message(payload.as_ref()));
                }
            })
            .map_err(|source| PoolError::Io {
                context: "starting the pool thread",
                source,
            })?;
        Ok(Pool {
            config,
            shared,
            thread: Mutex::new(Some((thread, counted))),
            closed: AtomicBool::new(false),
            callbacks: Default::default(),
        })
    }
}

/// One worker's GPUs and GPU memory (see [`Pool::gpu_usage`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkerGpuUsage {
    /// The worker's slot (0-based; a replacement takes its predecessor's).
    pub slot: usize,
    /// The worker's pid (for a remote worker, its relay's: a process of this machine).
    pub pid: u32,
    /// UUIDs of the GPUs given to the worker (empty when the pool assigns none); for a
    /// remote worker, those of [`gpus`](Self::gpus).
    pub devices: Vec<String>,
    /// GPU memory the worker (and its children) use now, in bytes (a remote worker's: at
    /// its latest sample).
    pub memory: u64,
    /// The most seen by the sampler (or by `gpu_usage` calls) for this worker, in bytes.
    pub peak_memory: u64,
    /// The time-weighted mean of the memory the sampler saw over the worker's time on its
    /// GPUs (from its first sample on a GPU to its last), in bytes; 0 before then. As
    /// [`GpuAccounting::mean_memory`](crate::gpu::GpuAccounting::mean_memory): the fields
    /// from here on come from the sampler only ([`PoolBuilder::gpu_sampling`]).
    #[serde(default)]
    pub mean_memory: u64,
    /// The worker's mean SM utilisation over the same time, whole percent of one GPU, from
    /// the driver's per-process samples; `None` before a sample, or where the GPUs have no
    /// per-process figures (MIG).
    #[serde(default)]
    pub mean_sm_percent: Option<u32>,
    /// Energy its GPUs used while the worker was on them, over its lifetime so far, in
    /// millijoules: attributed only while no other process (another worker sharing the
    /// GPU with `workers_per_gpu`, another program) has been seen on them, as
    /// [`GpuAccounting::energy_mj`](crate::gpu::GpuAccounting::energy_mj) explains;
    /// `None` otherwise, before two samples, or without an energy counter (before Volta).
    #[serde(default)]
    pub energy_mj: Option<u64>,
    /// The node the worker runs on (its host name); empty for a remote worker until its
    /// first sample.
    #[serde(default)]
    pub node: String,
    /// The GPUs given to the worker, then any other it uses memory on, each with the memory
    /// the worker uses there.
    #[serde(default)]
    pub gpus: Vec<WorkerGpu>,
}

impl WorkerGpuUsage {
    /// Takes the accounting fields from the sampler's `accounting` of this worker.
    pub(crate) fn set_accounting(&mut self, accounting: &gpu::GpuAccounting) {
        self.mean_memory = accounting.mean_memory.unwrap_or(0);
        self.mean_sm_percent = accounting
            .mean_sm_percent
            .map(|p| p.round().clamp(0.0, 100.0) as u32);
        self.energy_mj = accounting.energy_mj;
    }
}

/// One GPU of a worker (see [`WorkerGpuUsage::gpus`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkerGpu {
    /// Its NVML index on the worker's node.
    pub index: u32,
    /// Its UUID (`GPU-...`).
    pub uuid: String,
    /// The GPU memory the worker (and its children) use on it, in bytes.
    pub memory: u64,
}

/// How often remote workers sample their GPUs when the pool does not say
/// ([`PoolBuilder::gpu_sampling`]).
const REMOTE_GPU_SAMPLING: Duration = Duration::from_secs(1);

/// A local worker's GPUs: those it was given (`given`, UUIDs), then any other it uses
/// memory on (`used`), each with the memory it uses there.
fn worker_gpus(given: &[(u32, String)], used: &[gpu::DeviceUsage]) -> Vec<WorkerGpu> {
    let mut out: Vec<WorkerGpu> = given
        .iter()
        .map(|(index, uuid)| WorkerGpu {
            index: *index,
            uuid: uuid.clone(),
            memory: used
                .iter()
                .filter(|d| d.index == *index)
                .fold(0u64, |sum, d| sum.saturating_add(d.used_memory)),
        })
        .collect();
    for d in used {
        if d.used_memory > 0 && !out.iter().any(|g| g.index == d.index) {
            out.push(WorkerGpu {
                index: d.index,
                uuid: d.uuid.clone().unwrap_or_default(),
                memory: d.used_memory,
            });
        }
    }
    out
}

/// A pool of worker processes; Python's `multiprocessing.Pool`.
///
/// # Big data
/// Task arguments and results are encoded once and decoded once: vectors and slices of
/// numbers (`Vec<f32>`, `&[u8]`, `Box<[f64]>`, `Vec<u32>`, also inside structs and enums) as
/// one copy (vectors of plain structs too, with `#[serde(with = "gpuproc::pod")]`: see
/// [`pod`](crate::pod)), and once a chunk's arguments (or a run's results) pass 256 KiB they are written
/// straight into shared memory that the other side reads in place, with no copy through a
/// socket. `map` and `imap` keep three chunks per worker (at least 32 MiB) of arguments in
/// flight, so inputs of any size stream through bounded memory. To avoid even those copies,
/// send a [`SharedSlice`](crate::SharedSlice) (a descriptor, whatever its size) or give
/// every worker the data once through [`PoolBuilder::initializer`] and map over ids: see
/// the crate guide, "Big data", and `examples/big_data.rs`.
#[derive(Debug)]
pub struct Pool {
    config: Arc<Config>,
    shared: Arc<Shared>,
    thread: Mutex<Option<(JoinHandle<()>, DriverCount)>>,
    closed: AtomicBool,
    /// Runs `apply_async_with`/`map_async_with` callbacks (started with the first).
    callbacks: callbacks::CallbackThread,
}

/// One pool driver thread counted in `driver::DRIVER_THREADS`, from before it starts until
/// it has been joined (dropped after the join).
#[derive(Debug)]
struct DriverCount(());

impl DriverCount {
    fn new() -> Self {
        driver::DRIVER_THREADS.fetch_add(1, Ordering::SeqCst);
        DriverCount(())
    }
}

impl Drop for DriverCount {
    fn drop(&mut self) {
        driver::DRIVER_THREADS.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Pool {
    /// A pool of `processes` workers with the default settings; `Pool::new(0)` is an error
    /// ([`PoolError::InvalidArgument`]), as Python's `Pool(0)` raises `ValueError`.
    pub fn new(processes: usize) -> Result<Pool, PoolError> {
        Pool::builder().processes(processes).build()
    }

    /// A builder for a pool with more settings.
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
    }

    /// The number of workers.
    pub fn processes(&self) -> usize {
        self.config.processes
    }

    /// Each worker's node, GPUs and GPU memory, read through NVML now, with the peak seen
    /// by the sampler (see [`PoolBuilder::gpu_sampling`]) and the sampler's accounting
    /// (mean memory, mean SM utilisation, energy). Workers with no GPU memory in use are
    /// listed with zero.
    ///
    /// Remote workers (see [`PoolBuilder::launcher`]) sample their own GPUs through NVML on
    /// their node, every [`PoolBuilder::gpu_sampling`] interval (default 1 s for them),
    /// and send the samples back: for them this is the latest sample, and a worker that has
    /// not sent one yet has an empty `node` and no GPUs.
    pub fn gpu_usage(&self) -> Result<Vec<WorkerGpuUsage>, PoolError> {
        let mut usage = self
            .shared
            .usage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if self.config.launcher.is_some() {
            return Ok(usage);
        }
        let gpus = gpu::global().map_err(|e| PoolError::Gpu(e.into()))?;
        let node = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned();
        for u in &mut usage {
            let given: Vec<(u32, String)> = self
                .config
                .gpus
                .as_ref()
                .and_then(|g| g.slots().get(u.slot))
                .map(|s| s.iter().map(|d| (d.index, d.uuid.clone())).collect())
                .unwrap_or_default();
            let now = gpus
                .usage_of(u.pid, true)
                .map_err(|e| PoolError::Gpu(e.into()))?;
            u.memory = now.devices.iter().map(|d| d.used_memory).sum();
            u.peak_memory = u.peak_memory.max(u.memory);
            u.node.clone_from(&node);
            u.gpus = worker_gpus(&given, &now.devices);
        }
        Ok(usage)
    }

    /// The pids of the current workers.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.shared
            .pids
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default()
    }

    fn new_job(&self) -> (Arc<Job>, Receiver<ToJob>) {
        self.new_job_with(None)
    }

    fn new_job_with(
        &self,
        forward: Option<Box<dyn Fn(ToJob) + Send + Sync>>,
    ) -> (Arc<Job>, Receiver<ToJob>) {
        let (tx, rx) = mpsc::channel();
        let job = Arc::new(Job {
            tx: Mutex::new(tx),
            cancelled: AtomicBool::new(false),
            forward,
        });
        (self.shared.jobs.lock().unwrap_or_else(|p| p.into_inner())).register(&job);
        (job, rx)
    }

    fn submit(&self, chunks: Vec<Chunk>) -> Result<(), PoolError> {
        let mut inbox = self.shared.inbox();
        if let Some(message) = &inbox.dead {
            return Err(PoolError::DriverDied {
                message: message.clone(),
            });
        }
        if self.closed.load(Ordering::SeqCst) || inbox.close || inbox.terminate {
            return Err(PoolError::Closed);
        }
        if self.config.start_method != StartMethod::Fork {
            for c in &chunks {
                c.func.check()?;
            }
        }
        inbox.chunks.extend(chunks);
        drop(inbox);
        if self.shared.sleeping.load(Ordering::SeqCst) {
            self.shared.waker.wake();
        }
        Ok(())
    }

    /// Calls `f` on every item and returns the results in order; Python's `Pool.map`, with
    /// its automatic chunk size. The first failed task's error is returned (with its index);
    /// see [`map_results`](Self::map_results) to get every task's outcome.
    ///
    /// Unlike Python, the automatic chunk size also counts bytes: a chunk holds Python's
    /// `ceil(len / (4 * workers))` items, but ends early once its encoded arguments reach
    /// 1 MiB, so that large items (arrays, buffers) go one or a few per message and every
    /// worker gets work early. An explicit chunk size ([`map_chunksize`](Self::map_chunksize))
    /// ends a chunk only at 64 MiB.
    pub fn map<A, R, I>(&self, f: fn(A) -> R, items: I) -> Result<Vec<R>, PoolError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        let mut out = Vec::new();
        self.all(f, items, None).drain_into(&mut out)?;
        Ok(out)
    }

    /// An ordered [`Imap`] over a whole input, its length known, with `chunksize` or
    /// Python's automatic one.
    fn all<A, R, I>(
        &self,
        f: fn(A) -> R,
        items: I,
        chunksize: Option<usize>,
    ) -> Imap<'_, A, R, Input<A, I::IntoIter>>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        let items = Input::new(items.into_iter());
        let len = items.len;
        let imap = match chunksize {
            Some(n) => self.imap(f, items).chunksize(n),
            None => {
                let mut imap = self
                    .imap(f, items)
                    .chunksize(policy::auto_chunksize(len, self.processes()));
                imap.max_chunk_bytes = policy::AUTO_CHUNK_BYTES;
                imap
            }
        };
        imap.with_len(len)
    }

    /// [`map`](Self::map) with an explicit chunk size.
    pub fn map_chunksize<A, R, I>(
        &self,
        f: fn(A) -> R,
        items: I,
        chunksize: usize,
    ) -> Result<Vec<R>, PoolError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        let mut out = Vec::new();
        self.all(f, items, Some(chunksize)).drain_into(&mut out)?;
        Ok(out)
    }

    /// Every task's outcome, in order: the results of the tasks that succeeded and the errors
    /// of those that did not.
    pub fn map_results<A, R, I>(&self, f: fn(A) -> R, items: I) -> Vec<Result<R, PoolError>>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        self.all(f, items, None).collect()
    }

    /// Like [`map`](Self::map), with each task's GPU memory peak in bytes as sampled through
    /// NVML while it ran (needs [`PoolBuilder::gpu_sampling`]; a task shorter than the
    /// sampling interval may show 0).
    pub fn map_with_gpu_memory<A, R, I>(
        &self,
        f: fn(A) -> R,
        items: I,
    ) -> Result<Vec<(R, u64)>, PoolError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        self.map_with(f, items, |it| it.last_gpu_memory_peak())
    }

    /// [`map`](Self::map), with each task's GPU accounting (see
    /// [`Imap::last_gpu_accounting`]): the per-task counterpart of `gpuproc run`'s summary.
    /// Needs the sampler ([`PoolBuilder::gpu_sampling`]); tasks shorter than its interval
    /// get few or no samples.
    pub fn map_with_gpu_accounting<A, R, I>(
        &self,
        f: fn(A) -> R,
        items: I,
    ) -> Result<Vec<(R, gpu::GpuAccounting)>, PoolError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        self.map_with(f, items, |it| it.last_gpu_accounting().clone())
    }

    /// [`map`](Self::map), each result paired with what `about` reads from the iterator
    /// right after that result (the task's sampled GPU figures).
    fn map_with<A, R, I, X>(
        &self,
        f: fn(A) -> R,
        items: I,
        about: impl Fn(&Imap<'_, A, R, Input<A, I::IntoIter>>) -> X,
    ) -> Result<Vec<(R, X)>, PoolError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        let mut it = self.all(f, items, None);
        let mut out = Vec::with_capacity(it.len.unwrap_or(0).min(MAX_RESERVE));
        while let Some(r) = it.next() {
            out.push((r?, about(&it)));
        }
        Ok(out)
    }

    /// Python's `Pool.starmap`: Rust functions take one argument, so several travel as a
    /// tuple and this is [`map`](Self::map) under the name Python users look for.
    pub fn starmap<A, R, I>(&self, f: fn(A) -> R, items: I) -> Result<Vec<R>, PoolError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        self.map(f, items)
    }

    /// A lazy, ordered iterator of results; Python's `Pool.imap`. Items are taken from the
    /// input only as results are consumed, so an endless input uses bounded memory. The
    /// chunk size defaults to 1, as in Python.
    pub fn imap<A, R, I>(&self, f: fn(A) -> R, items: I) -> Imap<'_, A, R, I::IntoIter>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        Imap::new(self, f, items.into_iter(), true)
    }

    /// Like [`imap`](Self::imap), yielding results as they finish; Python's
    /// `Pool.imap_unordered`. Each error carries its task's index.
    pub fn imap_unordered<A, R, I>(&self, f: fn(A) -> R, items: I) -> Imap<'_, A, R, I::IntoIter>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        Imap::new(self, f, items.into_iter(), false)
    }

    /// Runs one task and waits for its result; Python's `Pool.apply`.
    pub fn apply<A, R>(&self, f: fn(A) -> R, args: A) -> Result<R, PoolError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        self.apply_async(f, args)?.get()
    }

    /// Queues one task and returns at once; Python's `Pool.apply_async`.
    pub fn apply_async<A, R>(&self, f: fn(A) -> R, args: A) -> Result<AsyncResult<R>, PoolError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        let (job, rx) = self.new_job();
        let mut chunk = new_chunk(job.clone(), fn_ref(f), 0);
        push_task(&mut chunk, self.target(), &args)?;
        self.submit(vec![chunk])?;
        Ok(AsyncResult {
            source: Source::Task(rx, decode_one::<R>),
            _job: Some(job),
            state: AsyncState::Waiting,
        })
    }

    /// [`apply_async`](Self::apply_async) with Python's `callback` and `error_callback`:
    /// they run on the pool's callback thread (one per pool, started by the first call that
    /// has callbacks; never the caller's thread), one at a time, in the order the tasks
    /// complete, before the [`AsyncResult`] becomes ready.
    ///
    /// A callback that panics does not end the pool, unlike Python, where an exception in a
    /// callback kills the pool's result thread (and hangs the pool): the panic is caught
    /// and its message printed on standard error; the result still goes to the
    /// `AsyncResult`, and later callbacks still run. A callback that never returns holds up
    /// the callbacks after it, and [`join`](Self::join), which waits for every callback
    /// (as Python's does).
    ///
    /// With [`StartMethod::Fork`], the callback thread counts as a thread of the program:
    /// replacement workers are then forked only with
    /// [`allow_fork_with_threads`](PoolBuilder::allow_fork_with_threads).
    pub fn apply_async_with<A, R>(
        &self,
        f: fn(A) -> R,
        args: A,
        callbacks: Callbacks<R>,
    ) -> Result<AsyncResult<R>, PoolError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        let collect = callbacks::Collect::new(1, move |all: Result<Vec<R>, PoolError>| {
            let one = all.and_then(|mut v| v.pop().ok_or(PoolError::Terminated { index: 0 }));
            callbacks.run(&one);
            let _ = tx.send(one);
        });
        let events = self.callbacks.sender()?;
        let (job, _) = self.new_job_with(Some(callbacks::Collect::forwarder(collect, events)));
        let mut chunk = new_chunk(job, fn_ref(f), 0);
        push_task(&mut chunk, self.target(), &args)?;
        self.submit(vec![chunk])?;
        Ok(AsyncResult::decoded(rx))
    }

    /// Calls `f` on every item and returns at once; Python's `Pool.map_async`. The whole
    /// input is taken and queued now (as Python does), with `map`'s automatic chunk size;
    /// [`AsyncResult::get`] gives every result in order, or the first error (by completion)
    /// as soon as it comes: the other tasks still run.
    pub fn map_async<A, R, I>(
        &self,
        f: fn(A) -> R,
        items: I,
    ) -> Result<AsyncResult<Vec<R>>, PoolError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = A>,
    {
        self.map_async_with(f, items, Callbacks::new())
    }

    /// Python's `Pool.starmap_async`: Rust functions take one argument, so several travel
    /// as a tuple and this is [`map_async`](Self::map_async).
    pub fn starmap_async<A, R, I>(
        &self,
        f: fn(A) -> R,
        items: I,
    ) -> Result<AsyncResult<Vec<R>>, PoolError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = A>,
    {
        self.map_async(f, items)
    }

    /// Python's `starmap_async` with `callback` and `error_callback`:
    /// [`map_async_with`](Self::map_async_with).
    pub fn starmap_async_with<A, R, I>(
        &self,
        f: fn(A) -> R,
        items: I,
        callbacks: Callbacks<Vec<R>>,
    ) -> Result<AsyncResult<Vec<R>>, PoolError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = A>,
    {
        self.map_async_with(f, items, callbacks)
    }

    /// [`map_async`](Self::map_async) with Python's `callback` (given every result, in
    /// order) and `error_callback` (given the first error), run as
    /// [`apply_async_with`](Self::apply_async_with) runs them.
    pub fn map_async_with<A, R, I>(
        &self,
        f: fn(A) -> R,
        items: I,
        callbacks: Callbacks<Vec<R>>,
    ) -> Result<AsyncResult<Vec<R>>, PoolError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = A>,
    {
        let items = Input::new(items.into_iter());
        let len = items.len;
        let (tx, rx) = mpsc::channel();
        let collect = callbacks::Collect::new(len, move |all: Result<Vec<R>, PoolError>| {
            callbacks.run(&all);
            let _ = tx.send(all);
        });
        let events = self.callbacks.sender()?;
        let (job, _) = self.new_job_with(Some(callbacks::Collect::forwarder(
            collect.clone(),
            events.clone(),
        )));
        let chunksize = policy::auto_chunksize(len, self.processes());
        let mut plain = Some(plain::Encoder::default());
        let mut chunks = Vec::new();
        let mut next = 0u64;
        let mut items = items.fuse();
        loop {
            let mut chunk = new_chunk(job.clone(), fn_ref(f), next);
            while policy::chunk_takes_more(
                chunk.len(),
                chunk.args_len(),
                chunksize,
                policy::AUTO_CHUNK_BYTES,
            ) {
                let Some(a) = items.next() else { break };
                push_item(&mut chunk, self.target(), &mut plain, &a)?;
            }
            if chunk.len() == 0 {
                break;
            }
            next += chunk.len() as u64;
            chunks.push(chunk);
        }
        if chunks.is_empty() {
            let _ = events.send(Box::new(move || {
                collect
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .finish_if_empty()
            }));
        } else {
            self.submit(chunks)?;
        }
        Ok(AsyncResult::decoded(rx))
    }

    /// No more tasks will be submitted; queued ones still run. Python's `Pool.close`.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.shared.inbox().close = true;
        self.shared.waker.wake();
    }

    /// Waits for the workers to finish the queued tasks and exit; call [`close`](Self::close)
    /// first (as in Python, `join` on an open pool closes it). Python's `Pool.join`.
    ///
    /// Fails with [`PoolError::DriverDied`] if the pool's driver thread has died.
    pub fn join(&self) -> Result<(), PoolError> {
        self.close();
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((h, counted)) = handle {
            let _ = h.join();
            drop(counted);
        }
        // Every outcome has been delivered: let the callbacks run, and wait for them.
        self.callbacks.stop();
        let inbox = self.shared.inbox();
        match &inbox.dead {
            Some(message) => Err(PoolError::DriverDied {
                message: message.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Makes the pool's driver thread panic (fault injection for gpuproc's own tests).
    #[doc(hidden)]
    pub fn __panic_driver_for_tests(&self) {
        self.shared.inbox().panic_driver = true;
        self.shared.waker.wake();
    }

    /// How many chunks the pool has sent to its workers (each is one message; a task sent
    /// again after its worker died counts again): for gpuproc's own tests of the chunking.
    #[doc(hidden)]
    pub fn __chunks_sent_for_tests(&self) -> u64 {
        self.shared.chunks_sent.load(Ordering::Relaxed)
    }

    /// Kills the workers at once; unfinished tasks fail with [`PoolError::Terminated`].
    /// Python's `Pool.terminate`.
    pub fn terminate(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.shared.inbox().terminate = true;
        self.shared.waker.wake();
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((h, counted)) = handle {
            let _ = h.join();
            drop(counted);
        }
        self.callbacks.stop();
    }
}

/// The message of a panic's payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.terminate();
    }
}

fn new_chunk(job: Arc<Job>, func: FnRef, first_index: u64) -> Chunk {
    Chunk {
        job,
        func,
        first_index,
        args: Vec::new(),
        shm: None,
        shape: None,
        lens: Lens::default(),
        nfds: Vec::new(),
        fds: Vec::new(),
        attempts: 0,
    }
}

/// Where a chunk's tasks go: the pool's shared memory for large arguments, and whether its
/// workers are on other machines.
#[derive(Clone, Copy)]
struct Target<'a> {
    shm: &'a Arc<ShmPool>,
    remote: bool,
    /// The bytes the chunk is expected to take, when known.
    expect: shm_args::Expect,
}

impl Pool {
    fn target(&self) -> Target<'_> {
        Target {
            shm: &self.shared.shm,
            remote: self.config.launcher.is_some(),
            expect: shm_args::Expect::default(),
        }
    }
}

/// Appends one task's encoded argument to a chunk.
fn push_task<A: Serialize>(chunk: &mut Chunk, to: Target<'_>, args: &A) -> Result<(), PoolError> {
    let index = chunk.first_index + chunk.len() as u64;
    let start = chunk.args_len();
    let fds = shm_args::encode(&mut chunk.args, &mut chunk.shm, to.shm, to.expect, args).map_err(
        |reason| PoolError::Encode {
            index,
            type_name: type_name::<A>().to_string(),
            reason,
        },
    )?;
    if to.remote && !fds.is_empty() {
        chunk.truncate_args(start);
        return Err(PoolError::Encode {
            index,
            type_name: type_name::<A>().to_string(),
            reason: "it holds a descriptor (a queue, lock, pipe or shared memory), which cannot \
                     go to a worker on another machine"
                .into(),
        });
    }
    let sizes = lens::checked_len(chunk.args_len() - start, "the argument")
        .and_then(|len| Ok((len, lens::checked_fds(fds.len(), "the argument")?)));
    let (len, nfds) = match sizes {
        Ok(lens) => lens,
        Err(reason) => {
            chunk.truncate_args(start);
            return Err(PoolError::Encode {
                index,
                type_name: type_name::<A>().to_string(),
                reason,
            });
        }
    };
    chunk.lens.push(len);
    // Descriptor counts are kept once any task has descriptors (earlier tasks: 0).
    if !fds.is_empty() || !chunk.nfds.is_empty() {
        chunk.nfds.resize(chunk.lens.len() - 1, 0);
        chunk.nfds.push(nfds);
    }
    chunk.fds.extend(fds);
    Ok(())
}

/// The most results `map` reserves room for up front (more grow the vector as they come).
const MAX_RESERVE: usize = 1 << 26;

/// A whole input whose length is known: taken as it comes when the iterator says exactly
/// how long it is, else collected first.
#[derive(Debug)]
struct Input<A, I> {
    items: Either<I, std::vec::IntoIter<A>>,
    len: usize,
}

#[derive(Debug)]
enum Either<L, R> {
    Direct(L),
    Collected(R),
}

impl<A, I: Iterator<Item = A>> Input<A, I> {
    fn new(it: I) -> Self {
        match it.size_hint() {
            (lo, Some(hi)) if lo == hi => Input {
                items: Either::Direct(it),
                len: lo,
            },
            _ => {
                let v: Vec<A> = it.collect();
                Input {
                    len: v.len(),
                    items: Either::Collected(v.into_iter()),
                }
            }
        }
    }
}

impl<A, I: Iterator<Item = A>> Iterator for Input<A, I> {
    type Item = A;

    #[inline]
    fn next(&mut self) -> Option<A> {
        match &mut self.items {
            Either::Direct(it) => it.next(),
            Either::Collected(it) => it.next(),
        }
    }
}

/// Appends one task's argument to a chunk as plain data (see [`plain`]) while `plain` holds
/// an encoder, else with postcard. The first plain argument fixes the shape (and must decode
/// again); an argument that is not plain data of that shape gives plain encoding up for the
/// rest of the job (`plain` becomes `None`), re-encoding the chunk so far with postcard.
fn push_item<A: Serialize + DeserializeOwned>(
    chunk: &mut Chunk,
    pool: Target<'_>,
    plain: &mut Option<plain::Encoder>,
    args: &A,
) -> Result<(), PoolError> {
    if let Some(enc) = plain.as_mut() {
        let start = chunk.args.len();
        let first = enc.shape().is_none();
        if enc.push(&mut chunk.args, args) {
            let shape = enc.shape().unwrap_or_default();
            if !first || plain::decode::<A>(&chunk.args[start..], shape).is_ok() {
                // (A plain item is at most a few hundred bytes: this always fits.)
                if let Ok(len) = u32::try_from(chunk.args.len() - start) {
                    if chunk.shape.is_none() {
                        chunk.shape = Some(shape.to_vec());
                    }
                    chunk.lens.push(len);
                    return Ok(());
                }
            }
            chunk.args.truncate(start);
        }
        *plain = None;
        if let Some(shape) = chunk.shape.take() {
            let old = std::mem::take(&mut chunk.args);
            let lens = std::mem::take(&mut chunk.lens);
            let mut at = 0;
            for k in 0..lens.len() {
                let len = lens.get(k);
                let a: A =
                    plain::decode(&old[at..at + len], &shape).map_err(|e| PoolError::Encode {
                        index: chunk.first_index + chunk.len() as u64,
                        type_name: type_name::<A>().to_string(),
                        reason: e.to_string(),
                    })?;
                at += len;
                push_task(chunk, pool, &a)?;
            }
        }
    }
    push_task(chunk, pool, args)
}

/// Reads the outcomes of a [`Run`] one task at a time.
#[derive(Debug)]
pub(crate) struct RunReader {
    run: Run,
    /// Next task's offset in the run, and its result's offset in `run.results`.
    i: usize,
    at: usize,
    fds: std::vec::IntoIter<std::os::fd::OwnedFd>,
    errors: std::iter::Peekable<std::vec::IntoIter<(u32, PoolError)>>,
}

impl RunReader {
    pub(crate) fn new(mut run: Run) -> Self {
        let fds = std::mem::take(&mut run.fds).into_iter();
        let errors = std::mem::take(&mut run.errors).into_iter().peekable();
        RunReader {
            run,
            i: 0,
            at: 0,
            fds,
            errors,
        }
    }

    fn next_index(&self) -> u64 {
        self.run.first_index + self.i as u64
    }

    fn is_done(&self) -> bool {
        self.i >= self.run.lens.len()
    }

    /// The sampled GPU memory peak of the task `next` returns next.
    fn peak(&self) -> u64 {
        self.run.peaks.get(self.i).copied().unwrap_or(0)
    }

    /// The sampler's GPU accounting of the task `next` returns next (default: none).
    fn accounting(&self) -> gpu::GpuAccounting {
        self.run.accounting.get(self.i).cloned().unwrap_or_default()
    }

    /// Decodes the rest of a run with no failures and no descriptors in one loop, as plain
    /// data or postcard as the run says: `None` if the run is not like that (then use
    /// `next`). Stops at the first result that does not decode.
    fn drain<R: DeserializeOwned>(&mut self, out: &mut Vec<R>) -> Option<Result<(), PoolError>> {
        if self.errors.peek().is_some() || !self.run.nfds.is_empty() {
            return None;
        }
        match self.run.shape.take() {
            Some(shape) => {
                let r =
                    self.drain_with(out, |b| plain::decode(b, &shape).map_err(|e| e.to_string()));
                self.run.shape = Some(shape);
                Some(r)
            }
            None => Some(self.drain_with(out, |b| {
                ipc::decode_without_fds(b).map_err(|e| e.to_string())
            })),
        }
    }

    fn drain_with<R>(
        &mut self,
        out: &mut Vec<R>,
        decode: impl Fn(&[u8]) -> Result<R, String>,
    ) -> Result<(), PoolError> {
        let n = self.run.lens.len();
        let first = self.next_index();
        let results = self.run.results.bytes();
        let mut at = self.at;
        for (k, i) in (self.i..n).enumerate() {
            let end = at.saturating_add(self.run.lens.get(i));
            // (The driver checked that the lengths add up to the results.)
            let bytes = results.get(at..end).unwrap_or_default();
            at = end;
            match decode(bytes) {
                Ok(r) => out.push(r),
                Err(reason) => {
                    self.i = i + 1;
                    self.at = at;
                    return Err(PoolError::BadResult {
                        index: first + k as u64,
                        type_name: type_name::<R>().to_string(),
                        reason,
                    });
                }
            }
        }
        self.i = n;
        self.at = at;
        Ok(())
    }

    pub(crate) fn next<R: DeserializeOwned>(&mut self) -> Result<R, PoolError> {
        let (i, index) = (self.i, self.next_index());
        self.i += 1;
        let len = self.run.lens.get(i);
        // (The driver checked that the lengths add up to the results; a short slice would
        // fail to decode, never panic.)
        let results = self.run.results.bytes();
        let end = self.at.saturating_add(len).min(results.len());
        let bytes = results.get(self.at..end).unwrap_or_default();
        self.at = self.at.saturating_add(len);
        let n = self.run.nfds.get(i).copied().unwrap_or(0) as usize;
        let fds: Vec<_> = if n == 0 {
            Vec::new()
        } else {
            self.fds.by_ref().take(n).collect()
        };
        if self
            .errors
            .peek()
            .is_some_and(|(off, _)| *off as usize == i)
        {
            return Err(self.errors.next().expect("peeked").1);
        }
        let decoded = match &self.run.shape {
            Some(shape) => plain::decode(bytes, shape).map_err(|e| e.to_string()),
            None => worker::decode_from(bytes, fds).map_err(|e| e.to_string()),
        };
        decoded.map_err(|reason| PoolError::BadResult {
            index,
            type_name: type_name::<R>().to_string(),
            reason,
        })
    }
}

/// The iterator behind [`Pool::imap`] and [`Pool::imap_unordered`]: yields each task's
/// result or error. Dropping it cancels the tasks not yet sent to a worker.
#[must_use = "an Imap does nothing until it is iterated"]
pub struct Imap<'p, A, R, I> {
    pool: &'p Pool,
    func: FnRef,
    input: std::iter::Fuse<I>,
    ordered: bool,
    chunksize: usize,
    job: Arc<Job>,
    rx: Receiver<ToJob>,
    /// Set once the pool's driver has died (and that was reported): nothing more comes.
    dead: bool,
    next_index: u64,
    next_yield: u64,
    outstanding: usize,
    /// Runs received and not yet read, by first index.
    done: BTreeMap<u64, RunReader>,
    /// The run being read.
    current: Option<RunReader>,
    last_peak: u64,
    last_accounting: gpu::GpuAccounting,
    len: Option<usize>,
    bar: Option<indicatif::ProgressBar>,
    /// Encodes the arguments as plain data, until one is not (then postcard).
    plain: Option<plain::Encoder>,
    /// The encoded size of an argument in the last chunk, to size the next one.
    bytes_per_task: usize,
    /// A chunk stops taking items once its arguments reach this many bytes.
    max_chunk_bytes: usize,
    _types: PhantomData<fn(A) -> R>,
}

impl<A, R, I> std::fmt::Debug for Imap<'_, A, R, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Imap")
            .field("ordered", &self.ordered)
            .field("chunksize", &self.chunksize)
            .field("submitted", &self.next_index)
            .field("outstanding", &self.outstanding)
            .finish()
    }
}

impl<'p, A, R, I> Imap<'p, A, R, I>
where
    A: Serialize + DeserializeOwned,
    R: Serialize + DeserializeOwned,
    I: Iterator<Item = A>,
{
    fn new(pool: &'p Pool, f: fn(A) -> R, input: I, ordered: bool) -> Self {
        let (job, rx) = pool.new_job();
        Imap {
            pool,
            func: fn_ref(f),
            input: input.fuse(),
            ordered,
            chunksize: 1,
            job,
            rx,
            dead: false,
            next_index: 0,
            next_yield: 0,
            outstanding: 0,
            done: BTreeMap::new(),
            current: None,
            last_peak: 0,
            last_accounting: gpu::GpuAccounting::default(),
            len: None,
            bar: None,
            plain: Some(plain::Encoder::default()),
            bytes_per_task: 8,
            max_chunk_bytes: policy::MAX_CHUNK_BYTES,
            _types: PhantomData,
        }
    }

    /// Sends tasks to workers in chunks of `n` (Python's `chunksize`; default 1).
    pub fn chunksize(mut self, n: usize) -> Self {
        self.chunksize = n.max(1);
        self
    }

    /// The GPU memory peak of the task whose outcome was yielded last, as sampled through
    /// NVML while it ran (see [`PoolBuilder::gpu_sampling`]); 0 when no sample fell in it.
    pub fn last_gpu_memory_peak(&self) -> u64 {
        self.last_peak
    }

    /// The GPU accounting of the task whose outcome was yielded last, from the samples
    /// taken while it ran (see [`PoolBuilder::gpu_sampling`]): its time on the GPU, peak
    /// and mean memory, mean SM utilisation, and energy when its worker had its GPUs alone
    /// (see [`GpuAccounting`](crate::gpu::GpuAccounting)). Empty (the default) for tasks
    /// that no sample fell in, and for remote workers, whose nodes send memory only (see
    /// [`last_gpu_memory_peak`](Self::last_gpu_memory_peak)).
    pub fn last_gpu_accounting(&self) -> &gpu::GpuAccounting {
        &self.last_accounting
    }

    /// The number of items, when known, for the progress bar.
    pub fn with_len(mut self, len: usize) -> Self {
        self.len = Some(len);
        self
    }

    /// Collects every remaining result in order, a whole run at a time (no per-item
    /// iterator bookkeeping): `map`'s fast path. Stops at the first failed task.
    fn drain_into(&mut self, out: &mut Vec<R>) -> Result<(), PoolError> {
        debug_assert!(self.ordered);
        // (An iterator's length is only a hint: a wrong one must not reserve absurdly.)
        let len = self.len.unwrap_or(0).min(MAX_RESERVE);
        if out.is_empty() && out.capacity() < len {
            *out = sys::vec_for_bulk(len);
        }
        out.reserve(len);
        if self.pool.config.progress {
            // The bar moves per item: go through `next`.
            for r in self.by_ref() {
                out.push(r?);
            }
            return Ok(());
        }
        loop {
            if let Some(mut cur) = self.current.take() {
                let n = cur.run.lens.len() - cur.i;
                match cur.drain(out) {
                    Some(r) => r?,
                    None => {
                        for _ in 0..n {
                            out.push(cur.next::<R>()?);
                        }
                    }
                }
                cur.run.results.recycle(&self.pool.shared.buffers);
                self.next_yield += n as u64;
                self.outstanding -= n;
            }
            self.fill()?;
            if let Some(run) = self.done.remove(&self.next_yield) {
                self.current = Some(run);
                continue;
            }
            if self.outstanding == 0 {
                return Ok(());
            }
            match self.rx.recv() {
                Ok(ToJob::Runs(runs)) => {
                    for run in runs {
                        self.done.insert(run.first_index, RunReader::new(run));
                    }
                }
                Ok(ToJob::DriverDied(message)) => {
                    self.dead = true;
                    self.outstanding = 0;
                    return Err(PoolError::DriverDied { message });
                }
                Err(_) => {
                    return Err(PoolError::Terminated {
                        index: self.next_yield,
                    })
                }
            }
        }
    }

    /// Takes more input while fewer than the window's tasks, and of its bytes, are
    /// outstanding (see [`policy::imap_sends_more`]).
    fn fill(&mut self) -> Result<(), PoolError> {
        let workers = self.pool.processes();
        let window = policy::imap_window(workers, self.chunksize);
        let mut batch: Vec<Chunk> = Vec::new();
        let mut batched = 0;
        while policy::imap_sends_more(
            self.outstanding,
            window,
            self.bytes_per_task,
            workers,
            policy::chunk_capacity(self.chunksize, self.bytes_per_task, self.max_chunk_bytes),
        ) {
            let mut chunk = new_chunk(self.job.clone(), self.func, self.next_index);
            let room =
                policy::chunk_capacity(self.chunksize, self.bytes_per_task, self.max_chunk_bytes);
            chunk.args = (self.pool.shared.buffers).take(room);
            let mut to = self.pool.target();
            if !to.remote {
                // (A remote worker's chunk is sent from the heap: no memfd for it.)
                to.expect = shm_args::Expect::chunk(room);
            }
            // A chunk of large items ends early, at its byte budget; the next takes the rest.
            while policy::chunk_takes_more(
                chunk.len(),
                chunk.args_len(),
                self.chunksize,
                self.max_chunk_bytes,
            ) {
                let Some(a) = self.input.next() else { break };
                push_item(&mut chunk, to, &mut self.plain, &a)?;
            }
            if chunk.len() == 0 {
                break;
            }
            self.next_index += chunk.len() as u64;
            self.outstanding += chunk.len();
            self.bytes_per_task = chunk.args_len().div_ceil(chunk.len()).max(1);
            // Big chunks go as soon as they are encoded, so workers start while we encode
            // on; small ones go together, to wake the driver once.
            batched += chunk.len();
            batch.push(chunk);
            if batched >= 256 {
                self.pool.submit(std::mem::take(&mut batch))?;
                batched = 0;
            }
        }
        if !batch.is_empty() {
            self.pool.submit(batch)?;
        }
        Ok(())
    }

    fn progress(&mut self) {
        if !self.pool.config.progress {
            return;
        }
        let bar = self.bar.get_or_insert_with(|| match self.len {
            Some(n) => indicatif::ProgressBar::new(n as u64),
            None => indicatif::ProgressBar::no_length(),
        });
        bar.inc(1);
    }
}

impl<A, R, I> Iterator for Imap<'_, A, R, I>
where
    A: Serialize + DeserializeOwned,
    R: Serialize + DeserializeOwned,
    I: Iterator<Item = A>,
{
    type Item = Result<R, PoolError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.dead {
            return None;
        }
        loop {
            if let Some(cur) = self.current.as_mut() {
                if !cur.is_done() {
                    self.last_peak = cur.peak();
                    self.last_accounting = cur.accounting();
                    let r = cur.next::<R>();
                    self.next_yield += 1;
                    self.outstanding -= 1;
                    self.progress();
                    return Some(r);
                }
                if let Some(done) = self.current.take() {
                    done.run.results.recycle(&self.pool.shared.buffers);
                }
            }
            if let Err(e) = self.fill() {
                self.dead = e.is_driver_died();
                return Some(Err(e));
            }
            self.current = if self.ordered {
                self.done.remove(&self.next_yield)
            } else {
                self.done.pop_first().map(|(_, r)| r)
            };
            if self.current.is_some() {
                continue;
            }
            if self.outstanding == 0 {
                if let Some(bar) = &self.bar {
                    bar.finish_and_clear();
                }
                return None;
            }
            match self.rx.recv() {
                Ok(ToJob::Runs(runs)) => {
                    for run in runs {
                        self.done.insert(run.first_index, RunReader::new(run));
                    }
                }
                // Runs received before are still yielded (in order, up to the first
                // missing one); then this error, and the end.
                Ok(ToJob::DriverDied(message)) => {
                    self.dead = true;
                    self.outstanding = 0;
                    return Some(Err(PoolError::DriverDied { message }));
                }
                // The driver is gone, and with it every task's sender.
                Err(_) => {
                    self.outstanding = 0;
                    let index = self.next_yield;
                    self.next_yield += 1;
                    return Some(Err(PoolError::Terminated { index }));
                }
            }
        }
    }
}

impl<A, R, I> Drop for Imap<'_, A, R, I> {
    fn drop(&mut self) {
        self.job.cancelled.store(true, Ordering::Relaxed);
    }
}

enum AsyncState<R> {
    Waiting,
    Done(Result<R, PoolError>),
    Taken,
}

/// Where an [`AsyncResult`]'s outcome comes from.
enum Source<R> {
    /// One task's outcome, straight from the pool's driver, decoded by `get` (with the
    /// function).
    Task(Receiver<ToJob>, fn(Run) -> Result<R, PoolError>),
    /// An outcome decoded elsewhere (the callback thread, a thread pool's worker).
    Decoded(Receiver<Result<R, PoolError>>),
}

/// The pending result of [`Pool::apply_async`] and [`Pool::map_async`] (then `R` is a
/// `Vec` of results); Python's `AsyncResult` and `MapResult`.
///
/// Dropping it does not cancel the work: it still runs (and its callbacks too), as in
/// Python.
#[must_use = "the task's result or error is only seen through get()"]
pub struct AsyncResult<R> {
    source: Source<R>,
    /// Kept so that a dying driver can tell this result (see `driver::driver_died`).
    _job: Option<Arc<Job>>,
    state: AsyncState<R>,
}

impl<R> std::fmt::Debug for AsyncResult<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            AsyncState::Waiting => "waiting",
            AsyncState::Done(_) => "ready",
            AsyncState::Taken => "taken",
        };
        f.debug_struct("AsyncResult")
            .field("state", &state)
            .finish()
    }
}

impl<R> AsyncResult<R> {
    /// A result that another thread decodes and sends on `rx` (its sender dropped without
    /// sending: [`PoolError::Terminated`]).
    pub(crate) fn decoded(rx: Receiver<Result<R, PoolError>>) -> Self {
        AsyncResult {
            source: Source::Decoded(rx),
            _job: None,
            state: AsyncState::Waiting,
        }
    }
}

/// Receives from `rx` until `deadline` (`None`: for ever).
fn recv_until<T>(rx: &Receiver<T>, deadline: Option<Instant>) -> Result<T, RecvTimeoutError> {
    match deadline {
        None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
    }
}

/// The outcome of a run of one task.
fn decode_one<R: DeserializeOwned>(run: Run) -> Result<R, PoolError> {
    RunReader::new(run).next()
}

impl<R> AsyncResult<R> {
    fn poll(&mut self, deadline: Option<Instant>) {
        if !matches!(self.state, AsyncState::Waiting) {
            return;
        }
        let (rx, decode) = match &self.source {
            Source::Task(rx, decode) => (rx, *decode),
            Source::Decoded(rx) => {
                match recv_until(rx, deadline) {
                    Ok(r) => self.state = AsyncState::Done(r),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => {
                        self.state = AsyncState::Done(Err(PoolError::Terminated { index: 0 }))
                    }
                }
                return;
            }
        };
        let got = recv_until(rx, deadline);
        match got {
            Ok(ToJob::Runs(runs)) => {
                let result = match runs.into_iter().next() {
                    Some(run) => decode(run),
                    None => Err(PoolError::Terminated { index: 0 }),
                };
                self.state = AsyncState::Done(result);
            }
            Ok(ToJob::DriverDied(message)) => {
                self.state = AsyncState::Done(Err(PoolError::DriverDied { message }))
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                self.state = AsyncState::Done(Err(PoolError::Terminated { index: 0 }))
            }
        }
    }

    /// Waits for the result; Python's `get()`.
    pub fn get(mut self) -> Result<R, PoolError> {
        self.poll(None);
        self.take()
    }

    /// Waits at most `timeout`; on [`PoolError::Timeout`] the task goes on and this can be
    /// asked again. Python's `get(timeout)`.
    pub fn get_timeout(&mut self, timeout: Duration) -> Result<R, PoolError> {
        self.poll(crate::time::deadline(timeout));
        if matches!(self.state, AsyncState::Waiting) {
            return Err(PoolError::Timeout { waited: timeout });
        }
        self.take()
    }

    fn take(&mut self) -> Result<R, PoolError> {
        match std::mem::replace(&mut self.state, AsyncState::Taken) {
            AsyncState::Done(r) => r,
            AsyncState::Taken => Err(PoolError::AlreadyTaken),
            AsyncState::Waiting => unreachable!("polled until done"),
        }
    }

    /// Whether the task has finished (never blocks); Python's `ready()`.
    pub fn ready(&mut self) -> bool {
        self.poll(Some(Instant::now()));
        !matches!(self.state, AsyncState::Waiting)
    }

    /// Waits until the task has finished; Python's `wait()`.
    pub fn wait(&mut self) {
        self.poll(None);
    }

    /// Waits at most `timeout`; returns whether the task has finished.
    pub fn wait_timeout(&mut self, timeout: Duration) -> bool {
        self.poll(crate::time::deadline(timeout));
        !matches!(self.state, AsyncState::Waiting)
    }

    /// Whether the task succeeded, once it has finished; Python's `successful()`.
    pub fn successful(&mut self) -> Option<bool> {
        self.ready();
        match &self.state {
            AsyncState::Done(r) => Some(r.is_ok()),
            _ => None,
        }
    }
}
