//! Bookkeeping of one `sample()`: how many NVML calls it made, which failed, which are not
//! supported per device (and so are not made again), and which failures were already logged.

use std::collections::HashSet;

use nvml_wrapper::error::NvmlError;
use tracing::{debug, warn};

use crate::error::{error_code, CallError, Unavailable};
use crate::raw::RawDevice;

/// What the sampler remembers about one GPU between ticks.
#[derive(Debug)]
pub(crate) struct DeviceState {
    pub(crate) index: u32,
    /// `None` until `nvmlDeviceGetHandleByIndex_v2` has answered.
    pub(crate) handle: Option<RawDevice>,
    pub(crate) uuid: String,
    pub(crate) name: String,
    /// Calls that answered `NOT_SUPPORTED`; not made again until the MIG mode changes.
    pub(crate) unsupported: HashSet<&'static str>,
    /// Field ids that answered `NOT_SUPPORTED`.
    pub(crate) unsupported_fields: HashSet<u32>,
    /// `GPU_IS_LOST` seen this tick: the remaining calls are skipped.
    pub(crate) lost_now: bool,
    /// Lost at the end of the previous tick (to log the change only).
    pub(crate) was_lost: bool,
    pub(crate) mig: crate::mig::MigState,
    pub(crate) processes: crate::process::ProcessState,
}

impl DeviceState {
    pub(crate) fn new(index: u32, handle: Option<RawDevice>, started_us: u64) -> DeviceState {
        DeviceState {
            index,
            handle,
            uuid: String::new(),
            name: String::new(),
            unsupported: HashSet::new(),
            unsupported_fields: HashSet::new(),
            lost_now: false,
            was_lost: false,
            mig: crate::mig::MigState::default(),
            processes: crate::process::ProcessState::new(started_us),
        }
    }
}

/// Why a call gave no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    NotSupported,
    /// Skipped: the GPU was lost earlier in this tick, or answered `GPU_IS_LOST` now.
    Lost,
    Failed(&'static str),
}

impl Failure {
    pub(crate) fn unavailable(self) -> Unavailable {
        match self {
            Failure::NotSupported => Unavailable::NotSupported,
            Failure::Lost => Unavailable::Error("gpu_is_lost"),
            Failure::Failed(code) => Unavailable::Error(code),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Tick<'a> {
    pub(crate) calls: u64,
    pub(crate) errors: Vec<CallError>,
    logged: &'a mut HashSet<CallError>,
}

impl<'a> Tick<'a> {
    pub(crate) fn new(logged: &'a mut HashSet<CallError>) -> Tick<'a> {
        Tick {
            calls: 0,
            errors: Vec::new(),
            logged,
        }
    }

    /// Why `call` is not to be made on `dev` now, if it is not.
    pub(crate) fn skip(&self, dev: &DeviceState, call: &'static str) -> Option<Failure> {
        if dev.lost_now {
            Some(Failure::Lost)
        } else if dev.unsupported.contains(call) {
            Some(Failure::NotSupported)
        } else {
            None
        }
    }

    /// Makes one single-call query unless skipped, and records it.
    pub(crate) fn get<T>(
        &mut self,
        dev: &mut DeviceState,
        call: &'static str,
        query: impl FnOnce() -> Result<T, NvmlError>,
    ) -> Option<T> {
        if self.skip(dev, call).is_some() {
            return None;
        }
        self.record(dev, call, 1, query()).ok()
    }

    /// Records the result of `calls` NVML calls made under the name `call`: counts them,
    /// remembers `NOT_SUPPORTED`, marks a lost GPU, counts (and logs once) other failures.
    pub(crate) fn record<T>(
        &mut self,
        dev: &mut DeviceState,
        call: &'static str,
        calls: u64,
        result: Result<T, NvmlError>,
    ) -> Result<T, Failure> {
        self.record_with(dev, call, calls, result, true)
    }

    /// As [`record`](Self::record), but `NOT_SUPPORTED` is not remembered: for calls on MIG
    /// devices (whose answers must not silence the GPU's own) and for calls whose support
    /// changes at run time (accounting mode).
    pub(crate) fn record_uncached<T>(
        &mut self,
        dev: &mut DeviceState,
        call: &'static str,
        calls: u64,
        result: Result<T, NvmlError>,
    ) -> Result<T, Failure> {
        self.record_with(dev, call, calls, result, false)
    }

    /// Counts calls whose answer is not a failure (`NOT_FOUND` where it means "nothing new").
    pub(crate) fn counted(&mut self, calls: u64) {
        self.calls += calls;
    }

    fn record_with<T>(
        &mut self,
        dev: &mut DeviceState,
        call: &'static str,
        calls: u64,
        result: Result<T, NvmlError>,
        cache_unsupported: bool,
    ) -> Result<T, Failure> {
        let error = match result {
            Ok(value) => {
                self.calls += calls;
                return Ok(value);
            }
            Err(error) => error,
        };
        // A missing symbol makes no call into the library.
        if !matches!(error, NvmlError::FailedToLoadSymbol(_)) {
            self.calls += calls;
        }
        match error {
            NvmlError::NotSupported => {
                if cache_unsupported && dev.unsupported.insert(call) {
                    debug!(gpu = %dev.uuid, call, "not supported on this GPU; not asking again");
                }
                Err(Failure::NotSupported)
            }
            NvmlError::GpuLost => {
                dev.lost_now = true;
                self.errors.push(CallError {
                    call,
                    code: "gpu_is_lost",
                });
                Err(Failure::Lost)
            }
            error => {
                let code = error_code(&error);
                self.fail(dev, call, code, &error);
                Err(Failure::Failed(code))
            }
        }
    }

    /// Counts a failure of `call` (and logs the first of each kind).
    pub(crate) fn fail(
        &mut self,
        dev: &DeviceState,
        call: &'static str,
        code: &'static str,
        error: &dyn std::error::Error,
    ) {
        let e = CallError { call, code };
        self.errors.push(e);
        if self.logged.insert(e) {
            warn!(
                gpu = %dev.uuid,
                call,
                code,
                error = %error,
                "NVML call failed; further failures of this call are counted, not logged"
            );
        }
    }
}
