//! A blocking CRI client (`runtime.v1.RuntimeService`) that creates pods in a real containerd the
//! way the kubelet does with the systemd cgroup driver, so tests see the cgroup paths, labels and
//! log files a Kubernetes node has.
//!
//! It owns a current-thread tokio runtime and blocks on each call, so plain `#[test]`s use it; it
//! must not be called from inside another tokio runtime.
//!
//! containerd must run runc with `SystemdCgroup = true` (the kubelet's systemd driver), and have
//! the images already (nothing here pulls). The kubelet creates `kubepods.slice` and the QoS
//! slices itself; without a kubelet nothing needs to: systemd nests a slice by the dashes in its
//! name (`a-b-c.slice` lives in `a.slice/a-b.slice/a-b-c.slice`) and creates the missing parent
//! slices when runc starts the first scope under `kubepods-besteffort-pod<uid>.slice`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use tally_agent::identity::cri::proto::{
    LABEL_CONTAINER_NAME, LABEL_NAMESPACE, LABEL_POD_NAME, LABEL_POD_UID,
};
use tonic::codec::ProstCodec;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

pub mod proto;

use proto::{ContainerMetadata, ContainerState, NamespaceMode, PodSandboxMetadata};

/// Bounds every call: CreateContainer may unpack an image, RunPodSandbox starts the pause one.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Grace period PodHandle gives a container before containerd kills it.
const STOP_GRACE_SECONDS: i64 = 2;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Kubernetes QoS class of a pod, which picks its cgroup parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    /// The QoS level's name in slice names, `None` for Guaranteed (pods sit under kubepods).
    pub fn slice_level(self) -> Option<&'static str> {
        match self {
            Qos::Guaranteed => None,
            Qos::Burstable => Some("burstable"),
            Qos::BestEffort => Some("besteffort"),
        }
    }

    /// Container resources the kubelet would set for a pod of this class with one container.
    fn resources(self) -> proto::LinuxContainerResources {
        let (cpu_shares, cpu_quota, memory_limit_in_bytes) = match self {
            // 1 CPU and 256 MiB, requests equal to limits.
            Qos::Guaranteed => (1024, 100_000, 256 << 20),
            // A 100m CPU request, no limits.
            Qos::Burstable => (102, 0, 0),
            // The kubelet's minimum shares.
            Qos::BestEffort => (2, 0, 0),
        };
        proto::LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota,
            cpu_shares,
            memory_limit_in_bytes,
        }
    }
}

/// A pod uid as the kubelet writes it in slice names: `-` would nest slices, so it becomes `_`.
pub fn slice_uid(uid: &str) -> String {
    uid.replace('-', "_")
}

/// The pod's cgroup parent in systemd form, as the kubelet passes it in `RunPodSandbox`.
pub fn pod_slice(qos: Qos, uid: &str) -> String {
    match qos.slice_level() {
        None => format!("kubepods-pod{}.slice", slice_uid(uid)),
        Some(level) => format!("kubepods-{level}-pod{}.slice", slice_uid(uid)),
    }
}

/// The pod's cgroup directory on a pure cgroup v2 node with the systemd driver.
pub fn pod_cgroup_path(qos: Qos, uid: &str) -> PathBuf {
    let mut path = PathBuf::from(CGROUP_ROOT).join("kubepods.slice");
    if let Some(level) = qos.slice_level() {
        path.push(format!("kubepods-{level}.slice"));
    }
    path.join(pod_slice(qos, uid))
}

/// The cgroup directory of container (or sandbox) `id` of that pod, containerd's scope.
pub fn container_cgroup_path(qos: Qos, uid: &str, id: &str) -> PathBuf {
    pod_cgroup_path(qos, uid).join(format!("cri-containerd-{id}.scope"))
}

/// A container id as containerd returned it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerId(pub String);

impl ContainerId {
    /// The id as containerd spells it (64 hex digits).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What ContainerStatus says of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerStatus {
    pub state: ContainerState,
    /// Meaningful once `state` is exited.
    pub exit_code: i32,
}

/// A connection to a CRI socket; clones share the runtime and the channel.
#[derive(Debug, Clone)]
pub struct CriClient {
    runtime: Arc<tokio::runtime::Runtime>,
    grpc: tonic::client::Grpc<Channel>,
}

