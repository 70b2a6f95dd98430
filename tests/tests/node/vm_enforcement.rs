//! Budgets on pods made through containerd's CRI, enforced through pure cgroup v2 files:
//! `cpu.max` (two shares at once), `io.max` (a rate, and a tighter limit found in place kept and
//! restored) and `cgroup.freeze` (a duty cycle, thawed within a cycle of the agent's SIGKILL); and
//! the egress token bucket on a pod's container, four levels below the root.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tally_tests::agent::{sample, Agent};
use tally_tests::cri_client::{CriClient, PodHandle, Qos};
use tally_tests::receiver::Receiver;

use crate::{on_the_node, shares_over, wait_for};

const CONTAINERD: &str = "/run/containerd/containerd.sock";

/// A BestEffort pod in namespace `tally-vm` with one container running `script`.
struct PodRun {
    pod: PodHandle,
    name: String,
    cgroup: PathBuf,
}

fn pod_running(cri: &CriClient, name: &str, script: &str) -> PodRun {
    let pod = cri
        .run_pod("tally-vm", name, Qos::BestEffort)
        .expect("RunPodSandbox");
    let id = pod
        .create_container("main", "tally.test/busybox:1", &["sh", "-c", script])
        .expect("CreateContainer");
    let cgroup = pod.container_cgroup_path(id.as_str());
    assert!(cgroup.is_dir(), "{}", cgroup.display());
    PodRun {
        pod,
        name: name.to_owned(),
        cgroup,
    }
}

fn config(state: &Path, extra: &str) -> String {
    format!(
        "[cri]\nendpoints = [\"{CONTAINERD}\"]\n[gpu]\npod_resources_socket = \"\"\n[enforcement]\nstate_dir = \"{}\"\n{extra}",
        state.display()
    )
}

fn budget(name: &str, pod: &str, body: &str) -> String {
    format!("[[budget]]\nname = \"{name}\"\n{body}select.namespace = \"tally-vm\"\nselect.pod = \"{pod}\"\n")
}

fn cpu_budget(name: &str, pod: &str, cores: f64, action: &str) -> String {
    budget(
        name,
        pod,
        &format!(
            "resource = \"cpu_seconds\"\nlimit = {}\nwindow = \"4s\"\naction = \"{action}\"\n",
            cores * 4.0
        ),
    )
}

/// Whether `budget` is enforced on the pod's `main` container (the budget selects the pod, so
/// its sandbox row has a series too, never enforced: the pause process uses nothing).
fn active(text: &str, budget: &str) -> bool {
    sample(
        text,
        "tally_enforcement_active",
        &["container=\"main\"", &format!("budget=\"{budget}\"")],
    ) == Some(1.0)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| format!("<{}: {e}>", path.display()))
        .trim()
        .to_owned()
}

#[test]
fn vm_cpu_budgets_of_30_and_70_percent_hold_at_once_through_cpu_max() {
    on_the_node("vm_cpu_budgets_of_30_and_70_percent_hold_at_once_through_cpu_max");
    let cri = CriClient::connect(Path::new(CONTAINERD)).expect("containerd's CRI");
    let a = pod_running(&cri, "thirty", "while :; do :; done");
    let b = pod_running(&cri, "seventy", "while :; do :; done");
    let state = tempfile::tempdir().unwrap();
    let budgets = format!(
        "{}{}",
        cpu_budget("thirty", &a.name, 0.3, "cpu"),
        cpu_budget("seventy", &b.name, 0.7, "cpu")
    );
    let mut agent = Agent::start(&config(state.path(), &budgets));
    agent.scrape_until(Duration::from_secs(60), "both budgets enforced", |t| {
        active(t, "thirty") && active(t, "seventy")
    });
    assert_eq!(read(&a.cgroup.join("cpu.max")), "30000 100000");
    assert_eq!(read(&b.cgroup.join("cpu.max")), "70000 100000");
    let shares = shares_over(&[&a.cgroup, &b.cgroup], 6.0);
    eprintln!("achieved shares: {shares:?} (targets 0.30, 0.70)");
    assert!((shares[0] - 0.30).abs() <= 0.03, "{shares:?}");
    assert!((shares[1] - 0.70).abs() <= 0.03, "{shares:?}");

    agent.signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(20)).is_some());
    assert_eq!(read(&a.cgroup.join("cpu.max")), "max 100000");
    assert_eq!(read(&b.cgroup.join("cpu.max")), "max 100000");
    drop((a.pod, b.pod));
}

