//! What a workload used: which budgets select it, and its cumulative value of a budget metric
//! from its ledger row, turned into usage since the last tick.

use super::*;
use crate::catalogue::workload;
use crate::ledger::Key;
use tally_exporters::Metric;

/// Usage since the last reading of a workload's cumulative `value`, updating the baseline.
/// `fresh`: the engine just started or began tracking this metric.
pub(super) fn delta(
    baselines: &mut HashMap<(String, String), (f64, bool)>,
    (workload, metric): (&str, &str),
    value: f64,
    fresh: bool,
) -> f64 {
    let previous = baselines.insert((workload.to_owned(), metric.to_owned()), (value, false));
    match previous {
        Some((prev, _)) if value >= prev => value - prev,
        // A restored baseline above today's ledger: the counters started over with the agent,
        // so what was used while it was down cannot be known.
        Some((_, true)) => 0.0,
        // The ledger forgot the workload and started it again from zero.
        Some((_, false)) => value,
        // A workload found at start-up (or a metric a reload just added) may have run for days:
        // its history is not this window's.
        None if fresh => 0.0,
        None => value,
    }
}

/// Whether a budget's selector selects the workload.
pub(super) fn matches(
    select: &policy::Selector,
    workload: &Workload,
    placement: Option<&Placement>,
) -> bool {
    let names = &workload.names;
    let exact = |want: &Option<String>, have: &str| want.as_ref().is_none_or(|w| w == have);
    let glob = |want: &Option<String>, have: Option<&str>| match want {
        None => true,
        Some(p) => have.is_some_and(|h| policy::glob_match(p, h)),
    };
    let unit = match &workload.identity {
        PathIdentity::Unit(u) => Some(u.as_str()),
        _ => None,
    };
    exact(&select.namespace, &names.namespace)
        && exact(&select.container, &names.container)
        && glob(
            &select.pod,
            Some(names.pod.as_str()).filter(|p| !p.is_empty()),
        )
        && glob(&select.unit, unit)
        && glob(&select.cgroup, placement.map(|p| p.rel.as_str()))
        && select
            .labels
            .iter()
            .all(|(k, v)| names.labels.get(k).is_some_and(|have| have == v))
}

/// A workload's cumulative value of a budget metric, from its ledger row.
pub(super) fn cumulative(
    entry: &Entry,
    metric: &str,
    prices: &Prices,
    models: &HashMap<Arc<str>, Arc<str>>,
) -> Option<f64> {
    let cpu = Key::new(&workload::CPU_SECONDS, Vec::new());
    let (resource, scope) = match metric.split_once(':') {
        Some((r, s)) => (r, policy::SCOPES.iter().position(|x| *x == s)),
        None => (metric, None),
    };
    // Each series of `metric` times the weight `f` gives it (None: not counted).
    let sum = |metric: &'static Metric, f: &dyn Fn(&Key) -> Option<f64>| -> Option<f64> {
        let mut total = None;
        for (key, v) in entry.series(metric) {
            if let Some(weight) = f(key) {
                *total.get_or_insert(0.0) += v * weight;
            }
        }
        total
    };
    let egress = |scope: Option<usize>| {
        sum(&workload::NETWORK_TRANSMIT_BYTES, &|key| {
            let want = scope.and_then(|i| policy::SCOPES.get(i));
            want.is_none_or(|w| key.label("scope") == Some(*w))
                .then_some(1.0)
        })
    };
    // cgroupfs counts writeback the BPF programs cannot attribute; prefer it where present.
    let disk = |metric: &'static Metric| {
        let method = |m: &str| Key::new(metric, vec![("method", Arc::from(m))]);
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
    match resource {
        "cpu_seconds" => entry.value(&cpu),
        "gpu_seconds" => entry.total(&workload::GPU_SECONDS),
        "gpu_energy_joules" => entry.total(&workload::GPU_ENERGY_JOULES),
        "network_egress_bytes" => egress(scope),
        "disk_read_bytes" => read(),
        "disk_write_bytes" => write(),
        "disk_bytes" => add(read(), write()),
        "cost" => {
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
        _ => None,
    }
}
