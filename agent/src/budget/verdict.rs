//! Admission verdicts: what the budget engine says, at the end of each tick, about a container
//! that would start now. The engine publishes them on a [`Board`]; the NRI plugin reads the
//! board on the runtime's `CreateContainer` call and decides from it alone, with no I/O, so the
//! call never waits for a tick, a file or a query.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tally_exporters::{Family, Histogram};

use crate::catalogue::budget as metrics;
use crate::config::policy::{self, Admission, Per, Resource, Selector};

/// Bounds of the decision latency histogram, in seconds: the runtime gives a plugin 2 s.
const DECISION_BOUNDS: [f64; 10] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.01, 0.1,
];

/// What `CreateContainer` decided, every kind from zero.
const NRI_DECISIONS: [&str; 5] = ["admit", "exempt", "unknown", "throttle", "deny"];

/// The latest verdicts, written by the tick thread and read by the plugin, and what the plugin
/// decided with them.
#[derive(Debug, Default)]
pub struct Board {
    verdicts: RwLock<Arc<Verdicts>>,
    nri: Mutex<NriStats>,
}

/// The plugin's side of the board.
#[derive(Debug, Default)]
struct NriStats {
    /// The plugin runs (`admission.nri_socket` is set).
    enabled: bool,
    /// Registered with a runtime now.
    connected: bool,
    decisions: BTreeMap<&'static str, u64>,
    /// Denials and throttles, by budget.
    by_budget: BTreeMap<(Arc<str>, &'static str), u64>,
    latency: Option<Histogram>,
    /// Refusals since the engine last looked, for its alerts.
    new_denials: Vec<Denial>,
    /// Refused pods whose alert fires, by alert key: the budget and subject that refused them.
    denied: BTreeMap<String, (Arc<str>, String)>,
}

/// One refused container, as alerted.
#[derive(Debug, Clone, PartialEq)]
pub struct Denial {
    pub budget: Arc<str>,
    /// The spent subject: `""` or the group's value.
    pub subject: String,
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub message: String,
}

impl Denial {
    /// Its alert's key: one alert per budget and pod, however often the kubelet retries.
    pub fn key(&self) -> String {
        format!("denied/{}/{}/{}", self.budget, self.namespace, self.pod)
    }
}

impl Board {
    /// The verdicts in force now.
    pub fn verdicts(&self) -> Arc<Verdicts> {
        self.verdicts
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the verdicts (the tick, once per evaluation).
    pub fn publish(&self, verdicts: Verdicts) {
        *self
            .verdicts
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(verdicts);
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, NriStats> {
        self.nri.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The plugin runs; its families are shown from now on.
    pub fn enable_nri(&self) {
        self.stats().enabled = true;
    }

    /// Registered with the runtime, or not.
    pub fn set_connected(&self, connected: bool) {
        self.stats().connected = connected;
    }

    /// Counts one `CreateContainer` decision about `candidate` and how long it took.
    pub fn record(&self, decision: &Decision, candidate: &Candidate, took: Duration) {
        let mut stats = self.stats();
        if let Decision::Deny {
            budget,
            subject,
            message,
        } = decision
        {
            stats.new_denials.push(Denial {
                budget: budget.clone(),
                subject: subject.clone(),
                namespace: candidate.namespace.clone(),
                pod: candidate.pod.clone(),
                container: candidate.container.clone(),
                message: message.clone(),
            });
        }
        *stats.decisions.entry(decision.as_str()).or_default() += 1;
        if let Some(budget) = decision.budget() {
            *stats
                .by_budget
                .entry((Arc::from(budget), decision.as_str()))
                .or_default() += 1;
        }
        stats
            .latency
            .get_or_insert_with(|| Histogram::with_bounds(&DECISION_BOUNDS))
            .observe(took.as_secs_f64());
    }

    /// What the engine alerts about as it publishes `verdicts`: the refusals of pods not alerted
    /// yet, and the keys of alerts whose budget no longer refuses their pod (released, removed,
    /// or no longer enforced).
    pub fn settle_denials(&self, verdicts: &Verdicts) -> (Vec<Denial>, Vec<String>) {
        let mut stats = self.stats();
        let mut fired = Vec::new();
        for d in std::mem::take(&mut stats.new_denials) {
            if let std::collections::btree_map::Entry::Vacant(slot) = stats.denied.entry(d.key()) {
                slot.insert((d.budget.clone(), d.subject.clone()));
                fired.push(d);
            }
        }
        let spent = |budget: &str, subject: &str| {
            verdicts
                .budgets
                .iter()
                .any(|b| &*b.name == budget && b.spent.contains_key(subject))
        };
        let mut lifted = Vec::new();
        stats.denied.retain(|key, (budget, subject)| {
            let keep = spent(budget, subject);
            if !keep {
                lifted.push(key.clone());
            }
            keep
        });
        (fired, lifted)
    }

    /// Denials and throttles at creation, by budget (for `tally_admission_decisions_total`).
    pub fn by_budget(&self) -> BTreeMap<(Arc<str>, &'static str), u64> {
        self.stats().by_budget.clone()
    }

    /// The plugin's families; none when it does not run.
    pub fn families(&self) -> Vec<Family> {
        let stats = self.stats();
        if !stats.enabled {
            return Vec::new();
        }
        let mut connected = Family::new(&metrics::ADMISSION_NRI_CONNECTED);
        connected.push_labeled(Vec::new(), f64::from(u8::from(stats.connected)));
        let mut decisions = Family::new(&metrics::ADMISSION_NRI_DECISIONS);
        for d in NRI_DECISIONS {
            let n = stats.decisions.get(d).copied().unwrap_or(0);
            decisions.push_labeled(vec![("decision", Arc::from(d))], n as f64);
        }
        let mut latency = Family::new(&metrics::ADMISSION_DECISION_SECONDS);
        let histogram = stats
            .latency
            .clone()
            .unwrap_or_else(|| Histogram::with_bounds(&DECISION_BOUNDS));
        latency.push_histogram(&Arc::from([]), Vec::new(), histogram);
        vec![connected, decisions, latency]
    }
}

/// Promoted namespace labels (`[tenants]`), by namespace: a pod without one of these keys takes
/// its namespace's value, as in the ledger.
pub type NamespaceLabels = Arc<HashMap<String, BTreeMap<String, String>>>;

/// Everything a `CreateContainer` decision needs, as of one tick.
#[derive(Debug, Default, Clone)]
pub struct Verdicts {
    /// When the engine made them; `None` before the first tick.
    pub at: Option<Instant>,
    /// Namespaces never refused or throttled at admission.
    pub exempt: HashSet<String>,
    /// Every budget with `admission` other than `none`.
    pub budgets: Vec<BudgetVerdict>,
    pub namespace_labels: NamespaceLabels,
}

/// One admission budget and which of its subjects are spent.
#[derive(Debug, Clone)]
pub struct BudgetVerdict {
    pub name: Arc<str>,
    pub admission: Admission,
    pub select: Selector,
    pub per: Option<Per>,
    pub resource: Resource,
    pub limit: f64,
    /// The cores a `throttle` budget's cpu throttle allows the subject as a whole.
    pub cpu_cores: Option<f64>,
    /// Subjects enforced now: `""` for a shared or cluster budget's one subject, the group's
    /// value for a `per` budget.
    pub spent: HashMap<String, Spent>,
}

/// A subject whose budget is enforced.
#[derive(Debug, Clone, PartialEq)]
pub struct Spent {
    pub usage: f64,
    /// Seconds until the window lets it go without further use; `None` where no one can say (a
    /// level, a cluster total).
    pub release_in: Option<f64>,
    /// Live workloads it throttles now.
    pub members: usize,
}

/// A container about to be created, as the runtime describes it.
#[derive(Debug, Clone, Default)]
pub struct Candidate {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    /// The pod's labels.
    pub labels: HashMap<String, String>,
}

/// What the runtime is told.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// No spent admission budget selects it.
    Admit,
    /// Its namespace is exempt.
    Exempt,
    /// The verdicts are older than allowed (or there are none yet): `on_unknown` decides.
    Unknown,
    /// Start it with this CPU quota (microseconds per `period`).
    Throttle {
        budget: Arc<str>,
        quota_us: i64,
        period_us: u64,
    },
    /// Refuse it: `budget`'s `subject` (`""`, or its group's value) is spent.
    Deny {
        budget: Arc<str>,
        subject: String,
        message: String,
    },
}

impl Decision {
    /// Its `decision` label value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Decision::Admit => "admit",
            Decision::Exempt => "exempt",
            Decision::Unknown => "unknown",
            Decision::Throttle { .. } => "throttle",
            Decision::Deny { .. } => "deny",
        }
    }

