//! GPU attribution end to end: the agent loads the fake libnvidia-ml through its normal path,
//! the scenario's processes are real processes in real cgroups, and `/metrics` must attribute
//! each device's busy time, memory and energy to the right workloads — and never more than the
//! device did (conservation, checked in every scenario).

use std::time::Duration;

use serde_json::json;
use tally_tests::agent::{sample, Agent};
use tally_tests::cgroup::{random_hex, TestCgroup};
use tally_tests::fake_nvml::{FakeNvml, FULL, WITHOUT_PROCESS_UTILIZATION};
use tally_tests::gpu::{assert_conserved, seconds, setup, total, unit, Unit, GPU, HOST_ROW};
use tally_tests::require;

fn start(fake: &FakeNvml) -> Agent {
    Agent::start(&format!(
        "[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = []\n[ebpf]\nenabled = false\n{}",
        fake.config()
    ))
}

fn device(processes: serde_json::Value) -> serde_json::Value {
    json!({
        "uuid": GPU,
        "name": "NVIDIA H100 80GB HBM3",
        "memory_total_bytes": 85899345920u64,
        "power_watts": 400,
        "energy_start_joules": 1000,
        "processes": processes
    })
}

#[test]
fn time_sliced_pods_each_get_their_own_share_never_the_device_total() {
    const TEST: &str = "time_sliced_pods_each_get_their_own_share_never_the_device_total";
    let Some(unified) = setup(TEST) else { return };
    let (a, b, c) = (
        unit(&unified, "a"),
        unit(&unified, "b"),
        unit(&unified, "c"),
    );
    let fake = FakeNvml::new(
        FULL,
        &json!({ "devices": [device(json!([
            { "pid": a.pid, "used_memory_bytes": 4_000_000_000u64, "sm_percent": 50 },
            { "pid": b.pid, "used_memory_bytes": 2_000_000_000u64, "sm_percent": 25 },
            { "pid": c.pid, "used_memory_bytes": 1_000_000_000u64, "sm_percent": 10 }
        ]))] }),
    );
    let agent = start(&fake);
    let text = agent.scrape_until(Duration::from_secs(15), "3 s of GPU time", |t| {
        total(t, "tally_gpu_busy_seconds_total", &[]) >= 0.85 * 3.0
    });
    let method = "method=\"process_utilization\"";
    let (sa, sb, sc) = (
        seconds(&text, &a, method),
        seconds(&text, &b, method),
        seconds(&text, &c, method),
    );
    let busy = total(&text, "tally_gpu_busy_seconds_total", &[]);
    assert!(sa > 0.0 && sb > 0.0 && sc > 0.0, "{text}");
    // Each pod gets its own share (50:25:10 of 85), not the device's.
    for (got, share) in [(sa, 50.0), (sb, 25.0), (sc, 10.0)] {
        let want = busy * share / 85.0;
        assert!(
            (got - want).abs() <= 0.1 * want + 0.05,
            "share {share}: {got} vs {want} of {busy}"
        );
    }
    assert!(
        sa < 0.7 * busy,
        "a pod got (nearly) the device total: {sa} of {busy}"
    );
    assert_conserved(&text, GPU, 0.1);
    for (u, bytes) in [(&a, 4e9), (&b, 2e9), (&c, 1e9)] {
        assert_eq!(
            sample(
                &text,
                "tally_workload_gpu_memory_bytes",
                &[&format!("unit=\"{}\"", u.name)]
            ),
            Some(bytes)
        );
    }
    // Energy: workloads hold all of it (someone always holds the device), never more than spent.
    let spent = total(&text, "tally_gpu_energy_joules_total", &[]) - 1000.0;
    let charged = total(&text, "tally_workload_gpu_energy_joules_total", &[]);
    assert!(
        charged > 0.0 && charged <= spent + 1e-6,
        "charged {charged} J of {spent} J"
    );
    assert_eq!(
        total(&text, "tally_gpu_unallocated_energy_joules_total", &[]),
        0.0
    );
}

