//! RDMA end to end: the agent reads a fixture sysfs tree (`[paths] sys_root`) and talks nldev to
//! a responder playing the kernel (`[rdma] netlink_socket`), whose counter dumps name real
//! processes in real cgroups; `/metrics` must charge each its own RDMA bytes and packets, exactly
//! what the dumps said, turn QP counter auto mode on only when allowed and off again at exit,
//! charge a device the kubelet assigned to a pod its port counters, and degrade to port counters
//! or to nothing at all.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tally_rdma::netlink::consts::{mask, mode};
use tally_rdma::netlink::nldev::{CounterMode, DeviceInfo, Qp};
use tally_tests::agent::{sample, tally_bin, Agent};
use tally_tests::cgroup::Unit;
use tally_tests::fake_rdma::{FakeSysfs, Responder, Script, ScriptCounter};
use tally_tests::require;

/// A systemd-unit workload with one long-sleeping process.
fn unit(unified: &Path, tag: &str) -> Unit {
    Unit::sleeping(unified, "tally-rdma", tag)
}

fn setup(test: &str) -> Option<PathBuf> {
    if !require::root(test) {
        return None;
    }
    require::unified(test)
}

/// mlx5_0 (index 1) and mlx5_1 (index 2), one port each, as in the `mlx5` fixture.
fn devices() -> Vec<DeviceInfo> {
    vec![
        DeviceInfo {
            index: 1,
            name: "mlx5_0".into(),
            ports: 1,
        },
        DeviceInfo {
            index: 2,
            name: "mlx5_1".into(),
            ports: 1,
        },
    ]
}

fn agent_config(sysfs: &FakeSysfs, rdma: &str) -> String {
    format!(
        "[agent]\ntick_interval_ms = 200\n[paths]\nsys_root = \"{}\"\n[cri]\nendpoints = []\n[ebpf]\nenabled = false\n[gpu]\npod_resources_socket = \"\"\n{rdma}",
        sysfs.root().display()
    )
}

/// Sum of every series of `family` whose line contains all `needles`.
fn total(text: &str, family: &str, needles: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) || l.starts_with(&format!("{family} ")))
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn unit_label(u: &Unit) -> String {
    format!("unit=\"{}\"", u.name)
}

const TX: &str = "tally_workload_rdma_transmit_bytes_total";
const RX: &str = "tally_workload_rdma_receive_bytes_total";
const TX_PACKETS: &str = "tally_workload_rdma_transmit_packets_total";

