//! Pool throughput, latency and idle memory: gpuproc's `Pool` against Python's
//! `multiprocessing.Pool`, `concurrent.futures.ProcessPoolExecutor`, loky and the `procspawn`
//! crate's pool, in one run, all with 2 workers and the trivial task `x * x` on u64.
//!
//! Rows (each after a warm-up that is not counted):
//! - (a) N1 = 100,000 tasks with chunksize 1: gpuproc `map_chunksize(square, 0..N1, 1)`;
//!   Python `Pool.map(f, range(N1), chunksize=1)`, `ProcessPoolExecutor.map(..., chunksize=1)`,
//!   loky `get_reusable_executor(2).map(..., chunksize=1)`; procspawn `Pool::new(2)` with
//!   `pool.spawn(x, square)` per task, every handle joined (at most 512 outstanding, so that
//!   its per-task IPC channels stay within the file-descriptor limit);
//! - (b) N2 = 1,000,000 tasks with the automatic chunk size: gpuproc `map` against Python
//!   `Pool.map` (both use Python's rule, `ceil(len / (4 * workers))`);
//! - (c) 1,000 tasks that each sleep 1 ms, chunksize 1: wall time against the ideal
//!   1000 × 1 ms / 2 workers = 500 ms (Python's Pool for reference);
//! - (d) idle worker memory: the sum of Rss (and Pss) from `/proc/<pid>/smaps_rollup` of the 2
//!   workers of a warmed-up, idle pool (`pool.worker_pids()`; Python's `pool._pool`);
//! - pool start: build a pool and get the first result (`Pool::new(2)` + `apply(square, 3)`;
//!   Python `Pool(2)` + `apply`), median of several after one warm-up start.
//!
//! gpuproc's (a) and (b) and Python Pool's are each run 5 times and the median is shown;
//! futures, loky and procspawn run once. Ratios are per task (Python's µs per task over
//! this row's), so rows with different task counts compare.
//!
//! Targets (issue 4): (a) at least 10x Python's Pool and 5x procspawn; (b) at least 10x
//! Python's Pool; (c) within 1.2x of 500 ms; (d) at most 1/5 of Python's idle workers' Rss.
//!
//! Usage: `bench_pool [--scale F] [--only WHAT,...] [--no-python] [--no-procspawn]`.
//! `--scale` multiplies every task count (default 1; 0.2 for a quick look). `--only` keeps the
//! sections named: `a`, `b`, `c`, `d`, `start` (e.g. `--only a --no-python --no-procspawn`
//! to profile gpuproc's chunksize-1 map alone under `perf` or `strace -c -f`). Python from `$GPUPROC_PYTHON`, else
//! `<workspace>/.venv/bin/python`, else `python3`. About 60 s on 2 cores, most of it in
//! Python's futures and loky rows.

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use gpuproc::Pool;

const WORKERS: usize = 2;
/// procspawn handles kept outstanding at once; each holds IPC channels (file descriptors).
const PROCSPAWN_WINDOW: usize = 512;

fn square(x: u64) -> u64 {
    x * x
}

fn sleep_1ms(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(1));
    x
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn check(name: &str, out: &[u64], n: u64) {
    assert_eq!(out.len() as u64, n, "{name}: wrong number of results");
    if n > 1 {
        assert_eq!(
            out[n as usize - 1],
            (n - 1) * (n - 1),
            "{name}: wrong result"
        );
    }
}

/// (Rss, Pss) of a process in KiB, from smaps_rollup (Pss -1 when only VmRSS was readable).
fn memory_kb(pid: u32) -> (i64, i64) {
    let field = |text: &str, key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<i64>().ok())
    };
    if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
        if let (Some(r), Some(p)) = (field(&s, "Rss:"), field(&s, "Pss:")) {
            return (r, p);
        }
    }
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    (field(&s, "VmRSS:").unwrap_or(-1), -1)
}

#[derive(Debug, Default, serde::Deserialize)]
struct PyRow {
    name: String,
    tasks: u64,
    seconds: f64,
}

