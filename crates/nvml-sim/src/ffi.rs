//! The exported NVML C functions and the C structs they fill.
//!
//! Struct layouts follow nvml.h (as mirrored by nvml-wrapper-sys's bindings). Every export runs
//! its body under `catch_unwind`, so a bug here returns `NVML_ERROR_UNKNOWN` instead of unwinding
//! into C.

#![allow(non_snake_case, non_camel_case_types)]

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::codes::{self, Code};
use crate::scenario::{parse_bus_id, Feature, ProcessKind};
use crate::state::{self, ProcInfo, Sim, Target};

/// `nvmlReturn_t`.
pub type nvmlReturn_t = c_uint;
/// `nvmlDevice_t`: an opaque pointer that callers never dereference.
pub type nvmlDevice_t = *mut c_void;

/// `nvmlMemory_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nvmlMemory_t {
    pub total: c_ulonglong,
    pub free: c_ulonglong,
    pub used: c_ulonglong,
}

/// `nvmlMemory_v2_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nvmlMemory_v2_t {
    pub version: c_uint,
    pub total: c_ulonglong,
    pub reserved: c_ulonglong,
    pub free: c_ulonglong,
    pub used: c_ulonglong,
}

/// `nvmlMemory_v2` = `NVML_STRUCT_VERSION(Memory, 2)`.
pub const NVML_MEMORY_V2: c_uint = std::mem::size_of::<nvmlMemory_v2_t>() as c_uint | 2 << 24;

/// `nvmlProcessInfo_v1_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nvmlProcessInfo_v1_t {
    pub pid: c_uint,
    pub usedGpuMemory: c_ulonglong,
}

/// `nvmlProcessInfo_v2_t`, also the layout of `nvmlProcessInfo_t` used by the `_v3` queries.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nvmlProcessInfo_v2_t {
    pub pid: c_uint,
    pub usedGpuMemory: c_ulonglong,
    pub gpuInstanceId: c_uint,
    pub computeInstanceId: c_uint,
}

/// `nvmlPciInfo_t` (the `_v3` layout, with the 32-byte `busId`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nvmlPciInfo_t {
    pub busIdLegacy: [c_char; 16],
    pub domain: c_uint,
    pub bus: c_uint,
    pub device: c_uint,
    pub pciDeviceId: c_uint,
    pub pciSubSystemId: c_uint,
    pub busId: [c_char; 32],
}

/// The part of `nvmlPciInfo_t` that the v1 and v2 layouts share with v3; the old functions write
/// only this prefix, so callers built against an old header never see a write past their struct.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nvmlPciInfoPrefix_t {
    pub busIdLegacy: [c_char; 16],
    pub domain: c_uint,
    pub bus: c_uint,
    pub device: c_uint,
    pub pciDeviceId: c_uint,
    pub pciSubSystemId: c_uint,
}

/// `nvmlUtilization_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nvmlUtilization_t {
    pub gpu: c_uint,
    pub memory: c_uint,
}

type R = Result<(), Code>;

fn guard(f: impl FnOnce() -> R) -> nvmlReturn_t {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => codes::SUCCESS.0,
        Ok(Err(code)) => code.0,
        Err(_) => codes::UNKNOWN.0,
    }
}

/// Writes `value` through `ptr`.
///
/// # Safety
/// `ptr` must be null or valid for a write of `T` (alignment is not required).
unsafe fn put<T>(ptr: *mut T, value: T) -> R {
    if ptr.is_null() {
        return Err(codes::INVALID_ARGUMENT);
    }
    // SAFETY: `ptr` is non-null and the caller guarantees it is valid for writes of `T`.
    unsafe { ptr.write_unaligned(value) };
    Ok(())
}

/// Copies `s` and a NUL into `buf`, or reports `NVML_ERROR_INSUFFICIENT_SIZE`.
///
/// # Safety
/// `buf` must be null or valid for writes of `len` bytes.
unsafe fn put_str(buf: *mut c_char, len: c_uint, s: &str) -> R {
    if buf.is_null() {
        return Err(codes::INVALID_ARGUMENT);
    }
    let bytes = s.as_bytes();
    if (len as usize) <= bytes.len() {
        return Err(codes::INSUFFICIENT_SIZE);
    }
    // SAFETY: `buf` is valid for `len` bytes (caller) and we write `bytes.len() + 1 <= len` bytes;
    // a Rust `&str` cannot overlap caller-owned output memory.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), bytes.len());
        buf.add(bytes.len()).write(0);
    }
    Ok(())
}

/// The NVML list protocol: `*count` in = capacity, out = needed or written.
///
/// # Safety
/// `count` must be null or valid for reads and writes of `c_uint`; `out` must be null or valid
/// for writes of `*count` elements.
unsafe fn put_list<T>(count: *mut c_uint, out: *mut T, items: Vec<T>) -> R {
    if count.is_null() {
        return Err(codes::INVALID_ARGUMENT);
    }
    // SAFETY: `count` is non-null and valid for reads (caller).
    let capacity = unsafe { count.read_unaligned() } as usize;
    let needed = c_uint::try_from(items.len()).map_err(|_| codes::UNKNOWN)?;
    // SAFETY: `count` is non-null and valid for writes (caller).
    unsafe { count.write_unaligned(needed) };
    if items.len() > capacity {
        return Err(codes::INSUFFICIENT_SIZE);
    }
    if items.is_empty() {
        return Ok(());
    }
    if out.is_null() {
        return Err(codes::INVALID_ARGUMENT);
    }
    for (i, item) in items.into_iter().enumerate() {
        // SAFETY: `i < items.len() <= capacity`, and `out` is valid for `capacity` elements.
        unsafe { out.add(i).write_unaligned(item) };
    }
    Ok(())
}

