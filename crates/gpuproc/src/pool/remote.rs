//! Pool workers on other machines, started through Slurm (`srun`) or any command line
//! (`ssh host`), with the same pool API and the same promises.
//!
//! How: for each worker slot the driver starts a local *relay* process exactly as it starts
//! a local worker (same socket, status page and death detection: nothing else in the pool
//! changes). The relay listens on a TCP port with a fresh 32-byte key, starts the launcher's
//! command for `<this executable> --gpuproc-worker`, and writes the address and the key to
//! that command's standard input: never on a command line or in the environment, where
//! other users could read it. The remote process (the same executable, whose [`init`]
//! sees the flag) connects back, proves that it holds the key (the mutual HMAC handshake of
//! [`crate::connection`]) and that it is the same build (the SHA-256 of its executable
//! file: a task function travels as an offset in the executable, which only means the same
//! thing in the same build), runs the initializer, and then speaks the pool's protocol
//! over the TCP connection. The relay forwards frames both ways; arguments that came to it
//! in shared memory are sent inline.
//!
//! When anything ends: the relay's death closes the connection, and the remote worker
//! exits as soon as it sees that (a thread watches for it, also while a task runs); the
//! remote worker's death ends the launcher's command and the relay, which tells the driver
//! the worker was lost (`WorkerError::Lost`): its tasks in flight fail with
//! `PoolError::WorkerLost` or run again, and it is replaced. The launcher's command gets
//! SIGTERM when its relay dies (`srun` then cancels its step).
//!
//! Limits: values that hold descriptors (queues, locks, shared memory, pipes) cannot cross
//! machines, so a task argument holding one is refused when it is submitted, naming its
//! type; an initializer argument holding one is refused when the pool is built. Task
//! timeouts and GPU leases for workers are for local workers. GPU memory is sampled on the
//! worker's node and comes back on a second connection (see `remote_gpu`).
//!
//! [`init`]: crate::init

use std::io::{BufRead, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::worker::{self, ChunkHeader, Init, ToWorker, WorkerArgs, WorkerError};
use crate::codec;
use crate::connection::{Address, Client, Listener};
use crate::ipc::{self, FrameReader};
use crate::sys;
use crate::sys::seqpacket::MapCache;
use crate::sys::shm::Mapping;

/// TCP keep-alive for the connection to a remote worker: probes after 15 s of silence,
/// every 5 s; 3 unanswered probes end it.
pub(crate) const KEEPALIVE: (Duration, Duration, u32) =
    (Duration::from_secs(15), Duration::from_secs(5), 3);

/// The flag that makes [`crate::init`] serve as a remote pool worker.
pub(crate) const WORKER_FLAG: &str = "--gpuproc-worker";

/// The flag after [`WORKER_FLAG`] that tells a worker started from a copy Slurm broadcast
/// ([`Slurm::bcast`]) to delete that copy once it runs.
const UNLINK_FLAG: &str = "--gpuproc-unlink-self";

/// The file name of every broadcast copy starts so: a worker deletes its executable only
/// if it is named so (a hand-typed flag cannot delete an installed program).
const BCAST_PREFIX: &str = "gpuproc-bcast-";

/// How a pool starts its workers: here ([`Launcher::local`], the default), as Slurm job
/// steps ([`Launcher::slurm`]), or through any command line ([`Launcher::command`]).
///
/// The program must call [`init`](crate::init) first thing in `main` (as every gpuproc
/// program does): the remote worker is the same executable, started with a flag that
/// `init` recognises, and must be reachable at the same path on the other machine (a
/// shared filesystem, or copied there first, e.g. with `sbcast`), or be copied by Slurm as
/// it starts each worker ([`Slurm::bcast`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Launcher {
    kind: Kind,
    /// The host name or address the workers connect back to.
    host: Option<String>,
    /// How long a worker may take to start and connect.
    start_timeout: Duration,
    /// How often a pool's remote workers sample their GPUs (set by the pool).
    #[serde(default)]
    pub(crate) sample_every: Option<Duration>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
enum Kind {
    Local,
    Slurm(Slurm),
    Command(Vec<String>),
}

/// What each worker's Slurm job step asks for: one task on one node, plus these options.
/// Inside an allocation (`SLURM_JOB_ID` set, e.g. in an `sbatch` script or under `salloc`)
/// each worker is a step of it; outside one, each worker's `srun` makes its own allocation.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Slurm {
    args: Vec<String>,
    /// Where Slurm copies the executable on each node (`--bcast`).
    #[serde(default)]
    bcast: Option<String>,
}

