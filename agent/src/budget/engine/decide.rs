//! The decisions, from the tick's usage view and nothing else: charge each budget's windows,
//! move each subject between ok, warning and enforcing, steer rate-held freezes, and say which
//! throttles should be in force. Nothing here touches the node.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use tally_exporters::LabelSet;

use super::compiled::Metric;
use super::keys::{SubjectId, SubjectKey, ThrottleKey, WorkloadKey, PER_PREFIX};
use super::usage::Usage;
use super::{empty_labels, Engine, Event, Placement};
use crate::budget::window::Window;
use crate::cluster::Reading;
use crate::config::policy::{self, Action, Admission, OnUnavailable, Per, Target};
use crate::identity::{PathIdentity, Workload};

/// Bounds of a steered freeze share, and how far one tick may move it.
const MIN_SHARE: f64 = 0.02;
const MAX_STEP: f64 = 2.0;

/// A budget's view of one workload or, for a shared budget, of all of them.
#[derive(Debug)]
pub(super) struct Subject {
    pub window: Window,
    pub warning: bool,
    pub enforcing: bool,
    pub usage: f64,
    pub ratio: f64,
    pub labels: LabelSet,
    /// Live workloads it throttles.
    pub members: Vec<Member>,
    /// Amount used in the last tick, and over how long.
    pub last_amount: f64,
    /// Running fraction of each freeze cycle, when freezing.
    pub freeze_share: f64,
    pub seen: bool,
    /// A throttle of this subject held it back in the last tick (the kernel throttled its CPU,
    /// dropped its packets, or the freeze kept it below its demand): its usage then says
    /// nothing about its demand, and a low usage is no reason to release.
    pub binding: bool,
    /// A cluster budget without a fresh answer: its `on_unavailable` decides.
    pub unavailable: bool,
}

impl Subject {
    pub fn new(window: Window, labels: LabelSet) -> Subject {
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
            unavailable: false,
        }
    }
}

/// A live workload a subject throttles, and where its cgroup is.
#[derive(Debug, Clone)]
pub(super) struct Member {
    pub workload: WorkloadKey,
    /// Path below each hierarchy root.
    pub rel: String,
    pub v2_id: Option<u64>,
}

/// A throttle the decisions want in force on one workload.
#[derive(Debug)]
pub(super) struct Wanted {
    pub action: Action,
    /// Cores, bytes per second, or running share.
    pub setting: f64,
    pub member: Member,
    /// Network scope index of an egress throttle.
    pub scope: Option<u32>,
}

