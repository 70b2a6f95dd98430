//! Admission at the door of a real containerd (1.7, NRI enabled): the agent registers as an NRI
//! plugin; a pod of a tenant whose `deny` budget is spent fails CreateContainer with Tally's
//! message in the CRI error; another tenant's pod starts; a `throttle` budget's container starts
//! with the `cpu.max` Tally chose; and with the agent killed, the runtime creates containers
//! without asking (containerd 1.7 cannot make a plugin mandatory: it fails open).

use std::path::Path;
use std::time::Duration;

use tally_tests::agent::{sample, Agent};
use tally_tests::cri_client::{CriClient, PodHandle, Qos};

use crate::on_the_node;

const CONTAINERD: &str = "/run/containerd/containerd.sock";
const NRI: &str = "/var/run/nri/nri.sock";

/// A shared budget over the `main` containers of a namespace's pods (not their sandboxes, so a
/// throttle's cores are shared by the containers alone).
fn budget(name: &str, namespace: &str, body: &str) -> String {
    format!(
        "[[budget]]\nname = \"{name}\"\nresource = \"cpu_seconds\"\nlimit = 1.0\nwindow = \"120s\"\nshared = true\n{body}select.namespace = \"{namespace}\"\nselect.container = \"main\"\n"
    )
}

fn burner(cri: &CriClient, namespace: &str, name: &str) -> PodHandle {
    let pod = cri
        .run_pod(namespace, name, Qos::BestEffort)
        .expect("RunPodSandbox");
    pod.create_container(
        "main",
        "tally.test/busybox:1",
        &["sh", "-c", "while :; do :; done"],
    )
    .expect("CreateContainer");
    pod
}

fn spent(text: &str, budget: &str) -> bool {
    sample(
        text,
        "tally_budget_usage_ratio",
        &[&format!("budget=\"{budget}\"")],
    )
    .is_some_and(|r| r >= 1.0)
}

#[test]
fn vm_nri_refuses_a_spent_tenants_container_starts_a_throttled_one_and_fails_open() {
    on_the_node("vm_nri_refuses_a_spent_tenants_container_starts_a_throttled_one_and_fails_open");
    assert!(Path::new(NRI).exists(), "containerd's NRI socket {NRI}");
    let cri = CriClient::connect(Path::new(CONTAINERD)).expect("containerd's CRI");
    let state = tempfile::tempdir().unwrap();
    let config = format!(
        "[cri]\nendpoints = [\"{CONTAINERD}\"]\n[gpu]\npod_resources_socket = \"\"\n[enforcement]\nstate_dir = \"{}\"\n\
         [admission]\nnri_socket = \"{NRI}\"\n{}{}",
        state.path().display(),
        budget("door", "tenant-spent", "admission = \"deny\"\naction = \"alert\"\n"),
        budget(
            "slow",
            "tenant-slow",
            "admission = \"throttle\"\naction = \"cpu\"\nthrottle = { cpu_cores = 0.4 }\n"
        ),
    );
    let mut agent = Agent::start(&config);
    agent.scrape_until(Duration::from_secs(30), "registered with containerd", |t| {
        sample(t, "tally_admission_nri_connected", &[]) == Some(1.0)
    });
    assert!(
        agent.log().contains("runtime=containerd"),
        "{}",
        agent.log()
    );
    let spender = burner(&cri, "tenant-spent", "spender");
    let slow = burner(&cri, "tenant-slow", "slow-0");
    agent.scrape_until(Duration::from_secs(60), "both budgets spent", |t| {
        spent(t, "door") && spent(t, "slow")
    });

    // The spent tenant's new container is refused, with Tally's reason in the CRI error.
    let refused = cri
        .run_pod("tenant-spent", "refused", Qos::BestEffort)
        .expect("RunPodSandbox (the sandbox is not a container NRI asks about)");
    let error = refused
        .create_container("main", "tally.test/busybox:1", &["sleep", "600"])
        .expect_err("created under a spent deny budget");
    let text = format!("{error:#}");
    eprintln!("CreateContainer refused: {text}");
    assert!(
        text.contains("tally: budget door is spent (")
            && text.contains(" cpu_seconds of 1); it releases in about "),
        "{text}"
    );
    assert!(
        text.contains("PermissionDenied")
            || text.contains("code = 7")
            || text.contains("permission"),
        "{text}"
    );
    // Another tenant's pod starts.
    let other = cri
        .run_pod("tenant-other", "other", Qos::BestEffort)
        .expect("RunPodSandbox");
    let other_id = other
        .create_container("main", "tally.test/busybox:1", &["sleep", "600"])
        .expect("another tenant's container");
    // The throttled tenant's new container starts under its share of 0.4 cores: with the one
    // running container, 0.2 (the tick then splits the budget the same way between the two).
    let throttled = cri
        .run_pod("tenant-slow", "slow-1", Qos::BestEffort)
        .expect("RunPodSandbox");
    let id = throttled
        .create_container("main", "tally.test/busybox:1", &["sleep", "600"])
        .expect("a throttled tenant's container");
    let cpu_max =
        std::fs::read_to_string(throttled.container_cgroup_path(id.as_str()).join("cpu.max"))
            .unwrap();
    assert_eq!(cpu_max.trim(), "20000 100000");
    let text = agent.scrape();
    for (budget, decision) in [("door", "deny"), ("slow", "throttle")] {
        assert_eq!(
            sample(
                &text,
                "tally_admission_decisions_total",
                &[
                    &format!("budget=\"{budget}\""),
                    &format!("decision=\"{decision}\"")
                ]
            ),
            Some(1.0),
            "{budget} {decision}"
        );
    }
    let p99_bound = sample(
        &text,
        "tally_admission_decision_seconds_bucket",
        &["le=\"0.001\""],
    );
    let count = sample(&text, "tally_admission_decision_seconds_count", &[]);
    eprintln!("decisions within 1 ms: {p99_bound:?} of {count:?}");
    assert_eq!(
        sample(
            &text,
            "tally_admission_nri_decisions_total",
            &["decision=\"deny\""]
        ),
        Some(1.0)
    );

    // The agent killed: containerd drops the plugin and admits without asking.
    agent.signal(libc::SIGKILL);
    agent.wait_exit(Duration::from_secs(10));
    let open = cri
        .run_pod("tenant-spent", "fail-open", Qos::BestEffort)
        .expect("RunPodSandbox");
    open.create_container("main", "tally.test/busybox:1", &["sleep", "600"])
        .expect("containerd 1.7 fails open without the plugin");
    drop((spender, slow, refused, other, throttled, open));
    let _ = other_id;
}
