//! `gpuproc run --slurm` on the local cluster of `scripts/slurm-local` (one node on
//! 127.0.0.1, 4 fake GPUs, no cgroups) with the NVML simulator's `4gpu` scenario: job
//! arrays outside an allocation, job steps inside one, retries, `--resume` after a killed
//! runner, and Ctrl-C.
//!
//! As in `slurm.rs`: these tests need that cluster (`scripts/test` starts it; by hand,
//! `eval "$(scripts/slurm-local up)"`); `GPUPROC_SLURM=0` skips them with a note. They run
//! one at a time; each names its jobs after itself (`--slurm-opt=--job-name=...`) and
//! cancels them when it ends, even when it fails. Every command runs under a deadline.
//! `steps_name_their_gpus_by_the_nodes_numbers_confined_or_not` also runs on the cluster
//! with device confinement (`GPUPROC_SLURM_CGROUP=1 scripts/slurm-local up`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod common;
use common::slurm::{cluster, cluster_in_either_mode, device_nodes, Cluster, ACTIVE, FOUR};
use common::{run, scratch_dir, signal, sim_env, stderr, stdout, Background, Signal, DEADLINE};

impl Cluster {
    /// `gpuproc run --slurm` naming its jobs after this test, on the simulator's `4gpu`
    /// scenario with the lease table in `dir`, run in `dir`; `args` follow.
    fn gpuproc_run(&self, dir: &Path, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_gpuproc"));
        sim_env(&mut command, "4gpu", Some(dir));
        command
            .current_dir(dir)
            .args(["run", "--slurm"])
            .arg(format!("--slurm-opt=--job-name={}", self.job_name))
            .args(args);
        command
    }
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `limit`.
fn wait_for<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let end = gpuproc::time::deadline(limit);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            gpuproc::time::remaining(end) != Some(Duration::ZERO),
            "{what}: not within {limit:?}"
        );
        // Slurm and the job log have nothing to block on: poll, with a deadline.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A job-log line: `(seq, host, exit, signal, command)`.
type LogLine = (usize, String, i32, i32, String);

/// Parses a job log strictly: the header, then 9 tab-separated fields per line (GNU
/// parallel's), then gpuproc's 6 GPU accounting fields.
fn joblog(path: &Path) -> Vec<LogLine> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some(
            "Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand\t\
             GpuStart\tGpuEnd\tGpuPeakMem\tGpuMeanMem\tGpuMeanSM\tGpuEnergy"
        )
    );
    lines
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            assert_eq!(f.len(), 15, "{line:?}");
            let number =
                |i: usize| -> f64 { f[i].parse().unwrap_or_else(|e| panic!("{e}: {line:?}")) };
            assert!(number(2) > 1e9 && number(3) >= 0.0, "{line:?}");
            (
                f[0].parse().unwrap_or_else(|e| panic!("{e}: {line:?}")),
                f[1].to_string(),
                f[6].parse().unwrap_or_else(|e| panic!("{e}: {line:?}")),
                f[7].parse().unwrap_or_else(|e| panic!("{e}: {line:?}")),
                f[8].to_string(),
            )
        })
        .collect()
}

