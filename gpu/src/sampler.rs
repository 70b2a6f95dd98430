//! The sampler: loads NVML, enumerates GPUs, starts the XID thread, and samples every GPU on
//! demand with a bounded number of NVML calls.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;

use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;
use tracing::{info, warn};

use crate::calls::Calls;
use crate::device::{self, DeviceState};
use crate::error::{CallError, GpuError};
use crate::events::XidWatcher;
use crate::library::DEFAULT_LIBRARY;
use crate::raw::{device_of, RawDevice, RawNvml};
use crate::sample::{GpuSample, XidEvent};

/// How to reach NVML.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuOptions {
    /// The NVML library; `libnvidia-ml.so.1` through the dynamic loader when `None`.
    pub library: Option<PathBuf>,
}

/// Owns the NVML handle and every GPU's state between samples.
///
/// Every method blocks on NVML (a `sample()` makes a few dozen calls per GPU; a GPU in trouble
/// can make one take long), so the agent runs the sampler on a dedicated thread and never on
/// the async runtime or the scrape path. XID events arrive on a thread of the sampler's own,
/// stopped and joined when the sampler drops (within half a second).
#[derive(Debug)]
pub struct Sampler {
    // Field order is drop order: the XID thread stops (and frees its event set) before the
    // last `Nvml` reference shuts NVML down, and NVML shuts down before the raw bindings'
    // reference to the library goes.
    #[expect(
        dead_code,
        reason = "held for its Drop, which stops and joins the XID thread"
    )]
    xid_watcher: XidWatcher,
    nvml: Arc<Nvml>,
    raw: RawNvml,
    devices: Vec<DeviceState>,
    xids: Receiver<XidEvent>,
    /// Failures already logged once; later ones are only counted.
    logged: HashSet<CallError>,
    calls_last_sample: u64,
    driver_version: Option<String>,
}

impl Sampler {
    /// Loads and initialises NVML, enumerates the GPUs and starts the XID thread.
    ///
    /// A node without the library gets [`GpuError::LibraryNotFound`] (the agent logs it once
    /// and runs without GPU metrics); any other failure another variant. Nothing is logged
    /// here on failure.
    pub fn start(options: &GpuOptions) -> Result<Sampler, GpuError> {
        let path = options
            .library
            .as_deref()
            .map_or_else(|| OsStr::new(DEFAULT_LIBRARY), Path::as_os_str);
        let not_found = |source| GpuError::LibraryNotFound {
            path: path.to_string_lossy().into_owned(),
            source,
        };
        let nvml = Nvml::builder()
            .lib_path(path)
            .init()
            .map_err(|source| match source {
                NvmlError::LibloadingError(_) => not_found(source),
                source => GpuError::Init { source },
            })?;
        let raw = RawNvml::open(path).map_err(not_found)?;
        let driver_version = nvml.sys_driver_version().ok();
        let count = nvml.device_count().map_err(|source| GpuError::Call {
            call: "nvmlDeviceGetCount_v2",
            source,
        })?;
        let started_us = crate::device::now_us();
        let devices: Vec<DeviceState> = (0..count)
            .map(|index| start_device(&nvml, index, started_us))
            .collect();
        info!(
            driver_version = driver_version.as_deref().unwrap_or("unknown"),
            gpus = count,
            mps_query = raw.has_mps_processes(),
            "NVML ready"
        );
        let nvml = Arc::new(nvml);
        let (sender, xids) = mpsc::channel();
        let watched = devices
            .iter()
            .filter_map(|d| Some((d.handle?, d.gpu.uuid.clone())))
            .collect();
        let xid_watcher = XidWatcher::spawn(Arc::clone(&nvml), watched, sender)
            .map_err(|source| GpuError::EventThread { source })?;
        Ok(Sampler {
            xid_watcher,
            nvml,
            raw,
            devices,
            xids,
            logged: HashSet::new(),
            calls_last_sample: 0,
            driver_version,
        })
    }

    /// Reads every GPU once. Never panics; failed calls are in [`GpuSample::errors`] (each
    /// distinct call and code is logged once, then only counted).
    pub fn sample(&mut self) -> GpuSample {
        let mut calls = Calls::new(&mut self.logged);
        let devices = self
            .devices
            .iter_mut()
            .map(|dev| device::sample(&mut calls, &self.nvml, &self.raw, dev))
            .collect();
        self.calls_last_sample = calls.made;
        GpuSample {
            devices,
            errors: calls.errors,
        }
    }

    /// XID errors received since the last call.
    pub fn take_xids(&self) -> Vec<XidEvent> {
        self.xids.try_iter().collect()
    }

    /// NVML calls the last [`sample`](Self::sample) made (all GPUs together). Exact where
    /// calls succeed; a failed two-call list query counts as one call.
    pub fn calls_last_sample(&self) -> u64 {
        self.calls_last_sample
    }

    /// The driver version NVML reported at start.
    pub fn driver_version(&self) -> Option<&str> {
        self.driver_version.as_deref()
    }
}

/// A GPU's handle, UUID and name; a GPU that does not answer now is retried each tick.
fn start_device(nvml: &Nvml, index: u32, started_us: u64) -> DeviceState {
    let handle = match nvml.device_by_index(index) {
        // SAFETY: only the raw pointer is read; it stays owned by NVML.
        Ok(device) => Some(RawDevice(unsafe { device.handle() })),
        Err(e) => {
            warn!(index, error = %e, "GPU handle unavailable at start; retrying each tick");
            None
        }
    };
    let mut dev = DeviceState::new(index, handle, started_us);
    if let Some(handle) = handle {
        let device = device_of(nvml, handle);
        dev.gpu.uuid = device.uuid().unwrap_or_default();
        dev.name = device.name().unwrap_or_default();
    }
    dev
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>() {}

    #[test]
    fn the_sampler_can_move_to_its_own_thread() {
        assert_send::<Sampler>();
    }

    #[test]
    fn a_missing_library_is_library_not_found() {
        let err = Sampler::start(&GpuOptions {
            library: Some(PathBuf::from("/nonexistent/libnvidia-ml.so.1")),
        })
        .err();
        assert!(
            matches!(err, Some(GpuError::LibraryNotFound { .. })),
            "{err:?}"
        );
    }
}
