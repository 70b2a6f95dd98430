//! A real Prometheus server (the Debian package's binary) on loopback with a temporary data
//! directory, scraping one target every second.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::agent::{free_port, http_get};

/// A running Prometheus; dropping it kills it and removes its data.
#[derive(Debug)]
pub struct Prometheus {
    child: Option<Child>,
    pub port: u16,
    binary: std::path::PathBuf,
    /// `--web.config.file`: TLS and the like.
    web_config: Option<std::path::PathBuf>,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    pub fn start(binary: &std::path::Path, target_port: u16) -> Prometheus {
        Self::start_scraping(binary, free_port(), &[target_port])
    }

    /// Starts one on `port` scraping every target (`127.0.0.1:<port>`) under `job="tally"`.
    pub fn start_scraping(binary: &std::path::Path, port: u16, targets: &[u16]) -> Prometheus {
        Self::start_with_web_config(binary, port, targets, None)
    }

    /// As [`Prometheus::start_scraping`], serving with `web_config` (Prometheus' web
    /// configuration file: `tls_server_config`, `basic_auth_users`).
    pub fn start_with_web_config(
        binary: &std::path::Path,
        port: u16,
        targets: &[u16],
        web_config: Option<&std::path::Path>,
    ) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let targets: Vec<String> = targets.iter().map(|p| format!("'127.0.0.1:{p}'")).collect();
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n  - job_name: tally\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .expect("write prometheus.yml");
        let mut server = Prometheus {
            child: None,
            port,
            binary: binary.to_path_buf(),
            web_config: web_config.map(std::path::Path::to_path_buf),
            _dir: dir,
        };
        server.restart();
        server
    }

    /// Kills it; its data stays for [`Prometheus::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and data (stopping it first if it runs).
    pub fn restart(&mut self) {
        self.stop();
        let dir = self._dir.path();
        let mut command = Command::new(&self.binary);
        if let Some(web) = &self.web_config {
            command.arg(format!("--web.config.file={}", web.display()));
        }
        let child = command
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn prometheus");
        self.child = Some(child);
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
        self.stop();
    }
}
