//! The main demo: a pool of worker processes, each given its own GPU, each allocating GPU
//! memory and reading its GPU and its own GPU memory through NVML from inside itself; then a
//! summary table.
//!
//! On a machine with an NVIDIA driver each worker allocates (task + 1) GiB (at most half of
//! what is free) through the CUDA driver API (`cuda.rs`: `libcuda` loaded at run time, so no
//! CUDA toolkit is needed to build), on the GPU the pool gave it, and holds it while it
//! looks. With no NVIDIA driver on the machine it says so in one line and uses the bundled
//! NVML simulator (`crates/nvml-sim`, its 4-GPU scenario) through the same dynamic-loading
//! path; there each worker "allocates" GPU memory the way the simulator sees it (its state
//! files, `NVML_SIM_STATE_DIR`).
//!
//! `GPUPROC_DEMO_HOLD_MS` sets how long each worker holds its memory (default 200 ms):
//! `scripts/gpu-check` lengthens it to compare each worker's memory with `nvidia-smi`'s.
//!
//! ```text
//! $ cargo build --release -p nvml-sim && cargo run --release -p gpuproc --example demo
//! ```

mod cuda;

use std::error::Error;
use std::path::PathBuf;
use std::time::Duration;

use gpuproc::gpu::{self, Gpus};
use gpuproc::Pool;
use serde::{Deserialize, Serialize};

const SIM_STATE_DIR: &str = "NVML_SIM_STATE_DIR";
/// Milliseconds each worker holds its memory.
const HOLD_ENV: &str = "GPUPROC_DEMO_HOLD_MS";
/// The hold without `GPUPROC_DEMO_HOLD_MS`, and the most it may ask for.
const HOLD_DEFAULT: Duration = Duration::from_millis(200);
const HOLD_MAX: Duration = Duration::from_secs(60);

/// How long each worker holds its memory: `GPUPROC_DEMO_HOLD_MS`, at most a minute.
fn hold() -> Result<Duration, String> {
    match std::env::var(HOLD_ENV) {
        Err(_) => Ok(HOLD_DEFAULT),
        Ok(ms) => ms
            .trim()
            .parse::<u64>()
            .map(|ms| Duration::from_millis(ms).min(HOLD_MAX))
            .map_err(|e| format!("{HOLD_ENV}={ms:?} is not a number of milliseconds: {e}")),
    }
}

/// What one worker saw from inside its own process.
#[derive(Debug, Serialize, Deserialize)]
struct Report {
    task: u32,
    pid: u32,
    gpu: u32,
    name: String,
    uuid: String,
    /// What the worker allocated, MiB, and how.
    held_mib: u64,
    my_memory_mib: u64,
}

/// Runs in a worker: which GPU is mine, what does it look like, how much of it do I use.
fn work(task: u32) -> Result<Report, String> {
    let assigned = gpu::assigned().map_err(|e| e.to_string())?;
    let mine = assigned
        .devices
        .first()
        .ok_or("no GPU was assigned to this worker")?;
    let d = &mine.device;
    let pid = std::process::id();
    let memory = d.memory.unwrap_or_default();
    let uuid = d.uuid.clone().unwrap_or_default();
    // Stand in for a framework's allocation: (task + 1) GiB, at most half of what is free.
    let want = ((u64::from(task) + 1) << 30).min(memory.free / 2);
    let mut _allocation = None;
    let (held, how) = if let Some(dir) = std::env::var_os(SIM_STATE_DIR) {
        // The file is written aside and renamed, so the pool's sampler never reads it half
        // written.
        nvml_sim::state::write_allocation(&PathBuf::from(dir), d.index, pid, want)
            .map_err(|e| e.to_string())?;
        (want, "simulator state file".to_string())
    } else {
        let bytes = usize::try_from(want).map_err(|e| e.to_string())?;
        match cuda::Allocation::new(&uuid, bytes) {
            Ok(a) => {
                let held = a.bytes as u64;
                _allocation = Some(a);
                (held, "cuMemAlloc".to_string())
            }
            Err(e) => (0, format!("nothing allocated: {e}")),
        }
    };
    println!(
        "task {task}: pid {pid} holds {} MiB on GPU {} {uuid} ({how})",
        held >> 20,
        d.index
    );
    // The "work": hold the memory a moment, so the pool's sampler (and nvidia-smi) see it.
    std::thread::sleep(hold()?);
    let used = gpu::usage_of(pid, true).map_err(|e| e.to_string())?;
    let my_memory_mib = used.devices.iter().map(|u| u.used_memory).sum::<u64>() >> 20;
    println!(
        "task {task}: pid {pid}, GPU {} {} {} ({:.1}/{:.1} GiB used), mine {my_memory_mib} MiB",
        d.index,
        d.name.as_deref().unwrap_or("?"),
        d.uuid.as_deref().unwrap_or("?"),
        memory.used as f64 / f64::from(1u32 << 30),
        memory.total as f64 / f64::from(1u32 << 30),
    );
    Ok(Report {
        task,
        pid,
        gpu: d.index,
        name: d.name.clone().unwrap_or_default(),
        uuid,
        held_mib: held >> 20,
        my_memory_mib,
    })
}

