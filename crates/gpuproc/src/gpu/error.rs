//! The one error type of the GPU layer, with a kind for callers that branch on the cause.

use std::error::Error as StdError;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Why a GPU query failed.
///
/// Every kind has a predicate on [`GpuError`] (`is_no_library()`, `is_driver_not_loaded()`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum GpuErrorKind {
    /// `libnvidia-ml` could not be loaded (no NVIDIA driver installed, or `GPUPROC_NVML_LIB`
    /// points nowhere).
    NoLibrary,
    /// The library loaded but the NVIDIA kernel driver is not running.
    DriverNotLoaded,
    /// The installed driver is too old: its `libnvidia-ml` lacks a function gpuproc calls.
    MissingFunction,
    /// The GPU fell off the bus or is otherwise inaccessible.
    GpuLost,
    /// The driver refused the query for lack of permission.
    PermissionDenied,
    /// The device does not support the query.
    NotSupported,
    /// No device matches the index, UUID or PID asked for.
    NotFound,
    /// Any other failure reported by NVML.
    Nvml,
}

/// An error from the GPU layer: a [`GpuErrorKind`], one sentence saying what failed, and the
/// underlying NVML error as [`source()`](std::error::Error::source).
///
/// `GpuError` is cheap to clone, so the lazily initialised global handle can hand the same
/// initialisation error to every caller.
#[derive(Clone, thiserror::Error)]
#[error("{message}")]
pub struct GpuError {
    kind: GpuErrorKind,
    message: String,
    #[source]
    source: Option<Arc<dyn StdError + Send + Sync + 'static>>,
}

