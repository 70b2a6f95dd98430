//! Cgroup path → workload, by the names container runtimes and systemd give cgroup directories.
//!
//! Kubernetes pods live under `kubepods` (cgroupfs driver) or `kubepods.slice` (systemd driver),
//! optionally under a QoS level (`burstable`, `besteffort`; guaranteed pods sit directly under
//! `kubepods`), in a pod directory named after the pod UID (dashes become underscores in systemd
//! slice names), with one directory per container named after the container id, prefixed by the
//! runtime under the systemd driver (`cri-containerd-`, `crio-`, `docker-`). CRI-O's `conmon`
//! monitor gets its own `crio-conmon-<id>.scope`, which is not a container. Outside Kubernetes,
//! `docker-<id>.scope`, `/docker/<id>` and podman's `libpod-<id>.scope` are containers, and any other
//! `.service` or `.scope` is a systemd unit.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// The container runtime a cgroup name reveals (`unknown` for bare ids under the cgroupfs driver).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    Podman,
    Unknown,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Docker => "docker",
            Runtime::Podman => "podman",
            Runtime::Unknown => "unknown",
        }
    }
}

/// Kubernetes QoS class, from the pod's place in the hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub fn as_str(self) -> &'static str {
        match self {
            QosClass::Guaranteed => "guaranteed",
            QosClass::Burstable => "burstable",
            QosClass::BestEffort => "besteffort",
        }
    }
}

/// Names only the container runtime knows.
#[derive(Debug, Clone, Default)]
pub struct Names {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    /// The pod's labels (without the kubelet's own `io.kubernetes.*`), for budget selectors.
    /// Not part of the identity: equality and hashing ignore them.
    pub labels: Arc<BTreeMap<String, String>>,
}

impl PartialEq for Names {
    fn eq(&self, other: &Self) -> bool {
        (&self.namespace, &self.pod, &self.container)
            == (&other.namespace, &other.pod, &other.container)
    }
}

impl Eq for Names {}

impl std::hash::Hash for Names {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (&self.namespace, &self.pod, &self.container).hash(state);
    }
}

/// What a cgroup path identifies.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PathIdentity {
    Container(ContainerRef),
    /// A systemd unit, by its full name (`nginx.service`, `session-3.scope`).
    Unit(String),
    /// Not a workload: the root, a slice, or anything unrecognised.
    Host,
    /// A pod container known only from the kubelet's device assignments (its processes are not
    /// visible to the agent): no cgroup, no ids, just names.
    Assigned(Names),
}

/// A container as its cgroup path names it. Pod namespace and names come from CRI later.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerRef {
    /// The pod UID with dashes, or `None` for containers outside Kubernetes.
    pub pod_uid: Option<String>,
    pub container_id: String,
    pub runtime: Runtime,
    pub qos: Option<QosClass>,
}

/// What one directory name means, given where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The directory is a workload; its subdirectories belong to it.
    Workload(PathIdentity),
    /// The directory and everything below it is not metered (`crio-conmon-*`).
    Ignore,
    /// Not a workload itself; look below, with this context.
    Descend(Context),
}

/// What the directories above tell about the one being classified.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    in_kubepods: bool,
    in_docker: bool,
    /// Below a systemd unit: only containers count (a runtime nested in a unit, as on kind nodes).
    in_unit: bool,
    qos: Option<QosClass>,
    pod_uid: Option<String>,
}

/// Classifies one directory `name` below directories that produced `ctx`.
pub fn classify(ctx: &Context, name: &str) -> Step {
    if name.contains("-conmon-") {
        return Step::Ignore;
    }
    // containerd's systemd cgroup driver inside another manager: `<pod slice>:<prefix>:<id>`.
    if let Some(step) = colon_form(name) {
        return step;
    }
    if let Some(uid) = &ctx.pod_uid {
        return match container_in_pod(name) {
            Some((runtime, id)) => Step::Workload(PathIdentity::Container(ContainerRef {
                pod_uid: Some(uid.clone()),
                container_id: id.to_owned(),
                runtime,
                qos: ctx.qos,
            })),
            None => Step::Descend(ctx.clone()),
        };
    }
    if ctx.in_kubepods {
        let mut next = ctx.clone();
        if let Some(qos) = qos_level(name) {
            next.qos = Some(qos);
            return Step::Descend(next);
        }
        if let Some(uid) = pod_dir(name) {
            next.pod_uid = Some(uid);
            next.qos = Some(ctx.qos.unwrap_or(QosClass::Guaranteed));
            return Step::Descend(next);
        }
        return Step::Descend(next);
    }
    if matches!(
        name,
        "kubepods" | "kubepods.slice" | "kubelet-kubepods.slice"
    ) {
        return Step::Descend(Context {
            in_kubepods: true,
            ..Context::default()
        });
    }
    if ctx.in_docker && is_hex_id(name, 64) {
        return standalone(Runtime::Docker, name);
    }
    if name == "docker" {
        return Step::Descend(Context {
            in_docker: true,
            ..Context::default()
        });
    }
    for (prefix, runtime) in [("docker-", Runtime::Docker), ("libpod-", Runtime::Podman)] {
        if let Some(id) = scoped_id(name, prefix) {
            return standalone(runtime, id);
        }
    }
    if !ctx.in_unit && (name.ends_with(".service") || name.ends_with(".scope")) {
        return Step::Workload(PathIdentity::Unit(name.to_owned()));
    }
    Step::Descend(ctx.clone())
}

