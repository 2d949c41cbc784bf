//! Full GPU snapshot of the simulated 8-GPU machine: gpuproc against gpustat and pynvml.
//!
//! All three read the same scenario through the same simulated `libnvidia-ml` (8 GPUs, their
//! processes, and one live process so that host information is joined from `/proc`):
//! - gpuproc: `Gpus::snapshot()` in this process, repeated;
//! - `gpustat --json` as a command, as a user runs it;
//! - `gpustat.new_query()` in a Python loop (no interpreter start-up), for fairness, and
//!   again with its 0.1 s-per-GPU CPU-sampling sleep patched out;
//! - a pynvml loop reading the same fields with psutil host data;
//! - nvitop's `Device.all()` with each device's snapshot, the detailed fields (PCIe link and
//!   throughput, BAR1, NVLink, clock event reasons, remapped rows, energy, video engines)
//!   and its processes' snapshots (per-process SM utilisation, host data): the target is
//!   gpuproc at least 10x faster;
//! - `nvitop -1` as a command.
//!
//! Usage: `cargo run --release -p gpuproc-benchmarks --bin bench_gpus [ITERATIONS]`
//! (Python from `$GPUPROC_PYTHON`, default `.venv/bin/python`).

use std::process::Command;
use std::time::{Duration, Instant};

use gpuproc::gpu::Gpus;

fn main() {
    let iterations: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let root = gpuproc_benchmarks::workspace_root();
    // A dependency's cdylib lands in target/<profile>/deps, next to which this binary is not.
    let lib = nvml_sim::library_path()
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            let lib = exe.parent()?.join("deps/libnvml_sim.so");
            lib.is_file().then_some(lib)
        })
        .expect("libnvml_sim.so not found: cargo build --release -p nvml-sim");
    let scratch = std::env::temp_dir().join(format!("gpuproc-bench-gpus-{}", std::process::id()));
    let libdir = scratch.join("lib");
    let state = scratch.join("state");
    // pynvml and gpustat dlopen("libnvidia-ml.so.1"): point that name at the simulator.
    std::fs::create_dir_all(&libdir).expect("library dir");
    std::os::unix::fs::symlink(&lib, libdir.join("libnvidia-ml.so.1")).expect("symlink");
    std::fs::create_dir_all(&state).expect("state dir");
    // This process holds 2 GiB on GPU 6: a live process every tool joins with host data.
    std::fs::write(
        state.join(format!("6-{}", std::process::id())),
        (2u64 << 30).to_string(),
    )
    .expect("state file");
    // Set before the simulator is loaded; nothing else runs yet.
    std::env::set_var("NVML_SIM_SCENARIO", "8gpu");
    std::env::set_var("NVML_SIM_STATE_DIR", &state);
    std::env::set_var("LD_LIBRARY_PATH", &libdir);
    std::env::set_var("GPUPROC_NVML_LIB", &lib);

    // gpuproc, in process.
    let gpus = Gpus::builder()
        .library(&lib)
        .build()
        .expect("open the simulator");
    let warm = gpus.snapshot().expect("snapshot");
    let processes: usize = warm
        .devices
        .iter()
        .map(|d| d.processes.as_ref().map_or(0, Vec::len))
        .sum();
    let start = Instant::now();
    for _ in 0..iterations {
        std::hint::black_box(gpus.snapshot().expect("snapshot"));
    }
    let gpuproc = start.elapsed() / iterations;

    let python = gpuproc_benchmarks::python();

    // gpustat --json, as a command.
    let runs = (iterations / 50).clamp(5, 20);
    let run_gpustat = || {
        let out = Command::new(&python)
            .args(["-m", "gpustat", "--json"])
            .output()
            .expect("run gpustat");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run_gpustat();
    let start = Instant::now();
    for _ in 0..runs {
        run_gpustat();
    }
    let gpustat_cmd = start.elapsed() / runs;

    // nvitop -1, as a command (the nvitop script next to the venv's Python).
    let nvitop = python.with_file_name("nvitop");
    let run_nvitop = || {
        let out = Command::new(&nvitop)
            .arg("-1")
            .output()
            .expect("run nvitop -1");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run_nvitop();
    let start = Instant::now();
    for _ in 0..runs {
        run_nvitop();
    }
    let nvitop_cmd = start.elapsed() / runs;

    // Python loops, in process.
    let py_iterations = (iterations / 10).max(20);
    let out = Command::new(&python)
        .arg(root.join("benchmarks/gpus/bench_gpus.py"))
        .arg(py_iterations.to_string())
        .output()
        .expect("run bench_gpus.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let py: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON from python");
    let secs = |key: &str| Duration::from_secs_f64(py[key].as_f64().expect(key));

    println!("full snapshot, 8 GPUs, {processes} processes (simulated NVML), per snapshot:\n");
    println!(
        "{:<34} {:>12} {:>16}",
        "implementation", "time", "gpuproc faster"
    );
    let row = |name: &str, t: Duration| {
        println!(
            "{:<34} {:>9.1} µs {:>15.1}x",
            name,
            t.as_secs_f64() * 1e6,
            t.as_secs_f64() / gpuproc.as_secs_f64()
        );
    };
    row(&format!("gpuproc Gpus::snapshot ({iterations}x)"), gpuproc);
    row(&format!("gpustat --json, command ({runs}x)"), gpustat_cmd);
    row(
        &format!("gpustat.new_query(), loop ({py_iterations}x)"),
        secs("gpustat_new_query"),
    );
    row(
        &format!("  same, its sleep patched out ({py_iterations}x)"),
        secs("gpustat_new_query_no_sleep"),
    );
    row(
        &format!("pynvml + psutil loop ({py_iterations}x)"),
        secs("pynvml_loop"),
    );
    row(
        &format!("nvitop Device.all() loop ({py_iterations}x)"),
        secs("nvitop_loop"),
    );
    row(&format!("nvitop -1, command ({runs}x)"), nvitop_cmd);
    let ratio = secs("nvitop_loop").as_secs_f64() / gpuproc.as_secs_f64();
    println!(
        "\nwith the detailed fields, gpuproc is {ratio:.1}x faster than nvitop's loop (target: at least 10x): {}",
        if ratio >= 10.0 { "met" } else { "NOT met" }
    );
    let _ = std::fs::remove_dir_all(scratch);
}
