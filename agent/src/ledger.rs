//! The ledger: monotonic per-workload counters that survive what the sources do.
//!
//! Sources report cumulative values that reset when a cgroup is recreated (a restarted unit gets a
//! new cgroup and starts from zero). The ledger folds each reset into a base so the exported
//! counter never goes down, keeps an exited workload's final values for a grace period (a job that
//! lived between two scrapes is still billed), then forgets it.
//!
//! The ledger knows no source: a value is keyed by a catalogue declaration and the series' own
//! labels ([`Key`]), and sources record cumulative readings (`observe`), increments (`add`,
//! `add_observed` for histograms) or gauges (`set`). Exporting is one loop over every row
//! ([`Ledger::families`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_exporters::{Family, Histogram, Kind, Metric, Sample};

use crate::identity::{PathIdentity, Workload};

/// A series' own labels (after the workload's), in the order the catalogue declares them.
pub type Labels = Vec<(&'static str, Arc<str>)>;

/// What the ledger keeps one value for: a declared family and the series' own labels.
#[derive(Debug, Clone)]
pub struct Key {
    pub metric: &'static Metric,
    pub labels: Labels,
}

impl Key {
    pub fn new(metric: &'static Metric, labels: Labels) -> Self {
        Self { metric, labels }
    }

    /// The value of label `name`, if the series has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_ref())
    }
}

// A declaration is a `static`: its address names it, and comparing addresses is cheaper than
// comparing names on every ledger lookup.
impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.metric, other.metric) && self.labels == other.labels
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let address = |k: &Key| std::ptr::from_ref(k.metric) as usize;
        (address(self), &self.labels).cmp(&(address(other), &other.labels))
    }
}

/// A cumulative source value made monotonic across resets.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Monotonic {
    base: f64,
    last: Option<f64>,
    /// Fed by `add` at least once (a delta source that reported zero still has a value: 0).
    added: bool,
}

impl Monotonic {
    fn observe(&mut self, raw: f64) {
        if let Some(last) = self.last {
            if raw < last {
                self.base += last;
            }
        }
        self.last = Some(raw);
    }

    /// The source restarted from zero (new cgroup): keep what was counted so far.
    fn rebase(&mut self) {
        if let Some(last) = self.last.take() {
            self.base += last;
        }
    }

    /// A source that reports increments (BPF maps, whose entries come and go per cgroup id).
    fn add(&mut self, delta: f64) {
        self.base += delta;
        self.added = true;
    }

    fn value(&self) -> Option<f64> {
        self.last
            .map(|l| self.base + l)
            .or((self.added || self.base > 0.0).then_some(self.base))
    }
}

/// Observations in fixed buckets, accumulated from a source's increments.
#[derive(Debug, Clone, PartialEq)]
pub struct Buckets {
    /// Upper bounds of the finite buckets.
    bounds: &'static [f64],
    /// Observations per finite bucket (not cumulative).
    counts: Vec<f64>,
    /// Every observation, those above the last bound included.
    count: f64,
    /// Sum of the observations, in the source's unit; `scale` converts it to the family's.
    sum: f64,
    scale: f64,
}

impl Buckets {
    fn histogram(&self) -> Histogram {
        let mut cumulative = 0.0;
        let buckets = self
            .bounds
            .iter()
            .zip(&self.counts)
            .map(|(bound, n)| {
                cumulative += n;
                (*bound, cumulative as u64)
            })
            .collect();
        Histogram {
            buckets,
            sum: self.sum * self.scale,
            count: self.count as u64,
        }
    }
}

/// One increment of a histogram: observations per finite bucket (extra entries, observations
/// above the last bound, are ignored: they are in `count`), how many in all, and their sum.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    pub bounds: &'static [f64],
    pub buckets: &'a [f64],
    pub count: f64,
    pub sum: f64,
    /// Multiplies `sum` into the family's unit (1e-9 for nanoseconds into seconds).
    pub scale: f64,
}

/// What the ledger keeps for one series.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Counter(Monotonic),
    /// The last value a source set; dropped when the workload exits.
    Gauge(f64),
    Histogram(Buckets),
}

impl Value {
    fn number(&self) -> Option<f64> {
        match self {
            Value::Counter(m) => m.value(),
            Value::Gauge(v) => Some(*v),
            Value::Histogram(_) => None,
        }
    }
}

/// Within one workload, families whose series come from more than one method (the cgroupfs and
/// the block-layer disk counters) show only the series of the first method in the preference the
/// workload has: the same bytes are never exported twice.
/// The default: the block-layer counters first, as v1 `blkio.throttle.io_service_bytes` reads 0
/// until blk-throttle is first used on the node.
pub const EBPF_FIRST: &[&str] = &["ebpf", "cgroupfs"];

/// On pure cgroup v2: the kernel's `io.stat` first. It counts from the cgroup's birth (the BPF
/// programs only from the agent's start), and includes writeback charged to the cgroup.
pub const CGROUPFS_FIRST: &[&str] = &["cgroupfs", "ebpf"];