#[test]
fn per_process_rdma_traffic_reaches_metrics_through_identity_and_auto_mode_is_restored() {
    const TEST: &str =
        "per_process_rdma_traffic_reaches_metrics_through_identity_and_auto_mode_is_restored";
    let Some(unified) = setup(TEST) else { return };
    let (a, b) = (unit(&unified, "a"), unit(&unified, "b"));
    let sysfs = FakeSysfs::new("mlx5");
    let per_dump_a = [1_000_000, 2_000_000, 100, 200];
    let per_dump_b = [50_000, 0, 5, 0];
    let responder = Responder::start(Script {
        devices: devices(),
        modes: Vec::new(),
        counters: vec![
            // a's own counter (auto mode by pid).
            ScriptCounter {
                device_index: 1,
                port: 1,
                id: 1,
                pid: Some(a.pid),
                qps: vec![0x40],
                per_dump: per_dump_a,
            },
            // A manually bound counter whose QPs are all b's: attributed through RES_QP_GET.
            ScriptCounter {
                device_index: 2,
                port: 1,
                id: 4,
                pid: None,
                qps: vec![0x50, 0x51],
                per_dump: per_dump_b,
            },
        ],
        // b's two QPs on mlx5_1, both in its counter; a's QP 0x40 is in its counter, 0x41 in
        // none (as on a driver that binds no QP): one uncounted QP on mlx5_0.
        qps: [
            (2, 0x50, b.pid),
            (2, 0x51, b.pid),
            (1, 0x40, a.pid),
            (1, 0x41, a.pid),
        ]
        .into_iter()
        .map(|(device_index, lqpn, pid)| Qp {
            device_index,
            port: Some(1),
            lqpn,
            pid: Some(pid),
            kernel_name: None,
            qp_type: Some(2),
            state: Some(3),
        })
        .collect(),
    });
    let mut agent = Agent::start(&agent_config(&sysfs, &responder.config(true)));

    // Auto mode was off on both ports and the config allows it: turned on, mask PID.
    assert_eq!(responder.sets(), [(1, 1, mask::PID), (2, 1, mask::PID)]);
    assert!(responder.mode(1, 1).is_auto_pid());

    let a_label = unit_label(&a);
    let b_label = unit_label(&b);
    let a_mlx5_0 = [
        a_label.as_str(),
        "device=\"mlx5_0\",port=\"1\",method=\"qp_counter\"",
    ];
    agent.scrape_until(Duration::from_secs(15), "a's RDMA bytes", |t| {
        total(t, TX, &a_mlx5_0) >= 3.0 * per_dump_a[0] as f64
    });

    // The port counters advance between ticks too.
    sysfs.add("mlx5_0", 1, "counters", "port_xmit_data", 250);
    sysfs.add("mlx5_0", 1, "hw_counters", "out_of_sequence", 7);
    let xmit_bytes = sysfs.get("mlx5_0", 1, "counters", "port_xmit_data") as f64 * 4.0;
    let port = ["device=\"mlx5_0\",port=\"1\""];
    agent.scrape_until(Duration::from_secs(10), "the port counters", |t| {
        total(t, "tally_rdma_port_transmit_bytes_total", &port) == xmit_bytes
    });

    // Freeze the dumps; once the agent has read the last one, the ledger holds exactly what the
    // dumps said: n × per-dump values for each process.
    let frozen = responder.freeze();
    let (n1, n2) = (frozen[&1] as f64, frozen[&2] as f64);
    let text = agent.scrape_until(Duration::from_secs(10), "every frozen dump read", |t| {
        total(t, TX, &[&a_label]) == n1 * per_dump_a[0] as f64
            && total(t, TX, &[&b_label]) == n2 * per_dump_b[0] as f64
    });
    assert_eq!(total(&text, RX, &a_mlx5_0), n1 * per_dump_a[1] as f64);
    assert_eq!(
        total(&text, TX_PACKETS, &a_mlx5_0),
        n1 * per_dump_a[2] as f64
    );
    assert_eq!(
        total(
            &text,
            "tally_workload_rdma_receive_packets_total",
            &a_mlx5_0
        ),
        n1 * per_dump_a[3] as f64
    );
    assert_eq!(
        total(
            &text,
            TX,
            &[
                &b_label,
                "device=\"mlx5_1\",port=\"1\",method=\"qp_counter\""
            ]
        ),
        n2 * per_dump_b[0] as f64,
        "b's QPs make the manual counter b's"
    );
    // Nobody else was charged: not the host row, not a for b's device.
    assert_eq!(total(&text, TX, &["unit=\"\""]), 0.0, "{text}");
    assert_eq!(total(&text, TX, &[&a_label, "mlx5_1"]), 0.0);

    // Node-level state.
    for needle in [
        "tally_rdma_port_info{device=\"mlx5_0\",port=\"1\",link_layer=\"InfiniBand\",state=\"ACTIVE\",rate=\"400 Gb/sec (4X NDR)\"} 1",
        "tally_rdma_port_hw_counters_total{device=\"mlx5_0\",port=\"1\",counter=\"out_of_sequence\"} 7",
        "tally_rdma_port_per_process{device=\"mlx5_1\",port=\"1\"} 1",
        "tally_rdma_qp_counters{device=\"mlx5_0\",port=\"1\"} 1",
        "tally_rdma_qps_uncounted{device=\"mlx5_0\",port=\"1\"} 1",
        "tally_rdma_qps_uncounted{device=\"mlx5_1\",port=\"1\"} 0",
        "tally_probe_up{probe=\"rdma\",method=\"sysfs\"} 1",
        "tally_probe_up{probe=\"rdma_netlink\",method=\"nldev_relay\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle}\n{text}");
    }
    assert!(
        !text.contains("counter=\"lifespan\""),
        "lifespan is not a counter"
    );
    assert!(
        !text.contains("counter=\"port_xmit_data\""),
        "data counters have families of their own, in bytes"
    );
    // Said once, for the one port with an uncounted QP.
    agent.assert_logged_once("have no QP counter although auto mode is on");
    if let Some(promtool) = require::binary(TEST, "promtool") {
        promtool_accepts(&promtool, &text);
    }

    // Stopping restores what the agent changed: auto mode off on both ports.
    agent.signal(libc::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(5));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", agent.log());
    assert_eq!(
        responder.sets()[2..],
        [(1, 1, 0), (2, 1, 0)],
        "{}",
        agent.log()
    );
    assert_eq!(responder.mode(1, 1), CounterMode::NONE);
    assert!(agent.log().contains("QP counter auto mode restored"));
}