impl Engine {
    /// Adds each workload's usage since the last tick to the windows of the budgets selecting it.
    pub(super) fn charge(&mut self, usage: &Usage<'_>, now: f64) {
        let new_metrics: HashSet<Metric> = self
            .policy
            .metrics
            .iter()
            .copied()
            .filter(|m| !self.tracked.contains(m))
            .collect();
        for s in self.subjects.values_mut() {
            s.seen = false;
            s.members.clear();
            s.last_amount = 0.0;
        }
        let mut levels: HashMap<SubjectKey, f64> = HashMap::new();
        let mut present: HashSet<&WorkloadKey> = HashSet::new();
        // New workloads under spent `admission = "deny"` budgets, decided after the loop.
        let mut arrivals: Vec<(ThrottleKey, SubjectKey, bool, LabelSet)> = Vec::new();
        for w in &usage.workloads {
            present.insert(&w.key);
            // Running when the agent started: admitted before it.
            let new = w.live && !self.first_tick && !self.known.contains(&w.key);
            let mut deltas: HashMap<Metric, f64> = HashMap::new();
            for c in &self.policy.budgets {
                if !matches(&c.budget.select, w.workload, w.placement) {
                    continue;
                }
                let (id, labels) = match &c.per {
                    Some(per) => match group(per, w.workload) {
                        Some(group) => group,
                        // No value to group it by: not selected.
                        None => continue,
                    },
                    None if c.grouped() => (SubjectId::Shared, empty_labels()),
                    None => (
                        SubjectId::Workload(w.key.clone()),
                        w.workload.labels().clone(),
                    ),
                };
                let key = SubjectKey {
                    budget: c.name.clone(),
                    id,
                };
                let amount = if c.budget.resource.is_gauge() {
                    let (level, combine) = w.level(c.budget.resource);
                    let slot = levels.entry(key.clone()).or_default();
                    *slot = combine(*slot, level);
                    0.0
                } else if let Some(d) = deltas.get(&c.metric) {
                    *d
                } else {
                    let d = match w.cumulative(c.metric) {
                        Some(v) => delta(
                            &mut self.baselines,
                            (&w.key, c.metric),
                            v,
                            self.first_tick || new_metrics.contains(&c.metric),
                        ),
                        None => 0.0,
                    };
                    deltas.insert(c.metric, d);
                    d
                };
                let subject = self
                    .subjects
                    .entry(key.clone())
                    .or_insert_with(|| Subject::new(Window::for_budget(&c.budget), labels.clone()));
                if new && w.placement.is_some() && c.budget.admission == Admission::Deny {
                    arrivals.push((
                        ThrottleKey {
                            budget: c.name.clone(),
                            workload: w.key.clone(),
                        },
                        key,
                        subject.enforcing,
                        w.workload.labels().clone(),
                    ));
                }
                subject.labels = labels;
                subject.seen = true;
                subject.window.add(now, amount);
                subject.last_amount += amount;
                if let (true, Some(p)) = (w.live, w.placement) {
                    subject.members.push(Member {
                        workload: w.key.clone(),
                        rel: p.rel.clone(),
                        v2_id: p.v2_id,
                    });
                }
            }
        }
        for (key, level) in levels {
            if let Some(s) = self.subjects.get_mut(&key) {
                s.window.set_level(level);
            }
        }
        for (key, subject, enforced, labels) in arrivals {
            self.admit(key, subject, enforced, &labels, now);
        }
        self.known = usage
            .workloads
            .iter()
            .filter(|w| w.live)
            .map(|w| w.key.clone())
            .collect();
        self.tracked.extend(self.policy.metrics.iter().copied());
        // Workloads the ledger forgot (their grace period ended) lose their baselines.
        self.baselines.retain(|(w, _), _| present.contains(w));
    }