#[test]
fn a_sweep_runs_as_one_array_each_job_on_a_gpu_of_its_own() {
    let Some(cluster) = cluster("sweep") else {
        return;
    };
    let dir = scratch_dir("sweep");
    let seqs: Vec<String> = (1..=40).map(|i| i.to_string()).collect();
    let mut args = vec![
        "--gpus-per-job",
        "1",
        "--max-running",
        "4",
        "--logs",
        "logs",
        "--joblog",
        "jobs.tsv",
        "--",
        // What the job saw, with its start and end: the array, Slurm's GPU, the times.
        r#"echo "{} ${SLURM_ARRAY_JOB_ID:-none} $CUDA_VISIBLE_DEVICES $(date +%s.%N)"; sleep 0.2; date +%s.%N"#,
        ":::",
    ];
    args.extend(seqs.iter().map(String::as_str));
    let out = run(cluster.gpuproc_run(&dir, &args));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("40 succeeded, 0 failed"),
        "{}",
        stderr(&out)
    );

    // (arg, array, gpu, start, end) per job, from its --logs output.
    let mut ran = Vec::new();
    for seq in 1..=40 {
        let path = dir.join(format!("logs/{seq}.out"));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let words: Vec<&str> = text.split_whitespace().collect();
        let [arg, array, gpu, start, end] = words[..] else {
            panic!("{}: {text:?}", path.display());
        };
        assert_eq!(arg, seq.to_string(), "{text:?}");
        let gpu: usize = gpu.parse().unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert!(gpu < 4, "{text:?}");
        let time = |s: &str| -> f64 { s.parse().unwrap_or_else(|e| panic!("{e}: {text:?}")) };
        ran.push((seq, array.to_string(), gpu, time(start), time(end)));
    }
    // One array for the whole sweep.
    let arrays: BTreeSet<&str> = ran.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(arrays.len(), 1, "{arrays:?}");
    assert!(!arrays.contains("none"), "{arrays:?}");
    // Jobs that overlapped in time had different GPUs, and at most 4 ran at once.
    for a in &ran {
        let overlapping: Vec<_> = ran
            .iter()
            .filter(|b| b.0 != a.0 && b.3 < a.4 && a.3 < b.4)
            .collect();
        for b in &overlapping {
            assert_ne!(
                a.2, b.2,
                "jobs {} and {} overlapped on GPU {}",
                a.0, b.0, a.2
            );
        }
        let at_start = ran.iter().filter(|b| b.3 <= a.3 && a.3 < b.4).count();
        assert!(
            at_start <= 4,
            "{at_start} jobs running when job {} started",
            a.0
        );
    }

    // Each task's record stays with the logs: the GPU Slurm gave, by NVML index and UUID.
    let state = std::fs::read_dir(dir.join("logs/.slurm"))
        .expect("logs/.slurm")
        .next()
        .expect("a run's state directory")
        .expect("read logs/.slurm")
        .path();
    let mut records = 0;
    for entry in std::fs::read_dir(&state).expect("state directory") {
        let path = entry.expect("entry").path();
        if !path.to_string_lossy().ends_with(".rec.json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("record");
        let rec: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let seq = rec["seq"].as_u64().expect("seq");
        let job = ran
            .iter()
            .find(|r| r.0 as u64 == seq)
            .expect("a job of the sweep");
        assert_eq!(rec["node"], "localhost", "{text}");
        assert_eq!(rec["cuda_visible_devices"], job.2.to_string(), "{text}");
        assert_eq!(rec["gpus"], serde_json::json!([job.2]), "{text}");
        assert_eq!(rec["uuids"], serde_json::json!([FOUR[job.2]]), "{text}");
        records += 1;
    }
    assert_eq!(records, 40);

    // The job log: one line per job, Host = the node and the GPU the job saw.
    let log = joblog(&dir.join("jobs.tsv"));
    assert_eq!(log.len(), 40, "{log:?}");
    let by_seq: BTreeMap<usize, &LogLine> = log.iter().map(|l| (l.0, l)).collect();
    for (seq, _, gpu, _, _) in &ran {
        let line = by_seq[seq];
        assert_eq!(line.1, format!("localhost/{gpu}"), "{line:?}");
        assert_eq!((line.2, line.3), (0, 0), "{line:?}");
    }
    assert_eq!(cluster.jobs(ACTIVE), "");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_failing_job_is_retried_and_then_reported_as_failed() {
    let Some(cluster) = cluster("retry") else {
        return;
    };
    let dir = scratch_dir("retry");
    let out = run(cluster.gpuproc_run(
        &dir,
        &[
            "--cpu-only",
            "--retries",
            "1",
            "--joblog",
            "jobs.tsv",
            "--",
            r#"echo "job {} attempt $GPUPROC_JOB_ATTEMPT"; exit {}"#,
            ":::",
            "0",
            "7",
            "0",
        ],
    ));
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("job 2 exited 7 on localhost; retrying (retry 1 of 1)"),
        "{err}"
    );
    assert!(err.contains("2 succeeded, 1 failed"), "{err}");
    // Without --logs the runner prints each job's output.
    let printed: BTreeSet<String> = stdout(&out).lines().map(str::to_string).collect();
    let expected: BTreeSet<String> = ["job 0 attempt 1", "job 7 attempt 1", "job 7 attempt 2"]
        .into_iter()
        .map(str::to_string)
        .collect();
    assert_eq!(printed, expected, "{}", stdout(&out));
    let mut log: Vec<(usize, i32)> = joblog(&dir.join("jobs.tsv"))
        .iter()
        .map(|l| (l.0, l.2))
        .collect();
    log.sort_unstable();
    assert_eq!(log, vec![(1, 0), (2, 7), (2, 7), (3, 0)]);
    assert_eq!(cluster.jobs(ACTIVE), "");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_runner_killed_mid_sweep_resumes_with_only_the_rest() {
    let Some(cluster) = cluster("resume") else {
        return;
    };
    let dir = scratch_dir("resume");
    let args = |extra: &[&'static str]| {
        let mut args: Vec<&str> = vec!["--cpu-only", "--max-running", "2", "--joblog", "jobs.tsv"];
        args.extend(extra);
        args.extend(["--", "sleep 0.3; echo {}", ":::"]);
        args.extend([
            "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12",
        ]);
        args
    };
    let mut first = Background::start_in_group(cluster.gpuproc_run(&dir, &args(&[])));
    let log_path = dir.join("jobs.tsv");
    wait_for(DEADLINE, "3 jobs in the job log", || {
        let text = std::fs::read_to_string(&log_path).ok()?;
        (text.lines().count() > 3).then_some(())
    });
    signal(first.pid(), Signal::KILL);
    let _ = first.wait();
    // Its array is orphaned: a runner killed with SIGKILL cannot cancel it.
    let left = cluster.cancel_all();
    assert_eq!(left.trim(), "", "the orphaned array is still active");
    let done: BTreeSet<usize> = joblog(&log_path)
        .iter()
        .filter(|l| l.2 == 0 && l.3 == 0)
        .map(|l| l.0)
        .collect();
    assert!(done.len() >= 3 && done.len() < 12, "{done:?}");
    let before = joblog(&log_path).len();

    let out = run(cluster.gpuproc_run(&dir, &args(&["--resume"])));
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{} done before (--resume)", done.len())),
        "{err}"
    );
    let rerun: Vec<usize> = joblog(&log_path)[before..].iter().map(|l| l.0).collect();
    let rerun_set: BTreeSet<usize> = rerun.iter().copied().collect();
    assert_eq!(rerun.len(), rerun_set.len(), "a job ran twice: {rerun:?}");
    let rest: BTreeSet<usize> = (1..=12).filter(|s| !done.contains(s)).collect();
    assert_eq!(rerun_set, rest);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn ctrl_c_cancels_the_running_array() {
    let Some(cluster) = cluster("ctrl-c") else {
        return;
    };
    let dir = scratch_dir("ctrl-c");
    let mut runner = Background::start_in_group(cluster.gpuproc_run(
        &dir,
        &[
            "--gpus-per-job",
            "1",
            "--",
            "sleep 60 # {}",
            ":::",
            "1",
            "2",
            "3",
            "4",
            "5",
            "6",
        ],
    ));
    wait_for(DEADLINE, "4 running tasks", || {
        let running = cluster.jobs("R");
        (running.lines().count() == 4).then_some(())
    });
    signal(runner.pid(), Signal::INT);
    // Every task, running or pending, leaves the queue within 5 s.
    wait_for(
        Duration::from_secs(5),
        "an empty queue after Ctrl-C",
        || cluster.jobs(ACTIVE).trim().is_empty().then_some(()),
    );
    let status = runner.wait();
    assert_eq!(status.code(), Some(130), "{}", runner.stderr());
    let err = runner.stderr();
    assert!(err.contains("interrupted: cancelling job array"), "{err}");
    assert!(err.contains("(interrupted)"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn inside_an_allocation_jobs_are_steps() {
    let Some(cluster) = cluster("steps") else {
        return;
    };
    let dir = scratch_dir("steps");
    let mut salloc = Command::new("salloc");
    sim_env(&mut salloc, "4gpu", Some(&dir));
    salloc
        .current_dir(&dir)
        .args(["-N1", "-n4", "--gres=gpu:4"])
        .arg(format!("--job-name={}", cluster.job_name))
        .arg(env!("CARGO_BIN_EXE_gpuproc"))
        .args(["run", "--slurm", "--gpus-per-job", "1", "--joblog", "jobs.tsv", "--"])
        .arg(r#"echo "{} job=$SLURM_JOB_ID step=$SLURM_STEP_ID array=${SLURM_ARRAY_JOB_ID:-none} gpu=$CUDA_VISIBLE_DEVICES""#)
        .arg(":::")
        .args(["1", "2", "3", "4", "5", "6", "7", "8"]);
    let out = run(salloc);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 8, "{lines:?}");
    let mut jobs = BTreeSet::new();
    let mut steps = BTreeSet::new();
    for line in &lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [_, job, step, array, gpu] = words[..] else {
            panic!("{line:?}");
        };
        assert_eq!(array, "array=none", "{line}");
        jobs.insert(job.to_string());
        assert!(steps.insert(step.to_string()), "one step per job: {line}");
        let gpu = gpu.strip_prefix("gpu=").unwrap_or_default();
        assert!(["0", "1", "2", "3"].contains(&gpu), "{line}");
    }
    // All in the one allocation.
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let log = joblog(&dir.join("jobs.tsv"));
    assert_eq!(log.len(), 8);
    assert!(
        log.iter()
            .all(|l| l.1.starts_with("localhost/") && l.2 == 0),
        "{log:?}"
    );
    // The allocation may still be completing after salloc returns: the cluster guard
    // waits for it to end.
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_steps_task_goes_on_its_command_line_and_its_other_files_are_its_slots() {
    let Some(cluster) = cluster("step-files") else {
        return;
    };
    let dir = scratch_dir("step-files");
    let mut salloc = Command::new("salloc");
    sim_env(&mut salloc, "4gpu", Some(&dir));
    salloc
        .current_dir(&dir)
        .args(["-N1", "-n2"])
        .arg(format!("--job-name={}", cluster.job_name))
        .arg(env!("CARGO_BIN_EXE_gpuproc"))
        .args(["run", "--slurm", "--cpu-only", "--"])
        // Job 6 fails, so the run's state directory stays for us to look at.
        .arg(r#"echo "out {}"; echo "err {}" >&2; [ {} != 6 ]"#)
        .arg(":::")
        .args(["1", "2", "3", "4", "5", "6"]);
    let out = run(salloc);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    // Each job's output, printed from its slot's files as the job ended.
    let mut printed: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    printed.sort();
    let wanted: Vec<String> = (1..=6).map(|i| format!("out {i}")).collect();
    assert_eq!(printed, wanted, "{}", stderr(&out));
    for i in 1..=6 {
        assert!(
            stderr(&out).contains(&format!("err {i}")),
            "{}",
            stderr(&out)
        );
    }
    let runs: Vec<PathBuf> = std::fs::read_dir(dir.join(".gpuproc-slurm"))
        .expect("the state directory stays after a failure")
        .map(|e| e.expect("entry").path())
        .collect();
    let [state] = &runs[..] else {
        panic!("one run: {runs:?}");
    };
    let mut names: Vec<String> = std::fs::read_dir(state)
        .expect("state")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    // One record per job and the files of two slots (the allocation's two CPUs); no batch
    // file per step.
    let records = names.iter().filter(|n| n.ends_with(".rec.json")).count();
    assert_eq!(records, 6, "{names:?}");
    let slots: BTreeSet<&str> = names
        .iter()
        .filter(|n| !n.ends_with(".rec.json"))
        .map(|n| {
            let (slot, ext) = n.split_once('.').unwrap_or((n, ""));
            assert!(slot.starts_with('s'), "{n} in {names:?}");
            assert!(["slurm", "step", "out", "err"].contains(&ext), "{n}");
            slot
        })
        .collect();
    assert_eq!(slots.len(), 2, "{names:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn steps_name_their_gpus_by_the_nodes_numbers_confined_or_not() {
    let Some((cluster, confined)) = cluster_in_either_mode("step-gpus") else {
        return;
    };
    let dir = scratch_dir("step-gpus");
    let mut salloc = Command::new("salloc");
    sim_env(&mut salloc, "4gpu", Some(&dir));
    // The simulator lists the GPUs a job may open, as the driver does (under confinement,
    // a 2-GPU job's two, numbered 0 and 1).
    if let Some(nodes) = device_nodes() {
        salloc.env("NVML_SIM_DEVICE_NODES", nodes);
    }
    salloc
        .current_dir(&dir)
        .args(["-N1", "-n2", "--gres=gpu:4"])
        .arg(format!("--job-name={}", cluster.job_name))
        .arg(env!("CARGO_BIN_EXE_gpuproc"))
        .args([
            "run",
            "--slurm",
            "--gpus-per-job",
            "2",
            "--joblog",
            "jobs.tsv",
            "--",
        ])
        // Both jobs run at once, so they hold different GPUs: each waits (at most 10 s)
        // for the other to start.
        .arg(
            r#"touch started.{}; i=0; while [ ! -e started.1 ] || [ ! -e started.2 ]; do
                 i=$((i + 1)); [ $i -le 100 ] || exit 9; sleep 0.1; done
               echo "{} $CUDA_VISIBLE_DEVICES $SLURM_STEP_GPUS""#,
        )
        .args([":::", "1", "2"]);
    let out = run(salloc);
    assert!(out.status.success(), "{}", stderr(&out));
    // Slurm's binding, as the job saw it: its node numbers, renumbered from 0 under
    // confinement.
    let mut seen = BTreeMap::new();
    for line in stdout(&out).lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [seq, visible, step] = words[..] else {
            panic!("{line:?}");
        };
        assert_eq!(visible == "0,1", confined || step == "0,1", "{line}");
        seen.insert(seq.to_string(), step.to_string());
    }
    assert_eq!(seen.len(), 2, "{}", stdout(&out));
    // The job log names each job's GPUs by the node's numbers, as SLURM_STEP_GPUS does.
    let log = joblog(&dir.join("jobs.tsv"));
    let mut all = BTreeSet::new();
    for line in &log {
        let gpus = line.1.strip_prefix("localhost/").expect("node/gpus");
        assert_eq!(
            Some(&gpus.to_string()),
            seen.get(&line.0.to_string()),
            "{log:?}"
        );
        all.extend(gpus.split(',').map(str::to_string));
    }
    assert_eq!(all.len(), 4, "{log:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_requeued_task_counts_only_its_last_run() {
    let Some(cluster) = cluster("requeue") else {
        return;
    };
    let dir = scratch_dir("requeue");
    let mut runner = Background::start_in_group(cluster.gpuproc_run(
        &dir,
        &[
            "--cpu-only",
            "--joblog",
            "jobs.tsv",
            "--",
            // The first run waits to be requeued; the run after the requeue succeeds.
            r#"[ "${SLURM_RESTART_COUNT:-0}" = 0 ] && sleep 60; echo "run ${SLURM_RESTART_COUNT:-0} of {}""#,
            ":::",
            "a",
        ],
    ));
    let task = wait_for(DEADLINE, "a running task", || {
        let running = cluster.jobs("R");
        running.lines().next().map(str::to_string)
    });
    let mut requeue = Command::new("scontrol");
    requeue.args(["requeue", task.trim()]);
    let out = run(requeue);
    assert!(out.status.success(), "scontrol requeue: {}", stderr(&out));
    let status = runner.wait();
    let err = runner.stderr();
    assert!(status.success(), "{status:?}: {err}");
    assert!(err.contains("1 succeeded, 0 failed"), "{err}");
    // One job-log line: the run after the requeue.
    let log = joblog(&dir.join("jobs.tsv"));
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!((log[0].2, log[0].3), (0, 0), "{log:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A directory of fake Slurm commands (`NAME` → shell script body) for the tests that need
/// no cluster: how the runner takes failures and malformed output.
fn fake_slurm(dir: &Path, commands: &[(&str, &str)]) -> std::ffi::OsString {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    for (name, body) in commands {
        let path = bin.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write fake command");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("chmod fake command");
    }
    let mut path = bin.into_os_string();
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    path
}

/// `gpuproc run --slurm --cpu-only` outside any allocation, with `path` as PATH.
fn gpuproc_with_path(dir: &Path, path: &std::ffi::OsStr, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gpuproc"));
    command
        .current_dir(dir)
        .env("PATH", path)
        .env_remove("SLURM_JOB_ID")
        .args(["run", "--slurm", "--cpu-only"])
        .args(args);
    command
}

#[test]
fn a_failed_sbatch_is_reported_with_its_command_and_error() {
    let dir = scratch_dir("fake-sbatch");
    let path = fake_slurm(
        &dir,
        &[
            ("scontrol", "echo 'MaxArraySize            = 1001'"),
            (
                "sbatch",
                "echo 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2; exit 1",
            ),
        ],
    );
    let out = run(gpuproc_with_path(
        &dir,
        &path,
        &["--partition", "nope", "--", "true {}", ":::", "1", "2"],
    ));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("`sbatch --parsable --array=0-1")
            && err.contains("--partition=nope")
            && err.contains("exit status 1: sbatch: error: Batch job submission failed: Invalid partition name specified"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn malformed_squeue_output_is_an_error_that_quotes_it_and_the_array_is_cancelled() {
    let dir = scratch_dir("fake-squeue");
    let cancelled = dir.join("cancelled");
    let path = fake_slurm(
        &dir,
        &[
            ("scontrol", "echo 'MaxArraySize = 1001'"),
            ("sbatch", "echo 42"),
            ("squeue", "echo '42|0|RUNNING'"),
            (
                "scancel",
                &format!("echo \"$@\" > '{}'", cancelled.display()),
            ),
        ],
    );
    let out = run(gpuproc_with_path(
        &dir,
        &path,
        &["--", "true {}", ":::", "1"],
    ));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(
            "unexpected squeue output (expected ARRAY_JOB|TASK|STATE|NODES): \"42|0|RUNNING\""
        ),
        "{err}"
    );
    let scancel = std::fs::read_to_string(&cancelled).unwrap_or_default();
    assert_eq!(
        scancel.trim(),
        "42",
        "the array is cancelled when the runner gives up"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_succeeded_task_is_reported_when_its_record_appears_and_the_run_ends_with_slurms_task() {
    // squeue lists the task as running until the test releases it: the job's result can
    // only come from its record, seen the moment the wrapper renames it into place; the run
    // itself ends once Slurm no longer lists the task.
    let dir = scratch_dir("record-first");
    let cancelled = dir.join("cancelled");
    let released = dir.join("released");
    let sbatch = "while [ $# -gt 0 ]; do [ \"$1\" = --wrap ] && w=\"$2\"; shift; done\n\
                  SLURM_ARRAY_TASK_ID=0 SLURM_JOB_ID=43 SLURMD_NODENAME=fakenode \
                  sh -c \"$w\" </dev/null >/dev/null 2>&1 &\n\
                  echo 42";
    let squeue = format!(
        "[ -e '{}' ] || echo '42|0|RUNNING|fakenode'",
        released.display()
    );
    let path = fake_slurm(
        &dir,
        &[
            ("scontrol", "echo 'MaxArraySize = 1001'"),
            ("sbatch", sbatch),
            ("squeue", &squeue),
            (
                "scancel",
                &format!("echo \"$@\" > '{}'", cancelled.display()),
            ),
        ],
    );
    let mut runner = Background::start(gpuproc_with_path(
        &dir,
        &path,
        &[
            "--joblog",
            "jobs.tsv",
            "--",
            "echo hello {}",
            ":::",
            "there",
        ],
    ));
    // The output, while squeue still lists the task.
    assert_eq!(runner.line().as_deref(), Some("hello there"));
    assert!(!released.exists());
    std::fs::write(&released, b"").expect("release the task");
    let status = runner.wait();
    assert_eq!(status.code(), Some(0), "{}", runner.stderr());
    let joblog = std::fs::read_to_string(dir.join("jobs.tsv")).expect("job log");
    let line = joblog.lines().nth(1).expect("a job line");
    assert!(line.contains("fakenode"), "{joblog}");
    assert!(!cancelled.exists(), "nothing to cancel after a success");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_state_directory_someone_else_could_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    // What another user of a shared directory such as /tmp could plant: a link to a
    // directory of theirs, or a directory anyone may write to.
    let dir = scratch_dir("state-refused");
    let path = fake_slurm(
        &dir,
        &[
            ("scontrol", "echo 'MaxArraySize = 1001'"),
            ("sbatch", "echo sbatch >> submitted; echo 42"),
        ],
    );
    // Runs the sweep, which must be refused with `reasons` in its message, leaving `empty`
    // empty.
    let refused = |reasons: &[&str], empty: &Path| {
        let out = run(gpuproc_with_path(
            &dir,
            &path,
            &["--", "true {}", ":::", "1"],
        ));
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let err = stderr(&out);
        for reason in reasons {
            assert!(err.contains(reason), "{reason:?} not in: {err}");
        }
        let written = std::fs::read_dir(empty).expect("read_dir").count();
        assert_eq!(written, 0, "nothing may be written in {}", empty.display());
    };
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("elsewhere");
    let base = dir.join(".gpuproc-slurm");
    std::os::unix::fs::symlink(&elsewhere, &base).expect("plant a link");
    refused(&[".gpuproc-slurm", "not a directory"], &elsewhere);

    std::fs::remove_file(&base).unwrap();
    std::fs::create_dir(&base).unwrap();
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o1777)).unwrap();
    refused(&["mode 1777", "chmod go-w"], &base);
    assert!(!dir.join("submitted").exists(), "nothing was submitted");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_wrapper_stops_a_job_at_its_timeout() {
    let Some(cluster) = cluster("timeout") else {
        return;
    };
    let dir = scratch_dir("timeout");
    let out = run(cluster.gpuproc_run(
        &dir,
        &[
            "--cpu-only",
            "--timeout",
            "1",
            "--kill-after",
            "1",
            "--joblog",
            "jobs.tsv",
            "--",
            "sleep {}",
            ":::",
            "0",
            "30",
        ],
    ));
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("job 2 timed out (killed by signal 15)"),
        "{err}"
    );
    assert!(err.contains("1 succeeded, 1 failed"), "{err}");
    let mut log: Vec<(usize, i32, i32)> = joblog(&dir.join("jobs.tsv"))
        .iter()
        .map(|l| (l.0, l.2, l.3))
        .collect();
    log.sort_unstable();
    assert_eq!(log, vec![(1, 0, 0), (2, -1, 15)]);
    assert_eq!(cluster.jobs(ACTIVE), "");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn ctrl_c_stops_the_steps_of_an_allocation() {
    let Some(cluster) = cluster("steps-ctrl-c") else {
        return;
    };
    let dir = scratch_dir("steps-ctrl-c");
    let mut salloc = Command::new("salloc");
    sim_env(&mut salloc, "4gpu", Some(&dir));
    salloc
        .current_dir(&dir)
        .args(["-N1", "-n4", "--gres=gpu:4"])
        .arg(format!("--job-name={}", cluster.job_name))
        .arg(env!("CARGO_BIN_EXE_gpuproc"))
        .args([
            "run", "--slurm", "--logs", "logs", "--joblog", "jobs.tsv", "--",
        ])
        .args([
            "echo started {}; exec sleep 60",
            ":::",
            "1",
            "2",
            "3",
            "4",
            "5",
        ]);
    let mut salloc = Background::start_in_group(salloc);
    salloc.stderr_until("Granted job allocation");
    // Four steps run (the allocation's four GPUs), the fifth job waits.
    let logs = dir.join("logs");
    wait_for(DEADLINE, "4 jobs started", || {
        let started = (1..=5)
            .filter(|i| {
                std::fs::read_to_string(logs.join(format!("{i}.out")))
                    .is_ok_and(|t| t.starts_with("started"))
            })
            .count();
        (started == 4).then_some(())
    });
    let runner = common::children_of(salloc.pid())
        .into_iter()
        .find(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "gpuproc")
        })
        .expect("gpuproc under salloc");
    signal(runner, Signal::INT);
    let status = salloc.wait();
    let err = salloc.stderr();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted: starting no more jobs; stopping 4 running steps"),
        "{err}"
    );
    // srun passed SIGTERM on; each job's wrapper recorded it.
    let log = joblog(&dir.join("jobs.tsv"));
    assert_eq!(log.len(), 4, "{log:?}");
    assert!(log.iter().all(|l| (l.2, l.3) == (-1, 15)), "{log:?}");
    assert!(err.contains("1 not run (interrupted)"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn more_jobs_than_max_array_size_go_in_several_arrays() {
    let dir = scratch_dir("fake-chunks");
    let arrays = dir.join("arrays");
    // sbatch runs every task at once, here, through the wrapper; squeue then lists none.
    let sbatch = format!(
        r#"n=$(cat '{count}' 2>/dev/null || echo 0); echo $((n + 1)) > '{count}'
for a in "$@"; do
  case $a in --array=*) spec=${{a#--array=}} ;; esac
  [ "$prev" = --wrap ] && wrap=$a
  prev=$a
done
echo "$spec" >> '{arrays}'
range=${{spec%%%*}}; last=${{range#*-}}
i=0; while [ $i -le $last ]; do SLURM_ARRAY_TASK_ID=$i sh -c "$wrap"; i=$((i + 1)); done
echo $((100 + n))"#,
        count = dir.join("count").display(),
        arrays = arrays.display()
    );
    let path = fake_slurm(
        &dir,
        &[
            ("scontrol", "echo 'MaxArraySize = 2'"),
            ("sbatch", &sbatch),
            ("squeue", "exit 0"),
        ],
    );
    let out = run(gpuproc_with_path(
        &dir,
        &path,
        &[
            "--max-running",
            "2",
            "--joblog",
            "jobs.tsv",
            "--",
            "echo {}",
            ":::",
            "1",
            "2",
            "3",
            "4",
            "5",
        ],
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    let submitted = std::fs::read_to_string(&arrays).unwrap_or_default();
    assert_eq!(submitted, "0-1%2\n0-1%2\n0%2\n");
    let mut printed: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    printed.sort();
    assert_eq!(printed, ["1", "2", "3", "4", "5"]);
    let seqs: BTreeSet<usize> = joblog(&dir.join("jobs.tsv")).iter().map(|l| l.0).collect();
    assert_eq!(seqs, (1..=5).collect());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_wrapper_records_each_jobs_gpu_accounting() {
    let Some(cluster) = cluster("accounting") else {
        return;
    };
    let dir = scratch_dir("accounting");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    // Each job holds 1 GiB of its GPU's simulated memory for 3.5 s.
    let hold = r#"printf 1073741824 > "$NVML_SIM_STATE_DIR/.h.$$" && mv "$NVML_SIM_STATE_DIR/.h.$$" "$NVML_SIM_STATE_DIR/$CUDA_VISIBLE_DEVICES-$$" && sleep 3.5 # {}"#;
    let mut cmd = cluster.gpuproc_run(
        &dir,
        &[
            "--gpus-per-job",
            "1",
            "--json",
            "--joblog",
            "jobs.tsv",
            "--",
            hold,
            ":::",
            "a",
            "b",
        ],
    );
    cmd.env("NVML_SIM_STATE_DIR", &state);
    let out = run(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let json: serde_json::Value =
        serde_json::from_str(text.lines().last().unwrap_or_default()).expect("a JSON summary");
    // The `4gpu` scenario's utilisation and power, by GPU.
    let busy = [12.0, 57.0, 0.0, 98.0];
    let watts = [143.0, 388.0, 72.0, 655.0];
    let jobs = json["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 2, "{json}");
    for job in jobs {
        assert_eq!(job["status"], "succeeded", "{json}");
        assert_eq!(job["node"], "localhost", "{json}");
        let gpu = job["gpus"][0].as_u64().expect("a GPU") as usize;
        let g = &job["gpu"];
        assert_eq!(g["peak_memory"], 1u64 << 30, "{json}");
        assert_eq!(g["mean_memory"], 1u64 << 30, "{json}");
        assert_eq!(g["mean_sm_percent"], busy[gpu], "{json}");
        assert_eq!(g["shared"], false, "{json}");
        let (first, last) = (g["first_ms"].as_u64(), g["last_ms"].as_u64());
        let window = last.zip(first).map(|(l, f)| l - f).expect("a window") as f64;
        let energy = g["energy_mj"].as_u64().expect("energy: alone on its GPU") as f64;
        assert!(
            window > 0.0 && (energy - watts[gpu] * window).abs() <= watts[gpu] * 500.0,
            "{json}"
        );
    }
    // The job log has the same figures after GNU parallel's columns.
    let text = std::fs::read_to_string(dir.join("jobs.tsv")).expect("job log");
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f[11..13], ["1073741824", "1073741824"], "{line:?}");
        let gpu: usize = f[1]
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .parse()
            .expect("NODE/GPU");
        assert_eq!(f[13], format!("{:.1}", busy[gpu]), "{line:?}");
        assert!(!f[14].is_empty(), "{line:?}");
    }
    assert_eq!(cluster.jobs(ACTIVE), "");
    let _ = std::fs::remove_dir_all(dir);
}