impl Slurm {
    /// One task on one node, nothing else asked.
    pub fn new() -> Slurm {
        Slurm::default()
    }

    /// `--gres=gpu:N`: each worker gets `n` GPUs of its node, and Slurm sets
    /// `CUDA_VISIBLE_DEVICES` for it (gpuproc's GPU functions then see only those).
    pub fn gpus(self, n: u32) -> Slurm {
        self.arg(format!("--gres=gpu:{n}"))
    }

    /// `--partition=NAME`.
    pub fn partition(self, name: &str) -> Slurm {
        self.arg(format!("--partition={name}"))
    }

    /// `--time=LIMIT`, in any form Slurm accepts (`30`, `1:00:00`, `1-0`).
    pub fn time(self, limit: &str) -> Slurm {
        self.arg(format!("--time={limit}"))
    }

    /// `--cpus-per-task=N`.
    pub fn cpus(self, n: u32) -> Slurm {
        self.arg(format!("--cpus-per-task={n}"))
    }

    /// `--bcast`: Slurm copies this executable into `dir` on the worker's node before it
    /// starts it there, for nodes that do not share the filesystem the program is on
    /// (Python users would copy it with `sbcast` first). `dir` must exist on the nodes and
    /// be local to them (`/tmp`). Each worker gets a copy of its own, under a random name
    /// (`gpuproc-bcast-` and 16 hexadecimal digits, so that nobody can plant a file or a
    /// link there beforehand), which it deletes as soon as it runs, so nothing is left on
    /// the nodes (a worker that dies before it starts leaves its copy).
    pub fn bcast(mut self, dir: impl Into<String>) -> Slurm {
        self.bcast = Some(dir.into());
        self
    }

    /// Any other `srun` option, as one argument (`--exclusive`, `--mem=16G`).
    pub fn arg(mut self, arg: impl Into<String>) -> Slurm {
        self.args.push(arg.into());
        self
    }
}

impl Default for Launcher {
    fn default() -> Self {
        Launcher::local()
    }
}

impl Launcher {
    /// Workers are processes on this machine (the default).
    pub fn local() -> Launcher {
        Launcher {
            kind: Kind::Local,
            host: None,
            start_timeout: Duration::from_secs(120),
            sample_every: None,
        }
    }

    /// Each worker is a Slurm job step (`srun`) with these options.
    pub fn slurm(options: Slurm) -> Launcher {
        Launcher {
            kind: Kind::Slurm(options),
            ..Launcher::local()
        }
    }

    /// Each worker is started by this command line followed by the executable's path and
    /// the worker flag: `["ssh", "gpu-node-3"]` runs `ssh gpu-node-3 /path/to/exe
    /// --gpuproc-worker`. The command must pass its standard input on (ssh and srun do).
    pub fn command<S: Into<String>>(prefix: impl IntoIterator<Item = S>) -> Launcher {
        Launcher {
            kind: Kind::Command(prefix.into_iter().map(Into::into).collect()),
            ..Launcher::local()
        }
    }

    /// The host name or address of this machine that the workers connect back to. By
    /// default, this machine's host name (and the relay listens on every interface).
    pub fn connect_back_to(mut self, host: impl Into<String>) -> Launcher {
        self.host = Some(host.into());
        self
    }

    /// How long a worker may take to start and connect back (default 120 s: a Slurm step
    /// may wait for resources); past it the worker counts as failed to start.
    pub fn start_timeout(mut self, timeout: Duration) -> Launcher {
        self.start_timeout = timeout;
        self
    }

    /// Whether workers run here.
    pub fn is_local(&self) -> bool {
        self.kind == Kind::Local
    }

    /// Whether workers are Slurm steps.
    pub(crate) fn asks_slurm(&self) -> bool {
        matches!(self.kind, Kind::Slurm(_))
    }

    /// The same launcher asking Slurm for `n` GPUs per worker (unless its options already
    /// ask for GPUs).
    pub(crate) fn with_slurm_gpus(mut self, n: u32) -> Launcher {
        if let Kind::Slurm(s) = &mut self.kind {
            if !s
                .args
                .iter()
                .any(|a| a.starts_with("--gres=gpu") || a.starts_with("--gpus"))
            {
                s.args.push(format!("--gres=gpu:{n}"));
            }
        }
        self
    }

