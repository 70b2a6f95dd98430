//! Cgroup path → workload, by the names container runtimes and systemd give cgroup directories.
//!
//! Kubernetes pods live under `kubepods` (cgroupfs driver) or `kubepods.slice` (systemd driver),
//! optionally under a QoS level (`burstable`, `besteffort`; guaranteed pods sit directly under
//! `kubepods`), in a pod directory named after the pod UID (dashes become underscores in systemd
//! slice names), with one directory per container named after the container id, prefixed by the
//! runtime under the systemd driver (`cri-containerd-`, `crio-`, `docker-`). CRI-O's `conmon`
//! monitor gets its own `crio-conmon-<id>.scope`, which is not a container. containerd's systemd
//! driver nested in another manager names a directory `<pod slice>:cri-containerd:<id>`. Outside
//! Kubernetes, `docker-<id>.scope`, `/docker/<id>`, podman's `libpod-<id>(.scope)` (pods:
//! `/libpod_parent/<pod id>/`, `machine-libpod_pod_<pod id>.slice/`) and quadlet's
//! `libpod-payload-<id>`, ECS's `/ecs/<task id>/<id>` and garden's `/garden/<handle>` are
//! containers, and any other `.service` or `.scope` is a systemd unit. Below a workload only
//! containers are looked for, and the innermost one wins: a container in a unit, or a pod's
//! container on a Kubernetes node that is itself a container (kind, minikube).

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
    /// Cloud Foundry's garden-runc.
    Garden,
    Unknown,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Docker => "docker",
            Runtime::Podman => "podman",
            Runtime::Garden => "garden",
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
    /// The pod's annotations Tally reads (`tally.io/…`, `prometheus.io/…`): the opt-out from
    /// inference metering, an inference server's metrics port. Not part of the identity either.
    pub annotations: Arc<BTreeMap<String, String>>,
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
    /// The directory is a workload; its subdirectories belong to it, except workloads nested
    /// below it (classify them in [`below_workload`]).
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
    /// Below a systemd unit or a container: only containers count (a runtime nested in a unit,
    /// or a Kubernetes node that is itself a container, as with kind and minikube).
    in_unit: bool,
    parent: Parent,
    qos: Option<QosClass>,
    pod_uid: Option<String>,
}

/// A runtime's own parent directory, where the names below follow that runtime's scheme.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Parent {
    #[default]
    Other,
    /// `/docker` (Docker's cgroupfs driver): containers are bare 64-hex ids.
    Docker,
    /// `/libpod_parent` (podman's cgroupfs manager): pods are bare 64-hex ids.
    Libpod,
    /// A podman pod (`/libpod_parent/<pod id>`, `machine-libpod_pod_<pod id>.slice`).
    PodmanPod(String),
    /// `/ecs` (the Amazon ECS agent's cgroup parent): tasks below.
    Ecs,
    /// `/ecs/<task id>`: containers are bare 64-hex ids.
    EcsTask(String),
    /// `/garden` (Cloud Foundry's garden-runc): one directory per container handle.
    Garden,
}

/// Classifies one directory `name` below directories that produced `ctx`.
pub fn classify(ctx: &Context, name: &str) -> Step {
    if name.contains("-conmon-") {
        return Step::Ignore;
    }
    // containerd's systemd cgroup driver inside another manager: `<parent>:<prefix>:<id>`.
    if let Some(step) = colon_form(ctx, name) {
        return step;
    }
    if let Some(uid) = &ctx.pod_uid {
        return match container_in_pod(name) {
            Some((runtime, id)) => container(Some(uid.clone()), id, runtime, ctx.qos),
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
    if let Some(step) = below_parent(ctx, name) {
        return step;
    }
    let parent = match name {
        "docker" => Some(Parent::Docker),
        "libpod_parent" => Some(Parent::Libpod),
        // Top-level parents of their own; inside a unit these are someone's subgroups.
        "ecs" if !ctx.in_unit => Some(Parent::Ecs),
        "garden" if !ctx.in_unit => Some(Parent::Garden),
        _ => name
            .strip_prefix("machine-libpod_pod_")
            .and_then(|rest| rest.strip_suffix(".slice"))
            .filter(|id| is_hex_id(id, 64))
            .map(|id| Parent::PodmanPod(id.to_owned())),
    };
    if let Some(parent) = parent {
        return Step::Descend(Context {
            parent,
            in_unit: ctx.in_unit,
            ..Context::default()
        });
    }
    let pod = match &ctx.parent {
        Parent::PodmanPod(pod) => Some(pod.clone()),
        _ => None,
    };
    for (prefix, runtime) in [
        ("docker-", Runtime::Docker),
        // Quadlet (`--cgroups=split`): the payload's cgroup inside the unit's.
        ("libpod-payload-", Runtime::Podman),
        ("libpod-", Runtime::Podman),
        ("cri-containerd-", Runtime::Containerd),
    ] {
        if let Some(id) = prefixed_id(name, prefix) {
            return container(pod, id, runtime, None);
        }
    }
    if !ctx.in_unit && (name.ends_with(".service") || name.ends_with(".scope")) {
        return Step::Workload(PathIdentity::Unit(name.to_owned()));
    }
    Step::Descend(ctx.clone())
}

/// Names directly below a runtime's parent directory (`/docker`, `/libpod_parent`, `/ecs`,
/// `/garden`), or `None` when `name` follows no such scheme.
fn below_parent(ctx: &Context, name: &str) -> Option<Step> {
    let into = |parent| {
        Step::Descend(Context {
            parent,
            in_unit: ctx.in_unit,
            ..Context::default()
        })
    };
    match &ctx.parent {
        Parent::Docker if is_hex_id(name, 64) => Some(container(None, name, Runtime::Docker, None)),
        Parent::Libpod if is_hex_id(name, 64) => Some(into(Parent::PodmanPod(name.to_owned()))),
        // Task ids: 32 hex digits (current ARN format) or a UUID (the older one).
        Parent::Ecs => uid(name).map(|task| into(Parent::EcsTask(task))),
        // On EC2 the ECS agent starts a task's containers through Docker (64-hex ids); Fargate's
        // containerd names them `<32-hex task id>-<n>`.
        Parent::EcsTask(task) => {
            let runtime = if is_hex_id(name, 64) {
                Runtime::Docker
            } else {
                let (task_part, n) = name.split_once('-')?;
                let numbered =
                    !n.is_empty() && n.len() <= 10 && n.bytes().all(|b| b.is_ascii_digit());
                if !(is_hex_id(task_part, 32) && numbered) {
                    return None;
                }
                Runtime::Containerd
            };
            Some(container(Some(task.clone()), name, runtime, None))
        }
        Parent::Garden if is_garden_handle(name) => {
            Some(container(None, name, Runtime::Garden, None))
        }
        _ => None,
    }
}

/// The context below a workload's directory (a unit or a container), where only containers are
/// looked for: the innermost container is the workload.
pub fn below_workload() -> Context {
    Context {
        in_unit: true,
        ..Context::default()
    }
}

/// The innermost workload along `path` (relative to a hierarchy root, `/`-separated), and the
/// length of the prefix of `path` that is that workload's cgroup. A container below a unit or
/// below another container (a kind node) wins over it.
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
            Step::Workload(identity) => {
                found = (identity, start + component.len());
                ctx = below_workload();
            }
            // Not metered on its own: it stays with the workload above, if any.
            Step::Ignore => return found,
            Step::Descend(next) => ctx = next,
        }
    }
    found
}

