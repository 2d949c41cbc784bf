//! Pools whose workers are started by a launcher: a command line (here `env`, standing in
//! for `ssh host`) and Slurm steps on the project's local cluster (`scripts/slurm-local`).

use std::time::{Duration, Instant};

use gpuproc::channel::Queue;
use gpuproc::{Launcher, Pool, Slurm};

use crate::support::TIMEOUT;

/// Runs `f` on another thread, failing the test if it takes longer than [`TIMEOUT`].
fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(TIMEOUT)
        .expect("the call returned within the timeout (and did not panic)")
}

/// The pids of this user's processes running as remote pool workers.
fn remote_workers() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
            (!zombie && cmd.split(|&b| b == 0).any(|a| a == b"--gpuproc-worker")).then_some(pid)
        })
        .collect()
}

/// Waits (with a deadline) until no remote worker is left; returns those still there.
fn no_remote_workers_left() -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = remote_workers();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stand_in_for_ssh() -> Launcher {
    Launcher::command(["env", "GPUPROC_TEST_REMOTE=yes"])
        .connect_back_to("127.0.0.1")
        .start_timeout(Duration::from_secs(30))
}

/// Where a task ran: its pid, and whether it is a launched worker.
fn where_and_square(x: u64) -> (u32, Option<String>, u64) {
    (
        std::process::id(),
        std::env::var("GPUPROC_TEST_REMOTE").ok(),
        x * x,
    )
}

