//! The budget engine, run at the end of every tick: charge each budget's window with what its
//! workloads used since the last tick, move each subject (a workload, or every selected
//! workload of a shared budget) between ok, warning and enforcing, and reconcile the throttles
//! in force with the ones the decisions want.
//!
//! Reconciling rather than reacting keeps one path for everything that can change a throttle:
//! a decision, a reload that edits or removes a budget, a shared budget gaining a workload, a
//! workload exiting, a restart that finds throttles in the state file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tally_ebpf_common::{direction, scope as net_scope};
use tally_exporters::{Family, Histogram, Kind, LabelSet};

use super::actuate::{self, CgroupDirs};
use super::freeze::Freezer;
use super::policy::{self, Action, Budget, Prices, Resource, Target};
use super::state::{self, Baseline, Egress, SavedWindow, State, Throttle};
use super::window::Window;
use crate::cgroupfs::layout::Layout;
use crate::config::Config;
use crate::identity::{Names, PathIdentity, Workload};
use crate::ledger::{CounterId, DiskCounter, Entry, GpuCounter, Ledger};

/// Bounds of the detection-to-throttle latency histogram, in seconds.
const LATENCY_BOUNDS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
/// How often windows are saved when no throttle changed (a crash loses at most this much).
const SAVE_EVERY: f64 = 5.0;
/// Bounds of a steered freeze share, and how far one tick may move it.
const MIN_SHARE: f64 = 0.02;
const MAX_STEP: f64 = 2.0;
/// Burst of a network throttle: this many seconds of its rate. A TCP sender whose every
/// segment was dropped waits for its probe timer (200 ms at least) before it sends again, so a
/// bucket holding less than that starves it well below the rate.
const BURST_SECS: f64 = 0.25;
/// Smallest burst: a few full-size packets, or nothing gets through.
const MIN_BURST: f64 = 64.0 * 1024.0;

/// The key of a workload in the state file and the engine's maps.
pub fn subject_key(identity: &PathIdentity) -> String {
    match identity {
        PathIdentity::Container(c) => format!("container:{}", c.container_id),
        PathIdentity::Unit(u) => format!("unit:{u}"),
        PathIdentity::Host => "host".to_owned(),
        PathIdentity::Assigned(n) => {
            format!("assigned:{}/{}/{}", n.namespace, n.pod, n.container)
        }
    }
}

/// A shared budget's one subject.
const SHARED: &str = "shared";

/// Where a workload's cgroup is, from the tick's discovery.
#[derive(Debug, Clone)]
pub struct Placement {
    /// Path below each hierarchy root.
    pub rel: String,
    /// The cgroup2 id, when the workload has a cgroup2 directory.
    pub v2_id: Option<u64>,
}

/// What the engine reads each tick besides the ledger.
#[derive(Debug)]
pub struct Inputs<'a> {
    pub ledger: &'a Ledger,
    pub placements: &'a HashMap<PathIdentity, Placement>,
    pub layout: &'a Layout,
    pub gpu_memory: HashMap<PathIdentity, f64>,
    pub gpu_models: HashMap<Arc<str>, Arc<str>>,
    pub net: Option<&'a mut tally_ebpf::net::Net>,
    /// When the tick that produced these readings started.
    pub tick_started: Instant,
}

#[derive(Debug, Clone)]
struct Compiled {
    budget: Budget,
    target: Target,
    metric: String,
}

/// A budget's view of one workload or, for a shared budget, of all of them.
#[derive(Debug)]
struct Subject {
    window: Window,
    warning: bool,
    enforcing: bool,
    usage: f64,
    ratio: f64,
    labels: LabelSet,
    /// Live workloads it throttles: key, cgroup directories, cgroup2 id.
    members: Vec<(String, CgroupDirs, Option<u64>)>,
    /// Amount used in the last tick, and over how long.
    last_amount: f64,
    /// Running fraction of each freeze cycle, when freezing.
    freeze_share: f64,
    seen: bool,
    /// A throttle of this subject held it back in the last tick (the kernel throttled its CPU,
    /// dropped its packets, or the freeze kept it below its demand): its usage then says
    /// nothing about its demand, and a low usage is no reason to release.
    binding: bool,
}

/// A throttle the decisions want in force on one workload.
#[derive(Debug)]
struct Wanted {
    action: Action,
    /// Cores, bytes per second, or running share.
    setting: f64,
    dirs: CgroupDirs,
    v2_id: Option<u64>,
    /// Network scope index of an egress throttle.
    scope: Option<u32>,
}

/// One state change, as logged, counted and alerted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Warn,
    Enforce,
    Release,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Warn => "warn",
            Event::Enforce => "enforce",
            Event::Release => "release",
        }
    }
}

/// What the engine tells the alert sender; delivery is someone else's problem and never blocks.
pub trait AlertSink: std::fmt::Debug + Send {
    fn fire(
        &self,
        key: String,
        labels: BTreeMap<String, String>,
        annotations: BTreeMap<String, String>,
    );
    fn resolve(&self, key: String);
}

