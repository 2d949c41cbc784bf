//! The scenario file format (TOML or JSON) and the bundled scenarios.
//!
//! Every field has a plausible default, so `devices = [{}]` is one H100-like GPU. Field names and
//! units are documented on the structs below and in the crate README.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::codes::Code;
use crate::series::Level;

/// Bundled scenarios: (name, TOML text). `1gpu` is an alias of `default`.
const BUNDLED: &[(&str, &str)] = &[
    ("default", include_str!("../scenarios/default.toml")),
    ("1gpu", include_str!("../scenarios/default.toml")),
    ("4gpu", include_str!("../scenarios/4gpu.toml")),
    ("8gpu", include_str!("../scenarios/8gpu.toml")),
    ("mig", include_str!("../scenarios/mig.toml")),
    ("lost", include_str!("../scenarios/lost.toml")),
    ("nodevices", include_str!("../scenarios/nodevices.toml")),
    ("nodriver", include_str!("../scenarios/nodriver.toml")),
    ("live", include_str!("../scenarios/live.toml")),
];

/// The names of the bundled scenarios, as accepted by `NVML_SIM_SCENARIO`.
pub const BUNDLED_NAMES: &[&str] = &[
    "default",
    "1gpu",
    "4gpu",
    "8gpu",
    "mig",
    "lost",
    "nodevices",
    "nodriver",
    "live",
];

/// The largest number of GPUs (and of MIG instances per GPU) a scenario may declare.
pub const MAX_DEVICES: usize = 255;

/// `NVML_NVLINK_MAX_LINKS`.
pub const MAX_NVLINKS: u32 = 18;

/// A scenario could not be read or is invalid. Its `Display` is one line naming the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioError {
    /// The file path or `bundled scenario NAME`.
    pub origin: String,
    /// What is wrong, in one line.
    pub message: String,
}

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "scenario {}: {}", self.origin, self.message)
    }
}

impl std::error::Error for ScenarioError {}

/// A whole simulated machine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// `nvmlSystemGetDriverVersion`.
    pub driver_version: String,
    /// `nvmlSystemGetNVMLVersion`.
    pub nvml_version: String,
    /// `nvmlSystemGetCudaDriverVersion`, encoded like NVML (12040 = 12.4).
    pub cuda_driver_version: i32,
    /// When set, every `nvmlInit*` fails with this code (e.g. `"DRIVER_NOT_LOADED"`).
    pub init_error: Option<Code>,
    /// Directory of live allocation files; `NVML_SIM_STATE_DIR` takes precedence.
    pub state_dir: Option<PathBuf>,
    /// The device node of each GPU, with `{minor}` standing for its minor number (e.g.
    /// `/dev/nvidia{minor}`): when set, NVML enumerates only the GPUs whose node this process
    /// may open, as the driver does (see [`crate::state::DEVICE_NODES_ENV`], which takes
    /// precedence).
    pub device_nodes: Option<String>,
    /// Injected failures, checked in order.
    pub failures: Vec<Failure>,
    /// The GPUs in NVML enumeration order (list them by PCI bus id, as NVML does).
    pub devices: Vec<Device>,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            driver_version: "550.54.15".into(),
            nvml_version: "12.550.54.15".into(),
            cuda_driver_version: 12040,
            init_error: None,
            state_dir: None,
            device_nodes: None,
            failures: Vec::new(),
            devices: Vec::new(),
        }
    }
}

/// One injected failure: `function` returns `error` after `fail_after` calls that went through.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    /// An exported function name; a name without a `_vN` suffix also matches its versions.
    pub function: String,
    /// The code to return.
    pub error: Code,
    /// How many calls succeed before the failures start (0: fail from the first call).
    #[serde(default)]
    pub fail_after: u64,
    /// Only calls about this GPU index (MIG handles count as their parent) fail.
    #[serde(default)]
    pub device: Option<usize>,
}

impl Failure {
    /// Whether this failure applies to the exported function `function`.
    pub fn matches(&self, function: &str) -> bool {
        self.function == function || self.function == base_name(function)
    }
}

/// `nvmlDeviceGetPciInfo_v3` → `nvmlDeviceGetPciInfo`.
pub fn base_name(function: &str) -> &str {
    match function.rsplit_once("_v") {
        Some((base, v)) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => function,
    }
}

/// Queries that a device can declare unsupported (`unsupported = ["fan", "ecc"]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum Feature {
    Serial,
    MinorNumber,
    PciInfo,
    Memory,
    Utilization,
    EncoderUtilization,
    DecoderUtilization,
    Temperature,
    PowerUsage,
    PowerLimit,
    Fan,
    Clocks,
    MaxClocks,
    Pstate,
    ComputeMode,
    PersistenceMode,
    Ecc,
    Mig,
    Processes,
    Display,
    Brand,
    CudaComputeCapability,
    Bar1,
    Pcie,
    PcieThroughput,
    TemperatureThreshold,
    Nvlink,
    Energy,
    ClocksEventReasons,
    RetiredPages,
    RemappedRows,
    ProcessUtilization,
    PowerConstraints,
    Architecture,
    Vbios,
    Events,
}

