//! The main demo: a pool of worker processes, each reading GPU information from inside itself
//! through NVML, then a summary table.
//!
//! With no NVIDIA driver on the machine it says so in one line and uses the bundled NVML
//! simulator (`crates/nvml-sim`, its 4-GPU scenario) through the same dynamic-loading path.
//!
//! ```text
//! $ cargo run --release -p gpuproc --example demo
//! ```

use std::error::Error;

use gpuproc::gpu::{self, Gpus};
use gpuproc::Pool;
use serde::{Deserialize, Serialize};

/// What one worker saw from inside its own process.
#[derive(Debug, Serialize, Deserialize)]
struct Report {
    slot: u32,
    pid: u32,
    parent: u32,
    device: String,
    uuid: String,
    memory_total_gib: f64,
    memory_used_gib: f64,
    my_gpu_memory_mib: u64,
}

/// Runs in a worker: which process am I, which GPU is mine, what does it look like now.
fn report(slot: u32) -> Result<Report, String> {
    let gpus = Gpus::open().map_err(|e| e.to_string())?;
    let devices = gpus.devices(false).map_err(|e| e.to_string())?;
    if devices.is_empty() {
        return Err("no GPUs".into());
    }
    let d = &devices[slot as usize % devices.len()];
    let mine = gpus
        .usage_of(std::process::id(), false)
        .map_err(|e| e.to_string())?;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let memory = d.memory.unwrap_or_default();
    Ok(Report {
        slot,
        pid: std::process::id(),
        parent: gpuproc::parent_process().map_or(0, |p| p.pid),
        device: d.name.clone().unwrap_or_else(|| "?".into()),
        uuid: d.uuid.clone().unwrap_or_else(|| "?".into()),
        memory_total_gib: gib(memory.total),
        memory_used_gib: gib(memory.used),
        my_gpu_memory_mib: mine.devices.iter().map(|u| u.used_memory).sum::<u64>() >> 20,
    })
}

/// Points NVML at the bundled simulator when the machine has no driver.
fn choose_nvml() -> Result<(), Box<dyn Error>> {
    if std::env::var_os(gpu::NVML_LIB_ENV).is_some() {
        return Ok(());
    }
    if let Err(e) = Gpus::open() {
        let sim = nvml_sim::library_path().ok_or(
            "the NVML simulator is not built: run `cargo build --release -p nvml-sim` first",
        )?;
        println!("No NVIDIA driver here ({e}); using the bundled simulator with 4 GPUs.");
        std::env::set_var(gpu::NVML_LIB_ENV, sim);
        if std::env::var_os("NVML_SIM_SCENARIO").is_none() {
            std::env::set_var("NVML_SIM_SCENARIO", "4gpu");
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    gpuproc::init();
    choose_nvml()?;

    let gpus = Gpus::open()?;
    let snap = gpus.snapshot()?;
    println!(
        "driver {}, {} GPU(s); starting a pool of 4 workers in pid {}",
        snap.driver_version.as_deref().unwrap_or("?"),
        snap.devices.len(),
        std::process::id()
    );

    let pool = Pool::new(4)?;
    let reports = pool.map_chunksize(report, 0..4u32, 1)?;
    println!();
    println!(
        "{:<5} {:>8} {:>8}  {:<28} {:<42} {:>16} {:>10}",
        "slot", "pid", "parent", "device", "uuid", "memory used/GiB", "mine/MiB"
    );
    for r in reports {
        let r = r?;
        println!(
            "{:<5} {:>8} {:>8}  {:<28} {:<42} {:>7.1}/{:<8.1} {:>10}",
            r.slot,
            r.pid,
            r.parent,
            r.device,
            r.uuid,
            r.memory_used_gib,
            r.memory_total_gib,
            r.my_gpu_memory_mib
        );
    }
    pool.close();
    pool.join()?;
    println!("\nDone: every worker read its GPU through NVML, with no CUDA context.");
    Ok(())
}
