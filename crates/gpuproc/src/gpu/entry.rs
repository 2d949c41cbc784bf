//! NVML queries that nvml-wrapper lacks, or has in one version only: symbols resolved from
//! the same loaded library, each call falling back to an older entry point when the driver
//! lacks the newer one, as gpustat and nvitop do after driver upgrades broke them.
//!
//! The fallback order is newest first: `nvmlDevice{Compute,Graphics}RunningProcesses_v3`,
//! `_v2`, then the unversioned call; `nvmlDeviceGetMemoryInfo_v2`, then
//! `nvmlDeviceGetMemoryInfo`; `nvmlDeviceGetCurrentClocksEventReasons`, then its old name
//! `nvmlDeviceGetCurrentClocksThrottleReasons`. An entry point is skipped when the library
//! does not export it or when it answers `NVML_ERROR_FUNCTION_NOT_FOUND`.

use std::collections::HashMap;
use std::os::raw::{c_int, c_uint, c_ulonglong};
use std::ptr;

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::{MemoryInfo, ProcessInfo, ProcessUtilizationSample};
use nvml_wrapper::{Device as NvDevice, Nvml};
use nvml_wrapper_sys::bindings::{
    nvmlDevice_t, nvmlFieldValue_t, nvmlMemory_t, nvmlProcessInfo_t, nvmlProcessInfo_v1_t,
    nvmlReturn_t,
};

use super::types::{NvLink, ProcessUtilization, RemappedRows, RetiredPages};

const SUCCESS: nvmlReturn_t = 0;
const INSUFFICIENT_SIZE: nvmlReturn_t = 7;
const FUNCTION_NOT_FOUND: nvmlReturn_t = 13;

type ListV1 =
    unsafe extern "C" fn(nvmlDevice_t, *mut c_uint, *mut nvmlProcessInfo_v1_t) -> nvmlReturn_t;
type ListV2 =
    unsafe extern "C" fn(nvmlDevice_t, *mut c_uint, *mut nvmlProcessInfo_t) -> nvmlReturn_t;

/// Which process list a query asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ListKind {
    Compute,
    Graphics,
}

/// The older entry points, resolved once when the library is opened (nvml-wrapper only
/// binds them behind a feature).
#[derive(Debug, Default)]
pub(super) struct Entries {
    compute_v2: Option<ListV2>,
    compute_v1: Option<ListV1>,
    graphics_v2: Option<ListV2>,
    graphics_v1: Option<ListV1>,
}

impl Entries {
    pub(super) fn resolve(nvml: &Nvml) -> Entries {
        let lib = &nvml.lib().__library;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the symbol, when present, is the NVML function of that name, whose
                // C signature is the type asked for (nvml.h); the library stays loaded for as
                // long as `nvml` lives, which owns these pointers' users (`Gpus`).
                unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                    .ok()
                    .map(|s| *s)
            };
        }
        Entries {
            compute_v2: sym!("nvmlDeviceGetComputeRunningProcesses_v2"),
            compute_v1: sym!("nvmlDeviceGetComputeRunningProcesses"),
            graphics_v2: sym!("nvmlDeviceGetGraphicsRunningProcesses_v2"),
            graphics_v1: sym!("nvmlDeviceGetGraphicsRunningProcesses"),
        }
    }
}

/// Whether an answer means "this entry point is not there": try an older one.
fn missing(e: &NvmlError) -> bool {
    matches!(
        e,
        NvmlError::FailedToLoadSymbol(_) | NvmlError::FunctionNotFound
    )
}

fn check(rc: nvmlReturn_t) -> Result<(), NvmlError> {
    if rc == SUCCESS {
        Ok(())
    } else {
        Err(NvmlError::from(rc))
    }
}

/// Calls a process-list entry point: first for the count, then with room for a few more
/// processes than counted, retrying while processes keep appearing.
///
/// # Safety
/// `f` must be an NVML process-list function whose entries are `T`, and `device` a live
/// handle of the library `f` came from.
unsafe fn list<T: Copy>(
    f: unsafe extern "C" fn(nvmlDevice_t, *mut c_uint, *mut T) -> nvmlReturn_t,
    device: nvmlDevice_t,
    zero: T,
) -> Result<Vec<T>, NvmlError> {
    let mut count: c_uint = 0;
    // SAFETY: a null buffer with a count of 0 asks for the count (nvml.h).
    match unsafe { f(device, &mut count, ptr::null_mut()) } {
        SUCCESS => return Ok(Vec::new()),
        INSUFFICIENT_SIZE => {}
        rc => return Err(NvmlError::from(rc)),
    }
    for _ in 0..4 {
        let room = count.saturating_add(8);
        let mut out = vec![zero; room as usize];
        let mut n = room;
        // SAFETY: `out` has room for `n` entries of the layout `f` writes.
        match unsafe { f(device, &mut n, out.as_mut_ptr()) } {
            SUCCESS => {
                out.truncate((n as usize).min(out.len()));
                return Ok(out);
            }
            INSUFFICIENT_SIZE => count = n.max(room),
            rc => return Err(NvmlError::from(rc)),
        }
    }
    Err(NvmlError::InsufficientSize(Some(count as usize)))
}

