//! The block I/O source on the real kernel: real cgroups, real `dd` to a file under /var/tmp.
//! Needs root; skips loudly otherwise (fails under `TALLY_TEST_STRICT=1`).

mod common;

use common::{poll, privileged, ScratchFile, TestCgroup};
use tally_ebpf::disk::{Disk, DiskConfig};
use tally_ebpf::{DiskValue, ProbeStatus};

const MIB: u64 = 1 << 20;
const FILE_MIB: u64 = 8;

fn config(disabled: &[&str]) -> DiskConfig {
    DiskConfig {
        max_entries: 1024,
        disabled_methods: disabled.iter().map(|s| (*s).to_owned()).collect(),
    }
}

#[expect(clippy::unwrap_used, reason = "test helper")]
fn load_with_status(config: &DiskConfig) -> (Disk, ProbeStatus) {
    let (disk, status) = Disk::load(config);
    eprintln!("disk probe status: {status:?}");
    assert!(status.up, "disk source did not load: {status:?}");
    assert_eq!(status.probe, "disk");
    let disk = disk.unwrap();
    assert_eq!(disk.method(), status.method);
    (disk, status)
}

fn load(config: &DiskConfig) -> Disk {
    load_with_status(config).0
}

#[expect(clippy::unwrap_used, reason = "test helper")]
fn value(disk: &Disk, cgroup_id: u64) -> DiskValue {
    disk.read()
        .unwrap()
        .into_iter()
        .find(|(id, _)| *id == cgroup_id)
        .map(|(_, v)| v)
        .unwrap_or_default()
}

#[expect(clippy::unwrap_used, reason = "test helper")]
fn root_id() -> u64 {
    std::os::unix::fs::MetadataExt::ino(
        &std::fs::metadata(common::unified_root().unwrap()).unwrap(),
    )
}

/// Has a child in a new cgroup overwrite `FILE_MIB` MiB with O_DIRECT and read them back the same
/// way, and returns the child's counters once `enough` holds for them (or the last seen, after
/// 5 s). One round: bytes are counted per bio, where none can be lost, so no retry hides a miss.
fn direct_io(disk: &Disk, test: &str, enough: impl Fn(&DiskValue) -> bool) -> DiskValue {
    let file = ScratchFile::new(test);
    let of = format!("of={}", file.path());
    let count = format!("count={FILE_MIB}");
    // The file is allocated, and dd and its libraries are in the page cache, before the child
    // starts: so the child reads and writes nothing but the file's data (no block bitmap or
    // extent reads for a new file, which a loaded node may have evicted, and which the kernel
    // rightly charges to the writer).
    let prepared = std::process::Command::new("dd")
        .args([
            "if=/dev/zero",
            &of,
            "bs=1M",
            &count,
            "oflag=direct",
            "status=none",
        ])
        .status();
    assert!(
        prepared.is_ok_and(|s| s.success()),
        "{test}: dd did not run"
    );
    let cgroup = TestCgroup::create(test);
    cgroup.run_ok(
        "dd",
        &[
            "if=/dev/zero",
            &of,
            "bs=1M",
            &count,
            "oflag=direct",
            "conv=notrunc",
        ],
    );
    let inf = format!("if={}", file.path());
    cgroup.run_ok("dd", &[&inf, "of=/dev/null", "bs=1M", "iflag=direct"]);
    poll(5, || Some(value(disk, cgroup.id())).filter(&enough))
        .unwrap_or_else(|| value(disk, cgroup.id()))
}

/// What holds for any completed requests: each lands in exactly one latency bucket, and dd wrote
/// nothing but its file (the rest is filesystem metadata at most).
fn assert_consistent(v: &DiskValue, test: &str) {
    let histogram: u64 = v.latency_buckets.iter().sum();
    // Every completed request added its latency: at least 1 µs each on a real device.
    assert!(
        v.latency_ns_total >= histogram * 1_000,
        "{test}: latency sum {} ns for {histogram} requests",
        v.latency_ns_total
    );
    assert_eq!(histogram, v.reads + v.writes, "{test}: {v:?}");
    assert!(v.write_bytes < 2 * FILE_MIB * MIB, "{test}: {v:?}");
    assert!(v.read_bytes < 2 * FILE_MIB * MIB, "{test}: {v:?}");
}

/// Every byte is charged to the cgroup that submitted it, exactly, in one round, whatever else
/// the node does. Requests are counted for the cgroup that queued them; on a node without the v2
/// io controller the scheduler may merge a bio into another cgroup's request, so only a lower
/// bound holds for them.
fn assert_direct_io_counted(disk: &Disk, test: &str) {
    let exact = |v: &DiskValue| v.write_bytes == FILE_MIB * MIB && v.read_bytes == FILE_MIB * MIB;
    let v = direct_io(disk, test, |child| {
        exact(child) && child.reads > 0 && child.writes > 0
    });
    assert!(
        exact(&v),
        "{test}: not exactly {FILE_MIB} MiB each way: {v:?}; lost {:?}",
        disk.lost()
    );
    assert!(v.writes > 0 && v.reads > 0, "{test}: {v:?}");
    assert_consistent(&v, test);
}

