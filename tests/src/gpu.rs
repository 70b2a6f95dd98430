//! Shared parts of the GPU end-to-end tests (`tests/gpu.rs`, `tests/gpu_sampling.rs`): unit
//! workloads whose pids go in fake-NVML scenarios, sums over `/metrics` series, and the
//! conservation check every GPU scenario makes.

use std::path::{Path, PathBuf};

/// The UUID of the first device in the scenarios.
pub const GPU: &str = "GPU-11111111-2222-3333-4444-555555555555";

pub use crate::cgroup::Unit;

/// A systemd-unit workload with one long-sleeping process; its pid goes in scenarios.
pub fn unit(unified: &Path, tag: &str) -> Unit {
    Unit::sleeping(unified, "tally-gpu", tag)
}

/// The cgroup2 mount, when the test can run (root, cgroup2 there); otherwise a loud skip.
pub fn setup(test: &str) -> Option<PathBuf> {
    if !crate::require::root(test) {
        return None;
    }
    crate::require::unified(test)
}

/// Sum of every series of `family` whose line contains all `needles`.
pub fn total(text: &str, family: &str, needles: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) || l.starts_with(&format!("{family} ")))
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// GPU seconds charged to `unit`, on series that also contain `extra`.
pub fn seconds(text: &str, unit: &Unit, extra: &str) -> f64 {
    total(
        text,
        "tally_workload_gpu_seconds_total",
        &[&format!("unit=\"{}\"", unit.name), extra],
    )
}

/// The host row's label prefix (no pod, no container, no unit).
pub const HOST_ROW: &str =
    "namespace=\"\",pod=\"\",pod_uid=\"\",container=\"\",container_id=\"\",unit=\"\"";

/// Per device: what workloads were charged never exceeds what the device was busy, and what
/// was left unattributed is at most `unattributed_at_most` of the busy time (each scenario knows
/// how much of its GPU time has no holder), and is what the charges leave.
pub fn assert_conserved(text: &str, gpu: &str, unattributed_at_most: f64) {
    let gpu_label = format!("gpu=\"{gpu}\"");
    let charged = total(text, "tally_workload_gpu_seconds_total", &[&gpu_label]);
    let busy = total(text, "tally_gpu_busy_seconds_total", &[&gpu_label]);
    let unattributed = total(text, "tally_gpu_unattributed_seconds_total", &[&gpu_label]);
    assert!(busy > 0.0, "{gpu}: no busy time");
    assert!(
        charged <= busy * (1.0 + 1e-9) + 1e-9,
        "{gpu}: charged {charged} > busy {busy}"
    );
    assert!(
        unattributed <= unattributed_at_most * busy + 1e-9,
        "{gpu}: {unattributed} s of {busy} s unattributed, more than {unattributed_at_most} of it"
    );
    assert!(
        (charged + unattributed - busy).abs() <= 1e-6 * busy.max(1.0),
        "{gpu}: charged {charged} + unattributed {unattributed} != busy {busy}"
    );
}