#[test]
fn an_exclusive_gpu_goes_to_its_holder_and_an_exiting_process_stops_being_charged() {
    const TEST: &str =
        "an_exclusive_gpu_goes_to_its_holder_and_an_exiting_process_stops_being_charged";
    let Some(unified) = setup(TEST) else { return };
    let (a, b) = (unit(&unified, "excl"), unit(&unified, "exit"));
    let fake = FakeNvml::new(
        FULL,
        &json!({ "devices": [device(json!([
            { "pid": a.pid, "used_memory_bytes": 8_000_000_000u64, "sm_percent": 60 },
            { "pid": b.pid, "used_memory_bytes": 1_000_000_000u64, "sm_percent": 30, "end_ms": 1500 }
        ]))] }),
    );
    let agent = start(&fake);
    // b leaves the GPU 1.5 s into the scenario: its seconds stop growing, a's go on.
    let text = agent.scrape_until(Duration::from_secs(15), "4 s of samples", |t| {
        total(t, "tally_gpu_busy_seconds_total", &[]) >= 0.6 * 4.0
    });
    let frozen = seconds(&text, &b, "");
    assert!(
        frozen > 0.0 && frozen < 0.3 * 1.6,
        "b's share of 1.5 s at 30%: {frozen}"
    );
    let a_before = seconds(&text, &a, "");
    let later = agent.scrape_until(Duration::from_secs(10), "a keeps going", |t| {
        seconds(t, &a, "") >= a_before + 0.6
    });
    assert_eq!(
        seconds(&later, &b, ""),
        frozen,
        "an exited process is not charged again"
    );
    assert_eq!(
        sample(
            &later,
            "tally_workload_gpu_memory_bytes",
            &[&format!("unit=\"{}\"", b.name)]
        ),
        None,
        "its memory is released"
    );
    assert_conserved(&later, GPU, 0.1);
}

#[test]
fn mig_instances_are_charged_to_their_holders_by_instance() {
    const TEST: &str = "mig_instances_are_charged_to_their_holders_by_instance";
    let Some(unified) = setup(TEST) else { return };
    let (a, b) = (unit(&unified, "mig1"), unit(&unified, "mig2"));
    let mig = |n: &str| format!("MIG-{n}{n}{n}{n}{n}{n}{n}{n}-0000-0000-0000-000000000000");
    let mut d = device(json!([
        { "pid": a.pid, "used_memory_bytes": 5_000_000_000u64, "sm_percent": 70, "gpu_instance_id": 1, "compute_instance_id": 0 },
        { "pid": b.pid, "used_memory_bytes": 3_000_000_000u64, "sm_percent": 20, "gpu_instance_id": 2, "compute_instance_id": 0 }
    ]));
    d["mig"] = json!({ "instances": [
        { "uuid": mig("a"), "gpu_instance_id": 1, "compute_instance_id": 0, "memory_total_bytes": 40_000_000_000u64 },
        { "uuid": mig("b"), "gpu_instance_id": 2, "compute_instance_id": 0, "memory_total_bytes": 20_000_000_000u64 }
    ]});
    let fake = FakeNvml::new(FULL, &json!({ "devices": [d] }));
    let agent = start(&fake);
    let text = agent.scrape_until(Duration::from_secs(15), "MIG time", |t| {
        seconds(t, &a, "method=\"mig_allocation\"") >= 1.0 && seconds(t, &b, "") >= 1.0
    });
    assert!(
        text.contains(&format!("gpu=\"{}\",method=\"mig_allocation\"", mig("a"))),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "tally_workload_gpu_memory_bytes",
            &[
                &format!("unit=\"{}\"", b.name),
                &format!("gpu=\"{}\"", mig("b"))
            ]
        ),
        Some(3e9)
    );
    // Neither holder gets the other's instance.
    assert_eq!(
        total(
            &text,
            "tally_workload_gpu_seconds_total",
            &[&format!("unit=\"{}\"", a.name), &mig("b")]
        ),
        0.0
    );
    assert!(text.contains("mig_mode=\"enabled\""));
    // Conservation per instance: an instance is charged at most its wall time.
    let busy = total(&text, "tally_gpu_busy_seconds_total", &[]);
    let a_s = seconds(&text, &a, "");
    let ticks_s = sample(&text, "tally_ticks_total", &[]).unwrap() * 0.2 + 1.0;
    assert!(
        a_s <= ticks_s,
        "instance time {a_s} beyond wall {ticks_s} (device busy {busy})"
    );
}

