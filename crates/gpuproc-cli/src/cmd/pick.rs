//! `gpuproc pick`: choose free GPUs, lease them, and print a `CUDA_VISIBLE_DEVICES` value or
//! run a command with it.

use std::ffi::OsString;
use std::fmt;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use gpuproc::gpu::{self, Criteria, DeviceId, GpuLease, PickError};

use crate::units::{human, parse_duration, parse_size, OrderArg};

/// Exit status when too few GPUs qualify.
pub const EXIT_NONE_FREE: u8 = 3;
/// Exit status when the command given to `--hold` cannot be executed.
const EXIT_CANNOT_RUN: u8 = 126;
/// Exit status when the command given to `--hold` does not exist.
const EXIT_NOT_FOUND: u8 = 127;

const AFTER_HELP: &str = "\
Who holds the GPUs:
  With --hold, gpuproc runs CMD with CUDA_VISIBLE_DEVICES and NVIDIA_VISIBLE_DEVICES set to
  the GPUs' UUIDs and holds the lease, together with CMD, until CMD exits. It forwards SIGTERM,
  SIGHUP, SIGQUIT and SIGINT to CMD (except a SIGINT or SIGQUIT from the terminal, which CMD
  receives itself) and exits with CMD's status.

  Without --hold, gpuproc prints the CUDA_VISIBLE_DEVICES value and leaves the lease to the
  process that ran it (its parent: the shell or script), or to --for-pid PID. The GPUs stay
  leased until that process exits, so no other picker hands them out meanwhile:
      export CUDA_VISIBLE_DEVICES=$(gpuproc pick -n 2 --min-free 10GiB)
  In a pipeline or a nested subshell the parent is short-lived: pass --for-pid $$.

  A lease ends when all its holders have exited, however they exit. Leases are kept in
  $GPUPROC_RUNTIME_DIR, else $XDG_RUNTIME_DIR/gpuproc, else /tmp/gpuproc-<uid>; pickers that
  share that directory never share a GPU beyond --max-per-gpu.

Exit status:
  0    GPUs picked (with --hold: CMD's exit status, or 128+N when signal N killed it)
  1    error
  2    no NVIDIA driver or NVML library
  3    none free: too few GPUs qualify (after --wait); the message gives each GPU's reason
  64   bad command line
  126  CMD could not be executed (--hold)
  127  CMD was not found (--hold)

Environment:
  CUDA_VISIBLE_DEVICES  when set, only the GPUs it allows are picked
  GPUPROC_RUNTIME_DIR   directory of the lease table
  GPUPROC_NVML_LIB      path of the libnvidia-ml to load instead of libnvidia-ml.so.1";

/// Options of `gpuproc pick`.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct PickArgs {
    /// How many GPUs to pick [default: 1, or the number of --devices].
    #[arg(short = 'n', long = "count", value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,

    /// Only GPUs with at least SIZE of free memory: bytes, or a number with a unit
    /// (500MiB, 10GiB, 10G = 10GiB, 1.5TB = 1.5e12 bytes).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub min_free: Option<u64>,

    /// Only GPUs at most PCT percent utilized.
    #[arg(long, value_name = "PCT", value_parser = clap::value_parser!(u32).range(0..=100))]
    pub max_util: Option<u32>,

    /// How many leases may hold one GPU at once (1: exclusive).
    #[arg(long, value_name = "K", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_per_gpu: u32,

    /// Only GPUs on which no other process runs.
    #[arg(long)]
    pub no_foreign: bool,

    /// Which qualifying GPUs come first.
    #[arg(long, value_enum, default_value_t = OrderArg::MostFree, value_name = "ORDER")]
    pub order: OrderArg,

    /// Only these GPUs, comma-separated: indices as `gpuproc gpus` and nvidia-smi number them,
    /// or UUIDs (GPU-..., unique prefixes allowed).
    #[arg(long, value_name = "LIST", value_parser = parse_devices)]
    pub devices: Option<DeviceList>,

    /// Wait up to DURATION (30s, 5m, 1h30m; a bare number is seconds) for enough GPUs to
    /// qualify, instead of failing at once.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub wait: Option<Duration>,

    /// Consider every GPU, ignoring this environment's CUDA_VISIBLE_DEVICES.
    #[arg(long)]
    pub ignore_cuda_visible_devices: bool,

    /// Without --hold: leave the lease to process PID instead of gpuproc's parent.
    #[arg(long, value_name = "PID", conflicts_with = "hold")]
    pub for_pid: Option<u32>,

    /// Print the devices and the lease as JSON instead of the bare value.
    #[arg(long, conflicts_with = "hold")]
    pub json: bool,

    /// Run CMD (after `--`) with the GPUs, holding the lease until it exits.
    #[arg(long, requires = "command")]
    pub hold: bool,

    /// The command to run with --hold, and its arguments.
    #[arg(last = true, value_name = "CMD", requires = "hold")]
    pub command: Vec<OsString>,
}

