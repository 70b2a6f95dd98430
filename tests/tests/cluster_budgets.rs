//! Budgets that span the cluster, end to end: two agents, each with its own cgroup subtree and
//! port (two nodes), and one real Prometheus (Debian's) scraping both. A budget on the egress of
//! `cl-*.service` workloads is over its limit only when the two nodes' use is summed; each agent
//! learns the sum from Prometheus and freezes its own workload, releases when the sum falls out
//! of the window, and follows each `on_unavailable` mode while Prometheus is down.
//!
//! UDP bytes are exact (the `cgroup_skb` programs count every datagram's IP length), so the sum
//! crosses the limit at a known send, not at a CPU rate two shared cores happen to give.

use std::net::UdpSocket;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tally_tests::agent::{free_port, sample, Agent};
use tally_tests::cgroup::{random_hex, remove_parents, TestCgroup};
use tally_tests::prometheus::Prometheus;
use tally_tests::require;

const SENDER: &str = r#"
import socket, sys
host, port, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(count):
    s.sendto(b"c" * size, (host, port))
"#;

/// One node's burst: 100 datagrams of 972 bytes, 100,000 bytes with their IP and UDP headers.
const BURST: f64 = 100.0 * (972.0 + 28.0);
/// Over one node's burst, under both.
const LIMIT: f64 = 1.5 * BURST;
/// The budget's window: a burst stops counting this long after it was sent.
const WINDOW_SECS: u64 = 20;

/// The three budgets, one per `on_unavailable` mode: hold, open, closed.
const BUDGETS: [&str; 3] = ["fleet", "fleet-open", "fleet-closed"];

/// One node: an agent whose cgroup root is its own subtree, and one workload in it.
struct Node {
    agent: Agent,
    workload: TestCgroup,
    name: &'static str,
}

impl Node {
    fn value(&self, family: &str, needles: &[&str]) -> Option<f64> {
        sample(&self.agent.scrape(), family, needles)
    }

    fn available(&self, budget: &str) -> Option<f64> {
        self.value(
            "tally_cluster_budget_available",
            &[&format!("budget=\"{budget}\"")],
        )
    }

    fn active(&self, budget: &str) -> Option<f64> {
        self.value(
            "tally_enforcement_active",
            &[&format!("budget=\"{budget}\"")],
        )
    }

    /// Sends `count` datagrams from the workload's cgroup.
    fn send(&self, target: u16, count: u32) {
        let out = self.workload.run(
            "python3",
            &[
                "-c",
                SENDER,
                "127.0.0.1",
                &target.to_string(),
                &count.to_string(),
                "972",
            ],
        );
        assert!(
            out.status.success(),
            "{}: sender failed: {out:?}",
            self.name
        );
    }

    /// Whether the workload's cgroup is seen frozen within `over` (the freeze cycle runs half
    /// of each 100 ms period).
    fn seen_frozen(&self, over: Duration) -> bool {
        let file = self.workload.dirs[0].join("cgroup.freeze");
        let deadline = Instant::now() + over;
        while Instant::now() < deadline {
            if std::fs::read_to_string(&file).is_ok_and(|v| v.trim() == "1") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(7));
        }
        false
    }
}

