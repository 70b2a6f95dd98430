//! A real Prometheus server (the Debian package's binary) on loopback with a temporary data
//! directory, scraping one target every second.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::agent::{free_port, http_get};

/// A running Prometheus; dropping it kills it and removes its data.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    pub fn start(binary: &std::path::Path, target_port: u16) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n  - job_name: tally\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn prometheus");
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    /// Runs an instant query until it returns at least one series, returning the result array.
    pub fn query_until_found(&self, query: &str, timeout: Duration) -> Vec<serde_json::Value> {
        let encoded: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(r) = http_get(self.port, &format!("/api/v1/query?query={encoded}"), &[]) {
                last = String::from_utf8_lossy(&r.body).into_owned();
                if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&r.body) {
                    if let Some(result) = json["data"]["result"].as_array() {
                        if !result.is_empty() {
                            return result.clone();
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("query {query} found nothing within {timeout:?}; last answer: {last}");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
