//! The TCP and block-I/O probes through the agent: per-workload counts in `/metrics` from real
//! sockets and real I/O in real cgroups, the same numbers through the fallback attach methods,
//! and `tally_probe_up` telling which method is in use.
use std::time::Duration;

use tally_tests::agent::sample;
use tally_tests::cgroup::{random_hex, TestCgroup};
use tally_tests::require;
use tally_tests::tcp_probe::{agent, counts_through, TCP_METHODS};

/// Each attach method alone: every one this kernel loads counts exactly, and with none
/// disabled the agent takes the first of them. Which ones load is the kernel's business (this
/// hybrid node refuses fentry and kprobes; the VM's distribution kernel loads both): nothing here assumes it.
#[test]
fn tcp_counts_hold_through_every_method_this_kernel_loads_and_the_best_is_chosen() {
    const TEST: &str =
        "tcp_counts_hold_through_every_method_this_kernel_loads_and_the_best_is_chosen";
    if !require::root(TEST) {
        return;
    }
    let Some(unified) = require::unified(TEST) else {
        return;
    };
    if require::binary(TEST, "python3").is_none() {
        return;
    }
    let loaded: Vec<&str> = TCP_METHODS
        .into_iter()
        .filter(|m| counts_through(&unified, m))
        .collect();
    eprintln!("TCP methods this kernel loads: {loaded:?}");
    // tracepoints exist on every kernel the agent supports.
    assert!(loaded.contains(&"tracepoint"), "{loaded:?}");
    let text = agent("").scrape();
    assert_eq!(
        sample(
            &text,
            "tally_probe_up",
            &["probe=\"tcp\"", &format!("method=\"{}\"", loaded[0])]
        ),
        Some(1.0),
        "the best method that loads: {loaded:?}\n{text}"
    );
}

/// Direct I/O of a known size is charged to the cgroup that did it, with its operations and
/// latencies; buffered writes are seen too (on this hybrid node writeback runs in the flusher's
/// cgroup, the host row, since cgroup writeback needs the v2 io and memory controllers).
#[test]
fn direct_writes_are_attributed_and_buffered_writes_seen() {
    const TEST: &str = "direct_writes_are_attributed_and_buffered_writes_seen";
    if !require::root(TEST) {
        return;
    }
    let Some(unified) = require::unified(TEST) else {
        return;
    };
    let agent = agent("");
    // Whichever method this kernel loads (tp_btf on both kernels seen so far), it is up.
    let probe = agent.scrape();
    assert!(
        probe
            .lines()
            .any(|l| l.starts_with("tally_probe_up{probe=\"disk\",") && l.ends_with("} 1")),
        "{probe}"
    );
    let unit = format!("tally-disk-{}.service", random_hex(6));
    let cg = TestCgroup::create(
        std::slice::from_ref(&unified),
        &format!("/system.slice/{unit}"),
    );
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let file = dir.path().join("direct");
    let out = cg.run(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", file.display()),
            "bs=1M",
            "count=8",
            "oflag=direct",
        ],
    );
    assert!(out.status.success());
    let needle = format!("unit=\"{unit}\"");
    let mib8 = 8.0 * 1024.0 * 1024.0;
    // The series the node shows: the kernel's (v1 blkio on a hybrid node, io.stat on pure v2).
    let text = agent.scrape_until(Duration::from_secs(10), "8 MiB written", |t| {
        sample(t, "tally_workload_disk_write_bytes_total", &[&needle]).is_some_and(|b| b >= mib8)
    });
    let written = sample(&text, "tally_workload_disk_write_bytes_total", &[&needle]).unwrap();
    assert!(
        written < 2.0 * mib8,
        "8 MiB and some metadata at most: {written}"
    );
    let ops = sample(
        &text,
        "tally_workload_disk_operations_total",
        &[&needle, "op=\"write\""],
    )
    .unwrap();
    assert!(ops >= 8.0, "at least one request per MiB: {ops}");
    // The latency histogram holds one observation per completed request, read or write (its
    // count is the operations' sum, counted apart), in buckets that only grow, with a mean
    // between 1 µs and 1 s for a 1 MiB direct write.
    let operations: f64 = ["read", "write"]
        .iter()
        .filter_map(|op| {
            sample(
                &text,
                "tally_workload_disk_operations_total",
                &[&needle, &format!("op=\"{op}\"")],
            )
        })
        .sum();
    let count = sample(
        &text,
        "tally_workload_disk_io_latency_seconds_count",
        &[&needle],
    )
    .unwrap();
    assert_eq!(count, operations);
    let buckets: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("tally_workload_disk_io_latency_seconds_bucket{"))
        .filter(|l| l.contains(&needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(buckets.len() >= 2, "{buckets:?}");
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    let sum = sample(
        &text,
        "tally_workload_disk_io_latency_seconds_sum",
        &[&needle],
    )
    .unwrap();
    assert!((1e-6..1.0).contains(&(sum / count)), "mean {}", sum / count);

    // Buffered: 4 MiB through the page cache, then sync. The bytes land on the unit (cgroup
    // writeback: pure cgroup v2 with io and memory) or on the host row (the flusher's, elsewhere),
    // and on no other workload.
    let before = unit_or_host_written(&agent.scrape(), &needle);
    let out = cg.run(
        "sh",
        &[
            "-c",
            &format!(
                "dd if=/dev/zero of={}/buffered bs=1M count=4 2>/dev/null && sync",
                dir.path().display()
            ),
        ],
    );
    assert!(out.status.success());
    agent.scrape_until(Duration::from_secs(10), "buffered bytes seen", |t| {
        unit_or_host_written(t, &needle) >= before + 4.0 * 1024.0 * 1024.0
    });
}

/// Bytes written by the workload `needle` names and by the host row (every workload label empty).
fn unit_or_host_written(text: &str, needle: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("tally_workload_disk_write_bytes_total{"))
        .filter(|l| l.contains(needle) || (l.contains("pod=\"\"") && l.contains("unit=\"\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
