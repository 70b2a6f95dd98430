//! Budget alerts: the engine's state changes delivered to Alertmanager and webhooks by the
//! exporters' sender, which never blocks the tick.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tally_exporters::alerts::{Alert, AlertConfig, AlertSender, AlertStats};
use tally_exporters::Family;

use crate::catalogue;
use crate::config::Config;

/// The sender's settings from `[alerts]`.
pub fn settings(config: &Config) -> AlertConfig {
    let a = &config.alerts;
    AlertConfig {
        alertmanager_urls: a.alertmanager_urls.clone(),
        webhook_urls: a.webhook_urls.clone(),
        timeout: Duration::from_millis(a.timeout_ms),
        max_attempts: a.max_attempts,
        resend_interval: Duration::from_secs(a.resend_interval_secs),
        ..AlertConfig::default()
    }
}

/// The engine's view of the sender.
#[derive(Debug)]
pub struct Sink(pub AlertSender);

impl crate::budget::AlertSink for Sink {
    fn fire(
        &self,
        key: String,
        labels: BTreeMap<String, String>,
        annotations: BTreeMap<String, String>,
    ) {
        let mut alert = Alert::new(labels);
        alert.annotations = annotations;
        if !self.0.fire(key, alert) {
            tracing::warn!("alert queue full: an alert was dropped (tally_alerts_dropped_total)");
        }
    }

    fn resolve(&self, key: String) {
        if !self.0.resolve(key) {
            tracing::warn!(
                "alert queue full: a resolution was dropped (tally_alerts_dropped_total)"
            );
        }
    }
}

/// The sender's counters as the agent's own metrics.
pub fn families(stats: &AlertStats) -> Vec<Family> {
    let mut requests = Family::new(&catalogue::agent::ALERT_REQUESTS);
    let mut attempts = Family::new(&catalogue::agent::ALERT_FAILED_ATTEMPTS);
    for (kind, url, counts) in stats.targets() {
        let target = || {
            vec![
                ("kind", Arc::from(kind.as_str())),
                ("url", Arc::from(url.as_str())),
            ]
        };
        for (result, n) in [
            ("sent", counts.sent),
            ("failed", counts.failed),
            ("dropped", counts.dropped_batches),
        ] {
            let mut labels = target();
            labels.push(("result", Arc::from(result)));
            requests.push_labeled(labels, n as f64);
        }
        attempts.push_labeled(target(), counts.failed_attempts as f64);
    }
    let mut dropped = Family::new(&catalogue::agent::ALERTS_DROPPED);
    dropped.push_labeled(Vec::new(), stats.dropped.load(Relaxed) as f64);
    let mut active = Family::new(&catalogue::agent::ALERTS_ACTIVE);
    active.push_labeled(Vec::new(), stats.active.load(Relaxed) as f64);
    vec![requests, attempts, dropped, active]
}