impl GpuError {
    pub(crate) fn new(kind: GpuErrorKind, message: impl Into<String>) -> Self {
        GpuError {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> GpuError {
        self.source = Some(Arc::new(source));
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> GpuErrorKind {
        self.kind
    }

    /// `libnvidia-ml` could not be loaded: there is no NVIDIA driver on this machine, or
    /// `GPUPROC_NVML_LIB` (or the builder's library path) points nowhere.
    pub fn is_no_library(&self) -> bool {
        self.kind == GpuErrorKind::NoLibrary
    }

    /// The NVIDIA kernel driver is not loaded.
    pub fn is_driver_not_loaded(&self) -> bool {
        self.kind == GpuErrorKind::DriverNotLoaded
    }

    /// No GPU information is available at all on this machine: no library or no driver.
    ///
    /// This is a normal state on machines without NVIDIA GPUs; the command-line tool exits
    /// with status 2 for it.
    pub fn is_no_driver(&self) -> bool {
        self.is_no_library() || self.is_driver_not_loaded()
    }

    /// The driver is too old: `libnvidia-ml` lacks a function gpuproc needs.
    pub fn is_missing_function(&self) -> bool {
        self.kind == GpuErrorKind::MissingFunction
    }

    /// The GPU fell off the bus or is otherwise inaccessible.
    pub fn is_gpu_lost(&self) -> bool {
        self.kind == GpuErrorKind::GpuLost
    }

    /// The driver refused the query for lack of permission.
    pub fn is_permission_denied(&self) -> bool {
        self.kind == GpuErrorKind::PermissionDenied
    }

    /// The device does not support the query.
    pub fn is_not_supported(&self) -> bool {
        self.kind == GpuErrorKind::NotSupported
    }

    /// No device matches what was asked for.
    pub fn is_not_found(&self) -> bool {
        self.kind == GpuErrorKind::NotFound
    }
}

/// Maps an NVML error to a [`GpuError`] whose sentence names what gpuproc was doing (`while`
/// is a phrase like "reading the memory of GPU 3").
pub(crate) fn from_nvml(err: nvml_wrapper::error::NvmlError, while_: &str) -> GpuError {
    use nvml_wrapper::error::NvmlError as E;
    // The NVML error is the source, unless the message already quotes it.
    let mut quoted = false;
    let (kind, message) = match &err {
        E::LibloadingError(_) | E::LibraryNotFound => (
            GpuErrorKind::NoLibrary,
            format!(
                "the NVIDIA management library (libnvidia-ml) could not be loaded while {while_}: \
                 is an NVIDIA driver installed (or does GPUPROC_NVML_LIB point at a library)?"
            ),
        ),
        E::DriverNotLoaded => (
            GpuErrorKind::DriverNotLoaded,
            format!(
                "the NVIDIA driver is not loaded, so no GPU information is available ({while_})"
            ),
        ),
        E::FailedToLoadSymbol(what) => {
            quoted = true;
            (
                GpuErrorKind::MissingFunction,
                format!(
                    "the NVIDIA driver is too old for {while_}: libnvidia-ml lacks a function \
                     ({what})"
                ),
            )
        }
        E::FunctionNotFound => (
            GpuErrorKind::MissingFunction,
            format!("the NVIDIA driver is too old for {while_}: libnvidia-ml lacks the function"),
        ),
        E::GpuLost => (
            GpuErrorKind::GpuLost,
            format!("the GPU fell off the bus or is otherwise inaccessible while {while_}"),
        ),
        E::NoPermission => (
            GpuErrorKind::PermissionDenied,
            format!("the NVIDIA driver denied permission while {while_}"),
        ),
        E::NotSupported => (
            GpuErrorKind::NotSupported,
            format!("the device does not support {while_}"),
        ),
        E::NotFound | E::InvalidArg => (
            GpuErrorKind::NotFound,
            format!("no such device while {while_}"),
        ),
        other => {
            quoted = true;
            (
                GpuErrorKind::Nvml,
                format!("NVML failed while {while_}: {other}"),
            )
        }
    };
    let error = GpuError::new(kind, message);
    if quoted {
        error
    } else {
        error.with_source(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvml_wrapper::error::NvmlError;
    use std::error::Error;

    #[test]
    fn kinds_and_predicates_follow_the_nvml_error() {
        let lost = from_nvml(NvmlError::GpuLost, "reading GPU 1");
        assert!(lost.is_gpu_lost());
        assert!(lost.to_string().contains("reading GPU 1"));
        assert!(lost.source().is_some());

        assert!(from_nvml(NvmlError::DriverNotLoaded, "x").is_no_driver());
        assert!(from_nvml(NvmlError::LibraryNotFound, "x").is_no_library());
        assert!(from_nvml(NvmlError::FunctionNotFound, "x").is_missing_function());
        let symbol = from_nvml(
            NvmlError::FailedToLoadSymbol("undefined symbol: nvmlFoo".into()),
            "x",
        );
        assert!(symbol.is_missing_function());
        assert!(symbol.to_string().contains("nvmlFoo"));
        // The message quotes the NVML error, so it is not also the source.
        assert!(symbol.source().is_none());
        let other = from_nvml(NvmlError::Unknown, "x");
        assert!(other.to_string().contains(&NvmlError::Unknown.to_string()));
        assert!(other.source().is_none());
        assert!(from_nvml(NvmlError::NoPermission, "x").is_permission_denied());
        assert!(from_nvml(NvmlError::NotSupported, "x").is_not_supported());
        assert!(from_nvml(NvmlError::NotFound, "x").is_not_found());
        assert_eq!(
            from_nvml(NvmlError::Unknown, "x").kind(),
            GpuErrorKind::Nvml
        );
    }

    #[test]
    fn clones_share_the_source() {
        let err = from_nvml(NvmlError::GpuLost, "x");
        let copy = err.clone();
        assert_eq!(copy.to_string(), err.to_string());
        assert!(copy.source().is_some());
        assert_eq!(copy.kind(), GpuErrorKind::GpuLost);
        // Debug reads as the message, then the NVML error it came from.
        assert_eq!(
            format!("{copy:?}"),
            format!("{copy}: {}", copy.source().unwrap())
        );
    }
}