    /// The budget that decided, if one did.
    pub fn budget(&self) -> Option<&str> {
        match self {
            Decision::Throttle { budget, .. } | Decision::Deny { budget, .. } => Some(budget),
            _ => None,
        }
    }
}

/// The CFS period of an admission throttle, as the cpu actuator writes it.
pub const CPU_PERIOD_US: u64 = 100_000;

impl Verdicts {
    /// The decision for `candidate` at `now`, from verdicts no older than `max_age`. A deny wins
    /// over a throttle; of several throttles the tightest applies.
    pub fn decide(&self, candidate: &Candidate, now: Instant, max_age: Duration) -> Decision {
        if self.exempt.contains(&candidate.namespace) {
            return Decision::Exempt;
        }
        match self.at {
            Some(at) if now.saturating_duration_since(at) <= max_age => {}
            _ => return Decision::Unknown,
        }
        let mut throttle: Option<(Arc<str>, f64)> = None;
        let namespace = self.namespace_labels.get(&candidate.namespace);
        // A pod label, or else its namespace's promoted one.
        let label = |key: &str| {
            candidate
                .labels
                .get(key)
                .or_else(|| namespace.and_then(|labels| labels.get(key)))
                .map(String::as_str)
        };
        for b in &self.budgets {
            if !selects(&b.select, candidate, &label) {
                continue;
            }
            let Some(subject) = subject_of(b.per.as_ref(), candidate, &label) else {
                continue;
            };
            let Some(spent) = b.spent.get(subject) else {
                continue;
            };
            match b.admission {
                Admission::None => {}
                Admission::Deny => {
                    return Decision::Deny {
                        budget: b.name.clone(),
                        subject: subject.to_owned(),
                        message: deny_message(b, subject, spent),
                    }
                }
                Admission::Throttle => {
                    // The subject's cores, shared with the new container.
                    let Some(cores) = b.cpu_cores else { continue };
                    let share = cores / (spent.members + 1) as f64;
                    if throttle.as_ref().is_none_or(|(_, c)| share < *c) {
                        throttle = Some((b.name.clone(), share));
                    }
                }
            }
        }
        match throttle {
            Some((budget, cores)) => Decision::Throttle {
                budget,
                // At least 1 ms per period: the kernel refuses a smaller quota.
                quota_us: ((cores * CPU_PERIOD_US as f64).round() as i64).max(1000),
                period_us: CPU_PERIOD_US,
            },
            None => Decision::Admit,
        }
    }
}

/// Whether a selector selects a container at creation. A container is never a systemd unit;
/// its cgroup path is the runtime's to choose, so a `cgroup` selector is decided by the first
/// tick instead (hold at start), never here.
fn selects<'a>(select: &Selector, c: &Candidate, label: &impl Fn(&str) -> Option<&'a str>) -> bool {
    let exact = |want: &Option<String>, have: &str| want.as_ref().is_none_or(|w| w == have);
    select.unit.is_none()
        && select.cgroup.is_none()
        && exact(&select.namespace, &c.namespace)
        && exact(&select.container, &c.container)
        && select
            .pod
            .as_ref()
            .is_none_or(|p| !c.pod.is_empty() && policy::glob_match(p, &c.pod))
        && select
            .labels
            .iter()
            .all(|(k, v)| label(k) == Some(v.as_str()))
}