/// `major:minor` of the disk under the containers' file systems.
fn root_disk() -> String {
    read(Path::new("/sys/block/vda/dev"))
}

#[test]
fn vm_a_disk_budget_holds_through_io_max_and_keeps_a_tighter_limit() {
    on_the_node("vm_a_disk_budget_holds_through_io_max_and_keeps_a_tighter_limit");
    let cri = CriClient::connect(Path::new(CONTAINERD)).expect("containerd's CRI");
    // Direct writes (no page cache), so io.max paces the writer itself.
    let w = pod_running(
        &cri,
        "writer",
        "sleep 1; while :; do dd if=/dev/zero of=/data bs=65536 count=256 oflag=direct 2>/dev/null; done",
    );
    let dev = root_disk();
    let state = tempfile::tempdir().unwrap();
    let rate = 2_000_000.0;
    // Written bytes over a 2 s window, throttled to `rate` per device when over `limit`.
    let disk_budget = |limit: &str| {
        budget(
            "disk",
            &w.name,
            &format!("resource = \"disk_write_bytes\"\nlimit = {limit}\nwindow = \"2s\"\naction = \"disk\"\nthrottle.disk_bytes_per_sec = {rate}\n"),
        )
    };
    let disk = disk_budget("4e6");
    let mut agent = Agent::start(&config(state.path(), &disk));
    agent.scrape_until(Duration::from_secs(60), "disk enforced", |t| {
        active(t, "disk")
    });
    let io_max = w.cgroup.join("io.max");
    assert!(
        read(&io_max).contains(&format!("{dev} rbps=2000000 wbps=2000000")),
        "{}",
        read(&io_max)
    );
    // The writer's rate under the throttle, from the agent's own counter.
    let written = |t: &str| {
        sample(
            t,
            "tally_workload_disk_write_bytes_total",
            &["pod=\"writer\"", "container=\"main\""],
        )
        .unwrap_or(-1.0)
    };
    // The kernel's own count of what passed io.max, over the same span, beside it.
    let kernel = || -> f64 {
        let stat = read(&w.cgroup.join("io.stat"));
        let line = stat.lines().find(|l| l.starts_with(&format!("{dev} ")));
        line.and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("wbytes=")))
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    std::thread::sleep(Duration::from_secs(2));
    let (k0, t0) = (kernel(), Instant::now());
    let achieved = agent.tick_rate(Duration::from_secs(10), written);
    let by_kernel = (kernel() - k0) / t0.elapsed().as_secs_f64();
    eprintln!(
        "direct writes under a 2 MB/s io.max: {:.3} MB/s (io.stat: {:.3} MB/s)",
        achieved / 1e6,
        by_kernel / 1e6
    );
    assert!((achieved - rate).abs() <= 0.05 * rate, "{achieved}");
    assert!((by_kernel - rate).abs() <= 0.05 * rate, "{by_kernel}");
    agent.signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(20)).is_some());
    assert!(!read(&io_max).contains("2000000"), "{}", read(&io_max));

    // A tighter write limit already in place (1 MB/s) is kept while enforced, then restored.
    // The writer now goes at 1 MB/s, so this budget's rate is below that (0.5 MB/s).
    std::fs::write(&io_max, format!("{dev} wbps=1000000")).unwrap();
    let found = read(&io_max);
    let state = tempfile::tempdir().unwrap();
    let slow = disk_budget("1e6");
    let mut agent = Agent::start(&config(state.path(), &slow));
    agent.scrape_until(Duration::from_secs(60), "disk enforced again", |t| {
        active(t, "disk")
    });
    assert!(
        read(&io_max).contains(&format!("{dev} rbps=2000000 wbps=1000000")),
        "{}",
        read(&io_max)
    );
    agent.signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(20)).is_some());
    assert_eq!(read(&io_max), found);
    drop(w.pod);
}

