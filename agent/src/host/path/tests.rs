use super::*;

const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const UID: &str = "8d1f7c2e-4b5a-4c3d-9e8f-0a1b2c3d4e5f";
const UID_: &str = "8d1f7c2e_4b5a_4c3d_9e8f_0a1b2c3d4e5f";
const STATIC_UID: &str = "3a5b7c9d1e2f3a4b5c6d7e8f9a0b1c2d";

fn container(uid: Option<&str>, runtime: Runtime, qos: Option<QosClass>) -> PathIdentity {
    PathIdentity::Container(ContainerRef {
        pod_uid: uid.map(str::to_owned),
        container_id: ID.to_owned(),
        runtime,
        qos,
    })
}

#[test]
fn every_common_path_form_resolves_to_its_workload() {
    use QosClass::*;
    use Runtime::*;
    let k8s = |runtime, qos| container(Some(UID), runtime, Some(qos));
    let table: Vec<(String, PathIdentity, &str)> = vec![
        // systemd driver, each runtime and QoS class.
        (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"),
         k8s(Containerd, Burstable), "containerd burstable systemd"),
        (format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope"),
         k8s(CriO, BestEffort), "cri-o besteffort systemd"),
        (format!("/kubepods.slice/kubepods-pod{UID_}.slice/docker-{ID}.scope"),
         k8s(Docker, Guaranteed), "docker guaranteed systemd"),
        (format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-dockerd-{ID}.scope"),
         k8s(Docker, Guaranteed), "cri-dockerd guaranteed systemd"),
        // CRI-O nests the container's processes one level deeper.
        (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{ID}.scope/container"),
         k8s(CriO, Burstable), "cri-o nested container dir"),
        // cgroupfs driver.
        (format!("/kubepods/burstable/pod{UID}/{ID}"), k8s(Unknown, Burstable), "cgroupfs burstable"),
        (format!("/kubepods/besteffort/pod{UID}/{ID}"), k8s(Unknown, BestEffort), "cgroupfs besteffort"),
        (format!("/kubepods/pod{UID}/{ID}"), k8s(Unknown, Guaranteed), "cgroupfs guaranteed"),
        (format!("/kubepods/besteffort/pod{UID}/crio-{ID}"), k8s(CriO, BestEffort), "cgroupfs cri-o"),
        // kubelet under a systemd slice (kubeadm in kind and some distros).
        (format!("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"),
         k8s(Containerd, Burstable), "kubelet.slice nesting"),
        // containerd's systemd driver nested under another manager.
        (format!("/system.slice/containerd.service/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{ID}"),
         k8s(Containerd, BestEffort), "colon form"),
        // Static pods have 32-hex UIDs.
        (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC_UID}.slice/cri-containerd-{ID}.scope"),
         container(Some(STATIC_UID), Containerd, Some(Burstable)), "static pod"),
        // Outside Kubernetes.
        (format!("/system.slice/docker-{ID}.scope"), container(None, Docker, None), "docker systemd"),
        (format!("/docker/{ID}"), container(None, Docker, None), "docker cgroupfs"),
        (format!("/machine.slice/libpod-{ID}.scope"), container(None, Podman, None), "podman"),
        ("/system.slice/nginx.service".to_owned(), PathIdentity::Unit("nginx.service".into()), "service"),
        ("/system.slice/nginx.service/worker".to_owned(), PathIdentity::Unit("nginx.service".into()), "service subgroup"),
        ("/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service".to_owned(),
         PathIdentity::Unit("user@1000.service".into()), "user manager"),
        ("/user.slice/user-1000.slice/session-3.scope".to_owned(), PathIdentity::Unit("session-3.scope".into()), "session"),
        ("/init.scope".to_owned(), PathIdentity::Unit("init.scope".into()), "init"),
        // Not workloads.
        ("/".to_owned(), PathIdentity::Host, "root"),
        ("/system.slice".to_owned(), PathIdentity::Host, "slice"),
        (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"),
         PathIdentity::Host, "pod level"),
        (format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{ID}.scope"), PathIdentity::Host, "conmon ignored"),
        (format!("/machine.slice/libpod-conmon-{ID}.scope"), PathIdentity::Host, "podman conmon ignored"),
        ("/process_api/9e89cdcacbcb8e32b7c96c298a220758".to_owned(), PathIdentity::Host, "unrecognised"),
        (format!("/kubepods/burstable/podnot-a-uid/{ID}"), PathIdentity::Host, "malformed pod uid"),
        ("/kubepods/burstable/pod8d1f7c2e-4b5a-4c3d-9e8f-0a1b2c3d4e5f/NOTHEX".to_owned(), PathIdentity::Host, "malformed container id"),
        // 36 bytes, 32 hex digits, a 2-byte character across the first dash's byte: no panic.
        (format!("/kubepods/burstable/pod8d1f7c2\u{e9}4b5a4c3d9e8f0a1b2c3d4e5f0\u{e9}/{ID}"), PathIdentity::Host, "multibyte pod uid"),
        ("/user.slice/user-1000.slice/user@1000.service/\u{e9}t\u{e9}-pod\u{e9}.slice".to_owned(),
         PathIdentity::Unit("user@1000.service".into()), "multibyte in a delegated subtree"),
    ];
    for (path, want, what) in table {
        let (got, len) = resolve(&path);
        assert_eq!(got, want, "{what}: {path}");
        if want != PathIdentity::Host {
            assert!(len > 0 && len <= path.len(), "{what}: prefix {len}");
            let prefix = &path[..len];
            assert_eq!(resolve(prefix).0, want, "{what}: prefix {prefix}");
        }
    }
}

