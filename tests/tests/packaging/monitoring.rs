//! Alert rules and the dashboard: promtool, and every metric they use served by a live agent.

use super::kubernetes::*;
use super::*;

#[test]
fn alert_rules_pass_promtool_and_the_prometheusrule_is_the_same() {
    const TEST: &str = "alert_rules_pass_promtool_and_the_prometheusrule_is_the_same";
    let Some(promtool) = require::binary(TEST, "promtool") else {
        return;
    };
    let Some(kubectl) = require::binary(TEST, "kubectl") else {
        return;
    };
    if require::binary(TEST, "python3").is_none() {
        return;
    }
    let rules = root().join("packaging/prometheus/rules.yml");
    run_ok(Command::new(&promtool).args(["check", "rules"]).arg(&rules));
    // Each alert fires when it should and not before (packaging/prometheus/rules_test.yml).
    run_ok(
        Command::new(&promtool)
            .args(["test", "rules"])
            .arg(root().join("packaging/prometheus/rules_test.yml")),
    );

    let dir = tempfile::tempdir().unwrap();
    let rendered = kustomize(&kubectl, "packaging/kubernetes/base", dir.path());
    let (Some(docs), Some(plain)) = (yaml_docs(TEST, &rendered), yaml_docs(TEST, &rules)) else {
        return;
    };
    let groups = &of_kind(&docs, "PrometheusRule")["spec"]["groups"];
    assert_eq!(
        *groups, plain[0]["groups"],
        "prometheusrule.yaml's spec.groups must equal rules.yml's groups"
    );
    let extracted = dir.path().join("prometheusrule-groups.yml");
    std::fs::write(
        &extracted,
        serde_json::json!({ "groups": groups }).to_string(),
    )
    .unwrap();
    let checked = run_ok(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(&extracted),
    );
    assert!(checked.contains("SUCCESS: 5 rules found"), "{checked}");
}

/// Sends one HTTP request to the agent and reads the answer: traffic both ways.
pub(super) const CLIENT: &str = r#"
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"GET /metrics HTTP/1.1\r\nHost: tally\r\nConnection: close\r\n\r\n")
while s.recv(65536):
    pass
"#;

/// Every panel query of a Grafana dashboard (rows' nested panels included).
pub(super) fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    let mut queries = Vec::new();
    let mut stack: Vec<&serde_json::Value> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    while let Some(panel) = stack.pop() {
        stack.extend(panel["panels"].as_array().into_iter().flatten());
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                queries.push((
                    panel["title"].as_str().unwrap_or_default().to_owned(),
                    expr.to_owned(),
                ));
            }
        }
    }
    queries
}

#[test]
fn dashboard_and_alerts_use_only_served_metrics_and_every_panel_answers() {
    const TEST: &str = "dashboard_and_alerts_use_only_served_metrics_and_every_panel_answers";
    if !require::root(TEST) {
        return;
    }
    let Some(unified) = require::unified(TEST) else {
        return;
    };
    let Some(python) = require::binary(TEST, "python3") else {
        return;
    };
    let Some(prometheus) = require::binary(TEST, "prometheus") else {
        return;
    };
    let dashboard_text = read("packaging/grafana/tally.json");
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard_text).unwrap();
    let mut names = metric_names(&dashboard_text);
    names.extend(metric_names(&read("packaging/prometheus/rules.yml")));
    names.extend(metric_names(&read(
        "packaging/kubernetes/base/prometheusrule.yaml",
    )));
    assert!(names.len() >= 15, "{names:?}");

    // A systemd-unit workload with CPU, memory and disk files in every hierarchy this node has,
    // and traffic both ways; a CRI endpoint that never answers, for the CRI error counters.
    let mut roots = vec![unified];
    for controller in ["cpu,cpuacct", "cpuacct", "memory", "blkio"] {
        let dir = Path::new("/sys/fs/cgroup").join(controller);
        if dir.join("cgroup.procs").is_file() && !dir.join("cgroup.controllers").exists() {
            roots.push(dir);
        }
    }
    let unit = format!("tally-pkg-{}.service", random_hex(8));
    let mut cg = TestCgroup::create(&roots, &format!("/system.slice/{unit}"));
    // A GPU (the fake libnvidia-ml) held by the unit's process, with an XID, for the GPU rules.
    let gpu_pid = cg.spawn("exec sleep 600");
    let nvml = tally_tests::fake_nvml::FakeNvml::new(
        tally_tests::fake_nvml::FULL,
        &serde_json::json!({
            "devices": [{
                "uuid": "GPU-00000000-1111-2222-3333-444444444444",
                "name": "NVIDIA H100 80GB HBM3",
                "memory_total_bytes": 85899345920u64,
                "power_watts": 300,
                "processes": [{ "pid": gpu_pid, "used_memory_bytes": 1_000_000_000u64, "sm_percent": 40 }]
            }],
            "xids": [{ "at_ms": 200, "device": 0, "xid": 79 }]
        }),
    );
    let sockets = tempfile::tempdir().unwrap();
    let agent = Agent::start(&format!(
        "[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = [\"{}\"]\n{}",
        sockets.path().join("no-runtime.sock").display(),
        nvml.config()
    ));
    let out = cg.run(
        &python.display().to_string(),
        &["-c", CLIENT, &agent.port.to_string()],
    );
    assert!(out.status.success(), "client: {}", text(&out.stderr));
    let unit_label = format!("unit=\"{unit}\"");
    // The unit's traffic reaches the ledger on the next tick; then every family is there or
    // never will be.
    agent.scrape_until(Duration::from_secs(10), "the unit's traffic", |t| {
        [
            "transmit_bytes",
            "receive_bytes",
            "transmit_packets",
            "receive_packets",
        ]
        .iter()
        .all(|f| {
            sample(
                t,
                &format!("tally_workload_network_{f}_total"),
                &[&unit_label],
            )
            .is_some()
        }) && [
            // The GPU families need two samples of the fake GPU, and its XID at 200 ms.
            "tally_workload_gpu_seconds_total",
            "tally_workload_gpu_energy_joules_total",
            "tally_gpu_xid_errors_total",
        ]
        .iter()
        .all(|f| sample(t, f, &[]).is_some())
    });
    let metrics = agent.scrape();
    let missing: Vec<&String> = names.iter().filter(|n| !serves(&metrics, n)).collect();
    assert!(
        missing.is_empty(),
        "used by the dashboard or the alert rules but not served: {missing:?}\n{metrics}"
    );

    // Every panel's query, as Grafana would send it, answers from a real Prometheus.
    let server = Prometheus::start(&prometheus, agent.port);
    server.query_until_found(
        "count_over_time(tally_ticks_total[1m]) > 3",
        Duration::from_secs(30),
    );
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 15);
    for (title, expr) in queries {
        let query = expr
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*")
            .replace("$namespace", ".*");
        assert!(!query.contains('$'), "{title}: unknown variable in {expr}");
        let result = server.query_until_found(&query, Duration::from_secs(15));
        eprintln!("{title}: {} series", result.len());
    }
    drop(cg);
}