/// Reads a caller's C string.
///
/// # Safety
/// `s` must be null or point to a NUL-terminated string.
unsafe fn read_str<'a>(s: *const c_char) -> Result<&'a str, Code> {
    if s.is_null() {
        return Err(codes::INVALID_ARGUMENT);
    }
    // SAFETY: non-null and NUL-terminated (caller); the result is only used during the call.
    let c = unsafe { CStr::from_ptr(s) };
    c.to_str().map_err(|_| codes::INVALID_ARGUMENT)
}

fn handle_ptr(t: Target) -> nvmlDevice_t {
    std::ptr::without_provenance_mut(t.handle())
}

/// A device query: resolve the handle, check lost/injected/unsupported, then run `f`.
/// MIG handles answer only the queries marked `mig_ok`; the rest are `NOT_SUPPORTED` as in NVML.
fn query(
    function: &str,
    device: nvmlDevice_t,
    feature: Option<Feature>,
    mig_ok: bool,
    f: impl FnOnce(&Sim, Target) -> R,
) -> R {
    let sim = state::current()?;
    let t = sim.resolve(device as usize)?;
    sim.check(function, t, feature)?;
    if matches!(t, Target::Mig { .. }) && !mig_ok {
        return Err(codes::NOT_SUPPORTED);
    }
    f(&sim, t)
}

/// A system query: initialised check and injected failures.
fn system(function: &str, f: impl FnOnce(&Sim) -> R) -> R {
    let sim = state::current()?;
    sim.inject(function, None)?;
    f(&sim)
}

/// Defines an exported `extern "C"` function whose body is a closure `|func| -> R`.
macro_rules! export {
    ($(#[doc = $doc:literal])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) |$func:ident| $body:block) => {
        $(#[doc = $doc])*
        ///
        /// # Safety
        /// As in the NVML C API: every pointer argument is null or valid for the reads and
        /// writes that nvml.h documents (buffers for their stated length).
        #[no_mangle]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> nvmlReturn_t {
            guard(|| {
                let $func: &'static str = stringify!($name);
                $body
            })
        }
    };
}

/// Every NVML function this library exports, for scenario validation and tests.
pub const EXPORTED: &[&str] = &[
    "nvmlInit",
    "nvmlInit_v2",
    "nvmlInitWithFlags",
    "nvmlShutdown",
    "nvmlErrorString",
    "nvmlSystemGetDriverVersion",
    "nvmlSystemGetNVMLVersion",
    "nvmlSystemGetCudaDriverVersion",
    "nvmlSystemGetCudaDriverVersion_v2",
    "nvmlSystemGetProcessName",
    "nvmlDeviceGetCount",
    "nvmlDeviceGetCount_v2",
    "nvmlDeviceGetHandleByIndex",
    "nvmlDeviceGetHandleByIndex_v2",
    "nvmlDeviceGetHandleByUUID",
    "nvmlDeviceGetHandleBySerial",
    "nvmlDeviceGetHandleByPciBusId",
    "nvmlDeviceGetHandleByPciBusId_v2",
    "nvmlDeviceGetIndex",
    "nvmlDeviceGetName",
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetSerial",
    "nvmlDeviceGetMinorNumber",
    "nvmlDeviceGetPciInfo",
    "nvmlDeviceGetPciInfo_v2",
    "nvmlDeviceGetPciInfo_v3",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetMemoryInfo_v2",
    "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetEncoderUtilization",
    "nvmlDeviceGetDecoderUtilization",
    "nvmlDeviceGetTemperature",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetEnforcedPowerLimit",
    "nvmlDeviceGetPowerManagementLimit",
    "nvmlDeviceGetFanSpeed",
    "nvmlDeviceGetFanSpeed_v2",
    "nvmlDeviceGetNumFans",
    "nvmlDeviceGetClockInfo",
    "nvmlDeviceGetMaxClockInfo",
    "nvmlDeviceGetPerformanceState",
    "nvmlDeviceGetPowerState",
    "nvmlDeviceGetComputeMode",
    "nvmlDeviceGetPersistenceMode",
    "nvmlDeviceGetDisplayActive",
    "nvmlDeviceGetDisplayMode",
    "nvmlDeviceGetBrand",
    "nvmlDeviceGetCudaComputeCapability",
    "nvmlDeviceGetEccMode",
    "nvmlDeviceGetTotalEccErrors",
    "nvmlDeviceGetMigMode",
    "nvmlDeviceGetMaxMigDeviceCount",
    "nvmlDeviceGetMigDeviceHandleByIndex",
    "nvmlDeviceIsMigDeviceHandle",
    "nvmlDeviceGetGpuInstanceId",
    "nvmlDeviceGetComputeInstanceId",
    "nvmlDeviceGetDeviceHandleFromMigDeviceHandle",
    "nvmlDeviceGetComputeRunningProcesses",
    "nvmlDeviceGetComputeRunningProcesses_v2",
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetGraphicsRunningProcesses",
    "nvmlDeviceGetGraphicsRunningProcesses_v2",
    "nvmlDeviceGetGraphicsRunningProcesses_v3",
    "nvmlDeviceGetMPSComputeRunningProcesses",
    "nvmlDeviceGetMPSComputeRunningProcesses_v2",
    "nvmlDeviceGetMPSComputeRunningProcesses_v3",
    "nvmlSimSetScenario",
];

// ---- init and system ------------------------------------------------------------------------

export! {
    /// `nvmlInit` (v1): same as `nvmlInit_v2`.
    fn nvmlInit() |_f| { state::init() }
}

export! {
    /// Loads the scenario on the first call; nested calls are reference counted.
    fn nvmlInit_v2() |_f| { state::init() }
}

export! {
    /// Flags (`NVML_INIT_FLAG_NO_GPUS`, `NO_ATTACH`) are accepted and change nothing here.
    fn nvmlInitWithFlags(_flags: c_uint) |_f| { state::init() }
}

export! {
    /// Drops one init reference; `NVML_ERROR_UNINITIALIZED` when there is none.
    fn nvmlShutdown() |_f| { state::shutdown() }
}

/// `nvmlErrorString`: a static description of `result`; works without init.
#[no_mangle]
pub extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    catch_unwind(|| Code(result).message().as_ptr()).unwrap_or(c"Unknown Error".as_ptr())
}

