//! Process start+join latency for a trivial target: gpuproc's start methods against a raw
//! `fork()` + `_exit()` + `waitpid()` loop and Python's `multiprocessing`, in one run.
//!
//! Every method is timed per iteration (start to join, the child returning its argument),
//! after a warm-up that is not counted (the fork server starts on first use):
//! - raw fork: `fork()`, the child calls `_exit(0)` at once, the parent `waitpid()`s;
//! - gpuproc `ForkServer`, `Fork`, `Spawn`: `Process::new(noop, i)`, `start()`, `join()`;
//! - Python: `benchmarks/process/bench_process.py`, `ctx.Process(target=noop).start(); .join()`
//!   for the fork, forkserver and spawn contexts; it prints its samples as JSON.
//!
//! The table gives mean, p50 and p95 per start+join, the ratio to raw fork, and how many times
//! faster than Python's spawn and fork each method is. The targets (issue 2): ForkServer within
//! 3x of raw fork; every gpuproc start method at least 20x faster than Python's spawn and no
//! slower than Python's fork.
//!
//! This process stays single-threaded throughout, so that `Fork` is allowed.
//!
//! Usage: `bench_process [N] [--only NAME,...]` (N defaults to 1000): raw fork runs 2N iterations, gpuproc fork and
//! forkserver N, gpuproc spawn N/5, Python fork N/5, forkserver N/20, spawn N/25 (at least 10
//! each). `--only` keeps the methods whose row name contains one of the NAMEs (for profiling
//! one method, e.g. `--only "gpuproc forkserver"`). Python from `$GPUPROC_PYTHON`, else `<workspace>/.venv/bin/python`, else `python3`.

use std::path::Path;
use std::time::Instant;

use gpuproc::{Process, StartMethod};

fn noop(x: u64) -> u64 {
    x
}

/// Latency samples of one method, in microseconds.
#[derive(Debug, Clone)]
struct Series {
    name: String,
    samples_us: Vec<f64>,
}

impl Series {
    fn sorted(&self) -> Vec<f64> {
        let mut s = self.samples_us.clone();
        s.sort_by(f64::total_cmp);
        s
    }
    fn mean(&self) -> f64 {
        self.samples_us.iter().sum::<f64>() / self.samples_us.len().max(1) as f64
    }
    /// Nearest-rank percentile.
    fn percentile(&self, q: f64) -> f64 {
        let s = self.sorted();
        if s.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
        s[rank - 1]
    }
}

fn time_loop(name: &str, warmup: usize, iterations: usize, mut once: impl FnMut(u64)) -> Series {
    for i in 0..warmup {
        once(i as u64);
    }
    let mut samples_us = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let t = Instant::now();
        once(i as u64);
        samples_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Series {
        name: name.to_string(),
        samples_us,
    }
}

fn raw_fork_once() {
    // SAFETY: this process is single-threaded (checked in main), and the child only calls
    // `_exit`, which is async-signal-safe.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        // SAFETY: `_exit` is always safe to call; it ends the child at once.
        0 => unsafe { libc::_exit(0) },
        _ => {
            let mut status = 0;
            // SAFETY: waits for our own child; `status` is a valid out-pointer.
            let r = unsafe { libc::waitpid(pid, &mut status, 0) };
            assert_eq!(r, pid, "waitpid: {}", std::io::Error::last_os_error());
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "raw child ended with status {status:#x}"
            );
        }
    }
}

fn gpuproc_once(method: StartMethod, i: u64) {
    let mut p = Process::new(noop, i).with_start_method(method);
    p.start()
        .unwrap_or_else(|e| panic!("gpuproc {} start: {e}", method.name()));
    let r = p
        .join()
        .unwrap_or_else(|e| panic!("gpuproc {} join: {e}", method.name()));
    assert_eq!(r, i);
}

/// Runs the Python anchor; `Err` says why there are no Python figures.
fn run_python(
    script: &Path,
    fork: usize,
    forkserver: usize,
    spawn: usize,
) -> Result<(String, Vec<Series>), String> {
    #[derive(serde::Deserialize)]
    struct PyResult {
        method: String,
        samples_us: Vec<f64>,
    }
    #[derive(serde::Deserialize)]
    struct PyOut {
        python: String,
        results: Vec<PyResult>,
    }
    let args = [
        "--fork".to_string(),
        fork.to_string(),
        "--forkserver".to_string(),
        forkserver.to_string(),
        "--spawn".to_string(),
        spawn.to_string(),
    ];
    let parsed: PyOut = gpuproc_benchmarks::run_python_json(script, &args)?;
    let series = parsed
        .results
        .into_iter()
        .map(|r| Series {
            name: format!("python {}", r.method),
            samples_us: r.samples_us,
        })
        .collect();
    Ok((parsed.python, series))
}

fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn ratio(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}x")
    } else {
        "-".into()
    }
}

