//! The exported NVML C functions and the C structs they fill.
//!
//! Struct layouts follow nvml.h (as mirrored by nvml-wrapper-sys's bindings). Every export runs
//! its body under `catch_unwind`, so a bug here returns `NVML_ERROR_UNKNOWN` instead of unwinding
//! into C.

#![allow(non_snake_case, non_camel_case_types)]

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::codes::{self, Code};
use crate::events;
use crate::scenario::{parse_bus_id, Feature, ProcessKind};
use crate::series;
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

/// `nvmlBAR1Memory_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nvmlBAR1Memory_t {
    pub bar1Total: c_ulonglong,
    pub bar1Free: c_ulonglong,
    pub bar1Used: c_ulonglong,
}

/// `nvmlProcessUtilizationSample_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nvmlProcessUtilizationSample_t {
    pub pid: c_uint,
    pub timeStamp: c_ulonglong,
    pub smUtil: c_uint,
    pub memUtil: c_uint,
    pub encUtil: c_uint,
    pub decUtil: c_uint,
}

/// `nvmlValue_t`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union nvmlValue_t {
    pub dVal: f64,
    pub siVal: c_int,
    pub uiVal: c_uint,
    pub ulVal: std::ffi::c_ulong,
    pub ullVal: c_ulonglong,
    pub sllVal: std::ffi::c_longlong,
    pub usVal: std::ffi::c_ushort,
}

impl std::fmt::Debug for nvmlValue_t {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // SAFETY: every field is plain data and `ullVal` covers all 8 bytes of the union.
        let bits = unsafe { self.ullVal };
        write!(f, "nvmlValue_t({bits:#x})")
    }
}

/// `nvmlFieldValue_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nvmlFieldValue_t {
    pub fieldId: c_uint,
    pub scopeId: c_uint,
    pub timestamp: std::ffi::c_longlong,
    pub latencyUsec: std::ffi::c_longlong,
    pub valueType: c_uint,
    pub nvmlReturn: nvmlReturn_t,
    pub value: nvmlValue_t,
}

/// `nvmlEventSet_t`: an opaque pointer that callers never dereference.
pub type nvmlEventSet_t = *mut c_void;

/// `nvmlEventData_t` as `nvmlEventSetWait_v2` fills it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nvmlEventData_t {
    pub device: nvmlDevice_t,
    pub eventType: c_ulonglong,
    pub eventData: c_ulonglong,
    pub gpuInstanceId: c_uint,
    pub computeInstanceId: c_uint,
}

/// The part of `nvmlEventData_t` that `nvmlEventSetWait` (v1) fills.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nvmlEventData_v1_t {
    pub device: nvmlDevice_t,
    pub eventType: c_ulonglong,
    pub eventData: c_ulonglong,
}

/// `nvmlSample_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nvmlSample_t {
    pub timeStamp: c_ulonglong,
    pub sampleValue: nvmlValue_t,
}

/// How many samples per type the simulated driver keeps (12 s at one per 100 ms).
pub const MAX_SAMPLES: u64 = 120;

/// `NVML_VALUE_TYPE_UNSIGNED_INT`.
pub const NVML_VALUE_TYPE_UNSIGNED_INT: c_uint = 1;
/// `NVML_VALUE_TYPE_UNSIGNED_LONG_LONG`.
pub const NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: c_uint = 3;

/// The field ids of `nvmlDeviceGetFieldValues` that the simulator answers; the rest answer
/// `NOT_SUPPORTED` in their entry.
pub mod field {
    /// `NVML_FI_DEV_ECC_CURRENT`: 1 while ECC is on.
    pub const ECC_CURRENT: u32 = 1;
    /// `NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION`: mJ since the driver loaded.
    pub const TOTAL_ENERGY_CONSUMPTION: u32 = 83;
    /// `NVML_FI_DEV_NVLINK_LINK_COUNT`.
    pub const NVLINK_LINK_COUNT: u32 = 91;
    /// `NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX`: KiB sent over link `scopeId` since boot.
    pub const NVLINK_THROUGHPUT_DATA_TX: u32 = 138;
    /// `NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX`: KiB received over link `scopeId` since boot.
    pub const NVLINK_THROUGHPUT_DATA_RX: u32 = 139;
    /// `NVML_FI_DEV_NVLINK_GET_STATE`: 1 for an active link `scopeId`.
    pub const NVLINK_GET_STATE: u32 = 165;
    /// `NVML_FI_DEV_POWER_INSTANT`: mW now.
    pub const POWER_INSTANT: u32 = 186;
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
    "nvmlDeviceGetBAR1MemoryInfo",
    "nvmlDeviceGetDriverModel",
    "nvmlDeviceGetDriverModel_v2",
    "nvmlDeviceGetProcessUtilization",
    "nvmlDeviceGetMaxPcieLinkGeneration",
    "nvmlDeviceGetGpuMaxPcieLinkGeneration",
    "nvmlDeviceGetMaxPcieLinkWidth",
    "nvmlDeviceGetCurrPcieLinkGeneration",
    "nvmlDeviceGetCurrPcieLinkWidth",
    "nvmlDeviceGetPcieLinkMaxSpeed",
    "nvmlDeviceGetPcieSpeed",
    "nvmlDeviceGetPcieThroughput",
    "nvmlDeviceGetPcieReplayCounter",
    "nvmlDeviceGetTemperatureThreshold",
    "nvmlDeviceGetArchitecture",
    "nvmlDeviceGetBusType",
    "nvmlDeviceGetNvLinkState",
    "nvmlDeviceGetNvLinkVersion",
    "nvmlDeviceGetFieldValues",
    "nvmlDeviceGetTotalEnergyConsumption",
    "nvmlDeviceGetCurrentClocksThrottleReasons",
    "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetSupportedClocksThrottleReasons",
    "nvmlDeviceGetSupportedClocksEventReasons",
    "nvmlDeviceGetPowerManagementLimitConstraints",
    "nvmlDeviceGetPowerManagementDefaultLimit",
    "nvmlDeviceGetMemoryErrorCounter",
    "nvmlDeviceGetRetiredPages",
    "nvmlDeviceGetRetiredPages_v2",
    "nvmlDeviceGetRetiredPagesPendingStatus",
    "nvmlDeviceGetRemappedRows",
    "nvmlDeviceGetVbiosVersion",
    "nvmlDeviceGetBoardPartNumber",
    "nvmlDeviceGetMemoryBusWidth",
    "nvmlDeviceGetNumGpuCores",
    "nvmlDeviceGetClock",
    "nvmlDeviceGetApplicationsClock",
    "nvmlDeviceGetDefaultApplicationsClock",
    "nvmlDeviceGetMaxCustomerBoostClock",
    "nvmlDeviceGetSamples",
    "nvmlEventSetCreate",
    "nvmlDeviceRegisterEvents",
    "nvmlDeviceGetSupportedEventTypes",
    "nvmlEventSetWait",
    "nvmlEventSetWait_v2",
    "nvmlEventSetFree",
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
    /// Number of GPUs enumerated: the scenario's, less those whose device node is refused.
    fn nvmlDeviceGetCount(deviceCount: *mut c_uint) |f| {
        // SAFETY: forwarded caller contract.
        unsafe { count(f, deviceCount) }
    }
}

