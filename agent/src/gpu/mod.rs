//! GPU metering: the NVML sampler on a thread of its own, and the attribution of each device's
//! busy time, memory and energy to the workloads whose processes hold it.
//!
//! The sampler thread calls NVML (which may block for long on a GPU in trouble) and hands each
//! sample over a channel; the tick drains what arrived without waiting, so NVML never delays a
//! tick, a scrape or the async runtime. Process utilization samples are chained by the sampler,
//! so a sample that arrives a tick late is still counted once.

pub mod attribution;
mod metrics;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_exporters::Family;
use tally_gpu::{DeviceSample, GpuError, GpuOptions, GpuSample, Sampler, XidEvent};

use crate::catalogue::{self, workload};
use crate::config::Config;
use crate::errors::ErrorCounts;
use crate::identity::podresources::Assignments;
use crate::identity::{Identity, Workload};
use crate::ledger::{Key, Ledger};
use crate::source::{PricedGpu, Source, TickCtx};
use attribution::{attribute, DeviceWindow, Holder};

/// One sampler round, stamped when it was taken.
struct Batch {
    sample: GpuSample,
    xids: Vec<XidEvent>,
    at: Instant,
    /// NVML calls the round made, all GPUs together.
    calls: Option<u64>,
}

/// What the agent keeps per device between samples.
#[derive(Debug, Default)]
struct DeviceState {
    last: Option<DeviceSample>,
    last_at: Option<Instant>,
    busy_seconds_total: f64,
    unattributed_seconds_total: f64,
    unallocated_joules_total: f64,
}

/// The GPU source: down (no NVML) or a running sampler thread and the attribution state.
pub struct GpuSource {
    batches: Option<mpsc::Receiver<Batch>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    driver_version: Option<String>,
    devices: BTreeMap<String, DeviceState>,
    xids: BTreeMap<(String, u64), u64>,
    /// pid → workload for the processes of the last sample (pids are reused, so only those).
    pids: HashMap<u32, Arc<Workload>>,
    /// GPU memory held per workload and device, from the latest sample.
    memory: Vec<(Arc<Workload>, Arc<str>, f64)>,
    /// Calls the sampler made per GPU in its last round.
    calls_per_gpu: Option<f64>,
}

impl std::fmt::Debug for GpuSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuSource")
            .field("up", &self.batches.is_some())
            .field("devices", &self.devices.len())
            .finish_non_exhaustive()
    }
}

impl GpuSource {
    /// Loads NVML and starts sampling every `interval`; without a library the source is down
    /// and says so once.
    pub fn start(config: &Config, interval: Duration) -> GpuSource {
        let mut source = GpuSource {
            batches: None,
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
            driver_version: None,
            devices: BTreeMap::new(),
            xids: BTreeMap::new(),
            pids: HashMap::new(),
            memory: Vec::new(),
            calls_per_gpu: None,
        };
        let options = GpuOptions {
            library: config.gpu.nvml_library.clone(),
        };
        let sampler = match Sampler::start(&options) {
            Ok(sampler) => sampler,
            Err(GpuError::LibraryNotFound { path, .. }) => {
                tracing::info!(library = %path, "no NVML library: GPU metering off");
                return source;
            }
            Err(e) => {
                tracing::warn!(error = %tally_error_chain::chain(&e), "NVML did not start: GPU metering off");
                return source;
            }
        };
        source.driver_version = sampler.driver_version().map(str::to_owned);
        let (tx, rx) = mpsc::channel();
        let stop = source.stop.clone();
        let thread = std::thread::Builder::new()
            .name("tally-gpu".into())
            .spawn(move || sample_loop(sampler, interval, tx, stop));
        match thread {
            Ok(handle) => {
                source.batches = Some(rx);
                source.thread = Some(handle);
            }
            Err(e) => tracing::warn!(error = %e, "starting the GPU sampler thread failed"),
        }
        source
    }

    /// GPU (and MIG instance) UUID → what it is priced as.
    fn priced(&self) -> HashMap<Arc<str>, PricedGpu> {
        let mut gpus = HashMap::new();
        for device in self.devices.values().filter_map(|d| d.last.as_ref()) {
            let model: Arc<str> = Arc::from(device.name.as_str());
            let whole = PricedGpu {
                model: model.clone(),
                share: 1.0,
            };
            gpus.insert(Arc::from(device.uuid.as_str()), whole);
            for mig in &device.mig {
                let instance = PricedGpu {
                    model: model.clone(),
                    share: mig_share(mig, device.memory_total_bytes),
                };
                gpus.insert(Arc::from(mig.uuid.as_str()), instance);
            }
        }
        gpus
    }

