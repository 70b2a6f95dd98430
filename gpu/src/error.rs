//! Errors: `GpuError` for starting a sampler, `CallError` for one failed NVML call in a sample,
//! and the fixed set of error codes both report.

use nvml_wrapper::error::NvmlError;

/// Why a [`Sampler`](crate::Sampler) could not start.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The shared library could not be opened: no NVIDIA driver on this node (or a wrong path).
    #[error("NVML library {path} could not be loaded")]
    LibraryNotFound {
        path: String,
        #[source]
        source: NvmlError,
    },
    /// The library opened but `nvmlInit_v2` failed (driver not loaded, no permission, a missing
    /// init symbol).
    #[error("nvmlInit_v2 failed")]
    Init {
        #[source]
        source: NvmlError,
    },
    /// A call needed to enumerate devices failed.
    #[error("{call} failed")]
    Call {
        call: &'static str,
        #[source]
        source: NvmlError,
    },
    /// The XID event thread could not be spawned.
    #[error("spawning the NVML XID event thread failed")]
    EventThread {
        #[source]
        source: std::io::Error,
    },
}

/// One NVML call that failed during a [`sample`](crate::Sampler::sample). Both fields come from
/// small fixed sets, so they can be metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CallError {
    /// The NVML C function, e.g. `nvmlDeviceGetTemperature`.
    pub call: &'static str,
    /// NVML's error name in lower case without the prefix (`gpu_is_lost`, `unknown`, ...), or
    /// `symbol_missing` when the library lacks the function.
    pub code: &'static str,
}

/// Why per-process utilization samples are missing for a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unavailable {
    /// The device does not support it (MIG mode on, or an old GPU).
    NotSupported,
    /// The call failed with this code (see [`CallError::code`]).
    Error(&'static str),
}

/// The label-safe code for an NVML error.
pub fn error_code(error: &NvmlError) -> &'static str {
    match error {
        NvmlError::Uninitialized => "uninitialized",
        NvmlError::InvalidArg => "invalid_argument",
        NvmlError::NotSupported => "not_supported",
        NvmlError::NoPermission => "no_permission",
        NvmlError::NotFound => "not_found",
        NvmlError::InsufficientSize(_) => "insufficient_size",
        NvmlError::InsufficientPower => "insufficient_power",
        NvmlError::DriverNotLoaded => "driver_not_loaded",
        NvmlError::Timeout => "timeout",
        NvmlError::IrqIssue => "irq_issue",
        NvmlError::LibraryNotFound => "library_not_found",
        NvmlError::FunctionNotFound => "function_not_found",
        NvmlError::CorruptedInfoROM => "corrupted_inforom",
        NvmlError::GpuLost => "gpu_is_lost",
        NvmlError::ResetRequired => "reset_required",
        NvmlError::OperatingSystem => "operating_system",
        NvmlError::LibRmVersionMismatch => "lib_rm_version_mismatch",
        NvmlError::InUse => "in_use",
        NvmlError::InsufficientMemory => "memory",
        NvmlError::NoData => "no_data",
        NvmlError::VgpuEccNotSupported => "vgpu_ecc_not_supported",
        NvmlError::Unknown => "unknown",
        NvmlError::FailedToLoadSymbol(_) => "symbol_missing",
        NvmlError::LibloadingError(_) => "library_load",
        NvmlError::UnexpectedVariant(_) => "unexpected_return",
        NvmlError::Utf8Error(_) => "invalid_utf8",
        NvmlError::IncorrectBits(_) => "incorrect_bits",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_label_safe() {
        for e in [
            NvmlError::GpuLost,
            NvmlError::FailedToLoadSymbol("x".into()),
            NvmlError::InsufficientSize(Some(3)),
            NvmlError::Unknown,
        ] {
            let code = error_code(&e);
            assert!(
                code.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{code}"
            );
        }
        assert_eq!(error_code(&NvmlError::GpuLost), "gpu_is_lost");
        assert_eq!(
            error_code(&NvmlError::FailedToLoadSymbol("x".into())),
            "symbol_missing"
        );
    }
}