export! {
    /// Simulator extension (not NVML): use `spec` (bundled name or scenario path) instead of
    /// `NVML_SIM_SCENARIO` for the next first `nvmlInit`; null restores the variable.
    fn nvmlSimSetScenario(spec: *const c_char) |_f| {
        let spec = if spec.is_null() {
            None
        } else {
            // SAFETY: non-null, and the caller passes a NUL-terminated string.
            Some(unsafe { read_str(spec) }?.to_string())
        };
        state::set_scenario_override(spec);
        Ok(())
    }
}

export! {
    /// The scenario's `driver_version`.
    fn nvmlSystemGetDriverVersion(version: *mut c_char, length: c_uint) |f| {
        // SAFETY: `version` is valid for `length` bytes (export contract).
        system(f, |s| unsafe { put_str(version, length, &s.scenario.driver_version) })
    }
}

export! {
    /// The scenario's `nvml_version`.
    fn nvmlSystemGetNVMLVersion(version: *mut c_char, length: c_uint) |f| {
        // SAFETY: `version` is valid for `length` bytes (export contract).
        system(f, |s| unsafe { put_str(version, length, &s.scenario.nvml_version) })
    }
}

export! {
    /// The scenario's `cuda_driver_version`.
    fn nvmlSystemGetCudaDriverVersion(cudaDriverVersion: *mut c_int) |f| {
        // SAFETY: `cudaDriverVersion` is null or valid (export contract).
        system(f, |s| unsafe { put(cudaDriverVersion, s.scenario.cuda_driver_version) })
    }
}

export! {
    /// The scenario's `cuda_driver_version`.
    fn nvmlSystemGetCudaDriverVersion_v2(cudaDriverVersion: *mut c_int) |f| {
        // SAFETY: `cudaDriverVersion` is null or valid (export contract).
        system(f, |s| unsafe { put(cudaDriverVersion, s.scenario.cuda_driver_version) })
    }
}

export! {
    /// The scenario's process `name`, else `/proc/<pid>/comm`, else `NVML_ERROR_NOT_FOUND`.
    fn nvmlSystemGetProcessName(pid: c_uint, name: *mut c_char, length: c_uint) |f| {
        system(f, |s| {
            let listed = s
                .scenario
                .devices
                .iter()
                .flat_map(|d| d.processes.iter().chain(d.mig.iter().flat_map(|m| &m.processes)))
                .find(|p| p.pid.resolve() == pid)
                .and_then(|p| p.name.clone());
            let text = match listed {
                Some(n) => n,
                None => std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|c| c.trim_end().to_string())
                    .map_err(|_| codes::NOT_FOUND)?,
            };
            // SAFETY: `name` is valid for `length` bytes (export contract).
            unsafe { put_str(name, length, &text) }
        })
    }
}

// ---- enumeration ----------------------------------------------------------------------------

export! {
    /// Number of GPUs in the scenario.
    fn nvmlDeviceGetCount(deviceCount: *mut c_uint) |f| {
        // SAFETY: forwarded caller contract.
        unsafe { count(f, deviceCount) }
    }
}

export! {
    /// Number of GPUs in the scenario.
    fn nvmlDeviceGetCount_v2(deviceCount: *mut c_uint) |f| {
        // SAFETY: forwarded caller contract.
        unsafe { count(f, deviceCount) }
    }
}

/// # Safety
/// `out` must be null or valid for a write.
unsafe fn count(f: &str, out: *mut c_uint) -> R {
    // SAFETY: forwarded caller contract.
    system(f, |s| unsafe {
        put(out, s.scenario.devices.len() as c_uint)
    })
}

export! {
    /// The handle of GPU `index`; lost GPUs still get a handle, their queries fail.
    fn nvmlDeviceGetHandleByIndex(index: c_uint, device: *mut nvmlDevice_t) |f| {
        // SAFETY: forwarded caller contract.
        unsafe { by_index(f, index, device) }
    }
}

export! {
    /// The handle of GPU `index`; lost GPUs still get a handle, their queries fail.
    fn nvmlDeviceGetHandleByIndex_v2(index: c_uint, device: *mut nvmlDevice_t) |f| {
        // SAFETY: forwarded caller contract.
        unsafe { by_index(f, index, device) }
    }
}

/// # Safety
/// `out` must be null or valid for a write.
unsafe fn by_index(f: &str, index: c_uint, out: *mut nvmlDevice_t) -> R {
    system(f, |s| {
        if index as usize >= s.scenario.devices.len() {
            return Err(codes::INVALID_ARGUMENT);
        }
        // SAFETY: forwarded caller contract.
        unsafe { put(out, handle_ptr(Target::Gpu(index as usize))) }
    })
}

export! {
    /// GPU or MIG device by `GPU-...`/`MIG-...` UUID.
    fn nvmlDeviceGetHandleByUUID(uuid: *const c_char, device: *mut nvmlDevice_t) |f| {
        system(f, |s| {
            // SAFETY: `uuid` is null or NUL-terminated (export contract).
            let uuid = unsafe { read_str(uuid) }?;
            let t = s.by_uuid(uuid).ok_or(codes::NOT_FOUND)?;
            // SAFETY: `device` is null or valid (export contract).
            unsafe { put(device, handle_ptr(t)) }
        })
    }
}