    /// The command line that starts one worker running `exe`.
    fn argv(&self, exe: &str) -> Vec<String> {
        let mut argv: Vec<String> = match &self.kind {
            Kind::Local => Vec::new(),
            Kind::Slurm(s) => {
                let mut v: Vec<String> = [
                    "srun",
                    "--nodes=1",
                    "--ntasks=1",
                    "--exact",
                    "--kill-on-bad-exit=1",
                    "--quiet",
                ]
                .map(String::from)
                .to_vec();
                v.extend(s.args.iter().cloned());
                if let Some(dir) = &s.bcast {
                    // An unguessable name: in a shared directory such as /tmp, nobody can
                    // plant a file or a link at it beforehand.
                    let mut r = [0u8; 8];
                    if getrandom::fill(&mut r).is_err() {
                        // (No system randomness: still unique, if guessable.)
                        r = sys::shm::unique_u64().to_le_bytes();
                    }
                    let dir = dir.trim_end_matches('/');
                    v.push(format!("--bcast={dir}/{BCAST_PREFIX}{}", hex(&r)));
                }
                v
            }
            Kind::Command(prefix) => prefix.clone(),
        };
        argv.push(exe.to_string());
        argv.push(WORKER_FLAG.to_string());
        if matches!(&self.kind, Kind::Slurm(s) if s.bcast.is_some()) {
            argv.push(UNLINK_FLAG.to_string());
        }
        argv
    }
}

/// The first message of a remote worker: who it is.
#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    build: [u8; 32],
    host: String,
    pid: u32,
}

/// The relay's answer: the pool's settings for the worker, a process's call to run, or why
/// it may not serve.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Start {
    Serve {
        init: Option<(worker::FnRef, Vec<u8>)>,
        max_tasks: Option<u64>,
        track_time: bool,
        /// Sample the worker's GPUs this often and send them on a second connection (see
        /// `remote_gpu`).
        sample_every: Option<Duration>,
    },
    /// Run this encoded `process::wire::Call` as a `Process` child does, reporting on the
    /// connection (see `process::remote`).
    Call(Vec<u8>),
    Refused(String),
}

/// A remote process that connected and was accepted: its connection, the launcher's
/// process, and its node and pid there.
pub(crate) struct Started {
    pub conn: crate::connection::Connection,
    pub launcher: Child,
    pub node: String,
    pub pid: u32,
    /// The connection its GPU samples come on, if it sends them.
    pub side: Option<crate::connection::Connection>,
}

/// The worker's answer: its initializer's outcome.
#[derive(Debug, Serialize, Deserialize)]
struct Ready(Result<(), String>);

/// What identifies this build: the linker's GNU build id when the executable has one (read
/// from its program headers, a few hundred bytes), else the SHA-256 of the whole file;
/// computed once.
fn build_id() -> Result<[u8; 32], String> {
    static ID: OnceLock<Result<[u8; 32], String>> = OnceLock::new();
    ID.get_or_init(|| {
        use sha2::{Digest, Sha256};
        let read = |e: std::io::Error| format!("reading this executable: {e}");
        let mut f = std::fs::File::open("/proc/self/exe").map_err(read)?;
        let mut hasher = Sha256::new();
        let mut head = vec![0u8; 64 << 10];
        let n = read_full(&mut f, &mut head).map_err(read)?;
        if let Some(id) = gnu_build_id(&head[..n]) {
            hasher.update(b"gnu-build-id:");
            hasher.update(id);
            return Ok(hasher.finalize().into());
        }
        hasher.update(&head[..n]);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(read)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(hasher.finalize().into())
    })
    .clone()
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The GNU build id in the notes of a 64-bit little-endian ELF file whose first bytes are
/// `elf` (the notes must lie within them); `None` if there is none or anything is off.
fn gnu_build_id(elf: &[u8]) -> Option<&[u8]> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    // ELF magic, 64-bit, little-endian.
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        const PT_NOTE: u32 = 4;
        if u32_at(ph)? != PT_NOTE {
            continue;
        }
        let off = usize::try_from(u64_at(ph.checked_add(8)?)?).ok()?;
        let size = usize::try_from(u64_at(ph.checked_add(32)?)?).ok()?;
        let mut at = off;
        let end = off.checked_add(size)?;
        while at.checked_add(12)? <= end {
            let namesz = usize::try_from(u32_at(at)?).ok()?;
            let descsz = usize::try_from(u32_at(at + 4)?).ok()?;
            let kind = u32_at(at + 8)?;
            let name = at + 12;
            let desc = name.checked_add(namesz.checked_next_multiple_of(4)?)?;
            let next = desc.checked_add(descsz.checked_next_multiple_of(4)?)?;
            const NT_GNU_BUILD_ID: u32 = 3;
            if kind == NT_GNU_BUILD_ID && elf.get(name..name + namesz)? == b"GNU\0" {
                return elf
                    .get(desc..desc.checked_add(descsz)?)
                    .filter(|d| !d.is_empty());
            }
            at = next;
        }
    }
    None
}

