//! Event sets: the scenario's XIDs delivered to sets whose devices registered for them after
//! registration, each once per set; `nvmlEventSetWait_v2` blocks the caller up to its timeout.

use std::os::raw::{c_uint, c_ulonglong};
use std::sync::Mutex;
use std::time::Duration;

use crate::ffi::{self, EventData, NvmlDevice, NvmlEventSet, NvmlReturn};
use crate::state::{self, device_call, out};

/// What an `nvmlEventSet_t` points at.
#[derive(Debug, Default)]
struct EventSet {
    inner: Mutex<SetState>,
}

#[derive(Debug, Default)]
struct SetState {
    /// (gpu, event mask, registered at ms).
    registered: Vec<(usize, c_ulonglong, f64)>,
    /// Scenario XIDs (by index, in time order) already delivered or skipped.
    next: usize,
}

const SUPPORTED_EVENTS: c_ulonglong = ffi::EVENT_TYPE_SINGLE_BIT_ECC
    | ffi::EVENT_TYPE_DOUBLE_BIT_ECC
    | ffi::EVENT_TYPE_XID_CRITICAL_ERROR;

/// # Safety
/// `set` must be a pointer `nvmlEventSetCreate` returned and not yet freed.
unsafe fn set_ref<'a>(set: NvmlEventSet) -> Result<&'a EventSet, NvmlReturn> {
    // SAFETY: the caller guarantees the pointer came from `Box::into_raw` below.
    unsafe { set.cast::<EventSet>().as_ref() }.ok_or(ffi::ERROR_INVALID_ARGUMENT)
}

/// `nvmlEventSetCreate`.
///
/// # Safety
/// `set` must be null or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut NvmlEventSet) -> NvmlReturn {
    state::system_call("nvmlEventSetCreate", |_| {
        // SAFETY: forwarded from the caller.
        let set = unsafe { out(set) }?;
        *set = Box::into_raw(Box::<EventSet>::default()).cast();
        Ok(())
    })
}

/// `nvmlEventSetFree`.
///
/// # Safety
/// `set` must come from `nvmlEventSetCreate` and not be used again (nor concurrently).
#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetFree(set: NvmlEventSet) -> NvmlReturn {
    state::count_event_call();
    if set.is_null() {
        return ffi::ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: the caller hands back ownership of the box `nvmlEventSetCreate` made.
    drop(unsafe { Box::from_raw(set.cast::<EventSet>()) });
    ffi::SUCCESS
}

/// `nvmlDeviceGetSupportedEventTypes`: ECC and XID events on GPUs, none on MIG devices.
///
/// # Safety
/// `event_types` must be null or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(
    device: NvmlDevice,
    event_types: *mut c_ulonglong,
) -> NvmlReturn {
    device_call("nvmlDeviceGetSupportedEventTypes", device, |call| {
        // SAFETY: forwarded from the caller.
        *unsafe { out(event_types) }? = if call.mig.is_some() {
            0
        } else {
            SUPPORTED_EVENTS
        };
        Ok(())
    })
}

/// `nvmlDeviceRegisterEvents`: `NOT_SUPPORTED` for types the device lacks, as NVML does.
///
/// # Safety
/// `set` must come from `nvmlEventSetCreate` and not be freed.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceRegisterEvents(
    device: NvmlDevice,
    event_types: c_ulonglong,
    set: NvmlEventSet,
) -> NvmlReturn {
    device_call("nvmlDeviceRegisterEvents", device, |call| {
        // SAFETY: forwarded from the caller.
        let set = unsafe { set_ref(set) }?;
        if call.mig.is_some() || event_types & !SUPPORTED_EVENTS != 0 {
            return Err(ffi::ERROR_NOT_SUPPORTED);
        }
        let mut inner = set.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.registered.push((call.gpu, event_types, call.now_ms));
        Ok(())
    })
}

/// `nvmlEventSetWait_v2`: the next due XID for a registered device; else `GPU_IS_LOST` while a
/// registered device is lost; else `TIMEOUT` after `timeoutms`.
///
/// # Safety
/// `set` must come from `nvmlEventSetCreate` and not be freed; `data` null or valid for
/// writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: NvmlEventSet,
    data: *mut EventData,
    timeoutms: c_uint,
) -> NvmlReturn {
    state::count_event_call();
    let state = match state::current() {
        Ok(state) => state,
        Err(code) => return code,
    };
    // SAFETY: forwarded from the caller.
    let (set, data) = match unsafe { (set_ref(set), out(data)) } {
        (Ok(set), Ok(data)) => (set, data),
        (Err(code), _) | (_, Err(code)) => return code,
    };
    let deadline_ms = state.now_ms() + f64::from(timeoutms);
    loop {
        let now = state.now_ms();
        let mut next_due: Option<f64> = None;
        // A registered GPU fell off the bus: once the XIDs up to then (its 79) are out, every
        // wait on the set answers GPU_IS_LOST, whatever the other GPUs do, as real drivers do.
        let lost_since = {
            let inner = set.inner.lock().unwrap_or_else(|p| p.into_inner());
            inner
                .registered
                .iter()
                .filter_map(|(gpu, _, _)| state.device(*gpu).lost_at_ms)
                .map(|at| at as f64)
                .filter(|at| *at <= now)
                .reduce(f64::min)
        };
        {
            let mut inner = set.inner.lock().unwrap_or_else(|p| p.into_inner());
            while let Some(xid) = state.scenario.xids.get(inner.next) {
                let at = xid.at_ms as f64;
                if lost_since.is_some_and(|lost| at > lost) {
                    return ffi::ERROR_GPU_IS_LOST;
                }
                if at > now {
                    next_due = Some(at);
                    break;
                }
                inner.next += 1;
                let wanted = inner.registered.iter().any(|(gpu, mask, since)| {
                    *gpu == xid.device
                        && mask & ffi::EVENT_TYPE_XID_CRITICAL_ERROR != 0
                        && at >= *since
                });
                if let (true, Some(device)) = (wanted, state.gpu_handle(xid.device)) {
                    *data = EventData {
                        device,
                        event_type: ffi::EVENT_TYPE_XID_CRITICAL_ERROR,
                        event_data: xid.xid,
                        gpu_instance_id: ffi::NO_INSTANCE,
                        compute_instance_id: ffi::NO_INSTANCE,
                    };
                    return ffi::SUCCESS;
                }
            }
        }
        if lost_since.is_some() {
            return ffi::ERROR_GPU_IS_LOST;
        }
        if now >= deadline_ms {
            return ffi::ERROR_TIMEOUT;
        }
        let wake = next_due.map_or(deadline_ms, |due| due.min(deadline_ms));
        std::thread::sleep(Duration::from_secs_f64(((wake - now).max(0.5)) / 1000.0));
    }
}
