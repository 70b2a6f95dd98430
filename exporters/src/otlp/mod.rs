//! OTLP push of the same snapshot `/metrics` serves, over gRPC or HTTP/protobuf, through
//! `opentelemetry-otlp`'s exporter.
//!
//! The SDK's periodic reader is not used: the agent already has its numbers (cumulative counters
//! and gauges computed each tick), and it needs what the reader does not give — a bounded queue
//! that drops the oldest batch (counted) when the collector is down, bounded retries, and a flush
//! of the last tick on shutdown. Counters are sent with cumulative temporality, so a dropped batch
//! loses resolution, never totals; a series whose total goes backwards gets a new start time
//! ([`starts`]).

mod starts;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{MetricExporter, Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::metrics::data::{
    DataPoint, Gauge, Histogram as OtlpHistogram, HistogramDataPoint, Metric, ResourceMetrics,
    ScopeMetrics, Sum,
};
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::Temporality;
use opentelemetry_sdk::Resource;

use crate::{Kind, Snapshot};

/// Wire protocol of the collector endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// OTLP/gRPC, conventionally port 4317.
    Grpc,
    /// OTLP/HTTP with protobuf bodies to `<endpoint>/v1/metrics`, conventionally port 4318.
    HttpProtobuf,
}

#[derive(Debug, Clone)]
pub struct OtlpSettings {
    pub endpoint: String,
    pub transport: Transport,
    /// Deadline of one export call.
    pub timeout: Duration,
    /// Batches kept while the collector is unreachable; the oldest is dropped beyond this.
    pub queue_batches: usize,
    /// Attempts per batch and push before it waits for the next push.
    pub max_attempts: u32,
    /// Resource attributes (`service.name`, `host.name`, ...).
    pub resource: Vec<(String, String)>,
}

/// What the pusher did, for the agent's own metrics.
#[derive(Debug, Default)]
pub struct OtlpStats {
    pub exported: AtomicU64,
    pub failed_attempts: AtomicU64,
    pub dropped: AtomicU64,
    pub queued: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("building the OTLP {transport:?} exporter for {endpoint}")]
    Build {
        endpoint: String,
        transport: Transport,
        #[source]
        source: opentelemetry_sdk::metrics::MetricError,
    },
}

/// Converts snapshots into OTLP batches and sends them, oldest first.
pub struct Pusher {
    exporter: MetricExporter,
    settings: OtlpSettings,
    resource: Resource,
    scope: InstrumentationScope,
    starts: starts::Starts,
    queue: VecDeque<ResourceMetrics>,
    stats: Arc<OtlpStats>,
}

impl std::fmt::Debug for Pusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pusher")
            .field("settings", &self.settings)
            .field("queued", &self.queue.len())
            .finish_non_exhaustive()
    }
}

impl Pusher {
    /// Builds the exporter; connecting happens lazily on the first export, so a collector that
    /// is down at start is not an error.
    pub fn new(settings: OtlpSettings, stats: Arc<OtlpStats>) -> Result<Pusher, OtlpError> {
        let built = match settings.transport {
            Transport::Grpc => MetricExporter::builder()
                .with_tonic()
                .with_endpoint(settings.endpoint.clone())
                .with_timeout(settings.timeout)
                .with_temporality(Temporality::Cumulative)
                .build(),
            Transport::HttpProtobuf => MetricExporter::builder()
                .with_http()
                .with_http_client(
                    opentelemetry_http::hyper::HyperClient::with_default_connector(
                        settings.timeout,
                        None,
                    ),
                )
                .with_endpoint(format!(
                    "{}/v1/metrics",
                    settings.endpoint.trim_end_matches('/')
                ))
                .with_protocol(Protocol::HttpBinary)
                .with_timeout(settings.timeout)
                .with_temporality(Temporality::Cumulative)
                .build(),
        };
        let exporter = built.map_err(|source| OtlpError::Build {
            endpoint: settings.endpoint.clone(),
            transport: settings.transport,
            source,
        })?;
        let resource = Resource::new(
            settings
                .resource
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        );
        Ok(Pusher {
            exporter,
            resource,
            scope: InstrumentationScope::builder("tally")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            starts: starts::Starts::new(SystemTime::now()),
            queue: VecDeque::new(),
            settings,
            stats,
        })
    }

