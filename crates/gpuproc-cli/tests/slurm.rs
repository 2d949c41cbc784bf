//! `gpuproc` inside Slurm jobs, on the local cluster of `scripts/slurm-local` (one node on
//! 127.0.0.1 with 4 fake GPUs, no cgroups) and the NVML simulator's `4gpu` scenario: a step
//! sees only the GPUs Slurm bound to it, and the cluster runs job arrays.
//!
//! These tests need that cluster. `scripts/test` starts it; by hand, run
//! `eval "$(scripts/slurm-local up)"` first (it sets `SLURM_CONF` and `GPUPROC_SLURM=1`).
//! Without `GPUPROC_SLURM` they fail and say so; `GPUPROC_SLURM=0` skips them with a note
//! (`scripts/test` sets it where Slurm cannot run). They share the node's GPUs, so they run
//! one at a time; each names its jobs after itself and cancels them when it ends, even when it
//! fails. Every `srun`/`sbatch` runs under the deadline of `common::run`.
//!
//! Without cgroups Slurm does not renumber: `CUDA_VISIBLE_DEVICES` holds the node's GPU
//! indices (`2,3` for the second of two 2-GPU jobs), which are the simulator's NVML indices.
//! There is no slurmdbd, so no `sacct`: job states come from `scontrol`.
//!
//! `a_steps_gpus_are_found_by_uuid_whether_slurm_renumbers_or_not` also runs on the cluster
//! with device confinement (`GPUPROC_SLURM_CGROUP=1 scripts/slurm-local up`), where Slurm
//! numbers each job's GPUs from 0; the others need the default cluster.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output, Stdio};

mod common;
use common::slurm::{cluster, cluster_in_either_mode, device_nodes, Cluster, FOUR};
use common::{run, scratch_dir, sim_env, stderr, stdout, Background};

impl Cluster {
    /// `program` (`srun`, `sbatch`) for a job of this test, whose tasks run `gpuproc` on the
    /// simulator's `4gpu` scenario with the GPU lease table in `runtime`.
    fn job(&self, program: &str, runtime: &Path) -> Command {
        let mut command = Command::new(program);
        command.arg(format!("--job-name={}", self.job_name));
        // srun and sbatch pass their whole environment on to the tasks.
        sim_env(&mut command, "4gpu", Some(runtime));
        command.env("GPUPROC", env!("CARGO_BIN_EXE_gpuproc"));
        command
    }
}

/// What one task reports: Slurm's binding, then what `gpuproc pick` makes of it.
/// Line 1: `CUDA_VISIBLE_DEVICES|SLURM_STEP_GPUS|SLURM_JOB_GPUS` as Slurm set them.
/// Line 2: the error of `gpuproc pick -n 3`, one line (`|` for newlines).
/// Line 3: `gpuproc pick -n 2 --json`, one line.
/// Then it waits for standard input to close.
const REPORT: &str = r#"
echo "$CUDA_VISIBLE_DEVICES|$SLURM_STEP_GPUS|$SLURM_JOB_GPUS"
"$GPUPROC" pick -n 3 --for-pid $$ 2>&1 >/dev/null | tr '\n' '|'; echo
"$GPUPROC" pick -n 2 --json --for-pid $$ | tr -d '\n'; echo
read x || true
"#;

/// Checks one task's [`REPORT`]: Slurm bound `expected` (node GPU indices), and gpuproc
/// picked exactly those GPUs, by index and by UUID, and saw no other.
fn check_report(lines: &[String], expected: &[usize]) {
    let [binding, three, two] = lines else {
        panic!("three lines expected: {lines:?}");
    };
    let indices = expected
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",");
    // A step's own GPUs; the job's are set in batch jobs only.
    assert_eq!(binding, &format!("{indices}|{indices}|"), "Slurm's binding");

    assert!(
        three.starts_with("gpuproc: none free: 3 GPUs needed, 2 qualify"),
        "{three}"
    );
    for (i, uuid) in FOUR.iter().enumerate() {
        let hidden = format!("GPU {i} ({uuid}): not in this process's CUDA_VISIBLE_DEVICES");
        assert_eq!(three.contains(&hidden), !expected.contains(&i), "{three}");
    }

    let json: serde_json::Value =
        serde_json::from_str(two).unwrap_or_else(|e| panic!("{e}: {two:?}"));
    let devices = json["devices"].as_array().expect("devices");
    let picked: Vec<(usize, &str)> = devices
        .iter()
        .map(|d| {
            let index = d["index"].as_u64().expect("index");
            (
                usize::try_from(index).expect("index fits"),
                d["uuid"].as_str().expect("uuid"),
            )
        })
        .collect();
    let wanted: Vec<(usize, &str)> = expected.iter().map(|&i| (i, FOUR[i])).collect();
    assert_eq!(picked, wanted, "{two}");
    let uuids: Vec<&str> = wanted.iter().map(|w| w.1).collect();
    assert_eq!(json["cuda_visible_devices"], uuids.join(","), "{two}");
}

