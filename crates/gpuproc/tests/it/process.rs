//! `Process`: results, errors, faults and clean-up, with every start method.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use gpuproc::{Process, ProcessError, StartMethod};
use serde::{Deserialize, Deserializer, Serialize};

use crate::support::{self, Fd, TIMEOUT};

/// A process with the given start method, allowed to fork this multi-threaded test binary.
fn with<A, R>(method: StartMethod, f: fn(A) -> R, a: A) -> Process<A, R>
where
    A: Serialize + serde::de::DeserializeOwned,
    R: Serialize + serde::de::DeserializeOwned,
{
    Process::new(f, a)
        .with_start_method(method)
        .allow_fork_with_threads(true)
}

fn run<A, R>(method: StartMethod, f: fn(A) -> R, a: A) -> Result<R, ProcessError>
where
    A: Serialize + serde::de::DeserializeOwned,
    R: Serialize + serde::de::DeserializeOwned,
{
    let mut p = with(method, f, a);
    p.start()?;
    p.join_timeout(TIMEOUT)
}

fn square(x: u64) -> u64 {
    x * x
}

#[test]
fn returns_the_result_with_every_start_method() {
    for m in StartMethod::all() {
        assert_eq!(run(m, square, 12).unwrap(), 144, "{m:?}");
        let words = run(
            m,
            |s: String| s.split(' ').map(str::to_owned).collect::<Vec<_>>(),
            "a b c".into(),
        );
        assert_eq!(words.unwrap(), ["a", "b", "c"], "{m:?}");
    }
}

#[test]
fn tuple_arguments_and_large_values() {
    fn add((a, b): (i32, i32)) -> i32 {
        a + b
    }
    fn echo(v: Vec<u8>) -> Vec<u8> {
        v
    }
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    for m in StartMethod::all() {
        assert_eq!(run(m, add, (40, 2)).unwrap(), 42);
        assert_eq!(run(m, echo, big.clone()).unwrap(), big, "{m:?}");
    }
}

#[test]
fn a_panic_comes_back_with_message_and_location() {
    fn boom(n: u32) -> u32 {
        if n > 0 {
            panic!("boom number {n}");
        }
        n
    }
    for m in StartMethod::all() {
        let err = run(m, boom, 7).unwrap_err();
        assert!(err.is_panic(), "{m:?}: {err}");
        assert_eq!(err.panic_message(), Some("boom number 7"));
        let ProcessError::Panicked { location, .. } = &err else {
            unreachable!()
        };
        assert!(
            location.as_deref().unwrap().contains("tests/it/process.rs"),
            "{location:?}"
        );
        assert!(err.to_string().contains("boom number 7"));
    }
}

#[test]
fn exit_code_is_an_error_that_says_which() {
    fn exit3(_: ()) {
        std::process::exit(3)
    }
    for m in StartMethod::all() {
        let mut p = with(m, exit3, ());
        p.start().unwrap();
        let err = p.join_timeout(TIMEOUT).unwrap_err();
        assert!(
            matches!(err, ProcessError::Exited { code: 3, .. }),
            "{m:?}: {err}"
        );
        assert_eq!(err.exitcode(), Some(3));
        assert_eq!(p.exitcode(), Some(3));
        assert!(err.to_string().contains("exited with code 3"));
    }
}

fn sleeper(_: ()) {
    support::block_forever()
}