/// `nvmlBrandType_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum Brand {
    Unknown = 0,
    Quadro = 1,
    Tesla = 2,
    Nvs = 3,
    Grid = 4,
    Geforce = 5,
    Titan = 6,
    NvidiaRtx = 13,
    Nvidia = 14,
    GeforceRtx = 15,
    TitanRtx = 16,
}

/// `nvmlDeviceArchitecture_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum Architecture {
    Kepler = 2,
    Maxwell = 3,
    Pascal = 4,
    Volta = 5,
    Turing = 6,
    Ampere = 7,
    Ada = 8,
    Hopper = 9,
    Blackwell = 10,
}

/// `nvmlComputeMode_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum ComputeMode {
    Default = 0,
    ExclusiveThread = 1,
    Prohibited = 2,
    ExclusiveProcess = 3,
}

/// Whether a process is listed by the compute or the graphics process query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum ProcessKind {
    #[default]
    Compute,
    Graphics,
}

/// A byte count: an integer, or a string with a unit such as `"80 GiB"` or `"512MiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "BytesRepr")]
pub struct Bytes(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum BytesRepr {
    Int(u64),
    Text(String),
}

impl TryFrom<BytesRepr> for Bytes {
    type Error = String;
    fn try_from(r: BytesRepr) -> Result<Self, String> {
        match r {
            BytesRepr::Int(n) => Ok(Bytes(n)),
            BytesRepr::Text(s) => parse_bytes(&s).map(Bytes),
        }
    }
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("invalid byte count {s:?}: expected e.g. 1024, \"512 MiB\", \"80 GiB\"")
    })?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?}: expected B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("byte count {s:?} is too large"))
}

/// A process id: a number, or `"self"` for the process that loaded the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "PidRepr")]
pub enum Pid {
    /// This pid.
    Id(u32),
    /// The pid of the process that loaded the simulator.
    SelfPid,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PidRepr {
    Int(u32),
    Text(String),
}

impl TryFrom<PidRepr> for Pid {
    type Error = String;
    fn try_from(r: PidRepr) -> Result<Self, String> {
        match r {
            PidRepr::Int(n) => Ok(Pid::Id(n)),
            PidRepr::Text(s) if s == "self" => Ok(Pid::SelfPid),
            PidRepr::Text(s) => Err(format!("invalid pid {s:?}: expected a number or \"self\"")),
        }
    }
}

impl Pid {
    /// The numeric pid.
    pub fn resolve(self) -> u32 {
        match self {
            Pid::Id(n) => n,
            Pid::SelfPid => std::process::id(),
        }
    }
}

/// A process using a GPU or MIG instance.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Process {
    /// Host pid, or `"self"`.
    pub pid: Pid,
    /// GPU memory the process uses.
    pub used_memory: Bytes,
    /// Listed by the compute (default) or graphics process query.
    #[serde(default)]
    pub kind: ProcessKind,
    /// `nvmlSystemGetProcessName`; defaults to the name in `/proc/<pid>/comm`.
    #[serde(default)]
    pub name: Option<String>,
    /// SM utilisation in `nvmlDeviceGetProcessUtilization`, percent; by default the processes
    /// without one share what is left of the GPU's `utilization_gpu`, in shares that move.
    #[serde(default)]
    pub sm_utilization: Option<Level>,
    /// Memory (bandwidth) utilisation, percent; by default a share of `utilization_memory`.
    #[serde(default)]
    pub memory_utilization: Option<Level>,
    /// Encoder utilisation, percent; by default a share of `encoder_utilization`.
    #[serde(default)]
    pub encoder_utilization: Option<Level>,
    /// Decoder utilisation, percent; by default a share of `decoder_utilization`.
    #[serde(default)]
    pub decoder_utilization: Option<Level>,
}

/// Clock speeds in MHz.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[allow(missing_docs)]
pub struct Clocks {
    pub graphics: u32,
    pub sm: u32,
    pub memory: u32,
    pub video: u32,
}

impl Default for Clocks {
    fn default() -> Self {
        Clocks {
            graphics: 1755,
            sm: 1755,
            memory: 2619,
            video: 1365,
        }
    }
}

/// ECC state, aggregate error totals (the volatile counters report the same totals), and the
/// memory the driver took out of service: retired pages (up to Turing) or remapped rows (Ampere
/// on). Which of the two a GPU has is its model's `unsupported` list (`retired_pages`,
/// `remapped_rows`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ecc {
    /// Current and pending ECC mode.
    pub enabled: bool,
    /// Corrected (single-bit) errors.
    pub corrected: u64,
    /// Uncorrected (double-bit) errors.
    pub uncorrected: u64,
    /// Pages retired for multiple single-bit errors (`nvmlDeviceGetRetiredPages`).
    pub retired_pages_single_bit: u32,
    /// Pages retired for a double-bit error.
    pub retired_pages_double_bit: u32,
    /// Whether a page retirement waits for the next reboot.
    pub retired_pages_pending: bool,
    /// Rows remapped for correctable errors (`nvmlDeviceGetRemappedRows`).
    pub remapped_rows_correctable: u32,
    /// Rows remapped for uncorrectable errors.
    pub remapped_rows_uncorrectable: u32,
    /// Whether a remapping waits for the next GPU reset.
    pub remapped_rows_pending: bool,
    /// Whether a remapping failed.
    pub remapped_rows_failure: bool,
}