impl CriClient {
    /// Connects to the CRI runtime listening on `socket` (e.g. `/run/containerd/containerd.sock`).
    pub fn connect(socket: &Path) -> anyhow::Result<CriClient> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the CRI client's tokio runtime")?;
        let channel = runtime
            .block_on(tally_agent::identity::grpc::unix_channel(
                socket,
                Duration::from_secs(10),
            ))
            .with_context(|| format!("connecting to CRI socket {}", socket.display()))?;
        Ok(CriClient {
            runtime: Arc::new(runtime),
            grpc: tonic::client::Grpc::new(channel),
        })
    }

    fn call<Req, Resp>(&self, method: &'static str, request: Req) -> anyhow::Result<Resp>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let mut grpc = self.grpc.clone();
        let path = PathAndQuery::try_from(format!("/runtime.v1.RuntimeService/{method}"))
            .context("CRI method path")?;
        let exchange = async move {
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(format!("channel not ready: {e}")))?;
            let codec = ProstCodec::<Req, Resp>::default();
            grpc.unary(tonic::Request::new(request), path, codec).await
        };
        self.runtime
            // The timer is made inside the runtime: a tokio timer needs one to exist.
            .block_on(async { tokio::time::timeout(CALL_TIMEOUT, exchange).await })
            .with_context(|| format!("CRI {method}: no answer within {CALL_TIMEOUT:?}"))?
            .map(tonic::Response::into_inner)
            .with_context(|| format!("CRI {method}"))
    }

    /// A call whose answer is empty.
    fn call_empty<Req>(&self, method: &'static str, request: Req) -> anyhow::Result<()>
    where
        Req: prost::Message + Send + Sync + 'static,
    {
        self.call::<Req, proto::Empty>(method, request).map(drop)
    }

    /// RunPodSandbox with the default runtime handler; returns the sandbox id.
    pub fn run_pod_sandbox(&self, config: &proto::PodSandboxConfig) -> anyhow::Result<String> {
        let request = proto::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        };
        let response: proto::Id = self.call("RunPodSandbox", request)?;
        Ok(response.id)
    }

    /// CreateContainer in sandbox `pod_sandbox_id`, created from `sandbox_config`.
    pub fn create_container(
        &self,
        pod_sandbox_id: &str,
        config: &proto::ContainerConfig,
        sandbox_config: &proto::PodSandboxConfig,
    ) -> anyhow::Result<ContainerId> {
        let request = proto::CreateContainerRequest {
            pod_sandbox_id: pod_sandbox_id.to_owned(),
            config: Some(config.clone()),
            sandbox_config: Some(sandbox_config.clone()),
        };
        let response: proto::Id = self.call("CreateContainer", request)?;
        Ok(ContainerId(response.id))
    }

    /// StartContainer.
    pub fn start_container(&self, id: &ContainerId) -> anyhow::Result<()> {
        self.call_empty("StartContainer", id_message(id.as_str()))
    }

    /// StopContainer: SIGTERM, then SIGKILL after `timeout_seconds` (0: at once).
    pub fn stop_container(&self, id: &ContainerId, timeout_seconds: i64) -> anyhow::Result<()> {
        let request = proto::StopContainerRequest {
            container_id: id.0.clone(),
            timeout: timeout_seconds,
        };
        self.call_empty("StopContainer", request)
    }

    /// RemoveContainer, which kills it first if it still runs.
    pub fn remove_container(&self, id: &ContainerId) -> anyhow::Result<()> {
        self.call_empty("RemoveContainer", id_message(id.as_str()))
    }

    /// ContainerStatus: its state and exit code.
    pub fn container_status(&self, id: &ContainerId) -> anyhow::Result<ContainerStatus> {
        let response: proto::ContainerStatusResponse =
            self.call("ContainerStatus", id_message(id.as_str()))?;
        let status = response
            .status
            .with_context(|| format!("ContainerStatus of {id} has no status"))?;
        Ok(ContainerStatus {
            state: status.state(),
            exit_code: status.exit_code,
        })
    }

    /// StopPodSandbox, which also stops its containers.
    pub fn stop_pod_sandbox(&self, pod_sandbox_id: &str) -> anyhow::Result<()> {
        self.call_empty("StopPodSandbox", id_message(pod_sandbox_id))
    }

    /// RemovePodSandbox, which also removes its containers.
    pub fn remove_pod_sandbox(&self, pod_sandbox_id: &str) -> anyhow::Result<()> {
        self.call_empty("RemovePodSandbox", id_message(pod_sandbox_id))
    }

    /// Runs a pod as the kubelet would: a random uid, the kubelet's labels, host network, its log
    /// directory created, and the systemd cgroup parent of its QoS class.
    pub fn run_pod(&self, namespace: &str, name: &str, qos: Qos) -> anyhow::Result<PodHandle> {
        self.run_pod_in(namespace, name, qos, false)
    }

    /// As [`CriClient::run_pod`], in the node's pid namespace (`hostPID: true`), as the agent's
    /// DaemonSet pod runs.
    pub fn run_host_pid_pod(
        &self,
        namespace: &str,
        name: &str,
        qos: Qos,
    ) -> anyhow::Result<PodHandle> {
        self.run_pod_in(namespace, name, qos, true)
    }

    fn run_pod_in(
        &self,
        namespace: &str,
        name: &str,
        qos: Qos,
        host_pid: bool,
    ) -> anyhow::Result<PodHandle> {
        let uid = crate::cgroup::random_uid();
        let log_directory = format!("/var/log/pods/{namespace}_{name}_{uid}");
        std::fs::create_dir_all(&log_directory)
            .with_context(|| format!("creating {log_directory}"))?;
        let config = proto::PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_owned(),
                uid: uid.clone(),
                namespace: namespace.to_owned(),
                attempt: 0,
            }),
            // A host-network pod shares the node's UTS namespace: no hostname of its own (runc
            // refuses to set one without a private UTS namespace).
            hostname: String::new(),
            log_directory,
            labels: pod_labels(namespace, name, &uid),
            annotations: HashMap::from([(
                "kubernetes.io/config.source".to_owned(),
                "api".to_owned(),
            )]),
            linux: Some(proto::LinuxPodSandboxConfig {
                cgroup_parent: pod_slice(qos, &uid),
                security_context: Some(proto::LinuxSandboxSecurityContext {
                    namespace_options: Some(namespace_options(host_pid)),
                }),
            }),
        };
        let sandbox_id = match self.run_pod_sandbox(&config) {
            Ok(id) => id,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&config.log_directory);
                return Err(e);
            }
        };
        Ok(PodHandle {
            client: self.clone(),
            config,
            sandbox_id,
            uid,
            qos,
            host_pid,
            containers: Mutex::new(Vec::new()),
            removed: false,
        })
    }
}

