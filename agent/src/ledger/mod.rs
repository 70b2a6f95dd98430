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

    /// A second, complete count of the same quantity for the current cgroup (what its ended
    /// tasks used, counted as they ended): where it is higher than the last reading it
    /// replaces it; it never lowers it, and is never taken for a reset.
    fn raise(&mut self, raw: f64) {
        if self.last.is_none_or(|last| raw > last) {
            self.last = Some(raw);
        }
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
/// The block-layer counters first: the ledger's default until the agent sets its preference.
pub const EBPF_FIRST: &[&str] = &["ebpf", "cgroupfs"];

/// The kernel's cgroup files first, on every node: `io.stat` counts from the cgroup's birth (the
/// BPF programs only from the agent's start) and includes writeback charged to the cgroup; v1
/// blkio charges I/O that blk-throttle delays to the cgroup that issued it, where the block-layer
/// programs see the kworker that dispatches it. Budgets charge the same figure.
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

    /// Every counter and gauge series with a value, in a stable order.
    pub fn numbers(&self) -> impl Iterator<Item = (&Key, f64)> + '_ {
        self.values
            .iter()
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

    /// Counts from now on for the cgroup `cgroup_id` (a cgroup v2 one where `in_v2`): a new
    /// one's cumulative counters start again from zero, so what was counted so far moves into
    /// the base. The same workload keyed first by its v1 directory and then by its v2 one (on a
    /// hybrid node a walk can list the v1 directory of a unit whose v2 one is not made yet) is
    /// the same cgroup, not a new one: its counters go on. Should it be new after all, its first
    /// reading is lower than the last and is folded in as a reset.
    fn count_for(&mut self, cgroup_id: u64, in_v2: bool) {
        if self.cgroup_id != 0 && self.in_v2 != in_v2 {
            self.cgroup_id = cgroup_id;
            return;
        }
        if self.cgroup_id != cgroup_id {
            for value in self.values.values_mut() {
                if let Value::Counter(m) = value {
                    m.rebase();
                }
            }
            self.cgroup_id = cgroup_id;
        }
    }
}

/// The ledger's maps are looked up several times per workload and tick, by keys of a hundred
/// bytes (pod UID and container id): a fast hash seeded per process (foldhash), not SipHash,
/// which was a tenth of the tick at 1,000 workloads.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug)]
pub struct Ledger {
    entries: FastMap<PathIdentity, Entry>,
    grace: Duration,
    seen: Vec<PathIdentity>,
    preference: &'static [&'static str],
}

impl Ledger {
    pub fn new(grace: Duration) -> Self {
        Self {
            entries: FastMap::default(),
            grace,
            seen: Vec::new(),
            preference: EBPF_FIRST,
        }
    }

    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// Which method's series a workload shows where a family has more than one:
    /// [`CGROUPFS_FIRST`] on every node.
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
            entry.count_for(cgroup_id, in_v2);
            entry.exited_at = None;
            entry.in_v2 = in_v2;
            entry.workload = workload.clone();
        }
        self.seen.push(workload.identity.clone());
    }

    /// Makes the row of a workload whose cgroup `cgroup_id` lived and died between two walks,
    /// without marking it seen: it is exited at this tick's end. A different id than the row's
    /// last is a new cgroup, counted from zero as in [`Ledger::see`].
    pub fn born(&mut self, workload: &Arc<Workload>, cgroup_id: u64) {
        if let Some(entry) = self.entry(workload) {
            entry.count_for(cgroup_id, true);
            entry.in_v2 = true;
            // Exited at this tick's end, not when an earlier cgroup of it was.
            entry.exited_at = None;
        }
    }

    /// The cgroup id a workload's row counts for (0 before any).
    pub fn cgroup_of(&self, identity: &PathIdentity) -> Option<u64> {
        self.entries.get(identity).map(|e| e.cgroup_id)
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
        let seen: std::collections::HashSet<PathIdentity, foldhash::fast::RandomState> =
            self.seen.drain(..).collect();
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

    /// Every workload's row, open for recording what follows from the row's own values (what
    /// its use cost), exited ones included.
    pub fn rows(&mut self) -> impl Iterator<Item = Row<'_>> {
        self.entries.values_mut().map(|entry| Row(Some(entry)))
    }

    /// Every series of every workload, in a family per declaration. Within a family, series come
    /// in the order of their workloads' labels (and of their own within one workload), so that
    /// [`Family::sort_samples`] finds them sorted.
    pub fn families(&self) -> HashMap<&'static str, Family> {
        let mut entries: Vec<(&tally_exporters::LabelSet, &Entry)> = self
            .entries
            .values()
            .map(|entry| (entry.workload.labels(), entry))
            .collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        let mut families = HashMap::new();
        for (_, entry) in entries {
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
    /// What the row holds so far.
    pub fn entry(&self) -> Option<&Entry> {
        self.0.as_deref()
    }

    /// Records a cumulative value a source read (a cgroup file's counter); a value lower than
    /// the last is a reset, folded into the counter's base.
    pub fn observe(&mut self, key: &Key, raw: f64) {
        self.counter(key, |m| m.observe(raw));
    }

    /// Raises a cumulative value to `raw` where that is higher than the last reading: the final
    /// figure of a cgroup that is gone, from a count that does not depend on reading its files.
    pub fn raise(&mut self, key: &Key, raw: f64) {
        self.counter(key, |m| m.raise(raw));
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

    /// Removes a gauge whose source went away while the workload runs on.
    pub fn unset(&mut self, key: &Key) {
        debug_assert_eq!(key.metric.kind, Kind::Gauge, "{}", key.metric.name);
        if let Some(entry) = &mut self.0 {
            entry.values.remove(key);
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
mod tests;
