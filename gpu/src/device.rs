//! Device-level readings of one GPU: utilization, memory, power and the energy counter,
//! temperature, clocks, clock event reasons, and the counters read as field values (PCIe,
//! NVLink, ECC, retired pages, remapped rows).

use std::collections::HashSet;

use nvml_wrapper::enum_wrappers::device::{Clock, PcieUtilCounter, TemperatureSensor};
use nvml_wrapper::{Device, Nvml};
use nvml_wrapper_sys::bindings::field_id;
use tracing::{error, info};

use crate::raw::{self, RawDevice, RawNvml};
use crate::sample::DeviceSample;
use crate::tick::{DeviceState, Failure, Tick};

/// A wrapper `Device` for a handle this `Nvml` handed out.
pub(crate) fn device_of(nvml: &Nvml, handle: RawDevice) -> Device<'_> {
    // SAFETY: every RawDevice comes from this Nvml instance (handle by index or MIG handle), and
    // NVML keeps handles valid until nvmlShutdown, which runs only when that Nvml drops.
    unsafe { Device::new(handle.0, nvml) }
}

/// Samples one GPU. NVML calls per GPU per tick, steady state: 9 device readings (11 with the
/// PCIe throughput fallback), 1 for the MIG mode (+1 per MIG instance; the layout is
/// re-enumerated once a minute), 2 for the process list (1 when empty), 1 for MPS clients
/// while the process list is not empty (2 in a round where more clients run than the last
/// round's buffer held), 2 for utilization samples (1 when nothing is new), 1 for accounting
/// when off (2 + at most 32 when on): 16 on a busy GPU without MIG and accounting. Calls known
/// unsupported are not repeated; a lost GPU costs 1.
pub(crate) fn sample(
    tick: &mut Tick<'_>,
    nvml: &Nvml,
    raw: &RawNvml,
    dev: &mut DeviceState,
) -> DeviceSample {
    dev.lost_now = false;
    let mut out = DeviceSample {
        index: dev.index,
        ..DeviceSample::default()
    };
    match handle(tick, nvml, dev) {
        Ok(handle) => {
            let device = device_of(nvml, handle);
            identity(tick, &device, dev);
            readings(tick, &device, raw, handle, dev, &mut out);
            crate::mig::sample(tick, nvml, raw, handle, dev, &mut out);
            crate::process::sample(tick, &device, raw, handle, dev, &mut out);
        }
        Err(failure) => out.process_utilization = Err(failure.unavailable()),
    }
    if dev.lost_now {
        // Whatever was read before NVML said so is not reported: a lost GPU reads as empty.
        out = DeviceSample {
            index: dev.index,
            lost: true,
            process_utilization: Err(Failure::Lost.unavailable()),
            ..DeviceSample::default()
        };
    }
    out.uuid.clone_from(&dev.uuid);
    out.name.clone_from(&dev.name);
    match (dev.was_lost, dev.lost_now) {
        (false, true) => error!(
            gpu = %dev.uuid,
            index = dev.index,
            "GPU is lost (fell off the bus); reporting it and retrying each tick"
        ),
        (true, false) => info!(gpu = %dev.uuid, index = dev.index, "GPU answers again"),
        _ => {}
    }
    dev.was_lost = dev.lost_now;
    out
}

/// The device handle, asking NVML again if start-up could not get it.
fn handle(tick: &mut Tick<'_>, nvml: &Nvml, dev: &mut DeviceState) -> Result<RawDevice, Failure> {
    if let Some(handle) = dev.handle {
        return Ok(handle);
    }
    let result = nvml
        .device_by_index(dev.index)
        // SAFETY: only the raw pointer is read; it stays owned by NVML.
        .map(|d| RawDevice(unsafe { d.handle() }));
    let handle = tick.record_uncached(dev, "nvmlDeviceGetHandleByIndex_v2", 1, result)?;
    dev.handle = Some(handle);
    Ok(handle)
}