fn from_v1(p: nvmlProcessInfo_v1_t) -> ProcessInfo {
    ProcessInfo {
        pid: p.pid,
        used_gpu_memory: used(p.usedGpuMemory),
        gpu_instance_id: None,
        compute_instance_id: None,
    }
}

fn used(bytes: c_ulonglong) -> UsedGpuMemory {
    // NVML_VALUE_NOT_AVAILABLE: (unsigned long long)-1.
    if bytes == u64::MAX {
        UsedGpuMemory::Unavailable
    } else {
        UsedGpuMemory::Used(bytes)
    }
}

/// The processes with a context of `kind` on `device`, through the newest entry point the
/// library has.
pub(super) fn running_processes(
    entries: &Entries,
    device: &NvDevice<'_>,
    kind: ListKind,
) -> Result<Vec<ProcessInfo>, NvmlError> {
    let v3 = match kind {
        ListKind::Compute => device.running_compute_processes(),
        ListKind::Graphics => device.running_graphics_processes(),
    };
    match v3 {
        Err(e) if missing(&e) => {}
        other => return other,
    }
    let (v2, v1) = match kind {
        ListKind::Compute => (entries.compute_v2, entries.compute_v1),
        ListKind::Graphics => (entries.graphics_v2, entries.graphics_v1),
    };
    if let Some(f) = v2 {
        // SAFETY: `f` is the `_v2` list function of the library `device` belongs to, whose
        // entries are `nvmlProcessInfo_v2_t` (= `nvmlProcessInfo_t`); all-zero is a valid
        // value of that plain C struct.
        let zero: nvmlProcessInfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `device.handle()` is live while `device` is.
        match unsafe { list(f, device.handle(), zero) } {
            Err(e) if missing(&e) => {}
            other => return other.map(|v| v.into_iter().map(ProcessInfo::from).collect()),
        }
    }
    if let Some(f) = v1 {
        let zero = nvmlProcessInfo_v1_t {
            pid: 0,
            usedGpuMemory: 0,
        };
        // SAFETY: `f` is the unversioned list function, whose entries are
        // `nvmlProcessInfo_v1_t`; `device.handle()` is live while `device` is.
        return unsafe { list(f, device.handle(), zero) }
            .map(|v| v.into_iter().map(from_v1).collect());
    }
    Err(NvmlError::FunctionNotFound)
}

/// Frame-buffer memory through `nvmlDeviceGetMemoryInfo_v2` (used memory without the
/// driver's reservation), else the unversioned call (used memory including it).
pub(super) fn memory_info(nvml: &Nvml, device: &NvDevice<'_>) -> Result<MemoryInfo, NvmlError> {
    match device.memory_info() {
        Err(e) if missing(&e) => {}
        other => return other,
    }
    let f = nvml
        .lib()
        .nvmlDeviceGetMemoryInfo
        .as_ref()
        .map_err(|_| NvmlError::FunctionNotFound)?;
    let mut m = nvmlMemory_t {
        total: 0,
        free: 0,
        used: 0,
    };
    // SAFETY: `device` is a live handle of this library; the function writes one
    // `nvmlMemory_t` through the pointer, which points at a local.
    check(unsafe { f(device.handle(), &mut m) })?;
    Ok(MemoryInfo {
        free: m.free,
        reserved: 0,
        total: m.total,
        used: m.used,
        version: 1,
    })
}

/// The clock event (throttle) reason mask, through the current name of the call or its
/// older one.
pub(super) fn clock_event_reasons(nvml: &Nvml, device: &NvDevice<'_>) -> Option<u64> {
    let lib = nvml.lib();
    for f in [
        lib.nvmlDeviceGetCurrentClocksEventReasons.as_ref(),
        lib.nvmlDeviceGetCurrentClocksThrottleReasons.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        let mut mask: c_ulonglong = 0;
        // SAFETY: `device` is a live handle of this library; the function writes one
        // unsigned long long through the pointer, which points at a local.
        match unsafe { f(device.handle(), &mut mask) } {
            SUCCESS => return Some(mask),
            FUNCTION_NOT_FOUND => continue,
            _ => return None,
        }
    }
    None
}

