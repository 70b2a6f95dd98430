//! The agent as its DaemonSet runs it, in a containerd container: not privileged, its own cgroup
//! namespace, the node's pid namespace, the host's `/proc` and `/sys/fs/cgroup` mounted where
//! the manifest mounts them, and exactly the capabilities the manifest lists. From there it
//! charges another pod's (fake-NVML) GPU process and its RDMA QP counter (a fake RDMA node:
//! the `mlx5` sysfs fixture and an nldev responder) to that pod, not to the host row.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tally_rdma::netlink::consts::{mask, mode};
use tally_rdma::netlink::nldev::{CounterMode, DeviceInfo};
use tally_tests::agent::{free_port, http_get, sample, tally_bin};
use tally_tests::cri_client::proto::{Capability, ContainerConfig, Mount};
use tally_tests::cri_client::{CriClient, Qos};
use tally_tests::fake_nvml::{FakeNvml, FULL};
use tally_tests::fake_rdma::{FakeSysfs, Responder, Script, ScriptCounter};

use crate::{on_the_node, wait_for};

const CONTAINERD: &str = "/run/containerd/containerd.sock";
const GPU: &str = "GPU-11111111-2222-3333-4444-555555555555";
const MANIFEST: &str = "../packaging/kubernetes/base/daemonset.yaml";

/// The capabilities the DaemonSet adds (after dropping ALL), in the manifest's order.
fn manifest_capabilities() -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(MANIFEST))
        .expect("daemonset.yaml");
    let mut lines = text.lines().map(str::trim).filter(|l| !l.starts_with('#'));
    assert!(
        lines.any(|l| l == "capabilities:"),
        "no capabilities in {MANIFEST}"
    );
    assert_eq!(lines.next(), Some("drop: [\"ALL\"]"));
    assert_eq!(lines.next(), Some("add:"));
    lines
        .map_while(|l| l.strip_prefix("- "))
        .map(str::to_owned)
        .collect()
}

/// The capability numbers of linux/capability.h the manifest may name.
fn capability_bit(name: &str) -> u32 {
    let bits = [
        ("KILL", 5),
        ("NET_ADMIN", 12),
        ("SYS_PTRACE", 19),
        ("SYS_ADMIN", 21),
        ("PERFMON", 38),
        ("BPF", 39),
    ];
    let bit = bits.iter().find(|(n, _)| *n == name).map(|(_, b)| *b);
    assert!(bit.is_some(), "unknown capability {name}");
    bit.unwrap_or_default()
}

fn mount(host: &str, container: &str, readonly: bool) -> Mount {
    Mount {
        container_path: container.to_owned(),
        host_path: host.to_owned(),
        readonly,
    }
}