#[test]
fn auto_mode_is_left_alone_unless_allowed_and_check_says_so() {
    let sysfs = FakeSysfs::new("mlx5");
    let responder = Responder::start(Script {
        devices: devices(),
        // An operator turned mlx5_1 on already; mlx5_0 is off.
        modes: vec![(
            (2, 1),
            CounterMode {
                mode: mode::AUTO,
                mask: mask::PID,
            },
        )],
        ..Script::default()
    });
    let config = agent_config(&sysfs, &responder.config(false));
    let agent = Agent::start(&config);
    let text = agent.scrape_until(Duration::from_secs(10), "three ticks", |t| {
        sample(t, "tally_ticks_total", &[]).is_some_and(|n| n >= 3.0)
    });
    assert!(
        responder.sets().is_empty(),
        "no STAT_SET without permission"
    );
    assert!(
        responder.dumps(1) >= 2,
        "counters are still read every tick"
    );
    assert!(text.contains("tally_rdma_port_per_process{device=\"mlx5_0\",port=\"1\"} 0"));
    assert!(text.contains("tally_rdma_port_per_process{device=\"mlx5_1\",port=\"1\"} 1"));
    drop(agent);
    assert!(responder.sets().is_empty(), "nothing to restore");

    // `tally check` reads the modes, never changes them.
    let out = Command::new(tally_bin())
        .args(["check", "--json", "--config"])
        .arg(write_config(&responder, &config))
        .output()
        .unwrap_or_else(|e| panic!("tally check: {e}"));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let items = json["items"].as_array().cloned().unwrap_or_default();
    let rdma = items
        .iter()
        .find(|i| i["name"] == "rdma")
        .unwrap_or_else(|| panic!("no rdma item: {json}"));
    assert_eq!(rdma["status"], "ok", "{rdma}");
    let detail = rdma["detail"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with("mlx5_0 (1 port), mlx5_1 (1 port); "),
        "{detail}"
    );
    assert!(
        detail.contains(
            "mlx5_0/1: qp auto off (per port only: `rdma.allow_qp_counter_auto_mode` is false)"
        ),
        "{detail}"
    );
    assert!(
        detail.contains("mlx5_1/1: qp auto pid on (per process)"),
        "{detail}"
    );
    assert!(responder.sets().is_empty());
}

