//! Packaging, checked against the real thing: the default configuration file is every key at its
//! default; the systemd unit verifies, and the agent runs under its capability bounding set and
//! an emulation of its system call filter exactly as it runs without them; the .deb installs,
//! runs and purges cleanly; the Kubernetes manifests render and validate against the API schemas
//! and agree with the unit and the configuration; the alert rules pass promtool and their unit
//! tests; and every metric the dashboard and the rules use is one the agent serves, every
//! dashboard query answering from a real Prometheus.
//!
//! The .deb is built by cargo-deb from the binary the other tests run (target/<profile>/tally),
//! not from a release build: packaging/deb/build.sh makes the release package from the same
//! `[package.metadata.deb]`, and a thin-LTO release build would cost CI minutes to test the same
//! layout and maintainer scripts.
#![expect(
    clippy::panic,
    reason = "test helpers: a failed step is a failed test, with its message"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tally_agent::config::Config;
use tally_tests::agent::{free_port, http_get, sample, tally_bin, Agent};
use tally_tests::cgroup::{random_hex, TestCgroup};
use tally_tests::prometheus::Prometheus;
use tally_tests::require;

/// The repository root (the workspace holding tests/).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn output(command: &mut Command) -> Output {
    command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `command`, asserting it exits 0; returns stdout.
fn run_ok(command: &mut Command) -> String {
    let out = output(command);
    assert!(
        out.status.success(),
        "{command:?}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Every `tally_*` name in `text` (a metric name is `[a-zA-Z_:][a-zA-Z0-9_:]*`; a match must not
/// continue a longer identifier).
fn metric_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut names = BTreeSet::new();
    let mut from = 0;
    while let Some(at) = text[from..].find("tally_") {
        let start = from + at;
        let mut end = start;
        while end < bytes.len() && ident(bytes[end]) {
            end += 1;
        }
        if start == 0 || !ident(bytes[start - 1]) {
            names.insert(text[start..end].to_owned());
        }
        from = end.max(start + 1);
    }
    names
}

/// Whether the exposition `text` has a sample of `name` (or of the histogram/summary it is a
/// series of).
fn serves(text: &str, name: &str) -> bool {
    let has = |family: &str| {
        text.lines().filter(|l| !l.starts_with('#')).any(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
    };
    has(name)
        || ["_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| name.strip_suffix(suffix).is_some_and(has))
}

// ---------------------------------------------------------------------------------------------
// Default configuration

/// Dotted paths of every leaf of a serialized configuration (unset options, `null`, left out).
fn leaf_keys(value: &serde_json::Value, prefix: &str, keys: &mut BTreeSet<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaf_keys(v, &path, keys);
            }
        }
        serde_json::Value::Null => {}
        _ => {
            keys.insert(prefix.to_owned());
        }
    }
}

/// The file with every commented-out setting (`#key = value`, no space after `#`) enabled, and
/// the dotted keys it sets.
fn uncommented(config: &str) -> (String, BTreeSet<String>) {
    let mut section = String::new();
    let mut keys = BTreeSet::new();
    let mut out = String::new();
    for line in config.lines() {
        let line = match line.strip_prefix('#') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase()) => rest,
            _ => line,
        };
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else if !line.starts_with('#') {
            if let Some((key, _)) = line.split_once('=') {
                keys.insert(format!("{section}.{}", key.trim()));
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    (out, keys)
}

#[test]
fn default_config_is_every_key_at_its_default_and_validates() {
    let shipped = read("packaging/config/tally.toml");
    let defaults = Config::default();
    assert_eq!(
        Config::parse(&shipped).unwrap(),
        defaults,
        "as shipped, the file must run the agent exactly as no file would"
    );

    let (enabled, keys) = uncommented(&shipped);
    assert_eq!(
        Config::parse(&enabled).unwrap_or_else(|e| panic!("uncommented file: {e}\n{enabled}")),
        defaults,
        "every commented-out value must be the default"
    );
    let mut want = BTreeSet::new();
    leaf_keys(&serde_json::to_value(&defaults).unwrap(), "", &mut want);
    assert_eq!(
        keys, want,
        "packaging/config/tally.toml must show every configuration key (as `#key = default`)"
    );

    let path = root().join("packaging/config/tally.toml");
    let stdout = run_ok(Command::new(tally_bin()).arg("validate").arg(&path));
    assert!(stdout.contains(": ok"), "{stdout}");
}

// ---------------------------------------------------------------------------------------------
// systemd unit

const UNIT: &str = "packaging/systemd/tally.service";

/// The values of every `key=` line of a unit file, in order.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
        .collect()
}

fn unit_value(unit: &str, key: &str) -> Option<String> {
    unit_values(unit, key).pop()
}

/// The unit's capabilities (`CAP_BPF`, ...), checked to be the same in both sets.
fn unit_capabilities(unit: &str) -> BTreeSet<String> {
    let set = |key| -> BTreeSet<String> {
        unit_values(unit, key)
            .iter()
            .flat_map(|v| v.split_whitespace())
            .map(str::to_owned)
            .collect()
    };
    let bounding = set("CapabilityBoundingSet");
    assert!(!bounding.is_empty(), "no CapabilityBoundingSet= in {UNIT}");
    assert_eq!(
        bounding,
        set("AmbientCapabilities"),
        "{UNIT}: CapabilityBoundingSet= and AmbientCapabilities= must list the same capabilities"
    );
    bounding
}