#[test]
fn workload_prefix_stops_at_the_workload() {
    let path = "/system.slice/nginx.service/worker/deeper";
    let (_, len) = resolve(path);
    assert_eq!(&path[..len], "/system.slice/nginx.service");
}

/// The forms beyond the kubelet's and Docker's own (issue 14, item 5): podman's cgroupfs manager,
/// pods and quadlet, ECS, garden, containerd's bare and colon names, and Kubernetes nodes that are
/// containers. Each with look-alikes that must not be taken for containers.
#[test]
fn each_further_runtime_form_resolves_to_its_workload() {
    use QosClass::*;
    use Runtime::*;
    const INNER: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
    const NODE: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
    const POD: &str = "9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0";
    const TASK: &str = "5c1a3e9b7d2f4a6c8e0b1d3f5a7c9e2b";
    const TASK_UUID: &str = "c2f9a1d4-7e3b-4a8c-9d6e-1f0b2a3c4d5e";
    const HANDLE: &str = "6f3e2a1b-9c8d-4e7f-5a6b-0c1d";
    let with = |pod: Option<&str>, id: &str, runtime, qos| {
        PathIdentity::Container(ContainerRef {
            pod_uid: pod.map(str::to_owned),
            container_id: id.to_owned(),
            runtime,
            qos,
        })
    };
    let unit = |name: &str| PathIdentity::Unit(name.to_owned());
    let host = PathIdentity::Host;
    let kind_pod = format!(
        "/system.slice/docker-{NODE}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice"
    );
    let table: Vec<(String, PathIdentity, &str)> = vec![
        // podman, cgroupfs manager: containers, and pods as bare ids under `libpod_parent`.
        (format!("/libpod_parent/libpod-{ID}"), with(None, ID, Podman, None), "podman cgroupfs"),
        (format!("/libpod_parent/{POD}/libpod-{INNER}"), with(Some(POD), INNER, Podman, None), "podman cgroupfs pod"),
        (format!("/machine.slice/machine-libpod_pod_{POD}.slice/libpod-{ID}.scope"),
         with(Some(POD), ID, Podman, None), "podman systemd pod"),
        (format!("/machine.slice/libpod-{ID}"), with(None, ID, Podman, None), "libpod without .scope"),
        (format!("/machine.slice/libpod-{ID}.scope/container"), with(None, ID, Podman, None), "podman cgroupns subdir"),
        // quadlet: the payload inside the unit's cgroup, conmon in `runtime` stays with the unit.
        (format!("/system.slice/web.service/libpod-payload-{ID}"), with(None, ID, Podman, None), "quadlet payload"),
        ("/system.slice/web.service/runtime".to_owned(), unit("web.service"), "quadlet runtime"),
        (format!("/user.slice/user-1000.slice/user@1000.service/app.slice/web.service/libpod-payload-{ID}/init.scope"),
         with(None, ID, Podman, None), "rootless quadlet running systemd"),
        // Amazon ECS: `/ecs/<task id>/<container id>`, both task id formats.
        (format!("/ecs/{TASK}/{ID}"), with(Some(TASK), ID, Docker, None), "ecs"),
        (format!("/ecs/{TASK_UUID}/{ID}"), with(Some(TASK_UUID), ID, Docker, None), "ecs uuid task"),
        (format!("/ecs/{TASK}/{TASK}-3"), with(Some(TASK), &format!("{TASK}-3"), Containerd, None), "ecs fargate container"),
        // Cloud Foundry garden-runc: `/garden/<handle>`, garden-init in `init` below on v2.
        (format!("/garden/{HANDLE}"), with(None, HANDLE, Garden, None), "garden"),
        (format!("/garden/{HANDLE}/init"), with(None, HANDLE, Garden, None), "garden init"),
        (format!("/garden/executor-healthcheck-{HANDLE}"),
         with(None, &format!("executor-healthcheck-{HANDLE}"), Garden, None), "garden named handle"),
        // containerd without `.scope`.
        (format!("/kubepods/besteffort/pod{UID}/cri-containerd-{ID}"), with(Some(UID), ID, Containerd, Some(BestEffort)),
         "cri-containerd without .scope, cgroupfs pod"),
        (format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}"), with(Some(UID), ID, Containerd, Some(Guaranteed)),
         "cri-containerd without .scope, systemd pod"),
        (format!("/system.slice/cri-containerd-{ID}"), with(None, ID, Containerd, None), "cri-containerd outside a pod"),
        // containerd colon forms whose parent is not a `.slice` of a pod.
        (format!("/kubepods-besteffort-pod{UID_}:cri-containerd:{ID}"), with(Some(UID), ID, Containerd, Some(BestEffort)),
         "colon form, pod part without .slice"),
        (format!("/system.slice/containerd.service/kubepods-burstable-pod{UID_}:crio:{ID}"),
         with(Some(UID), ID, CriO, Some(Burstable)), "colon form under a unit, without .slice"),
        (format!("/system.slice/containerd.service/system.slice:cri-containerd:{ID}"),
         with(None, ID, Containerd, None), "colon form, system.slice parent"),
        (format!("/kubepods/burstable/pod{UID}/system.slice:cri-containerd:{ID}"),
         with(Some(UID), ID, Containerd, Some(Burstable)), "colon form in a pod directory"),
        // Kubernetes nodes that are containers, seen from the host: the pod's container wins.
        (format!("{kind_pod}/cri-containerd-{ID}.scope"), with(Some(UID), ID, Containerd, Some(BestEffort)), "kind, systemd"),
        (format!("/docker/{NODE}/kubepods/besteffort/pod{UID}/{ID}"), with(Some(UID), ID, Unknown, Some(BestEffort)),
         "minikube, cgroupfs"),
        (format!("/system.slice/docker-{NODE}.scope/kubepods/burstable/pod{UID}/{ID}"),
         with(Some(UID), ID, Unknown, Some(Burstable)), "node container on systemd, kubelet on cgroupfs"),
        // ... and everything else in the node is the node's.
        (format!("/system.slice/docker-{NODE}.scope/system.slice/containerd.service"),
         with(None, NODE, Docker, None), "kind node's containerd"),
        (kind_pod.clone(), with(None, NODE, Docker, None), "kind node's pod level"),
        (format!("/docker/{NODE}/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{ID}.scope"),
         with(None, NODE, Docker, None), "conmon inside a node stays with the node"),
        (format!("/docker/{NODE}/kubepods/besteffort/podnot-a-uid/{ID}"), with(None, NODE, Docker, None),
         "malformed pod inside a node"),
        // Look-alikes.
        ("/libpod_parent".to_owned(), host.clone(), "libpod_parent itself"),
        (format!("/libpod_parent/{POD}"), host.clone(), "podman pod level"),
        ("/libpod_parent/libpod-xyz".to_owned(), host.clone(), "libpod- with a non-hex id"),
        ("/machine.slice/libpod-0123456789a".to_owned(), host.clone(), "libpod- with 11 digits"),
        (format!("/machine.slice/machine-libpod_pod_{POD}.slice"), host.clone(), "podman systemd pod level"),
        (format!("/system.slice/cri-containerd-{ID}.service"), unit(&format!("cri-containerd-{ID}.service")),
         "a .service named like a container is a unit"),
        (format!("/ecs/{TASK}"), host.clone(), "ecs task level"),
        (format!("/ecs/not-a-task/{ID}"), host.clone(), "ecs malformed task"),
        (format!("/ecs/{TASK}/0123456789ab"), host.clone(), "ecs short container id"),
        (format!("/ecs/{TASK}/{TASK}-"), host.clone(), "ecs fargate id without a number"),
        (format!("/ecs/{TASK}/{TASK}-3x"), host.clone(), "ecs fargate id, not a number"),
        (format!("/ecs/{TASK}/0123456789ab-3"), host.clone(), "ecs fargate id, short task part"),
        (format!("/system.slice/batch.service/ecs/{TASK}/{ID}"), unit("batch.service"), "ecs-like subgroups of a unit"),
        ("/garden".to_owned(), host.clone(), "garden itself"),
        ("/garden/.hidden".to_owned(), host.clone(), "garden dot name"),
        ("/garden/h\u{e9}ndle".to_owned(), host.clone(), "garden multibyte handle"),
        (format!("/gardens/{HANDLE}"), host.clone(), "not garden"),
        ("/system.slice/garden.service".to_owned(), unit("garden.service"), "garden's own unit"),
        ("/system.slice:cri-containerd:NOTHEX".to_owned(), host.clone(), "colon form, bad id"),
        (format!("/system.slice:unknown:{ID}"), host.clone(), "colon form, unknown prefix, no pod"),
        (format!("/a:cri-containerd:{ID}:extra"), host.clone(), "colon form, four parts"),
        (format!("/kubepods-besteffort-pod\u{e9}{UID_}:cri-containerd:{ID}"),
         with(None, ID, Containerd, None), "colon form, multibyte pod part names no pod"),
        (format!("/kubepods/besteffort/pod{UID}/cri-containerd-0123456789a"), host.clone(), "short containerd id in a pod"),
    ];
    for (path, want, what) in table {
        let (got, len) = resolve(&path);
        assert_eq!(got, want, "{what}: {path}");
        if want != PathIdentity::Host {
            let prefix = &path[..len];
            assert_eq!(resolve(prefix), (want, len), "{what}: prefix {prefix}");
        }
    }
}
