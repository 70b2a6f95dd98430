//! What each workload's use costs: the one place prices are applied.
//!
//! Every tick the [`Meter`] reads each workload's measured quantities from the ledger, by
//! catalogue declaration (CPU seconds, GPU seconds per device, GPU joules, egress bytes per
//! scope, disk bytes, the memory gauge), prices what each grew by since the last tick at the
//! prices in force, and adds that to the workload's `tally_workload_cost_total{resource}`.
//! Pricing growth rather than totals is what lets a reload change a price without rewriting
//! history: what was accrued stays, and only later use is priced anew. A workload's first
//! reading is all growth: its measured history (the counters the ledger exports, from the
//! cgroup's birth) is priced at the prices of the tick that first saw it.
//!
//! The ledger's counters never go down (a recreated cgroup's restart from zero is folded into
//! their base), so growth is never negative. A quantity that reads lower all the same (a
//! workload's disk bytes moving from the block-layer counters to its cgroup file) becomes the
//! new starting point and costs nothing: no negative cost, and nothing charged twice. A row the
//! ledger forgets takes its cost with it, like every other counter of it.
//!
//! `resource = "cost"` budgets charge the same counter, so a budget and `/metrics` agree.

use std::collections::HashMap;
use std::sync::Arc;

use tally_exporters::{Family, Metric};

use crate::catalogue::{cost, workload};
use crate::config::policy::Prices;
use crate::identity::PathIdentity;
use crate::ledger::{Entry, Key, Ledger};
use crate::source::PricedGpu;

/// 10^9 bytes: prices are per GB, as cloud providers bill.
const GB: f64 = 1e9;
/// Joules in a kWh.
const JOULES_PER_KWH: f64 = 3.6e6;
const SECONDS_PER_HOUR: f64 = 3600.0;

/// What a cost is for: the `resource` label of `tally_workload_cost_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Cpu,
    Gpu,
    GpuEnergy,
    NetworkEgress,
    Disk,
    Memory,
}

impl Resource {
    pub const ALL: [Resource; 6] = [
        Resource::Cpu,
        Resource::Gpu,
        Resource::GpuEnergy,
        Resource::NetworkEgress,
        Resource::Disk,
        Resource::Memory,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Cpu => "cpu",
            Resource::Gpu => "gpu",
            Resource::GpuEnergy => "gpu_energy",
            Resource::NetworkEgress => "network_egress",
            Resource::Disk => "disk",
            Resource::Memory => "memory",
        }
    }

    /// What its price is per: the `per` label of `tally_price`.
    fn per(self) -> &'static str {
        match self {
            Resource::Cpu => "core_second",
            Resource::Gpu => "gpu_second",
            Resource::GpuEnergy => "kwh",
            Resource::NetworkEgress | Resource::Disk => "gb",
            Resource::Memory => "gb_hour",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One cumulative quantity a workload's cost grows with: its resource, the label that prices it
/// (a GPU or MIG instance UUID, a network scope), and its value in the family's base unit.
#[derive(Debug, Clone, PartialEq)]
struct Reading {
    resource: Resource,
    label: Option<Arc<str>>,
    value: f64,
}

/// The prices of one tick, with the node facts that pick among them.
#[derive(Debug, Clone, Copy)]
pub struct Tariff<'a> {
    pub prices: &'a Prices,
    /// GPU and MIG instance UUID → what it is priced as.
    pub gpus: &'a HashMap<Arc<str>, PricedGpu>,
}

