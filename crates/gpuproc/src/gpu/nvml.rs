//! The NVML handle: loads `libnvidia-ml` at run time and turns its answers into our types.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use nvml_wrapper::enum_wrappers::device::{
    Clock, ComputeMode as NvComputeMode, EccCounter, MemoryError, PcieUtilCounter,
    PerformanceState, TemperatureSensor,
};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::{MemoryInfo, ProcessInfo};
use nvml_wrapper::{Device as NvDevice, Nvml};

use super::entry::{self, Entries, ListKind, UtilizationCache};
use super::error::{from_nvml, GpuError, GpuErrorKind};
use super::host::Proc;
use super::types::*;
use super::visible::{
    order_is_exact, parse_cuda_visible_devices, slurm_visible_devices, CudaDeviceOrder,
};

/// The environment variable naming the `libnvidia-ml` to load instead of the system's.
pub const NVML_LIB_ENV: &str = "GPUPROC_NVML_LIB";

/// A loaded NVML library, for callers that query repeatedly.
///
/// [`gpu::snapshot()`](super::snapshot) and the other free functions share one lazily opened
/// `Gpus`; open your own to choose the library or `/proc` root. Opening loads
/// `libnvidia-ml` and initialises NVML, which never creates a CUDA context: a `Gpus` may be
/// opened before forking. Dropping it shuts NVML down.
///
/// ```no_run
/// let gpus = gpuproc::gpu::Gpus::builder().library("/usr/lib/libnvidia-ml.so.1").build()?;
/// for device in gpus.snapshot()?.devices {
///     println!("{}: {:?}", device.index, device.memory);
/// }
/// # Ok::<(), gpuproc::gpu::GpuError>(())
/// ```
#[derive(Debug)]
pub struct Gpus {
    nvml: Nvml,
    entries: Entries,
    /// Per-process utilisation samples by device index, kept between snapshots.
    utilization: Mutex<BTreeMap<u32, UtilizationCache>>,
    proc: Proc,
    host_info: bool,
}

/// Configures and opens a [`Gpus`].
#[derive(Debug, Clone)]
#[must_use]
pub struct GpusBuilder {
    library: Option<PathBuf>,
    proc_root: PathBuf,
    host_info: bool,
}

impl Default for GpusBuilder {
    fn default() -> Self {
        GpusBuilder {
            library: None,
            proc_root: PathBuf::from("/proc"),
            host_info: true,
        }
    }
}

impl GpusBuilder {
    /// Loads this `libnvidia-ml` instead of `$GPUPROC_NVML_LIB` or the system's
    /// `libnvidia-ml.so.1`.
    pub fn library(mut self, path: impl Into<PathBuf>) -> Self {
        self.library = Some(path.into());
        self
    }

    /// Reads processes from this procfs mount instead of `/proc`: for example the host's
    /// `/proc` mounted into a container, so that NVML's host PIDs can be mapped through
    /// `NSpid` to the container's PIDs.
    pub fn proc_root(mut self, path: impl Into<PathBuf>) -> Self {
        self.proc_root = path.into();
        self
    }

    /// Whether snapshots join each GPU process with `/proc` (user, command line, CPU, RSS).
    /// On by default.
    pub fn host_info(mut self, yes: bool) -> Self {
        self.host_info = yes;
        self
    }

    /// Loads the library and initialises NVML.
    ///
    /// # Errors
    /// [`GpuError::is_no_library`] when the library cannot be loaded,
    /// [`GpuError::is_driver_not_loaded`] when the driver is not running,
    /// [`GpuError::is_missing_function`] when the driver is too old.
    pub fn build(self) -> Result<Gpus, GpuError> {
        let library: OsString = match self.library {
            Some(path) => path.into_os_string(),
            None => std::env::var_os(NVML_LIB_ENV)
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "libnvidia-ml.so.1".into()),
        };
        let nvml = Nvml::builder()
            .lib_path(&library)
            .init()
            .map_err(|e| match e {
                NvmlError::LibloadingError(_) | NvmlError::LibraryNotFound => GpuError::new(
                    GpuErrorKind::NoLibrary,
                    format!(
                        "no NVIDIA driver: the NVIDIA management library {} could not be loaded \
                         (set {NVML_LIB_ENV} to use another)",
                        library.to_string_lossy()
                    ),
                )
                .with_source(e),
                other => from_nvml(other, "initialising NVML"),
            })?;
        Ok(Gpus {
            entries: Entries::resolve(&nvml),
            utilization: Mutex::new(BTreeMap::new()),
            nvml,
            proc: Proc::new(self.proc_root),
            host_info: self.host_info,
        })
    }
}

