//! A simulated `libnvidia-ml.so`: exports the NVML C API and answers from a scenario file.
//!
//! It exists so that gpuproc's GPU layer (through `nvml-wrapper`), `pynvml` and `gpustat` can be
//! exercised on machines without an NVIDIA GPU, over the real FFI path: the same `dlopen`, the
//! same symbols, the same struct layouts and return codes as the real library. Scenarios describe
//! GPUs, memory, utilisation, processes (by pid), MIG devices and injected failures; see the
//! crate README for the format and [`BUNDLED_SCENARIOS`] for the built-in ones.
//!
//! Everything here is written by hand: no maintained crate exports a fake NVML (nvml-wrapper
//! and nvml-wrapper-sys *consume* the C API, they do not provide it), and NVIDIA's own mock in
//! k8s-test-infra is Go. The C structs in [`ffi`] are written out from nvml.h, checked against
//! nvml-wrapper-sys's bindgen output by size tests, rather than depending on a bindings crate.
//!
//! # Using it
//! - Rust (nvml-wrapper): `Nvml::builder().lib_path(nvml_sim::library_path()...)`, or gpuproc's
//!   `GPUPROC_NVML_LIB=/path/to/libnvml_sim.so`.
//! - Python (pynvml, gpustat): they `dlopen("libnvidia-ml.so.1")`, so create a directory with
//!   that name linked to the simulator ([`make_pynvml_dir`]) and put it on `LD_LIBRARY_PATH`.
//! - `NVML_SIM_SCENARIO` picks the scenario (bundled name or `.toml`/`.json` path),
//!   `NVML_SIM_STATE_DIR` names the live-allocation directory (see [`state`]).
//! - `NVML_SIM_DEVICE_NODES` maps each GPU to a device node (`/dev/nvidia{minor}`): NVML then
//!   enumerates only the GPUs whose node the process can open, as the driver does under a
//!   device cgroup ([`state::DEVICE_NODES_ENV`]).
//!
//! - `NVML_SIM_CLOCK` stops the simulated clock (seconds since the epoch) for frames that must
//!   not move.
//!
//! The rlib half (this API) is for tests and tools; the cdylib half is the library itself.
//!
//! # What it implements
//!
//! Every function that nvitop 1.7, nvtop 3.0, gpustat 1.1, nvidia-ml-py's common queries and
//! gpuproc resolve ([`ffi::EXPORTED`] is the list; `tests/tools.rs` runs nvitop and nvtop on it):
//!
//! - init and system: `nvmlInit(_v2)`, `nvmlInitWithFlags`, `nvmlShutdown`, `nvmlErrorString`,
//!   driver, NVML and CUDA driver versions, process names;
//! - enumeration: count, handles by index, UUID, serial and PCI bus id;
//! - identity: index, name, UUID, serial, minor number, PCI info (v1 to v3), brand, compute
//!   capability, architecture, bus type, VBIOS version, board part number;
//! - memory: `MemoryInfo(_v2)`, `BAR1MemoryInfo`;
//! - utilisation: device, encoder, decoder, and per process (`ProcessUtilization`, one sample
//!   per process on a 100 ms grid, after `lastSeenTimeStamp`); the driver's sample buffer
//!   (`Samples`: the last 12 s of power, utilisation and clocks);
//! - thermals and power: temperature and its thresholds, power draw, enforced, management and
//!   default limits and the limits' range, total energy, fans, current, application, boost and
//!   maximum clocks, memory bus width, core count,
//!   performance state, clock event (throttle) reasons;
//! - PCIe: maximum and current generation and width, lane speeds, throughput, replays;
//! - NVLink: link state and version, and through `FieldValues` the link count, state and the
//!   data sent and received per link (see [`ffi::field`]);
//! - ECC: mode, totals, per-location counters, retired pages (`_v2` with timestamps) and their
//!   pending state, remapped rows;
//! - events: event sets that receive the scenario's XID errors ([`events`]);
//! - modes: compute, persistence, display, driver model;
//! - MIG: mode, instance handles, GPU and compute instance ids, parent handles;
//! - processes: compute, graphics and MPS lists in the v1, v2 and v3 layouts.
//!
//! Values come from the scenario, or from the model's defaults ([`models`]) where it is silent;
//! ranges move with time ([`series`]).
//!
//! # What answers `NVML_ERROR_NOT_SUPPORTED`
//!
//! As a real Linux driver answers it:
//!
//! - `nvmlDeviceGetDriverModel(_v2)` always (WDDM/TCC exist on Windows only);
//! - on a GPU in MIG mode: utilisation, encoder and decoder utilisation, per-process utilisation;
//! - on a MIG device handle: everything but identity, memory, BAR1, PCI info, architecture,
//!   processes and MIG queries;
//! - by model: ECC and MIG on a GeForce, fans on datacenter boards, NVLink on GPUs without
//!   links, retired pages from Ampere on, remapped rows before Ampere, acoustic temperature
//!   thresholds everywhere, a board part number a scenario leaves empty;
//! - `FieldValues` entries for fields outside [`ffi::field`] (in the entry; the call succeeds);
//! - every query whose feature a scenario lists in `unsupported`.
//!
//! Not exported at all, like the 550 driver the bundled scenarios name (clients probe for them
//! and fall back): `nvmlDeviceGetTemperatureV`, `nvmlDeviceGetConfComputeMemSizeInfo`,
//! `nvmlDeviceGetRunningProcessDetailList`, vGPU, unit, accounting and every setter.

