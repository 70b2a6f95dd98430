//! The cost counter's arithmetic, by hand-computed values.

use std::time::{Duration, Instant};

use super::*;
use crate::config::Config;
use crate::identity::{Names, Workload};
use crate::ledger::Labels;

fn unit(name: &str) -> Arc<Workload> {
    Arc::new(Workload::new(
        PathIdentity::Unit(name.into()),
        Names::default(),
    ))
}

fn prices(toml: &str) -> Prices {
    Config::parse(toml).unwrap().prices
}

fn key(metric: &'static Metric, labels: &[(&'static str, &str)]) -> Key {
    let labels: Labels = labels.iter().map(|(n, v)| (*n, Arc::from(*v))).collect();
    Key::new(metric, labels)
}

fn cpu() -> Key {
    key(&workload::CPU_SECONDS, &[])
}

fn cost_key(resource: &str) -> Key {
    key(&cost::WORKLOAD_COST, &[("resource", resource)])
}

/// The workload's cost of `resource`, `None` where it has no such series.
fn cost_of(ledger: &Ledger, w: &Arc<Workload>, resource: &str) -> Option<f64> {
    ledger
        .entries()
        .find(|e| e.workload.identity == w.identity)
        .and_then(|e| e.value(&cost_key(resource)))
}

/// Equal to `want` but for rounding: the amounts are decimal fractions, not binary ones.
#[track_caller]
fn assert_cost(got: Option<f64>, want: f64) {
    let got = got.unwrap_or_else(|| panic!("no cost series, want {want}"));
    assert!(
        (got - want).abs() <= 1e-12 * want.abs().max(1.0),
        "cost {got}, want {want}"
    );
}

fn gpus(list: &[(&str, &str, f64)]) -> HashMap<Arc<str>, PricedGpu> {
    list.iter()
        .map(|(uuid, model, share)| {
            let priced = PricedGpu {
                model: Arc::from(*model),
                share: *share,
            };
            (Arc::from(*uuid), priced)
        })
        .collect()
}

const PRICES: &str = r#"
[prices]
currency = "EUR"
cpu_core_second = 0.5
gpu_second = { "NVIDIA H100 80GB HBM3" = 2.0, default = 1.0 }
gpu_energy_kwh = 0.25
network_egress_gb = { internet = 0.09, zone = 0.01 }
disk_gb = 0.5
memory_gb_hour = 0.1
"#;

#[test]
fn each_resource_is_priced_from_what_it_measured() {
    let mut ledger = Ledger::new(Duration::from_secs(60));
    let mut meter = Meter::new(&prices(PRICES));
    let w = unit("a.service");
    let gpus = gpus(&[
        ("GPU-a", "NVIDIA H100 80GB HBM3", 1.0),
        ("GPU-b", "NVIDIA L4", 1.0),
    ]);
    ledger.see(&w, 1, true);
    let mut row = ledger.row(&w);
    row.observe(&cpu(), 10.0);
    row.set(&key(&workload::MEMORY_BYTES, &[]), 2e9);
    let gpu_seconds =
        |gpu, method| key(&workload::GPU_SECONDS, &[("gpu", gpu), ("method", method)]);
    // One GPU's seconds by two methods (a second holder came): priced as one GPU's.
    row.add(&gpu_seconds("GPU-a", "exclusive"), 4.0);
    row.add(&gpu_seconds("GPU-a", "memory_share"), 2.0);
    // A model with no price of its own: `default`.
    row.add(&gpu_seconds("GPU-b", "exclusive"), 3.0);
    // 2 kWh.
    row.add(
        &key(&workload::GPU_ENERGY_JOULES, &[("gpu", "GPU-a")]),
        7.2e6,
    );
    let egress = |scope| key(&workload::NETWORK_TRANSMIT_BYTES, &[("scope", scope)]);
    row.add(&egress("internet"), 3e9);
    row.add(&egress("zone"), 2e9);
    // Not listed: free.
    row.add(&egress("node"), 5e9);
    let disk = |declared, method| key(declared, &[("method", method)]);
    row.observe(&disk(&workload::DISK_READ_BYTES, "cgroupfs"), 1e9);
    row.observe(&disk(&workload::DISK_WRITE_BYTES, "cgroupfs"), 3e9);
    // Not what /metrics shows for this workload (it has cgroupfs series): not priced.
    row.add(&disk(&workload::DISK_READ_BYTES, "ebpf"), 100e9);
    ledger.end_tick(Instant::now());

    // The first tick: every counter's history; memory held for no time yet.
    meter.accrue(&mut ledger, &gpus, 0.0);
    assert_cost(cost_of(&ledger, &w, "cpu"), 10.0 * 0.5);
    assert_cost(cost_of(&ledger, &w, "gpu"), 6.0 * 2.0 + 3.0 * 1.0);
    assert_cost(cost_of(&ledger, &w, "gpu_energy"), 2.0 * 0.25);
    assert_cost(
        cost_of(&ledger, &w, "network_egress"),
        3.0 * 0.09 + 2.0 * 0.01,
    );
    assert_cost(cost_of(&ledger, &w, "disk"), 4.0 * 0.5);
    assert_cost(cost_of(&ledger, &w, "memory"), 0.0);

    // Half an hour later, nothing grew but memory was held: 2 GB × 0.5 h × 0.1.
    ledger.see(&w, 1, true);
    ledger.end_tick(Instant::now());
    meter.accrue(&mut ledger, &gpus, 1800.0);
    assert_cost(cost_of(&ledger, &w, "cpu"), 5.0);
    assert_cost(cost_of(&ledger, &w, "gpu"), 15.0);
    assert_cost(cost_of(&ledger, &w, "memory"), 0.1);

    // Growth only is priced: 2 more CPU seconds, 1 GPU-a second, 1 GB more written.
    ledger.see(&w, 1, true);
    let mut row = ledger.row(&w);
    row.observe(&cpu(), 12.0);
    row.add(&gpu_seconds("GPU-a", "memory_share"), 1.0);
    row.observe(&disk(&workload::DISK_WRITE_BYTES, "cgroupfs"), 4e9);
    ledger.end_tick(Instant::now());
    meter.accrue(&mut ledger, &gpus, 0.0);
    assert_cost(cost_of(&ledger, &w, "cpu"), 5.0 + 2.0 * 0.5);
    assert_cost(cost_of(&ledger, &w, "gpu"), 15.0 + 2.0);
    assert_cost(cost_of(&ledger, &w, "disk"), 2.0 + 0.5);

    // Exited: its gauge is gone, so its memory costs no more.
    ledger.end_tick(Instant::now());
    meter.accrue(&mut ledger, &gpus, 3600.0);
    assert_cost(cost_of(&ledger, &w, "memory"), 0.1);
}