fn host_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// The key, as the hex digits written to the worker's standard input.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The line a remote worker reads: where to connect and the key, parsed strictly.
fn parse_ticket(line: &str) -> Option<(String, u16, Vec<u8>)> {
    let mut words = line.trim_end_matches('\n').split(' ');
    let (addr, key) = (words.next()?, words.next()?);
    if words.next().is_some() {
        return None;
    }
    let (host, port) = addr.rsplit_once(':')?;
    let key = unhex(key)?;
    (!host.is_empty() && key.len() == 32).then_some((host.to_string(), port.parse().ok()?, key))
}

/// The relay: starts the remote worker, checks it, then forwards frames between the pool's
/// driver (`args.conn`) and it until either side ends.
pub(crate) fn relay_main(args: WorkerArgs, launcher: Launcher) -> Result<(), WorkerError> {
    let page = Mapping::map_existing(args.page, worker::PAGE_LEN)
        .map_err(|e| format!("mapping the status page: {e}"))?;
    page.atomic_u64(worker::PHASE_AT)
        .store(worker::PHASE_INIT, std::sync::atomic::Ordering::Release);
    let settings = Start::Serve {
        init: args
            .init
            .as_ref()
            .filter(|i| i.fds.0.is_empty())
            .map(|i| (i.func, i.args.clone())),
        max_tasks: args.max_tasks,
        track_time: args.track_time,
        sample_every: launcher.sample_every,
    };
    // A worker that cannot be started counts as one whose initializer failed: the pool
    // gives up after a few in a row instead of starting them for ever.
    let Started {
        conn,
        launcher: mut child,
        node,
        side,
        ..
    } = start_remote(&launcher, settings).map_err(WorkerError::Initializer)?;
    page.atomic_u64(worker::PHASE_AT)
        .store(worker::PHASE_READY, std::sync::atomic::Ordering::Release);
    let remote = conn.into_fd();
    // A node that dies, or a network that drops, sends nothing: keep-alive probes find it
    // (in about 30 s) and end the connection.
    let _ = sys::set_keepalive(remote.as_fd(), KEEPALIVE);
    let result = std::thread::scope(|scope| {
        // The worker's GPU samples, into the status page for the driver.
        let stop = side.as_ref().and_then(|side| {
            let stop = sys::dup(side.as_fd()).ok()?;
            scope.spawn(|| super::remote_gpu::receive(side, &page, &node));
            Some(stop)
        });
        let result = forward(args.conn, remote);
        if let Some(stop) = stop {
            let _ = rustix::net::shutdown(&stop, rustix::net::Shutdown::Both);
        }
        result
    });
    let status = end_launcher(&mut child);
    // A worker that ended other than cleanly (after the pool's last frame, or its
    // `max_tasks_per_child`) was lost with whatever it had in flight.
    // How the launcher ended says more than what the connection saw (a reset, say).
    let reason = match (status, result) {
        (Some(s), Ok(())) if s.success() => return Ok(()),
        (Some(s), Ok(())) => format!("its launcher ended: {s}"),
        (Some(s), Err(e)) if !s.success() => format!("its launcher ended: {s} ({e})"),
        (_, Err(e)) => e,
        (None, Ok(())) => "its launcher could not be waited for".into(),
    };
    Err(WorkerError::Lost { node, reason })
}

/// Waits (at most 5 s: the remote process has ended, or its connection has) for the
/// launcher's command to end, then kills it; how it ended, when known.
pub(crate) fn end_launcher(child: &mut Child) -> Option<std::process::ExitStatus> {
    let deadline = crate::time::deadline(Duration::from_secs(5));
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if deadline.is_some_and(|d| std::time::Instant::now() < d) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                return child.wait().ok();
            }
        }
    }
}