export! {
    /// GPU by serial number.
    fn nvmlDeviceGetHandleBySerial(serial: *const c_char, device: *mut nvmlDevice_t) |f| {
        system(f, |s| {
            // SAFETY: `serial` is null or NUL-terminated (export contract).
            let serial = unsafe { read_str(serial) }?;
            let g = s.scenario.devices.iter().position(|d| d.serial == serial).ok_or(codes::NOT_FOUND)?;
            // SAFETY: `device` is null or valid (export contract).
            unsafe { put(device, handle_ptr(Target::Gpu(g))) }
        })
    }
}

export! {
    /// GPU by PCI bus id, in the long or legacy (4-digit domain) form, any case.
    fn nvmlDeviceGetHandleByPciBusId(pciBusId: *const c_char, device: *mut nvmlDevice_t) |f| {
        // SAFETY: forwarded caller contract.
        unsafe { by_bus_id(f, pciBusId, device) }
    }
}

export! {
    /// GPU by PCI bus id, in the long or legacy (4-digit domain) form, any case.
    fn nvmlDeviceGetHandleByPciBusId_v2(pciBusId: *const c_char, device: *mut nvmlDevice_t) |f| {
        // SAFETY: forwarded caller contract.
        unsafe { by_bus_id(f, pciBusId, device) }
    }
}

/// # Safety
/// `bus_id` must be null or NUL-terminated; `out` null or valid for a write.
unsafe fn by_bus_id(f: &str, bus_id: *const c_char, out: *mut nvmlDevice_t) -> R {
    system(f, |s| {
        // SAFETY: forwarded caller contract.
        let wanted = parse_bus_id(unsafe { read_str(bus_id) }?).ok_or(codes::INVALID_ARGUMENT)?;
        let g = s
            .scenario
            .devices
            .iter()
            .position(|d| d.pci_parts() == wanted)
            .ok_or(codes::NOT_FOUND)?;
        // SAFETY: forwarded caller contract.
        unsafe { put(out, handle_ptr(Target::Gpu(g))) }
    })
}

// ---- identity -------------------------------------------------------------------------------

export! {
    /// Enumeration index; `NOT_SUPPORTED` for MIG handles, as in NVML.
    fn nvmlDeviceGetIndex(device: nvmlDevice_t, index: *mut c_uint) |f| {
        // SAFETY: `index` is null or valid (export contract).
        query(f, device, None, false, |_, t| unsafe { put(index, t.gpu() as c_uint) })
    }
}

export! {
    /// The GPU's name, or `<gpu name> MIG <profile>` for a MIG device.
    fn nvmlDeviceGetName(device: nvmlDevice_t, name: *mut c_char, length: c_uint) |f| {
        query(f, device, None, true, |s, t| {
            let d = s.device(t);
            let text = match s.mig(t) {
                Some(m) => m.name.clone().unwrap_or_else(|| format!("{} MIG {}", d.name, m.profile)),
                None => d.name.clone(),
            };
            // SAFETY: `name` is valid for `length` bytes (export contract).
            unsafe { put_str(name, length, &text) }
        })
    }
}

export! {
    /// `GPU-...` or `MIG-...`.
    fn nvmlDeviceGetUUID(device: nvmlDevice_t, uuid: *mut c_char, length: c_uint) |f| {
        query(f, device, None, true, |s, t| {
            let text = s.mig(t).map_or(&s.device(t).uuid, |m| &m.uuid);
            // SAFETY: `uuid` is valid for `length` bytes (export contract).
            unsafe { put_str(uuid, length, text) }
        })
    }
}

export! {
    /// The board serial number.
    fn nvmlDeviceGetSerial(device: nvmlDevice_t, serial: *mut c_char, length: c_uint) |f| {
        query(f, device, Some(Feature::Serial), false, |s, t| {
            // SAFETY: `serial` is valid for `length` bytes (export contract).
            unsafe { put_str(serial, length, &s.device(t).serial) }
        })
    }
}

export! {
    /// `/dev/nvidia<N>` minor number.
    fn nvmlDeviceGetMinorNumber(device: nvmlDevice_t, minorNumber: *mut c_uint) |f| {
        query(f, device, Some(Feature::MinorNumber), false, |s, t| {
            let n = s.device(t).minor_number.unwrap_or(t.gpu() as c_uint);
            // SAFETY: `minorNumber` is null or valid (export contract).
            unsafe { put(minorNumber, n) }
        })
    }
}

fn pci_info(s: &Sim, t: Target) -> nvmlPciInfo_t {
    let d = s.device(t);
    let (domain, bus, dev, func) = d.pci_parts();
    let mut info = nvmlPciInfo_t {
        busIdLegacy: [0; 16],
        domain,
        bus,
        device: dev,
        pciDeviceId: d.pci_device_id,
        pciSubSystemId: d.pci_subsystem_id,
        busId: [0; 32],
    };
    let long = format!("{domain:08X}:{bus:02X}:{dev:02X}.{func:X}");
    let legacy = format!("{:04X}:{bus:02X}:{dev:02X}.{func:X}", domain & 0xffff);
    for (dst, src) in info.busId.iter_mut().zip(long.bytes().take(31)) {
        *dst = src as c_char;
    }
    for (dst, src) in info.busIdLegacy.iter_mut().zip(legacy.bytes().take(15)) {
        *dst = src as c_char;
    }
    info
}

fn pci_prefix(i: nvmlPciInfo_t) -> nvmlPciInfoPrefix_t {
    nvmlPciInfoPrefix_t {
        busIdLegacy: i.busIdLegacy,
        domain: i.domain,
        bus: i.bus,
        device: i.device,
        pciDeviceId: i.pciDeviceId,
        pciSubSystemId: i.pciSubSystemId,
    }
}

