//! `Process`: run a Rust function in another process and get its result back.
//!
//! The shape follows Python's `multiprocessing.Process`: build it with a target and its
//! argument, `start` it, `join` it. Start methods, as in Python, are [`StartMethod::Spawn`],
//! [`StartMethod::ForkServer`] (the default) and [`StartMethod::Fork`].

pub(crate) mod child;
mod error;
mod forkserver;
mod handle;
mod remote;
pub(crate) mod wire;

use std::any::type_name;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use self::child::ParentWatch;
pub use self::error::ProcessError;
use self::handle::{ChildHandle, Report};
use self::wire::{Call, Failure, Identity, Trampoline};
use crate::gpu::{Criteria, DeviceId, GpuLease};
use crate::ipc;
use crate::pool::Launcher;
use crate::sys::{self, Forked, Sig};

pub use self::remote::LOST_EXITCODE;
pub use crate::sys::ExitStatus;

/// The environment variable that tells [`crate::init`] it runs as a spawned child.
pub(crate) const CHILD_FD_ENV: &str = "GPUPROC_CHILD_FD";
/// How the spawned child should watch for its parent's death.
const CHILD_WATCH_ENV: &str = "GPUPROC_CHILD_WATCH";

/// How a child process is created. See the crate documentation for the trade-offs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StartMethod {
    /// Re-run this executable (`/proc/self/exe`) and call the target there. Slowest, and
    /// always safe. Needs [`init`](crate::init).
    Spawn,
    /// Ask a single-threaded server process, started once on first use, to fork the child.
    /// Fast and safe in multi-threaded programs. Needs [`init`](crate::init) (before any
    /// thread starts: see [`init_before_main!`](crate::init_before_main) for async
    /// runtimes). The default.
    ForkServer,
    /// `fork()` this process. Fastest; refused when this process has more than one thread
    /// unless [`Process::allow_fork_with_threads`] says otherwise (the thread gpuproc starts
    /// in a child to watch its parent does not count: it never holds a lock).
    Fork,
}

impl StartMethod {
    /// Python's name for it: `"spawn"`, `"forkserver"` or `"fork"`.
    pub fn name(self) -> &'static str {
        match self {
            StartMethod::Spawn => "spawn",
            StartMethod::ForkServer => "forkserver",
            StartMethod::Fork => "fork",
        }
    }

    /// All start methods, fastest-safe first.
    pub fn all() -> [StartMethod; 3] {
        [
            StartMethod::ForkServer,
            StartMethod::Fork,
            StartMethod::Spawn,
        ]
    }

    fn to_u8(self) -> u8 {
        match self {
            StartMethod::ForkServer => 0,
            StartMethod::Fork => 1,
            StartMethod::Spawn => 2,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => StartMethod::Fork,
            2 => StartMethod::Spawn,
            _ => StartMethod::ForkServer,
        }
    }
}

impl std::str::FromStr for StartMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "spawn" => Ok(StartMethod::Spawn),
            "forkserver" => Ok(StartMethod::ForkServer),
            "fork" => Ok(StartMethod::Fork),
            other => Err(format!(
                "unknown start method {other:?}: expected spawn, forkserver or fork"
            )),
        }
    }
}

static START_METHOD: AtomicU8 = AtomicU8::new(0);
static INITIALIZED: AtomicBool = AtomicBool::new(false);
static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

/// Sets the start method used by processes (and pools) that do not choose one; Python's
/// `multiprocessing.set_start_method`.
pub fn set_start_method(method: StartMethod) {
    START_METHOD.store(method.to_u8(), Ordering::SeqCst);
}

/// The start method used by processes that do not choose one; Python's
/// `multiprocessing.get_start_method`.
pub fn get_start_method() -> StartMethod {
    StartMethod::from_u8(START_METHOD.load(Ordering::SeqCst))
}

/// The first argument a spawned child gets (after `argv[0]`), so that it is recognisable in
/// `ps` and so that [`init`] knows the environment variable is meant for it.
const CHILD_ARG: &str = "--gpuproc-child";

/// Whether [`init`] has run in this program (so that it can be started again as a helper).
pub(crate) fn initialized() -> bool {
    INITIALIZED.load(Ordering::SeqCst)
}

/// Runs the child, fork-server or resource-tracker side if this process is one; otherwise
/// returns at once.
pub(crate) fn init() {
    INITIALIZED.store(true, Ordering::SeqCst);
    if let Some(fd) = take_env_fd(crate::shm::tracker::FD_ENV, crate::shm::tracker::ARG) {
        crate::shm::tracker::serve(fd)
    }
    if let Some(fd) = take_env_fd(forkserver::SERVER_FD_ENV, forkserver::SERVER_ARG) {
        forkserver::serve(fd)
    }
    if let Some(fd) = take_env_fd(CHILD_FD_ENV, CHILD_ARG) {
        let watch = std::env::var(CHILD_WATCH_ENV).unwrap_or_default();
        std::env::remove_var(CHILD_WATCH_ENV);
        child::serve_call(fd, ParentWatch::from_env(&watch))
    }
}

