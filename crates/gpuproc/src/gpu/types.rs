//! The data a snapshot carries: plain serde types, no NVML types.
//!
//! Fields a device does not support are `None`; sizes are bytes, power is milliwatts,
//! clocks are MHz, temperatures are degrees Celsius and utilisation is percent.

use serde::{Deserialize, Serialize};

use super::error::GpuErrorKind;

/// Every GPU on this machine at one moment, with the processes using them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The machine's host name.
    pub hostname: String,
    /// When the snapshot was taken, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The driver version, such as `"550.54.15"`.
    pub driver_version: Option<String>,
    /// The newest CUDA version the driver supports.
    pub cuda_driver_version: Option<CudaVersion>,
    /// The NVML library version, such as `"12.550.54.15"`.
    pub nvml_version: Option<String>,
    /// The devices in NVML order (PCI bus order).
    pub devices: Vec<Device>,
}

/// A CUDA version such as 12.4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CudaVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

impl std::fmt::Display for CudaVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// One physical GPU.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// NVML's index (PCI bus order; see [`visible`](super::visible) for CUDA's order).
    pub index: u32,
    /// Product name, such as `"NVIDIA H100 80GB HBM3"`.
    pub name: Option<String>,
    /// The device's UUID, `GPU-` followed by 36 characters.
    pub uuid: Option<String>,
    /// PCI bus id, such as `"00000000:17:00.0"`.
    pub pci_bus_id: Option<String>,
    /// Frame-buffer memory.
    pub memory: Option<Memory>,
    /// Utilisation over the driver's last sample period.
    pub utilization: Option<Utilization>,
    /// GPU die temperature, degrees Celsius.
    pub temperature_c: Option<u32>,
    /// Power draw, milliwatts.
    pub power_draw_mw: Option<u32>,
    /// Enforced power limit, milliwatts.
    pub power_limit_mw: Option<u32>,
    /// Speed of the first fan, percent of its maximum.
    pub fan_speed_percent: Option<u32>,
    /// Current and maximum clocks.
    pub clocks: Clocks,
    /// Performance state: 0 (P0, fastest) to 15 (P15, slowest).
    pub performance_state: Option<u32>,
    /// Who may create contexts on the device.
    pub compute_mode: Option<ComputeMode>,
    /// MIG mode and instances; `None` where the device has no MIG support.
    pub mig: Option<Mig>,
    /// ECC error counts; `None` where ECC is unsupported or off.
    pub ecc_errors: Option<EccErrors>,
    /// Processes using the device; `None` where the driver does not say.
    pub processes: Option<Vec<GpuProcess>>,
    /// Set when the device could not be read (lost, permission denied, ...): the other fields
    /// then hold what could be read, usually nothing.
    pub error: Option<DeviceFault>,
}

/// Why a device in a snapshot could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceFault {
    /// The kind of failure, such as [`GpuErrorKind::GpuLost`].
    pub kind: GpuErrorKind,
    /// One sentence describing it.
    pub message: String,
}

/// Frame-buffer memory, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    /// Installed memory.
    pub total: u64,
    /// Allocated memory.
    pub used: u64,
    /// Unallocated memory.
    pub free: u64,
}

/// Utilisation in percent over the driver's sample period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Utilization {
    /// Percent of time a kernel was running.
    pub gpu: u32,
    /// Percent of time memory was being read or written.
    pub memory: u32,
}

/// Clock speeds in MHz.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clocks {
    /// Current graphics clock.
    pub graphics_mhz: Option<u32>,
    /// Current SM clock.
    pub sm_mhz: Option<u32>,
    /// Current memory clock.
    pub memory_mhz: Option<u32>,
    /// Maximum graphics clock.
    pub max_graphics_mhz: Option<u32>,
    /// Maximum memory clock.
    pub max_memory_mhz: Option<u32>,
}

/// Who may create compute contexts on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ComputeMode {
    /// Any number of processes and threads.
    Default,
    /// One context, usable from one thread at a time.
    ExclusiveThread,
    /// No contexts at all.
    Prohibited,
    /// One context, usable from many threads of one process.
    ExclusiveProcess,
}