/// Points NVML at the bundled simulator when the machine has no driver; returns the
/// simulator's state folder to clean up.
fn choose_nvml() -> Result<Option<PathBuf>, Box<dyn Error>> {
    if std::env::var_os(gpu::NVML_LIB_ENV).is_some() {
        return Ok(None);
    }
    let Err(e) = Gpus::open() else {
        return Ok(None);
    };
    let sim = nvml_sim::library_path()
        .ok_or("the NVML simulator is not built: run `cargo build --release -p nvml-sim` first")?;
    println!("No NVIDIA driver here ({e}); using the bundled simulator with 4 GPUs.");
    let state = std::env::temp_dir().join(format!("gpuproc-demo-{}", std::process::id()));
    std::fs::create_dir_all(&state)?;
    std::env::set_var(gpu::NVML_LIB_ENV, sim);
    std::env::set_var(SIM_STATE_DIR, &state);
    std::env::set_var(gpu::RUNTIME_DIR_ENV, &state);
    if std::env::var_os("NVML_SIM_SCENARIO").is_none() {
        std::env::set_var("NVML_SIM_SCENARIO", "4gpu");
    }
    Ok(Some(state))
}

fn main() -> Result<(), Box<dyn Error>> {
    gpuproc::init();
    let sim_state = choose_nvml()?;

    let snap = gpu::snapshot()?;
    let workers = snap.devices.len().clamp(1, 4);
    println!(
        "driver {}, {} GPU(s); a pool of {workers} workers, one GPU each, from pid {}",
        snap.driver_version.as_deref().unwrap_or("?"),
        snap.devices.len(),
        std::process::id()
    );
    let pool = Pool::builder()
        .processes(workers)
        .gpus_per_worker(1)
        .gpu_sampling(Duration::from_millis(20))
        .build()?;
    let reports = pool.map_with_gpu_memory(work, 0..workers as u32)?;
    let usage = pool.gpu_usage()?;

    println!();
    println!(
        "{:<5} {:>8} {:>4}  {:<24} {:<42} {:>9} {:>8} {:>14} {:>16}",
        "task", "pid", "gpu", "name", "uuid", "held MiB", "MiB", "task peak MiB", "worker peak MiB"
    );
    for (r, task_peak) in reports {
        let r = r?;
        let worker_peak = usage
            .iter()
            .find(|u| u.pid == r.pid)
            .map_or(0, |u| u.peak_memory);
        println!(
            "{:<5} {:>8} {:>4}  {:<24} {:<42} {:>9} {:>8} {:>14} {:>16}",
            r.task,
            r.pid,
            r.gpu,
            r.name,
            r.uuid,
            r.held_mib,
            r.my_memory_mib,
            task_peak >> 20,
            worker_peak >> 20
        );
    }
    pool.close();
    pool.join()?;
    drop(pool);
    if let Some(dir) = sim_state {
        let _ = std::fs::remove_dir_all(dir);
    }
    println!(
        "\nDone: each worker had its own GPU and read it through NVML; only the workers' own \
         allocations created CUDA contexts."
    );
    Ok(())
}