#[test]
fn xids_are_counted_per_device_and_code() {
    const TEST: &str = "xids_are_counted_per_device_and_code";
    let Some(unified) = setup(TEST) else { return };
    let a = unit(&unified, "xid");
    let fake = FakeNvml::new(
        FULL,
        &json!({
            "devices": [device(json!([{ "pid": a.pid, "used_memory_bytes": 1, "sm_percent": 5 }]))],
            "xids": [{ "at_ms": 300, "device": 0, "xid": 79 }, { "at_ms": 600, "device": 0, "xid": 79 }, { "at_ms": 700, "device": 0, "xid": 48 }]
        }),
    );
    let agent = start(&fake);
    let text = agent.scrape_until(Duration::from_secs(10), "xids", |t| {
        sample(t, "tally_gpu_xid_errors_total", &["xid=\"79\""]) == Some(2.0)
            && sample(t, "tally_gpu_xid_errors_total", &["xid=\"48\""]) == Some(1.0)
    });
    assert!(text.contains(&format!(
        "tally_gpu_xid_errors_total{{gpu=\"{GPU}\",xid=\"79\"}} 2"
    )));
    assert_conserved(&text, GPU, 0.1);
}

#[test]
fn without_process_utilization_the_gpu_is_shared_by_memory_and_the_failure_counted() {
    const TEST: &str =
        "without_process_utilization_the_gpu_is_shared_by_memory_and_the_failure_counted";
    let Some(unified) = setup(TEST) else { return };
    let (a, b) = (unit(&unified, "mema"), unit(&unified, "memb"));
    let fake = FakeNvml::new(
        WITHOUT_PROCESS_UTILIZATION,
        &json!({ "devices": [device(json!([
            { "pid": a.pid, "used_memory_bytes": 3_000_000_000u64, "sm_percent": 40 },
            { "pid": b.pid, "used_memory_bytes": 1_000_000_000u64, "sm_percent": 40 }
        ]))] }),
    );
    let agent = start(&fake);
    let text = agent.scrape_until(Duration::from_secs(15), "memory-share time", |t| {
        seconds(t, &a, "method=\"memory_share\"") >= 1.0
    });
    let (sa, sb) = (
        seconds(&text, &a, "method=\"memory_share\""),
        seconds(&text, &b, "method=\"memory_share\""),
    );
    assert!((sa / sb - 3.0).abs() < 0.01, "3:1 by memory: {sa} vs {sb}");
    assert!(
        sample(
            &text,
            "tally_gpu_nvml_errors_total",
            &["call=\"nvmlDeviceGetProcessUtilization\""]
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "tally_gpu_up", &[]), Some(1.0));
    assert_conserved(&text, GPU, 0.1);
}

