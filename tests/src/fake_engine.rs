//! Fake inference servers (the `fake-engine` binary of this crate) started as the agent finds
//! real ones: a process in a test cgroup whose command line is an engine's, optionally in a
//! network namespace of its own, serving a body the test rewrites.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::cgroup::{random_hex, TestCgroup};

/// How a fake server behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Serve,
    Hang,
    Huge,
    Garbage,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Serve => "serve",
            Mode::Hang => "hang",
            Mode::Huge => "huge",
            Mode::Garbage => "garbage",
        }
    }
}

/// Starts `fake` (the `fake-engine` binary) in `cgroup` as a server whose command line is
/// `argv` (argv[0] the engine's program), serving `body`; with `netns`, inside a network
/// namespace of its own where only loopback is up. Returns its pid once it listens.
pub fn start(
    fake: &str,
    cgroup: &mut TestCgroup,
    argv: &[&str],
    body: &Path,
    mode: Mode,
    netns: bool,
) -> u32 {
    start_as(fake, cgroup, argv, body, mode, netns, None)
}

/// As [`start`], the server running as user and group `uid` (its body's directory must let
/// that user read the body and create files).
pub fn start_as(
    fake: &str,
    cgroup: &mut TestCgroup,
    argv: &[&str],
    body: &Path,
    mode: Mode,
    netns: bool,
    uid: Option<u32>,
) -> u32 {
    let dir = body.parent().expect("the body is in a directory");
    let ready = dir.join(format!("ready-{}", random_hex(6)));
    let quoted: Vec<String> = argv[1..].iter().map(|a| format!("'{a}'")).collect();
    let script = format!(
        "{lo}export FAKE_ENGINE_BODY='{body}' FAKE_ENGINE_MODE={mode} FAKE_ENGINE_READY='{ready}' FAKE_ENGINE_HITS='{hits}'; exec {user} bash -c \"exec -a '{argv0}' '{fake}' {args}\"",
        lo = if netns { "ip link set lo up && " } else { "" },
        user = uid.map_or(String::new(), |u| format!(
            "setpriv --reuid={u} --regid={u} --clear-groups"
        )),
        body = body.display(),
        mode = mode.as_str(),
        ready = ready.display(),
        hits = hits_file(body).display(),
        argv0 = argv[0],
        fake = fake,
        args = quoted.join(" "),
    );
    let pid = if netns {
        cgroup.start("unshare", &["--net", "bash", "-c", &script])
    } else {
        cgroup.start("bash", &["-c", &script])
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "server {argv:?} never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    pid
}

pub fn kill(pid: u32) {
    // SAFETY: kill(2) on a test child's pid; no memory is involved.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    }) {
        assert!(Instant::now() < deadline, "{pid} did not die");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn vllm_body(models: &[(&str, f64, f64, f64, f64)]) -> String {
    let mut s = String::from("# TYPE vllm:prompt_tokens_total counter\n");
    for (m, prompt, generation, hits, kv) in models {
        s += &format!(
            "vllm:prompt_tokens_total{{engine=\"0\",model_name=\"{m}\"}} {prompt}\n\
             vllm:generation_tokens_total{{engine=\"0\",model_name=\"{m}\"}} {generation}\n\
             vllm:prefix_cache_hits_total{{engine=\"0\",model_name=\"{m}\"}} {hits}\n\
             vllm:request_success_total{{engine=\"0\",finished_reason=\"stop\",model_name=\"{m}\"}} 3\n\
             vllm:kv_cache_usage_perc{{engine=\"0\",model_name=\"{m}\"}} {kv}\n\
             vllm:cache_config_info{{block_size=\"16\",engine=\"0\",model_name=\"{m}\",num_gpu_blocks=\"100\"}} 1\n"
        );
    }
    s
}

pub fn llamacpp_body(prompt: f64, cached: f64, predicted: f64) -> String {
    format!(
        "# TYPE llamacpp:prompt_tokens_total counter\nllamacpp:prompt_tokens_total {prompt}\n\
         # TYPE llamacpp:prompt_tokens_cached_total counter\nllamacpp:prompt_tokens_cached_total {cached}\n\
         # TYPE llamacpp:tokens_predicted_total counter\nllamacpp:tokens_predicted_total {predicted}\n"
    )
}

/// Where the servers serving `body` count their requests.
fn hits_file(body: &Path) -> std::path::PathBuf {
    body.with_extension("hits")
}

/// The requests (`GET <path> HTTP/1.1`) the servers serving `body` answered so far from the
/// agent with process id `pid` (its User-Agent names it: other tests' agents scrape every
/// server on the node too).
pub fn requests(body: &Path, pid: u32) -> Vec<String> {
    let mine = format!(" (pid {pid})");
    std::fs::read_to_string(hits_file(body))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_suffix(&mine))
        .filter_map(|l| {
            l.rsplit_once(' ')
                .map(|(request, _agent)| request.to_owned())
        })
        .collect()
}

/// How many requests the servers serving `body` answered from the agent with process id `pid`.
pub fn hits(body: &Path, pid: u32) -> usize {
    requests(body, pid).len()
}

/// Writes a body the server reads on its next request (renamed into place: never half-read).
pub fn write_body(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write the body");
    std::fs::rename(&tmp, path).expect("move the body into place");
}
