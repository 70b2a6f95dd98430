//! One agent tick: discover workloads, read their sources, update the ledger, build the snapshot.
//! Runs on its own thread; everything here may block on file I/O.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_exporters::{Family, LabelSet, Snapshot};

use crate::bpf::BpfSources;
use crate::catalogue;
use crate::cgroupfs::Collector;
use crate::config::Config;
use crate::errors::ErrorCounts;
use crate::host::layout::{Layout, NoHierarchy};
use crate::identity::{cri::CriHandle, Identity, Names, PathIdentity, Workload};
use crate::ledger::{CounterId, Ledger};

/// The tick's state, owned by the tick thread.
#[derive(Debug)]
pub struct Ticker {
    collector: Collector,
    identity: Identity,
    ledger: Ledger,
    errors: ErrorCounts,
    bpf: BpfSources,
    gpu: crate::gpu::GpuSource,
    rdma: crate::rdma::RdmaSource,
    /// The row for what runs in no workload's cgroup (per-cgroup-id sources only).
    host: Arc<Workload>,
    cri: Option<CriHandle>,
    /// Container ids CRI was already asked about, so a container CRI does not know (plain
    /// Docker) triggers one listing, not one a second.
    asked_cri: std::collections::HashSet<String>,
    ticks: u64,
    last_duration: Duration,
    lost: Vec<(&'static str, u64)>,
    otlp: Option<Arc<tally_exporters::otlp::OtlpStats>>,
    pod_resources: Option<crate::identity::podresources::DevicesHandle>,
    budgets: crate::budget::Engine,
    alert_stats: Option<Arc<tally_exporters::alerts::AlertStats>>,
}

impl Ticker {
    pub fn new(config: &Config, cri: Option<CriHandle>) -> Result<Self, NoHierarchy> {
        let layout = Layout::detect(&config.paths.cgroup_root)?;
        let mut bpf = start_bpf(config, &layout);
        let mut budgets = crate::budget::Engine::new(config);
        if let Some(limits) = bpf.take_egress_limits() {
            budgets.set_egress_map(Box::new(limits));
        }
        Ok(Self {
            bpf,
            gpu: crate::gpu::GpuSource::start(config, config.tick_interval()),
            rdma: crate::rdma::RdmaSource::start(config),
            host: Arc::new(Workload::new(PathIdentity::Host, Names::default())),
            collector: Collector::new(layout.clone()),
            identity: Identity::new(&config.paths.proc_root, layout, cri.clone()),
            ledger: Ledger::new(config.grace_period()),
            errors: ErrorCounts::default(),
            cri,
            asked_cri: Default::default(),
            ticks: 0,
            last_duration: Duration::ZERO,
            lost: Vec::new(),
            otlp: None,
            pod_resources: None,
            budgets,
            alert_stats: None,
        })
    }

    /// Applies a reloaded configuration. Host roots that changed re-detect the layout; the
    /// ledger is kept so nothing counted so far is lost.
    pub fn reconfigure(&mut self, config: &Config) -> Result<(), NoHierarchy> {
        let layout = Layout::detect(&config.paths.cgroup_root)?;
        if &layout != self.collector.layout() {
            self.collector = Collector::new(layout.clone());
            self.identity = Identity::new(&config.paths.proc_root, layout, self.cri.clone());
        }
        self.ledger.set_grace(config.grace_period());
        self.bpf.reconfigure(config, &mut self.errors);
        self.budgets.reconfigure(config);
        Ok(())
    }

    /// Joins GPUs to the pods the kubelet assigned them to.
    pub fn set_pod_resources(&mut self, handle: crate::identity::podresources::DevicesHandle) {
        self.pod_resources = Some(handle);
    }

    /// Exports the OTLP pusher's counters with the agent's own metrics.
    pub fn set_otlp_stats(&mut self, stats: Arc<tally_exporters::otlp::OtlpStats>) {
        self.otlp = Some(stats);
    }

    /// Sends budget alerts through `sender`, and exports its counters.
    pub fn set_alerts(&mut self, sender: tally_exporters::alerts::AlertSender) {
        self.alert_stats = Some(sender.stats().clone());
        self.budgets
            .set_alerts(Box::new(crate::alerts::Sink(sender)));
    }

