//! Per-process readings of one GPU: running compute processes, MPS clients, utilization samples
//! chained by `lastSeenTimeStamp`, and accounting stats.

use std::collections::{BTreeMap, HashMap, HashSet};

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::ProcessInfo;
use nvml_wrapper::{Device, Nvml};

use crate::calls::{Calls, Failure, GpuCalls};
use crate::error::Unavailable;
use crate::raw::{device_of, RawDevice, RawNvml};
use crate::sample::{AccountingSample, DeviceSample, MigProcesses, ProcessSample, UtilSample};

/// Accounting stats queried per GPU per tick at most (one call each); the rest wait a tick.
pub(crate) const ACCOUNTING_STATS_PER_TICK: usize = 32;

/// MPS client entries the first MPS query has room for; later ones are sized by the last
/// count NVML reported plus [`MPS_HEADROOM`].
const MPS_CAPACITY: u32 = 16;
const MPS_HEADROOM: u32 = 8;

const RUNNING: &str = "nvmlDeviceGetComputeRunningProcesses_v3";
const MPS: &str = "nvmlDeviceGetMPSComputeRunningProcesses_v3";
const UTILIZATION: &str = "nvmlDeviceGetProcessUtilization";
const ACCOUNTING_PIDS: &str = "nvmlDeviceGetAccountingPids";
const ACCOUNTING_STATS: &str = "nvmlDeviceGetAccountingStats";

#[derive(Debug)]
pub(crate) struct ProcessState {
    /// The newest utilization sample timestamp delivered (µs); starts at the sampler's start.
    last_seen_us: u64,
    /// Exited pids whose final accounting stats were delivered.
    accounting_final: HashSet<u32>,
    /// Where the next tick's accounting queries start when there are more than the cap.
    accounting_cursor: usize,
    /// The last estimate of the driver's sample period.
    period_us: Option<u64>,
    /// Each pid's newest sample timestamp delivered (forgotten after [`REPORTED_FOR_US`]).
    reported: HashMap<u32, u64>,
    /// The driver's sample period as the spacing of its device utilization samples shows it.
    pub(crate) device_period_us: Option<u64>,
    /// Entries the next MPS client query passes NVML.
    mps_capacity: u32,
}

impl ProcessState {
    pub(crate) fn new(started_us: u64) -> ProcessState {
        ProcessState {
            last_seen_us: started_us,
            accounting_final: HashSet::new(),
            accounting_cursor: 0,
            period_us: None,
            reported: HashMap::new(),
            device_period_us: None,
            mps_capacity: MPS_CAPACITY,
        }
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one GPU's handles and the state its per-process readings keep"
)]
pub(crate) fn sample(
    calls: &mut Calls<'_>,
    nvml: &Nvml,
    raw: &RawNvml,
    handle: RawDevice,
    mig: &[(RawDevice, u32, u32)],
    gpu: &mut GpuCalls,
    state: &mut ProcessState,
    out: &mut DeviceSample,
) {
    let device = device_of(nvml, handle);
    let device = &device;
    let mig = if out.mig_enabled { mig } else { &[] };
    let (processes, source) = running(calls, nvml, device, mig, gpu);
    out.processes = processes;
    out.mig_processes = source;
    // MPS clients are asked on the GPU's handle; where that lists nothing under MIG (no
    // monitor capability) it has nothing to say about them either.
    out.mps_clients = if source == Some(MigProcesses::MigHandles) {
        Vec::new()
    } else {
        mps_clients(calls, raw, handle, gpu, state, &out.processes)
    };
    // An MPS client can show in the compute list too (nvidia-smi's "M+C"): it is a client,
    // and its memory is counted once.
    let clients: HashSet<u32> = out.mps_clients.iter().map(|p| p.pid).collect();
    out.processes.retain(|p| !clients.contains(&p.pid));
    let (utilization, window) = utilization(calls, device, gpu, state);
    out.process_utilization = utilization;
    out.util_window_us = window;
    out.util_sample_period_us = state.period_us;
    out.accounting = accounting(calls, device, gpu, state, &out.processes);
}

