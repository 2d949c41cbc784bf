//! One full GPU snapshot from Python, on the simulated 8-GPU machine: the `gpuproc` Python
//! package against gpustat, GPUtil and nvitop, in one run.
//!
//! Every library reads the same scenario through the same simulated `libnvidia-ml` (8 GPUs,
//! their processes, and this process holding memory on GPU 6, so that host information is
//! joined from `/proc`). GPUtil runs `nvidia-smi`: a stand-in script
//! (`benchmarks/gpus/nvidia_smi_standin.py`, through pynvml) is put first on `PATH`.
//! The timing loops are in `benchmarks/gpus/bench_py_gpus.py`.
//!
//! Needs the `gpuproc` Python package in the benchmark's Python: `benchmarks/run py_gpus`
//! builds the release wheel and installs it into `.venv` first.
//!
//! Usage: `bench_py_gpus [ITERATIONS]` (default 1000 for gpuproc; the others run fewer).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;

fn main() {
    let iterations: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let root = gpuproc_benchmarks::workspace_root();
    let python = gpuproc_benchmarks::python();
    let lib = nvml_sim::library_path()
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            let lib = exe.parent()?.join("deps/libnvml_sim.so");
            lib.is_file().then_some(lib)
        })
        .expect("libnvml_sim.so not found: cargo build --release -p nvml-sim");
    let scratch =
        std::env::temp_dir().join(format!("gpuproc-bench-py-gpus-{}", std::process::id()));
    let libdir = scratch.join("lib");
    let state = scratch.join("state");
    let bin = scratch.join("bin");
    for dir in [&libdir, &state, &bin] {
        std::fs::create_dir_all(dir).expect("scratch directory");
    }
    // pynvml, gpustat and nvitop dlopen("libnvidia-ml.so.1"); gpuproc reads GPUPROC_NVML_LIB.
    std::os::unix::fs::symlink(&lib, libdir.join("libnvidia-ml.so.1")).expect("symlink");
    std::fs::write(
        state.join(format!("6-{}", std::process::id())),
        (2u64 << 30).to_string(),
    )
    .expect("state file");
    // The stand-in nvidia-smi, run by the benchmark's Python.
    let standin = std::fs::read_to_string(root.join("benchmarks/gpus/nvidia_smi_standin.py"))
        .expect("read the nvidia-smi stand-in");
    let smi = bin.join("nvidia-smi");
    let mut file = std::fs::File::create(&smi).expect("create nvidia-smi");
    write!(file, "#!{}\n{standin}", python.display()).expect("write nvidia-smi");
    drop(file);
    std::fs::set_permissions(&smi, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![bin.clone()];
    paths.extend(std::env::split_paths(&path));

    let out = std::process::Command::new(&python)
        .arg(root.join("benchmarks/gpus/bench_py_gpus.py"))
        .arg(iterations.to_string())
        .env("NVML_SIM_SCENARIO", "8gpu")
        .env("NVML_SIM_STATE_DIR", &state)
        .env("LD_LIBRARY_PATH", &libdir)
        .env("GPUPROC_NVML_LIB", &lib)
        .env("PATH", std::env::join_paths(paths).expect("PATH"))
        .output()
        .expect("run bench_py_gpus.py");
    let _ = std::fs::remove_dir_all(&scratch);
    if !out.status.success() {
        eprintln!(
            "bench_py_gpus.py failed ({}): {}\n(the gpuproc package comes from \
             `scripts/build-wheel --release` and `pip install` of the wheel; \
             `benchmarks/run py_gpus` does both)",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        std::process::exit(1);
    }
    let results: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&out.stdout).expect("JSON from bench_py_gpus.py");
    let mean = |name: &str| results[name]["mean"].as_f64().expect("mean");
    let ours = mean("gpuproc.snapshot()");
    println!("one full GPU snapshot from Python, 8 GPUs (simulated NVML), per snapshot:\n");
    println!(
        "{:<42} {:>6} {:>5} {:>5} {:>12} {:>12} {:>10}",
        "library", "runs", "gpus", "procs", "mean", "p50", "vs gpuproc"
    );
    for (name, r) in &results {
        println!(
            "{:<42} {:>6} {:>5} {:>5} {:>9.1} µs {:>9.1} µs {:>9.1}x",
            name,
            r["iterations"].as_u64().unwrap_or(0),
            r["devices"].as_u64().unwrap_or(0),
            r["processes"].as_u64().unwrap_or(0),
            r["mean"].as_f64().unwrap_or(f64::NAN) * 1e6,
            r["p50"].as_f64().unwrap_or(f64::NAN) * 1e6,
            r["mean"].as_f64().unwrap_or(f64::NAN) / ours
        );
    }
    // The target is against the calls as users make them; the row with gpustat's sleep
    // patched out is its own work only, shown for a stricter comparison.
    let fastest = results
        .iter()
        .filter(|(name, _)| name.as_str() != "gpuproc.snapshot()" && !name.contains("patched"))
        .map(|(name, r)| (name, r["mean"].as_f64().unwrap_or(f64::INFINITY)))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    if let Some((name, t)) = fastest {
        let ratio = t / ours;
        println!(
            "\ntarget: gpuproc.snapshot() at least 10x faster than the fastest of the others \
             ({name}): {ratio:.1}x, {}",
            if ratio >= 10.0 { "met" } else { "NOT met" }
        );
    }
}
