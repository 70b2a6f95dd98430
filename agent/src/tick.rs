//! One agent tick: discover workloads, read their sources, update the ledger, build the snapshot.
//! Runs on its own thread; everything here may block on file I/O.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_exporters::alerts::{AlertSender, AlertStats};
use tally_exporters::otlp::OtlpStats;
use tally_exporters::{Family, Snapshot};

use crate::catalogue::{self, agent};
use crate::config::Config;
use crate::errors::ErrorCounts;
use crate::host::layout::{Layout, NoHierarchy};
use crate::host::Discovery;
use crate::identity::podresources::DevicesHandle;
use crate::identity::{cri::CriHandle, Identity, Names, PathIdentity, Workload};
use crate::ledger::Ledger;
use crate::source::{Facts, Source, TickCtx};

/// Ticks in a row that may reuse a walk while no cgroup was made or removed: renames (cgroup v1
/// only) and anything else the mkdir and rmdir records miss are found within this many.
const REUSE_WALK_TICKS: u64 = 60;

/// What the tick works with besides its sources, made by the runtime before the tick starts.
#[derive(Debug, Default)]
pub struct Deps {
    /// Names containers (none without `cri.endpoints`).
    pub cri: Option<CriHandle>,
    /// Joins GPUs and RDMA devices to the pods the kubelet assigned them to.
    pub pod_resources: Option<DevicesHandle>,
    /// The OTLP pusher's counters, exported with the agent's own metrics.
    pub otlp: Option<Arc<OtlpStats>>,
    /// Where budget alerts go.
    pub alerts: Option<AlertSender>,
    /// The cluster budgets' answers.
    pub cluster: Option<crate::cluster::ClusterHandle>,
    /// Where the engine publishes admission verdicts for the NRI plugin.
    pub board: Option<Arc<crate::budget::verdict::Board>>,
    /// The soft open-file limit the runtime found (after raising it), which sizes how many
    /// cgroup files stay open; `None` when it could not be read.
    pub open_file_limit: Option<u64>,
}

/// The tick's state, owned by the tick thread.
pub struct Ticker {
    layout: Layout,
    identity: Identity,
    ledger: Ledger,
    errors: ErrorCounts,
    sources: Vec<Box<dyn Source>>,
    facts: Facts,
    /// The row for what runs in no workload's cgroup (per-cgroup-id sources only).
    host: Arc<Workload>,
    cri: Option<CriHandle>,
    /// Container ids CRI was already asked about, so a container CRI does not know (plain
    /// Docker) triggers one listing, not one a second.
    asked_cri: HashSet<String>,
    pod_resources: Option<DevicesHandle>,
    budgets: crate::budget::Engine,
    /// Prices each tick's use into the ledger's costs.
    meter: crate::cost::Meter,
    /// When the last tick accrued costs (memory is charged for the time since).
    accrued_at: Option<Instant>,
    ticks: u64,
    /// The last walk's result, what `cgroup_changes` said before it, and ticks since.
    discovery: Option<Discovery>,
    walked_at: Option<u64>,
    since_walk: u64,
    /// Ticks that walked, and that reused the last walk.
    walks: [u64; 2],
    last_duration: Duration,
    /// How long each source's collect took in the last tick.
    collect_durations: Vec<(&'static str, Duration)>,
    otlp: Option<Arc<OtlpStats>>,
    alert_stats: Option<Arc<AlertStats>>,
}

impl std::fmt::Debug for Ticker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sources: Vec<&str> = self.sources.iter().map(|s| s.name()).collect();
        f.debug_struct("Ticker")
            .field("sources", &sources)
            .field("ticks", &self.ticks)
            .finish_non_exhaustive()
    }
}