#[test]
fn a_price_reload_keeps_what_was_accrued_and_prices_later_use_anew() {
    let mut ledger = Ledger::new(Duration::from_secs(60));
    let mut meter = Meter::new(&prices("[prices]\ncpu_core_second = 0.5\n"));
    let w = unit("a.service");
    let none = HashMap::new();
    let tick = |ledger: &mut Ledger, meter: &mut Meter, seconds: f64| {
        ledger.see(&w, 1, true);
        ledger.observe(&w, &cpu(), seconds);
        ledger.end_tick(Instant::now());
        meter.accrue(ledger, &none, 1.0);
    };
    tick(&mut ledger, &mut meter, 10.0);
    assert_cost(cost_of(&ledger, &w, "cpu"), 5.0);
    meter.reprice(
        &prices("[prices]\ncpu_core_second = 2.0\n"),
        &mut ledger,
        &none,
    );
    tick(&mut ledger, &mut meter, 12.0);
    assert_cost(cost_of(&ledger, &w, "cpu"), 5.0 + 2.0 * 2.0);
    // Free from now on: the series stays, and what it says.
    meter.reprice(
        &prices("[prices]\ncpu_core_second = 0.0\n"),
        &mut ledger,
        &none,
    );
    tick(&mut ledger, &mut meter, 20.0);
    assert_cost(cost_of(&ledger, &w, "cpu"), 9.0);
    // With nothing priced, the meter follows nothing (no pass over the rows each tick).
    assert!(meter.idle && meter.priced.is_empty());
    // Priced again: only what came after is charged, not the free seconds.
    meter.reprice(
        &prices("[prices]\ncpu_core_second = 1.0\n"),
        &mut ledger,
        &none,
    );
    tick(&mut ledger, &mut meter, 21.0);
    assert_cost(cost_of(&ledger, &w, "cpu"), 10.0);
}

#[test]
fn a_counter_that_restarts_is_charged_neither_negative_nor_twice() {
    let mut ledger = Ledger::new(Duration::from_secs(60));
    let mut meter = Meter::new(&prices("[prices]\ncpu_core_second = 0.5\ndisk_gb = 1.0\n"));
    let w = unit("a.service");
    let none = HashMap::new();
    let read = |method| key(&workload::DISK_READ_BYTES, &[("method", method)]);
    let tick = |ledger: &mut Ledger, meter: &mut Meter, cgroup: u64, cpu_raw: f64| {
        ledger.see(&w, cgroup, true);
        ledger.observe(&w, &cpu(), cpu_raw);
        ledger.end_tick(Instant::now());
        meter.accrue(ledger, &none, 1.0);
    };
    tick(&mut ledger, &mut meter, 1, 10.0);
    assert_cost(cost_of(&ledger, &w, "cpu"), 5.0);
    // The unit restarted in a new cgroup, whose counter starts from zero: 1 s more, not -9 s
    // and not 1 s on top of the first 10 again.
    tick(&mut ledger, &mut meter, 2, 1.0);
    assert_cost(cost_of(&ledger, &w, "cpu"), 5.5);
    // A reset without a new id: the same.
    tick(&mut ledger, &mut meter, 2, 0.5);
    assert_cost(cost_of(&ledger, &w, "cpu"), 5.75);

    // Disk bytes from the block-layer counters until the cgroup file has a figure, lower:
    // nothing refunded, nothing charged until it grows past where it starts.
    ledger.add(&w, &read("ebpf"), 4e9);
    tick(&mut ledger, &mut meter, 2, 0.5);
    assert_cost(cost_of(&ledger, &w, "disk"), 4.0);
    ledger.observe(&w, &read("cgroupfs"), 1e9);
    tick(&mut ledger, &mut meter, 2, 0.5);
    assert_cost(cost_of(&ledger, &w, "disk"), 4.0);
    ledger.observe(&w, &read("cgroupfs"), 3e9);
    tick(&mut ledger, &mut meter, 2, 0.5);
    assert_cost(cost_of(&ledger, &w, "disk"), 6.0);
}