fn id_message(id: &str) -> proto::Id {
    proto::Id { id: id.to_owned() }
}

/// Host network (no CNI on the test node), one ipc namespace for the pod, and one pid namespace
/// for the pod or the node's.
fn namespace_options(host_pid: bool) -> proto::NamespaceOption {
    proto::NamespaceOption {
        network: NamespaceMode::Node as i32,
        pid: if host_pid {
            NamespaceMode::Node as i32
        } else {
            NamespaceMode::Pod as i32
        },
        ipc: NamespaceMode::Pod as i32,
    }
}

fn pod_labels(namespace: &str, name: &str, uid: &str) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_POD_NAME.to_owned(), name.to_owned()),
        (LABEL_NAMESPACE.to_owned(), namespace.to_owned()),
        (LABEL_POD_UID.to_owned(), uid.to_owned()),
    ])
}

/// A running pod sandbox and the containers created in it; dropping it removes them all.
#[derive(Debug)]
pub struct PodHandle {
    client: CriClient,
    config: proto::PodSandboxConfig,
    sandbox_id: String,
    uid: String,
    qos: Qos,
    host_pid: bool,
    containers: Mutex<Vec<ContainerId>>,
    removed: bool,
}

impl PodHandle {
    /// The pod uid, in its dashed form.
    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// The QoS class the pod was run with.
    pub fn qos(&self) -> Qos {
        self.qos
    }

    /// The sandbox id, whose cgroup is [`Self::container_cgroup_path`] of it.
    pub fn sandbox_id(&self) -> &str {
        &self.sandbox_id
    }

    /// The config the sandbox was run with.
    pub fn config(&self) -> &proto::PodSandboxConfig {
        &self.config
    }

    /// Containers created (and not removed) through this handle, oldest first.
    pub fn containers(&self) -> Vec<ContainerId> {
        self.tracked().clone()
    }

    fn tracked(&self) -> std::sync::MutexGuard<'_, Vec<ContainerId>> {
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The pod's cgroup directory (see [`pod_cgroup_path`]).
    pub fn cgroup_path(&self) -> PathBuf {
        pod_cgroup_path(self.qos, &self.uid)
    }

    /// The cgroup directory of one of this pod's containers, or of its sandbox.
    pub fn container_cgroup_path(&self, id: &str) -> PathBuf {
        container_cgroup_path(self.qos, &self.uid, id)
    }

