//! Real Prometheus (Debian package) on loopback scrapes the agent; `promtool check metrics` lints
//! what it serves; the container runtime's names (fake CRI over a real socket) reach the labels.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use tally_tests::agent::{sample, Agent};
use tally_tests::cgroup::{random_hex, random_uid, remove_parents, TestCgroup};
use tally_tests::fake_cri::{FakeCri, FakePod};
use tally_tests::prometheus::Prometheus;
use tally_tests::require;

#[test]
fn prometheus_scrapes_named_per_workload_series() {
    const TEST: &str = "prometheus_scrapes_named_per_workload_series";
    if !require::root(TEST) {
        return;
    }
    let Some(unified) = require::unified(TEST) else {
        return;
    };
    let Some(prometheus) = require::binary(TEST, "prometheus") else {
        return;
    };

    let (uid, id, sandbox) = (random_uid(), random_hex(64), random_hex(64));
    let rel = format!(
        "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{id}.scope",
        uid.replace('-', "_")
    );
    let roots = vec![unified];
    let mut cg = TestCgroup::create(&roots, &rel);
    cg.burn();

    let sockets = tempfile::tempdir().unwrap();
    let socket = sockets.path().join("containerd.sock");
    let pod = FakePod {
        uid: uid.clone(),
        namespace: "ml-team".into(),
        name: "trainer-0".into(),
        sandbox_id: sandbox,
        containers: vec![(id.clone(), "pytorch".into())],
        devices: Vec::new(),
        labels: Vec::new(),
        annotations: Vec::new(),
    };
    let _cri = FakeCri::start(&socket, vec![pod]).unwrap();
    let agent = Agent::start(&format!(
        "[agent]\ntick_interval_ms = 250\n[cri]\nendpoints = [\"/nonexistent/crio.sock\", \"{}\"]\n",
        socket.display()
    ));
    let labels = format!(
        "namespace=\"ml-team\",pod=\"trainer-0\",pod_uid=\"{uid}\",container=\"pytorch\",container_id=\"{id}\",unit=\"\""
    );
    let text = agent.scrape_until(Duration::from_secs(10), "CRI names in labels", |t| {
        t.contains(&format!("tally_workload_cpu_seconds_total{{{labels}}}"))
    });
    assert_eq!(
        sample(&text, "tally_probe_up", &["probe=\"cri\""]),
        Some(1.0)
    );

    let server = Prometheus::start(&prometheus, agent.port);
    let result = server.query_until_found(
        &format!("tally_workload_cpu_seconds_total{{container_id=\"{id}\"}}"),
        Duration::from_secs(30),
    );
    assert_eq!(result.len(), 1, "{result:?}");
    let metric = &result[0]["metric"];
    assert_eq!(metric["namespace"], "ml-team");
    assert_eq!(metric["pod"], "trainer-0");
    assert_eq!(metric["pod_uid"], uid.as_str());
    assert_eq!(metric["container"], "pytorch");
    assert_eq!(metric["job"], "tally");
    let value: f64 = result[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(value > 0.0);
    // Prometheus saw the target healthy, not just one lucky scrape.
    let up = server.query_until_found("up{job=\"tally\"} == 1", Duration::from_secs(10));
    assert_eq!(up.len(), 1);

    drop(cg);
    remove_parents(&roots, &rel, 2);
}

#[test]
fn promtool_accepts_the_exposition() {
    const TEST: &str = "promtool_accepts_the_exposition";
    let Some(promtool) = require::binary(TEST, "promtool") else {
        return;
    };
    // A fixture tree with every per-workload family and an error counter present.
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::write(r.join("cgroup.controllers"), "cpu memory io\n").unwrap();
    let unit = r.join("system.slice/web.service");
    std::fs::create_dir_all(&unit).unwrap();
    std::fs::write(unit.join("cpu.stat"), "usage_usec 1000\n").unwrap();
    std::fs::write(unit.join("memory.current"), "4096\n").unwrap();
    std::fs::write(unit.join("io.stat"), "8:0 rbytes=1 wbytes=2\n").unwrap();
    let pod = r.join(format!(
        "kubepods/burstable/pod{}/{}",
        random_uid(),
        random_hex(64)
    ));
    std::fs::create_dir_all(&pod).unwrap();
    std::fs::write(pod.join("cpu.stat"), "usage_usec broken\n").unwrap();

    let agent = Agent::start(&format!(
        "[agent]\ntick_interval_ms = 100\n[paths]\ncgroup_root = \"{}\"\n[cri]\nendpoints = []\n[ebpf]\nenabled = false\n\
         [prices]\ncpu_core_second = 0.01\ndisk_gb = 0.02\nmemory_gb_hour = 0.03\n",
        r.display()
    ));
    let text = agent.scrape_until(Duration::from_secs(5), "all families", |t| {
        t.contains("tally_collector_errors_total{")
            && t.contains("tally_workload_disk_write_bytes_total{")
            && t.contains("resource=\"memory\"} ")
    });
    promtool_accepts(&promtool, &text);
    // The tick times every registered source, in registry order.
    let sources: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("tally_source_collect_duration_seconds{source=\""))
        .filter_map(|l| l.split('"').next())
        .collect();
    assert_eq!(sources, ["cgroupfs", "ebpf", "gpu", "rdma", "inference"]);

    // The real node too, whatever runs on it (eBPF programs, units, test cgroups).
    let live = Agent::start("[cri]\nendpoints = []\n");
    promtool_accepts(&promtool, &live.scrape());
}

/// `promtool check metrics` passes on `text` with nothing to say.
#[expect(clippy::unwrap_used, reason = "test helper")]
fn promtool_accepts(promtool: &std::path::Path, text: &str) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
