//! The sender against a scripted HTTP receiver on loopback (the real Alertmanager is exercised
//! in `tests/tests/alerts.rs`).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// What the receiver got: request path and parsed JSON body.
type Received = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

/// An HTTP/1.1 receiver answering each request with the next scripted status (200 once the
/// script runs out), closing the connection after each answer.
struct Receiver {
    url: String,
    received: Received,
}

impl Receiver {
    async fn start(script: Vec<u16>) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let received: Received = Arc::default();
        let got = received.clone();
        let script = Arc::new(Mutex::new(std::collections::VecDeque::from(script)));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let got = got.clone();
                let script = script.clone();
                tokio::spawn(async move {
                    let Some((path, body)) = read_request(&mut stream).await else {
                        return;
                    };
                    got.lock()
                        .unwrap()
                        .push((path, serde_json::from_slice(&body).unwrap()));
                    let status = script.lock().unwrap().pop_front().unwrap_or(200);
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: 4\r\nconnection: close\r\n\r\nnope"
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                });
            }
        });
        Receiver { url, received }
    }

    fn received(&self) -> Vec<(String, serde_json::Value)> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until `n` requests arrived.
    async fn wait_for(&self, n: usize) -> Vec<(String, serde_json::Value)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{n} requests wanted, got {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<(String, Vec<u8>)> {
    let mut raw = Vec::new();
    let mut buf = [0_u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
        let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&raw[..end]).to_string();
        let length: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        if raw.len() >= end + 4 + length {
            let path = head.split_whitespace().nth(1)?.to_owned();
            return Some((path, raw[end + 4..end + 4 + length].to_vec()));
        }
    }
}

fn config() -> AlertConfig {
    AlertConfig {
        timeout: Duration::from_secs(2),
        max_attempts: 3,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
        ..AlertConfig::default()
    }
}

fn alert(budget: &str) -> Alert {
    Alert::new(BTreeMap::from([
        ("alertname".to_owned(), "TallyBudgetExceeded".to_owned()),
        ("budget".to_owned(), budget.to_owned()),
    ]))
}

