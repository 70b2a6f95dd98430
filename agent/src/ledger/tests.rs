//! The ledger's counters, rows and method preference.

use super::*;
use crate::catalogue::workload;
use crate::identity::Names;

fn unit(name: &str) -> Arc<Workload> {
    Arc::new(Workload::new(
        PathIdentity::Unit(name.into()),
        Names::default(),
    ))
}

fn cpu() -> Key {
    Key::new(&workload::CPU_SECONDS, Vec::new())
}

fn memory() -> Key {
    Key::new(&workload::MEMORY_BYTES, Vec::new())
}

/// What the cgroupfs source records for a cgroup that used `seconds` of CPU.
fn read(ledger: &mut Ledger, w: &Arc<Workload>, cgroup_id: u64, seconds: f64) {
    ledger.see(w, cgroup_id, true);
    ledger.observe(w, &cpu(), seconds);
    ledger.row(w).set(&memory(), 100.0);
}

fn disk(method: &str) -> Key {
    Key::new(
        &workload::DISK_READ_BYTES,
        vec![("method", Arc::from(method))],
    )
}

#[test]
fn counters_stay_monotonic_across_a_recreated_cgroup() {
    let mut ledger = Ledger::new(Duration::from_secs(60));
    let w = unit("a.service");
    let t0 = Instant::now();
    read(&mut ledger, &w, 1, 5.0);
    ledger.end_tick(t0);
    read(&mut ledger, &w, 1, 7.0);
    ledger.end_tick(t0);
    // The unit restarted: new cgroup id, counter from zero.
    read(&mut ledger, &w, 2, 1.0);
    ledger.end_tick(t0);
    let e = ledger.entries().next().unwrap();
    assert_eq!(e.value(&cpu()), Some(8.0));
    // A reset without an id change (counter wrapped or was reset) is folded the same way.
    read(&mut ledger, &w, 2, 0.5);
    ledger.end_tick(t0);
    let e = ledger.entries().next().unwrap();
    assert_eq!(e.value(&cpu()), Some(8.5));
    assert_eq!(e.value(&disk("cgroupfs")), None);
}

#[test]
fn a_workload_keyed_first_by_its_v1_directory_then_its_v2_one_is_not_counted_twice() {
    let mut ledger = Ledger::new(Duration::from_secs(60));
    let w = unit("late-v2.service");
    let t0 = Instant::now();
    // First listed from cpuacct alone (its v2 directory not made yet), then from cgroup v2.
    ledger.see(&w, 700, false);
    ledger.observe(&w, &cpu(), 1.0);
    ledger.end_tick(t0);
    ledger.see(&w, 900, true);
    ledger.observe(&w, &cpu(), 1.5);
    ledger.end_tick(t0);
    let value = |l: &Ledger| l.entries().next().unwrap().value(&cpu());
    assert_eq!(value(&ledger), Some(1.5));
    // A v2 cgroup replaced by another v2 cgroup is new: counted from zero on top.
    ledger.see(&w, 901, true);
    ledger.observe(&w, &cpu(), 2.0);
    ledger.end_tick(t0);
    assert_eq!(value(&ledger), Some(3.5));
}

#[test]
fn a_raise_replaces_a_lower_last_reading_only_and_is_never_a_reset() {
    let mut ledger = Ledger::new(Duration::from_secs(60));
    let w = unit("a.service");
    let t0 = Instant::now();
    read(&mut ledger, &w, 1, 5.0);
    ledger.end_tick(t0);
    read(&mut ledger, &w, 2, 2.0);
    ledger.end_tick(t0);
    // Gone: its ended tasks used 2.5 s in all, more than the last reading.
    ledger.row(&w).raise(&cpu(), 2.5);
    let value = |l: &Ledger| l.entries().next().unwrap().value(&cpu());
    assert_eq!(value(&ledger), Some(7.5));
    // A lower figure changes nothing (no reset folded in), a later higher one still counts.
    ledger.row(&w).raise(&cpu(), 1.0);
    assert_eq!(value(&ledger), Some(7.5));
    ledger.row(&w).raise(&cpu(), 2.75);
    assert_eq!(value(&ledger), Some(7.75));
    // A row no reading ever reached takes the figure whole.
    let brief = unit("brief.service");
    ledger.row(&brief).raise(&cpu(), 0.25);
    ledger.end_tick(t0);
    let e = ledger.entries().find(|e| e.workload == brief).unwrap();
    assert_eq!(e.value(&cpu()), Some(0.25));
    assert!(!e.is_live());
}

