//! Cluster-wide budgets: every agent asks the cluster's Prometheus (or anything serving its
//! query API) for each `span = "cluster"` budget's usage on an interval, off the tick thread,
//! and the budget engine enforces on this node's workloads from the answer. Nodes never talk to
//! each other: the metrics every agent already exports, summed by Prometheus, are the shared
//! state.
//!
//! The tick reads the last answers from memory and never waits on the network. An answer older
//! than `cluster.max_staleness_secs`, or none at all, leaves the budget unavailable, and its
//! `on_unavailable` decides (`budget::engine`).

pub mod http;
pub mod query;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tally_exporters::Family;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::catalogue::budget as metrics;
use crate::config::policy::{OnUnavailable, Span};
use crate::config::{cluster, Config};
pub use query::{Failure, REASONS};

/// One cluster budget's question.
#[derive(Debug, Clone, PartialEq)]
struct Question {
    budget: String,
    promql: String,
    group: Option<&'static str>,
    on_unavailable: OnUnavailable,
}

/// What the query task works from, replaced on reload.
#[derive(Debug)]
struct Settings {
    client: Option<http::Client>,
    interval: Duration,
    max_staleness: Duration,
    questions: Vec<Question>,
}

impl Settings {
    fn of(config: &Config) -> Settings {
        let questions = config
            .budget
            .iter()
            .filter(|b| b.span == Span::Cluster)
            .filter_map(|b| {
                // Validation refused a budget whose query cannot be built.
                Some(Question {
                    budget: b.name.clone(),
                    promql: cluster::build(b, &config.tenants).ok()?,
                    group: cluster::group_label(b),
                    on_unavailable: b.on_unavailable,
                })
            })
            .collect();
        Settings {
            client: http::Client::new(&config.cluster),
            interval: Duration::from_secs(config.cluster.interval_secs.max(1)),
            max_staleness: Duration::from_secs(config.cluster.max_staleness_secs),
            questions,
        }
    }
}

/// One budget's answers so far.
#[derive(Debug, Default, Clone)]
struct Answer {
    /// The query the values answer.
    promql: String,
    /// The last good answer: a value per group (`""` for an ungrouped budget).
    values: Vec<(String, f64)>,
    answered: Option<Instant>,
    queries: u64,
    failures: [u64; REASONS.len()],
    /// Failing since the last good answer (logged once per outage).
    failing: bool,
}

#[derive(Debug, Default)]
struct State {
    answers: BTreeMap<String, Answer>,
    questions: Vec<Question>,
    max_staleness: Duration,
}

/// What a cluster budget's usage is known to be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reading {
    /// The first query since the agent started (or the question changed) has not finished:
    /// nothing is known, nothing changes.
    Pending,
    /// The cluster's usage, from an answer younger than `max_staleness`.
    Fresh(f64),
    /// Asked, and no answer younger than `max_staleness`: `on_unavailable` decides.
    Unavailable,
}

/// The last answers, shared by the query task (writer) and the tick (reader).
#[derive(Debug, Clone)]
pub struct ClusterHandle {
    state: Arc<RwLock<State>>,
    settings: Arc<watch::Sender<Arc<Settings>>>,
}

/// Starts the query task, until `cancel` fires. It idles while no budget is a cluster budget,
/// and takes reloads through [`ClusterHandle::update`].
pub fn spawn(config: &Config, cancel: CancellationToken) -> ClusterHandle {
    let (handle, rx) = ClusterHandle::new(config);
    tokio::spawn(run(handle.clone(), rx, cancel));
    handle
}

