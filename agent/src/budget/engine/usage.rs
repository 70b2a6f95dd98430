//! What a workload used: which budgets select it, and its cumulative value of a budget metric
//! from its ledger row, turned into usage since the last tick.

use super::*;

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
    let (resource, scope) = match metric.split_once(':') {
        Some((r, s)) => (r, policy::SCOPES.iter().position(|x| *x == s)),
        None => (metric, None),
    };
    let sum = |f: &dyn Fn(&CounterId) -> Option<f64>| -> Option<f64> {
        let mut total = None;
        for (id, v) in entry.counters() {
            if let Some(weight) = f(id) {
                *total.get_or_insert(0.0) += v * weight;
            }
        }
        total
    };
    let gpu = |counter: GpuCounter| {
        sum(&|id| matches!(id, CounterId::Gpu { counter: c, .. } if *c == counter).then_some(1.0))
    };
    let egress = |scope: Option<usize>| {
        sum(&|id| match id {
            CounterId::NetBytes {
                direction: d,
                scope: s,
            } if *d == direction::EGRESS && scope.is_none_or(|want| want as u32 == *s) => Some(1.0),
            _ => None,
        })
    };
    // cgroupfs counts writeback the BPF programs cannot attribute; prefer it where present.
    let disk = |cgroupfs: CounterId, bpf: DiskCounter| {
        entry
            .counter(cgroupfs)
            .or_else(|| entry.counter(CounterId::Disk(bpf)))
    };
    let read = || disk(CounterId::DiskReadBytes, DiskCounter::ReadBytes);
    let write = || disk(CounterId::DiskWriteBytes, DiskCounter::WriteBytes);
    let add = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
    };
    match resource {
        "cpu_seconds" => entry.counter(CounterId::CpuSeconds),
        "gpu_seconds" => gpu(GpuCounter::BusySeconds),
        "gpu_energy_joules" => gpu(GpuCounter::EnergyJoules),
        "network_egress_bytes" => egress(scope),
        "disk_read_bytes" => read(),
        "disk_write_bytes" => write(),
        "disk_bytes" => add(read(), write()),
        "cost" => {
            let gpu_cost = sum(&|id| match id {
                CounterId::Gpu {
                    counter: GpuCounter::BusySeconds,
                    gpu,
                    ..
                } => {
                    let model = models.get(gpu);
                    model
                        .and_then(|m| prices.gpu_second.get(m.as_ref()))
                        .or_else(|| prices.gpu_second.get("default"))
                        .copied()
                }
                CounterId::Gpu {
                    counter: GpuCounter::EnergyJoules,
                    ..
                } => Some(prices.gpu_energy_kwh / 3.6e6),
                CounterId::NetBytes {
                    direction: d,
                    scope: s,
                } if *d == direction::EGRESS => {
                    let name = policy::SCOPES
                        .get(*s as usize)
                        .copied()
                        .unwrap_or("internet");
                    prices.network_egress_gb.get(name).map(|p| p / 1e9)
                }
                _ => None,
            });
            let cpu = entry
                .counter(CounterId::CpuSeconds)
                .map(|s| s * prices.cpu_core_second);
            let disk = add(read(), write()).map(|b| b * prices.disk_gb / 1e9);
            add(add(gpu_cost, cpu), disk)
        }
        _ => None,
    }
}