/// The unit with the agent's path replaced by `bin`, in `dir`.
fn unit_copy(dir: &Path, bin: &Path) -> PathBuf {
    let unit = read(UNIT).replace("/usr/bin/tally", &bin.display().to_string());
    let path = dir.join("tally.service");
    std::fs::write(&path, unit).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

/// `systemd-analyze verify` passes and says nothing about the unit (unknown keys and bad values
/// are only warnings, so stderr is checked too).
fn verify_unit(analyze: &Path, unit: &Path) {
    let out = output(Command::new(analyze).arg("verify").arg(unit));
    let stderr = text(&out.stderr);
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("tally.service"))
        .collect();
    assert!(
        out.status.success() && about_unit.is_empty(),
        "systemd-analyze verify {}: {}\n{stderr}",
        unit.display(),
        out.status
    );
}

#[test]
fn systemd_unit_verifies_and_its_exposure_is_as_documented() {
    const TEST: &str = "systemd_unit_verifies_and_its_exposure_is_as_documented";
    let Some(analyze) = require::binary(TEST, "systemd-analyze") else {
        return;
    };
    let unit = read(UNIT);
    let caps = unit_capabilities(&unit);
    assert_eq!(
        caps,
        ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON", "CAP_SYS_ADMIN"]
            .map(str::to_owned)
            .into(),
    );
    for (key, want) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("WatchdogSec", "30s"),
        ("StateDirectory", "tally"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("MemoryDenyWriteExecute", "yes"),
        ("DevicePolicy", "closed"),
    ] {
        assert_eq!(unit_value(&unit, key).as_deref(), Some(want), "{key}=");
    }
    for forbidden in ["PrivateDevices", "ProtectKernelTunables", "ExecStopPost"] {
        assert!(
            unit_value(&unit, forbidden).is_none(),
            "{forbidden}= must stay out of the unit (see its comments)"
        );
    }
    assert_eq!(
        unit_values(&unit, "ExecStartPre"),
        ["/usr/bin/tally validate /etc/tally/tally.toml"]
    );

    let dir = tempfile::tempdir().unwrap();
    let copy = unit_copy(dir.path(), &tally_bin());
    verify_unit(&analyze, &copy);

    let out = output(
        Command::new(&analyze)
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&copy),
    );
    let report = text(&out.stdout);
    let figure: f64 = report
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for tally.service:"))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure figure: {}\n{report}", text(&out.stderr)));
    eprintln!("systemd-analyze security: exposure {figure}");
    assert!(
        figure <= 3.5,
        "exposure {figure} > 3.5: hardening was lost\n{report}"
    );
    // The README states the figure of Debian 12's systemd 252; other versions score differently.
    let version = run_ok(Command::new(&analyze).arg("--version"));
    if version.starts_with("systemd 252 ") {
        let readme = read("README.md");
        assert!(
            readme.contains(&format!("exposure level {figure} ")),
            "README.md must state the unit's exposure level, {figure}"
        );
    }
}

