//! Pods made through containerd's real CRI, as the kubelet makes them (systemd cgroup driver):
//! the agent names them from the runtime and meters them as the host suite requires, on pure
//! cgroup v2; a container that exits keeps its final values for the grace period.

use std::path::Path;
use std::time::Duration;

use tally_tests::agent::{sample, time_scale, Agent};
use tally_tests::cri_client::{CriClient, Qos};

use crate::{cpu_seconds, on_the_node, wait_for};

const CONTAINERD: &str = "/run/containerd/containerd.sock";
const MIB: f64 = 1024.0 * 1024.0;

fn config() -> String {
    format!("[cri]\nendpoints = [\"{CONTAINERD}\"]\n[gpu]\npod_resources_socket = \"\"\n")
}

fn memory_current(cgroup: &Path) -> f64 {
    std::fs::read_to_string(cgroup.join("memory.current"))
        .expect("memory.current")
        .trim()
        .parse()
        .expect("number")
}

#[test]
fn vm_cri_pods_are_named_and_metered_and_an_exited_container_keeps_its_values() {
    const TEST: &str = "vm_cri_pods_are_named_and_metered_and_an_exited_container_keeps_its_values";
    on_the_node(TEST);
    let cri = CriClient::connect(Path::new(CONTAINERD)).expect("containerd's CRI");
    let pod = cri
        .run_pod("tally-vm", "metered", Qos::Burstable)
        .expect("RunPodSandbox");
    let busy = pod
        .create_container(
            "busy",
            "tally.test/busybox:1",
            &["sh", "-c", "while :; do :; done"],
        )
        .expect("busy container");
    // 32 MiB written and flushed, then idle: the container's final disk figure is known.
    let writer = pod
        .create_container(
            "writer",
            "tally.test/busybox:1",
            &[
                "sh",
                "-c",
                "dd if=/dev/zero of=/data bs=1048576 count=32 conv=fsync && sleep 3600",
            ],
        )
        .expect("writer container");
    let busy_cgroup = pod.container_cgroup_path(busy.as_str());
    assert!(
        busy_cgroup.is_dir(),
        "{} (systemd cgroup driver)",
        busy_cgroup.display()
    );

    let agent = Agent::start(&config());
    let uid = pod.uid().to_owned();
    let series = |container: &str| {
        vec![
            "namespace=\"tally-vm\"".to_owned(),
            "pod=\"metered\"".to_owned(),
            format!("pod_uid=\"{uid}\""),
            format!("container=\"{container}\""),
        ]
    };
    let value = |text: &str, family: &str, container: &str| {
        let needles = series(container);
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        sample(text, family, &needles)
    };

    // Named from containerd: namespace, pod, uid and container name, for both containers.
    agent.scrape_until(Duration::from_secs(60), "both containers named", |t| {
        value(t, "tally_workload_cpu_seconds_total", "busy").is_some()
            && value(t, "tally_workload_disk_write_bytes_total", "writer")
                .is_some_and(|v| v >= 32.0 * MIB)
    });

    // CPU: what the agent exports is the cgroup's reading at its last tick: at most what the
    // cgroup reads after the scrape, and at least what it read before less one tick of one core
    // (the burner's) under the emulator's time scale (a 1 s tick lagged 1.6 s here once).
    let lag = time_scale();
    let before = cpu_seconds(&busy_cgroup);
    let text = agent.scrape();
    let after = cpu_seconds(&busy_cgroup);
    let cpu = value(&text, "tally_workload_cpu_seconds_total", "busy").expect("busy cpu");
    eprintln!("busy: agent {cpu:.3} s, cgroup {before:.3}..{after:.3} s");
    assert!(
        cpu <= after && cpu >= before - lag,
        "{cpu} not in {before}-{lag}..{after}"
    );

    // Memory: the cgroup's memory.current, within a page cache's breath.
    let memory = value(&text, "tally_workload_memory_bytes", "busy").expect("busy memory");
    let current = memory_current(&busy_cgroup);
    assert!(
        (memory - current).abs() <= 1.0 * MIB,
        "{memory} vs {current}"
    );

    // Disk: the 32 MiB the writer flushed, plus at most 1 MiB of file system metadata.
    let written =
        value(&text, "tally_workload_disk_write_bytes_total", "writer").expect("writer disk bytes");
    eprintln!("writer: {written} bytes written");
    assert!(
        (32.0 * MIB..=33.0 * MIB).contains(&written),
        "{written} bytes for 32 MiB"
    );

    // The writer exits (StopContainer, its cgroup removed): its series stay, final values
    // unchanged, for the grace period.
    pod.remove_container(&writer).expect("remove writer");
    let writer_cgroup = pod.container_cgroup_path(writer.as_str());
    wait_for(Duration::from_secs(30), "the writer's cgroup to go", || {
        (!writer_cgroup.exists()).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    let text = agent.scrape();
    assert_eq!(
        value(&text, "tally_workload_disk_write_bytes_total", "writer"),
        Some(written)
    );
    let needles = series("writer");
    let mut needles: Vec<&str> = needles.iter().map(String::as_str).collect();
    needles.push("state=\"exited\"");
    assert_eq!(sample(&text, "tally_workload_info", &needles), Some(1.0));
}
