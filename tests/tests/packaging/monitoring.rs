//! Alert rules and the dashboard: promtool, and every metric they use served by a live agent.

use tally_rdma::netlink::nldev::DeviceInfo;
use tally_tests::fake_engine;
use tally_tests::fake_rdma::{FakeSysfs, Responder, Script, ScriptCounter};

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
    // The cluster budgets' recording rules, and the budget query the README builds on them.
    run_ok(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(root().join("packaging/prometheus/cluster-budgets.yml")),
    );
    run_ok(
        Command::new(&promtool)
            .args(["test", "rules"])
            .arg(root().join("packaging/prometheus/cluster-budgets_test.yml")),
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
    assert!(checked.contains("SUCCESS: 13 rules found"), "{checked}");
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
    let roots = every_hierarchy(unified);
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
    // An inference server (vLLM's format) in the same unit, whose counters grow while the test
    // runs, for the token families and the per-token ratios of the rules and the dashboard.
    let engine_dir = tempfile::tempdir().unwrap();
    let body = engine_dir.path().join("vllm.prom");
    let grow = |n: f64| fake_engine::vllm_body(&[("chat", 100.0 * n, 10.0 * n, 50.0 * n, 0.25)]);
    fake_engine::write_body(&body, &grow(1.0));
    let engine_port = free_port().to_string();
    fake_engine::start(
        env!("CARGO_BIN_EXE_fake-engine"),
        &mut cg,
        &["vllm", "serve", "chat", "--port", &engine_port],
        &body,
        fake_engine::Mode::Serve,
        false,
    );
    let growing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let grower = {
        let (body, growing) = (body.clone(), growing.clone());
        std::thread::spawn(move || {
            let mut n = 1.0;
            while growing.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1.0;
                fake_engine::write_body(&body, &grow(n));
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    // RDMA: a fixture sysfs with two ports, and a fake kernel whose QP counter belongs to the
    // unit's process, for the per-workload and port families.
    let sysfs = FakeSysfs::new("mlx5");
    let responder = Responder::start(Script {
        devices: vec![
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
        ],
        counters: vec![ScriptCounter {
            device_index: 1,
            port: 1,
            id: 1,
            pid: Some(gpu_pid),
            qps: vec![0x40],
            per_dump: [1_000_000, 2_000_000, 100, 200],
        }],
        ..Script::default()
    });
    // Budgets, on a second unit that burns a CPU: one enforced (a freeze throttle, so the
    // throttle, latency and freeze share families), one alert-only (dry_run="true"), a cluster
    // budget whose query endpoint is down, and one whose action cannot work here — a disk limit on a node whose sysfs (the RDMA fixture)
    // lists no block devices — for the enforcement errors. Their alerts go to an Alertmanager
    // nobody listens on: failed deliveries. Windows are an hour long, so nothing is released
    // while the test looks.
    let burner_unit = format!("tally-pkg-burn-{}.service", random_hex(8));
    let mut burner = TestCgroup::create(&roots, &format!("/system.slice/{burner_unit}"));
    burner.burn();
    let budget = |name: &str, action: &str, extra: &str| {
        format!(
            "[[budget]]\nname = \"{name}\"\nresource = \"cpu_seconds\"\nlimit = 0.05\nwindow = \"1h\"\naction = \"{action}\"\nselect.unit = \"{burner_unit}\"\n{extra}"
        )
    };
    let state = tempfile::tempdir().unwrap();
    let sockets = tempfile::tempdir().unwrap();
    let agent = Agent::start(&format!(
        "[agent]\ntick_interval_ms = 200\n[paths]\nsys_root = \"{}\"\n[cri]\nendpoints = [\"{}\"]\n{}{}\
         [prices]\ncpu_core_second = 0.001\n[tenants]\nlabels = [\"team\"]\n\
         [enforcement]\nstate_dir = \"{}\"\n\
         [alerts]\nalertmanager_urls = [\"http://127.0.0.1:{}\"]\ntimeout_ms = 500\nmax_attempts = 1\n\
         [cluster]\nquery_url = \"http://127.0.0.1:{}\"\ninterval_secs = 1\ntimeout_ms = 500\nmax_staleness_secs = 1\n{}{}{}{}\
         [[budget]]\nname = \"pkg-door\"\nresource = \"cpu_seconds\"\nlimit = 1.0\nwindow = \"1h\"\nshared = true\nadmission = \"deny\"\nselect.unit = \"tally-pkg-door-*\"\n",
        sysfs.root().display(),
        sockets.path().join("no-runtime.sock").display(),
        nvml.config(),
        responder.config(true),
        state.path().display(),
        free_port(),
        free_port(),
        budget("pkg-freeze", "freeze", "throttle.share = 0.5\n"),
        budget("pkg-alert", "alert", ""),
        budget("pkg-no-disk", "disk", "throttle.disk_bytes_per_sec = 1000000.0\n"),
        // A cluster budget whose query endpoint nobody serves: blind.
        budget(
            "pkg-cluster",
            "alert",
            "span = \"cluster\"\nquery = \"vector(1)\"\n"
        ),
    ));
    let out = cg.run(
        &python.display().to_string(),
        &["-c", CLIENT, &agent.port.to_string()],
    );
    assert!(out.status.success(), "client: {}", text(&out.stderr));
    let unit_label = format!("unit=\"{unit}\"");
    // The unit's traffic reaches the ledger on the next tick, the GPU families need two samples
    // of the fake GPU (and its XID at 200 ms), RDMA a counter dump, the budgets a tick over their
    // limit and a delivery attempt; then every family is there or never will be.
    let everything_seen = |t: &str| {
        let network = [
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
        });
        let gpu = [
            "tally_workload_gpu_seconds_total",
            "tally_workload_gpu_energy_joules_total",
            "tally_gpu_xid_errors_total",
        ]
        .iter()
        .all(|f| sample(t, f, &[]).is_some());
        let rdma = sample(t, "tally_workload_rdma_receive_bytes_total", &[&unit_label]).is_some();
        let tokens = sample(t, "tally_workload_tokens_total", &[&unit_label]).is_some()
            && sample(t, "tally_workload_kv_cache_usage_ratio", &[&unit_label]).is_some();
        let active = |budget: &str| {
            sample(
                t,
                "tally_enforcement_active",
                &[&format!("budget=\"{budget}\"")],
            ) == Some(1.0)
        };
        let budgets = active("pkg-freeze")
            && active("pkg-alert")
            && sample(
                t,
                "tally_enforcement_errors_total",
                &["budget=\"pkg-no-disk\""],
            )
            .is_some()
            && sample(t, "tally_alert_requests_total", &["result=\"failed\""])
                .is_some_and(|n| n >= 1.0)
            && sample(
                t,
                "tally_cluster_query_failures_total",
                &["budget=\"pkg-cluster\"", "reason=\"unreachable\""],
            )
            .is_some_and(|n| n >= 1.0);
        network && gpu && rdma && tokens && budgets
    };
    agent.scrape_until(
        Duration::from_secs(20),
        "the unit's traffic, GPU, RDMA, token and budget families",
        everything_seen,
    );
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
            .replace("$namespace", ".*")
            .replace("$tenant", "team");
        assert!(!query.contains('$'), "{title}: unknown variable in {expr}");
        let result = server.query_until_found(&query, Duration::from_secs(15));
        eprintln!("{title}: {} series", result.len());
    }

    // The budget alerts fire on what the agent serves: the freeze budget's throttle (not the
    // alert-only budget, which throttles nothing), the disk budget's errors, the failed
    // deliveries.
    let Some(plain) = yaml_docs(TEST, &root().join("packaging/prometheus/rules.yml")) else {
        return;
    };
    let rules = plain[0]["groups"][0]["rules"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for (alert, label, value) in [
        ("TallyBudgetEnforced", "budget", "pkg-freeze"),
        ("TallyEnforcementErrors", "budget", "pkg-no-disk"),
        ("TallyAlertDeliveryFailing", "result", "failed"),
        ("TallyClusterBudgetBlind", "budget", "pkg-cluster"),
    ] {
        let expr = rules
            .iter()
            .find(|r| r["alert"] == alert)
            .and_then(|r| r["expr"].as_str())
            .unwrap_or_else(|| panic!("no rule {alert} in rules.yml"));
        let firing = server.query_until_found(expr, Duration::from_secs(15));
        assert!(
            firing.iter().any(|s| s["metric"][label] == value),
            "{alert}: {firing:?}"
        );
        assert!(
            !firing.iter().any(|s| s["metric"]["budget"] == "pkg-alert"),
            "{alert} fired for the alert-only budget: {firing:?}"
        );
    }
    growing.store(false, std::sync::atomic::Ordering::Relaxed);
    grower.join().unwrap();
    // The agent first: its freeze guard thaws the burner before the cgroups go.
    drop(server);
    drop(agent);
    drop(burner);
    drop(cg);
}
