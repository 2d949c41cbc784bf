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
//! - (e) large payloads: 256 tasks x 4 MiB `Vec<f32>`, (e1) sum, (e2) times 2, against
//!   memcpy, a one-process compute floor, the ids + named `SharedMemory` pattern and Python's
//!   `Pool.map` over numpy arrays; 100,000 strings of 100 bytes upper-cased; and (e4)
//!   vectors of a plain struct, element by element and with `gpuproc::pod` (see
//!   `large_payloads`: its own tables and targets; gpuproc's rows run 5 times, Python's numpy
//!   rows 3, the strings 11 times each, medians shown);
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
//! sections named: `a`, `b`, `c`, `d`, `e`, `start` (e.g. `--only a --no-python --no-procspawn`
//! to profile gpuproc's chunksize-1 map alone under `perf` or `strace -c -f`; `e1`, `e2`, `e3` or `s1`
//! times only gpuproc's map of (e1), (e2), (e3) or (e1) over `SharedSlice`s, `f3` the (e3) floor; with `PERF_CTL_FIFO` set, it enables
//! `perf record --control fifo:...` around the timed maps alone). Python from `$GPUPROC_PYTHON`, else
//! `<workspace>/.venv/bin/python`, else `python3`. About 60 s on 2 cores, most of it in
//! Python's futures and loky rows.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gpuproc::shm::SharedMemory;
use gpuproc::{Pool, SharedSlice};
use serde::{Deserialize, Serialize};

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
             --only: sections to run: a, b, c, d, e, start\n  \
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
    if !["a", "b", "c", "d", "start"].iter().any(|w| wanted(w)) {
        // `e1` / `e2`: only gpuproc's `Vec<f32>` map of that kind, to profile it.
        let just = ["e1", "e2", "e3", "s1", "f3"]
            .into_iter()
            .find(|w| only.iter().any(|o| o == w));
        if wanted("e") || just.is_some() {
            large_payloads(scale, python_on, &script, just);
        }
        return;
    }

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
    let r = py_c1 / gc1;
    target_line(
        "(a) python Pool / gpuproc, chunksize 1 >= 10x",
        ratio(r),
        r,
        r >= 10.0,
    );
    let r = ps / gc1;
    target_line(
        "(a) procspawn / gpuproc, chunksize 1 >= 5x",
        ratio(r),
        r,
        r >= 5.0,
    );
    let r = py_auto / gauto;
    target_line(
        "(b) python Pool / gpuproc, auto chunksize >= 10x",
        ratio(r),
        r,
        r >= 10.0,
    );
    target_line(
        "(c) 1 ms sleeps: gpuproc wall / ideal <= 1.2x",
        ratio2(sleep_ratio),
        sleep_ratio,
        sleep_ratio <= 1.2,
    );
    target_line(
        "(d) idle Rss: gpuproc / python <= 0.20",
        format!("{mem_ratio:.3}"),
        mem_ratio,
        mem_ratio <= 0.2,
    );

    if wanted("e") {
        large_payloads(scale, python_on, &script, None);
    }
}

/// One line of a targets list: what, the figure shown, and met / MISSED / not measured.
fn target_line(what: &str, shown: String, x: f64, ok: bool) {
    let verdict = if !x.is_finite() {
        "not measured"
    } else if ok {
        "met"
    } else {
        "MISSED"
    };
    println!("  {what:<52} {shown:>8} -> {verdict}");
}

fn ratio2(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}x")
    } else {
        "-".into()
    }
}

// ---- (e) large payloads ----------------------------------------------------------------

/// The shared blocks a worker of the ids + named block rows attaches once (input, output).
static BLOCKS: OnceLock<(SharedMemory, SharedMemory)> = OnceLock::new();

/// `initializer` of the ids + named block pool: attach both blocks by name.
fn attach_blocks(names: (String, String)) {
    let input = SharedMemory::attach(&names.0).expect("attach the input block");
    let output = SharedMemory::attach(&names.1).expect("attach the output block");
    let _ = BLOCKS.set((input, output));
}

