//! Alert delivery: every budget state change (warn, enforce, release) becomes an alert POSTed to
//! Alertmanager's v2 API (`{base}/api/v2/alerts`) and, optionally, to generic JSON webhooks.
//!
//! The caller is the agent's tick thread, a plain std thread that must never wait on the network:
//! [`AlertSender::fire`] and [`AlertSender::resolve`] only `try_send` into a bounded queue (a full
//! queue drops the new event and counts it in [`AlertStats::dropped`]). A worker task on the tokio
//! runtime keeps the set of active alerts and hands request bodies to one lane per target URL;
//! each lane has its own bounded queue, task and retries with exponential backoff, so a dead
//! receiver delays nobody else.
//!
//! Alertmanager semantics this follows (as Prometheus does):
//! - A firing alert is sent valid until `now + 4 × resend_interval` and re-sent every
//!   `resend_interval` while active, so it stays active however short the receiver's
//!   `resolve_timeout`, and ends on its own soon after an agent dies.
//! - Resolving sends the same label set with `endsAt` = the time of [`AlertSender::resolve`];
//!   resolved alerts are re-sent with the periodic batch for `resolved_retention`, so an
//!   Alertmanager that missed the resolve (restart, outage) still learns it.
//! - A `fire` that changes the label set of a key resolves the old label set first: to
//!   Alertmanager a different label set is a different alert.
//!
//! Webhooks get state changes only (`{"version":"1","status":"firing|resolved","alerts":[...]}`,
//! one alert per message), never the periodic re-sends.
//!
//! Only plain `http://` URLs are supported.

mod lane;
mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use hyper::body::Bytes;
use hyper::Uri;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use lane::{Batch, Lane, Policy};
pub use wire::{rfc3339, Status};

/// One alert as Alertmanager models it: the label set is its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub starts_at: SystemTime,
    /// When the condition ends, if known in advance; `None` while it lasts.
    pub ends_at: Option<SystemTime>,
    /// A link back to what raised the alert.
    pub generator_url: Option<String>,
}

impl Alert {
    /// An alert starting now, with no annotations.
    pub fn new(labels: BTreeMap<String, String>) -> Alert {
        Alert {
            labels,
            annotations: BTreeMap::new(),
            starts_at: SystemTime::now(),
            ends_at: None,
            generator_url: None,
        }
    }
}

/// Where and how alerts are delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertConfig {
    /// Alertmanager base URLs (`http://host:9093`); alerts go to `{base}/api/v2/alerts`, to
    /// every URL independently (the way to feed an Alertmanager cluster).
    pub alertmanager_urls: Vec<String>,
    /// Generic webhook URLs, POSTed a JSON message per state change.
    pub webhook_urls: Vec<String>,
    /// Deadline of one HTTP request, connecting included.
    pub timeout: Duration,
    /// Attempts per request before it is given up (and counted in [`AlertStats::failed`]).
    pub max_attempts: u32,
    /// Wait after the first failed attempt; doubles per attempt, with jitter.
    pub initial_backoff: Duration,
    /// The longest wait between attempts.
    pub max_backoff: Duration,
    /// How often active alerts are re-sent to Alertmanager.
    pub resend_interval: Duration,
    /// How long resolved alerts keep being re-sent to Alertmanager.
    pub resolved_retention: Duration,
    /// Events the caller may queue ahead of the worker (fixed at spawn), and requests each
    /// target may queue (updated on reload).
    pub queue_capacity: usize,
}

impl Default for AlertConfig {
    fn default() -> AlertConfig {
        AlertConfig {
            alertmanager_urls: Vec::new(),
            webhook_urls: Vec::new(),
            timeout: Duration::from_secs(10),
            max_attempts: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            resend_interval: Duration::from_secs(60),
            resolved_retention: Duration::from_secs(15 * 60),
            queue_capacity: 1024,
        }
    }
}

