use std::fs;
use std::path::{Path, PathBuf};

use super::host::*;
use super::mounts::*;
use super::privileges::*;
use super::*;
use tally_gpu::{LibraryStatus, MigProcesses};

/// A fixture node: `proc/`, `sys/`, `cgroup/` under one temp dir.
struct Node {
    dir: tempfile::TempDir,
    config: Config,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.paths.proc_root = dir.path().join("proc");
        config.paths.sys_root = dir.path().join("sys");
        config.paths.cgroup_root = dir.path().join("cgroup");
        config.gpu.nvml_library = Some(dir.path().join("no/libnvidia-ml.so.1"));
        config.cri.endpoints = vec![dir.path().join("run/containerd.sock")];
        config.ebpf.enabled = false;
        // Fixture RDMA devices have no RDMA netlink behind them; tests that want it set it.
        config.rdma.netlink = false;
        fs::create_dir_all(dir.path().join("proc")).unwrap();
        Node { dir, config }
    }

    fn write(&self, relative: &str, contents: &[u8]) {
        let path = self.dir.path().join(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
    }

    fn path(&self, relative: &str) -> String {
        self.dir.path().join(relative).display().to_string()
    }

    /// Everything a healthy node has except cgroups and mountinfo.
    fn common(&self, cap_eff: &str) {
        self.write("proc/sys/kernel/osrelease", b"6.8.0-45-generic\n");
        self.write(
            "proc/self/status",
            format!("Name:\ttally\nUid:\t0\t0\t0\t0\nCapEff:\t{cap_eff}\n").as_bytes(),
        );
        self.write("proc/1/cgroup", b"0::/init.scope\n");
        fs::create_dir_all(self.dir.path().join("sys/class/infiniband/mlx5_0")).unwrap();
    }

    fn mountinfo(&self, cgroup_lines: &str) {
        let text = format!(
            "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
             {cgroup_lines}\
             50 23 0:40 / /sys/fs/bpf rw,relatime shared:9 - bpf bpf rw,mode=700\n\
             51 23 0:12 / /sys/kernel/tracing rw,relatime - tracefs tracefs rw\n"
        );
        self.write("proc/self/mountinfo", text.as_bytes());
    }

    fn item(report: &Report, name: &str) -> Item {
        report
            .items
            .iter()
            .find(|i| i.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no item {name} in {report:?}"))
    }
}

const ALL_CAPS: &str = "000001ffffffffff";

#[test]
fn full_v2_fixture_is_ready() {
    let node = Node::new();
    node.common(ALL_CAPS);
    node.write("cgroup/cgroup.controllers", b"cpuset cpu io memory pids\n");
    node.mountinfo(&format!(
        "31 23 0:28 / {} rw,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n",
        node.path("cgroup")
    ));
    node.write("sys/kernel/btf/vmlinux", b"\x9f\xeb\x01\x00");
    let socket = node.dir.path().join("run/containerd.sock");
    fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();

    let report = gather(&node.config);
    assert_eq!(report.exit_code(), 0, "{}", report.render_text());
    assert_eq!(report.verdict(), "ready");
    for item in &report.items {
        let expected = match item.name {
            "bpf network" | "bpf tcp" | "bpf disk" => Status::NotChecked,
            // No budgets in the fixture's configuration.
            "enforcement" | "cluster budgets" | "admission (NRI)" => Status::NotChecked,
            "nvml" => Status::Absent,
            _ => Status::Ok,
        };
        assert_eq!(item.status, expected, "{item:?}");
    }
    let mode = Node::item(&report, "cgroup mode");
    assert!(mode.detail.starts_with("v2: "), "{mode:?}");
    assert!(mode
        .detail
        .contains("controllers: cpuset cpu io memory pids"));
    let mounts = Node::item(&report, "cgroup mounts");
    assert_eq!(
        mounts.detail,
        format!("cgroup2 {} (nsdelegate)", node.path("cgroup"))
    );
    assert!(Node::item(&report, "rdma")
        .detail
        .starts_with("mlx5_0 (0 ports); per-process counters off"));
    assert_eq!(
        Node::item(&report, "bpffs").detail,
        "mounted at /sys/fs/bpf"
    );
    assert!(Node::item(&report, "btf").detail.contains("(4 bytes)"));
    let privileges = Node::item(&report, "privileges").detail;
    assert!(privileges.starts_with("euid 0; have CAP_SYS_ADMIN CAP_BPF"));
    assert!(!privileges.contains("lack"), "{privileges}");
    assert!(Node::item(&report, "process cgroups")
        .detail
        .ends_with("1/cgroup (1 hierarchies)"));
    assert!(Node::item(&report, "cri socket")
        .detail
        .starts_with("socket "));
}

#[test]
fn hybrid_fixture_without_btf_is_degraded() {
    let node = Node::new();
    node.common(ALL_CAPS);
    node.write("cgroup/unified/cgroup.controllers", b"");
    for controller in ["cpu,cpuacct", "memory", "blkio"] {
        node.write(&format!("cgroup/{controller}/cgroup.procs"), b"1\n");
    }
    node.mountinfo(&format!(
        "32 31 0:29 / {0}/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n\
         33 31 0:30 / {0}/memory rw,relatime - cgroup cgroup rw,memory\n\
         34 31 0:31 / {0}/blkio rw,relatime - cgroup cgroup rw,blkio\n\
         35 31 0:38 / {0}/unified rw,relatime - cgroup2 cgroup2 rw\n",
        node.path("cgroup")
    ));
    // No CRI socket either: absent, which does not lower the verdict.

    let report = gather(&node.config);
    assert_eq!(report.exit_code(), 1, "{}", report.render_text());
    assert_eq!(report.verdict(), "degraded: btf");
    let btf = Node::item(&report, "btf");
    assert_eq!(btf.status, Status::Degraded);
    assert!(btf.detail.contains(&node.path("sys/kernel/btf/vmlinux")));
    let mode = Node::item(&report, "cgroup mode");
    assert_eq!(mode.status, Status::Ok, "{mode:?}");
    assert!(mode.detail.starts_with("hybrid: unified "), "{mode:?}");
    let mounts = Node::item(&report, "cgroup mounts").detail;
    assert!(mounts.contains("/cpu,cpuacct (cpu,cpuacct)"), "{mounts}");
    assert!(mounts.ends_with("/unified"), "{mounts}");
    assert_eq!(Node::item(&report, "cri socket").status, Status::Absent);
}

#[test]
fn root_without_cgroups_cannot_run() {
    let node = Node::new();
    node.common(ALL_CAPS);
    node.mountinfo("");
    fs::create_dir_all(node.dir.path().join("cgroup")).unwrap();

    let report = gather(&node.config);
    assert_eq!(report.exit_code(), 2, "{}", report.render_text());
    assert_eq!(report.verdict(), "cannot run: cgroup mode");
    let mode = Node::item(&report, "cgroup mode");
    assert_eq!(mode.status, Status::Failed);
    assert!(mode.detail.contains(&node.path("cgroup")), "{mode:?}");
    assert_eq!(Node::item(&report, "cgroup mounts").status, Status::Absent);
}

#[test]
fn an_empty_proc_root_cannot_run() {
    let node = Node::new();
    node.write("cgroup/cgroup.controllers", b"cpu io memory\n");

    let report = gather(&node.config);
    assert_eq!(report.exit_code(), 2);
    assert_eq!(Node::item(&report, "kernel").status, Status::Failed);
    assert_eq!(
        Node::item(&report, "process cgroups").status,
        Status::Failed
    );
    assert_eq!(Node::item(&report, "privileges").status, Status::Degraded);
    assert!(Node::item(&report, "bpffs")
        .detail
        .contains(&node.path("proc/self/mountinfo")));
}

#[test]
fn only_our_own_process_visible_cannot_run() {
    let node = Node::new();
    node.write("proc/42/cgroup", b"0::/tally\n");
    // procfs's `self` is a link to our pid; ours is the only process this procfs shows.
    std::os::unix::fs::symlink("42", node.dir.path().join("proc/self")).unwrap();
    let item = process_cgroups_item(&node.config.paths.proc_root);
    assert_eq!(item.status, Status::Failed, "{item:?}");
    assert!(item.detail.contains("no other process visible"), "{item:?}");

    node.write("proc/7/cgroup", b"garbage\n");
    let item = process_cgroups_item(&node.config.paths.proc_root);
    assert_eq!(item.status, Status::Failed, "{item:?}");
    assert!(
        item.detail.contains(&node.path("proc/7/cgroup")),
        "{item:?}"
    );

    node.write("proc/7/cgroup", b"4:memory:/user.slice\n0::/user.slice\n");
    let item = process_cgroups_item(&node.config.paths.proc_root);
    assert_eq!(item.status, Status::Ok, "{item:?}");
    assert!(item.detail.ends_with("(2 hierarchies)"), "{item:?}");
}

#[test]
fn garbage_mountinfo_and_status_do_not_panic() {
    let garbage: [&[u8]; 6] = [
        b"",
        b"-\n- - - - - -\n\\\\\\\n",
        b"1 2 3 4 \\777\\ 6 - \n99999999999999999999 2 3 4 /x 6 -\n",
        b"\xff\xfe\x00binary",
        b"CapEff:\tzzzz\nUid:\tx\nCapEff:\n",
        b"Uid:\nCapEff:\t1ffffffffffffffffffffffff\n",
    ];
    for contents in garbage {
        let node = Node::new();
        node.common(ALL_CAPS);
        node.write("cgroup/cgroup.controllers", contents);
        node.write("proc/self/mountinfo", contents);
        node.write("proc/self/status", contents);
        node.write("proc/1/cgroup", contents);
        node.write("proc/sys/kernel/osrelease", contents);
        node.write("sys/kernel/btf/vmlinux", contents);

        let report = gather(&node.config);
        let text = report.render_text();
        assert!(report.exit_code() >= 1, "{text}");
        let mounts = Node::item(&report, "cgroup mounts");
        assert_eq!(mounts.status, Status::Degraded, "{text}");
        assert!(
            mounts.detail.contains(&node.path("proc/self/mountinfo")),
            "{text}"
        );
        let privileges = Node::item(&report, "privileges");
        assert_eq!(privileges.status, Status::Degraded, "{text}");
        assert!(
            privileges.detail.contains(&node.path("proc/self/status")),
            "{text}"
        );
    }
}

#[test]
fn a_few_bad_mountinfo_lines_are_skipped_and_counted() {
    let text = "garbage\n\
                40 31 0:37 / /sys/fs/cgroup/with\\040space rw - cgroup cgroup rw,name=systemd\n\
                41 31 0:38 / /b rw - cgroup2\n";
    let (mounts, skipped) = parse_mountinfo(text);
    assert_eq!(skipped, 1);
    assert_eq!(mounts[0].point, PathBuf::from("/sys/fs/cgroup/with space"));
    assert_eq!(mounts[0].super_options, "rw,name=systemd");
    assert_eq!(mounts[1].fs_type, "cgroup2");
    assert_eq!(mounts[1].super_options, "");
    assert_eq!(unescape_octal("a\\134b\\011"), "a\\b\t");
    assert_eq!(unescape_octal("trailing\\04"), "trailing\\04");
}

#[test]
fn missing_capabilities_degrade_ebpf() {
    let node = Node::new();
    node.common("0000000000000000");
    let item = privileges_item(&node.config.paths.proc_root, Some("6.8.0"));
    assert_eq!(item.status, Status::Degraded);
    assert!(item.detail.contains("no eBPF"), "{item:?}");
    assert!(
        item.detail.contains("lack CAP_SYS_ADMIN CAP_BPF"),
        "{item:?}"
    );

    // CAP_BPF + CAP_PERFMON without CAP_NET_ADMIN: tracing works, cgroup_skb does not.
    let bpf_perfmon = format!("{:016x}", (1u64 << CAP_BPF) | (1u64 << CAP_PERFMON));
    node.common(&bpf_perfmon);
    let item = privileges_item(&node.config.paths.proc_root, Some("6.8.0"));
    assert_eq!(item.status, Status::Degraded);
    assert!(item.detail.contains("cgroup_skb"), "{item:?}");

    // Everything but CAP_SYS_RESOURCE, as on this project's VMs: fine from 5.11 on.
    let no_resource = format!("{:016x}", 0x1ff_ffff_ffffu64 & !(1u64 << CAP_SYS_RESOURCE));
    node.common(&no_resource);
    let item = privileges_item(&node.config.paths.proc_root, Some("6.18.44-fc"));
    assert_eq!(item.status, Status::Ok, "{item:?}");
    assert!(item.detail.ends_with("lack CAP_SYS_RESOURCE"), "{item:?}");
    let item = privileges_item(&node.config.paths.proc_root, Some("5.10.0"));
    assert_eq!(item.status, Status::Degraded, "{item:?}");
    assert!(item.detail.contains("RLIMIT_MEMLOCK"), "{item:?}");
}

#[test]
fn nvml_status_maps_to_item_status() {
    let ready = |devices| LibraryStatus::Ready {
        devices,
        driver_version: "550.54.15".into(),
    };
    assert_eq!(nvml_item(ready(8), &[]).status, Status::Ok);
    assert_eq!(
        nvml_item(ready(8), &[]).detail,
        "8 GPU(s), driver 550.54.15"
    );
    assert_eq!(nvml_item(ready(0), &[]).status, Status::Absent);
    let not_found = LibraryStatus::NotFound {
        detail: "libnvidia-ml.so.1: cannot open".into(),
    };
    assert_eq!(nvml_item(not_found, &[]).status, Status::Absent);
    let failed = LibraryStatus::Failed {
        detail: "driver/library version mismatch".into(),
    };
    assert_eq!(nvml_item(failed, &[]).status, Status::Degraded);
}

#[test]
fn the_nvml_item_says_how_mig_processes_are_listed() {
    let ready = LibraryStatus::Ready {
        devices: 2,
        driver_version: "550.54.15".into(),
    };
    let item = nvml_item(
        ready,
        &[
            ("GPU-a".into(), MigProcesses::GpuHandle),
            ("GPU-b".into(), MigProcesses::MigHandles),
        ],
    );
    assert_eq!(item.status, Status::Ok);
    assert_eq!(
        item.detail,
        "2 GPU(s), driver 550.54.15; GPU-a: MIG processes listed by the GPU handle; \
         GPU-b: MIG processes listed per MIG device (the GPU handle lists none: no MIG \
         monitor capability, NVIDIA_MIG_MONITOR_DEVICES=all grants it)"
    );
}

#[test]
fn cri_endpoints_report_sockets_and_impostors() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(cri_item(&[]).status, Status::NotChecked);
    let file = dir.path().join("crio.sock");
    fs::write(&file, "").unwrap();
    let missing = dir.path().join("containerd.sock");
    let item = cri_item(&[missing.clone(), file.clone()]);
    assert_eq!(item.status, Status::Degraded, "{item:?}");
    assert!(
        item.detail.contains("crio.sock is not a socket"),
        "{item:?}"
    );
    let item = cri_item(std::slice::from_ref(&missing));
    assert_eq!(item.status, Status::Absent, "{item:?}");
}

