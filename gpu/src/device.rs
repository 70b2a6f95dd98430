//! Device-level readings of one GPU: utilization, memory, power and the energy counter,
//! temperature, clocks, clock event reasons, and the counters read as field values (PCIe,
//! NVLink, ECC, retired pages, remapped rows). It holds each GPU's state between samples and
//! hands the MIG and per-process parts to their own modules.

use std::time::{SystemTime, UNIX_EPOCH};

use nvml_wrapper::enum_wrappers::device::{Clock, Sampling, TemperatureSensor};
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};
use nvml_wrapper_sys::bindings::field_id;
use tracing::{error, info};

use crate::calls::{Calls, Failure, GpuCalls};
use crate::error::error_code;
use crate::mig::{self, MigState};
use crate::process::{self, ProcessState};
use crate::raw::{self, device_of, RawDevice, RawNvml};
use crate::sample::{DeviceSample, SampledBusy};

/// What the sampler remembers about one GPU between ticks.
#[derive(Debug)]
pub(crate) struct DeviceState {
    pub(crate) index: u32,
    /// `None` until `nvmlDeviceGetHandleByIndex_v2` has answered.
    pub(crate) handle: Option<RawDevice>,
    pub(crate) name: String,
    /// The UUID, what is not supported, and whether the GPU is lost now.
    pub(crate) gpu: GpuCalls,
    /// Lost at the end of the previous tick (to log the change only).
    was_lost: bool,
    mig: MigState,
    processes: ProcessState,
    /// The newest device utilization sample delivered (µs); starts at the sampler's start.
    utilization_last_seen_us: u64,
}

impl DeviceState {
    pub(crate) fn new(index: u32, handle: Option<RawDevice>, started_us: u64) -> DeviceState {
        DeviceState {
            index,
            handle,
            name: String::new(),
            gpu: GpuCalls::default(),
            was_lost: false,
            mig: MigState::default(),
            processes: ProcessState::new(started_us),
            utilization_last_seen_us: started_us,
        }
    }
}

/// Samples one GPU. NVML calls per GPU per tick, steady state: 9 device readings, 2 for the
/// device utilization samples (1 when nothing is new, none under MIG), 1 for the MIG mode (+1 per MIG instance; the layout is
/// re-enumerated once a minute), 2 for the process list (1 when empty), 1 for MPS clients
/// while the process list is not empty (2 in a round where more clients run than the last
/// round's buffer held), 2 for utilization samples (1 when nothing is new), 1 for accounting
/// when off (2 + at most 32 when on): 18 on a busy GPU without MIG and accounting. Calls known
/// unsupported are not repeated; a lost GPU costs 1.
pub(crate) fn sample(
    calls: &mut Calls<'_>,
    nvml: &Nvml,
    raw: &RawNvml,
    dev: &mut DeviceState,
) -> DeviceSample {
    dev.gpu.lost_now = false;
    let mut out = DeviceSample {
        index: dev.index,
        ..DeviceSample::default()
    };
    match handle(calls, nvml, dev) {
        Ok(handle) => {
            let device = device_of(nvml, handle);
            identity(calls, &device, dev);
            readings(calls, &device, raw, handle, &mut dev.gpu, &mut out);
            mig::sample(
                calls,
                nvml,
                raw,
                handle,
                &mut dev.gpu,
                &mut dev.mig,
                &mut out,
            );
            let instances = mig::instances(&dev.mig);
            // The process samples first, then the device's, cut where the process samples end:
            // both then cover the same sampling passes. A pass the driver finished between the
            // two queries is in the second only, and would be busy time with no process this
            // tick and process time beyond the device's busy time (scaled away) the next.
            let before_processes_us = now_us();
            process::sample(
                calls,
                nvml,
                raw,
                handle,
                &instances,
                &mut dev.gpu,
                &mut dev.processes,
                &mut out,
            );
            let newest_process_us = out.util_window_us.map_or(0, |(_, newest)| newest);
            let horizon_us = before_processes_us
                .saturating_sub(SAME_PASS_US)
                .max(newest_process_us);
            out.utilization_gpu_sampled = utilization_samples(
                calls,
                &device,
                &mut dev.gpu,
                &mut dev.utilization_last_seen_us,
                horizon_us,
                &mut dev.processes.device_period_us,
            );
        }
        Err(failure) => out.process_utilization = Err(failure.unavailable()),
    }
    if dev.gpu.lost_now {
        // Whatever was read before NVML said so is not reported: a lost GPU reads as empty.
        out = DeviceSample {
            index: dev.index,
            lost: true,
            process_utilization: Err(Failure::Lost.unavailable()),
            ..DeviceSample::default()
        };
    }
    out.uuid.clone_from(&dev.gpu.uuid);
    out.name.clone_from(&dev.name);
    match (dev.was_lost, dev.gpu.lost_now) {
        (false, true) => error!(
            gpu = %dev.gpu.uuid,
            index = dev.index,
            "GPU is lost (fell off the bus); reporting it and retrying each tick"
        ),
        (true, false) => info!(gpu = %dev.gpu.uuid, index = dev.index, "GPU answers again"),
        _ => {}
    }
    dev.was_lost = dev.gpu.lost_now;
    out
}

