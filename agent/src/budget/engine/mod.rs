//! The budget engine, run at the end of every tick: charge each budget's window with what its
//! workloads used since the last tick, move each subject (a workload, or every selected
//! workload of a shared budget) between ok, warning and enforcing, and reconcile the throttles
//! in force with the ones the decisions want.
//!
//! Reconciling rather than reacting keeps one path for everything that can change a throttle:
//! a decision, a reload that edits or removes a budget, a shared budget gaining a workload, a
//! workload exiting, a restart that finds throttles in the state file.

mod announce;
mod metrics;
#[cfg(test)]
mod tests;
mod throttles;
mod usage;

use usage::{cumulative, delta, matches};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tally_ebpf_common::scope as net_scope;
use tally_exporters::{Family, Histogram, LabelSet};

use super::actuator::{Actuators, CgroupDirs, EgressMap};
use super::state::{self, Baseline, SavedWindow, State, Throttle};
use super::window::Window;
use crate::cgroupfs::layout::Layout;
use crate::config::policy::{self, Action, Budget, Prices, Resource, Target};
use crate::config::Config;
use crate::identity::{Names, PathIdentity, Workload};
use crate::ledger::{Entry, Ledger};

/// Bounds of the detection-to-throttle latency histogram, in seconds.
const LATENCY_BOUNDS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
/// How often windows are saved when no throttle changed (a crash loses at most this much).
const SAVE_EVERY: f64 = 5.0;
/// Bounds of a steered freeze share, and how far one tick may move it.
const MIN_SHARE: f64 = 0.02;
const MAX_STEP: f64 = 2.0;

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
    subjects: BTreeMap<(String, String), Subject>,
    /// Last cumulative value per (workload, metric), and whether it came from the state file.
    baselines: HashMap<(String, String), (f64, bool)>,
    tracked: HashSet<String>,
    first_tick: bool,
    throttles: BTreeMap<(String, String), Throttle>,
    actuators: Actuators,
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
            subjects: BTreeMap::new(),
            baselines: HashMap::new(),
            tracked: HashSet::new(),
            first_tick: true,
            throttles: BTreeMap::new(),
            actuators: Actuators::new(config),
            alerts: None,
            node: config.node_name(),
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

    /// Hands the egress actuator the BPF map network throttles are set in; without one they
    /// fail as unavailable.
    pub fn set_egress_map(&mut self, map: Box<dyn EgressMap>) {
        self.actuators.set_egress_map(map);
    }

    /// Applies a reloaded policy: windows of budgets that still exist are kept; throttles follow
    /// at the next tick (an edited limit releases or tightens there).
    pub fn reconfigure(&mut self, config: &Config) {
        self.enforce = config.enforcement.enabled;
        self.budgets = compile(config);
        self.prices = config.prices.clone();
        self.actuators.reconfigure(config);
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

    /// Whether the engine has nothing to do: no budgets, no throttles, no windows. The tick
    /// then skips building its inputs.
    pub fn is_idle(&self) -> bool {
        self.budgets.is_empty() && self.throttles.is_empty() && self.subjects.is_empty()
    }

    /// One evaluation, after the tick has updated the ledger.
    pub fn tick(&mut self, inputs: Inputs<'_>) {
        let now = unix_now();
        let elapsed = self
            .last_tick
            .map_or(0.0, |t| inputs.tick_started.duration_since(t).as_secs_f64());
        self.last_tick = Some(inputs.tick_started);
        if self.is_idle() {
            return;
        }
        self.charge(&inputs, now);
        self.find_binding();
        let events = self.decide(now);
        self.steer_freeze(elapsed);
        self.reconcile(&inputs, now);
        for (key, event) in events {
            self.announce(&key, event);
        }
        self.applied.clear();
        if now - self.last_save >= SAVE_EVERY {
            self.save(now);
        }
        for (file, e) in self.actuators.freeze_failures() {
            tracing::warn!(file = %file.display(), error = %tally_ebpf::chain(&e), "freeze cycle write failed");
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
    pub fn shutdown(&mut self) {
        let throttles: Vec<Throttle> = std::mem::take(&mut self.throttles).into_values().collect();
        for t in &throttles {
            self.release(t);
        }
        self.actuators.stop();
        if !throttles.is_empty() {
            tracing::info!(released = throttles.len(), "released every throttle");
        }
        if !self.budgets.is_empty() || !throttles.is_empty() {
            self.save(unix_now());
        }
    }
}

fn first_field(s: &str) -> Option<&str> {
    s.split_whitespace().next()
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

#[allow(dead_code)]
const _SCOPE_COUNT_MATCHES: () = assert!(policy::SCOPES.len() == net_scope::COUNT);
