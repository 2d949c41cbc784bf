//! Real GPU memory for the demo: one allocation through the CUDA driver API (`libcuda`,
//! loaded at run time by `cudarc`, so nothing of CUDA is needed to build), on the device
//! with a given NVML UUID. Used only when `libcuda` loads and exports every entry point this
//! module calls; otherwise [`Allocation::new`] says why and the demo carries on without.

use std::fmt;

use cudarc::driver::{result, sys};

/// The driver entry points this module calls, checked before any is called (cudarc panics
/// on a missing one).
const SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetUuid",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxSetCurrent",
    "cuMemAlloc_v2",
    "cuMemsetD8_v2",
    "cuMemFree_v2",
];

/// Why there is no allocation.
#[derive(Debug)]
pub enum CudaError {
    /// No `libcuda` could be loaded: no NVIDIA driver here.
    NoDriver,
    /// `libcuda` lacks an entry point this module calls (a driver older than CUDA 11).
    Missing(&'static str),
    /// No CUDA device visible to this process has this UUID.
    NoDevice(String),
    /// A driver call failed.
    Call(&'static str, result::DriverError),
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoDriver => write!(f, "no CUDA driver (libcuda) could be loaded"),
            Self::Missing(name) => write!(f, "libcuda has no {name}: the driver is too old"),
            Self::NoDevice(uuid) => write!(f, "no visible CUDA device has UUID {uuid}"),
            Self::Call(what, e) => write!(f, "{what} failed: {e:?}"),
        }
    }
}

impl std::error::Error for CudaError {}

/// Whether `libcuda` loads and exports everything this module calls.
pub fn check_driver() -> Result<(), CudaError> {
    // SAFETY: loading libcuda runs its initialisers, which is what every CUDA program does;
    // `is_culib_present` only tries to open it, and `culib` is called only once that worked.
    let lib = unsafe {
        if !sys::is_culib_present() {
            return Err(CudaError::NoDriver);
        }
        sys::culib()
    };
    for name in SYMBOLS {
        // SAFETY: the symbol is only looked up, never called through this pointer.
        if unsafe { lib.get::<*const ()>(name.as_bytes()) }.is_err() {
            return Err(CudaError::Missing(name));
        }
    }
    Ok(())
}

/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as NVML writes a UUID, from its 16 bytes.
pub fn nvml_uuid(bytes: &[u8; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Device memory held until dropped, in the device's primary context.
#[derive(Debug)]
pub struct Allocation {
    device: sys::CUdevice,
    ptr: sys::CUdeviceptr,
    /// Bytes allocated.
    pub bytes: usize,
}

impl Allocation {
    /// Allocates `bytes` on the CUDA device whose UUID is `uuid` (NVML's form), and writes
    /// zeros over them, so that the memory is really resident.
    pub fn new(uuid: &str, bytes: usize) -> Result<Self, CudaError> {
        check_driver()?;
        let call = |what| move |e| CudaError::Call(what, e);
        result::init().map_err(call("cuInit"))?;
        let count = result::device::get_count().map_err(call("cuDeviceGetCount"))?;
        let mut found = None;
        for ordinal in 0..count {
            let dev = result::device::get(ordinal).map_err(call("cuDeviceGet"))?;
            let id = result::device::get_uuid(dev).map_err(call("cuDeviceGetUuid"))?;
            let raw: [u8; 16] = id.bytes.map(|b| b as u8);
            if nvml_uuid(&raw).eq_ignore_ascii_case(uuid) {
                found = Some(dev);
                break;
            }
        }
        let device = found.ok_or_else(|| CudaError::NoDevice(uuid.to_string()))?;
        // SAFETY: `device` is a valid device handle from cuDeviceGet; the context retained
        // here is released in Drop (or below, when the allocation fails).
        unsafe {
            let ctx =
                result::primary_ctx::retain(device).map_err(call("cuDevicePrimaryCtxRetain"))?;
            let allocated = result::ctx::set_current(ctx)
                .map_err(call("cuCtxSetCurrent"))
                .and_then(|()| result::malloc_sync(bytes).map_err(call("cuMemAlloc")));
            let ptr = match allocated {
                Ok(ptr) => ptr,
                Err(e) => {
                    let _ = result::primary_ctx::release(device);
                    return Err(e);
                }
            };
            let alloc = Self { device, ptr, bytes };
            result::memset_d8_sync(ptr, 0, bytes).map_err(call("cuMemsetD8"))?;
            Ok(alloc)
        }
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from cuMemAlloc in the primary context of `device`, which is
        // still current on this thread and retained by this value; both are freed once.
        unsafe {
            let _ = result::free_sync(self.ptr);
            let _ = result::primary_ctx::release(self.device);
        }
    }
}
