//! `scripts/gpu-check --sim`: the real-GPU check script, run here against the NVML simulator
//! with its fake `nvidia-smi`, so that the script itself is tested. It must pass, and a
//! deliberate mismatch (the fake `nvidia-smi` lying about one field) must fail naming it.
//!
//! The script uses the `demo` example next to the `gpuproc` binary (`target/<profile>/examples`),
//! which `cargo test --workspace` builds.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[allow(dead_code)] // Helpers for the other test files.
mod common;
use common::{run, sim_lib, stderr, stdout};

/// `scripts/gpu-check --sim` with the binaries of this build, and `lie` for the fake
/// `nvidia-smi`'s `GPU_CHECK_FAKE_LIE` when given.
fn gpu_check(lie: Option<&str>) -> Output {
    let gpuproc = PathBuf::from(env!("CARGO_BIN_EXE_gpuproc"));
    let bin = gpuproc.parent().expect("gpuproc has a folder");
    assert!(
        bin.join("examples/demo").is_file(),
        "{} is not built: cargo build -p gpuproc --example demo (cargo test --workspace builds it)",
        bin.join("examples/demo").display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/gpu-check");
    let mut command = Command::new(script);
    command
        .args(["--sim", "--runs", "1", "--bin"])
        .arg(bin)
        .arg("--sim-lib")
        .arg(sim_lib())
        .env_remove("GPUPROC_NVML_LIB")
        .env_remove("NVML_SIM_SCENARIO")
        .env_remove("NVML_SIM_STATE_DIR")
        .env_remove("GPUPROC_RUNTIME_DIR")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("GPU_CHECK_FAKE_LIE");
    if let Some(field) = lie {
        command.env("GPU_CHECK_FAKE_LIE", field);
    }
    run(command)
}

#[test]
fn gpu_check_sim_passes() {
    let out = gpu_check(None);
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "gpu-check --sim failed ({}):\n{text}\n{}",
        out.status,
        stderr(&out)
    );
    assert!(!text.lines().any(|l| l.starts_with("FAIL")), "{text}");
    for expected in [
        "PASS gpu count: gpuproc 4, nvidia-smi 4",
        "PASS gpu[3] memory.used",
        "PASS demo task 3",
        "memory as nvidia-smi sees it",
        "PASS a second pick of GPU 0 while it is held",
        "PASS run: distinct CUDA_VISIBLE_DEVICES: 4 distinct",
        "gpuproc gpus --json",
        "\nPASS: ",
    ] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }
}

#[test]
fn gpu_check_sim_fails_naming_the_field_that_differs() {
    for (field, line) in [
        ("memory.total", "FAIL gpu[0] memory.total"),
        (
            "pcie.link.width.current",
            "FAIL gpu[0] pcie.link.width.current",
        ),
        ("used_memory", "used_memory"),
    ] {
        let out = gpu_check(Some(field));
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(1), "lie about {field}:\n{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("FAIL") && l.contains(line)),
            "lie about {field}: no FAIL line with {line:?}:\n{text}"
        );
        assert!(text.contains("\nFAIL: "), "{text}");
    }
}
