//! NVML return codes (`nvmlReturn_t`) with their header names and `nvmlErrorString` texts.

use std::ffi::CStr;
use std::fmt;

/// An `nvmlReturn_t` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Code(pub u32);

/// `NVML_SUCCESS`.
pub const SUCCESS: Code = Code(0);
/// `NVML_ERROR_UNINITIALIZED`.
pub const UNINITIALIZED: Code = Code(1);
/// `NVML_ERROR_INVALID_ARGUMENT`.
pub const INVALID_ARGUMENT: Code = Code(2);
/// `NVML_ERROR_NOT_SUPPORTED`.
pub const NOT_SUPPORTED: Code = Code(3);
/// `NVML_ERROR_NO_PERMISSION`.
pub const NO_PERMISSION: Code = Code(4);
/// `NVML_ERROR_NOT_FOUND`.
pub const NOT_FOUND: Code = Code(6);
/// `NVML_ERROR_INSUFFICIENT_SIZE`.
pub const INSUFFICIENT_SIZE: Code = Code(7);
/// `NVML_ERROR_DRIVER_NOT_LOADED`.
pub const DRIVER_NOT_LOADED: Code = Code(9);
/// `NVML_ERROR_TIMEOUT`.
pub const TIMEOUT: Code = Code(10);
/// `NVML_ERROR_GPU_IS_LOST`.
pub const GPU_IS_LOST: Code = Code(15);
/// `NVML_ERROR_ARGUMENT_VERSION_MISMATCH`.
pub const ARGUMENT_VERSION_MISMATCH: Code = Code(25);
/// `NVML_ERROR_UNKNOWN`.
pub const UNKNOWN: Code = Code(999);

/// Every code in nvml.h: value, name without the `NVML_ERROR_` prefix, `nvmlErrorString` text.
const TABLE: &[(u32, &str, &CStr)] = &[
    (0, "SUCCESS", c"Success"),
    (1, "UNINITIALIZED", c"Uninitialized"),
    (2, "INVALID_ARGUMENT", c"Invalid Argument"),
    (3, "NOT_SUPPORTED", c"Not Supported"),
    (4, "NO_PERMISSION", c"Insufficient Permissions"),
    (5, "ALREADY_INITIALIZED", c"Already Initialized"),
    (6, "NOT_FOUND", c"Not Found"),
    (7, "INSUFFICIENT_SIZE", c"Insufficient Size"),
    (8, "INSUFFICIENT_POWER", c"Insufficient External Power"),
    (9, "DRIVER_NOT_LOADED", c"Driver Not Loaded"),
    (10, "TIMEOUT", c"Timeout"),
    (11, "IRQ_ISSUE", c"Interrupt Request Issue"),
    (12, "LIBRARY_NOT_FOUND", c"NVML Shared Library Not Found"),
    (13, "FUNCTION_NOT_FOUND", c"Function Not Found"),
    (14, "CORRUPTED_INFOROM", c"Corrupted infoROM"),
    (15, "GPU_IS_LOST", c"GPU is lost"),
    (16, "RESET_REQUIRED", c"GPU requires restart"),
    (
        17,
        "OPERATING_SYSTEM",
        c"The operating system has blocked the request.",
    ),
    (
        18,
        "LIB_RM_VERSION_MISMATCH",
        c"RM has detected an NVML/RM version mismatch.",
    ),
    (19, "IN_USE", c"In use by another client"),
    (20, "MEMORY", c"Insufficient Memory"),
    (21, "NO_DATA", c"No data"),
    (22, "VGPU_ECC_NOT_SUPPORTED", c"vGPU ECC not supported"),
    (23, "INSUFFICIENT_RESOURCES", c"Insufficient resources"),
    (24, "FREQ_NOT_SUPPORTED", c"Frequency not supported"),
    (
        25,
        "ARGUMENT_VERSION_MISMATCH",
        c"Argument version mismatch",
    ),
    (26, "DEPRECATED", c"Deprecated"),
    (27, "NOT_READY", c"Not ready"),
    (28, "GPU_NOT_FOUND", c"GPU not found"),
    (29, "INVALID_STATE", c"Invalid state"),
    (30, "RESET_TYPE_NOT_SUPPORTED", c"Reset type not supported"),
    (999, "UNKNOWN", c"Unknown Error"),
];

impl Code {
    /// Parses `GPU_IS_LOST`, `NVML_ERROR_GPU_IS_LOST` or `gpu_is_lost`.
    pub fn from_name(name: &str) -> Option<Code> {
        let upper = name.trim().to_ascii_uppercase();
        let short = upper
            .strip_prefix("NVML_ERROR_")
            .or_else(|| upper.strip_prefix("NVML_"))
            .unwrap_or(&upper);
        TABLE
            .iter()
            .find(|(_, n, _)| *n == short)
            .map(|&(v, _, _)| Code(v))
    }

    /// The header name without the `NVML_ERROR_` prefix, if the code is known.
    pub fn name(self) -> Option<&'static str> {
        TABLE.iter().find(|(v, _, _)| *v == self.0).map(|t| t.1)
    }

    /// The text `nvmlErrorString` returns for this code.
    pub fn message(self) -> &'static CStr {
        TABLE
            .iter()
            .find(|(v, _, _)| *v == self.0)
            .map_or(c"Unknown Error", |t| t.2)
    }

    /// All names accepted by [`Code::from_name`] (short forms), for error messages.
    pub fn names() -> impl Iterator<Item = &'static str> {
        TABLE.iter().map(|t| t.1)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "NVML_ERROR_{n} ({})", self.0),
            None => write!(f, "NVML return code {}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(Code::from_name("gpu_is_lost"), Some(GPU_IS_LOST));
        assert_eq!(
            Code::from_name("NVML_ERROR_DRIVER_NOT_LOADED"),
            Some(DRIVER_NOT_LOADED)
        );
        assert_eq!(Code::from_name("nope"), None);
        assert_eq!(UNKNOWN.message(), c"Unknown Error");
        assert_eq!(Code(12345).message(), c"Unknown Error");
        assert_eq!(NOT_FOUND.to_string(), "NVML_ERROR_NOT_FOUND (6)");
    }
}