/// Polls until `done` holds for every node, returning how long it took.
#[expect(
    clippy::panic,
    reason = "test helper: the failure shows both agents' state"
)]
fn until(nodes: &[&Node], what: &str, timeout: Duration, done: impl Fn(&Node) -> bool) -> f64 {
    let start = Instant::now();
    loop {
        if nodes.iter().all(|n| done(n)) {
            return start.elapsed().as_secs_f64();
        }
        if start.elapsed() > timeout {
            let texts: Vec<String> = nodes
                .iter()
                .map(|n| {
                    format!(
                        "--- {} ---\n{}\n{}",
                        n.name,
                        n.agent.scrape(),
                        n.agent.log()
                    )
                })
                .collect();
            panic!("{what}: not within {timeout:?}\n{}", texts.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Root, the unified hierarchy and Prometheus, or a loud skip.
fn needs(test: &str) -> Option<(PathBuf, PathBuf)> {
    if !require::root(test) {
        return None;
    }
    Some((
        require::unified(test)?,
        require::binary(test, "prometheus")?,
    ))
}

#[test]
fn two_nodes_over_a_cluster_budget_together_both_throttle_and_release_and_follow_on_unavailable() {
    let Some((unified, prometheus)) = needs(
        "two_nodes_over_a_cluster_budget_together_both_throttle_and_release_and_follow_on_unavailable",
    ) else {
        return;
    };
    let scope = format!("tally-cluster-{}", random_hex(8));
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = sink.local_addr().unwrap().port();
    let prometheus_port = free_port();
    let state = tempfile::tempdir().unwrap();

    let node = |name: &'static str| {
        let tag = random_hex(6);
        let rel = format!("/{scope}/{name}/system.slice/cl-{name}-{tag}.service");
        let mut workload = TestCgroup::create(std::slice::from_ref(&unified), &rel);
        workload.spawn("exec sleep 600");
        let root: PathBuf = unified.join(&scope).join(name);
        let budget = |budget: &str, mode: &str, action: &str| {
            format!(
                "[[budget]]\nname = '{budget}'\nspan = 'cluster'\nresource = 'network_egress_bytes'\nlimit = {LIMIT}\nwindow = '{WINDOW_SECS}s'\n\
                 select = {{ unit = 'cl-*.service' }}\non_unavailable = '{mode}'\n{action}"
            )
        };
        let config = format!(
            "[agent]\ntick_interval_ms = 200\n[paths]\ncgroup_root = \"{}\"\n[cri]\nendpoints = []\n\
             [enforcement]\nstate_dir = \"{}\"\n\
             [cluster]\nquery_url = 'http://127.0.0.1:{prometheus_port}'\ninterval_secs = 1\ntimeout_ms = 800\nmax_staleness_secs = 3\n\
             {}{}{}",
            root.display(),
            state.path().join(name).display(),
            budget("fleet", "hold", "action = 'freeze'\nthrottle = { share = 0.5 }\n"),
            budget("fleet-open", "open", ""),
            budget("fleet-closed", "closed", ""),
        );
        Node {
            agent: Agent::start(&config),
            workload,
            name,
        }
    };
    let a = node("a");
    let b = node("b");
    let nodes = [&a, &b];
    let mut server =
        Prometheus::start_scraping(&prometheus, prometheus_port, &[a.agent.port, b.agent.port]);

    // Each workload's egress series exists, scraped twice, before its burst, so `increase`
    // sees the burst (a series' first sample is no increase).
    a.send(target, 1);
    b.send(target, 1);
    server.query_until_found(
        "count(count_over_time(tally_workload_network_transmit_bytes_total{unit=~\"cl-.*\"}[1m]) >= 2) == 2",
        Duration::from_secs(30),
    );
    until(&nodes, "first answers", Duration::from_secs(30), |n| {
        n.value("tally_cluster_budget_available", &["budget=\"fleet\""]) == Some(1.0)
            && n.value("tally_budget_usage", &["budget=\"fleet\""]) == Some(0.0)
    });
    let start = Instant::now();
    let at = || start.elapsed().as_secs_f64();

    // One node's burst: each agent sees the cluster at one burst, under the limit.
    a.send(target, 100);
    let seen = until(
        &nodes,
        "a's burst in the sum",
        Duration::from_secs(15),
        |n| {
            n.value("tally_budget_usage", &["budget=\"fleet\""])
                .is_some_and(|u| u >= 0.9 * BURST)
        },
    );
    for n in nodes {
        let usage = n
            .value("tally_budget_usage", &["budget=\"fleet\""])
            .unwrap();
        assert!(usage < LIMIT, "{}: {usage} with one burst", n.name);
        assert_eq!(n.active("fleet"), Some(0.0), "{}", n.name);
    }
    eprintln!(
        "t={:.1}s a's burst seen by both agents ({seen:.1}s after it)",
        at()
    );
    let b_sent = at();
    b.send(target, 100);
    // Each budget's query runs on its own: wait for all three answers.
    let enforced = until(&nodes, "both enforcing", Duration::from_secs(15), |n| {
        BUDGETS.iter().all(|b| n.active(b) == Some(1.0))
    });
    eprintln!(
        "t={:.1}s both agents throttle ({enforced:.1}s after b's burst)",
        at()
    );
    for n in nodes {
        let usage = n
            .value("tally_budget_usage", &["budget=\"fleet\""])
            .unwrap();
        assert!(
            (LIMIT..3.0 * BURST).contains(&usage),
            "{}: usage {usage} with two bursts",
            n.name
        );
        // Each node's own use is one burst, under the limit: only the cluster's sum throttles.
        let own = n
            .value(
                "tally_workload_network_transmit_bytes_total",
                &["unit=\"cl-"],
            )
            .unwrap();
        assert!(own < LIMIT, "{}: own egress {own}", n.name);
        assert!(
            n.seen_frozen(Duration::from_secs(2)),
            "{}: never frozen",
            n.name
        );
        assert_eq!(n.active("fleet-open"), Some(1.0), "{}", n.name);
        assert_eq!(n.active("fleet-closed"), Some(1.0), "{}", n.name);
    }

    // Prometheus down while enforcing: hold keeps, open releases, closed keeps.
    server.stop();
    let lost = until(&nodes, "answers stale", Duration::from_secs(15), |n| {
        BUDGETS.iter().all(|b| n.available(b) == Some(0.0))
    });
    eprintln!(
        "t={:.1}s Prometheus stopped; stale on both after {lost:.1}s",
        at()
    );
    for n in nodes {
        assert_eq!(n.active("fleet"), Some(1.0), "{}: hold", n.name);
        assert_eq!(n.active("fleet-open"), Some(0.0), "{}: open", n.name);
        assert_eq!(n.active("fleet-closed"), Some(1.0), "{}: closed", n.name);
        let failed = n
            .value(
                "tally_cluster_query_failures_total",
                &["budget=\"fleet\"", "reason=\"unreachable\""],
            )
            .unwrap();
        assert!(failed >= 1.0, "{}: {failed} unreachable", n.name);
    }

    // Back, with its data: the sum falls once a's burst leaves the window, and both release.
    server.restart();
    let released = until(
        &nodes,
        "both released",
        Duration::from_secs(WINDOW_SECS + 20),
        |n| BUDGETS.iter().all(|b| n.active(b) == Some(0.0)),
    );
    let since_b = at() - b_sent;
    eprintln!(
        "t={:.1}s both agents release ({since_b:.1}s after b's burst)",
        at()
    );
    // Not before the first burst left the window: until then the sum was over the limit.
    assert!(
        since_b >= (WINDOW_SECS as f64) - 6.0,
        "released {since_b:.1}s after b's burst ({released:.1}s after the restart)"
    );
    for n in nodes {
        let usage = n
            .value("tally_budget_usage", &["budget=\"fleet\""])
            .unwrap();
        assert!(usage < 0.9 * LIMIT, "{}: released at {usage}", n.name);
        assert!(
            !n.seen_frozen(Duration::from_millis(500)),
            "{}: still frozen",
            n.name
        );
    }

    // Prometheus down while released: hold and open stay released, closed enforces.
    server.stop();
    until(
        &nodes,
        "answers stale again",
        Duration::from_secs(15),
        |n| BUDGETS.iter().all(|b| n.available(b) == Some(0.0)),
    );
    for n in nodes {
        assert_eq!(n.active("fleet"), Some(0.0), "{}: hold", n.name);
        assert_eq!(n.active("fleet-open"), Some(0.0), "{}: open", n.name);
        assert_eq!(n.active("fleet-closed"), Some(1.0), "{}: closed", n.name);
    }
    drop(server);
    drop(a);
    drop(b);
    remove_parents(
        std::slice::from_ref(&unified),
        &format!("/{scope}/a/system.slice/x"),
        3,
    );
    remove_parents(
        std::slice::from_ref(&unified),
        &format!("/{scope}/b/system.slice/x"),
        3,
    );
}

/// Waits until Prometheus answers a query over TLS (it listens before its storage is ready).
#[expect(clippy::panic, clippy::expect_used, reason = "test helper")]
fn ready_over_tls(port: u16, ca: &std::path::Path) {
    use tally_agent::cluster::{http::Client, query};
    let config = tally_agent::config::ClusterConfig {
        query_url: format!("https://127.0.0.1:{port}"),
        ca_file: Some(ca.to_path_buf()),
        timeout_ms: 1000,
        ..Default::default()
    };
    let client = Client::new(&config).expect("a client for the URL");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = runtime
            .block_on(client.query("vector(1)"))
            .and_then(|body| query::parse(&body, None));
        match answer {
            Ok(_) => return,
            Err(e) if Instant::now() > deadline => panic!("Prometheus not ready over TLS: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A CA and a server certificate for 127.0.0.1 it signed, made with openssl.
#[expect(clippy::unwrap_used, clippy::expect_used, reason = "test helper")]
fn certificates(dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=tally test CA",
    ]);
    run(&ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    run(&csr);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

#[test]
fn tls_is_verified_and_every_bad_answer_is_counted_with_the_budget_on_unavailable() {
    const TEST: &str =
        "tls_is_verified_and_every_bad_answer_is_counted_with_the_budget_on_unavailable";
    let Some((unified, prometheus)) = needs(TEST) else {
        return;
    };
    if require::binary(TEST, "openssl").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path());
    let web = dir.path().join("web.yml");
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let port = free_port();
    let _server = Prometheus::start_with_web_config(&prometheus, port, &[], Some(&web));
    ready_over_tls(port, &ca);

    let scope = format!("tally-cluster-{}", random_hex(8));
    let rel = format!("/{scope}/system.slice/clt-{}.service", random_hex(6));
    let mut workload = TestCgroup::create(std::slice::from_ref(&unified), &rel);
    workload.spawn("exec sleep 600");
    // One good question, and one of each bad answer; every bad one enforces (`closed`).
    let budgets = [
        ("good", "vector(42)", "hold"),
        ("bad-promql", "sum(rate(x[1m]", "closed"),
        ("many-series", "label_replace(vector(1), 'a', 'x', '', '') or label_replace(vector(2), 'a', 'y', '', '')", "closed"),
        ("not-a-number", "vector(NaN)", "closed"),
        ("nothing", "up{job=\"nobody\"}", "closed"),
    ];
    let budget_text: String = budgets
        .iter()
        .map(|(name, query, mode)| {
            format!(
                "[[budget]]\nname = '{name}'\nspan = 'cluster'\nresource = 'cpu_seconds'\nlimit = 100.0\nquery = \"{}\"\n\
                 select = {{ unit = 'clt-*.service' }}\non_unavailable = '{mode}'\n",
                query.replace('"', "\\\"")
            )
        })
        .collect();
    let config = |ca_file: Option<&std::path::Path>| {
        format!(
            "[agent]\ntick_interval_ms = 200\n[paths]\ncgroup_root = \"{}\"\n[cri]\nendpoints = []\n\
             [enforcement]\nstate_dir = \"{}\"\n\
             [cluster]\nquery_url = 'https://127.0.0.1:{port}'\ninterval_secs = 1\ntimeout_ms = 900\nmax_staleness_secs = 1\n{}\n{budget_text}",
            unified.join(&scope).display(),
            dir.path().join("state").display(),
            ca_file.map_or(String::new(), |c| format!("ca_file = \"{}\"", c.display())),
        )
    };

    // Verified against the CA: the good budget answers, each bad one fails for its reason.
    let agent = Agent::start(&config(Some(&ca)));
    let reasons = [
        ("bad-promql", "error"),
        ("many-series", "series"),
        ("not-a-number", "value"),
        ("nothing", "empty"),
    ];
    let text = agent.scrape_until(Duration::from_secs(20), "every budget asked", |t| {
        sample(t, "tally_cluster_budget_available", &["budget=\"good\""]) == Some(1.0)
            // The tick takes the answer after the query task recorded it.
            && sample(t, "tally_budget_usage", &["budget=\"good\""]) == Some(42.0)
            && reasons.iter().all(|(budget, reason)| {
                sample(
                    t,
                    "tally_cluster_query_failures_total",
                    &[
                        &format!("budget=\"{budget}\""),
                        &format!("reason=\"{reason}\""),
                    ],
                )
                .is_some_and(|n| n >= 1.0)
                // The tick acts on a failure after the query task counted it.
                && sample(
                    t,
                    "tally_enforcement_active",
                    &[&format!("budget=\"{budget}\"")],
                ) == Some(1.0)
            })
    });
    let value = |family: &str, needles: &[&str]| sample(&text, family, needles);
    assert_eq!(
        value("tally_budget_usage", &["budget=\"good\""]),
        Some(42.0)
    );
    assert_eq!(
        value("tally_enforcement_active", &["budget=\"good\""]),
        Some(0.0)
    );
    for (budget, reason) in reasons {
        let at = format!("budget=\"{budget}\"");
        for other in tally_agent::cluster::REASONS
            .iter()
            .filter(|r| **r != reason)
        {
            assert_eq!(
                value(
                    "tally_cluster_query_failures_total",
                    &[&at, &format!("reason=\"{other}\"")]
                ),
                Some(0.0),
                "{budget}: {other}"
            );
        }
        assert_eq!(
            value("tally_cluster_budget_available", &[&at]),
            Some(0.0),
            "{budget}"
        );
        assert_eq!(
            value("tally_enforcement_active", &[&at]),
            Some(1.0),
            "{budget}: closed"
        );
    }
    let log = agent.log();
    for (budget, reason) in reasons {
        let warned = log
            .lines()
            .filter(|l| {
                l.contains("cluster budget query failed")
                    && l.contains(&format!("budget={budget} "))
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .count();
        assert_eq!(warned, 1, "{budget}: one WARN per outage\n{log}");
    }
    // `tally check` asks the same questions once.
    let check_config = dir.path().join("check.toml");
    std::fs::write(&check_config, config(Some(&ca))).unwrap();
    let out = std::process::Command::new(tally_tests::agent::tally_bin())
        .args(["check", "--json", "--config"])
        .arg(&check_config)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let item = report["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "cluster budgets")
        .unwrap();
    assert_eq!(item["status"], "degraded", "{item}");
    let detail = item["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("good: 42 of 100; bad-promql: no answer, error ("),
        "{detail}"
    );
    assert!(detail.contains("nothing: no answer, empty (the answer has no series); on_unavailable = closed after 1 s"), "{detail}");
    drop(agent);

    // Not verified by the system's CAs: every query fails as TLS, nothing answers.
    let agent = Agent::start(&config(None));
    let text = agent.scrape_until(Duration::from_secs(20), "TLS failures", |t| {
        sample(
            t,
            "tally_cluster_query_failures_total",
            &["budget=\"good\"", "reason=\"tls\""],
        )
        .is_some_and(|n| n >= 1.0)
    });
    assert_eq!(
        sample(
            &text,
            "tally_cluster_budget_available",
            &["budget=\"good\""]
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "tally_cluster_queries_total", &["budget=\"good\""]),
        sample(
            &text,
            "tally_cluster_query_failures_total",
            &["budget=\"good\"", "reason=\"tls\""]
        ),
        "every query failed as TLS"
    );
    drop(agent);
    drop(workload);
    remove_parents(
        std::slice::from_ref(&unified),
        &format!("/{scope}/system.slice/x"),
        2,
    );
}