/// The wall clock in µs since the Unix epoch, as the driver stamps its samples.
pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The device handle, asking NVML again if start-up could not get it.
fn handle(calls: &mut Calls<'_>, nvml: &Nvml, dev: &mut DeviceState) -> Result<RawDevice, Failure> {
    if let Some(handle) = dev.handle {
        return Ok(handle);
    }
    let result = nvml
        .device_by_index(dev.index)
        // SAFETY: only the raw pointer is read; it stays owned by NVML.
        .map(|d| RawDevice(unsafe { d.handle() }));
    let handle = calls.record_uncached(&mut dev.gpu, "nvmlDeviceGetHandleByIndex_v2", 1, result)?;
    dev.handle = Some(handle);
    Ok(handle)
}

/// UUID and name, until NVML has answered them once.
fn identity(calls: &mut Calls<'_>, device: &Device<'_>, dev: &mut DeviceState) {
    if dev.gpu.uuid.is_empty() {
        if let Some(uuid) = calls.get(&mut dev.gpu, "nvmlDeviceGetUUID", || device.uuid()) {
            dev.gpu.uuid = uuid;
        }
    }
    if dev.name.is_empty() {
        if let Some(name) = calls.get(&mut dev.gpu, "nvmlDeviceGetName", || device.name()) {
            dev.name = name;
        }
    }
}

fn readings(
    calls: &mut Calls<'_>,
    device: &Device<'_>,
    raw: &RawNvml,
    handle: RawDevice,
    gpu: &mut GpuCalls,
    out: &mut DeviceSample,
) {
    if let Some(u) = calls.get(gpu, "nvmlDeviceGetUtilizationRates", || {
        device.utilization_rates()
    }) {
        out.utilization_gpu_percent = Some(u.gpu);
        out.utilization_memory_percent = Some(u.memory);
    }
    if let Some(m) = calls.get(gpu, "nvmlDeviceGetMemoryInfo_v2", || device.memory_info()) {
        out.memory_used_bytes = Some(m.used);
        out.memory_total_bytes = Some(m.total);
    }
    out.power_watts = calls
        .get(gpu, "nvmlDeviceGetPowerUsage", || device.power_usage())
        .map(|mw| f64::from(mw) / 1000.0);
    out.energy_joules_total = calls
        .get(gpu, "nvmlDeviceGetTotalEnergyConsumption", || {
            device.total_energy_consumption()
        })
        .map(|mj| mj as f64 / 1000.0);
    out.temperature_celsius = calls.get(gpu, "nvmlDeviceGetTemperature", || {
        device.temperature(TemperatureSensor::Gpu)
    });
    out.sm_clock_mhz = calls.get(gpu, "nvmlDeviceGetClockInfo", || {
        device.clock_info(Clock::SM)
    });
    out.memory_clock_mhz = calls.get(gpu, "nvmlDeviceGetClockInfo", || {
        device.clock_info(Clock::Memory)
    });
    out.throttle_reasons = calls.get(gpu, raw.clock_reasons_call(), || raw.clock_reasons(handle));
    fields(calls, raw, handle, gpu, out);
}

const SAMPLES: &str = "nvmlDeviceGetSamples";

/// How far apart the device's and the processes' timestamps of one sampling pass can be (the
/// driver stamps each with the CPU time it was taken at, within a millisecond); passes are a
/// sample period (1/6 s or more) apart. A device sample this close before the process query
/// may belong to a pass whose process samples were not yet out: it waits for the next tick,
/// unless a process sample as new was delivered.
const SAME_PASS_US: u64 = 5_000;

