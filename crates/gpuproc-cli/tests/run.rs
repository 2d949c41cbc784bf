//! `gpuproc run` end to end: real `sh -c` jobs on the NVML simulator's GPUs.
//!
//! Jobs report what they saw by writing files; the tests poll for those files with
//! deadlines, never sleep to synchronise, and kill whatever they started. Each test has its
//! own GPU lease table (`GPUPROC_RUNTIME_DIR`, named after the test's thread).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;
use common::{
    kill_group, run, run_with, scratch_dir, signal, sim_gpuproc, stderr, stdout, wait_output,
    Background, Signal, DEADLINE,
};

/// The calling test's lease table directory: libtest names each test's thread after it.
fn runtime_dir() -> PathBuf {
    let test = std::thread::current()
        .name()
        .unwrap_or("main")
        .replace("::", "-");
    let dir =
        std::env::temp_dir().join(format!("gpuproc-run-{}-runtime-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create runtime dir");
    dir
}

fn gpuproc(scenario: &str) -> Command {
    sim_gpuproc(scenario, Some(&runtime_dir()))
}

/// Polls `check` until it returns `Some`, or panics after `DEADLINE`.
fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Whether `pid` is gone (or a zombie, which can run nothing).
fn is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// The simulated GPUs' UUIDs, by NVML index, from `gpuproc gpus --json`.
fn uuids(scenario: &str) -> Vec<String> {
    let mut cmd = gpuproc(scenario);
    cmd.args(["gpus", "--json"]);
    let out = run(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("gpus --json");
    json["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["uuid"].as_str().expect("uuid").to_owned())
        .collect()
}

/// A job line that records what it saw in `dir/seen.<seq>` and, when `hold`, waits for
/// `dir/go` before exiting.
fn reporting_job(dir: &Path, hold: bool) -> String {
    let d = dir.display();
    let wait = if hold {
        format!("; while [ ! -e {d}/go ]; do sleep 0.01; done")
    } else {
        String::new()
    };
    format!(
        "echo \"$CUDA_VISIBLE_DEVICES $NVIDIA_VISIBLE_DEVICES $GPUPROC_JOB_SLOT\" > {d}/seen.tmp.$GPUPROC_JOB_SEQ && mv {d}/seen.tmp.$GPUPROC_JOB_SEQ {d}/seen.$GPUPROC_JOB_SEQ{wait}"
    )
}

fn seen(dir: &Path) -> Vec<(usize, String)> {
    let mut seen: Vec<(usize, String)> = std::fs::read_dir(dir)
        .expect("read scratch dir")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let seq = name.strip_prefix("seen.")?.parse().ok()?;
            Some((seq, read(&dir.join(name)).trim().to_owned()))
        })
        .collect();
    seen.sort();
    seen
}

#[test]
fn jobs_spread_over_gpus_respecting_per_gpu() {
    let dir = scratch_dir("spread");
    let uuids = uuids("4gpu");
    let jobs = dir.join("jobs.txt");
    let line = reporting_job(&dir, true);
    std::fs::write(&jobs, format!("{line}\n").repeat(8)).expect("write jobs");
    let mut cmd = gpuproc("4gpu");
    cmd.args(["run", "--gpus", "0,2", "--per-gpu", "2", "-f"])
        .arg(&jobs);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gpuproc");
    // Four slots (2 GPUs x 2): the first wave holds until `go` exists.
    let first = wait_for("the first four jobs", || {
        let s = seen(&dir);
        (s.len() >= 4).then_some(s)
    });
    let count = |uuid: &str, of: &[(usize, String)]| {
        of.iter()
            .filter(|(_, s)| s.split(' ').next() == Some(uuid))
            .count()
    };
    assert_eq!(first.len(), 4, "{first:?}");
    assert_eq!(count(&uuids[0], &first), 2, "{first:?}");
    assert_eq!(count(&uuids[2], &first), 2, "{first:?}");
    std::fs::write(dir.join("go"), "").expect("release the jobs");
    let out = wait_output(child, "gpuproc run");
    assert!(out.status.success(), "{}", stderr(&out));
    let all = seen(&dir);
    assert_eq!(all.len(), 8, "{all:?}");
    for (_, s) in &all {
        let fields: Vec<&str> = s.split(' ').collect();
        assert!(fields[0] == uuids[0] || fields[0] == uuids[2], "{s}");
        assert_eq!(fields[0], fields[1], "NVIDIA_VISIBLE_DEVICES matches: {s}");
        let slot: usize = fields[2].parse().expect("slot");
        assert!((1..=4).contains(&slot), "{s}");
    }
    assert!(
        stderr(&out).contains("8 succeeded, 0 failed"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn multi_gpu_jobs_and_templates() {
    let dir = scratch_dir("template");
    let uuids = uuids("4gpu");
    let mut cmd = gpuproc("4gpu");
    cmd.args(["run", "--gpus-per-job", "2", "--", "echo"])
        .arg(format!(
            "\"$CUDA_VISIBLE_DEVICES\" > {}/seen.{{#}}; echo {{2}}-{{1}} {{}} > {}/args.{{#}}",
            dir.display(),
            dir.display()
        ))
        .args([":::", "a b", "c", ":::", "1", "2"]);
    let out = run(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(read(&dir.join("args.1")), "1-a b a b 1\n");
    assert_eq!(read(&dir.join("args.4")), "2-c c 2\n");
    for (_, s) in seen(&dir) {
        let gpus: Vec<&str> = s.split(',').collect();
        assert_eq!(gpus.len(), 2, "{s}");
        assert!(gpus.iter().all(|g| uuids.iter().any(|u| u == g)), "{s}");
        assert_ne!(gpus[0], gpus[1], "{s}");
    }
}

#[test]
fn failing_job_is_retried_on_another_gpu_then_reported() {
    let dir = scratch_dir("retry");
    let uuids = uuids("4gpu");
    let joblog = dir.join("log.tsv");
    let tries = dir.join("tries");
    let mut cmd = gpuproc("4gpu");
    cmd.args(["run", "--gpus", "0,1", "--retries", "2", "--joblog"])
        .arg(&joblog)
        .arg("--")
        .arg(format!(
            "echo $CUDA_VISIBLE_DEVICES >> {}; exit 7",
            tries.display()
        ))
        .args([":::", "x"]);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let tried: Vec<String> = read(&tries).lines().map(str::to_owned).collect();
    assert_eq!(
        tried,
        [uuids[0].clone(), uuids[1].clone(), uuids[0].clone()],
        "retries move GPUs"
    );
    let err = stderr(&out);
    assert!(err.contains("retrying (retry 1 of 2)"), "{err}");
    assert!(err.contains("0 succeeded, 1 failed"), "{err}");
    assert!(err.contains("gpuproc: 1 job failed"), "{err}");
    let row = err
        .lines()
        .find(|l| l.trim_start().starts_with("1 "))
        .expect("summary row");
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!((cols[1], cols[3]), ("7", "2"), "{row}");
    let log = read(&joblog);
    assert_eq!(log.lines().count(), 4, "header and three attempts: {log}");
    assert!(
        log.lines()
            .skip(1)
            .all(|l| l.split('\t').nth(6) == Some("7")),
        "{log}"
    );
}

#[test]
fn resume_after_killing_the_runner_runs_only_the_rest() {
    let dir = scratch_dir("resume");
    let joblog = dir.join("log.tsv");
    let d = dir.display();
    // Job 4 of 6 blocks (until `go` exists) and records its pid, so the runner can be
    // killed while it runs.
    let lines: Vec<String> = (1..=6)
        .map(|i| {
            let hold = if i == 4 {
                format!("; echo $$ > {d}/pid4; while [ ! -e {d}/go ]; do sleep 0.01; done")
            } else {
                String::new()
            };
            format!("echo {i} >> {d}/ran.$RUN{hold}")
        })
        .collect();
    let jobs = dir.join("jobs.txt");
    std::fs::write(&jobs, lines.join("\n")).expect("write jobs");
    let mut first = gpuproc("4gpu");
    first
        .args(["run", "--cpu-only", "-j", "1", "--joblog"])
        .arg(&joblog)
        .arg("-f")
        .arg(&jobs)
        .env("RUN", "a")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut runner: Child = first.spawn().expect("spawn gpuproc");
    let job4: i32 = wait_for("job 4 to start", || {
        read(&dir.join("pid4")).trim().parse().ok()
    });
    signal(runner.id(), Signal::KILL);
    let _ = runner.wait();
    // The runner died without cleaning up; job 4 is in its own group.
    kill_group(job4);
    wait_for("job 4 to die", || is_gone(job4).then_some(()));
    assert_eq!(read(&dir.join("ran.a")), "1\n2\n3\n4\n");

    std::fs::write(dir.join("go"), "").expect("go");
    let mut second = gpuproc("4gpu");
    second
        .args(["run", "--cpu-only", "-j", "2", "--resume", "--joblog"])
        .arg(&joblog)
        .arg("-f")
        .arg(&jobs)
        .env("RUN", "b");
    let out = run(second);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut ran: Vec<String> = read(&dir.join("ran.b"))
        .lines()
        .map(str::to_owned)
        .collect();
    ran.sort();
    assert_eq!(ran, ["4", "5", "6"]);
    assert!(
        stderr(&out).contains("3 done before (--resume)"),
        "{}",
        stderr(&out)
    );

    // A changed job list is refused rather than silently mismatched.
    std::fs::write(&jobs, "echo other\n").expect("rewrite jobs");
    let mut third = gpuproc("4gpu");
    third
        .args(["run", "--cpu-only", "--resume", "--joblog"])
        .arg(&joblog)
        .arg("-f")
        .arg(&jobs);
    let out = run(third);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("the job list changed"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn sigint_twice_leaves_no_processes() {
    let dir = scratch_dir("sigint");
    let joblog = dir.join("log.tsv");
    let d = dir.display();
    // Job 1 leaves a background grandchild (which a non-interactive shell starts with
    // SIGINT ignored) and waits; job 2 ignores SIGINT altogether.
    let jobs = format!(
        "sleep 1000 & echo $$ $! > {d}/pids.1; wait\n\
         trap '' INT; sleep 1000 & echo $$ $! > {d}/pids.2; while :; do wait; done\n"
    );
    let mut cmd = gpuproc("4gpu");
    cmd.args(["run", "--gpus", "0,1", "--joblog"])
        .arg(&joblog)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut runner = cmd.spawn().expect("spawn gpuproc");
    {
        use std::io::Write;
        let mut stdin = runner.stdin.take().expect("stdin");
        stdin.write_all(jobs.as_bytes()).expect("write jobs");
    }
    let runner_pid = runner.id();
    let pids: Vec<i32> = (1..=2)
        .flat_map(|i| {
            let path = dir.join(format!("pids.{i}"));
            wait_for("the jobs to start", || {
                let text = read(&path);
                let p: Vec<i32> = text
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect();
                (p.len() == 2).then_some(p)
            })
        })
        .collect();
    signal(runner_pid, Signal::INT);
    // Job 1's shell dies of SIGINT and its leftover sleep is killed with its group.
    wait_for("job 1 to end", || {
        (read(&joblog).lines().count() >= 2).then_some(())
    });
    wait_for("job 1's processes to go", || {
        (is_gone(pids[0]) && is_gone(pids[1])).then_some(())
    });
    assert!(
        !is_gone(pids[2]),
        "job 2 ignores SIGINT and is still running"
    );
    signal(runner_pid, Signal::INT);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(runner.wait_with_output());
    });
    let out = match rx.recv_timeout(DEADLINE) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            signal(runner_pid, Signal::KILL);
            for &p in &pids {
                kill_group(p);
            }
            panic!("gpuproc run did not end after the second Ctrl-C");
        }
    };
    for &p in &pids {
        kill_group(p);
    }
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    for &p in &pids {
        wait_for("every job process to go", || is_gone(p).then_some(()));
    }
    let err = stderr(&out);
    assert!(err.contains("interrupted: starting no more jobs"), "{err}");
    assert!(err.contains("(interrupted)"), "{err}");
}

#[test]
fn timeout_stops_a_job() {
    let mut cmd = gpuproc("4gpu");
    cmd.args([
        "run",
        "--cpu-only",
        "--timeout",
        "0.3",
        "--",
        "sleep",
        ":::",
        "1000",
    ]);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("timeout"), "{}", stderr(&out));
}

#[test]
fn busy_gpus_wait_with_wait_free() {
    let dir = scratch_dir("waitfree");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    // This test process "uses" 1 GiB on GPU 0: someone else's work.
    let foreign = state.join(format!("0-{}", std::process::id()));
    nvml_sim::state::write_allocation(&state, 0, std::process::id(), 1 << 30).expect("state");
    let uuids = uuids("4gpu");
    let mut cmd = gpuproc("4gpu");
    cmd.env("NVML_SIM_STATE_DIR", &state)
        .args(["run", "--gpus", "0", "--wait-free", "--", "echo"])
        .arg(format!(
            "$CUDA_VISIBLE_DEVICES > {}/seen.{{#}} # {{}}",
            dir.display()
        ))
        .args([":::", "a", "b", "c"]);
    let mut runner = Background::start_in_group(cmd);
    runner.stderr_until("GPU 0: used by other processes");
    assert!(seen(&dir).is_empty(), "no job ran on the busy GPU");
    // The other user finishes: the run goes on.
    std::fs::remove_file(&foreign).expect("free GPU 0");
    let status = runner.finish();
    let err = runner.stderr();
    assert!(status.success(), "{err}");
    let all = seen(&dir);
    assert_eq!(all.len(), 3);
    assert!(all.iter().all(|(_, s)| s == &uuids[0]), "{all:?}");
}

#[test]
fn gpus_leased_by_others_are_not_used_until_released() {
    let dir = scratch_dir("leased");
    let uuids = uuids("4gpu");
    // Someone holds GPU 1 with `gpuproc pick --hold` (the loop is bounded: 60 s at most).
    let release = dir.join("release");
    let mut pick = gpuproc("4gpu");
    pick.args(["pick", "--devices", "1", "--hold", "--", "sh", "-c"])
        .arg(format!(
            "echo $CUDA_VISIBLE_DEVICES; i=0; while [ ! -e {} ] && [ $i -lt 6000 ]; do sleep 0.01; i=$((i+1)); done",
            release.display()
        ));
    let mut holder = Background::start_in_group(pick);
    assert_eq!(
        holder.line().expect("the holder reports"),
        uuids[1],
        "the holder has GPU 1"
    );

    // Two jobs that would run at once on GPUs 0 and 1: the second waits for the lease.
    let first = dir.join("first");
    std::fs::create_dir_all(&first).expect("mkdir");
    let jobs = first.join("jobs.txt");
    let line = reporting_job(&first, true);
    std::fs::write(&jobs, format!("{line}\n{line}\n")).expect("write jobs");
    let mut cmd = gpuproc("4gpu");
    cmd.args(["run", "--gpus", "0,1", "-f"]).arg(&jobs);
    let mut runner = Background::start_in_group(cmd);
    runner.stderr_until("GPU 1: leased by pid");
    std::fs::write(first.join("go"), "").expect("go");
    let status = runner.finish();
    let err = runner.stderr();
    assert!(status.success(), "{err}");
    let all = seen(&first);
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(
        all.iter()
            .all(|(_, s)| s.split(' ').next() == Some(uuids[0].as_str())),
        "{all:?}"
    );

    // Released: two jobs that run at once get both GPUs.
    std::fs::write(&release, "").expect("release");
    let status = holder.finish();
    let err = holder.stderr();
    assert!(status.success(), "{err}");
    let second = dir.join("second");
    std::fs::create_dir_all(&second).expect("mkdir");
    let jobs = second.join("jobs.txt");
    let line = reporting_job(&second, true);
    std::fs::write(&jobs, format!("{line}\n{line}\n")).expect("write jobs");
    let mut cmd = gpuproc("4gpu");
    cmd.args(["run", "--gpus", "0,1", "-f"]).arg(&jobs);
    let mut runner = Background::start_in_group(cmd);
    let both = wait_for("both jobs", || {
        let s = seen(&second);
        (s.len() == 2).then_some(s)
    });
    std::fs::write(second.join("go"), "").expect("go");
    let status = runner.finish();
    let err = runner.stderr();
    assert!(status.success(), "{err}");
    let mut got: Vec<&str> = both
        .iter()
        .filter_map(|(_, s)| s.split(' ').next())
        .collect();
    got.sort_unstable();
    assert_eq!(got, [uuids[0].as_str(), uuids[1].as_str()], "{both:?}");
}

#[test]
fn min_free_skips_a_busy_gpu() {
    let dir = scratch_dir("minfree");
    let scenario = dir.join("busy.toml");
    std::fs::write(
        &scenario,
        "[[devices]]\nmemory_used = \"75 GiB\"\n\n[[devices]]\nmemory_used = \"1 GiB\"\n",
    )
    .expect("scenario");
    let scenario = scenario.to_string_lossy().into_owned();
    let uuids = uuids(&scenario);
    let mut cmd = gpuproc(&scenario);
    cmd.args(["run", "--min-free", "10GiB", "--", "echo"])
        .arg(format!(
            "$CUDA_VISIBLE_DEVICES > {}/seen.{{#}} # {{}}",
            dir.display()
        ))
        .args([":::", "a", "b", "c"]);
    let out = run(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    let all = seen(&dir);
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(all.iter().all(|(_, s)| s == &uuids[1]), "{all:?}");

    // More than any GPU has: the run gives up at once instead of waiting.
    let mut cmd = gpuproc(&scenario);
    cmd.args([
        "run",
        "--min-free",
        "100GiB",
        "--wait",
        "1m",
        "--",
        "true",
        ":::",
        "x",
    ]);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no GPUs for the remaining jobs"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn malformed_job_files_name_the_line() {
    let dir = scratch_dir("malformed");
    let lines = dir.join("jobs.txt");
    std::fs::write(&lines, "echo a\n\necho 'b\necho c\n").expect("write");
    let mut cmd = gpuproc("4gpu");
    cmd.args(["run", "--cpu-only", "-f"]).arg(&lines);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(1));
    let expected = format!("{}: line 3: unterminated single quote", lines.display());
    assert!(stderr(&out).contains(&expected), "{}", stderr(&out));

    let toml = dir.join("jobs.toml");
    std::fs::write(
        &toml,
        "[[job]]\ncmd = \"echo a\"\n\n[[job]]\ncmd = \"echo b\"\nretries = \"many\"\n",
    )
    .expect("write");
    let mut cmd = gpuproc("4gpu");
    cmd.args(["run", "--cpu-only", "-f"]).arg(&toml);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("jobs.toml: line 6:"),
        "{}",
        stderr(&out)
    );

    // Nothing ran.
    assert!(seen(&dir).is_empty());
}

#[test]
fn toml_jobs_dry_run_and_help() {
    let dir = scratch_dir("toml");
    let toml = dir.join("jobs.toml");
    std::fs::write(
        &toml,
        "[defaults]\nenv = { GREETING = \"hi\" }\n\n[[job]]\ncmd = \"echo $GREETING one\"\ngpus = 2\n\n[[job]]\ncmd = \"echo $GREETING two\"\n",
    )
    .expect("write");
    let mut dry = gpuproc("4gpu");
    dry.args(["run", "--dry-run", "-f"]).arg(&toml);
    let out = run(dry);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        // The placement the run makes: most free memory first (GPUs 2 and 0), then the
        // least shared.
        "job\tslot\tgpus\tcommand\n1\t1\t0,2\techo $GREETING one\n2\t2\t1\techo $GREETING two\n"
    );
    let mut real = gpuproc("4gpu");
    real.args(["run", "-f"]).arg(&toml);
    let out = run(real);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut printed: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    printed.sort();
    assert_eq!(printed, ["hi one", "hi two"]);

    let mut help = gpuproc("4gpu");
    help.args(["run", "--help"]);
    let text = stdout(&run(help));
    for needle in [
        "--per-gpu",
        "--gpus-per-job",
        "--resume",
        "--min-free",
        "--max-util",
        "--no-foreign",
        "--wait-free",
        "GPU leases",
        ":::",
        "{%}",
        "Ctrl-C",
        "130",
        // Clusters: preemption, and Slurm's renumbering of a confined job's GPUs.
        "not a failure",
        "not counted as failures",
        "SLURM_STEP_GPUS=2,3 gives CUDA_VISIBLE_DEVICES=0,1",
        "entry C is the C-th of",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }

    let mut no_jobs = gpuproc("4gpu");
    no_jobs.args(["run", "--cpu-only"]);
    let out = run_with(no_jobs, Stdio::null());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("0 succeeded, 0 failed"),
        "{}",
        stderr(&out)
    );
}