#[test]
fn sigkill_during_join_returns_at_once() {
    for m in StartMethod::all() {
        let mut p = with(m, sleeper, ());
        p.start().unwrap();
        let pid = p.pid().unwrap();
        let killer = std::thread::spawn(move || {
            // SAFETY: a plain system call.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        });
        let err = p.join_timeout(TIMEOUT).unwrap_err();
        killer.join().unwrap();
        assert!(err.is_killed(), "{m:?}: {err}");
        assert_eq!(err.signal(), Some(9));
        assert_eq!(p.exitcode(), Some(-9));
        assert!(err.to_string().contains("SIGKILL"), "{err}");
    }
}

#[test]
fn terminate_and_kill_follow_python_exitcodes() {
    for m in StartMethod::all() {
        let mut p = with(m, sleeper, ());
        p.start().unwrap();
        assert!(p.is_alive());
        assert_eq!(p.exitcode(), None);
        p.terminate().unwrap();
        let err = p.join_timeout(TIMEOUT).unwrap_err();
        assert_eq!(err.signal(), Some(15), "{m:?}: {err}");
        assert_eq!(p.exitcode(), Some(-15));
        assert!(!p.is_alive());

        let mut p = with(m, sleeper, ());
        p.start().unwrap();
        p.kill().unwrap();
        assert_eq!(p.join_timeout(TIMEOUT).unwrap_err().exitcode(), Some(-9));
    }
}

#[test]
fn join_timeout_expires_while_the_child_runs_on() {
    for m in StartMethod::all() {
        let mut p = with(m, sleeper, ());
        p.start().unwrap();
        let err = p.join_timeout(Duration::from_millis(50)).unwrap_err();
        assert!(err.is_timeout(), "{m:?}: {err}");
        assert!(p.is_alive(), "the child must run on after a timeout");
        p.kill().unwrap();
        assert!(p.join_timeout(TIMEOUT).unwrap_err().is_killed());
    }
}

#[test]
fn join_twice_and_start_twice_are_errors() {
    for m in StartMethod::all() {
        let mut p = with(m, square, 3);
        assert!(matches!(p.join(), Err(ProcessError::NotStarted { .. })));
        p.start().unwrap();
        assert!(matches!(
            p.start(),
            Err(ProcessError::AlreadyStarted { .. })
        ));
        assert_eq!(p.join_timeout(TIMEOUT).unwrap(), 9);
        let again = p.join_timeout(TIMEOUT).unwrap_err();
        assert!(
            matches!(again, ProcessError::AlreadyJoined { .. }),
            "{again}"
        );
        assert!(matches!(
            p.start(),
            Err(ProcessError::AlreadyStarted { .. })
        ));
    }
}

/// Serialises as any `u32`, but only even values deserialise: the child's decoding fails.
#[derive(Debug, Serialize)]
struct Even(u32);

impl<'de> Deserialize<'de> for Even {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u32::deserialize(d)?;
        if v % 2 == 0 {
            Ok(Even(v))
        } else {
            Err(serde::de::Error::custom(format!("{v} is odd")))
        }
    }
}

#[test]
fn an_argument_that_fails_to_decode_names_its_type() {
    fn half(e: Even) -> u32 {
        e.0 / 2
    }
    // Fork hands the value over in memory, so only the methods that decode are concerned.
    for m in [StartMethod::ForkServer, StartMethod::Spawn] {
        assert_eq!(run(m, half, Even(8)).unwrap(), 4);
        let err = run(m, half, Even(7)).unwrap_err();
        match &err {
            ProcessError::BadArgument {
                type_name, reason, ..
            } => {
                assert!(type_name.ends_with("Even"), "{type_name}");
                assert!(reason.contains("rejected the value"), "{reason}");
            }
            other => panic!("{m:?}: unexpected {other}"),
        }
        assert!(err.to_string().contains("Even"));
    }
}

#[test]
fn fork_is_refused_in_a_multi_threaded_parent() {
    let mut p = Process::new(square, 2).with_start_method(StartMethod::Fork);
    let err = p.start().unwrap_err();
    assert!(
        matches!(err, ProcessError::ForkUnsafe { threads } if threads > 1),
        "{err}"
    );
    assert!(err.to_string().contains("ForkServer"));
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Seen {
    name: String,
    pid: u32,
    parent_pid: Option<u32>,
    parent_name: Option<String>,
    env: Option<String>,
}

fn who_am_i(_: ()) -> Seen {
    let me = gpuproc::current_process();
    let parent = gpuproc::parent_process();
    Seen {
        name: me.name,
        pid: me.pid,
        parent_pid: parent.as_ref().map(|p| p.pid),
        parent_name: parent.map(|p| p.name),
        env: std::env::var("GPUPROC_TEST_VALUE").ok(),
    }
}

#[test]
fn current_and_parent_process_inside_the_child() {
    assert_eq!(gpuproc::current_process().name, "MainProcess");
    assert!(gpuproc::parent_process().is_none());
    for m in StartMethod::all() {
        let mut p = with(m, who_am_i, ())
            .with_name("worker-a")
            .with_env("GPUPROC_TEST_VALUE", "42");
        p.start().unwrap();
        let pid = p.pid();
        let seen = p.join_timeout(TIMEOUT).unwrap();
        assert_eq!(
            seen,
            Seen {
                name: "worker-a".into(),
                pid: pid.unwrap(),
                parent_pid: Some(std::process::id()),
                parent_name: Some("MainProcess".into()),
                env: Some("42".into()),
            },
            "{m:?}"
        );
    }
}

#[test]
fn default_names_count_up() {
    let a = Process::new(square, 1);
    let b = Process::new(square, 1);
    let n = |p: &Process<u64, u64>| {
        p.name()
            .strip_prefix("Process-")
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    assert!(n(&b) > n(&a));
}

#[test]
fn active_children_lists_running_children() {
    let mut p = Process::new(sleeper, ()).with_name("listed-child");
    p.start().unwrap();
    let pid = p.pid().unwrap();
    assert!(gpuproc::active_children()
        .iter()
        .any(|c| c.pid == pid && c.name == "listed-child"));
    p.kill().unwrap();
    let _ = p.join_timeout(TIMEOUT);
    assert!(!gpuproc::active_children().iter().any(|c| c.pid == pid));
}

fn no_grandchildren(_: ()) -> String {
    let mut p = Process::new(square, 2);
    match p.start() {
        Ok(()) => "started".into(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn daemonic_processes_may_not_have_children() {
    let mut p = Process::new(no_grandchildren, ()).with_daemon(true);
    p.start().unwrap();
    assert_eq!(
        p.join_timeout(TIMEOUT).unwrap(),
        "daemonic processes are not allowed to have children"
    );
}

fn nested(n: u64) -> (u64, String) {
    let mut p = Process::new(square, n);
    p.start().unwrap();
    (p.join_timeout(TIMEOUT).unwrap(), p.name().to_string())
}

#[test]
fn children_can_start_children() {
    for m in StartMethod::all() {
        let mut p = with(m, nested, 5).with_name("Process-77");
        p.start().unwrap();
        let (v, grandchild_name) = p.join_timeout(TIMEOUT).unwrap();
        assert_eq!(v, 25);
        assert_eq!(grandchild_name, "Process-77:1");
    }
}

#[test]
fn dropping_a_running_process_kills_and_reaps_it() {
    for m in StartMethod::all() {
        let mut p = with(m, sleeper, ());
        p.start().unwrap();
        let pid = p.pid().unwrap();
        drop(p);
        let left = support::wait_all_ended(&[pid], Instant::now() + TIMEOUT);
        assert!(left.is_empty(), "{m:?}: {pid} still running after drop");
    }
}

#[test]
fn two_hundred_processes_leave_no_zombies_or_descriptors() {
    for m in StartMethod::all() {
        // Warm up: the fork server and any lazily opened descriptors exist from here on.
        assert_eq!(run(m, square, 1).unwrap(), 1);
        let fds_before = support::open_fds();
        for i in 0..200u64 {
            assert_eq!(run(m, square, i).unwrap(), i * i);
        }
        let fds_after = support::open_fds();
        // Other tests run in parallel threads and open descriptors of their own; allow for
        // them, but not for one leaked descriptor per process.
        assert!(
            fds_after < fds_before + 50,
            "{m:?}: {fds_before} fds before, {fds_after} after"
        );
        let zombies: Vec<u32> = support::zombie_children();
        assert!(zombies.len() < 10, "{m:?}: zombies left: {zombies:?}");
    }
}

/// The middle process of the orphan test: starts one child per start method, each of which
/// reports `pid ppid` on the pipe and blocks; then reports its own pid and blocks too.
fn middle(pipe: Fd) {
    fn report_and_block(pipe: Fd) {
        let line = format!(
            "{} {}",
            std::process::id(),
            std::os::unix::process::parent_id()
        );
        support::write_line(pipe.0.as_fd(), &line);
        support::block_forever()
    }
    let mut children = Vec::new();
    for m in StartMethod::all() {
        let dup = Fd(pipe.0.try_clone().unwrap());
        let mut p = with(m, report_and_block, dup);
        p.start().unwrap();
        children.push(p);
    }
    support::write_line(pipe.0.as_fd(), &format!("{}", std::process::id()));
    support::block_forever()
}

#[test]
fn killing_the_parent_kills_every_child_and_the_fork_server() {
    let (read, write) = support::pipe();
    // Spawn gives the middle process a fresh image of its own, with its own fork server.
    let mut mid = Process::new(middle, Fd(write)).with_start_method(StartMethod::Spawn);
    mid.start().unwrap();
    let mid_pid = mid.pid().unwrap();
    let lines = support::read_lines(&read, 4);
    let mut pids: Vec<u32> = Vec::new();
    for line in &lines {
        for field in line.split(' ') {
            pids.push(field.parse().unwrap());
        }
    }
    pids.sort();
    pids.dedup();
    // The middle process, its three children, and the fork server (one child's parent).
    assert_eq!(pids.len(), 5, "{lines:?}");
    pids.retain(|&p| p != mid_pid);

    let killed_at = Instant::now();
    mid.kill().unwrap();
    let left = support::wait_all_ended(&pids, killed_at + Duration::from_secs(2));
    assert!(
        left.is_empty(),
        "still running 2 s after the parent was killed: {left:?}"
    );
    assert!(mid.join_timeout(TIMEOUT).unwrap_err().is_killed());
}

fn os_parent(_: ()) -> u32 {
    std::os::unix::process::parent_id()
}

#[test]
fn a_killed_fork_server_is_replaced_and_reaped() {
    // A fork-server child's operating-system parent is the server.
    let server = run(StartMethod::ForkServer, os_parent, ()).unwrap();
    assert_ne!(server, std::process::id());
    // SAFETY: a plain system call on our own fork server.
    unsafe { libc::kill(server as i32, libc::SIGKILL) };
    assert!(support::wait_all_ended(&[server], Instant::now() + TIMEOUT).is_empty());
    // The next start notices, reaps the old server and starts a new one.
    assert_eq!(run(StartMethod::ForkServer, square, 5).unwrap(), 25);
    let replacement = run(StartMethod::ForkServer, os_parent, ()).unwrap();
    assert_ne!(replacement, server);
    assert!(
        !support::zombie_children().contains(&server),
        "the dead server was not reaped"
    );
}

#[test]
fn a_panicking_child_exits_with_code_1_as_python() {
    fn boom(_: ()) {
        panic!("boom")
    }
    for m in StartMethod::all() {
        let mut p = with(m, boom, ());
        p.start().unwrap();
        let err = p.join_timeout(TIMEOUT).unwrap_err();
        assert!(err.is_panic(), "{m:?}: {err}");
        assert_eq!(p.exitcode(), Some(1), "{m:?}");
    }
}

fn methods_seen(_: ()) -> (String, String) {
    fn mine(_: ()) -> String {
        gpuproc::get_start_method().name().to_string()
    }
    // The grandchild uses this child's default: the method that started it.
    let mut p = Process::new(mine, ());
    p.start().unwrap();
    let grandchild = p.join_timeout(TIMEOUT).unwrap();
    (gpuproc::get_start_method().name().to_string(), grandchild)
}

#[test]
fn children_inherit_the_start_method_that_started_them() {
    for m in StartMethod::all() {
        let mut p = with(m, methods_seen, ());
        p.start().unwrap();
        let (child, grandchild) = p.join_timeout(TIMEOUT).unwrap();
        assert_eq!(child, m.name(), "{m:?}");
        assert_eq!(grandchild, m.name(), "{m:?}");
    }
}

/// The calling thread's kernel id.
fn gettid() -> i64 {
    // SAFETY: a plain system call without arguments.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

/// Waits (bounded by `TIMEOUT`) until thread `tid` of this process is blocked in `poll`.
fn wait_until_polling(tid: i64) {
    let deadline = Instant::now() + TIMEOUT;
    let path = format!("/proc/self/task/{tid}/syscall");
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let nr: i64 = text
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(-1);
        #[cfg(target_arch = "x86_64")]
        let polling = nr == libc::SYS_ppoll || nr == libc::SYS_poll;
        #[cfg(not(target_arch = "x86_64"))]
        let polling = nr == libc::SYS_ppoll;
        if polling {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "thread {tid} never polled: {text}"
        );
        std::thread::yield_now();
    }
}

#[test]
fn active_children_answers_while_another_thread_joins() {
    let mut p = Process::new(sleeper, ()).with_name("joined-elsewhere");
    p.start().unwrap();
    let pid = p.pid().unwrap();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let joiner = std::thread::spawn(move || {
        tid_tx.send(gettid()).unwrap();
        p.join_timeout(TIMEOUT).unwrap_err()
    });
    wait_until_polling(tid_rx.recv_timeout(TIMEOUT).unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(gpuproc::active_children());
    });
    let listed = rx.recv_timeout(Duration::from_secs(10));
    // SAFETY: a plain system call on our own child.
    unsafe { libc::kill(i32::try_from(pid).unwrap(), libc::SIGKILL) };
    assert!(joiner.join().unwrap().is_killed());
    let listed = listed.expect("active_children() blocked while another thread joined");
    assert!(listed.iter().any(|c| c.pid == pid), "{listed:?}");
}

#[test]
fn an_unrelated_child_fd_variable_is_not_adopted() {
    // A GPUPROC_CHILD_FD inherited from elsewhere names a descriptor that is not a gpuproc
    // socket (here /dev/null): the program must run as itself, not adopt it as a parent.
    let exe = std::env::current_exe().unwrap();
    let child = std::process::Command::new(exe)
        .args(["--list", "an_unrelated_child_fd_variable_is_not_adopted"])
        .env("GPUPROC_CHILD_FD", "0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let reader = std::thread::spawn(move || child.wait_with_output().unwrap());
    if !support::wait_all_ended(&[pid], Instant::now() + TIMEOUT).is_empty() {
        // SAFETY: a plain system call on our own child.
        unsafe { libc::kill(i32::try_from(pid).unwrap(), libc::SIGKILL) };
    }
    let out = reader.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("an_unrelated_child_fd_variable_is_not_adopted"),
        "{stdout}"
    );
    assert!(stderr.contains("ignoring GPUPROC_CHILD_FD"), "{stderr}");
}

fn server_pid() -> u32 {
    run(StartMethod::ForkServer, os_parent, ()).unwrap()
}

fn fork_server_grandchild(x: u64) -> u64 {
    let mut p = Process::new(square, x).with_start_method(StartMethod::ForkServer);
    p.start().unwrap();
    p.join_timeout(TIMEOUT).unwrap()
}

#[test]
fn no_lock_is_held_while_the_fork_server_answers() {
    let server = server_pid();
    let server_raw = i32::try_from(server).unwrap();
    // A stopped server answers nobody: a start waits for its reply.
    // SAFETY: plain system calls on our own fork server.
    unsafe { libc::kill(server_raw, libc::SIGSTOP) };
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let waiting = std::thread::spawn(move || {
        tid_tx.send(gettid()).unwrap();
        run(StartMethod::ForkServer, square, 6)
    });
    wait_until_polling(tid_rx.recv_timeout(TIMEOUT).unwrap());
    // A child forked now would inherit a held lock, and hang on its first fork-server start.
    let mut p = with(StartMethod::Fork, fork_server_grandchild, 4);
    p.start().unwrap();
    let forked = p.join_timeout(TIMEOUT);
    // SAFETY: as above.
    unsafe { libc::kill(server_raw, libc::SIGCONT) };
    assert_eq!(waiting.join().unwrap().unwrap(), 36);
    assert_eq!(forked.unwrap(), 16);
}

fn own_comm(_: ()) -> String {
    std::fs::read_to_string("/proc/self/comm")
        .unwrap()
        .trim_end()
        .to_string()
}

#[test]
fn children_and_the_fork_server_carry_process_names() {
    for m in StartMethod::all() {
        let mut p = with(m, own_comm, ()).with_name("a-very-long-worker-name");
        p.start().unwrap();
        assert_eq!(p.join_timeout(TIMEOUT).unwrap(), "a-very-long-wor", "{m:?}");
        assert_eq!(run(m, own_comm, ()).unwrap(), "gpuproc-worker", "{m:?}");
    }
    let server = server_pid();
    let comm = std::fs::read_to_string(format!("/proc/{server}/comm")).unwrap();
    assert_eq!(comm.trim_end(), "gpuproc-forksrv");
}

static ATEXIT_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn atexit_writes() {
    let fd = ATEXIT_FD.load(std::sync::atomic::Ordering::SeqCst);
    // SAFETY: writes one byte from a static buffer to a descriptor this process owns.
    unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) };
}

/// Registers an atexit handler that writes to `pipe`, starts a thread that would write to
/// it once released (never), and returns at once.
fn leave_work_behind(pipe: Fd) -> u32 {
    use std::os::fd::IntoRawFd;
    let raw = pipe.0.into_raw_fd();
    ATEXIT_FD.store(raw, std::sync::atomic::Ordering::SeqCst);
    // SAFETY: registers a plain extern "C" function.
    unsafe { libc::atexit(atexit_writes) };
    std::thread::spawn(move || {
        std::thread::park();
        atexit_writes();
    });
    7
}

#[test]
fn a_returning_target_ends_its_child_without_atexit_handlers_or_other_threads() {
    use std::io::Read as _;
    for m in StartMethod::all() {
        let (read, write) = support::pipe();
        let mut p = with(m, leave_work_behind, Fd(write));
        p.start().unwrap();
        assert_eq!(p.join_timeout(TIMEOUT).unwrap(), 7, "{m:?}");
        assert_eq!(p.exitcode(), Some(0), "{m:?}");
        // Every write end is closed (the child ended, its thread with it) and nothing was
        // written: the atexit handler did not run.
        assert!(support::readable_before(
            read.as_fd(),
            Instant::now() + TIMEOUT
        ));
        let mut got = Vec::new();
        std::fs::File::from(read).read_to_end(&mut got).unwrap();
        assert!(got.is_empty(), "{m:?}: {got:?}");
    }
}

/// Reports its OS parent and whether SIGINT is ignored, then returns `x` once a byte comes
/// (or, for `x` over 1000, exits with code `x - 1000`).
fn report_then_wait(args: (Fd, Fd, u64)) -> u64 {
    let (report, go, x) = args;
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let ignored = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .unwrap();
    let sigint_ignored = ignored & (1 << (libc::SIGINT - 1)) != 0;
    support::write_line(
        report.0.as_fd(),
        &format!("{} {sigint_ignored}", std::os::unix::process::parent_id()),
    );
    let mut byte = [0u8; 1];
    // SAFETY: reads into a valid one-byte buffer from a descriptor we own.
    unsafe {
        libc::read(
            std::os::fd::AsRawFd::as_raw_fd(&go.0),
            byte.as_mut_ptr().cast(),
            1,
        )
    };
    if x > 1000 {
        std::process::exit(i32::try_from(x - 1000).unwrap());
    }
    x
}

/// Starts `report_then_wait(x)` with the fork server, kills the server while it waits, lets
/// it go on, and joins it.
#[test]
fn a_child_killed_with_its_fork_server_is_reported() {
    let (report_r, report_w) = support::pipe();
    let (go_r, _go_w) = support::pipe();
    let mut p = with(
        StartMethod::ForkServer,
        report_then_wait,
        (Fd(report_w), Fd(go_r), 42),
    );
    p.start().unwrap();
    let child = p.pid().unwrap();
    let line = support::read_lines(&report_r, 1).remove(0);
    let (server, sigint_ignored) = line.split_once(' ').unwrap();
    assert_eq!(sigint_ignored, "false", "the child must get SIGINT back");
    let server: u32 = server.parse().unwrap();
    assert_ne!(server, std::process::id());
    // SAFETY: a plain system call on our own fork server.
    unsafe { libc::kill(i32::try_from(server).unwrap(), libc::SIGKILL) };
    // The child dies with its server, and its parent is told how, not left guessing.
    assert!(support::wait_all_ended(&[server, child], Instant::now() + TIMEOUT).is_empty());
    let err = p.join_timeout(TIMEOUT).unwrap_err();
    assert!(matches!(err, ProcessError::ForkServer { .. }), "{err:?}");
    assert!(format!("{err:?}").contains("SIGKILL"), "{err:?}");
    assert_eq!(p.exitcode(), Some(-9));
    // The next process gets a new fork server.
    assert_eq!(run(StartMethod::ForkServer, square, 4).unwrap(), 16);
}

#[test]
fn the_fork_server_ignores_sigint() {
    let server = server_pid();
    // SAFETY: a plain system call on our own fork server.
    unsafe { libc::kill(i32::try_from(server).unwrap(), libc::SIGINT) };
    // A signal is delivered before the server runs on: if it had ended it, this request
    // would go to a new server.
    assert_eq!(server_pid(), server);
    assert!(!support::has_ended(server));
}

#[test]
fn a_target_in_another_shared_object_is_refused() {
    // A function of the C library, a shared object of its own, typed as a target. It is
    // never called: the refusal comes before any child exists.
    // SAFETY: only the address is used (compared with the loaded objects' ranges); the
    // pointer is never called through this type.
    let foreign: fn(i32) -> i32 =
        unsafe { std::mem::transmute::<*const (), fn(i32) -> i32>(libc::abs as *const ()) };
    for m in [StartMethod::ForkServer, StartMethod::Spawn] {
        let mut p = with(m, foreign, -3);
        let err = p.start().unwrap_err();
        assert!(
            matches!(err, ProcessError::ForeignTarget { .. }),
            "{m:?}: {err}"
        );
        assert!(err.to_string().contains("another loaded object"), "{err}");
        assert!(p.pid().is_none());
    }
}