/// Where a series' `method` label stands in `preference`, if it is one of those.
fn method_rank(key: &Key, preference: &[&str]) -> Option<usize> {
    let method = key.label("method")?;
    preference.iter().position(|m| *m == method)
}

/// One workload's row.
#[derive(Debug, Clone)]
pub struct Entry {
    pub workload: Arc<Workload>,
    cgroup_id: u64,
    values: BTreeMap<Key, Value>,
    /// Whether the workload has a cgroup v2 cgroup, so per-cgroup-id (BPF) sources can see it.
    pub in_v2: bool,
    /// When the workload was last seen; `exited` once a tick did not see it.
    pub exited_at: Option<Instant>,
    /// The ledger's method preference ([`EBPF_FIRST`] or [`CGROUPFS_FIRST`]).
    preference: &'static [&'static str],
}

impl Entry {
    /// The value of a counter or gauge series, if a source gave it one.
    pub fn value(&self, key: &Key) -> Option<f64> {
        self.values.get(key).and_then(Value::number)
    }

    /// Every counter and gauge series of `metric` with a value, in a stable order.
    pub fn series<'a>(
        &'a self,
        metric: &'static Metric,
    ) -> impl Iterator<Item = (&'a Key, f64)> + 'a {
        self.values
            .iter()
            .filter(move |(key, _)| std::ptr::eq(key.metric, metric))
            .filter_map(|(key, value)| value.number().map(|v| (key, v)))
    }

    /// The sum of every series of `metric`, `None` where it has none.
    pub fn total(&self, metric: &'static Metric) -> Option<f64> {
        self.series(metric)
            .map(|(_, v)| v)
            .fold(None, |sum, v| Some(sum.unwrap_or(0.0) + v))
    }

    /// For each family with series of more than one method, the best
    /// method rank this row has: the series it shows.
    fn best_methods(&self) -> Vec<(&'static Metric, usize)> {
        let mut best: Vec<(&'static Metric, usize)> = Vec::new();
        for key in self.values.keys() {
            let Some(rank) = method_rank(key, self.preference) else {
                continue;
            };
            match best.iter_mut().find(|(m, _)| std::ptr::eq(*m, key.metric)) {
                Some((_, r)) => *r = (*r).min(rank),
                None => best.push((key.metric, rank)),
            }
        }
        best
    }

    /// Pushes every series of this workload into its family in `families`.
    fn export(&self, families: &mut HashMap<&'static str, Family>) {
        let labels = self.workload.labels();
        let best = self.best_methods();
        for (key, value) in &self.values {
            // Not where the workload has a preferred method's series of the same family.
            let hidden = method_rank(key, self.preference).is_some_and(|rank| {
                best.iter()
                    .any(|(m, r)| std::ptr::eq(*m, key.metric) && *r < rank)
            });
            if hidden {
                continue;
            }
            let (value, histogram) = match value {
                Value::Histogram(b) => (0.0, Some(b.histogram())),
                other => match other.number() {
                    Some(v) => (v, None),
                    None => continue,
                },
            };
            families
                .entry(key.metric.name)
                .or_insert_with(|| Family::new(key.metric))
                .samples
                .push(Sample {
                    labels: labels.clone(),
                    extra: key.labels.clone(),
                    value,
                    histogram,
                });
        }
    }

    pub fn is_live(&self) -> bool {
        self.exited_at.is_none()
    }
}

#[derive(Debug)]
pub struct Ledger {
    entries: HashMap<PathIdentity, Entry>,
    grace: Duration,
    seen: Vec<PathIdentity>,
    preference: &'static [&'static str],
}