/// The `f32`s of `bytes` (a 4-byte aligned range of a mapping).
fn as_f32s(bytes: &[u8]) -> &[f32] {
    // SAFETY: every bit pattern is a valid f32; align_to only returns the aligned middle.
    let (head, mid, tail) = unsafe { bytes.align_to::<f32>() };
    assert!(head.is_empty() && tail.is_empty(), "misaligned f32 range");
    mid
}

/// The `f32`s of `bytes`, writable.
fn as_f32s_mut(bytes: &mut [u8]) -> &mut [f32] {
    // SAFETY: every bit pattern is a valid f32; align_to_mut only returns the aligned middle.
    let (head, mid, tail) = unsafe { bytes.align_to_mut::<f32>() };
    assert!(head.is_empty() && tail.is_empty(), "misaligned f32 range");
    mid
}

/// Item `id`'s range of bytes in a block of items of `item_bytes` each.
fn item_range(id: usize, item_bytes: usize) -> std::ops::Range<usize> {
    id * item_bytes..(id + 1) * item_bytes
}

fn sum_f32(v: Vec<f32>) -> f64 {
    sum_slice(&v)
}

fn sum_slice(v: &[f32]) -> f64 {
    // Eight lanes, so that the loop vectorises as numpy's pairwise sum does.
    let mut acc = [0f32; 8];
    let mut it = v.chunks_exact(8);
    for c in &mut it {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    let rest: f32 = it.remainder().iter().sum();
    acc.iter().map(|&a| f64::from(a)).sum::<f64>() + f64::from(rest)
}

/// (e4) A plain struct: 12 bytes, no padding.
#[derive(
    Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable, Serialize, Deserialize,
)]
#[repr(C)]
struct Point {
    x: f32,
    y: f32,
    id: u32,
}

/// (e4) A batch of points, element by element (serde's derive).
#[derive(Clone, Serialize, Deserialize)]
struct Points(Vec<Point>);

/// (e4) The same batch as one block of bytes.
#[derive(Clone, Serialize, Deserialize)]
struct PodPoints(#[serde(with = "gpuproc::pod")] Vec<Point>);

fn points(i: usize, n: usize) -> Vec<Point> {
    (0..n)
        .map(|k| Point {
            x: ((k + i) % 7) as f32,
            y: 0.5,
            id: k as u32,
        })
        .collect()
}

fn sum_x(v: &[Point]) -> f64 {
    v.iter().map(|p| f64::from(p.x)).sum()
}

fn sum_points(p: Points) -> f64 {
    sum_x(&p.0)
}

fn sum_pod_points(p: PodPoints) -> f64 {
    sum_x(&p.0)
}

fn times_2(v: Vec<f32>) -> Vec<f32> {
    let mut v = v;
    for x in &mut v {
        *x *= 2.0;
    }
    v
}

/// (ids + named block, e1) the sum of item `(id, item_bytes)` of the input block.
fn shm_sum(task: (u32, u32)) -> f64 {
    let (input, _) = BLOCKS.get().expect("blocks attached by the initializer");
    // SAFETY: the parent filled the input block before the map and nobody writes it while
    // the pool runs.
    let all = unsafe { input.as_slice() };
    sum_slice(as_f32s(&all[item_range(task.0 as usize, task.1 as usize)]))
}

/// (ids + named block, e2) item `id` of the input times 2, written to the same place of the
/// output block; returns the id.
fn shm_times_2(task: (u32, u32)) -> u32 {
    let (input, output) = BLOCKS.get().expect("blocks attached by the initializer");
    let range = item_range(task.0 as usize, task.1 as usize);
    // SAFETY: nobody writes the input block while the pool runs; each task id is sent once,
    // so this task is the only writer of its range of the output block, and the parent reads
    // it only after the map has returned.
    let (src, dst) = unsafe { (input.as_slice(), output.as_mut_slice()) };
    let src = as_f32s(&src[range.clone()]);
    let dst = as_f32s_mut(&mut dst[range]);
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s * 2.0;
    }
    task.0
}