#[test]
fn exited_workloads_keep_final_values_for_the_grace_period() {
    let mut ledger = Ledger::new(Duration::from_secs(60));
    let t0 = Instant::now();
    read(&mut ledger, &unit("job.service"), 1, 3.0);
    read(&mut ledger, &unit("stays.service"), 2, 1.0);
    ledger.end_tick(t0);
    read(&mut ledger, &unit("stays.service"), 2, 1.0);
    ledger.end_tick(t0 + Duration::from_secs(1));
    let job = ledger
        .entries()
        .find(|e| e.workload.identity == PathIdentity::Unit("job.service".into()))
        .unwrap();
    assert!(!job.is_live());
    assert_eq!(job.value(&cpu()), Some(3.0));
    assert_eq!(job.value(&memory()), None);

    read(&mut ledger, &unit("stays.service"), 2, 1.0);
    ledger.end_tick(t0 + Duration::from_secs(30));
    assert_eq!(ledger.len(), 2);
    read(&mut ledger, &unit("stays.service"), 2, 1.0);
    ledger.end_tick(t0 + Duration::from_secs(62));
    assert_eq!(ledger.len(), 1);

    // A workload that comes back within the grace period continues its counters.
    read(&mut ledger, &unit("job.service"), 3, 2.0);
    ledger.end_tick(t0 + Duration::from_secs(63));
    assert_eq!(ledger.len(), 2);
}

#[test]
fn a_preferred_method_hides_the_others_of_its_workload() {
    let mut ledger = Ledger::new(Duration::from_secs(60));
    let (a, b) = (unit("a.service"), unit("b.service"));
    for w in [&a, &b] {
        ledger.see(w, 1, true);
        ledger.observe(w, &disk("cgroupfs"), 10.0);
    }
    ledger.add(&a, &disk("ebpf"), 0.0);
    let families = ledger.families();
    let family = &families[workload::DISK_READ_BYTES.name];
    let mut shown: Vec<(String, String, f64)> = family
        .samples
        .iter()
        .map(|s| (s.labels[5].1.to_string(), s.extra[0].1.to_string(), s.value))
        .collect();
    shown.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        shown,
        [
            ("a.service".into(), "ebpf".into(), 0.0),
            ("b.service".into(), "cgroupfs".into(), 10.0)
        ]
    );
    // The hidden series still has its value, for budgets.
    let a_row = ledger.entries().find(|e| e.workload == a).unwrap();
    assert_eq!(a_row.value(&disk("cgroupfs")), Some(10.0));

    // On pure cgroup v2, io.stat is the one truth.
    ledger.prefer_methods(CGROUPFS_FIRST);
    let families = ledger.families();
    let a_shown: Vec<(String, f64)> = families[workload::DISK_READ_BYTES.name]
        .samples
        .iter()
        .filter(|s| &*s.labels[5].1 == "a.service")
        .map(|s| (s.extra[0].1.to_string(), s.value))
        .collect();
    assert_eq!(a_shown, [("cgroupfs".into(), 10.0)]);
}

#[test]
fn histograms_add_increments_into_cumulative_buckets() {
    static BOUNDS: [f64; 2] = [1.0, 2.0];
    let mut ledger = Ledger::new(Duration::from_secs(60));
    let w = unit("a.service");
    let key = Key::new(&workload::DISK_IO_LATENCY_SECONDS, Vec::new());
    for (buckets, count, sum) in [([1.0, 0.0, 1.0], 2.0, 5e9), ([0.0, 3.0, 0.0], 3.0, 4e9)] {
        let observed = Observed {
            bounds: &BOUNDS,
            buckets: &buckets,
            count,
            sum,
            scale: 1e-9,
        };
        ledger.row(&w).add_observed(&key, observed);
    }
    let families = ledger.families();
    let sample = &families[workload::DISK_IO_LATENCY_SECONDS.name].samples[0];
    assert_eq!(
        sample.histogram,
        Some(Histogram {
            buckets: vec![(1.0, 1), (2.0, 4)],
            sum: 9.0,
            count: 5,
        })
    );
}
