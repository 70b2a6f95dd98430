//! OTLP push against a real receiver (opentelemetry-proto types over tonic, and HTTP/protobuf):
//! names, attributes and values match `/metrics`; a down collector costs dropped batches, never
//! the scrape; the last tick is flushed on SIGTERM.
#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "integration test: its helpers fail the test with the error"
)]

use std::collections::BTreeMap;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point;
use opentelemetry_proto::tonic::metrics::v1::AggregationTemporality;
use tally_tests::agent::{sample, Agent};
use tally_tests::otlp_receiver::Receiver;

/// A fixture cgroup tree whose values never change, so a push and a scrape agree exactly.
fn fixture() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::write(r.join("cgroup.controllers"), "cpu memory io\n").unwrap();
    for (unit, usec, mem) in [("a.service", 1_500_000, 4096), ("b.service", 250_000, 8192)] {
        let dir = r.join("system.slice").join(unit);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cpu.stat"), format!("usage_usec {usec}\n")).unwrap();
        std::fs::write(dir.join("memory.current"), format!("{mem}\n")).unwrap();
        std::fs::write(dir.join("io.stat"), "8:0 rbytes=100 wbytes=200\n").unwrap();
    }
    root
}

fn config(root: &std::path::Path, otlp: &str) -> String {
    format!(
        "[agent]\ntick_interval_ms = 100\n[paths]\ncgroup_root = \"{}\"\n[cri]\nendpoints = []\n[ebpf]\nenabled = false\n[otlp]\n{otlp}\n",
        root.display()
    )
}

/// `name{k="v",...} value` lines for every data point, attributes sorted, as `/metrics` would
/// print them without empty labels.
fn points(request: &ExportMetricsServiceRequest) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for rm in &request.resource_metrics {
        for sm in &rm.scope_metrics {
            for metric in &sm.metrics {
                let dps = match &metric.data {
                    Some(Data::Sum(sum)) => {
                        assert!(sum.is_monotonic, "{} monotonic", metric.name);
                        assert_eq!(
                            sum.aggregation_temporality,
                            AggregationTemporality::Cumulative as i32,
                            "{} cumulative",
                            metric.name
                        );
                        &sum.data_points
                    }
                    Some(Data::Gauge(g)) => &g.data_points,
                    other => panic!("{}: unexpected data {other:?}", metric.name),
                };
                for dp in dps {
                    let mut attrs: Vec<(String, String)> = dp
                        .attributes
                        .iter()
                        .map(|kv| {
                            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                Some(Value::StringValue(s)) => s.clone(),
                                other => panic!("attribute {}: {other:?}", kv.key),
                            };
                            (kv.key.clone(), v)
                        })
                        .collect();
                    attrs.sort();
                    let value = match dp.value {
                        Some(number_data_point::Value::AsDouble(v)) => v,
                        Some(number_data_point::Value::AsInt(v)) => v as f64,
                        None => panic!("no value"),
                    };
                    out.insert(key(&metric.name, &attrs), value);
                }
            }
        }
    }
    out
}

fn key(name: &str, attrs: &[(String, String)]) -> String {
    let inner: Vec<String> = attrs.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

/// The same map from the text exposition, empty labels dropped.
fn scraped(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut attrs: Vec<(String, String)> = Vec::new();
        // Label values here never contain `",`.
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once("=\"").unwrap();
            let v = v.trim_end_matches('"');
            if !v.is_empty() {
                attrs.push((k.to_owned(), v.to_owned()));
            }
        }
        attrs.sort();
        out.insert(key(name, &attrs), value.parse().unwrap());
    }
    out
}

fn resource(request: &ExportMetricsServiceRequest) -> BTreeMap<String, String> {
    request.resource_metrics[0]
        .resource
        .as_ref()
        .unwrap()
        .attributes
        .iter()
        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some((kv.key.clone(), s.clone())),
            _ => None,
        })
        .collect()
}

