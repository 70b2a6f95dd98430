//! Tally's metric snapshot model and its encoders.
//!
//! A [`Snapshot`] is what one agent tick measured, already attributed to workloads: families of
//! counters and gauges with their label sets. It knows nothing of how the numbers were measured.
//! Encoders turn it into wire formats: [`prometheus_text`] renders the Prometheus text exposition
//! format (plain and gzip) once per tick so that a scrape only copies bytes. [`alerts`] delivers
//! budget alerts to Alertmanager and generic webhooks.

pub mod alerts;
pub mod otlp;
pub mod prometheus_text;
mod snapshot;

pub use snapshot::{Family, Histogram, Kind, LabelSet, Metric, Sample, Snapshot};
