//! GPU information from any process, read through NVML (never CUDA).
//!
//! ```no_run
//! let snap = gpuproc::gpu::snapshot()?;
//! for gpu in &snap.devices {
//!     let mem = gpu.memory.unwrap_or_default();
//!     println!("[{}] {:?}: {} of {} MiB used", gpu.index, gpu.name, mem.used >> 20, mem.total >> 20);
//!     for p in gpu.processes.iter().flatten() {
//!         println!("    pid {:?} uses {:?} bytes", p.pid, p.used_memory);
//!     }
//! }
//! # Ok::<(), gpuproc::gpu::GpuError>(())
//! ```
//!
//! # How it works
//! `libnvidia-ml` is loaded at run time, the first time a function here needs it, from
//! `$GPUPROC_NVML_LIB` or the system's `libnvidia-ml.so.1`, and kept for the life of the
//! process. NVML never creates a CUDA context, so querying is cheap in every worker and safe
//! before `fork`. Without a driver every function returns a [`GpuError`] for which
//! [`GpuError::is_no_driver`] is true; the rest of gpuproc keeps working.
//!
//! A field a device does not support is `None`; a device that cannot be read (fallen off the
//! bus, permission denied) is listed with [`Device::error`] set rather than failing the
//! whole snapshot. Processes are joined with `/proc` (user, command line, CPU, RSS); when
//! gpuproc runs in a nested PID namespace with the host's `/proc` mounted, NVML's host PIDs
//! are mapped through `NSpid` (see [`GpusBuilder::proc_root`]).
//!
//! # Which GPUs are mine?
//! [`visible()`] (alias [`assigned()`]) applies `CUDA_VISIBLE_DEVICES` and
//! `CUDA_DEVICE_ORDER` as CUDA does. NVML numbers devices in PCI bus order; CUDA's default
//! order, `FASTEST_FIRST`, can differ when the machine mixes GPU models, which
//! [`VisibleDevices::order_is_exact`] reports. Inside a Slurm job, Slurm's renumbering of a
//! confined job's GPUs is read as [`slurm_visible_devices`] documents. [`usage_of()`] says
//! which GPUs a process (and optionally its descendants) uses and how much memory;
//! [`GpuAccountant`] turns samples of [`usage_detailed()`] into a job's GPU accounting
//! (time on the GPUs, peak and mean memory, mean SM utilisation, energy when it had its
//! GPUs alone).
//!
//! # Picking GPUs
//! [`pick()`] chooses GPUs that meet [`Criteria`] (count, free memory, utilisation, no
//! other processes, an explicit list, an order) and records a [`GpuLease`] in a lease table
//! under [`runtime_dir()`], guarded by `flock`, so that concurrent pickers, in this program
//! or another, never hand out the same GPU beyond its allowed share. A lease ends when
//! released, dropped, or when its holder dies. [`Process::with_gpus`](crate::Process::with_gpus)
//! picks at start and passes `CUDA_VISIBLE_DEVICES` (full UUIDs) to the child, where
//! [`assigned()`] reports them; [`pick_for_workers`] does the same for a pool's workers.
//! The policy is the pure function [`select`].

mod accounting;
mod entry;
mod error;
mod host;
mod lease;
mod nvml;
mod pick;
mod types;
mod visible;

use std::sync::OnceLock;

pub use accounting::{counter_delta, now_ms, GpuAccountant, GpuAccounting, Mean, WRAP_MARGIN};
pub use error::{GpuError, GpuErrorKind};
pub use lease::{
    leases, pick, pick_for_workers, runtime_dir, worker_slots, GpuLease, Holder, LeaseRecord,
    LeaseTable, Share, WorkerGpus, RUNTIME_DIR_ENV,
};
pub use nvml::{Gpus, GpusBuilder, VisibleDevice, VisibleDevices, NVML_LIB_ENV};
pub use pick::{
    select, Criteria, DeviceId, Order, PickError, PickedDevice, Rejection, Unavailable, Verdict,
};
pub use types::{
    ClockEventReasons, Clocks, ComputeMode, CudaVersion, Device, DeviceFault, DeviceUsage,
    EccErrors, GpuProcess, HostProcess, Memory, Mig, MigInstance, NvLink, Pcie, ProcessKind,
    ProcessUsage, ProcessUtilization, RemappedRows, RetiredPages, Snapshot, Utilization,
};
pub use visible::{
    order_is_exact, parse_cuda_visible_devices, parse_slurm_gpus, resolve_visible_devices,
    slurm_gpus_from_env, slurm_visible_devices, CudaDeviceOrder, DeviceSelector, Resolved,
    SLURM_GPU_ENVS,
};