async fn run(
    handle: ClusterHandle,
    mut settings: watch::Receiver<Arc<Settings>>,
    cancel: CancellationToken,
) {
    loop {
        let current = settings.borrow_and_update().clone();
        handle.adopt(&current);
        if let Some(client) = &current.client {
            for q in &current.questions {
                let answer = tokio::select! {
                    _ = cancel.cancelled() => return,
                    body = client.query(&q.promql) => {
                        body.and_then(|body| query::parse(&body, q.group))
                    }
                };
                handle.record(q, answer);
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(current.interval) => {}
            changed = settings.changed() => if changed.is_err() { return },
        }
    }
}

impl ClusterHandle {
    /// A handle no task fills: every cluster budget stays unavailable (`tally check`, tests).
    pub fn idle(config: &Config) -> ClusterHandle {
        ClusterHandle::new(config).0
    }

    /// A handle with the configuration's questions, and the receiving end of its settings.
    fn new(config: &Config) -> (ClusterHandle, watch::Receiver<Arc<Settings>>) {
        // One `Settings::of`: it loads the TLS roots.
        let settings = Arc::new(Settings::of(config));
        let (tx, rx) = watch::channel(settings.clone());
        let handle = ClusterHandle {
            state: Arc::default(),
            settings: Arc::new(tx),
        };
        handle.adopt(&settings);
        (handle, rx)
    }

    /// Applies a reloaded configuration; the task asks again at once.
    pub fn update(&self, config: &Config) {
        let settings = Settings::of(config);
        self.adopt(&settings);
        self.settings.send_replace(Arc::new(settings));
    }

    /// Forgets the answers of budgets gone or asking something else now.
    fn adopt(&self, settings: &Settings) {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        state.answers.retain(|budget, a| {
            settings
                .questions
                .iter()
                .any(|q| q.budget == *budget && q.promql == a.promql)
        });
        state.questions.clone_from(&settings.questions);
        state.max_staleness = settings.max_staleness;
    }

    /// Records an answer to `budget`'s current question, as the query task does.
    pub fn answer(&self, budget: &str, result: Result<Vec<(String, f64)>, Failure>) {
        let question = {
            let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
            state.questions.iter().find(|q| q.budget == budget).cloned()
        };
        if let Some(q) = question {
            self.record(&q, result);
        }
    }

    fn record(&self, q: &Question, result: Result<Vec<(String, f64)>, Failure>) {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        if !state.questions.iter().any(|x| x == q) {
            // Asked under settings a reload has replaced.
            return;
        }
        let answer = state
            .answers
            .entry(q.budget.clone())
            .or_insert_with(|| Answer {
                promql: q.promql.clone(),
                ..Answer::default()
            });
        answer.queries += 1;
        match result {
            Ok(values) => {
                if std::mem::take(&mut answer.failing) {
                    tracing::info!(budget = %q.budget, "cluster budget query answers again");
                }
                tracing::debug!(budget = %q.budget, ?values, "cluster budget answer");
                answer.values = values;
                answer.answered = Some(Instant::now());
            }
            Err(failure) => {
                let reason = failure.reason();
                if let Some(i) = REASONS.iter().position(|r| *r == reason) {
                    answer.failures[i] += 1;
                }
                if !std::mem::replace(&mut answer.failing, true) {
                    tracing::warn!(
                        budget = %q.budget,
                        reason,
                        error = %failure,
                        query = %q.promql,
                        on_unavailable = q.on_unavailable.as_str(),
                        "cluster budget query failed; the last answer is used until it is older than cluster.max_staleness_secs"
                    );
                } else {
                    tracing::debug!(budget = %q.budget, reason, error = %failure, "cluster budget query failed again");
                }
            }
        }
    }

    /// The cluster's usage for `budget`'s group `group` (`""` when ungrouped): an answer
    /// younger than `max_staleness` has it (a group absent from an answer used nothing in the
    /// window anywhere), or none does.
    pub fn usage(&self, budget: &str, group: &str) -> Reading {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        // Not asked yet since the agent started or the question changed.
        let Some(answer) = state.answers.get(budget) else {
            return Reading::Pending;
        };
        match answer.answered {
            Some(at) if at.elapsed() <= state.max_staleness => Reading::Fresh(
                answer
                    .values
                    .iter()
                    .find(|(g, _)| g == group)
                    .map_or(0.0, |(_, v)| *v),
            ),
            _ => Reading::Unavailable,
        }
    }

    /// The query task's families; none while no budget is a cluster budget.
    pub fn families(&self) -> Vec<Family> {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        if state.questions.is_empty() {
            return Vec::new();
        }
        let mut available = Family::new(&metrics::CLUSTER_AVAILABLE);
        let mut age = Family::new(&metrics::CLUSTER_ANSWER_AGE);
        let mut queries = Family::new(&metrics::CLUSTER_QUERIES);
        let mut failures = Family::new(&metrics::CLUSTER_QUERY_FAILURES);
        let none = Answer::default();
        for q in &state.questions {
            let budget = || Arc::<str>::from(q.budget.as_str());
            let answer = state.answers.get(&q.budget).unwrap_or(&none);
            let elapsed = answer.answered.map(|at| at.elapsed());
            let fresh = elapsed.is_some_and(|e| e <= state.max_staleness);
            available.push_labeled(
                vec![
                    ("budget", budget()),
                    ("on_unavailable", Arc::from(q.on_unavailable.as_str())),
                ],
                if fresh { 1.0 } else { 0.0 },
            );
            if let Some(e) = elapsed {
                age.push_labeled(vec![("budget", budget())], e.as_secs_f64());
            }
            queries.push_labeled(vec![("budget", budget())], answer.queries as f64);
            for (reason, n) in REASONS.iter().zip(answer.failures) {
                failures.push_labeled(
                    vec![("budget", budget()), ("reason", Arc::from(*reason))],
                    n as f64,
                );
            }
        }
        vec![available, age, queries, failures]
    }
}