fn opt<T>(r: Result<T, NvmlError>) -> Option<T> {
    r.ok()
}

fn memory(m: MemoryInfo) -> Memory {
    Memory {
        total: m.total,
        used: m.used,
        free: m.free,
    }
}

impl Gpus {
    /// Opens the library named by `$GPUPROC_NVML_LIB`, or the system's `libnvidia-ml.so.1`.
    ///
    /// # Errors
    /// As [`GpusBuilder::build`].
    pub fn open() -> Result<Gpus, GpuError> {
        Gpus::builder().build()
    }

    /// A builder to choose the library and `/proc` root.
    pub fn builder() -> GpusBuilder {
        GpusBuilder::default()
    }

    /// The number of GPUs NVML sees (including ones this user may not access).
    ///
    /// # Errors
    /// When NVML fails.
    pub fn device_count(&self) -> Result<u32, GpuError> {
        self.nvml
            .device_count()
            .map_err(|e| from_nvml(e, "counting GPUs"))
    }

    /// The driver version, such as `"550.54.15"`.
    ///
    /// # Errors
    /// When NVML fails.
    pub fn driver_version(&self) -> Result<String, GpuError> {
        self.nvml
            .sys_driver_version()
            .map_err(|e| from_nvml(e, "reading the driver version"))
    }

    /// Every device, with processes and host information.
    ///
    /// A device that cannot be read (lost, permission denied) is listed with
    /// [`Device::error`] set; only a failure to count the devices fails the snapshot.
    ///
    /// Per-process utilisation ([`GpuProcess::utilization`]) comes from the driver's sample
    /// buffer: the first snapshot through a handle asks for every buffered sample, later
    /// ones only for samples newer than the newest seen (as nvtop does), and each process
    /// gets its newest sample; when the driver has taken no new sample since (it samples
    /// about every 100 ms to 1 s), the previous figures stand. A figure over 100% is
    /// dropped. A process without a sample in the last answer has `None`.
    ///
    /// On real hardware [`Pcie`]'s throughput costs about 20 ms per direction and device
    /// (the driver counts bytes over a 20 ms window).
    ///
    /// # Errors
    /// When NVML cannot count the devices.
    pub fn snapshot(&self) -> Result<Snapshot, GpuError> {
        let devices = self.read_devices(true, true)?;
        Ok(self.snapshot_of(devices))
    }

    fn snapshot_of(&self, devices: Vec<Device>) -> Snapshot {
        let cuda = opt(self.nvml.sys_cuda_driver_version()).map(|v| CudaVersion {
            major: (v / 1000) as u32,
            minor: ((v % 1000) / 10) as u32,
        });
        Snapshot {
            hostname: hostname(),
            timestamp_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            driver_version: opt(self.nvml.sys_driver_version()),
            cuda_driver_version: cuda,
            nvml_version: opt(self.nvml.sys_nvml_version()),
            devices,
        }
    }

    /// Every device; with `processes`, the processes on each (joined with `/proc` when the
    /// handle was built with host information).
    ///
    /// This is the quick read that picking GPUs needs: the fields a [`snapshot`](Gpus::snapshot)
    /// adds (PCIe, NVLink, BAR1, clock event reasons, retired pages, remapped rows, energy,
    /// encoder and decoder utilisation, per-process utilisation) are left `None`.
    ///
    /// # Errors
    /// When NVML cannot count the devices.
    pub fn devices(&self, processes: bool) -> Result<Vec<Device>, GpuError> {
        self.read_devices(processes, false)
    }