/// NVML calls a wrapper list query made: a count probe, then a fetch unless the list was empty.
fn list_calls<T>(result: &Result<Vec<T>, NvmlError>) -> u64 {
    match result {
        Ok(items) if items.is_empty() => 1,
        Ok(_) | Err(NvmlError::InsufficientSize(_)) => 2,
        Err(_) => 1,
    }
}

/// Two calls (count probe, fetch), one when none run. On a MIG-enabled GPU (`mig` holds its
/// MIG device handles) the GPU's handle lists every instance's processes only for a caller with
/// the MIG monitor capability; without it, it answers `NO_PERMISSION` or an empty list, and each
/// MIG device handle is asked for its own (two calls each, one when none run).
fn running(
    calls: &mut Calls<'_>,
    nvml: &Nvml,
    device: &Device<'_>,
    mig: &[(RawDevice, u32, u32)],
    gpu: &mut GpuCalls,
) -> (Vec<ProcessSample>, Option<MigProcesses>) {
    if calls.skip(gpu, RUNNING).is_some() {
        return (Vec::new(), None);
    }
    let result = device.running_compute_processes();
    if !mig.is_empty() {
        match result {
            Ok(processes) if !processes.is_empty() => {
                calls.counted(2);
                let listed = processes.into_iter().map(process_sample).collect();
                return (listed, Some(MigProcesses::GpuHandle));
            }
            // Not a failure: how NVML answers a caller without the MIG monitor capability.
            Ok(_) | Err(NvmlError::NoPermission) => {
                calls.counted(1);
                return (
                    per_instance(calls, nvml, mig, gpu),
                    Some(MigProcesses::MigHandles),
                );
            }
            Err(_) => {}
        }
    }
    let count = list_calls(&result);
    let Ok(processes) = calls.record(gpu, RUNNING, count, result) else {
        return (Vec::new(), None);
    };
    (processes.into_iter().map(process_sample).collect(), None)
}

/// Each MIG device handle's processes, with its instance ids.
fn per_instance(
    calls: &mut Calls<'_>,
    nvml: &Nvml,
    mig: &[(RawDevice, u32, u32)],
    gpu: &mut GpuCalls,
) -> Vec<ProcessSample> {
    let mut listed = Vec::new();
    for &(handle, gpu_instance_id, compute_instance_id) in mig {
        let result = device_of(nvml, handle).running_compute_processes();
        let count = list_calls(&result);
        // Uncached: a MIG device's answer must not silence the GPU's own call.
        let Ok(processes) = calls.record_uncached(gpu, RUNNING, count, result) else {
            continue;
        };
        listed.extend(processes.into_iter().map(|p| ProcessSample {
            gpu_instance_id: Some(gpu_instance_id),
            compute_instance_id: Some(compute_instance_id),
            ..process_sample(p)
        }));
    }
    listed
}

fn process_sample(p: ProcessInfo) -> ProcessSample {
    ProcessSample {
        pid: p.pid,
        used_memory_bytes: match p.used_gpu_memory {
            UsedGpuMemory::Used(bytes) => Some(bytes),
            UsedGpuMemory::Unavailable => None,
        },
        gpu_instance_id: p.gpu_instance_id,
        compute_instance_id: p.compute_instance_id,
    }
}

/// MPS clients. Asked only while the compute list is not empty: an MPS server holds a compute
/// context (and shows in that list) whenever it has clients, so an empty list means none, and
/// an idle GPU costs nothing more. One call with a buffer sized from the last count instead of
/// a count probe and a fetch; two when more clients run than it held. A driver without the
/// function, or a GPU answering `NOT_SUPPORTED` (remembered), has no MPS: no call, no error.
fn mps_clients(
    calls: &mut Calls<'_>,
    raw: &RawNvml,
    handle: RawDevice,
    gpu: &mut GpuCalls,
    state: &mut ProcessState,
    running: &[ProcessSample],
) -> Vec<ProcessSample> {
    if running.is_empty() || !raw.has_mps_processes() || calls.skip(gpu, MPS).is_some() {
        return Vec::new();
    }
    let mut capacity = state.mps_capacity;
    let mut retried = false;
    let result = loop {
        match raw.mps_compute_processes(handle, capacity) {
            // No MPS server on this GPU: not a failure.
            Err(NvmlError::NotFound) => {
                calls.counted(1);
                break Ok(Vec::new());
            }
            // More clients than room: NVML said how many; once more with that much.
            Err(NvmlError::InsufficientSize(Some(needed))) if !retried => {
                calls.counted(1);
                capacity = u32::try_from(needed)
                    .unwrap_or(u32::MAX)
                    .saturating_add(MPS_HEADROOM);
                retried = true;
            }
            result => break calls.record(gpu, MPS, 1, result),
        }
    };
    state.mps_capacity = capacity;
    let Ok(clients) = result else {
        return Vec::new();
    };
    clients
        .into_iter()
        .map(|p| process_sample(ProcessInfo::from(p)))
        .collect()
}