/// One reason an [`AlertConfig`] cannot be used; the field path is in backticks.
#[derive(Debug, thiserror::Error)]
pub enum AlertConfigError {
    #[error("`{field}`: parsing {url:?} as a URL")]
    ParseUrl {
        field: String,
        url: String,
        #[source]
        source: hyper::http::uri::InvalidUri,
    },
    #[error("`{field}`: {url:?} is not an http:// URL with a host (only plain http is supported)")]
    UnsupportedUrl { field: String, url: String },
    #[error("`{field}` must be greater than zero")]
    Zero { field: &'static str },
}

/// Every error of an [`AlertConfig`], reported together.
#[derive(Debug, thiserror::Error)]
#[error("invalid alert configuration: {}", list(.0))]
pub struct InvalidAlertConfig(pub Vec<AlertConfigError>);

fn list(errors: &[AlertConfigError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// What kind of receiver a target URL is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TargetKind {
    Alertmanager,
    Webhook,
}

impl TargetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Alertmanager => "alertmanager",
            TargetKind::Webhook => "webhook",
        }
    }
}

#[derive(Debug, Clone)]
struct Target {
    kind: TargetKind,
    url: String,
    uri: Uri,
}

impl AlertConfig {
    /// Checks the whole configuration and returns every error at once.
    pub fn validate(&self) -> Result<(), InvalidAlertConfig> {
        self.targets().map(|_| ())
    }

    fn targets(&self) -> Result<Vec<Target>, InvalidAlertConfig> {
        let mut errors = Vec::new();
        for (field, value) in [
            ("timeout", self.timeout.is_zero()),
            ("max_attempts", self.max_attempts == 0),
            ("resend_interval", self.resend_interval.is_zero()),
            ("queue_capacity", self.queue_capacity == 0),
        ] {
            if value {
                errors.push(AlertConfigError::Zero { field });
            }
        }
        let mut targets = Vec::new();
        let all = self
            .alertmanager_urls
            .iter()
            .enumerate()
            .map(|(i, u)| (TargetKind::Alertmanager, "alertmanager_urls", i, u))
            .chain(
                self.webhook_urls
                    .iter()
                    .enumerate()
                    .map(|(i, u)| (TargetKind::Webhook, "webhook_urls", i, u)),
            );
        for (kind, name, i, url) in all {
            let field = format!("{name}[{i}]");
            let endpoint = match kind {
                TargetKind::Alertmanager => {
                    format!("{}/api/v2/alerts", url.trim().trim_end_matches('/'))
                }
                TargetKind::Webhook => url.trim().to_owned(),
            };
            match endpoint.parse::<Uri>() {
                Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some() => {
                    // The same URL twice would deliver everything twice.
                    if !targets
                        .iter()
                        .any(|t: &Target| t.kind == kind && t.uri == uri)
                    {
                        targets.push(Target {
                            kind,
                            url: url.clone(),
                            uri,
                        });
                    }
                }
                Ok(_) => errors.push(AlertConfigError::UnsupportedUrl {
                    field,
                    url: url.clone(),
                }),
                Err(source) => errors.push(AlertConfigError::ParseUrl {
                    field,
                    url: url.clone(),
                    source,
                }),
            }
        }
        if errors.is_empty() {
            Ok(targets)
        } else {
            Err(InvalidAlertConfig(errors))
        }
    }

    fn policy(&self) -> Policy {
        Policy {
            timeout: self.timeout,
            max_attempts: self.max_attempts,
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
        }
    }
}

/// What delivery did, for the agent's own metrics. Counts are of requests (one POST to one
/// target), except `dropped`, which counts caller events.
#[derive(Debug, Default)]
pub struct AlertStats {
    /// Requests a target accepted (2xx).
    pub sent: AtomicU64,
    /// Attempts that failed (connection, timeout, non-2xx), retried or not.
    pub failed_attempts: AtomicU64,
    /// Requests given up after their last attempt, or rejected as malformed.
    pub failed: AtomicU64,
    /// `fire`/`resolve` events not queued because the queue was full or the worker gone.
    pub dropped: AtomicU64,
    /// Requests shed from a target's full queue (the oldest goes).
    pub dropped_batches: AtomicU64,
    /// Alerts firing now.
    pub active: AtomicU64,
    targets: Mutex<BTreeMap<(TargetKind, String), TargetCounts>>,
}

/// Per-target counts, same meanings as in [`AlertStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetCounts {
    pub sent: u64,
    pub failed_attempts: u64,
    pub failed: u64,
    pub dropped_batches: u64,
}

