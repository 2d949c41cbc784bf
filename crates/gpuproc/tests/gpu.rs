//! The GPU layer against the NVML simulator, through the real dynamic-loading path.
//!
//! The simulator reads its scenario when NVML is initialised and keeps it for the life of the
//! process, so every test re-runs this test binary as a child with the scenario in its
//! environment (`GPUPROC_NVML_LIB` = the simulator), and the child does the checks.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use gpuproc::gpu::{self, Criteria, CudaDeviceOrder, GpuErrorKind, Gpus, ProcessKind};
use gpuproc::Process;

// Processes with GPUs re-run this binary as their children.
gpuproc::enable_test_support!();

const CHILD_ENV: &str = "GPUPROC_GPU_TEST_CHILD";
const DEADLINE: Duration = Duration::from_secs(60);

fn sim_lib() -> PathBuf {
    nvml_sim::library_path()
        .expect("libnvml_sim.so not found: build the workspace first (cargo build --workspace)")
}

/// Waits for `command` with a deadline, killing it when the deadline passes.
fn output_within(mut command: Command, deadline: Duration) -> Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(deadline) {
        Ok(output) => output.expect("wait for child"),
        Err(_) => {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
            panic!("child {pid} did not finish within {deadline:?}");
        }
    }
}

/// Runs `body` in a child process of this test binary with the simulator loaded for
/// `scenario` and `env` set; in the child (where `CHILD_ENV` names the test) runs `body`.
fn in_scenario(test: &str, scenario: &str, env: &[(&str, &str)], body: fn()) {
    if std::env::var(CHILD_ENV).as_deref() == Ok(test) {
        body();
        return;
    }
    let mut command = Command::new(std::env::current_exe().expect("test binary path"));
    command
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, test)
        .env("NVML_SIM_SCENARIO", scenario)
        .env(gpu::NVML_LIB_ENV, sim_lib())
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("CUDA_DEVICE_ORDER")
        .env_remove("NVML_SIM_STATE_DIR");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = output_within(command, DEADLINE);
    let text = format!(
        "--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "child {test} failed:\n{text}");
    assert!(
        text.contains("1 passed"),
        "child {test} ran no test:\n{text}"
    );
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gpuproc-gpu-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

#[test]
fn missing_library_is_a_typed_error() {
    let err = Gpus::builder()
        .library("/nonexistent/libnvidia-ml.so.1")
        .build()
        .unwrap_err();
    assert!(err.is_no_library(), "{err:?}");
    assert!(err.is_no_driver());
    assert!(err.to_string().contains("/nonexistent/libnvidia-ml.so.1"));
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn one_gpu_default_scenario() {
    in_scenario("one_gpu_default_scenario", "default", &[], || {
        assert_eq!(gpu::device_count().unwrap(), 1);
        let snap = gpu::snapshot().unwrap();
        assert_eq!(snap.devices.len(), 1);
        assert!(snap.driver_version.is_some());
        assert!(snap.nvml_version.is_some());
        assert!(snap.cuda_driver_version.is_some());
        assert!(!snap.hostname.is_empty());
        let d = &snap.devices[0];
        assert!(d.error.is_none(), "{d:?}");
        assert!(d.name.is_some() && d.pci_bus_id.is_some());
        assert!(d.uuid.as_deref().unwrap().starts_with("GPU-"));
        let m = d.memory.unwrap();
        assert!(m.total > 0 && m.used + m.free <= m.total);
        assert!(d.utilization.is_some() && d.temperature_c.is_some());
        assert!(d.power_draw_mw.is_some() && d.power_limit_mw.is_some());
        assert!(d.performance_state.is_some() && d.compute_mode.is_some());
        assert!(d.clocks.graphics_mhz.is_some() && d.clocks.max_memory_mhz.is_some());
        // The snapshot survives a JSON round trip.
        let json = serde_json::to_string(&snap).unwrap();
        assert_eq!(serde_json::from_str::<gpu::Snapshot>(&json).unwrap(), snap);
    });
}

#[test]
fn four_gpus() {
    in_scenario("four_gpus", "4gpu", &[], || {
        let snap = gpu::snapshot().unwrap();
        assert_eq!(snap.devices.len(), 4);
        for (i, d) in snap.devices.iter().enumerate() {
            assert_eq!(d.index as usize, i);
            assert!(d.error.is_none());
        }
        let uuids: std::collections::HashSet<_> =
            snap.devices.iter().map(|d| d.uuid.clone()).collect();
        assert_eq!(uuids.len(), 4);
    });
}

#[test]
fn eight_gpus_with_processes() {
    in_scenario("eight_gpus_with_processes", "8gpu", &[], || {
        let snap = gpu::snapshot().unwrap();
        assert_eq!(snap.devices.len(), 8);
        let me = std::process::id();
        // GPU 1 runs "self": this process, joined with /proc.
        let mine = snap.devices[1]
            .processes
            .as_ref()
            .unwrap()
            .iter()
            .find(|p| p.pid == Some(me))
            .expect("own process on GPU 1");
        assert_eq!(mine.used_memory, Some(1 << 30));
        assert_eq!(mine.kind, ProcessKind::Compute);
        let host = mine.host.as_ref().expect("host info for own process");
        assert_eq!(
            host.cmdline.first().map(PathBuf::from),
            std::env::args().next().map(PathBuf::from)
        );
        assert!(host.rss_bytes.unwrap() > 0);
        assert!(host.uid.is_some() && host.cpu_percent.is_some());
        let parent = rustix::process::getppid().unwrap().as_raw_nonzero().get() as u32;
        assert_eq!(host.ppid, Some(parent));
        // Started before the snapshot, and not before the machine booted this year.
        let started = host.started_ms.unwrap();
        assert!(
            started <= snap.timestamp_ms && started > 1_600_000_000_000,
            "{started}"
        );
        // GPU 5 has a graphics process.
        assert!(snap.devices[5]
            .processes
            .iter()
            .flatten()
            .any(|p| p.kind != ProcessKind::Compute));
        // GPU 0's processes (pids that do not exist here) keep their memory.
        let p0 = snap.devices[0].processes.as_ref().unwrap();
        assert!(p0.iter().any(|p| p.used_memory == Some(34 << 30)));

        // Per-process view: this process uses 1 GiB on GPU 1, and so does its parent's tree.
        let usage = gpu::usage_of(me, false).unwrap();
        assert_eq!(usage.devices.len(), 1);
        assert_eq!(usage.devices[0].index, 1);
        assert_eq!(usage.devices[0].pids, vec![me]);
        assert_eq!(usage.total_memory(), 1 << 30);
        let parent = rustix::process::getppid().unwrap().as_raw_nonzero().get() as u32;
        assert!(gpu::usage_of(parent, false).unwrap().devices.is_empty());
        let tree = gpu::usage_of(parent, true).unwrap();
        assert!(tree.pids.contains(&me), "{tree:?}");
        assert_eq!(tree.total_memory(), 1 << 30);
    });
}

#[test]
fn live_processes_from_the_state_dir() {
    let dir = scratch_dir("state");
    let parent = std::process::id();
    nvml_sim::state::write_allocation(&dir, 3, parent, 5 << 30).unwrap();
    let dir_text = dir.to_string_lossy().into_owned();
    in_scenario(
        "live_processes_from_the_state_dir",
        "4gpu",
        &[("NVML_SIM_STATE_DIR", &dir_text)],
        || {
            let parent = rustix::process::getppid().unwrap().as_raw_nonzero().get() as u32;
            let usage = gpu::usage_of(parent, false).unwrap();
            assert_eq!(usage.devices.len(), 1, "{usage:?}");
            assert_eq!(usage.devices[0].index, 3);
            assert_eq!(usage.total_memory(), 5 << 30);
            let snap = gpu::snapshot().unwrap();
            let p = snap.devices[3].processes.as_ref().unwrap();
            let entry = p.iter().find(|p| p.pid == Some(parent)).unwrap();
            assert!(!entry.host.as_ref().unwrap().command().is_empty());

            // Accounting's view: alone on GPU 3 (98% busy), the process has all of it.
            let quick = &usage.devices[0];
            assert_eq!((quick.sm_percent, quick.total_energy_mj), (None, None));
            assert_eq!(quick.other_processes, 0);
            let detailed = gpu::usage_detailed(parent, false).unwrap();
            let d = &detailed.devices[0];
            assert_eq!((d.index, d.used_memory), (3, 5 << 30));
            assert_eq!((d.sm_percent, d.other_processes), (Some(98), 0));
            let before = d.total_energy_mj.expect("an energy counter");
            // Another process (init, always alive) joins.
            let dir = PathBuf::from(std::env::var("NVML_SIM_STATE_DIR").unwrap());
            nvml_sim::state::write_allocation(&dir, 3, 1, 1 << 30).unwrap();
            let shared = gpu::usage_detailed(parent, false).unwrap();
            let d = &shared.devices[0];
            assert_eq!(d.other_processes, 1, "{shared:?}");
            assert!(d.total_energy_mj.expect("an energy counter") >= before);
        },
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn lost_gpu_is_marked_and_the_rest_is_read() {
    in_scenario(
        "lost_gpu_is_marked_and_the_rest_is_read",
        "lost",
        &[],
        || {
            let snap = gpu::snapshot().unwrap();
            assert_eq!(snap.devices.len(), 4);
            let lost = &snap.devices[2];
            let fault = lost.error.as_ref().expect("GPU 2 is marked");
            assert_eq!(fault.kind, GpuErrorKind::GpuLost);
            assert!(fault.message.contains("GPU 2"), "{}", fault.message);
            assert!(lost.memory.is_none());
            for i in [0, 1, 3] {
                assert!(snap.devices[i].error.is_none());
                assert!(snap.devices[i].memory.is_some());
            }
            assert_eq!(snap.devices[3].memory.unwrap().used, 7 << 30);
        },
    );
}

#[test]
fn no_driver_is_a_typed_error() {
    in_scenario("no_driver_is_a_typed_error", "nodriver", &[], || {
        let err = gpu::snapshot().unwrap_err();
        assert!(err.is_driver_not_loaded(), "{err:?}");
        assert!(err.is_no_driver());
        assert!(err.to_string().contains("driver is not loaded"));
        // The outcome is kept: a second call answers the same without reloading.
        assert_eq!(gpu::device_count().unwrap_err().kind(), err.kind());
        assert!(gpu::visible().unwrap_err().is_no_driver());
    });
}

#[test]
fn no_devices() {
    in_scenario("no_devices", "nodevices", &[], || {
        assert_eq!(gpu::device_count().unwrap(), 0);
        assert!(gpu::snapshot().unwrap().devices.is_empty());
        assert!(gpu::visible().unwrap().devices.is_empty());
        assert!(gpu::usage_of(std::process::id(), true)
            .unwrap()
            .devices
            .is_empty());
    });
}

#[test]
fn mig_instances_and_their_processes() {
    in_scenario("mig_instances_and_their_processes", "mig", &[], || {
        let snap = gpu::snapshot().unwrap();
        let mig = snap.devices[0].mig.as_ref().expect("GPU 0 supports MIG");
        assert!(mig.enabled);
        assert_eq!(mig.instances.len(), 3);
        assert_eq!(
            mig.instances[1].uuid.as_deref(),
            Some("MIG-9d4c2f63-a6b5-5d1f-8e3c-7d2a8b3f5c12")
        );
        assert_eq!(mig.instances[1].gpu_instance_id, Some(3));
        assert_eq!(mig.instances[1].compute_instance_id, Some(0));
        assert_eq!(mig.instances[0].memory.unwrap().total, 39 << 30);
        let procs = snap.devices[0].processes.as_ref().unwrap();
        let p = procs.iter().find(|p| p.nvml_pid == 7202).unwrap();
        assert_eq!(p.gpu_instance_id, Some(3));
        assert_eq!(p.used_memory, Some(5 << 30));
        let other = snap.devices[1].mig.as_ref().expect("GPU 1 supports MIG");
        assert!(!other.enabled && other.instances.is_empty());

        let gpus = gpu::global().unwrap();
        let v = gpus
            .visible_for(
                Some("MIG-ae5d,MIG-GPU-a1000000-4c2b-4e1d-9a7f-1234567890ab/2/0"),
                CudaDeviceOrder::PciBusId,
            )
            .unwrap();
        assert_eq!(v.devices.len(), 2);
        assert_eq!(v.devices[0].mig.as_ref().unwrap().gpu_instance_id, Some(9));
        assert_eq!(v.devices[1].mig.as_ref().unwrap().gpu_instance_id, Some(2));
        assert_eq!(v.devices[1].device.index, 0);
    });
}

/// A fixed simulated clock: values that move in the `live` scenario hold still.
const FROZEN_CLOCK: &str = "1700000000.25";

#[test]
fn snapshot_details_on_the_live_scenario() {
    in_scenario(
        "snapshot_details_on_the_live_scenario",
        "live",
        &[("NVML_SIM_CLOCK", FROZEN_CLOCK)],
        || {
            let gpus = Gpus::open().unwrap();
            let snap = gpus.snapshot().unwrap();
            let (h100, rtx) = (&snap.devices[0], &snap.devices[1]);

            // PCIe: the H100 at gen 5 x16 with traffic inside the scenario's ranges; the
            // GeForce at gen 4 of a gen-4 link.
            let pcie = h100.pcie.unwrap();
            assert_eq!((pcie.generation, pcie.max_generation), (Some(5), Some(5)));
            assert_eq!((pcie.width, pcie.max_width), (Some(16), Some(16)));
            let tx = pcie.tx_kib_per_s.unwrap();
            let rx = pcie.rx_kib_per_s.unwrap();
            assert!((20_000..=900_000).contains(&tx), "{tx}");
            assert!((50_000..=2_400_000).contains(&rx), "{rx}");
            assert_eq!(rtx.pcie.unwrap().generation, Some(4));

            // NVLink: 18 active links on the H100, none on the GeForce.
            let nvlink = h100.nvlink.as_ref().unwrap();
            assert_eq!((nvlink.links.len(), nvlink.active()), (18, 18));
            // Counters since boot (with the clock frozen before this machine booted: 0).
            assert!(nvlink.tx_kib.is_some() && nvlink.rx_kib.is_some());
            assert_eq!(rtx.nvlink, None);

            // BAR1, energy, clock event reasons (both busy: no reason), ECC pages.
            assert_eq!(h100.bar1_memory.unwrap().total, 128 << 30);
            assert_eq!(rtx.bar1_memory.unwrap().total, 256 << 20);
            assert!(h100.total_energy_mj.is_some());
            let reasons = h100.clock_event_reasons.as_ref().unwrap();
            assert!(!reasons.is_throttled(), "{reasons:?}");
            let remapped = h100.remapped_rows.unwrap();
            assert!(!remapped.failure && !remapped.pending);
            assert_eq!(h100.retired_pages, None, "Hopper remaps rows instead");
            assert_eq!((rtx.remapped_rows, rtx.retired_pages), (None, None));

            // Encoder: the GeForce encodes, the H100 does not.
            let enc = rtx.encoder_utilization.unwrap();
            assert!((10..=40).contains(&enc), "{enc}");
            assert_eq!(h100.encoder_utilization, Some(0));

            // Per-process utilisation: every process has a sample; the two trainers share
            // no more than the GPU's utilisation; ffmpeg encodes.
            let util = h100.utilization.unwrap().gpu;
            let procs = h100.processes.as_ref().unwrap();
            let sm: Vec<u32> = procs
                .iter()
                .map(|p| p.utilization.unwrap().sm.unwrap())
                .collect();
            assert_eq!(sm.len(), 2);
            assert!(sm.iter().sum::<u32>() <= util, "{sm:?} of {util}");
            let ffmpeg = rtx.processes.as_ref().unwrap();
            let ffmpeg = ffmpeg.iter().find(|p| p.nvml_pid == 42101).unwrap();
            let ffmpeg_enc = ffmpeg.utilization.unwrap().encoder.unwrap();
            assert!((10..=40).contains(&ffmpeg_enc), "{ffmpeg_enc}");

            // With the clock frozen the driver takes no new sample: the next snapshot asks
            // for samples after the last one seen, gets none, and keeps the figures.
            let again = gpus.snapshot().unwrap();
            assert_eq!(again.devices[0].processes, h100.processes);
            assert_eq!(again.devices[0].pcie, h100.pcie);

            // The quick read that picking uses leaves the details out.
            let quick = gpus.devices(true).unwrap();
            assert_eq!(quick[0].pcie, None);
            assert!(quick[0]
                .processes
                .iter()
                .flatten()
                .all(|p| p.utilization.is_none()));

            let json = serde_json::to_string(&snap).unwrap();
            assert_eq!(serde_json::from_str::<gpu::Snapshot>(&json).unwrap(), snap);
        },
    );
}

#[test]
fn mig_mode_has_no_utilization_and_other_fields_stay() {
    in_scenario(
        "mig_mode_has_no_utilization_and_other_fields_stay",
        "mig",
        &[("NVML_SIM_CLOCK", FROZEN_CLOCK)],
        || {
            let snap = gpu::snapshot().unwrap();
            let d = &snap.devices[0];
            // NOT_SUPPORTED in MIG mode is `None`, never an error.
            assert!(d.error.is_none());
            assert_eq!(d.utilization, None);
            assert_eq!((d.encoder_utilization, d.decoder_utilization), (None, None));
            let procs = d.processes.as_ref().unwrap();
            assert!(!procs.is_empty());
            assert!(procs.iter().all(|p| p.utilization.is_none()), "{procs:?}");
            assert_eq!(d.bar1_memory.unwrap().total, 128 << 30);
            assert_eq!(d.pcie.unwrap().max_generation, Some(4));
            // Ampere: rows are remapped, pages are not retired.
            assert!(d.remapped_rows.is_some() && d.retired_pages.is_none());
        },
    );
}

#[test]
fn older_entry_points_when_the_newer_are_missing() {
    let dir = scratch_dir("versions");
    let scenario = dir.join("scenario.toml");
    // GPU 0 as a driver without the `_v3` process lists nor `nvmlDeviceGetMemoryInfo_v2`; GPU 1
    // also without the `_v2` lists; GPU 2 without the new name of the clock event reasons.
    let mut text = String::from(
        r#"
[[devices]]
memory_reserved = "512 MiB"
processes = [{ pid = 4100, used_memory = "3 GiB" }, { pid = 4101, used_memory = "1 GiB", kind = "graphics" }]

[[devices]]
processes = [{ pid = 4200, used_memory = "2 GiB" }]

[[devices]]
clocks_event_reasons = 4
"#,
    );
    for (function, device) in [
        ("nvmlDeviceGetComputeRunningProcesses_v3", 0),
        ("nvmlDeviceGetGraphicsRunningProcesses_v3", 0),
        ("nvmlDeviceGetMemoryInfo_v2", 0),
        ("nvmlDeviceGetComputeRunningProcesses_v3", 1),
        ("nvmlDeviceGetComputeRunningProcesses_v2", 1),
        ("nvmlDeviceGetGraphicsRunningProcesses_v3", 1),
        ("nvmlDeviceGetGraphicsRunningProcesses_v2", 1),
        ("nvmlDeviceGetCurrentClocksEventReasons", 2),
    ] {
        text.push_str(&format!(
            "\n[[failures]]\nfunction = \"{function}\"\nerror = \"FUNCTION_NOT_FOUND\"\ndevice = {device}\n"
        ));
    }
    std::fs::write(&scenario, text).unwrap();
    let path = scenario.to_string_lossy().into_owned();
    in_scenario(
        "older_entry_points_when_the_newer_are_missing",
        &path,
        &[],
        || {
            let snap = gpu::snapshot().unwrap();
            let pids = |d: usize| -> Vec<(u32, Option<u64>, ProcessKind)> {
                snap.devices[d]
                    .processes
                    .iter()
                    .flatten()
                    .map(|p| (p.nvml_pid, p.used_memory, p.kind))
                    .collect()
            };
            assert_eq!(
                pids(0),
                vec![
                    (4100, Some(3 << 30), ProcessKind::Compute),
                    (4101, Some(1 << 30), ProcessKind::Graphics)
                ]
            );
            assert_eq!(pids(1), vec![(4200, Some(2 << 30), ProcessKind::Compute)]);
            // Version 1 memory counts the driver's reservation as used.
            let m0 = snap.devices[0].memory.unwrap();
            assert_eq!(m0.used, 4 << 30 | 512 << 20);
            assert_eq!(m0.used + m0.free, m0.total);
            assert_eq!(gpu::usage_of(4200, false).unwrap().total_memory(), 2 << 30);
            // The old name of the clock event reasons.
            let reasons = snap.devices[2].clock_event_reasons.as_ref().unwrap();
            assert_eq!(reasons.reasons, vec!["sw_power_cap".to_string()]);
            assert!(reasons.is_throttled());
        },
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn unsupported_fields_and_injected_failures() {
    let dir = scratch_dir("unsupported");
    let scenario = dir.join("scenario.toml");
    std::fs::write(
        &scenario,
        r#"
[[devices]]
unsupported = ["fan", "ecc", "temperature", "power_usage", "processes", "clocks", "bar1", "pcie",
    "pcie_throughput", "nvlink", "energy", "clocks_event_reasons", "remapped_rows",
    "encoder_utilization", "decoder_utilization", "retired_pages"]

[[devices]]
memory_used = "1 GiB"
processes = [{ pid = 4300, used_memory = "1 GiB" }]
unsupported = ["process_utilization"]

[[devices]]

[[failures]]
function = "nvmlDeviceGetUtilizationRates"
error = "NOT_SUPPORTED"
device = 1

[[failures]]
function = "nvmlDeviceGetUUID"
error = "NO_PERMISSION"
device = 2

[[failures]]
function = "nvmlSystemGetNVMLVersion"
error = "FUNCTION_NOT_FOUND"
"#,
    )
    .unwrap();
    let path = scenario.to_string_lossy().into_owned();
    in_scenario(
        "unsupported_fields_and_injected_failures",
        &path,
        &[],
        || {
            let snap = gpu::snapshot().unwrap();
            let d0 = &snap.devices[0];
            assert!(d0.error.is_none());
            assert_eq!(d0.fan_speed_percent, None);
            assert_eq!(d0.ecc_errors, None);
            assert_eq!(d0.temperature_c, None);
            assert_eq!(d0.power_draw_mw, None);
            assert_eq!(d0.clocks.graphics_mhz, None);
            assert_eq!(d0.processes, None);
            assert!(d0.memory.is_some() && d0.utilization.is_some());
            assert_eq!(
                (d0.bar1_memory, d0.pcie, d0.total_energy_mj),
                (None, None, None)
            );
            assert_eq!((&d0.nvlink, &d0.clock_event_reasons), (&None, &None));
            assert_eq!((d0.remapped_rows, d0.retired_pages), (None, None));
            assert_eq!(
                (d0.encoder_utilization, d0.decoder_utilization),
                (None, None)
            );
            let d1 = &snap.devices[1];
            assert_eq!(d1.utilization, None);
            assert_eq!(d1.memory.unwrap().used, 2 << 30);
            let p1 = d1.processes.as_ref().unwrap();
            assert_eq!(p1.len(), 1);
            assert_eq!(p1[0].utilization, None);
            assert!(d1.pcie.is_some() && d1.bar1_memory.is_some());
            let d2 = &snap.devices[2];
            assert_eq!(
                d2.error.as_ref().map(|f| f.kind),
                Some(GpuErrorKind::PermissionDenied)
            );
            // A missing optional function leaves the field empty.
            assert_eq!(snap.nvml_version, None);
            assert!(snap.driver_version.is_some());
        },
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn old_driver_lacking_a_function() {
    let dir = scratch_dir("olddriver");
    let scenario = dir.join("scenario.toml");
    std::fs::write(
        &scenario,
        "[[devices]]\n\n[[failures]]\nfunction = \"nvmlDeviceGetCount\"\nerror = \"FUNCTION_NOT_FOUND\"\n",
    )
    .unwrap();
    let path = scenario.to_string_lossy().into_owned();
    in_scenario("old_driver_lacking_a_function", &path, &[], || {
        let err = gpu::snapshot().unwrap_err();
        assert!(err.is_missing_function(), "{err:?}");
        assert!(err.to_string().contains("too old"));
    });
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn cuda_visible_devices_from_the_environment() {
    in_scenario(
        "cuda_visible_devices_from_the_environment",
        "8gpu",
        &[
            ("CUDA_VISIBLE_DEVICES", "GPU-3e3a, 6,x,1"),
            ("CUDA_DEVICE_ORDER", "PCI_BUS_ID"),
        ],
        || {
            let v = gpu::assigned().unwrap();
            assert_eq!(v.order, CudaDeviceOrder::PciBusId);
            assert!(v.order_is_exact);
            // "6" ends a list of UUIDs, as in CUDA.
            let indices: Vec<u32> = v.devices.iter().map(|d| d.device.index).collect();
            assert_eq!(indices, vec![3]);
            assert_eq!(v.devices[0].cuda_index, 0);
            assert!(v.devices[0].device.memory.is_some());

            let gpus = gpu::global().unwrap();
            let pick = |env: Option<&str>| -> Vec<u32> {
                gpus.visible_for(env, CudaDeviceOrder::FastestFirst)
                    .unwrap()
                    .devices
                    .iter()
                    .map(|d| d.device.index)
                    .collect()
            };
            assert_eq!(pick(None), (0..8).collect::<Vec<_>>());
            assert_eq!(pick(Some("")), Vec::<u32>::new());
            assert_eq!(pick(Some("7,2,9,1")), vec![7, 2]);
            assert_eq!(pick(Some("1,1")), Vec::<u32>::new());
            assert_eq!(pick(Some("GPU-5")), vec![5]);
            assert_eq!(pick(Some("GPU-nope,0")), Vec::<u32>::new());
        },
    );
}

/// What a child given GPUs sees: its environment and `gpu::assigned()`.
fn report_gpus(_: ()) -> (Option<String>, Option<String>, Vec<u32>) {
    let assigned = gpu::assigned().expect("assigned() in the child");
    (
        std::env::var("CUDA_VISIBLE_DEVICES").ok(),
        std::env::var("NVIDIA_VISIBLE_DEVICES").ok(),
        assigned.devices.iter().map(|d| d.device.index).collect(),
    )
}

/// Waits for its argument's pipe to close, so the test decides when it ends.
fn block_on(pipe: gpuproc::Connection) {
    let _ = pipe.recv_bytes_timeout(DEADLINE);
}

#[test]
fn processes_get_leased_gpus() {
    let dir = scratch_dir("leases");
    let dir_text = dir.to_string_lossy().into_owned();
    in_scenario(
        "processes_get_leased_gpus",
        "4gpu",
        &[(gpu::RUNTIME_DIR_ENV, &dir_text)],
        || {
            let timeout = Duration::from_secs(60);
            // Most free memory first: GPU 2, then GPU 0.
            let mut p = Process::new(report_gpus, ()).with_gpus(2);
            p.start().unwrap();
            let lease = p.gpu_lease().expect("a started process holds its lease");
            assert_eq!(lease.indices(), vec![2, 0]);
            let value = lease.cuda_visible_devices();
            assert_eq!(value, lease.uuids().join(","));
            assert_eq!(gpu::leases().unwrap().leases().len(), 1);
            let (cuda, nvidia, indices) = p.join_timeout(timeout).unwrap();
            assert_eq!(cuda.as_deref(), Some(value.as_str()));
            assert_eq!(nvidia.as_deref(), Some(value.as_str()));
            assert_eq!(indices, vec![2, 0]);
            // Joined: the GPUs are free again.
            assert!(p.gpu_lease().is_none());
            assert!(gpu::leases().unwrap().leases().is_empty());

            let mut q = Process::new(report_gpus, ()).with_devices([3u32]);
            q.start().unwrap();
            assert_eq!(q.join_timeout(timeout).unwrap().2, vec![3]);

            // All four leased elsewhere: the process is not started, and says why.
            let all = gpu::pick(&Criteria::new().count(4)).unwrap();
            let mut r = Process::new(report_gpus, ()).with_gpus(1);
            let err = r.start().unwrap_err();
            let why = err.gpu_error().expect("a GPU error");
            assert!(why.is_none_free(), "{err}");
            assert!(err.to_string().ends_with("could not get its GPUs"), "{err}");
            // The cause follows in the chain, which Debug prints.
            assert!(
                format!("{err:?}").contains("could not get its GPUs: none free"),
                "{err:?}"
            );
            assert!(r.pid().is_none());
            all.release().unwrap();

            // Dropping a running process kills it, then frees its GPUs.
            let (keep, theirs) = gpuproc::Pipe::new().unwrap();
            let mut s = Process::new(block_on, theirs).with_gpus(4);
            s.start().unwrap();
            assert_eq!(gpu::leases().unwrap().leases().len(), 1);
            drop(s);
            drop(keep);
            assert!(gpu::leases().unwrap().leases().is_empty());
        },
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn picks_wait_for_gpus_to_free_up() {
    let dir = scratch_dir("wait");
    let dir_text = dir.to_string_lossy().into_owned();
    in_scenario(
        "picks_wait_for_gpus_to_free_up",
        "4gpu",
        &[(gpu::RUNTIME_DIR_ENV, &dir_text)],
        || {
            let held = gpu::pick(&Criteria::new().count(4)).unwrap();
            // Without waiting: none free at once.
            assert!(gpu::pick(&Criteria::new()).unwrap_err().is_none_free());
            // More GPUs than exist: no use waiting.
            let err =
                gpu::pick(&Criteria::new().count(5).wait(Duration::from_secs(600))).unwrap_err();
            assert!(err.unavailable().unwrap().is_impossible(), "{err}");
            // A short wait runs out and says how long it waited.
            let err = gpu::pick(&Criteria::new().wait(Duration::from_millis(100))).unwrap_err();
            assert!(err.unavailable().unwrap().waited.is_some());
            assert!(err.to_string().contains("after waiting"), "{err}");

            let (tx, rx) = mpsc::channel();
            let waiter = std::thread::spawn(move || {
                let got = gpu::pick(&Criteria::new().wait(Duration::from_secs(60)));
                let _ = tx.send(got.map(|lease| lease.indices()));
            });
            let first = held.indices()[0];
            held.release().unwrap();
            let got = rx.recv_timeout(DEADLINE).expect("the waiter answers");
            assert_eq!(got.unwrap(), vec![first]);
            waiter.join().unwrap();
        },
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// This user's lease file in `dir`.
fn own_lease_file(dir: &std::path::Path) -> PathBuf {
    dir.join(format!("leases.{}", rustix::process::geteuid().as_raw()))
}

/// `gpu::pick(criteria)` in the runtime directory `dir`, on a thread, answered within the
/// deadline (a pick blocked on a file fails the test instead of hanging it).
fn pick_in(dir: &std::path::Path, criteria: Criteria) -> Result<gpu::GpuLease, gpu::PickError> {
    std::env::set_var(gpu::RUNTIME_DIR_ENV, dir);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(gpu::pick(&criteria));
    });
    rx.recv_timeout(DEADLINE)
        .unwrap_or_else(|_| panic!("a pick in {} blocked", dir.display()))
}

fn mkfifo(path: &std::path::Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o666),
        0,
    )
    .expect("mkfifo");
}

#[test]
fn planted_links_and_fifos_are_refused_without_blocking() {
    let dir = scratch_dir("planted");
    let dir_text = dir.to_string_lossy().into_owned();
    in_scenario(
        "planted_links_and_fifos_are_refused_without_blocking",
        "4gpu",
        &[("GPUPROC_TEST_SCRATCH", &dir_text)],
        || {
            use std::os::unix::fs::symlink;
            let base = PathBuf::from(std::env::var_os("GPUPROC_TEST_SCRATCH").unwrap());
            let victim = base.join("victim");
            std::fs::write(&victim, "precious\n").unwrap();
            let fresh = |name: &str| {
                let d = base.join(name);
                std::fs::create_dir(&d).unwrap();
                d
            };

            // Links where a picker might write, and a link as another user's file: never
            // written through, and the pick goes on.
            let run = fresh("links");
            let other = rustix::process::geteuid().as_raw().wrapping_add(1);
            for name in ["leases.new", "leases", &format!("leases.{other}")] {
                symlink(&victim, run.join(name)).unwrap();
            }
            let lease = pick_in(&run, Criteria::new()).expect("a pick beside planted links");
            lease.release().unwrap();
            assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
            assert!(std::fs::symlink_metadata(run.join("leases.new"))
                .unwrap()
                .is_symlink());

            // A link as this user's own file: refused, the target untouched.
            let run = fresh("own-link");
            symlink(&victim, own_lease_file(&run)).unwrap();
            let err = pick_in(&run, Criteria::new()).unwrap_err();
            assert!(err.is_lease(), "{err:?}");
            assert!(format!("{err:?}").contains("symbolic link"), "{err:?}");
            assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");

            // A dangling link as the lock file: refused, its target not created.
            let run = fresh("lock-link");
            let target = base.join("created-through-the-link");
            symlink(&target, run.join("leases.lock")).unwrap();
            let err = pick_in(&run, Criteria::new()).unwrap_err();
            assert!(format!("{err:?}").contains("symbolic link"), "{err:?}");
            assert!(!target.exists());

            // FIFOs: refused at once where gpuproc reads, ignored where it does not.
            for (i, name) in ["leases.lock", "own", "leases", "leases.new"]
                .into_iter()
                .enumerate()
            {
                let run = fresh(&format!("fifo-{i}"));
                let path = match name {
                    "own" => own_lease_file(&run),
                    _ => run.join(name),
                };
                mkfifo(&path);
                let got = pick_in(&run, Criteria::new());
                match name {
                    "leases.lock" | "own" => {
                        let err = got.unwrap_err();
                        assert!(err.is_lease(), "{name}: {err:?}");
                        assert!(format!("{err:?}").contains("a FIFO"), "{name}: {err:?}");
                    }
                    _ => got
                        .expect("a FIFO that is no lease file")
                        .release()
                        .unwrap(),
                }
            }
        },
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_unreadable_table_hands_out_no_gpu() {
    let dir = scratch_dir("unreadable");
    let dir_text = dir.to_string_lossy().into_owned();
    in_scenario(
        "an_unreadable_table_hands_out_no_gpu",
        "4gpu",
        &[(gpu::RUNTIME_DIR_ENV, &dir_text)],
        || {
            let dir = PathBuf::from(std::env::var_os(gpu::RUNTIME_DIR_ENV).unwrap());
            let file = own_lease_file(&dir);
            let held = gpu::pick(&Criteria::new().count(4)).unwrap();
            let text = std::fs::read(&file).expect("the lease file");
            // Emptied, or cut anywhere: no pick takes a held GPU.
            for cut in [0, 1, text.len() / 2, text.len() - 1] {
                std::fs::write(&file, &text[..cut]).unwrap();
                let err = gpu::pick(&Criteria::new()).unwrap_err();
                assert!(err.is_lease(), "cut at {cut}: {err:?}");
                let msg = format!("{err:?}");
                assert!(msg.contains("no GPU is handed out"), "{msg}");
                assert!(msg.contains(&format!("remove {}", file.display())), "{msg}");
            }
            // Restored: the leases count again, and the holder can release them.
            std::fs::write(&file, &text).unwrap();
            assert!(gpu::pick(&Criteria::new()).unwrap_err().is_none_free());
            held.release().unwrap();
            gpu::pick(&Criteria::new().count(4))
                .unwrap()
                .release()
                .unwrap();
        },
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn picks_that_wait_for_ever_do_not_panic() {
    let dir = scratch_dir("forever");
    let dir_text = dir.to_string_lossy().into_owned();
    in_scenario(
        "picks_that_wait_for_ever_do_not_panic",
        "4gpu",
        &[(gpu::RUNTIME_DIR_ENV, &dir_text)],
        || {
            // Satisfiable: answered at once.
            let held = gpu::pick(&Criteria::new().count(4).wait(Duration::MAX)).unwrap();
            // None free: it waits (without panicking) until the holder releases.
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let got = gpu::pick(&Criteria::new().wait(Duration::MAX));
                let _ = tx.send(got.map(|lease| lease.indices()));
            });
            assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
            let first = held.indices()[0];
            held.release().unwrap();
            let got = rx.recv_timeout(DEADLINE).expect("the waiter answers");
            assert_eq!(got.unwrap(), vec![first]);
        },
    );
    let _ = std::fs::remove_dir_all(dir);
}

const TEAM_TEST: &str = "two_users_share_a_team_runtime_directory";
const TEAM_ROLE: &str = "GPUPROC_TEST_TEAM_ROLE";
const TEAM_HELD: &str = "GPUPROC_TEST_TEAM_HELD";
/// Two users (and a third, absent one) with no names, for the shared runtime directory.
const USER_A: u32 = 4242;
const USER_B: u32 = 4343;
const USER_C: u32 = 4444;

/// This test binary, run as `uid` (and its group, no others) under umask 022, playing `role`.
fn as_user(uid: u32, role: &str, dir: &std::path::Path) -> Command {
    let mut command = Command::new("sh");
    command
        .args([
            "-c",
            "umask 022 && exec setpriv --reuid=\"$1\" --regid=\"$1\" --clear-groups -- \"$2\" \
             \"$3\" --exact --nocapture --test-threads=1",
            "sh",
            &uid.to_string(),
        ])
        .arg(std::env::current_exe().expect("test binary path"))
        .arg(TEAM_TEST)
        .env(CHILD_ENV, TEAM_TEST)
        .env(TEAM_ROLE, role)
        .env("NVML_SIM_SCENARIO", "4gpu")
        .env(gpu::NVML_LIB_ENV, sim_lib())
        .env(gpu::RUNTIME_DIR_ENV, dir)
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("CUDA_DEVICE_ORDER")
        .env_remove("NVML_SIM_STATE_DIR");
    command
}

/// What each user does in [`two_users_share_a_team_runtime_directory`].
fn team_member() {
    use std::io::{Read, Write};
    let dir = PathBuf::from(std::env::var_os(gpu::RUNTIME_DIR_ENV).unwrap());
    let file_of = |uid: u32| dir.join(format!("leases.{uid}"));
    match std::env::var(TEAM_ROLE).unwrap().as_str() {
        "hold" => {
            let lease = gpu::pick(&Criteria::new()).expect("the first user picks");
            println!("HELD {}", lease.uuids()[0]);
            std::io::stdout().flush().unwrap();
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            lease.release().expect("the first user releases");
        }
        "second" => {
            let held = std::env::var(TEAM_HELD).unwrap();
            let mine = gpu::pick(&Criteria::new()).expect("the second user picks too");
            assert_ne!(mine.uuids()[0], held);
            assert!(gpu::leases()
                .unwrap()
                .leases()
                .iter()
                .any(|r| r.devices.iter().any(|d| d.uuid == held)));
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(file_of(USER_B)).unwrap();
            assert_eq!((meta.uid(), meta.mode() & 0o7777), (USER_B, 0o644));

            // The first user's file can be neither edited, removed nor replaced.
            let theirs = file_of(USER_A);
            assert!(std::fs::OpenOptions::new()
                .append(true)
                .open(&theirs)
                .is_err());
            assert!(std::fs::remove_file(&theirs).is_err());
            let decoy = dir.join("decoy");
            std::fs::write(&decoy, "").unwrap();
            assert!(std::fs::rename(&decoy, &theirs).is_err());
            std::fs::remove_file(&decoy).unwrap();

            // A file in another user's name claiming every GPU is not believed.
            let all: Vec<String> = gpu::snapshot()
                .unwrap()
                .devices
                .iter()
                .map(|d| format!("{}:{}", d.index, d.uuid.as_deref().unwrap()))
                .collect();
            let text = std::fs::read_to_string(file_of(USER_B)).unwrap();
            let forged: String = text
                .lines()
                .map(|line| {
                    let words: Vec<String> = line
                        .split(' ')
                        .map(|w| match w.starts_with("gpus=") {
                            true => format!("gpus={}", all.join(",")),
                            false => w.to_string(),
                        })
                        .collect();
                    words.join(" ") + "\n"
                })
                .collect();
            assert_ne!(forged, text);
            std::fs::write(file_of(USER_C), forged).unwrap();
            let two = gpu::pick(&Criteria::new().count(2)).expect("forged leases are ignored");
            // The first user's lease still counts.
            let err = gpu::pick(&Criteria::new()).unwrap_err();
            assert!(err.is_none_free(), "{err:?}");
            std::fs::remove_file(file_of(USER_C)).unwrap();
            two.release().unwrap();
            mine.release().unwrap();
        }
        "all" => {
            let all = gpu::pick(&Criteria::new().count(4)).expect("every GPU free again");
            all.release().unwrap();
        }
        role => panic!("unknown role {role}"),
    }
}

#[test]
fn two_users_share_a_team_runtime_directory() {
    if std::env::var(CHILD_ENV).as_deref() == Ok(TEAM_TEST) {
        team_member();
        return;
    }
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: running as two users needs root (for setpriv)");
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("skipped: setpriv (util-linux) is not installed");
        return;
    }
    use std::io::BufRead;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = scratch_dir("team");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();

    let mut holder = as_user(USER_A, "hold", &dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the first user");
    let stdout = holder.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // After libtest's "test NAME ... ".
            if let Some((_, uuid)) = line.split_once("HELD ") {
                let _ = tx.send(uuid.trim().to_string());
            }
        }
    });
    let held = rx
        .recv_timeout(DEADLINE)
        .expect("the first user holds a GPU");
    let lock = std::fs::metadata(dir.join("leases.lock")).unwrap();
    assert_eq!((lock.uid(), lock.mode() & 0o777), (USER_A, 0o644));

    let mut second = as_user(USER_B, "second", &dir);
    second.env(TEAM_HELD, &held);
    let out = output_within(second, DEADLINE);
    assert!(
        out.status.success(),
        "the second user:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    drop(holder.stdin.take());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(holder.wait());
    });
    let status = rx.recv_timeout(DEADLINE).expect("the first user ends");
    assert!(status.unwrap().success());
    let out = output_within(as_user(USER_B, "all", &dir), DEADLINE);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
}