/// The busy time the device utilization samples newer than `last_seen` (which moves to the
/// newest one delivered) and not newer than `horizon_us` cover; newer ones are delivered by a
/// later call. Two calls (count, fetch), one when nothing is new, two more when a
/// sample arrived between count and fetch. A one-shot
/// utilization reading covers the driver's last sample period only, so a tick longer than that
/// needs these. Their spacing is the driver's sample period (into `period`); each sample covers
/// the time since the one before, at most one period.
fn utilization_samples(
    calls: &mut Calls<'_>,
    device: &Device<'_>,
    gpu: &mut GpuCalls,
    last_seen: &mut u64,
    horizon_us: u64,
    period: &mut Option<u64>,
) -> Option<SampledBusy> {
    if calls.skip(gpu, SAMPLES).is_some() {
        return None;
    }
    let mut retried = false;
    let result = loop {
        match device.samples(Sampling::GpuUtilization, *last_seen) {
            // Nothing newer than last_seen: not a failure, and no busy time yet (the next
            // samples cover this time).
            Err(NvmlError::NotFound) => {
                calls.counted(1);
                return Some(SampledBusy::default());
            }
            // A sample arrived between the count and the fetch: once more.
            Err(NvmlError::InsufficientSize(_)) if !retried => {
                calls.counted(2);
                retried = true;
            }
            result => {
                let count = match &result {
                    Ok(samples) if samples.is_empty() => 1,
                    Ok(_) | Err(NvmlError::InsufficientSize(_)) => 2,
                    Err(_) => 1,
                };
                break calls.record(gpu, SAMPLES, count, result).ok()?;
            }
        }
    };
    // NVML's fetch leaves entries it did not fill zeroed (timestamp 0): filtered here.
    let mut samples: Vec<(u64, f64)> = result
        .iter()
        .filter(|s| s.timestamp > *last_seen && s.timestamp <= horizon_us)
        .map(|s| {
            let value = match s.value {
                SampleValue::U32(v) => f64::from(v),
                SampleValue::U64(v) => v as f64,
                SampleValue::I64(v) => v as f64,
                SampleValue::F64(v) => v,
            };
            (s.timestamp, value.clamp(0.0, 100.0))
        })
        .collect();
    samples.sort_by_key(|s| s.0);
    let mut gaps: Vec<u64> = samples.windows(2).map(|w| w[1].0 - w[0].0).collect();
    gaps.sort_unstable();
    if let Some(&gap) = gaps.get(gaps.len() / 2).filter(|g| **g > 0) {
        *period = Some(gap);
    }
    let mut previous = *last_seen;
    let mut busy = SampledBusy::default();
    for (ts, percent) in &samples {
        let span = period.map_or(ts - previous, |p| (ts - previous).min(p)) as f64 / 1e6;
        busy.busy_seconds += percent / 100.0 * span;
        busy.covered_seconds += span;
        previous = *ts;
    }
    *last_seen = previous;
    Some(busy)
}

/// NVML's "all links" scope for NVLink fields.
const ALL_LINKS: u32 = u32::MAX;

/// The fields read with one `nvmlDeviceGetFieldValues` call, and where each goes.
const FIELDS: &[(u32, u32)] = &[
    (field_id::NVML_FI_DEV_ECC_SBE_VOL_TOTAL, 0),
    (field_id::NVML_FI_DEV_ECC_DBE_VOL_TOTAL, 0),
    (field_id::NVML_FI_DEV_RETIRED_SBE, 0),
    (field_id::NVML_FI_DEV_RETIRED_DBE, 0),
    (field_id::NVML_FI_DEV_REMAPPED_COR, 0),
    (field_id::NVML_FI_DEV_REMAPPED_UNC, 0),
    (field_id::NVML_FI_DEV_PCIE_COUNT_TX_BYTES, 0),
    (field_id::NVML_FI_DEV_PCIE_COUNT_RX_BYTES, 0),
    // KiB, summed over all links.
    (field_id::NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, ALL_LINKS),
    (field_id::NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, ALL_LINKS),
];

const FIELD_VALUES: &str = "nvmlDeviceGetFieldValues";

fn fields(
    calls: &mut Calls<'_>,
    raw: &RawNvml,
    handle: RawDevice,
    gpu: &mut GpuCalls,
    out: &mut DeviceSample,
) {
    if calls.skip(gpu, FIELD_VALUES).is_some() {
        return;
    }
    let mut values: Vec<_> = FIELDS
        .iter()
        .filter(|(id, _)| !gpu.unsupported_fields.contains(id))
        .map(|&(id, scope)| raw::field_request(id, scope))
        .collect();
    if values.is_empty() {
        return;
    }
    let result = raw.field_values(handle, &mut values);
    if calls.record(gpu, FIELD_VALUES, 1, result).is_err() {
        return;
    }
    let mut read = std::collections::HashMap::new();
    for value in &values {
        match raw::field_u64(value) {
            Ok(v) => {
                read.insert(value.fieldId, v);
            }
            Err(nvml_wrapper::error::NvmlError::NotSupported) => {
                gpu.unsupported_fields.insert(value.fieldId);
            }
            Err(e) => {
                let code = error_code(&e);
                calls.fail(gpu, FIELD_VALUES, code, &e);
            }
        }
    }
    let get = |id| read.get(&id).copied();
    let sum = |a, b| Some(get(a)? + get(b)?);
    out.ecc_corrected_total = get(field_id::NVML_FI_DEV_ECC_SBE_VOL_TOTAL);
    out.ecc_uncorrected_total = get(field_id::NVML_FI_DEV_ECC_DBE_VOL_TOTAL);
    out.retired_pages = sum(
        field_id::NVML_FI_DEV_RETIRED_SBE,
        field_id::NVML_FI_DEV_RETIRED_DBE,
    );
    out.remapped_rows = sum(
        field_id::NVML_FI_DEV_REMAPPED_COR,
        field_id::NVML_FI_DEV_REMAPPED_UNC,
    );
    out.pcie_tx_bytes_total = get(field_id::NVML_FI_DEV_PCIE_COUNT_TX_BYTES);
    out.pcie_rx_bytes_total = get(field_id::NVML_FI_DEV_PCIE_COUNT_RX_BYTES);
    out.nvlink_tx_bytes_total =
        get(field_id::NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX).map(|kib| kib * 1024);
    out.nvlink_rx_bytes_total =
        get(field_id::NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX).map(|kib| kib * 1024);
}
