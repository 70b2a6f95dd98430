//! Per-device queries: identity, utilization, memory, power and energy, temperature, clocks,
//! clock event reasons, field values, PCIe throughput, and the MIG layout.

use std::os::raw::{c_char, c_int, c_uint, c_ulonglong};

use crate::ffi::{self, field, FieldValue, MemoryV2, NvmlDevice, NvmlReturn, Utilization, Value};
use crate::state::{device_call, out, write_str, Call};

/// Device memory in use: what the scenario reserves plus what live processes hold.
fn memory_used(call: &Call) -> u64 {
    if let Some(instance) = call.mig_instance() {
        if let Some(used) = &instance.memory_used_bytes {
            return used.at(call.now_ms) as u64;
        }
        let gi = instance.gpu_instance_id;
        return call
            .device()
            .processes
            .iter()
            .filter(|p| p.alive_at(call.now_ms) && p.gpu_instance_id == Some(gi))
            .map(|p| p.used_memory_bytes.at(call.now_ms) as u64)
            .sum();
    }
    let device = call.device();
    device.memory_reserved_bytes
        + device
            .processes
            .iter()
            .filter(|p| p.alive_at(call.now_ms))
            .map(|p| p.used_memory_bytes.at(call.now_ms) as u64)
            .sum::<u64>()
}

fn mig_enabled(call: &Call) -> bool {
    call.device().mig.is_some()
}

/// `nvmlDeviceGetUUID`: `GPU-…` for a GPU, `MIG-…` for a MIG device.
///
/// # Safety
/// `uuid` must be null or valid for `length` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: NvmlDevice,
    uuid: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    device_call("nvmlDeviceGetUUID", device, |call| {
        let text = call.mig_instance().map_or(&call.device().uuid, |i| &i.uuid);
        // SAFETY: forwarded from the caller.
        unsafe { write_str(uuid, length, text) }
    })
}

/// `nvmlDeviceGetName`.
///
/// # Safety
/// `name` must be null or valid for `length` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: NvmlDevice,
    name: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    device_call("nvmlDeviceGetName", device, |call| {
        // SAFETY: forwarded from the caller.
        unsafe { write_str(name, length, &call.device().name) }
    })
}

/// `nvmlDeviceGetIndex`.
///
/// # Safety
/// `index` must be null or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetIndex(device: NvmlDevice, index: *mut c_uint) -> NvmlReturn {
    device_call("nvmlDeviceGetIndex", device, |call| {
        // SAFETY: forwarded from the caller.
        *unsafe { out(index) }? = call.gpu as c_uint;
        Ok(())
    })
}

/// `nvmlDeviceGetUtilizationRates`: `NOT_SUPPORTED` with MIG on, as on real GPUs.
///
/// # Safety
/// `utilization` must be null or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: NvmlDevice,
    utilization: *mut Utilization,
) -> NvmlReturn {
    device_call("nvmlDeviceGetUtilizationRates", device, |call| {
        if mig_enabled(call) {
            return Err(ffi::ERROR_NOT_SUPPORTED);
        }
        // SAFETY: forwarded from the caller.
        let utilization = unsafe { out(utilization) }?;
        let (gpu, memory) = crate::samples::utilization_rates(call);
        utilization.gpu = gpu.round() as c_uint;
        utilization.memory = memory.round() as c_uint;
        Ok(())
    })
}

/// `nvmlDeviceGetSamples`, GPU utilization samples only (other types `NOT_SUPPORTED`):
/// `NOT_SUPPORTED` with MIG on; `NOT_FOUND` when nothing is newer than `lastSeenTimeStamp`;
/// with `samples == NULL` `SUCCESS` and the count, as NVML documents; a buffer too small for
/// them `INSUFFICIENT_SIZE`.
///
/// # Safety
/// `value_type` and `count` must be null or valid for writes; `samples` null or valid for
/// `*count` entries.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetSamples(
    device: NvmlDevice,
    sampling: c_uint,
    last_seen_time_stamp: c_ulonglong,
    value_type: *mut c_uint,
    count: *mut c_uint,
    samples: *mut ffi::Sample,
) -> NvmlReturn {
    device_call("nvmlDeviceGetSamples", device, |call| {
        if mig_enabled(call) || sampling != ffi::GPU_UTILIZATION_SAMPLES {
            return Err(ffi::ERROR_NOT_SUPPORTED);
        }
        // SAFETY: forwarded from the caller.
        let count = unsafe { out(count) }?;
        // SAFETY: forwarded from the caller.
        *unsafe { out(value_type) }? = ffi::VALUE_TYPE_UNSIGNED_INT;
        let found = crate::samples::device_samples(call, last_seen_time_stamp);
        if found.is_empty() {
            return Err(ffi::ERROR_NOT_FOUND);
        }
        let capacity = *count as usize;
        *count = found.len() as c_uint;
        if samples.is_null() {
            return Ok(());
        }
        if capacity < found.len() {
            return Err(ffi::ERROR_INSUFFICIENT_SIZE);
        }
        for (i, (time_stamp, percent)) in found.into_iter().enumerate() {
            // SAFETY: the caller guarantees `capacity > i` entries.
            unsafe {
                *samples.add(i) = ffi::Sample {
                    time_stamp,
                    value: Value { ui_val: percent },
                };
            }
        }
        Ok(())
    })
}