/// MPS: the clients are listed by NVML's MPS query, the compute list and the utilization
/// samples are the MPS server's. The device's busy time goes to the clients by GPU memory,
/// none to the server.
#[test]
fn mps_clients_share_the_gpu_by_memory_and_the_server_is_not_charged() {
    const TEST: &str = "mps_clients_share_the_gpu_by_memory_and_the_server_is_not_charged";
    let Some(unified) = setup(TEST) else { return };
    let (server, a, b) = (
        unit(&unified, "mps-server"),
        unit(&unified, "mps-a"),
        unit(&unified, "mps-b"),
    );
    let fake = FakeNvml::new(
        FULL,
        &json!({ "devices": [device(json!([
            { "pid": server.pid, "mps": "server", "used_memory_bytes": 32_000_000u64 },
            { "pid": a.pid, "mps": "client", "used_memory_bytes": 3_000_000_000u64, "sm_percent": 20 },
            { "pid": b.pid, "mps": "client", "used_memory_bytes": 1_000_000_000u64, "sm_percent": 40 }
        ]))] }),
    );
    let agent = start(&fake);
    let method = "method=\"mps_memory\"";
    let text = agent.scrape_until(Duration::from_secs(15), "MPS time", |t| {
        seconds(t, &a, method) >= 1.0 && seconds(t, &b, method) > 0.0
    });
    let (sa, sb) = (seconds(&text, &a, method), seconds(&text, &b, method));
    // 3:1 by memory, though b's kernels were the busier: memory is all NVML tells per client.
    assert!((sa / sb - 3.0).abs() < 0.01, "3:1 by memory: {sa} vs {sb}");
    assert_eq!(
        seconds(&text, &server, ""),
        0.0,
        "the server runs the clients' work and is not charged for it: {text}"
    );
    let busy = total(&text, "tally_gpu_busy_seconds_total", &[]);
    assert!(
        (sa + sb - busy).abs() <= 1e-6 * busy.max(1.0),
        "all busy time to the clients: {sa} + {sb} vs {busy}"
    );
    assert_conserved(&text, GPU, 0.1);
    for (u, bytes) in [(&server, 32e6), (&a, 3e9), (&b, 1e9)] {
        assert_eq!(
            sample(
                &text,
                "tally_workload_gpu_memory_bytes",
                &[&format!("unit=\"{}\"", u.name)]
            ),
            Some(bytes),
            "{}",
            u.name
        );
    }
    // Energy the same way: the clients 3:1, nothing to the server.
    let joules = |u: &Unit| {
        total(
            &text,
            "tally_workload_gpu_energy_joules_total",
            &[&format!("unit=\"{}\"", u.name)],
        )
    };
    let (ja, jb) = (joules(&a), joules(&b));
    assert!(ja > 0.0 && (ja / jb - 3.0).abs() < 0.01, "{ja} J vs {jb} J");
    assert_eq!(joules(&server), 0.0);
    let spent = total(&text, "tally_gpu_energy_joules_total", &[]) - 1000.0;
    assert!(
        ja + jb <= spent + 1e-6,
        "charged {} J of {spent} J",
        ja + jb
    );
}

#[test]
fn a_missing_library_leaves_gpu_down_and_the_agent_running() {
    let agent = Agent::start(
        "[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = []\n[gpu]\nnvml_library = \"/nonexistent/libnvidia-ml.so.1\"\n",
    );
    let text = agent.scrape();
    assert_eq!(sample(&text, "tally_gpu_up", &[]), Some(0.0));
    assert!(
        text.contains("tally_workload_cpu_seconds_total") || text.contains("tally_ticks_total")
    );
    agent.scrape_until(Duration::from_secs(5), "ticks go on", |t| {
        sample(t, "tally_ticks_total", &[]).is_some_and(|n| n >= 3.0)
    });
    let log = agent.log();
    assert_eq!(log.matches("no NVML library").count(), 1, "{log}");
}

