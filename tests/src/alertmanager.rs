//! A real Alertmanager (the Debian package's `prometheus-alertmanager`) on loopback with a
//! temporary config and storage, clustering off, and a webhook sink that records what is POSTed
//! to it (Alertmanager's own notifications, or Tally's generic webhook).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::agent::{free_port, http_get, sample};

/// A running Alertmanager; dropping it kills it and removes its data.
#[derive(Debug)]
pub struct Alertmanager {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Alertmanager {
    /// Starts Alertmanager and waits until `/-/ready` answers. Every alert is its own group
    /// (`group_by: ['...']`), notified after 100 ms; with `webhook`, notifications (resolved
    /// ones too) go there, else to a receiver without integrations. `resolve_timeout` is an
    /// hour, so an alert that ends within a test was ended by its sender.
    pub fn start(binary: &Path, webhook: Option<&str>) -> Alertmanager {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let config = dir.path().join("alertmanager.yml");
        let receiver = match webhook {
            Some(url) => format!(
                "  - name: sink\n    webhook_configs:\n      - url: '{url}'\n        send_resolved: true\n"
            ),
            None => "  - name: sink\n".to_owned(),
        };
        std::fs::write(
            &config,
            format!(
                "global:\n  resolve_timeout: 1h\nroute:\n  receiver: sink\n  group_by: ['...']\n  group_wait: 100ms\n  group_interval: 500ms\n  repeat_interval: 1h\nreceivers:\n{receiver}"
            ),
        )
        .expect("write alertmanager.yml");
        let log = std::fs::File::create(dir.path().join("alertmanager.log")).expect("log file");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            // No gossip: it would bind 0.0.0.0:9094, which parallel tests share.
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn alertmanager");
        let mut alertmanager = Alertmanager { child, port, dir };
        alertmanager.wait_ready(Duration::from_secs(30));
        alertmanager
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "alertmanager exited ({status}) before ready:\n{}",
                    self.log()
                );
            }
            if http_get(self.port, "/-/ready", &[]).is_ok_and(|r| r.status == 200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "alertmanager not ready within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The base URL Tally is configured with.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What Alertmanager wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("alertmanager.log")).unwrap_or_default()
    }

    /// `GET /api/v2/alerts` with its default filters (active, silenced, inhibited and
    /// unprocessed alerts all included).
    pub fn alerts(&self) -> Vec<serde_json::Value> {
        self.alerts_query("")
    }

    /// `GET /api/v2/alerts?{query}`, parsed.
    pub fn alerts_query(&self, query: &str) -> Vec<serde_json::Value> {
        let path = if query.is_empty() {
            "/api/v2/alerts".to_owned()
        } else {
            format!("/api/v2/alerts?{query}")
        };
        let response = http_get(self.port, &path, &[]).expect("GET /api/v2/alerts");
        assert_eq!(
            response.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&response.body)
        );
        match serde_json::from_slice(&response.body).expect("alerts JSON") {
            serde_json::Value::Array(alerts) => alerts,
            other => panic!("{path} answered {other}, not an array"),
        }
    }

    /// Polls the alert list until `found` picks an alert, or panics after `timeout`.
    pub fn wait_alert(
        &self,
        timeout: Duration,
        what: &str,
        found: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let alerts = self.alerts();
            if let Some(alert) = alerts.iter().find(|a| found(a)) {
                return alert.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?}; alerts: {alerts:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A sample of Alertmanager's own `/metrics`, e.g. `alertmanager_alerts_received_total`
    /// with `status="resolved"`.
    pub fn metric(&self, family: &str, needles: &[&str]) -> Option<f64> {
        let response = http_get(self.port, "/metrics", &[]).ok()?;
        sample(&String::from_utf8_lossy(&response.body), family, needles)
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Posts = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

/// An HTTP server on loopback that answers every request 200 and records each JSON body with
/// its path, on its own thread and runtime.
#[derive(Debug)]
pub struct WebhookSink {
    pub port: u16,
    posts: Posts,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WebhookSink {
    pub fn start() -> WebhookSink {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind sink");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("local addr").port();
        let posts: Posts = Arc::default();
        let shared = posts.clone();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("sink runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                let app = axum::Router::new().fallback(
                    move |uri: axum::http::Uri, body: axum::body::Bytes| {
                        let posts = shared.clone();
                        async move {
                            let json = serde_json::from_slice(&body).unwrap_or_else(|_| {
                                serde_json::Value::String(
                                    String::from_utf8_lossy(&body).into_owned(),
                                )
                            });
                            posts
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push((uri.path().to_owned(), json));
                            axum::http::StatusCode::OK
                        }
                    },
                );
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stop_rx.await;
                    })
                    .await;
            });
        });
        WebhookSink {
            port,
            posts,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:{port}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Bodies POSTed to `path` so far, in arrival order.
    pub fn posts(&self, path: &str) -> Vec<serde_json::Value> {
        self.posts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, body)| body.clone())
            .collect()
    }

    /// Polls until a body POSTed to `path` satisfies `found`, or panics after `timeout`.
    pub fn wait_post(
        &self,
        path: &str,
        timeout: Duration,
        found: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let posts = self.posts(path);
            if let Some(post) = posts.iter().find(|p| found(p)) {
                return post.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no matching POST to {path} within {timeout:?}; got: {posts:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for WebhookSink {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