/// An XID error the GPU reports to event sets (`nvmlEventTypeXidCriticalError`): `after_ms`
/// after the GPU was registered in a set, each set that asked for XIDs receives it once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XidEvent {
    /// Milliseconds from the registration to the event.
    pub after_ms: u64,
    /// The XID (`eventData`), e.g. 79 (fallen off the bus) or 48 (double-bit ECC error).
    pub xid: u64,
}

/// The PCIe link (`nvmlDeviceGet{Max,Curr}PcieLink{Generation,Width}`) and its traffic.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pcie {
    /// The highest generation the GPU and the slot support together.
    pub max_generation: u32,
    /// The widest the link can be, lanes.
    pub max_width: u32,
    /// The generation now (GeForce cards drop to 1 when idle).
    pub generation: u32,
    /// The width now, lanes.
    pub width: u32,
    /// `nvmlDeviceGetPcieThroughput(NVML_PCIE_UTIL_TX_BYTES)`, KB/s.
    pub tx_kbps: Level,
    /// `nvmlDeviceGetPcieThroughput(NVML_PCIE_UTIL_RX_BYTES)`, KB/s.
    pub rx_kbps: Level,
    /// `nvmlDeviceGetPcieReplayCounter`.
    pub replay_counter: u32,
}

impl Default for Pcie {
    fn default() -> Self {
        Pcie {
            max_generation: 5,
            max_width: 16,
            generation: 5,
            width: 16,
            tx_kbps: Level::Fixed(1_200),
            rx_kbps: Level::Fixed(900),
            replay_counter: 0,
        }
    }
}

/// `nvmlDeviceGetTemperatureThreshold`, °C; a missing one answers `NOT_SUPPORTED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TemperatureThresholds {
    /// `NVML_TEMPERATURE_THRESHOLD_SHUTDOWN`.
    pub shutdown: Option<u32>,
    /// `NVML_TEMPERATURE_THRESHOLD_SLOWDOWN`.
    pub slowdown: Option<u32>,
    /// `NVML_TEMPERATURE_THRESHOLD_MEM_MAX`.
    pub mem_max: Option<u32>,
    /// `NVML_TEMPERATURE_THRESHOLD_GPU_MAX`.
    pub gpu_max: Option<u32>,
}

impl Default for TemperatureThresholds {
    fn default() -> Self {
        TemperatureThresholds {
            shutdown: Some(92),
            slowdown: Some(89),
            mem_max: Some(95),
            gpu_max: Some(87),
        }
    }
}

/// NVLink: how many links, their version, and the data each link moves.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NvLink {
    /// Links, all active (0: no NVLink, its queries answer `NOT_SUPPORTED`); at most 18.
    pub links: u32,
    /// `nvmlDeviceGetNvLinkVersion`.
    pub version: u32,
    /// Data sent per link, KiB/s; the field `NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX` counts it up.
    pub tx_kibps: Level,
    /// Data received per link, KiB/s (`NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX`).
    pub rx_kibps: Level,
}

impl Default for NvLink {
    fn default() -> Self {
        NvLink {
            links: 18,
            version: 4,
            tx_kibps: Level::Fixed(0),
            rx_kibps: Level::Fixed(0),
        }
    }
}

/// A MIG device (GPU instance + compute instance) on a MIG-enabled GPU.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigInstance {
    /// `MIG-...`.
    pub uuid: String,
    /// Profile name, used in the default name (`<gpu name> MIG 1g.10gb`).
    #[serde(default = "default_profile")]
    pub profile: String,
    /// Full name; defaults to `<gpu name> MIG <profile>`.
    #[serde(default)]
    pub name: Option<String>,
    /// `nvmlDeviceGetGpuInstanceId`.
    pub gpu_instance_id: u32,
    /// `nvmlDeviceGetComputeInstanceId`.
    #[serde(default)]
    pub compute_instance_id: u32,
    /// The instance's memory.
    pub memory_total: Bytes,
    /// Memory used besides the listed processes.
    #[serde(default)]
    pub memory_used: Bytes,
    /// Processes on this instance.
    #[serde(default)]
    pub processes: Vec<Process>,
}

fn default_profile() -> String {
    "1g.10gb".into()
}