    /// GPU memory each workload holds now, over all its devices.
    fn memory_held(&self) -> HashMap<crate::identity::PathIdentity, f64> {
        let mut held = HashMap::new();
        for (w, _, bytes) in &self.memory {
            *held.entry(w.identity.clone()).or_insert(0.0) += bytes;
        }
        held
    }

    pub fn up(&self) -> bool {
        self.batches.is_some()
    }

    /// Attributes every sample that arrived since the last tick.
    fn attribute_arrived(
        &mut self,
        identity: &mut Identity,
        host: &Arc<Workload>,
        ledger: &mut Ledger,
        assignments: Option<&Assignments>,
        errors: &mut ErrorCounts,
    ) {
        let Some(batches) = &self.batches else { return };
        let arrived: Vec<Batch> = batches.try_iter().collect();
        for batch in arrived {
            for e in &batch.sample.errors {
                errors.count(&catalogue::gpu::NVML_ERRORS, &[e.call, e.code]);
            }
            for x in batch.xids {
                *self.xids.entry((x.device_uuid, x.xid)).or_default() += 1;
            }
            let gpus = batch.sample.devices.len().max(1) as f64;
            self.calls_per_gpu = batch.calls.map(|c| c as f64 / gpus);
            let mut pids = HashMap::new();
            let mut memory = Vec::new();
            for device in batch.sample.devices {
                self.attribute(
                    device,
                    batch.at,
                    identity,
                    host,
                    ledger,
                    &mut pids,
                    &mut memory,
                    assignments,
                );
            }
            self.pids = pids;
            self.memory = memory;
        }
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one device's share of the tick's state"
    )]
    fn attribute(
        &mut self,
        device: DeviceSample,
        at: Instant,
        identity: &mut Identity,
        host: &Arc<Workload>,
        ledger: &mut Ledger,
        pids: &mut HashMap<u32, Arc<Workload>>,
        memory: &mut Vec<(Arc<Workload>, Arc<str>, f64)>,
        assignments: Option<&Assignments>,
    ) {
        if device.uuid.is_empty() {
            return;
        }
        let mut resolve = |pid: u32| -> Arc<Workload> {
            crate::identity::resolve_sampled_pid(identity, host, &self.pids, pids, pid)
        };
        // Workloads by index, so attribution works on a plain ordered key.
        let mut keys: Vec<Arc<Workload>> = Vec::new();
        let mut index = |w: Arc<Workload>| -> usize {
            match keys.iter().position(|k| k.identity == w.identity) {
                Some(i) => i,
                None => {
                    keys.push(w);
                    keys.len() - 1
                }
            }
        };
        let instance_of = |gi: Option<u32>, ci: Option<u32>| {
            device
                .mig
                .iter()
                .find(|m| {
                    Some(m.gpu_instance_id) == gi
                        && (ci.is_none() || Some(m.compute_instance_id) == ci)
                })
                .map(|m| m.uuid.clone())
        };
        // The compute list (under MPS: the MPS server) and the MPS clients.
        let listed = device.processes.iter().map(|p| (p, false));
        let clients = device.mps_clients.iter().map(|p| (p, true));
        let mut holders: Vec<Holder<usize>> = listed
            .chain(clients)
            .map(|(p, mps_client)| Holder {
                workload: index(resolve(p.pid)),
                memory_bytes: p.used_memory_bytes.unwrap_or(0) as f64,
                mig_instance: if device.mig_enabled {
                    instance_of(p.gpu_instance_id, p.compute_instance_id)
                } else {
                    None
                },
                mps_client,
            })
            .collect();
        // Each sample's SM share of the time it stands for; a junk share above 100 % (zombie
        // pids) counts as 100 %.
        let mut sampled: Option<Vec<(usize, f64)>> = match &device.process_utilization {
            Ok(samples) => Some(
                samples
                    .iter()
                    .map(|s| {
                        (
                            index(resolve(s.pid)),
                            f64::from(s.sm_percent.min(100)) / 100.0 * s.span_us as f64 / 1e6,
                        )
                    })
                    .collect(),
            ),
            Err(_) => None,
        };
        // Devices the kubelet assigned to pod containers: what the agent could not see (the host
        // row: processes in another pid namespace) belongs to the pods holding the device, split
        // evenly among time-slicing replicas; an assigned device with no visible process is
        // still held (idle energy, memory_share of zero).
        if let Some(assignments) = assignments {
            let host_index = index(host.clone());
            let mut targets: Vec<(Option<String>, Vec<usize>)> = Vec::new();
            let mut ids = vec![(None, device.uuid.clone())];
            ids.extend(
                device
                    .mig
                    .iter()
                    .map(|m| (Some(m.uuid.clone()), m.uuid.clone())),
            );
            for (instance, id) in ids {
                if let Some(names) = assignments.get(&id) {
                    let assignees = names.iter().map(|n| index(identity.assigned(n))).collect();
                    targets.push((instance, assignees));
                }
            }
            reassign(&mut holders, sampled.as_mut(), host_index, &targets);
        }
        let uuid: Arc<str> = Arc::from(device.uuid.as_str());
        let state = self.devices.entry(device.uuid.clone()).or_default();
        for h in &holders {
            let gpu = h
                .mig_instance
                .as_deref()
                .map_or_else(|| uuid.clone(), Arc::from);
            // Listed by the driver (or holding an assigned device), so it runs: live whether or
            // not this tick's samples charge it anything.
            ledger.touch(&keys[h.workload]);
            memory.push((keys[h.workload].clone(), gpu, h.memory_bytes));
        }
        if let (Some(last_at), Some(last)) = (state.last_at, &state.last) {
            let seconds = at.saturating_duration_since(last_at).as_secs_f64();
            // The driver's samples where it has them: they cover the time the process samples
            // cover (the same sampling passes), which a tick need not line up with. Its one-shot
            // reading covers only its last sample period; the fallback.
            let (busy_seconds, covered) = match device.utilization_gpu_sampled {
                Some(s) => (Some(s.busy_seconds), s.covered_seconds),
                None => (
                    device
                        .utilization_gpu_percent
                        .map(|u| f64::from(u.min(100)) / 100.0 * seconds),
                    seconds,
                ),
            };
            let energy_joules = match (device.energy_joules_total, last.energy_joules_total) {
                (Some(now), Some(before)) if now >= before => Some(now - before),
                _ => None,
            };
            let window = DeviceWindow {
                uuid: device.uuid.clone(),
                seconds: seconds.max(covered),
                busy_seconds,
                energy_joules,
                holders,
                sampled,
                mig_enabled: device.mig_enabled,
            };
            let outcome = attribute(&window);
            for share in outcome.shares {
                let w = keys[share.workload].clone();
                let gpu: Arc<str> = Arc::from(share.gpu.as_str());
                let gpu = || vec![("gpu", gpu.clone())];
                let mut busy = gpu();
                busy.push(("method", Arc::from(share.method.as_str())));
                // Sampled now, so it runs: live even where no cgroup reading says so (a pod known
                // only from the kubelet's device assignments, the host row without eBPF).
                ledger.touch(&w);
                let mut row = ledger.row(&w);
                for (metric, labels, value) in [
                    (&workload::GPU_SECONDS, busy, share.busy_seconds),
                    (&workload::GPU_ENERGY_JOULES, gpu(), share.energy_joules),
                    (
                        &workload::GPU_MEMORY_BYTE_SECONDS,
                        gpu(),
                        share.memory_bytes * seconds,
                    ),
                ] {
                    row.add(&Key::new(metric, labels), value);
                }
            }
            state.busy_seconds_total += busy_seconds.unwrap_or(0.0);
            state.unattributed_seconds_total += outcome.unattributed_seconds;
            state.unallocated_joules_total += outcome.unallocated_joules;
        }
        state.last_at = Some(at);
        state.last = Some(device);
    }
}