    /// Releases every throttle and saves the budget windows (graceful stop).
    pub fn shutdown(&mut self) {
        self.budgets.shutdown();
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn errors(&self) -> &ErrorCounts {
        &self.errors
    }

    /// Reads every source once and returns the snapshot of the ledger afterwards.
    pub fn tick(&mut self) -> Snapshot {
        let started = Instant::now();
        let discovery = self.collector.discover(&mut self.errors);
        let found = &discovery.found;
        let mut unknown_container = false;
        let mut workloads = Vec::with_capacity(found.len());
        for f in found {
            let workload = self.identity.workload(f.cgroup_id, f.identity.clone());
            if let Some(id) = workload.container_id() {
                if workload.names.container.is_empty() && !self.asked_cri.contains(id) {
                    self.asked_cri.insert(id.to_owned());
                    unknown_container = true;
                }
            }
            let reading = self.collector.read(&f.rel, &mut self.errors);
            let in_v2 = discovery.v2_ids.contains_key(&f.cgroup_id);
            self.ledger
                .observe(workload.clone(), f.cgroup_id, in_v2, &reading);
            workloads.push(workload);
        }
        self.collector.end_tick();
        self.bpf.collect(
            &discovery,
            &workloads,
            &self.host,
            &mut self.ledger,
            &mut self.errors,
        );
        let assignments = self.pod_resources.as_ref().map(|h| h.assignments());
        self.gpu.collect(
            &mut self.identity,
            &self.host,
            &mut self.ledger,
            assignments.as_deref(),
        );
        self.rdma.collect(
            &mut self.identity,
            &self.host,
            &mut self.ledger,
            assignments.as_deref(),
            &mut self.errors,
        );
        let live: std::collections::HashSet<u64> = found.iter().map(|f| f.cgroup_id).collect();
        self.identity.retain(|id| live.contains(&id));
        let live_containers: std::collections::HashSet<&str> = found
            .iter()
            .filter_map(|f| match &f.identity {
                PathIdentity::Container(c) => Some(c.container_id.as_str()),
                _ => None,
            })
            .collect();
        self.asked_cri
            .retain(|id| live_containers.contains(id.as_str()));
        self.ledger.end_tick(Instant::now());
        if !self.budgets.is_idle() {
            let placements = found
                .iter()
                .map(|f| {
                    let placement = crate::budget::Placement {
                        rel: f.rel.clone(),
                        v2_id: discovery
                            .v2_ids
                            .contains_key(&f.cgroup_id)
                            .then_some(f.cgroup_id),
                    };
                    (f.identity.clone(), placement)
                })
                .collect();
            self.budgets.tick(crate::budget::Inputs {
                ledger: &self.ledger,
                placements: &placements,
                layout: self.collector.layout(),
                gpu_memory: self.gpu.memory_held(),
                gpu_models: self.gpu.models(),
                tick_started: started,
            });
        }
        if let Some(cri) = &self.cri {
            if unknown_container {
                cri.request_refresh();
            }
            for (reason, n) in cri.errors() {
                self.errors.set_external("cri", reason, n);
            }
        }
        self.lost = self.bpf.lost(&mut self.errors);
        self.bpf.sample_stats(Instant::now());
        self.ticks += 1;
        self.last_duration = started.elapsed();
        self.snapshot()
    }

    fn snapshot(&self) -> Snapshot {
        let mut cpu = Family::new(&catalogue::workload::CPU_SECONDS);
        let mut memory = Family::new(&catalogue::workload::MEMORY_BYTES);
        let mut info = Family::new(&catalogue::workload::INFO);
        let mut bpf = crate::bpf::BpfFamilies::new(self.bpf.disk_up());
        let mut gpu = crate::gpu::WorkloadGpuFamilies::default();
        let mut rdma = crate::rdma::WorkloadRdmaFamilies::default();
        let (mut live, mut exited) = (0u64, 0u64);
        for entry in self.ledger.entries() {
            let labels = entry.workload.labels();
            bpf.push(labels, entry);
            gpu.push(labels, entry);
            rdma.push(labels, entry);
            push_counter(&mut cpu, labels, entry.counter(CounterId::CpuSeconds));
            bpf.push_cgroupfs_disk(
                labels,
                entry,
                entry.counter(CounterId::DiskReadBytes),
                entry.counter(CounterId::DiskWriteBytes),
            );
            if let Some(m) = entry.memory_bytes {
                memory.push(labels, m);
            }
            let (runtime, qos) = match &entry.workload.identity {
                PathIdentity::Container(c) => {
                    (c.runtime.as_str(), c.qos.map_or("", |q| q.as_str()))
                }
                PathIdentity::Unit(_) => ("systemd", ""),
                PathIdentity::Host => ("", ""),
                PathIdentity::Assigned(_) => ("kubelet", ""),
            };
            let state = if entry.is_live() { "running" } else { "exited" };
            info.samples.push(tally_exporters::Sample {
                labels: labels.clone(),
                extra: vec![
                    ("runtime", Arc::from(runtime)),
                    ("qos_class", Arc::from(qos)),
                    ("state", Arc::from(state)),
                ],
                value: 1.0,
                histogram: None,
            });
            if entry.is_live() {
                live += 1;
            } else {
                exited += 1;
            }
        }
        let mut families = vec![cpu, memory];
        families.extend(bpf.into_families());
        families.extend(gpu.families);
        families.extend(self.gpu.families());
        families.extend(rdma.families);
        families.extend(self.rdma.families());
        families.push(info);
        families.extend(self.budgets.families());
        for family in &mut families {
            // Stable output order makes diffs and tests readable; the map order is random.
            family
                .samples
                .sort_by(|a, b| a.labels.cmp(&b.labels).then_with(|| a.extra.cmp(&b.extra)));
        }
        families.extend(self.self_metrics(live, exited));
        Snapshot { families }
    }

    fn self_metrics(&self, live: u64, exited: u64) -> Vec<Family> {
        let mut build = Family::new(&catalogue::agent::BUILD_INFO);
        build.push_labeled(vec![("version", Arc::from(env!("CARGO_PKG_VERSION")))], 1.0);

        let mut workloads = Family::new(&catalogue::agent::WORKLOADS);
        workloads.push_labeled(vec![("state", Arc::from("running"))], live as f64);
        workloads.push_labeled(vec![("state", Arc::from("exited"))], exited as f64);

        let mut errors = Family::new(&catalogue::agent::COLLECTOR_ERRORS);
        for (collector, reason, n) in self.errors.iter() {
            errors.push_labeled(
                vec![
                    ("collector", Arc::from(collector)),
                    ("reason", Arc::from(reason)),
                ],
                n as f64,
            );
        }

        let mut probes = Family::new(&catalogue::agent::PROBE_UP);
        probes.push_labeled(
            vec![
                ("probe", Arc::from("cgroupfs")),
                ("method", Arc::from(self.collector.layout().mode.as_str())),
            ],
            1.0,
        );
        for status in self.bpf.statuses() {
            probes.push_labeled(
                vec![
                    ("probe", Arc::from(status.probe)),
                    ("method", Arc::from(status.method)),
                ],
                if status.up { 1.0 } else { 0.0 },
            );
        }
        for (probe, method, up) in self.rdma.probes() {
            probes.push_labeled(
                vec![("probe", Arc::from(probe)), ("method", Arc::from(method))],
                if up { 1.0 } else { 0.0 },
            );
        }
        if let Some(cri) = &self.cri {
            probes.push_labeled(
                vec![("probe", Arc::from("cri")), ("method", Arc::from("grpc"))],
                if cri.up() { 1.0 } else { 0.0 },
            );
        }

        let mut ticks = Family::new(&catalogue::agent::TICKS);
        ticks.push_labeled(Vec::new(), self.ticks as f64);
        let mut duration = Family::new(&catalogue::agent::TICK_DURATION_SECONDS);
        duration.push_labeled(Vec::new(), self.last_duration.as_secs_f64());
        let mut run_seconds = Family::new(&catalogue::agent::EBPF_PROGRAM_RUN_SECONDS);
        let mut runs = Family::new(&catalogue::agent::EBPF_PROGRAM_RUNS);
        let mut stats_held = Family::new(&catalogue::agent::EBPF_PROGRAM_STATS_SECONDS);
        stats_held.push_labeled(
            Vec::new(),
            self.bpf.stats_held(Instant::now()).as_secs_f64(),
        );
        for stats in self.bpf.program_stats() {
            let label = vec![("program", Arc::from(stats.program))];
            run_seconds.push_labeled(label.clone(), stats.run_time_ns as f64 / 1e9);
            runs.push_labeled(label, stats.run_count as f64);
        }
        let mut lost = Family::new(&catalogue::agent::EBPF_MAP_UPDATES_LOST);
        for (map, n) in &self.lost {
            lost.push_labeled(vec![("map", Arc::from(*map))], *n as f64);
        }
        let mut families = vec![
            build,
            workloads,
            errors,
            probes,
            ticks,
            duration,
            run_seconds,
            runs,
            stats_held,
            lost,
        ];
        if let Some(otlp) = &self.otlp {
            families.extend(otlp_families(otlp));
        }
        if let Some(stats) = &self.alert_stats {
            families.extend(crate::alerts::families(stats));
        }
        families
    }
}

fn push_counter(family: &mut Family, labels: &LabelSet, value: Option<f64>) {
    if let Some(v) = value {
        family.push(labels, v);
    }
}

fn otlp_families(stats: &tally_exporters::otlp::OtlpStats) -> Vec<Family> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut batches = Family::new(&catalogue::agent::OTLP_BATCHES);
    batches.push_labeled(
        vec![("result", Arc::from("exported"))],
        stats.exported.load(Relaxed) as f64,
    );
    batches.push_labeled(
        vec![("result", Arc::from("dropped"))],
        stats.dropped.load(Relaxed) as f64,
    );
    let mut failures = Family::new(&catalogue::agent::OTLP_EXPORT_FAILURES);
    failures.push_labeled(Vec::new(), stats.failed_attempts.load(Relaxed) as f64);
    let mut queued = Family::new(&catalogue::agent::OTLP_QUEUE_BATCHES);
    queued.push_labeled(Vec::new(), stats.queued.load(Relaxed) as f64);
    vec![batches, failures, queued]
}

/// Starts the eBPF sources, then hands the heap their loading used back to the system: CO-RE
/// relocation parses the kernel's BTF (several MB of types, once per object and method tried), all
/// freed once the programs are loaded, but kept by the allocator as resident memory otherwise.
fn start_bpf(config: &Config, layout: &Layout) -> BpfSources {
    let sources = BpfSources::start(config, layout);
    crate::sys::trim_heap();
    sources
}
