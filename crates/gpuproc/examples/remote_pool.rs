//! A pool whose workers are Slurm job steps, each with its own GPU: the same `map` as on one
//! machine. Run it inside an allocation (`salloc -N 2 --gres=gpu:4`, then this program) or
//! anywhere `srun` can start steps; the project's one-node cluster will do:
//!
//! ```sh
//! eval "$(scripts/slurm-local up)"
//! cargo run --example remote_pool -- 127.0.0.1
//! ```
//!
//! The argument is the address of this machine that the workers connect back to (default:
//! this host's name).

use gpuproc::{Launcher, Pool, Slurm};

/// Runs on a worker: where it ran, which GPU Slurm gave it, and the work itself.
fn train(seed: u64) -> (String, String, u64) {
    let node = std::env::var("SLURMD_NODENAME").unwrap_or_else(|_| "?".into());
    let gpu = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "none".into());
    (node, gpu, seed * seed)
}

fn main() -> Result<(), gpuproc::PoolError> {
    gpuproc::init();
    let mut launcher = Launcher::slurm(Slurm::new().gpus(1).time("10"));
    if let Some(host) = std::env::args().nth(1) {
        launcher = launcher.connect_back_to(host);
    }
    let pool = Pool::builder().processes(2).launcher(launcher).build()?;
    let results = pool.map(train, 0..8u64)?;
    let mut placements: Vec<(String, String)> = results
        .iter()
        .map(|(n, g, _)| (n.clone(), g.clone()))
        .collect();
    placements.sort();
    placements.dedup();
    for (node, gpu) in &placements {
        println!("worker on {node} with GPU {gpu}");
    }
    let total: u64 = results.iter().map(|r| r.2).sum();
    println!("sum of squares: {total}");
    pool.close();
    pool.join()
}