#[expect(clippy::unwrap_used, reason = "test helper")]
fn write_config(responder: &Responder, config: &str) -> PathBuf {
    let path = responder.dir.path().join("tally.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// A pod holding an SR-IOV VF (pod-resources device id = the VF's PCI address) is charged the
/// VF's port counters, method `device`; per-process counters on that device are not counted
/// again.
#[test]
fn a_pod_holding_a_vf_is_charged_its_port_counters() {
    const TEST: &str = "a_pod_holding_a_vf_is_charged_its_port_counters";
    let Some(unified) = setup(TEST) else { return };
    let a = unit(&unified, "vf");
    let sysfs = FakeSysfs::new("mlx5");
    let responder = Responder::start(Script {
        devices: devices(),
        counters: vec![ScriptCounter {
            device_index: 2,
            port: 1,
            id: 1,
            pid: Some(a.pid),
            qps: vec![0x60],
            per_dump: [1000, 1000, 1, 1],
        }],
        ..Script::default()
    });
    let sockets = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let kubelet_socket = sockets.path().join("kubelet.sock");
    let mut pod = tally_tests::fake_cri::FakePod::new("ml", "trainer-0", &[]);
    pod.devices = vec![("nccl".into(), vec!["0000:3b:00.2".into()])];
    let _kubelet = tally_tests::fake_cri::FakeCri::start(&kubelet_socket, vec![pod])
        .unwrap_or_else(|e| panic!("fake kubelet: {e}"));
    let config = agent_config(&sysfs, &responder.config(true)).replace(
        "pod_resources_socket = \"\"",
        &format!("pod_resources_socket = \"{}\"", kubelet_socket.display()),
    );
    let agent = Agent::start(&config);
    // Let the agent take its baseline of the VF's port and learn the assignment.
    agent.scrape_until(Duration::from_secs(10), "three ticks", |t| {
        sample(t, "tally_ticks_total", &[]).is_some_and(|n| n >= 3.0)
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agent.log().contains("kubelet pod-resources answering") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    // Ticks before the kubelet's first answer charged the process's own counter; from now on the
    // device is the pod's, and the process's counter on it is not counted again.
    let a_label = unit_label(&a);
    let a_before = total(&agent.scrape(), TX, &[&a_label]);
    let dumps_before = responder.dumps(2);
    sysfs.add("mlx5_1", 1, "counters", "port_xmit_data", 2500);
    sysfs.add("mlx5_1", 1, "counters", "port_rcv_packets", 30);
    let pod_labels = [
        "namespace=\"ml\"",
        "pod=\"trainer-0\"",
        "container=\"nccl\"",
        "device=\"mlx5_1\",port=\"1\",method=\"device\"",
    ];
    agent.scrape_until(Duration::from_secs(10), "the VF's bytes", |t| {
        total(t, TX, &pod_labels) >= 10_000.0
    });
    // A few more dumps of the process's (advancing) counter, all of them skipped.
    let deadline = Instant::now() + Duration::from_secs(5);
    while responder.dumps(2) < dumps_before + 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let text = agent.scrape();
    assert_eq!(total(&text, TX, &pod_labels), 10_000.0, "2500 × 4 bytes");
    assert_eq!(
        total(
            &text,
            "tally_workload_rdma_receive_packets_total",
            &pod_labels
        ),
        30.0
    );
    assert!(
        responder.dumps(2) >= dumps_before + 2,
        "the counter kept advancing"
    );
    assert_eq!(
        total(&text, TX, &[&a_label]),
        a_before,
        "the process's counter on the assigned VF is not counted again: {text}"
    );
}

#[test]
fn no_rdma_devices_means_nothing_exported_and_one_info_line() {
    let empty = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let agent = Agent::start(&format!(
        "[agent]\ntick_interval_ms = 200\n[paths]\nsys_root = \"{}\"\n[cri]\nendpoints = []\n[ebpf]\nenabled = false\n",
        empty.path().display()
    ));
    let text = agent.scrape_until(Duration::from_secs(10), "three ticks", |t| {
        sample(t, "tally_ticks_total", &[]).is_some_and(|n| n >= 3.0)
    });
    for absent in ["tally_rdma_", "tally_workload_rdma_", "probe=\"rdma"] {
        assert!(!text.contains(absent), "{absent}: {text}");
    }
    let log = agent.log();
    assert_eq!(log.matches("no RDMA devices").count(), 1, "{log}");
    assert!(!log.contains("RDMA netlink"), "{log}");
}

#[test]
fn without_rdma_netlink_the_ports_are_still_counted() {
    let sysfs = FakeSysfs::new("plain");
    let missing = sysfs.root().join("no-nldev.sock");
    let agent = Agent::start(&agent_config(
        &sysfs,
        &format!("[rdma]\nnetlink_socket = \"{}\"\n", missing.display()),
    ));
    sysfs.add("qib0", 1, "counters", "port_rcv_data", 100);
    let want = sysfs.get("qib0", 1, "counters", "port_rcv_data") as f64 * 4.0;
    let text = agent.scrape_until(Duration::from_secs(10), "qib0's bytes", |t| {
        total(
            t,
            "tally_rdma_port_receive_bytes_total",
            &["device=\"qib0\",port=\"1\""],
        ) == want
    });
    assert!(text.contains("tally_probe_up{probe=\"rdma_netlink\",method=\"nldev\"} 0"));
    assert!(text.contains(
        "tally_rdma_port_info{device=\"qib0\",port=\"2\",link_layer=\"InfiniBand\",state=\"DOWN\""
    ));
    assert!(text.contains("tally_rdma_port_per_process{device=\"qib0\",port=\"1\"} 0"));
    assert!(
        !text.contains("tally_rdma_port_hw_counters_total"),
        "plain has none"
    );
    assert!(
        !text.contains("tally_rdma_qp_counters"),
        "no per-process reader"
    );
    let log = agent.log();
    assert_eq!(log.matches("RDMA netlink unsupported").count(), 1, "{log}");
}

/// `promtool check metrics` passes on `text` with nothing to say.
#[expect(clippy::unwrap_used, reason = "test helper")]
fn promtool_accepts(promtool: &Path, text: &str) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