/// The next `n` lines of `task`'s output.
fn lines(task: &Background, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| task.line().expect("the task ended early"))
        .collect()
}

fn lines_of(out: &Output) -> Vec<String> {
    stdout(out).lines().map(str::to_string).collect()
}

#[test]
fn a_step_sees_only_the_gpus_slurm_bound_to_it() {
    let Some(cluster) = cluster("bound") else {
        return;
    };
    let dir = scratch_dir("bound");
    let srun = |runtime: &str| {
        let mut srun = cluster.job("srun", &dir.join(runtime));
        srun.args(["-N1", "-n1", "--gres=gpu:2", "sh", "-c", REPORT]);
        srun
    };
    // The first job holds GPUs 0 and 1 until its standard input closes...
    let mut first = Background::start(srun("first"));
    check_report(&lines(&first, 3), &[0, 1]);
    // ... so the second gets 2 and 3: gpuproc sees those two, by their NVML indices, with
    // a lease table of its own in which all four are free.
    let second = run(srun("second"));
    assert!(second.status.success(), "{}", stderr(&second));
    check_report(&lines_of(&second), &[2, 3]);
    let status = first.finish();
    assert!(status.success(), "{status:?}: {}", first.stderr());
    // (A job may still be completing a moment after srun or sbatch returns: the guard
    // waits, with a deadline, until none of this test's jobs is left.)
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn each_task_picks_the_gpu_of_gpus_per_task() {
    let Some(cluster) = cluster("per-task") else {
        return;
    };
    let dir = scratch_dir("per-task");
    let mut srun = cluster.job("srun", &dir);
    srun.args(["-N1", "-n4", "--gpus-per-task=1", "--label", "sh", "-c"])
        .arg(r#"echo "$CUDA_VISIBLE_DEVICES $("$GPUPROC" pick --for-pid $$)""#);
    let out = run(srun);
    assert!(out.status.success(), "{}", stderr(&out));
    // One line per task, `TASK: INDEX UUID`: the GPU Slurm bound is the one gpuproc picks,
    // and the four tasks have the four GPUs.
    let mut gpus = BTreeSet::new();
    let mut tasks = BTreeSet::new();
    for line in stdout(&out).lines() {
        let (task, rest) = line.split_once(": ").expect("a labelled line");
        let (index, uuid) = rest.split_once(' ').unwrap_or((rest, ""));
        let index: usize = index.parse().unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(FOUR.get(index), Some(&uuid), "{line}");
        assert!(tasks.insert(task.trim().to_string()), "{line}");
        assert!(gpus.insert(index), "GPU {index} twice: {}", stdout(&out));
    }
    assert_eq!(gpus, (0..4).collect(), "{}", stdout(&out));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_job_array_runs_and_records_each_exit_code() {
    let Some(cluster) = cluster("array") else {
        return;
    };
    let dir = scratch_dir("array");
    let mut sbatch = cluster.job("sbatch", &dir);
    sbatch
        .args(["--parsable", "--wait", "--array=0-3", "--gres=gpu:1"])
        .arg(format!("--output={}/%A_%a.out", dir.display()))
        .arg("--wrap")
        .arg(r#"echo "task $SLURM_ARRAY_TASK_ID gpu $CUDA_VISIBLE_DEVICES"; exit $SLURM_ARRAY_TASK_ID"#)
        .stdin(Stdio::null());
    let out = run(sbatch);
    // --wait returns the highest exit code of the array's tasks.
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let id = stdout(&out);
    let id = id.trim().split(';').next().unwrap_or_default().to_string();
    assert!(id.parse::<u64>().is_ok(), "sbatch --parsable: {id:?}");

    // Each task ran once with a GPU of its own, and Slurm recorded its exit code.
    for task in 0..4 {
        let path = dir.join(format!("{id}_{task}.out"));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let gpu = text
            .strip_prefix(&format!("task {task} gpu "))
            .unwrap_or_else(|| panic!("{}: {text:?}", path.display()));
        assert!(
            ["0\n", "1\n", "2\n", "3\n"].contains(&gpu),
            "{}: {text:?}",
            path.display()
        );
    }
    let mut scontrol = Command::new("scontrol");
    scontrol.args(["-o", "show", "job", &id]);
    let out = run(scontrol);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut recorded: Vec<(String, String, String)> = stdout(&out)
        .lines()
        .map(|line| {
            let field = |name: &str| {
                line.split(' ')
                    .find_map(|f| f.strip_prefix(name))
                    .unwrap_or_else(|| panic!("no {name} in {line}"))
                    .to_string()
            };
            (
                field("ArrayTaskId="),
                field("JobState="),
                field("ExitCode="),
            )
        })
        .collect();
    recorded.sort();
    let expected: Vec<(String, String, String)> = (0..4)
        .map(|task| {
            let state = if task == 0 { "COMPLETED" } else { "FAILED" };
            (task.to_string(), state.to_string(), format!("{task}:0"))
        })
        .collect();
    assert_eq!(recorded, expected);
    // (A job may still be completing a moment after srun or sbatch returns: the guard
    // waits, with a deadline, until none of this test's jobs is left.)
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn gpus_slurm_lists_the_node_gpus_with_the_job_of_a_running_process() {
    let Some(cluster) = cluster("gpus") else {
        return;
    };
    let dir = scratch_dir("gpus-slurm");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    // A job whose process holds 2 GiB of simulated GPU 1.
    let mut srun = cluster.job("srun", &dir.join("runtime"));
    srun.args([
        "-N1",
        "-n1",
        "sh",
        "-c",
        "echo $$ $SLURM_JOB_ID; exec sleep 600",
    ]);
    let task = Background::start(srun);
    let first = task.line().expect("the job started");
    let (pid, job) = first.split_once(' ').expect("pid and job id");
    let pid: u32 = pid.parse().unwrap();
    nvml_sim::state::write_allocation(&state, 1, pid, 2 << 30).unwrap();

    let mut gpus = common::sim_gpuproc("4gpu", Some(&dir.join("runtime")));
    gpus.env("NVML_SIM_STATE_DIR", &state).args([
        "gpus",
        "--slurm",
        "--json",
        "--nodes",
        "localhost",
        "--node-timeout",
        "30",
    ]);
    let out = run(gpus);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let node = &json["nodes"][0];
    assert_eq!(node["node"], "localhost", "{json}");
    let devices = node["snapshot"]["devices"].as_array().expect("a snapshot");
    assert_eq!(devices.len(), 4);
    let process = devices[1]["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap_or_else(|| panic!("pid {pid} on GPU 1: {}", devices[1]));
    assert_eq!(process["used_memory"], 2u64 << 30);
    assert_eq!(process["slurm_job"]["job_id"].to_string(), job, "{process}");
    assert_eq!(process["slurm_job"]["step"], "0");
    let me = run({
        let mut id = Command::new("id");
        id.arg("-un");
        id
    });
    assert_eq!(process["slurm_job"]["user"], stdout(&me).trim());

    // The table: the node, then its GPUs.
    let mut gpus = common::sim_gpuproc("4gpu", Some(&dir.join("runtime")));
    gpus.args(["gpus", "--slurm", "--nodes", "localhost"]);
    let out = run(gpus);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("localhost: 4 GPUs\n"),
        "{}",
        stdout(&out)
    );
    drop(task);
    let _ = std::fs::remove_dir_all(dir);
}

/// What a task of [`a_steps_gpus_are_found_by_uuid_whether_slurm_renumbers_or_not`] reports,
/// one line per way of seeing the GPUs: `LABEL|CUDA_VISIBLE_DEVICES|SLURM_STEP_GPUS|the
/// UUIDs gpuproc pick -n 2 leases|the UUIDs gpu::assigned() gives`. `plain`: the simulator
/// lists every GPU of the node; `nodes`: it lists the GPUs whose node the task may open, as
/// the driver does; `renumbered`: CUDA_VISIBLE_DEVICES numbered from 0 as Slurm does under
/// confinement, over the simulator's whole node.
const UUID_REPORT: &str = r#"
report() {
  picked=$(GPUPROC_RUNTIME_DIR="$RUNTIME/$1" "$GPUPROC" pick -n 2 --for-pid $$ 2>&1 | tr '\n' ' ')
  assigned=$(GPUPROC_TEST_ASSIGNED=1 "$TEST_EXE" --exact assigned_gpus_of_this_process \
    --nocapture --test-threads=1 2>&1 | sed -n 's/^assigned://p')
  echo "$1|$CUDA_VISIBLE_DEVICES|$SLURM_STEP_GPUS|$picked|$assigned"
}
report plain
if [ -n "$NODES" ]; then (export NVML_SIM_DEVICE_NODES="$NODES"; report nodes); fi
(export CUDA_VISIBLE_DEVICES=0,1; report renumbered)
"#;

/// Not a test on its own: run inside a Slurm step by
/// [`a_steps_gpus_are_found_by_uuid_whether_slurm_renumbers_or_not`] (with
/// `GPUPROC_TEST_ASSIGNED` set), it prints the UUIDs `gpu::assigned()` gives there.
#[test]
fn assigned_gpus_of_this_process() {
    if std::env::var_os("GPUPROC_TEST_ASSIGNED").is_none() {
        return;
    }
    let assigned = gpuproc::gpu::assigned().expect("the simulator answers");
    let uuids: Vec<String> = assigned
        .devices
        .iter()
        .map(|d| d.device.uuid.clone().unwrap_or_default())
        .collect();
    // On a line of its own: the test harness has written the test's name on this one.
    println!("\nassigned:{}", uuids.join(","));
}

#[test]
fn a_steps_gpus_are_found_by_uuid_whether_slurm_renumbers_or_not() {
    let Some((cluster, confined)) = cluster_in_either_mode("uuids") else {
        return;
    };
    if !confined {
        println!(
            "note: the cluster does not confine devices, so Slurm does not renumber: only \
             `renumbered` imitates it (`GPUPROC_SLURM_CGROUP=1 scripts/slurm-local up` runs the \
             rest under confinement)"
        );
    }
    let nodes = device_nodes();
    if nodes.is_none() {
        println!("note: the cluster's GPU nodes are not character devices (no mknod): no `nodes`");
    }
    let dir = scratch_dir("uuids");
    let srun = |runtime: &str, script: &str| {
        let mut srun = cluster.job("srun", &dir.join(runtime));
        srun.env("RUNTIME", dir.join(runtime))
            .env("NODES", nodes.as_deref().unwrap_or(""))
            .env(
                "TEST_EXE",
                std::env::current_exe().expect("this test's executable"),
            )
            .args(["-N1", "-n1", "--gres=gpu:2", "sh", "-c", script]);
        srun
    };
    // The first job holds GPUs 0 and 1 until its standard input closes, so the second gets
    // 2 and 3: Slurm's SLURM_STEP_GPUS, and under confinement CUDA_VISIBLE_DEVICES=0,1.
    let mut first = Background::start(srun("first", r#"echo "$SLURM_STEP_GPUS"; read x || true"#));
    assert_eq!(first.line().as_deref(), Some("0,1"), "{}", first.stderr());
    let second = run(srun("second", UUID_REPORT));
    assert!(second.status.success(), "{}", stderr(&second));
    let status = first.finish();
    assert!(status.success(), "{status:?}: {}", first.stderr());

    let wanted = format!("{},{}", FOUR[2], FOUR[3]);
    let cvd = if confined { "0,1" } else { "2,3" };
    let mut labels = Vec::new();
    for line in stdout(&second).lines() {
        let fields: Vec<&str> = line.split('|').collect();
        let [label, visible, step, picked, assigned] = fields[..] else {
            panic!("five fields expected: {line:?}\n{}", stderr(&second));
        };
        let visible_wanted = if label == "renumbered" { "0,1" } else { cvd };
        assert_eq!((visible, step), (visible_wanted, "2,3"), "{line}");
        assert_eq!(picked.trim(), wanted, "gpuproc pick, {label}: {line}");
        assert_eq!(assigned, wanted, "gpu::assigned(), {label}: {line}");
        labels.push(label.to_string());
    }
    let mut expected = vec!["plain", "nodes", "renumbered"];
    if nodes.is_none() {
        expected.retain(|l| *l != "nodes");
    }
    assert_eq!(labels, expected, "{}", stdout(&second));
    let _ = std::fs::remove_dir_all(dir);
}
