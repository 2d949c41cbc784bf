//! `gpuproc run --slurm` against hand-written Slurm job runners, on the local cluster of
//! `scripts/slurm-local` (one node, 8 CPUs, 4 fake GPUs), N trivial jobs (`echo I`) each,
//! in the same run:
//!
//! - `gpuproc run --slurm --cpu-only` outside an allocation: one job array (`sbatch
//!   --array`), tracked with one `squeue` per poll;
//! - `gpuproc run --slurm --cpu-only` inside `salloc -n 8`: one `srun --exact` step per job,
//!   8 at once;
//! - a hand-written `sbatch --array=0-N --wrap 'echo ...'` and a loop polling `squeue` for
//!   the array every 0.25 s until it is gone (the cluster has no slurmdbd, so no `sacct`);
//! - GNU parallel driving `srun` inside `salloc -n 8`: `parallel -j 8 srun --exact -N1 -n1
//!   --cpus-per-task=1 echo {}`.
//!
//! Columns: total seconds, jobs/s, time to the first result (the first job's output
//! reaching the runner's standard output; for the hand-written array, the first poll that
//! finds a task gone), and jobs/s against each anchor. No timed assertions: the figures are
//! the result.
//!
//! Each row runs `R` times (`--runs R`, default 1), the rows interleaved so that a noisy
//! moment hurts every row alike; the table shows the medians.
//!
//! Usage: `bench_slurm [--scale N] [--runs R]` (default 1000 jobs, 1 run). Needs the cluster up
//! (`eval "$(scripts/slurm-local up)"`, which sets `SLURM_CONF`) and `gpuproc` built in the
//! same profile: `cargo build --release -p gpuproc-cli`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Total seconds and seconds to the first result.
struct Timing {
    total: f64,
    first: f64,
}

/// Runs `command`, timing it and its first line of standard output.
fn time_first_line(mut command: Command) -> Timing {
    let start = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut first = None;
        let mut lines = 0usize;
        for line in BufReader::new(stdout).lines() {
            if line.is_err() {
                break;
            }
            first.get_or_insert_with(|| start.elapsed().as_secs_f64());
            lines += 1;
        }
        let _ = tx.send((first, lines));
    });
    let status = child.wait().expect("wait");
    let total = start.elapsed().as_secs_f64();
    let (first, lines) = rx.recv().unwrap_or((None, 0));
    let _ = reader.join();
    assert!(status.success(), "{command:?} failed: {status}");
    assert!(lines > 0, "{command:?} printed nothing");
    Timing {
        total,
        first: first.unwrap_or(total),
    }
}