/// (SharedSlice, e1) the sum of a sealed shared slice: only its descriptor travels.
fn slice_sum(v: SharedSlice<f32>) -> f64 {
    sum_slice(&v)
}

/// (SharedSlice, e2) the slice times 2, written into a new sealed slice sent back.
fn slice_times_2(v: SharedSlice<f32>) -> SharedSlice<f32> {
    SharedSlice::build(v.len(), |out| {
        for (o, x) in out.iter_mut().zip(v.iter()) {
            *o = x * 2.0;
        }
    })
    .expect("output slice")
}

/// The (e3) input: `n` strings of `len` ASCII bytes.
fn strings(n: usize, len: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{i:0>len$}").replace('0', "a"))
        .collect()
}

/// Tells `perf record --control fifo:$PERF_CTL_FIFO` to `enable` or `disable` sampling, so
/// that a profile of `--only e1|e2|e3` holds the timed maps alone.
fn perf_control(what: &str) {
    if let Some(fifo) = std::env::var_os("PERF_CTL_FIFO") {
        if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(fifo) {
            let _ = writeln!(f, "{what}");
        }
    }
}

fn upper(s: String) -> String {
    s.to_uppercase()
}

/// The (e3) floor's blocks, attached once per worker (input, output).
static STR_BLOCKS: OnceLock<(SharedMemory, SharedMemory)> = OnceLock::new();

fn attach_str_blocks(names: (String, String)) {
    let input = SharedMemory::attach(&names.0).expect("attach the strings' input block");
    let output = SharedMemory::attach(&names.1).expect("attach the strings' output block");
    let _ = STR_BLOCKS.set((input, output));
}

/// (e3 floor) Upper-cases `count` strings written length-first (u32) from byte `at` of the
/// input block into the same place of the output block, as owned `String`s in between (as
/// a task of `map(upper, ...)` gets and returns them); returns `(at, count)` and the bytes
/// written.
fn upper_block((at, count): (u64, u64)) -> ((u64, u64), u64) {
    let (input, output) = STR_BLOCKS
        .get()
        .expect("blocks attached by the initializer");
    let (mut r, mut w) = (at as usize, at as usize);
    for _ in 0..count {
        // SAFETY: the parent wrote this piece of the input block before sending the task
        // and writes neither it nor this piece of the output block until the result is
        // back; pieces do not overlap (upper-casing ASCII keeps each length, checked below).
        let (src, dst) = unsafe { (input.as_slice(), output.as_mut_slice()) };
        let len = u32::from_le_bytes(src[r..r + 4].try_into().expect("4 bytes")) as usize;
        let s = String::from_utf8(src[r + 4..r + 4 + len].to_vec()).expect("UTF-8");
        r += 4 + len;
        let u = s.to_uppercase();
        assert_eq!(u.len(), len, "upper-cased ASCII keeps its length");
        dst[w..w + 4].copy_from_slice(&(u.len() as u32).to_le_bytes());
        dst[w + 4..w + 4 + u.len()].copy_from_slice(u.as_bytes());
        w += 4 + u.len();
    }
    ((at, count), (w - at as usize) as u64)
}

/// (e3 floor) The two blocks for `strings`, and a pool whose workers attach them (warmed up).
fn str_floor_pool(strings: &[String]) -> ((SharedMemory, SharedMemory), Pool) {
    let str_bytes = strings.iter().map(|s| 4 + s.len()).sum::<usize>();
    let blocks = (
        SharedMemory::create(str_bytes).expect("strings' input block"),
        SharedMemory::create(str_bytes).expect("strings' output block"),
    );
    let pool = Pool::builder()
        .processes(WORKERS)
        .initializer(
            attach_str_blocks,
            (blocks.0.name().to_string(), blocks.1.name().to_string()),
        )
        .build()
        .expect("gpuproc pool with the strings' blocks");
    let _ = upper_by_hand(&pool, &blocks, strings.to_vec());
    (blocks, pool)
}

