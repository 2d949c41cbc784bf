//! The data classes Python sees: one frozen class per `gpuproc::gpu` type, with read-only
//! attributes, a constructor taking the fields (as a dataclass), pickling, `to_dict()` (the
//! same keys and values as `gpuproc gpus --json`), a readable `repr` and `==`.
//!
//! Enums (compute mode, process kind, error kind, device order) are the strings the JSON
//! uses (`"default"`, `"compute"`, `"gpu_lost"`, `"fastest_first"`).

use gpuproc::gpu;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use pyo3::PyClass;

/// A value as plain Python data: numbers, strings, `None`, lists and dicts.
pub trait Plain {
    /// The value as plain data.
    fn plain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>>;
}

macro_rules! plain_scalar {
    ($($ty:ty),*) => {
        $(impl Plain for $ty {
            fn plain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
                pyo3::IntoPyObjectExt::into_bound_py_any(self.clone(), py)
            }
        })*
    };
}
plain_scalar!(u32, u64, f64, bool, String);

impl<T: Plain> Plain for Option<T> {
    fn plain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match self {
            Some(v) => v.plain(py),
            None => Ok(py.None().into_bound(py)),
        }
    }
}

impl<T: Plain> Plain for Vec<T> {
    fn plain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let items = self
            .iter()
            .map(|v| v.plain(py))
            .collect::<PyResult<Vec<_>>>()?;
        Ok(PyList::new(py, items)?.into_any())
    }
}

/// Nested details held as plain Python data (dicts and lists, as `gpuproc gpus --json`
/// writes them): copied, so that a dict from `to_dict` never aliases the record's own.
impl Plain for Py<PyAny> {
    fn plain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        py.import("copy")?
            .call_method1("deepcopy", (self.bind(py),))
    }
}

/// `value` as plain Python data, as the JSON output has it (None for None).
fn details<T: serde::Serialize>(py: Python<'_>, value: Option<&T>) -> PyResult<Option<Py<PyAny>>> {
    let Some(value) = value else { return Ok(None) };
    let json = serde_json::to_string(value)
        .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
    Ok(Some(
        py.import("json")?.call_method1("loads", (json,))?.unbind(),
    ))
}

/// A data class: its fields as a dict.
pub trait Record: PyClass<Frozen = pyo3::pyclass::boolean_struct::True> + Sync {
    /// The fields as a dict, nested records as dicts.
    fn dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>>;
}

impl<R: Record> Plain for Py<R> {
    fn plain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(self.get().dict(py)?.into_any())
    }
}