    /// A snapshot without the fields only [`snapshot`](Gpus::snapshot) reads (those
    /// [`devices`](Gpus::devices) leaves `None`), with processes: what a table of devices
    /// and their processes needs, without the driver's slow counters (PCIe throughput
    /// alone takes about 40 ms per device on real hardware).
    ///
    /// # Errors
    /// When NVML cannot count the devices.
    pub fn snapshot_without_details(&self) -> Result<Snapshot, GpuError> {
        let devices = self.read_devices(true, false)?;
        Ok(self.snapshot_of(devices))
    }

    fn read_devices(&self, processes: bool, details: bool) -> Result<Vec<Device>, GpuError> {
        let count = self.device_count()?;
        let mapper = processes.then(|| self.proc.pid_mapper());
        if details && count > 1 {
            // The detailed counters wait on the driver (PCIe throughput samples for 20 ms
            // per direction): read the devices side by side, not one after another.
            let mapper = mapper.as_ref();
            return Ok(std::thread::scope(|scope| {
                let reads: Vec<_> = (0..count)
                    .map(|index| scope.spawn(move || self.device(index, mapper, details)))
                    .collect();
                reads
                    .into_iter()
                    .enumerate()
                    .map(|(index, r)| {
                        // A panicking read (NVML answering nonsense) is that device's error.
                        r.join()
                            .unwrap_or_else(|_| self.device(index as u32, None, false))
                    })
                    .collect()
            }));
        }
        Ok((0..count)
            .map(|index| self.device(index, mapper.as_ref(), details))
            .collect())
    }

    /// One device; with `details`, also the fields that only a snapshot reads (PCIe, NVLink,
    /// BAR1, clock event reasons, retired pages and remapped rows, energy, encoder and
    /// decoder utilisation).
    fn device(&self, index: u32, mapper: Option<&super::host::PidMapper>, details: bool) -> Device {
        let mut out = Device {
            index,
            ..Device::default()
        };
        let handle = match self.nvml.device_by_index(index) {
            Ok(handle) => handle,
            Err(e) => {
                let err = from_nvml(e, &format!("opening GPU {index}"));
                out.error = Some(DeviceFault {
                    kind: err.kind(),
                    message: err.to_string(),
                });
                return out;
            }
        };
        // Name and UUID first: if they fail with a device-level error (lost, no permission),
        // the rest will too, so record the fault and stop.
        match handle.uuid() {
            Ok(uuid) => out.uuid = Some(uuid),
            Err(e @ (NvmlError::GpuLost | NvmlError::NoPermission | NvmlError::Unknown)) => {
                let err = from_nvml(e, &format!("reading GPU {index}"));
                out.error = Some(DeviceFault {
                    kind: err.kind(),
                    message: err.to_string(),
                });
                return out;
            }
            Err(_) => {}
        }
        out.name = opt(handle.name());
        out.pci_bus_id = opt(handle.pci_info()).map(|p| p.bus_id);
        out.minor_number = opt(handle.minor_number());
        out.memory = opt(entry::memory_info(&self.nvml, &handle)).map(memory);
        out.utilization = opt(handle.utilization_rates()).map(|u| Utilization {
            gpu: u.gpu,
            memory: u.memory,
        });
        out.temperature_c = opt(handle.temperature(TemperatureSensor::Gpu));
        out.power_draw_mw = opt(handle.power_usage());
        out.power_limit_mw = opt(handle.enforced_power_limit());
        out.fan_speed_percent = opt(handle.fan_speed(0));
        out.clocks = Clocks {
            graphics_mhz: opt(handle.clock_info(Clock::Graphics)),
            sm_mhz: opt(handle.clock_info(Clock::SM)),
            memory_mhz: opt(handle.clock_info(Clock::Memory)),
            max_graphics_mhz: opt(handle.max_clock_info(Clock::Graphics)),
            max_memory_mhz: opt(handle.max_clock_info(Clock::Memory)),
        };
        out.performance_state = opt(handle.performance_state()).and_then(pstate);
        out.compute_mode = opt(handle.compute_mode()).map(|m| match m {
            NvComputeMode::Default => ComputeMode::Default,
            NvComputeMode::ExclusiveThread => ComputeMode::ExclusiveThread,
            NvComputeMode::Prohibited => ComputeMode::Prohibited,
            NvComputeMode::ExclusiveProcess => ComputeMode::ExclusiveProcess,
        });
        out.mig = self.mig(&handle);
        out.ecc_errors = ecc(&handle);
        if details {
            self.details(&handle, &mut out);
        }
        if let Some(mapper) = mapper {
            out.processes = self.processes(index, &handle, mapper, details);
        }
        out
    }