#[test]
fn text_and_json_agree() {
    let report = Report {
        items: vec![
            Item::new("kernel", Status::Ok, "6.8.0"),
            Item::new("bpf programs", Status::NotChecked, "not yet"),
            Item::new("btf", Status::Degraded, "no vmlinux"),
            Item::new("tracefs", Status::Degraded, "not mounted"),
        ],
    };
    assert_eq!(report.exit_code(), 1);
    let text = report.render_text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "kernel        ok           6.8.0");
    assert_eq!(lines[1], "bpf programs  not_checked  not yet");
    assert_eq!(lines[4], "degraded: btf, tracefs");
    assert_eq!(lines.len(), 5);

    let json = report.to_json();
    assert_eq!(json["verdict"], "degraded: btf, tracefs");
    assert_eq!(json["exit_code"], 1);
    assert_eq!(json["items"][1]["status"], "not_checked");
    assert_eq!(json["items"][2]["name"], "btf");
    assert_eq!(serde_json::to_value(&report).unwrap(), json);
}

/// This project's development and CI VMs are hybrid: v1 controllers under `/sys/fs/cgroup/*`,
/// cgroup2 at `/sys/fs/cgroup/unified` with no controllers. Elsewhere the test skips.
#[test]
fn this_machine_reports_its_cgroup_mode() {
    let config = Config::default();
    if !Path::new("/sys/fs/cgroup/unified/cgroup.controllers").is_file() {
        eprintln!("SKIPPED this_machine_reports_its_cgroup_mode: not a hybrid cgroup host");
        assert!(
            std::env::var("TALLY_TEST_STRICT").map_or(true, |v| v != "1"),
            "skipped under TALLY_TEST_STRICT=1"
        );
        return;
    }
    let report = gather(&config);
    eprintln!("{}", report.render_text());
    let mode = Node::item(&report, "cgroup mode");
    assert!(mode.detail.starts_with("hybrid: "), "{mode:?}");
    assert_eq!(Node::item(&report, "kernel").status, Status::Ok);
    assert_ne!(report.exit_code(), 2, "{}", report.render_text());
}

