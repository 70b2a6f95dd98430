//! An inference server in a pod made through containerd's real CRI, found and charged by the
//! agent running under the `.deb`'s systemd unit: its capability set (reading another user's
//! sockets needs CAP_SYS_PTRACE) and `RestrictNamespaces=net` (joining the server's network
//! namespace) are the ones production runs with.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tally_tests::agent::{http_get, sample};
use tally_tests::cri_client::{CriClient, Qos};
use tally_tests::fake_engine::{vllm_body, write_body};

use crate::{on_the_node, payload, property, run_ok, wait_for};

const CONTAINERD: &str = "/run/containerd/containerd.sock";
const PORT: u16 = 9811;
const FAKE_ENGINE: &str = env!("CARGO_BIN_EXE_fake-engine");

#[test]
fn vm_an_inference_server_in_a_cri_pod_is_found_and_charged_under_the_unit() {
    const TEST: &str = "vm_an_inference_server_in_a_cri_pod_is_found_and_charged_under_the_unit";
    on_the_node(TEST);
    let cri = CriClient::connect(Path::new(CONTAINERD)).expect("containerd's CRI");
    let pod = cri
        .run_pod("tally-vm", "llm", Qos::Burstable)
        .expect("RunPodSandbox");
    let container = pod
        .create_container("server", "tally.test/busybox:1", &["sleep", "3600"])
        .expect("server container");
    let procs = pod
        .container_cgroup_path(container.as_str())
        .join("cgroup.procs");

    // The server: vLLM's format, as `nobody`, bound to loopback in a network namespace of its
    // own, in the container's cgroup from its first instruction.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let body = dir.path().join("vllm.prom");
    write_body(&body, &vllm_body(&[("org/chat", 1234.0, 56.0, 78.0, 0.5)]));
    std::fs::set_permissions(&body, std::fs::Permissions::from_mode(0o644)).unwrap();
    let ready = dir.path().join("ready");
    let script = format!(
        "ip link set lo up && exec setpriv --reuid=65534 --regid=65534 --clear-groups \
         env FAKE_ENGINE_BODY='{}' FAKE_ENGINE_READY='{}' \
         bash -c \"exec -a vllm '{FAKE_ENGINE}' serve org/chat --port 8000\"",
        body.display(),
        ready.display()
    );
    let mut command = Command::new("unshare");
    command
        .args(["--net", "bash", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let procs_path = procs.clone();
    // SAFETY: the closure only writes a file whose path was built beforehand.
    unsafe {
        command.pre_exec(move || std::fs::write(&procs_path, b"0"));
    }
    let mut server = command.spawn().expect("start the server");
    wait_for(Duration::from_secs(30), "the server to listen", || {
        ready.exists().then_some(())
    });

    // The agent as the package runs it.
    run_ok(Command::new("dpkg").arg("--install").arg(payload("deb")));
    std::fs::write(
        "/etc/tally/tally.toml",
        format!(
            "[cri]\nendpoints = [\"{CONTAINERD}\"]\n[gpu]\npod_resources_socket = \"\"\n[inference]\ninterval_secs = 1\n"
        ),
    )
    .unwrap();
    run_ok(Command::new("systemctl").args(["restart", "tally"]));
    assert_eq!(property("tally", "ActiveState"), "active");

    let uid = pod.uid().to_owned();
    let labels = [
        "namespace=\"tally-vm\"".to_owned(),
        "pod=\"llm\"".to_owned(),
        format!("pod_uid=\"{uid}\""),
        "container=\"server\"".to_owned(),
        "engine=\"vllm\"".to_owned(),
        "model=\"org/chat\"".to_owned(),
    ];
    let tokens = |text: &str, kind: &str| {
        let mut needles: Vec<&str> = labels.iter().map(String::as_str).collect();
        let kind = format!("kind=\"{kind}\"");
        needles.push(&kind);
        sample(text, "tally_workload_tokens_total", &needles)
    };
    let scrape = || {
        http_get(PORT, "/metrics", &[])
            .ok()
            .and_then(|r| String::from_utf8(r.body).ok())
    };
    // The server started before the agent: counted from the agent's start (0), then what it
    // counts after.
    wait_for(Duration::from_secs(120), "the server's tokens", || {
        scrape().filter(|t| tokens(t, "prompt") == Some(0.0))
    });
    write_body(
        &body,
        &vllm_body(&[("org/chat", 2234.0, 156.0, 578.0, 0.75)]),
    );
    let text = wait_for(Duration::from_secs(30), "the tokens counted since", || {
        scrape().filter(|t| tokens(t, "generation") == Some(100.0))
    });
    assert_eq!(tokens(&text, "prompt"), Some(1000.0), "{text}");
    assert_eq!(tokens(&text, "cached"), Some(500.0), "{text}");
    let needles: Vec<&str> = labels.iter().map(String::as_str).collect();
    assert_eq!(
        sample(&text, "tally_workload_kv_cache_usage_ratio", &needles),
        Some(0.75)
    );
    assert_eq!(
        sample(
            &text,
            "tally_collector_errors_total",
            &["collector=\"inference\""]
        ),
        None,
        "{text}"
    );

    run_ok(Command::new("dpkg").args(["--purge", "tally"]));
    let _ = server.kill();
    let _ = server.wait();
    drop(pod);
}