fn procs(cgroup: &Path) -> Vec<u32> {
    std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[test]
fn vm_the_agent_as_a_daemonset_pod_charges_other_pods_gpu_processes_to_them() {
    on_the_node("vm_the_agent_as_a_daemonset_pod_charges_other_pods_gpu_processes_to_them");
    let cri = CriClient::connect(Path::new(CONTAINERD)).expect("containerd's CRI");

    // A pod whose one process "uses the GPU".
    let user = cri
        .run_pod("tally-vm", "gpu-user", Qos::Burstable)
        .expect("gpu-user pod");
    let cuda = user
        .create_container("cuda", "tally.test/busybox:1", &["sleep", "3600"])
        .expect("cuda container");
    let cuda_cgroup = user.container_cgroup_path(cuda.as_str());
    let pid = wait_for(Duration::from_secs(30), "the cuda process", || {
        procs(&cuda_cgroup).first().copied()
    });
    let fake = FakeNvml::new(
        FULL,
        &json!({ "devices": [{
            "uuid": GPU,
            "name": "NVIDIA H100 80GB HBM3",
            "memory_total_bytes": 85899345920u64,
            "power_watts": 400,
            "energy_start_joules": 1000,
            "processes": [{ "pid": pid, "used_memory_bytes": 2_000_000_000u64, "sm_percent": 50 }]
        }] }),
    );

    // Its RDMA: a counter of its own on mlx5_0's port, already in auto mode by pid.
    let sysfs = FakeSysfs::new("mlx5");
    let per_dump = [1_000_000, 500_000, 10, 5];
    let rdma = Responder::start(Script {
        devices: vec![DeviceInfo {
            index: 1,
            name: "mlx5_0".into(),
            ports: 1,
        }],
        modes: vec![(
            (1, 1),
            CounterMode {
                mode: mode::AUTO,
                mask: mask::PID,
            },
        )],
        counters: vec![ScriptCounter {
            device_index: 1,
            port: 1,
            id: 1,
            pid: Some(pid),
            qps: vec![0x40],
            per_dump,
        }],
        qps: Vec::new(),
    });

    // The agent's pod, as packaging/kubernetes/base/daemonset.yaml shapes it.
    let port = free_port();
    let etc = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::write(
        etc.path().join("tally.toml"),
        format!(
            "[agent]\nlisten = \"127.0.0.1:{port}\"\ntick_interval_ms = 500\n[paths]\nproc_root = \"/host/proc\"\ncgroup_root = \"/host/sys/fs/cgroup\"\n[cri]\nendpoints = [\"{CONTAINERD}\"]\n[gpu]\nnvml_library = \"{}\"\npod_resources_socket = \"\"\n[enforcement]\nstate_dir = \"/var/lib/tally\"\n{}",
            fake.library.display(),
            rdma.config(false)
        )
        .replace("[paths]\n", &format!("[paths]\nsys_root = \"{}\"\n", sysfs.root().display())),
    )
    .unwrap();
    let capabilities = manifest_capabilities();
    assert_eq!(
        capabilities,
        [
            "BPF",
            "PERFMON",
            "NET_ADMIN",
            "SYS_ADMIN",
            "KILL",
            "SYS_PTRACE"
        ]
    );
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let tally = cri
        .run_host_pid_pod("tally-system", "tally-agent", Qos::Burstable)
        .expect("the agent's pod");
    let bin = tally_bin();
    let agent = tally
        .create_container_with(
            "tally",
            "tally.test/busybox:1",
            &[
                &bin.to_string_lossy(),
                "agent",
                "--config",
                "/etc/tally/tally.toml",
            ],
            |c: &mut ContainerConfig| {
                // The node's /usr (glibc, libsystemd) and the binary under test, read-only.
                c.mounts = vec![
                    mount("/usr", "/usr", true),
                    mount(&repo.to_string_lossy(), &repo.to_string_lossy(), true),
                    mount(
                        &fake.dir.path().to_string_lossy(),
                        &fake.dir.path().to_string_lossy(),
                        true,
                    ),
                    mount(&etc.path().to_string_lossy(), "/etc/tally", true),
                    mount(
                        &sysfs.root().to_string_lossy(),
                        &sysfs.root().to_string_lossy(),
                        true,
                    ),
                    mount(
                        &rdma.dir.path().to_string_lossy(),
                        &rdma.dir.path().to_string_lossy(),
                        false,
                    ),
                    mount(&state.path().to_string_lossy(), "/var/lib/tally", false),
                    mount("/proc", "/host/proc", true),
                    mount("/sys/fs/cgroup", "/host/sys/fs/cgroup", false),
                    mount("/sys/kernel/tracing", "/sys/kernel/tracing", true),
                    mount("/sys/fs/bpf", "/sys/fs/bpf", true),
                    mount("/run/containerd", "/run/containerd", true),
                ];
                let security = c
                    .linux
                    .as_mut()
                    .and_then(|l| l.security_context.as_mut())
                    .expect("security context");
                security.privileged = false;
                security.capabilities = Some(Capability {
                    add_capabilities: capabilities.clone(),
                    drop_capabilities: vec!["ALL".to_owned()],
                });
            },
        )
        .expect("the agent's container");
    let agent_cgroup = tally.container_cgroup_path(agent.as_str());
    let agent_pid = wait_for(Duration::from_secs(30), "the agent's process", || {
        procs(&agent_cgroup).first().copied()
    });

    // Its shape: exactly the manifest's capabilities, its own cgroup namespace rooted at its
    // container, the node's pid namespace.
    let status = std::fs::read_to_string(format!("/proc/{agent_pid}/status")).unwrap();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap());
    let want = capabilities
        .iter()
        .fold(0u64, |m, c| m | 1 << capability_bit(c));
    assert_eq!(effective, Some(want), "{status}");
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/cgroup")).unwrap();
    assert_ne!(
        ns(&agent_pid.to_string()),
        ns("1"),
        "no cgroup namespace of its own"
    );
    // Read from here (the host's namespace): the container's own cgroup.
    let rel = agent_cgroup.strip_prefix("/sys/fs/cgroup").unwrap();
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{agent_pid}/cgroup")).unwrap(),
        format!("0::/{}\n", rel.display())
    );

    let scrape = || {
        http_get(port, "/metrics", &[])
            .ok()
            .filter(|r| r.status == 200)
            .and_then(|r| String::from_utf8(r.body).ok())
    };
    let pod = [
        "namespace=\"tally-vm\"",
        "pod=\"gpu-user\"",
        "container=\"cuda\"",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let mut last = None;
    let text = loop {
        let now = scrape();
        if let Some(t) = now.as_ref().filter(|t| {
            sample(t, "tally_workload_gpu_seconds_total", &pod).is_some_and(|s| s >= 1.0)
        }) {
            break t.clone();
        }
        last = now.or(last);
        let log = Path::new(&tally.config().log_directory).join("tally/0.log");
        assert!(
            std::time::Instant::now() < deadline,
            "no GPU time for the pod within 180 s; the agent's log:\n{}\nlast scrape:\n{}",
            std::fs::read_to_string(&log).unwrap_or_else(|e| format!("{}: {e}", log.display())),
            last.as_deref().unwrap_or("(none)")
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(
        sample(&text, "tally_workload_gpu_memory_bytes", &pod),
        Some(2e9)
    );
    let host = sample(
        &text,
        "tally_workload_gpu_seconds_total",
        &["namespace=\"\",pod=\"\",pod_uid=\"\",container=\"\",container_id=\"\",unit=\"\""],
    );
    assert!(
        host.is_none() || host == Some(0.0),
        "{host:?} s charged to the host row:\n{text}"
    );
    // The pod's RDMA: its process's QP counter, read through the responder from the agent's
    // container, charged to the pod. Once the dumps stop advancing, exactly n dumps' worth.
    let frozen = rdma.freeze()[&1] as f64;
    assert!(frozen >= 1.0, "no counter dump in the agent's first ticks");
    let rdma_pod = [
        "namespace=\"tally-vm\"",
        "pod=\"gpu-user\"",
        "container=\"cuda\"",
        "device=\"mlx5_0\",port=\"1\",method=\"qp_counter\"",
    ];
    let text = wait_for(Duration::from_secs(30), "the pod's RDMA bytes", || {
        scrape().filter(|t| {
            sample(t, "tally_workload_rdma_transmit_bytes_total", &rdma_pod)
                == Some(frozen * per_dump[0] as f64)
        })
    });
    assert_eq!(
        sample(&text, "tally_workload_rdma_receive_bytes_total", &rdma_pod),
        Some(frozen * per_dump[1] as f64)
    );
    let host_rdma = sample(
        &text,
        "tally_workload_rdma_transmit_bytes_total",
        &["namespace=\"\",pod=\"\",pod_uid=\"\",container=\"\",container_id=\"\",unit=\"\""],
    );
    assert!(
        host_rdma.is_none() || host_rdma == Some(0.0),
        "{host_rdma:?} RDMA bytes charged to the host row:\n{text}"
    );
    // Every eBPF probe loads with only these capabilities, the cgroup iterator too.
    for probe in ["network", "tcp", "disk", "lifecycle", "cgroup_iterator"] {
        let up = text
            .lines()
            .find(|l| l.starts_with(&format!("tally_probe_up{{probe=\"{probe}\"")));
        assert!(up.is_some_and(|l| l.ends_with(" 1")), "{probe}: {up:?}");
    }
    drop((tally, user, fake, rdma, sysfs));
}