/// The descriptor our parent left in `var`, once checked (see [`sys::take_inherited_fd`]).
///
/// A value that does not check out is not adopted: it may come from an unrelated ancestor.
/// If this process was started by gpuproc (its first argument is `arg`), its parent is gone
/// or broken and it exits with 1; otherwise the program runs on as itself.
fn take_env_fd(var: &str, arg: &str) -> Option<OwnedFd> {
    let value = std::env::var(var).ok()?;
    std::env::remove_var(var);
    let parent = sys::getppid().unwrap_or(0);
    let checked = value
        .parse()
        .map_err(|_| "not a number".to_string())
        .and_then(|raw| sys::take_inherited_fd(raw, parent).map_err(|e| e.to_string()));
    match checked {
        Ok(fd) => Some(fd),
        Err(why) => {
            let ours = std::env::args_os().nth(1).is_some_and(|a| a == arg);
            if ours {
                eprintln!(
                    "gpuproc: {var}={value:?} is not from this process's parent: {why}; exiting"
                );
                sys::exit_now(1)
            }
            eprintln!("gpuproc: ignoring {var}={value:?}: {why}");
            None
        }
    }
}

/// What a process knows about itself or another process: what Python's
/// `current_process()`, `parent_process()` and `active_children()` return.
///
/// Python returns process objects there; the parts of them that make sense for a process
/// this one did not start are here: `name`, `pid` (Python's `pid` and `ident`), `daemon`,
/// [`is_alive`](Self::is_alive) and [`exitcode`](Self::exitcode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// The process's name (`"MainProcess"` for the main program, `"Process-1"`, ...).
    pub name: String,
    /// Its pid.
    pub pid: u32,
    /// Whether it is daemonic.
    pub daemon: bool,
    role: Role,
}

/// Which process a [`ProcessInfo`] describes, as seen from this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Current,
    Parent,
    Child,
}

impl ProcessInfo {
    /// The process's pid; Python's `pid` (and `ident`).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process is running; Python's `is_alive()`. Always `true` for
    /// [`current_process`]; for [`parent_process`], whether the parent has not ended (a
    /// gpuproc child is killed when its parent ends, so it rarely sees `false`); for an
    /// entry of [`active_children`], whether that child still runs.
    pub fn is_alive(&self) -> bool {
        match self.role {
            Role::Current => true,
            Role::Parent => parent_alive(self.pid),
            Role::Child => handle::active().iter().any(|c| c.pid == self.pid),
        }
    }

    /// How the process ended, once it has; `None` while it runs. Always `None` for
    /// [`current_process`] and [`parent_process`], as in Python (only a process's parent
    /// learns its exit code); for an entry of [`active_children`], see
    /// [`Process::exitcode`] (`None` once that `Process` was dropped).
    pub fn exitcode(&self) -> Option<i32> {
        match self.role {
            Role::Current | Role::Parent => None,
            Role::Child => handle::status_of(self.pid).map(ExitStatus::exitcode),
        }
    }
}

/// A pidfd for this process's parent, opened when the child started (`Some(None)`: the
/// parent was gone by then). Replaced in each child: a forked child inherits its parent's.
static PARENT_PIDFD: Mutex<Option<Option<OwnedFd>>> = Mutex::new(None);

fn parent_alive(pid: u32) -> bool {
    let parent = PARENT_PIDFD.lock().unwrap_or_else(|p| p.into_inner());
    match &*parent {
        Some(Some(fd)) => !matches!(
            sys::poll_readable(&[fd.as_fd()], Some(Instant::now())).as_deref(),
            Ok([true])
        ),
        // No pidfd could be opened: the parent was already gone.
        Some(None) => false,
        None => sys::pidfd_open(pid).is_ok(),
    }
}

#[derive(Debug, Clone)]
struct Me {
    name: String,
    daemon: bool,
    parent: Option<(u32, String)>,
}

static ME: Mutex<Option<Me>> = Mutex::new(None);

fn me() -> Me {
    ME.lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_else(|| Me {
            name: "MainProcess".into(),
            daemon: false,
            parent: None,
        })
}

/// The process name a child gets when it was not named with [`Process::with_name`].
const DEFAULT_COMM: &str = "gpuproc-worker";

/// Called in a child before its target runs.
fn enter_child(id: &Identity, env: &[(String, Option<String>)]) {
    sys::set_process_name(&id.comm);
    // As in Python, a child's default start method is the one that started it.
    START_METHOD.store(
        StartMethod::from_u8(id.start_method).to_u8(),
        Ordering::SeqCst,
    );
    *ME.lock().unwrap_or_else(|p| p.into_inner()) = Some(Me {
        name: id.name.clone(),
        daemon: id.daemon,
        parent: Some((id.parent_pid, id.parent_name.clone())),
    });
    NEXT_ID.store(1, Ordering::SeqCst);
    // (A parent on another machine has no pid here.)
    *PARENT_PIDFD.lock().unwrap_or_else(|p| p.into_inner()) =
        Some(if child::on_another_machine() {
            None
        } else {
            sys::pidfd_open(id.parent_pid).ok()
        });
    for (k, v) in env {
        match v {
            Some(v) => std::env::set_var(k, v),
            None => std::env::remove_var(k),
        }
    }
}

/// This process; Python's `multiprocessing.current_process()`.
pub fn current_process() -> ProcessInfo {
    let me = me();
    ProcessInfo {
        name: me.name,
        pid: sys::getpid(),
        daemon: me.daemon,
        role: Role::Current,
    }
}

/// The process that started this one, or `None` in the main program; Python's
/// `multiprocessing.parent_process()`.
pub fn parent_process() -> Option<ProcessInfo> {
    me().parent.map(|(pid, name)| ProcessInfo {
        name,
        pid,
        daemon: false,
        role: Role::Parent,
    })
}