/// Kills a process group when dropped, so that a failing test leaves no job behind.
struct GroupGuard(u32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.0 as i32);
    }
}

/// A runner killed while it starts a job must not leave the job's command running on a GPU
/// that no lease covers: the job becomes a holder of its lease before its command runs.
/// The window is held open deterministically: the job's error log is a FIFO, so the runner
/// stops after leasing the GPU and creating the output log; the test then takes the lease
/// table's lock (so the runner cannot add the job as a holder), lets the runner start the
/// job, and kills the runner.
#[test]
fn a_runner_killed_while_starting_a_job_leaves_no_job_on_an_unleased_gpu() {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = scratch_dir("gate");
    let runtime = runtime_dir();
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).expect("logs dir");
    common::mkfifo(&logs.join("1.err"));
    let ran = dir.join("ran");
    let go = dir.join("go");
    let jobs = dir.join("jobs.txt");
    std::fs::write(
        &jobs,
        format!(
            "touch '{}'; while [ ! -e '{}' ]; do sleep 0.02; done\n",
            ran.display(),
            go.display()
        ),
    )
    .expect("job file");
    let mut cmd = gpuproc("4gpu");
    cmd.args(["run", "--gpus", "0", "--logs"])
        .arg(&logs)
        .arg("-f")
        .arg(&jobs);
    let mut runner = Background::start_in_group(cmd);
    // The runner creates the job's output log after leasing its GPU, then waits for a
    // reader of the error log.
    wait_for("the job's output log", || {
        logs.join("1.out").exists().then_some(())
    });
    let lock = common::lock_table(&runtime);
    let _err = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(logs.join("1.err"))
        .expect("open the error log FIFO");
    let job = wait_for("the job's process", || {
        common::children_of(runner.pid()).first().copied()
    });
    let _job_group = GroupGuard(job);
    signal(runner.pid(), Signal::KILL);
    runner.wait();
    drop(lock);
    let ran_it = wait_for("the job to run its command or end", || {
        if ran.exists() {
            Some(true)
        } else if is_gone(job as i32) {
            Some(false)
        } else {
            None
        }
    });
    if ran_it {
        // Its command runs: its GPU must still be leased, to the job.
        let mut pick = gpuproc("4gpu");
        pick.args(["pick", "--devices", "0", "--hold", "--", "true"]);
        let out = run(pick);
        assert_eq!(
            out.status.code(),
            Some(3),
            "the job's command runs on GPU 0, but a pick got it: no lease covers the job\n{}",
            stderr(&out)
        );
    }
    std::fs::write(&go, "").expect("go");
}