    fn details(&self, handle: &NvDevice<'_>, out: &mut Device) {
        out.encoder_utilization = opt(handle.encoder_utilization()).map(|u| u.utilization);
        out.decoder_utilization = opt(handle.decoder_utilization()).map(|u| u.utilization);
        let pcie = Pcie {
            generation: opt(handle.current_pcie_link_gen()),
            max_generation: opt(handle.max_pcie_link_gen()),
            width: opt(handle.current_pcie_link_width()),
            max_width: opt(handle.max_pcie_link_width()),
            tx_kib_per_s: opt(handle.pcie_throughput(PcieUtilCounter::Send)),
            rx_kib_per_s: opt(handle.pcie_throughput(PcieUtilCounter::Receive)),
        };
        out.pcie = (pcie != Pcie::default()).then_some(pcie);
        out.nvlink = entry::nvlink(&self.nvml, handle);
        out.bar1_memory = opt(handle.bar1_memory_info()).map(|m| Memory {
            total: m.total,
            used: m.used,
            free: m.free,
        });
        out.clock_event_reasons =
            entry::clock_event_reasons(&self.nvml, handle).map(ClockEventReasons::from_mask);
        out.retired_pages = entry::retired_pages(&self.nvml, handle);
        out.remapped_rows = entry::remapped_rows(&self.nvml, handle);
        out.total_energy_mj = opt(handle.total_energy_consumption());
    }

    fn mig(&self, handle: &NvDevice<'_>) -> Option<Mig> {
        let mode = handle.mig_mode().ok()?;
        let mut mig = Mig {
            enabled: mode.current != 0,
            pending: mode.pending != 0,
            instances: Vec::new(),
        };
        if mig.enabled {
            let max = handle.mig_device_count().unwrap_or(0);
            for index in 0..max {
                // Slots without a MIG device answer NotFound.
                let Ok(child) = handle.mig_device_by_index(index) else {
                    continue;
                };
                let (gpu_instance_id, compute_instance_id) = instance_ids(&self.nvml, &child);
                mig.instances.push(MigInstance {
                    index,
                    uuid: opt(child.uuid()),
                    name: opt(child.name()),
                    gpu_instance_id,
                    compute_instance_id,
                    memory: opt(entry::memory_info(&self.nvml, &child)).map(memory),
                });
            }
        }
        Some(mig)
    }

