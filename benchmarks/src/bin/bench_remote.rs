//! Pools whose workers are Slurm job steps, against local workers and Python's `Pool`, in
//! one run: 100,000 tasks of `x * x` with 2 workers, at chunk size 1 and at the automatic
//! chunk size, and the time from building the pool to its first result.
//!
//! Needs a Slurm cluster whose nodes reach this machine (the project's own:
//! `eval "$(scripts/slurm-local up)"`); the workers connect back to `--host` (default
//! 127.0.0.1). Python runs `benchmarks/pool/bench_pool.py`.
//!
//! Targets: automatic chunk size within 2x of local workers; chunk size 1 at least 5x
//! Python's local `Pool`.

use std::path::Path;
use std::time::Instant;

use gpuproc::{Launcher, Pool, Slurm};
use serde::Deserialize;

fn square(x: u64) -> u64 {
    x * x
}

#[derive(Deserialize)]
struct PyOut {
    results: Vec<PyRow>,
}

#[derive(Deserialize)]
struct PyRow {
    name: String,
    tasks: u64,
    seconds: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Seconds to the first result of a new pool, then tasks/s at chunk size 1 and automatic.
fn measure(make: &dyn Fn() -> Pool, n: u64, reps: usize) -> (f64, f64, f64) {
    let t = Instant::now();
    let pool = make();
    assert_eq!(pool.apply(square, 3).expect("first result"), 9);
    let start = t.elapsed().as_secs_f64();
    let want: u64 = (0..n).map(square).sum();
    let mut c1 = Vec::new();
    let mut auto = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let got = pool
            .map_chunksize(square, 0..n, 1)
            .expect("map, chunk size 1");
        c1.push(n as f64 / t.elapsed().as_secs_f64());
        assert_eq!(got.iter().sum::<u64>(), want);
        let t = Instant::now();
        let got = pool.map(square, 0..n).expect("map");
        auto.push(n as f64 / t.elapsed().as_secs_f64());
        assert_eq!(got.iter().sum::<u64>(), want);
    }
    pool.close();
    pool.join().expect("join");
    (start, median(c1), median(auto))
}

fn main() {
    gpuproc::init();
    let mut args = std::env::args().skip(1);
    let mut host = "127.0.0.1".to_string();
    let mut scale = 1.0f64;
    let mut python_on = true;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--host" => host = args.next().expect("--host ADDRESS"),
            "--scale" => scale = args.next().and_then(|s| s.parse().ok()).expect("--scale F"),
            "--no-python" => python_on = false,
            _ => {
                eprintln!("usage: bench_remote [--host ADDRESS] [--scale F] [--no-python]");
                std::process::exit(2);
            }
        }
    }
    let n = ((100_000.0 * scale) as u64).max(1);
    let reps = 3;
    let workers = 2;

    let local = measure(&|| Pool::new(workers).expect("local pool"), n, reps);
    let slurm = measure(
        &|| {
            Pool::builder()
                .processes(workers)
                .launcher(Launcher::slurm(Slurm::new().time("10")).connect_back_to(&*host))
                .build()
                .expect("Slurm pool")
        },
        n,
        reps,
    );
    let python = if python_on {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("pool/bench_pool.py");
        let args: Vec<String> = [
            "--processes",
            "2",
            "--n1",
            &n.to_string(),
            "--n2",
            &n.to_string(),
            "--futures-n",
            "0",
            "--loky-n",
            "0",
            "--sleep-n",
            "0",
            "--starts",
            "0",
            "--reps",
            &reps.to_string(),
            "--big-n",
            "0",
            "--str-n",
            "0",
        ]
        .map(String::from)
        .to_vec();
        match gpuproc_benchmarks::run_python_json::<PyOut>(&script, &args) {
            Ok(out) => {
                let rate = |name: &str| {
                    median(
                        out.results
                            .iter()
                            .filter(|r| r.name == name)
                            .map(|r| r.tasks as f64 / r.seconds)
                            .collect(),
                    )
                };
                Some((rate("pool_c1"), rate("pool_auto")))
            }
            Err(e) => {
                eprintln!("python baseline skipped: {e}");
                None
            }
        }
    } else {
        None
    };

    println!("{n} tasks of x*x, {workers} workers; tasks/s (median of {reps})");
    println!(
        "{:<40} {:>12} {:>14} {:>14}",
        "row", "start s", "chunksize 1", "auto"
    );
    let row = |name: &str, r: (f64, f64, f64)| {
        println!("{name:<40} {:>12.3} {:>14.0} {:>14.0}", r.0, r.1, r.2)
    };
    row("gpuproc, local workers", local);
    row("gpuproc, Slurm steps (TCP)", slurm);
    if let Some((c1, auto)) = python {
        println!(
            "{:<40} {:>12} {:>14.0} {:>14.0}",
            "python Pool, local workers", "-", c1, auto
        );
    }
    println!("\nTargets:");
    let auto_ratio = local.2 / slurm.2;
    println!(
        "  Slurm auto within 2x of local auto: {auto_ratio:.2}x -> {}",
        if auto_ratio <= 2.0 { "met" } else { "MISSED" }
    );
    match python {
        Some((c1, _)) => {
            let r = slurm.1 / c1;
            println!(
                "  Slurm chunksize 1 >= 5x python chunksize 1: {r:.2}x -> {}",
                if r >= 5.0 { "met" } else { "MISSED" }
            );
        }
        None => println!("  Slurm chunksize 1 >= 5x python chunksize 1: not measured"),
    }
}
