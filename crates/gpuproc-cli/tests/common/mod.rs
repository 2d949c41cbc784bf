//! Helpers shared by the `gpuproc` integration tests: the NVML simulator's environment,
//! running commands with a deadline, and background processes that are always ended and
//! reaped, even when a test fails.
//!
//! Each test file compiles this module on its own (`mod common;`), so a helper that one of
//! them does not use carries `#[allow(dead_code)]`.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

pub use rustix::process::Signal;

pub mod slurm;

/// How long any one wait in a test may take.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// How long a killed child's waiting thread gets to reap it.
const REAP: Duration = Duration::from_secs(5);

/// The NVML simulator library.
pub fn sim_lib() -> PathBuf {
    nvml_sim::library_path()
        .expect("libnvml_sim.so not found: build the workspace first (cargo build --workspace)")
}

/// Sets up `command`'s environment for the simulator running `scenario`, with the GPU lease
/// table in `runtime` (none set when `None`), and nothing inherited that would change what
/// gpuproc sees.
pub fn sim_env(command: &mut Command, scenario: &str, runtime: Option<&Path>) {
    command
        .env("GPUPROC_NVML_LIB", sim_lib())
        .env("NVML_SIM_SCENARIO", scenario)
        .env_remove("NVML_SIM_STATE_DIR")
        .env_remove("NVML_SIM_DEVICE_NODES")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("CUDA_DEVICE_ORDER")
        .env_remove("NO_COLOR");
    match runtime {
        Some(dir) => command.env("GPUPROC_RUNTIME_DIR", dir),
        None => command.env_remove("GPUPROC_RUNTIME_DIR"),
    };
}

/// The `gpuproc` binary with [`sim_env`].
#[allow(dead_code)] // slurm.rs runs gpuproc through srun.
pub fn sim_gpuproc(scenario: &str, runtime: Option<&Path>) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gpuproc"));
    sim_env(&mut command, scenario, runtime);
    command
}

