//! Real cgroups on this node, v2 and v1: a process moved into a Kubernetes-shaped cgroup resolves
//! to its workload, its CPU seconds grow while it burns CPU, and its series outlive it for the
//! grace period only. These tests create cgroups with unique random names, so they can run in
//! parallel with each other.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tally_agent::host::layout::Layout;
use tally_agent::identity::{ContainerRef, Identity, PathIdentity, PidError, QosClass, Runtime};
use tally_tests::agent::{sample, Agent};
use tally_tests::cgroup::{random_hex, random_uid, remove_parents, TestCgroup};
use tally_tests::require;

fn cpu_of(text: &str, container_id: &str) -> Option<f64> {
    sample(
        text,
        "tally_workload_cpu_seconds_total",
        &[&format!("container_id=\"{container_id}\"")],
    )
}

#[test]
fn a_v2_container_cgroup_is_attributed_and_its_cpu_grows() {
    const TEST: &str = "a_v2_container_cgroup_is_attributed_and_its_cpu_grows";
    if !require::root(TEST) {
        return;
    }
    let Some(unified) = require::unified(TEST) else {
        return;
    };
    let (uid, id) = (random_uid(), random_hex(64));
    let rel = format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{id}.scope",
        uid.replace('-', "_")
    );
    let roots = vec![unified.clone()];
    let mut cg = TestCgroup::create(&roots, &rel);
    let pid = cg.burn();

    // The library path: pid → workload.
    let layout = Layout::detect(std::path::Path::new("/sys/fs/cgroup")).unwrap();
    let mut identity = Identity::new(std::path::Path::new("/proc"), layout, None);
    let workload = identity.resolve_pid(pid).unwrap();
    assert_eq!(
        workload.identity,
        PathIdentity::Container(ContainerRef {
            pod_uid: Some(uid.clone()),
            container_id: id.clone(),
            runtime: Runtime::Containerd,
            qos: Some(QosClass::Burstable),
        })
    );
    // Cached by cgroup id: the same Arc comes back.
    let again = identity.resolve_pid(pid).unwrap();
    assert!(Arc::ptr_eq(&workload, &again));

    let agent = Agent::start("[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = []\n");
    let first = agent.scrape_until(Duration::from_secs(5), "container series", |t| {
        cpu_of(t, &id).is_some_and(|v| v > 0.0)
    });
    let labels = format!(
        "namespace=\"\",pod=\"\",pod_uid=\"{uid}\",container=\"\",container_id=\"{id}\",unit=\"\""
    );
    assert!(
        first.contains(&format!("tally_workload_cpu_seconds_total{{{labels}}}")),
        "{first}"
    );
    assert!(first.contains(&format!(
        "tally_workload_info{{{labels},runtime=\"containerd\",qos_class=\"burstable\",state=\"running\"}} 1"
    )));
    let before = cpu_of(&first, &id).unwrap();
    let after = grows_with_the_kernel_counter(&agent, &id, &cg.dirs[0].join("cpu.stat"), before);

    cg.remove();
    remove_parents(&roots, &rel, 3);
    // Exited: final value kept, state flips.
    let text = agent.scrape_until(Duration::from_secs(5), "exited state", |t| {
        t.contains(&format!(
            "{labels},runtime=\"containerd\",qos_class=\"burstable\",state=\"exited\""
        ))
    });
    assert!(cpu_of(&text, &id).unwrap() >= after);
}

#[test]
fn v1_hierarchies_with_the_cgroupfs_driver_are_attributed() {
    const TEST: &str = "v1_hierarchies_with_the_cgroupfs_driver_are_attributed";
    if !require::root(TEST) {
        return;
    }
    let (Some(cpuacct), Some(memory)) = (require::v1(TEST, "cpuacct"), require::v1(TEST, "memory"))
    else {
        return;
    };
    let mut roots: Vec<PathBuf> = vec![cpuacct, memory];
    if let Some(blkio) = require::v1(TEST, "blkio") {
        roots.push(blkio);
    }
    let (uid, id) = (random_uid(), random_hex(64));
    let rel = format!("/kubepods/besteffort/pod{uid}/{id}");
    let mut cg = TestCgroup::create(&roots, &rel);
    // v1 memory charges pages when they are faulted in, not when a task moves (no
    // move_charge_at_immigrate), so the memory must be touched after the move: dd's 8 MiB buffer,
    // held while it blocks writing into a pipe nobody reads, next to a busy loop.
    let pid =
        cg.spawn("sleep 0.3; dd if=/dev/zero bs=8M count=1 2>/dev/null | (while :; do :; done)");

    let layout = Layout::detect(std::path::Path::new("/sys/fs/cgroup")).unwrap();
    let mut identity = Identity::new(std::path::Path::new("/proc"), layout, None);
    let workload = identity.resolve_pid(pid).unwrap();
    assert_eq!(
        workload.identity,
        PathIdentity::Container(ContainerRef {
            pod_uid: Some(uid.clone()),
            container_id: id.clone(),
            runtime: Runtime::Unknown,
            qos: Some(QosClass::BestEffort),
        })
    );

    let agent = Agent::start("[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = []\n");
    let first = agent.scrape_until(Duration::from_secs(5), "v1 container series", |t| {
        cpu_of(t, &id).is_some_and(|v| v > 0.0)
            && sample(
                t,
                "tally_workload_memory_bytes",
                &[&format!("container_id=\"{id}\"")],
            )
            .is_some_and(|m| m >= 8.0 * 1024.0 * 1024.0)
    });
    let mem = sample(
        &first,
        "tally_workload_memory_bytes",
        &[&format!("container_id=\"{id}\"")],
    );
    assert!(
        mem.is_some_and(|m| m >= 8.0 * 1024.0 * 1024.0),
        "memory.usage_in_bytes with dd's 8 MiB buffer: {mem:?}"
    );
    let before = cpu_of(&first, &id).unwrap();
    grows_with_the_kernel_counter(&agent, &id, &cg.dirs[0].join("cpuacct.usage"), before);
    drop(cg);
    remove_parents(&roots, &rel, 3);
}