/// MIG (multi-instance GPU) state of a device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mig {
    /// MIG mode is on now.
    pub enabled: bool,
    /// MIG mode after the next reset.
    pub pending: bool,
    /// The MIG devices carved out of this GPU.
    pub instances: Vec<MigInstance>,
}

/// One MIG device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigInstance {
    /// Index among the parent's MIG devices.
    pub index: u32,
    /// The MIG device's UUID (`MIG-...`), as `CUDA_VISIBLE_DEVICES` accepts it.
    pub uuid: Option<String>,
    /// Name, such as `"NVIDIA A100-SXM4-40GB MIG 1g.5gb"`.
    pub name: Option<String>,
    /// GPU instance id.
    pub gpu_instance_id: Option<u32>,
    /// Compute instance id.
    pub compute_instance_id: Option<u32>,
    /// The instance's memory.
    pub memory: Option<Memory>,
}

/// ECC error counts (memory errors, all locations).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EccErrors {
    /// Corrected errors since the driver loaded.
    pub volatile_corrected: Option<u64>,
    /// Uncorrected errors since the driver loaded.
    pub volatile_uncorrected: Option<u64>,
    /// Corrected errors over the device's lifetime.
    pub aggregate_corrected: Option<u64>,
    /// Uncorrected errors over the device's lifetime.
    pub aggregate_uncorrected: Option<u64>,
}

/// What kind of context a process has on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessKind {
    /// A compute (CUDA) context.
    Compute,
    /// A graphics context.
    Graphics,
    /// Both.
    ComputeAndGraphics,
}

/// A process with a context on a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuProcess {
    /// The PID in this process's PID namespace, when the process is visible from here.
    pub pid: Option<u32>,
    /// The PID as NVML reports it (the PID namespace of the driver, usually the host's).
    pub nvml_pid: u32,
    /// GPU memory the process uses, bytes; `None` where the driver does not say.
    pub used_memory: Option<u64>,
    /// Compute, graphics or both.
    pub kind: ProcessKind,
    /// The MIG GPU instance the process runs on.
    pub gpu_instance_id: Option<u32>,
    /// The MIG compute instance the process runs on.
    pub compute_instance_id: Option<u32>,
    /// What `/proc` says about the process; `None` when it is not visible from here.
    pub host: Option<HostProcess>,
}

/// A process as `/proc` describes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostProcess {
    /// Real user id.
    pub uid: Option<u32>,
    /// User name, from `/etc/passwd`; `None` when the uid has no entry there.
    pub user: Option<String>,
    /// Short command name (`/proc/PID/comm`).
    pub name: String,
    /// Command line, one string per argument (empty for kernel threads and zombies).
    pub cmdline: Vec<String>,
    /// CPU use in percent of one core: since the previous snapshot taken through the same
    /// handle, or averaged over the process's lifetime on the first.
    pub cpu_percent: Option<f64>,
    /// Resident set size, bytes.
    pub rss_bytes: Option<u64>,
}

impl HostProcess {
    /// The command line joined by spaces, or the short name when there is no command line.
    pub fn command(&self) -> String {
        if self.cmdline.is_empty() {
            self.name.clone()
        } else {
            self.cmdline.join(" ")
        }
    }
}

/// How much GPU memory one process (and possibly its descendants) uses, per device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessUsage {
    /// The process asked about.
    pub pid: u32,
    /// The processes counted: `pid`, then its descendants when they were included.
    pub pids: Vec<u32>,
    /// The devices on which any of those processes has a context.
    pub devices: Vec<DeviceUsage>,
}

impl ProcessUsage {
    /// GPU memory used on all devices together, bytes.
    pub fn total_memory(&self) -> u64 {
        self.devices.iter().map(|d| d.used_memory).sum()
    }
}

/// One device's share of a [`ProcessUsage`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceUsage {
    /// NVML index of the device.
    pub index: u32,
    /// UUID of the device.
    pub uuid: Option<String>,
    /// Memory used there by the counted processes, bytes (unknown amounts count as 0).
    pub used_memory: u64,
    /// Which of the counted processes use the device.
    pub pids: Vec<u32>,
}