/// The context below a unit's directory, where only containers are looked for.
pub fn below_unit() -> Context {
    Context {
        in_unit: true,
        ..Context::default()
    }
}

/// The first workload along `path` (relative to a hierarchy root, `/`-separated), and the length
/// of the prefix of `path` that is that workload's cgroup. A container below a unit wins over the
/// unit.
pub fn resolve(path: &str) -> (PathIdentity, usize) {
    let mut ctx = Context::default();
    let mut found = (PathIdentity::Host, 0);
    let mut end = 0;
    for component in path.split('/') {
        let start = end;
        end = start + component.len() + 1;
        if component.is_empty() {
            continue;
        }
        match classify(&ctx, component) {
            Step::Workload(PathIdentity::Unit(unit)) => {
                found = (PathIdentity::Unit(unit), start + component.len());
                ctx = below_unit();
            }
            Step::Workload(identity) => return (identity, start + component.len()),
            Step::Ignore => return (PathIdentity::Host, 0),
            Step::Descend(next) => ctx = next,
        }
    }
    found
}

fn standalone(runtime: Runtime, id: &str) -> Step {
    Step::Workload(PathIdentity::Container(ContainerRef {
        pod_uid: None,
        container_id: id.to_owned(),
        runtime,
        qos: None,
    }))
}

fn colon_form(name: &str) -> Option<Step> {
    let mut parts = name.split(':');
    let (slice, prefix, id) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !is_hex_id(id, 0) {
        return None;
    }
    let uid = pod_dir(slice)?;
    let runtime = match prefix {
        "cri-containerd" => Runtime::Containerd,
        "crio" => Runtime::CriO,
        "docker" => Runtime::Docker,
        _ => Runtime::Unknown,
    };
    Some(Step::Workload(PathIdentity::Container(ContainerRef {
        qos: Some(slice_qos(slice)),
        pod_uid: Some(uid),
        container_id: id.to_owned(),
        runtime,
    })))
}

fn container_in_pod(name: &str) -> Option<(Runtime, &str)> {
    for (prefix, runtime) in [
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::CriO),
        ("docker-", Runtime::Docker),
        ("cri-dockerd-", Runtime::Docker),
    ] {
        if let Some(id) = scoped_id(name, prefix) {
            return Some((runtime, id));
        }
    }
    // cgroupfs driver: CRI-O keeps its prefix without `.scope`; the others use the bare id.
    if let Some(id) = name.strip_prefix("crio-").filter(|id| is_hex_id(id, 0)) {
        return Some((Runtime::CriO, id));
    }
    is_hex_id(name, 64).then_some((Runtime::Unknown, name))
}

/// `<prefix><hex id>.scope` → the id.
fn scoped_id<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    let id = name.strip_prefix(prefix)?.strip_suffix(".scope")?;
    is_hex_id(id, 0).then_some(id)
}

fn qos_level(name: &str) -> Option<QosClass> {
    match name {
        "burstable" | "kubepods-burstable.slice" | "kubelet-kubepods-burstable.slice" => {
            Some(QosClass::Burstable)
        }
        "besteffort" | "kubepods-besteffort.slice" | "kubelet-kubepods-besteffort.slice" => {
            Some(QosClass::BestEffort)
        }
        _ => None,
    }
}

fn slice_qos(slice: &str) -> QosClass {
    if slice.contains("-burstable-") {
        QosClass::Burstable
    } else if slice.contains("-besteffort-") {
        QosClass::BestEffort
    } else {
        QosClass::Guaranteed
    }
}

/// `pod<uid>` (cgroupfs) or `…-pod<uid_with_underscores>.slice` (systemd) → the UID with dashes.
fn pod_dir(name: &str) -> Option<String> {
    let raw = match name.strip_suffix(".slice") {
        Some(slice) => &slice[slice.rfind("-pod")? + 4..],
        None => name.strip_prefix("pod")?,
    };
    let uid = raw.replace('_', "-");
    let hex_digits = uid.chars().filter(char::is_ascii_hexdigit).count();
    let well_formed = match uid.len() {
        // Static pods: the kubelet's 32-hex-digit hash of the manifest.
        32 => hex_digits == 32,
        // By bytes: a name may hold multibyte characters (any user with a delegated subtree can
        // make one), and a string index off a character boundary panics.
        36 => hex_digits == 32 && [8, 13, 18, 23].iter().all(|&i| uid.as_bytes()[i] == b'-'),
        _ => false,
    };
    well_formed.then(|| uid.to_ascii_lowercase())
}

/// Lowercase hex of exactly `len` digits, or of 12–64 digits when `len` is 0.
fn is_hex_id(s: &str, len: usize) -> bool {
    let ok_len = if len == 0 {
        (12..=64).contains(&s.len())
    } else {
        s.len() == len
    };
    ok_len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl fmt::Display for PathIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathIdentity::Container(c) => write!(
                f,
                "container {} (pod {}, {})",
                c.container_id,
                c.pod_uid.as_deref().unwrap_or("-"),
                c.runtime.as_str()
            ),
            PathIdentity::Unit(u) => write!(f, "unit {u}"),
            PathIdentity::Host => f.write_str("host"),
            PathIdentity::Assigned(n) => {
                write!(f, "pod {}/{} container {}", n.namespace, n.pod, n.container)
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
}