#[test]
fn disk_writes_in_a_v1_blkio_cgroup_are_counted() {
    const TEST: &str = "disk_writes_in_a_v1_blkio_cgroup_are_counted";
    if !require::root(TEST) {
        return;
    }
    let Some(blkio) = require::v1(TEST, "blkio") else {
        return;
    };
    let Some(cpuacct) = require::v1(TEST, "cpuacct") else {
        return;
    };
    let unit = format!("tally-test-{}.service", random_hex(8));
    let rel = format!("/system.slice/{unit}");
    let roots = vec![cpuacct, blkio];
    let mut cg = TestCgroup::create(&roots, &rel);
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    // Since blk-throttle became lazily initialised, v1 `blkio.throttle.*` statistics count only
    // on queues where some throttle rule was ever set (block/blk-throttle.h,
    // `blk_throtl_activated`). A rule far above the device's speed on this cgroup activates
    // accounting without limiting anything.
    let disk = whole_disk_of(dir.path());
    std::fs::write(
        roots[1]
            .join(rel.trim_start_matches('/'))
            .join("blkio.throttle.write_bps_device"),
        format!("{disk} {}", 1u64 << 40),
    )
    .unwrap();
    let file = dir.path().join("out");
    // Direct I/O reaches the block layer inside the writer's cgroup (buffered writeback may be
    // issued by a kernel flusher, which is the eBPF work's concern).
    cg.spawn(&format!(
        "sleep 0.5; dd if=/dev/zero of={} bs=1M count=8 oflag=direct 2>/dev/null; sleep 30",
        file.display()
    ));
    let agent = Agent::start("[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = []\n");
    let needle = format!("unit=\"{unit}\"");
    let text = agent.scrape_until(Duration::from_secs(15), "8 MiB written", |t| {
        sample(t, "tally_workload_disk_write_bytes_total", &[&needle])
            .is_some_and(|b| b >= 8.0 * 1024.0 * 1024.0)
    });
    assert!(text.contains(&format!("tally_workload_info{{namespace=\"\",pod=\"\",pod_uid=\"\",container=\"\",container_id=\"\",unit=\"{unit}\",runtime=\"systemd\"")));
    drop(cg);
    remove_parents(&roots, &rel, 1);
}

#[test]
fn an_exited_workload_disappears_after_the_grace_period() {
    const TEST: &str = "an_exited_workload_disappears_after_the_grace_period";
    if !require::root(TEST) {
        return;
    }
    let Some(unified) = require::unified(TEST) else {
        return;
    };
    let id = random_hex(64);
    let rel = format!("/system.slice/docker-{id}.scope");
    let roots = vec![unified];
    let mut cg = TestCgroup::create(&roots, &rel);
    cg.burn();
    let agent = Agent::start(
        "[agent]\ntick_interval_ms = 100\n[ledger]\ngrace_period_secs = 2\n[cri]\nendpoints = []\n",
    );
    agent.scrape_until(Duration::from_secs(5), "docker container", |t| {
        cpu_of(t, &id).is_some_and(|v| v > 0.0)
    });
    cg.remove();
    let exited_at = std::time::Instant::now();
    agent.scrape_until(Duration::from_secs(3), "exited", |t| {
        t.contains(&format!(
            "container_id=\"{id}\",unit=\"\",runtime=\"docker\",qos_class=\"\",state=\"exited\""
        ))
    });
    assert!(
        cpu_of(&agent.scrape(), &id).is_some(),
        "final value kept during grace"
    );
    agent.scrape_until(Duration::from_secs(6), "series gone", |t| !t.contains(&id));
    assert!(
        exited_at.elapsed() >= Duration::from_millis(1800),
        "gone too early"
    );
}

