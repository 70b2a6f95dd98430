//! What every workload used, read from the ledger once a tick into the view the decisions take.
//! Nothing else in the engine reads the ledger.

use std::collections::HashMap;
use std::sync::Arc;

use tally_exporters::Metric as Declaration;

use super::compiled::Metric;
use super::keys::{subject_key, WorkloadKey};
use super::{Inputs, Placement};
use crate::catalogue::workload;
use crate::config::policy::{self, Prices, Resource};
use crate::identity::{PathIdentity, Workload};
use crate::ledger::{Entry, Key};

/// One tick's usage, read-only: every workload but the host's.
#[derive(Debug)]
pub(super) struct Usage<'a> {
    pub workloads: Vec<WorkloadUsage<'a>>,
}

#[derive(Debug)]
pub(super) struct WorkloadUsage<'a> {
    pub key: WorkloadKey,
    pub workload: &'a Workload,
    /// Where its cgroup is, when the tick found it.
    pub placement: Option<&'a Placement>,
    /// Still running (not in the ledger's grace period).
    pub live: bool,
    /// GPU memory it holds now, in bytes.
    pub gpu_memory: f64,
    /// Its cumulative value of each metric the policy counts, where the ledger has one.
    cumulative: Vec<(Metric, f64)>,
}

impl WorkloadUsage<'_> {
    pub fn cumulative(&self, metric: Metric) -> Option<f64> {
        self.cumulative
            .iter()
            .find(|(m, _)| *m == metric)
            .map(|(_, v)| *v)
    }
}

/// Reads the usage of `metrics` from the tick's ledger (priced with `prices` for `cost`).
pub(super) fn read<'a>(inputs: &Inputs<'a>, metrics: &[Metric], prices: &Prices) -> Usage<'a> {
    let workloads = inputs
        .ledger
        .entries()
        .filter(|entry| entry.workload.identity != PathIdentity::Host)
        .map(|entry| {
            let identity = &entry.workload.identity;
            WorkloadUsage {
                key: subject_key(identity),
                workload: &entry.workload,
                placement: inputs.placements.get(identity),
                live: entry.is_live(),
                gpu_memory: inputs
                    .facts
                    .gpu_memory
                    .get(identity)
                    .copied()
                    .unwrap_or(0.0),
                cumulative: metrics
                    .iter()
                    .filter_map(|m| {
                        Some((*m, cumulative(entry, *m, prices, &inputs.facts.gpu_models)?))
                    })
                    .collect(),
            }
        })
        .collect();
    Usage { workloads }
}

/// A workload's cumulative value of a budget metric, from its ledger row.
fn cumulative(
    entry: &Entry,
    metric: Metric,
    prices: &Prices,
    models: &HashMap<Arc<str>, Arc<str>>,
) -> Option<f64> {
    let cpu = Key::new(&workload::CPU_SECONDS, Vec::new());
    // Each series of `declared` times the weight `f` gives it (None: not counted).
    let sum = |declared: &'static Declaration, f: &dyn Fn(&Key) -> Option<f64>| -> Option<f64> {
        let mut total = None;
        for (key, v) in entry.series(declared) {
            if let Some(weight) = f(key) {
                *total.get_or_insert(0.0) += v * weight;
            }
        }
        total
    };
    let egress = |scope: Option<u32>| {
        sum(&workload::NETWORK_TRANSMIT_BYTES, &|key| {
            let want = scope.and_then(|i| policy::SCOPES.get(i as usize));
            want.is_none_or(|w| key.label("scope") == Some(*w))
                .then_some(1.0)
        })
    };
    // cgroupfs first, where the workload has its series: on pure cgroup v2 that is `io.stat`,
    // the series /metrics shows too. On a hybrid node /metrics shows the block-layer counters,
    // but they charge I/O that v1 blk-throttle delays to the kworker that dispatches it, so a
    // throttled workload would seem idle and be released; v1 blkio counts it right.
    let disk = |declared: &'static Declaration| {
        let method = |m: &str| Key::new(declared, vec![("method", Arc::from(m))]);
        entry
            .value(&method("cgroupfs"))
            .or_else(|| entry.value(&method("ebpf")))
    };
    let read = || disk(&workload::DISK_READ_BYTES);
    let write = || disk(&workload::DISK_WRITE_BYTES);
    let add = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
    };
    match metric.resource {
        Resource::CpuSeconds => entry.value(&cpu),
        Resource::GpuSeconds => entry.total(&workload::GPU_SECONDS),
        Resource::GpuEnergyJoules => entry.total(&workload::GPU_ENERGY_JOULES),
        Resource::NetworkEgressBytes => egress(metric.scope),
        Resource::DiskReadBytes => read(),
        Resource::DiskWriteBytes => write(),
        Resource::DiskBytes => add(read(), write()),
        // A level, read as one (`WorkloadUsage::gpu_memory`).
        Resource::GpuMemoryBytes => None,
        Resource::Cost => {
            let gpu_seconds = sum(&workload::GPU_SECONDS, &|key| {
                let model = key.label("gpu").and_then(|gpu| models.get(gpu));
                model
                    .and_then(|m| prices.gpu_second.get(m.as_ref()))
                    .or_else(|| prices.gpu_second.get("default"))
                    .copied()
            });
            let energy = entry
                .total(&workload::GPU_ENERGY_JOULES)
                .map(|j| j * prices.gpu_energy_kwh / 3.6e6);
            let egress = sum(&workload::NETWORK_TRANSMIT_BYTES, &|key| {
                let scope = key.label("scope").unwrap_or("internet");
                prices.network_egress_gb.get(scope).map(|p| p / 1e9)
            });
            let gpu_cost = add(add(gpu_seconds, energy), egress);
            let cpu = entry.value(&cpu).map(|s| s * prices.cpu_core_second);
            let disk = add(read(), write()).map(|b| b * prices.disk_gb / 1e9);
            add(add(gpu_cost, cpu), disk)
        }
    }
}