#[test]
fn an_empty_argument_list_is_a_usage_error() {
    for (args, which) in [
        (&["echo", ":::"][..], "first"),
        (&["echo", ":::", "a", ":::"][..], "second"),
    ] {
        let mut cmd = gpuproc("4gpu");
        cmd.args(["run", "--cpu-only", "--"]).args(args);
        let out = run(cmd);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("the {which} `:::` list is empty")),
            "{args:?}: {}",
            stderr(&out)
        );
        assert_eq!(stdout(&out), "", "nothing runs");
    }
}

/// `--dry-run` shows the GPUs the run gives each job: on the simulated 4-GPU machine the
/// run puts the first job on GPU 2 (the most free memory), not GPU 0.
#[test]
fn dry_run_shows_the_gpus_the_run_uses() {
    let uuids = uuids("4gpu");
    for (name, extra) in [("spread", &[][..]), ("one-slot", &["-j", "1"][..])] {
        let dir = scratch_dir(&format!("dry-{name}"));
        let template = format!(
            "echo $CUDA_VISIBLE_DEVICES > {}/seen.{{#}} # {{}}",
            dir.display()
        );
        let mut dry = gpuproc("4gpu");
        dry.args(["run", "--dry-run"])
            .args(extra)
            .args(["--", &template, ":::", "a", "b", "c", "d"]);
        let out = run(dry);
        assert!(out.status.success(), "{}", stderr(&out));
        let mut shown: Vec<(usize, String)> = stdout(&out)
            .lines()
            .skip(1)
            .map(|line| {
                let fields: Vec<&str> = line.split('\t').collect();
                (fields[0].parse().expect("job"), fields[2].to_owned())
            })
            .collect();
        shown.sort();
        assert!(seen(&dir).is_empty(), "a dry run runs nothing");

        let mut real = gpuproc("4gpu");
        real.arg("run")
            .args(extra)
            .args(["--", &template, ":::", "a", "b", "c", "d"]);
        let out = run(real);
        assert!(out.status.success(), "{}", stderr(&out));
        let used: Vec<(usize, String)> = seen(&dir)
            .into_iter()
            .map(|(seq, uuid)| {
                let index = uuids.iter().position(|u| *u == uuid).expect("a known UUID");
                (seq, index.to_string())
            })
            .collect();
        assert_eq!(
            shown, used,
            "{name}: the dry run showed other GPUs than the run used"
        );
        assert_eq!(shown[0], (1, "2".to_owned()), "{name}");
    }

    // No GPU qualifies: the dry run says it cannot place the jobs, and why.
    let mut dry = gpuproc("4gpu");
    dry.args([
        "run",
        "--dry-run",
        "--min-free",
        "100GiB",
        "--",
        "true",
        ":::",
        "a",
    ]);
    let out = run(dry);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "job\tslot\tgpus\tcommand\n1\t-\t?\ttrue a\n");
    assert!(
        stderr(&out).contains("job 1 and the jobs after it get no GPUs now"),
        "{}",
        stderr(&out)
    );
}

