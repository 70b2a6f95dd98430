//! The VM suite: tests that need a real node's shape (systemd as PID 1, pure cgroup v2 with its
//! controllers, containerd's CRI, a distribution kernel). They run only inside the test node
//! that `tests/vm/run node` boots; `.config/nextest.toml` leaves this binary out of the host run,
//! and each test fails (never skips) when it finds itself elsewhere.
//!
//! Files the host prepared (the `.deb`) are under `$TALLY_VM_PAYLOAD`.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a command or file that fails is a failed test"
)]

mod vm_admission;
mod vm_cri;
mod vm_daemonset;
mod vm_enforcement;
mod vm_inference;
mod vm_probes;
mod vm_rdma;
mod vm_systemd;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Panics unless this is the test node: systemd is PID 1 and `/sys/fs/cgroup` is cgroup2.
pub(crate) fn on_the_node(test: &str) {
    let init = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").is_file()
        && !Path::new("/sys/fs/cgroup/unified").exists();
    assert!(
        init.trim() == "systemd" && v2,
        "{test} runs only on the test node (tests/vm/run node): PID 1 is {init:?}, pure cgroup v2: {v2}"
    );
}

/// A file the host put in the payload folder, by extension.
pub(crate) fn payload(extension: &str) -> PathBuf {
    let dir = std::env::var_os("TALLY_VM_PAYLOAD").expect("TALLY_VM_PAYLOAD");
    let found = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == extension));
    assert!(found.is_some(), "no .{extension} in {dir:?}");
    found.unwrap()
}

pub(crate) fn output(command: &mut Command) -> Output {
    command
        .output()
        .map_err(|e| format!("{command:?}: {e}"))
        .unwrap()
}

/// Runs a command that must succeed; its stdout.
pub(crate) fn run_ok(command: &mut Command) -> String {
    let out = output(command);
    assert!(
        out.status.success(),
        "{command:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn systemctl(args: &[&str]) -> Output {
    output(Command::new("systemctl").args(args))
}

/// One property of a unit (`systemctl show -P`).
pub(crate) fn property(unit: &str, name: &str) -> String {
    run_ok(Command::new("systemctl").args(["show", "-P", name, unit]))
        .trim()
        .to_owned()
}

/// Polls `probe` every 100 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub(crate) fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// CPU seconds a cgroup has used (`cpu.stat` usage_usec).
pub(crate) fn cpu_seconds(cgroup: &Path) -> f64 {
    let stat = std::fs::read_to_string(cgroup.join("cpu.stat")).expect("cpu.stat");
    let usec: f64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .expect("usage_usec")
        .parse()
        .expect("number");
    usec / 1e6
}

/// Each cgroup's CPU share (cores) over `secs`.
pub(crate) fn shares_over(cgroups: &[&Path], secs: f64) -> Vec<f64> {
    let before: Vec<f64> = cgroups.iter().map(|c| cpu_seconds(c)).collect();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let elapsed = t0.elapsed().as_secs_f64();
    cgroups
        .iter()
        .zip(before)
        .map(|(c, b)| (cpu_seconds(c) - b) / elapsed)
        .collect()
}

/// A transient systemd service burning one CPU (`systemd-run`), stopped on drop. The cpu
/// controller is on for it (`CPUWeight=`), as for any unit with CPU accounting.
pub(crate) struct Burner {
    pub unit: String,
}

impl Burner {
    pub fn start(unit: &str) -> Burner {
        let _ = systemctl(&["stop", unit]);
        let _ = systemctl(&["reset-failed", unit]);
        run_ok(Command::new("systemd-run").args([
            "--unit",
            unit,
            "-p",
            "CPUWeight=100",
            "sh",
            "-c",
            "while :; do :; done",
        ]));
        Burner {
            unit: unit.to_owned(),
        }
    }

    pub fn cgroup(&self) -> PathBuf {
        PathBuf::from("/sys/fs/cgroup/system.slice").join(&self.unit)
    }

    /// `cpu.max` of the unit's cgroup.
    pub fn cpu_max(&self) -> String {
        std::fs::read_to_string(self.cgroup().join("cpu.max"))
            .expect("cpu.max")
            .trim()
            .to_owned()
    }
}

impl Drop for Burner {
    fn drop(&mut self) {
        let _ = systemctl(&["stop", &self.unit]);
    }
}

/// A CPU-seconds budget of `cores` over a 4 s window on one unit, throttled by `action`.
pub(crate) fn cpu_budget(name: &str, unit: &str, cores: f64, action: &str) -> String {
    format!(
        "[[budget]]\nname = \"{name}\"\nresource = \"cpu_seconds\"\nlimit = {}\nwindow = \"4s\"\naction = \"{action}\"\nselect.unit = \"{unit}\"\n",
        cores * 4.0
    )
}