impl Tariff<'_> {
    /// The price of one GPU-second on `gpu`: its model's (or `default`), times its share.
    /// A GPU the node facts do not know (gone since) takes `default` at a whole GPU's share.
    pub fn gpu_second(&self, gpu: &str) -> f64 {
        let known = self.gpus.get(gpu);
        let by_model = known.and_then(|g| self.prices.gpu_second.get(g.model.as_ref()));
        let price = by_model
            .or_else(|| self.prices.gpu_second.get("default"))
            .copied()
            .unwrap_or(0.0);
        price * known.map_or(1.0, |g| g.share)
    }

    /// What `amount` of `resource` costs (`label`: the GPU or scope where it matters), in the
    /// family's base unit: seconds, joules, bytes; byte-seconds for memory.
    pub fn cost(&self, resource: Resource, label: Option<&str>, amount: f64) -> f64 {
        let p = self.prices;
        match resource {
            Resource::Cpu => amount * p.cpu_core_second,
            Resource::Gpu => amount * label.map_or(0.0, |gpu| self.gpu_second(gpu)),
            Resource::GpuEnergy => amount / JOULES_PER_KWH * p.gpu_energy_kwh,
            Resource::NetworkEgress => {
                let scope = label.unwrap_or("internet");
                amount / GB * p.network_egress_gb.get(scope).copied().unwrap_or(0.0)
            }
            Resource::Disk => amount / GB * p.disk_gb,
            Resource::Memory => amount / GB / SECONDS_PER_HOUR * p.memory_gb_hour,
        }
    }

    /// Whether any use of `resource` has a price.
    fn prices(&self, resource: Resource) -> bool {
        let p = self.prices;
        let any = |m: &std::collections::BTreeMap<String, f64>| m.values().any(|v| *v > 0.0);
        match resource {
            Resource::Cpu => p.cpu_core_second > 0.0,
            Resource::Gpu => any(&p.gpu_second),
            Resource::GpuEnergy => p.gpu_energy_kwh > 0.0,
            Resource::NetworkEgress => any(&p.network_egress_gb),
            Resource::Disk => p.disk_gb > 0.0,
            Resource::Memory => p.memory_gb_hour > 0.0,
        }
    }
}

/// A workload's disk bytes, read and written, as `/metrics` shows them (the ledger's
/// preference): its cgroup file's where it has one, the block-layer counters' otherwise. The
/// block-layer counters charge I/O that v1 blk-throttle delays to the kworker that dispatches
/// it; v1 blkio and `io.stat` charge it to the workload.
pub fn disk_bytes(entry: &Entry, declared: &'static Metric) -> Option<f64> {
    let method = |m: &str| Key::new(declared, vec![("method", Arc::from(m))]);
    entry
        .value(&method("cgroupfs"))
        .or_else(|| entry.value(&method("ebpf")))
}

/// What one pass over a row reads: every cumulative quantity that has a price, summed per
/// priced label (a GPU's seconds over its methods: each series is monotonic, so their sum is),
/// and the memory gauge. Kept by the meter and refilled for each row, so a tick allocates
/// nothing per workload.
#[derive(Debug, Default)]
struct Scan {
    readings: Vec<Reading>,
    memory: Option<f64>,
    /// Disk bytes read and written, by method: cgroupfs, then ebpf.
    disk: [[Option<f64>; 2]; 2],
}

impl Scan {
    fn push(&mut self, resource: Resource, label: Option<&Arc<str>>, value: f64) {
        let same = |r: &&mut Reading| r.resource == resource && r.label.as_ref() == label;
        match self.readings.iter_mut().find(same) {
            Some(r) => r.value += value,
            None => self.readings.push(Reading {
                resource,
                label: label.cloned(),
                value,
            }),
        }
    }