#[derive(Debug, Default, serde::Deserialize)]
struct PyMem {
    pid: u32,
    rss_kb: i64,
    pss_kb: i64,
}

#[derive(Debug, Default, serde::Deserialize)]
struct PyOut {
    python: String,
    start_method: String,
    loky: Option<String>,
    results: Vec<PyRow>,
    start_s: Vec<f64>,
    idle: Vec<PyMem>,
}

struct PyCounts {
    n1: u64,
    futures_n: u64,
    loky_n: u64,
    n2: u64,
    sleep_n: u64,
    starts: usize,
    reps: usize,
}

fn run_python(script: &Path, c: &PyCounts) -> Result<PyOut, String> {
    let args = [
        ("--processes", WORKERS.to_string()),
        ("--n1", c.n1.to_string()),
        ("--futures-n", c.futures_n.to_string()),
        ("--loky-n", c.loky_n.to_string()),
        ("--n2", c.n2.to_string()),
        ("--sleep-n", c.sleep_n.to_string()),
        ("--starts", c.starts.to_string()),
        ("--reps", c.reps.to_string()),
    ];
    let args: Vec<String> = args
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect();
    gpuproc_benchmarks::run_python_json(script, &args)
}

/// One throughput row: `samples` total seconds for `tasks` tasks each.
struct Row {
    name: String,
    tasks: u64,
    samples: Vec<f64>,
}

impl Row {
    fn secs(&self) -> f64 {
        median(&self.samples)
    }
    fn us_per_task(&self) -> f64 {
        self.secs() * 1e6 / self.tasks.max(1) as f64
    }
}

fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, initialised out-/in-pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn procspawn_run(pool: &procspawn::Pool, n: u64) -> f64 {
    let t = Instant::now();
    let mut pending: VecDeque<(u64, procspawn::JoinHandle<u64>)> = VecDeque::new();
    let join_one = |pending: &mut VecDeque<(u64, procspawn::JoinHandle<u64>)>| {
        let (i, h) = pending.pop_front().expect("a pending handle");
        let r = h
            .join()
            .unwrap_or_else(|e| panic!("procspawn task {i}: {e}"));
        assert_eq!(r, i * i, "procspawn task {i}: wrong result");
    };
    for i in 0..n {
        if pending.len() >= PROCSPAWN_WINDOW {
            join_one(&mut pending);
        }
        pending.push_back((i, pool.spawn(i, square)));
    }
    while !pending.is_empty() {
        join_one(&mut pending);
    }
    t.elapsed().as_secs_f64()
}

fn ratio(x: f64) -> String {
    if x.is_finite() && x < 10.0 {
        format!("{x:.2}x")
    } else if x.is_finite() {
        format!("{x:.1}x")
    } else {
        "-".into()
    }
}

