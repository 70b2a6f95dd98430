//! Per-process queries: running compute processes, MPS clients, process utilization samples,
//! accounting.

use std::os::raw::c_uint;

use crate::ffi::{self, AccountingStats, NvmlDevice, NvmlReturn, ProcessInfo};
use crate::scenario::{MigParentProcesses, MpsRole};
use crate::state::{device_call, out, Call};

/// Writes `items` into a caller array of `*count` entries with NVML's count-probe semantics:
/// the needed count is always stored, and `INSUFFICIENT_SIZE` returned when it does not fit
/// (a null array or a zero count is such a probe).
///
/// # Safety
/// `count` must be null or valid for reads and writes; `array` null or valid for `*count`
/// entries.
unsafe fn fill<T: Copy>(count: *mut c_uint, array: *mut T, items: &[T]) -> Result<(), NvmlReturn> {
    // SAFETY: forwarded from the caller.
    let count = unsafe { out(count) }?;
    let capacity = *count as usize;
    *count = items.len() as c_uint;
    if items.is_empty() {
        return Ok(());
    }
    if array.is_null() || capacity < items.len() {
        return Err(ffi::ERROR_INSUFFICIENT_SIZE);
    }
    // SAFETY: `array` holds `capacity >= items.len()` entries.
    unsafe { std::ptr::copy_nonoverlapping(items.as_ptr(), array, items.len()) };
    Ok(())
}

/// Live processes on this handle in the v3 layout, MPS clients or the others; on a MIG-enabled
/// GPU's own handle every process carries its GPU / compute instance ids (or the scenario's
/// `mig_parent_processes` answer), otherwise `0xFFFFFFFF`.
fn process_infos(call: &Call, mps_clients: bool) -> Result<Vec<ProcessInfo>, NvmlReturn> {
    let mig = call.device().mig.is_some();
    if mig && call.mig.is_none() {
        match call.device().mig_parent_processes {
            MigParentProcesses::Aggregated => {}
            MigParentProcesses::NoPermission => return Err(ffi::ERROR_NO_PERMISSION),
            MigParentProcesses::Empty => return Ok(Vec::new()),
        }
    }
    Ok(call
        .live_processes()
        .filter(|p| {
            if mps_clients {
                p.is_mps_client()
            } else {
                !p.is_mps_client() || p.mps == Some(MpsRole::ComputeClient)
            }
        })
        .map(|p| ProcessInfo {
            pid: p.pid,
            used_gpu_memory: p.used_memory_bytes.at(call.now_ms) as u64,
            gpu_instance_id: p
                .gpu_instance_id
                .filter(|_| mig)
                .unwrap_or(ffi::NO_INSTANCE),
            compute_instance_id: p
                .compute_instance_id
                .filter(|_| mig)
                .unwrap_or(ffi::NO_INSTANCE),
        })
        .collect())
}

/// `nvmlDeviceGetComputeRunningProcesses_v3`: live processes with a compute context of their
/// own. Under MPS that is the MPS server, not its clients.
///
/// # Safety
/// See [`fill`].
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: NvmlDevice,
    info_count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> NvmlReturn {
    device_call("nvmlDeviceGetComputeRunningProcesses_v3", device, |call| {
        let items = process_infos(call, false)?;
        // SAFETY: forwarded from the caller.
        unsafe { fill(info_count, infos, &items) }
    })
}