/// `nvmlDeviceGetMemoryInfo_v2`: checks the struct version as NVML does.
///
/// # Safety
/// `memory` must be null or valid for reads and writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: NvmlDevice,
    memory: *mut MemoryV2,
) -> NvmlReturn {
    device_call("nvmlDeviceGetMemoryInfo_v2", device, |call| {
        // SAFETY: forwarded from the caller.
        let memory = unsafe { out(memory) }?;
        if memory.version != ffi::MEMORY_V2_VERSION {
            return Err(ffi::ERROR_ARGUMENT_VERSION_MISMATCH);
        }
        let total = call
            .mig_instance()
            .map_or(call.device().memory_total_bytes, |i| i.memory_total_bytes);
        let used = memory_used(call).min(total);
        memory.total = total;
        memory.reserved = 0;
        memory.used = used;
        memory.free = total - used;
        Ok(())
    })
}

/// `nvmlDeviceGetPowerUsage`, in milliwatts.
///
/// # Safety
/// `power` must be null or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(
    device: NvmlDevice,
    power: *mut c_uint,
) -> NvmlReturn {
    device_call("nvmlDeviceGetPowerUsage", device, |call| {
        // SAFETY: forwarded from the caller.
        *unsafe { out(power) }? = (call.device().power_watts.at(call.now_ms) * 1000.0) as c_uint;
        Ok(())
    })
}

/// `nvmlDeviceGetTotalEnergyConsumption`, in millijoules: the power timeline integrated over
/// wall time since time 0, plus the scenario's starting value.
///
/// # Safety
/// `energy` must be null or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTotalEnergyConsumption(
    device: NvmlDevice,
    energy: *mut c_ulonglong,
) -> NvmlReturn {
    device_call("nvmlDeviceGetTotalEnergyConsumption", device, |call| {
        let d = call.device();
        let joules = d.energy_start_joules + d.power_watts.integral_seconds(call.now_ms);
        // SAFETY: forwarded from the caller.
        *unsafe { out(energy) }? = (joules * 1000.0) as c_ulonglong;
        Ok(())
    })
}

/// `nvmlDeviceGetTemperature` (GPU sensor only).
///
/// # Safety
/// `temp` must be null or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: NvmlDevice,
    sensor: c_uint,
    temp: *mut c_uint,
) -> NvmlReturn {
    device_call("nvmlDeviceGetTemperature", device, |call| {
        if sensor != ffi::TEMPERATURE_GPU {
            return Err(ffi::ERROR_INVALID_ARGUMENT);
        }
        // SAFETY: forwarded from the caller.
        *unsafe { out(temp) }? = call.device().temperature_celsius.at(call.now_ms) as c_uint;
        Ok(())
    })
}

/// `nvmlDeviceGetClockInfo` (graphics and SM share the SM clock).
///
/// # Safety
/// `clock` must be null or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    device: NvmlDevice,
    clock_type: c_uint,
    clock: *mut c_uint,
) -> NvmlReturn {
    device_call("nvmlDeviceGetClockInfo", device, |call| {
        let d = call.device();
        let mhz = match clock_type {
            ffi::CLOCK_GRAPHICS | ffi::CLOCK_SM => d.sm_clock_mhz.at(call.now_ms),
            ffi::CLOCK_MEM => d.memory_clock_mhz.at(call.now_ms),
            _ => return Err(ffi::ERROR_NOT_SUPPORTED),
        };
        // SAFETY: forwarded from the caller.
        *unsafe { out(clock) }? = mhz as c_uint;
        Ok(())
    })
}

/// `nvmlDeviceGetCurrentClocksEventReasons` (the current name).
///
/// # Safety
/// `reasons` must be null or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksEventReasons(
    device: NvmlDevice,
    reasons: *mut c_ulonglong,
) -> NvmlReturn {
    device_call("nvmlDeviceGetCurrentClocksEventReasons", device, |call| {
        // SAFETY: forwarded from the caller.
        *unsafe { out(reasons) }? = call.device().clock_event_reasons;
        Ok(())
    })
}