fn main() {
    gpuproc::init();
    let usage = || -> ! {
        eprintln!(
            "usage: bench_process [N] [--only NAME[,NAME...]]\n  N: base iteration count (default 1000)\n  \
             --only: run only the methods whose row name contains one of the NAMEs \
             (e.g. raw, \"gpuproc forkserver\", python)"
        );
        std::process::exit(2)
    };
    let mut n: usize = 1000;
    let mut only: Vec<String> = Vec::new();
    let mut argv = std::env::args().skip(1);
    while let Some(a) = argv.next() {
        match a.as_str() {
            "--only" => {
                let list = argv.next().unwrap_or_else(|| usage());
                only.extend(list.split(',').map(|w| w.trim().to_string()));
            }
            "-h" | "--help" => usage(),
            _ => n = a.parse().unwrap_or_else(|_| usage()),
        }
    }
    const NAMES: [&str; 7] = [
        "raw fork+_exit+waitpid",
        "gpuproc forkserver",
        "gpuproc fork",
        "gpuproc spawn",
        "python fork",
        "python forkserver",
        "python spawn",
    ];
    // A NAME that is a whole row name selects that row only; otherwise, every row containing it.
    let wanted = |name: &str| {
        only.is_empty()
            || only.iter().any(|w| {
                if NAMES.contains(&w.as_str()) {
                    name == w
                } else {
                    name.contains(w.as_str())
                }
            })
    };
    let at_least = |k: usize| k.max(10);
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = manifest.join("process/bench_process.py");
    let python = gpuproc_benchmarks::python();
    assert_eq!(
        thread_count(),
        1,
        "the benchmark must stay single-threaded for raw fork and gpuproc Fork"
    );

    let started = Instant::now();
    let mut rows: Vec<Series> = Vec::new();
    let raw_name = NAMES[0];
    if wanted(raw_name) {
        rows.push(time_loop(raw_name, 20, at_least(2 * n), |_| {
            raw_fork_once()
        }));
    }
    for (method, iters) in [
        (StartMethod::ForkServer, at_least(n)),
        (StartMethod::Fork, at_least(n)),
        (StartMethod::Spawn, at_least(n / 5)),
    ] {
        let name = format!("gpuproc {}", method.name());
        if wanted(&name) {
            rows.push(time_loop(&name, 10, iters, |i| gpuproc_once(method, i)));
        }
    }
    let rust_secs = started.elapsed().as_secs_f64();
    let py_started = Instant::now();
    let py_iters = |method: &str, k: usize| {
        if wanted(&format!("python {method}")) {
            at_least(k)
        } else {
            0
        }
    };
    let (py_fork_n, py_fs_n, py_spawn_n) = (
        py_iters("fork", n / 5),
        py_iters("forkserver", n / 20),
        py_iters("spawn", n / 25),
    );
    let py = if py_fork_n + py_fs_n + py_spawn_n > 0 {
        run_python(&script, py_fork_n, py_fs_n, py_spawn_n)
    } else {
        Err("not selected by --only".into())
    };
    let py_secs = py_started.elapsed().as_secs_f64();
    let py_version = match py {
        Ok((version, series)) => {
            rows.extend(series);
            Some(version)
        }
        Err(why) => {
            eprintln!("bench_process: no Python figures: {why}");
            None
        }
    };

    let mean_of = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .map_or(f64::NAN, Series::mean)
    };
    let raw = mean_of(raw_name);
    let py_spawn = mean_of("python spawn");
    let py_fork = mean_of("python fork");

    println!("Process start+join latency, trivial target (noop(x: u64) -> u64)");
    println!(
        "cpus: {}, python: {} ({}), gpuproc+raw {:.1} s, python {:.1} s",
        gpuproc::cpu_count(),
        python.display(),
        py_version.as_deref().unwrap_or("unavailable"),
        rust_secs,
        py_secs
    );
    println!();
    println!(
        "{:<24} {:>6} {:>10} {:>10} {:>10} {:>9} {:>12} {:>11}",
        "method", "iters", "mean µs", "p50 µs", "p95 µs", "/raw fork", "py spawn/it", "py fork/it"
    );
    for r in &rows {
        let mean = r.mean();
        println!(
            "{:<24} {:>6} {:>10.1} {:>10.1} {:>10.1} {:>9} {:>12} {:>11}",
            r.name,
            r.samples_us.len(),
            mean,
            r.percentile(0.50),
            r.percentile(0.95),
            ratio(mean / raw),
            ratio(py_spawn / mean),
            ratio(py_fork / mean),
        );
    }
    println!();
    println!("(/raw fork: mean over raw fork's mean, lower is better; py spawn/it and py fork/it:");
    println!(
        " Python's mean over this method's mean, i.e. how many times faster, higher is better)"
    );
    println!();
    println!("Targets (mean; p50 in brackets):");
    let p50_of = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .map_or(f64::NAN, |r| r.percentile(0.5))
    };
    let check = |what: String, mean: f64, p50: f64, ok: fn(f64) -> bool| {
        let verdict = if !mean.is_finite() {
            "not measured"
        } else if ok(mean) {
            "met"
        } else {
            "MISSED"
        };
        println!(
            "  {what:<50} {:>8} [{:>8}] -> {verdict}",
            ratio(mean),
            ratio(p50)
        );
    };
    let fs = "gpuproc forkserver";
    check(
        format!("{fs} / raw fork <= 3x"),
        mean_of(fs) / raw,
        p50_of(fs) / p50_of(raw_name),
        |r| r <= 3.0,
    );
    for m in StartMethod::all() {
        let name = format!("gpuproc {}", m.name());
        check(
            format!("python spawn / {name} >= 20x"),
            py_spawn / mean_of(&name),
            p50_of("python spawn") / p50_of(&name),
            |r| r >= 20.0,
        );
        check(
            format!("python fork / {name} >= 1x"),
            py_fork / mean_of(&name),
            p50_of("python fork") / p50_of(&name),
            |r| r >= 1.0,
        );
    }
}