/// (e3 floor) `map(upper, input)` by hand: the strings written into one shared block in
/// Python's automatic chunks (a quarter of the input per worker, each chunk one task sent as
/// soon as it is written), upper-cased by the workers into another block as owned
/// `String`s, and read back into `String`s as each chunk comes back. No per-task
/// bookkeeping: about the least a multi-process map of these strings costs here.
fn upper_by_hand(
    pool: &Pool,
    blocks: &(SharedMemory, SharedMemory),
    input: Vec<String>,
) -> Vec<String> {
    let n = input.len();
    let per = n.div_ceil(4 * WORKERS).max(1);
    let mut items = input.into_iter();
    let mut w = 0usize;
    let pieces = std::iter::from_fn(|| {
        let at = w;
        let mut count = 0u64;
        for s in items.by_ref().take(per) {
            // SAFETY: no worker reads or writes this piece until its task is sent.
            let dst = unsafe { blocks.0.as_mut_slice() };
            dst[w..w + 4].copy_from_slice(&(s.len() as u32).to_le_bytes());
            dst[w + 4..w + 4 + s.len()].copy_from_slice(s.as_bytes());
            w += 4 + s.len();
            count += 1;
        }
        (count > 0).then_some((at as u64, count))
    });
    let mut out = Vec::with_capacity(n);
    for done in pool.imap(upper_block, pieces) {
        let ((at, count), bytes) = done.expect("e3 floor");
        // SAFETY: this piece's task is done: no worker writes it any more.
        let src = unsafe { blocks.1.as_slice() };
        let mut r = at as usize;
        for _ in 0..count {
            let len = u32::from_le_bytes(src[r..r + 4].try_into().expect("4 bytes")) as usize;
            out.push(String::from_utf8(src[r + 4..r + 4 + len].to_vec()).expect("UTF-8"));
            r += 4 + len;
        }
        assert_eq!(r - at as usize, bytes as usize, "e3 floor: bytes read back");
    }
    out
}

/// One row of (e): seconds per run, and the bytes one run moves one way.
struct BigRow {
    name: String,
    samples: Vec<f64>,
    bytes: f64,
}

impl BigRow {
    fn gbs(&self) -> f64 {
        self.bytes / median(&self.samples) / 1e9
    }
}

fn timed<T>(reps: usize, mut f: impl FnMut() -> T, mut check: impl FnMut(T)) -> Vec<f64> {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            let out = f();
            let s = t.elapsed().as_secs_f64();
            check(out);
            s
        })
        .collect()
}

