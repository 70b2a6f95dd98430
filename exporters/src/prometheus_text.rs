//! Prometheus text exposition (format 0.0.4), encoded with the `prometheus` crate's model and
//! encoder, plus a gzip copy made at the same time so that a scrape never compresses.

use std::io::Write;

use flate2::{write::GzEncoder, Compression};
use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};
use prometheus::{Encoder, TextEncoder};

use crate::{Family, Kind, Snapshot};

/// `Content-Type` of [`Rendered::text`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A snapshot encoded once, served many times. `gzip` is empty when it was not asked for.
#[derive(Debug, Clone, Default)]
pub struct Rendered {
    pub text: Vec<u8>,
    pub gzip: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("prometheus text encoding failed")]
    Encode(#[source] prometheus::Error),
    #[error("gzip compression failed")]
    Gzip(#[source] std::io::Error),
}

/// Encodes `snapshot` as Prometheus text, and its gzip when `gzip` (compressing a large
/// exposition is most of the render cost, so it is skipped while nobody asks for it).
pub fn render(snapshot: &Snapshot, gzip: bool) -> Result<Rendered, EncodeError> {
    let families: Vec<MetricFamily> = snapshot
        .families
        .iter()
        .filter(|f| !f.samples.is_empty())
        .map(to_proto)
        .collect();
    let mut text = Vec::with_capacity(64 * 1024);
    TextEncoder::new()
        .encode(&families, &mut text)
        .map_err(EncodeError::Encode)?;
    let gzip = if gzip {
        let mut gz = GzEncoder::new(Vec::with_capacity(text.len() / 4), Compression::fast());
        gz.write_all(&text).map_err(EncodeError::Gzip)?;
        gz.finish().map_err(EncodeError::Gzip)?
    } else {
        Vec::new()
    };
    Ok(Rendered { text, gzip })
}

fn to_proto(family: &Family) -> MetricFamily {
    let mut mf = MetricFamily::default();
    mf.set_name(family.name.to_owned());
    mf.set_help(family.help.to_owned());
    mf.set_field_type(match family.kind {
        Kind::Counter => MetricType::COUNTER,
        Kind::Gauge => MetricType::GAUGE,
        Kind::Histogram => MetricType::HISTOGRAM,
    });
    let metrics = family
        .samples
        .iter()
        .map(|sample| {
            let mut m = Metric::default();
            let labels = sample
                .labels
                .iter()
                .chain(sample.extra.iter())
                .map(|(name, value)| {
                    let mut pair = LabelPair::default();
                    pair.set_name((*name).to_owned());
                    pair.set_value(value.to_string());
                    pair
                })
                .collect();
            m.set_label(labels);
            match family.kind {
                Kind::Counter => {
                    let mut c = Counter::default();
                    c.set_value(sample.value);
                    m.set_counter(c);
                }
                Kind::Gauge => {
                    let mut g = Gauge::default();
                    g.set_value(sample.value);
                    m.set_gauge(g);
                }
                Kind::Histogram => {
                    let mut h = Histogram::default();
                    if let Some(hist) = &sample.histogram {
                        h.set_sample_count(hist.count);
                        h.set_sample_sum(hist.sum);
                        let buckets = hist
                            .buckets
                            .iter()
                            .map(|(le, count)| {
                                let mut b = Bucket::default();
                                b.set_upper_bound(*le);
                                b.set_cumulative_count(*count);
                                b
                            })
                            .collect();
                        h.set_bucket(buckets);
                    }
                    m.set_histogram(h);
                }
            }
            m
        })
        .collect();
    mf.set_metric(metrics);
    mf
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{LabelSet, Metric};

    /// A declaration for a test family (the agent's are `static`s in its catalogue).
    fn metric(name: &'static str, help: &'static str, kind: Kind) -> &'static Metric {
        Box::leak(Box::new(Metric {
            name,
            help,
            kind,
            unit: "",
            per_workload: false,
            labels: &[],
        }))
    }

    #[test]
    fn renders_counters_and_gauges_with_labels_in_order() {
        let labels: LabelSet = Arc::from(vec![
            ("namespace", Arc::from("ml")),
            ("pod", Arc::from("train-0")),
            ("container", Arc::from("a\"b")),
        ]);
        let mut cpu = Family::new(metric(
            "tally_workload_cpu_seconds_total",
            "CPU time.",
            Kind::Counter,
        ));
        cpu.push(&labels, 1.5);
        let mut mem = Family::new(metric(
            "tally_workload_memory_bytes",
            "Memory.",
            Kind::Gauge,
        ));
        mem.push(&labels, 4096.0);
        let empty = Family::new(metric("tally_nothing", "Never shown.", Kind::Gauge));
        let mut latency = Family::new(metric(
            "tally_workload_disk_io_latency_seconds",
            "Latency.",
            Kind::Histogram,
        ));
        latency.push_histogram(
            &labels,
            vec![("op", Arc::from("write"))],
            crate::Histogram {
                buckets: vec![(0.001, 2), (0.002, 5)],
                sum: 0.0075,
                count: 6,
            },
        );
        let snapshot = Snapshot {
            families: vec![cpu, mem, empty, latency],
        };
        assert!(render(&snapshot, false).unwrap().gzip.is_empty());
        let rendered = render(&snapshot, true).unwrap();
        let text = String::from_utf8(rendered.text.clone()).unwrap();
        assert!(text.contains("# TYPE tally_workload_cpu_seconds_total counter\n"));
        assert!(text.contains(
            "tally_workload_cpu_seconds_total{namespace=\"ml\",pod=\"train-0\",container=\"a\\\"b\"} 1.5\n"
        ));
        assert!(text.contains("tally_workload_memory_bytes{namespace=\"ml\",pod=\"train-0\",container=\"a\\\"b\"} 4096\n"));
        assert!(!text.contains("tally_nothing"));
        assert!(text.contains("# TYPE tally_workload_disk_io_latency_seconds histogram\n"));
        assert!(text.contains("tally_workload_disk_io_latency_seconds_bucket{namespace=\"ml\",pod=\"train-0\",container=\"a\\\"b\",op=\"write\",le=\"0.002\"} 5\n"), "{text}");
        assert!(text.contains("le=\"+Inf\"} 6\n"));
        assert!(text.contains("tally_workload_disk_io_latency_seconds_sum{namespace=\"ml\",pod=\"train-0\",container=\"a\\\"b\",op=\"write\"} 0.0075\n"));

        let mut unzipped = String::new();
        std::io::Read::read_to_string(
            &mut flate2::read::GzDecoder::new(&rendered.gzip[..]),
            &mut unzipped,
        )
        .unwrap();
        assert_eq!(unzipped, text);
    }
}
