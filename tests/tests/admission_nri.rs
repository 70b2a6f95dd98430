//! Admission through NRI, end to end on this machine: the agent registers with a scripted
//! runtime (`tally_tests::fake_nri`), and its answers to `CreateContainer` follow what its
//! budgets measured on real cgroups: admitted while the budget has room, refused with the
//! budget's usage, limit and release once it is spent, exempt namespaces admitted whatever the
//! budget, a `throttle` budget's container created with its share of the budget's cores. The
//! agent follows the runtime away and back.
//!
//! The spending is UDP egress, exact to the byte (the `cgroup_skb` programs count each
//! datagram's IP length), so the refusal's text is known in advance.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use tally_tests::agent::{sample, Agent};
use tally_tests::alertmanager::WebhookSink;
use tally_tests::cgroup::{random_hex, random_uid, remove_parents, TestCgroup};
use tally_tests::fake_cri::FakeCri;
use tally_tests::fake_nri::{Answer, FakeRuntime};
use tally_tests::require;

const SENDER: &str = r#"
import socket, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(count):
    s.sendto(b"n" * 972, ("127.0.0.1", port))
"#;

/// 200 datagrams of 972 bytes, 1,000 bytes each with IP and UDP headers.
const SENT: u32 = 200;
const LIMIT: u32 = 150_000;

fn decision(text: &str, d: &str) -> Option<f64> {
    sample(
        text,
        "tally_admission_nri_decisions_total",
        &[&format!("decision=\"{d}\"")],
    )
}

