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
    /// Video encoder utilisation, percent; `None` where unsupported (MIG mode, some boards).
    #[serde(default)]
    pub encoder_utilization: Option<u32>,
    /// Video decoder utilisation, percent.
    #[serde(default)]
    pub decoder_utilization: Option<u32>,
    /// The PCIe link and its traffic.
    #[serde(default)]
    pub pcie: Option<Pcie>,
    /// NVLink state and traffic; `None` on a GPU without NVLink.
    #[serde(default)]
    pub nvlink: Option<NvLink>,
    /// BAR1 (the host-mapped aperture) memory, bytes.
    #[serde(default)]
    pub bar1_memory: Option<Memory>,
    /// Why the clocks are below their maximum now (NVML's clock event, formerly throttle,
    /// reasons).
    #[serde(default)]
    pub clock_event_reasons: Option<ClockEventReasons>,
    /// Pages retired after ECC errors (GPUs before Ampere); `None` where unsupported.
    #[serde(default)]
    pub retired_pages: Option<RetiredPages>,
    /// Rows remapped after ECC errors (Ampere and later); `None` where unsupported.
    #[serde(default)]
    pub remapped_rows: Option<RemappedRows>,
    /// Energy used since the driver was loaded, millijoules (Volta and later).
    #[serde(default)]
    pub total_energy_mj: Option<u64>,
    /// Processes using the device; `None` where the driver does not say.
    pub processes: Option<Vec<GpuProcess>>,
    /// Set when the device could not be read (lost, permission denied, ...): the other fields
    /// then hold what could be read, usually nothing.
    pub error: Option<DeviceFault>,
    /// The device node's minor number, `N` in `/dev/nvidiaN`: the number Slurm's
    /// `SLURM_STEP_GPUS` and `SLURM_JOB_GPUS` give a GPU (see
    /// [`slurm_visible_devices`](super::slurm_visible_devices)).
    #[serde(default)]
    pub minor_number: Option<u32>,
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

/// A device's PCIe link: generation and lanes now and at most, and its traffic.
///
/// A link trains down when idle (a GeForce often idles at generation 1), so the current
/// generation and width can be below the maximum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pcie {
    /// Current link generation (1 to 6).
    pub generation: Option<u32>,
    /// The highest generation the device and the slot support.
    pub max_generation: Option<u32>,
    /// Current number of lanes.
    pub width: Option<u32>,
    /// The most lanes the device supports.
    pub max_width: Option<u32>,
    /// Data sent by the device over the driver's last 20 ms window, KiB/s.
    pub tx_kib_per_s: Option<u32>,
    /// Data received by the device over the driver's last 20 ms window, KiB/s.
    pub rx_kib_per_s: Option<u32>,
}

/// A device's NVLink links.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvLink {
    /// Whether each link is active, link 0 first.
    pub links: Vec<bool>,
    /// Data sent over all links since the driver loaded, KiB; a rate is the difference
    /// between two snapshots over their time apart.
    pub tx_kib: Option<u64>,
    /// Data received over all links since the driver loaded, KiB.
    pub rx_kib: Option<u64>,
}

impl NvLink {
    /// How many links are active.
    pub fn active(&self) -> usize {
        self.links.iter().filter(|&&up| up).count()
    }
}

/// Why the clocks are below their maximum: NVML's clock event (throttle) reason bits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockEventReasons {
    /// The raw bit mask (`nvmlClocksEventReason*`).
    pub mask: u64,
    /// The reasons set in `mask`, by name (see [`ClockEventReasons::names`]); bits without
    /// a known name are left out here and kept in `mask`.
    pub reasons: Vec<String>,
}