/// `nvmlDeviceGetMPSComputeRunningProcesses_v3`: live MPS clients, with the compute list's
/// semantics (count probe with `*infoCount == 0`, `INSUFFICIENT_SIZE` with the needed count
/// written, `SUCCESS` and a count of 0 when none run) and the same v3 layout.
///
/// # Safety
/// See [`fill`].
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMPSComputeRunningProcesses_v3(
    device: NvmlDevice,
    info_count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> NvmlReturn {
    device_call(
        "nvmlDeviceGetMPSComputeRunningProcesses_v3",
        device,
        |call| {
            let items = process_infos(call, true)?;
            // SAFETY: forwarded from the caller.
            unsafe { fill(info_count, infos, &items) }
        },
    )
}

/// `nvmlDeviceGetProcessUtilization`: `NOT_FOUND` when nothing is newer than
/// `lastSeenTimeStamp`; `NOT_SUPPORTED` with MIG on. With a NULL buffer (or one too small) the
/// count probe answers `INSUFFICIENT_SIZE` and the count: the exact count per period, a fixed
/// 100 (or more when more are needed) with the driver shape, whose fetch then leaves the unused
/// entries zeroed within the count, as real drivers do.
///
/// # Safety
/// See [`fill`].
#[cfg(not(feature = "without-process-utilization"))]
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    device: NvmlDevice,
    utilization: *mut ffi::ProcessUtilizationSample,
    process_samples_count: *mut c_uint,
    last_seen_time_stamp: std::os::raw::c_ulonglong,
) -> NvmlReturn {
    device_call("nvmlDeviceGetProcessUtilization", device, |call| {
        if call.device().mig.is_some() {
            return Err(ffi::ERROR_NOT_SUPPORTED);
        }
        let mut samples = crate::samples::process_samples(call, last_seen_time_stamp);
        if samples.is_empty() {
            return Err(ffi::ERROR_NOT_FOUND);
        }
        if call.state.scenario.sample_shape == crate::scenario::SampleShape::Driver {
            const DRIVER_COUNT: usize = 100;
            // SAFETY: forwarded from the caller.
            let capacity = unsafe { out(process_samples_count) }.map(|c| *c as usize)?;
            let wanted = samples.len().max(DRIVER_COUNT);
            if !utilization.is_null() && capacity >= samples.len() {
                samples.resize(wanted.min(capacity), crate::samples::ZEROED);
            } else {
                samples.resize(wanted, crate::samples::ZEROED);
            }
        }
        // SAFETY: forwarded from the caller.
        unsafe { fill(process_samples_count, utilization, &samples) }
    })
}

/// Processes that have started by now, newest record per pid: NVML's accounting buffer.
fn accounted(call: &Call) -> Result<Vec<&crate::scenario::Process>, NvmlReturn> {
    if !call.device().accounting {
        return Err(ffi::ERROR_NOT_SUPPORTED);
    }
    let mut seen: Vec<&crate::scenario::Process> = Vec::new();
    for p in &call.device().processes {
        if (p.start_ms as f64) > call.now_ms {
            continue;
        }
        match seen.iter_mut().find(|q| q.pid == p.pid) {
            Some(q) if q.start_ms <= p.start_ms => *q = p,
            Some(_) => {}
            None => seen.push(p),
        }
    }
    Ok(seen)
}

/// `nvmlDeviceGetAccountingMode`.
///
/// # Safety
/// `mode` must be null or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetAccountingMode(
    device: NvmlDevice,
    mode: *mut c_uint,
) -> NvmlReturn {
    device_call("nvmlDeviceGetAccountingMode", device, |call| {
        // SAFETY: forwarded from the caller.
        *unsafe { out(mode) }? = c_uint::from(call.device().accounting);
        Ok(())
    })
}

/// `nvmlDeviceGetAccountingPids`: count-probe semantics; `NOT_SUPPORTED` with accounting off.
///
/// # Safety
/// See [`fill`].
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetAccountingPids(
    device: NvmlDevice,
    count: *mut c_uint,
    pids: *mut c_uint,
) -> NvmlReturn {
    device_call("nvmlDeviceGetAccountingPids", device, |call| {
        let items: Vec<c_uint> = accounted(call)?.iter().map(|p| p.pid).collect();
        // SAFETY: forwarded from the caller.
        unsafe { fill(count, pids, &items) }
    })
}

/// `nvmlDeviceGetAccountingStats`: lifetime means of the process's timelines; `NOT_SUPPORTED`
/// with accounting off, `NOT_FOUND` for a pid never seen.
///
/// # Safety
/// `stats` must be null or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetAccountingStats(
    device: NvmlDevice,
    pid: c_uint,
    stats: *mut AccountingStats,
) -> NvmlReturn {
    device_call("nvmlDeviceGetAccountingStats", device, |call| {
        let p = accounted(call)?
            .into_iter()
            .find(|p| p.pid == pid)
            .ok_or(ffi::ERROR_NOT_FOUND)?;
        let start = p.start_ms as f64;
        let running = p.alive_at(call.now_ms);
        let end = if running {
            call.now_ms
        } else {
            p.end_ms.map_or(call.now_ms, |e| e as f64)
        };
        // SAFETY: forwarded from the caller.
        let stats = unsafe { out(stats) }?;
        *stats = AccountingStats {
            gpu_utilization: p.sm_percent.mean(start, end).round() as c_uint,
            memory_utilization: p.memory_percent.mean(start, end).round() as c_uint,
            max_memory_usage: p.used_memory_bytes.max(start, end) as u64,
            time: if running { 0 } else { (end - start) as u64 },
            start_time: call.state.epoch_us + p.start_ms * 1000,
            is_running: c_uint::from(running),
            reserved: [0; 5],
        };
        Ok(())
    })
}
