//! Device-level readings of one GPU: utilization, memory, power and the energy counter,
//! temperature, clocks, clock event reasons, and the counters read as field values (PCIe,
//! NVLink, ECC, retired pages, remapped rows). It holds each GPU's state between samples and
//! hands the MIG and per-process parts to their own modules.

use nvml_wrapper::enum_wrappers::device::{Clock, PcieUtilCounter, TemperatureSensor};
use nvml_wrapper::{Device, Nvml};
use nvml_wrapper_sys::bindings::field_id;
use tracing::{error, info};

use crate::calls::{Calls, Failure, GpuCalls};
use crate::error::error_code;
use crate::mig::{self, MigState};
use crate::process::{self, ProcessState};
use crate::raw::{self, device_of, RawDevice, RawNvml};
use crate::sample::DeviceSample;

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
        }
    }
}

/// Samples one GPU. NVML calls per GPU per tick, steady state: 9 device readings (11 with the
/// PCIe throughput fallback), 1 for the MIG mode (+1 per MIG instance; the layout is
/// re-enumerated once a minute), 2 for the process list (1 when empty), 1 for MPS clients
/// while the process list is not empty (2 in a round where more clients run than the last
/// round's buffer held), 2 for utilization samples (1 when nothing is new), 1 for accounting
/// when off (2 + at most 32 when on): 16 on a busy GPU without MIG and accounting. Calls known
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
            process::sample(
                calls,
                &device,
                raw,
                handle,
                &mut dev.gpu,
                &mut dev.processes,
                &mut out,
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
    // Older drivers lack the PCIe byte counters; their throughput call is the fallback.
    if gpu
        .unsupported_fields
        .contains(&field_id::NVML_FI_DEV_PCIE_COUNT_TX_BYTES)
    {
        let kbps = |counter| {
            device
                .pcie_throughput(counter)
                .map(|kb| u64::from(kb) * 1024)
        };
        out.pcie_tx_bytes_per_second = calls.get(gpu, "nvmlDeviceGetPcieThroughput", || {
            kbps(PcieUtilCounter::Send)
        });
        out.pcie_rx_bytes_per_second = calls.get(gpu, "nvmlDeviceGetPcieThroughput", || {
            kbps(PcieUtilCounter::Receive)
        });
    }
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