type Utilization = (Result<Vec<UtilSample>, Unavailable>, Option<(u64, u64)>);

/// Samples newer than the last delivered one. Two calls (count probe, fetch), one when nothing
/// is new (`NOT_FOUND`); a retry (two more) if new samples arrived between probe and fetch.
fn utilization(
    calls: &mut Calls<'_>,
    device: &Device<'_>,
    gpu: &mut GpuCalls,
    state: &mut ProcessState,
) -> Utilization {
    if let Some(failure) = calls.skip(gpu, UTILIZATION) {
        return (Err(failure.unavailable()), None);
    }
    let last_seen = state.last_seen_us;
    let mut retried = false;
    let result = loop {
        match device.process_utilization_stats(last_seen) {
            // Nothing newer than last_seen: not a failure.
            Err(NvmlError::NotFound) => {
                calls.counted(1);
                break Ok(Vec::new());
            }
            Err(NvmlError::InsufficientSize(_)) if !retried => {
                calls.counted(2);
                retried = true;
            }
            result => {
                let count = list_calls(&result);
                break calls.record(gpu, UTILIZATION, count, result);
            }
        }
    };
    let samples = match result {
        Ok(samples) => samples,
        Err(failure) => return (Err(failure.unavailable()), None),
    };
    // NVML filters by lastSeenTimeStamp itself; filtering again guarantees no sample is
    // delivered twice whatever a driver returns. Real drivers answer the count probe with a
    // fixed count and leave the entries they do not fill zeroed (pid 0, timestamp 0); pid 0
    // is never a process of ours either way.
    let mut fresh: Vec<UtilSample> = samples
        .into_iter()
        .filter(|s| s.timestamp > last_seen && s.pid != 0)
        .map(|s| UtilSample {
            pid: s.pid,
            timestamp_us: s.timestamp,
            span_us: 0,
            sm_percent: s.sm_util,
            memory_percent: s.mem_util,
        })
        .collect();
    let Some(newest) = fresh.iter().map(|s| s.timestamp_us).max() else {
        return (Ok(fresh), None);
    };
    state.last_seen_us = newest;
    if let Some(period) = sample_period(&fresh) {
        state.period_us = Some(period);
    }
    spans(&mut fresh, last_seen, state);
    (Ok(fresh), Some((last_seen, newest)))
}

/// How long a pid's last sample timestamp is remembered.
const REPORTED_FOR_US: u64 = 600_000_000;

/// What each sample stands for. A pid's entries in time order: each covers the time since the
/// one before. The first one, where the driver gives one entry per process holding its mean
/// over its samples since `lastSeenTimeStamp`, covers those samples: from the start of the
/// pid's sample period in which `lastSeenTimeStamp` falls (on the grid of its previous entry
/// and the driver's period, which the device samples' spacing shows), or from its previous
/// entry when the period is not known, or from `lastSeenTimeStamp` for a pid not seen before.
/// Where the driver gives one entry per sample period (the period is then known from a pid's
/// consecutive entries), an entry covers at most one period: an idle process has no entries,
/// and a gap is time it did not run.
fn spans(samples: &mut [UtilSample], last_seen: u64, state: &mut ProcessState) {
    samples.sort_by_key(|s| (s.pid, s.timestamp_us));
    let grid = state
        .period_us
        .or(state.device_period_us)
        .filter(|p| *p > 0);
    let mut previous: Option<(u32, u64)> = None;
    for s in samples.iter_mut() {
        let start = match (previous, state.reported.get(&s.pid)) {
            (Some((pid, ts)), _) if pid == s.pid => ts,
            (_, Some(&before)) if before < last_seen => {
                grid.map_or(before, |p| before + (last_seen - before) / p * p)
            }
            (_, Some(&before)) => before,
            (_, None) => last_seen,
        }
        .min(s.timestamp_us);
        let span = s.timestamp_us - start;
        s.span_us = state.period_us.map_or(span, |period| span.min(period));
        previous = Some((s.pid, s.timestamp_us));
    }
    for s in samples.iter() {
        state.reported.insert(s.pid, s.timestamp_us);
    }
    if let Some(newest) = samples.iter().map(|s| s.timestamp_us).max() {
        state
            .reported
            .retain(|_, ts| newest.saturating_sub(*ts) < REPORTED_FOR_US);
    }
}