/// The process-wide handle, opened on first use with [`Gpus::open`].
///
/// The outcome of opening is kept, so a machine without a driver pays for the failed load
/// once.
///
/// # Errors
/// The error from opening, as [`Gpus::open`].
pub fn global() -> Result<&'static Gpus, GpuError> {
    static GLOBAL: OnceLock<Result<Gpus, GpuError>> = OnceLock::new();
    GLOBAL
        .get_or_init(Gpus::open)
        .as_ref()
        .map_err(Clone::clone)
}

/// Every GPU on this machine with its processes: see [`Gpus::snapshot`].
///
/// # Errors
/// [`GpuError::is_no_driver`] without an NVIDIA driver; otherwise when NVML cannot count
/// the devices.
pub fn snapshot() -> Result<Snapshot, GpuError> {
    global()?.snapshot()
}

/// The number of GPUs NVML sees.
///
/// # Errors
/// [`GpuError::is_no_driver`] without an NVIDIA driver.
pub fn device_count() -> Result<u32, GpuError> {
    global()?.device_count()
}

/// Which GPUs process `pid` (and, with `include_descendants`, its descendants) uses, and how
/// much memory: see [`Gpus::usage_of`].
///
/// ```no_run
/// let mine = gpuproc::gpu::usage_of(std::process::id(), true)?;
/// println!("{} bytes of GPU memory", mine.total_memory());
/// # Ok::<(), gpuproc::gpu::GpuError>(())
/// ```
///
/// # Errors
/// [`GpuError::is_no_driver`] without an NVIDIA driver.
pub fn usage_of(pid: u32, include_descendants: bool) -> Result<ProcessUsage, GpuError> {
    global()?.usage_of(pid, include_descendants)
}

/// [`usage_of`] with each device's SM utilisation by those processes and its energy
/// counter, for accounting: see [`Gpus::usage_detailed`] and [`GpuAccountant`].
///
/// # Errors
/// [`GpuError::is_no_driver`] without an NVIDIA driver.
pub fn usage_detailed(pid: u32, include_descendants: bool) -> Result<ProcessUsage, GpuError> {
    global()?.usage_detailed(pid, include_descendants)
}

/// The devices this process may use, per `CUDA_VISIBLE_DEVICES` and `CUDA_DEVICE_ORDER`,
/// with live figures: see [`Gpus::visible`].
///
/// # Errors
/// [`GpuError::is_no_driver`] without an NVIDIA driver.
pub fn visible() -> Result<VisibleDevices, GpuError> {
    global()?.visible()
}

/// The GPUs given to this process: inside a worker, the devices its launcher assigned
/// through `CUDA_VISIBLE_DEVICES`. The same as [`visible()`].
///
/// ```no_run
/// for gpu in gpuproc::gpu::assigned()?.devices {
///     println!("cuda:{} is NVML device {}", gpu.cuda_index, gpu.device.index);
/// }
/// # Ok::<(), gpuproc::gpu::GpuError>(())
/// ```
///
/// # Errors
/// [`GpuError::is_no_driver`] without an NVIDIA driver.
pub fn assigned() -> Result<VisibleDevices, GpuError> {
    visible()
}

/// Parses a byte count as people write one (`gpuproc pick --min-free 10GiB`, Python's
/// `pick(min_free="10GiB")`): a number (decimals allowed) and an optional unit. `K`, `M`,
/// `G` and `T`, alone or with `iB`, are powers of 1024; with `B`, powers of 1000. A size past
/// `u64::MAX` bytes, a negative or unknown one, is an error that says what is expected.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("expected a size such as 10GiB, 500MiB or 1073741824, got {s:?}");
    let text = s.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| bad())?;
    let multiplier: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "gb" => 1e9,
        "t" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "tb" => 1e12,
        _ => return Err(bad()),
    };
    let bytes = (value * multiplier).round();
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    // In range, checked above: the conversion is exact up to f64's precision.
    Ok(bytes as u64)
}