export! {
    /// Number of GPUs enumerated: the scenario's, less those whose device node is refused.
    fn nvmlDeviceGetCount_v2(deviceCount: *mut c_uint) |f| {
        // SAFETY: forwarded caller contract.
        unsafe { count(f, deviceCount) }
    }
}

/// # Safety
/// `out` must be null or valid for a write.
unsafe fn count(f: &str, out: *mut c_uint) -> R {
    // SAFETY: forwarded caller contract.
    system(f, |s| unsafe { put(out, s.count() as c_uint) })
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
        let gpu = s
            .enumerated(index as usize)
            .ok_or(codes::INVALID_ARGUMENT)?;
        // SAFETY: forwarded caller contract.
        unsafe { put(out, handle_ptr(Target::Gpu(gpu))) }
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
            let g = s.listed().find(|(_, d)| d.serial == serial).map(|(g, _)| g).ok_or(codes::NOT_FOUND)?;
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
            .listed()
            .find(|(_, d)| d.pci_parts() == wanted)
            .map(|(g, _)| g)
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
        query(f, device, None, false, |s, t| unsafe {
            put(index, s.index_of(t.gpu()).unwrap_or(t.gpu()) as c_uint)
        })
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
            let n = s.scenario.minor_number(t.gpu());
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
    /// GPU and memory utilisation, percent; `NOT_SUPPORTED` on a GPU in MIG mode, as in NVML.
    fn nvmlDeviceGetUtilizationRates(device: nvmlDevice_t, utilization: *mut nvmlUtilization_t) |f| {
        query(f, device, Some(Feature::Utilization), false, |s, t| {
            let d = s.device(t);
            if d.mig_mode {
                return Err(codes::NOT_SUPPORTED);
            }
            let g = t.gpu();
            let v = nvmlUtilization_t { gpu: s.level(g, d.utilization_gpu), memory: s.level(g, d.utilization_memory) };
            // SAFETY: `utilization` is null or valid (export contract).
            unsafe { put(utilization, v) }
        })
    }
}

/// Sampling period reported with encoder/decoder utilisation, microseconds.
const SAMPLING_PERIOD_US: c_uint = 167_000;

export! {
    /// Encoder utilisation and sampling period (µs); `NOT_SUPPORTED` in MIG mode.
    fn nvmlDeviceGetEncoderUtilization(device: nvmlDevice_t, utilization: *mut c_uint, samplingPeriodUs: *mut c_uint) |f| {
        query(f, device, Some(Feature::EncoderUtilization), false, |s, t| {
            let d = s.device(t);
            if d.mig_mode {
                return Err(codes::NOT_SUPPORTED);
            }
            // SAFETY: both pointers are null or valid (export contract).
            unsafe {
                put(utilization, s.level(t.gpu(), d.encoder_utilization))?;
                put(samplingPeriodUs, SAMPLING_PERIOD_US)
            }
        })
    }
}

