//! Helpers shared by the integration tests: timeouts, /proc inspection, pipes.

use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use gpuproc::{Process, StartMethod};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize, Serializer};

/// The longest any single blocking step of a test may take.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// A started process with the given start method (forking this multi-threaded binary allowed).
pub fn start<A, R>(method: StartMethod, f: fn(A) -> R, a: A) -> Process<A, R>
where
    A: Serialize + DeserializeOwned,
    R: Serialize + DeserializeOwned,
{
    let mut p = Process::new(f, a)
        .with_start_method(method)
        .allow_fork_with_threads(true);
    p.start().unwrap();
    p
}

/// Waits until `fd` is readable or `deadline` passes; whether it became readable.
pub fn readable_before(fd: BorrowedFd<'_>, deadline: Instant) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = deadline
        .saturating_duration_since(Instant::now())
        .as_millis()
        .min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd, for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

/// The children of this process that are zombies (ended, not reaped).
pub fn zombie_children() -> Vec<u32> {
    let me = std::process::id();
    let mut zombies = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name (which may contain spaces) start after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 1 && fields[0] == "Z" && fields[1].parse::<u32>().ok() == Some(me) {
            zombies.push(pid);
        }
    }
    zombies
}

/// The number of open file descriptors of this process.
pub fn open_fds() -> usize {
    fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Whether process `pid` has ended (it is gone, or a zombie).
pub fn has_ended(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().next() == Some("Z"))
            .unwrap_or(true),
    }
}

/// Waits until every process in `pids` has ended; returns those still running at `deadline`.
/// Uses pidfds, so it wakes as soon as each one ends rather than polling.
pub fn wait_all_ended(pids: &[u32], deadline: Instant) -> Vec<u32> {
    let mut left = Vec::new();
    for &pid in pids {
        // SAFETY: a plain system call with no memory arguments.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0) };
        if fd < 0 {
            continue; // already gone
        }
        // SAFETY: pidfd_open returned a new descriptor that we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        if !readable_before(fd.as_fd(), deadline) && !has_ended(pid) {
            left.push(pid);
        }
    }
    left
}

/// A pipe end that can be passed to a child as (part of) its argument.
#[derive(Debug, Serialize, Deserialize)]
pub struct Fd(
    #[serde(
        serialize_with = "ser_fd",
        deserialize_with = "gpuproc::deserialize_fd"
    )]
    pub OwnedFd,
);

fn ser_fd<S: Serializer>(fd: &OwnedFd, s: S) -> Result<S::Ok, S::Error> {
    gpuproc::serialize_fd(fd.as_fd(), s)
}

/// A pipe: (read end, write end).
pub fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 succeeded, so both are new descriptors that we own.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Writes a line to a pipe end.
pub fn write_line(fd: BorrowedFd<'_>, line: &str) {
    let bytes = format!("{line}\n");
    // SAFETY: writes from a valid buffer to a valid descriptor.
    let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    assert_eq!(n as usize, bytes.len());
}

/// Reads `n` lines from a pipe, failing the test if they do not arrive before `TIMEOUT`.
pub fn read_lines(fd: &OwnedFd, n: usize) -> Vec<String> {
    let deadline = Instant::now() + TIMEOUT;
    let mut text = String::new();
    let mut file = fs::File::from(fd.try_clone().unwrap());
    while text.lines().count() < n {
        assert!(
            readable_before(fd.as_fd(), deadline),
            "timed out waiting for {n} lines, got {text:?}"
        );
        let mut buf = [0u8; 4096];
        let got = file.read(&mut buf).unwrap();
        assert!(got > 0, "pipe closed after {text:?}, wanted {n} lines");
        text.push_str(std::str::from_utf8(&buf[..got]).unwrap());
    }
    text.lines().map(str::to_string).collect()
}

/// Blocks the calling process for ever (until it is killed).
pub fn block_forever() -> ! {
    loop {
        std::thread::park();
    }
}

/// Runs a built example (cargo builds examples before integration tests) with a timeout.
pub fn run_example(name: &str) -> Output {
    run_example_with_args(name, &[])
}

/// [`run_example`] with command-line arguments.
pub fn run_example_with_args(name: &str, args: &[&str]) -> Output {
    let exe = std::env::current_exe().unwrap();
    let dir: PathBuf = exe.parent().unwrap().parent().unwrap().join("examples");
    let path = dir.join(name);
    assert!(path.exists(), "{} is not built", path.display());
    let child = Command::new(&path)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let reader = std::thread::spawn(move || child.wait_with_output().unwrap());
    let left = wait_all_ended(&[pid], Instant::now() + TIMEOUT);
    if !left.is_empty() {
        // SAFETY: a plain system call on our own child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        panic!("example {name} did not finish within {TIMEOUT:?}");
    }
    let out = reader.join().unwrap();
    assert!(
        out.status.success(),
        "{name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout_lines(out: &Output) -> Vec<String> {
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}