impl AlertStats {
    /// Counts per target URL (every target ever configured, so counters stay monotonic).
    pub fn targets(&self) -> Vec<(TargetKind, String, TargetCounts)> {
        self.targets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|((kind, url), counts)| (*kind, url.clone(), *counts))
            .collect()
    }

    fn bump(&self, kind: TargetKind, url: &str, f: impl FnOnce(&mut TargetCounts)) {
        let mut targets = self.targets.lock().unwrap_or_else(PoisonError::into_inner);
        f(targets.entry((kind, url.to_owned())).or_default());
    }
}

#[derive(Debug)]
enum Event {
    Fire { key: String, alert: Alert },
    Resolve { key: String, at: SystemTime },
}

#[derive(Debug)]
enum Reply {
    Blocking(std::sync::mpsc::SyncSender<bool>),
    Async(oneshot::Sender<bool>),
}

impl Reply {
    fn send(self, done: bool) {
        // The asker may have given up waiting; nothing to do then.
        let _ = match self {
            Reply::Blocking(tx) => tx.send(done).map_err(|_| ()),
            Reply::Async(tx) => tx.send(done).map_err(|_| ()),
        };
    }
}

#[derive(Debug)]
enum Control {
    Update(AlertConfig, Vec<Target>),
    Flush(tokio::time::Instant, Reply),
}

/// The handle the agent keeps: cheap to clone, every method returns at once.
#[derive(Debug, Clone)]
pub struct AlertSender {
    events: mpsc::Sender<Event>,
    // Unbounded, but only reloads and shutdown use it, and they are never dropped.
    control: mpsc::UnboundedSender<Control>,
    stats: Arc<AlertStats>,
}

impl AlertSender {
    /// Starts the delivery worker on `runtime`. An empty configuration is valid: events are
    /// accepted and go nowhere until a reload adds targets.
    pub fn spawn(
        config: AlertConfig,
        stats: Arc<AlertStats>,
        runtime: &tokio::runtime::Handle,
    ) -> Result<AlertSender, InvalidAlertConfig> {
        let targets = config.targets()?;
        let (events, events_rx) = mpsc::channel(config.queue_capacity);
        let (control, control_rx) = mpsc::unbounded_channel();
        let (policy, policy_rx) = watch::channel(config.policy());
        let shared = lane::Shared {
            client: lane::http_client(),
            policy: policy_rx,
            stats: stats.clone(),
            idle: Arc::new(Notify::new()),
        };
        let mut worker = Worker {
            config: AlertConfig::default(),
            active: BTreeMap::new(),
            resolved: Vec::new(),
            lanes: BTreeMap::new(),
            policy,
            shared,
        };
        let _guard = runtime.enter();
        worker.reconfigure(config, targets);
        runtime.spawn(worker.run(events_rx, control_rx));
        Ok(AlertSender {
            events,
            control,
            stats,
        })
    }

    /// Raises (or updates) the alert known as `key`. Never blocks; returns false when the event
    /// was dropped (queue full or worker gone), which is counted in [`AlertStats::dropped`].
    pub fn fire(&self, key: String, alert: Alert) -> bool {
        self.send(Event::Fire { key, alert })
    }

    /// Resolves the alert known as `key` as of now. Never blocks; false when dropped, and then
    /// the alert stays firing here (and re-sent) until a later `resolve` is queued, so a caller
    /// should try again on its next tick.
    pub fn resolve(&self, key: String) -> bool {
        self.send(Event::Resolve {
            key,
            at: SystemTime::now(),
        })
    }

    fn send(&self, event: Event) -> bool {
        match self.events.try_send(event) {
            Ok(()) => true,
            Err(error) => {
                let before = self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                // Logs the 1st, 2nd, 4th, 8th, ... drop: visible, but never a line per event.
                if (before + 1).is_power_of_two() {
                    let reason = match error {
                        mpsc::error::TrySendError::Full(_) => "queue full",
                        mpsc::error::TrySendError::Closed(_) => "delivery worker stopped",
                    };
                    warn!(reason, dropped = before + 1, "alert event dropped");
                }
                false
            }
        }
    }