    fn processes(
        &self,
        index: u32,
        handle: &NvDevice<'_>,
        mapper: &super::host::PidMapper,
        utilization: bool,
    ) -> Option<Vec<GpuProcess>> {
        let compute = entry::running_processes(&self.entries, handle, ListKind::Compute);
        let graphics = entry::running_processes(&self.entries, handle, ListKind::Graphics);
        if compute.is_err() && graphics.is_err() {
            return None;
        }
        // Keyed by (pid, gpu instance, compute instance): under MIG one process may appear once
        // per instance it uses.
        let mut merged: BTreeMap<(u32, Option<u32>, Option<u32>), GpuProcess> = BTreeMap::new();
        let lists = [
            (compute.unwrap_or_default(), ProcessKind::Compute),
            (graphics.unwrap_or_default(), ProcessKind::Graphics),
        ];
        for (list, kind) in lists {
            for p in list {
                let key = (p.pid, p.gpu_instance_id, p.compute_instance_id);
                merged
                    .entry(key)
                    .and_modify(|e| {
                        if e.kind != kind {
                            e.kind = ProcessKind::ComputeAndGraphics;
                        }
                    })
                    .or_insert_with(|| self.process(p, kind, mapper));
            }
        }
        let mut processes: Vec<GpuProcess> = merged.into_values().collect();
        if utilization && !processes.is_empty() {
            let mut caches = self
                .utilization
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let cache = caches.entry(index).or_default();
            if let Ok(samples) = cache.update(handle) {
                for p in &mut processes {
                    p.utilization = samples.get(&p.nvml_pid).copied();
                }
            }
        }
        Some(processes)
    }

    fn process(
        &self,
        p: ProcessInfo,
        kind: ProcessKind,
        mapper: &super::host::PidMapper,
    ) -> GpuProcess {
        let pid = mapper.map(p.pid);
        GpuProcess {
            pid,
            nvml_pid: p.pid,
            used_memory: match p.used_gpu_memory {
                UsedGpuMemory::Used(bytes) => Some(bytes),
                UsedGpuMemory::Unavailable => None,
            },
            kind,
            gpu_instance_id: p.gpu_instance_id,
            compute_instance_id: p.compute_instance_id,
            utilization: None,
            // /proc entries are named by PIDs in the namespace of the /proc mount: NVML's.
            host: if self.host_info && pid.is_some() {
                self.proc.process(p.pid)
            } else {
                None
            },
        }
    }

    /// Which GPUs `pid` (in our PID namespace) uses, and how much memory; with
    /// `include_descendants`, counting its children, their children and so on.
    ///
    /// # Errors
    /// When NVML cannot count the devices.
    pub fn usage_of(&self, pid: u32, include_descendants: bool) -> Result<ProcessUsage, GpuError> {
        self.usage(pid, include_descendants, false)
    }

    /// [`usage_of`](Gpus::usage_of) with what accounting needs besides memory: on each
    /// device the processes use, their SM utilisation together
    /// ([`DeviceUsage::sm_percent`], from the same per-process samples and timestamp
    /// handling as [`snapshot`](Gpus::snapshot), whose cache it shares) and the device's
    /// energy counter ([`DeviceUsage::total_energy_mj`]). [`GpuAccountant`](super::GpuAccountant)
    /// turns a series of these into a [`GpuAccounting`](super::GpuAccounting).
    ///
    /// # Errors
    /// When NVML cannot count the devices.
    pub fn usage_detailed(
        &self,
        pid: u32,
        include_descendants: bool,
    ) -> Result<ProcessUsage, GpuError> {
        self.usage(pid, include_descendants, true)
    }