/// A parsed `--devices` list (a newtype, so clap takes it as one value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceList(pub Vec<DeviceId>);

fn parse_devices(s: &str) -> Result<DeviceList, String> {
    DeviceId::parse_list(s).map(DeviceList)
}

/// `gpuproc pick` ended with a status other than 0 that needs no further message: CMD's own
/// status under `--hold`, or a failure already explained.
#[derive(Debug)]
pub struct Exit {
    code: u8,
    message: Option<String>,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.message {
            Some(m) => f.write_str(m),
            None => write!(f, "exit status {}", self.code),
        }
    }
}

impl std::error::Error for Exit {}

/// The exit status and message for an error from `gpuproc pick`, when it has its own:
/// none free (3), no driver (2), CMD's status under `--hold`.
pub fn failure(err: &anyhow::Error) -> Option<(u8, Option<String>)> {
    if let Some(exit) = err.downcast_ref::<Exit>() {
        return Some((exit.code, exit.message.clone()));
    }
    let pick = err.downcast_ref::<PickError>()?;
    if pick.is_none_free() {
        Some((EXIT_NONE_FREE, Some(pick.to_string())))
    } else if pick.is_no_driver() {
        // Debug is the message with its causes (why the library did not load).
        Some((crate::cli::EXIT_NO_DRIVER, Some(format!("{pick:?}"))))
    } else {
        None
    }
}

pub fn run(args: &PickArgs) -> anyhow::Result<()> {
    let mut criteria = Criteria::new()
        .max_per_gpu(args.max_per_gpu)
        .no_foreign_processes(args.no_foreign)
        .order(args.order.into())
        .within_visible(!args.ignore_cuda_visible_devices);
    if let Some(n) = args.count {
        criteria = criteria.count(usize::try_from(n).unwrap_or(usize::MAX));
    }
    if let Some(bytes) = args.min_free {
        criteria = criteria.min_free(bytes);
    }
    if let Some(pct) = args.max_util {
        criteria = criteria.max_utilization(pct);
    }
    if let Some(list) = &args.devices {
        criteria = criteria.devices(list.0.iter().cloned());
    }
    // The holder must exist before anything is leased to it.
    let holder = if args.hold {
        None
    } else {
        Some(match args.for_pid {
            Some(pid) => pid,
            None => rustix::process::getppid()
                .map(|p| p.as_raw_pid() as u32)
                .context(
                    "gpuproc has no parent process to hold the lease: use --hold or --for-pid",
                )?,
        })
    };
    if let Some(pid) = holder {
        if gpu::Holder::of(pid).is_none() {
            anyhow::bail!("no running process {pid} to hold the lease (--for-pid)");
        }
    }
    let lease = pick_waiting(&criteria, args.wait)?;
    match holder {
        None => hold(lease, &args.command),
        Some(pid) => {
            print(&lease, pid, args.json)?;
            lease
                .transfer_to(pid)
                .with_context(|| format!("handing the lease to process {pid}"))
        }
    }
}

/// Picks at once, or, with `--wait`, says once that it waits and then waits.
fn pick_waiting(criteria: &Criteria, wait: Option<Duration>) -> anyhow::Result<GpuLease> {
    let started = Instant::now();
    let first = gpu::pick(criteria);
    let (Some(wait), Err(PickError::NoneFree(why))) = (wait, &first) else {
        return Ok(first?);
    };
    if why.is_impossible() {
        return Ok(first?);
    }
    let summary = why.to_string();
    let summary = summary.lines().next().unwrap_or_default();
    let _ = writeln!(
        io::stderr(),
        "gpuproc: waiting up to {} for GPUs ({summary})",
        human(wait)
    );
    let left = wait.saturating_sub(started.elapsed());
    match gpu::pick(&criteria.clone().wait(left)) {
        Err(PickError::NoneFree(mut why)) => {
            why.waited = Some(started.elapsed());
            Err(PickError::NoneFree(why).into())
        }
        other => Ok(other?),
    }
}

