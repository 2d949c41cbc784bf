//! Rust errors as Python exceptions: `GpuError` and its subclasses, with the Rust messages.
//!
//! The message of each exception is the Rust error's `Debug` (its message, then its causes),
//! which is what the `gpuproc` command prints after `gpuproc: `.

use gpuproc::gpu::{GpuError as RustGpuError, PickError};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::records;

create_exception!(
    gpuproc,
    GpuError,
    PyException,
    "A GPU query, pick or lease failed. The base of every gpuproc exception.\n\n\
     `kind` is the GPU layer's kind of failure (\"no_library\", \"driver_not_loaded\", \
     \"gpu_lost\", ...) when NVML failed, else None."
);
create_exception!(
    gpuproc,
    NoDriver,
    GpuError,
    "There is no NVIDIA driver (or NVML library) on this machine: no GPU information at all."
);
create_exception!(
    gpuproc,
    NoneFree,
    GpuError,
    "Too few GPUs qualified for a pick (after waiting, when asked to wait).\n\n\
     Attributes: `needed` (int), `reasons` (a list of Verdict, one per GPU in NVML order: \
     `index`, `uuid`, `reason`, `kind`, `permanent`), `waited` (seconds, or None) and \
     `impossible` (True when waiting cannot help)."
);
create_exception!(
    gpuproc,
    InvalidRequest,
    GpuError,
    "A pick that can never be met as asked: zero GPUs, a share limit of zero, a device list \
     naming an unknown GPU or one twice."
);
create_exception!(
    gpuproc,
    LeaseError,
    GpuError,
    "The lease table in the runtime directory could not be read, written or locked."
);

/// A GPU-layer error as a Python exception.
pub fn gpu_error(py: Python<'_>, e: &RustGpuError) -> PyErr {
    let message = format!("{e:?}");
    let err = if e.is_no_driver() {
        NoDriver::new_err(message)
    } else {
        GpuError::new_err(message)
    };
    let kind = serde_json::to_value(e.kind())
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned));
    // Setting an attribute on a fresh exception instance cannot fail but for lack of memory.
    let _ = err.value(py).setattr("kind", kind);
    err
}

/// A pick error as a Python exception.
pub fn pick_error(py: Python<'_>, e: &PickError) -> PyErr {
    if let Some(g) = e.gpu_error() {
        return gpu_error(py, g);
    }
    let message = format!("{e:?}");
    let err = if let Some(why) = e.unavailable() {
        let err = NoneFree::new_err(message);
        if let Err(fail) = set_reasons(py, &err, why) {
            return fail;
        }
        err
    } else if e.is_invalid() {
        InvalidRequest::new_err(message)
    } else {
        LeaseError::new_err(message)
    };
    let _ = err.value(py).setattr("kind", py.None());
    err
}

fn set_reasons(py: Python<'_>, err: &PyErr, why: &gpuproc::gpu::Unavailable) -> PyResult<()> {
    let value = err.value(py);
    let reasons = why
        .devices
        .iter()
        .map(|v| records::verdict(py, v))
        .collect::<PyResult<Vec<_>>>()?;
    value.setattr("needed", why.needed)?;
    value.setattr("reasons", PyList::new(py, reasons)?)?;
    value.setattr("waited", why.waited.map(|w| w.as_secs_f64()))?;
    value.setattr("impossible", why.is_impossible())?;
    Ok(())
}

/// Registers the exceptions in the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("GpuError", py.get_type::<GpuError>())?;
    m.add("NoDriver", py.get_type::<NoDriver>())?;
    m.add("NoneFree", py.get_type::<NoneFree>())?;
    m.add("InvalidRequest", py.get_type::<InvalidRequest>())?;
    m.add("LeaseError", py.get_type::<LeaseError>())?;
    Ok(())
}