#[test]
fn rdma_without_netlink_is_port_counters_only() {
    let mut node = Node::new();
    node.write(
        "sys/class/infiniband/mlx5_0/ports/1/counters/port_xmit_data",
        b"1\n",
    );
    assert_eq!(rdma::rdma_item(&node.config).status, Status::Ok);

    node.config.rdma.netlink = true;
    node.config.rdma.netlink_socket = node.dir.path().join("no-nldev.sock");
    let item = rdma::rdma_item(&node.config);
    assert_eq!(item.status, Status::Degraded, "{item:?}");
    assert!(
        item.detail
            .starts_with("mlx5_0 (1 port); RDMA netlink (unix:"),
        "{item:?}"
    );
    assert!(item.detail.contains("unsupported"), "{item:?}");
    assert!(item
        .detail
        .ends_with("port counters only, no per-process attribution"));

    node.config.rdma.enabled = false;
    assert_eq!(rdma::rdma_item(&node.config).status, Status::NotChecked);
    let empty = Node::new();
    let item = rdma::rdma_item(&empty.config);
    assert_eq!(item.status, Status::Absent);
    assert!(
        item.detail.ends_with("does not exist: no RDMA devices"),
        "{item:?}"
    );
}

#[test]
fn a_budget_whose_actuator_the_node_lacks_is_degraded() {
    let mut node = Node::new();
    node.write("cgroup/cgroup.controllers", b"memory pids\n");
    node.write("cgroup/cgroup.subtree_control", b"memory pids\n");
    node.config.enforcement.state_dir = node.dir.path().join("state");
    node.config.budget = vec![toml::from_str(
        "name = 'cap'\nresource = 'cpu_seconds'\nlimit = 1.0\nwindow = '10s'\naction = 'cpu'",
    )
    .unwrap()];
    let item = Node::item(&gather(&node.config), "enforcement");
    assert_eq!(item.status, Status::Degraded, "{item:?}");
    assert!(
        item.detail.contains("budget `cap` needs `cpu`"),
        "{}",
        item.detail
    );
    assert!(item.detail.contains("state: "), "{}", item.detail);

    node.write("cgroup/cgroup.subtree_control", b"cpu memory pids\n");
    let item = Node::item(&gather(&node.config), "enforcement");
    assert_eq!(item.status, Status::Ok, "{item:?}");
    assert!(item.detail.contains("cpu: cpu.max"), "{}", item.detail);
    assert!(
        !node.config.enforcement.state_dir.exists(),
        "check writes nothing"
    );
}