/// Processes the agent cannot see (another pid namespace: here, pids that do not exist) are
/// charged to the pod the kubelet assigned the GPU to, through the pod-resources API (fake, on a
/// real socket); when the pod goes, charging stops at once.
#[test]
fn invisible_processes_are_charged_to_the_pod_holding_the_device() {
    const TEST: &str = "invisible_processes_are_charged_to_the_pod_holding_the_device";
    if !require::root(TEST) {
        return;
    }
    // No pid namespace of its own needed: pids beyond pid_max are invisible everywhere.
    let ghost = 4_194_000;
    let fake = FakeNvml::new(
        FULL,
        &json!({ "devices": [device(json!([
            { "pid": ghost, "used_memory_bytes": 6_000_000_000u64, "sm_percent": 60 }
        ]))] }),
    );
    let sockets = tempfile::tempdir().unwrap();
    let socket = sockets.path().join("kubelet.sock");
    let mut pod = tally_tests::fake_cri::FakePod::new("ml", "trainer-0", &[]);
    pod.devices = vec![("cuda".into(), vec![format!("{GPU}::0")])];
    let kubelet = tally_tests::fake_cri::FakeCri::start(&socket, vec![pod]).unwrap();
    let agent = Agent::start(&format!(
        "[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = []\n[ebpf]\nenabled = false\n{}pod_resources_socket = \"{}\"\n",
        fake.config(),
        socket.display()
    ));
    let pod_labels = [
        "namespace=\"ml\"",
        "pod=\"trainer-0\"",
        "container=\"cuda\"",
    ];
    // Until the kubelet first answers, the device's time has no known holder and is left
    // unattributed (how long that takes depends on the machine's load); from then on, all of it
    // is the pod's.
    let gpu_label = format!("gpu=\"{GPU}\"");
    let first = agent.scrape_until(Duration::from_secs(15), "the pod's first GPU time", |t| {
        total(t, "tally_workload_gpu_seconds_total", &pod_labels) > 0.0
    });
    let unattributed = |t: &str| total(t, "tally_gpu_unattributed_seconds_total", &[&gpu_label]);
    let busy = |t: &str| total(t, "tally_gpu_busy_seconds_total", &[&gpu_label]);
    let charged = |t: &str| total(t, "tally_workload_gpu_seconds_total", &pod_labels);
    let text = agent.scrape_until(Duration::from_secs(15), "the pod's GPU time", |t| {
        charged(t) >= charged(&first) + 0.6
    });
    assert_eq!(unattributed(&text), unattributed(&first), "{text}");
    let (charged_since, busy_since) =
        (charged(&text) - charged(&first), busy(&text) - busy(&first));
    assert!(
        (charged_since - busy_since).abs() <= 1e-6,
        "the pod was charged {charged_since} s of the {busy_since} s the device was busy"
    );
    assert_eq!(
        total(&text, "tally_workload_gpu_memory_bytes", &pod_labels),
        6e9,
        "{text}"
    );
    // Known only from the kubelet, yet running while its device is busy.
    let mut running = pod_labels.to_vec();
    running.push("state=\"running\"");
    assert_eq!(
        sample(&text, "tally_workload_info", &running),
        Some(1.0),
        "{text}"
    );
    // Nothing for the host row: all of it was the pod's.
    assert_eq!(
        total(
            &text,
            "tally_workload_gpu_seconds_total",
            &["namespace=\"\",pod=\"\",pod_uid=\"\",container=\"\""]
        ),
        0.0
    );
    assert_conserved(&text, GPU, 1.0);

    // The pod is gone: it is not charged any more.
    kubelet.set_pods(Vec::new());
    std::thread::sleep(Duration::from_millis(800));
    let stopped = total(
        &agent.scrape(),
        "tally_workload_gpu_seconds_total",
        &pod_labels,
    );
    std::thread::sleep(Duration::from_millis(1000));
    let later = agent.scrape();
    assert_eq!(
        total(&later, "tally_workload_gpu_seconds_total", &pod_labels),
        stopped
    );
    assert_conserved(&later, GPU, 0.1);
}