/// A fresh, empty directory named after the test file, this process and `name`.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "gpuproc-{}-{}-{name}",
        env!("CARGO_CRATE_NAME"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Sends `sig` to process `pid`, if there is one.
pub fn signal(pid: u32, sig: Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// Kills process group `pgid`, if there is one.
#[allow(dead_code)] // Only for tests that start process groups (not cli.rs).
pub fn kill_group(pgid: i32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pgid) {
        let _ = rustix::process::kill_process_group(pid, Signal::KILL);
    }
}

/// Runs `command` to completion with no standard input; see [`run_with`].
pub fn run(command: Command) -> Output {
    run_with(command, Stdio::null())
}

/// Runs `command` to completion with `stdin`, killing it if it outlives [`DEADLINE`].
pub fn run_with(command: Command, stdin: Stdio) -> Output {
    run_with_pid(command, stdin).1
}

/// [`run_with`], also giving the pid the command ran as.
pub fn run_with_pid(mut command: Command, stdin: Stdio) -> (u32, Output) {
    let child = command
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
    (child.id(), wait_output(child, &format!("{command:?}")))
}

/// Waits for `child` and collects its output. If it outlives [`DEADLINE`], kills it, gives
/// it a moment to be reaped, and panics naming it `what`.
pub fn wait_output(child: Child, what: &str) -> Output {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(output) => output.expect("wait for child"),
        Err(_) => {
            signal(pid, Signal::KILL);
            let _ = rx.recv_timeout(REAP);
            panic!("{what} did not finish within {DEADLINE:?}");
        }
    }
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Lines of a child's pipe, as they come.
#[allow(dead_code)] // Only for `Background`, which cli.rs does not use.
fn lines(pipe: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A process running in the background: its output arrives line by line on channels.
/// Dropping it (unless it has been waited for) closes its standard input, kills it (with its
/// process group when it has its own) and reaps it, so that no test leaves processes behind,
/// even when it fails.
#[allow(dead_code)] // cli.rs has no background processes.
pub struct Background {
    child: Child,
    /// Open (when piped) until [`finish`](Self::finish) or until set to `None`.
    pub stdin: Option<ChildStdin>,
    pub stdout: Receiver<String>,
    stderr: Receiver<String>,
    /// Standard error read so far and not yet returned by [`stderr`](Self::stderr).
    seen_stderr: String,
    own_group: bool,
    reaped: bool,
}

#[allow(dead_code)] // Each of pick.rs and run.rs uses only some of these; cli.rs none.
impl Background {
    /// Starts `command` with its standard input piped, in this process group.
    pub fn start(command: Command) -> Background {
        Self::spawn(command, false)
    }

    /// Starts `command` with no standard input, in a process group of its own.
    pub fn start_in_group(command: Command) -> Background {
        Self::spawn(command, true)
    }

    fn spawn(mut command: Command, own_group: bool) -> Background {
        use std::os::unix::process::CommandExt;
        if own_group {
            command.stdin(Stdio::null()).process_group(0);
        } else {
            command.stdin(Stdio::piped());
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
        let stdout = lines(child.stdout.take().expect("stdout"));
        let stderr = lines(child.stderr.take().expect("stderr"));
        Background {
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            seen_stderr: String::new(),
            own_group,
            reaped: false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next line of standard output; `None` at its end.
    pub fn line(&self) -> Option<String> {
        match self.stdout.recv_timeout(DEADLINE) {
            Ok(line) => Some(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("no output within {DEADLINE:?}"),
        }
    }

    /// Reads standard error until a line contains `needle`, and returns that line.
    pub fn stderr_until(&mut self, needle: &str) -> String {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.seen_stderr.push_str(&line);
                    self.seen_stderr.push('\n');
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "{needle:?} not on stderr within {DEADLINE:?} ({e}):\n{}",
                    self.seen_stderr
                ),
            }
        }
    }

    /// All of standard error not returned before (call it after the process has exited).
    pub fn stderr(&mut self) -> String {
        let mut all = std::mem::take(&mut self.seen_stderr);
        while let Ok(line) = self.stderr.recv_timeout(DEADLINE) {
            all.push_str(&line);
            all.push('\n');
        }
        all
    }

    /// Closes standard input (ending a waiting command) and waits for the exit.
    pub fn finish(&mut self) -> ExitStatus {
        self.stdin = None;
        self.wait()
    }

    /// Waits for the exit; kills and reaps the process if it outlives [`DEADLINE`].
    pub fn wait(&mut self) -> ExitStatus {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.reaped = true;
                return status;
            }
            if Instant::now() >= end {
                self.kill();
                let _ = self.child.wait();
                self.reaped = true;
                panic!("process {} did not exit within {DEADLINE:?}", self.pid());
            }
            // Polling a child's status has no blocking form with a timeout in std.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn kill(&mut self) {
        if self.own_group {
            kill_group(self.pid() as i32);
        } else {
            let _ = self.child.kill();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stdin = None;
        if !self.reaped {
            self.kill();
            let _ = self.child.wait();
        }
    }
}

/// Holds the GPU lease table's lock (`flock` on `leases.lock` in `runtime`) until dropped,
/// as a picker does while it reads and writes the table.
#[allow(dead_code)] // Only run.rs holds the lock.
pub fn lock_table(runtime: &Path) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    let path = runtime.join("leases.lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o666)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let end = Instant::now() + DEADLINE;
    loop {
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return file,
            Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < end => {
                // flock has no blocking form with a timeout.
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("lock {}: {e}", path.display()),
        }
    }
}

/// Creates a FIFO at `path`.
#[allow(dead_code)] // Only run.rs makes FIFOs.
pub fn mkfifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap_or_else(|e| panic!("mkfifo {}: {e}", path.display()));
}

/// The processes whose parent is `pid`.
#[allow(dead_code)] // Only run.rs looks for children.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = stat.rsplit_once(')')?.1;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}