/// Remapped rows (Ampere and later); nvml-wrapper has no call for them.
pub(super) fn remapped_rows(nvml: &Nvml, device: &NvDevice<'_>) -> Option<RemappedRows> {
    let f = nvml.lib().nvmlDeviceGetRemappedRows.as_ref().ok()?;
    let (mut corr, mut unc, mut pending, mut failure): (c_uint, c_uint, c_uint, c_uint) =
        (0, 0, 0, 0);
    // SAFETY: `device` is a live handle of this library; the function writes one unsigned
    // int through each pointer, each pointing at a local.
    let rc = unsafe {
        f(
            device.handle(),
            &mut corr,
            &mut unc,
            &mut pending,
            &mut failure,
        )
    };
    (rc == SUCCESS).then_some(RemappedRows {
        correctable: corr,
        uncorrectable: unc,
        pending: pending != 0,
        failure: failure != 0,
    })
}

/// Pages retired after single- and double-bit errors, and whether more are pending.
pub(super) fn retired_pages(nvml: &Nvml, device: &NvDevice<'_>) -> Option<RetiredPages> {
    let lib = nvml.lib();
    let f = lib.nvmlDeviceGetRetiredPages.as_ref().ok()?;
    let count = |cause| {
        let mut n: c_uint = 0;
        // SAFETY: `device` is a live handle of this library; a null address buffer with a
        // count of 0 asks for the count only (nvml.h).
        match unsafe { f(device.handle(), cause, &mut n, ptr::null_mut()) } {
            SUCCESS | INSUFFICIENT_SIZE => Some(n),
            _ => None,
        }
    };
    // NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS = 0, _DOUBLE_BIT_ECC_ERROR = 1.
    let single_bit = count(0)?;
    let double_bit = count(1)?;
    let pending = device.are_pages_pending_retired().ok();
    Some(RetiredPages {
        single_bit,
        double_bit,
        pending,
    })
}

/// NVML field ids (nvml.h).
mod field {
    pub const NVLINK_LINK_COUNT: u32 = 91;
    pub const NVLINK_THROUGHPUT_DATA_TX: u32 = 138;
    pub const NVLINK_THROUGHPUT_DATA_RX: u32 = 139;
}

/// The most NVLink links a GPU has (`NVML_NVLINK_MAX_LINKS`).
const MAX_LINKS: u32 = 18;

/// Reads field values with scopes; each answer is the value, or `None` where that field
/// failed.
fn fields(nvml: &Nvml, device: &NvDevice<'_>, ids: &[(u32, u32)]) -> Option<Vec<Option<u64>>> {
    let f = nvml.lib().nvmlDeviceGetFieldValues.as_ref().ok()?;
    let mut values: Vec<nvmlFieldValue_t> = ids
        .iter()
        .map(|&(id, scope)| {
            // SAFETY: all-zero is a valid `nvmlFieldValue_t` (plain C struct and union).
            let mut v: nvmlFieldValue_t = unsafe { std::mem::zeroed() };
            v.fieldId = id;
            v.scopeId = scope;
            v
        })
        .collect();
    let n = c_int::try_from(values.len()).ok()?;
    // SAFETY: `values` holds `n` entries with their ids set; the function fills them in.
    let rc = unsafe { f(device.handle(), n, values.as_mut_ptr()) };
    if rc != SUCCESS {
        return None;
    }
    Some(
        values
            .iter()
            .map(|v| {
                if v.nvmlReturn != SUCCESS {
                    return None;
                }
                // SAFETY: `valueType` says which member of the union the driver wrote.
                unsafe {
                    match v.valueType {
                        1 => Some(u64::from(v.value.uiVal)),
                        2 => Some(v.value.ulVal),
                        3 => Some(v.value.ullVal),
                        4 => u64::try_from(v.value.sllVal).ok(),
                        5 => u64::try_from(v.value.siVal).ok(),
                        _ => None,
                    }
                }
            })
            .collect(),
    )
}