fn container(pod_uid: Option<String>, id: &str, runtime: Runtime, qos: Option<QosClass>) -> Step {
    Step::Workload(PathIdentity::Container(ContainerRef {
        pod_uid,
        container_id: id.to_owned(),
        runtime,
        qos,
    }))
}

/// `<parent>:<prefix>:<id>`, the name runc's systemd driver would turn into a scope, created as a
/// plain directory where another manager owns the tree. The parent is a pod's slice, with or
/// without `.slice`, or a slice naming no pod (`system.slice`), then the pod comes from the
/// directories above, if any.
fn colon_form(ctx: &Context, name: &str) -> Option<Step> {
    let mut parts = name.split(':');
    let (parent, prefix, id) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !is_hex_id(id, 0) {
        return None;
    }
    let pod = pod_dir(parent).or_else(|| slice_pod_uid(parent));
    let runtime = match prefix {
        "cri-containerd" => Runtime::Containerd,
        "crio" => Runtime::CriO,
        "docker" => Runtime::Docker,
        // An unknown prefix is a container only where the parent says it is in a pod.
        _ if pod.is_some() => Runtime::Unknown,
        _ => return None,
    };
    Some(match pod {
        Some(uid) => container(Some(uid), id, runtime, Some(slice_qos(parent))),
        None => container(ctx.pod_uid.clone(), id, runtime, ctx.qos),
    })
}

fn container_in_pod(name: &str) -> Option<(Runtime, &str)> {
    // With `.scope` under the systemd driver; without it where a runtime names a directory the
    // same way under the cgroupfs driver (CRI-O always, containerd in some setups).
    for (prefix, runtime) in [
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::CriO),
        ("docker-", Runtime::Docker),
        ("cri-dockerd-", Runtime::Docker),
    ] {
        if let Some(id) = prefixed_id(name, prefix) {
            return Some((runtime, id));
        }
    }
    is_hex_id(name, 64).then_some((Runtime::Unknown, name))
}

/// `<prefix><hex id>` or `<prefix><hex id>.scope` → the id.
fn prefixed_id<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = name.strip_prefix(prefix)?;
    let id = rest.strip_suffix(".scope").unwrap_or(rest);
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
    match name.strip_suffix(".slice") {
        Some(slice) => slice_pod_uid(slice),
        None => uid(name.strip_prefix("pod")?),
    }
}

/// `…-pod<uid_with_underscores>` (a pod slice's name without `.slice`) → the UID with dashes.
fn slice_pod_uid(slice: &str) -> Option<String> {
    // `rfind` gives the byte offset of an ASCII `-`, so `+ 4` is past `-pod`, on a boundary.
    uid(&slice[slice.rfind("-pod")? + 4..])
}

/// A Kubernetes pod UID or an ECS task id, with dashes or underscores: 32 hex digits (static
/// pods' manifest hash; ECS's current ARN format) or a UUID, lowercased with dashes.
fn uid(raw: &str) -> Option<String> {
    let uid = raw.replace('_', "-");
    let hex_digits = uid.chars().filter(char::is_ascii_hexdigit).count();
    let well_formed = match uid.len() {
        32 => hex_digits == 32,
        // By bytes: a name may hold multibyte characters (any user with a delegated subtree can
        // make one), and a string index off a character boundary panics.
        36 => hex_digits == 32 && [8, 13, 18, 23].iter().all(|&i| uid.as_bytes()[i] == b'-'),
        _ => false,
    };
    well_formed.then(|| uid.to_ascii_lowercase())
}

/// A garden container handle: Diego names them after the app instance GUID
/// (`6101881c-bff1-4da1-4497-2dbc`); other clients choose their own. Printable ASCII without
/// separators, as in a host name.
fn is_garden_handle(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
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
mod tests;