use std::io;
use std::path::{Path, PathBuf};

pub mod codes;
pub mod events;
pub mod ffi;
pub mod models;
pub mod scenario;
pub mod series;
pub mod state;

pub use scenario::{Scenario, ScenarioError};
pub use state::{DEVICE_NODES_ENV, SCENARIO_ENV, STATE_DIR_ENV};

/// The file name cargo gives the built simulator.
pub const LIBRARY_FILE: &str = "libnvml_sim.so";

/// The names `NVML_SIM_SCENARIO` accepts besides file paths.
pub const BUNDLED_SCENARIOS: &[&str] = scenario::BUNDLED_NAMES;

/// The names of the bundled scenarios (`default`, `1gpu`, `4gpu`, `8gpu`, `mig`, `lost`,
/// `nodevices`, `nodriver`, `live`).
pub fn bundled_scenarios() -> &'static [&'static str] {
    BUNDLED_SCENARIOS
}

/// Finds the built `libnvml_sim.so` near the running executable: its directory, and the parent
/// of that (for test binaries in `target/<profile>/deps/` and examples in
/// `target/<profile>/examples/`). `cargo test` builds the cdylib into `target/<profile>/deps/`
/// without copying it up, `cargo build` puts it in `target/<profile>/`; both are found.
pub fn library_path() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let found = [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join(LIBRARY_FILE))
        .find(|p| p.is_file());
    found
}

/// Makes `dir` (created if missing) hold `libnvidia-ml.so.1` and `libnvidia-ml.so` links to the
/// simulator, so `LD_LIBRARY_PATH=dir` makes pynvml and gpustat load it.
pub fn make_pynvml_dir(dir: &Path) -> io::Result<()> {
    let lib = library_path().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{LIBRARY_FILE} not found next to {:?} or its parent; build it with `cargo build -p nvml-sim`",
                std::env::current_exe().ok()
            ),
        )
    })?;
    std::fs::create_dir_all(dir)?;
    for name in ["libnvidia-ml.so.1", "libnvidia-ml.so"] {
        let link = dir.join(name);
        if std::fs::read_link(&link).is_ok_and(|target| target == lib) {
            continue; // already in place (another test may have made it)
        }
        match std::fs::remove_file(&link) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        match std::os::unix::fs::symlink(&lib, &link) {
            // Made by a concurrent caller between our check and here: same target.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            other => other?,
        }
    }
    Ok(())
}