/// Timeouts too long for the clock mean "no timeout" (no overflow panic, exit 101), from
/// the command line and from a TOML job file.
#[test]
fn huge_timeouts_saturate() {
    let dir = scratch_dir("hugetimeout");
    let toml = dir.join("jobs.toml");
    std::fs::write(
        &toml,
        "[[job]]\ncmd = \"echo toml\"\ntimeout = 1e19\n\n[[job]]\ncmd = \"echo big\"\ntimeout = 1e300\n",
    )
    .expect("write");
    for (args, printed) in [
        (vec!["--timeout", "1e20", "--", "echo", ":::", "1"], "1\n"),
        (
            vec!["--kill-after", "1e19", "--", "echo", ":::", "2"],
            "2\n",
        ),
        (
            vec![
                "--timeout",
                "1e300",
                "--kill-after",
                "1e300",
                "--",
                "echo",
                ":::",
                "3",
            ],
            "3\n",
        ),
        (
            vec!["-j", "1", "-f", toml.to_str().expect("utf-8")],
            "toml\nbig\n",
        ),
    ] {
        let mut cmd = gpuproc("4gpu");
        cmd.arg("run").args(&args);
        let out = run(cmd);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert_eq!(stdout(&out), printed, "{args:?}");
    }

    // A job that times out gets SIGTERM; SIGKILL would follow "never".
    let mut cmd = gpuproc("4gpu");
    cmd.args([
        "run",
        "--timeout",
        "0.1",
        "--kill-after",
        "1e19",
        "--",
        "sleep",
        ":::",
        "30",
    ]);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("timed out"), "{}", stderr(&out));
}