fn main() {
    gpuproc::init();
    // procspawn re-runs this executable with its own marker; gpuproc's children never return
    // from gpuproc::init(), and procspawn's children see no gpuproc marker, so they pass it.
    procspawn::init();

    let usage = || -> ! {
        eprintln!(
            "usage: bench_pool [--scale F] [--only WHAT[,WHAT...]] [--no-python] [--no-procspawn]\n  \
             --scale: multiply every task count (default 1)\n  \
             --only: sections to run: a, b, c, d, start\n  \
             --no-python, --no-procspawn: leave out those baselines"
        );
        std::process::exit(2)
    };
    let mut scale = 1.0f64;
    let mut only: Vec<String> = Vec::new();
    let mut python_on = true;
    let mut procspawn_on = true;
    let mut argv = std::env::args().skip(1);
    while let Some(a) = argv.next() {
        match a.as_str() {
            "--scale" => {
                scale = argv
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|v: &f64| *v > 0.0)
                    .unwrap_or_else(|| usage())
            }
            "--only" => {
                let list = argv.next().unwrap_or_else(|| usage());
                only.extend(list.split(',').map(|w| w.trim().to_string()));
            }
            "--no-python" => python_on = false,
            "--no-procspawn" => procspawn_on = false,
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    let wanted = |what: &str| only.is_empty() || only.iter().any(|w| w == what);
    let scaled = |n: u64| ((n as f64 * scale).round() as u64).max(10);
    let n1 = scaled(100_000);
    let n2 = scaled(1_000_000);
    let sleep_n = scaled(1000);
    let procspawn_n = scaled(100_000);
    let starts = 5;
    let reps = 5;

    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = manifest.join("pool/bench_pool.py");
    let python = gpuproc_benchmarks::python();
    raise_nofile_limit();

    let started = Instant::now();
    // Pool start: build + first result. The first start is a warm-up (it also starts the
    // fork server).
    let mut start_s = Vec::new();
    let mut cold_start_s = f64::NAN;
    if wanted("start") {
        for i in 0..=starts {
            let t = Instant::now();
            let pool = Pool::new(WORKERS).expect("gpuproc pool");
            let r = pool.apply(square, 3).expect("gpuproc apply");
            let s = t.elapsed().as_secs_f64();
            assert_eq!(r, 9);
            drop(pool);
            if i == 0 {
                cold_start_s = s;
            } else {
                start_s.push(s);
            }
        }
    }

    let pool = Pool::new(WORKERS).expect("gpuproc pool");
    let warm = pool
        .map_chunksize(square, 0..2000u64, 1)
        .expect("gpuproc warm-up");
    check("gpuproc warm-up", &warm, 2000);

    let mut idle_kb: Vec<(u32, i64, i64)> = Vec::new();
    if wanted("d") {
        std::thread::sleep(Duration::from_millis(300));
        idle_kb = pool
            .worker_pids()
            .into_iter()
            .map(|pid| {
                let (r, p) = memory_kb(pid);
                (pid, r, p)
            })
            .collect();
    }

    let mut rows: Vec<Row> = Vec::new();
    if wanted("a") {
        let samples = (0..reps)
            .map(|_| {
                let t = Instant::now();
                let out = pool
                    .map_chunksize(square, 0..n1, 1)
                    .expect("gpuproc map_chunksize");
                let s = t.elapsed().as_secs_f64();
                check("gpuproc chunksize 1", &out, n1);
                s
            })
            .collect();
        rows.push(Row {
            name: "(a) gpuproc map_chunksize 1".into(),
            tasks: n1,
            samples,
        });
    }
    if wanted("b") {
        let _ = pool.map(square, 0..n2 / 10).expect("gpuproc warm-up");
        let samples = (0..reps)
            .map(|_| {
                let t = Instant::now();
                let out = pool.map(square, 0..n2).expect("gpuproc map");
                let s = t.elapsed().as_secs_f64();
                check("gpuproc auto", &out, n2);
                s
            })
            .collect();
        rows.push(Row {
            name: "(b) gpuproc map auto".into(),
            tasks: n2,
            samples,
        });
    }
    let mut sleep_s = f64::NAN;
    if wanted("c") {
        let _ = pool
            .map_chunksize(sleep_1ms, 0..20u64, 1)
            .expect("gpuproc warm-up");
        let t = Instant::now();
        let out = pool
            .map_chunksize(sleep_1ms, 0..sleep_n, 1)
            .expect("gpuproc sleep map");
        sleep_s = t.elapsed().as_secs_f64();
        assert_eq!(out.len() as u64, sleep_n);
    }
    drop(pool);

    if procspawn_on && wanted("a") {
        let ppool = procspawn::Pool::new(WORKERS).expect("procspawn pool");
        procspawn_run(&ppool, 500);
        let s = procspawn_run(&ppool, procspawn_n);
        ppool.shutdown();
        rows.push(Row {
            name: "(a) procspawn pool.spawn".into(),
            tasks: procspawn_n,
            samples: vec![s],
        });
    }
    let rust_secs = started.elapsed().as_secs_f64();

    let py_started = Instant::now();
    let mut py = PyOut::default();
    let mut py_note = "not run".to_string();
    if python_on {
        let counts = PyCounts {
            n1: if wanted("a") { n1 } else { 0 },
            futures_n: if wanted("a") { n1 } else { 0 },
            loky_n: if wanted("a") { n1 } else { 0 },
            n2: if wanted("b") { n2 } else { 0 },
            sleep_n: if wanted("c") { sleep_n } else { 0 },
            starts: if wanted("start") { starts } else { 0 },
            reps,
        };
        match run_python(&script, &counts) {
            Ok(out) => {
                py_note = format!(
                    "{} (start method {}, loky {})",
                    out.python,
                    out.start_method,
                    out.loky.as_deref().unwrap_or("missing")
                );
                py = out;
            }
            Err(why) => {
                eprintln!("bench_pool: no Python figures: {why}");
                py_note = "unavailable".into();
            }
        }
    }
    let py_secs = py_started.elapsed().as_secs_f64();
    let py_label = |name: &str| match name {
        "pool_c1" => "(a) python Pool.map chunksize 1",
        "futures_c1" => "(a) python ProcessPoolExecutor",
        "loky_c1" => "(a) python loky executor",
        "pool_auto" => "(b) python Pool.map auto",
        _ => "",
    };
    let mut py_sleep_s = f64::NAN;
    for name in ["pool_c1", "futures_c1", "loky_c1", "pool_auto"] {
        let got: Vec<&PyRow> = py.results.iter().filter(|r| r.name == name).collect();
        if let Some(first) = got.first() {
            rows.push(Row {
                name: py_label(name).into(),
                tasks: first.tasks,
                samples: got.iter().map(|r| r.seconds).collect(),
            });
        }
    }
    if let Some(r) = py.results.iter().find(|r| r.name == "pool_sleep") {
        py_sleep_s = r.seconds;
    }
    rows.sort_by_key(|r| !r.name.starts_with("(a)"));

    let per_task = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .map_or(f64::NAN, Row::us_per_task)
    };
    let py_c1 = per_task("(a) python Pool.map chunksize 1");
    let py_auto = per_task("(b) python Pool.map auto");
    let ps = per_task("(a) procspawn pool.spawn");

    println!("Pool: {WORKERS} workers, task x*x on u64 (sleep row: 1 ms per task)");
    println!(
        "cpus: {}, gpuproc start method: {}, python: {} {}, gpuproc+procspawn {:.1} s, python {:.1} s",
        gpuproc::cpu_count(),
        gpuproc::get_start_method().name(),
        python.display(),
        py_note,
        rust_secs,
        py_secs
    );
    println!();
    println!(
        "{:<34} {:>9} {:>4} {:>9} {:>9} {:>11} {:>9} {:>10}",
        "throughput",
        "tasks",
        "runs",
        "total s",
        "µs/task",
        "tasks/s",
        "py Pool/it",
        "procspawn/it"
    );
    for r in &rows {
        let us = r.us_per_task();
        let py_ref = if r.name.starts_with("(b)") {
            py_auto
        } else {
            py_c1
        };
        let ps_ref = if r.name.starts_with("(a)") {
            ps
        } else {
            f64::NAN
        };
        println!(
            "{:<34} {:>9} {:>4} {:>9.3} {:>9.3} {:>11.0} {:>10} {:>12}",
            r.name,
            r.tasks,
            r.samples.len(),
            r.secs(),
            us,
            1e6 / us,
            ratio(py_ref / us),
            ratio(ps_ref / us),
        );
    }
    println!();
    println!("(py Pool/it, procspawn/it: that row's µs per task over this row's, i.e. how many");
    println!(
        " times faster per task, higher is better; (a) rows against Python's chunksize-1 Pool,"
    );
    println!(" (b) rows against Python's auto-chunksize Pool; median of the runs)");

    println!();
    let ideal = sleep_n as f64 * 1e-3 / WORKERS as f64;
    println!(
        "{:<34} {:>10} {:>10} {:>9}",
        format!("sleep 1 ms x {sleep_n}, chunksize 1"),
        "wall ms",
        "ideal ms",
        "/ideal"
    );
    let sleep_ratio = sleep_s / ideal;
    for (name, s) in [("(c) gpuproc", sleep_s), ("(c) python Pool", py_sleep_s)] {
        println!(
            "{:<34} {:>10.1} {:>10.1} {:>9}",
            name,
            s * 1e3,
            ideal * 1e3,
            ratio2(s / ideal)
        );
    }

    println!();
    let sum = |v: &[(i64, i64)]| -> (i64, i64) {
        (
            v.iter().map(|x| x.0).sum(),
            v.iter().map(|x| x.1.max(0)).sum(),
        )
    };
    let g_mem = sum(&idle_kb.iter().map(|x| (x.1, x.2)).collect::<Vec<_>>());
    let p_mem = sum(&py
        .idle
        .iter()
        .map(|x| (x.rss_kb, x.pss_kb))
        .collect::<Vec<_>>());
    println!(
        "{:<34} {:>8} {:>14} {:>14} {:>10}",
        "idle workers (d)", "workers", "sum Rss KiB", "sum Pss KiB", "Rss/python"
    );
    // Not measured (NaN) unless both sides measured some worker.
    let mem_ratio = if idle_kb.is_empty() || p_mem.0 <= 0 {
        f64::NAN
    } else {
        g_mem.0 as f64 / p_mem.0 as f64
    };
    let pids = |v: Vec<u32>| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    println!(
        "{:<34} {:>8} {:>14} {:>14} {:>10}   pids {}",
        "(d) gpuproc",
        idle_kb.len(),
        g_mem.0,
        g_mem.1,
        ratio2(mem_ratio),
        pids(idle_kb.iter().map(|x| x.0).collect())
    );
    println!(
        "{:<34} {:>8} {:>14} {:>14} {:>10}   pids {}",
        "(d) python Pool",
        py.idle.len(),
        p_mem.0,
        p_mem.1,
        ratio2(if p_mem.0 > 0 { 1.0 } else { f64::NAN }),
        pids(py.idle.iter().map(|x| x.pid).collect())
    );

    println!();
    println!(
        "{:<34} {:>10} {:>10} {:>12}",
        "pool start (build + first result)", "median ms", "cold ms", "py/it"
    );
    let g_start = median(&start_s);
    let p_start = median(&py.start_s);
    println!(
        "{:<34} {:>10.2} {:>10.2} {:>12}",
        "gpuproc Pool::new + apply",
        g_start * 1e3,
        cold_start_s * 1e3,
        ratio(p_start / g_start)
    );
    println!(
        "{:<34} {:>10.2} {:>10} {:>12}",
        "python Pool() + apply",
        p_start * 1e3,
        "-",
        ratio(if p_start.is_finite() { 1.0 } else { f64::NAN })
    );

    println!();
    println!("Targets:");
    let gc1 = per_task("(a) gpuproc map_chunksize 1");
    let gauto = per_task("(b) gpuproc map auto");
    let verdict = |x: f64, ok: bool| {
        if !x.is_finite() {
            "not measured"
        } else if ok {
            "met"
        } else {
            "MISSED"
        }
    };
    let line = |what: &str, shown: String, x: f64, ok: bool| {
        println!("  {what:<52} {shown:>8} -> {}", verdict(x, ok));
    };
    let r = py_c1 / gc1;
    line(
        "(a) python Pool / gpuproc, chunksize 1 >= 10x",
        ratio(r),
        r,
        r >= 10.0,
    );
    let r = ps / gc1;
    line(
        "(a) procspawn / gpuproc, chunksize 1 >= 5x",
        ratio(r),
        r,
        r >= 5.0,
    );
    let r = py_auto / gauto;
    line(
        "(b) python Pool / gpuproc, auto chunksize >= 10x",
        ratio(r),
        r,
        r >= 10.0,
    );
    line(
        "(c) 1 ms sleeps: gpuproc wall / ideal <= 1.2x",
        ratio2(sleep_ratio),
        sleep_ratio,
        sleep_ratio <= 1.2,
    );
    line(
        "(d) idle Rss: gpuproc / python <= 0.20",
        format!("{mem_ratio:.3}"),
        mem_ratio,
        mem_ratio <= 0.2,
    );
}

fn ratio2(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}x")
    } else {
        "-".into()
    }
}
