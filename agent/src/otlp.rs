//! The OTLP push task: every `otlp.interval_secs` it queues the latest tick's snapshot and sends
//! what is queued; on shutdown it queues and sends the last one within the drain deadline. It
//! runs on the async runtime and only reads a watch channel, so a slow or absent collector never
//! delays a tick or a scrape.

use std::sync::Arc;
use std::time::Duration;

use tally_exporters::otlp::{OtlpSettings, Pusher, Transport};
use tally_exporters::Snapshot;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, OtlpProtocol};

/// The settings the exporter needs, from the configuration and the environment.
pub fn settings(config: &Config) -> Option<OtlpSettings> {
    let otlp = &config.otlp;
    if otlp.endpoint.is_empty() {
        return None;
    }
    let mut resource = vec![
        ("service.name".to_owned(), "tally".to_owned()),
        (
            "service.version".to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
        ),
    ];
    let hostname = config.hostname();
    if !hostname.is_empty() {
        resource.push(("host.name".to_owned(), hostname));
    }
    // The DaemonSet passes the node name through the downward API.
    if let Ok(node) = std::env::var("NODE_NAME") {
        resource.push(("k8s.node.name".to_owned(), node));
    }
    Some(OtlpSettings {
        endpoint: otlp.endpoint.clone(),
        transport: match otlp.protocol {
            OtlpProtocol::Grpc => Transport::Grpc,
            OtlpProtocol::HttpProtobuf => Transport::HttpProtobuf,
        },
        timeout: Duration::from_millis(otlp.timeout_ms),
        queue_batches: otlp.queue_batches,
        max_attempts: otlp.max_attempts,
        resource,
    })
}

/// Pushes until `cancel`, then flushes the latest snapshot within `flush_deadline`.
pub async fn run(
    mut pusher: Pusher,
    interval: Duration,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    cancel: CancellationToken,
    flush_deadline: Duration,
) {
    let mut timer = tokio::time::interval(interval);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = timer.tick() => {
                let latest = snapshots.borrow_and_update().clone();
                if latest.families.is_empty() {
                    continue;
                }
                pusher.enqueue(&latest);
                // Sending may take several timeouts; a shutdown interrupts it.
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = pusher.send() => {}
                }
            }
        }
    }
    let latest = snapshots.borrow().clone();
    if !latest.families.is_empty() {
        pusher.enqueue(&latest);
    }
    match tokio::time::timeout(flush_deadline, pusher.send()).await {
        Ok(_) => tracing::info!("OTLP: flushed on shutdown"),
        Err(_) => tracing::warn!("OTLP: flush on shutdown did not finish within the deadline"),
    }
    pusher.shutdown();
}