fn print(lease: &GpuLease, holder: u32, json: bool) -> anyhow::Result<()> {
    let text = if json {
        let value = serde_json::json!({
            "cuda_visible_devices": lease.cuda_visible_devices(),
            "devices": lease.devices(),
            "lease": {
                "id": lease.id(),
                "holder_pid": holder,
                "runtime_dir": gpu::runtime_dir(),
            },
        });
        let mut text = serde_json::to_string_pretty(&value)?;
        text.push('\n');
        text
    } else {
        format!("{}\n", lease.cuda_visible_devices())
    };
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("writing to standard output")
}

/// Set when gpuproc runs as the gate in front of a held command (see [`hold`]): the number
/// of the pipe descriptor to wait on.
const GATE_ENV: &str = "GPUPROC_HOLD_GATE";

/// If this process is a `--hold` gate, waits for the go-ahead and becomes the command (or
/// exits with 126/127 and a message if it cannot run it, 125 if gpuproc went away first).
/// Returns when this process is not a gate.
pub fn gate_if_asked() {
    let Some(fd) = std::env::var(GATE_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    std::env::remove_var(GATE_ENV);
    // SAFETY: the parent passed this descriptor to us for this purpose; nothing else owns it.
    let gate = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let mut byte = [0u8; 1];
    if !matches!(rustix::io::read(&gate, &mut byte), Ok(1)) {
        std::process::exit(125);
    }
    drop(gate);
    let mut args = std::env::args_os().skip(1);
    let Some(program) = args.next() else {
        std::process::exit(EXIT_CANNOT_RUN.into())
    };
    let e = Command::new(&program).args(args).exec();
    let code = if e.kind() == io::ErrorKind::NotFound {
        EXIT_NOT_FOUND
    } else {
        EXIT_CANNOT_RUN
    };
    let _ = writeln!(
        io::stderr(),
        "gpuproc: cannot run {}: {e}",
        program.to_string_lossy()
    );
    std::process::exit(code.into());
}

/// Runs `command` with the lease's environment, forwarding signals, until it exits.
fn hold(mut lease: GpuLease, command: &[OsString]) -> anyhow::Result<()> {
    let (program, rest) = command
        .split_first()
        .context("--hold needs a command after --")?;
    // Catch the signals before CMD exists and hold them back until it can be told, so that
    // none is lost or kills gpuproc in between.
    let forwarding = forward::Forwarding::start().context("installing signal handlers")?;
    // CMD must hold the lease before it runs: gpuproc starts itself as a gate that waits on a
    // pipe, records that process (whose pid and start time CMD keeps across exec) as a
    // co-holder, then opens the gate and the gate execs CMD.
    let (gate_r, gate_w) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).context("creating a pipe")?;
    let gate_fd = gate_r.as_raw_fd();
    let mut command = Command::new("/proc/self/exe");
    command
        .env(GATE_ENV, gate_fd.to_string())
        .arg(program)
        .args(rest)
        .envs(lease.env());
    // SAFETY: between fork and exec the closure makes one async-signal-safe system call
    // (fcntl) on a descriptor this process owns.
    unsafe {
        command.pre_exec(move || {
            let fd = std::os::fd::BorrowedFd::borrow_raw(gate_fd);
            Ok(rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?)
        });
    }
    forwarding.unblock_in_child(&mut command);
    let mut child = command.spawn().context("starting the command")?;
    drop(gate_r);
    let pid = child.id();
    forwarding.to(pid);
    // CMD holds the lease too: it keeps its GPUs should gpuproc be killed.
    let _ = lease.share_with(pid);
    let _ = rustix::io::write(&gate_w, b"\n");
    drop(gate_w);
    let status = child.wait().context("waiting for the command");
    drop(forwarding);
    let status = status?;
    lease.release()?;
    use std::os::unix::process::ExitStatusExt;
    let code = match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    };
    if code == 0 {
        Ok(())
    } else {
        Err(Exit {
            code: u8::try_from(code).unwrap_or(1),
            message: None,
        }
        .into())
    }
}

