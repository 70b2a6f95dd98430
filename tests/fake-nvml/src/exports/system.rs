//! Library-wide calls: init, shutdown, error strings, driver version, device enumeration, and
//! two hooks of the fake's own for tests.

use std::os::raw::{c_char, c_uint};

use crate::ffi::{self, NvmlDevice, NvmlReturn};
use crate::state::{self, out, system_call, write_str};

/// `nvmlInit_v2`: loads the scenario on first use.
#[no_mangle]
pub extern "C" fn nvmlInit_v2() -> NvmlReturn {
    state::init()
}

/// `nvmlInitWithFlags`: flags are accepted and ignored.
#[no_mangle]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> NvmlReturn {
    state::init()
}

/// `nvmlShutdown`.
#[no_mangle]
pub extern "C" fn nvmlShutdown() -> NvmlReturn {
    state::shutdown()
}

/// `nvmlErrorString`: a static string for any code.
#[no_mangle]
pub extern "C" fn nvmlErrorString(result: NvmlReturn) -> *const c_char {
    // One static NUL-terminated string per known code; the pointer must outlive the call.
    macro_rules! s {
        ($text:literal) => {
            concat!($text, "\0").as_ptr().cast::<c_char>()
        };
    }
    match result {
        ffi::SUCCESS => s!("Success"),
        ffi::ERROR_UNINITIALIZED => s!("Uninitialized"),
        ffi::ERROR_INVALID_ARGUMENT => s!("Invalid Argument"),
        ffi::ERROR_NOT_SUPPORTED => s!("Not Supported"),
        ffi::ERROR_NO_PERMISSION => s!("Insufficient Permissions"),
        ffi::ERROR_NOT_FOUND => s!("Not Found"),
        ffi::ERROR_INSUFFICIENT_SIZE => s!("Insufficient Size"),
        ffi::ERROR_DRIVER_NOT_LOADED => s!("Driver Not Loaded"),
        ffi::ERROR_TIMEOUT => s!("Timeout"),
        ffi::ERROR_GPU_IS_LOST => s!("GPU is lost"),
        _ => s!("Unknown Error"),
    }
}

/// `nvmlSystemGetDriverVersion`.
///
/// # Safety
/// `version` must be null or valid for `length` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    system_call("nvmlSystemGetDriverVersion", |state| {
        // SAFETY: forwarded from the caller.
        unsafe { write_str(version, length, &state.scenario.driver_version) }
    })
}

/// `nvmlDeviceGetCount_v2`: the scenario's GPUs (MIG instances are not counted, as in NVML).
///
/// # Safety
/// `count` must be null or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> NvmlReturn {
    system_call("nvmlDeviceGetCount_v2", |state| {
        // SAFETY: forwarded from the caller.
        *unsafe { out(count) }? = state.scenario.devices.len() as c_uint;
        Ok(())
    })
}

/// `nvmlDeviceGetHandleByIndex_v2`: `GPU_IS_LOST` for a lost GPU, as NVML does.
///
/// # Safety
/// `device` must be null or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut NvmlDevice,
) -> NvmlReturn {
    const NAME: &str = "nvmlDeviceGetHandleByIndex_v2";
    system_call(NAME, |state| {
        // SAFETY: forwarded from the caller.
        let device = unsafe { out(device) }?;
        let handle = state
            .gpu_handle(index as usize)
            .ok_or(ffi::ERROR_INVALID_ARGUMENT)?;
        // A lost GPU, or an error injected for this index.
        if let Some(code) = state.failure(NAME, index as usize, state.now_ms()) {
            return Err(code);
        }
        *device = handle;
        Ok(())
    })
}

/// Not NVML: how many NVML calls this library has answered so far, event-set calls
/// (`nvmlEventSet*`, `nvmlDeviceRegisterEvents`, `nvmlDeviceGetSupportedEventTypes`) excepted,
/// so tests can check a sampler's own count while its XID thread waits.
#[no_mangle]
pub extern "C" fn tally_fake_nvml_calls() -> u64 {
    state::calls()
}

/// Not NVML: the scenario's time 0 in µs since the Unix epoch (0 before the first init), so tests
/// can map utilization sample timestamps back to scenario times.
#[no_mangle]
pub extern "C" fn tally_fake_nvml_epoch_us() -> u64 {
    state::epoch_us()
}