#[test]
fn an_agent_in_its_own_cgroup_namespace_charges_processes_to_their_units() {
    const TEST: &str = "an_agent_in_its_own_cgroup_namespace_charges_processes_to_their_units";
    let Some(unified) = setup(TEST) else { return };
    let a = unit(&unified, "ns");
    let fake = FakeNvml::new(
        FULL,
        &json!({ "devices": [device(json!([
            { "pid": a.pid, "used_memory_bytes": 2_000_000_000u64, "sm_percent": 50 }
        ]))] }),
    );
    // The agent in a sibling cgroup, in a namespace rooted there: it reads a's cgroup as
    // `0::/../system.slice/<unit>`, as a DaemonSet pod reads other pods'.
    let home = TestCgroup::create(
        std::slice::from_ref(&unified),
        &format!("/tally-agent-ns-{}", random_hex(6)),
    );
    let agent = Agent::start_in_cgroup_namespace(
        &format!(
            "[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = []\n[ebpf]\nenabled = false\n{}",
            fake.config()
        ),
        vec![home.dirs[0].join("cgroup.procs")],
    );
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", agent.child.id())).unwrap();
    assert!(
        own.contains(&format!(
            "0::{}\n",
            home.dirs[0]
                .strip_prefix(&unified)
                .map(|p| format!("/{}", p.display()))
                .unwrap()
        )),
        "{own}"
    );
    let text = agent.scrape_until(Duration::from_secs(15), "a's GPU time", |t| {
        seconds(t, &a, "") >= 1.0
    });
    assert_eq!(
        total(
            &text,
            "tally_workload_gpu_memory_bytes",
            &[&format!("unit=\"{}\"", a.name)]
        ),
        2e9
    );
    assert_eq!(
        total(
            &text,
            "tally_workload_gpu_seconds_total",
            &["namespace=\"\",pod=\"\",pod_uid=\"\",container=\"\",container_id=\"\",unit=\"\""]
        ),
        0.0,
        "nothing for the host row"
    );
    assert_conserved(&text, GPU, 0.1);
}

/// The host row without eBPF: only the GPU source feeds it (a process no workload holds: here a
/// pid that does not exist). It is live while it is charged — `state="running"` past the grace
/// period — and its counter keeps counting up from where it was, never restarting from zero.
#[test]
fn the_host_row_fed_only_by_the_gpu_stays_running_and_keeps_counting() {
    const TEST: &str = "the_host_row_fed_only_by_the_gpu_stays_running_and_keeps_counting";
    if !require::root(TEST) {
        return;
    }
    let ghost = 4_194_100;
    let fake = FakeNvml::new(
        FULL,
        &json!({ "devices": [device(json!([
            { "pid": ghost, "used_memory_bytes": 1_000_000_000u64, "sm_percent": 50 }
        ]))] }),
    );
    let agent = Agent::start(&format!(
        "[agent]\ntick_interval_ms = 200\n[ledger]\ngrace_period_secs = 1\n[cri]\nendpoints = []\n[ebpf]\nenabled = false\n{}pod_resources_socket = \"\"\n",
        fake.config()
    ));
    let host_gpu = |t: &str| {
        total(
            t,
            "tally_workload_gpu_seconds_total",
            &[&format!("{HOST_ROW},gpu=")],
        )
    };
    let first = agent.scrape_until(Duration::from_secs(15), "the host row's GPU time", |t| {
        host_gpu(t) > 0.0
    });
    let running = format!(
        "tally_workload_info{{{HOST_ROW},runtime=\"\",qos_class=\"\",state=\"running\"}} 1"
    );
    // Three grace periods later, still running, and still counting up.
    std::thread::sleep(Duration::from_secs(3));
    let later = agent.scrape();
    for t in [&first, &later] {
        assert!(t.contains(&running), "{running} in\n{t}");
    }
    let (before, after) = (host_gpu(&first), host_gpu(&later));
    assert!(
        after >= before + 1.0,
        "the host row went from {before} s to {after} s in 3 s at 50 %"
    );
}
