//! MIG: the mode, the layout (every MIG device with its GPU / compute instance ids), and each
//! instance's memory. The layout is enumerated when MIG turns on and then once a minute (it only
//! changes when an operator reconfigures an idle GPU), so a tick costs one call for the mode
//! plus one per instance.

use std::time::{Duration, Instant};

use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;
use tracing::info;

use crate::calls::{Calls, Failure, GpuCalls};
use crate::raw::{device_of, RawDevice, RawNvml};
use crate::sample::{DeviceSample, MigSample};

const LAYOUT_REFRESH: Duration = Duration::from_secs(60);
/// More slots than any GPU has (7 on A100 / H100); bounds the enumeration.
const MAX_SLOTS: u32 = 16;

#[derive(Debug, Default)]
pub(crate) struct MigState {
    /// The mode seen last tick.
    enabled: Option<bool>,
    instances: Vec<MigInstance>,
    /// The GPU's MIG slots: one per compute slice, as the smallest instance takes one.
    slots: Option<u32>,
    refreshed: Option<Instant>,
    /// An instance call failed as if the layout changed: enumerate again next tick.
    stale: bool,
}

#[derive(Debug)]
struct MigInstance {
    handle: RawDevice,
    uuid: String,
    gpu_instance_id: u32,
    compute_instance_id: u32,
    /// Its compute slices, where the driver said.
    compute_slices: Option<u32>,
}

pub(crate) fn sample(
    calls: &mut Calls<'_>,
    nvml: &Nvml,
    raw: &RawNvml,
    handle: RawDevice,
    gpu: &mut GpuCalls,
    state: &mut MigState,
    out: &mut DeviceSample,
) {
    let Some(mode) = calls.get(gpu, "nvmlDeviceGetMigMode", || {
        device_of(nvml, handle).mig_mode()
    }) else {
        // No MIG on this GPU (not supported) or the call failed: keep what we knew.
        out.mig_enabled = state.enabled == Some(true);
        return;
    };
    let enabled = mode.current == nvml_wrapper_sys::bindings::NVML_DEVICE_MIG_ENABLE;
    if state.enabled != Some(enabled) {
        if state.enabled.is_some() {
            info!(gpu = %gpu.uuid, enabled, "MIG mode changed");
            // What the GPU supports depends on the mode (utilization rates, per-process
            // utilization): ask again.
            gpu.reset_support();
        }
        *state = MigState {
            enabled: Some(enabled),
            ..MigState::default()
        };
    }
    out.mig_enabled = enabled;
    if !enabled {
        return;
    }
    if state.stale
        || state
            .refreshed
            .is_none_or(|t| t.elapsed() >= LAYOUT_REFRESH)
    {
        refresh_layout(calls, nvml, raw, handle, gpu, state);
    }
    let mut stale = false;
    let mut samples = Vec::with_capacity(state.instances.len());
    for instance in &state.instances {
        let mut sample = MigSample {
            uuid: instance.uuid.clone(),
            gpu_instance_id: instance.gpu_instance_id,
            compute_instance_id: instance.compute_instance_id,
            compute_slices: instance.compute_slices,
            gpu_slices: state.slots,
            ..MigSample::default()
        };
        let result = device_of(nvml, instance.handle).memory_info();
        stale |= matches!(result, Err(NvmlError::InvalidArg | NvmlError::NotFound));
        match calls.record_uncached(gpu, "nvmlDeviceGetMemoryInfo_v2", 1, result) {
            Ok(memory) => {
                sample.memory_used_bytes = Some(memory.used);
                sample.memory_total_bytes = Some(memory.total);
            }
            Err(Failure::Lost) => return,
            Err(_) => {}
        }
        samples.push(sample);
    }
    state.stale = stale;
    out.mig = samples;
}

/// The MIG device handles with their GPU and compute instance ids, as last enumerated.
pub(crate) fn instances(state: &MigState) -> Vec<(RawDevice, u32, u32)> {
    state
        .instances
        .iter()
        .map(|i| (i.handle, i.gpu_instance_id, i.compute_instance_id))
        .collect()
}

/// Enumerates the MIG devices: one call for the slot count, one per slot, four per instance.
fn refresh_layout(
    calls: &mut Calls<'_>,
    nvml: &Nvml,
    raw: &RawNvml,
    handle: RawDevice,
    gpu: &mut GpuCalls,
    state: &mut MigState,
) {
    const MAX_COUNT: &str = "nvmlDeviceGetMaxMigDeviceCount";
    const BY_INDEX: &str = "nvmlDeviceGetMigDeviceHandleByIndex";
    let result = raw.max_mig_device_count(handle);
    let Ok(slots) = calls.record_uncached(gpu, MAX_COUNT, 1, result) else {
        return;
    };
    let mut instances = Vec::new();
    for slot in 0..slots.min(MAX_SLOTS) {
        let mig = match raw.mig_device(handle, slot) {
            // An empty slot.
            Err(NvmlError::NotFound) => {
                calls.counted(1);
                continue;
            }
            result => match calls.record_uncached(gpu, BY_INDEX, 1, result) {
                Ok(mig) => mig,
                Err(Failure::Lost) => return,
                Err(_) => continue,
            },
        };
        let uuid = device_of(nvml, mig).uuid();
        let Ok(uuid) = calls.record_uncached(gpu, "nvmlDeviceGetUUID", 1, uuid) else {
            continue;
        };
        let gi = raw.gpu_instance_id(mig);
        let Ok(gpu_instance_id) = calls.record_uncached(gpu, "nvmlDeviceGetGpuInstanceId", 1, gi)
        else {
            continue;
        };
        let ci = raw.compute_instance_id(mig);
        let Ok(compute_instance_id) =
            calls.record_uncached(gpu, "nvmlDeviceGetComputeInstanceId", 1, ci)
        else {
            continue;
        };
        // What share of the GPU one of its seconds is (prices). Optional: an instance whose
        // driver does not say is still metered.
        let attributes = device_of(nvml, mig).attributes();
        let compute_slices = calls
            .record_uncached(gpu, "nvmlDeviceGetAttributes_v2", 1, attributes)
            .ok()
            .map(|a| a.compute_instance_slice_count)
            .filter(|n| *n > 0);
        instances.push(MigInstance {
            handle: mig,
            uuid,
            gpu_instance_id,
            compute_instance_id,
            compute_slices,
        });
    }
    state.slots = Some(slots).filter(|n| *n > 0);
    if instances.len() != state.instances.len() {
        info!(gpu = %gpu.uuid, instances = instances.len(), "MIG layout");
    }
    state.instances = instances;
    state.refreshed = Some(Instant::now());
    state.stale = false;
}