fn spawn(config: AlertConfig) -> (AlertSender, Arc<AlertStats>) {
    let stats = Arc::new(AlertStats::default());
    let sender =
        AlertSender::spawn(config, stats.clone(), &tokio::runtime::Handle::current()).unwrap();
    (sender, stats)
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fire_then_resolve_reaches_alertmanager_and_webhook() {
    let am = Receiver::start(Vec::new()).await;
    let hook = Receiver::start(Vec::new()).await;
    let (sender, stats) = spawn(AlertConfig {
        alertmanager_urls: vec![format!("{}/", am.url)],
        webhook_urls: vec![format!("{}/hook", hook.url)],
        ..config()
    });
    let before = SystemTime::now();
    assert!(sender.fire("b1".into(), alert("b1")));
    assert!(sender.flush_async(deadline()).await);
    assert_eq!(stats.active.load(Ordering::Relaxed), 1);
    assert!(sender.resolve("b1".into()));
    assert!(sender.flush_async(deadline()).await);

    let got = am.received();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.iter().all(|(path, _)| path == "/api/v2/alerts"));
    let firing = &got[0].1[0];
    assert_eq!(firing["labels"]["budget"], "b1");
    // Firing alerts are bounded at 4 × resend_interval (60 s).
    let ends = firing["endsAt"].as_str().unwrap().to_owned();
    assert!(ends >= rfc3339(before + Duration::from_secs(239)), "{ends}");
    assert!(
        ends <= rfc3339(SystemTime::now() + Duration::from_secs(241)),
        "{ends}"
    );
    let resolved = &got[1].1[0];
    assert_eq!(resolved["labels"], firing["labels"]);
    assert_eq!(resolved["startsAt"], firing["startsAt"]);
    assert!(resolved["endsAt"].as_str().unwrap() <= rfc3339(SystemTime::now()).as_str());

    let got = hook.received();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].0, "/hook");
    assert_eq!(got[0].1["status"], "firing");
    assert_eq!(got[0].1["alerts"][0]["labels"]["budget"], "b1");
    assert!(got[0].1["alerts"][0].get("endsAt").is_none());
    assert_eq!(got[1].1["status"], "resolved");
    assert_eq!(got[1].1["alerts"][0]["endsAt"], resolved["endsAt"]);

    assert_eq!(stats.sent.load(Ordering::Relaxed), 4);
    assert_eq!(stats.failed_attempts.load(Ordering::Relaxed), 0);
    assert_eq!(stats.active.load(Ordering::Relaxed), 0);
    let targets = stats.targets();
    assert_eq!(targets.len(), 2);
    assert!(targets.iter().all(|(_, _, c)| c.sent == 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_and_rejections_are_not() {
    let flaky = Receiver::start(vec![503, 502]).await;
    let rejecting = Receiver::start(vec![400]).await;
    let (sender, stats) = spawn(AlertConfig {
        alertmanager_urls: vec![flaky.url.clone(), rejecting.url.clone()],
        ..config()
    });
    sender.fire("b1".into(), alert("b1"));
    assert!(sender.flush_async(deadline()).await);
    assert_eq!(flaky.received().len(), 3);
    assert_eq!(rejecting.received().len(), 1);
    assert_eq!(stats.sent.load(Ordering::Relaxed), 1);
    assert_eq!(stats.failed_attempts.load(Ordering::Relaxed), 3);
    assert_eq!(stats.failed.load(Ordering::Relaxed), 1);
    let targets = stats.targets();
    let flaky_counts = targets.iter().find(|(_, u, _)| *u == flaky.url).unwrap().2;
    assert_eq!(
        flaky_counts,
        TargetCounts {
            sent: 1,
            failed_attempts: 2,
            failed: 0,
            dropped_batches: 0
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_are_bounded() {
    let down = Receiver::start(vec![503; 10]).await;
    let (sender, stats) = spawn(AlertConfig {
        alertmanager_urls: vec![down.url.clone()],
        ..config()
    });
    sender.fire("b1".into(), alert("b1"));
    assert!(sender.flush_async(deadline()).await);
    assert_eq!(down.received().len(), 3);
    assert_eq!(stats.failed_attempts.load(Ordering::Relaxed), 3);
    assert_eq!(stats.failed.load(Ordering::Relaxed), 1);
    assert_eq!(stats.sent.load(Ordering::Relaxed), 0);
}

#[test]
fn a_stalled_worker_never_blocks_the_caller() {
    // A runtime nobody drives: the worker never runs, so the queue fills.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stats = Arc::new(AlertStats::default());
    let sender = AlertSender::spawn(
        AlertConfig {
            queue_capacity: 2,
            ..config()
        },
        stats.clone(),
        runtime.handle(),
    )
    .unwrap();
    let started = Instant::now();
    let queued: Vec<bool> = (0..5)
        .map(|i| sender.fire(format!("b{i}"), alert("b")))
        .collect();
    assert!(!sender.resolve("b0".into()));
    assert_eq!(queued, [true, true, false, false, false]);
    assert_eq!(stats.dropped.load(Ordering::Relaxed), 4);
    // The flush gives up at its deadline instead of hanging.
    assert!(!sender.flush(Instant::now() + Duration::from_millis(50)));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_labels_resolves_the_old_label_set() {
    let am = Receiver::start(Vec::new()).await;
    let (sender, _) = spawn(AlertConfig {
        alertmanager_urls: vec![am.url.clone()],
        ..config()
    });
    let mut warn = alert("b1");
    warn.labels.insert("state".into(), "warn".into());
    let mut enforce = alert("b1");
    enforce.labels.insert("state".into(), "enforce".into());
    sender.fire("b1".into(), warn);
    sender.fire("b1".into(), enforce);
    assert!(sender.flush_async(deadline()).await);
    let got = am.received();
    let states: Vec<(&str, bool)> = got
        .iter()
        .map(|(_, body)| {
            let a = &body[0];
            let ended = a["endsAt"].as_str().unwrap() <= rfc3339(SystemTime::now()).as_str();
            (a["labels"]["state"].as_str().unwrap(), ended)
        })
        .collect();
    assert_eq!(
        states,
        [("warn", false), ("warn", true), ("enforce", false)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firing_an_unchanged_alert_again_sends_nothing() {
    let am = Receiver::start(Vec::new()).await;
    let hook = Receiver::start(Vec::new()).await;
    let (sender, _) = spawn(AlertConfig {
        alertmanager_urls: vec![am.url.clone()],
        webhook_urls: vec![hook.url.clone()],
        ..config()
    });
    let a = alert("a");
    sender.fire("a".into(), a.clone());
    sender.fire("a".into(), a.clone());
    let mut annotated = a.clone();
    annotated
        .annotations
        .insert("summary".into(), "now enforcing".into());
    sender.fire("a".into(), annotated);
    assert!(sender.flush_async(deadline()).await);
    assert_eq!(am.received().len(), 2);
    let got = hook.received();
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[1].1["alerts"][0]["annotations"]["summary"],
        "now enforcing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_and_recently_resolved_alerts_are_resent() {
    let am = Receiver::start(Vec::new()).await;
    let hook = Receiver::start(Vec::new()).await;
    let (sender, _) = spawn(AlertConfig {
        alertmanager_urls: vec![am.url.clone()],
        webhook_urls: vec![hook.url.clone()],
        resend_interval: Duration::from_millis(100),
        ..config()
    });
    sender.fire("a".into(), alert("a"));
    sender.fire("b".into(), alert("b"));
    sender.resolve("b".into());
    // 3 state changes, then re-sends carrying both alerts.
    let got = am.wait_for(5).await;
    for (_, body) in &got[3..] {
        let budgets: Vec<&str> = body
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["labels"]["budget"].as_str().unwrap())
            .collect();
        assert_eq!(budgets, ["a", "b"]);
        let ended = body[1]["endsAt"].as_str().unwrap() <= rfc3339(SystemTime::now()).as_str();
        assert!(ended, "b is re-sent as resolved: {body}");
    }
    // Webhooks hear state changes only.
    assert!(sender.flush_async(deadline()).await);
    assert_eq!(hook.received().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_sends_active_alerts_to_a_new_alertmanager() {
    let first = Receiver::start(Vec::new()).await;
    let second = Receiver::start(Vec::new()).await;
    let (sender, _) = spawn(AlertConfig {
        alertmanager_urls: vec![first.url.clone()],
        ..config()
    });
    sender.fire("a".into(), alert("a"));
    assert!(sender.flush_async(deadline()).await);
    sender
        .update_config(AlertConfig {
            alertmanager_urls: vec![second.url.clone()],
            ..config()
        })
        .unwrap();
    sender.fire("c".into(), alert("c"));
    assert!(sender.flush_async(deadline()).await);
    assert_eq!(first.received().len(), 1);
    let got = second.received();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].1[0]["labels"]["budget"], "a");
    assert_eq!(got[1].1[0]["labels"]["budget"], "c");
}

#[test]
fn validation_reports_every_error() {
    let bad = AlertConfig {
        alertmanager_urls: vec![
            "https://am:9093".into(),
            "http://am:9093".into(),
            "http://bad host".into(),
        ],
        webhook_urls: vec!["/relative".into()],
        max_attempts: 0,
        queue_capacity: 0,
        ..AlertConfig::default()
    };
    let errors: Vec<String> = bad
        .validate()
        .unwrap_err()
        .0
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(errors.len(), 5, "{errors:#?}");
    assert!(errors[0].contains("`max_attempts`"));
    assert!(errors[1].contains("`queue_capacity`"));
    assert!(errors[2].starts_with("`alertmanager_urls[0]`") && errors[2].contains("http://"));
    assert!(errors[3].starts_with("`alertmanager_urls[2]`"));
    assert!(errors[4].starts_with("`webhook_urls[0]`"));
    assert!(AlertConfig::default().validate().is_ok());
}