/// Section (e) (issue 12): 256 x 4 MiB `Vec<f32>` (scaled), sum (e1) and times 2 (e2), and 100,000
/// strings of 100 bytes upper-cased.
/// `just`: `e1`, `e2` or `e3` to time only gpuproc's map of that kind (for profiling).
fn large_payloads(scale: f64, python_on: bool, script: &Path, just: Option<&str>) {
    // gpuproc's rows (and the floors) run 5 times, Python's numpy rows 3 (seconds each);
    // e3 takes milliseconds: 11 runs on both sides, for a steadier median.
    let reps = 5;
    let py_reps = 3;
    let str_reps = 11;
    let n = ((256.0 * scale).round() as usize).max(8);
    let floats = (4 << 20) / 4;
    let item_bytes = floats * 4;
    let total = (n * item_bytes) as f64;
    let str_n = ((100_000.0 * scale).round() as usize).max(100);
    let str_len = 100;
    let data: Vec<Vec<f32>> = (0..n)
        .map(|i| (0..floats).map(|j| ((i + j) % 7) as f32).collect())
        .collect();
    let sums: Vec<f64> = data.iter().map(|v| sum_slice(v)).collect();
    let check_sums = |out: Vec<f64>| assert_eq!(out, sums, "e1: wrong sums");
    let mut rows: Vec<BigRow> = Vec::new();
    let mut row = |name: &str, samples: Vec<f64>| {
        // Each run's figure, so that the spread shows (the table has the medians).
        let each: Vec<String> = samples.iter().map(|s| format!("{s:.3}")).collect();
        eprintln!("{name}: {} s", each.join(" "));
        rows.push(BigRow {
            name: name.into(),
            samples,
            bytes: total,
        })
    };

    if just == Some("f3") {
        // The e3 floor alone, for a profile beside e3's.
        let strings = strings(str_n, str_len);
        let (blocks, pool) = str_floor_pool(&strings);
        for _ in 0..20 {
            let input = strings.clone();
            perf_control("enable");
            let t = Instant::now();
            let out = upper_by_hand(&pool, &blocks, input);
            let s = t.elapsed().as_secs_f64();
            perf_control("disable");
            assert_eq!(out.len(), str_n);
            println!("(e3) floor by hand: {s:.4} s");
        }
        return;
    }
    if let Some(e) = just {
        let pool = Pool::new(WORKERS).expect("gpuproc pool");
        // (e3 is short: more repetitions, for a profile with enough samples.)
        let reps = if e == "e3" { 20 } else { reps };
        for _ in 0..reps {
            let input = if e == "e3" { Vec::new() } else { data.clone() };
            let strings_in = strings(str_n, str_len);
            let slices: Vec<SharedSlice<f32>> = match e {
                "s1" => data
                    .iter()
                    .map(|v| SharedSlice::from_slice(v).expect("slice"))
                    .collect(),
                _ => Vec::new(),
            };
            perf_control("enable");
            let t = Instant::now();
            let n_out = match e {
                "e1" => pool.map(sum_f32, input).expect("gpuproc e1").len(),
                "s1" => (pool.map(slice_sum, slices.iter().cloned()))
                    .expect("gpuproc s1")
                    .len(),
                "e2" => pool.map(times_2, input).expect("gpuproc e2").len(),
                _ => {
                    // (The results are dropped after the timing, as in the table's row.)
                    let out = pool.map(upper, strings_in).expect("gpuproc e3");
                    let s = t.elapsed().as_secs_f64();
                    perf_control("disable");
                    assert_eq!(out.len(), str_n);
                    println!("(e3) gpuproc map auto: {s:.4} s");
                    continue;
                }
            };
            let s = t.elapsed().as_secs_f64();
            perf_control("disable");
            assert_eq!(n_out, n);
            println!(
                "({e}) gpuproc map Vec<f32> auto: {s:.3} s, {:.2} GB/s",
                total / s / 1e9
            );
        }
        return;
    }
    // One-thread floors: memcpy of the same bytes, and the work itself in one process.
    let mut dst = vec![0f32; floats];
    row(
        "memcpy (1 thread)",
        timed(
            reps,
            || {
                for v in &data {
                    dst.copy_from_slice(v);
                    std::hint::black_box(&dst);
                }
            },
            |_| (),
        ),
    );
    row(
        "(e1) compute floor: 1 process",
        timed(
            reps,
            || data.iter().map(|v| sum_slice(v)).collect::<Vec<f64>>(),
            check_sums,
        ),
    );
    row(
        "(e2) compute floor: 1 process",
        timed(
            reps,
            || {
                data.iter()
                    .map(|v| v.iter().map(|x| x * 2.0).collect::<Vec<f32>>())
                    .collect::<Vec<_>>()
            },
            |out| assert_eq!(out.len(), n),
        ),
    );

    // gpuproc Vec<f32>, automatic chunk size (the copies the map consumes are made untimed).
    let pool = Pool::new(WORKERS).expect("gpuproc pool");
    let _ = pool.map(sum_f32, data[..4].to_vec()).expect("warm-up");
    let mut samples = Vec::new();
    for _ in 0..reps {
        let input = data.clone();
        let t = Instant::now();
        let out = pool.map(sum_f32, input).expect("gpuproc e1");
        samples.push(t.elapsed().as_secs_f64());
        check_sums(out);
    }
    row("(e1) gpuproc map Vec<f32> auto", samples);
    let mut samples = Vec::new();
    for _ in 0..reps {
        let input = data.clone();
        let t = Instant::now();
        let out = pool.map(times_2, input).expect("gpuproc e2");
        samples.push(t.elapsed().as_secs_f64());
        assert_eq!(out.len(), n);
        assert_eq!(out[n - 1][3], data[n - 1][3] * 2.0, "e2: wrong result");
    }
    row("(e2) gpuproc map Vec<f32> auto", samples);
    let strings = strings(str_n, str_len);
    let mut str_samples = Vec::new();
    for _ in 0..str_reps {
        let input = strings.clone();
        let t = Instant::now();
        let out = pool.map(upper, input).expect("gpuproc strings");
        str_samples.push(t.elapsed().as_secs_f64());
        assert_eq!(out[str_n - 1], strings[str_n - 1].to_uppercase());
    }
    // (e4) Vectors of a plain struct, element by element and as one block of bytes.
    let pt_n = (n / 4).max(2);
    let per = item_bytes / std::mem::size_of::<Point>();
    let pts: Vec<Vec<Point>> = (0..pt_n).map(|i| points(i, per)).collect();
    let pt_sums: Vec<f64> = pts.iter().map(|v| sum_x(v)).collect();
    let mut pt_rows = Vec::new();
    for (name, pod) in [
        ("element by element", false),
        ("#[serde(with = \"gpuproc::pod\")]", true),
    ] {
        let mut samples = Vec::new();
        for _ in 0..reps {
            let t;
            let out = if pod {
                let input: Vec<PodPoints> = pts.iter().cloned().map(PodPoints).collect();
                t = Instant::now();
                pool.map(sum_pod_points, input).expect("gpuproc e4")
            } else {
                let input: Vec<Points> = pts.iter().cloned().map(Points).collect();
                t = Instant::now();
                pool.map(sum_points, input).expect("gpuproc e4")
            };
            samples.push(t.elapsed().as_secs_f64());
            assert_eq!(out, pt_sums, "e4: wrong sums");
        }
        pt_rows.push((name, median(&samples)));
    }
    drop(pool);

    // SharedSlice<f32>: made from the data once (untimed, as the block below is filled
    // untimed); only descriptors travel.
    let slices: Vec<SharedSlice<f32>> = data
        .iter()
        .map(|v| SharedSlice::from_slice(v).expect("shared slice"))
        .collect();
    let pool = Pool::new(WORKERS).expect("gpuproc pool");
    let _ = pool.map(slice_sum, slices[..4].to_vec()).expect("warm-up");
    row(
        "(e1) gpuproc SharedSlice<f32>",
        timed(
            reps,
            || {
                pool.map(slice_sum, slices.iter().cloned())
                    .expect("slice e1")
            },
            check_sums,
        ),
    );
    row(
        "(e2) gpuproc SharedSlice<f32>",
        timed(
            reps,
            || {
                pool.map(slice_times_2, slices.iter().cloned())
                    .expect("slice e2")
            },
            |out| {
                assert_eq!(out.len(), n);
                assert_eq!(
                    out[n - 1][3],
                    data[n - 1][3] * 2.0,
                    "slice e2: wrong result"
                );
            },
        ),
    );
    drop(pool);
    drop(slices);

    // ids + one named block attached once per worker.
    let input = SharedMemory::create(n * item_bytes).expect("input block");
    let output = SharedMemory::create(n * item_bytes).expect("output block");
    {
        // SAFETY: no other process has the block yet; this is the only slice of it.
        let all = unsafe { input.as_mut_slice() };
        for (i, v) in data.iter().enumerate() {
            as_f32s_mut(&mut all[item_range(i, item_bytes)]).copy_from_slice(v);
        }
    }
    let pool = Pool::builder()
        .processes(WORKERS)
        .initializer(
            attach_blocks,
            (input.name().to_string(), output.name().to_string()),
        )
        .build()
        .expect("gpuproc pool with blocks");
    let item = u32::try_from(item_bytes).expect("item size");
    let ids = || (0..n as u32).map(move |i| (i, item));
    let _ = pool.map(shm_sum, ids().take(4)).expect("warm-up");
    row(
        "(e1) gpuproc ids + named block",
        timed(
            reps,
            || pool.map(shm_sum, ids()).expect("shm e1"),
            check_sums,
        ),
    );
    row(
        "(e2) gpuproc ids + named block",
        timed(
            reps,
            || pool.map(shm_times_2, ids()).expect("shm e2"),
            |out| assert_eq!(out.len(), n),
        ),
    );
    drop(pool);
    {
        // SAFETY: the pool is gone: no process writes the output block any more.
        let all = unsafe { output.as_slice() };
        let last = as_f32s(&all[item_range(n - 1, item_bytes)]);
        assert_eq!(last[3], data[n - 1][3] * 2.0, "shm e2: wrong result");
    }
    drop(data);
    drop((input, output));

    // (e3) The hand-written floor for the strings.
    let (blocks, pool) = str_floor_pool(&strings);
    let mut floor_str_samples = Vec::new();
    for _ in 0..str_reps {
        let input = strings.clone();
        let t = Instant::now();
        let out = upper_by_hand(&pool, &blocks, input);
        floor_str_samples.push(t.elapsed().as_secs_f64());
        assert_eq!(out.len(), str_n);
        assert_eq!(out[str_n - 1], strings[str_n - 1].to_uppercase());
    }
    drop(pool);
    drop(blocks);

    let mut py_str = f64::NAN;
    if python_on {
        let args: Vec<String> = [
            ("--processes", WORKERS.to_string()),
            ("--n1", "0".into()),
            ("--futures-n", "0".into()),
            ("--loky-n", "0".into()),
            ("--n2", "0".into()),
            ("--sleep-n", "0".into()),
            ("--starts", "0".into()),
            ("--reps", py_reps.to_string()),
            ("--big-n", n.to_string()),
            ("--big-floats", floats.to_string()),
            ("--str-n", str_n.to_string()),
            ("--str-reps", str_reps.to_string()),
            ("--str-len", str_len.to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect();
        match gpuproc_benchmarks::run_python_json::<PyOut>(script, &args) {
            Ok(py) => {
                let samples = |name: &str| -> Vec<f64> {
                    py.results
                        .iter()
                        .filter(|r| r.name == name)
                        .map(|r| r.seconds)
                        .collect()
                };
                for (e, what) in [("e1", "sum"), ("e2", "times2")] {
                    // Python's best chunk size: 1 or the automatic one.
                    let c1 = samples(&format!("big_{what}_c1"));
                    let auto = samples(&format!("big_{what}_auto"));
                    let (label, s) = if median(&c1) <= median(&auto) || auto.is_empty() {
                        ("chunksize 1", c1)
                    } else {
                        ("auto", auto)
                    };
                    if !s.is_empty() {
                        row(&format!("({e}) python Pool numpy {label}"), s);
                    }
                }
                py_str = median(&samples("str_upper_auto"));
            }
            Err(why) => eprintln!("bench_pool: no Python figures for (e): {why}"),
        }
    }

    let find = |name: &str| {
        rows.iter()
            .find(|r| r.name.starts_with(name))
            .map_or(f64::NAN, BigRow::gbs)
    };
    println!();
    println!(
        "(e) large payloads: {n} tasks x {} MiB Vec<f32>, {WORKERS} workers; e1 returns the sum, \
         e2 the input times 2",
        item_bytes >> 20
    );
    println!(
        "{:<40} {:>4} {:>9} {:>8} {:>10} {:>10}",
        "row", "runs", "median s", "GB/s", "/python", "/floor"
    );
    for r in &rows {
        let e = if r.name.starts_with("(e2)") {
            "(e2)"
        } else {
            "(e1)"
        };
        let py = find(&format!("{e} python"));
        let floor = find(&format!("{e} compute floor"));
        println!(
            "{:<40} {:>4} {:>9.3} {:>8.2} {:>10} {:>10}",
            r.name,
            r.samples.len(),
            median(&r.samples),
            r.gbs(),
            ratio(r.gbs() / py),
            ratio2(r.gbs() / floor),
        );
    }
    println!(" (GB/s: input bytes per second; /python, /floor: this row's GB/s over theirs)");
    let g_str = median(&str_samples);
    println!();
    println!(
        "{:<40} {:>9} {:>10}",
        format!("{str_n} strings x {str_len} B, to_uppercase"),
        "median s",
        "python/it"
    );
    println!(
        "{:<40} {:>9.3} {:>10}",
        "(e3) gpuproc map auto",
        g_str,
        ratio(py_str / g_str)
    );
    for (name, samples) in [
        ("(e3) gpuproc map auto", &str_samples),
        ("(e3) floor: by hand", &floor_str_samples),
    ] {
        let each: Vec<String> = samples.iter().map(|s| format!("{s:.4}")).collect();
        eprintln!("{name}: {} s", each.join(" "));
    }
    let floor_str = median(&floor_str_samples);
    println!(
        "{:<40} {:>9.3} {:>10}",
        "(e3) floor: by hand, 2 shared blocks",
        floor_str,
        ratio(py_str / floor_str)
    );
    println!(
        "{:<40} {:>9.3} {:>10}",
        "(e3) python Pool.map auto",
        py_str,
        ratio(if py_str.is_finite() { 1.0 } else { f64::NAN })
    );
    println!(
        " (the floor: map by hand, in Python's chunks, through 2 shared blocks, with no \
         per-task bookkeeping;\n  gpuproc / floor: {})",
        ratio2(g_str / floor_str)
    );

    println!();
    println!(
        "{:<40} {:>9} {:>8} {:>10}",
        format!(
            "(e4) {pt_n} x {} MiB Vec<Point>, sum of x",
            item_bytes >> 20
        ),
        "median s",
        "GB/s",
        "/elements"
    );
    let pt_bytes = (pt_n * per * std::mem::size_of::<Point>()) as f64;
    for (name, s) in &pt_rows {
        println!(
            "{:<40} {:>9.3} {:>8.2} {:>10}",
            name,
            s,
            pt_bytes / s / 1e9,
            ratio(pt_rows[0].1 / s)
        );
    }

    println!();
    println!("Targets (e):");
    for e in ["(e1)", "(e2)"] {
        let g = find(&format!("{e} gpuproc map"));
        let r = g / find(&format!("{e} python"));
        let what = format!("{e} gpuproc Vec<f32> / python numpy >= 5x");
        target_line(&what, ratio(r), r, r >= 5.0);
        let f = find(&format!("{e} compute floor")) / g;
        let what = format!("{e} compute floor / gpuproc Vec<f32> <= 4x");
        target_line(&what, ratio2(f), f, f <= 4.0);
        let f = find(&format!("{e} compute floor")) / find(&format!("{e} gpuproc SharedSlice"));
        let what = format!("{e} compute floor / gpuproc SharedSlice <= 2x");
        target_line(&what, ratio2(f), f, f <= 2.0);
    }
    let r = py_str / g_str;
    target_line(
        "(e3) python Pool / gpuproc, strings >= 10x",
        ratio(r),
        r,
        r >= 10.0,
    );
}