#[test]
fn a_pid_that_exits_is_an_error_not_a_panic() {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let layout = match Layout::detect(std::path::Path::new("/sys/fs/cgroup")) {
        Ok(l) => l,
        Err(e) => {
            require::skip("a_pid_that_exits_is_an_error_not_a_panic", &e.to_string());
            return;
        }
    };
    let mut identity = Identity::new(std::path::Path::new("/proc"), layout, None);
    match identity.resolve_pid(pid) {
        Err(PidError::Gone { pid: p }) => assert_eq!(p, pid),
        other => panic!("expected Gone, got {other:?}"),
    }
}

/// `major:minor` of the whole disk holding `path` (throttle rules take disks, not partitions).
#[expect(clippy::unwrap_used, reason = "test helper")]
fn whole_disk_of(path: &std::path::Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).unwrap().dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if sys.join("partition").exists() {
        let parent = sys.canonicalize().unwrap().parent().unwrap().join("dev");
        std::fs::read_to_string(parent).unwrap().trim().to_owned()
    } else {
        format!("{major}:{minor}")
    }
}

/// The kernel's own CPU counter of the cgroup in seconds (`cpu.stat` or `cpuacct.usage`).
#[expect(clippy::unwrap_used, reason = "test helper")]
fn kernel_cpu_seconds(file: &std::path::Path) -> f64 {
    let text = std::fs::read_to_string(file).unwrap();
    match text.lines().find_map(|l| l.strip_prefix("usage_usec ")) {
        Some(usec) => usec.trim().parse::<f64>().unwrap() / 1e6,
        None => text.trim().parse::<f64>().unwrap() / 1e9,
    }
}

/// Waits until the burner has used another 0.2 s of CPU by the kernel's count (however loaded
/// the machine is), then until the agent's counter shows at least that, and never more than the
/// kernel counted at the time. Returns the agent's value.
#[expect(clippy::unwrap_used, reason = "test helper")]
fn grows_with_the_kernel_counter(
    agent: &Agent,
    id: &str,
    file: &std::path::Path,
    before: f64,
) -> f64 {
    let target = kernel_cpu_seconds(file).max(before) + 0.2;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while kernel_cpu_seconds(file) < target {
        assert!(
            std::time::Instant::now() < deadline,
            "the busy loop never got 0.2 s of CPU"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = agent.scrape_until(Duration::from_secs(5), "cpu grows", |t| {
        cpu_of(t, id).is_some_and(|v| v >= target)
    });
    let after = cpu_of(&text, id).unwrap();
    assert!(
        after <= kernel_cpu_seconds(file) + 1e-9,
        "the agent cannot count more than the kernel: {after}"
    );
    after
}

/// A cgroup directory whose name has multibyte characters where a pod uid goes (anyone with a
/// delegated subtree can make one) once panicked every tick for good: no tick completed, `/readyz`
/// stayed 503 (or 200 on the last tick) and metering stopped on the whole node. With it present
/// from the start, the agent gets ready, ticks on, meters the workload beside it, and no tick
/// panics.
#[test]
fn a_multibyte_cgroup_name_never_stops_the_ticks() {
    const TEST: &str = "a_multibyte_cgroup_name_never_stops_the_ticks";
    if !require::root(TEST) {
        return;
    }
    let Some(unified) = require::unified(TEST) else {
        return;
    };
    let roots = vec![unified];
    // The pod part is as long in bytes as a pod uid, with two of its characters two bytes each.
    let odd_rel = format!(
        "/kubepods/burstable/pod8d1f7c2\u{e9}4b5a4c3d9e8f0a1b2c3d4e5f0\u{e9}/{}",
        random_hex(64)
    );
    let odd = TestCgroup::create(&roots, &odd_rel);
    let unit = format!("tally-mb-{}.service", random_hex(8));
    let mut beside = TestCgroup::create(&roots, &format!("/system.slice/{unit}"));
    beside.burn();
    let agent = Agent::start("[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = []\n");
    let unit_label = format!("unit=\"{unit}\"");
    let first = agent.scrape_until(Duration::from_secs(10), "the unit's CPU", |t| {
        sample(t, "tally_workload_cpu_seconds_total", &[&unit_label]).is_some_and(|v| v > 0.0)
    });
    std::thread::sleep(Duration::from_secs(1));
    let later = agent.scrape();
    let ticks = |t: &str| sample(t, "tally_ticks_total", &[]).unwrap_or_default();
    assert!(
        ticks(&later) >= ticks(&first) + 3.0,
        "ticks went from {} to {} in 1 s at 200 ms",
        ticks(&first),
        ticks(&later)
    );
    let cpu = |t: &str| sample(t, "tally_workload_cpu_seconds_total", &[&unit_label]);
    assert!(cpu(&later) > cpu(&first), "{later}");
    assert_eq!(
        sample(
            &later,
            "tally_collector_errors_total",
            &["collector=\"tick\""]
        ),
        None,
        "{later}"
    );
    drop(agent);
    drop(beside);
    drop(odd);
    remove_parents(&roots, &odd_rel, 3);
}