/// Declares a frozen data class with `to_dict`, `__repr__` and `__eq__`.
macro_rules! record {
    (
        $(#[$doc:meta])*
        $name:ident {
            $( $(#[$fdoc:meta])* $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$doc])*
        #[pyclass(frozen, get_all, module = "gpuproc")]
        #[derive(Debug)]
        pub struct $name {
            $( $(#[$fdoc])* pub $field: $ty, )*
        }

        impl Record for $name {
            fn dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
                let d = PyDict::new(py);
                $( d.set_item(stringify!($field), Plain::plain(&self.$field, py)?)?; )*
                Ok(d)
            }
        }

        #[pymethods]
        impl $name {
            /// Builds one from its fields (by position or by name), as a dataclass.
            #[new]
            #[pyo3(signature = ($($field),*))]
            #[allow(clippy::too_many_arguments)]
            fn new($($field: $ty),*) -> Self {
                $name { $($field),* }
            }

            /// Pickles as the class and its fields, so records travel between processes
            /// (a pool worker's snapshot back to its parent).
            fn __reduce__<'py>(
                slf: &Bound<'py, Self>,
            ) -> PyResult<(Bound<'py, pyo3::types::PyType>, Bound<'py, pyo3::types::PyTuple>)> {
                let fields = vec![$(slf.getattr(stringify!($field))?),*];
                Ok((slf.get_type(), pyo3::types::PyTuple::new(slf.py(), fields)?))
            }

            /// The fields as a dict, nested objects as dicts and lists: plain data, ready
            /// for `json.dumps`.
            fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
                self.dict(py)
            }

            fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
                let mut parts: Vec<String> = Vec::new();
                $(
                    let value = slf.getattr(stringify!($field))?;
                    parts.push(format!(
                        "{}={}",
                        stringify!($field),
                        value.repr()?.to_string_lossy()
                    ));
                )*
                Ok(format!("{}({})", stringify!($name), parts.join(", ")))
            }

            fn __eq__(&self, other: &Bound<'_, PyAny>) -> PyResult<bool> {
                match other.cast::<$name>() {
                    Ok(other) => self.dict(other.py())?.eq(other.get().dict(other.py())?),
                    Err(_) => Ok(false),
                }
            }
        }
    };
}

/// The string serde gives a unit enum variant (what the JSON output says).
fn tag<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

record! {
    /// Every GPU on this machine at one moment, with the processes using them.
    Snapshot {
        /// The machine's host name.
        hostname: String,
        /// When the snapshot was taken, milliseconds since the Unix epoch.
        timestamp_ms: u64,
        /// The driver version, such as "550.54.15".
        driver_version: Option<String>,
        /// The newest CUDA version the driver supports.
        cuda_driver_version: Option<Py<CudaVersion>>,
        /// The NVML library version, such as "12.550.54.15".
        nvml_version: Option<String>,
        /// The devices in NVML order (PCI bus order, as nvidia-smi numbers them).
        devices: Vec<Py<Device>>,
    }
}

record! {
    /// A CUDA version such as 12.4.
    CudaVersion {
        /// Major version.
        major: u32,
        /// Minor version.
        minor: u32,
    }
}

record! {
    /// One physical GPU. Fields the device does not support are None; sizes are bytes,
    /// power milliwatts, clocks MHz, temperatures degrees Celsius, utilization percent.
    Device {
        /// NVML's index (PCI bus order; see `visible()` for CUDA's order).
        index: u32,
        /// Product name, such as "NVIDIA H100 80GB HBM3".
        name: Option<String>,
        /// The device's UUID, "GPU-" followed by 36 characters.
        uuid: Option<String>,
        /// PCI bus id, such as "00000000:17:00.0".
        pci_bus_id: Option<String>,
        /// Frame-buffer memory.
        memory: Option<Py<Memory>>,
        /// Utilization over the driver's last sample period.
        utilization: Option<Py<Utilization>>,
        /// GPU die temperature, degrees Celsius.
        temperature_c: Option<u32>,
        /// Power draw, milliwatts.
        power_draw_mw: Option<u32>,
        /// Enforced power limit, milliwatts.
        power_limit_mw: Option<u32>,
        /// Speed of the first fan, percent of its maximum.
        fan_speed_percent: Option<u32>,
        /// Current and maximum clocks.
        clocks: Py<Clocks>,
        /// Performance state: 0 (P0, fastest) to 15 (P15, slowest).
        performance_state: Option<u32>,
        /// Who may create contexts: "default", "exclusive_thread", "prohibited" or
        /// "exclusive_process".
        compute_mode: Option<String>,
        /// MIG mode and instances; None where the device has no MIG support.
        mig: Option<Py<Mig>>,
        /// ECC error counts; None where ECC is unsupported or off.
        ecc_errors: Option<Py<EccErrors>>,
        /// Video encoder utilization, percent.
        encoder_utilization: Option<u32>,
        /// Video decoder utilization, percent.
        decoder_utilization: Option<u32>,
        /// PCIe link (generation and width, current and max) and throughput, as a dict.
        pcie: Option<Py<PyAny>>,
        /// NVLink links' states and traffic, as a dict.
        nvlink: Option<Py<PyAny>>,
        /// BAR1 memory (the window the host maps device memory through).
        bar1_memory: Option<Py<Memory>>,
        /// Why clocks are held down (throttle reasons), as a dict.
        clock_event_reasons: Option<Py<PyAny>>,
        /// Pages retired after ECC errors, as a dict.
        retired_pages: Option<Py<PyAny>>,
        /// Rows remapped after ECC errors, as a dict.
        remapped_rows: Option<Py<PyAny>>,
        /// Energy used since the driver loaded, millijoules.
        total_energy_mj: Option<u64>,
        /// Processes using the device; None where the driver does not say.
        processes: Option<Vec<Py<GpuProcess>>>,
        /// Set when the device could not be read (lost, permission denied).
        error: Option<Py<DeviceFault>>,
        /// The device node's minor number, N in /dev/nvidiaN (Slurm's number for the GPU).
        minor_number: Option<u32>,
    }
}

record! {
    /// Why a device in a snapshot could not be read.
    DeviceFault {
        /// The kind of failure, such as "gpu_lost" or "permission_denied".
        kind: String,
        /// One sentence describing it.
        message: String,
    }
}

record! {
    /// Frame-buffer memory, bytes.
    Memory {
        /// Installed memory.
        total: u64,
        /// Allocated memory.
        used: u64,
        /// Unallocated memory.
        free: u64,
    }
}

record! {
    /// Utilization in percent over the driver's sample period.
    Utilization {
        /// Percent of time a kernel was running.
        gpu: u32,
        /// Percent of time memory was being read or written.
        memory: u32,
    }
}

record! {
    /// Clock speeds in MHz.
    Clocks {
        /// Current graphics clock.
        graphics_mhz: Option<u32>,
        /// Current SM clock.
        sm_mhz: Option<u32>,
        /// Current memory clock.
        memory_mhz: Option<u32>,
        /// Maximum graphics clock.
        max_graphics_mhz: Option<u32>,
        /// Maximum memory clock.
        max_memory_mhz: Option<u32>,
    }
}

record! {
    /// MIG (multi-instance GPU) state of a device.
    Mig {
        /// MIG mode is on now.
        enabled: bool,
        /// MIG mode after the next reset.
        pending: bool,
        /// The MIG devices carved out of this GPU.
        instances: Vec<Py<MigInstance>>,
    }
}

record! {
    /// One MIG device.
    MigInstance {
        /// Index among the parent's MIG devices.
        index: u32,
        /// The MIG device's UUID ("MIG-..."), as CUDA_VISIBLE_DEVICES accepts it.
        uuid: Option<String>,
        /// Name, such as "NVIDIA A100-SXM4-40GB MIG 1g.5gb".
        name: Option<String>,
        /// GPU instance id.
        gpu_instance_id: Option<u32>,
        /// Compute instance id.
        compute_instance_id: Option<u32>,
        /// The instance's memory.
        memory: Option<Py<Memory>>,
    }
}

record! {
    /// ECC error counts (memory errors, all locations).
    EccErrors {
        /// Corrected errors since the driver loaded.
        volatile_corrected: Option<u64>,
        /// Uncorrected errors since the driver loaded.
        volatile_uncorrected: Option<u64>,
        /// Corrected errors over the device's lifetime.
        aggregate_corrected: Option<u64>,
        /// Uncorrected errors over the device's lifetime.
        aggregate_uncorrected: Option<u64>,
    }
}

record! {
    /// A process with a context on a device.
    GpuProcess {
        /// The PID in this process's PID namespace, when the process is visible from here.
        pid: Option<u32>,
        /// The PID as NVML reports it (the driver's PID namespace, usually the host's).
        nvml_pid: u32,
        /// GPU memory the process uses, bytes; None where the driver does not say.
        used_memory: Option<u64>,
        /// "compute", "graphics" or "compute_and_graphics".
        kind: String,
        /// The MIG GPU instance the process runs on.
        gpu_instance_id: Option<u32>,
        /// The MIG compute instance the process runs on.
        compute_instance_id: Option<u32>,
        /// What /proc says about the process; None when it is not visible from here.
        host: Option<Py<HostProcess>>,
        /// Its share of the GPU's SM, memory bandwidth, encoder and decoder in the last
        /// sample interval, as a dict; None without samples.
        utilization: Option<Py<PyAny>>,
    }
}

record! {
    /// A process as /proc describes it.
    HostProcess {
        /// Real user id.
        uid: Option<u32>,
        /// User name, from /etc/passwd.
        user: Option<String>,
        /// Short command name (/proc/PID/comm).
        name: String,
        /// Command line, one string per argument.
        cmdline: Vec<String>,
        /// CPU use in percent of one core.
        cpu_percent: Option<f64>,
        /// Resident set size, bytes.
        rss_bytes: Option<u64>,
        /// The parent's process id.
        ppid: Option<u32>,
        /// When it started, milliseconds since the Unix epoch.
        started_ms: Option<u64>,
    }
}

record! {
    /// How much GPU memory one process (and possibly its descendants) uses, per device.
    ProcessUsage {
        /// The process asked about.
        pid: u32,
        /// The processes counted: pid, then its descendants when they were included.
        pids: Vec<u32>,
        /// The devices on which any of those processes has a context.
        devices: Vec<Py<DeviceUsage>>,
        /// GPU memory used on all devices together, bytes.
        total_memory: u64,
    }
}

record! {
    /// One device's share of a ProcessUsage.
    DeviceUsage {
        /// NVML index of the device.
        index: u32,
        /// UUID of the device.
        uuid: Option<String>,
        /// Memory used there by the counted processes, bytes (unknown amounts count as 0).
        used_memory: u64,
        /// Which of the counted processes use the device.
        pids: Vec<u32>,
    }
}

record! {
    /// The devices this process may use, as CUDA numbers them.
    VisibleDevices {
        /// The node these devices are on (its host name).
        hostname: String,
        /// The CUDA_VISIBLE_DEVICES value used; None when unset (every device is visible).
        cuda_visible_devices: Option<String>,
        /// The CUDA_DEVICE_ORDER used: "fastest_first" or "pci_bus_id".
        order: String,
        /// Whether CUDA's numbering is certainly the one given (False when the order is
        /// FASTEST_FIRST and the GPUs are not all the same model).
        order_is_exact: bool,
        /// The visible devices, CUDA ordinal 0 first.
        devices: Vec<Py<VisibleDevice>>,
    }
}

record! {
    /// A device visible to CUDA.
    VisibleDevice {
        /// The CUDA ordinal this process sees (cuda:N).
        cuda_index: u32,
        /// The physical device (for a MIG device, its parent).
        device: Py<Device>,
        /// The MIG device, when a MIG- id selected it.
        mig: Option<Py<MigInstance>>,
    }
}

record! {
    /// A GPU handed out by a pick.
    PickedDevice {
        /// NVML index (PCI bus order, as nvidia-smi numbers it).
        index: u32,
        /// The full UUID, "GPU-...": what CUDA_VISIBLE_DEVICES names.
        uuid: String,
        /// Product name.
        name: Option<String>,
    }
}

record! {
    /// What one device looked like to a pick that failed (NoneFree.reasons).
    Verdict {
        /// NVML index.
        index: u32,
        /// UUID, when known.
        uuid: Option<String>,
        /// Why it did not qualify, in words; None when it did (too few others did).
        reason: Option<String>,
        /// The kind of reason, such as "low_memory", "busy", "leased", "foreign_processes",
        /// "not_visible"; None when it qualified.
        kind: Option<String>,
        /// Whether waiting cannot change the reason.
        permanent: bool,
    }
}

record! {
    /// A lease in the machine's lease table (see `leases()`).
    LeaseInfo {
        /// The lease's id.
        id: String,
        /// The PIDs holding it; it lasts while any of them runs.
        holders: Vec<u32>,
        /// How many leases each of its GPUs may have at once.
        max_per_gpu: u32,
        /// When it was taken, milliseconds since the Unix epoch.
        created_ms: u64,
        /// Its GPUs.
        devices: Vec<Py<PickedDevice>>,
    }
}

fn opt<T, U>(py: Python<'_>, v: Option<&T>, f: impl Fn(&T) -> U) -> PyResult<Option<Py<U>>>
where
    U: PyClass + Into<pyo3::PyClassInitializer<U>>,
{
    v.map(|v| Py::new(py, f(v))).transpose()
}

fn memory(m: &gpu::Memory) -> Memory {
    Memory {
        total: m.total,
        used: m.used,
        free: m.free,
    }
}

fn mig_instance(py: Python<'_>, m: &gpu::MigInstance) -> PyResult<MigInstance> {
    Ok(MigInstance {
        index: m.index,
        uuid: m.uuid.clone(),
        name: m.name.clone(),
        gpu_instance_id: m.gpu_instance_id,
        compute_instance_id: m.compute_instance_id,
        memory: opt(py, m.memory.as_ref(), memory)?,
    })
}

fn process(py: Python<'_>, p: &gpu::GpuProcess) -> PyResult<GpuProcess> {
    Ok(GpuProcess {
        pid: p.pid,
        nvml_pid: p.nvml_pid,
        used_memory: p.used_memory,
        kind: tag(&p.kind),
        gpu_instance_id: p.gpu_instance_id,
        compute_instance_id: p.compute_instance_id,
        host: opt(py, p.host.as_ref(), |h| HostProcess {
            uid: h.uid,
            user: h.user.clone(),
            name: h.name.clone(),
            cmdline: h.cmdline.clone(),
            cpu_percent: h.cpu_percent,
            rss_bytes: h.rss_bytes,
            ppid: h.ppid,
            started_ms: h.started_ms,
        })?,
        utilization: details(py, p.utilization.as_ref())?,
    })
}

/// A device as Python sees it.
pub fn device(py: Python<'_>, d: &gpu::Device) -> PyResult<Py<Device>> {
    let mig = match &d.mig {
        Some(m) => Some(Py::new(
            py,
            Mig {
                enabled: m.enabled,
                pending: m.pending,
                instances: m
                    .instances
                    .iter()
                    .map(|i| Py::new(py, mig_instance(py, i)?))
                    .collect::<PyResult<_>>()?,
            },
        )?),
        None => None,
    };
    let processes = match &d.processes {
        Some(list) => Some(
            list.iter()
                .map(|p| Py::new(py, process(py, p)?))
                .collect::<PyResult<Vec<_>>>()?,
        ),
        None => None,
    };
    let c = &d.clocks;
    Py::new(
        py,
        Device {
            index: d.index,
            name: d.name.clone(),
            uuid: d.uuid.clone(),
            pci_bus_id: d.pci_bus_id.clone(),
            memory: opt(py, d.memory.as_ref(), memory)?,
            utilization: opt(py, d.utilization.as_ref(), |u| Utilization {
                gpu: u.gpu,
                memory: u.memory,
            })?,
            temperature_c: d.temperature_c,
            power_draw_mw: d.power_draw_mw,
            power_limit_mw: d.power_limit_mw,
            fan_speed_percent: d.fan_speed_percent,
            clocks: Py::new(
                py,
                Clocks {
                    graphics_mhz: c.graphics_mhz,
                    sm_mhz: c.sm_mhz,
                    memory_mhz: c.memory_mhz,
                    max_graphics_mhz: c.max_graphics_mhz,
                    max_memory_mhz: c.max_memory_mhz,
                },
            )?,
            performance_state: d.performance_state,
            compute_mode: d.compute_mode.as_ref().map(tag),
            mig,
            ecc_errors: opt(py, d.ecc_errors.as_ref(), |e| EccErrors {
                volatile_corrected: e.volatile_corrected,
                volatile_uncorrected: e.volatile_uncorrected,
                aggregate_corrected: e.aggregate_corrected,
                aggregate_uncorrected: e.aggregate_uncorrected,
            })?,
            encoder_utilization: d.encoder_utilization,
            decoder_utilization: d.decoder_utilization,
            pcie: details(py, d.pcie.as_ref())?,
            nvlink: details(py, d.nvlink.as_ref())?,
            bar1_memory: opt(py, d.bar1_memory.as_ref(), memory)?,
            clock_event_reasons: details(py, d.clock_event_reasons.as_ref())?,
            retired_pages: details(py, d.retired_pages.as_ref())?,
            remapped_rows: details(py, d.remapped_rows.as_ref())?,
            total_energy_mj: d.total_energy_mj,
            processes,
            error: opt(py, d.error.as_ref(), |f| DeviceFault {
                kind: tag(&f.kind),
                message: f.message.clone(),
            })?,
            minor_number: d.minor_number,
        },
    )
}

/// A snapshot as Python sees it.
pub fn snapshot(py: Python<'_>, s: &gpu::Snapshot) -> PyResult<Snapshot> {
    Ok(Snapshot {
        hostname: s.hostname.clone(),
        timestamp_ms: s.timestamp_ms,
        driver_version: s.driver_version.clone(),
        cuda_driver_version: opt(py, s.cuda_driver_version.as_ref(), |v| CudaVersion {
            major: v.major,
            minor: v.minor,
        })?,
        nvml_version: s.nvml_version.clone(),
        devices: s
            .devices
            .iter()
            .map(|d| device(py, d))
            .collect::<PyResult<_>>()?,
    })
}

/// A process's usage as Python sees it.
pub fn usage(py: Python<'_>, u: &gpu::ProcessUsage) -> PyResult<ProcessUsage> {
    Ok(ProcessUsage {
        pid: u.pid,
        pids: u.pids.clone(),
        total_memory: u.total_memory(),
        devices: u
            .devices
            .iter()
            .map(|d| {
                Py::new(
                    py,
                    DeviceUsage {
                        index: d.index,
                        uuid: d.uuid.clone(),
                        used_memory: d.used_memory,
                        pids: d.pids.clone(),
                    },
                )
            })
            .collect::<PyResult<_>>()?,
    })
}

/// The visible devices as Python sees them.
pub fn visible(py: Python<'_>, v: &gpu::VisibleDevices) -> PyResult<VisibleDevices> {
    Ok(VisibleDevices {
        hostname: v.hostname.clone(),
        cuda_visible_devices: v.cuda_visible_devices.clone(),
        order: tag(&v.order),
        order_is_exact: v.order_is_exact,
        devices: v
            .devices
            .iter()
            .map(|d| {
                Py::new(
                    py,
                    VisibleDevice {
                        cuda_index: d.cuda_index,
                        device: device(py, &d.device)?,
                        mig: d
                            .mig
                            .as_ref()
                            .map(|m| Py::new(py, mig_instance(py, m)?))
                            .transpose()?,
                    },
                )
            })
            .collect::<PyResult<_>>()?,
    })
}

/// A picked device as Python sees it.
pub fn picked(py: Python<'_>, d: &gpu::PickedDevice) -> PyResult<Py<PickedDevice>> {
    Py::new(
        py,
        PickedDevice {
            index: d.index,
            uuid: d.uuid.clone(),
            name: d.name.clone(),
        },
    )
}

/// One device's verdict as Python sees it.
pub fn verdict(py: Python<'_>, v: &gpu::Verdict) -> PyResult<Py<Verdict>> {
    let kind = v.rejection.as_ref().and_then(|r| {
        serde_json::to_value(r)
            .ok()
            .and_then(|j| j.get("reason").and_then(|k| k.as_str().map(str::to_owned)))
    });
    Py::new(
        py,
        Verdict {
            index: v.index,
            uuid: v.uuid.clone(),
            reason: v.rejection.as_ref().map(ToString::to_string),
            kind,
            permanent: v
                .rejection
                .as_ref()
                .is_some_and(gpu::Rejection::is_permanent),
        },
    )
}

/// A lease record as Python sees it.
pub fn lease_info(py: Python<'_>, r: &gpu::LeaseRecord) -> PyResult<LeaseInfo> {
    Ok(LeaseInfo {
        id: r.id.clone(),
        holders: r.holders.iter().map(|h| h.pid).collect(),
        max_per_gpu: r.max_per_gpu,
        created_ms: r.created_ms,
        devices: r
            .devices
            .iter()
            .map(|d| picked(py, d))
            .collect::<PyResult<_>>()?,
    })
}

/// Registers the classes in the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Snapshot>()?;
    m.add_class::<CudaVersion>()?;
    m.add_class::<Device>()?;
    m.add_class::<DeviceFault>()?;
    m.add_class::<Memory>()?;
    m.add_class::<Utilization>()?;
    m.add_class::<Clocks>()?;
    m.add_class::<Mig>()?;
    m.add_class::<MigInstance>()?;
    m.add_class::<EccErrors>()?;
    m.add_class::<GpuProcess>()?;
    m.add_class::<HostProcess>()?;
    m.add_class::<ProcessUsage>()?;
    m.add_class::<DeviceUsage>()?;
    m.add_class::<VisibleDevices>()?;
    m.add_class::<VisibleDevice>()?;
    m.add_class::<PickedDevice>()?;
    m.add_class::<Verdict>()?;
    m.add_class::<LeaseInfo>()?;
    Ok(())
}