/// The subject a container would join: `""` for a budget without `per`, its group's value
/// otherwise; `None` where it has no value (not selected).
fn subject_of<'a>(
    per: Option<&Per>,
    c: &'a Candidate,
    label: &impl Fn(&str) -> Option<&'a str>,
) -> Option<&'a str> {
    let value = match per {
        None => return Some(""),
        Some(Per::Namespace) => c.namespace.as_str(),
        Some(Per::Label { key, .. }) => label(key).unwrap_or(""),
    };
    (!value.is_empty()).then_some(value)
}

/// The refusal the kubelet shows on the pod: the budget, its usage and limit, and when it lets
/// go.
fn deny_message(b: &BudgetVerdict, subject: &str, spent: &Spent) -> String {
    let whose = match (&b.per, subject) {
        (Some(Per::Namespace), v) => format!(" for namespace {v}"),
        (Some(Per::Label { key, .. }), v) => format!(" for {key}={v}"),
        (None, _) => String::new(),
    };
    let when = match spent.release_in {
        Some(s) => format!("it releases in about {}", human_secs(s)),
        None => "it releases once its usage falls below the release threshold".to_owned(),
    };
    format!(
        "tally: budget {}{whose} is spent ({} {} of {}); {when}",
        b.name,
        round(spent.usage),
        b.resource.as_str(),
        round(b.limit),
    )
}

fn round(v: f64) -> String {
    let r = (v * 1000.0).round() / 1000.0;
    format!("{r}")
}

fn human_secs(s: f64) -> String {
    let s = s.max(0.0).ceil() as u64;
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s.div_ceil(60)),
        _ => format!("{} h", s.div_ceil(3600)),
    }
}

#[cfg(test)]
mod tests;