fn spawn_launcher(argv: &[String]) -> std::io::Result<Child> {
    let (program, rest) = argv
        .split_first()
        .ok_or_else(|| std::io::Error::other("an empty command line"))?;
    let mut cmd = Command::new(program);
    cmd.args(rest).stdin(Stdio::piped());
    sys::die_with_parent(&mut cmd, rustix::process::Signal::TERM);
    cmd.spawn()
}

/// Starts the remote process through `launcher`, checks it and gives it `settings`; returns
/// it, or why it could not be started.
pub(crate) fn start_remote(launcher: &Launcher, settings: Start) -> Result<Started, String> {
    // The launcher's command may end before it reads the ticket: that is its failure to
    // report, not a reason for this relay to die.
    sys::ignore_sigpipe();
    let started = std::time::Instant::now();
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| format!("making a key for the worker: {e}"))?;
    let (bind_host, host) = match &launcher.host {
        Some(h) => (h.clone(), h.clone()),
        None => ("0.0.0.0".to_string(), host_name()),
    };
    let listener = Listener::builder(Address::tcp(bind_host, 0))
        .authkey(&key)
        .bind()
        .map_err(|e| format!("listening for the remote worker: {e}"))?;
    let port = match listener.address() {
        Address::Tcp { port, .. } => *port,
        other => return Err(format!("listening on {other}, not TCP")),
    };
    let exe = std::env::current_exe()
        .map_err(|e| format!("finding this executable: {e}"))?
        .to_string_lossy()
        .into_owned();
    let argv = launcher.argv(&exe);
    let shown = argv.join(" ");
    let mut child = spawn_launcher(&argv).map_err(|e| format!("starting `{shown}`: {e}"))?;
    let ticket = format!("{host}:{port} {}\n", hex(&key));
    if let Some(mut stdin) = child.stdin.take() {
        match stdin.write_all(ticket.as_bytes()) {
            // It ended without reading: how it ended is told below.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            other => other.map_err(|e| format!("writing to `{shown}`: {e}"))?,
        }
    }
    let conn = loop {
        match listener.accept_timeout(Duration::from_millis(200)) {
            Ok(c) => break c,
            Err(e) if e.is_timeout() => {}
            Err(e) => {
                // A peer without the key (or garbage): not our worker; keep waiting.
                eprintln!("gpuproc pool relay: refused a connection ({e})");
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "`{shown}` ended ({status}) before the worker connected"
            ));
        }
        if started.elapsed() > launcher.start_timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "the worker started by `{shown}` did not connect within {:?} (does the \
                 program call gpuproc::init() first thing in main, and can the worker's node \
                 reach this one? see Launcher::connect_back_to)",
                launcher.start_timeout
            ));
        }
    };
    let hello: Hello = conn
        .recv_timeout(launcher.start_timeout)
        .map_err(|e| format!("receiving the worker's hello: {e}"))?;
    let ours = build_id()?;
    if hello.build != ours {
        let why = format!(
            "the worker on {} (pid {}) runs a different build of {exe}: a remote worker must run \
             the same executable",
            hello.host, hello.pid
        );
        let _ = conn.send(&Start::Refused(why.clone()));
        return Err(why);
    }
    let (serves, samples) = match &settings {
        Start::Serve { sample_every, .. } => (true, sample_every.is_some()),
        _ => (false, false),
    };
    conn.send(&settings)
        .map_err(|e| format!("starting the worker: {e}"))?;
    if serves {
        let Ready(ready) = conn
            .recv_timeout(launcher.start_timeout)
            .map_err(|e| format!("waiting for the worker's initializer: {e}"))?;
        ready.map_err(|e| format!("the initializer on {}: {e}", hello.host))?;
    }
    // The worker connects again for its GPU samples; without them it still serves.
    let side = samples
        .then(|| {
            listener
                .accept_timeout(launcher.start_timeout.min(Duration::from_secs(10)))
                .map_err(|e| {
                    eprintln!(
                        "gpuproc pool relay: no GPU samples from the worker on {}: {e}",
                        hello.host
                    )
                })
                .ok()
        })
        .flatten();
    Ok(Started {
        conn,
        launcher: child,
        node: hello.host,
        pid: hello.pid,
        side,
    })
}

