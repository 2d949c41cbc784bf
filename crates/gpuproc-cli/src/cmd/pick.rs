//! `gpuproc pick`: choose free GPUs, lease them, and print a `CUDA_VISIBLE_DEVICES` value or
//! run a command with it.

use std::ffi::OsString;
use std::fmt;
use std::io::{self, Write};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::Context;
use gpuproc::gpu::{self, Criteria, DeviceId, GpuLease, PickError};

use crate::gate;
use crate::units::{human, parse_duration, parse_size, OrderArg};

/// Exit status when too few GPUs qualify.
pub const EXIT_NONE_FREE: u8 = 3;

const AFTER_HELP: &str = "\
Who holds the GPUs:
  With --hold, gpuproc runs CMD with CUDA_VISIBLE_DEVICES and NVIDIA_VISIBLE_DEVICES set to
  the GPUs' UUIDs and holds the lease, together with CMD, until CMD exits. CMD's process is
  a holder of the lease before CMD runs; if it cannot be made one, CMD is not run (status 1). It forwards SIGTERM,
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

/// Runs `command` with the lease's environment, forwarding signals, until it exits.
fn hold(mut lease: GpuLease, command: &[OsString]) -> anyhow::Result<()> {
    let (program, rest) = command
        .split_first()
        .context("--hold needs a command after --")?;
    // Catch the signals before CMD exists and hold them back until it can be told, so that
    // none is lost or kills gpuproc in between.
    let forwarding = forward::Forwarding::start().context("installing signal handlers")?;
    let mut command = gate::command(program, rest);
    command.envs(lease.env());
    let mut child = start_held(
        &mut command,
        |pid| forwarding.to(pid),
        |pid| Ok(lease.share_with(pid)?),
    )?;
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

/// Starts `command` (a [gated](crate::gate) one) and lets it run only once `register` has
/// made its process a holder of the lease, so that CMD keeps its GPUs should gpuproc be
/// killed. `spawned` learns the pid first (to forward signals to it).
///
/// # Errors
/// When the process cannot be started, or `register` fails: the command then never runs
/// (its gate closes and the process is reaped), as the help promises that CMD holds the
/// lease.
fn start_held(
    command: &mut Command,
    spawned: impl FnOnce(u32),
    register: impl FnOnce(u32) -> anyhow::Result<()>,
) -> anyhow::Result<Child> {
    let (mut child, gate) = gate::spawn(command).context("starting the command")?;
    let pid = child.id();
    spawned(pid);
    if let Err(e) = register(pid) {
        drop(gate);
        let _ = child.wait();
        return Err(e.context(
            "not running the command: it could not be made a holder of the GPU lease \
             (it would run on GPUs that no lease covers)",
        ));
    }
    // A gate that is gone was killed; its exit status says how.
    let _ = gate.open();
    Ok(child)
}

/// Forwarding SIGINT, SIGTERM, SIGHUP and SIGQUIT to the held command.
///
/// The handlers may run on any thread of gpuproc (no signal mask is involved): a signal
/// caught before the command exists is kept pending in [`Target`] and sent as soon as the
/// command's pidfd is attached.
mod forward {
    use std::io;
    use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
    use std::sync::atomic::{AtomicI32, AtomicU32, AtomicUsize, Ordering::SeqCst};

    const SIGNALS: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

    fn bit(sig: libc::c_int) -> u32 {
        u32::try_from(sig)
            .ok()
            .and_then(|s| 1u32.checked_shl(s))
            .unwrap_or(0)
    }

    /// Where caught signals go: a pidfd for the command (a pidfd names the command even
    /// after it exits, so a late signal cannot reach a process that reused its pid), and
    /// the signals caught while there is none.
    ///
    /// The pidfd is closed only once no handler can be using its number: handlers count
    /// themselves in `users` before they read `fd`, and [`detach`](Self::detach) empties
    /// `fd` before it waits for `users` to reach zero.
    #[derive(Debug)]
    pub struct Target {
        fd: AtomicI32,
        users: AtomicUsize,
        pending: AtomicU32,
    }

    impl Target {
        pub const fn new() -> Target {
            Target {
                fd: AtomicI32::new(-1),
                users: AtomicUsize::new(0),
                pending: AtomicU32::new(0),
            }
        }

        /// Forwards `sig`, or keeps it until a pidfd is attached. Async-signal-safe.
        pub fn deliver(&self, sig: libc::c_int) {
            self.pending.fetch_or(bit(sig), SeqCst);
            self.users.fetch_add(1, SeqCst);
            let fd = self.fd.load(SeqCst);
            if fd >= 0 {
                self.flush(fd);
            }
            self.users.fetch_sub(1, SeqCst);
        }

        /// Sends every pending signal through `fd` (each is claimed once, by whoever
        /// swaps it out first).
        fn flush(&self, fd: RawFd) {
            let pending = self.pending.swap(0, SeqCst);
            for sig in SIGNALS {
                if pending & bit(sig) != 0 {
                    // SAFETY: pidfd_send_signal is a plain system call (async-signal-safe)
                    // on a descriptor kept open while `users` counts this call, with no
                    // siginfo.
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
        }

        /// Forwards to the process `fd` names from now on, starting with the signals
        /// caught so far. The target owns `fd` until [`detach`](Self::detach).
        pub fn attach(&self, fd: OwnedFd) {
            let raw = fd.into_raw_fd();
            self.users.fetch_add(1, SeqCst);
            let old = self.fd.swap(raw, SeqCst);
            self.flush(raw);
            self.users.fetch_sub(1, SeqCst);
            if old >= 0 {
                Detached {
                    target: self,
                    fd: old,
                }
                .close_when_unused();
            }
        }

        /// Stops forwarding; the pidfd, if any, is handed back for closing.
        pub fn detach(&self) -> Option<Detached<'_>> {
            let fd = self.fd.swap(-1, SeqCst);
            (fd >= 0).then_some(Detached { target: self, fd })
        }
    }

    /// A pidfd no longer reachable by new handler calls, possibly still in use by one
    /// running now.
    #[derive(Debug)]
    pub struct Detached<'a> {
        target: &'a Target,
        fd: RawFd,
    }

    impl Detached<'_> {
        /// Closes the pidfd if no handler is using it; otherwise gives it back.
        pub fn try_close(self) -> Result<(), Self> {
            if self.target.users.load(SeqCst) != 0 {
                return Err(self);
            }
            // SAFETY: `fd` came from `into_raw_fd` in `attach`, was removed from the target
            // before `users` was seen at zero, so no handler holds or can load it.
            drop(unsafe { OwnedFd::from_raw_fd(self.fd) });
            Ok(())
        }

        /// Closes the pidfd as soon as no handler uses it (a handler runs for
        /// microseconds).
        pub fn close_when_unused(self) {
            let mut detached = self;
            while let Err(d) = detached.try_close() {
                detached = d;
                std::thread::yield_now();
            }
        }
    }

    static TARGET: Target = Target::new();

    extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
        let code = unsafe { (*info).si_code };
        // The terminal sends SIGINT and SIGQUIT to the whole foreground group: the command
        // has its own copy.
        if code == libc::SI_KERNEL && matches!(sig, libc::SIGINT | libc::SIGQUIT) {
            return;
        }
        TARGET.deliver(sig);
    }

    /// Signals caught (on whichever thread) and held back until [`to`](Self::to) names the
    /// command; dropping it stops forwarding (the signals are then ignored until gpuproc
    /// exits).
    #[derive(Debug)]
    pub struct Forwarding(());

    impl Forwarding {
        pub fn start() -> io::Result<Forwarding> {
            for sig in SIGNALS {
                // SAFETY: a zeroed sigaction is valid; the handler only reads its siginfo,
                // touches atomics and makes async-signal-safe system calls. The spawned
                // command gets the default dispositions back at exec.
                let rc = unsafe {
                    let mut action: libc::sigaction = std::mem::zeroed();
                    action.sa_sigaction = handler as *const () as libc::sighandler_t;
                    action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
                    libc::sigemptyset(&mut action.sa_mask);
                    libc::sigaction(sig, &action, std::ptr::null_mut())
                };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(Forwarding(()))
        }

        /// Forwards to process `pid` from now on, including any signal held back so far.
        pub fn to(&self, pid: u32) {
            let fd = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
                .and_then(|p| {
                    rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
                });
            if let Some(fd) = fd {
                TARGET.attach(fd);
            }
        }
    }

    impl Drop for Forwarding {
        fn drop(&mut self) {
            if let Some(detached) = TARGET.detach() {
                detached.close_when_unused();
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use std::os::fd::AsRawFd;
        use std::os::unix::process::ExitStatusExt;
        use std::process::Command;
        use std::sync::mpsc;
        use std::time::Duration;

        #[test]
        fn a_signal_caught_on_another_thread_before_the_command_exists_reaches_it() {
            let forwarding = Forwarding::start().expect("handlers");
            let mut child = Command::new("sleep").arg("60").spawn().expect("sleep");
            let pid = child.id();
            // raise() signals the calling thread: the handler runs on that other thread,
            // before anything is attached.
            // SAFETY: raise is a plain system call; the handler for SIGTERM is installed.
            std::thread::spawn(|| unsafe { libc::raise(libc::SIGTERM) })
                .join()
                .expect("thread");
            forwarding.to(pid);
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(child.wait());
            });
            let status = rx.recv_timeout(Duration::from_secs(30));
            drop(forwarding);
            if status.is_err() {
                // SAFETY: kill is a plain system call on our own child.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                let _ = rx.recv_timeout(Duration::from_secs(5));
            }
            let status = status.expect("the SIGTERM was lost").expect("wait");
            assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
        }

        #[test]
        fn the_pidfd_is_not_closed_while_a_handler_uses_it() {
            let target = Target::new();
            let child = Command::new("true").spawn().expect("true");
            let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
            let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
                .expect("pidfd");
            let raw = fd.as_raw_fd();
            target.attach(fd);
            // A handler in flight on another thread.
            target.users.fetch_add(1, SeqCst);
            let detached = target.detach().expect("attached");
            assert_eq!(target.fd.load(SeqCst), -1, "new handler calls see no pidfd");
            let detached = detached.try_close().expect_err("in use: not closed");
            // SAFETY: only inspected; the target still owns the descriptor.
            let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) };
            assert!(rustix::io::fcntl_getfd(borrowed).is_ok(), "still open");
            target.users.fetch_sub(1, SeqCst);
            detached.try_close().expect("closed once unused");
            let mut child = child;
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for the gpuproc gate: `sh` waiting on the gate's pipe.
    fn gated_touch(path: &std::path::Path) -> Command {
        let mut command = Command::new("/bin/sh");
        command.arg("-c").arg(format!(
            "read -r _ < /proc/self/fd/${} || exit 125; touch '{}'",
            gate::ENV,
            path.display()
        ));
        command
    }

    #[test]
    fn a_command_that_cannot_hold_the_lease_does_not_run() {
        let dir = std::env::temp_dir().join(format!("gpuproc-cli-held-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let ran = dir.join("ran");
        let mut seen = None;
        let err = start_held(
            &mut gated_touch(&ran),
            |pid| seen = Some(pid),
            |_| Err(anyhow::anyhow!("the lease table is unusable")),
        )
        .expect_err("registration failed");
        let message = format!("{err:#}");
        assert!(
            message.contains("not running the command")
                && message.contains("the lease table is unusable"),
            "{message}"
        );
        assert!(seen.is_some());
        assert!(!ran.exists(), "the command ran without holding the lease");

        let mut registered = None;
        let mut child = start_held(
            &mut gated_touch(&ran),
            |_| {},
            |pid| {
                registered = Some(pid);
                Ok(())
            },
        )
        .expect("started");
        assert_eq!(registered, Some(child.id()));
        assert!(child.wait().expect("wait").success());
        assert!(ran.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