    /// Applies a reloaded configuration: targets no longer listed are dropped with what they
    /// had queued, new Alertmanager targets get every active alert at once. The caller queue's
    /// capacity stays what it was at spawn.
    pub fn update_config(&self, config: AlertConfig) -> Result<(), InvalidAlertConfig> {
        let targets = config.targets()?;
        // Fails only when the worker is gone (runtime shut down): nothing left to configure.
        let _ = self.control.send(Control::Update(config, targets));
        Ok(())
    }

    /// Waits, blocking this thread, until every event sent before has been delivered or given
    /// up, or until `deadline`; true if all was done in time. For shutdown, from a plain
    /// thread: inside async code use [`AlertSender::flush_async`].
    pub fn flush(&self, deadline: Instant) -> bool {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let deadline_tokio = tokio::time::Instant::from_std(deadline);
        if self
            .control
            .send(Control::Flush(deadline_tokio, Reply::Blocking(tx)))
            .is_err()
        {
            return false;
        }
        rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or(false)
    }

    /// [`AlertSender::flush`] for async callers.
    pub async fn flush_async(&self, deadline: Instant) -> bool {
        let (tx, rx) = oneshot::channel();
        let deadline = tokio::time::Instant::from_std(deadline);
        if self
            .control
            .send(Control::Flush(deadline, Reply::Async(tx)))
            .is_err()
        {
            return false;
        }
        tokio::time::timeout_at(deadline, rx)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false)
    }

    pub fn stats(&self) -> &Arc<AlertStats> {
        &self.stats
    }
}

/// The most alerts in one Alertmanager request.
const ALERTS_PER_REQUEST: usize = 64;

#[derive(Debug)]
struct Worker {
    config: AlertConfig,
    /// Firing alerts by caller key.
    active: BTreeMap<String, Alert>,
    /// Resolved alerts (with `ends_at` set) still re-sent, and until when.
    resolved: Vec<(Alert, Instant)>,
    /// By kind and endpoint URI (as text: `Uri` has no order).
    lanes: BTreeMap<(TargetKind, String), (Arc<Lane>, JoinHandle<()>)>,
    policy: watch::Sender<Policy>,
    shared: lane::Shared,
}