/// A job that holds `bytes` of GPU 0's simulated memory (a state file for its shell) for
/// `seconds`: a workload of known size and length, measured by the run's accounting.
fn holding_job(bytes: u64, seconds: f64) -> String {
    format!(
        "printf {bytes} > \"$NVML_SIM_STATE_DIR/.hold.$$\" && \
         mv \"$NVML_SIM_STATE_DIR/.hold.$$\" \"$NVML_SIM_STATE_DIR/0-$$\" && sleep {seconds}"
    )
}

#[test]
fn jobs_are_accounted_in_the_json_summary_and_the_job_log() {
    let dir = scratch_dir("accounting");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let joblog = dir.join("joblog.tsv");
    let jobs = |name: &str, line: String| {
        let path = dir.join(name);
        std::fs::write(&path, format!("{line}\n")).expect("write jobs");
        path
    };
    // GPU 0 of `4gpu`: 12% busy, drawing 143 W, no other process.
    let mut cmd = gpuproc("4gpu");
    cmd.env("NVML_SIM_STATE_DIR", &state)
        .args(["run", "--gpus", "0", "--json", "-q", "--joblog"])
        .arg(&joblog)
        .arg("-f")
        .arg(jobs("alone.txt", holding_job(2 << 30, 4.5)));
    let out = run(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let json: serde_json::Value =
        serde_json::from_str(text.lines().last().unwrap_or_default()).expect("a JSON summary");
    assert_eq!(json["succeeded"], 1, "{json}");
    let job = &json["jobs"][0];
    assert_eq!(job["status"], "succeeded", "{json}");
    assert_eq!(job["gpus"], serde_json::json!([0]), "{json}");
    let gpu = &job["gpu"];
    let first = gpu["first_ms"].as_u64().expect("a window");
    let last = gpu["last_ms"].as_u64().expect("a window");
    assert!(last > first && gpu["samples"].as_u64() >= Some(2), "{json}");
    assert_eq!(gpu["peak_memory"], 2u64 << 30, "{json}");
    assert_eq!(gpu["mean_memory"], 2u64 << 30, "{json}");
    // Alone on the GPU, the job's processes have all of its 12%.
    assert_eq!(gpu["mean_sm_percent"], 12.0, "{json}");
    assert_eq!(gpu["shared"], false, "{json}");
    // 143 W over the window, give or take how far apart the energy reads and the sample
    // times are (half a second in all).
    let energy = gpu["energy_mj"].as_u64().expect("energy when alone") as f64;
    let expected = 143.0 * (last - first) as f64;
    assert!(
        (energy - expected).abs() <= 143.0 * 500.0,
        "{energy} mJ, expected about {expected}: {json}"
    );

    // The job log: GNU parallel's columns, then the same figures.
    let log = read(&joblog);
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 2, "{log}");
    let header: Vec<&str> = lines[0].split('\t').collect();
    assert_eq!(
        header[8..],
        [
            "Command",
            "GpuStart",
            "GpuEnd",
            "GpuPeakMem",
            "GpuMeanMem",
            "GpuMeanSM",
            "GpuEnergy"
        ]
    );
    let fields: Vec<&str> = lines[1].split('\t').collect();
    assert_eq!(fields.len(), 15, "{log}");
    assert_eq!(fields[6], "0");
    assert_eq!(
        fields[9],
        format!("{}.{:03}", first / 1000, first % 1000),
        "{log}"
    );
    assert_eq!(
        fields[11..14],
        ["2147483648", "2147483648", "12.0"],
        "{log}"
    );
    let joules: f64 = fields[14].parse().expect("energy in joules");
    assert!((joules * 1000.0 - energy).abs() < 1.0, "{log}");

    // Someone else on the GPU: no energy is attributed, and the table has no energy column.
    nvml_sim::state::write_allocation(&state, 0, std::process::id(), 1 << 30).expect("state");
    let mut cmd = gpuproc("4gpu");
    cmd.env("NVML_SIM_STATE_DIR", &state)
        .args(["run", "--gpus", "0", "-q", "--joblog"])
        .arg(&joblog)
        .arg("-f")
        .arg(jobs("shared.txt", holding_job(1 << 30, 2.5)));
    let out = run(cmd);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let table: Vec<&str> = err.lines().collect();
    let header: Vec<&str> = table[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["job", "exit", "time", "retries", "gpus", "peak", "mem", "mean", "SM%", "command"],
        "{err}"
    );
    let row: Vec<&str> = table[1].split_whitespace().collect();
    assert_eq!(row[4..8], ["0", "1.0", "GiB", "1.0"], "{err}");
    let log = read(&joblog);
    let second: Vec<&str> = log
        .lines()
        .nth(2)
        .expect("a second line")
        .split('\t')
        .collect();
    assert_eq!(second.len(), 15, "{log}");
    assert_eq!(
        second[11],
        (1u64 << 30).to_string(),
        "only the job's memory: {log}"
    );
    assert_eq!(second[14], "", "no energy on a shared GPU: {log}");
    let _ = std::fs::remove_dir_all(&dir);
}