impl Ticker {
    pub fn new(config: &Config, deps: Deps) -> Result<Self, NoHierarchy> {
        let layout = Layout::detect(&config.paths.cgroup_root)?;
        let built = crate::registry::build(config, &layout, deps.open_file_limit);
        let mut budgets = crate::budget::Engine::new(config);
        if let Some(limits) = built.egress_limits {
            budgets.set_egress_map(Box::new(limits));
        }
        if let Some(cluster) = deps.cluster {
            budgets.set_cluster(cluster);
        }
        if let Some(board) = deps.board {
            budgets.set_board(board);
        }
        let alert_stats = deps.alerts.map(|sender| {
            let stats = sender.stats().clone();
            budgets.set_alerts(Box::new(crate::alerts::Sink(sender)));
            stats
        });
        let mut ledger = Ledger::new(config.grace_period());
        // Disk bytes have one truth on every node, the one budgets charge too: the kernel's
        // cgroup files (`io.stat` on pure cgroup v2, v1 blkio elsewhere, which the cgroupfs
        // collector makes count by activating blk-throttle); the block-layer counters only where
        // a workload has no such file.
        ledger.prefer_methods(crate::ledger::CGROUPFS_FIRST);
        let mut identity = Identity::new(&config.paths.proc_root, layout.clone(), deps.cri.clone());
        identity.set_tenants(&config.tenants);
        let mut errors = ErrorCounts::default();
        if !config.tenants.labels.is_empty() && config.tenants.namespace_labels_file.is_some() {
            errors.expect(&agent::COLLECTOR_ERRORS, &["tenants", "namespace_file"]);
        }
        Ok(Self {
            sources: built.sources,
            identity,
            layout,
            ledger,
            errors,
            facts: Facts::default(),
            host: Arc::new(Workload::new(PathIdentity::Host, Names::default())),
            cri: deps.cri,
            asked_cri: HashSet::new(),
            pod_resources: deps.pod_resources,
            budgets,
            meter: crate::cost::Meter::new(&config.prices),
            accrued_at: None,
            ticks: 0,
            discovery: None,
            walked_at: None,
            since_walk: 0,
            walks: [0, 0],
            last_duration: Duration::ZERO,
            collect_durations: Vec::new(),
            otlp: deps.otlp,
            alert_stats,
        })
    }

    /// Applies a reloaded configuration. Host roots that changed re-detect the layout; the
    /// ledger is kept so nothing counted so far is lost.
    pub fn reconfigure(&mut self, config: &Config) -> Result<(), NoHierarchy> {
        let layout = Layout::detect(&config.paths.cgroup_root)?;
        if layout != self.layout {
            self.discovery = None;
            self.identity =
                Identity::new(&config.paths.proc_root, layout.clone(), self.cri.clone());
            self.layout = layout;
        }
        self.identity.set_tenants(&config.tenants);
        self.ledger.set_grace(config.grace_period());
        for source in &mut self.sources {
            source.reconfigure(config, &self.layout, &mut self.errors);
        }
        self.budgets.reconfigure(config);
        self.meter
            .reprice(&config.prices, &mut self.ledger, &self.facts.gpus);
        Ok(())
    }

    /// Releases every throttle and saves the budget windows (graceful stop).
    pub fn shutdown(&mut self) {
        self.budgets.shutdown(&mut self.errors);
    }

    /// Counts a tick that panicked, in `tally_collector_errors_total{collector="tick"}` (logged
    /// by the supervisor, with the panic's message).
    pub fn count_failed_tick(&mut self) {
        self.errors
            .count(&agent::COLLECTOR_ERRORS, &["tick", "panic"]);
    }

