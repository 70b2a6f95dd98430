//! NVML call bookkeeping: how many calls a sample made, which failed, which a GPU does not
//! support (and so are not made again), which GPU was lost, and which failures were already
//! logged.

use std::collections::HashSet;

use nvml_wrapper::error::NvmlError;
use tracing::{debug, warn};

use crate::error::{error_code, CallError, Unavailable};

/// What the call bookkeeping remembers about one GPU between samples.
#[derive(Debug, Default)]
pub(crate) struct GpuCalls {
    /// The GPU's UUID, for log lines and the sample; empty until NVML has answered it.
    pub(crate) uuid: String,
    /// Calls that answered `NOT_SUPPORTED`; not made again until the MIG mode changes.
    pub(crate) unsupported: HashSet<&'static str>,
    /// Field ids that answered `NOT_SUPPORTED`.
    pub(crate) unsupported_fields: HashSet<u32>,
    /// `GPU_IS_LOST` seen this sample: the remaining calls are skipped.
    pub(crate) lost_now: bool,
}

impl GpuCalls {
    /// Forget what was unsupported (the MIG mode changed, and with it what the GPU answers).
    pub(crate) fn reset_support(&mut self) {
        self.unsupported = HashSet::new();
        self.unsupported_fields = HashSet::new();
    }
}

/// Why a call gave no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    NotSupported,
    /// Skipped: the GPU was lost earlier in this sample, or answered `GPU_IS_LOST` now.
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

/// The NVML calls of one `sample()`, all GPUs together.
#[derive(Debug)]
pub(crate) struct Calls<'a> {
    /// NVML calls made.
    pub(crate) made: u64,
    pub(crate) errors: Vec<CallError>,
    logged: &'a mut HashSet<CallError>,
}

impl<'a> Calls<'a> {
    pub(crate) fn new(logged: &'a mut HashSet<CallError>) -> Calls<'a> {
        Calls {
            made: 0,
            errors: Vec::new(),
            logged,
        }
    }

    /// Why `call` is not to be made on `gpu` now, if it is not.
    pub(crate) fn skip(&self, gpu: &GpuCalls, call: &'static str) -> Option<Failure> {
        if gpu.lost_now {
            Some(Failure::Lost)
        } else if gpu.unsupported.contains(call) {
            Some(Failure::NotSupported)
        } else {
            None
        }
    }

    /// Makes one single-call query unless skipped, and records it.
    pub(crate) fn get<T>(
        &mut self,
        gpu: &mut GpuCalls,
        call: &'static str,
        query: impl FnOnce() -> Result<T, NvmlError>,
    ) -> Option<T> {
        if self.skip(gpu, call).is_some() {
            return None;
        }
        self.record(gpu, call, 1, query()).ok()
    }

    /// Records the result of `count` NVML calls made under the name `call`: counts them,
    /// remembers `NOT_SUPPORTED`, marks a lost GPU, counts (and logs once) other failures.
    pub(crate) fn record<T>(
        &mut self,
        gpu: &mut GpuCalls,
        call: &'static str,
        count: u64,
        result: Result<T, NvmlError>,
    ) -> Result<T, Failure> {
        self.record_with(gpu, call, count, result, true)
    }

    /// As [`record`](Self::record), but `NOT_SUPPORTED` is not remembered: for calls on MIG
    /// devices (whose answers must not silence the GPU's own) and for calls whose support
    /// changes at run time (accounting mode).
    pub(crate) fn record_uncached<T>(
        &mut self,
        gpu: &mut GpuCalls,
        call: &'static str,
        count: u64,
        result: Result<T, NvmlError>,
    ) -> Result<T, Failure> {
        self.record_with(gpu, call, count, result, false)
    }

    /// Counts calls whose answer is not a failure (`NOT_FOUND` where it means "nothing new").
    pub(crate) fn counted(&mut self, count: u64) {
        self.made += count;
    }

    fn record_with<T>(
        &mut self,
        gpu: &mut GpuCalls,
        call: &'static str,
        count: u64,
        result: Result<T, NvmlError>,
        cache_unsupported: bool,
    ) -> Result<T, Failure> {
        let error = match result {
            Ok(value) => {
                self.made += count;
                return Ok(value);
            }
            Err(error) => error,
        };
        // A missing symbol makes no call into the library.
        if !matches!(error, NvmlError::FailedToLoadSymbol(_)) {
            self.made += count;
        }
        match error {
            NvmlError::NotSupported => {
                if cache_unsupported && gpu.unsupported.insert(call) {
                    debug!(gpu = %gpu.uuid, call, "not supported on this GPU; not asking again");
                }
                Err(Failure::NotSupported)
            }
            NvmlError::GpuLost => {
                gpu.lost_now = true;
                self.errors.push(CallError {
                    call,
                    code: "gpu_is_lost",
                });
                Err(Failure::Lost)
            }
            error => {
                let code = error_code(&error);
                self.fail(gpu, call, code, &error);
                Err(Failure::Failed(code))
            }
        }
    }

    /// Counts a failure of `call` (and logs the first of each kind).
    pub(crate) fn fail(
        &mut self,
        gpu: &GpuCalls,
        call: &'static str,
        code: &'static str,
        error: &dyn std::error::Error,
    ) {
        let e = CallError { call, code };
        self.errors.push(e);
        if self.logged.insert(e) {
            warn!(
                gpu = %gpu.uuid,
                call,
                code,
                error = %error,
                "NVML call failed; further failures of this call are counted, not logged"
            );
        }
    }
}
