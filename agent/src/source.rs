//! The interface every measurement source implements, and the one list of sources.
//!
//! A tick discovers the workloads (the cgroup walk and their identities), then calls each source's
//! [`Source::collect`] with what it found. A source turns what it reads (cgroup files, BPF maps,
//! NVML samples, RDMA counters) into ledger values keyed by the catalogue's declarations; the
//! ledger exports them. What is not per workload (device state, port counters, program cost) a
//! source exports itself from [`Source::families`]. The tick emits `tally_probe_up` from every
//! source's [`Source::probes`] and times each `collect` (`tally_source_collect_duration_seconds`).
//!
//! A new source is a module implementing [`Source`] plus one line in `registry::build`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tally_exporters::Family;

use crate::config::Config;
use crate::errors::ErrorCounts;
use crate::host::layout::Layout;
use crate::host::Discovery;
use crate::identity::podresources::Assignments;
use crate::identity::{Identity, PathIdentity, Workload};
use crate::ledger::Ledger;

/// What one tick hands every source.
#[derive(Debug)]
pub struct TickCtx<'a> {
    /// The cgroups found this tick.
    pub discovery: &'a Discovery,
    /// `workloads[i]` is the workload of `discovery.found[i]`.
    pub workloads: &'a [Arc<Workload>],
    /// The row for what runs in no workload's cgroup.
    pub host: &'a Arc<Workload>,
    /// Resolves pids and cgroup ids the walk did not see (a GPU process's workload).
    pub identity: &'a mut Identity,
    /// Devices the kubelet assigned to pods, when the pod-resources API is configured.
    pub assignments: Option<&'a Assignments>,
    /// The one place failures are counted (`tally_collector_errors_total`).
    pub errors: &'a mut ErrorCounts,
    /// Node facts sources learn and budgets read.
    pub facts: &'a mut Facts,
}

/// What sources know about the node beyond ledger values, for the budget engine's usage view.
#[derive(Debug, Default)]
pub struct Facts {
    /// GPU (and MIG instance) UUID → what it is priced as.
    pub gpus: HashMap<Arc<str>, PricedGpu>,
    /// GPU memory each workload holds now, over all its devices.
    pub gpu_memory: HashMap<PathIdentity, f64>,
    /// The cgroup paths (below each hierarchy root) of the live workloads a budget selected at
    /// its last evaluation: read every tick, whatever `cgroupfs.read_interval_ms` says.
    pub budgeted: HashSet<String>,
}

/// What a GPU (or a MIG instance) is priced as.
#[derive(Debug, Clone, PartialEq)]
pub struct PricedGpu {
    /// The model name NVML reports (a MIG instance's is its GPU's).
    pub model: Arc<str>,
    /// The fraction of its GPU that one of its seconds stands for: 1 for a whole GPU, a MIG
    /// instance's compute slices over the GPU's.
    pub share: f64,
}

/// Whether one way of measuring works: a series of `tally_probe_up{probe,method}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub probe: &'static str,
    pub method: &'static str,
    pub up: bool,
}

/// A measurement source.
pub trait Source: Send + std::fmt::Debug {
    /// The `source` label of its collect duration.
    fn name(&self) -> &'static str;

    /// Reads what the source measures once and records it in the ledger.
    fn collect(&mut self, ctx: &mut TickCtx<'_>, ledger: &mut Ledger);

    /// The state of each of its probes, in a stable order.
    fn probes(&self) -> Vec<Probe> {
        Vec::new()
    }

    /// Its own families (node-level state), samples in a stable order.
    fn families(&self) -> Vec<Family> {
        Vec::new()
    }

    /// A count that grows whenever a cgroup is made or removed anywhere, where this source can
    /// see that: while it stays the same, the tick reuses its last walk.
    fn cgroup_changes(&self) -> Option<u64> {
        None
    }

    /// Applies a reloaded configuration; `layout` is the cgroup layout detected for it.
    fn reconfigure(&mut self, _config: &Config, _layout: &Layout, _errors: &mut ErrorCounts) {}
}
