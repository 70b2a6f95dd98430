//! The built `tally` binary as a black box: spawn it on a config, wait for readiness by polling,
//! talk HTTP to it, signal it, and always reap it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `tally` binary next to the test executable (`target/<profile>/tally`), or `TALLY_BIN`.
pub fn tally_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("TALLY_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = profile_dir.join("tally");
    assert!(
        bin.is_file(),
        "{} not built: run `cargo build --bins` first (tests/run does)",
        bin.display()
    );
    bin
}

/// How much slower than this machine the tests run: `TALLY_TEST_TIME_SCALE` (default 1). The VM
/// suite sets it, as software emulation starts the agent several times slower.
pub fn time_scale() -> f64 {
    std::env::var("TALLY_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v: &f64| *v >= 1.0)
        .unwrap_or(1.0)
}

/// A free loopback port (bound then released; the agent binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A running agent. Dropping it kills it.
#[derive(Debug)]
pub struct Agent {
    pub child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    stderr_path: PathBuf,
}

impl Agent {
    /// Starts `tally agent` with `config` (TOML; `[agent] listen` is added) and waits until
    /// `/readyz` answers 200.
    pub fn start(config: &str) -> Agent {
        let agent = Self::spawn(config);
        agent.wait_ready(Duration::from_secs(20));
        agent
    }

    /// Starts it without waiting.
    pub fn spawn(config: &str) -> Agent {
        Self::spawn_in(config, Vec::new(), None)
    }

    /// Starts it with an open-file limit of `nofile`, soft and hard (set between fork and
    /// exec, as `LimitNOFILE=` does), holding `inherited` descriptors from the start (copies of
    /// `/dev/null` at the top of its table, as from a parent that leaks them), and waits until
    /// ready.
    pub fn start_with_open_file_limit(config: &str, nofile: u64, inherited: u32) -> Agent {
        let agent = Self::spawn_in(config, Vec::new(), Some((nofile, inherited)));
        agent.wait_ready(Duration::from_secs(20));
        agent
    }

    /// Starts it inside the cgroup `procs` files name (each a `cgroup.procs`, written between
    /// fork and exec) and in a cgroup namespace of its own rooted there, as a DaemonSet pod is on
    /// cgroup v2; waits until ready.
    pub fn start_in_cgroup_namespace(config: &str, procs: Vec<PathBuf>) -> Agent {
        let agent = Self::spawn_in(config, procs, None);
        agent.wait_ready(Duration::from_secs(20));
        agent
    }

    fn spawn_in(config: &str, procs: Vec<PathBuf>, nofile: Option<(u64, u32)>) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let config_path = dir.path().join("tally.toml");
        let text = if config.contains("[agent]") {
            config.replacen(
                "[agent]",
                &format!("[agent]\nlisten = \"127.0.0.1:{port}\""),
                1,
            )
        } else {
            format!("[agent]\nlisten = \"127.0.0.1:{port}\"\n{config}")
        };
        std::fs::write(&config_path, text).expect("write config");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut command = Command::new(tally_bin());
        command
            .args(["agent", "--config"])
            .arg(&config_path)
            // `TALLY_TEST_LOG` raises the agent's log level while debugging a test.
            .env(
                "RUST_LOG",
                std::env::var("TALLY_TEST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .env_remove("TALLY_LISTEN")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // Copied into the agent's table below when it is to inherit descriptors.
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        if !procs.is_empty() || nofile.is_some() {
            use std::os::unix::process::CommandExt;
            let null_fd = std::os::fd::AsRawFd::as_raw_fd(&null);
            // SAFETY: between fork and exec the closure only writes files whose paths were
            // built beforehand and calls unshare(2), setrlimit(2) and dup2(2) on plain values;
            // `null` outlives the spawn.
            unsafe {
                command.pre_exec(move || {
                    if let Some((n, inherited)) = nofile {
                        let limit = libc::rlimit {
                            rlim_cur: n,
                            rlim_max: n,
                        };
                        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        // Far above the descriptors exec and the agent's start use; dup2 clears
                        // close-on-exec on the copy.
                        for i in 0..u64::from(inherited) {
                            let fd = (n - 1 - i) as i32;
                            if libc::dup2(null_fd, fd) != fd {
                                return Err(std::io::Error::last_os_error());
                            }
                        }
                    }
                    if procs.is_empty() {
                        return Ok(());
                    }
                    for p in &procs {
                        std::fs::write(p, b"0")?;
                    }
                    if libc::unshare(libc::CLONE_NEWCGROUP) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command.spawn().expect("spawn tally");
        drop(null);
        Agent {
            child,
            port,
            dir,
            config: config_path,
            stderr_path,
        }
    }

    /// Polls `/readyz` until 200, panicking with the agent's log after `timeout` (times
    /// `TALLY_TEST_TIME_SCALE`: the VM suite runs under software emulation).
    pub fn wait_ready(&self, timeout: Duration) {
        let timeout = timeout.mul_f64(time_scale());
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(r) = self.get("/readyz") {
                if r.status == 200 {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("agent not ready within {timeout:?}; log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Panics, with the log, unless `needle` occurs in the agent's log exactly once.
    pub fn assert_logged_once(&self, needle: &str) {
        let log = self.log();
        assert_eq!(log.matches(needle).count(), 1, "`{needle}` once in:\n{log}");
    }

    pub fn get(&self, path: &str) -> std::io::Result<Response> {
        http_get(self.port, path, &[])
    }

    /// `/metrics` as text, panicking on a non-200 or on a family, HELP, TYPE or label set the
    /// agent's catalogue does not declare.
    pub fn scrape(&self) -> String {
        let r = self.get("/metrics").expect("scrape");
        assert_eq!(r.status, 200, "scrape status");
        let text = String::from_utf8(r.body).expect("utf-8 metrics");
        let config = std::fs::read_to_string(&self.config).unwrap_or_default();
        crate::catalogue::assert_declared_with(&text, &crate::catalogue::promoted_labels(&config));
        text
    }

    /// Scrapes until `pred` holds on the text, or panics after `timeout` with the last scrape.
    pub fn scrape_until(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            last = self.scrape();
            if pred(&last) {
                return last;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "{what}: not seen within {timeout:?}; last scrape:\n{last}\nlog:\n{}",
            self.log()
        );
    }

    /// The rate of a counter the agent updates once a tick, over about `over`: measured from one
    /// change of `value` to another, so the span holds whole ticks. Dividing a tick-stepped
    /// counter by wall time between two arbitrary scrapes is off by up to a tick's worth (10 %
    /// over 10 s at a 1 s tick).
    pub fn tick_rate(&self, over: Duration, value: impl Fn(&str) -> f64) -> f64 {
        let step = |from: f64| -> (f64, Instant) {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let v = value(&self.scrape());
                if v != from {
                    return (v, Instant::now());
                }
                assert!(Instant::now() < deadline, "the counter stopped at {from}");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let first = value(&self.scrape());
        let (v0, t0) = step(first);
        std::thread::sleep(over.saturating_sub(Duration::from_millis(500)));
        let (v1, t1) = step(value(&self.scrape()));
        (v1 - v0) / (t1 - t0).as_secs_f64()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill({sig})");
    }

    /// Waits for the process to exit, or `None` after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP response: status, lowercase header names, body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 GET on loopback (the test needs no HTTP client dependency).
pub fn http_get(port: u16, path: &str, headers: &[(&str, &str)]) -> std::io::Result<Response> {
    http_request(port, "GET", path, headers, None, Duration::from_secs(10))
}

/// A minimal HTTP/1.1 request on loopback with `Connection: close`, a body (its
/// `Content-Length` added) where given, waiting at most `timeout` for each read.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
    timeout: Duration,
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(timeout))?;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body.unwrap_or(""));
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body)?;
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut raw: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| std::io::Error::other("bad chunk"))?;
        let size = usize::from_str_radix(String::from_utf8_lossy(&raw[..line_end]).trim(), 16)
            .map_err(std::io::Error::other)?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// The value of the first series of `family` whose label text contains every `needle`.
pub fn sample(text: &str, family: &str, needles: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
