//! The budget engine, run at the end of every tick: charge each budget's window with what its
//! workloads used since the last tick, move each subject (a workload, or every selected
//! workload of a shared budget) between ok, warning and enforcing, and reconcile the throttles
//! in force with the ones the decisions want.
//!
//! Reconciling rather than reacting keeps one path for everything that can change a throttle:
//! a decision, a reload that edits or removes a budget, a shared budget gaining a workload, a
//! workload exiting, a restart that finds throttles in the state file.
//!
//! A tick reads the usage view once (`usage`), decides from it and the windows alone
//! (`decide`: no I/O), then makes the wanted throttles the ones in force through the actuators
//! (`throttles`), recording each in the state file before it is applied.

mod admission;
mod announce;
mod compiled;
mod decide;
mod keys;
mod metrics;
#[cfg(test)]
mod tests;
mod throttles;
mod usage;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tally_ebpf_common::scope as net_scope;
use tally_exporters::{Family, Histogram, LabelSet};

use super::actuator::{Actuators, EgressMap};
use super::state::{self, Baseline, SavedWindow, State, Throttle};
use super::verdict::{Board, BudgetVerdict, NamespaceLabels, Spent, Verdicts};
use crate::catalogue::budget::ENFORCEMENT_ERRORS;
use crate::cluster::ClusterHandle;
use crate::config::policy::{self, Action, Per, Target};
use crate::config::Config;
use crate::errors::ErrorCounts;
use crate::host::layout::Layout;
use crate::identity::{Names, PathIdentity, Workload};
use crate::ledger::Ledger;
use crate::source::Facts;
use compiled::{Metric, Policy};
use decide::Subject;
#[cfg(test)]
use keys::subject_key;
use keys::{SubjectId, SubjectKey, Subjects, ThrottleKey, WorkloadKey, SHARED};

/// Bounds of the detection-to-throttle latency histogram, in seconds.
const LATENCY_BOUNDS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
/// How often windows are saved when no throttle changed (a crash loses at most this much).
const SAVE_EVERY: f64 = 5.0;

/// Where a workload's cgroup is, from the tick's discovery.
#[derive(Debug, Clone)]
pub struct Placement {
    /// Path below each hierarchy root.
    pub rel: String,
    /// The cgroup2 id, when the workload has a cgroup2 directory.
    pub v2_id: Option<u64>,
}