/// The hand-written anchor: `sbatch --array` and a `squeue` loop.
fn hand_written_array(jobs: usize, dir: &Path) -> Timing {
    let start = Instant::now();
    let out = Command::new("sbatch")
        .current_dir(dir)
        .args([
            "--parsable",
            "--job-name=bench-slurm-array",
            "--output=/dev/null",
        ])
        .arg(format!("--array=0-{}", jobs - 1))
        .args(["--wrap", "echo $SLURM_ARRAY_TASK_ID"])
        .stdin(Stdio::null())
        .output()
        .expect("sbatch");
    assert!(
        out.status.success(),
        "sbatch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap_or_default()
        .to_owned();
    let mut first = None;
    loop {
        let out = Command::new("squeue")
            .args(["-h", "-r", "-o", "%i", "-j", &id])
            .stdin(Stdio::null())
            .output()
            .expect("squeue");
        let left = String::from_utf8_lossy(&out.stdout).lines().count();
        if left < jobs {
            first.get_or_insert_with(|| start.elapsed().as_secs_f64());
        }
        if left == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let total = start.elapsed().as_secs_f64();
    Timing {
        total,
        first: first.unwrap_or(total),
    }
}

fn main() {
    let mut jobs = 1000usize;
    let mut runs = 1usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--scale" => {
                jobs = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .expect("--scale N: a positive number of jobs");
            }
            "--runs" => {
                runs = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .expect("--runs R: a positive number of runs");
            }
            other => {
                panic!("unknown argument {other:?}; usage: bench_slurm [--scale N] [--runs R]")
            }
        }
    }
    assert!(
        std::env::var_os("SLURM_CONF").is_some(),
        "no SLURM_CONF: start the local cluster with `eval \"$(scripts/slurm-local up)\"`"
    );
    let exe = std::env::current_exe().expect("current exe");
    let gpuproc = exe.parent().expect("exe dir").join("gpuproc");
    assert!(
        gpuproc.is_file(),
        "{} not found: cargo build --release -p gpuproc-cli",
        gpuproc.display()
    );
    let dir = std::env::temp_dir().join(format!("gpuproc-bench-slurm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let job_file = dir.join("jobs.txt");
    let lines: String = (0..jobs).map(|i| format!("echo {i}\n")).collect();
    std::fs::write(&job_file, lines).expect("job file");

    let salloc = || {
        let mut c = Command::new("salloc");
        c.current_dir(&dir)
            .args(["-N1", "-n8", "--job-name=bench-slurm-steps"]);
        c
    };
    let gpuproc_args = |c: &mut Command| {
        c.args([
            "run",
            "--slurm",
            "--cpu-only",
            "--quiet",
            "--summary",
            "none",
            "-f",
        ])
        .arg(&job_file);
    };

    let have_parallel = Command::new("parallel")
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"GNU parallel"));
    if !have_parallel {
        eprintln!("GNU parallel not found (scripts/sysdeps installs it): its row is missing");
    }
    let names = [
        "gpuproc run --slurm (array)",
        "gpuproc run --slurm (steps, salloc -n8)",
        "sbatch --array + squeue loop",
        "GNU parallel -j 8 srun (salloc -n8)",
    ];
    let mut samples: Vec<Vec<Timing>> = names.iter().map(|_| Vec::new()).collect();
    eprintln!("bench_slurm: {jobs} jobs per row, {runs} run(s)");
    for run in 1..=runs {
        let mut array = Command::new(&gpuproc);
        array.current_dir(&dir);
        gpuproc_args(&mut array);
        samples[0].push(time_first_line(array));

        let mut steps = salloc();
        steps.arg(&gpuproc);
        gpuproc_args(&mut steps);
        samples[1].push(time_first_line(steps));

        samples[2].push(hand_written_array(jobs, &dir));

        if have_parallel {
            let mut gnu = salloc();
            gnu.args([
                "parallel",
                "-j",
                "8",
                "srun",
                "--exact",
                "-N1",
                "-n1",
                "--cpus-per-task=1",
                "echo",
                ":::",
            ])
            .args((0..jobs).map(|i| i.to_string()));
            samples[3].push(time_first_line(gnu));
        }
        let this_run: Vec<String> = samples
            .iter()
            .zip(names)
            .filter_map(|(s, name)| {
                s.last()
                    .map(|t| format!("{name}: {:.2} s, first {:.2} s", t.total, t.first))
            })
            .collect();
        eprintln!(
            "bench_slurm: run {run} of {runs} done: {}",
            this_run.join("; ")
        );
    }
    let median = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    };
    let rows: Vec<(&str, Timing)> = names
        .iter()
        .zip(&samples)
        .filter(|(_, t)| !t.is_empty())
        .map(|(name, t)| {
            let total: Vec<f64> = t.iter().map(|t| t.total).collect();
            let first: Vec<f64> = t.iter().map(|t| t.first).collect();
            (
                *name,
                Timing {
                    total: median(&total),
                    first: median(&first),
                },
            )
        })
        .collect();

    let rate = |name: &str| {
        rows.iter()
            .find(|(n, _)| n.starts_with(name))
            .map(|(_, t)| jobs as f64 / t.total)
    };
    let sbatch = rate("sbatch");
    let parallel = rate("GNU");
    println!("{jobs} jobs of `echo I` on the local Slurm (1 node, 8 CPUs), median of {runs}");
    println!(
        "{:<40} {:>9} {:>8} {:>12} {:>10} {:>12}",
        "runner", "seconds", "jobs/s", "first (s)", "vs sbatch", "vs parallel"
    );
    for (name, t) in &rows {
        let r = jobs as f64 / t.total;
        let vs = |anchor: Option<f64>| anchor.map_or("-".to_owned(), |a| format!("{:.2}x", r / a));
        println!(
            "{name:<40} {:>9.2} {r:>8.1} {:>12.2} {:>10} {:>12}",
            t.total,
            t.first,
            vs(sbatch),
            vs(parallel)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
