//! Job-runner throughput: `gpuproc run` against GNU parallel, 10,000 trivial jobs (`true`)
//! on 2 slots, in the same run.
//!
//! Rows:
//! - `gpuproc run --cpu-only -j 2 -f jobs.txt` (no NVML at all);
//! - `gpuproc run --gpus 0,1 -f jobs.txt` on the simulated 4-GPU machine (2 GPU slots, each
//!   job gets CUDA_VISIBLE_DEVICES);
//! - `parallel -j 2 < jobs.txt` (GNU parallel, Debian package `parallel`).
//!
//! Every runner's standard error goes to /dev/null (gpuproc prints a line per job when it is
//! not a terminal; GNU parallel prints nothing). Each row runs `RUNS` times; the table shows
//! the best and median jobs/s and the ratio of medians against GNU parallel.
//!
//! Usage: `bench_run [JOBS] [RUNS]` (defaults 10000 and 3). The `gpuproc` binary must be
//! built in the same profile: `cargo build --release -p gpuproc-cli -p nvml-sim`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let jobs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let exe = std::env::current_exe().expect("current exe");
    let bin_dir = exe.parent().expect("exe dir").to_path_buf();
    let gpuproc = bin_dir.join("gpuproc");
    assert!(
        gpuproc.is_file(),
        "{} not found: cargo build --release -p gpuproc-cli -p nvml-sim",
        gpuproc.display()
    );
    let lib = nvml_sim::library_path()
        .or_else(|| {
            let lib = bin_dir.join("deps/libnvml_sim.so");
            lib.is_file().then_some(lib)
        })
        .expect("libnvml_sim.so not found: cargo build --release -p nvml-sim");

    let scratch = std::env::temp_dir().join(format!("gpuproc-bench-run-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let job_file = scratch.join("jobs.txt");
    std::fs::write(&job_file, "true\n".repeat(jobs)).expect("job file");

    // GNU parallel only: moreutils installs another `parallel` with other options.
    let have_parallel = Command::new("parallel")
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"GNU parallel"));

    let mut rows: Vec<(&str, Vec<f64>)> = Vec::new();
    let time = |mut cmd: Command, stdin_file: Option<&PathBuf>| -> f64 {
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        if let Some(f) = stdin_file {
            cmd.stdin(std::fs::File::open(f).expect("open jobs"));
        } else {
            cmd.stdin(Stdio::null());
        }
        let start = Instant::now();
        let status = cmd.status().expect("run the runner");
        let secs = start.elapsed().as_secs_f64();
        assert!(status.success(), "{cmd:?} failed: {status}");
        jobs as f64 / secs
    };
    let gpuproc_cpu = || {
        let mut c = Command::new(&gpuproc);
        c.args(["run", "--cpu-only", "-j", "2", "--summary", "none", "-f"])
            .arg(&job_file);
        c
    };
    let gpuproc_gpu = || {
        let mut c = Command::new(&gpuproc);
        c.env("GPUPROC_NVML_LIB", &lib)
            .env("NVML_SIM_SCENARIO", "4gpu")
            .args(["run", "--gpus", "0,1", "--summary", "none", "-f"])
            .arg(&job_file);
        c
    };
    let parallel = || {
        let mut c = Command::new("parallel");
        c.args(["-j", "2"]);
        c
    };
    let mut cpu = Vec::new();
    let mut gpu = Vec::new();
    let mut gnu = Vec::new();
    // Interleaved, so that a noisy moment hurts every row alike.
    for _ in 0..runs {
        cpu.push(time(gpuproc_cpu(), None));
        gpu.push(time(gpuproc_gpu(), None));
        if have_parallel {
            gnu.push(time(parallel(), Some(&job_file)));
        }
    }
    rows.push(("gpuproc run --cpu-only -j 2", cpu));
    rows.push(("gpuproc run --gpus 0,1 (simulated)", gpu));
    if have_parallel {
        rows.push(("GNU parallel -j 2", gnu));
    } else {
        eprintln!("GNU parallel not found (scripts/sysdeps installs it): its row is missing");
    }

    let median = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    };
    let anchor = rows
        .iter()
        .find(|(name, _)| name.starts_with("GNU"))
        .map(|(_, v)| median(v));
    println!("{jobs} jobs of `true` on 2 slots, {runs} runs each");
    println!(
        "{:<36} {:>12} {:>12} {:>14}",
        "runner", "best jobs/s", "median", "vs GNU parallel"
    );
    for (name, samples) in &rows {
        let best = samples.iter().copied().fold(0.0, f64::max);
        let med = median(samples);
        let ratio = anchor.map_or("-".to_owned(), |a| format!("{:.2}x", med / a));
        println!("{name:<36} {best:>12.0} {med:>12.0} {ratio:>14}");
    }
    let _ = std::fs::remove_dir_all(&scratch);
}
