//! The project's local Slurm cluster (`scripts/slurm-local`: one node on 127.0.0.1, 4 fake
//! GPUs, no cgroups unless `GPUPROC_SLURM_CGROUP=1`), shared by the Slurm test files: a test takes the cluster with
//! [`cluster`], names its jobs after itself, and its jobs are cancelled (and waited for)
//! when the [`Cluster`] is dropped, even when the test fails.
#![allow(dead_code)] // Each test file uses only some of these.

use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::{run, stderr, stdout, DEADLINE};

/// The UUIDs of the bundled `4gpu` scenario, GPU 0 first.
pub const FOUR: [&str; 4] = [
    "GPU-0a4f2e61-3c1b-4d2e-9f00-1b2c3d4e5f60",
    "GPU-1b5f3f72-4d2c-4e3f-8a11-2c3d4e5f6071",
    "GPU-2c6a4a83-5e3d-4f4a-9b22-3d4e5f607182",
    "GPU-3d7b5b94-6f4e-4a5b-8c33-4e5f60718293",
];

/// Job states in which a job still holds (or waits for) the node.
pub const ACTIVE: &str = "PD,CF,R,S,CG";

/// Held by the test using the cluster.
static NODE: Mutex<()> = Mutex::new(());

/// The local cluster, for one test.
pub struct Cluster {
    pub job_name: String,
    _node: MutexGuard<'static, ()>,
}

/// The cluster for `test`; `None` (with a note) when `GPUPROC_SLURM=0`. Without
/// `GPUPROC_SLURM` the test fails and says how to start the cluster. The cluster must be
/// the default one, without cgroups.
pub fn cluster(test: &str) -> Option<Cluster> {
    let (cluster, confined) = cluster_in_either_mode(test)?;
    // With cgroups Slurm numbers each job's GPUs from 0: these tests expect the node's
    // numbers in CUDA_VISIBLE_DEVICES.
    assert!(
        !confined,
        "the Slurm tests need a cluster without cgroups: `scripts/slurm-local up` without \
         GPUPROC_SLURM_CGROUP"
    );
    Some(cluster)
}

/// As [`cluster`], with or without device confinement (`GPUPROC_SLURM_CGROUP=1`): the
/// cluster, and whether its jobs are confined to their GPUs (`TaskPlugin=task/cgroup`).
pub fn cluster_in_either_mode(test: &str) -> Option<(Cluster, bool)> {
    match std::env::var("GPUPROC_SLURM").as_deref() {
        Ok("1") => {}
        Ok("0") => {
            eprintln!("note: skipping {test}: GPUPROC_SLURM=0 (no local Slurm cluster)");
            return None;
        }
        _ => panic!(
            "{test} needs the local Slurm cluster: run `eval \"$(scripts/slurm-local up)\"` \
             (it sets SLURM_CONF and GPUPROC_SLURM=1), or set GPUPROC_SLURM=0 to skip the \
             Slurm tests"
        ),
    }
    let conf = std::env::var_os("SLURM_CONF")
        .expect("GPUPROC_SLURM=1 without SLURM_CONF: use `eval \"$(scripts/slurm-local env)\"`");
    let conf = std::fs::read_to_string(&conf)
        .unwrap_or_else(|e| panic!("SLURM_CONF={}: {e}", Path::new(&conf).display()));
    let confined = conf.lines().any(|l| l == "TaskPlugin=task/cgroup");
    Some((
        Cluster {
            job_name: format!("gpuproc-test-{}-{test}", std::process::id()),
            _node: NODE.lock().unwrap_or_else(PoisonError::into_inner),
        },
        confined,
    ))
}

/// The cluster's fake GPU nodes as the NVML simulator's `NVML_SIM_DEVICE_NODES` names them
/// (`<dir>/dev/nvidia{minor}`, next to the `etc/` of `SLURM_CONF`), when they are character
/// devices (`mknod` worked: a device cgroup can refuse them).
pub fn device_nodes() -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    let conf = std::path::PathBuf::from(std::env::var_os("SLURM_CONF")?);
    let dev = conf.parent()?.parent()?.join("dev");
    let all_char = (0..FOUR.len()).all(|i| {
        std::fs::metadata(dev.join(format!("nvidia{i}")))
            .is_ok_and(|m| m.file_type().is_char_device())
    });
    all_char.then(|| format!("{}/nvidia{{minor}}", dev.display()))
}

impl Cluster {
    /// The ids of this test's jobs (array tasks one per line) in `states`.
    pub fn jobs(&self, states: &str) -> String {
        let mut squeue = Command::new("squeue");
        squeue.args(["-h", "-r", "-o", "%i", "-t", states, "-n", &self.job_name]);
        let out = run(squeue);
        assert!(out.status.success(), "squeue: {}", stderr(&out));
        stdout(&out)
    }

    /// Cancels this test's jobs and waits (at most [`DEADLINE`]) until none is active;
    /// returns those still active then.
    pub fn cancel_all(&self) -> String {
        let mut scancel = Command::new("scancel");
        scancel.arg(format!("--name={}", self.job_name));
        let _ = run(scancel);
        let end = gpuproc::time::deadline(DEADLINE);
        let mut left = self.jobs(ACTIVE);
        while !left.trim().is_empty() && gpuproc::time::remaining(end) != Some(Duration::ZERO) {
            // Slurm has no call that blocks until a job has ended: poll, with a deadline.
            std::thread::sleep(Duration::from_millis(20));
            left = self.jobs(ACTIVE);
        }
        left
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let left = self.cancel_all();
        if !left.trim().is_empty() && !std::thread::panicking() {
            panic!("jobs of {} still active: {left}", self.job_name);
        }
    }
}