    /// Creates and starts container `name` running `command` from `image`, which containerd must
    /// already have (nothing is pulled).
    pub fn create_container(
        &self,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> anyhow::Result<ContainerId> {
        self.create_container_with(name, image, command, |_| {})
    }

    /// As [`PodHandle::create_container`], with `customize` changing the container's config
    /// (mounts, capabilities, environment) before it is created.
    pub fn create_container_with(
        &self,
        name: &str,
        image: &str,
        command: &[&str],
        customize: impl FnOnce(&mut proto::ContainerConfig),
    ) -> anyhow::Result<ContainerId> {
        let metadata = self.config.metadata.clone().unwrap_or_default();
        let log_dir = Path::new(&self.config.log_directory).join(name);
        std::fs::create_dir_all(&log_dir)
            .with_context(|| format!("creating {}", log_dir.display()))?;
        let mut labels = pod_labels(&metadata.namespace, &metadata.name, &self.uid);
        labels.insert(LABEL_CONTAINER_NAME.to_owned(), name.to_owned());
        let config = proto::ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.to_owned(),
                attempt: 0,
            }),
            image: Some(proto::ImageSpec {
                image: image.to_owned(),
            }),
            command: command.iter().map(|&c| c.to_owned()).collect(),
            labels,
            log_path: format!("{name}/0.log"),
            linux: Some(proto::LinuxContainerConfig {
                resources: Some(self.qos.resources()),
                security_context: Some(proto::LinuxContainerSecurityContext {
                    capabilities: None,
                    privileged: false,
                    namespace_options: Some(namespace_options(self.host_pid)),
                }),
            }),
            ..Default::default()
        };
        let mut config = config;
        customize(&mut config);
        let id = self
            .client
            .create_container(&self.sandbox_id, &config, &self.config)?;
        self.tracked().push(id.clone());
        self.client.start_container(&id)?;
        Ok(id)
    }

    /// Stops container `id` (a short grace period, then SIGKILL), and once more if that fails,
    /// as the kubelet stops again at its next sync. containerd 1.7 under software emulation can
    /// end the grace period while it is still reaping a task that exited on the SIGTERM; its
    /// SIGKILL then finds the task's shim gone (`failed to kill container …: ttrpc: closed`),
    /// and the second call finds the container exited.
    pub fn stop_container(&self, id: &ContainerId) -> anyhow::Result<()> {
        match self.client.stop_container(id, STOP_GRACE_SECONDS) {
            Ok(()) => Ok(()),
            Err(first) => self
                .client
                .stop_container(id, STOP_GRACE_SECONDS)
                .map_err(|again| again.context(format!("stopped again after: {first:#}"))),
        }
    }

    /// Stops and removes container `id`.
    pub fn remove_container(&self, id: &ContainerId) -> anyhow::Result<()> {
        self.stop_container(id)?;
        self.client.remove_container(id)?;
        self.tracked().retain(|c| c != id);
        Ok(())
    }

    /// The state and exit code of container `id`.
    pub fn container_status(&self, id: &ContainerId) -> anyhow::Result<ContainerStatus> {
        self.client.container_status(id)
    }

    /// Stops and removes every container, then the sandbox and the pod's log directory; the
    /// first failure is returned after trying everything.
    pub fn remove(mut self) -> anyhow::Result<()> {
        self.remove_all()
    }

    fn remove_all(&mut self) -> anyhow::Result<()> {
        if self.removed {
            return Ok(());
        }
        self.removed = true;
        let mut results = Vec::new();
        let containers = std::mem::take(&mut *self.tracked());
        for id in containers {
            results.push(self.stop_container(&id));
            results.push(self.client.remove_container(&id));
        }
        results.push(self.client.stop_pod_sandbox(&self.sandbox_id));
        results.push(self.client.remove_pod_sandbox(&self.sandbox_id));
        match std::fs::remove_dir_all(&self.config.log_directory) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                results.push(Err(e).context(format!("removing {}", self.config.log_directory)));
            }
            _ => {}
        }
        results.into_iter().collect()
    }
}

impl Drop for PodHandle {
    fn drop(&mut self) {
        if let Err(e) = self.remove_all() {
            eprintln!("warning: removing pod {}: {e:#}", self.sandbox_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    #[test]
    fn uid_dashes_become_underscores() {
        assert_eq!(slice_uid(UID), "0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0");
        assert_eq!(slice_uid("no-dash-left-"), "no_dash_left_");
        assert_eq!(slice_uid("plain"), "plain");
    }

    #[test]
    fn cgroup_names_per_qos() {
        let root = "/sys/fs/cgroup/kubepods.slice";
        let cases = [
            (
                Qos::Guaranteed,
                "kubepods-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice",
                "",
            ),
            (
                Qos::Burstable,
                "kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice",
                "/kubepods-burstable.slice",
            ),
            (
                Qos::BestEffort,
                "kubepods-besteffort-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice",
                "/kubepods-besteffort.slice",
            ),
        ];
        for (qos, slice, level) in cases {
            assert_eq!(pod_slice(qos, UID), slice, "{qos:?}");
            let pod = format!("{root}{level}/{slice}");
            assert_eq!(pod_cgroup_path(qos, UID), Path::new(&pod), "{qos:?}");
            assert_eq!(
                container_cgroup_path(qos, UID, "abc123"),
                Path::new(&format!("{pod}/cri-containerd-abc123.scope")),
                "{qos:?}"
            );
        }
    }

    #[test]
    fn besteffort_container_cgroup_spelled_out() {
        assert_eq!(
            container_cgroup_path(Qos::BestEffort, UID, "abc123"),
            Path::new(
                "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/\
                 kubepods-besteffort-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/\
                 cri-containerd-abc123.scope"
            )
        );
    }
}