impl Ledger {
    pub fn new(grace: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            grace,
            seen: Vec::new(),
            preference: EBPF_FIRST,
        }
    }

    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// Which method's series a workload shows where a family has more than one:
    /// [`CGROUPFS_FIRST`] on pure cgroup v2, [`EBPF_FIRST`] elsewhere.
    pub fn prefer_methods(&mut self, preference: &'static [&'static str]) {
        self.preference = preference;
        for entry in self.entries.values_mut() {
            entry.preference = preference;
        }
    }

    /// Marks a workload seen in its cgroup this tick: live, and with `cgroup_id` (a new id means a
    /// recreated cgroup, whose cumulative counters start again from zero).
    pub fn see(&mut self, workload: &Arc<Workload>, cgroup_id: u64, in_v2: bool) {
        if let Some(entry) = self.entry(workload) {
            if entry.cgroup_id != cgroup_id {
                for value in entry.values.values_mut() {
                    if let Value::Counter(m) = value {
                        m.rebase();
                    }
                }
                entry.cgroup_id = cgroup_id;
            }
            entry.exited_at = None;
            entry.in_v2 = in_v2;
            entry.workload = workload.clone();
        }
        self.seen.push(workload.identity.clone());
    }

    /// The workload's row, to record several values with one lookup (made on first use).
    pub fn row(&mut self, workload: &Arc<Workload>) -> Row<'_> {
        Row(self.entry(workload))
    }

    /// Records one cumulative value: `row(workload).observe(key, raw)`.
    pub fn observe(&mut self, workload: &Arc<Workload>, key: &Key, raw: f64) {
        self.row(workload).observe(key, raw);
    }

    /// Records one increment: `row(workload).add(key, delta)`.
    pub fn add(&mut self, workload: &Arc<Workload>, key: &Key, delta: f64) {
        self.row(workload).add(key, delta);
    }

    /// Keeps a workload live without a cgroupfs reading (the host row of per-cgroup-id sources).
    pub fn touch(&mut self, workload: &Arc<Workload>) {
        if let Some(entry) = self.entry(workload) {
            entry.exited_at = None;
        }
        self.seen.push(workload.identity.clone());
    }

    /// The workload's row, made on first use (the identity is cloned only then). Always `Some`.
    fn entry(&mut self, workload: &Arc<Workload>) -> Option<&mut Entry> {
        if !self.entries.contains_key(&workload.identity) {
            let entry = Entry {
                workload: workload.clone(),
                cgroup_id: 0,
                values: BTreeMap::new(),
                in_v2: true,
                exited_at: None,
                preference: self.preference,
            };
            self.entries.insert(workload.identity.clone(), entry);
        }
        self.entries.get_mut(&workload.identity)
    }

    /// Ends a tick: workloads not observed since the last call have exited (their final values
    /// stay), and those exited longer than the grace period are forgotten.
    pub fn end_tick(&mut self, now: Instant) {
        let seen: std::collections::HashSet<PathIdentity> = self.seen.drain(..).collect();
        let grace = self.grace;
        self.entries.retain(|key, entry| {
            if seen.contains(key) {
                return true;
            }
            let exited = *entry.exited_at.get_or_insert(now);
            entry.values.retain(|_, v| !matches!(v, Value::Gauge(_)));
            now.duration_since(exited) < grace
        });
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// Every series of every workload, in a family per declaration (in no particular order).
    pub fn families(&self) -> HashMap<&'static str, Family> {
        let mut families = HashMap::new();
        for entry in self.entries.values() {
            entry.export(&mut families);
        }
        families
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// One workload's row, open for recording. A series is made on its first value, and only then is
/// its key cloned: sources keep their keys and lend them every tick.
#[derive(Debug)]
pub struct Row<'a>(Option<&'a mut Entry>);

impl Row<'_> {
    /// Records a cumulative value a source read (a cgroup file's counter); a value lower than
    /// the last is a reset, folded into the counter's base.
    pub fn observe(&mut self, key: &Key, raw: f64) {
        self.counter(key, |m| m.observe(raw));
    }

    /// Adds an increment from a source that reports deltas. Does not change whether the workload
    /// is live: an exited workload's last bytes still count.
    pub fn add(&mut self, key: &Key, delta: f64) {
        self.counter(key, |m| m.add(delta));
    }

    /// Sets a gauge; it keeps its value until set again or the workload exits.
    pub fn set(&mut self, key: &Key, value: f64) {
        debug_assert_eq!(key.metric.kind, Kind::Gauge, "{}", key.metric.name);
        let Some(entry) = &mut self.0 else { return };
        match entry.values.get_mut(key) {
            Some(v) => *v = Value::Gauge(value),
            None => {
                entry.values.insert(key.clone(), Value::Gauge(value));
            }
        }
    }

    /// Adds one increment of a histogram from a source that reports deltas.
    pub fn add_observed(&mut self, key: &Key, observed: Observed<'_>) {
        debug_assert_eq!(key.metric.kind, Kind::Histogram, "{}", key.metric.name);
        let Some(entry) = &mut self.0 else { return };
        if !entry.values.contains_key(key) {
            let buckets = Buckets {
                bounds: observed.bounds,
                counts: vec![0.0; observed.bounds.len()],
                count: 0.0,
                sum: 0.0,
                scale: observed.scale,
            };
            entry.values.insert(key.clone(), Value::Histogram(buckets));
        }
        // A family has one kind, so its series has one kind of value.
        if let Some(Value::Histogram(b)) = entry.values.get_mut(key) {
            for (n, add) in b.counts.iter_mut().zip(observed.buckets) {
                *n += add;
            }
            b.count += observed.count;
            b.sum += observed.sum;
        }
    }

    fn counter(&mut self, key: &Key, f: impl FnOnce(&mut Monotonic)) {
        debug_assert_eq!(key.metric.kind, Kind::Counter, "{}", key.metric.name);
        let Some(entry) = &mut self.0 else { return };
        match entry.values.get_mut(key) {
            Some(Value::Counter(m)) => f(m),
            // A family has one kind, so its series has one kind of value.
            Some(_) => {}
            None => {
                let mut fresh = Monotonic::default();
                f(&mut fresh);
                entry.values.insert(key.clone(), Value::Counter(fresh));
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
}