/// The `TallyAdmissionDenied` alerts the webhook got in posts of `status`, once there is one
/// (within 10 s).
fn denied_alerts(hooks: &WebhookSink, status: &str) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alerts: Vec<serde_json::Value> = hooks
            .posts("/hook")
            .into_iter()
            .filter(|p| p["status"] == status)
            .flat_map(|p| p["alerts"].as_array().cloned().unwrap_or_default())
            .filter(|a| a["labels"]["alertname"] == "TallyAdmissionDenied")
            .collect();
        if !alerts.is_empty() {
            return alerts;
        }
        assert!(
            Instant::now() < deadline,
            "no {status} TallyAdmissionDenied alert: {:?}",
            hooks.posts("/hook")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_spent_budget_refuses_containers_at_creation_and_a_throttle_budget_starts_them_throttled() {
    const TEST: &str =
        "a_spent_budget_refuses_containers_at_creation_and_a_throttle_budget_starts_them_throttled";
    if !require::root(TEST) {
        return;
    }
    let (Some(unified), Some(_python)) = (require::unified(TEST), require::binary(TEST, "python3"))
    else {
        return;
    };
    let scope = format!("tally-nri-{}", random_hex(8));
    let rel = format!("/{scope}/system.slice/nri-{}.service", random_hex(6));
    let mut workload = TestCgroup::create(std::slice::from_ref(&unified), &rel);
    workload.spawn("exec sleep 600");
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sink.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let runtime = FakeRuntime::listen(dir.path());
    let hooks = WebhookSink::start();
    let budget = |name: &str, admission: &str, action: &str| {
        format!(
            "[[budget]]\nname = '{name}'\nresource = 'network_egress_bytes'\nlimit = {LIMIT}\nwindow = '60s'\nshared = true\n\
             admission = '{admission}'\n{action}"
        )
    };
    let config = |budgets: &str| {
        format!(
            "[agent]\ntick_interval_ms = 200\n[paths]\ncgroup_root = \"{}\"\n[cri]\nendpoints = []\n\
             [enforcement]\nstate_dir = \"{}\"\n[admission]\nnri_socket = \"{}\"\n\
             [alerts]\nwebhook_urls = [\"{}\"]\n{budgets}",
            unified.join(&scope).display(),
            dir.path().join("state").display(),
            runtime.socket.display(),
            hooks.url("/hook"),
        )
    };
    let door = budget("door", "deny", "action = 'alert'\n");
    let slow = budget(
        "slow",
        "throttle",
        "action = 'cpu'\nthrottle = { cpu_cores = 0.5 }\n",
    );
    let agent = Agent::start(&config(&format!("{door}{slow}")));
    let mut session = runtime.accept(Duration::from_secs(20));
    assert_eq!(
        (session.name.as_str(), session.index.as_str()),
        ("tally", "50")
    );
    // RunPodSandbox and CreateContainer: bits 1 << (1 - 1) and 1 << (4 - 1).
    assert_eq!(session.events, 0x9);
    agent.scrape_until(Duration::from_secs(10), "registered", |t| {
        sample(t, "tally_admission_nri_connected", &[]) == Some(1.0)
    });

    // Room in the budget: admitted as it is.
    assert_eq!(
        session.create_container("team-a", "before", &[]),
        Answer::Admitted(None)
    );
    let out = workload.run(
        "python3",
        &["-c", SENDER, &port.to_string(), &SENT.to_string()],
    );
    assert!(out.status.success(), "sender: {out:?}");
    agent.scrape_until(Duration::from_secs(15), "both budgets spent", |t| {
        ["door", "slow"].iter().all(|b| {
            sample(t, "tally_enforcement_active", &[&format!("budget=\"{b}\"")]).is_some()
                && sample(t, "tally_budget_usage", &[&format!("budget=\"{b}\"")])
                    == Some(f64::from(SENT * 1000))
        })
    });
    // Spent: refused, naming the budget, its usage and limit, and its release (the one burst
    // leaves the 60 s window about a minute after it was sent).
    let Answer::Refused(code, message) = session.create_container("team-a", "after", &[]) else {
        panic!("admitted under a spent deny budget");
    };
    assert_eq!(code, 7, "PermissionDenied");
    let prefix = "tally: budget door is spent (200000 network_egress_bytes of 150000); it releases in about ";
    let secs: u64 = message
        .strip_prefix(prefix)
        .and_then(|m| m.strip_suffix(" s"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{message}"));
    assert!((45..=61).contains(&secs), "{message}");
    // System pods start whatever a tenant spent.
    assert_eq!(
        session.create_container("kube-system", "dns", &[]),
        Answer::Admitted(None)
    );
    // Shown from the next tick's snapshot on.
    let text = agent.scrape_until(Duration::from_secs(5), "three decisions", |t| {
        sample(t, "tally_admission_decision_seconds_count", &[]) == Some(3.0)
    });
    for (d, n) in [
        ("admit", 1.0),
        ("exempt", 1.0),
        ("unknown", 0.0),
        ("throttle", 0.0),
        ("deny", 1.0),
    ] {
        assert_eq!(decision(&text, d), Some(n), "{d}");
    }
    assert_eq!(
        sample(
            &text,
            "tally_admission_decisions_total",
            &["budget=\"door\"", "decision=\"deny\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "tally_admission_decision_seconds_count", &[]),
        Some(3.0)
    );
    // Every decision well within the runtime's 2 s (a debug build, under the suite's load; the
    // latency itself is bench/admission.sh's to measure).
    assert_eq!(
        sample(
            &text,
            "tally_admission_decision_seconds_bucket",
            &["le=\"0.1\""]
        ),
        Some(3.0)
    );
    let log = agent.log();
    let denials: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("admission denied at CreateContainer"))
        .collect();
    assert_eq!(denials.len(), 1, "{log}");
    assert!(
        denials[0].contains("budget=door")
            && denials[0].contains("namespace=team-a")
            && denials[0].contains("pod=after"),
        "{}",
        denials[0]
    );

    // One alert for the refused pod, with the refusal as its summary.
    let firing = denied_alerts(&hooks, "firing");
    assert_eq!(firing.len(), 1, "{firing:?}");
    let alert = &firing[0];
    for (label, value) in [
        ("budget", "door"),
        ("namespace", "team-a"),
        ("pod", "after"),
        ("container", "main"),
        ("severity", "warning"),
    ] {
        assert_eq!(alert["labels"][label], value, "{alert}");
    }
    assert_eq!(alert["annotations"]["summary"], message.as_str());

    // Without the deny budget (a reload keeps the other's window): created under `slow`'s CPU
    // throttle, 0.5 cores shared by the one workload and the new container.
    std::fs::write(&agent.config, {
        let text = std::fs::read_to_string(&agent.config).unwrap();
        text.replace(&door, "")
    })
    .unwrap();
    agent.signal(libc::SIGHUP);
    agent.scrape_until(Duration::from_secs(10), "door removed", |t| {
        sample(t, "tally_budget_limit", &["budget=\"door\""]).is_none()
    });
    assert_eq!(
        session.create_container("team-a", "throttled", &[]),
        Answer::Admitted(Some((25_000, 100_000)))
    );
    // The budget that refused the pod is gone: its alert resolved.
    assert_eq!(
        denied_alerts(&hooks, "resolved")[0]["labels"]["pod"],
        "after"
    );
    let text = agent.scrape_until(Duration::from_secs(5), "the throttle counted", |t| {
        decision(t, "throttle") == Some(1.0)
    });
    assert_eq!(
        sample(
            &text,
            "tally_admission_decisions_total",
            &["budget=\"slow\"", "decision=\"throttle\""]
        ),
        Some(1.0)
    );

    // The runtime goes away and comes back: the agent registers again.
    drop(session);
    agent.scrape_until(Duration::from_secs(5), "disconnected", |t| {
        sample(t, "tally_admission_nri_connected", &[]) == Some(0.0)
    });
    let mut again = runtime.accept(Duration::from_secs(10));
    agent.scrape_until(Duration::from_secs(5), "registered again", |t| {
        sample(t, "tally_admission_nri_connected", &[]) == Some(1.0)
    });
    assert_eq!(
        again.create_container("team-a", "later", &[]),
        Answer::Admitted(Some((25_000, 100_000)))
    );
    drop(agent);
    assert!(
        again.closed_within(Duration::from_secs(5)),
        "the plugin's end stays open"
    );
    drop(workload);
    remove_parents(
        std::slice::from_ref(&unified),
        &format!("/{scope}/system.slice/x"),
        2,
    );
}

/// NRI tells the agent a container's pod and name as the runtime creates it, before any CRI
/// listing has it: the workload is named from the first tick that sees its cgroup, although the
/// runtime's CRI listing never shows it.
#[test]
fn a_container_is_named_from_the_runtimes_announcement_before_any_listing() {
    const TEST: &str = "a_container_is_named_from_the_runtimes_announcement_before_any_listing";
    if !require::root(TEST) {
        return;
    }
    let Some(unified) = require::unified(TEST) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A CRI that answers, and lists nothing.
    let cri = FakeCri::start(dir.path().join("cri.sock"), Vec::new()).unwrap();
    let runtime = FakeRuntime::listen(dir.path());
    let scope = format!("tally-nri-{}", random_hex(8));
    // The agent's root exists first; the container's cgroup comes after the announcement, as
    // the runtime creates it after CreateContainer.
    std::fs::create_dir_all(unified.join(&scope)).unwrap();
    let agent = Agent::start(&format!(
        "[agent]\ntick_interval_ms = 200\n[paths]\ncgroup_root = \"{}\"\n[cri]\nendpoints = [\"{}\"]\n\
         [enforcement]\nstate_dir = \"{}\"\n[admission]\nnri_socket = \"{}\"\n",
        unified.join(&scope).display(),
        cri.socket().display(),
        dir.path().join("state").display(),
        runtime.socket.display(),
    ));
    let mut session = runtime.accept(Duration::from_secs(20));
    let (uid, id) = (random_uid(), random_hex(64));
    assert_eq!(
        session.create_container_with_id("team-n", "named-by-nri", &id, &[("team", "n")]),
        Answer::Admitted(None)
    );
    // No budgets: the verdict is current all the same (admit, not unknown).
    let text = agent.scrape_until(Duration::from_secs(5), "the decision counted", |t| {
        sample(t, "tally_admission_decision_seconds_count", &[]) == Some(1.0)
    });
    assert_eq!(decision(&text, "admit"), Some(1.0));
    assert_eq!(decision(&text, "unknown"), Some(0.0));
    let rel = format!(
        "/{scope}/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{id}.scope",
        uid.replace('-', "_")
    );
    let mut container = TestCgroup::create(std::slice::from_ref(&unified), &rel);
    container.spawn("exec sleep 600");
    let id_label = format!("container_id=\"{id}\"");
    let text = agent.scrape_until(Duration::from_secs(10), "the container's row", |t| {
        sample(t, "tally_workload_cpu_seconds_total", &[&id_label]).is_some()
    });
    let row = text
        .lines()
        .find(|l| l.starts_with("tally_workload_cpu_seconds_total{") && l.contains(&id_label))
        .unwrap();
    assert!(
        row.contains(&format!(
            "namespace=\"team-n\",pod=\"named-by-nri\",pod_uid=\"{uid}\",container=\"main\""
        )),
        "{row}"
    );
    // The runtime's listing never had it: the names are NRI's.
    assert!(cri.list_containers_calls() >= 1);
    drop(agent);
    drop(container);
    remove_parents(std::slice::from_ref(&unified), &rel, 5);
}