export! {
    /// PCI info, v1 layout (the common prefix only).
    fn nvmlDeviceGetPciInfo(device: nvmlDevice_t, pci: *mut nvmlPciInfoPrefix_t) |f| {
        // SAFETY: `pci` is null or valid for the v1 struct, which begins with this prefix.
        query(f, device, Some(Feature::PciInfo), true, |s, t| unsafe { put(pci, pci_prefix(pci_info(s, t))) })
    }
}

export! {
    /// PCI info, v2 layout (the common prefix only).
    fn nvmlDeviceGetPciInfo_v2(device: nvmlDevice_t, pci: *mut nvmlPciInfoPrefix_t) |f| {
        // SAFETY: `pci` is null or valid for the v2 struct, which begins with this prefix.
        query(f, device, Some(Feature::PciInfo), true, |s, t| unsafe { put(pci, pci_prefix(pci_info(s, t))) })
    }
}

export! {
    /// PCI info, current `nvmlPciInfo_t` layout.
    fn nvmlDeviceGetPciInfo_v3(device: nvmlDevice_t, pci: *mut nvmlPciInfo_t) |f| {
        // SAFETY: `pci` is null or valid for `nvmlPciInfo_t` (export contract).
        query(f, device, Some(Feature::PciInfo), true, |s, t| unsafe { put(pci, pci_info(s, t)) })
    }
}

// ---- memory and utilisation -----------------------------------------------------------------

export! {
    /// v1 memory: `used` includes the reserved memory, as in NVML.
    fn nvmlDeviceGetMemoryInfo(device: nvmlDevice_t, memory: *mut nvmlMemory_t) |f| {
        query(f, device, Some(Feature::Memory), true, |s, t| {
            let m = s.memory(t);
            let used = m.used + m.reserved;
            let v = nvmlMemory_t { total: m.total, free: m.total.saturating_sub(used), used };
            // SAFETY: `memory` is null or valid (export contract).
            unsafe { put(memory, v) }
        })
    }
}

export! {
    /// v2 memory (`version` must be `nvmlMemory_v2`): `used` excludes `reserved`.
    fn nvmlDeviceGetMemoryInfo_v2(device: nvmlDevice_t, memory: *mut nvmlMemory_v2_t) |f| {
        query(f, device, Some(Feature::Memory), true, |s, t| {
            if memory.is_null() {
                return Err(codes::INVALID_ARGUMENT);
            }
            // SAFETY: non-null and valid for reads (export contract).
            let version = unsafe { std::ptr::addr_of!((*memory).version).read_unaligned() };
            if version != NVML_MEMORY_V2 {
                return Err(codes::ARGUMENT_VERSION_MISMATCH);
            }
            let m = s.memory(t);
            let v = nvmlMemory_v2_t {
                version,
                total: m.total,
                reserved: m.reserved,
                free: m.total.saturating_sub(m.reserved + m.used),
                used: m.used,
            };
            // SAFETY: `memory` is valid (export contract).
            unsafe { put(memory, v) }
        })
    }
}

export! {
    /// GPU and memory utilisation, percent.
    fn nvmlDeviceGetUtilizationRates(device: nvmlDevice_t, utilization: *mut nvmlUtilization_t) |f| {
        query(f, device, Some(Feature::Utilization), false, |s, t| {
            let d = s.device(t);
            let v = nvmlUtilization_t { gpu: d.utilization_gpu, memory: d.utilization_memory };
            // SAFETY: `utilization` is null or valid (export contract).
            unsafe { put(utilization, v) }
        })
    }
}

/// Sampling period reported with encoder/decoder utilisation, microseconds.
const SAMPLING_PERIOD_US: c_uint = 167_000;

export! {
    /// Encoder utilisation and sampling period (µs).
    fn nvmlDeviceGetEncoderUtilization(device: nvmlDevice_t, utilization: *mut c_uint, samplingPeriodUs: *mut c_uint) |f| {
        query(f, device, Some(Feature::EncoderUtilization), false, |s, t| {
            // SAFETY: both pointers are null or valid (export contract).
            unsafe {
                put(utilization, s.device(t).encoder_utilization)?;
                put(samplingPeriodUs, SAMPLING_PERIOD_US)
            }
        })
    }
}

export! {
    /// Decoder utilisation and sampling period (µs).
    fn nvmlDeviceGetDecoderUtilization(device: nvmlDevice_t, utilization: *mut c_uint, samplingPeriodUs: *mut c_uint) |f| {
        query(f, device, Some(Feature::DecoderUtilization), false, |s, t| {
            // SAFETY: both pointers are null or valid (export contract).
            unsafe {
                put(utilization, s.device(t).decoder_utilization)?;
                put(samplingPeriodUs, SAMPLING_PERIOD_US)
            }
        })
    }
}

// ---- thermals, power, clocks ----------------------------------------------------------------

export! {
    /// Only `NVML_TEMPERATURE_GPU` (0) exists.
    fn nvmlDeviceGetTemperature(device: nvmlDevice_t, sensorType: c_uint, temp: *mut c_uint) |f| {
        query(f, device, Some(Feature::Temperature), false, |s, t| {
            if sensorType != 0 {
                return Err(codes::INVALID_ARGUMENT);
            }
            // SAFETY: `temp` is null or valid (export contract).
            unsafe { put(temp, s.device(t).temperature_c) }
        })
    }
}

export! {
    /// Power draw, milliwatts.
    fn nvmlDeviceGetPowerUsage(device: nvmlDevice_t, power: *mut c_uint) |f| {
        // SAFETY: `power` is null or valid (export contract).
        query(f, device, Some(Feature::PowerUsage), false, |s, t| unsafe { put(power, s.device(t).power_usage_mw) })
    }
}