impl Source for GpuSource {
    fn name(&self) -> &'static str {
        "gpu"
    }

    fn collect(&mut self, ctx: &mut TickCtx<'_>, ledger: &mut Ledger) {
        self.attribute_arrived(ctx.identity, ctx.host, ledger, ctx.assignments, ctx.errors);
        ctx.facts.gpus = self.priced();
        ctx.facts.gpu_memory = self.memory_held();
    }

    fn families(&self) -> Vec<Family> {
        self.node_families()
    }
}

impl Drop for GpuSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.batches = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn sample_loop(
    mut sampler: Sampler,
    interval: Duration,
    tx: mpsc::Sender<Batch>,
    stop: Arc<AtomicBool>,
) {
    crate::sys::lower_priority();
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let sample = sampler.sample();
        let batch = Batch {
            xids: sampler.take_xids(),
            at: Instant::now(),
            calls: Some(sampler.calls_last_sample()),
            sample,
        };
        if tx.send(batch).is_err() {
            return;
        }
        // Sleep in short steps so a shutdown does not wait a whole interval.
        while started.elapsed() < interval && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(
                interval
                    .saturating_sub(started.elapsed())
                    .min(Duration::from_millis(50)),
            );
        }
    }
}

/// The fraction of its GPU a MIG instance is, for prices: its compute slices over the GPU's;
/// where the driver did not say, its memory over the GPU's; else the whole GPU. An instance's
/// GPU seconds are the wall time its holder held it (`mig_allocation`), a whole instance's and
/// not already a fraction of the GPU, so it is this share that makes one of them cost what a
/// slice of the GPU does.
fn mig_share(mig: &tally_gpu::MigSample, gpu_memory: Option<u64>) -> f64 {
    match (
        mig.compute_slices,
        mig.gpu_slices,
        mig.memory_total_bytes,
        gpu_memory,
    ) {
        (Some(slices), Some(of), _, _) if of > 0 => (f64::from(slices) / f64::from(of)).min(1.0),
        (_, _, Some(memory), Some(of)) if of > 0 => (memory as f64 / of as f64).min(1.0),
        _ => 1.0,
    }
}