/// `nvmlDeviceGetCurrentClocksThrottleReasons` (the deprecated name, still exported by drivers).
///
/// # Safety
/// `reasons` must be null or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksThrottleReasons(
    device: NvmlDevice,
    reasons: *mut c_ulonglong,
) -> NvmlReturn {
    device_call(
        "nvmlDeviceGetCurrentClocksThrottleReasons",
        device,
        |call| {
            // SAFETY: forwarded from the caller.
            *unsafe { out(reasons) }? = call.device().clock_event_reasons;
            Ok(())
        },
    )
}

/// The value of one field now, or the per-field return code.
fn field_value(call: &Call, field_id: u32, scope_id: u32) -> Result<u64, NvmlReturn> {
    let d = call.device();
    let t = call.now_ms;
    let counter = |rate: &crate::scenario::Timeline| rate.integral_seconds(t) as u64;
    Ok(match field_id {
        field::ECC_SBE_VOL_TOTAL => d.ecc_corrected.at(t) as u64,
        field::ECC_DBE_VOL_TOTAL => d.ecc_uncorrected.at(t) as u64,
        field::RETIRED_SBE => d.retired_pages_sbe.at(t) as u64,
        field::RETIRED_DBE => d.retired_pages_dbe.at(t) as u64,
        field::REMAPPED_COR => d.remapped_rows_correctable.at(t) as u64,
        field::REMAPPED_UNC => d.remapped_rows_uncorrectable.at(t) as u64,
        field::PCIE_COUNT_TX_BYTES | field::PCIE_COUNT_RX_BYTES if !d.pcie_counters => {
            return Err(ffi::ERROR_NOT_SUPPORTED)
        }
        field::PCIE_COUNT_TX_BYTES => counter(&d.pcie_tx_bytes_per_second),
        field::PCIE_COUNT_RX_BYTES => counter(&d.pcie_rx_bytes_per_second),
        field::NVLINK_THROUGHPUT_DATA_TX | field::NVLINK_THROUGHPUT_DATA_RX => {
            if d.nvlink_links == 0 {
                return Err(ffi::ERROR_NOT_SUPPORTED);
            }
            let rate = if field_id == field::NVLINK_THROUGHPUT_DATA_TX {
                &d.nvlink_tx_bytes_per_second
            } else {
                &d.nvlink_rx_bytes_per_second
            };
            // KiB; scope UINT_MAX sums all links, a link id gets an even share.
            let total = counter(rate) / 1024;
            match scope_id {
                u32::MAX => total,
                link if link < d.nvlink_links => total / u64::from(d.nvlink_links),
                _ => return Err(ffi::ERROR_INVALID_ARGUMENT),
            }
        }
        _ => return Err(ffi::ERROR_NOT_SUPPORTED),
    })
}

/// `nvmlDeviceGetFieldValues`: fills each entry, with a per-entry return code.
///
/// # Safety
/// `values` must be null or valid for `values_count` entries.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetFieldValues(
    device: NvmlDevice,
    values_count: c_int,
    values: *mut FieldValue,
) -> NvmlReturn {
    device_call("nvmlDeviceGetFieldValues", device, |call| {
        let count = usize::try_from(values_count).map_err(|_| ffi::ERROR_INVALID_ARGUMENT)?;
        if values.is_null() {
            return Err(ffi::ERROR_INVALID_ARGUMENT);
        }
        // SAFETY: the caller guarantees `values_count` entries.
        let values = unsafe { std::slice::from_raw_parts_mut(values, count) };
        let timestamp = (call.state.epoch_us as f64 + call.now_ms * 1000.0) as i64;
        for v in values {
            v.timestamp = timestamp;
            v.latency_usec = 0;
            match field_value(call, v.field_id, v.scope_id) {
                Ok(value) => {
                    v.nvml_return = ffi::SUCCESS;
                    v.value_type = ffi::VALUE_TYPE_UNSIGNED_LONG_LONG;
                    v.value = Value { ull_val: value };
                }
                Err(code) => v.nvml_return = code,
            }
        }
        Ok(())
    })
}

/// `nvmlDeviceGetPcieThroughput`, in KB/s.
///
/// # Safety
/// `value` must be null or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPcieThroughput(
    device: NvmlDevice,
    counter: c_uint,
    value: *mut c_uint,
) -> NvmlReturn {
    device_call("nvmlDeviceGetPcieThroughput", device, |call| {
        let d = call.device();
        let rate = match counter {
            ffi::PCIE_UTIL_TX_BYTES => &d.pcie_tx_bytes_per_second,
            ffi::PCIE_UTIL_RX_BYTES => &d.pcie_rx_bytes_per_second,
            _ => return Err(ffi::ERROR_INVALID_ARGUMENT),
        };
        // SAFETY: forwarded from the caller.
        *unsafe { out(value) }? = (rate.at(call.now_ms) / 1024.0) as c_uint;
        Ok(())
    })
}