/// The children of this process that are still running; Python's
/// `multiprocessing.active_children()`.
pub fn active_children() -> Vec<ProcessInfo> {
    handle::active()
        .iter()
        .map(|c| ProcessInfo {
            name: c.name.clone(),
            pid: c.pid,
            daemon: c.daemon,
            role: Role::Child,
        })
        .collect()
}

/// The number of CPUs in the machine; Python's `multiprocessing.cpu_count()`.
pub fn cpu_count() -> usize {
    sys::cpus_online()
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
}

/// The number of CPUs this process may run on (its affinity); Python 3.13's
/// `os.process_cpu_count()`.
pub fn process_cpu_count() -> usize {
    sys::cpus_allowed().unwrap_or_else(cpu_count)
}

fn default_name() -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::SeqCst);
    let me = me();
    match me.name.strip_prefix("Process-") {
        Some(mine) if me.parent.is_some() => format!("Process-{mine}:{n}"),
        _ => format!("Process-{n}"),
    }
}

/// A Rust function running (or about to run) in another process; Python's
/// `multiprocessing.Process`.
///
/// The target is a plain `fn(A) -> R` (or a closure that captures nothing); the argument and
/// the result cross between processes as serde data. Pass several arguments as a tuple.
///
/// ```
/// # gpuproc::init();
/// fn square(x: i64) -> i64 { x * x }
///
/// let mut p = gpuproc::Process::new(square, 12);
/// p.start()?;
/// assert_eq!(p.join()?, 144);
/// assert_eq!(p.exitcode(), Some(0));
/// # Ok::<(), gpuproc::ProcessError>(())
/// ```
///
/// A closure that captures its environment is refused at compile time: there is no code to
/// send, only data.
///
/// ```compile_fail
/// let offset = 10;
/// let p = gpuproc::Process::new(|x: i64| x + offset, 1);
/// ```
///
/// # Dropping
/// Dropping a started process that has not been joined kills it (SIGKILL) and reaps it, so
/// no child outlives its handle or lingers as a zombie. Join it first to get its result.
#[must_use = "a Process does nothing until start() is called"]
pub struct Process<A, R> {
    target: fn(A) -> R,
    args: Option<A>,
    name: String,
    /// Whether `name` was chosen by the user (it then names the OS process too).
    named: bool,
    daemon: bool,
    start_method: Option<StartMethod>,
    allow_fork_with_threads: bool,
    env: Vec<(String, Option<String>)>,
    child: Option<Arc<ChildHandle>>,
    joined: bool,
    /// Set by [`close`](Process::close): the pid and exit code, kept for `pid` and
    /// `exitcode`; the child's handle is gone.
    closed: Option<(Option<u32>, Option<i32>)>,
    gpus: Option<Criteria>,
    /// Where the target runs (`None`: here).
    launcher: Option<Launcher>,
    // After `child`: dropped once the child is killed and reaped.
    gpu_lease: Option<GpuLease>,
}

impl<A, R> std::fmt::Debug for Process<A, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("name", &self.name)
            .field("pid", &self.child.as_ref().map(|c| c.pid))
            .field("daemon", &self.daemon)
            .field("start_method", &self.start_method)
            .field("launcher", &self.launcher)
            .finish()
    }
}

