//! Contended lock between two processes: gpuproc's `sync::Lock` against Python's
//! `multiprocessing.Lock`, in the same run.
//!
//! Two processes meet at a barrier, then each takes the lock N times, incrementing a shared
//! counter inside it (read, then write: only the lock keeps it exact). The rate is all
//! acquisitions divided by the slower process's time. A second row measures uncontended
//! acquire/release pairs in one process. Python runs `benchmarks/sync/lock.py`.
//!
//! Usage: `cargo run --release -p gpuproc-benchmarks --bin bench_lock [N]`
//! (Python from `$GPUPROC_PYTHON`, default `.venv/bin/python`).

use std::time::{Duration, Instant};

use gpuproc::shm::SharedValue;
use gpuproc::sync::{Barrier, Lock};
use gpuproc::Process;

const TIMEOUT: Duration = Duration::from_secs(600);

fn worker((lock, counter, barrier, n): (Lock, SharedValue<u64>, Barrier, u64)) -> f64 {
    barrier.wait_timeout(TIMEOUT).expect("barrier");
    let t = Instant::now();
    for _ in 0..n {
        let _guard = lock.lock().expect("lock");
        counter.set(counter.get() + 1);
    }
    t.elapsed().as_secs_f64()
}

struct Rates {
    contended: f64,
    uncontended: f64,
    counter_ok: bool,
}

fn gpuproc_rates(n: u64) -> Rates {
    let lock = Lock::new().expect("lock");
    let counter = SharedValue::new_unlocked(0u64).expect("counter");
    let barrier = Barrier::new(2).expect("barrier");
    let mut procs: Vec<_> = (0..2)
        .map(|_| {
            let mut p = Process::new(worker, (lock.clone(), counter.clone(), barrier.clone(), n));
            p.start().expect("start");
            p
        })
        .collect();
    let elapsed = procs
        .iter_mut()
        .map(|p| p.join_timeout(TIMEOUT).expect("join"))
        .fold(0.0, f64::max);

    let t = Instant::now();
    for _ in 0..n {
        let _ = std::hint::black_box(lock.acquire().expect("acquire"));
        lock.release().expect("release");
    }
    let single = t.elapsed().as_secs_f64();
    Rates {
        contended: 2.0 * n as f64 / elapsed,
        uncontended: n as f64 / single,
        counter_ok: counter.get() == 2 * n,
    }
}

fn python_rates(n: u64) -> Option<Rates> {
    let script = gpuproc_benchmarks::workspace_root().join("benchmarks/sync/lock.py");
    let v: serde_json::Value = gpuproc_benchmarks::run_python_json(&script, &[n.to_string()])
        .map_err(|e| eprintln!("no Python figures: {e}"))
        .ok()?;
    Some(Rates {
        contended: v["contended_per_sec"].as_f64()?,
        uncontended: v["uncontended_per_sec"].as_f64()?,
        counter_ok: v["counter_ok"].as_bool()?,
    })
}

fn main() {
    gpuproc::init();
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let ours = gpuproc_rates(n);
    let py = python_rates(n);
    println!("lock: {n} acquisitions per process, 2 processes contending; then 1 process alone");
    println!(
        "{:<28} {:>16} {:>16} {:>8}",
        "scenario", "gpuproc acq/s", "python acq/s", "ratio"
    );
    let row = |name: &str, a: f64, b: Option<f64>| match b {
        Some(b) => println!("{name:<28} {a:>16.0} {b:>16.0} {:>7.1}x", a / b),
        None => println!("{name:<28} {a:>16.0} {:>16} {:>8}", "-", "-"),
    };
    row(
        "contended (2 processes)",
        ours.contended,
        py.as_ref().map(|p| p.contended),
    );
    row(
        "uncontended (1 process)",
        ours.uncontended,
        py.as_ref().map(|p| p.uncontended),
    );
    assert!(ours.counter_ok, "gpuproc's counter lost increments");
    if let Some(p) = &py {
        assert!(p.counter_ok, "python's counter lost increments");
    }
}