    fn usage(
        &self,
        pid: u32,
        include_descendants: bool,
        details: bool,
    ) -> Result<ProcessUsage, GpuError> {
        let pids = if include_descendants {
            self.proc.with_descendants(pid)
        } else {
            vec![pid]
        };
        let mapper = self.proc.pid_mapper();
        let mut usage = ProcessUsage {
            pid,
            pids: pids.clone(),
            devices: Vec::new(),
        };
        for index in 0..self.device_count()? {
            let Ok(handle) = self.nvml.device_by_index(index) else {
                continue;
            };
            let mut on_device = DeviceUsage {
                index,
                uuid: None,
                used_memory: 0,
                pids: Vec::new(),
                other_processes: 0,
                sm_percent: None,
                total_energy_mj: None,
            };
            // NVML's pids of the counted processes here, for their utilisation samples.
            let mut nvml_pids = Vec::new();
            let lists = [
                entry::running_processes(&self.entries, &handle, ListKind::Compute),
                entry::running_processes(&self.entries, &handle, ListKind::Graphics),
            ];
            let mut seen = std::collections::HashSet::new();
            let mut others = std::collections::HashSet::new();
            for p in lists.into_iter().flat_map(Result::unwrap_or_default) {
                let Some(ours) = mapper.map(p.pid).filter(|q| pids.contains(q)) else {
                    others.insert(p.pid);
                    continue;
                };
                // A process with both contexts is listed twice with the same memory.
                if !seen.insert((p.pid, p.gpu_instance_id, p.compute_instance_id)) {
                    continue;
                }
                if let UsedGpuMemory::Used(bytes) = p.used_gpu_memory {
                    on_device.used_memory = on_device.used_memory.saturating_add(bytes);
                }
                if !on_device.pids.contains(&ours) {
                    on_device.pids.push(ours);
                    nvml_pids.push(p.pid);
                }
            }
            if !on_device.pids.is_empty() {
                on_device.uuid = opt(handle.uuid());
                on_device.other_processes = others.len();
                if details {
                    on_device.sm_percent = self.sm_of(index, &handle, &nvml_pids);
                    on_device.total_energy_mj = opt(handle.total_energy_consumption());
                }
                usage.devices.push(on_device);
            }
        }
        Ok(usage)
    }

    /// The SM utilisation of the processes `nvml_pids` on device `index` together, from the
    /// per-process samples cache: a process without a sample counts as 0 (the driver lists
    /// only processes that used the device in the interval); `None` where the device has
    /// no per-process figures, or every counted sample was over 100%.
    fn sm_of(&self, index: u32, handle: &NvDevice<'_>, nvml_pids: &[u32]) -> Option<u32> {
        let mut caches = self
            .utilization
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let samples = caches.entry(index).or_default().update(handle).ok()?;
        let mut total = 0u32;
        let mut known = false;
        for pid in nvml_pids {
            match samples.get(pid) {
                None => known = true,
                Some(u) => {
                    if let Some(sm) = u.sm {
                        total = total.saturating_add(sm);
                        known = true;
                    }
                }
            }
        }
        known.then_some(total.min(100))
    }

    /// The devices this process may use according to `CUDA_VISIBLE_DEVICES` and
    /// `CUDA_DEVICE_ORDER`, in CUDA's numbering, with live figures (no processes).
    ///
    /// # Errors
    /// When NVML cannot count the devices.
    pub fn visible(&self) -> Result<VisibleDevices, GpuError> {
        let env = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        let order = CudaDeviceOrder::parse(std::env::var("CUDA_DEVICE_ORDER").ok().as_deref());
        let slurm = super::visible::slurm_gpus_from_env();
        self.visible_in_slurm(env.as_deref(), slurm.as_deref(), order)
    }

    /// As [`visible`](Gpus::visible), for a given `CUDA_VISIBLE_DEVICES` value (`None`:
    /// unset) and order.
    ///
    /// # Errors
    /// When NVML cannot count the devices.
    pub fn visible_for(
        &self,
        cuda_visible_devices: Option<&str>,
        order: CudaDeviceOrder,
    ) -> Result<VisibleDevices, GpuError> {
        self.visible_in_slurm(cuda_visible_devices, None, order)
    }

    /// As [`visible_for`](Gpus::visible_for), inside a Slurm job that bound the GPUs `slurm`
    /// (the node's numbers, as `SLURM_STEP_GPUS` lists them; `None` outside one): see
    /// [`slurm_visible_devices`](super::slurm_visible_devices) for how Slurm's renumbering
    /// is read. [`visible`](Gpus::visible) takes `slurm` from the environment.
    ///
    /// # Errors
    /// When NVML cannot count the devices.
    pub fn visible_in_slurm(
        &self,
        cuda_visible_devices: Option<&str>,
        slurm: Option<&[u32]>,
        order: CudaDeviceOrder,
    ) -> Result<VisibleDevices, GpuError> {
        let devices = self.devices(false)?;
        let selectors = cuda_visible_devices.map(parse_cuda_visible_devices);
        let resolved = slurm_visible_devices(selectors.as_deref(), slurm, order, &devices);
        Ok(VisibleDevices {
            hostname: hostname(),
            cuda_visible_devices: cuda_visible_devices.map(str::to_string),
            order,
            order_is_exact: order_is_exact(order, &devices),
            devices: resolved
                .into_iter()
                .map(|r| {
                    let device = devices[r.device].clone();
                    VisibleDevice {
                        cuda_index: r.cuda_index,
                        mig: r.mig.and_then(|m| {
                            device
                                .mig
                                .as_ref()
                                .and_then(|g| g.instances.get(m).cloned())
                        }),
                        device,
                    }
                })
                .collect(),
        })
    }
}