    fn read(&mut self, entry: &Entry) {
        self.readings.clear();
        self.memory = None;
        self.disk = [[None; 2]; 2];
        let is = |key: &Key, declared: &'static Metric| std::ptr::eq(key.metric, declared);
        for (key, value) in entry.numbers() {
            if is(key, &workload::CPU_SECONDS) {
                self.push(Resource::Cpu, None, value);
            } else if is(key, &workload::MEMORY_BYTES) {
                self.memory = Some(value);
            } else if is(key, &workload::GPU_SECONDS) {
                self.push(Resource::Gpu, label(key, "gpu"), value);
            } else if is(key, &workload::GPU_ENERGY_JOULES) {
                self.push(Resource::GpuEnergy, label(key, "gpu"), value);
            } else if is(key, &workload::NETWORK_TRANSMIT_BYTES) {
                self.push(Resource::NetworkEgress, label(key, "scope"), value);
            } else {
                let direction = if is(key, &workload::DISK_READ_BYTES) {
                    0
                } else if is(key, &workload::DISK_WRITE_BYTES) {
                    1
                } else {
                    continue;
                };
                let method = match label(key, "method").map(|m| m.as_ref()) {
                    Some("cgroupfs") => 0,
                    Some("ebpf") => 1,
                    _ => continue,
                };
                self.disk[direction][method] = Some(value);
            }
        }
        // As `disk_bytes` chooses.
        let [read, write] = self.disk.map(|[cgroupfs, ebpf]| cgroupfs.or(ebpf));
        if read.is_some() || write.is_some() {
            let bytes = read.unwrap_or(0.0) + write.unwrap_or(0.0);
            self.push(Resource::Disk, None, bytes);
        }
    }
}

/// The value of `key`'s label `name`.
fn label<'a>(key: &'a Key, name: &str) -> Option<&'a Arc<str>> {
    key.labels.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
}

/// One workload's accrual over one tick: the cost of each resource (by [`Resource::index`];
/// `None` where the workload has no use of it). `priced` holds the quantities priced so far
/// and is brought up to `now`.
fn accrue(
    now: &Scan,
    priced: &mut Vec<Reading>,
    live: bool,
    seconds: f64,
    tariff: &Tariff<'_>,
) -> [Option<f64>; 6] {
    let mut costs = [None; 6];
    for r in &now.readings {
        let last = priced
            .iter_mut()
            .find(|b| b.resource == r.resource && b.label == r.label);
        let grown = match last {
            // Lower than last time: a new starting point, not a refund (module doc).
            Some(last) => (r.value - std::mem::replace(&mut last.value, r.value)).max(0.0),
            None => {
                priced.push(r.clone());
                r.value.max(0.0)
            }
        };
        let cost = tariff.cost(r.resource, r.label.as_deref(), grown);
        *costs[r.resource.index()].get_or_insert(0.0) += cost;
    }
    // An exited workload holds no memory (the ledger drops its gauges anyway).
    if let (Some(bytes), true) = (now.memory, live) {
        let cost = tariff.cost(Resource::Memory, None, bytes.max(0.0) * seconds);
        costs[Resource::Memory.index()] = Some(cost);
    }
    costs
}

/// What the meter keeps per workload: the quantities priced so far, and the last accrual that
/// found its row (rows the ledger forgot are dropped).
#[derive(Debug, Default)]
struct Priced {
    readings: Vec<Reading>,
    accrual: u64,
}

/// Accrues every workload's cost in the ledger, once a tick, and exports the prices in force.
#[derive(Debug)]
pub struct Meter {
    prices: Prices,
    /// `tally_workload_cost_total{resource}`, by [`Resource::index`].
    keys: [Key; 6],
    /// Per workload, the quantities priced so far.
    priced: HashMap<PathIdentity, Priced, foldhash::fast::RandomState>,
    accruals: u64,
    scan: Scan,
    /// Nothing was priced at the last accrual, so the meter follows no quantity (see
    /// [`Meter::reprice`]).
    idle: bool,
}

impl Meter {
    pub fn new(prices: &Prices) -> Self {
        Self {
            prices: prices.clone(),
            keys: Resource::ALL.map(|r| {
                Key::new(
                    &cost::WORKLOAD_COST,
                    vec![("resource", Arc::from(r.as_str()))],
                )
            }),
            priced: HashMap::default(),
            accruals: 0,
            scan: Scan::default(),
            idle: false,
        }
    }