/// The agent under the unit's sandbox: its capability bounding set and no_new_privs (setpriv),
/// its `SystemCallFilter=` expanded with `systemd-analyze syscall-filter`, its
/// `RestrictAddressFamilies=` and `MemoryDenyWriteExecute=` (seccomp, through libseccomp's
/// Python binding: stacked filters, the strictest answer wins, as systemd installs them).
const SANDBOX: &str = r#"
import errno, os, sys, seccomp
allowed_file, families, mdwe = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
argv = sys.argv[4:]
deny = seccomp.ERRNO(errno.EPERM)
extra = seccomp.SyscallFilter(seccomp.ALLOW)
if mdwe:
    PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
    both = PROT_WRITE | PROT_EXEC
    extra.add_rule(deny, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, both, both))
    extra.add_rule(deny, "mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
    extra.add_rule(deny, "pkey_mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
    extra.add_rule(deny, "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, SHM_EXEC, SHM_EXEC))
if families:
    allowed_families = sorted(int(f) for f in families.split(","))
    nofamily = seccomp.ERRNO(errno.EAFNOSUPPORT)
    for family in range(allowed_families[-1]):
        if family not in allowed_families:
            extra.add_rule(nofamily, "socket", seccomp.Arg(0, seccomp.EQ, family))
    extra.add_rule(nofamily, "socket", seccomp.Arg(0, seccomp.GT, allowed_families[-1]))
extra.load()
calls = seccomp.SyscallFilter(deny)
for name in open(allowed_file).read().split() + ["execve", "exit", "exit_group", "rt_sigreturn"]:
    try:
        calls.add_rule(seccomp.ALLOW, name)
    except Exception:
        pass  # not a system call of this architecture or libseccomp
calls.load()
os.execv(argv[0], argv)
"#;

/// `systemd-analyze syscall-filter`'s groups (`@name` → members, groups or calls).
fn syscall_groups(analyze: &Path) -> BTreeMap<String, Vec<String>> {
    let listing = run_ok(Command::new(analyze).arg("syscall-filter"));
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = None;
    for line in listing.lines() {
        if line.starts_with('@') {
            current = Some(line.trim().to_owned());
            groups.entry(line.trim().to_owned()).or_default();
        } else if let Some(group) = &current {
            let item = line.trim();
            if !item.is_empty() && !item.starts_with('#') {
                groups
                    .entry(group.clone())
                    .or_default()
                    .push(item.to_owned());
            }
        }
    }
    groups
}

fn expand(groups: &BTreeMap<String, Vec<String>>, item: &str, into: &mut BTreeSet<String>) {
    match groups.get(item) {
        Some(members) if item.starts_with('@') => {
            for member in members {
                expand(groups, member, into);
            }
        }
        _ => {
            assert!(!item.starts_with('@'), "unknown system call group {item}");
            into.insert(item.to_owned());
        }
    }
}

/// How to run a program under the unit's sandbox: the program goes after the returned command's
/// arguments. Files the sandbox needs are written to `dir`.
struct Sandbox {
    caps: BTreeSet<String>,
    no_new_privs: bool,
    allowed_file: PathBuf,
    families: String,
    mdwe: bool,
    script: PathBuf,
}

impl Sandbox {
    fn from_unit(analyze: &Path, dir: &Path) -> Sandbox {
        let unit = read(UNIT);
        let groups = syscall_groups(analyze);
        let mut allowed = BTreeSet::new();
        for line in unit_values(&unit, "SystemCallFilter") {
            let (deny, list) = match line.strip_prefix('~') {
                Some(rest) => (true, rest),
                None => (false, line.as_str()),
            };
            let mut calls = BTreeSet::new();
            for item in list.split_whitespace() {
                expand(&groups, item, &mut calls);
            }
            if deny {
                allowed.retain(|c| !calls.contains(c));
            } else {
                allowed.extend(calls);
            }
        }
        let allowed_file = dir.join("allowed-syscalls");
        std::fs::write(
            &allowed_file,
            allowed.into_iter().collect::<Vec<_>>().join("\n"),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", allowed_file.display()));
        let families = unit_values(&unit, "RestrictAddressFamilies")
            .iter()
            .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .map(|name| {
                match name.as_str() {
                    "AF_UNIX" => libc::AF_UNIX,
                    "AF_INET" => libc::AF_INET,
                    "AF_INET6" => libc::AF_INET6,
                    "AF_NETLINK" => libc::AF_NETLINK,
                    other => panic!("add {other} to the test's address family names"),
                }
                .to_string()
            })
            .collect::<Vec<_>>()
            .join(",");
        let script = dir.join("sandbox.py");
        std::fs::write(&script, SANDBOX).unwrap_or_else(|e| panic!("{}: {e}", script.display()));
        Sandbox {
            caps: unit_capabilities(&unit),
            no_new_privs: unit_value(&unit, "NoNewPrivileges").as_deref() == Some("yes"),
            allowed_file,
            families,
            mdwe: unit_value(&unit, "MemoryDenyWriteExecute").as_deref() == Some("yes"),
            script,
        }
    }

    /// `program args…` under the sandbox.
    fn command(&self, program: &Path, args: &[&str]) -> Command {
        let caps: Vec<String> = self
            .caps
            .iter()
            .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
            .collect();
        let mut command = Command::new("setpriv");
        if self.no_new_privs {
            command.arg("--no-new-privs");
        }
        command
            .arg("--bounding-set")
            .arg(format!("-all,{}", caps.join(",")))
            .args(["--inh-caps", "-all", "/usr/bin/python3"])
            .arg(&self.script)
            .arg(&self.allowed_file)
            .arg(&self.families)
            .arg(if self.mdwe { "1" } else { "0" })
            .arg(program)
            .args(args);
        command
    }

    /// CapBnd as /proc/<pid>/status shows it.
    fn bounding_mask(&self) -> u64 {
        self.caps
            .iter()
            .map(|c| match c.as_str() {
                "CAP_NET_ADMIN" => 12,
                "CAP_SYS_ADMIN" => 21,
                "CAP_PERFMON" => 38,
                "CAP_BPF" => 39,
                other => panic!("add {other} to the test's capability numbers"),
            })
            .fold(0u64, |mask, bit| mask | 1 << bit)
    }
}

/// An agent started by a command of ours; killed on drop.
struct Spawned {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Spawned {
    fn start(mut command: Command, port: u16, log: PathBuf) -> Spawned {
        let stderr = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{e}"));
        let child = command
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("TALLY_LISTEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {command:?}: {e}"));
        let spawned = Spawned { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if http_get(port, "/readyz", &[]).is_ok_and(|r| r.status == 200) {
                return spawned;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("sandboxed agent not ready; log:\n{}", spawned.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn scrape(&self) -> String {
        let r = http_get(self.port, "/metrics", &[]).unwrap_or_else(|e| panic!("scrape: {e}"));
        assert_eq!(r.status, 200);
        text(&r.body)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn probes(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with("tally_probe_up{"))
        .map(str::to_owned)
        .collect()
}

/// `tally check --json`'s item statuses.
fn check_statuses(out: &Output) -> BTreeMap<String, String> {
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("check --json: {e}: {}", text(&out.stdout)));
    report["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            (
                i["name"].as_str().unwrap_or_default().to_owned(),
                i["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Sends `count` UDP datagrams of `size` bytes to `host:port`.
const UDP_SENDER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[3])):
    s.sendto(b"u" * int(sys.argv[4]), (sys.argv[1], int(sys.argv[2])))
"#;

/// Traffic from a cgroup to this node's non-loopback address reads `node` scope in both agents.
/// Without a routable address (no default route) there is nothing to compare.
#[expect(clippy::unwrap_used, reason = "test helper")]
fn node_scope_is_the_same(unified: &Path, reference: &Agent, sandboxed: &Spawned) {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    let Ok(node_addr) = probe
        .connect("192.0.2.1:9")
        .and_then(|()| probe.local_addr())
        .map(|a| a.ip())
    else {
        eprintln!("no default route: node-scope comparison not possible here");
        return;
    };
    let listener = std::net::UdpSocket::bind((node_addr, 0)).unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let unit = format!("tally-pkg-{}.service", random_hex(8));
    let cg = TestCgroup::create(
        std::slice::from_ref(&unified.to_path_buf()),
        &format!("/system.slice/{unit}"),
    );
    let out = cg.run(
        "python3",
        &["-c", UDP_SENDER, &node_addr.to_string(), &port, "5", "100"],
    );
    assert!(out.status.success(), "sender: {}", text(&out.stderr));
    let label = format!("unit=\"{unit}\"");
    let scopes = |metrics: &str| -> BTreeSet<String> {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("tally_workload_network_transmit_bytes_total{") && l.contains(&label)
            })
            .filter_map(|l| {
                l.split("scope=\"")
                    .nth(1)?
                    .split('"')
                    .next()
                    .map(str::to_owned)
            })
            .collect()
    };
    reference.scrape_until(
        Duration::from_secs(5),
        "reference: the unit's traffic",
        |t| !scopes(t).is_empty(),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while scopes(&sandboxed.scrape()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let want: BTreeSet<String> = ["node".to_owned()].into();
    assert_eq!(scopes(&reference.scrape()), want, "{node_addr} unconfined");
    assert_eq!(
        scopes(&sandboxed.scrape()),
        want,
        "{node_addr} under the sandbox; log:\n{}",
        sandboxed.log()
    );
}

#[test]
fn agent_under_the_units_sandbox_works_as_without_it() {
    const TEST: &str = "agent_under_the_units_sandbox_works_as_without_it";
    if !require::root(TEST) {
        return;
    }
    let Some(analyze) = require::binary(TEST, "systemd-analyze") else {
        return;
    };
    if require::binary(TEST, "setpriv").is_none() {
        return;
    }
    let seccomp = output(Command::new("/usr/bin/python3").args(["-c", "import seccomp"]));
    if !seccomp.status.success() {
        require::skip(
            TEST,
            "/usr/bin/python3 cannot import seccomp (Debian package python3-seccomp)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::from_unit(&analyze, dir.path());
    let config_text = format!(
        "[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = [\"{}\"]\n",
        dir.path().join("no-runtime.sock").display()
    );

    // The reference: the same binary and configuration, unconfined.
    let reference = Agent::start(&config_text);

    let port = free_port();
    let config = dir.path().join("tally.toml");
    std::fs::write(
        &config,
        config_text.replace(
            "[agent]\n",
            &format!("[agent]\nlisten = \"127.0.0.1:{port}\"\n"),
        ),
    )
    .unwrap();
    let config_arg = config.display().to_string();
    let agent = Spawned::start(
        sandbox.command(&tally_bin(), &["agent", "--config", &config_arg]),
        port,
        dir.path().join("sandboxed.log"),
    );

    // The sandbox is real: the unit's bounding set, no_new_privs, two seccomp filters.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.child.id())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(
        u64::from_str_radix(&field("CapBnd:"), 16).unwrap(),
        sandbox.bounding_mask(),
        "{status}"
    );
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2");
    assert_eq!(field("Seccomp_filters:"), "2");

    // Every probe comes up (or not) exactly as it does unconfined.
    let sandboxed = agent.scrape();
    assert_eq!(
        probes(&sandboxed),
        probes(&reference.scrape()),
        "sandboxed log:\n{}",
        agent.log()
    );
    assert_eq!(
        sample(
            &sandboxed,
            "tally_probe_up",
            &["probe=\"network\"", "method=\"cgroup_skb\""]
        ),
        Some(1.0),
        "{sandboxed}\n{}",
        agent.log()
    );
    // bpf_stats (CAP_SYS_ADMIN) works inside.
    assert!(
        !agent.log().contains("bpf_stats unavailable"),
        "{}",
        agent.log()
    );
    assert!(serves(&sandboxed, "tally_ebpf_program_run_seconds_total"));
    assert!(!agent.log().contains("Bad system call"), "{}", agent.log());

    // The node's own address is `node` scope inside too: the agent learns it through
    // getifaddrs(3), a netlink socket (RestrictAddressFamilies= must keep AF_NETLINK).
    if let Some(unified) = require::unified(TEST) {
        node_scope_is_the_same(&unified, &reference, &agent);
    }

    // ExecStartPre's `tally validate`, and `tally check`, under the sandbox too.
    let shipped = root().join("packaging/config/tally.toml");
    run_ok(&mut sandbox.command(&tally_bin(), &["validate", &shipped.display().to_string()]));
    let inside =
        output(&mut sandbox.command(&tally_bin(), &["check", "--json", "--config", &config_arg]));
    let outside =
        output(Command::new(tally_bin()).args(["check", "--json", "--config", &config_arg]));
    assert_eq!(inside.status.code(), outside.status.code());
    assert_eq!(check_statuses(&inside), check_statuses(&outside));
}

// ---------------------------------------------------------------------------------------------
// Debian package

const PACKAGE: &str = "tally";

/// Whether dpkg knows the package in any state but "not installed".
fn dpkg_knows(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .ok()?;
    let status = text(&out.stdout);
    (out.status.success() && !status.ends_with("not-installed")).then_some(status)
}

/// Purges the package, and removes the policy-rc.d it put in place, even when the test fails.
struct Installed {
    policy_rc_d: Option<PathBuf>,
}

impl Drop for Installed {
    fn drop(&mut self) {
        if dpkg_knows(PACKAGE).is_some() {
            let _ = Command::new("dpkg").args(["--purge", PACKAGE]).output();
        }
        if let Some(path) = &self.policy_rc_d {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[test]
fn deb_installs_runs_and_purges_cleanly() {
    const TEST: &str = "deb_installs_runs_and_purges_cleanly";
    if !require::root(TEST) {
        return;
    }
    let Some(analyze) = require::binary(TEST, "systemd-analyze") else {
        return;
    };
    for tool in ["dpkg", "dpkg-deb", "cargo-deb"] {
        if require::binary(TEST, tool).is_none() {
            return;
        }
    }
    // This test installs into the real /usr/bin and /etc; it never replaces a real install.
    if let Some(status) = dpkg_knows(PACKAGE) {
        require::skip(
            TEST,
            &format!("package `{PACKAGE}` is already on this machine ({status})"),
        );
        return;
    }
    if Path::new("/usr/bin/tally").exists() || Path::new("/etc/tally").exists() {
        require::skip(TEST, "/usr/bin/tally or /etc/tally exists already");
        return;
    }

    // cargo-deb packages `target/release/tally` of the target directory it is given: give it
    // one holding the binary under test.
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    std::fs::create_dir_all(target.join("release")).unwrap();
    std::fs::copy(tally_bin(), target.join("release/tally")).unwrap();
    let debs = dir.path().join("deb");
    run_ok(
        Command::new("cargo")
            .current_dir(root())
            .env("CARGO_TARGET_DIR", &target)
            .args([
                "deb",
                "--locked",
                "-p",
                "tally-agent",
                "--no-build",
                "--fast",
                "-o",
            ])
            .arg(&debs),
    );
    let deb = std::fs::read_dir(&debs)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .unwrap_or_else(|| panic!("no .deb in {}", debs.display()));
    eprintln!("built {} in {:?}", deb.display(), started.elapsed());

    let info = run_ok(Command::new("dpkg-deb").arg("--info").arg(&deb));
    assert!(info.contains(" Package: tally\n"), "{info}");
    assert!(info.contains("libsystemd0"), "Depends: {info}");
    let contents = run_ok(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for path in [
        "./usr/bin/tally",
        "./usr/lib/systemd/system/tally.service",
        "./etc/tally/tally.toml",
        "./usr/share/tally/grafana/tally.json",
        "./usr/share/tally/prometheus/rules.yml",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(path)),
            "{path} not in the package:\n{contents}"
        );
    }

    // Keep the maintainer scripts from starting the service where systemd runs (invoke-rc.d and
    // deb-systemd-invoke honour policy-rc.d); the test runs the binary itself.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let guard = Installed {
        policy_rc_d: (!policy.exists()).then(|| {
            std::fs::write(policy, "#!/bin/sh\nexit 101\n").unwrap();
            let mut perms = std::fs::metadata(policy).unwrap().permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
            std::fs::set_permissions(policy, perms).unwrap();
            policy.to_path_buf()
        }),
    };

    run_ok(Command::new("dpkg").arg("--install").arg(&deb));
    assert_eq!(dpkg_knows(PACKAGE).as_deref(), Some("install ok installed"));
    let conffiles = run_ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", PACKAGE]));
    assert!(
        conffiles.contains("/etc/tally/tally.toml"),
        "conffiles: {conffiles}"
    );
    assert_eq!(
        std::fs::read_to_string("/usr/lib/systemd/system/tally.service").unwrap(),
        read(UNIT)
    );
    // Enabled (deb-systemd-helper works without a running systemd).
    assert!(
        Path::new("/etc/systemd/system/multi-user.target.wants/tally.service").exists(),
        "the unit is not enabled"
    );
    // The installed unit, with its real paths, verifies.
    verify_unit(&analyze, Path::new("/usr/lib/systemd/system/tally.service"));

    let version = run_ok(Command::new("/usr/bin/tally").arg("--version"));
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
    let validate =
        run_ok(Command::new("/usr/bin/tally").args(["validate", "/etc/tally/tally.toml"]));
    assert!(validate.contains("/etc/tally/tally.toml: ok"), "{validate}");
    let check = output(Command::new("/usr/bin/tally").arg("check"));
    eprintln!("tally check:\n{}", text(&check.stdout));
    assert!(
        matches!(check.status.code(), Some(0 | 1)),
        "tally check: {} (2 = cannot run)\n{}{}",
        check.status,
        text(&check.stdout),
        text(&check.stderr)
    );

    // Remove: the binary and unit go, the edited-or-not conffile stays.
    run_ok(Command::new("dpkg").args(["--remove", PACKAGE]));
    assert!(!Path::new("/usr/bin/tally").exists());
    assert!(!Path::new("/usr/lib/systemd/system/tally.service").exists());
    assert!(Path::new("/etc/tally/tally.toml").exists());
    assert_eq!(
        dpkg_knows(PACKAGE).as_deref(),
        Some("deinstall ok config-files")
    );

    // Purge: nothing left.
    run_ok(Command::new("dpkg").args(["--purge", PACKAGE]));
    assert_eq!(dpkg_knows(PACKAGE), None);
    for gone in [
        "/etc/tally",
        "/etc/systemd/system/multi-user.target.wants/tally.service",
        "/etc/systemd/system/tally.service",
    ] {
        assert!(
            std::fs::symlink_metadata(gone).is_err(),
            "{gone} left after purge"
        );
    }
    drop(guard);
    eprintln!("package test took {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Kubernetes manifests

/// The YAML documents of `path` as JSON, through PyYAML (kubernetes-validate's dependency), or a
/// skip.
fn yaml_docs(test: &str, path: &Path) -> Option<Vec<serde_json::Value>> {
    let out = output(Command::new("python3").args([
        "-c",
        "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None], sys.stdout)",
    ]).arg(path));
    if !out.status.success() && text(&out.stderr).contains("No module named 'yaml'") {
        require::skip(
            test,
            "python3 has no `yaml` module (PyYAML; dev/deps --test installs it)",
        );
        return None;
    }
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        text(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}")))
}

/// `kubectl kustomize dir`, written to `into`.
fn kustomize(kubectl: &Path, dir: &str, into: &Path) -> PathBuf {
    let rendered = run_ok(Command::new(kubectl).arg("kustomize").arg(root().join(dir)));
    let file = into.join(format!("{}.yaml", dir.replace('/', "_")));
    std::fs::write(&file, rendered).unwrap_or_else(|e| panic!("{e}"));
    file
}

fn of_kind<'a>(docs: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    let found: Vec<_> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} expected");
    found[0]
}

/// Whether every label of `selector` is in `labels`.
fn selects(selector: &serde_json::Value, labels: &serde_json::Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels[k] == *v))
}

/// The Kubernetes versions the manifests are validated against: the oldest still commonly run
/// and the newest kubernetes-validate knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

#[test]
fn kubernetes_manifests_render_validate_and_agree_with_the_unit() {
    const TEST: &str = "kubernetes_manifests_render_validate_and_agree_with_the_unit";
    let Some(kubectl) = require::binary(TEST, "kubectl") else {
        return;
    };
    let Some(validator) = require::binary(TEST, "kubernetes-validate") else {
        return;
    };
    if require::binary(TEST, "python3").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit_caps: BTreeSet<String> = unit_capabilities(&read(UNIT))
        .iter()
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect();

    for overlay in [
        "packaging/kubernetes/base",
        "packaging/kubernetes/overlays/gpu",
    ] {
        let file = kustomize(&kubectl, overlay, dir.path());
        let Some(docs) = yaml_docs(TEST, &file) else {
            return;
        };
        let kinds: BTreeSet<(String, String)> = docs
            .iter()
            .map(|d| {
                (
                    d["apiVersion"].as_str().unwrap_or_default().to_owned(),
                    d["kind"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let want: BTreeSet<(String, String)> = [
            ("v1", "Namespace"),
            ("v1", "ServiceAccount"),
            ("v1", "ConfigMap"),
            ("v1", "Service"),
            ("apps/v1", "DaemonSet"),
            ("monitoring.coreos.com/v1", "ServiceMonitor"),
            ("monitoring.coreos.com/v1", "PrometheusRule"),
        ]
        .iter()
        .map(|(a, k)| ((*a).to_owned(), (*k).to_owned()))
        .collect();
        assert_eq!(kinds, want, "{overlay}");

        // Every built-in object against the API's schemas, unknown fields rejected. The two
        // prometheus-operator kinds have no schema there: checked below and by promtool.
        let builtin = docs
            .iter()
            .filter(|d| d["apiVersion"] != "monitoring.coreos.com/v1")
            .count();
        for version in KUBERNETES_VERSIONS {
            let out = output(
                Command::new(&validator)
                    .args(["--strict", "-k", version])
                    .arg(&file),
            );
            let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
            assert!(
                out.status.success(),
                "{overlay} against {version}:\n{report}"
            );
            assert_eq!(
                report.matches("passed for resource").count(),
                builtin,
                "{overlay} against {version}:\n{report}"
            );
        }

        let daemonset = of_kind(&docs, "DaemonSet");
        let pod = &daemonset["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let security = &container["securityContext"];
        let added: BTreeSet<String> = security["capabilities"]["add"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect();
        assert_eq!(
            added, unit_caps,
            "{overlay}: the DaemonSet's capabilities must be the unit's"
        );
        assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
        assert_eq!(security["privileged"], false);
        assert_eq!(security["readOnlyRootFilesystem"], true);
        assert_eq!(security["runAsUser"], 0);
        assert_eq!(pod["hostPID"], true);
        assert_eq!(pod["automountServiceAccountToken"], false);
        assert_eq!(pod["priorityClassName"], "system-node-critical");
        assert_eq!(
            daemonset["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
            "10%"
        );
        assert_eq!(
            container["ports"][0],
            serde_json::json!({"name": "metrics", "containerPort": 9811, "protocol": "TCP"})
        );
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
        let env = |name: &str| {
            container["env"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e["name"] == name)
                .cloned()
        };
        assert_eq!(
            env("NODE_NAME").map(|e| e["valueFrom"]["fieldRef"]["fieldPath"].clone()),
            Some("spec.nodeName".into())
        );

        // Mounts: every one has its volume; host paths by mount path.
        let volumes: BTreeMap<String, serde_json::Value> = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| (v["name"].as_str().unwrap_or_default().to_owned(), v.clone()))
            .collect();
        let mut host_paths = BTreeMap::new();
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let name = mount["name"].as_str().unwrap_or_default();
            let volume = volumes
                .get(name)
                .unwrap_or_else(|| panic!("{overlay}: no volume {name}"));
            if let Some(host) = volume["hostPath"]["path"].as_str() {
                host_paths.insert(
                    mount["mountPath"].as_str().unwrap_or_default().to_owned(),
                    host.to_owned(),
                );
            }
        }

        // The configuration: the generated ConfigMap, mounted where --config points, valid,
        // and its host roots are the host's.
        let configmap = of_kind(&docs, "ConfigMap");
        let config_volume = volumes
            .values()
            .find(|v| v["configMap"].is_object())
            .unwrap();
        assert_eq!(
            config_volume["configMap"]["name"],
            configmap["metadata"]["name"]
        );
        assert_eq!(
            container["args"],
            serde_json::json!(["--config", "/etc/tally/tally.toml"])
        );
        let toml = configmap["data"]["tally.toml"].as_str().unwrap();
        let config_file = dir.path().join("configmap.toml");
        std::fs::write(&config_file, toml).unwrap();
        run_ok(Command::new(tally_bin()).arg("validate").arg(&config_file));
        let config = Config::parse(toml).unwrap();
        for (root, host) in [
            (&config.paths.proc_root, "/proc"),
            (&config.paths.cgroup_root, "/sys/fs/cgroup"),
        ] {
            assert_eq!(
                host_paths
                    .get(&root.display().to_string())
                    .map(String::as_str),
                Some(host),
                "{overlay}: {}",
                root.display()
            );
        }
        for endpoint in &config.cri.endpoints {
            let parent = endpoint.parent().unwrap().display().to_string();
            assert_eq!(
                host_paths.get(&parent),
                Some(&parent),
                "{overlay}: CRI socket directory {parent} must be the host's"
            );
        }
        assert_eq!(config.listen_addr().unwrap().port(), 9811);

        // Service → pods, ServiceMonitor → Service.
        let service = of_kind(&docs, "Service");
        assert_eq!(service["spec"]["clusterIP"], "None");
        assert_eq!(service["spec"]["ports"][0]["name"], "metrics");
        assert_eq!(service["spec"]["ports"][0]["port"], 9811);
        assert!(selects(
            &service["spec"]["selector"],
            &daemonset["spec"]["template"]["metadata"]["labels"]
        ));
        let monitor = of_kind(&docs, "ServiceMonitor");
        assert!(selects(
            &monitor["spec"]["selector"]["matchLabels"],
            &service["metadata"]["labels"]
        ));
        assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
        assert_eq!(
            of_kind(&docs, "ServiceAccount")["automountServiceAccountToken"],
            false
        );
        assert_eq!(
            of_kind(&docs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
            "privileged"
        );

        if overlay.ends_with("gpu") {
            assert_eq!(pod["nodeSelector"]["nvidia.com/gpu.present"], "true");
            assert_eq!(pod["runtimeClassName"], "nvidia");
            assert!(pod["tolerations"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|t| t["key"] == "nvidia.com/gpu" && t["effect"] == "NoSchedule"));
            assert_eq!(
                env("NVIDIA_VISIBLE_DEVICES").map(|e| e["value"].clone()),
                Some("all".into())
            );
            assert_eq!(
                env("NVIDIA_DRIVER_CAPABILITIES").map(|e| e["value"].clone()),
                Some("utility".into())
            );
        } else {
            assert!(pod["runtimeClassName"].is_null());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Alert rules and the dashboard

#[test]
fn alert_rules_pass_promtool_and_the_prometheusrule_is_the_same() {
    const TEST: &str = "alert_rules_pass_promtool_and_the_prometheusrule_is_the_same";
    let Some(promtool) = require::binary(TEST, "promtool") else {
        return;
    };
    let Some(kubectl) = require::binary(TEST, "kubectl") else {
        return;
    };
    if require::binary(TEST, "python3").is_none() {
        return;
    }
    let rules = root().join("packaging/prometheus/rules.yml");
    run_ok(Command::new(&promtool).args(["check", "rules"]).arg(&rules));
    // Each alert fires when it should and not before (packaging/prometheus/rules_test.yml).
    run_ok(
        Command::new(&promtool)
            .args(["test", "rules"])
            .arg(root().join("packaging/prometheus/rules_test.yml")),
    );

    let dir = tempfile::tempdir().unwrap();
    let rendered = kustomize(&kubectl, "packaging/kubernetes/base", dir.path());
    let (Some(docs), Some(plain)) = (yaml_docs(TEST, &rendered), yaml_docs(TEST, &rules)) else {
        return;
    };
    let groups = &of_kind(&docs, "PrometheusRule")["spec"]["groups"];
    assert_eq!(
        *groups, plain[0]["groups"],
        "prometheusrule.yaml's spec.groups must equal rules.yml's groups"
    );
    let extracted = dir.path().join("prometheusrule-groups.yml");
    std::fs::write(
        &extracted,
        serde_json::json!({ "groups": groups }).to_string(),
    )
    .unwrap();
    let checked = run_ok(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(&extracted),
    );
    assert!(checked.contains("SUCCESS: 5 rules found"), "{checked}");
}

/// Sends one HTTP request to the agent and reads the answer: traffic both ways.
const CLIENT: &str = r#"
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"GET /metrics HTTP/1.1\r\nHost: tally\r\nConnection: close\r\n\r\n")
while s.recv(65536):
    pass
"#;

/// Every panel query of a Grafana dashboard (rows' nested panels included).
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    let mut queries = Vec::new();
    let mut stack: Vec<&serde_json::Value> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    while let Some(panel) = stack.pop() {
        stack.extend(panel["panels"].as_array().into_iter().flatten());
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                queries.push((
                    panel["title"].as_str().unwrap_or_default().to_owned(),
                    expr.to_owned(),
                ));
            }
        }
    }
    queries
}

#[test]
fn dashboard_and_alerts_use_only_served_metrics_and_every_panel_answers() {
    const TEST: &str = "dashboard_and_alerts_use_only_served_metrics_and_every_panel_answers";
    if !require::root(TEST) {
        return;
    }
    let Some(unified) = require::unified(TEST) else {
        return;
    };
    let Some(python) = require::binary(TEST, "python3") else {
        return;
    };
    let Some(prometheus) = require::binary(TEST, "prometheus") else {
        return;
    };
    let dashboard_text = read("packaging/grafana/tally.json");
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard_text).unwrap();
    let mut names = metric_names(&dashboard_text);
    names.extend(metric_names(&read("packaging/prometheus/rules.yml")));
    names.extend(metric_names(&read(
        "packaging/kubernetes/base/prometheusrule.yaml",
    )));
    assert!(names.len() >= 15, "{names:?}");

    // A systemd-unit workload with CPU, memory and disk files in every hierarchy this node has,
    // and traffic both ways; a CRI endpoint that never answers, for the CRI error counters.
    let mut roots = vec![unified];
    for controller in ["cpu,cpuacct", "cpuacct", "memory", "blkio"] {
        let dir = Path::new("/sys/fs/cgroup").join(controller);
        if dir.join("cgroup.procs").is_file() && !dir.join("cgroup.controllers").exists() {
            roots.push(dir);
        }
    }
    let unit = format!("tally-pkg-{}.service", random_hex(8));
    let mut cg = TestCgroup::create(&roots, &format!("/system.slice/{unit}"));
    // A GPU (the fake libnvidia-ml) held by the unit's process, with an XID, for the GPU rules.
    let gpu_pid = cg.spawn("exec sleep 600");
    let nvml = tally_tests::fake_nvml::FakeNvml::new(
        tally_tests::fake_nvml::FULL,
        &serde_json::json!({
            "devices": [{
                "uuid": "GPU-00000000-1111-2222-3333-444444444444",
                "name": "NVIDIA H100 80GB HBM3",
                "memory_total_bytes": 85899345920u64,
                "power_watts": 300,
                "processes": [{ "pid": gpu_pid, "used_memory_bytes": 1_000_000_000u64, "sm_percent": 40 }]
            }],
            "xids": [{ "at_ms": 200, "device": 0, "xid": 79 }]
        }),
    );
    let sockets = tempfile::tempdir().unwrap();
    let agent = Agent::start(&format!(
        "[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = [\"{}\"]\n{}",
        sockets.path().join("no-runtime.sock").display(),
        nvml.config()
    ));
    let out = cg.run(
        &python.display().to_string(),
        &["-c", CLIENT, &agent.port.to_string()],
    );
    assert!(out.status.success(), "client: {}", text(&out.stderr));
    let unit_label = format!("unit=\"{unit}\"");
    // The unit's traffic reaches the ledger on the next tick; then every family is there or
    // never will be.
    agent.scrape_until(Duration::from_secs(10), "the unit's traffic", |t| {
        [
            "transmit_bytes",
            "receive_bytes",
            "transmit_packets",
            "receive_packets",
        ]
        .iter()
        .all(|f| {
            sample(
                t,
                &format!("tally_workload_network_{f}_total"),
                &[&unit_label],
            )
            .is_some()
        })
    });
    let metrics = agent.scrape();
    let missing: Vec<&String> = names.iter().filter(|n| !serves(&metrics, n)).collect();
    assert!(
        missing.is_empty(),
        "used by the dashboard or the alert rules but not served: {missing:?}\n{metrics}"
    );

    // Every panel's query, as Grafana would send it, answers from a real Prometheus.
    let server = Prometheus::start(&prometheus, agent.port);
    server.query_until_found(
        "count_over_time(tally_ticks_total[1m]) > 3",
        Duration::from_secs(30),
    );
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 15);
    for (title, expr) in queries {
        let query = expr
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*")
            .replace("$namespace", ".*");
        assert!(!query.contains('$'), "{title}: unknown variable in {expr}");
        let result = server.query_until_found(&query, Duration::from_secs(15));
        eprintln!("{title}: {} series", result.len());
    }
    drop(cg);
}