/// UUID and name, until NVML has answered them once.
fn identity(tick: &mut Tick<'_>, device: &Device<'_>, dev: &mut DeviceState) {
    if dev.uuid.is_empty() {
        if let Some(uuid) = tick.get(dev, "nvmlDeviceGetUUID", || device.uuid()) {
            dev.uuid = uuid;
        }
    }
    if dev.name.is_empty() {
        if let Some(name) = tick.get(dev, "nvmlDeviceGetName", || device.name()) {
            dev.name = name;
        }
    }
}

fn readings(
    tick: &mut Tick<'_>,
    device: &Device<'_>,
    raw: &RawNvml,
    handle: RawDevice,
    dev: &mut DeviceState,
    out: &mut DeviceSample,
) {
    if let Some(u) = tick.get(dev, "nvmlDeviceGetUtilizationRates", || {
        device.utilization_rates()
    }) {
        out.utilization_gpu_percent = Some(u.gpu);
        out.utilization_memory_percent = Some(u.memory);
    }
    if let Some(m) = tick.get(dev, "nvmlDeviceGetMemoryInfo_v2", || device.memory_info()) {
        out.memory_used_bytes = Some(m.used);
        out.memory_total_bytes = Some(m.total);
    }
    out.power_watts = tick
        .get(dev, "nvmlDeviceGetPowerUsage", || device.power_usage())
        .map(|mw| f64::from(mw) / 1000.0);
    out.energy_joules_total = tick
        .get(dev, "nvmlDeviceGetTotalEnergyConsumption", || {
            device.total_energy_consumption()
        })
        .map(|mj| mj as f64 / 1000.0);
    out.temperature_celsius = tick.get(dev, "nvmlDeviceGetTemperature", || {
        device.temperature(TemperatureSensor::Gpu)
    });
    out.sm_clock_mhz = tick.get(dev, "nvmlDeviceGetClockInfo", || {
        device.clock_info(Clock::SM)
    });
    out.memory_clock_mhz = tick.get(dev, "nvmlDeviceGetClockInfo", || {
        device.clock_info(Clock::Memory)
    });
    out.throttle_reasons = tick.get(dev, raw.clock_reasons_call(), || raw.clock_reasons(handle));
    fields(tick, raw, handle, dev, out);
    // Older drivers lack the PCIe byte counters; their throughput call is the fallback.
    if dev
        .unsupported_fields
        .contains(&field_id::NVML_FI_DEV_PCIE_COUNT_TX_BYTES)
    {
        let kbps = |counter| {
            device
                .pcie_throughput(counter)
                .map(|kb| u64::from(kb) * 1024)
        };
        out.pcie_tx_bytes_per_second = tick.get(dev, "nvmlDeviceGetPcieThroughput", || {
            kbps(PcieUtilCounter::Send)
        });
        out.pcie_rx_bytes_per_second = tick.get(dev, "nvmlDeviceGetPcieThroughput", || {
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
    tick: &mut Tick<'_>,
    raw: &RawNvml,
    handle: RawDevice,
    dev: &mut DeviceState,
    out: &mut DeviceSample,
) {
    if tick.skip(dev, FIELD_VALUES).is_some() {
        return;
    }
    let mut values: Vec<_> = FIELDS
        .iter()
        .filter(|(id, _)| !dev.unsupported_fields.contains(id))
        .map(|&(id, scope)| raw::field_request(id, scope))
        .collect();
    if values.is_empty() {
        return;
    }
    let result = raw.field_values(handle, &mut values);
    if tick.record(dev, FIELD_VALUES, 1, result).is_err() {
        return;
    }
    let mut read = std::collections::HashMap::new();
    for value in &values {
        match raw::field_u64(value) {
            Ok(v) => {
                read.insert(value.fieldId, v);
            }
            Err(nvml_wrapper::error::NvmlError::NotSupported) => {
                dev.unsupported_fields.insert(value.fieldId);
            }
            Err(e) => {
                let code = crate::error::error_code(&e);
                tick.fail(dev, FIELD_VALUES, code, &e);
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

/// Forget what was unsupported (the MIG mode changed, and with it what the GPU answers).
pub(crate) fn reset_support(dev: &mut DeviceState) {
    dev.unsupported = HashSet::new();
    dev.unsupported_fields = HashSet::new();
}