fn push_matches_scrape(receiver: Receiver, protocol: &str) {
    let root = fixture();
    let agent = Agent::start(&config(
        root.path(),
        &format!(
            "endpoint = \"{}\"\nprotocol = \"{protocol}\"\ninterval_secs = 1\n",
            receiver.endpoint()
        ),
    ));
    let requests = receiver.wait_for(2, Duration::from_secs(10));
    let pushed = points(requests.last().unwrap());
    let text = agent.scrape();
    let scraped = scraped(&text);
    // Series that do not move between ticks must agree exactly.
    let stable = [
        "tally_workload_cpu_seconds_total",
        "tally_workload_memory_bytes",
        "tally_workload_disk_read_bytes_total",
        "tally_workload_disk_write_bytes_total",
        "tally_workload_info",
        "tally_build_info",
        "tally_workloads",
    ];
    let mut compared = 0;
    for (series, value) in &scraped {
        if stable.iter().any(|s| series.starts_with(&format!("{s}{{"))) {
            assert_eq!(
                pushed.get(series),
                Some(value),
                "{series} in the push: {pushed:#?}"
            );
            compared += 1;
        }
    }
    assert!(compared >= 12, "compared {compared} series");
    // Every pushed family exists in /metrics under the same name.
    for series in pushed.keys() {
        let name = series.split('{').next().unwrap();
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} not in /metrics"
        );
    }
    assert_eq!(
        pushed.get("tally_workload_cpu_seconds_total{unit=\"a.service\"}"),
        Some(&1.5)
    );
    let attrs = resource(requests.last().unwrap());
    assert_eq!(attrs.get("service.name").map(String::as_str), Some("tally"));
    assert!(attrs.contains_key("service.version"));
    assert!(attrs.contains_key("host.name"), "{attrs:?}");
    agent.scrape_until(Duration::from_secs(5), "exported batches counted", |t| {
        sample(t, "tally_otlp_batches_total", &["result=\"exported\""]).is_some_and(|n| n >= 2.0)
    });
}

#[test]
fn grpc_push_matches_the_scrape() {
    push_matches_scrape(Receiver::grpc(), "grpc");
}

#[test]
fn http_protobuf_push_matches_the_scrape() {
    push_matches_scrape(Receiver::http(), "http/protobuf");
}

#[test]
fn a_down_collector_drops_counted_batches_and_never_the_scrape() {
    let root = fixture();
    // A port nothing listens on.
    let port = tally_tests::agent::free_port();
    let agent = Agent::start(&config(
        root.path(),
        &format!(
            "endpoint = \"http://127.0.0.1:{port}\"\ninterval_secs = 1\ntimeout_ms = 200\nqueue_batches = 2\nmax_attempts = 1\n"
        ),
    ));
    let text = agent.scrape_until(Duration::from_secs(10), "dropped batches", |t| {
        sample(t, "tally_otlp_batches_total", &["result=\"dropped\""]).is_some_and(|n| n >= 1.0)
    });
    assert!(sample(&text, "tally_otlp_export_failures_total", &[]).is_some_and(|n| n >= 2.0));
    assert_eq!(sample(&text, "tally_otlp_queue_batches", &[]), Some(2.0));
    assert_eq!(
        sample(&text, "tally_otlp_batches_total", &["result=\"exported\""]),
        Some(0.0)
    );
    // The scrape is as fast and complete as ever.
    assert!(text.contains("tally_workload_cpu_seconds_total{"));
    assert_eq!(agent.get("/readyz").unwrap().status, 200);
    let started = std::time::Instant::now();
    agent.scrape();
    assert!(started.elapsed() < Duration::from_millis(500));
}

#[test]
fn the_last_tick_is_flushed_on_sigterm() {
    let receiver = Receiver::grpc();
    let root = fixture();
    let mut agent = Agent::start(&config(
        root.path(),
        &format!(
            "endpoint = \"{}\"\ninterval_secs = 3600\n",
            receiver.endpoint()
        ),
    ));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        receiver.requests().len(),
        0,
        "no periodic push within an hour's interval"
    );
    agent.signal(libc::SIGTERM);
    let status = agent
        .wait_exit(Duration::from_secs(5))
        .expect("exit within 5 s");
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    let requests = receiver.requests();
    assert_eq!(requests.len(), 1, "{}", agent.log());
    let pushed = points(&requests[0]);
    assert_eq!(
        pushed.get("tally_workload_memory_bytes{unit=\"b.service\"}"),
        Some(&8192.0)
    );
}