/// Moves what the host row holds on a device (or MIG instance) to the workloads the kubelet
/// assigned it to, evenly (MPS clients stay MPS clients); adds them as holders when nothing
/// visible holds it.
fn reassign(
    holders: &mut Vec<Holder<usize>>,
    mut sampled: Option<&mut Vec<(usize, f64)>>,
    host: usize,
    targets: &[(Option<String>, Vec<usize>)],
) {
    for (instance, assignees) in targets {
        if assignees.is_empty() {
            continue;
        }
        let share = 1.0 / assignees.len() as f64;
        let on_target = |h: &Holder<usize>| {
            &h.mig_instance == instance || instance.is_none() && h.mig_instance.is_none()
        };
        let mut moved: Vec<(f64, bool)> = Vec::new();
        holders.retain(|h| {
            if h.workload == host && on_target(h) {
                moved.push((h.memory_bytes, h.mps_client));
                false
            } else {
                true
            }
        });
        let visible = holders.iter().any(on_target);
        // What moves, as MPS client or not; nothing visible at all still holds the device.
        let kinds: Vec<bool> = if moved.is_empty() && !visible {
            vec![false]
        } else {
            [false, true]
                .into_iter()
                .filter(|&client| moved.iter().any(|(_, c)| *c == client))
                .collect()
        };
        for mps_client in kinds {
            let memory: f64 = moved
                .iter()
                .filter(|(_, c)| *c == mps_client)
                .map(|(m, _)| m)
                .sum();
            for a in assignees {
                holders.push(Holder {
                    workload: *a,
                    memory_bytes: memory * share,
                    mig_instance: instance.clone(),
                    mps_client,
                });
            }
        }
        // Utilization samples exist only without MIG, so only device-level targets take them.
        if let (None, Some(samples)) = (instance, sampled.as_deref_mut()) {
            let mut rest = Vec::new();
            samples.retain(|(w, s)| {
                if *w == host {
                    rest.push(*s);
                    false
                } else {
                    true
                }
            });
            for s in rest {
                for a in assignees {
                    samples.push((*a, s * share));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mig_instance_is_priced_as_its_slices_of_the_gpu() {
        let mig = |compute_slices, gpu_slices, memory| tally_gpu::MigSample {
            compute_slices,
            gpu_slices,
            memory_total_bytes: memory,
            ..tally_gpu::MigSample::default()
        };
        let gpu_memory = Some(80_000_000_000);
        // 3g of a 7-slice GPU, whatever its memory.
        let share = mig_share(&mig(Some(3), Some(7), Some(40_000_000_000)), gpu_memory);
        assert_eq!(share, 3.0 / 7.0);
        // The driver did not say: its memory's share.
        let share = mig_share(&mig(None, Some(7), Some(20_000_000_000)), gpu_memory);
        assert_eq!(share, 0.25);
        // Nothing to go by: the whole GPU.
        assert_eq!(mig_share(&mig(None, None, None), gpu_memory), 1.0);
    }
}