impl<A, R> Process<A, R>
where
    A: Serialize + DeserializeOwned,
    R: Serialize + DeserializeOwned,
{
    /// A process that will call `target(args)`; Python's `Process(target=..., args=...)`.
    pub fn new(target: fn(A) -> R, args: A) -> Self {
        Process {
            target,
            args: Some(args),
            name: default_name(),
            named: false,
            daemon: current_process().daemon,
            start_method: None,
            allow_fork_with_threads: false,
            env: Vec::new(),
            child: None,
            joined: false,
            closed: None,
            gpus: None,
            launcher: None,
            gpu_lease: None,
        }
    }

    /// Sets the name (default `Process-N`).
    ///
    /// A name given here also becomes the child's operating-system process name, as `ps`,
    /// `top` and `/proc/PID/comm` show it (its first 15 bytes, the kernel's limit). A child
    /// left unnamed is called `gpuproc-worker` there, and the fork server `gpuproc-forksrv`.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.set_name(name);
        self
    }

    /// Renames the process; Python's `p.name = ...`. Before [`start`](Self::start), this
    /// names the operating-system process too, as [`with_name`](Self::with_name) does.
    pub fn set_name(&mut self, name: impl Into<String>) {
        self.name = name.into();
        self.named = true;
    }

    /// The process's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Marks the process daemonic: it may not start children of its own. (Every gpuproc
    /// child, daemonic or not, dies with its parent.)
    pub fn with_daemon(mut self, daemon: bool) -> Self {
        self.daemon = daemon;
        self
    }

    /// Python's `p.daemon = ...`.
    pub fn set_daemon(&mut self, daemon: bool) {
        self.daemon = daemon;
    }

    /// Whether the process is daemonic.
    pub fn daemon(&self) -> bool {
        self.daemon
    }

    /// Chooses the start method for this process (default: [`get_start_method`]).
    pub fn with_start_method(mut self, method: StartMethod) -> Self {
        self.start_method = Some(method);
        self
    }

    /// The start method this process uses.
    pub fn start_method(&self) -> StartMethod {
        self.start_method.unwrap_or_else(get_start_method)
    }

    /// Lets [`StartMethod::Fork`] fork even when this process has other threads. The child
    /// then has only the forking thread; a lock another thread held at that moment stays
    /// held for ever in the child.
    pub fn allow_fork_with_threads(mut self, allow: bool) -> Self {
        self.allow_fork_with_threads = allow;
        self
    }

    /// Sets an environment variable in the child before the target runs.
    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), Some(value.into())));
        self
    }

    /// Removes an environment variable in the child before the target runs.
    pub fn without_env(mut self, key: impl Into<String>) -> Self {
        self.env.push((key.into(), None));
        self
    }

    /// Gives the child `n` GPUs of its own: at [`start`](Self::start) they are picked with
    /// [`gpu::pick`](crate::gpu::pick) and leased to this process until the child is joined
    /// or the `Process` dropped; the child gets `CUDA_VISIBLE_DEVICES` (their UUIDs) and
    /// `NVIDIA_VISIBLE_DEVICES`, and [`gpu::assigned`](crate::gpu::assigned) there lists them.
    ///
    /// ```no_run
    /// # gpuproc::init();
    /// fn train(_epochs: u32) -> usize {
    ///     gpuproc::gpu::assigned().map(|v| v.devices.len()).unwrap_or(0)
    /// }
    /// let mut p = gpuproc::Process::new(train, 10).with_gpus(2);
    /// p.start()?;   // fails with ProcessError::Gpu when two GPUs are not free
    /// assert_eq!(p.join()?, 2);
    /// # Ok::<(), gpuproc::ProcessError>(())
    /// ```
    pub fn with_gpus(self, n: usize) -> Self {
        self.with_gpu_criteria(Criteria::new().count(n))
    }

    /// Like [`with_gpus`](Self::with_gpus), choosing GPUs by `criteria` (count, free memory,
    /// utilisation, order, waiting, ...).
    pub fn with_gpu_criteria(mut self, criteria: Criteria) -> Self {
        self.gpus = Some(criteria);
        self
    }

    /// Like [`with_gpus`](Self::with_gpus), with exactly these GPUs (NVML indices or UUIDs),
    /// still leased, so that no other picker takes them meanwhile.
    pub fn with_devices<I>(self, devices: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<DeviceId>,
    {
        self.with_gpu_criteria(Criteria::new().devices(devices))
    }

    /// The lease on the child's GPUs, from [`start`](Self::start) until the child is joined.
    pub fn gpu_lease(&self) -> Option<&GpuLease> {
        self.gpu_lease.as_ref()
    }

    /// Where the target runs: on this machine ([`Launcher::local`], the default), as a Slurm
    /// job step ([`Launcher::slurm`]), or started by any command line such as `ssh host`
    /// ([`Launcher::command`]); see the crate guide, "Remote computers".
    ///
    /// The API is the same as for a local process, through a *relay*: a local child that
    /// starts the launcher's command, checks the remote process (its key and its build, as
    /// for a pool's remote workers), passes its call on and its report back, and ends as it
    /// ends. So [`join`](Self::join) returns the result (or the panic, or the exit code),
    /// [`exitcode`](Self::exitcode) is the remote process's (0, 1 after a panic, the code
    /// it passed to `exit`), [`is_alive`](Self::is_alive) is whether it runs, and
    /// [`terminate`](Self::terminate) and [`kill`](Self::kill) end it (the relay gets the
    /// signal, so `exitcode` is -15 or -9 as for a local process; `srun` cancels its step,
    /// and the remote process ends as soon as its connection does).
    ///
    /// The differences:
    /// - A remote process that could not be started (its launcher failed, it did not connect
    ///   within [`Launcher::start_timeout`], it runs another build) fails `join` with
    ///   [`ProcessError::LaunchFailed`]; one that was lost before it reported (its Slurm step
    ///   was cancelled, it or its node was killed, the connection dropped: TCP keep-alive
    ///   notices within about 30 s) fails it with [`ProcessError::WorkerLost`], naming the
    ///   node and how its launcher ended. Either way `exitcode` is [`LOST_EXITCODE`] (255).
    /// - [`pid`](Self::pid) is the process's pid *on its node* ([`node`](Self::node)), known
    ///   once it has connected (`None` until then): not a process of this machine. The relay
    ///   is the local process ([`active_children`] lists it, [`Sentinel::pid`] is its pid).
    /// - The argument and the result cross the network, so they cannot hold descriptors
    ///   (queues, locks, pipes, shared memory): `start` refuses such an argument with
    ///   [`ProcessError::Encode`] naming its type, and such a result fails `join` with
    ///   [`ProcessError::BadResult`].
    /// - [`with_gpus`](Self::with_gpus) with a Slurm launcher asks Slurm for that many GPUs
    ///   with the step (as [`Slurm::gpus`](crate::Slurm::gpus)); other GPU criteria, and GPUs
    ///   with other launchers, are refused ([`ProcessError::LaunchFailed`]): GPUs cannot be
    ///   leased on another machine.
    /// - In the remote process, [`parent_process`] names this process, and its
    ///   [`is_alive`](ProcessInfo::is_alive) is `false` (its pid is of another machine).
    ///
    /// ```no_run
    /// # gpuproc::init();
    /// use gpuproc::{Launcher, Process, Slurm};
    ///
    /// fn train(seed: u64) -> f64 { seed as f64 }
    ///
    /// let mut p = Process::new(train, 7)
    ///     .launcher(Launcher::slurm(Slurm::new().gpus(1).time("1:00:00")));
    /// p.start()?;
    /// println!("training on {:?}", p.node());
    /// let score = p.join()?;
    /// # Ok::<(), gpuproc::ProcessError>(())
    /// ```
    pub fn launcher(mut self, launcher: Launcher) -> Self {
        self.launcher = (!launcher.is_local()).then_some(launcher);
        self
    }

    /// The node a process started through a [`launcher`](Self::launcher) runs on, once it
    /// has connected; `None` for a local process (and after [`close`](Self::close)).
    pub fn node(&self) -> Option<String> {
        self.launcher.as_ref()?;
        self.child.as_ref()?.runs_on().map(|(node, _)| node)
    }

    /// Starts the process; Python's `p.start()`.
    ///
    /// With [`with_gpus`](Self::with_gpus) and friends, picks the GPUs first.
    pub fn start(&mut self) -> Result<(), ProcessError> {
        self.check_open()?;
        if let (Some(launcher), Some(criteria)) = (&self.launcher, &self.gpus) {
            // GPUs on another machine are its scheduler's to give.
            let count = criteria.gpu_count();
            if !launcher.asks_slurm() || *criteria != Criteria::new().count(count) {
                return Err(ProcessError::LaunchFailed {
                    name: self.name.clone(),
                    reason: "GPUs for a process on another machine are asked of Slurm \
                             (with_gpus(n) with a Slurm launcher): they cannot be picked or \
                             leased there"
                        .into(),
                });
            }
            let n = u32::try_from(count).unwrap_or(u32::MAX);
            self.launcher = Some(launcher.clone().with_slurm_gpus(n));
            self.gpus = None;
        }
        let Some(criteria) = &self.gpus else {
            return self.start_child();
        };
        if self.child.is_some() || self.args.is_none() {
            return self.start_child();
        }
        let lease = crate::gpu::pick(criteria).map_err(|source| ProcessError::Gpu {
            name: self.name.clone(),
            source,
        })?;
        let before = self.env.len();
        self.env.extend(
            lease
                .env()
                .into_iter()
                .map(|(key, value)| (key, Some(value))),
        );
        match self.start_child() {
            Ok(()) => {
                self.gpu_lease = Some(lease);
                Ok(())
            }
            Err(e) => {
                self.env.truncate(before);
                Err(e)
            }
        }
    }

    fn start_child(&mut self) -> Result<(), ProcessError> {
        if self.child.is_some() || self.args.is_none() {
            return Err(ProcessError::AlreadyStarted {
                name: self.name.clone(),
            });
        }
        if current_process().daemon {
            return Err(ProcessError::DaemonChildren);
        }
        if let Some(launcher) = self.launcher.clone() {
            return self.start_relay(launcher);
        }
        let method = self.start_method();
        if method != StartMethod::Fork && !INITIALIZED.load(Ordering::SeqCst) {
            return Err(ProcessError::NotInitialized {
                method: method.name(),
            });
        }
        if method != StartMethod::Fork {
            // Sent as offsets from the anchor: both must be in the anchor's object.
            let code = [
                self.target as usize,
                wire::trampoline::<A, R> as Trampoline as usize,
            ];
            check_same_object(&self.name, wire::anchor as fn() as usize, &code)?;
        }
        let (ours, theirs) =
            sys::socketpair().map_err(ProcessError::io("creating a socket pair"))?;
        let handle = match method {
            StartMethod::Fork => self.start_fork(ours, theirs)?,
            StartMethod::Spawn => {
                let pid = self.spawn(theirs)?;
                ChildHandle::direct(pid, self.name.clone(), self.daemon, ours)
                    .map_err(ProcessError::io("opening a pidfd for the child"))?
            }
            StartMethod::ForkServer => {
                let pid = forkserver::fork_child(theirs)?;
                ChildHandle::via_server(pid, self.name.clone(), self.daemon, ours)
            }
        };
        if method != StartMethod::Fork {
            let sent = self.encode_call().and_then(|(bytes, fds)| {
                handle
                    .send(&bytes, &fds)
                    .map_err(ProcessError::io("sending the call to the child"))
            });
            if let Err(e) = sent {
                // The child waits for a call that will not come: end it now.
                let _ = handle.signal(Sig::Kill);
                return Err(e);
            }
        }
        self.child = Some(handle);
        Ok(())
    }

    /// Starts the relay of a process on another machine (see `remote`): a local child,
    /// started as this process would have been, whose handle becomes this process's.
    fn start_relay(&mut self, launcher: Launcher) -> Result<(), ProcessError> {
        // The remote process is always this executable run again: offsets must hold.
        let code = [
            self.target as usize,
            wire::trampoline::<A, R> as Trampoline as usize,
        ];
        check_same_object(&self.name, wire::anchor as fn() as usize, &code)?;
        let (call, fds) = self.encode_call()?;
        if !fds.is_empty() {
            return Err(ProcessError::Encode {
                name: self.name.clone(),
                type_name: type_name::<A>().to_string(),
                reason: "it holds a descriptor (a queue, lock, pipe or shared memory), which \
                         cannot go to a process on another machine"
                    .into(),
            });
        }
        let mut relay = Process {
            target: remote::relay,
            args: Some(remote::RelayArgs { launcher, call }),
            name: self.name.clone(),
            named: self.named,
            daemon: self.daemon,
            start_method: self.start_method,
            allow_fork_with_threads: self.allow_fork_with_threads,
            // Also here: the launcher's command (`srun`) passes them on.
            env: self.env.clone(),
            child: None,
            joined: false,
            closed: None,
            gpus: None,
            launcher: None,
            gpu_lease: None,
        };
        relay.start_child()?;
        self.child = relay.child.take();
        Ok(())
    }

    fn identity(&self) -> Identity {
        let me = current_process();
        Identity {
            name: self.name.clone(),
            daemon: self.daemon,
            parent_pid: me.pid,
            parent_name: me.name,
            start_method: self.start_method().to_u8(),
            comm: if self.named {
                self.name.clone()
            } else {
                DEFAULT_COMM.to_string()
            },
        }
    }

    fn encode_call(&mut self) -> Result<(Vec<u8>, Vec<OwnedFd>), ProcessError> {
        let args = self.args.take().expect("checked by start");
        let encode_err = |reason: String| ProcessError::Encode {
            name: self.name.clone(),
            type_name: type_name::<A>().to_string(),
            reason,
        };
        let (arg_bytes, fds) = ipc::encode(&args).map_err(|e| encode_err(e.to_string()))?;
        let call = Call {
            trampoline: wire::offset_of(wire::trampoline::<A, R> as Trampoline as usize),
            target: wire::offset_of(self.target as usize),
            args: arg_bytes,
            identity: self.identity(),
            env: self.env.clone(),
        };
        let bytes = crate::codec::to_vec(&call).map_err(|e| encode_err(e.to_string()))?;
        Ok((bytes, fds))
    }

    fn spawn(&self, theirs: OwnedFd) -> Result<u32, ProcessError> {
        let raw = theirs.as_raw_fd();
        let watch = if sys::on_main_thread() {
            ParentWatch::DeathSignal
        } else {
            ParentWatch::EofWatcher
        };
        let parent = sys::getpid();
        let mut cmd = Command::new("/proc/self/exe");
        if let Some(arg0) = std::env::args_os().next() {
            cmd.arg0(arg0);
        }
        cmd.arg(CHILD_ARG)
            .env(CHILD_FD_ENV, raw.to_string())
            .env(CHILD_WATCH_ENV, watch.as_env());
        // SAFETY: the closure runs between fork and exec and makes only async-signal-safe
        // system calls (fcntl, prctl, getppid, _exit) on data it owns.
        unsafe {
            cmd.pre_exec(move || {
                sys::clear_cloexec(std::os::fd::BorrowedFd::borrow_raw(raw))?;
                if watch == ParentWatch::DeathSignal {
                    sys::kill_me_with_parent()?;
                    if sys::getppid() != Some(parent) {
                        sys::exit_now(1);
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(ProcessError::io(
            "re-running this executable (/proc/self/exe)",
        ))?;
        // We reap it ourselves through its pidfd; std's handle neither waits nor kills on drop.
        let pid = child.id();
        drop(child);
        drop(theirs);
        Ok(pid)
    }

    fn start_fork(
        &mut self,
        ours: OwnedFd,
        theirs: OwnedFd,
    ) -> Result<Arc<ChildHandle>, ProcessError> {
        let threads = sys::thread_count().map_err(ProcessError::io("counting threads"))?;
        // gpuproc's own parent-watch threads hold no lock: they do not make forking unsafe.
        let threads = threads.saturating_sub(child::watcher_threads()).max(1);
        if threads > 1 && !self.allow_fork_with_threads {
            return Err(ProcessError::ForkUnsafe { threads });
        }
        let watch = if sys::on_main_thread() {
            ParentWatch::DeathSignal
        } else {
            ParentWatch::EofWatcher
        };
        let parent = sys::getpid();
        let identity = self.identity();
        // Flush so that buffered output is not written twice, once by each process.
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: either this process has a single thread, or the user explicitly accepted
        // the risks of forking a multi-threaded process (`allow_fork_with_threads`).
        match unsafe { sys::fork() }.map_err(ProcessError::io("fork"))? {
            Forked::Child => {
                drop(ours);
                child::forget_watchers();
                if watch == ParentWatch::DeathSignal
                    && (sys::kill_me_with_parent().is_err() || sys::getppid() != Some(parent))
                {
                    sys::exit_now(1);
                }
                enter_child(&identity, &self.env);
                child::set_control_socket(&theirs);
                if watch == ParentWatch::EofWatcher {
                    child::watch_parent(&theirs);
                }
                let target = self.target;
                let args = self.args.take().expect("checked by start");
                let outcome = child::run_catching(|| wire::encode_result(&target(args)));
                child::report_and_exit(&theirs, outcome)
            }
            Forked::Parent(pid) => {
                drop(theirs);
                self.args = None;
                ChildHandle::direct(pid, self.name.clone(), self.daemon, ours)
                    .map_err(ProcessError::io("opening a pidfd for the child"))
            }
        }
    }

    /// Waits for the process to end and returns the target's result; Python's `p.join()`.
    ///
    /// A panic, a non-zero exit or a fatal signal in the child is an error saying which. The
    /// result can be taken once; a second `join` is an [`ProcessError::AlreadyJoined`] error.
    pub fn join(&mut self) -> Result<R, ProcessError> {
        self.join_until(None)
    }

    /// Like [`join`](Self::join), giving up after `timeout` with [`ProcessError::Timeout`];
    /// the process runs on and can be joined again. Python's `p.join(timeout)`.
    pub fn join_timeout(&mut self, timeout: Duration) -> Result<R, ProcessError> {
        self.join_until(crate::time::deadline(timeout))
    }

    fn join_until(&mut self, deadline: Option<Instant>) -> Result<R, ProcessError> {
        self.check_open()?;
        let started = Instant::now();
        let Some(child) = self.child.as_ref() else {
            return Err(ProcessError::NotStarted {
                name: self.name.clone(),
            });
        };
        if self.joined {
            return Err(ProcessError::AlreadyJoined {
                name: self.name.clone(),
            });
        }
        let ended = child
            .wait(deadline)
            .map_err(ProcessError::io("waiting for the child"))?;
        if !ended {
            return Err(ProcessError::Timeout {
                name: self.name.clone(),
                waited: started.elapsed(),
            });
        }
        self.joined = true;
        // The child has ended: its GPUs are free.
        self.gpu_lease = None;
        let name = self.name.clone();
        match child.take_report() {
            Some(Report::Returned(frame)) => {
                ipc::decode(&frame.bytes, frame.fds).map_err(|e| ProcessError::BadResult {
                    name,
                    type_name: type_name::<R>().to_string(),
                    reason: e.to_string(),
                })
            }
            Some(Report::Failed(f)) => Err(match f {
                Failure::Panicked {
                    message,
                    location,
                    backtrace,
                } => ProcessError::Panicked {
                    name,
                    message,
                    location,
                    backtrace,
                },
                Failure::BadArgument { type_name, reason } => ProcessError::BadArgument {
                    name,
                    type_name,
                    reason,
                },
                Failure::BadResult { type_name, reason } => ProcessError::BadResult {
                    name,
                    type_name,
                    reason,
                },
            }),
            Some(Report::Lost {
                node: Some(node),
                reason,
            }) => Err(ProcessError::WorkerLost { name, node, reason }),
            Some(Report::Lost { node: None, reason }) => {
                Err(ProcessError::LaunchFailed { name, reason })
            }
            None => Err(match child.status() {
                _ if child.lost_with_server() => ProcessError::ForkServer {
                    reason: format!(
                        "it was killed while process {name:?} ran, and took that process \
                         along (SIGKILL, its parent-death signal; a process that had returned, \
                         panicked or exited keeps its result)"
                    ),
                },
                Some(ExitStatus::Signal(signal)) => ProcessError::Killed {
                    name,
                    pid: self.pid().unwrap_or(child.pid),
                    signal,
                },
                Some(ExitStatus::Code(code)) => ProcessError::Exited {
                    name,
                    pid: self.pid().unwrap_or(child.pid),
                    code,
                },
                None => ProcessError::ForkServer {
                    reason: format!("it never said how process {name:?} ended"),
                },
            }),
        }
    }

    /// Whether the process has started and not yet ended; Python's `p.is_alive()`.
    ///
    /// After [`close`](Self::close) it is `false` (Python raises `ValueError`).
    pub fn is_alive(&self) -> bool {
        self.child.as_ref().is_some_and(|c| c.is_alive())
    }

    /// The process id, once started; Python's `p.pid`.
    ///
    /// After [`close`](Self::close) it is still the pid the process had (Python raises
    /// `ValueError`). For a process started through a [`launcher`](Self::launcher), its pid
    /// on its [`node`](Self::node), once it has connected (`None` until then).
    #[doc(alias = "ident")]
    pub fn pid(&self) -> Option<u32> {
        match &self.closed {
            Some((pid, _)) => *pid,
            None if self.launcher.is_some() => self.child.as_ref()?.runs_on().map(|(_, pid)| pid),
            None => self.child.as_ref().map(|c| c.pid),
        }
    }

    /// A descriptor that becomes readable when the process ends; Python's `p.sentinel`.
    ///
    /// Wait on it, with other sentinels, connections and queues, through
    /// [`connection::wait`](crate::connection::wait). Each call returns a new descriptor
    /// of its own (a pidfd), which stays valid after the process is joined or closed.
    /// [`ProcessError::NotStarted`] before [`start`](Self::start), [`ProcessError::Closed`]
    /// after [`close`](Self::close), as Python raises `ValueError` then.
    ///
    /// For a child of the fork server (the default start method) the sentinel is ready as
    /// soon as the child has ended; [`is_alive`](Self::is_alive) may say `true` for a moment
    /// longer, until the fork server has reported how it ended, and
    /// [`join`](Self::join) waits that moment.
    pub fn sentinel(&self) -> Result<Sentinel, ProcessError> {
        self.check_open()?;
        let Some(child) = self.child.as_ref() else {
            return Err(ProcessError::NotStarted {
                name: self.name.clone(),
            });
        };
        let fd = child
            .sentinel()
            .map_err(ProcessError::io("opening a sentinel for the child"))?;
        Ok(Sentinel { fd, pid: child.pid })
    }

    /// Releases what the process holds (its control socket, its pidfds, the GPUs it
    /// leased); Python's `p.close()`. Afterwards [`start`](Self::start),
    /// [`join`](Self::join), [`terminate`](Self::terminate), [`kill`](Self::kill) and
    /// [`sentinel`](Self::sentinel) are [`ProcessError::Closed`] errors; closing again does
    /// nothing. A process that was started and is still running cannot be closed
    /// ([`ProcessError::StillRunning`]): join, terminate or kill it first. A result that
    /// was not taken with `join` is dropped.
    ///
    /// ```
    /// # gpuproc::init();
    /// let mut p = gpuproc::Process::new(|x: u32| x + 1, 1);
    /// p.start()?;
    /// assert_eq!(p.join()?, 2);
    /// p.close()?;
    /// assert!(p.join().unwrap_err().is_closed());
    /// assert_eq!(p.exitcode(), Some(0));
    /// # Ok::<(), gpuproc::ProcessError>(())
    /// ```
    ///
    /// # Differences from Python
    /// [`is_alive`](Self::is_alive), [`exitcode`](Self::exitcode) and [`pid`](Self::pid)
    /// return plain values, not results: after `close` they answer from what was known
    /// (`false`, the exit code, the pid) instead of raising `ValueError`.
    pub fn close(&mut self) -> Result<(), ProcessError> {
        if self.closed.is_some() {
            return Ok(());
        }
        if let Some(child) = &self.child {
            if child.is_alive() {
                return Err(ProcessError::StillRunning {
                    name: self.name.clone(),
                });
            }
        }
        self.closed = Some((self.pid(), self.exitcode()));
        self.child = None;
        self.args = None;
        self.gpu_lease = None;
        Ok(())
    }

    fn check_open(&self) -> Result<(), ProcessError> {
        match self.closed {
            Some(_) => Err(ProcessError::Closed {
                name: self.name.clone(),
            }),
            None => Ok(()),
        }
    }

    /// How the process ended, once it has: its exit code (0 when the target returned, 1 when
    /// it panicked, as after Python's uncaught exception), or minus the signal that killed
    /// it (Python's convention). `None` while it runs or before it starts. Python's
    /// `p.exitcode`.
    pub fn exitcode(&self) -> Option<i32> {
        if let Some((_, code)) = self.closed {
            return code;
        }
        let child = self.child.as_ref()?;
        if child.is_alive() {
            return None;
        }
        child.status().map(ExitStatus::exitcode)
    }

    /// Sends SIGTERM; Python's `p.terminate()`.
    pub fn terminate(&self) -> Result<(), ProcessError> {
        self.send_signal(Sig::Term)
    }

    /// Sends SIGKILL; Python's `p.kill()`.
    pub fn kill(&self) -> Result<(), ProcessError> {
        self.send_signal(Sig::Kill)
    }

    fn send_signal(&self, sig: Sig) -> Result<(), ProcessError> {
        self.check_open()?;
        match &self.child {
            Some(c) => c
                .signal(sig)
                .map_err(ProcessError::io("signalling the child")),
            None => Err(ProcessError::NotStarted {
                name: self.name.clone(),
            }),
        }
    }
}

/// A descriptor that becomes readable when a process ends; Python's `p.sentinel`, from
/// [`Process::sentinel`]. Wait on it with [`connection::wait`](crate::connection::wait).
///
/// It owns its descriptor (a pidfd): it stays valid, and ready, after the process was
/// joined, closed or dropped.
#[derive(Debug)]
pub struct Sentinel {
    fd: OwnedFd,
    pid: u32,
}

impl Sentinel {
    /// The pid of the process it watches.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process has ended (never blocks).
    pub fn is_ready(&self) -> bool {
        matches!(
            sys::poll_readable(&[self.fd.as_fd()], Some(Instant::now())).as_deref(),
            Ok([true])
        )
    }
}

impl std::os::fd::AsFd for Sentinel {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Ready once the process has ended.
impl crate::connection::Waitable for Sentinel {
    fn wait_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Checks that every address in `code` lies in the loaded object that holds `anchor`: a
/// function in another object (a shared library, a plugin) has no fixed offset from the
/// anchor, and a child given that offset would jump to an arbitrary address.
fn check_same_object(name: &str, anchor: usize, code: &[usize]) -> Result<(), ProcessError> {
    match foreign_object(anchor, code) {
        Some(object) => Err(ProcessError::ForeignTarget {
            name: name.to_string(),
            object,
        }),
        None => Ok(()),
    }
}

/// Which other object one of `code`'s addresses lives in (`"a shared library"` or `"no
/// loaded object"`), or `None` when all lie in the object that holds `anchor`.
pub(crate) fn foreign_object(anchor: usize, code: &[usize]) -> Option<&'static str> {
    let home = sys::object_base(anchor);
    code.iter().find_map(|&addr| match sys::object_base(addr) {
        None => Some("no loaded object"),
        base if base != home => Some("a shared library"),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(x: u32) -> u32 {
        x + 1
    }

    #[test]
    fn targets_outside_the_anchor_object_are_refused() {
        let anchor = wire::anchor as fn() as usize;
        let ours = local as fn(u32) -> u32 as usize;
        assert!(check_same_object("p", anchor, &[ours]).is_ok());
        // A function of the C library: another shared object.
        let theirs = libc::getpid as *const () as usize;
        let err = check_same_object("p", anchor, &[ours, theirs]).unwrap_err();
        assert!(
            matches!(
                err,
                ProcessError::ForeignTarget {
                    object: "a shared library",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("another loaded object"), "{err}");
        let err = check_same_object("p", anchor, &[8]).unwrap_err();
        assert!(err.to_string().contains("no loaded object"), "{err}");
    }

    #[test]
    fn start_method_names_round_trip() {
        for m in StartMethod::all() {
            assert_eq!(m.name().parse::<StartMethod>().unwrap(), m);
            assert_eq!(StartMethod::from_u8(m.to_u8()), m);
        }
        assert!("threads"
            .parse::<StartMethod>()
            .unwrap_err()
            .contains("forkserver"));
    }

    #[test]
    fn cpu_counts_are_sane() {
        assert!(cpu_count() >= 1);
        assert!(process_cpu_count() >= 1);
        assert!(process_cpu_count() <= cpu_count());
    }
}