/// Forwarding SIGINT, SIGTERM, SIGHUP and SIGQUIT to the held command.
mod forward {
    use std::io;
    use std::os::fd::{IntoRawFd, OwnedFd};
    use std::sync::atomic::{AtomicI32, Ordering};

    const SIGNALS: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

    /// A pidfd for the command, or -1 before it exists. A pidfd names the command even after
    /// it exits, so a late signal cannot reach a process that reused its pid.
    static TARGET: AtomicI32 = AtomicI32::new(-1);

    extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
        let code = unsafe { (*info).si_code };
        // The terminal sends SIGINT and SIGQUIT to the whole foreground group: the command
        // has its own copy.
        if code == libc::SI_KERNEL && matches!(sig, libc::SIGINT | libc::SIGQUIT) {
            return;
        }
        let fd = TARGET.load(Ordering::SeqCst);
        if fd >= 0 {
            // SAFETY: pidfd_send_signal is a plain system call (async-signal-safe) on a
            // descriptor this process owns, with no siginfo.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd,
                    sig,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                );
            }
        }
    }

    fn signal_set() -> libc::sigset_t {
        // SAFETY: sigemptyset initialises the set; sigaddset adds valid signal numbers.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in SIGNALS {
                libc::sigaddset(&mut set, sig);
            }
            set
        }
    }

    fn mask(how: libc::c_int) -> io::Result<()> {
        let set = signal_set();
        // SAFETY: `set` is an initialised signal set; the old mask is not wanted.
        let rc = unsafe { libc::pthread_sigmask(how, &set, std::ptr::null_mut()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }

    /// Signals caught and held back until [`to`](Self::to) names the command; dropping it
    /// stops forwarding (the signals are then ignored until gpuproc exits).
    #[derive(Debug)]
    pub struct Forwarding(());

    impl Forwarding {
        pub fn start() -> io::Result<Forwarding> {
            mask(libc::SIG_BLOCK)?;
            for sig in SIGNALS {
                // SAFETY: a zeroed sigaction is valid; the handler only reads its siginfo and
                // makes one async-signal-safe system call. The spawned command gets the
                // default dispositions back at exec, and std clears its signal mask.
                let rc = unsafe {
                    let mut action: libc::sigaction = std::mem::zeroed();
                    action.sa_sigaction = handler as *const () as libc::sighandler_t;
                    action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
                    libc::sigemptyset(&mut action.sa_mask);
                    libc::sigaction(sig, &action, std::ptr::null_mut())
                };
                if rc != 0 {
                    let err = io::Error::last_os_error();
                    let _ = mask(libc::SIG_UNBLOCK);
                    return Err(err);
                }
            }
            Ok(Forwarding(()))
        }

        /// Makes `command`'s process start with no signal blocked (a child inherits the
        /// mask, and would otherwise ignore the very signals forwarded to it).
        pub fn unblock_in_child(&self, command: &mut std::process::Command) {
            use std::os::unix::process::CommandExt;
            let set = signal_set();
            // SAFETY: between fork and exec the closure makes one async-signal-safe call
            // (sigprocmask) on a set prepared before the fork.
            unsafe {
                command.pre_exec(move || {
                    if libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::last_os_error())
                    }
                });
            }
        }

        /// Forwards to process `pid` from now on, including any signal held back so far.
        pub fn to(&self, pid: u32) {
            if let Some(fd) = rustix::process::Pid::from_raw(pid as i32).and_then(|p| {
                rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
            }) {
                let fd: OwnedFd = fd;
                TARGET.store(fd.into_raw_fd(), Ordering::SeqCst);
            }
            let _ = mask(libc::SIG_UNBLOCK);
        }
    }

    impl Drop for Forwarding {
        fn drop(&mut self) {
            let fd = TARGET.swap(-1, Ordering::SeqCst);
            if fd >= 0 {
                // SAFETY: `fd` came from into_raw_fd above and nothing else closes it; the
                // handler no longer sees it.
                drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
            }
            let _ = mask(libc::SIG_UNBLOCK);
        }
    }
}