/// One simulated GPU. Empty `uuid`, `pci_bus_id` and `serial` are derived from the index.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Device {
    /// `nvmlDeviceGetName`.
    pub name: String,
    /// `GPU-...`.
    pub uuid: String,
    /// `00000000:18:00.0` (domain:bus:device.function, hex).
    pub pci_bus_id: String,
    /// `nvmlDeviceGetSerial`.
    pub serial: String,
    /// `nvmlDeviceGetMinorNumber`; defaults to the index.
    pub minor_number: Option<u32>,
    /// PCI device id, `0x233010DE` for an H100 SXM.
    pub pci_device_id: u32,
    /// PCI subsystem id.
    pub pci_subsystem_id: u32,
    /// `nvmlDeviceGetBrand`.
    pub brand: Brand,
    /// `[major, minor]`.
    pub cuda_compute_capability: [i32; 2],
    /// Total memory.
    pub memory_total: Bytes,
    /// Memory reserved by the driver (reported by `nvmlDeviceGetMemoryInfo_v2`).
    pub memory_reserved: Bytes,
    /// Memory used besides the listed processes and MIG instances.
    pub memory_used: Bytes,
    /// GPU utilisation, percent: a number, or a range that moves with time.
    pub utilization_gpu: Level,
    /// Memory utilisation, percent.
    pub utilization_memory: Level,
    /// Encoder utilisation, percent.
    pub encoder_utilization: Level,
    /// Decoder utilisation, percent.
    pub decoder_utilization: Level,
    /// GPU temperature, °C.
    pub temperature_c: Level,
    /// Power draw, milliwatts.
    pub power_usage_mw: Level,
    /// Enforced power limit, milliwatts.
    pub power_limit_mw: u32,
    /// Power management limit, milliwatts; defaults to `power_limit_mw`.
    pub power_management_limit_mw: Option<u32>,
    /// The lowest power limit that can be set, milliwatts.
    pub power_limit_min_mw: u32,
    /// The highest power limit that can be set, milliwatts.
    pub power_limit_max_mw: u32,
    /// The power limit the board ships with, milliwatts; defaults to `power_limit_mw`.
    pub power_default_limit_mw: Option<u32>,
    /// Energy used since the driver loaded (taken as the machine's boot), millijoules, at boot;
    /// `nvmlDeviceGetTotalEnergyConsumption` adds the mean power draw times the time since.
    pub energy_mj: u64,
    /// Fan speed, percent.
    pub fan_speed: u32,
    /// `nvmlDeviceGetNumFans`.
    pub num_fans: u32,
    /// Current clocks; by default `max_clocks` while the GPU is busy (utilisation above 0) and
    /// `idle_clocks` while it is not. Keys left out of a stated table are the maximum ones.
    pub clocks: Option<Clocks>,
    /// Clocks while idle, when `clocks` is not stated.
    pub idle_clocks: Clocks,
    /// Maximum clocks.
    pub max_clocks: Clocks,
    /// Performance state, 0 (P0) to 15; by default P0 while busy and `idle_pstate` while idle.
    pub pstate: Option<u32>,
    /// Performance state while idle, when `pstate` is not stated (P8 on a GeForce).
    pub idle_pstate: u32,
    /// `nvmlDeviceGetCurrentClocksEventReasons` bits; by default `GpuIdle` (1) while the GPU's
    /// utilisation is 0, else none.
    pub clocks_event_reasons: Option<u64>,
    /// `nvmlDeviceGetArchitecture`.
    pub architecture: Architecture,
    /// PCIe link and traffic.
    pub pcie: Pcie,
    /// BAR1 aperture size.
    pub bar1_total: Bytes,
    /// BAR1 in use.
    pub bar1_used: Bytes,
    /// Temperature thresholds.
    pub temperature_thresholds: TemperatureThresholds,
    /// NVLink links.
    pub nvlink: NvLink,
    /// `nvmlDeviceGetVbiosVersion`.
    pub vbios_version: String,
    /// `nvmlDeviceGetBoardPartNumber`.
    pub board_part_number: String,
    /// XID errors delivered to event sets, in the order they happen.
    pub xid_events: Vec<XidEvent>,
    /// `nvmlDeviceGetMemoryBusWidth`, bits.
    pub memory_bus_width: u32,
    /// `nvmlDeviceGetNumGpuCores`.
    pub cuda_cores: u32,
    /// `nvmlDeviceGetComputeMode`.
    pub compute_mode: ComputeMode,
    /// `nvmlDeviceGetPersistenceMode`.
    pub persistence_mode: bool,
    /// `nvmlDeviceGetDisplayActive`.
    pub display_active: bool,
    /// `nvmlDeviceGetDisplayMode`.
    pub display_mode: bool,
    /// ECC mode and totals.
    pub ecc: Ecc,
    /// MIG mode (current and pending).
    pub mig_mode: bool,
    /// `nvmlDeviceGetMaxMigDeviceCount`.
    pub max_mig_devices: u32,
    /// MIG devices; requires `mig_mode = true`.
    pub mig: Vec<MigInstance>,
    /// Processes on the whole GPU.
    pub processes: Vec<Process>,
    /// Queries that return `NVML_ERROR_NOT_SUPPORTED`.
    pub unsupported: Vec<Feature>,
    /// Every query about this GPU returns `NVML_ERROR_GPU_IS_LOST`.
    pub lost: bool,
}