export! {
    /// Decoder utilisation and sampling period (µs); `NOT_SUPPORTED` in MIG mode.
    fn nvmlDeviceGetDecoderUtilization(device: nvmlDevice_t, utilization: *mut c_uint, samplingPeriodUs: *mut c_uint) |f| {
        query(f, device, Some(Feature::DecoderUtilization), false, |s, t| {
            let d = s.device(t);
            if d.mig_mode {
                return Err(codes::NOT_SUPPORTED);
            }
            // SAFETY: both pointers are null or valid (export contract).
            unsafe {
                put(utilization, s.level(t.gpu(), d.decoder_utilization))?;
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
            unsafe { put(temp, s.level(t.gpu(), s.device(t).temperature_c)) }
        })
    }
}

export! {
    /// Power draw, milliwatts.
    fn nvmlDeviceGetPowerUsage(device: nvmlDevice_t, power: *mut c_uint) |f| {
        // SAFETY: `power` is null or valid (export contract).
        query(f, device, Some(Feature::PowerUsage), false, |s, t| unsafe { put(power, s.level(t.gpu(), s.device(t).power_usage_mw)) })
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
    /// Current clock (`NVML_CLOCK_GRAPHICS`, `SM`, `MEM`, `VIDEO`), MHz: the scenario's, else the
    /// maximum while busy and the idle clock while not.
    fn nvmlDeviceGetClockInfo(device: nvmlDevice_t, clockType: c_uint, clockMHz: *mut c_uint) |f| {
        query(f, device, Some(Feature::Clocks), false, |s, t| {
            let v = clock(&s.clocks(t.gpu()), clockType)?;
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
        query(f, device, Some(Feature::Pstate), false, |s, t| unsafe { put(pState, s.pstate(t.gpu())) })
    }
}

export! {
    /// Deprecated alias of `nvmlDeviceGetPerformanceState`.
    fn nvmlDeviceGetPowerState(device: nvmlDevice_t, pState: *mut c_uint) |f| {
        // SAFETY: `pState` is null or valid (export contract).
        query(f, device, Some(Feature::Pstate), false, |s, t| unsafe { put(pState, s.pstate(t.gpu())) })
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

// ---- BAR1, PCIe, thresholds, architecture -----------------------------------------------------

export! {
    /// BAR1 aperture: total, used and free bytes. A MIG device gets the share of its GPU's
    /// aperture that its memory is of the GPU's, in whole MiB, none of it used.
    fn nvmlDeviceGetBAR1MemoryInfo(device: nvmlDevice_t, bar1Memory: *mut nvmlBAR1Memory_t) |f| {
        query(f, device, Some(Feature::Bar1), true, |s, t| {
            let d = s.device(t);
            let (total, used) = match s.mig(t) {
                Some(m) => {
                    let share = m.memory_total.0 as f64 / d.memory_total.0.max(1) as f64;
                    let mib = (d.bar1_total.0 as f64 * share.min(1.0) / 1048576.0).floor() as u64;
                    (mib << 20, 0)
                }
                None => (d.bar1_total.0, d.bar1_used.0.min(d.bar1_total.0)),
            };
            let v = nvmlBAR1Memory_t { bar1Total: total, bar1Free: total - used, bar1Used: used };
            // SAFETY: `bar1Memory` is null or valid (export contract).
            unsafe { put(bar1Memory, v) }
        })
    }
}

/// # Safety
/// Both pointers must be null or valid for a write.
unsafe fn driver_model(
    f: &str,
    device: nvmlDevice_t,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> R {
    query(f, device, None, true, |_, _| {
        if current.is_null() || pending.is_null() {
            return Err(codes::INVALID_ARGUMENT);
        }
        // WDDM/TCC driver models exist on Windows only.
        Err(codes::NOT_SUPPORTED)
    })
}

export! {
    /// Windows only: `NOT_SUPPORTED`, as on every Linux driver.
    fn nvmlDeviceGetDriverModel(device: nvmlDevice_t, current: *mut c_uint, pending: *mut c_uint) |f| {
        // SAFETY: forwarded caller contract.
        unsafe { driver_model(f, device, current, pending) }
    }
}

export! {
    /// Windows only: `NOT_SUPPORTED`, as on every Linux driver.
    fn nvmlDeviceGetDriverModel_v2(device: nvmlDevice_t, current: *mut c_uint, pending: *mut c_uint) |f| {
        // SAFETY: forwarded caller contract.
        unsafe { driver_model(f, device, current, pending) }
    }
}

/// A PCIe query answering one number from the device.
fn pcie_value(
    f: &str,
    device: nvmlDevice_t,
    out: *mut c_uint,
    get: fn(&crate::scenario::Device) -> c_uint,
) -> R {
    query(f, device, Some(Feature::Pcie), false, |s, t| {
        // SAFETY: `out` is null or valid (export contract of every caller).
        unsafe { put(out, get(s.device(t))) }
    })
}

/// Per-lane speed of PCIe generation `gen`, MB/s (`NVML_PCIE_LINK_MAX_SPEED_*MBPS`).
fn pcie_lane_speed(gen: c_uint) -> c_uint {
    match gen {
        1 => 2_500,
        2 => 5_000,
        3 => 8_000,
        4 => 16_000,
        5 => 32_000,
        6 => 64_000,
        _ => 0,
    }
}

export! {
    /// The highest PCIe generation of the GPU and its slot.
    fn nvmlDeviceGetMaxPcieLinkGeneration(device: nvmlDevice_t, maxLinkGen: *mut c_uint) |f| {
        pcie_value(f, device, maxLinkGen, |d| d.pcie.max_generation)
    }
}

export! {
    /// The highest PCIe generation of the GPU.
    fn nvmlDeviceGetGpuMaxPcieLinkGeneration(device: nvmlDevice_t, maxLinkGenDevice: *mut c_uint) |f| {
        pcie_value(f, device, maxLinkGenDevice, |d| d.pcie.max_generation)
    }
}

export! {
    /// The widest PCIe link, lanes.
    fn nvmlDeviceGetMaxPcieLinkWidth(device: nvmlDevice_t, maxLinkWidth: *mut c_uint) |f| {
        pcie_value(f, device, maxLinkWidth, |d| d.pcie.max_width)
    }
}

export! {
    /// The PCIe generation now.
    fn nvmlDeviceGetCurrPcieLinkGeneration(device: nvmlDevice_t, currLinkGen: *mut c_uint) |f| {
        pcie_value(f, device, currLinkGen, |d| d.pcie.generation)
    }
}

export! {
    /// The PCIe link width now, lanes.
    fn nvmlDeviceGetCurrPcieLinkWidth(device: nvmlDevice_t, currLinkWidth: *mut c_uint) |f| {
        pcie_value(f, device, currLinkWidth, |d| d.pcie.width)
    }
}

export! {
    /// Per-lane speed of the highest PCIe generation, MB/s.
    fn nvmlDeviceGetPcieLinkMaxSpeed(device: nvmlDevice_t, maxSpeed: *mut c_uint) |f| {
        pcie_value(f, device, maxSpeed, |d| pcie_lane_speed(d.pcie.max_generation))
    }
}

export! {
    /// Per-lane speed of the PCIe generation now, MB/s.
    fn nvmlDeviceGetPcieSpeed(device: nvmlDevice_t, pcieSpeed: *mut c_uint) |f| {
        pcie_value(f, device, pcieSpeed, |d| pcie_lane_speed(d.pcie.generation))
    }
}

export! {
    /// PCIe replays since boot.
    fn nvmlDeviceGetPcieReplayCounter(device: nvmlDevice_t, value: *mut c_uint) |f| {
        pcie_value(f, device, value, |d| d.pcie.replay_counter)
    }
}

export! {
    /// PCIe traffic, KB/s: `counter` 0 = TX, 1 = RX.
    fn nvmlDeviceGetPcieThroughput(device: nvmlDevice_t, counter: c_uint, value: *mut c_uint) |f| {
        query(f, device, Some(Feature::PcieThroughput), false, |s, t| {
            let p = s.device(t).pcie;
            let level = match counter {
                0 => p.tx_kbps,
                1 => p.rx_kbps,
                _ => return Err(codes::INVALID_ARGUMENT),
            };
            // SAFETY: `value` is null or valid (export contract).
            unsafe { put(value, s.level(t.gpu(), level)) }
        })
    }
}

export! {
    /// Temperature thresholds, °C: 0 shutdown, 1 slowdown, 2 memory max, 3 GPU max; the
    /// acoustic and later ones (4 to 7) and any the scenario leaves out are `NOT_SUPPORTED`.
    fn nvmlDeviceGetTemperatureThreshold(device: nvmlDevice_t, thresholdType: c_uint, temp: *mut c_uint) |f| {
        query(f, device, Some(Feature::TemperatureThreshold), false, |s, t| {
            let th = s.device(t).temperature_thresholds;
            let v = match thresholdType {
                0 => th.shutdown,
                1 => th.slowdown,
                2 => th.mem_max,
                3 => th.gpu_max,
                4..=7 => None,
                _ => return Err(codes::INVALID_ARGUMENT),
            };
            if temp.is_null() {
                return Err(codes::INVALID_ARGUMENT);
            }
            // SAFETY: `temp` is valid (export contract).
            unsafe { put(temp, v.ok_or(codes::NOT_SUPPORTED)?) }
        })
    }
}

export! {
    /// `nvmlDeviceArchitecture_t`.
    fn nvmlDeviceGetArchitecture(device: nvmlDevice_t, arch: *mut c_uint) |f| {
        query(f, device, Some(Feature::Architecture), true, |s, t| {
            // SAFETY: `arch` is null or valid (export contract).
            unsafe { put(arch, s.device(t).architecture as c_uint) }
        })
    }
}

export! {
    /// `NVML_BUS_TYPE_PCIE` (2): every simulated GPU sits on PCIe.
    fn nvmlDeviceGetBusType(device: nvmlDevice_t, busType: *mut c_uint) |f| {
        query(f, device, Some(Feature::Pcie), false, |_, _| {
            // SAFETY: `busType` is null or valid (export contract).
            unsafe { put(busType, 2) }
        })
    }
}

export! {
    /// `nvmlDeviceGetVbiosVersion`.
    fn nvmlDeviceGetVbiosVersion(device: nvmlDevice_t, version: *mut c_char, length: c_uint) |f| {
        query(f, device, Some(Feature::Vbios), false, |s, t| {
            // SAFETY: `version` is valid for `length` bytes (export contract).
            unsafe { put_str(version, length, &s.device(t).vbios_version) }
        })
    }
}

export! {
    /// Board part number; `NOT_SUPPORTED` where the scenario's is empty (GeForce cards).
    fn nvmlDeviceGetBoardPartNumber(device: nvmlDevice_t, partNumber: *mut c_char, length: c_uint) |f| {
        query(f, device, None, false, |s, t| {
            let pn = &s.device(t).board_part_number;
            if pn.is_empty() {
                return Err(codes::NOT_SUPPORTED);
            }
            // SAFETY: `partNumber` is valid for `length` bytes (export contract).
            unsafe { put_str(partNumber, length, pn) }
        })
    }
}

// ---- per-process utilisation ----------------------------------------------------------------

export! {
    /// One sample per process (timestamp on the 100 ms sample grid) if the latest sample is
    /// newer than `lastSeenTimeStamp` (µs since the epoch; 0 = any), else `NOT_FOUND`, as is a
    /// GPU without processes. Null `utilization` or a short buffer: `INSUFFICIENT_SIZE` with the
    /// needed count. `NOT_SUPPORTED` in MIG mode, as in NVML.
    fn nvmlDeviceGetProcessUtilization(device: nvmlDevice_t, utilization: *mut nvmlProcessUtilizationSample_t, processSamplesCount: *mut c_uint, lastSeenTimeStamp: c_ulonglong) |f| {
        query(f, device, Some(Feature::ProcessUtilization), false, |s, t| {
            if s.device(t).mig_mode {
                return Err(codes::NOT_SUPPORTED);
            }
            if processSamplesCount.is_null() {
                return Err(codes::INVALID_ARGUMENT);
            }
            let tick = series::sample_tick(s.now_us());
            let samples = if lastSeenTimeStamp >= tick { Vec::new() } else { s.process_samples(t.gpu(), tick) };
            if samples.is_empty() {
                return Err(codes::NOT_FOUND);
            }
            let list: Vec<nvmlProcessUtilizationSample_t> = samples
                .into_iter()
                .map(|p| nvmlProcessUtilizationSample_t {
                    pid: p.pid,
                    timeStamp: tick,
                    smUtil: p.sm,
                    memUtil: p.mem,
                    encUtil: p.enc,
                    decUtil: p.dec,
                })
                .collect();
            if utilization.is_null() {
                let needed = c_uint::try_from(list.len()).map_err(|_| codes::UNKNOWN)?;
                // SAFETY: `processSamplesCount` is non-null and valid (export contract).
                unsafe { processSamplesCount.write_unaligned(needed) };
                return Err(codes::INSUFFICIENT_SIZE);
            }
            // SAFETY: `processSamplesCount` is valid, `utilization` holds that many entries.
            unsafe { put_list(processSamplesCount, utilization, list) }
        })
    }
}

// ---- NVLink and field values ----------------------------------------------------------------

/// Checks that `link` exists on a GPU with NVLink.
fn nvlink_link(s: &Sim, t: Target, link: c_uint) -> R {
    let n = s.device(t).nvlink.links;
    if n == 0 {
        return Err(codes::NOT_SUPPORTED);
    }
    if link >= n {
        return Err(codes::INVALID_ARGUMENT);
    }
    Ok(())
}

export! {
    /// `NVML_FEATURE_ENABLED` (1) for every link the scenario lists; `NOT_SUPPORTED` without
    /// NVLink; `INVALID_ARGUMENT` past the last link.
    fn nvmlDeviceGetNvLinkState(device: nvmlDevice_t, link: c_uint, isActive: *mut c_uint) |f| {
        query(f, device, Some(Feature::Nvlink), false, |s, t| {
            nvlink_link(s, t, link)?;
            // SAFETY: `isActive` is null or valid (export contract).
            unsafe { put(isActive, 1) }
        })
    }
}

export! {
    /// The NVLink version of `link`.
    fn nvmlDeviceGetNvLinkVersion(device: nvmlDevice_t, link: c_uint, version: *mut c_uint) |f| {
        query(f, device, Some(Feature::Nvlink), false, |s, t| {
            nvlink_link(s, t, link)?;
            // SAFETY: `version` is null or valid (export contract).
            unsafe { put(version, s.device(t).nvlink.version) }
        })
    }
}

/// One field value: `(valueType, value)` or the entry's error.
fn field_value(
    s: &Sim,
    t: Target,
    id: c_uint,
    scope: c_uint,
) -> Result<(c_uint, nvmlValue_t), Code> {
    let d = s.device(t);
    let g = t.gpu();
    let nvlink = |link: bool| -> R {
        if d.unsupported(Feature::Nvlink) || d.nvlink.links == 0 {
            return Err(codes::NOT_SUPPORTED);
        }
        if link && scope >= d.nvlink.links {
            return Err(codes::INVALID_ARGUMENT);
        }
        Ok(())
    };
    let ui = |v: c_uint| (NVML_VALUE_TYPE_UNSIGNED_INT, nvmlValue_t { uiVal: v });
    let ull = |v: c_ulonglong| {
        (
            NVML_VALUE_TYPE_UNSIGNED_LONG_LONG,
            nvmlValue_t { ullVal: v },
        )
    };
    match id {
        field::ECC_CURRENT if !d.unsupported(Feature::Ecc) => Ok(ui(d.ecc.enabled as c_uint)),
        field::TOTAL_ENERGY_CONSUMPTION if !d.unsupported(Feature::Energy) => {
            Ok(ull(s.energy_mj(g)))
        }
        field::POWER_INSTANT if !d.unsupported(Feature::PowerUsage) => {
            Ok(ui(s.level(g, d.power_usage_mw)))
        }
        field::NVLINK_LINK_COUNT => nvlink(false).map(|()| ui(d.nvlink.links)),
        field::NVLINK_GET_STATE => nvlink(true).map(|()| ui(1)),
        field::NVLINK_THROUGHPUT_DATA_TX => {
            nvlink(true).map(|()| ull(s.counter_kib(g, d.nvlink.tx_kibps)))
        }
        field::NVLINK_THROUGHPUT_DATA_RX => {
            nvlink(true).map(|()| ull(s.counter_kib(g, d.nvlink.rx_kibps)))
        }
        _ => Err(codes::NOT_SUPPORTED),
    }
}

export! {
    /// Fills each entry's value, type, timestamp and `nvmlReturn`: the fields in [`field`] are
    /// answered, the rest say `NOT_SUPPORTED` in their entry while the call succeeds, as NVML does.
    fn nvmlDeviceGetFieldValues(device: nvmlDevice_t, valuesCount: c_int, values: *mut nvmlFieldValue_t) |f| {
        query(f, device, None, false, |s, t| {
            let n = usize::try_from(valuesCount).map_err(|_| codes::INVALID_ARGUMENT)?;
            if values.is_null() {
                return Err(codes::INVALID_ARGUMENT);
            }
            let now = i64::try_from(s.now_us()).unwrap_or(i64::MAX);
            for i in 0..n {
                // SAFETY: `values` holds `valuesCount` entries (export contract) and `i < n`.
                let entry = unsafe { values.add(i) };
                // SAFETY: as above; the caller filled in `fieldId` and `scopeId`.
                let mut v = unsafe { entry.read_unaligned() };
                v.timestamp = now;
                v.latencyUsec = 0;
                match field_value(s, t, v.fieldId, v.scopeId) {
                    Ok((ty, value)) => {
                        v.valueType = ty;
                        v.value = value;
                        v.nvmlReturn = codes::SUCCESS.0;
                    }
                    Err(code) => v.nvmlReturn = code.0,
                }
                // SAFETY: as above.
                unsafe { entry.write_unaligned(v) };
            }
            Ok(())
        })
    }
}

// ---- energy, clock events, power limits -----------------------------------------------------

export! {
    /// Energy since the driver loaded (the machine's boot), mJ: the scenario's `energy_mj` plus
    /// the power draw integrated since then.
    fn nvmlDeviceGetTotalEnergyConsumption(device: nvmlDevice_t, energy: *mut c_ulonglong) |f| {
        query(f, device, Some(Feature::Energy), false, |s, t| {
            // SAFETY: `energy` is null or valid (export contract).
            unsafe { put(energy, s.energy_mj(t.gpu())) }
        })
    }
}

/// Every clock event reason the simulator may report (`GpuIdle` to `DisplayClockSetting`).
const SUPPORTED_CLOCK_EVENTS: c_ulonglong = 0x1FF;

/// # Safety
/// `out` must be null or valid for a write.
unsafe fn clock_events(f: &str, device: nvmlDevice_t, out: *mut c_ulonglong, supported: bool) -> R {
    query(
        f,
        device,
        Some(Feature::ClocksEventReasons),
        false,
        |s, t| {
            let d = s.device(t);
            let v = if supported {
                SUPPORTED_CLOCK_EVENTS
            } else {
                d.clocks_event_reasons.unwrap_or_else(|| {
                    let busy = !d.mig_mode && s.level(t.gpu(), d.utilization_gpu) > 0;
                    if busy {
                        0
                    } else {
                        1
                    }
                })
            };
            // SAFETY: forwarded caller contract.
            unsafe { put(out, v) }
        },
    )
}

export! {
    /// The scenario's `clocks_event_reasons`, else `GpuIdle` (1) while utilisation is 0.
    fn nvmlDeviceGetCurrentClocksEventReasons(device: nvmlDevice_t, clocksEventReasons: *mut c_ulonglong) |f| {
        // SAFETY: forwarded caller contract.
        unsafe { clock_events(f, device, clocksEventReasons, false) }
    }
}

export! {
    /// Older name of `nvmlDeviceGetCurrentClocksEventReasons`.
    fn nvmlDeviceGetCurrentClocksThrottleReasons(device: nvmlDevice_t, clocksThrottleReasons: *mut c_ulonglong) |f| {
        // SAFETY: forwarded caller contract.
        unsafe { clock_events(f, device, clocksThrottleReasons, false) }
    }
}

export! {
    /// The reasons this GPU can report: `0x1FF`.
    fn nvmlDeviceGetSupportedClocksEventReasons(device: nvmlDevice_t, supportedClocksEventReasons: *mut c_ulonglong) |f| {
        // SAFETY: forwarded caller contract.
        unsafe { clock_events(f, device, supportedClocksEventReasons, true) }
    }
}

export! {
    /// Older name of `nvmlDeviceGetSupportedClocksEventReasons`.
    fn nvmlDeviceGetSupportedClocksThrottleReasons(device: nvmlDevice_t, supportedClocksThrottleReasons: *mut c_ulonglong) |f| {
        // SAFETY: forwarded caller contract.
        unsafe { clock_events(f, device, supportedClocksThrottleReasons, true) }
    }
}

export! {
    /// The range the power limit can be set in, milliwatts.
    fn nvmlDeviceGetPowerManagementLimitConstraints(device: nvmlDevice_t, minLimit: *mut c_uint, maxLimit: *mut c_uint) |f| {
        query(f, device, Some(Feature::PowerConstraints), false, |s, t| {
            let d = s.device(t);
            if minLimit.is_null() || maxLimit.is_null() {
                return Err(codes::INVALID_ARGUMENT);
            }
            // SAFETY: both pointers are valid (export contract).
            unsafe {
                put(minLimit, d.power_limit_min_mw)?;
                put(maxLimit, d.power_limit_max_mw)
            }
        })
    }
}

export! {
    /// The board's default power limit, milliwatts.
    fn nvmlDeviceGetPowerManagementDefaultLimit(device: nvmlDevice_t, defaultLimit: *mut c_uint) |f| {
        query(f, device, Some(Feature::PowerLimit), false, |s, t| {
            let d = s.device(t);
            // SAFETY: `defaultLimit` is null or valid (export contract).
            unsafe { put(defaultLimit, d.power_default_limit_mw.unwrap_or(d.power_limit_mw)) }
        })
    }
}

// ---- ECC detail -----------------------------------------------------------------------------

export! {
    /// ECC errors by location: device memory (2) holds the scenario's totals, the other
    /// locations (0 to 8) none. `NOT_SUPPORTED` while ECC is off.
    fn nvmlDeviceGetMemoryErrorCounter(device: nvmlDevice_t, errorType: c_uint, counterType: c_uint, locationType: c_uint, count: *mut c_ulonglong) |f| {
        query(f, device, Some(Feature::Ecc), false, |s, t| {
            let e = s.device(t).ecc;
            if !e.enabled {
                return Err(codes::NOT_SUPPORTED);
            }
            if counterType > 1 || locationType > 8 {
                return Err(codes::INVALID_ARGUMENT);
            }
            let total = match errorType {
                0 => e.corrected,
                1 => e.uncorrected,
                _ => return Err(codes::INVALID_ARGUMENT),
            };
            // SAFETY: `count` is null or valid (export contract).
            unsafe { put(count, if locationType == 2 { total } else { 0 }) }
        })
    }
}

/// The retired pages of `cause` (0: multiple single-bit errors, 1: a double-bit error) as
/// (address, retirement time in µs since the epoch), made up from the scenario's counts.
fn retired_pages(s: &Sim, t: Target, cause: c_uint) -> Result<Vec<(u64, u64)>, Code> {
    let e = s.device(t).ecc;
    let n = match cause {
        0 => e.retired_pages_single_bit,
        1 => e.retired_pages_double_bit,
        _ => return Err(codes::INVALID_ARGUMENT),
    };
    Ok((0..u64::from(n))
        .map(|i| {
            let address = 0x0001_0000 + (u64::from(cause) << 20) + i * 0x1000;
            (address, 1_700_000_000_000_000 + i * 3_600_000_000)
        })
        .collect())
}

export! {
    /// Retired page addresses (list protocol: `*pageCount` in = room, out = count).
    fn nvmlDeviceGetRetiredPages(device: nvmlDevice_t, cause: c_uint, pageCount: *mut c_uint, addresses: *mut c_ulonglong) |f| {
        query(f, device, Some(Feature::RetiredPages), false, |s, t| {
            let pages = retired_pages(s, t, cause)?;
            // SAFETY: `pageCount`/`addresses` follow the NVML list contract (export contract).
            unsafe { put_list(pageCount, addresses, pages.into_iter().map(|p| p.0).collect()) }
        })
    }
}

export! {
    /// Retired page addresses and when each was retired (µs since the epoch).
    fn nvmlDeviceGetRetiredPages_v2(device: nvmlDevice_t, cause: c_uint, pageCount: *mut c_uint, addresses: *mut c_ulonglong, timestamps: *mut c_ulonglong) |f| {
        query(f, device, Some(Feature::RetiredPages), false, |s, t| {
            let pages = retired_pages(s, t, cause)?;
            if !pages.is_empty() && timestamps.is_null() && !addresses.is_null() {
                return Err(codes::INVALID_ARGUMENT);
            }
            let times: Vec<u64> = pages.iter().map(|p| p.1).collect();
            // SAFETY: `pageCount`/`addresses` follow the NVML list contract (export contract).
            unsafe { put_list(pageCount, addresses, pages.into_iter().map(|p| p.0).collect())? };
            if times.is_empty() {
                return Ok(());
            }
            // SAFETY: `timestamps` has as much room as `addresses`, which took every entry.
            unsafe { put_list(pageCount, timestamps, times) }
        })
    }
}

export! {
    /// `NVML_FEATURE_ENABLED` (1) while a page retirement waits for a reboot.
    fn nvmlDeviceGetRetiredPagesPendingStatus(device: nvmlDevice_t, isPending: *mut c_uint) |f| {
        query(f, device, Some(Feature::RetiredPages), false, |s, t| {
            // SAFETY: `isPending` is null or valid (export contract).
            unsafe { put(isPending, s.device(t).ecc.retired_pages_pending as c_uint) }
        })
    }
}

export! {
    /// Remapped rows (Ampere on): correctable, uncorrectable, pending, failed.
    fn nvmlDeviceGetRemappedRows(device: nvmlDevice_t, corrRows: *mut c_uint, uncRows: *mut c_uint, isPending: *mut c_uint, failureOccurred: *mut c_uint) |f| {
        query(f, device, Some(Feature::RemappedRows), false, |s, t| {
            let e = s.device(t).ecc;
            if corrRows.is_null() || uncRows.is_null() || isPending.is_null() || failureOccurred.is_null() {
                return Err(codes::INVALID_ARGUMENT);
            }
            // SAFETY: every pointer is valid (export contract).
            unsafe {
                put(corrRows, e.remapped_rows_correctable)?;
                put(uncRows, e.remapped_rows_uncorrectable)?;
                put(isPending, e.remapped_rows_pending as c_uint)?;
                put(failureOccurred, e.remapped_rows_failure as c_uint)
            }
        })
    }
}

// ---- more clocks, bus width, cores, samples -------------------------------------------------

export! {
    /// `nvmlDeviceGetMemoryBusWidth`, bits.
    fn nvmlDeviceGetMemoryBusWidth(device: nvmlDevice_t, busWidth: *mut c_uint) |f| {
        query(f, device, None, false, |s, t| {
            // SAFETY: `busWidth` is null or valid (export contract).
            unsafe { put(busWidth, s.device(t).memory_bus_width) }
        })
    }
}

export! {
    /// `nvmlDeviceGetNumGpuCores`.
    fn nvmlDeviceGetNumGpuCores(device: nvmlDevice_t, numCores: *mut c_uint) |f| {
        query(f, device, None, false, |s, t| {
            // SAFETY: `numCores` is null or valid (export contract).
            unsafe { put(numCores, s.device(t).cuda_cores) }
        })
    }
}

export! {
    /// `clockId` 0 = current, 1 = application target, 2 = application default, 3 = customer
    /// boost maximum; the application clocks and the boost maximum are the maximum clocks.
    fn nvmlDeviceGetClock(device: nvmlDevice_t, clockType: c_uint, clockId: c_uint, clockMHz: *mut c_uint) |f| {
        query(f, device, Some(Feature::Clocks), false, |s, t| {
            let v = match clockId {
                0 => clock(&s.clocks(t.gpu()), clockType)?,
                1..=3 => clock(&s.device(t).max_clocks, clockType)?,
                _ => return Err(codes::INVALID_ARGUMENT),
            };
            // SAFETY: `clockMHz` is null or valid (export contract).
            unsafe { put(clockMHz, v) }
        })
    }
}

/// A query answering one of the maximum clocks.
fn max_clock(f: &str, device: nvmlDevice_t, clock_type: c_uint, out: *mut c_uint) -> R {
    query(f, device, Some(Feature::MaxClocks), false, |s, t| {
        let v = clock(&s.device(t).max_clocks, clock_type)?;
        // SAFETY: `out` is null or valid (export contract of every caller).
        unsafe { put(out, v) }
    })
}

export! {
    /// Application clock: the maximum clock.
    fn nvmlDeviceGetApplicationsClock(device: nvmlDevice_t, clockType: c_uint, clockMHz: *mut c_uint) |f| {
        max_clock(f, device, clockType, clockMHz)
    }
}

export! {
    /// Default application clock: the maximum clock.
    fn nvmlDeviceGetDefaultApplicationsClock(device: nvmlDevice_t, clockType: c_uint, clockMHz: *mut c_uint) |f| {
        max_clock(f, device, clockType, clockMHz)
    }
}

export! {
    /// Customer boost maximum: the maximum clock.
    fn nvmlDeviceGetMaxCustomerBoostClock(device: nvmlDevice_t, clockType: c_uint, clockMHz: *mut c_uint) |f| {
        max_clock(f, device, clockType, clockMHz)
    }
}

/// The value of sample type `kind` of GPU `gpu` at `t_us`, for `nvmlDeviceGetSamples`.
fn sample_value(s: &Sim, gpu: usize, kind: c_uint, t_us: u64) -> c_uint {
    let d = &s.scenario.devices[gpu];
    match kind {
        0 => s.level_at(gpu, d.power_usage_mw, t_us),
        1 => s.level_at(gpu, d.utilization_gpu, t_us),
        2 => s.level_at(gpu, d.utilization_memory, t_us),
        3 => s.level_at(gpu, d.encoder_utilization, t_us),
        4 => s.level_at(gpu, d.decoder_utilization, t_us),
        5 => s.clocks_at(gpu, t_us).graphics,
        _ => s.clocks_at(gpu, t_us).memory,
    }
}

export! {
    /// The driver's samples of `type` (0 power, 1 GPU and 2 memory utilisation, 3 encoder,
    /// 4 decoder, 5 graphics and 6 memory clock) newer than `lastSeenTimeStamp`: one per 100 ms,
    /// the last 120. A null `samples` writes how many there are. `NOT_FOUND` when there is
    /// none; utilisation types answer `NOT_SUPPORTED` in MIG mode.
    fn nvmlDeviceGetSamples(device: nvmlDevice_t, type_: c_uint, lastSeenTimeStamp: c_ulonglong, sampleValType: *mut c_uint, sampleCount: *mut c_uint, samples: *mut nvmlSample_t) |f| {
        query(f, device, None, false, |s, t| {
            let feature = match type_ {
                0 => Feature::PowerUsage,
                1 | 2 => Feature::Utilization,
                3 => Feature::EncoderUtilization,
                4 => Feature::DecoderUtilization,
                5 | 6 => Feature::Clocks,
                7..=15 => return Err(codes::NOT_SUPPORTED),
                _ => return Err(codes::INVALID_ARGUMENT),
            };
            let d = s.device(t);
            if d.unsupported(feature) || ((1..=4).contains(&type_) && d.mig_mode) {
                return Err(codes::NOT_SUPPORTED);
            }
            if sampleValType.is_null() || sampleCount.is_null() {
                return Err(codes::INVALID_ARGUMENT);
            }
            let now = series::sample_tick(s.now_us());
            let oldest = now.saturating_sub((MAX_SAMPLES - 1) * series::SAMPLE_PERIOD_US);
            let first = match lastSeenTimeStamp.checked_add(1) {
                Some(after) => oldest.max(after.div_ceil(series::SAMPLE_PERIOD_US) * series::SAMPLE_PERIOD_US),
                None => return Err(codes::NOT_FOUND),
            };
            let ticks: Vec<u64> = (first..=now).step_by(series::SAMPLE_PERIOD_US as usize).collect();
            if ticks.is_empty() {
                return Err(codes::NOT_FOUND);
            }
            // SAFETY: both pointers are non-null and valid (export contract).
            unsafe { sampleValType.write_unaligned(NVML_VALUE_TYPE_UNSIGNED_INT) };
            let available = c_uint::try_from(ticks.len()).map_err(|_| codes::UNKNOWN)?;
            if samples.is_null() {
                // SAFETY: as above.
                unsafe { sampleCount.write_unaligned(available) };
                return Ok(());
            }
            // SAFETY: as above.
            let room = unsafe { sampleCount.read_unaligned() } as usize;
            let keep = &ticks[ticks.len().saturating_sub(room)..];
            for (i, &tick) in keep.iter().enumerate() {
                let v = nvmlSample_t {
                    timeStamp: tick,
                    sampleValue: nvmlValue_t { uiVal: sample_value(s, t.gpu(), type_, tick) },
                };
                // SAFETY: `samples` holds `room` entries (export contract) and `i < room`.
                unsafe { samples.add(i).write_unaligned(v) };
            }
            let written = c_uint::try_from(keep.len()).map_err(|_| codes::UNKNOWN)?;
            // SAFETY: as above.
            unsafe { sampleCount.write_unaligned(written) };
            if keep.is_empty() {
                return Err(codes::INSUFFICIENT_SIZE);
            }
            Ok(())
        })
    }
}

// ---- events ---------------------------------------------------------------------------------

export! {
    /// A new event set.
    fn nvmlEventSetCreate(set: *mut nvmlEventSet_t) |f| {
        system(f, |_| {
            if set.is_null() {
                return Err(codes::INVALID_ARGUMENT);
            }
            let h = std::ptr::without_provenance_mut(events::create());
            // SAFETY: `set` is non-null and valid (export contract).
            unsafe { put(set, h) }
        })
    }
}

fn supported_events(d: &crate::scenario::Device) -> c_ulonglong {
    if d.unsupported(Feature::Ecc) {
        events::SUPPORTED_WITHOUT_ECC
    } else {
        events::SUPPORTED_WITH_ECC
    }
}

export! {
    /// Registers the GPU for `eventTypes` in `set`; types it cannot report: `NOT_SUPPORTED`.
    fn nvmlDeviceRegisterEvents(device: nvmlDevice_t, eventTypes: c_ulonglong, set: nvmlEventSet_t) |f| {
        query(f, device, Some(Feature::Events), false, |s, t| {
            if eventTypes & !supported_events(s.device(t)) != 0 {
                return Err(codes::NOT_SUPPORTED);
            }
            events::register(set as usize, t.gpu(), eventTypes)
        })
    }
}

export! {
    /// The event types the GPU reports: ECC (single and double bit, where it has ECC), P-state,
    /// XID and clock changes.
    fn nvmlDeviceGetSupportedEventTypes(device: nvmlDevice_t, eventTypes: *mut c_ulonglong) |f| {
        query(f, device, Some(Feature::Events), false, |s, t| {
            // SAFETY: `eventTypes` is null or valid (export contract).
            unsafe { put(eventTypes, supported_events(s.device(t))) }
        })
    }
}

/// Waits for the next event of `set` (no lock held while waiting).
fn event_wait(
    f: &str,
    set: nvmlEventSet_t,
    timeoutms: c_uint,
) -> Result<(events::Event, nvmlDevice_t), Code> {
    let sim = state::current()?;
    sim.inject(f, None)?;
    let timeout = std::time::Duration::from_millis(u64::from(timeoutms));
    let e = events::wait(set as usize, timeout, |gpu| {
        sim.scenario
            .devices
            .get(gpu)
            .map(|d| d.xid_events.clone())
            .unwrap_or_default()
    })?;
    Ok((e, handle_ptr(Target::Gpu(e.gpu))))
}

export! {
    /// The next event, waiting up to `timeoutms` ms; `NVML_ERROR_TIMEOUT` if none comes.
    fn nvmlEventSetWait_v2(set: nvmlEventSet_t, data: *mut nvmlEventData_t, timeoutms: c_uint) |f| {
        if data.is_null() {
            return Err(codes::INVALID_ARGUMENT);
        }
        let (e, device) = event_wait(f, set, timeoutms)?;
        let v = nvmlEventData_t {
            device,
            eventType: e.event_type,
            eventData: e.data,
            gpuInstanceId: state::NOT_AVAILABLE_U32,
            computeInstanceId: state::NOT_AVAILABLE_U32,
        };
        // SAFETY: `data` is valid (export contract).
        unsafe { put(data, v) }
    }
}

export! {
    /// `nvmlEventSetWait_v2` with the v1 `nvmlEventData_t` (no instance ids).
    fn nvmlEventSetWait(set: nvmlEventSet_t, data: *mut nvmlEventData_v1_t, timeoutms: c_uint) |f| {
        if data.is_null() {
            return Err(codes::INVALID_ARGUMENT);
        }
        let (e, device) = event_wait(f, set, timeoutms)?;
        let v = nvmlEventData_v1_t { device, eventType: e.event_type, eventData: e.data };
        // SAFETY: `data` is valid (export contract).
        unsafe { put(data, v) }
    }
}

export! {
    /// Frees the set; an unknown set: `INVALID_ARGUMENT`.
    fn nvmlEventSetFree(set: nvmlEventSet_t) |f| {
        system(f, |_| events::free(set as usize))
    }
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
        assert_eq!(size_of::<nvmlBAR1Memory_t>(), 24);
        assert_eq!(size_of::<nvmlProcessUtilizationSample_t>(), 32);
        assert_eq!(size_of::<nvmlValue_t>(), 8);
        assert_eq!(size_of::<nvmlFieldValue_t>(), 40);
        assert_eq!(size_of::<nvmlEventData_t>(), 32);
        assert_eq!(size_of::<nvmlSample_t>(), 16);
        assert_eq!(size_of::<nvmlEventData_v1_t>(), 24);
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