    /// New prices, for use from the next accrual on; what was accrued stays. Where nothing had
    /// a price, the meter followed nothing: it takes every workload's quantities in `ledger` (as
    /// of the last tick) as where its priced use starts.
    pub fn reprice(
        &mut self,
        prices: &Prices,
        ledger: &mut Ledger,
        gpus: &HashMap<Arc<str>, PricedGpu>,
    ) {
        self.prices = prices.clone();
        if self.idle && self.priced(gpus).contains(&true) {
            self.idle = false;
            self.pass(ledger, gpus, 0.0, [false; 6]);
        }
    }

    /// Which resources have a price.
    fn priced(&self, gpus: &HashMap<Arc<str>, PricedGpu>) -> [bool; 6] {
        let tariff = Tariff {
            prices: &self.prices,
            gpus,
        };
        Resource::ALL.map(|r| tariff.prices(r))
    }

    /// Prices what every workload in the ledger used since the last call, `seconds` ago (what
    /// its memory is held for), and adds it to its cost. A resource gets a series where the
    /// workload has a use of it and some use of it has a price (and keeps it once it has one).
    /// While nothing has a price the meter does nothing at all (a pass over every row each tick
    /// would cost a tenth of the tick at 10,000 workloads); a reload that sets prices starts it
    /// from the quantities of the tick before, so that the prices apply only to later use.
    pub fn accrue(
        &mut self,
        ledger: &mut Ledger,
        gpus: &HashMap<Arc<str>, PricedGpu>,
        seconds: f64,
    ) {
        let priced = self.priced(gpus);
        if !priced.contains(&true) {
            self.priced.clear();
            self.idle = true;
            return;
        }
        self.pass(ledger, gpus, seconds, priced);
    }

    /// Follows every workload's quantities in `ledger`, and charges the growth of those whose
    /// resource `charge` says.
    fn pass(
        &mut self,
        ledger: &mut Ledger,
        gpus: &HashMap<Arc<str>, PricedGpu>,
        seconds: f64,
        charge: [bool; 6],
    ) {
        let tariff = Tariff {
            prices: &self.prices,
            gpus,
        };
        self.accruals += 1;
        let mut rows = 0;
        for mut row in ledger.rows() {
            let Some(entry) = row.entry() else { continue };
            rows += 1;
            self.scan.read(entry);
            let live = entry.is_live();
            let known = match self.priced.get_mut(&entry.workload.identity) {
                Some(known) => known,
                None => self
                    .priced
                    .entry(entry.workload.identity.clone())
                    .or_default(),
            };
            known.accrual = self.accruals;
            let costs = accrue(&self.scan, &mut known.readings, live, seconds, &tariff);
            for (i, cost) in costs.iter().enumerate() {
                if let (Some(cost), true) = (cost, charge[i]) {
                    row.add(&self.keys[i], *cost);
                }
            }
        }
        if self.priced.len() > rows {
            let accruals = self.accruals;
            self.priced.retain(|_, known| known.accrual == accruals);
        }
    }

    /// `tally_price`: every price the configuration sets, zero ones included.
    pub fn families(&self) -> Vec<Family> {
        let p = &self.prices;
        let mut family = Family::new(&cost::PRICE);
        let mut push = |resource: Resource, model: &str, scope: &str, price: f64| {
            family.push_labeled(
                vec![
                    ("resource", Arc::from(resource.as_str())),
                    ("gpu_model", Arc::from(model)),
                    ("scope", Arc::from(scope)),
                    ("per", Arc::from(resource.per())),
                    ("currency", Arc::from(p.currency.as_str())),
                ],
                price,
            );
        };
        push(Resource::Cpu, "", "", p.cpu_core_second);
        for (model, price) in &p.gpu_second {
            push(Resource::Gpu, model, "", *price);
        }
        push(Resource::GpuEnergy, "", "", p.gpu_energy_kwh);
        for (scope, price) in &p.network_egress_gb {
            push(Resource::NetworkEgress, "", scope, *price);
        }
        push(Resource::Disk, "", "", p.disk_gb);
        push(Resource::Memory, "", "", p.memory_gb_hour);
        vec![family]
    }
}

#[cfg(test)]
mod tests;
