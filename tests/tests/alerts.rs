//! Alert delivery against a real Alertmanager (Debian's `prometheus-alertmanager`) on loopback:
//! it lists the firing alert with our labels, then (once resolved) no longer lists it and
//! notifies its receiver that it resolved; re-sends keep an alert alive past its first `endsAt`;
//! a generic webhook hears firing then resolved; dead targets count failures and delay nobody.
//! The sender is driven from a plain thread, as the agent's tick thread drives it.
#![expect(
    clippy::unwrap_used,
    reason = "integration test: its helpers fail the test with the error"
)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tally_exporters::alerts::{rfc3339, Alert, AlertConfig, AlertSender, AlertStats, TargetKind};
use tally_tests::agent::free_port;
use tally_tests::alertmanager::{Alertmanager, WebhookSink};
use tally_tests::require;

const ALERTMANAGER: &str = "prometheus-alertmanager";
const WAIT: Duration = Duration::from_secs(10);

fn labels(test: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("alertname".to_owned(), "TallyBudgetExceeded".to_owned()),
        ("budget".to_owned(), "gpu-hours".to_owned()),
        ("namespace".to_owned(), "ml-team".to_owned()),
        ("pod".to_owned(), "trainer-0".to_owned()),
        ("test".to_owned(), test.to_owned()),
    ])
}

fn alert(test: &str) -> Alert {
    Alert {
        annotations: BTreeMap::from([(
            "summary".to_owned(),
            "ml-team/trainer-0 is over its gpu-hours budget".to_owned(),
        )]),
        generator_url: Some("http://node-1:9400/budgets".to_owned()),
        ..Alert::new(labels(test))
    }
}

fn config() -> AlertConfig {
    AlertConfig {
        timeout: Duration::from_secs(5),
        max_attempts: 2,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        ..AlertConfig::default()
    }
}

/// The sender on its own runtime, as in the agent; every call below comes from the test thread.
fn spawn(config: AlertConfig) -> (tokio::runtime::Runtime, AlertSender, Arc<AlertStats>) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let stats = Arc::new(AlertStats::default());
    let sender = AlertSender::spawn(config, stats.clone(), runtime.handle()).unwrap();
    (runtime, sender, stats)
}

/// Alertmanager's API writes milliseconds (`…33.440Z`), its webhook Go's shortest form
/// (`…33.44Z`); both as `…33.440Z`, which orders as text.
fn millis(timestamp: &serde_json::Value) -> String {
    let text = timestamp.as_str().unwrap();
    let (whole, fraction) = text
        .strip_suffix('Z')
        .unwrap()
        .split_once('.')
        .unwrap_or((text.trim_end_matches('Z'), ""));
    format!("{whole}.{:0<3.3}Z", fraction)
}

fn ours(test: &str) -> impl Fn(&serde_json::Value) -> bool + '_ {
    move |a: &serde_json::Value| a["labels"]["test"] == test
}

