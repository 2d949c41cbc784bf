//! Managed dict: gpuproc's `managers::ManagedDict` against Python's
//! `multiprocessing.Manager().dict()`, in the same run.
//!
//! N get/set pairs from one client (this process), then N from each of 4 client processes
//! started together (they meet at a barrier; the rate is all pairs over the slowest
//! client's time). Each client cycles over 1,000 keys of its own; at the end the dict must
//! hold 4,000 keys. Python runs `benchmarks/managers/managed_dict.py`.
//!
//! Usage: `cargo run --release -p gpuproc-benchmarks --bin bench_managers [N]`
//! (Python from `$GPUPROC_PYTHON`, default `.venv/bin/python`).

use std::time::{Duration, Instant};

use gpuproc::managers::{ManagedDict, Manager};
use gpuproc::sync::Barrier;
use gpuproc::Process;

const TIMEOUT: Duration = Duration::from_secs(3600);

fn pairs(d: &ManagedDict<u64, u64>, base: u64, n: u64) {
    for i in 0..n {
        let k = base + i % 1000;
        d.set(&k, &i).expect("set");
        std::hint::black_box(d.get(&k).expect("get"));
    }
}

fn client((d, base, n, barrier): (ManagedDict<u64, u64>, u64, u64, Barrier)) -> f64 {
    barrier.wait_timeout(TIMEOUT).expect("barrier");
    let t = Instant::now();
    pairs(&d, base, n);
    t.elapsed().as_secs_f64()
}

struct Rates {
    one: f64,
    four: f64,
    ok: bool,
}

fn gpuproc_rates(n: u64) -> Rates {
    let manager = Manager::start().expect("manager");
    let d: ManagedDict<u64, u64> = manager.dict().expect("dict");
    let t = Instant::now();
    pairs(&d, 0, n);
    let one = t.elapsed().as_secs_f64();
    let barrier = Barrier::new(4).expect("barrier");
    let mut procs: Vec<_> = (0..4u64)
        .map(|k| {
            let mut p = Process::new(client, (d.clone(), k * 1000, n, barrier.clone()));
            p.start().expect("start");
            p
        })
        .collect();
    let four = procs
        .iter_mut()
        .map(|p| p.join_timeout(TIMEOUT).expect("join"))
        .fold(0.0, f64::max);
    Rates {
        one: n as f64 / one,
        four: 4.0 * n as f64 / four,
        ok: d.len().expect("len") == 4000,
    }
}

fn python_rates(n: u64) -> Option<Rates> {
    let script = gpuproc_benchmarks::workspace_root().join("benchmarks/managers/managed_dict.py");
    let v: serde_json::Value = gpuproc_benchmarks::run_python_json(&script, &[n.to_string()])
        .map_err(|e| eprintln!("no Python figures: {e}"))
        .ok()?;
    Some(Rates {
        one: v["one_client_pairs_per_sec"].as_f64()?,
        four: v["four_clients_pairs_per_sec"].as_f64()?,
        ok: v["ok"].as_bool()?,
    })
}

fn main() {
    gpuproc::init();
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let ours = gpuproc_rates(n);
    let py = python_rates(n);
    println!("managed dict: {n} get/set pairs per client");
    println!(
        "{:<28} {:>16} {:>16} {:>8}",
        "scenario", "gpuproc pairs/s", "python pairs/s", "ratio"
    );
    let row = |name: &str, a: f64, b: Option<f64>| match b {
        Some(b) => println!("{name:<28} {a:>16.0} {b:>16.0} {:>7.1}x", a / b),
        None => println!("{name:<28} {a:>16.0} {:>16} {:>8}", "-", "-"),
    };
    row("1 client", ours.one, py.as_ref().map(|p| p.one));
    row("4 clients at once", ours.four, py.as_ref().map(|p| p.four));
    assert!(ours.ok, "gpuproc's dict lost updates");
    if let Some(p) = &py {
        assert!(p.ok, "python's dict lost updates");
    }
}