#[test]
fn a_workload_the_ledger_forgot_starts_its_cost_again_with_its_counters() {
    let mut ledger = Ledger::new(Duration::from_secs(1));
    let mut meter = Meter::new(&prices("[prices]\ncpu_core_second = 1.0\n"));
    let w = unit("a.service");
    let none = HashMap::new();
    let t0 = Instant::now();
    ledger.see(&w, 1, true);
    ledger.observe(&w, &cpu(), 10.0);
    ledger.end_tick(t0);
    meter.accrue(&mut ledger, &none, 1.0);
    assert_cost(cost_of(&ledger, &w, "cpu"), 10.0);
    // Exited, then forgotten after the grace period.
    ledger.end_tick(t0 + Duration::from_secs(1));
    ledger.end_tick(t0 + Duration::from_secs(3));
    meter.accrue(&mut ledger, &none, 1.0);
    assert!(ledger.is_empty());
    // Back, counting from zero again: so is its cost, which matches its counter.
    ledger.see(&w, 2, true);
    ledger.observe(&w, &cpu(), 3.0);
    ledger.end_tick(t0 + Duration::from_secs(4));
    meter.accrue(&mut ledger, &none, 1.0);
    assert_cost(cost_of(&ledger, &w, "cpu"), 3.0);
}

#[test]
fn a_mig_instance_second_costs_its_share_of_the_gpu() {
    let mut ledger = Ledger::new(Duration::from_secs(60));
    let mut meter = Meter::new(&prices(
        "[prices]\ngpu_second = { \"NVIDIA H100 80GB HBM3\" = 7.0 }\n",
    ));
    let w = unit("a.service");
    // A 3g instance of a GPU with 7 compute slices; a GPU unknown to the facts is not priced
    // (no `default`).
    let gpus = gpus(&[("MIG-a", "NVIDIA H100 80GB HBM3", 3.0 / 7.0)]);
    let seconds = |gpu| {
        key(
            &workload::GPU_SECONDS,
            &[("gpu", gpu), ("method", "mig_allocation")],
        )
    };
    ledger.see(&w, 1, true);
    ledger.add(&w, &seconds("MIG-a"), 10.0);
    ledger.add(&w, &seconds("GPU-gone"), 10.0);
    ledger.end_tick(Instant::now());
    meter.accrue(&mut ledger, &gpus, 1.0);
    assert_cost(cost_of(&ledger, &w, "gpu"), 10.0 * 7.0 * 3.0 / 7.0);
}

#[test]
fn unpriced_resources_have_no_cost_series_and_the_prices_are_shown() {
    let mut ledger = Ledger::new(Duration::from_secs(60));
    let mut meter = Meter::new(&Prices::default());
    let w = unit("a.service");
    ledger.see(&w, 1, true);
    ledger.observe(&w, &cpu(), 10.0);
    ledger.end_tick(Instant::now());
    meter.accrue(&mut ledger, &HashMap::new(), 1.0);
    assert!(!ledger.families().contains_key(cost::WORKLOAD_COST.name));

    let shown = |meter: &Meter| -> Vec<String> {
        meter.families()[0]
            .samples
            .iter()
            .map(|s| {
                let labels: Vec<String> = s.extra.iter().map(|(n, v)| format!("{n}={v}")).collect();
                format!("{} {}", labels.join(","), s.value)
            })
            .collect()
    };
    assert_eq!(
        shown(&meter),
        [
            "resource=cpu,gpu_model=,scope=,per=core_second,currency=USD 0",
            "resource=gpu_energy,gpu_model=,scope=,per=kwh,currency=USD 0",
            "resource=disk,gpu_model=,scope=,per=gb,currency=USD 0",
            "resource=memory,gpu_model=,scope=,per=gb_hour,currency=USD 0",
        ]
    );
    meter.reprice(&prices(PRICES), &mut ledger, &HashMap::new());
    let shown = shown(&meter);
    assert_eq!(shown.len(), 8, "{shown:?}");
    assert!(
        shown.contains(
            &"resource=gpu,gpu_model=NVIDIA H100 80GB HBM3,scope=,per=gpu_second,currency=EUR 2"
                .to_owned()
        ),
        "{shown:?}"
    );
    assert!(
        shown.contains(
            &"resource=network_egress,gpu_model=,scope=zone,per=gb,currency=EUR 0.01".to_owned()
        ),
        "{shown:?}"
    );
}