    /// Moves each subject between states; returns the state changes.
    pub(super) fn decide(&mut self, now: f64) -> Vec<(SubjectKey, Event)> {
        let mut events = Vec::new();
        let policy = &self.policy;
        let cluster = self.cluster.as_ref();
        self.subjects.retain(|key, s| {
            let Some(c) = policy.get(&key.budget) else {
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
            if c.cluster() {
                let group = match &key.id {
                    SubjectId::Group(name) => name.strip_prefix(PER_PREFIX).unwrap_or(name),
                    _ => "",
                };
                let reading = cluster.map_or(Reading::Unavailable, |h| h.usage(&key.budget, group));
                let answer = match reading {
                    // Keeps its state, as restored or decided, until the first query finishes.
                    Reading::Pending => return true,
                    Reading::Fresh(total) => Some(total),
                    Reading::Unavailable => None,
                };
                if answer.is_none() != s.unavailable {
                    s.unavailable = answer.is_none();
                    match s.unavailable {
                        true => tracing::warn!(
                            budget = %key.budget,
                            subject = key.id.as_str(),
                            on_unavailable = b.on_unavailable.as_str(),
                            "cluster budget unavailable: no answer younger than cluster.max_staleness_secs"
                        ),
                        false => tracing::info!(
                            budget = %key.budget,
                            subject = key.id.as_str(),
                            "cluster budget available again"
                        ),
                    }
                }
                let Some(total) = answer else {
                    // The last known usage stays on show; the state is `on_unavailable`'s.
                    let enforce = match b.on_unavailable {
                        OnUnavailable::Hold => s.enforcing,
                        OnUnavailable::Open => false,
                        OnUnavailable::Closed => true,
                    };
                    if enforce != s.enforcing {
                        s.enforcing = enforce;
                        s.warning = enforce;
                        s.freeze_share = 1.0;
                        let event = if enforce { Event::Enforce } else { Event::Release };
                        events.push((key.clone(), event));
                    }
                    return true;
                };
                s.usage = total;
                // The cluster's total decides: what holds this node's share back says nothing
                // about the others'.
                s.binding = false;
            } else {
                s.usage = s.window.usage(now);
            }
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

    /// Steers the running share of rate-held freezes: the share that would have made the last
    /// tick's rate the budget's, moved at most a factor of two per tick.
    pub(super) fn steer_freeze(&mut self, elapsed: f64) {
        if elapsed <= 0.0 {
            return;
        }
        for (key, s) in self.subjects.iter_mut() {
            let Some(Target::FreezeRate(target)) = self.policy.get(&key.budget).map(|c| c.target)
            else {
                continue;
            };
            if !s.enforcing {
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

    /// The throttles that should be in force, one per budget and workload.
    pub(super) fn desired(&self) -> BTreeMap<ThrottleKey, Wanted> {
        let mut want = BTreeMap::new();
        if !self.enforce {
            return want;
        }
        for (key, s) in self.subjects.iter() {
            let Some(c) = self.policy.get(&key.budget) else {
                continue;
            };
            let b = &c.budget;
            if b.dry_run || !b.action.actuates() || !s.enforcing || s.members.is_empty() {
                continue;
            }
            // Held members are frozen whole (below); the others share the throttle.
            let held = |m: &Member| {
                self.holds.contains_key(&ThrottleKey {
                    budget: c.name.clone(),
                    workload: m.workload.clone(),
                })
            };
            let n = s.members.iter().filter(|m| !held(m)).count().max(1) as f64;
            let setting = match c.target {
                Target::CpuCores(v) | Target::EgressBytesPerSec(v) | Target::DiskBytesPerSec(v) => {
                    v / n
                }
                Target::FreezeShare(v) => v,
                Target::FreezeRate(_) => s.freeze_share,
                Target::Terminate | Target::None => 0.0,
            };
            for member in &s.members {
                want.insert(
                    ThrottleKey {
                        budget: c.name.clone(),
                        workload: member.workload.clone(),
                    },
                    Wanted {
                        action: b.action,
                        setting,
                        member: member.clone(),
                        scope: c.scope,
                    },
                );
            }
        }
        // Holds at start: frozen for the whole of every cycle, whatever the budget's action.
        for (key, hold) in &self.holds {
            let Some(c) = self.policy.get(&key.budget) else {
                continue;
            };
            let member = self
                .subjects
                .get(&hold.subject)
                .and_then(|s| s.members.iter().find(|m| m.workload == key.workload));
            if let (false, Some(member)) = (c.budget.dry_run, member) {
                want.insert(
                    key.clone(),
                    Wanted {
                        action: Action::Freeze,
                        setting: 0.0,
                        member: member.clone(),
                        scope: None,
                    },
                );
            }
        }
        want
    }
}

/// Usage since the last reading of a workload's cumulative `value`, updating the baseline.
/// `fresh`: the engine just started or began tracking this metric.
fn delta(
    baselines: &mut HashMap<(WorkloadKey, Metric), (f64, bool)>,
    (workload, metric): (&WorkloadKey, Metric),
    value: f64,
    fresh: bool,
) -> f64 {
    let previous = baselines.insert((workload.clone(), metric), (value, false));
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
/// The subject of a `per` budget's group a workload belongs to, and its row's labels (the
/// workload labels empty but the one grouped by); `None` where the workload has no value.
fn group(per: &Per, workload: &Workload) -> Option<(SubjectId, LabelSet)> {
    let mut labels = empty_labels().to_vec();
    let value = match per {
        Per::Namespace => {
            let ns = workload.names.namespace.as_str();
            if let Some(slot) = labels.iter_mut().find(|(k, _)| *k == "namespace") {
                slot.1 = Arc::from(ns);
            }
            ns
        }
        Per::Label { key, name } => {
            let value = workload.names.labels.get(key).map_or("", String::as_str);
            labels.push((name, Arc::from(value)));
            value
        }
    };
    (!value.is_empty()).then(|| (SubjectId::group(value), LabelSet::from(labels)))
}

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