/// The median spacing of consecutive samples of the same process. Per process, because
/// different processes' samples need not share timestamps; the median, because a sample
/// missing (a process idle for a period has none) only doubles one gap. `None` where every
/// process has one entry (real drivers: one per process, its mean since `lastSeenTimeStamp`).
fn sample_period(samples: &[UtilSample]) -> Option<u64> {
    let mut by_pid: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for s in samples {
        by_pid.entry(s.pid).or_default().push(s.timestamp_us);
    }
    let mut gaps: Vec<u64> = Vec::new();
    for timestamps in by_pid.values_mut() {
        timestamps.sort_unstable();
        gaps.extend(
            timestamps
                .windows(2)
                .map(|w| w[1] - w[0])
                .filter(|gap| *gap > 0),
        );
    }
    gaps.sort_unstable();
    gaps.get(gaps.len() / 2).copied()
}

/// `None` when accounting mode is off. One or two calls for the pid list, then one per pid
/// that is running or has not had its final stats delivered, at most
/// [`ACCOUNTING_STATS_PER_TICK`].
fn accounting(
    calls: &mut Calls<'_>,
    device: &Device<'_>,
    gpu: &mut GpuCalls,
    state: &mut ProcessState,
    running: &[ProcessSample],
) -> Option<Vec<AccountingSample>> {
    if gpu.lost_now {
        return None;
    }
    let result = device.accounting_pids();
    let count = list_calls(&result);
    // NOT_SUPPORTED is how NVML says accounting mode is off; it can be turned on at run time,
    // so it is asked every tick and not remembered.
    let pids = calls
        .record_uncached(gpu, ACCOUNTING_PIDS, count, result)
        .ok()?;
    state.accounting_final.retain(|pid| pids.contains(pid));
    let running: HashSet<u32> = running.iter().map(|p| p.pid).collect();
    let pending: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|pid| running.contains(pid) || !state.accounting_final.contains(pid))
        .collect();
    let take = pending.len().min(ACCOUNTING_STATS_PER_TICK);
    let start = if pending.is_empty() {
        0
    } else {
        state.accounting_cursor % pending.len()
    };
    state.accounting_cursor = start + take;
    let mut samples = Vec::with_capacity(take);
    for &pid in pending.iter().cycle().skip(start).take(take) {
        let result = device.accounting_stats_for(pid);
        let stats = match result {
            // Evicted from the driver's circular buffer since the pid list.
            Err(NvmlError::NotFound) => {
                calls.counted(1);
                continue;
            }
            result => match calls.record_uncached(gpu, ACCOUNTING_STATS, 1, result) {
                Ok(stats) => stats,
                Err(Failure::NotSupported | Failure::Lost) => return None,
                Err(Failure::Failed(_)) => continue,
            },
        };
        if !stats.is_running {
            state.accounting_final.insert(pid);
        }
        samples.push(AccountingSample {
            pid,
            gpu_utilization_percent: stats.gpu_utilization,
            memory_utilization_percent: stats.memory_utilization,
            max_memory_usage_bytes: stats.max_memory_usage,
            time_ms: stats.time,
            start_time_us: stats.start_time,
            is_running: stats.is_running,
        });
    }
    Some(samples)
}
