//! Loading NVML: the library's default name, and the probe `tally check` runs.

use std::path::Path;

use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;

/// The library name NVML's own loaders use.
pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

/// What loading NVML found on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LibraryStatus {
    /// Loaded and initialised; `devices` GPUs visible, driver version as NVML reports it.
    Ready {
        devices: u32,
        driver_version: String,
    },
    /// The shared library could not be opened (no driver installed).
    NotFound { detail: String },
    /// The library opened but a symbol or initialisation failed.
    Failed { detail: String },
}

/// Loads NVML from `library` (or the default name through the dynamic loader), initialises it,
/// counts devices and shuts it down again.
pub fn probe_library(library: Option<&Path>) -> LibraryStatus {
    let builder = {
        let mut b = Nvml::builder();
        if let Some(path) = library {
            b.lib_path(path.as_os_str());
        }
        b
    };
    let nvml = match builder.init() {
        Ok(nvml) => nvml,
        Err(NvmlError::LibloadingError(e)) => {
            return LibraryStatus::NotFound {
                detail: e.to_string(),
            }
        }
        Err(e) => {
            return LibraryStatus::Failed {
                detail: e.to_string(),
            }
        }
    };
    let devices = nvml.device_count();
    let driver = nvml.sys_driver_version();
    match (devices, driver) {
        (Ok(devices), Ok(driver_version)) => LibraryStatus::Ready {
            devices,
            driver_version,
        },
        (Err(e), _) | (_, Err(e)) => LibraryStatus::Failed {
            detail: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_not_found_not_a_panic() {
        let status = probe_library(Some(Path::new("/nonexistent/libnvidia-ml.so.1")));
        assert!(
            matches!(status, LibraryStatus::NotFound { .. }),
            "got {status:?}"
        );
    }
}
