//! `gpuproc top` per frame: the CPU time of one sample (NVML snapshot, leases, `/proc`
//! ancestry) and of one redraw (layout, sort, table and panels at 200x60), with 16 simulated
//! GPUs and 200 processes. Target: a redraw within 5 ms of CPU.
//!
//! The scenario is generated: 16 H100s, 200 processes spread over them with sizes and
//! utilisations that move (`NVML_SIM_CLOCK` unset), 20 of them live processes (this
//! benchmark's children, so `/proc` has users, command lines and ancestry to join).
//!
//! Usage: `bench_top [FRAMES]` (default 200). The `gpuproc` binary must be built in the same
//! profile: `cargo build --release -p gpuproc-cli -p nvml-sim`.

use std::fmt::Write as _;
use std::process::{Command, Stdio};

const GPUS: usize = 16;
const PROCESSES: usize = 200;
const LIVE: usize = 20;

fn main() {
    let frames: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let exe = std::env::current_exe().expect("current exe");
    let bin_dir = exe.parent().expect("exe dir").to_path_buf();
    let gpuproc = bin_dir.join("gpuproc");
    assert!(
        gpuproc.is_file(),
        "{} not found: cargo build --release -p gpuproc-cli -p nvml-sim",
        gpuproc.display()
    );
    let lib = nvml_sim::library_path()
        .or_else(|| {
            let lib = bin_dir.join("deps/libnvml_sim.so");
            lib.is_file().then_some(lib)
        })
        .expect("libnvml_sim.so not found: cargo build --release -p nvml-sim");
    let scratch = std::env::temp_dir().join(format!("gpuproc-bench-top-{}", std::process::id()));
    let state = scratch.join("state");
    std::fs::create_dir_all(&state).expect("scratch dir");

    // Live processes: children of this benchmark, each holding memory on a GPU.
    let mut live = Vec::new();
    for i in 0..LIVE {
        let child = Command::new("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        nvml_sim::state::write_allocation(
            &state,
            (i % GPUS) as u32,
            child.id(),
            (i as u64 + 1) << 28,
        )
        .expect("state file");
        live.push(child);
    }

    let mut scenario = String::from("driver_version = \"550.54.15\"\n");
    for gpu in 0..GPUS {
        let _ = write!(
            scenario,
            "\n[[devices]]\nutilization_gpu = {{ min = 10, max = 95, period_s = {} }}\n\
             power_usage_mw = {{ min = 150000, max = 650000, period_s = 20 }}\n",
            10 + gpu
        );
        for p in 0..(PROCESSES - LIVE) / GPUS + usize::from(gpu < (PROCESSES - LIVE) % GPUS) {
            let _ = write!(
                scenario,
                "[[devices.processes]]\npid = {}\nused_memory = \"{} MiB\"\nname = \"python\"\n",
                100_000 + gpu * 1000 + p,
                256 * (p + 1)
            );
        }
    }
    let path = scratch.join("top16.toml");
    std::fs::write(&path, scenario).expect("scenario");

    let out = Command::new(&gpuproc)
        .args(["top", "--bench-frames", &frames.to_string()])
        .env("GPUPROC_NVML_LIB", &lib)
        .env("NVML_SIM_SCENARIO", &path)
        .env("NVML_SIM_STATE_DIR", &state)
        .env("GPUPROC_RUNTIME_DIR", scratch.join("runtime"))
        .env_remove("NVML_SIM_CLOCK")
        .output()
        .expect("run gpuproc top --bench-frames");
    for mut child in live {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON from gpuproc");
    let ms = |k: &str| r[k].as_f64().expect(k);
    println!(
        "gpuproc top, {} GPUs, {} processes, {} frames at 200x60, per frame:\n",
        r["gpus"], r["processes"], r["frames"]
    );
    println!("{:<44} {:>10}", "what", "CPU ms");
    println!(
        "{:<44} {:>10.3}",
        "redraw (layout, sort, panels, table)",
        ms("draw_cpu_ms")
    );
    println!(
        "{:<44} {:>10.3}",
        "sample (NVML snapshot, leases, /proc)",
        ms("sample_cpu_ms")
    );
    println!("{:<44} {:>10.3}", "wall time of both", ms("wall_ms"));
    let draw = ms("draw_cpu_ms");
    println!(
        "\nredraw CPU time {draw:.3} ms (target: at most 5 ms): {}",
        if draw <= 5.0 { "met" } else { "NOT met" }
    );
}