impl Default for Device {
    fn default() -> Self {
        Device {
            name: "NVIDIA H100 80GB HBM3".into(),
            uuid: String::new(),
            pci_bus_id: String::new(),
            serial: String::new(),
            minor_number: None,
            pci_device_id: 0x2330_10DE,
            pci_subsystem_id: 0x16C1_10DE,
            brand: Brand::Nvidia,
            cuda_compute_capability: [9, 0],
            memory_total: Bytes(85_520_809_984),
            memory_reserved: Bytes(570_425_344),
            memory_used: Bytes(0),
            utilization_gpu: Level::Fixed(0),
            utilization_memory: Level::Fixed(0),
            encoder_utilization: Level::Fixed(0),
            decoder_utilization: Level::Fixed(0),
            temperature_c: Level::Fixed(33),
            power_usage_mw: Level::Fixed(71_000),
            power_limit_mw: 700_000,
            power_management_limit_mw: None,
            power_limit_min_mw: 200_000,
            power_limit_max_mw: 700_000,
            power_default_limit_mw: None,
            energy_mj: 0,
            fan_speed: 0,
            num_fans: 0,
            clocks: None,
            idle_clocks: Clocks {
                graphics: 345,
                sm: 345,
                memory: 2619,
                video: 765,
            },
            max_clocks: Clocks {
                graphics: 1980,
                sm: 1980,
                memory: 2619,
                video: 1545,
            },
            pstate: None,
            idle_pstate: 0,
            clocks_event_reasons: None,
            architecture: Architecture::Hopper,
            pcie: Pcie::default(),
            bar1_total: Bytes(128 << 30),
            bar1_used: Bytes(1 << 20),
            temperature_thresholds: TemperatureThresholds::default(),
            nvlink: NvLink::default(),
            vbios_version: "96.00.74.00.01".into(),
            board_part_number: "692-2G520-0200-000".into(),
            xid_events: Vec::new(),
            memory_bus_width: 5120,
            cuda_cores: 16896,
            compute_mode: ComputeMode::Default,
            persistence_mode: true,
            display_active: false,
            display_mode: false,
            ecc: Ecc {
                enabled: true,
                ..Ecc::default()
            },
            mig_mode: false,
            max_mig_devices: 7,
            mig: Vec::new(),
            processes: Vec::new(),
            unsupported: vec![Feature::Fan, Feature::RetiredPages],
            lost: false,
        }
    }
}

impl Device {
    /// Whether `feature` was declared unsupported.
    pub fn unsupported(&self, feature: Feature) -> bool {
        self.unsupported.contains(&feature)
    }

    /// The PCI bus id split into (domain, bus, device, function).
    pub fn pci_parts(&self) -> (u32, u32, u32, u32) {
        parse_bus_id(&self.pci_bus_id).unwrap_or((0, 0, 0, 0))
    }
}

/// The placeholder of [`Scenario::device_nodes`] that stands for a GPU's minor number.
pub const MINOR_PLACEHOLDER: &str = "{minor}";

/// Checks a device node pattern: an absolute path naming `{minor}` once.
pub fn check_node_pattern(pattern: &str) -> Result<(), String> {
    if !pattern.starts_with('/') || pattern.matches(MINOR_PLACEHOLDER).count() != 1 {
        return Err(format!(
            "device_nodes {pattern:?}: expected an absolute path with {MINOR_PLACEHOLDER} once, like /dev/nvidia{MINOR_PLACEHOLDER}"
        ));
    }
    Ok(())
}

/// The device node of the GPU with minor number `minor`, from a pattern [`check_node_pattern`]
/// accepted.
pub fn node_path(pattern: &str, minor: u32) -> PathBuf {
    PathBuf::from(pattern.replacen(MINOR_PLACEHOLDER, &minor.to_string(), 1))
}

/// Parses `00000000:18:00.0` or `0000:18:00.0` (hex) into (domain, bus, device, function).
pub fn parse_bus_id(s: &str) -> Option<(u32, u32, u32, u32)> {
    let (rest, function) = s.trim().rsplit_once('.')?;
    let mut parts = rest.split(':');
    let (domain, bus, device) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let hex = |p: &str| u32::from_str_radix(p, 16).ok();
    Some((hex(domain)?, hex(bus)?, hex(device)?, hex(function)?))
}

/// Which format a scenario text is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// TOML.
    Toml,
    /// JSON.
    Json,
}