/// Forwards frames from the driver to the remote worker (inlining arguments that are in
/// shared memory) and the worker's bytes back, until either side ends; the error says
/// which side failed how.
fn forward(local: OwnedFd, remote: OwnedFd) -> Result<(), String> {
    let local_in = sys::dup(local.as_fd()).map_err(|e| format!("duplicating: {e}"))?;
    let remote_out = sys::dup(remote.as_fd()).map_err(|e| format!("duplicating: {e}"))?;
    let (out, back) = std::thread::scope(|scope| {
        let back = scope.spawn(|| {
            let r = copy_bytes(&remote, &local);
            // The worker is gone: stop waiting for the driver's next frame.
            let _ = rustix::net::shutdown(&local, rustix::net::Shutdown::Read);
            r
        });
        let out = send_frames(&local_in, &remote_out);
        // The driver ended (or the worker stopped reading): let the worker see the end.
        let _ = rustix::net::shutdown(&remote_out, rustix::net::Shutdown::Write);
        (out, back.join().unwrap_or(Ok(())))
    });
    back.and(out)
}

/// The worker's frames, passed on as they come (a remote worker sends no descriptors).
fn copy_bytes(from: &OwnedFd, to: &OwnedFd) -> Result<(), String> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match rustix::io::read(from, &mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(format!("the connection was lost: {e}")),
        };
        sys::send_all(to.as_fd(), &[&buf[..n]], &[])
            .map_err(|e| format!("passing results on: {e}"))?;
    }
}

/// Frames for the worker are gathered up to this many bytes before they are sent: many
/// small chunks (chunk size 1) go in one write, as the driver sends them to local workers.
const RELAY_BATCH: usize = 256 << 10;

/// The driver's frames, passed on to the worker: a chunk whose arguments are in a memfd
/// with them inline. Frames that arrived together go out together.
fn send_frames(from: &OwnedFd, to: &OwnedFd) -> Result<(), String> {
    let mut reader = FrameReader::default();
    let memfds = MapCache::default();
    let mut out: Vec<u8> = Vec::new();
    let flush = |out: &mut Vec<u8>| -> Result<(), String> {
        if !out.is_empty() {
            sys::send_all(to.as_fd(), &[out], &[])
                .map_err(|e| format!("the connection was lost: {e}"))?;
            out.clear();
        }
        Ok(())
    };
    loop {
        while let Some((bytes, mut fds)) = reader.next_frame_ref().map_err(|e| e.to_string())? {
            let (msg, rest) = codec::take_from_bytes::<ToWorker>(bytes)
                .map_err(|e| format!("a frame from the pool: {e}"))?;
            match msg {
                ToWorker::Chunk(ChunkHeader { in_memfd: true, .. }) => {
                    let ToWorker::Chunk(mut header) = msg else {
                        unreachable!()
                    };
                    let len = header
                        .lens
                        .checked_total()
                        .ok_or("a chunk whose argument lengths overflow")?;
                    let fd = fds.pop().ok_or("a chunk without its memfd")?;
                    let map = memfds
                        .map(fd.as_fd(), len.max(1), 0)
                        .map_err(|e| format!("mapping a chunk's arguments: {e}"))?;
                    header.in_memfd = false;
                    let head = codec::to_vec(&ToWorker::Chunk(header))
                        .map_err(|e| format!("re-encoding a chunk: {e}"))?;
                    let frame = ipc::frame_header(head.len() + len, 0);
                    // (Large arguments go straight from the memfd, not through `out`.)
                    flush(&mut out)?;
                    sys::send_all(to.as_fd(), &[&frame, &head, &map.bytes()[..len]], &[])
                        .map_err(|e| format!("the connection was lost: {e}"))?;
                }
                _ => {
                    if !fds.is_empty() {
                        return Err("a task for a remote worker carries descriptors".into());
                    }
                    out.extend_from_slice(&ipc::frame_header(bytes.len(), 0));
                    out.extend_from_slice(bytes);
                    let _ = rest;
                    if out.len() >= RELAY_BATCH {
                        flush(&mut out)?;
                    }
                }
            }
        }
        flush(&mut out)?;
        if reader.at_eof() {
            return Ok(());
        }
        reader
            .wait_and_fill(from.as_fd())
            .map_err(|e| format!("reading from the pool: {e}"))?;
    }
}

/// Serves as a remote pool worker if this process was started as one (by a [`Launcher`]);
/// does not return then.
pub(crate) fn serve_if_remote_worker() {
    if std::env::args_os().nth(1).as_deref() != Some(std::ffi::OsStr::new(WORKER_FLAG)) {
        return;
    }
    if std::env::args_os().nth(2).as_deref() == Some(std::ffi::OsStr::new(UNLINK_FLAG)) {
        remove_broadcast_copy();
    }
    let code = match serve_remote() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("gpuproc remote worker on {}: {e}", host_name());
            1
        }
    };
    std::process::exit(code);
}