#[test]
fn alertmanager_shows_the_firing_alert_then_the_resolved_one() {
    const TEST: &str = "alertmanager_shows_the_firing_alert_then_the_resolved_one";
    let Some(binary) = require::binary(TEST, ALERTMANAGER) else {
        return;
    };
    let sink = WebhookSink::start();
    let am = Alertmanager::start(&binary, Some(&sink.url("/alertmanager")));
    let (_runtime, sender, stats) = spawn(AlertConfig {
        alertmanager_urls: vec![am.url()],
        webhook_urls: vec![sink.url("/tally")],
        ..config()
    });

    // Firing: listed active, with exactly our labels, annotations and times.
    let fired = alert(TEST);
    let before = SystemTime::now();
    assert!(sender.fire("ml-team/trainer-0/gpu-hours".into(), fired.clone()));
    let listed = am.wait_alert(WAIT, "firing alert listed", ours(TEST));
    // The worker stamps `endsAt` when it builds the request: after `fire`, before the listing.
    let listed_at = SystemTime::now();
    assert_eq!(listed["labels"], serde_json::json!(labels(TEST)));
    assert_eq!(listed["annotations"], serde_json::json!(fired.annotations));
    assert_eq!(listed["generatorURL"], "http://node-1:9400/budgets");
    assert_eq!(listed["status"]["state"], "active");
    assert_eq!(listed["receivers"], serde_json::json!([{"name": "sink"}]));
    assert_eq!(millis(&listed["startsAt"]), rfc3339(fired.starts_at));
    // Sent bounded at 4 × resend_interval (60 s), not left to resolve_timeout (1 h here).
    let ends = millis(&listed["endsAt"]);
    let bound = Duration::from_secs(240);
    assert!(
        ends >= rfc3339(before + bound) && ends <= rfc3339(listed_at + bound),
        "{ends}"
    );
    let fingerprint = listed["fingerprint"].as_str().unwrap().to_owned();
    let notified = sink.wait_post("/alertmanager", WAIT, |n| n["status"] == "firing");
    assert_eq!(notified["alerts"][0]["labels"], listed["labels"]);

    // Resolved: the same label set with endsAt = now.
    let before = SystemTime::now();
    assert!(sender.resolve("ml-team/trainer-0/gpu-hours".into()));
    let after = SystemTime::now();
    let notified = sink.wait_post("/alertmanager", WAIT, |n| n["status"] == "resolved");
    assert_eq!(notified["alerts"][0]["status"], "resolved");
    assert_eq!(notified["alerts"][0]["labels"], listed["labels"]);
    assert_eq!(notified["alerts"][0]["fingerprint"], fingerprint.as_str());
    let ended = millis(&notified["alerts"][0]["endsAt"]);
    assert!(
        ended >= rfc3339(before) && ended <= rfc3339(after),
        "{ended}"
    );
    // Alertmanager 0.25's API leaves resolved alerts out of every listing, whatever the filters.
    for query in [
        "",
        "active=true&silenced=true&inhibited=true&unprocessed=true",
        "active=false",
    ] {
        let alerts = am.alerts_query(query);
        assert!(
            !alerts
                .iter()
                .any(|a| a["fingerprint"] == fingerprint.as_str()),
            "resolved alert still listed by ?{query}: {alerts:#?}"
        );
    }
    let received = |status: &str| {
        am.metric(
            "alertmanager_alerts_received_total",
            &[&format!("status=\"{status}\""), "version=\"v2\""],
        )
    };
    assert_eq!(received("firing"), Some(1.0));
    assert_eq!(received("resolved"), Some(1.0));

    // The generic webhook heard the same two state changes, in order.
    assert!(sender.flush(Instant::now() + WAIT));
    let hook = sink.posts("/tally");
    let statuses: Vec<&str> = hook.iter().map(|m| m["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["firing", "resolved"], "{hook:#?}");
    for message in &hook {
        assert_eq!(message["version"], "1");
        assert_eq!(message["alerts"][0]["status"], message["status"]);
        assert_eq!(message["alerts"][0]["labels"], listed["labels"]);
        assert_eq!(message["alerts"][0]["annotations"], listed["annotations"]);
    }
    assert!(hook[0]["alerts"][0].get("endsAt").is_none());
    assert_eq!(millis(&hook[1]["alerts"][0]["endsAt"]), ended);

    assert_eq!(stats.sent.load(std::sync::atomic::Ordering::Relaxed), 4);
    assert_eq!(
        stats
            .failed_attempts
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[test]
fn resent_alert_outlives_its_first_ends_at() {
    const TEST: &str = "resent_alert_outlives_its_first_ends_at";
    let Some(binary) = require::binary(TEST, ALERTMANAGER) else {
        return;
    };
    let am = Alertmanager::start(&binary, None);
    // Firing alerts are valid for 4 × 300 ms and re-sent every 300 ms.
    let (_runtime, sender, _stats) = spawn(AlertConfig {
        alertmanager_urls: vec![am.url()],
        resend_interval: Duration::from_millis(300),
        ..config()
    });
    assert!(sender.fire("k".into(), alert(TEST)));
    let first = am.wait_alert(WAIT, "firing alert listed", ours(TEST));
    let first_ends = millis(&first["endsAt"]);
    // Wait (polling) until the first endsAt has passed by a few re-sends.
    let deadline = Instant::now() + WAIT;
    while rfc3339(SystemTime::now() - Duration::from_millis(600)) <= first_ends {
        assert!(Instant::now() < deadline, "clock stuck before {first_ends}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let later = am.wait_alert(WAIT, "still listed", ours(TEST));
    assert_eq!(later["status"]["state"], "active");
    assert_eq!(later["fingerprint"], first["fingerprint"]);
    assert_eq!(later["startsAt"], first["startsAt"]);
    assert!(millis(&later["endsAt"]) > first_ends, "{later:#?}");
    let firing = am
        .metric(
            "alertmanager_alerts_received_total",
            &["status=\"firing\"", "version=\"v2\""],
        )
        .unwrap();
    assert!(firing >= 3.0, "{firing} firing alerts received");

    assert!(sender.resolve("k".into()));
    let deadline = Instant::now() + WAIT;
    while am.alerts().iter().any(ours(TEST)) {
        assert!(Instant::now() < deadline, "resolved alert still listed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn dead_targets_count_failures_without_delaying_live_ones() {
    const TEST: &str = "dead_targets_count_failures_without_delaying_live_ones";
    let Some(binary) = require::binary(TEST, ALERTMANAGER) else {
        return;
    };
    let sink = WebhookSink::start();
    let am = Alertmanager::start(&binary, None);
    // Nothing listens on `refused`; `blackhole` accepts connections (the kernel does) and never
    // answers, so each attempt there lasts the whole 5 s timeout.
    let refused = format!("http://127.0.0.1:{}", free_port());
    let blackhole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let blackhole_url = format!("http://{}", blackhole.local_addr().unwrap());
    let config = config();
    let (_runtime, sender, stats) = spawn(AlertConfig {
        // Dead ones first: a sender that went through targets in turn would reach the live ones
        // only after the blackhole's timeout.
        alertmanager_urls: vec![blackhole_url.clone(), refused.clone(), am.url()],
        webhook_urls: vec![format!("{refused}/hook"), sink.url("/tally")],
        ..config.clone()
    });

    let fired_at = Instant::now();
    assert!(sender.fire("k".into(), alert(TEST)));
    am.wait_alert(WAIT, "firing alert listed", ours(TEST));
    sink.wait_post("/tally", WAIT, |m| m["status"] == "firing");
    let took = fired_at.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "live targets served after {took:?}"
    );

    let resolved_at = Instant::now();
    assert!(sender.resolve("k".into()));
    let deadline = Instant::now() + WAIT;
    while am.alerts().iter().any(ours(TEST)) {
        assert!(Instant::now() < deadline, "resolved alert still listed");
        std::thread::sleep(Duration::from_millis(20));
    }
    sink.wait_post("/tally", WAIT, |m| m["status"] == "resolved");
    let took = resolved_at.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "resolve served after {took:?}"
    );

    // The refused targets gave up each request after max_attempts; the live ones never failed.
    let counts = |kind: TargetKind, url: &str| {
        stats
            .targets()
            .into_iter()
            .find(|(k, u, _)| *k == kind && u == url)
            .map(|(_, _, c)| c)
            .unwrap_or_default()
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let refused_am = counts(TargetKind::Alertmanager, &refused);
        let refused_hook = counts(TargetKind::Webhook, &format!("{refused}/hook"));
        if refused_am.failed == 2 && refused_hook.failed == 2 {
            assert_eq!(
                refused_am.failed_attempts,
                2 * u64::from(config.max_attempts)
            );
            assert_eq!(
                refused_hook.failed_attempts,
                2 * u64::from(config.max_attempts)
            );
            assert_eq!(refused_am.sent, 0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "refused targets: {refused_am:?} {refused_hook:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let live_am = counts(TargetKind::Alertmanager, &am.url());
    assert_eq!((live_am.sent, live_am.failed_attempts), (2, 0));
    let live_hook = counts(TargetKind::Webhook, &sink.url("/tally"));
    assert_eq!((live_hook.sent, live_hook.failed_attempts), (2, 0));

    // The blackhole's first attempt times out, counted, and it is still retrying.
    let deadline = Instant::now() + WAIT;
    while counts(TargetKind::Alertmanager, &blackhole_url).failed_attempts == 0 {
        assert!(
            Instant::now() < deadline,
            "blackhole attempt never timed out"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(fired_at.elapsed() >= config.timeout);
    assert_eq!(counts(TargetKind::Alertmanager, &blackhole_url).sent, 0);
    // A flush cannot finish while the blackhole holds requests; it returns at its deadline.
    let flushing = Instant::now();
    assert!(!sender.flush(Instant::now() + Duration::from_millis(300)));
    assert!(flushing.elapsed() < Duration::from_secs(2));
    drop(blackhole);
}