impl ClockEventReasons {
    /// The known reason bits and their names: `gpu_idle`, `applications_clocks_setting`,
    /// `sw_power_cap`, `hw_slowdown`, `sync_boost`, `sw_thermal_slowdown`,
    /// `hw_thermal_slowdown`, `hw_power_brake_slowdown`, `display_clock_setting`.
    pub const NAMES: &'static [(u64, &'static str)] = &[
        (0x1, "gpu_idle"),
        (0x2, "applications_clocks_setting"),
        (0x4, "sw_power_cap"),
        (0x8, "hw_slowdown"),
        (0x10, "sync_boost"),
        (0x20, "sw_thermal_slowdown"),
        (0x40, "hw_thermal_slowdown"),
        (0x80, "hw_power_brake_slowdown"),
        (0x100, "display_clock_setting"),
    ];

    /// The reasons of `mask`, named.
    pub fn from_mask(mask: u64) -> Self {
        ClockEventReasons {
            mask,
            reasons: Self::names(mask).map(str::to_string).collect(),
        }
    }

    /// The names of the bits set in `mask`, lowest bit first.
    pub fn names(mask: u64) -> impl Iterator<Item = &'static str> {
        Self::NAMES
            .iter()
            .filter(move |(bit, _)| mask & bit != 0)
            .map(|&(_, name)| name)
    }

    /// Whether the clocks are held down by something other than idleness or a clock
    /// setting: power, heat or a hardware slowdown.
    pub fn is_throttled(&self) -> bool {
        const THROTTLES: u64 = 0x4 | 0x8 | 0x20 | 0x40 | 0x80;
        self.mask & THROTTLES != 0
    }
}

/// Pages retired after ECC errors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredPages {
    /// Pages retired after multiple single-bit errors.
    pub single_bit: u32,
    /// Pages retired after a double-bit error.
    pub double_bit: u32,
    /// Pages waiting to be retired at the next driver reload.
    pub pending: Option<bool>,
}

/// Rows remapped after ECC errors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemappedRows {
    /// Rows remapped after correctable errors.
    pub correctable: u32,
    /// Rows remapped after uncorrectable errors.
    pub uncorrectable: u32,
    /// A remapping waits for a GPU reset.
    pub pending: bool,
    /// A remapping failed: the GPU should be serviced.
    pub failure: bool,
}

/// A process's share of its GPU over the driver's last sample, percent of the device.
///
/// Each figure is `None` when the driver's sample was above 100% (as some drivers report
/// after a counter wraps), which nvitop and nvtop also discard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessUtilization {
    /// Streaming-multiprocessor (compute and 3D) utilisation.
    pub sm: Option<u32>,
    /// Memory bandwidth utilisation.
    pub memory: Option<u32>,
    /// Video encoder utilisation.
    pub encoder: Option<u32>,
    /// Video decoder utilisation.
    pub decoder: Option<u32>,
    /// When the driver took the sample, microseconds since the Unix epoch.
    pub timestamp_us: u64,
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
    /// The process's utilisation of the device (`nvmlDeviceGetProcessUtilization`); `None`
    /// where unsupported (MIG mode, before Maxwell) or when the driver has no sample of
    /// this process in the last interval (see [`Gpus::snapshot`](super::Gpus::snapshot)).
    #[serde(default)]
    pub utilization: Option<ProcessUtilization>,
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
    /// The parent process's id (in the namespace of the `/proc` read).
    #[serde(default)]
    pub ppid: Option<u32>,
    /// When the process started, milliseconds since the Unix epoch.
    #[serde(default)]
    pub started_ms: Option<u64>,
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
    /// Processes on the device that are not counted (other users' and other PID
    /// namespaces' included): what tells whether the counted processes had the device to
    /// themselves.
    #[serde(default)]
    pub other_processes: usize,
    /// The counted processes' SM utilisation of the device together, percent, from the
    /// driver's latest per-process samples (as [`GpuProcess::utilization`]; a counted
    /// process without a sample in the last interval counts as 0). Read only by
    /// [`Gpus::usage_detailed`](super::Gpus::usage_detailed); `None` from
    /// [`Gpus::usage_of`](super::Gpus::usage_of) and where the device has no per-process
    /// figures (MIG mode, before Maxwell).
    #[serde(default)]
    pub sm_percent: Option<u32>,
    /// The device's energy counter (`nvmlDeviceGetTotalEnergyConsumption`: energy since the
    /// driver loaded, millijoules; Volta and later). Read only by
    /// [`Gpus::usage_detailed`](super::Gpus::usage_detailed).
    #[serde(default)]
    pub total_energy_mj: Option<u64>,
}
