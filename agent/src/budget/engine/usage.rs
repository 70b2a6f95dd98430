//! What every workload used, read from the ledger once a tick into the view the decisions take.
//! Nothing else in the engine reads the ledger.

use super::compiled::Metric;
use super::keys::{subject_key, WorkloadKey};
use super::{Inputs, Placement};
use crate::catalogue::{self, workload};
use crate::config::policy::{self, Resource};
use crate::cost;
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
    /// The fullest KV cache of its inference servers now, a fraction (0 without one).
    pub kv_cache: f64,
    /// Its cumulative value of each metric the policy counts, where the ledger has one.
    cumulative: Vec<(Metric, f64)>,
}

impl WorkloadUsage<'_> {
    /// Its level of a level resource, and how levels of several workloads combine: GPU memory
    /// adds up; a KV-cache ratio does not (a shared budget's is its fullest cache).
    pub fn level(&self, resource: Resource) -> (f64, fn(f64, f64) -> f64) {
        match resource {
            Resource::KvCacheRatio => (self.kv_cache, f64::max),
            _ => (self.gpu_memory, |a, b| a + b),
        }
    }

    pub fn cumulative(&self, metric: Metric) -> Option<f64> {
        self.cumulative
            .iter()
            .find(|(m, _)| *m == metric)
            .map(|(_, v)| *v)
    }
}

/// Reads the usage of `metrics` from the tick's ledger.
pub(super) fn read<'a>(inputs: &Inputs<'a>, metrics: &[Metric]) -> Usage<'a> {
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
                kv_cache: entry
                    .series(&catalogue::inference::KV_CACHE_USAGE_RATIO)
                    .map(|(_, v)| v)
                    .fold(0.0, f64::max),
                cumulative: metrics
                    .iter()
                    .filter_map(|m| Some((*m, cumulative(entry, *m)?)))
                    .collect(),
            }
        })
        .collect();
    Usage { workloads }
}

/// A workload's cumulative value of a budget metric, from its ledger row.
fn cumulative(entry: &Entry, metric: Metric) -> Option<f64> {
    let cpu = Key::new(&workload::CPU_SECONDS, Vec::new());
    let egress = |scope: Option<u32>| {
        let want = scope.and_then(|i| policy::SCOPES.get(i as usize));
        let mut total = None;
        for (key, v) in entry.series(&workload::NETWORK_TRANSMIT_BYTES) {
            if want.is_none_or(|w| key.label("scope") == Some(*w)) {
                *total.get_or_insert(0.0) += v;
            }
        }
        total
    };
    // The figure /metrics shows, which the cost counter prices too: cgroupfs first, where the
    // workload has its series (`cost::disk_bytes`).
    let read = || cost::disk_bytes(entry, &workload::DISK_READ_BYTES);
    let write = || cost::disk_bytes(entry, &workload::DISK_WRITE_BYTES);
    match metric.resource {
        Resource::CpuSeconds => entry.value(&cpu),
        Resource::GpuSeconds => entry.total(&workload::GPU_SECONDS),
        Resource::GpuEnergyJoules => entry.total(&workload::GPU_ENERGY_JOULES),
        Resource::NetworkEgressBytes => egress(metric.scope),
        Resource::DiskReadBytes => read(),
        Resource::DiskWriteBytes => write(),
        Resource::DiskBytes => match (read(), write()) {
            (None, None) => None,
            (r, w) => Some(r.unwrap_or(0.0) + w.unwrap_or(0.0)),
        },
        Resource::Tokens => {
            let want = |kind: Option<&str>| match metric.part() {
                Some(part) => kind == Some(part),
                None => matches!(kind, Some("prompt" | "generation")),
            };
            let mut total = None;
            for (key, v) in entry.series(&catalogue::inference::TOKENS) {
                if want(key.label("kind")) {
                    *total.get_or_insert(0.0) += v;
                }
            }
            total
        }
        // Levels, read as such (`WorkloadUsage::level`).
        Resource::GpuMemoryBytes | Resource::KvCacheRatio => None,
        // Accrued tick by tick at the prices in force then (`cost::Meter`): a reload that
        // changes a price changes what later use costs, not what a window was charged.
        Resource::Cost => entry.total(&catalogue::cost::WORKLOAD_COST),
    }
}