export! {
    /// Enforced power limit, milliwatts.
    fn nvmlDeviceGetEnforcedPowerLimit(device: nvmlDevice_t, limit: *mut c_uint) |f| {
        // SAFETY: `limit` is null or valid (export contract).
        query(f, device, Some(Feature::PowerLimit), false, |s, t| unsafe { put(limit, s.device(t).power_limit_mw) })
    }
}

export! {
    /// Power management limit, milliwatts.
    fn nvmlDeviceGetPowerManagementLimit(device: nvmlDevice_t, limit: *mut c_uint) |f| {
        query(f, device, Some(Feature::PowerLimit), false, |s, t| {
            let d = s.device(t);
            // SAFETY: `limit` is null or valid (export contract).
            unsafe { put(limit, d.power_management_limit_mw.unwrap_or(d.power_limit_mw)) }
        })
    }
}

export! {
    /// Fan speed, percent.
    fn nvmlDeviceGetFanSpeed(device: nvmlDevice_t, speed: *mut c_uint) |f| {
        // SAFETY: `speed` is null or valid (export contract).
        query(f, device, Some(Feature::Fan), false, |s, t| unsafe { put(speed, s.device(t).fan_speed) })
    }
}

export! {
    /// Speed of fan `fan`, percent; all fans report the same speed.
    fn nvmlDeviceGetFanSpeed_v2(device: nvmlDevice_t, fan: c_uint, speed: *mut c_uint) |f| {
        query(f, device, Some(Feature::Fan), false, |s, t| {
            let d = s.device(t);
            if fan >= d.num_fans.max(1) {
                return Err(codes::INVALID_ARGUMENT);
            }
            // SAFETY: `speed` is null or valid (export contract).
            unsafe { put(speed, d.fan_speed) }
        })
    }
}

export! {
    /// Number of fans.
    fn nvmlDeviceGetNumFans(device: nvmlDevice_t, numFans: *mut c_uint) |f| {
        // SAFETY: `numFans` is null or valid (export contract).
        query(f, device, Some(Feature::Fan), false, |s, t| unsafe { put(numFans, s.device(t).num_fans.max(1)) })
    }
}

fn clock(c: &crate::scenario::Clocks, kind: c_uint) -> Result<c_uint, Code> {
    match kind {
        0 => Ok(c.graphics),
        1 => Ok(c.sm),
        2 => Ok(c.memory),
        3 => Ok(c.video),
        _ => Err(codes::INVALID_ARGUMENT),
    }
}

export! {
    /// Current clock (`NVML_CLOCK_GRAPHICS`, `SM`, `MEM`, `VIDEO`), MHz.
    fn nvmlDeviceGetClockInfo(device: nvmlDevice_t, clockType: c_uint, clockMHz: *mut c_uint) |f| {
        query(f, device, Some(Feature::Clocks), false, |s, t| {
            let v = clock(&s.device(t).clocks, clockType)?;
            // SAFETY: `clockMHz` is null or valid (export contract).
            unsafe { put(clockMHz, v) }
        })
    }
}

export! {
    /// Maximum clock, MHz.
    fn nvmlDeviceGetMaxClockInfo(device: nvmlDevice_t, clockType: c_uint, clockMHz: *mut c_uint) |f| {
        query(f, device, Some(Feature::MaxClocks), false, |s, t| {
            let v = clock(&s.device(t).max_clocks, clockType)?;
            // SAFETY: `clockMHz` is null or valid (export contract).
            unsafe { put(clockMHz, v) }
        })
    }
}

export! {
    /// Performance state (0 = P0).
    fn nvmlDeviceGetPerformanceState(device: nvmlDevice_t, pState: *mut c_uint) |f| {
        // SAFETY: `pState` is null or valid (export contract).
        query(f, device, Some(Feature::Pstate), false, |s, t| unsafe { put(pState, s.device(t).pstate) })
    }
}

export! {
    /// Deprecated alias of `nvmlDeviceGetPerformanceState`.
    fn nvmlDeviceGetPowerState(device: nvmlDevice_t, pState: *mut c_uint) |f| {
        // SAFETY: `pState` is null or valid (export contract).
        query(f, device, Some(Feature::Pstate), false, |s, t| unsafe { put(pState, s.device(t).pstate) })
    }
}

// ---- modes ----------------------------------------------------------------------------------

export! {
    /// `nvmlComputeMode_t`.
    fn nvmlDeviceGetComputeMode(device: nvmlDevice_t, mode: *mut c_uint) |f| {
        // SAFETY: `mode` is null or valid (export contract).
        query(f, device, Some(Feature::ComputeMode), false, |s, t| unsafe { put(mode, s.device(t).compute_mode as c_uint) })
    }
}

export! {
    /// `nvmlEnableState_t`.
    fn nvmlDeviceGetPersistenceMode(device: nvmlDevice_t, mode: *mut c_uint) |f| {
        // SAFETY: `mode` is null or valid (export contract).
        query(f, device, Some(Feature::PersistenceMode), false, |s, t| unsafe { put(mode, s.device(t).persistence_mode as c_uint) })
    }
}

export! {
    /// Whether a display is active.
    fn nvmlDeviceGetDisplayActive(device: nvmlDevice_t, isActive: *mut c_uint) |f| {
        // SAFETY: `isActive` is null or valid (export contract).
        query(f, device, Some(Feature::Display), false, |s, t| unsafe { put(isActive, s.device(t).display_active as c_uint) })
    }
}