#[test]
fn vm_a_freeze_duty_cycle_holds_a_share_and_thaws_within_a_cycle_of_sigkill() {
    on_the_node("vm_a_freeze_duty_cycle_holds_a_share_and_thaws_within_a_cycle_of_sigkill");
    let cri = CriClient::connect(Path::new(CONTAINERD)).expect("containerd's CRI");
    let f = pod_running(&cri, "frozen", "while :; do :; done");
    let state = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(&config(
        state.path(),
        &format!(
            "freeze_period_ms = 100\n{}",
            cpu_budget("duty", &f.name, 0.3, "freeze")
        ),
    ));
    agent.scrape_until(Duration::from_secs(60), "freeze enforced", |t| {
        active(t, "duty")
    });
    // The share is steered from the measured rate; give it a few ticks to settle.
    std::thread::sleep(Duration::from_secs(6));
    let share = shares_over(&[&f.cgroup], 6.0)[0];
    eprintln!("achieved share under cgroup.freeze: {share:.3} (target 0.30)");
    assert!((share - 0.30).abs() <= 0.03, "{share}");

    let frozen = || {
        read(&f.cgroup.join("cgroup.events"))
            .lines()
            .any(|l| l == "frozen 1")
    };
    wait_for(Duration::from_secs(5), "the container frozen", || {
        frozen().then_some(())
    });
    // Killed while frozen (checked again right after the kill, or the test proves nothing);
    // polled from the kill on, not after reaping the agent, which takes longer than a cycle here.
    agent.signal(libc::SIGKILL);
    let killed = Instant::now();
    let was_frozen = frozen();
    while frozen() {
        assert!(
            killed.elapsed() < Duration::from_millis(100),
            "still frozen {:?} after SIGKILL",
            killed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    eprintln!(
        "thawed {:?} after SIGKILL (frozen at the kill: {was_frozen})",
        killed.elapsed()
    );
    agent.wait_exit(Duration::from_secs(5));
    // And it stays thawed: nothing froze it again.
    std::thread::sleep(Duration::from_millis(500));
    assert!(!frozen());
    assert_eq!(read(&f.cgroup.join("cgroup.freeze")), "0");
    drop(f.pod);
}

/// A host-network pod streams TCP to a receiver in this process as fast as it can; an egress
/// budget of 10 MB per 5 s (2 MB/s) holds it to the rate within 10 % (the receiver counts what
/// arrives), and stopping the agent lets it go far faster again.
#[test]
fn vm_an_egress_budget_holds_a_pods_stream_to_its_rate() {
    on_the_node("vm_an_egress_budget_holds_a_pods_stream_to_its_rate");
    let cri = CriClient::connect(Path::new(CONTAINERD)).expect("containerd's CRI");
    let receiver = Receiver::start();
    let state = tempfile::tempdir().unwrap();
    let egress = budget(
        "egress",
        "sender",
        "resource = \"network_egress_bytes\"\nlimit = 10e6\nwindow = \"5s\"\naction = \"network\"\n",
    );
    // The agent first: an unthrottled stream takes all of the emulated CPUs, and the agent's
    // start (loading and verifying its programs) would crawl behind it.
    let mut agent = Agent::start(&config(state.path(), &egress));
    let s = pod_running(
        &cri,
        "sender",
        &format!(
            "sleep 1; while :; do busybox nc 127.0.0.1 {} < /dev/zero; sleep 0.2; done",
            receiver.port
        ),
    );
    agent.scrape_until(Duration::from_secs(60), "egress enforced", |t| {
        active(t, "egress")
    });
    // Let the burst drain, then measure.
    std::thread::sleep(Duration::from_secs(2));
    let rate = receiver.rate_over(8.0);
    eprintln!(
        "a pod's TCP stream under a 2 MB/s egress budget: {:.3} MB/s",
        rate / 1e6
    );
    assert!((rate / 2e6 - 1.0).abs() <= 0.10, "{rate}");

    agent.signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(20)).is_some());
    std::thread::sleep(Duration::from_millis(500));
    let free = receiver.rate_over(2.0);
    eprintln!("after the agent stopped: {:.1} MB/s", free / 1e6);
    assert!(free > 6e6, "{free}");
    drop(s.pod);
}