fn dies_on_5(x: u64) -> u64 {
    if x == 5 {
        // SAFETY: a plain system call on this process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    x * x
}

#[test]
fn workers_started_by_a_command_run_tasks_and_a_lost_one_fails_only_what_it_had_in_flight() {
    let (placed, outcomes) = within(|| {
        let pool = Pool::builder()
            .processes(2)
            .launcher(stand_in_for_ssh())
            .build()
            .unwrap();
        let placed = pool.map(where_and_square, 0..40u64).unwrap();
        let outcomes: Vec<Result<u64, String>> = pool
            .imap(dies_on_5, 0..20u64)
            .map(|r| r.map_err(|e| e.to_string()))
            .collect();
        // And the pool goes on with a replacement.
        assert_eq!(pool.map(dies_on_5, 6..9u64).unwrap(), [36, 49, 64]);
        pool.close();
        pool.join().unwrap();
        (placed, outcomes)
    });
    let squares: Vec<u64> = placed.iter().map(|p| p.2).collect();
    assert_eq!(squares, (0..40u64).map(|x| x * x).collect::<Vec<_>>());
    assert!(
        placed.iter().all(|p| p.1.as_deref() == Some("yes")),
        "every task ran in a launched worker"
    );
    let mut pids: Vec<u32> = placed.iter().map(|p| p.0).collect();
    pids.sort_unstable();
    pids.dedup();
    assert!(!pids.contains(&std::process::id()));
    // The worker running task 5 was lost with everything it had in flight: those tasks fail
    // with the node and the reason; every other task has its result.
    let e = outcomes[5].as_ref().unwrap_err();
    assert!(e.contains("task 5 was in flight on the worker on "), "{e}");
    assert!(e.contains("SIGKILL"), "{e}");
    for (x, r) in outcomes.iter().enumerate() {
        match r {
            Ok(sq) => assert_eq!(*sq, x as u64 * x as u64, "task {x}"),
            Err(e) => assert!(e.contains("was lost"), "task {x}: {e}"),
        }
    }
    assert_eq!(no_remote_workers_left(), Vec::<u32>::new());
}

fn put_one((q, x): (Queue<u64>, u64)) -> u64 {
    q.put(x).unwrap();
    x
}

fn keep(_: Queue<u64>) {}

#[test]
fn descriptors_cannot_go_to_remote_workers_and_the_refusal_names_the_type() {
    let e = Pool::builder()
        .processes(1)
        .launcher(stand_in_for_ssh())
        .initializer(keep, Queue::new().unwrap())
        .build()
        .unwrap_err();
    assert!(e.is_invalid(), "{e}");
    assert!(e.to_string().contains("cannot cross machines"), "{e}");

    let e = within(|| {
        let pool = Pool::builder()
            .processes(1)
            .launcher(stand_in_for_ssh())
            .build()
            .unwrap();
        let q = Queue::<u64>::new().unwrap();
        pool.apply(put_one, (q, 1)).unwrap_err()
    });
    let text = e.to_string();
    assert!(text.contains("Queue"), "{text}");
    assert!(text.contains("another machine"), "{text}");

    // Nor come back from one: the task fails, naming the type, and the worker goes on.
    let (e, after) = within(|| {
        let pool = Pool::builder()
            .processes(1)
            .launcher(stand_in_for_ssh())
            .build()
            .unwrap();
        let e = pool.apply(makes_a_queue, 1).unwrap_err();
        (e, pool.map(where_and_square, 0..3u64).unwrap())
    });
    let text = e.to_string();
    assert!(text.contains("Queue"), "{text}");
    assert!(text.contains("another machine"), "{text}");
    assert_eq!(after.iter().map(|r| r.2).collect::<Vec<_>>(), [0, 1, 4]);
    assert_eq!(no_remote_workers_left(), Vec::<u32>::new());
}

#[test]
fn a_launcher_that_cannot_start_workers_fails_the_tasks_with_its_reason() {
    let e = within(|| {
        let pool = Pool::builder()
            .processes(1)
            .launcher(Launcher::command(["false"]).connect_back_to("127.0.0.1"))
            .build()
            .unwrap();
        pool.map(where_and_square, 0..3u64).unwrap_err()
    });
    let text = e.to_string();
    assert!(text.contains("`false"), "{text}");
    assert!(text.contains("before the worker connected"), "{text}");
}

/// Whether the project's local Slurm cluster is up (`GPUPROC_SLURM=1`, as `scripts/test`
/// sets); fails when nobody said, skips when told there is none (`GPUPROC_SLURM=0`).
fn slurm_available() -> bool {
    match std::env::var("GPUPROC_SLURM").as_deref() {
        Ok("1") => true,
        Ok("0") => {
            println!("note: skipping: no local Slurm cluster on this machine (GPUPROC_SLURM=0)");
            false
        }
        _ => panic!(
            "the Slurm tests need the local cluster: eval \"$(scripts/slurm-local up)\" (or \
             GPUPROC_SLURM=0 to skip them)"
        ),
    }
}

/// The GPUs Slurm gave the worker, its step, and what `gpu::assigned()` makes of them:
/// the node, and the UUIDs of the devices CUDA would see.
fn gpus_of_step(_: u32) -> (Option<String>, Option<String>, u32, String, Vec<String>) {
    let env = |k: &str| std::env::var(k).ok();
    let assigned = gpuproc::gpu::assigned().expect("the simulator answers");
    (
        env("CUDA_VISIBLE_DEVICES"),
        env("SLURM_JOB_ID")
            .zip(env("SLURM_STEP_ID"))
            .map(|(j, s)| format!("{j}.{s}")),
        std::process::id(),
        assigned.hostname,
        assigned
            .devices
            .iter()
            .filter_map(|d| d.device.uuid.clone())
            .collect(),
    )
}

/// The simulator's 4-GPU scenario, for workers wherever they run (the environment goes
/// with the relay to `srun`, and with `srun` to the step).
fn simulated_gpus() -> Vec<(String, String)> {
    let lib = nvml_sim::library_path().expect("the NVML simulator is built");
    vec![
        (
            "GPUPROC_NVML_LIB".into(),
            lib.to_string_lossy().into_owned(),
        ),
        ("NVML_SIM_SCENARIO".into(), "4gpu".into()),
    ]
}

#[test]
fn workers_as_slurm_steps_each_get_their_own_gpu() {
    if !slurm_available() {
        return;
    }
    let got = within(|| {
        let mut builder = Pool::builder().processes(2);
        for (k, v) in simulated_gpus() {
            builder = builder.env(k, v);
        }
        let pool = builder
            .launcher(
                Launcher::slurm(Slurm::new().gpus(1).time("5"))
                    .connect_back_to("127.0.0.1")
                    .start_timeout(Duration::from_secs(30)),
            )
            .build()
            .unwrap();
        let got = pool.map_chunksize(gpus_of_step, 0..8u32, 1).unwrap();
        pool.close();
        pool.join().unwrap();
        got
    });
    let node = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    for (gpus, _, _, host, uuids) in &got {
        // gpu::assigned() names the node, and the one GPU Slurm bound, by its UUID.
        assert_eq!(host, &node);
        assert_eq!(uuids.len(), 1, "{gpus:?}: {uuids:?}");
    }
    let mut by_worker: Vec<(u32, String, String)> = got
        .into_iter()
        .map(|(gpus, step, pid, _, _)| {
            (
                pid,
                gpus.expect("Slurm set CUDA_VISIBLE_DEVICES"),
                step.expect("the worker runs in a Slurm step"),
            )
        })
        .collect();
    by_worker.sort();
    by_worker.dedup();
    let mut gpus: Vec<&String> = by_worker.iter().map(|w| &w.1).collect();
    gpus.dedup();
    assert_eq!(
        gpus.len(),
        by_worker.len(),
        "one GPU per worker: {by_worker:?}"
    );
    assert_eq!(no_remote_workers_left(), Vec::<u32>::new());
}

/// A copy of this executable whose GNU build id differs in one byte: the same code,
/// claiming another build.
fn copy_with_another_build_id() -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let mut exe = std::fs::read("/proc/self/exe").unwrap();
    // A note header: name size 4, descriptor size 20, type 3 (NT_GNU_BUILD_ID), "GNU\0".
    let header = [4, 0, 0, 0, 20, 0, 0, 0, 3, 0, 0, 0, b'G', b'N', b'U', 0];
    let at = exe[..exe.len().min(64 << 10)]
        .windows(header.len())
        .position(|w| w == header)
        .expect("this executable has a GNU build id")
        + header.len();
    exe[at] ^= 0xff;
    let path = std::env::temp_dir().join(format!("gpuproc-other-build-{}", std::process::id()));
    std::fs::write(&path, &exe).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn a_worker_from_another_build_is_refused_with_the_reason() {
    let other = copy_with_another_build_id();
    let shown = other.to_string_lossy().into_owned();
    let e = within(move || {
        let pool = Pool::builder()
            .processes(1)
            .launcher(
                // Runs the copy in place of this executable.
                Launcher::command(["sh", "-c", "shift; exec \"$0\" \"$@\"", &shown])
                    .connect_back_to("127.0.0.1"),
            )
            .build()
            .unwrap();
        pool.map(where_and_square, 0..2u64).unwrap_err()
    });
    let _ = std::fs::remove_file(&other);
    let text = e.to_string();
    assert!(text.contains("runs a different build"), "{text}");
    assert_eq!(no_remote_workers_left(), Vec::<u32>::new());
}

fn slurm_pool(workers: usize, job_name: &str) -> Pool {
    Pool::builder()
        .processes(workers)
        // Asked of Slurm with each step, as `Slurm::gpus(1)` would.
        .gpus_per_worker(1)
        .launcher(
            Launcher::slurm(Slurm::new().time("5").arg(format!("--job-name={job_name}")))
                .connect_back_to("127.0.0.1")
                .start_timeout(Duration::from_secs(30)),
        )
        .build()
        .unwrap()
}

/// The Slurm job ids with this name still known to the cluster, pending or running.
fn jobs_named(name: &str) -> Vec<String> {
    let out = std::process::Command::new("squeue")
        .args(["-h", "-o", "%A", "-t", "PD,R,CG", "-n", name])
        .output()
        .expect("squeue runs");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect()
}

fn no_jobs_named(name: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    loop {
        let left = jobs_named(name);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The task's worker's Slurm job, its square, and the worker's GPUs.
fn job_and_square(x: u64) -> (String, u64, String) {
    let env = |k| std::env::var(k).unwrap_or_default();
    (env("SLURM_JOB_ID"), x * x, env("CUDA_VISIBLE_DEVICES"))
}

#[test]
fn four_slurm_workers_map_ten_thousand_tasks_and_a_cancelled_step_fails_only_its_tasks() {
    if !slurm_available() {
        return;
    }
    let name = "gpuproc-it-remote-4";
    let (cancelled, outcomes) = within(move || {
        let pool = slurm_pool(4, name);
        let got = pool.map(job_and_square, 0..10_000u64).unwrap();
        assert!(got.iter().enumerate().all(|(x, r)| r.1 == (x * x) as u64));
        let mut jobs: Vec<&String> = got.iter().map(|r| &r.0).collect();
        let mut gpus: Vec<&String> = got.iter().map(|r| &r.2).collect();
        gpus.sort();
        gpus.dedup();
        assert!(
            gpus.iter().all(|g| g.len() == 1),
            "one GPU per worker: {gpus:?}"
        );
        jobs.sort();
        jobs.dedup();
        assert!(
            jobs.len() >= 2,
            "the work spread over the workers: {jobs:?}"
        );
        // Cancel one worker's step in the middle of a map: only its running task fails.
        let mut it = pool.imap(job_and_square, 0..2_000u64).chunksize(1);
        let first = it.next().unwrap().unwrap();
        let victim = first.0.clone();
        let status = std::process::Command::new("scancel")
            .arg(&victim)
            .status()
            .expect("scancel runs");
        assert!(status.success());
        let outcomes: Vec<Result<u64, String>> = std::iter::once(Ok(first.1))
            .chain(it.map(|r| r.map(|(_, sq, _)| sq).map_err(|e| e.to_string())))
            .collect();
        pool.close();
        pool.join().unwrap();
        (victim, outcomes)
    });
    assert_eq!(outcomes.len(), 2_000);
    // Only the cancelled worker's tasks in flight fail, each saying so; the map finishes.
    let failed = outcomes.iter().filter(|r| r.is_err()).count();
    assert!(failed < 2_000 / 2, "job {cancelled}: {failed} failed");
    for (x, r) in outcomes.iter().enumerate() {
        match r {
            Ok(sq) => assert_eq!(*sq, (x * x) as u64),
            Err(e) => assert!(e.contains("was lost"), "task {x}: {e}"),
        }
    }
    assert_eq!(
        no_jobs_named(name, Duration::from_secs(10)),
        Vec::<String>::new()
    );
    assert_eq!(no_remote_workers_left(), Vec::<u32>::new());
}

fn slow_square(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(20));
    x * x
}

/// In a child: a Slurm pool busy with a long map; tells the parent when tasks are done.
fn busy_slurm_pool(tx: gpuproc::Connection) {
    let pool = slurm_pool(2, "gpuproc-it-remote-kill");
    for (i, r) in pool.imap(slow_square, 0..100_000u64).enumerate() {
        r.unwrap();
        if i == 10 {
            tx.send(&1u8).unwrap();
        }
    }
}

#[test]
fn a_parent_killed_with_sigkill_leaves_no_slurm_step_running() {
    if !slurm_available() {
        return;
    }
    let (rx, tx) = gpuproc::Pipe::new().unwrap();
    let mut p = crate::support::start(gpuproc::StartMethod::Spawn, busy_slurm_pool, tx);
    assert_eq!(
        rx.recv_timeout::<u8>(TIMEOUT).unwrap(),
        1,
        "the pool ran tasks"
    );
    assert!(!jobs_named("gpuproc-it-remote-kill").is_empty());
    p.kill().unwrap();
    let _ = p.join_timeout(TIMEOUT);
    assert_eq!(
        no_jobs_named("gpuproc-it-remote-kill", Duration::from_secs(5)),
        Vec::<String>::new(),
        "steps left running 5 s after their pool's process was killed"
    );
    assert_eq!(no_remote_workers_left(), Vec::<u32>::new());
}

#[test]
fn the_remote_pool_example_runs_on_slurm_workers_with_one_gpu_each() {
    if !slurm_available() {
        return;
    }
    let out = crate::support::run_example_with_args("remote_pool", &["127.0.0.1"]);
    let lines = crate::support::stdout_lines(&out);
    assert_eq!(
        lines.last().map(String::as_str),
        Some("sum of squares: 140"),
        "{lines:?}"
    );
    // (Both workers usually run tasks; one may finish them all before the other starts.)
    let workers = lines.iter().filter(|l| l.starts_with("worker on ")).count();
    assert!((1..=2).contains(&workers), "{lines:?}");
    assert!(!lines.iter().any(|l| l.ends_with("GPU none")), "{lines:?}");
}

/// A remote process's outcome, as its parent sees it: what `join` gave, `exitcode`, and
/// where it ran (`node`, and whether `pid` was the remote process's, not the relay's).
#[derive(Debug)]
struct Seen<R> {
    joined: Result<R, gpuproc::ProcessError>,
    exitcode: Option<i32>,
    node: Option<String>,
    pid: Option<u32>,
}

fn run_remote<A, R>(f: fn(A) -> R, a: A, launcher: Launcher) -> Seen<R>
where
    A: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
    R: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
{
    within(move || {
        let mut p = gpuproc::Process::new(f, a).launcher(launcher);
        p.start().unwrap();
        let joined = p.join_timeout(TIMEOUT);
        Seen {
            joined,
            exitcode: p.exitcode(),
            node: p.node(),
            pid: p.pid(),
        }
    })
}

fn panics(_: u32) -> u32 {
    panic!("no luck on this node")
}

fn exits_with_3(_: u32) -> u32 {
    std::process::exit(3)
}

fn killed(_: u32) -> u32 {
    // SAFETY: a plain system call on this process.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    0
}

fn this_host() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn a_remote_process_is_started_by_a_relay_of_every_start_method() {
    for method in gpuproc::StartMethod::all() {
        let (joined, exitcode) = within(move || {
            let mut p = gpuproc::Process::new(where_and_square, 7)
                .with_start_method(method)
                .allow_fork_with_threads(true)
                .launcher(stand_in_for_ssh());
            p.start().unwrap();
            (p.join_timeout(TIMEOUT), p.exitcode())
        });
        let (_, launched, square) = joined.unwrap();
        assert_eq!(
            (launched.as_deref(), square),
            (Some("yes"), 49),
            "{method:?}"
        );
        assert_eq!(exitcode, Some(0), "{method:?}");
    }
    assert_eq!(no_remote_workers_left(), Vec::<u32>::new());
}

#[test]
fn a_process_started_by_a_command_has_a_local_process_api() {
    // The result, exit code 0, and the pid and node it ran on.
    let seen = run_remote(where_and_square, 12, stand_in_for_ssh());
    let (pid, launched, square) = seen.joined.unwrap();
    assert_eq!(square, 144);
    assert_eq!(
        launched.as_deref(),
        Some("yes"),
        "it ran in the launched process"
    );
    assert_eq!(seen.exitcode, Some(0));
    assert_eq!(seen.pid, Some(pid), "pid() is the remote process's");
    assert_eq!(seen.node, Some(this_host()));

    // A panic: its message, exit code 1.
    let seen = run_remote(panics, 1, stand_in_for_ssh());
    let e = seen.joined.unwrap_err();
    assert_eq!(e.panic_message(), Some("no luck on this node"), "{e}");
    assert_eq!(seen.exitcode, Some(1));

    // exit(3): the code.
    let seen = run_remote(exits_with_3, 1, stand_in_for_ssh());
    assert_eq!(seen.joined.unwrap_err().exitcode(), Some(3));
    assert_eq!(seen.exitcode, Some(3));

    // Killed on its node before it reported: lost, saying how, with the documented code.
    let seen = run_remote(killed, 1, stand_in_for_ssh());
    let e = seen.joined.unwrap_err();
    assert!(e.is_lost(), "{e}");
    let text = e.to_string();
    assert!(
        text.contains(&format!("was lost on {}", this_host())),
        "{text}"
    );
    assert!(text.contains("SIGKILL"), "{text}");
    assert_eq!(seen.exitcode, Some(gpuproc::LOST_EXITCODE));
    assert_eq!(e.exitcode(), Some(gpuproc::LOST_EXITCODE));

    // A launcher that cannot start it.
    let seen = run_remote(
        where_and_square,
        1,
        Launcher::command(["false"]).connect_back_to("127.0.0.1"),
    );
    let e = seen.joined.unwrap_err();
    assert!(
        matches!(e, gpuproc::ProcessError::LaunchFailed { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("before the worker connected"), "{e}");
    assert_eq!(seen.exitcode, Some(gpuproc::LOST_EXITCODE));
    assert_eq!(seen.pid, None, "it never ran anywhere");
    assert_eq!(no_remote_workers_left(), Vec::<u32>::new());
}

fn sleeps(secs: u64) -> u64 {
    std::thread::sleep(Duration::from_secs(secs));
    secs
}

#[test]
fn a_remote_process_is_alive_until_terminated_and_leaves_nothing_running() {
    let (alive, joined, exitcode) = within(|| {
        let mut p = gpuproc::Process::new(sleeps, 600).launcher(stand_in_for_ssh());
        p.start().unwrap();
        // Connected: its pid on its node is known.
        let deadline = Instant::now() + TIMEOUT;
        while p.pid().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(p.pid().is_some(), "the remote process connected");
        let alive = p.is_alive();
        p.terminate().unwrap();
        let joined = p.join_timeout(TIMEOUT);
        (alive, joined, p.exitcode())
    });
    assert!(alive);
    let e = joined.unwrap_err();
    assert_eq!(e.signal(), Some(libc::SIGTERM), "{e}");
    assert_eq!(exitcode, Some(-libc::SIGTERM));
    assert_eq!(no_remote_workers_left(), Vec::<u32>::new());
}

fn queue_len(q: Queue<u64>) -> usize {
    q.qsize()
}

fn makes_a_queue(_: u32) -> Queue<u64> {
    Queue::new().unwrap()
}

#[test]
fn descriptors_cannot_go_to_or_come_from_a_remote_process() {
    let mut p =
        gpuproc::Process::new(queue_len, Queue::new().unwrap()).launcher(stand_in_for_ssh());
    let e = p.start().unwrap_err();
    let text = e.to_string();
    assert!(text.contains("Queue"), "{text}");
    assert!(text.contains("another machine"), "{text}");

    let seen = run_remote(makes_a_queue, 1, stand_in_for_ssh());
    let text = seen.joined.unwrap_err().to_string();
    assert!(text.contains("Queue"), "{text}");
    assert!(text.contains("another machine"), "{text}");
    assert_eq!(no_remote_workers_left(), Vec::<u32>::new());
}

fn slurm_launcher(job_name: &str) -> Launcher {
    Launcher::slurm(Slurm::new().time("5").arg(format!("--job-name={job_name}")))
        .connect_back_to("127.0.0.1")
        .start_timeout(Duration::from_secs(30))
}

#[test]
fn a_process_as_a_slurm_step_returns_its_result_and_a_cancelled_one_is_lost() {
    if !slurm_available() {
        return;
    }
    let name = "gpuproc-it-remote-process";
    let (joined, exitcode, pid) = within(move || {
        // with_gpus(1): asked of Slurm with the step.
        let mut p = gpuproc::Process::new(job_and_square, 9)
            .with_gpus(1)
            .launcher(slurm_launcher(name));
        p.start().unwrap();
        (p.join_timeout(TIMEOUT), p.exitcode(), p.pid())
    });
    let (job, square, gpus) = joined.unwrap();
    assert!(!job.is_empty(), "it ran in a Slurm job");
    assert_eq!(square, 81);
    assert_eq!(gpus.split(',').count(), 1, "one GPU from Slurm: {gpus:?}");
    assert!(!gpus.is_empty(), "one GPU from Slurm");
    assert_eq!(exitcode, Some(0));
    assert!(pid.is_some());

    // scancel of its step: lost, with the documented code, within the timeout.
    let name = "gpuproc-it-remote-process-cancel";
    let (joined, exitcode) = within(move || {
        let mut p = gpuproc::Process::new(sleeps, 600).launcher(slurm_launcher(name));
        p.start().unwrap();
        let deadline = Instant::now() + TIMEOUT;
        while p.pid().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(p.pid().is_some(), "the step's process connected");
        let jobs = jobs_named(name);
        assert_eq!(jobs.len(), 1, "{jobs:?}");
        let status = std::process::Command::new("scancel")
            .arg(&jobs[0])
            .status()
            .expect("scancel runs");
        assert!(status.success());
        (p.join_timeout(TIMEOUT), p.exitcode())
    });
    let e = joined.unwrap_err();
    assert!(matches!(e, gpuproc::ProcessError::WorkerLost { .. }), "{e}");
    assert_eq!(exitcode, Some(gpuproc::LOST_EXITCODE));
    assert_eq!(
        no_jobs_named(name, Duration::from_secs(10)),
        Vec::<String>::new()
    );
    assert_eq!(no_remote_workers_left(), Vec::<u32>::new());
}

/// In a Slurm worker: "allocates" `mib` MiB on its GPU as the simulator sees it (a state
/// file for its pid, on the GPU Slurm bound); the GPU's index.
fn allocate_on_my_gpu(mib: u64) -> u32 {
    let dir = std::path::PathBuf::from(std::env::var("NVML_SIM_STATE_DIR").unwrap());
    let gpu = gpuproc::gpu::assigned().unwrap().devices[0].device.index;
    nvml_sim::state::write_allocation(&dir, gpu, std::process::id(), mib << 20).unwrap();
    gpu
}

#[test]
fn gpu_usage_of_slurm_workers_shows_their_node_gpu_and_memory_sampled_there() {
    if !slurm_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("gpuproc-remote-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dir_str = dir.to_string_lossy().into_owned();
    let (ran, usage) = within(move || {
        let mut builder = Pool::builder()
            .processes(2)
            .gpus_per_worker(1)
            .gpu_sampling(Duration::from_millis(20))
            .env("NVML_SIM_STATE_DIR", dir_str);
        for (k, v) in simulated_gpus() {
            builder = builder.env(k, v);
        }
        let pool = builder
            .launcher(slurm_launcher("gpuproc-it-remote-gpu-usage"))
            .build()
            .unwrap();
        let ran = pool
            .map_chunksize(allocate_on_my_gpu, [100u64, 300], 1)
            .unwrap();
        // What each GPU holds now: the last allocation made on it.
        let mut want = std::collections::BTreeMap::new();
        for (gpu, mib) in ran.iter().zip([100u64, 300]) {
            want.insert(*gpu, mib << 20);
        }
        // The workers' samples arrive every 20 ms: wait (with a deadline) until they show it.
        let deadline = Instant::now() + TIMEOUT;
        let usage = loop {
            let usage = pool.gpu_usage().unwrap();
            let shown = want.iter().all(|(gpu, bytes)| {
                usage
                    .iter()
                    .any(|u| u.gpus.iter().any(|g| g.index == *gpu && g.memory == *bytes))
            });
            if shown || Instant::now() > deadline {
                break usage;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        pool.close();
        pool.join().unwrap();
        (want, usage)
    });
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(usage.len(), 2, "{usage:?}");
    for u in &usage {
        assert_eq!(u.node, this_host(), "{u:?}");
        assert_eq!(u.gpus.len(), 1, "one GPU from Slurm's binding: {u:?}");
        assert!(u.gpus[0].uuid.starts_with("GPU-"), "{u:?}");
        assert_eq!(u.devices, [u.gpus[0].uuid.clone()], "{u:?}");
        assert!(u.peak_memory >= u.memory, "{u:?}");
    }
    assert_ne!(usage[0].gpus[0].index, usage[1].gpus[0].index, "{usage:?}");
    for (gpu, bytes) in &ran {
        let u = usage
            .iter()
            .find(|u| u.gpus[0].index == *gpu)
            .unwrap_or_else(|| panic!("GPU {gpu} is a worker's: {usage:?}"));
        assert_eq!(u.memory, *bytes, "{usage:?}");
        assert_eq!(u.gpus[0].memory, *bytes, "{usage:?}");
    }
    assert_eq!(no_remote_workers_left(), Vec::<u32>::new());
}

/// In a Slurm worker: holds `mib` MiB on its GPU until the test creates `release` in the
/// simulator's state directory (or a minute passes), then frees it.
fn hold_until_released(mib: u64) -> u32 {
    let dir = std::path::PathBuf::from(std::env::var("NVML_SIM_STATE_DIR").unwrap());
    let gpu = gpuproc::gpu::assigned().unwrap().devices[0].device.index;
    let pid = std::process::id();
    nvml_sim::state::write_allocation(&dir, gpu, pid, mib << 20).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while !dir.join("release").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    nvml_sim::state::write_allocation(&dir, gpu, pid, 0).unwrap();
    gpu
}

#[test]
fn a_task_on_a_slurm_worker_gets_the_gpu_memory_peak_sampled_on_its_node() {
    if !slurm_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("gpuproc-remote-peak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dir_str = dir.to_string_lossy().into_owned();
    let release = dir.join("release");
    let got = within(move || {
        let mut builder = Pool::builder()
            .processes(1)
            .gpus_per_worker(1)
            .gpu_sampling(Duration::from_millis(20))
            .env("NVML_SIM_STATE_DIR", dir_str);
        for (k, v) in simulated_gpus() {
            builder = builder.env(k, v);
        }
        let pool = builder
            .launcher(slurm_launcher("gpuproc-it-remote-peak"))
            .build()
            .unwrap();
        let got = std::thread::scope(|s| {
            let map = s.spawn(|| pool.map_with_gpu_memory(hold_until_released, [250u64]));
            // Once the pool shows the memory, a sample taken while the task ran has been
            // charged to it: let the task end.
            let deadline = Instant::now() + TIMEOUT;
            while Instant::now() < deadline
                && !pool
                    .gpu_usage()
                    .unwrap()
                    .iter()
                    .any(|u| u.memory == 250 << 20)
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            std::fs::write(&release, b"").unwrap();
            map.join().unwrap()
        });
        pool.close();
        pool.join().unwrap();
        got.unwrap()
    });
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, 250 << 20, "the task's peak: {got:?}");
    assert_eq!(no_remote_workers_left(), Vec::<u32>::new());
}

#[test]
fn gpu_choices_a_remote_launcher_cannot_honour_are_refused_when_the_pool_is_built() {
    let slurm = || Launcher::slurm(Slurm::new()).connect_back_to("127.0.0.1");
    let criteria = gpuproc::gpu::Criteria::new().min_free(1 << 30);
    let e = Pool::builder()
        .processes(1)
        .gpu_criteria(criteria)
        .launcher(slurm())
        .build()
        .unwrap_err();
    assert!(e.is_invalid(), "{e}");
    assert!(e.to_string().contains("gpu_criteria"), "{e}");
    let e = Pool::builder()
        .processes(1)
        .workers_per_gpu(2)
        .launcher(slurm())
        .build()
        .unwrap_err();
    assert!(e.is_invalid(), "{e}");
    let e = Pool::builder()
        .processes(1)
        .gpus_per_worker(1)
        .launcher(stand_in_for_ssh())
        .build()
        .unwrap_err();
    assert!(e.is_invalid(), "{e}");
    // And for one process: only a count, and only from Slurm.
    let mut p = gpuproc::Process::new(where_and_square, 1)
        .with_gpu_criteria(gpuproc::gpu::Criteria::new().min_free(1 << 30))
        .launcher(slurm());
    assert!(matches!(
        p.start().unwrap_err(),
        gpuproc::ProcessError::LaunchFailed { .. }
    ));
    let mut p = gpuproc::Process::new(where_and_square, 1)
        .with_gpus(1)
        .launcher(stand_in_for_ssh());
    assert!(matches!(
        p.start().unwrap_err(),
        gpuproc::ProcessError::LaunchFailed { .. }
    ));
}

/// The executable this process runs, as the kernel names it.
fn own_executable(_: u32) -> String {
    std::fs::read_link("/proc/self/exe")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// With `Slurm::bcast`, Slurm copies the executable to each worker's node, the worker runs
/// the copy and deletes it: nothing is left in the directory.
#[test]
fn workers_run_a_broadcast_copy_and_leave_none_behind() {
    if !slurm_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("gpuproc-bcast-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let at = dir.to_string_lossy().into_owned();
    let to = at.clone();
    let exes = within(move || {
        let pool = Pool::builder()
            .processes(2)
            .launcher(
                Launcher::slurm(Slurm::new().bcast(to).time("5"))
                    .connect_back_to("127.0.0.1")
                    .start_timeout(Duration::from_secs(30)),
            )
            .build()
            .unwrap();
        let got = pool.map_chunksize(own_executable, 0..4u32, 1).unwrap();
        pool.close();
        pool.join().unwrap();
        got
    });
    for exe in &exes {
        assert!(exe.starts_with(&format!("{at}/gpuproc-bcast-")), "{exe}");
        assert!(
            exe.ends_with(" (deleted)"),
            "the worker kept its copy: {exe}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(left.is_empty(), "{left:?}");
}