    /// Releases every throttle while ticks cannot run; the next tick that does enforces again.
    pub fn release_throttles(&mut self) {
        self.budgets.release_all(&mut self.errors);
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn errors(&self) -> &ErrorCounts {
        &self.errors
    }

    /// Discovers the workloads, has every source collect once and returns the snapshot of the
    /// ledger afterwards.
    pub fn tick(&mut self) -> Snapshot {
        let started = Instant::now();
        if let Err(e) = self.identity.refresh_tenants() {
            self.errors
                .count(&agent::COLLECTOR_ERRORS, &["tenants", "namespace_file"]);
            tracing::warn!(
                error = %tally_error_chain::chain(&e),
                "namespace labels unusable: keeping the ones read before"
            );
        }
        let discovery = self.discover();
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
            let in_v2 = discovery.v2_ids.contains_key(&f.cgroup_id);
            self.ledger.see(&workload, f.cgroup_id, in_v2);
            workloads.push(workload);
        }
        let assignments = self.pod_resources.as_ref().map(|h| h.assignments());
        let mut ctx = TickCtx {
            discovery: &discovery,
            workloads: &workloads,
            host: &self.host,
            identity: &mut self.identity,
            assignments: assignments.as_deref(),
            errors: &mut self.errors,
            facts: &mut self.facts,
        };
        self.collect_durations.clear();
        for source in &mut self.sources {
            let began = Instant::now();
            source.collect(&mut ctx, &mut self.ledger);
            self.collect_durations
                .push((source.name(), began.elapsed()));
        }
        let live: HashSet<u64, foldhash::fast::RandomState> =
            found.iter().map(|f| f.cgroup_id).collect();
        self.identity.retain(|id| live.contains(&id));
        let live_containers: HashSet<&str, foldhash::fast::RandomState> = found
            .iter()
            .filter_map(|f| match &f.identity {
                PathIdentity::Container(c) => Some(c.container_id.as_str()),
                _ => None,
            })
            .collect();
        self.asked_cri
            .retain(|id| live_containers.contains(id.as_str()));
        let now = Instant::now();
        self.ledger.end_tick(now);
        // After the ledger settled (an exited workload holds no memory) and before budgets,
        // which charge the costs.
        let seconds = self
            .accrued_at
            .map_or(0.0, |at| now.duration_since(at).as_secs_f64());
        self.accrued_at = Some(now);
        self.meter
            .accrue(&mut self.ledger, &self.facts.gpus, seconds);
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
            self.budgets
                .set_namespace_labels(self.identity.namespace_labels());
            self.budgets.tick(
                crate::budget::Inputs {
                    ledger: &self.ledger,
                    placements: &placements,
                    layout: &self.layout,
                    facts: &self.facts,
                    tick_started: started,
                },
                &mut self.errors,
            );
        } else {
            // Nothing to decide, but the admission verdicts must stay fresh: "no budget is
            // spent", not "unknown".
            self.budgets.publish_idle(started);
        }
        self.facts.budgeted = if self.budgets.is_idle() {
            HashSet::new()
        } else {
            self.budgets.selected()
        };
        self.budgets.expect_errors(&mut self.errors);
        if let Some(cri) = &self.cri {
            if unknown_container {
                cri.request_refresh();
            }
            for (reason, n) in cri.errors() {
                self.errors.set_external("cri", reason, n);
            }
        }
        self.discovery = Some(discovery);
        self.ticks += 1;
        self.last_duration = started.elapsed();
        self.snapshot()
    }

    /// The workload cgroups: a walk of the hierarchies, or the last walk's result where no cgroup
    /// was made or removed anywhere since it began (most of the tick's cost is the walk), at
    /// most [`REUSE_WALK_TICKS`] in a row.
    fn discover(&mut self) -> Discovery {
        let changes = self.sources.iter().find_map(|s| s.cgroup_changes());
        if reuse_walk(changes, self.walked_at, self.since_walk) {
            if let Some(last) = self.discovery.take() {
                self.since_walk += 1;
                self.walks[1] += 1;
                return last;
            }
        }
        // Read before the walk: a cgroup made while it runs moves the count past this value,
        // and the next tick walks again.
        self.walked_at = changes;
        self.since_walk = 0;
        self.walks[0] += 1;
        crate::host::discover(&self.layout, &mut self.errors)
    }

    fn snapshot(&self) -> Snapshot {
        let mut families = self.ledger.families();
        let mut info = Family::new(&catalogue::workload::INFO);
        let (mut live, mut exited) = (0u64, 0u64);
        for entry in self.ledger.entries() {
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
                labels: entry.workload.labels().clone(),
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
        // Stable output order makes diffs and tests readable; the ledger's is a map's. Sources
        // and the engine give their families in an order of their own.
        families.insert(info.name, info);
        families.values_mut().for_each(Family::sort_samples);
        let own = self.sources.iter().flat_map(|s| s.families());
        let own = own.chain(self.budgets.families());
        let own = own.chain(self.meter.families());
        let own = own.chain(self.self_metrics(live, exited));
        for family in own {
            families.insert(family.name, family);
        }
        let mut ordered = Vec::with_capacity(families.len());
        for metric in catalogue::ALL {
            if let Some(family) = families.remove(metric.name) {
                ordered.push(family);
            }
        }
        debug_assert!(families.is_empty(), "undeclared: {:?}", families.keys());
        Snapshot { families: ordered }
    }

    fn self_metrics(&self, live: u64, exited: u64) -> Vec<Family> {
        let mut build = Family::new(&agent::BUILD_INFO);
        build.push_labeled(vec![("version", Arc::from(env!("CARGO_PKG_VERSION")))], 1.0);

        let mut workloads = Family::new(&agent::WORKLOADS);
        workloads.push_labeled(vec![("state", Arc::from("running"))], live as f64);
        workloads.push_labeled(vec![("state", Arc::from("exited"))], exited as f64);

        let mut probes = Family::new(&agent::PROBE_UP);
        let cri = self.cri.as_ref().map(|cri| crate::source::Probe {
            probe: "cri",
            method: "grpc",
            up: cri.up(),
        });
        for probe in self.sources.iter().flat_map(|s| s.probes()).chain(cri) {
            probes.push_labeled(
                vec![
                    ("probe", Arc::from(probe.probe)),
                    ("method", Arc::from(probe.method)),
                ],
                if probe.up { 1.0 } else { 0.0 },
            );
        }

        let mut ticks = Family::new(&agent::TICKS);
        ticks.push_labeled(Vec::new(), self.ticks as f64);
        let mut duration = Family::new(&agent::TICK_DURATION_SECONDS);
        duration.push_labeled(Vec::new(), self.last_duration.as_secs_f64());
        let mut collect = Family::new(&agent::SOURCE_COLLECT_DURATION_SECONDS);
        for (source, took) in &self.collect_durations {
            collect.push_labeled(vec![("source", Arc::from(*source))], took.as_secs_f64());
        }
        let mut walks = Family::new(&agent::CGROUP_WALKS);
        for (result, n) in ["walked", "reused"].into_iter().zip(self.walks) {
            walks.push_labeled(vec![("result", Arc::from(result))], n as f64);
        }
        let mut families = vec![build, workloads, probes, ticks, duration, collect, walks];
        let folded = self.identity.tenants_folded();
        if !folded.is_empty() {
            let mut family = Family::new(&agent::TENANT_VALUES_FOLDED);
            for (label, n) in folded {
                family.push_labeled(vec![("label", Arc::from(label))], n as f64);
            }
            families.push(family);
        }
        families.extend(self.errors.families());
        if let Some(otlp) = &self.otlp {
            families.extend(otlp_families(otlp));
        }
        if let Some(stats) = &self.alert_stats {
            families.extend(crate::alerts::families(stats));
        }
        families
    }
}

/// Whether the last walk still holds: the count of cgroups made and removed is known and has not
/// moved since that walk began, and fewer than [`REUSE_WALK_TICKS`] ticks reused it.
fn reuse_walk(changes: Option<u64>, walked_at: Option<u64>, since_walk: u64) -> bool {
    changes.is_some() && changes == walked_at && since_walk < REUSE_WALK_TICKS
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_is_reused_only_while_no_cgroup_came_or_went_and_not_forever() {
        // Nothing made or removed since the walk began.
        assert!(reuse_walk(Some(7), Some(7), 0));
        assert!(reuse_walk(Some(7), Some(7), REUSE_WALK_TICKS - 1));
        // Reused long enough: walk again.
        assert!(!reuse_walk(Some(7), Some(7), REUSE_WALK_TICKS));
        // A cgroup was made or removed.
        assert!(!reuse_walk(Some(8), Some(7), 0));
        // No lifecycle probe: every tick walks.
        assert!(!reuse_walk(None, None, 0));
        // The probe came up after the last walk.
        assert!(!reuse_walk(Some(7), None, 0));
    }
}