/// NVLink: each link's state, and the data sent and received over all links since boot.
pub(super) fn nvlink(nvml: &Nvml, device: &NvDevice<'_>) -> Option<NvLink> {
    let count = fields(nvml, device, &[(field::NVLINK_LINK_COUNT, 0)])
        .and_then(|v| v.first().copied().flatten())
        .and_then(|n| u32::try_from(n).ok())
        .map(|n| n.min(MAX_LINKS));
    let mut links = Vec::new();
    for link in 0..count.unwrap_or(MAX_LINKS) {
        match device.link_wrapper_for(link).is_active() {
            Ok(up) => links.push(up),
            // Past the last link (when the count is unknown) or no NVLink at all.
            Err(_) => break,
        }
    }
    if links.is_empty() {
        return None;
    }
    let n = u32::try_from(links.len()).unwrap_or(MAX_LINKS);
    let ids: Vec<(u32, u32)> = (0..n)
        .map(|l| (field::NVLINK_THROUGHPUT_DATA_TX, l))
        .chain((0..n).map(|l| (field::NVLINK_THROUGHPUT_DATA_RX, l)))
        .collect();
    let (tx_kib, rx_kib) = match fields(nvml, device, &ids) {
        Some(v) => {
            let (tx, rx) = v.split_at(links.len());
            (sum(tx), sum(rx))
        }
        None => (None, None),
    };
    Some(NvLink {
        links,
        tx_kib,
        rx_kib,
    })
}

/// The sum of the values, `None` unless every one is known.
fn sum(values: &[Option<u64>]) -> Option<u64> {
    values
        .iter()
        .try_fold(0u64, |acc, v| v.map(|v| acc.saturating_add(v)))
}

/// Per-process utilisation samples of one device, kept between snapshots: each query asks
/// the driver only for samples newer than the newest one seen, as nvtop does.
#[derive(Debug, Default)]
pub(super) struct UtilizationCache {
    last_seen_us: u64,
    latest: HashMap<u32, ProcessUtilization>,
}

impl UtilizationCache {
    /// Queries the driver for samples since the last one seen and returns each process's
    /// newest sample; when the driver has nothing newer, the previous answer stands.
    ///
    /// `Err` only for `NOT_SUPPORTED` and other failures that mean "no per-process figures
    /// on this device"; the caller then reports `None`.
    pub(super) fn update(
        &mut self,
        device: &NvDevice<'_>,
    ) -> Result<&HashMap<u32, ProcessUtilization>, NvmlError> {
        match device.process_utilization_stats(self.last_seen_us) {
            Ok(samples) => {
                if !samples.is_empty() {
                    self.latest = latest_samples(&samples);
                    self.last_seen_us = samples
                        .iter()
                        .map(|s| s.timestamp)
                        .max()
                        .unwrap_or(self.last_seen_us);
                }
                Ok(&self.latest)
            }
            // Nothing since the last sample seen (or no process at all).
            Err(NvmlError::NotFound) => Ok(&self.latest),
            Err(e) => {
                *self = UtilizationCache::default();
                Err(e)
            }
        }
    }
}

/// Each process's newest sample, with figures over 100% dropped (`None`).
pub(super) fn latest_samples(
    samples: &[ProcessUtilizationSample],
) -> HashMap<u32, ProcessUtilization> {
    let percent = |v: u32| (v <= 100).then_some(v);
    let mut out: HashMap<u32, ProcessUtilization> = HashMap::new();
    for s in samples {
        let sample = ProcessUtilization {
            sm: percent(s.sm_util),
            memory: percent(s.mem_util),
            encoder: percent(s.enc_util),
            decoder: percent(s.dec_util),
            timestamp_us: s.timestamp,
        };
        out.entry(s.pid)
            .and_modify(|e| {
                if s.timestamp >= e.timestamp_us {
                    *e = sample;
                }
            })
            .or_insert(sample);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(pid: u32, timestamp: u64, sm: u32, mem: u32) -> ProcessUtilizationSample {
        ProcessUtilizationSample {
            pid,
            timestamp,
            sm_util: sm,
            mem_util: mem,
            enc_util: 0,
            dec_util: 101,
        }
    }

    #[test]
    fn newest_sample_per_process_wins_and_over_100_is_dropped() {
        let got = latest_samples(&[
            sample(7, 200, 40, 10),
            sample(7, 100, 90, 90),
            sample(8, 150, 250, 30),
            sample(7, 300, 45, 12),
        ]);
        assert_eq!(got.len(), 2);
        let seven = got[&7];
        assert_eq!(
            (seven.sm, seven.memory, seven.timestamp_us),
            (Some(45), Some(12), 300)
        );
        assert_eq!(seven.encoder, Some(0));
        assert_eq!(seven.decoder, None);
        assert_eq!(got[&8].sm, None);
        assert_eq!(got[&8].memory, Some(30));
    }

    #[test]
    fn sums_need_every_value() {
        assert_eq!(sum(&[Some(1), Some(2)]), Some(3));
        assert_eq!(sum(&[Some(1), None]), None);
        assert_eq!(sum(&[Some(u64::MAX), Some(1)]), Some(u64::MAX));
    }
}