#[derive(Debug)]
pub struct Engine {
    enforce: bool,
    budgets: Vec<Compiled>,
    prices: Prices,
    state_dir: PathBuf,
    sys_root: PathBuf,
    subjects: BTreeMap<(String, String), Subject>,
    /// Last cumulative value per (workload, metric), and whether it came from the state file.
    baselines: HashMap<(String, String), (f64, bool)>,
    tracked: HashSet<String>,
    first_tick: bool,
    throttles: BTreeMap<(String, String), Throttle>,
    freezer: Freezer,
    alerts: Option<Box<dyn AlertSink>>,
    node: String,
    actions: BTreeMap<(String, &'static str, &'static str), u64>,
    errors: BTreeMap<(String, &'static str, String), u64>,
    latency: Histogram,
    last_save: f64,
    last_tick: Option<Instant>,
    state_error: Option<String>,
    /// Per throttle, the last kernel count of times it held the workload back (CFS throttled
    /// periods, dropped packets).
    held_back: HashMap<(String, String), u64>,
    /// Detection-to-throttle latency of the throttles first applied this tick, for the log.
    applied: HashMap<(String, String), Duration>,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn compile(config: &Config) -> Vec<Compiled> {
    config
        .budget
        .iter()
        .filter_map(|b| {
            // Validation refused anything without a target already.
            let target = policy::actuator_target(b).ok()?;
            Some(Compiled {
                metric: metric_key(b),
                budget: b.clone(),
                target,
            })
        })
        .collect()
}

fn metric_key(b: &Budget) -> String {
    match (&b.scope, b.resource) {
        (Some(scope), Resource::NetworkEgressBytes) => format!("network_egress_bytes:{scope}"),
        (_, r) => r.as_str().to_owned(),
    }
}

impl Engine {
    /// Builds the engine and reconciles what a previous run left in the state file: throttles
    /// of budgets that still enforce the same way are kept (their cgroups thawed until the
    /// first tick decides again), the others released.
    pub fn new(config: &Config) -> Engine {
        let mut engine = Engine {
            enforce: config.enforcement.enabled,
            budgets: compile(config),
            prices: config.prices.clone(),
            state_dir: config.enforcement.state_dir.clone(),
            sys_root: config.paths.sys_root.clone(),
            subjects: BTreeMap::new(),
            baselines: HashMap::new(),
            tracked: HashSet::new(),
            first_tick: true,
            throttles: BTreeMap::new(),
            freezer: Freezer::new(Duration::from_millis(config.enforcement.freeze_period_ms)),
            alerts: None,
            node: hostname(),
            actions: BTreeMap::new(),
            errors: BTreeMap::new(),
            latency: Histogram {
                buckets: LATENCY_BOUNDS.iter().map(|b| (*b, 0)).collect(),
                sum: 0.0,
                count: 0,
            },
            last_save: 0.0,
            last_tick: None,
            state_error: None,
            held_back: HashMap::new(),
            applied: HashMap::new(),
        };
        let saved = match State::load(&engine.state_dir) {
            Ok(s) => s,
            Err(e) => {
                // Unreadable state cannot be trusted to undo anything; start empty, loudly.
                tracing::error!(error = %e, "budget state unreadable: starting with fresh windows and no recorded throttles");
                engine.state_error = Some(e.to_string());
                State::default()
            }
        };
        engine.restore(saved);
        engine
    }

    fn restore(&mut self, saved: State) {
        let mut released = 0;
        for t in saved.throttles {
            let keep = self.enforce
                && self.budgets.iter().any(|c| {
                    c.budget.name == t.budget && c.budget.action == t.action && !c.budget.dry_run
                });
            if let Some(freeze) = &t.freeze {
                // Thawed until the first tick re-applies the cycle.
                let _ = state::write_existing(freeze, state::thawed_value(freeze));
            }
            if keep {
                self.throttles
                    .insert((t.budget.clone(), t.subject.clone()), t);
            } else {
                for e in state::release_files(&t) {
                    tracing::error!(budget = %t.budget, error = %e, "releasing a throttle left by a previous run");
                }
                released += 1;
            }
        }
        if released > 0 || !self.throttles.is_empty() {
            tracing::info!(
                released,
                kept = self.throttles.len(),
                "reconciled throttles left by a previous run"
            );
        }
        for w in saved.windows {
            let Some(c) = self.budgets.iter().find(|c| c.budget.name == w.budget) else {
                continue;
            };
            if !w.window.fits(&c.budget) {
                continue;
            }
            let mut subject = Subject::new(w.window, empty_labels());
            subject.enforcing = w.enforcing;
            subject.warning = w.warning;
            self.subjects.insert((w.budget, w.subject), subject);
        }
        for b in saved.baselines {
            self.tracked.insert(b.metric.clone());
            self.baselines
                .insert((b.workload, b.metric), (b.value, true));
        }
    }

    pub fn set_alerts(&mut self, sink: Box<dyn AlertSink>) {
        self.alerts = Some(sink);
    }

    /// Applies a reloaded policy: windows of budgets that still exist are kept; throttles follow
    /// at the next tick (an edited limit releases or tightens there).
    pub fn reconfigure(&mut self, config: &Config) {
        self.enforce = config.enforcement.enabled;
        self.budgets = compile(config);
        self.prices = config.prices.clone();
        self.sys_root = config.paths.sys_root.clone();
        self.freezer
            .set_period(Duration::from_millis(config.enforcement.freeze_period_ms));
        let budgets = &self.budgets;
        self.subjects.retain(|(name, _), s| {
            budgets
                .iter()
                .find(|c| &c.budget.name == name)
                .is_some_and(|c| s.window.fits(&c.budget))
        });
        if self.state_dir != config.enforcement.state_dir {
            tracing::warn!(
                old = %self.state_dir.display(),
                new = %config.enforcement.state_dir.display(),
                "`enforcement.state_dir` changed: takes effect at the next restart"
            );
        }
    }

    /// One evaluation, after the tick has updated the ledger.
    pub fn tick(&mut self, mut inputs: Inputs<'_>) {
        let now = unix_now();
        let elapsed = self
            .last_tick
            .map_or(0.0, |t| inputs.tick_started.duration_since(t).as_secs_f64());
        self.last_tick = Some(inputs.tick_started);
        if self.budgets.is_empty() && self.throttles.is_empty() && self.subjects.is_empty() {
            return;
        }
        self.charge(&inputs, now);
        self.find_binding(inputs.net.as_deref());
        let events = self.decide(now);
        self.steer_freeze(elapsed);
        self.reconcile(&mut inputs, now);
        for (key, event) in events {
            self.announce(&key, event);
        }
        self.applied.clear();
        if now - self.last_save >= SAVE_EVERY {
            self.save(now);
        }
        for (file, e) in self.freezer.take_failures() {
            tracing::warn!(file = %file.display(), error = %e, "freeze cycle write failed");
            let budget = self
                .throttles
                .values()
                .find(|t| t.freeze.as_deref() == Some(file.as_path()))
                .map_or_else(String::new, |t| t.budget.clone());
            *self
                .errors
                .entry((budget, "freeze", "write".to_owned()))
                .or_default() += 1;
        }
        self.first_tick = false;
    }

    /// Adds each workload's usage since the last tick to the windows of the budgets selecting it.
    fn charge(&mut self, inputs: &Inputs<'_>, now: f64) {
        let new_metrics: HashSet<String> = self
            .budgets
            .iter()
            .map(|c| c.metric.clone())
            .filter(|m| !self.tracked.contains(m))
            .collect();
        for s in self.subjects.values_mut() {
            s.seen = false;
            s.members.clear();
            s.last_amount = 0.0;
        }
        let mut levels: HashMap<(String, String), f64> = HashMap::new();
        let mut present: HashSet<String> = HashSet::new();
        for entry in inputs.ledger.entries() {
            let workload = &entry.workload;
            if workload.identity == PathIdentity::Host {
                continue;
            }
            let wkey = subject_key(&workload.identity);
            present.insert(wkey.clone());
            let placement = inputs.placements.get(&workload.identity);
            let mut deltas: HashMap<&str, f64> = HashMap::new();
            for c in &self.budgets {
                if !matches(&c.budget.select, workload, placement) {
                    continue;
                }
                let subject_name = if c.budget.shared {
                    SHARED.to_owned()
                } else {
                    wkey.clone()
                };
                let key = (c.budget.name.clone(), subject_name);
                let amount = if c.budget.resource.is_gauge() {
                    let level = inputs
                        .gpu_memory
                        .get(&workload.identity)
                        .copied()
                        .unwrap_or(0.0);
                    *levels.entry(key.clone()).or_default() += level;
                    0.0
                } else if let Some(d) = deltas.get(c.metric.as_str()) {
                    *d
                } else {
                    let cumulative = cumulative(entry, &c.metric, &self.prices, &inputs.gpu_models);
                    let d = match cumulative {
                        Some(v) => delta(
                            &mut self.baselines,
                            (&wkey, &c.metric),
                            v,
                            self.first_tick || new_metrics.contains(&c.metric),
                        ),
                        None => 0.0,
                    };
                    deltas.insert(c.metric.as_str(), d);
                    d
                };
                let labels = if c.budget.shared {
                    empty_labels()
                } else {
                    workload.labels().clone()
                };
                let subject = self
                    .subjects
                    .entry(key)
                    .or_insert_with(|| Subject::new(Window::for_budget(&c.budget), labels.clone()));
                subject.labels = labels;
                subject.seen = true;
                subject.window.add(now, amount);
                subject.last_amount += amount;
                if entry.is_live() {
                    if let Some(p) = placement {
                        subject.members.push((
                            wkey.clone(),
                            CgroupDirs::new(inputs.layout, &p.rel),
                            p.v2_id,
                        ));
                    }
                }
            }
        }
        for (key, level) in levels {
            if let Some(s) = self.subjects.get_mut(&key) {
                s.window.set_level(level);
            }
        }
        for c in &self.budgets {
            self.tracked.insert(c.metric.clone());
        }
        // Workloads the ledger forgot (their grace period ended) lose their baselines.
        self.baselines.retain(|(w, _), _| present.contains(w));
    }

    /// Moves each subject between states; returns the state changes.
    fn decide(&mut self, now: f64) -> Vec<((String, String), Event)> {
        let mut events = Vec::new();
        let budgets: HashMap<&str, &Compiled> = self
            .budgets
            .iter()
            .map(|c| (c.budget.name.as_str(), c))
            .collect();
        self.subjects.retain(|key, s| {
            let Some(c) = budgets.get(key.0.as_str()) else {
                return false;
            };
            if !s.seen {
                // Gone from the ledger: nothing left to meter or throttle.
                if s.enforcing || s.warning {
                    events.push((key.clone(), Event::Release));
                }
                return false;
            }
            let b = &c.budget;
            s.usage = s.window.usage(now);
            s.ratio = s.usage / b.limit;
            if s.enforcing {
                if s.ratio < b.release_below && !s.binding {
                    s.enforcing = false;
                    s.warning = s.ratio >= b.warn_at;
                    events.push((key.clone(), Event::Release));
                }
            } else if s.ratio >= 1.0 {
                s.enforcing = true;
                s.warning = true;
                s.freeze_share = 1.0;
                events.push((key.clone(), Event::Enforce));
            } else if s.warning {
                if s.ratio < b.warn_at * b.release_below {
                    s.warning = false;
                    events.push((key.clone(), Event::Release));
                }
            } else if s.ratio >= b.warn_at {
                s.warning = true;
                events.push((key.clone(), Event::Warn));
            }
            true
        });
        events
    }

    /// Marks the subjects whose throttles held them back since the last tick.
    fn find_binding(&mut self, net: Option<&tally_ebpf::net::Net>) {
        let drops: HashMap<u64, u64> = net
            .and_then(|n| n.egress_drops().ok())
            .map(|d| {
                d.into_iter()
                    .map(|(id, packets, _)| (id, packets))
                    .collect()
            })
            .unwrap_or_default();
        let shared: HashSet<&str> = self
            .budgets
            .iter()
            .filter(|c| c.budget.shared)
            .map(|c| c.budget.name.as_str())
            .collect();
        for s in self.subjects.values_mut() {
            s.binding = false;
        }
        for (key, t) in &self.throttles {
            let count = match t.action {
                Action::Cpu => t
                    .writes
                    .first()
                    .and_then(|w| w.path.parent())
                    .and_then(|dir| std::fs::read_to_string(dir.join("cpu.stat")).ok())
                    .and_then(|stat| {
                        stat.lines()
                            .find_map(|l| l.strip_prefix("nr_throttled "))
                            .and_then(|v| v.trim().parse::<u64>().ok())
                    }),
                Action::Network => t.egress.and_then(|e| drops.get(&e.cgroup_id).copied()),
                _ => None,
            };
            let binding = match (t.action, count) {
                // A steered freeze below a full share is holding the rate down.
                (Action::Freeze, _) => {
                    self.budgets.iter().any(|c| {
                        c.budget.name == t.budget && matches!(c.target, Target::FreezeRate(_))
                    }) && t.setting < 0.999
                }
                (_, Some(n)) => {
                    let before = self.held_back.insert(key.clone(), n);
                    before.is_none_or(|b| n > b)
                }
                (_, None) => false,
            };
            if binding {
                let subject = if shared.contains(t.budget.as_str()) {
                    SHARED.to_owned()
                } else {
                    t.subject.clone()
                };
                if let Some(s) = self.subjects.get_mut(&(t.budget.clone(), subject)) {
                    s.binding = true;
                }
            }
        }
        let throttles = &self.throttles;
        self.held_back.retain(|k, _| throttles.contains_key(k));
    }

    /// Steers the running share of rate-held freezes: the share that would have made the last
    /// tick's rate the budget's, moved at most a factor of two per tick.
    fn steer_freeze(&mut self, elapsed: f64) {
        if elapsed <= 0.0 {
            return;
        }
        for c in &self.budgets {
            let Target::FreezeRate(target) = c.target else {
                continue;
            };
            for ((name, _), s) in self.subjects.iter_mut() {
                if name != &c.budget.name || !s.enforcing {
                    continue;
                }
                let rate = s.last_amount / elapsed;
                let share = s.freeze_share.max(MIN_SHARE);
                let wanted = if rate > 0.0 {
                    share * target / rate
                } else {
                    share * MAX_STEP
                };
                s.freeze_share = wanted
                    .clamp(share / MAX_STEP, share * MAX_STEP)
                    .clamp(MIN_SHARE, 1.0);
            }
        }
    }

    /// What should be in force: (budget, workload) → (action, setting, member).
    fn desired(&self) -> BTreeMap<(String, String), Wanted> {
        let mut want = BTreeMap::new();
        if !self.enforce {
            return want;
        }
        for c in &self.budgets {
            let b = &c.budget;
            if b.dry_run || !b.action.actuates() {
                continue;
            }
            for ((name, _), s) in &self.subjects {
                if name != &b.name || !s.enforcing || s.members.is_empty() {
                    continue;
                }
                let n = s.members.len() as f64;
                let setting = match c.target {
                    Target::CpuCores(v)
                    | Target::EgressBytesPerSec(v)
                    | Target::DiskBytesPerSec(v) => v / n,
                    Target::FreezeShare(v) => v,
                    Target::FreezeRate(_) => s.freeze_share,
                    Target::Terminate | Target::None => 0.0,
                };
                let scope = b
                    .scope
                    .as_deref()
                    .and_then(|s| policy::SCOPES.iter().position(|x| *x == s))
                    .map(|i| i as u32);
                for (wkey, dirs, id) in &s.members {
                    want.insert(
                        (b.name.clone(), wkey.clone()),
                        Wanted {
                            action: b.action,
                            setting,
                            dirs: dirs.clone(),
                            v2_id: *id,
                            scope,
                        },
                    );
                }
            }
        }
        want
    }

    /// Makes the throttles in force the desired ones. New and changed throttles are recorded in
    /// the state file before they are applied.
    fn reconcile(&mut self, inputs: &mut Inputs<'_>, now: f64) {
        let want = self.desired();
        // Release what is no longer wanted.
        let stale: Vec<(String, String)> = self
            .throttles
            .keys()
            .filter(|k| !want.contains_key(*k))
            .cloned()
            .collect();
        let mut changed = !stale.is_empty();
        for key in stale {
            if let Some(t) = self.throttles.remove(&key) {
                self.release(&t, inputs.net.as_deref_mut());
            }
        }
        // Plan what is new or changed.
        let mut to_apply = Vec::new();
        for (key, w) in want {
            let Wanted {
                action,
                setting,
                dirs,
                v2_id,
                scope,
            } = w;
            let current = self.throttles.get(&key);
            if let Some(t) = current {
                if (t.setting - setting).abs() <= setting.abs() * 1e-3 {
                    if action == Action::Freeze {
                        // Cheap, and re-arms the cycle after a restart adopted the record.
                        if let Some(file) = &t.freeze {
                            if self.freezer.share(file) != Some(setting) {
                                to_apply.push((key, action, setting, v2_id, scope, false));
                            }
                        }
                    }
                    continue;
                }
            }
            let plan = match action {
                Action::Cpu => actuate::plan_cpu(&dirs, setting).map(|w| (w, None)),
                Action::Disk => {
                    actuate::plan_disk(&dirs, &self.sys_root, setting).map(|w| (w, None))
                }
                Action::Freeze => dirs.freeze_file().map(|f| (Vec::new(), Some(f))),
                Action::Network => match v2_id {
                    Some(_) if inputs.net.is_some() => Ok((Vec::new(), None)),
                    Some(_) => Err("the network programs are not loaded".to_owned()),
                    None => Err(
                        "the workload has no cgroup2 directory for the egress program".to_owned(),
                    ),
                },
                Action::Terminate => Ok((Vec::new(), None)),
                Action::Alert => continue,
            };
            let (mut writes, freeze) = match plan {
                Ok(p) => p,
                Err(e) => {
                    self.fail(&key.0, action, "unavailable", &e);
                    continue;
                }
            };
            // A changed setting keeps what the file held before Tally first touched it.
            if let Some(old) = current {
                for w in &mut writes {
                    if let Some(o) = old.writes.iter().find(|o| {
                        o.path == w.path && first_field(&o.original) == first_field(&w.original)
                    }) {
                        w.original = o.original.clone();
                    }
                }
            }
            let first = current.is_none();
            self.throttles.insert(
                key.clone(),
                Throttle {
                    budget: key.0.clone(),
                    subject: key.1.clone(),
                    action,
                    setting,
                    writes,
                    freeze,
                    egress: v2_id
                        .filter(|_| action == Action::Network)
                        .map(|cgroup_id| Egress { cgroup_id, scope }),
                    applied_at: now,
                },
            );
            changed = true;
            to_apply.push((key, action, setting, v2_id, scope, first));
        }
        if changed {
            // Recorded before applied: a crash between the two leaves a record of a throttle
            // that may not be there, which releasing handles; never the reverse.
            self.save(now);
        }
        for (key, action, setting, _, _, first) in to_apply {
            let Some(t) = self.throttles.get(&key) else {
                continue;
            };
            let result = match action {
                Action::Cpu | Action::Disk => actuate::apply(&t.writes),
                Action::Freeze => match &t.freeze {
                    Some(file) => self.freezer.set(file, setting),
                    None => Err("no freeze file".to_owned()),
                },
                Action::Network => match (t.egress, inputs.net.as_deref_mut()) {
                    (Some(e), Some(net)) => {
                        let rate = setting.max(1.0);
                        net.set_egress_limit(
                            e.cgroup_id,
                            e.scope,
                            rate as u64,
                            (rate * BURST_SECS).max(MIN_BURST) as u64,
                        )
                        .map_err(|e| tally_ebpf::chain(&e))
                    }
                    _ => Err("the network programs are not loaded".to_owned()),
                },
                Action::Terminate if first => {
                    let member = self
                        .subjects
                        .values()
                        .flat_map(|s| s.members.iter())
                        .find(|(w, _, _)| *w == key.1);
                    match member {
                        Some((_, dirs, _)) => actuate::terminate(dirs).map(|n| {
                            tracing::warn!(budget = %key.0, workload = %key.1, processes = n, "sent SIGTERM");
                        }),
                        None => Ok(()),
                    }
                }
                Action::Terminate | Action::Alert => Ok(()),
            };
            match result {
                Ok(()) => {
                    if first {
                        let latency = inputs.tick_started.elapsed();
                        self.observe_latency(latency);
                        self.applied.insert(key.clone(), latency);
                    }
                }
                Err(e) => self.fail(&key.0, action, "apply", &e),
            }
        }
    }

    fn release(&mut self, t: &Throttle, net: Option<&mut tally_ebpf::net::Net>) {
        if let Some(file) = &t.freeze {
            if let Err(e) = self.freezer.remove(file) {
                self.fail(&t.budget, t.action, "release", &e);
            }
        }
        if let (Some(e), Some(net)) = (t.egress, net) {
            if let Err(err) = net.clear_egress_limit(e.cgroup_id, e.scope) {
                self.fail(&t.budget, t.action, "release", &tally_ebpf::chain(&err));
            }
        }
        for e in state::release_files(t) {
            self.fail(&t.budget, t.action, "release", &e);
        }
    }

    fn fail(&mut self, budget: &str, action: Action, reason: &'static str, error: &str) {
        let key = (budget.to_owned(), action.as_str(), reason.to_owned());
        let n = self.errors.entry(key).or_default();
        // Logged the first time and then every 60th, counted always.
        if *n % 60 == 0 {
            tracing::error!(
                budget,
                action = action.as_str(),
                reason,
                error,
                "enforcement failed"
            );
        }
        *n += 1;
    }

    fn observe_latency(&mut self, latency: Duration) {
        let s = latency.as_secs_f64();
        for (bound, count) in &mut self.latency.buckets {
            if s <= *bound {
                *count += 1;
            }
        }
        self.latency.sum += s;
        self.latency.count += 1;
    }

    /// Logs, counts and alerts a state change.
    fn announce(&mut self, key: &(String, String), event: Event) {
        let Some(c) = self.budgets.iter().find(|c| c.budget.name == key.0) else {
            return;
        };
        let b = &c.budget;
        let (usage, ratio, labels) = self
            .subjects
            .get(key)
            .map_or((0.0, 0.0, empty_labels()), |s| {
                (s.usage, s.ratio, s.labels.clone())
            });
        *self
            .actions
            .entry((b.name.clone(), b.action.as_str(), event.as_str()))
            .or_default() += 1;
        let label = |name: &str| {
            labels
                .iter()
                .find(|(k, _)| *k == name)
                .map_or("", |(_, v)| v.as_ref())
                .to_owned()
        };
        let enforced = self.enforce && !b.dry_run && b.action.actuates();
        // For a shared budget, the slowest of its workloads' throttles.
        let latency_ms = self
            .applied
            .iter()
            .filter(|((budget, w), _)| budget == &key.0 && (b.shared || w == &key.1))
            .map(|(_, d)| d.as_secs_f64() * 1e3)
            .fold(None, |m: Option<f64>, d| Some(m.map_or(d, |m| m.max(d))));
        let message = match event {
            Event::Warn => "budget warning",
            Event::Enforce if enforced => "budget exceeded: enforcing",
            Event::Enforce => "budget exceeded (not enforced: dry run or alert only)",
            Event::Release => "budget released",
        };
        tracing::warn!(
            budget = %b.name,
            event = event.as_str(),
            action = b.action.as_str(),
            dry_run = !enforced,
            resource = b.resource.as_str(),
            usage,
            limit = b.limit,
            ratio,
            workload = %key.1,
            namespace = %label("namespace"),
            pod = %label("pod"),
            container = %label("container"),
            unit = %label("unit"),
            latency_ms,
            "{message}"
        );
        journal(&[
            format!(
                "MESSAGE=tally: {message}: budget {} workload {}",
                b.name, key.1
            ),
            format!("PRIORITY={}", if event == Event::Release { 5 } else { 4 }),
            format!("TALLY_EVENT={}", event.as_str()),
            format!("TALLY_BUDGET={}", b.name),
            format!("TALLY_ACTION={}", b.action.as_str()),
            format!("TALLY_DRY_RUN={}", !enforced),
            format!("TALLY_RESOURCE={}", b.resource.as_str()),
            format!("TALLY_USAGE={usage}"),
            format!("TALLY_LIMIT={}", b.limit),
            format!("TALLY_USAGE_RATIO={ratio}"),
            format!("TALLY_WORKLOAD={}", key.1),
            format!("TALLY_NAMESPACE={}", label("namespace")),
            format!("TALLY_POD={}", label("pod")),
            format!("TALLY_CONTAINER={}", label("container")),
            format!("TALLY_UNIT={}", label("unit")),
        ]);
        let Some(alerts) = &self.alerts else {
            return;
        };
        let alert_key = |kind: &str| format!("{kind}/{}/{}", b.name, key.1);
        let mut alert_labels = BTreeMap::from([
            ("budget".to_owned(), b.name.clone()),
            ("action".to_owned(), b.action.as_str().to_owned()),
            ("resource".to_owned(), b.resource.as_str().to_owned()),
            ("node".to_owned(), self.node.clone()),
        ]);
        for name in ["namespace", "pod", "container", "unit"] {
            let v = label(name);
            if !v.is_empty() {
                alert_labels.insert(name.to_owned(), v);
            }
        }
        if b.shared {
            alert_labels.insert("workload".to_owned(), SHARED.to_owned());
        }
        let annotations = BTreeMap::from([
            (
                "summary".to_owned(),
                format!("{message}: budget {} on {}", b.name, key.1),
            ),
            ("usage".to_owned(), format!("{usage}")),
            ("limit".to_owned(), format!("{}", b.limit)),
            ("usage_ratio".to_owned(), format!("{ratio:.3}")),
            ("dry_run".to_owned(), (!enforced).to_string()),
        ]);
        let with = |name: &str, severity: &str| {
            let mut l = alert_labels.clone();
            l.insert("alertname".to_owned(), name.to_owned());
            l.insert("severity".to_owned(), severity.to_owned());
            l
        };
        match event {
            Event::Warn => alerts.fire(
                alert_key("warning"),
                with("TallyBudgetWarning", "warning"),
                annotations,
            ),
            Event::Enforce => {
                alerts.fire(
                    alert_key("warning"),
                    with("TallyBudgetWarning", "warning"),
                    annotations.clone(),
                );
                alerts.fire(
                    alert_key("exceeded"),
                    with("TallyBudgetExceeded", "critical"),
                    annotations,
                );
            }
            Event::Release => {
                alerts.resolve(alert_key("exceeded"));
                let still_warning = self.subjects.get(key).is_some_and(|s| s.warning);
                if !still_warning {
                    alerts.resolve(alert_key("warning"));
                }
            }
        }
    }

    /// Writes windows, baselines and throttles to the state file.
    fn save(&mut self, now: f64) {
        let mut state = State {
            throttles: self.throttles.values().cloned().collect(),
            windows: self
                .subjects
                .iter()
                .map(|((budget, subject), s)| SavedWindow {
                    budget: budget.clone(),
                    subject: subject.clone(),
                    window: s.window.clone(),
                    enforcing: s.enforcing,
                    warning: s.warning,
                })
                .collect(),
            baselines: self
                .baselines
                .iter()
                .map(|((w, m), (v, _))| Baseline {
                    workload: w.clone(),
                    metric: m.clone(),
                    value: *v,
                })
                .collect(),
            ..State::default()
        };
        self.last_save = now;
        match state.save(&self.state_dir, now) {
            Ok(()) => self.state_error = None,
            Err(e) => {
                if self.state_error.is_none() {
                    tracing::error!(error = %e, "saving the budget state failed");
                }
                self.state_error = Some(e.to_string());
                *self
                    .errors
                    .entry((String::new(), "state", "save".to_owned()))
                    .or_default() += 1;
            }
        }
    }

    /// Releases every throttle and saves the windows: the graceful end of enforcement.
    pub fn shutdown(&mut self, mut net: Option<&mut tally_ebpf::net::Net>) {
        let throttles: Vec<Throttle> = std::mem::take(&mut self.throttles).into_values().collect();
        for t in &throttles {
            self.release(t, net.as_deref_mut());
        }
        self.freezer.stop();
        if !throttles.is_empty() {
            tracing::info!(released = throttles.len(), "released every throttle");
        }
        if !self.budgets.is_empty() || !throttles.is_empty() {
            self.save(unix_now());
        }
    }

    /// The engine's metric families; none on a node without budgets (nor throttles left).
    pub fn families(&self) -> Vec<Family> {
        if self.budgets.is_empty() && self.throttles.is_empty() {
            return Vec::new();
        }
        let mut ratio = Family::new(
            "tally_budget_usage_ratio",
            "Usage of a budget in its window divided by its limit, per workload (all labels empty for a shared budget).",
            Kind::Gauge,
        );
        let mut usage = Family::new(
            "tally_budget_usage",
            "Usage of a budget in its window, in the resource's base unit.",
            Kind::Gauge,
        );
        let mut limit = Family::new(
            "tally_budget_limit",
            "A budget's limit, in the resource's base unit.",
            Kind::Gauge,
        );
        let mut active = Family::new(
            "tally_enforcement_active",
            "Whether a budget is being enforced on the workload (1) or not (0); dry_run says whether anything was actually throttled.",
            Kind::Gauge,
        );
        let mut share = Family::new(
            "tally_enforcement_freeze_share_ratio",
            "Fraction of each freeze cycle a duty-cycled workload runs.",
            Kind::Gauge,
        );
        for c in &self.budgets {
            let b = &c.budget;
            let extra = || {
                vec![
                    ("budget", Arc::from(b.name.as_str())),
                    ("resource", Arc::from(b.resource.as_str())),
                ]
            };
            limit.push_labeled(extra(), b.limit);
            let enforced = self.enforce && !b.dry_run && b.action.actuates();
            for ((name, _), s) in &self.subjects {
                if name != &b.name {
                    continue;
                }
                ratio.samples.push(sample(&s.labels, extra(), s.ratio));
                usage.samples.push(sample(&s.labels, extra(), s.usage));
                // An enforced budget is active where its throttle is in place, not merely
                // decided: a throttle that failed to apply is an error, not a throttle.
                let in_place = !enforced
                    || s.members
                        .iter()
                        .any(|(w, _, _)| self.throttles.contains_key(&(b.name.clone(), w.clone())));
                active.samples.push(sample(
                    &s.labels,
                    vec![
                        ("budget", Arc::from(b.name.as_str())),
                        ("action", Arc::from(b.action.as_str())),
                        (
                            "dry_run",
                            Arc::from(if enforced { "false" } else { "true" }),
                        ),
                    ],
                    if s.enforcing && in_place { 1.0 } else { 0.0 },
                ));
                if s.enforcing
                    && enforced
                    && matches!(c.target, Target::FreezeRate(_) | Target::FreezeShare(_))
                {
                    let v = match c.target {
                        Target::FreezeShare(v) => v,
                        _ => s.freeze_share,
                    };
                    share.samples.push(sample(
                        &s.labels,
                        vec![("budget", Arc::from(b.name.as_str()))],
                        v,
                    ));
                }
            }
        }
        let mut actions = Family::new(
            "tally_enforcement_actions_total",
            "Budget state changes, by budget, action and event (warn, enforce, release).",
            Kind::Counter,
        );
        // Every budget's events from zero, so the first one is an increase.
        let mut counts: BTreeMap<(String, &'static str, &'static str), u64> = self
            .budgets
            .iter()
            .flat_map(|c| {
                [Event::Warn, Event::Enforce, Event::Release].map(|e| {
                    (
                        (c.budget.name.clone(), c.budget.action.as_str(), e.as_str()),
                        0,
                    )
                })
            })
            .collect();
        counts.extend(self.actions.iter().map(|(k, v)| (k.clone(), *v)));
        for ((budget, action, event), n) in &counts {
            actions.push_labeled(
                vec![
                    ("budget", Arc::from(budget.as_str())),
                    ("action", Arc::from(*action)),
                    ("event", Arc::from(*event)),
                ],
                *n as f64,
            );
        }
        let mut errors = Family::new(
            "tally_enforcement_errors_total",
            "Throttles that could not be applied or released, by budget, action and reason.",
            Kind::Counter,
        );
        let mut errors_by: BTreeMap<(String, &'static str, String), u64> = self
            .budgets
            .iter()
            .filter(|c| c.budget.action.actuates())
            .flat_map(|c| {
                ["unavailable", "apply", "release"].map(|r| {
                    (
                        (
                            c.budget.name.clone(),
                            c.budget.action.as_str(),
                            r.to_owned(),
                        ),
                        0,
                    )
                })
            })
            .collect();
        errors_by.insert((String::new(), "state", "save".to_owned()), 0);
        errors_by.extend(self.errors.iter().map(|(k, v)| (k.clone(), *v)));
        for ((budget, action, reason), n) in &errors_by {
            errors.push_labeled(
                vec![
                    ("budget", Arc::from(budget.as_str())),
                    ("action", Arc::from(*action)),
                    ("reason", Arc::from(reason.as_str())),
                ],
                *n as f64,
            );
        }
        let mut latency = Family::new(
            "tally_enforcement_latency_seconds",
            "Time from the start of the tick that detected an exceeded budget to its throttle being in place.",
            Kind::Histogram,
        );
        latency.push_histogram(&Arc::from([]), Vec::new(), self.latency.clone());
        let mut throttles = Family::new(
            "tally_enforcement_throttles",
            "Throttles in force, by action.",
            Kind::Gauge,
        );
        let mut by_action: BTreeMap<&'static str, u64> = [
            Action::Cpu,
            Action::Network,
            Action::Disk,
            Action::Freeze,
            Action::Terminate,
        ]
        .iter()
        .map(|a| (a.as_str(), 0))
        .collect();
        for t in self.throttles.values() {
            *by_action.entry(t.action.as_str()).or_default() += 1;
        }
        for (action, n) in by_action {
            throttles.push_labeled(vec![("action", Arc::from(action))], n as f64);
        }
        vec![
            ratio, usage, limit, active, share, actions, errors, latency, throttles,
        ]
    }
}

/// Usage since the last reading of a workload's cumulative `value`, updating the baseline.
/// `fresh`: the engine just started or began tracking this metric.
fn delta(
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

fn first_field(s: &str) -> Option<&str> {
    s.split_whitespace().next()
}

fn sample(
    labels: &LabelSet,
    extra: Vec<(&'static str, Arc<str>)>,
    value: f64,
) -> tally_exporters::Sample {
    tally_exporters::Sample {
        labels: labels.clone(),
        extra,
        value,
        histogram: None,
    }
}

impl Subject {
    fn new(window: Window, labels: LabelSet) -> Subject {
        Subject {
            window,
            warning: false,
            enforcing: false,
            usage: 0.0,
            ratio: 0.0,
            labels,
            members: Vec::new(),
            last_amount: 0.0,
            freeze_share: 1.0,
            seen: false,
            binding: false,
        }
    }
}

/// The per-workload label names with empty values (the label set of a shared budget's row).
fn empty_labels() -> LabelSet {
    Workload::new(PathIdentity::Host, Names::default())
        .labels()
        .clone()
}

/// Whether a budget's selector selects the workload.
fn matches(select: &policy::Selector, workload: &Workload, placement: Option<&Placement>) -> bool {
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
fn cumulative(
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

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer we own.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    if !ok {
        return String::new();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Sends a structured entry to the journal when the agent runs under systemd (its stderr is a
/// journal stream); elsewhere the tracing line is the record.
fn journal(fields: &[String]) {
    if std::env::var_os("JOURNAL_STREAM").is_none() {
        return;
    }
    let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
    systemd::journal::send(&fields);
}

#[allow(dead_code)]
const _SCOPE_COUNT_MATCHES: () = assert!(policy::SCOPES.len() == net_scope::COUNT);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroupfs::Reading;

    fn unit(name: &str, labels: &[(&str, &str)]) -> Arc<Workload> {
        let names = Names {
            labels: Arc::new(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Names::default()
        };
        Arc::new(Workload::new(PathIdentity::Unit(name.into()), names))
    }

    fn engine(policy: &str, state: &std::path::Path) -> Engine {
        let mut config = Config::parse(policy).unwrap();
        config.enforcement.state_dir = state.to_path_buf();
        Engine::new(&config)
    }

    /// Feeds the ledger `cpu` seconds per workload and runs one engine tick.
    fn tick(
        engine: &mut Engine,
        ledger: &mut Ledger,
        layout: &Layout,
        cpu: &[(&Arc<Workload>, f64)],
    ) {
        let mut placements = HashMap::new();
        for (i, (w, v)) in cpu.iter().enumerate() {
            let reading = Reading {
                cpu_seconds: Some(*v),
                ..Reading::default()
            };
            ledger.observe((*w).clone(), i as u64 + 1, true, &reading);
            placements.insert(
                w.identity.clone(),
                Placement {
                    rel: format!("/system.slice/{}", subject_key(&w.identity)),
                    v2_id: None,
                },
            );
        }
        ledger.end_tick(Instant::now());
        engine.tick(Inputs {
            ledger,
            placements: &placements,
            layout,
            gpu_memory: HashMap::new(),
            gpu_models: HashMap::new(),
            net: None,
            tick_started: Instant::now(),
        });
    }

    fn layout(dir: &std::path::Path) -> Layout {
        std::fs::write(dir.join("cgroup.controllers"), "").unwrap();
        Layout::detect(dir).unwrap()
    }

    #[test]
    fn a_shared_budget_sums_its_workloads_and_selects_by_label_and_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let layout = layout(dir.path());
        let mut engine = engine(
            "[[budget]]\nname = 'team'\nresource = 'cpu_seconds'\nlimit = 10.0\nperiod = 'day'\nshared = true\nselect.labels = { team = 'ml' }\n\
             [[budget]]\nname = 'one'\nresource = 'cpu_seconds'\nlimit = 10.0\nperiod = 'day'\nselect.cgroup = '/system.slice/unit:b*'\n",
            &dir.path().join("state"),
        );
        let mut ledger = Ledger::new(Duration::from_secs(60));
        let a = unit("a.service", &[("team", "ml")]);
        let b = unit("b.service", &[("team", "ml")]);
        let c = unit("c.service", &[("team", "web")]);
        // The first tick is a baseline: what ran before the agent is not this window's.
        tick(
            &mut engine,
            &mut ledger,
            &layout,
            &[(&a, 100.0), (&b, 50.0), (&c, 7.0)],
        );
        tick(
            &mut engine,
            &mut ledger,
            &layout,
            &[(&a, 103.0), (&b, 54.0), (&c, 9.0)],
        );
        let usage = |budget: &str, subject: &str| {
            engine
                .subjects
                .get(&(budget.to_owned(), subject.to_owned()))
                .map(|s| s.usage)
        };
        assert_eq!(usage("team", SHARED), Some(7.0));
        assert_eq!(usage("one", "unit:b.service"), Some(4.0));
        assert_eq!(usage("one", "unit:a.service"), None);
        // Past the limit together (a 6 s more, b 1 s more): one enforcement of the shared row.
        tick(
            &mut engine,
            &mut ledger,
            &layout,
            &[(&a, 109.0), (&b, 55.0), (&c, 9.0)],
        );
        let shared = &engine.subjects[&("team".to_owned(), SHARED.to_owned())];
        assert!(shared.enforcing, "{shared:?}");
        assert_eq!(shared.members.len(), 2);
        assert_eq!(
            engine.actions.get(&("team".to_owned(), "alert", "enforce")),
            Some(&1)
        );
    }

    #[test]
    fn hysteresis_releases_only_below_the_release_fraction() {
        let dir = tempfile::tempdir().unwrap();
        let layout = layout(dir.path());
        let mut engine = engine(
            "[[budget]]\nname = 'b'\nresource = 'cpu_seconds'\nlimit = 10.0\nwindow = '1h'\n",
            &dir.path().join("state"),
        );
        let mut ledger = Ledger::new(Duration::from_secs(60));
        let a = unit("a.service", &[]);
        tick(&mut engine, &mut ledger, &layout, &[(&a, 0.0)]);
        tick(&mut engine, &mut ledger, &layout, &[(&a, 8.5)]);
        let key = ("b".to_owned(), "unit:a.service".to_owned());
        assert!(engine.subjects[&key].warning && !engine.subjects[&key].enforcing);
        tick(&mut engine, &mut ledger, &layout, &[(&a, 10.5)]);
        assert!(engine.subjects[&key].enforcing);
        // A smaller limit on reload keeps the window; a larger one releases.
        let mut config = Config::parse(
            "[[budget]]\nname = 'b'\nresource = 'cpu_seconds'\nlimit = 11.0\nwindow = '1h'\n",
        )
        .unwrap();
        config.enforcement.state_dir = dir.path().join("state");
        engine.reconfigure(&config);
        tick(&mut engine, &mut ledger, &layout, &[(&a, 10.5)]);
        assert!(
            engine.subjects[&key].enforcing,
            "0.95 is above release_below"
        );
        config.budget[0].limit = 20.0;
        engine.reconfigure(&config);
        tick(&mut engine, &mut ledger, &layout, &[(&a, 10.5)]);
        assert!(!engine.subjects[&key].enforcing);
        assert!(
            !engine.subjects[&key].warning,
            "released at 0.525, below warn_at: no warning left either"
        );
    }
}