impl Scenario {
    /// Parses and validates scenario text; `origin` names it in errors.
    pub fn parse(text: &str, format: Format, origin: &str) -> Result<Scenario, ScenarioError> {
        let err = |message: String| ScenarioError {
            origin: origin.to_string(),
            message,
        };
        // First as written, for errors that name the line; then again with each device's model
        // defaults filled in where the scenario is silent.
        let mut doc: serde_json::Value = match format {
            Format::Toml => {
                toml::from_str::<Scenario>(text).map_err(|e| {
                    let at = e.span().map_or(String::new(), |span| {
                        let before = &text[..span.start.min(text.len())];
                        let line = before.matches('\n').count() + 1;
                        format!("line {line}: ")
                    });
                    err(format!("{at}{}", one_line(e.message())))
                })?;
                let table: toml::Table =
                    toml::from_str(text).map_err(|e| err(one_line(e.message())))?;
                serde_json::to_value(table).map_err(|e| err(one_line(&e.to_string())))?
            }
            Format::Json => {
                serde_json::from_str::<Scenario>(text)
                    .map_err(|e| err(one_line(&e.to_string())))?;
                serde_json::from_str(text).map_err(|e| err(one_line(&e.to_string())))?
            }
        };
        crate::models::apply(&mut doc);
        let mut scenario: Scenario =
            serde_json::from_value(doc).map_err(|e| err(one_line(&e.to_string())))?;
        scenario.fill_defaults();
        scenario.validate().map_err(err)?;
        Ok(scenario)
    }