/// What the tick hands the engine: the ledger (costs included, accrued by `cost::Meter`), the
/// node facts sources learned (GPU memory held) and where each workload's cgroup is, read into
/// the usage view once; and the cgroup layout, where the actuators find a workload's cgroup
/// files.
#[derive(Debug)]
pub struct Inputs<'a> {
    pub ledger: &'a Ledger,
    pub placements: &'a HashMap<PathIdentity, Placement>,
    pub layout: &'a Layout,
    pub facts: &'a Facts,
    /// When the tick that produced these readings started.
    pub tick_started: Instant,
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
    policy: Policy,
    state_dir: PathBuf,
    subjects: Subjects,
    /// Last cumulative value per (workload, metric), and whether it came from the state file.
    baselines: HashMap<(WorkloadKey, Metric), (f64, bool)>,
    /// Metrics whose baselines are being kept (a metric new to this set starts from zero).
    tracked: HashSet<Metric>,
    first_tick: bool,
    /// The throttles in force, as recorded in the state file.
    throttles: BTreeMap<ThrottleKey, Throttle>,
    actuators: Actuators,
    alerts: Option<Box<dyn AlertSink>>,
    node: String,
    actions: BTreeMap<(String, &'static str, &'static str), u64>,
    latency: Histogram,
    last_save: f64,
    last_tick: Option<Instant>,
    state_error: Option<String>,
    /// The state file could not be read at start: counted once, at the first tick.
    unreadable_state: bool,
    /// Per throttle, the last kernel count of times it held the workload back (CFS throttled
    /// periods, dropped packets).
    held_back: HashMap<ThrottleKey, u64>,
    /// Detection-to-throttle latency of the throttles first applied this tick, for the log.
    applied: HashMap<ThrottleKey, Duration>,
    /// The cluster budgets' answers; without it every cluster budget is unavailable.
    cluster: Option<ClusterHandle>,
    /// Workloads seen live at the last evaluation: one missing here is new.
    known: HashSet<WorkloadKey>,
    /// New workloads held at start by a spent `admission = "deny"` budget.
    holds: BTreeMap<ThrottleKey, admission::Hold>,
    /// Admission decisions by budget and decision.
    admissions: BTreeMap<(String, &'static str), u64>,
    /// Namespaces never held at start.
    exempt: HashSet<String>,
    /// Where the admission verdicts go after each evaluation (the NRI plugin reads them).
    board: Option<Arc<Board>>,
    /// Promoted namespace labels, by namespace, as identity last read them.
    namespace_labels: NamespaceLabels,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Engine {
    /// Builds the engine and reconciles what a previous run left in the state file: throttles
    /// of budgets that still enforce the same way are kept (their cgroups thawed until the
    /// first tick decides again), the others released.
    pub fn new(config: &Config) -> Engine {
        let mut engine = Engine {
            enforce: config.enforcement.enabled,
            policy: Policy::compile(config),
            state_dir: config.enforcement.state_dir.clone(),
            subjects: Subjects::default(),
            baselines: HashMap::new(),
            tracked: HashSet::new(),
            first_tick: true,
            throttles: BTreeMap::new(),
            actuators: Actuators::new(config),
            alerts: None,
            node: config.node_name(),
            actions: BTreeMap::new(),
            latency: Histogram::with_bounds(&LATENCY_BOUNDS),
            last_save: 0.0,
            last_tick: None,
            state_error: None,
            unreadable_state: false,
            held_back: HashMap::new(),
            applied: HashMap::new(),
            cluster: None,
            known: HashSet::new(),
            holds: BTreeMap::new(),
            admissions: BTreeMap::new(),
            exempt: exempt_namespaces(config),
            board: None,
            namespace_labels: NamespaceLabels::default(),
        };
        let saved = match State::load(&engine.state_dir) {
            Ok(s) => s,
            Err(e) => {
                // Never discarded: kept aside, and what it still says of its throttles undone.
                engine.unreadable_state = true;
                engine.state_error = Some(e.to_string());
                match crate::budget::salvage::salvage(&engine.state_dir, unix_now() as u64) {
                    Ok(s) => {
                        tracing::error!(
                            error = %e,
                            kept_as = %s.kept_as.display(),
                            restored = s.restored,
                            "budget state unreadable: kept aside, the throttles it names released; starting with fresh windows"
                        );
                        for failure in &s.errors {
                            tracing::error!(error = %failure, "releasing a throttle from the unreadable state file");
                        }
                    }
                    Err(io) => tracing::error!(
                        error = %e,
                        salvage = %io,
                        "budget state unreadable and could not be kept aside; starting with fresh windows"
                    ),
                }
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
                && self
                    .policy
                    .get(&t.budget)
                    .is_some_and(|c| c.budget.action == t.action && !c.budget.dry_run);
            if let Some(freeze) = &t.freeze {
                // Thawed until the first tick re-applies the cycle.
                let _ = state::write_existing(freeze, state::thawed_value(freeze));
            }
            if keep {
                let key = ThrottleKey {
                    budget: Arc::from(t.budget.as_str()),
                    workload: WorkloadKey::from(t.subject.as_str()),
                };
                self.throttles.insert(key, t);
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
            let Some(c) = self.policy.get(&w.budget) else {
                continue;
            };
            if !w.window.fits(&c.budget) {
                continue;
            }
            let mut subject = Subject::new(w.window, empty_labels());
            subject.enforcing = w.enforcing;
            subject.warning = w.warning;
            self.subjects
                .insert(SubjectKey::from_names(&w.budget, &w.subject), subject);
        }
        for b in saved.baselines {
            let Some(metric) = Metric::parse(&b.metric) else {
                continue;
            };
            self.tracked.insert(metric);
            self.baselines.insert(
                (WorkloadKey::from(b.workload.as_str()), metric),
                (b.value, true),
            );
        }
    }

    /// Hands the engine the answers of the cluster budgets' query task.
    pub fn set_cluster(&mut self, handle: ClusterHandle) {
        self.cluster = Some(handle);
    }

    /// Hands the engine the board it publishes admission verdicts on.
    pub fn set_board(&mut self, board: Arc<Board>) {
        self.board = Some(board);
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
        self.policy = Policy::compile(config);
        self.exempt = exempt_namespaces(config);
        self.actuators.reconfigure(config);
        let policy = &self.policy;
        self.subjects.retain(|key, s| {
            policy
                .get(&key.budget)
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
        self.policy.is_empty() && self.throttles.is_empty() && self.subjects.is_empty()
    }

    /// The cgroup paths of the live workloads some budget selected at the last evaluation.
    pub fn selected(&self) -> HashSet<String> {
        self.subjects
            .values()
            .flat_map(|s| s.members.iter().map(|m| m.rel.clone()))
            .collect()
    }

    /// One evaluation, after the tick has updated the ledger; failures are counted in `errors`.
    pub fn tick(&mut self, inputs: Inputs<'_>, errors: &mut ErrorCounts) {
        let now = unix_now();
        let elapsed = self
            .last_tick
            .map_or(0.0, |t| inputs.tick_started.duration_since(t).as_secs_f64());
        self.last_tick = Some(inputs.tick_started);
        if std::mem::take(&mut self.unreadable_state) {
            errors.count(&ENFORCEMENT_ERRORS, &["", "state", "unreadable"]);
        }
        if self.is_idle() {
            self.publish(inputs.tick_started, now);
            return;
        }
        let usage = usage::read(&inputs, &self.policy.metrics);
        self.charge(&usage, now);
        self.find_binding();
        let events = self.decide(now);
        self.settle_holds(now);
        self.publish(inputs.tick_started, now);
        self.steer_freeze(elapsed);
        self.reconcile(inputs.layout, inputs.tick_started, now, errors);
        for (key, event) in events {
            self.announce(&key, event);
        }
        self.applied.clear();
        if now - self.last_save >= SAVE_EVERY {
            self.save(now, errors);
        }
        for (file, e) in self.actuators.freeze_failures() {
            tracing::warn!(file = %file.display(), error = %tally_error_chain::chain(&e), "freeze cycle write failed");
            let budget = self
                .throttles
                .values()
                .find(|t| t.freeze.as_deref() == Some(file.as_path()))
                .map_or_else(String::new, |t| t.budget.clone());
            errors.count(&ENFORCEMENT_ERRORS, &[&budget, "freeze", "write"]);
        }
        self.first_tick = false;
    }

    /// Writes windows, baselines and throttles to the state file.
    fn save(&mut self, now: f64, errors: &mut ErrorCounts) {
        let mut state = State {
            throttles: self.throttles.values().cloned().collect(),
            windows: self
                .subjects
                .iter()
                .map(|(key, s)| SavedWindow {
                    budget: key.budget.to_string(),
                    subject: key.id.as_str().to_owned(),
                    window: s.window.clone(),
                    enforcing: s.enforcing,
                    warning: s.warning,
                })
                .collect(),
            baselines: self
                .baselines
                .iter()
                .map(|((w, m), (v, _))| Baseline {
                    workload: w.to_string(),
                    metric: m.name(),
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
                errors.count(&ENFORCEMENT_ERRORS, &["", "state", "save"]);
            }
        }
    }

    /// Releases every throttle and saves the windows: the graceful end of enforcement.
    pub fn shutdown(&mut self, errors: &mut ErrorCounts) {
        let released = self.release_all(errors);
        self.actuators.stop();
        if released == 0 && !self.policy.is_empty() {
            self.save(unix_now(), errors);
        }
    }

    /// Releases every throttle and saves the state without them; the actuators stay ready, so
    /// the next tick that decides can throttle again. Returns how many were released.
    pub fn release_all(&mut self, errors: &mut ErrorCounts) -> usize {
        let throttles: Vec<Throttle> = std::mem::take(&mut self.throttles).into_values().collect();
        for t in &throttles {
            self.release(t, errors);
        }
        if !throttles.is_empty() {
            tracing::info!(released = throttles.len(), "released every throttle");
            self.save(unix_now(), errors);
        }
        throttles.len()
    }
}

impl Engine {
    /// Publishes the verdicts of an engine with nothing to evaluate (no budgets): every
    /// container is admitted, and the plugin knows the verdict is current.
    pub fn publish_idle(&self, at: Instant) {
        self.publish(at, unix_now());
    }

    /// The namespace labels `[tenants]` promotes, for budgets that select on them at admission.
    pub fn set_namespace_labels(&mut self, labels: NamespaceLabels) {
        self.namespace_labels = labels;
    }

    /// Publishes what the last evaluation says of a container that would start now: each
    /// enforced `admission` budget's spent subjects. A dry-run budget, or a node with enforcement
    /// off, refuses and throttles nothing.
    fn publish(&self, at: Instant, now: f64) {
        let Some(board) = &self.board else {
            return;
        };
        let budgets = self
            .policy
            .budgets
            .iter()
            .filter(|c| {
                c.budget.admission != policy::Admission::None && self.enforce && !c.budget.dry_run
            })
            .map(|c| {
                let spent = self
                    .subjects
                    .iter()
                    .filter(|(key, s)| key.budget == c.name && s.enforcing)
                    .filter_map(|(key, s)| {
                        let subject = match &key.id {
                            SubjectId::Shared => String::new(),
                            SubjectId::Group(name) => name
                                .strip_prefix(keys::PER_PREFIX)
                                .unwrap_or(name)
                                .to_owned(),
                            SubjectId::Workload(_) => return None,
                        };
                        let threshold = c.budget.release_below * c.budget.limit;
                        // A cluster total falls when the cluster's use does: nobody here knows when.
                        let release_in = (!c.cluster())
                            .then(|| s.window.release_in(now, threshold))
                            .flatten();
                        Some((
                            subject,
                            Spent {
                                usage: s.usage,
                                release_in,
                                members: s.members.len(),
                            },
                        ))
                    })
                    .collect();
                BudgetVerdict {
                    name: c.name.clone(),
                    admission: c.budget.admission,
                    select: c.budget.select.clone(),
                    per: c.per.clone(),
                    resource: c.budget.resource,
                    limit: c.budget.limit,
                    cpu_cores: match c.target {
                        Target::CpuCores(cores) => Some(cores),
                        _ => None,
                    },
                    spent,
                }
            })
            .collect();
        let verdicts = Verdicts {
            at: Some(at),
            exempt: self.exempt.clone(),
            budgets,
            namespace_labels: self.namespace_labels.clone(),
        };
        let (denied, lifted) = board.settle_denials(&verdicts);
        board.publish(verdicts);
        let Some(alerts) = &self.alerts else {
            return;
        };
        for d in denied {
            let mut labels = BTreeMap::from([
                ("alertname".to_owned(), "TallyAdmissionDenied".to_owned()),
                ("severity".to_owned(), "warning".to_owned()),
                ("budget".to_owned(), d.budget.to_string()),
                ("node".to_owned(), self.node.clone()),
            ]);
            for (name, value) in [
                ("namespace", &d.namespace),
                ("pod", &d.pod),
                ("container", &d.container),
            ] {
                if !value.is_empty() {
                    labels.insert(name.to_owned(), value.clone());
                }
            }
            let annotations = BTreeMap::from([("summary".to_owned(), d.message.clone())]);
            alerts.fire(d.key(), labels, annotations);
        }
        for key in lifted {
            alerts.resolve(key);
        }
    }
}

fn first_field(s: &str) -> Option<&str> {
    s.split_whitespace().next()
}

/// `enforcement.admission_exempt_namespaces`, and the agent's own namespace (`POD_NAMESPACE`).
fn exempt_namespaces(config: &Config) -> HashSet<String> {
    let own = std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|n| !n.is_empty());
    config
        .enforcement
        .admission_exempt_namespaces
        .iter()
        .cloned()
        .chain(own)
        .collect()
}

/// The value of the label `name` in `labels`, empty where it has none.
fn label_value(labels: &LabelSet, name: &str) -> String {
    labels
        .iter()
        .find(|(k, _)| *k == name)
        .map_or("", |(_, v)| v.as_ref())
        .to_owned()
}

/// The per-workload label names with empty values (the label set of a shared budget's row).
fn empty_labels() -> LabelSet {
    Workload::new(PathIdentity::Host, Names::default())
        .labels()
        .clone()
}

#[allow(dead_code)]
const _SCOPE_COUNT_MATCHES: () = assert!(policy::SCOPES.len() == net_scope::COUNT);