/// The devices a process may use, as CUDA numbers them.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VisibleDevices {
    /// The node these devices are on (its host name): with workers on several machines
    /// (see [`Launcher`](crate::Launcher)), which machine's GPUs these are.
    #[serde(default)]
    pub hostname: String,
    /// The `CUDA_VISIBLE_DEVICES` value used; `None` when unset (every device is visible).
    pub cuda_visible_devices: Option<String>,
    /// The `CUDA_DEVICE_ORDER` used.
    pub order: CudaDeviceOrder,
    /// Whether CUDA's numbering is certainly the one given: `false` when the order is
    /// `FASTEST_FIRST` (CUDA's default) and the devices are not all the same model, since
    /// CUDA then ranks them by a speed heuristic while NVML (and gpuproc) use PCI bus order.
    /// Set `CUDA_DEVICE_ORDER=PCI_BUS_ID` to make the two agree.
    pub order_is_exact: bool,
    /// The visible devices, CUDA ordinal 0 first.
    pub devices: Vec<VisibleDevice>,
}

/// A device visible to CUDA.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VisibleDevice {
    /// The CUDA ordinal this process sees.
    pub cuda_index: u32,
    /// The physical device (for a MIG device, its parent).
    pub device: Device,
    /// The MIG device, when a `MIG-` id selected it.
    pub mig: Option<MigInstance>,
}

fn pstate(p: PerformanceState) -> Option<u32> {
    use PerformanceState::*;
    Some(match p {
        Zero => 0,
        One => 1,
        Two => 2,
        Three => 3,
        Four => 4,
        Five => 5,
        Six => 6,
        Seven => 7,
        Eight => 8,
        Nine => 9,
        Ten => 10,
        Eleven => 11,
        Twelve => 12,
        Thirteen => 13,
        Fourteen => 14,
        Fifteen => 15,
        Unknown => return None,
    })
}

fn ecc(handle: &NvDevice<'_>) -> Option<EccErrors> {
    let count = |e, c| opt(handle.total_ecc_errors(e, c));
    let ecc = EccErrors {
        volatile_corrected: count(MemoryError::Corrected, EccCounter::Volatile),
        volatile_uncorrected: count(MemoryError::Uncorrected, EccCounter::Volatile),
        aggregate_corrected: count(MemoryError::Corrected, EccCounter::Aggregate),
        aggregate_uncorrected: count(MemoryError::Uncorrected, EccCounter::Aggregate),
    };
    (ecc != EccErrors::default()).then_some(ecc)
}

/// GPU and compute instance ids of a MIG device; nvml-wrapper has no safe call for them.
fn instance_ids(nvml: &Nvml, device: &NvDevice<'_>) -> (Option<u32>, Option<u32>) {
    let lib = nvml.lib();
    macro_rules! read_id {
        ($symbol:ident) => {
            lib.$symbol.as_ref().ok().and_then(|f| {
                let mut id = 0;
                // SAFETY: `device` is a live handle of this NVML instance, and the function
                // writes one unsigned int through the pointer, which points at a local.
                let rc = unsafe { f(device.handle(), &mut id) };
                (rc == 0).then_some(id)
            })
        };
    }
    (
        read_id!(nvmlDeviceGetGpuInstanceId),
        read_id!(nvmlDeviceGetComputeInstanceId),
    )
}

fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}