export! {
    /// Whether a display is connected.
    fn nvmlDeviceGetDisplayMode(device: nvmlDevice_t, display: *mut c_uint) |f| {
        // SAFETY: `display` is null or valid (export contract).
        query(f, device, Some(Feature::Display), false, |s, t| unsafe { put(display, s.device(t).display_mode as c_uint) })
    }
}

export! {
    /// `nvmlBrandType_t`.
    fn nvmlDeviceGetBrand(device: nvmlDevice_t, brandType: *mut c_uint) |f| {
        // SAFETY: `brandType` is null or valid (export contract).
        query(f, device, Some(Feature::Brand), true, |s, t| unsafe { put(brandType, s.device(t).brand as c_uint) })
    }
}

export! {
    /// CUDA compute capability.
    fn nvmlDeviceGetCudaComputeCapability(device: nvmlDevice_t, major: *mut c_int, minor: *mut c_int) |f| {
        query(f, device, Some(Feature::CudaComputeCapability), true, |s, t| {
            let [ma, mi] = s.device(t).cuda_compute_capability;
            // SAFETY: both pointers are null or valid (export contract).
            unsafe {
                put(major, ma)?;
                put(minor, mi)
            }
        })
    }
}

export! {
    /// Current and pending ECC mode.
    fn nvmlDeviceGetEccMode(device: nvmlDevice_t, current: *mut c_uint, pending: *mut c_uint) |f| {
        query(f, device, Some(Feature::Ecc), false, |s, t| {
            let e = s.device(t).ecc.enabled as c_uint;
            // SAFETY: both pointers are null or valid (export contract).
            unsafe {
                put(current, e)?;
                put(pending, e)
            }
        })
    }
}

export! {
    /// ECC error totals: `errorType` 0 = corrected, 1 = uncorrected; both counter types report
    /// the scenario totals. `NOT_SUPPORTED` while ECC is disabled, as in NVML.
    fn nvmlDeviceGetTotalEccErrors(device: nvmlDevice_t, errorType: c_uint, counterType: c_uint, eccCounts: *mut c_ulonglong) |f| {
        query(f, device, Some(Feature::Ecc), false, |s, t| {
            let e = s.device(t).ecc;
            if !e.enabled {
                return Err(codes::NOT_SUPPORTED);
            }
            if counterType > 1 {
                return Err(codes::INVALID_ARGUMENT);
            }
            let v = match errorType {
                0 => e.corrected,
                1 => e.uncorrected,
                _ => return Err(codes::INVALID_ARGUMENT),
            };
            // SAFETY: `eccCounts` is null or valid (export contract).
            unsafe { put(eccCounts, v) }
        })
    }
}

// ---- MIG ------------------------------------------------------------------------------------

export! {
    /// Current and pending MIG mode.
    fn nvmlDeviceGetMigMode(device: nvmlDevice_t, currentMode: *mut c_uint, pendingMode: *mut c_uint) |f| {
        query(f, device, Some(Feature::Mig), false, |s, t| {
            let m = s.device(t).mig_mode as c_uint;
            // SAFETY: both pointers are null or valid (export contract).
            unsafe {
                put(currentMode, m)?;
                put(pendingMode, m)
            }
        })
    }
}

export! {
    /// How many MIG devices the GPU can hold.
    fn nvmlDeviceGetMaxMigDeviceCount(device: nvmlDevice_t, count: *mut c_uint) |f| {
        // SAFETY: `count` is null or valid (export contract).
        query(f, device, Some(Feature::Mig), false, |s, t| unsafe { put(count, s.device(t).max_mig_devices) })
    }
}

export! {
    /// MIG device `index`; `NOT_FOUND` past the existing instances.
    fn nvmlDeviceGetMigDeviceHandleByIndex(device: nvmlDevice_t, index: c_uint, migDevice: *mut nvmlDevice_t) |f| {
        query(f, device, Some(Feature::Mig), false, |s, t| {
            let d = s.device(t);
            if !d.mig_mode {
                return Err(codes::INVALID_ARGUMENT);
            }
            if index >= d.max_mig_devices {
                return Err(codes::INVALID_ARGUMENT);
            }
            if index as usize >= d.mig.len() {
                return Err(codes::NOT_FOUND);
            }
            let h = handle_ptr(Target::Mig { gpu: t.gpu(), mig: index as usize });
            // SAFETY: `migDevice` is null or valid (export contract).
            unsafe { put(migDevice, h) }
        })
    }
}

export! {
    /// 1 for a MIG device handle, 0 for a GPU.
    fn nvmlDeviceIsMigDeviceHandle(device: nvmlDevice_t, isMigDevice: *mut c_uint) |f| {
        query(f, device, None, true, |_, t| {
            // SAFETY: `isMigDevice` is null or valid (export contract).
            unsafe { put(isMigDevice, matches!(t, Target::Mig { .. }) as c_uint) }
        })
    }
}

export! {
    /// GPU instance id of a MIG device.
    fn nvmlDeviceGetGpuInstanceId(device: nvmlDevice_t, id: *mut c_uint) |f| {
        query(f, device, None, true, |s, t| {
            let m = s.mig(t).ok_or(codes::NOT_SUPPORTED)?;
            // SAFETY: `id` is null or valid (export contract).
            unsafe { put(id, m.gpu_instance_id) }
        })
    }
}

export! {
    /// Compute instance id of a MIG device.
    fn nvmlDeviceGetComputeInstanceId(device: nvmlDevice_t, id: *mut c_uint) |f| {
        query(f, device, None, true, |s, t| {
            let m = s.mig(t).ok_or(codes::NOT_SUPPORTED)?;
            // SAFETY: `id` is null or valid (export contract).
            unsafe { put(id, m.compute_instance_id) }
        })
    }
}