#[test]
fn direct_io_is_charged_to_the_cgroup_doing_it() {
    if !privileged("direct_io_is_charged_to_the_cgroup_doing_it") {
        return;
    }
    let (disk, status) = load_with_status(&config(&[]));
    // tp_btf is the best disk method and works wherever BTF does.
    assert_eq!(disk.method(), "tp_btf", "{status:?}");
    assert_eq!(status.error, None);
    let _stats = tally_ebpf::stats::StatsGuard::enable().unwrap();
    assert_direct_io_counted(&disk, "disk-default");
    let stats = disk.program_stats();
    for s in &stats {
        eprintln!(
            "{}: {} runs, {} ns/run",
            s.program,
            s.run_count,
            s.run_time_ns.checked_div(s.run_count).unwrap_or(0)
        );
    }
    assert_eq!(stats.len(), 4, "{stats:?}");
    // Insert runs only for requests that go through a scheduler or wait; these three see all.
    for program in ["disk_bio_btf", "disk_issue_btf", "disk_complete_btf"] {
        let s = stats.iter().find(|s| s.program == program);
        assert!(s.is_some_and(|s| s.run_count > 0), "{program}: {stats:?}");
    }
}

#[test]
fn falls_back_to_raw_tracepoint_then_tracepoint() {
    if !privileged("falls_back_to_raw_tracepoint_then_tracepoint") {
        return;
    }
    for (disabled, expected) in [
        (&["fentry", "tp_btf"][..], "raw_tracepoint"),
        (&["fentry", "tp_btf", "raw_tracepoint"][..], "tracepoint"),
    ] {
        let disk = load(&config(disabled));
        assert_eq!(disk.method(), expected);
        let test = format!("disk-{expected}");
        if expected == "raw_tracepoint" {
            assert_direct_io_counted(&disk, &test);
            continue;
        }
        // Bytes are counted per bio in the submitter's context here too: exact. The record has
        // no request pointer, so a request is charged to the task current at its first issue:
        // the writer, or whichever task dispatched the scheduler's queue, so request counts
        // are approximate.
        let child = direct_io(&disk, &test, |child| {
            child.write_bytes == FILE_MIB * MIB && child.read_bytes == FILE_MIB * MIB
        });
        assert_eq!(
            (child.write_bytes, child.read_bytes),
            (FILE_MIB * MIB, FILE_MIB * MIB),
            "{test}: {child:?}"
        );
        assert_consistent(&child, &test);
    }
}

/// Buffered writes reach the disk later, from a kernel flusher. The kernel charges them to the
/// writer's cgroup only with cgroup writeback, which needs the cgroup v2 `io` and `memory`
/// controllers (mm/backing-dev.c, inode_cgwb_enabled()). On hybrid nodes like the development
/// VMs (v1 memory and blkio, no v2 controllers) they are charged to the flusher, in the root
/// cgroup, so this only asserts that the bytes are seen, in the writer's cgroup or the root's.
#[test]
fn buffered_writeback_is_seen() {
    if !privileged("buffered_writeback_is_seen") {
        return;
    }
    let disk = load(&config(&[]));
    let root = root_id();
    let cgroup = TestCgroup::create("disk-buffered");
    let file = ScratchFile::new("disk-buffered");
    let script = format!(
        "dd if=/dev/zero of={} bs=1M count={FILE_MIB} status=none && sync",
        file.path()
    );
    let before = value(&disk, root).write_bytes;
    cgroup.run_ok("sh", &["-c", &script]);
    let written = || value(&disk, cgroup.id()).write_bytes + value(&disk, root).write_bytes;
    let seen = poll(5, || {
        (written().saturating_sub(before) >= FILE_MIB * MIB).then_some(())
    });
    assert!(
        seen.is_some(),
        "buffered_writeback_is_seen: writer {:?}, root {:?}",
        value(&disk, cgroup.id()),
        value(&disk, root)
    );
}

#[test]
fn a_full_map_counts_lost_updates() {
    if !privileged("a_full_map_counts_lost_updates") {
        return;
    }
    let disk = load(&DiskConfig {
        max_entries: 1,
        disabled_methods: Vec::new(),
    });
    let first = TestCgroup::create("disk-full-a");
    let second = TestCgroup::create("disk-full-b");
    let file = ScratchFile::new("disk-full");
    let of = format!("of={}", file.path());
    for cgroup in [&first, &second] {
        cgroup.run_ok(
            "dd",
            &["if=/dev/zero", &of, "bs=1M", "count=1", "oflag=direct"],
        );
    }
    let lost = poll(10, || (disk.lost().unwrap() > 0).then_some(()));
    assert!(lost.is_some(), "nothing lost: {:?}", disk.read().unwrap());
    assert!(disk.read().unwrap().len() <= 1);
}

#[test]
fn remove_deletes_a_cgroups_entry() {
    if !privileged("remove_deletes_a_cgroups_entry") {
        return;
    }
    let mut disk = load(&config(&[]));
    let cgroup = TestCgroup::create("disk-remove");
    let file = ScratchFile::new("disk-remove");
    let of = format!("of={}", file.path());
    cgroup.run_ok(
        "dd",
        &["if=/dev/zero", &of, "bs=1M", "count=1", "oflag=direct"],
    );
    let charged = poll(5, || {
        (value(&disk, cgroup.id()).write_bytes == MIB).then_some(())
    });
    assert!(charged.is_some(), "{:?}", value(&disk, cgroup.id()));
    disk.remove(&[cgroup.id(), u64::MAX]).unwrap();
    assert!(disk
        .read()
        .unwrap()
        .iter()
        .all(|(id, _)| *id != cgroup.id()));
}