    /// Queues the snapshot as one batch, dropping the oldest when the queue is full.
    pub fn enqueue(&mut self, snapshot: &Snapshot) {
        let batch = self.convert(snapshot, SystemTime::now());
        while self.queue.len() >= self.settings.queue_batches.max(1) {
            self.queue.pop_front();
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.queue.push_back(batch);
        self.stats
            .queued
            .store(self.queue.len() as u64, Ordering::Relaxed);
    }

    /// Sends queued batches oldest first; stops at the first batch that fails every attempt
    /// (it stays queued for the next push). Returns how many were sent.
    pub async fn send(&mut self) -> usize {
        let mut sent = 0;
        while let Some(batch) = self.queue.front_mut() {
            let mut delivered = false;
            for attempt in 0..self.settings.max_attempts.max(1) {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(100 << attempt.min(5))).await;
                }
                let exported =
                    tokio::time::timeout(self.settings.timeout, self.exporter.export(batch)).await;
                match exported {
                    Ok(Ok(())) => {
                        delivered = true;
                        break;
                    }
                    Ok(Err(e)) => {
                        self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(error = %e, attempt, "OTLP export failed");
                    }
                    Err(_) => {
                        self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(attempt, "OTLP export timed out");
                    }
                }
            }
            if !delivered {
                break;
            }
            self.queue.pop_front();
            self.stats.exported.fetch_add(1, Ordering::Relaxed);
            sent += 1;
        }
        self.stats
            .queued
            .store(self.queue.len() as u64, Ordering::Relaxed);
        sent
    }

    /// Releases the exporter.
    pub fn shutdown(&self) {
        if let Err(e) = self.exporter.shutdown() {
            tracing::debug!(error = %e, "OTLP exporter shutdown");
        }
    }

    fn convert(&mut self, snapshot: &Snapshot, now: SystemTime) -> ResourceMetrics {
        self.starts.begin(now);
        let starts = &mut self.starts;
        let metrics = snapshot
            .families
            .iter()
            .filter(|f| !f.samples.is_empty())
            .map(|family| {
                let attributes = |sample: &crate::Sample| -> Vec<KeyValue> {
                    // An empty label is an absent label in Prometheus; send it the same way.
                    sample
                        .labels
                        .iter()
                        .chain(sample.extra.iter())
                        .filter(|(_, v)| !v.is_empty())
                        .map(|(k, v)| KeyValue::new(*k, v.to_string()))
                        .collect()
                };
                // The series as the receiver tells it apart: its name and attributes.
                let series = |sample: &crate::Sample| -> starts::SeriesKey {
                    let labels = sample.labels.iter().chain(sample.extra.iter());
                    let labels = labels.filter(|(_, v)| !v.is_empty());
                    (
                        family.name,
                        labels.map(|(k, v)| (*k, v.to_string())).collect(),
                    )
                };
                let mut points = |cumulative: bool| -> Vec<DataPoint<f64>> {
                    family
                        .samples
                        .iter()
                        .map(|sample| DataPoint {
                            attributes: attributes(sample),
                            start_time: cumulative
                                .then(|| starts.start(series(sample), sample.value)),
                            time: Some(now),
                            value: sample.value,
                            exemplars: Vec::new(),
                        })
                        .collect()
                };
                let data: Box<dyn opentelemetry_sdk::metrics::data::Aggregation> = match family.kind
                {
                    Kind::Counter => Box::new(Sum {
                        data_points: points(true),
                        temporality: Temporality::Cumulative,
                        is_monotonic: true,
                    }),
                    Kind::Gauge => Box::new(Gauge {
                        data_points: points(false),
                    }),
                    Kind::Histogram => Box::new(OtlpHistogram {
                        temporality: Temporality::Cumulative,
                        data_points: family
                            .samples
                            .iter()
                            .filter_map(|sample| {
                                let h = sample.histogram.as_ref()?;
                                // OTLP buckets are per-bucket counts with an overflow bucket;
                                // Prometheus' are cumulative.
                                let mut previous = 0;
                                let mut bucket_counts: Vec<u64> = h
                                    .buckets
                                    .iter()
                                    .map(|(_, c)| {
                                        let n = c.saturating_sub(previous);
                                        previous = *c;
                                        n
                                    })
                                    .collect();
                                bucket_counts.push(h.count.saturating_sub(previous));
                                Some(HistogramDataPoint {
                                    attributes: attributes(sample),
                                    start_time: starts.start(series(sample), h.count as f64),
                                    time: now,
                                    count: h.count,
                                    bounds: h.buckets.iter().map(|(le, _)| *le).collect(),
                                    bucket_counts,
                                    min: None,
                                    max: None,
                                    sum: h.sum,
                                    exemplars: Vec::new(),
                                })
                            })
                            .collect(),
                    }),
                };
                Metric {
                    name: family.name.into(),
                    description: family.help.into(),
                    unit: "".into(),
                    data,
                }
            })
            .collect();
        self.starts.end();
        ResourceMetrics {
            resource: self.resource.clone(),
            scope_metrics: vec![ScopeMetrics {
                scope: self.scope.clone(),
                metrics,
            }],
        }
    }
}