/// `nvmlDeviceGetMigMode`.
///
/// # Safety
/// `current` and `pending` must be null or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: NvmlDevice,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> NvmlReturn {
    device_call("nvmlDeviceGetMigMode", device, |call| {
        let mode = c_uint::from(mig_enabled(call));
        // SAFETY: forwarded from the caller.
        *unsafe { out(current) }? = mode;
        // SAFETY: forwarded from the caller.
        *unsafe { out(pending) }? = mode;
        Ok(())
    })
}

/// `nvmlDeviceGetMaxMigDeviceCount`: 7 slots, as on A100/H100.
///
/// # Safety
/// `count` must be null or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMaxMigDeviceCount(
    device: NvmlDevice,
    count: *mut c_uint,
) -> NvmlReturn {
    device_call("nvmlDeviceGetMaxMigDeviceCount", device, |call| {
        if call.mig.is_some() {
            return Err(ffi::ERROR_INVALID_ARGUMENT);
        }
        let instances = call.device().mig.as_ref().map_or(0, |m| m.instances.len());
        // SAFETY: forwarded from the caller.
        *unsafe { out(count) }? = instances.max(7) as c_uint;
        Ok(())
    })
}

/// `nvmlDeviceGetMigDeviceHandleByIndex`: `NOT_FOUND` for an empty slot.
///
/// # Safety
/// `mig_device` must be null or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    device: NvmlDevice,
    index: c_uint,
    mig_device: *mut NvmlDevice,
) -> NvmlReturn {
    device_call("nvmlDeviceGetMigDeviceHandleByIndex", device, |call| {
        if call.mig.is_some() {
            return Err(ffi::ERROR_INVALID_ARGUMENT);
        }
        if !mig_enabled(call) {
            return Err(ffi::ERROR_INVALID_ARGUMENT);
        }
        // SAFETY: forwarded from the caller.
        let mig_device = unsafe { out(mig_device) }?;
        *mig_device = call
            .state
            .mig_handle(call.gpu, index as usize)
            .ok_or(ffi::ERROR_NOT_FOUND)?;
        Ok(())
    })
}

/// `nvmlDeviceGetAttributes_v2` (MIG device handles only, as NVML documents): the instance's
/// slices and memory; the engine counts are not modelled (0).
///
/// # Safety
/// `attributes` must be null or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetAttributes_v2(
    device: NvmlDevice,
    attributes: *mut ffi::DeviceAttributes,
) -> NvmlReturn {
    device_call("nvmlDeviceGetAttributes_v2", device, |call| {
        let instance = call.mig_instance().ok_or(ffi::ERROR_NOT_SUPPORTED)?;
        // SAFETY: forwarded from the caller.
        *unsafe { out(attributes) }? = ffi::DeviceAttributes {
            multiprocessor_count: 0,
            shared_copy_engine_count: 0,
            shared_decoder_count: 0,
            shared_encoder_count: 0,
            shared_jpeg_count: 0,
            shared_ofa_count: 0,
            gpu_instance_slice_count: instance.compute_slices,
            compute_instance_slice_count: instance.compute_slices,
            memory_size_mb: instance.memory_total_bytes / (1024 * 1024),
        };
        Ok(())
    })
}

/// `nvmlDeviceGetGpuInstanceId` (MIG device handles only).
///
/// # Safety
/// `id` must be null or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetGpuInstanceId(
    device: NvmlDevice,
    id: *mut c_uint,
) -> NvmlReturn {
    device_call("nvmlDeviceGetGpuInstanceId", device, |call| {
        let instance = call.mig_instance().ok_or(ffi::ERROR_NOT_SUPPORTED)?;
        // SAFETY: forwarded from the caller.
        *unsafe { out(id) }? = instance.gpu_instance_id;
        Ok(())
    })
}

/// `nvmlDeviceGetComputeInstanceId` (MIG device handles only).
///
/// # Safety
/// `id` must be null or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeInstanceId(
    device: NvmlDevice,
    id: *mut c_uint,
) -> NvmlReturn {
    device_call("nvmlDeviceGetComputeInstanceId", device, |call| {
        let instance = call.mig_instance().ok_or(ffi::ERROR_NOT_SUPPORTED)?;
        // SAFETY: forwarded from the caller.
        *unsafe { out(id) }? = instance.compute_instance_id;
        Ok(())
    })
}