/// Deletes this executable if it is a copy Slurm broadcast for this worker (see
/// [`Slurm::bcast`]); the running program keeps its pages (and `/proc/self/exe`).
fn remove_broadcast_copy() {
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
        return;
    };
    if is_broadcast_copy(&exe) {
        let _ = std::fs::remove_file(&exe);
    }
}

/// Whether `path` names a broadcast copy ([`BCAST_PREFIX`] and 16 hexadecimal digits).
fn is_broadcast_copy(path: &std::path::Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    name.strip_prefix(BCAST_PREFIX)
        .is_some_and(|r| r.len() == 16 && r.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn serve_remote() -> Result<(), String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .take(512)
        .read_line(&mut line)
        .map_err(|e| format!("reading where to connect: {e}"))?;
    if line.is_empty() {
        // The relay ended before it said where to connect: nobody waits for this worker.
        sys::exit_now(1);
    }
    let (host, port, key) =
        parse_ticket(&line).ok_or("standard input did not say where to connect")?;
    let conn = Client::builder(Address::tcp(host.clone(), port))
        .authkey(&key)
        .timeout(Duration::from_secs(60))
        .connect()
        .map_err(|e| format!("connecting to the pool at {host}:{port}: {e}"))?;
    conn.send(&Hello {
        build: build_id()?,
        host: host_name(),
        pid: std::process::id(),
    })
    .map_err(|e| format!("greeting the pool: {e}"))?;
    let start: Start = conn
        .recv_timeout(Duration::from_secs(60))
        .map_err(|e| format!("waiting for the pool: {e}"))?;
    let (init, max_tasks, track_time, sample_every) = match start {
        Start::Serve {
            init,
            max_tasks,
            track_time,
            sample_every,
        } => (init, max_tasks, track_time, sample_every),
        Start::Call(call) => {
            let fd = conn.into_fd();
            let _ = sys::set_keepalive(fd.as_fd(), KEEPALIVE);
            crate::process::child::serve_remote_call(fd, call)
        }
        Start::Refused(why) => return Err(why),
    };
    let ready = match init {
        None => Ok(()),
        Some((func, args)) => Init::new(func, args, Vec::new())
            .map_err(WorkerError::Initializer)
            .and_then(worker::run_initializer)
            .map_err(|e| match e {
                WorkerError::Initializer(m) | WorkerError::Connection(m) => m,
                WorkerError::Lost { reason, .. } => reason,
            }),
    };
    let failed = ready.clone().err();
    conn.send(&Ready(ready))
        .map_err(|e| format!("answering the pool: {e}"))?;
    if let Some(e) = failed {
        return Err(e);
    }
    let fd = conn.into_fd();
    let _ = sys::set_keepalive(fd.as_fd(), KEEPALIVE);
    let page = std::sync::Arc::new(
        Mapping::anonymous("gpuproc-remote-worker", worker::PAGE_LEN)
            .map_err(|e| format!("making a status page: {e}"))?,
    );
    if let Some(every) = sample_every {
        // A second connection for GPU samples: the pool's frames go on the first.
        match Client::builder(Address::tcp(host.clone(), port))
            .authkey(&key)
            .timeout(Duration::from_secs(60))
            .connect()
        {
            Ok(side) => {
                super::remote_gpu::start_sampling(side, std::sync::Arc::clone(&page), every)
            }
            Err(e) => eprintln!("gpuproc remote worker: no GPU samples: {e}"),
        }
    }
    watch_for_hangup(&fd, std::sync::Arc::clone(&page))?;
    worker::serve(fd, &page, track_time, max_tasks, true).map_err(|e| match e {
        WorkerError::Initializer(m) | WorkerError::Connection(m) => m,
        WorkerError::Lost { reason, .. } => reason,
    })
}

/// Ends this process when the pool's end of `fd` has closed while a task runs (its result
/// could not be delivered). Between tasks the worker loop sees the end itself and exits
/// cleanly, as it does after the pool's last frame.
fn watch_for_hangup(fd: &OwnedFd, page: std::sync::Arc<Mapping>) -> Result<(), String> {
    let watched = sys::dup(fd.as_fd()).map_err(|e| format!("duplicating: {e}"))?;
    std::thread::Builder::new()
        .name("gpuproc-hangup".into())
        .spawn(move || {
            if !sys::wait_for_hangup(watched.as_fd()) {
                return;
            }
            let running = page.atomic_u64(worker::RUNNING_AT);
            loop {
                if running.load(std::sync::atomic::Ordering::Acquire) != 0 {
                    sys::exit_now(1);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .map_err(|e| format!("starting a watch thread: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launchers_build_their_command_lines() {
        let exe = "/shared/bin/train";
        assert_eq!(
            Launcher::command(["ssh", "node3"]).argv(exe),
            ["ssh", "node3", exe, WORKER_FLAG]
        );
        let slurm = Launcher::slurm(Slurm::new().gpus(2).partition("gpu").time("1:00:00"));
        let argv = slurm.argv(exe);
        assert_eq!(argv[0], "srun");
        assert!(argv.contains(&"--gres=gpu:2".to_string()));
        assert!(argv.contains(&"--partition=gpu".to_string()));
        assert!(argv.contains(&"--time=1:00:00".to_string()));
        assert_eq!(&argv[argv.len() - 2..], [exe, WORKER_FLAG]);
        assert!(Launcher::local().is_local() && !slurm.is_local());
        let argv = Launcher::slurm(Slurm::new().bcast("/tmp/")).argv(exe);
        let bcast = argv.iter().find(|a| a.starts_with("--bcast=")).unwrap();
        let copy = std::path::Path::new(bcast.trim_start_matches("--bcast="));
        assert!(
            copy.starts_with("/tmp") && is_broadcast_copy(copy),
            "{bcast}"
        );
        let again = Launcher::slurm(Slurm::new().bcast("/tmp")).argv(exe);
        assert!(!again.contains(bcast), "two workers, one copy: {bcast}");
        assert_eq!(&argv[argv.len() - 3..], [exe, WORKER_FLAG, UNLINK_FLAG]);
    }

    #[test]
    fn only_broadcast_copies_are_deleted() {
        for (path, copy) in [
            ("/tmp/gpuproc-bcast-0123456789abcdef", true),
            ("/scratch/x/gpuproc-bcast-ffffffffffffffff", true),
            ("/usr/bin/train", false),
            ("/tmp/gpuproc-bcast-", false),
            ("/tmp/gpuproc-bcast-0123456789abcde", false),
            ("/tmp/gpuproc-bcast-0123456789abcdef0", false),
            ("/tmp/gpuproc-bcast-0123456789abcdeg", false),
            ("/tmp/gpuproc-bcast-12-0", false),
        ] {
            assert_eq!(
                is_broadcast_copy(std::path::Path::new(path)),
                copy,
                "{path}"
            );
        }
    }

    #[test]
    fn tickets_parse_strictly() {
        let key = [7u8; 32];
        let line = format!("10.0.0.5:4242 {}\n", hex(&key));
        assert_eq!(
            parse_ticket(&line),
            Some(("10.0.0.5".into(), 4242, key.to_vec()))
        );
        let bad = [
            String::new(),
            "host:1".into(),
            format!("host:99999 {}", hex(&key)),
            format!(":1 {}", hex(&key)),
            format!("host:1 {}", hex(&key[..31])),
            format!("host:1 {}zz", hex(&key[..31])),
            format!("host:1 {} extra", hex(&key)),
        ];
        for b in bad {
            assert_eq!(parse_ticket(&b), None, "{b:?}");
        }
    }

    #[test]
    fn the_gnu_build_id_is_read_from_the_program_headers() {
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let id = gnu_build_id(&exe[..exe.len().min(64 << 10)]).expect("rustc links a build id");
        assert!(id.len() >= 8);
        // Cut or corrupted headers give none, never a panic.
        for cut in [0, 5, 64, 200, 1000] {
            let _ = gnu_build_id(&exe[..cut]);
        }
        let mut bad = exe[..4096.min(exe.len())].to_vec();
        bad[0x38] = 0xff;
        bad[0x39] = 0xff;
        let _ = gnu_build_id(&bad);
        assert_eq!(gnu_build_id(b"not an elf file at all"), None);
    }

    #[test]
    fn the_build_id_is_stable_and_of_this_executable() {
        let a = build_id().unwrap();
        assert_eq!(a, build_id().unwrap());
        assert_ne!(a, [0u8; 32]);
    }
}