    /// Reads a `.toml` or `.json` file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let origin = path.display().to_string();
        let format = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => Format::Toml,
            Some("json") => Format::Json,
            _ => {
                return Err(ScenarioError {
                    origin,
                    message: "unknown file extension: expected .toml or .json".into(),
                })
            }
        };
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError {
            origin: origin.clone(),
            message: format!("cannot read file: {e}"),
        })?;
        Scenario::parse(&text, format, &origin)
    }

    /// A bundled scenario by name, `None` if there is no such name.
    pub fn bundled(name: &str) -> Option<Scenario> {
        let (_, text) = BUNDLED.iter().find(|(n, _)| *n == name)?;
        let origin = format!("bundled:{name}");
        Some(Scenario::parse(text, Format::Toml, &origin).unwrap_or_else(|e| panic!("{e}")))
    }

    /// What `NVML_SIM_SCENARIO` accepts: a bundled name or a file path.
    pub fn from_spec(spec: &str) -> Result<Scenario, ScenarioError> {
        if let Some(s) = Scenario::bundled(spec) {
            return Ok(s);
        }
        let path = Path::new(spec);
        if !path.exists() {
            return Err(ScenarioError {
                origin: spec.to_string(),
                message: format!(
                    "no such file, and not a bundled scenario (bundled: {})",
                    BUNDLED_NAMES.join(", ")
                ),
            });
        }
        Scenario::load(path)
    }

    /// The minor number of GPU `gpu` (`/dev/nvidia<minor>`): the scenario's, else the index.
    pub fn minor_number(&self, gpu: usize) -> u32 {
        self.devices
            .get(gpu)
            .and_then(|d| d.minor_number)
            .unwrap_or_else(|| u32::try_from(gpu).unwrap_or(u32::MAX))
    }

    fn fill_defaults(&mut self) {
        for (i, d) in self.devices.iter_mut().enumerate() {
            let n = i as u64;
            if d.uuid.is_empty() {
                let h = (n + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                d.uuid = format!(
                    "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                    (h >> 32) as u32,
                    (h >> 16) as u16,
                    0x4000 | (h as u16 & 0x0fff),
                    0x8000 | ((h >> 48) as u16 & 0x3fff),
                    h & 0xffff_ffff_ffff
                );
            }
            if d.pci_bus_id.is_empty() {
                const BUSES: [u32; 8] = [0x18, 0x2a, 0x3a, 0x5d, 0x9a, 0xab, 0xba, 0xdb];
                d.pci_bus_id = match BUSES.get(i) {
                    Some(bus) => format!("00000000:{bus:02X}:00.0"),
                    None => format!("00000001:{i:02X}:00.0"),
                };
            }
            if d.serial.is_empty() {
                d.serial = format!("165232{:07}", 1_000_123 + n * 7);
            }
        }
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(pattern) = &self.device_nodes {
            check_node_pattern(pattern)?;
        }
        if self.devices.len() > MAX_DEVICES {
            return Err(format!(
                "{} devices: at most {MAX_DEVICES}",
                self.devices.len()
            ));
        }
        let mut uuids = std::collections::HashSet::new();
        let mut buses = std::collections::HashSet::new();
        for (i, d) in self.devices.iter().enumerate() {
            let at = format!("devices[{i}]");
            if !d.uuid.starts_with("GPU-") {
                return Err(format!("{at}.uuid {:?}: expected GPU-...", d.uuid));
            }
            if !uuids.insert(d.uuid.clone()) {
                return Err(format!("{at}.uuid {:?} is used twice", d.uuid));
            }
            let Some(parts) = parse_bus_id(&d.pci_bus_id) else {
                return Err(format!(
                    "{at}.pci_bus_id {:?}: expected domain:bus:device.function like 00000000:18:00.0",
                    d.pci_bus_id
                ));
            };
            if !buses.insert(parts) {
                return Err(format!("{at}.pci_bus_id {:?} is used twice", d.pci_bus_id));
            }
            if let Some(p) = d
                .pstate
                .filter(|&p| p > 15)
                .or((d.idle_pstate > 15).then_some(d.idle_pstate))
            {
                return Err(format!("{at}.pstate {p}: expected 0 to 15"));
            }
            if d.mig.len() > MAX_DEVICES || d.mig.len() > d.max_mig_devices as usize {
                return Err(format!(
                    "{at}.mig has {} instances, more than max_mig_devices = {}",
                    d.mig.len(),
                    d.max_mig_devices
                ));
            }
            if !d.mig.is_empty() && !d.mig_mode {
                return Err(format!("{at}.mig lists instances but mig_mode is false"));
            }
            if d.mig_mode && d.unsupported(Feature::Mig) {
                return Err(format!(
                    "{at}: mig_mode is true but {:?} has no MIG (\"mig\" is in unsupported)",
                    d.name
                ));
            }
            for (field, level) in [
                ("utilization_gpu", d.utilization_gpu),
                ("utilization_memory", d.utilization_memory),
                ("encoder_utilization", d.encoder_utilization),
                ("decoder_utilization", d.decoder_utilization),
            ] {
                if level.max() > 100 {
                    return Err(format!("{at}.{field}: {} is over 100 percent", level.max()));
                }
            }
            if d.nvlink.links > MAX_NVLINKS {
                return Err(format!(
                    "{at}.nvlink.links {}: at most {MAX_NVLINKS}",
                    d.nvlink.links
                ));
            }
            let mut used = d.memory_reserved.0 + d.memory_used.0;
            used += d.processes.iter().map(|p| p.used_memory.0).sum::<u64>();
            let mut ids = std::collections::HashSet::new();
            for (j, m) in d.mig.iter().enumerate() {
                let at = format!("{at}.mig[{j}]");
                if !m.uuid.starts_with("MIG-") {
                    return Err(format!("{at}.uuid {:?}: expected MIG-...", m.uuid));
                }
                if !uuids.insert(m.uuid.clone()) {
                    return Err(format!("{at}.uuid {:?} is used twice", m.uuid));
                }
                if !ids.insert((m.gpu_instance_id, m.compute_instance_id)) {
                    return Err(format!(
                        "{at}: gpu_instance_id/compute_instance_id pair is used twice"
                    ));
                }
                let mig_used =
                    m.memory_used.0 + m.processes.iter().map(|p| p.used_memory.0).sum::<u64>();
                if mig_used > m.memory_total.0 {
                    return Err(format!(
                        "{at}: memory in use ({mig_used} bytes) exceeds memory_total ({} bytes)",
                        m.memory_total.0
                    ));
                }
                used += mig_used;
            }
            if used > d.memory_total.0 {
                return Err(format!(
                    "{at}: reserved + used + process memory ({used} bytes) exceeds memory_total ({} bytes)",
                    d.memory_total.0
                ));
            }
        }
        for (i, f) in self.failures.iter().enumerate() {
            let known = crate::ffi::EXPORTED.iter().any(|name| {
                f.matches(name) && !name.starts_with("nvmlInit") && *name != "nvmlShutdown"
            });
            if !known {
                return Err(format!(
                    "failures[{i}].function {:?} is not an exported device or system query (use init_error to fail nvmlInit)",
                    f.function
                ));
            }
            if let Some(d) = f.device {
                if d >= self.devices.len() {
                    return Err(format!(
                        "failures[{i}].device {d} is out of range ({} devices)",
                        self.devices.len()
                    ));
                }
            }
        }
        Ok(())
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl<'de> Deserialize<'de> for Code {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Int(u32),
            Text(String),
        }
        match Repr::deserialize(d)? {
            Repr::Int(n) => Ok(Code(n)),
            Repr::Text(s) => Code::from_name(&s).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "unknown NVML error {s:?}: expected a number or one of {}",
                    Code::names().collect::<Vec<_>>().join(", ")
                ))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codes;

    #[test]
    fn bundled_scenarios_parse() {
        for name in BUNDLED_NAMES {
            Scenario::bundled(name).unwrap_or_else(|| panic!("{name} missing"));
        }
        assert_eq!(BUNDLED_NAMES.len(), BUNDLED.len());
        assert_eq!(Scenario::bundled("4gpu").unwrap().devices.len(), 4);
        assert_eq!(Scenario::bundled("nodevices").unwrap().devices.len(), 0);
        assert_eq!(
            Scenario::bundled("nodriver").unwrap().init_error,
            Some(codes::DRIVER_NOT_LOADED)
        );
    }

    #[test]
    fn empty_device_gets_plausible_defaults() {
        let s = Scenario::parse("devices = [{}, {}]", Format::Toml, "t").unwrap();
        assert_eq!(s.devices[0].name, "NVIDIA H100 80GB HBM3");
        assert_ne!(s.devices[0].uuid, s.devices[1].uuid);
        assert_eq!(s.devices[1].pci_bus_id, "00000000:2A:00.0");
        assert_eq!(s.devices[0].uuid.len(), 40);
    }

    #[test]
    fn toml_and_json_agree() {
        let toml = r#"
            driver_version = "535.1"
            [[devices]]
            memory_total = "16 GiB"
            memory_used = 1024
            processes = [{ pid = "self", used_memory = "1 MiB" }, { pid = 7, used_memory = 5, kind = "graphics" }]
            unsupported = ["fan", "ecc"]
            [[failures]]
            function = "nvmlDeviceGetPowerUsage"
            error = "UNKNOWN"
            fail_after = 2
        "#;
        let json = r#"{"driver_version": "535.1", "devices": [{"memory_total": 17179869184,
            "memory_used": 1024, "unsupported": ["fan", "ecc"],
            "processes": [{"pid": "self", "used_memory": 1048576}, {"pid": 7, "used_memory": 5, "kind": "graphics"}]}],
            "failures": [{"function": "nvmlDeviceGetPowerUsage", "error": 999, "fail_after": 2}]}"#;
        let a = Scenario::parse(toml, Format::Toml, "a").unwrap();
        let b = Scenario::parse(json, Format::Json, "b").unwrap();
        assert_eq!(a.devices[0].memory_total, Bytes(16 << 30));
        assert_eq!(a.devices[0].memory_total, b.devices[0].memory_total);
        assert_eq!(a.devices[0].processes[0].pid, Pid::SelfPid);
        assert_eq!(a.devices[0].processes[0].pid.resolve(), std::process::id());
        assert_eq!(b.devices[0].processes[1].kind, ProcessKind::Graphics);
        assert_eq!(a.failures[0].error, b.failures[0].error);
        assert!(a.devices[0].unsupported(Feature::Ecc));
    }

    #[test]
    fn errors_are_one_line_and_name_the_problem() {
        let cases: &[(&str, Format, &str)] = &[
            ("devices = [{ nmae = \"x\" }]", Format::Toml, "nmae"),
            ("[[devices]]\nunsupported = [\"fans\"]", Format::Toml, "fans"),
            ("devices = [{ memory_total = \"8 GB\", memory_used = \"9 GB\" }]", Format::Toml, "exceeds"),
            ("devices = [{ memory_total = \"8 XB\" }]", Format::Toml, "unknown unit"),
            ("init_error = \"NOPE\"", Format::Toml, "unknown NVML error"),
            ("[[failures]]\nfunction = \"nvmlFoo\"\nerror = 3", Format::Toml, "nvmlFoo"),
            ("devices = [{}, {uuid = \"GPU-1\"}, {uuid = \"GPU-1\"}]", Format::Toml, "twice"),
            ("devices = [{ mig = [{ uuid = \"MIG-1\", gpu_instance_id = 1, memory_total = 1 }] }]", Format::Toml, "mig_mode"),
            ("{\"devices\": [{\"pid\": 1}]}", Format::Json, "pid"),
            ("{\"devices\": [", Format::Json, "EOF"),
            ("devices = [{ processes = [{ pid = \"me\", used_memory = 1 }] }]", Format::Toml, "self"),
            ("devices = [{ name = \"NVIDIA GeForce RTX 4090\", mig_mode = true }]", Format::Toml, "has no MIG"),
            ("devices = [{ utilization_gpu = { min = 10, max = 120 } }]", Format::Toml, "over 100"),
            ("devices = [{ utilization_gpu = { min = 50, max = 10 } }]", Format::Toml, "min <= max"),
            ("devices = [{ nvlink = { links = 19 } }]", Format::Toml, "at most 18"),
        ];
        for (text, format, needle) in cases {
            let e = Scenario::parse(text, *format, "f.toml").unwrap_err();
            let line = e.to_string();
            assert!(!line.contains('\n'), "{line}");
            assert!(line.starts_with("scenario f.toml: "), "{line}");
            assert!(line.contains(needle), "{line:?} should mention {needle:?}");
        }
    }

    #[test]
    fn spec_names_missing_files_and_extensions() {
        let e = Scenario::from_spec("/nonexistent/x.toml").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.toml"));
        assert!(e.to_string().contains("8gpu"));
        let e = Scenario::load(Path::new("Cargo.yaml")).unwrap_err();
        assert!(e.message.contains(".toml or .json"));
    }

    #[test]
    fn helpers() {
        assert_eq!(base_name("nvmlDeviceGetPciInfo_v3"), "nvmlDeviceGetPciInfo");
        assert_eq!(base_name("nvmlInit"), "nvmlInit");
        assert_eq!(parse_bus_id("0000:1a:00.0"), Some((0, 0x1a, 0, 0)));
        assert_eq!(parse_bus_id("1a:00.0"), None);
        assert_eq!(parse_bytes("512 MiB"), Ok(512 << 20));
    }
}