export! {
    /// The parent GPU of a MIG device.
    fn nvmlDeviceGetDeviceHandleFromMigDeviceHandle(migDevice: nvmlDevice_t, device: *mut nvmlDevice_t) |f| {
        query(f, migDevice, None, true, |_, t| {
            if !matches!(t, Target::Mig { .. }) {
                return Err(codes::INVALID_ARGUMENT);
            }
            // SAFETY: `device` is null or valid (export contract).
            unsafe { put(device, handle_ptr(Target::Gpu(t.gpu()))) }
        })
    }
}

// ---- processes ------------------------------------------------------------------------------

fn v1(p: ProcInfo) -> nvmlProcessInfo_v1_t {
    nvmlProcessInfo_v1_t {
        pid: p.pid,
        usedGpuMemory: p.used,
    }
}

fn v2(p: ProcInfo) -> nvmlProcessInfo_v2_t {
    nvmlProcessInfo_v2_t {
        pid: p.pid,
        usedGpuMemory: p.used,
        gpuInstanceId: p.gpu_instance_id,
        computeInstanceId: p.compute_instance_id,
    }
}

/// # Safety
/// `count`/`infos` follow [`put_list`]'s contract for `T`.
unsafe fn procs<T>(
    f: &str,
    device: nvmlDevice_t,
    kind: Option<ProcessKind>,
    count: *mut c_uint,
    infos: *mut T,
    conv: fn(ProcInfo) -> T,
) -> R {
    query(f, device, Some(Feature::Processes), true, |s, t| {
        let list = match kind {
            Some(k) => s.processes(t, k).into_iter().map(conv).collect(),
            None => Vec::new(),
        };
        // SAFETY: forwarded caller contract.
        unsafe { put_list(count, infos, list) }
    })
}

macro_rules! process_queries {
    ($($name:ident, $kind:expr, $ty:ty, $conv:expr, $doc:literal;)*) => {$(
        export! {
            #[doc = $doc]
            fn $name(device: nvmlDevice_t, infoCount: *mut c_uint, infos: *mut $ty) |f| {
                // SAFETY: `infoCount`/`infos` follow the NVML list contract (export contract).
                unsafe { procs(f, device, $kind, infoCount, infos, $conv) }
            }
        }
    )*};
}

process_queries! {
    nvmlDeviceGetComputeRunningProcesses, Some(ProcessKind::Compute), nvmlProcessInfo_v1_t, v1,
        "Compute processes, `nvmlProcessInfo_v1_t` entries.";
    nvmlDeviceGetComputeRunningProcesses_v2, Some(ProcessKind::Compute), nvmlProcessInfo_v2_t, v2,
        "Compute processes, `nvmlProcessInfo_v2_t` entries.";
    nvmlDeviceGetComputeRunningProcesses_v3, Some(ProcessKind::Compute), nvmlProcessInfo_v2_t, v2,
        "Compute processes, `nvmlProcessInfo_t` entries (same layout as v2).";
    nvmlDeviceGetGraphicsRunningProcesses, Some(ProcessKind::Graphics), nvmlProcessInfo_v1_t, v1,
        "Graphics processes, `nvmlProcessInfo_v1_t` entries.";
    nvmlDeviceGetGraphicsRunningProcesses_v2, Some(ProcessKind::Graphics), nvmlProcessInfo_v2_t, v2,
        "Graphics processes, `nvmlProcessInfo_v2_t` entries.";
    nvmlDeviceGetGraphicsRunningProcesses_v3, Some(ProcessKind::Graphics), nvmlProcessInfo_v2_t, v2,
        "Graphics processes, `nvmlProcessInfo_t` entries (same layout as v2).";
    nvmlDeviceGetMPSComputeRunningProcesses, None, nvmlProcessInfo_v1_t, v1,
        "MPS processes: none (the simulator has no MPS server).";
    nvmlDeviceGetMPSComputeRunningProcesses_v2, None, nvmlProcessInfo_v2_t, v2,
        "MPS processes: none (the simulator has no MPS server).";
    nvmlDeviceGetMPSComputeRunningProcesses_v3, None, nvmlProcessInfo_v2_t, v2,
        "MPS processes: none (the simulator has no MPS server).";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_nvml_h() {
        use std::mem::size_of;
        assert_eq!(size_of::<nvmlMemory_t>(), 24);
        assert_eq!(size_of::<nvmlMemory_v2_t>(), 40);
        assert_eq!(NVML_MEMORY_V2, 0x0200_0028);
        assert_eq!(size_of::<nvmlProcessInfo_v1_t>(), 16);
        assert_eq!(size_of::<nvmlProcessInfo_v2_t>(), 24);
        assert_eq!(size_of::<nvmlPciInfo_t>(), 68);
        assert_eq!(size_of::<nvmlPciInfoPrefix_t>(), 36);
        assert_eq!(size_of::<nvmlUtilization_t>(), 8);
    }

    #[test]
    fn exported_list_matches_source() {
        let src = include_str!("ffi.rs");
        let mut defined: Vec<&str> = src
            .lines()
            .map(str::trim_start)
            .filter_map(|l| {
                let name = if let Some(rest) = l.strip_prefix("fn ") {
                    rest.split('(').next()?
                } else if let Some(rest) = l.strip_prefix("pub extern \"C\" fn ") {
                    rest.split('(').next()?
                } else if l.contains(", Some(ProcessKind::")
                    || l.contains(", None, nvmlProcessInfo")
                {
                    l.split(',').next()?
                } else {
                    return None;
                };
                (name.starts_with("nvml") && !name.contains(' ')).then_some(name)
            })
            .collect();
        defined.sort_unstable();
        defined.dedup();
        let mut exported = EXPORTED.to_vec();
        exported.sort_unstable();
        assert_eq!(defined, exported);
    }
}