impl Worker {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) {
        let mut resend = self.resend_timer();
        loop {
            tokio::select! {
                // Reloads and flushes first: a flush must see the configuration it was sent after.
                biased;
                Some(command) = control.recv() => match command {
                    Control::Update(config, targets) => {
                        let interval = config.resend_interval;
                        let changed = interval != self.config.resend_interval;
                        self.reconfigure(config, targets);
                        if changed {
                            resend = self.resend_timer();
                        }
                    }
                    Control::Flush(deadline, reply) => {
                        // Events sent before the flush are in the queue already.
                        while let Ok(event) = events.try_recv() {
                            self.handle(event);
                        }
                        self.spawn_flush(deadline, reply);
                    }
                },
                event = events.recv() => match event {
                    Some(event) => self.handle(event),
                    None => break,
                },
                _ = resend.tick() => self.resend(None),
            }
        }
        // Every sender is gone: let the lanes deliver what they hold, then end.
        for (lane, _) in self.lanes.values() {
            lane.close();
        }
    }

    fn resend_timer(&self) -> tokio::time::Interval {
        let period = self.config.resend_interval.max(Duration::from_millis(1));
        let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer
    }

    fn reconfigure(&mut self, config: AlertConfig, targets: Vec<Target>) {
        self.policy.send_replace(config.policy());
        let wanted: BTreeSet<(TargetKind, String)> = targets
            .iter()
            .map(|t| (t.kind, t.uri.to_string()))
            .collect();
        self.lanes.retain(|key, (_, task)| {
            let keep = wanted.contains(key);
            if !keep {
                task.abort();
            }
            keep
        });
        let mut added = Vec::new();
        for target in targets {
            let key = (target.kind, target.uri.to_string());
            if let Some((lane, _)) = self.lanes.get(&key) {
                lane.set_capacity(config.queue_capacity);
                continue;
            }
            let lane = Lane::new(target.kind, target.url, target.uri, config.queue_capacity);
            let task = tokio::spawn(lane::run(lane.clone(), self.shared.clone()));
            if target.kind == TargetKind::Alertmanager {
                added.push(lane.clone());
            }
            self.lanes.insert(key, (lane, task));
        }
        self.config = config;
        if !added.is_empty() {
            self.resend(Some(&added));
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Fire { key, alert } => {
                if let Some(old) = self.active.get(&key) {
                    // Nothing changed: the periodic re-send covers Alertmanager, and webhooks
                    // hear changes only.
                    if *old == alert {
                        return;
                    }
                    if old.labels != alert.labels {
                        let mut old = old.clone();
                        old.ends_at = Some(SystemTime::now());
                        self.change(&old, Status::Resolved);
                        self.remember_resolved(old);
                    }
                }
                // Firing again what was just resolved: stop re-sending it as resolved.
                self.resolved.retain(|(r, _)| r.labels != alert.labels);
                self.change(&alert, Status::Firing);
                self.active.insert(key, alert);
            }
            Event::Resolve { key, at } => match self.active.remove(&key) {
                Some(mut alert) => {
                    alert.ends_at = Some(at.max(alert.starts_at));
                    self.change(&alert, Status::Resolved);
                    self.remember_resolved(alert);
                }
                None => debug!(%key, "resolve of an alert that is not firing"),
            },
        }
        self.shared
            .stats
            .active
            .store(self.active.len() as u64, Ordering::Relaxed);
    }

    fn remember_resolved(&mut self, alert: Alert) {
        self.resolved.retain(|(r, _)| r.labels != alert.labels);
        self.resolved
            .push((alert, Instant::now() + self.config.resolved_retention));
    }

    /// Until when a firing alert without its own end is valid.
    fn firing_until(&self) -> SystemTime {
        SystemTime::now() + self.config.resend_interval.saturating_mul(4)
    }

    /// One state change, to every target.
    fn change(&self, alert: &Alert, status: Status) {
        let am = self.body(
            wire::alertmanager_body(std::slice::from_ref(alert), self.firing_until()),
            status.as_str(),
        );
        let hook = self.body(wire::webhook_body(status, alert), status.as_str());
        for (lane, _) in self.lanes.values() {
            let batch = match lane.kind {
                TargetKind::Alertmanager => &am,
                TargetKind::Webhook => &hook,
            };
            if let Some(batch) = batch {
                lane.push(batch.clone(), &self.shared.stats);
            }
        }
    }

    /// Every active and recently resolved alert, to Alertmanager targets (all, or `only`).
    fn resend(&mut self, only: Option<&[Arc<Lane>]>) {
        let now = Instant::now();
        self.resolved.retain(|(_, until)| *until > now);
        let alerts: Vec<Alert> = self
            .active
            .values()
            .chain(self.resolved.iter().map(|(a, _)| a))
            .cloned()
            .collect();
        let until = self.firing_until();
        let batches: Vec<Batch> = alerts
            .chunks(ALERTS_PER_REQUEST)
            .filter_map(|chunk| self.body(wire::alertmanager_body(chunk, until), "resend"))
            .collect();
        let lanes: Vec<&Arc<Lane>> = match only {
            Some(only) => only.iter().collect(),
            None => self
                .lanes
                .values()
                .map(|(lane, _)| lane)
                .filter(|lane| lane.kind == TargetKind::Alertmanager)
                .collect(),
        };
        for lane in lanes {
            for batch in &batches {
                lane.push(batch.clone(), &self.shared.stats);
            }
        }
    }

    fn body(
        &self,
        encoded: Result<Vec<u8>, serde_json::Error>,
        what: &'static str,
    ) -> Option<Batch> {
        match encoded {
            Ok(body) => Some(Batch {
                body: Bytes::from(body),
                what,
            }),
            Err(error) => {
                // String maps always encode; this is here so that a surprise is not a panic.
                warn!(%error, "encoding an alert failed");
                self.shared.stats.failed.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Answers `reply` once every lane is idle, or at `deadline`, without holding up the worker.
    fn spawn_flush(&self, deadline: tokio::time::Instant, reply: Reply) {
        let lanes: Vec<Arc<Lane>> = self.lanes.values().map(|(l, _)| l.clone()).collect();
        let idle = self.shared.idle.clone();
        tokio::spawn(async move {
            loop {
                let notified = idle.notified();
                tokio::pin!(notified);
                // Registered before the check, so a lane going idle in between still wakes us.
                notified.as_mut().enable();
                if lanes.iter().all(|l| l.idle()) {
                    reply.send(true);
                    return;
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    reply.send(false);
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests;
