//! A real llama.cpp inference server on loopback: Debian's `llama-server --metrics` in the chroot
//! that `tests/llama/build` makes, serving a tiny random-weights model (two layers, 64 wide,
//! byte-fallback vocabulary: an ASCII prompt of N characters is N + 2 tokens), so a test can
//! drive completions and read llama.cpp's own `/metrics` in milliseconds on a CPU.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The test bed's directory (holding `root/`, the chroot, with `/model.gguf` in it), built on the
/// first call and cached after (see `tests/llama/build`); or a skip when it cannot be had here.
pub fn bed(test: &str) -> Option<PathBuf> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        crate::require::skip(
            test,
            "the llama.cpp test bed needs root (mmdebstrap, chroot)",
        );
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("llama/build");
    let output = match Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
    {
        Ok(output) => output,
        Err(e) => {
            crate::require::skip(test, &format!("cannot run {}: {e}", script.display()));
            return None;
        }
    };
    if !output.status.success() {
        crate::require::skip(
            test,
            &format!(
                "{} failed ({}): no llama.cpp test bed",
                script.display(),
                output.status
            ),
        );
        return None;
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    assert!(
        dir.join("done").is_file() && dir.join("root/usr/bin/llama-server").is_file(),
        "{} printed {}, which holds no finished bed",
        script.display(),
        dir.display()
    );
    Some(dir)
}

/// A running `llama-server`; dropping it kills it.
#[derive(Debug)]
pub struct LlamaServer {
    child: Child,
    pub port: u16,
    log: tempfile::NamedTempFile,
}

impl LlamaServer {
    /// Starts `llama-server --metrics` on `127.0.0.1:port` chrooted into `bed`'s root, one slot
    /// of 512 tokens, one thread, and waits (up to 60 s) until `/health` answers 200. With
    /// `cgroup_procs` (a cgroup v2 `cgroup.procs` file), the process joins that cgroup before it
    /// executes, so every thread it ever has starts inside.
    pub fn start(bed: &Path, cgroup_procs: Option<&Path>, port: u16) -> LlamaServer {
        let log = tempfile::NamedTempFile::new().expect("llama-server log file");
        let root = CString::new(bed.join("root").as_os_str().as_bytes()).expect("bed path");
        let procs = cgroup_procs
            .map(|p| CString::new(p.as_os_str().as_bytes()).expect("cgroup.procs path"));
        let mut command = Command::new("/usr/bin/llama-server");
        command
            .args([
                "-m",
                "/model.gguf",
                "--metrics",
                "--host",
                "127.0.0.1",
                "--port",
            ])
            .arg(port.to_string())
            .args([
                "-c", "512", "-np", "1", "-t", "1", "-tb", "1", "--seed", "1",
            ])
            .args(["--no-warmup", "--no-webui", "--log-colors", "off"])
            // llama-server also reads LLAMA_ARG_* settings from its environment: none from ours.
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", "/root")
            .stdin(Stdio::null())
            .stdout(log.reopen().expect("llama-server log"))
            .stderr(log.reopen().expect("llama-server log"));
        // SAFETY: between fork and exec the closure only makes system calls (open, write, close,
        // chroot, chdir) on memory allocated before the fork, which is async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                if let Some(procs) = &procs {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let error = std::io::Error::last_os_error();
                    libc::close(fd);
                    if written != 1 {
                        return Err(error);
                    }
                }
                if libc::chroot(root.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "start llama-server in {} (cgroup {:?}): {e}",
                bed.display(),
                cgroup_procs
            )
        });
        let mut server = LlamaServer { child, port, log };
        server.wait_healthy(Duration::from_secs(60));
        server
    }

    /// The server's process id (it runs as this one process, threads aside).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn wait_healthy(&mut self, timeout: Duration) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("llama-server status") {
                panic!(
                    "llama-server exited ({status}) before it was healthy:\n{}",
                    self.log()
                );
            }
            if request(self.port, "GET", "/health", None).is_ok_and(|(status, _)| status == 200) {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "llama-server on port {} not healthy after {timeout:?}:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The token counts a completion's `usage` reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens, cached ones included.
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens reused from the slot's cache (`prompt_tokens_details.cached_tokens`).
    pub cached_tokens: u64,
}

impl std::ops::Add for Usage {
    type Output = Usage;
    fn add(self, other: Usage) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens + other.prompt_tokens,
            completion_tokens: self.completion_tokens + other.completion_tokens,
            cached_tokens: self.cached_tokens + other.cached_tokens,
        }
    }
}

/// One greedy completion (`/v1/completions`, temperature 0, end-of-sequence ignored so exactly
/// `n_predict` tokens come back, the prompt's cached prefix reused) and its `usage`.
pub fn complete(port: u16, prompt: &str, n_predict: u32) -> Usage {
    let body = serde_json::json!({
        "prompt": prompt,
        "max_tokens": n_predict,
        "n_predict": n_predict,
        "temperature": 0,
        "seed": 1,
        "ignore_eos": true,
        "cache_prompt": true,
        "stream": false,
    })
    .to_string();
    let (status, response) =
        request(port, "POST", "/v1/completions", Some(&body)).expect("POST /v1/completions");
    let text = String::from_utf8_lossy(&response);
    assert_eq!(status, 200, "POST /v1/completions: {text}");
    let json: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("completion JSON ({e}): {text}"));
    let usage = &json["usage"];
    let count = |v: &serde_json::Value| v.as_u64();
    Usage {
        prompt_tokens: count(&usage["prompt_tokens"])
            .unwrap_or_else(|| panic!("no usage.prompt_tokens: {text}")),
        completion_tokens: count(&usage["completion_tokens"])
            .unwrap_or_else(|| panic!("no usage.completion_tokens: {text}")),
        cached_tokens: count(&usage["prompt_tokens_details"]["cached_tokens"]).unwrap_or(0),
    }
}

/// The body of `GET /metrics` (Prometheus text; llama.cpp's families are `llamacpp:*`).
pub fn metrics(port: u16) -> String {
    let (status, body) = request(port, "GET", "/metrics", None).expect("GET /metrics");
    let text = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(status, 200, "GET /metrics: {text}");
    text
}

/// A request to the server: the status and the body.
fn request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, Vec<u8>)> {
    let headers = [("Content-Type", "application/json")];
    let r =
        crate::agent::http_request(port, method, path, &headers, body, Duration::from_secs(30))?;
    Ok((r.status, r.body))
}
