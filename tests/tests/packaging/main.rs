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

mod deb;
mod kubernetes;
mod monitoring;
mod sandbox;
/// The repository root (the workspace holding tests/).
mod unit;

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// `unified` and every v1 hierarchy a workload's CPU, memory and disk files can be in on this
/// node, for test cgroups the agent meters (and budgets select) as it would a real unit.
pub(crate) fn every_hierarchy(unified: PathBuf) -> Vec<PathBuf> {
    let mut roots = vec![unified];
    for controller in ["cpu,cpuacct", "cpuacct", "memory", "blkio"] {
        let dir = Path::new("/sys/fs/cgroup").join(controller);
        if dir.join("cgroup.procs").is_file() && !dir.join("cgroup.controllers").exists() {
            roots.push(dir);
        }
    }
    roots
}

pub(crate) fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub(crate) fn output(command: &mut Command) -> Output {
    command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"))
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `command`, asserting it exits 0; returns stdout.
pub(crate) fn run_ok(command: &mut Command) -> String {
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
pub(crate) fn metric_names(text: &str) -> BTreeSet<String> {
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
pub(crate) fn serves(text: &str, name: &str) -> bool {
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
pub(crate) fn leaf_keys(value: &serde_json::Value, prefix: &str, keys: &mut BTreeSet<String>) {
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
pub(crate) fn uncommented(config: &str) -> (String, BTreeSet<String>) {
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
