//! What workloads' use costs, priced from `[prices]`, and the prices in force.

use tally_exporters::{Kind, Metric};

pub static WORKLOAD_COST: Metric = Metric {
    name: "tally_workload_cost_total",
    help: "What the workload's measured use cost, in the configured currency, by resource; each tick's use is priced at the prices in force then.",
    kind: Kind::Counter,
    unit: "",
    per_workload: true,
    labels: &["resource"],
};

pub static PRICE: Metric = Metric {
    name: "tally_price",
    help: "A price in force, in currency per unit of resource (per: core_second, gpu_second, kwh, gb, gb_hour), by GPU model and network scope where it differs by them.",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &["resource", "gpu_model", "scope", "per", "currency"],
};
