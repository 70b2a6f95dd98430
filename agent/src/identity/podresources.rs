//! The kubelet's pod-resources API (`v1.PodResourcesLister/List`): which pod container holds
//! which device, even when its processes are invisible to the agent (no hostPID) — the join that
//! charges a GPU to a pod from its device id (`GPU-…`, `GPU-…::N` for time-slicing replicas,
//! `MIG-…`). Polled every tick on a background task, so a pod that exits stops being charged at
//! the next tick.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::codec::ProstCodec;
use tonic::codegen::http::uri::PathAndQuery;

use super::Names;

/// The subset of `k8s.io/kubelet/pkg/apis/podresources/v1/api.proto` Tally reads; hand-written
/// (no `protoc` in the build), tags are upstream's, prost skips the rest.
pub mod proto {
    pub const LIST: &str = "/v1.PodResourcesLister/List";

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListPodResourcesRequest {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListPodResourcesResponse {
        #[prost(message, repeated, tag = "1")]
        pub pod_resources: Vec<PodResources>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodResources {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub namespace: String,
        #[prost(message, repeated, tag = "3")]
        pub containers: Vec<ContainerResources>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerResources {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, repeated, tag = "2")]
        pub devices: Vec<ContainerDevices>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerDevices {
        #[prost(string, tag = "1")]
        pub resource_name: String,
        #[prost(string, repeated, tag = "2")]
        pub device_ids: Vec<String>,
    }
}

/// A device id as NVML names the device: time-slicing replicas (`GPU-…::3`) are the GPU.
pub fn device_uuid(id: &str) -> &str {
    id.split("::").next().unwrap_or(id)
}

/// Device UUID → the pod containers it is assigned to (several for time-slicing replicas).
pub type Assignments = HashMap<String, Vec<Names>>;

/// Joins a List answer into [`Assignments`].
pub fn assignments(response: &proto::ListPodResourcesResponse) -> Assignments {
    let mut out: Assignments = HashMap::new();
    for pod in &response.pod_resources {
        for container in &pod.containers {
            for devices in &container.devices {
                for id in &devices.device_ids {
                    let holders = out.entry(device_uuid(id).to_owned()).or_default();
                    let names = Names {
                        namespace: pod.namespace.clone(),
                        pod: pod.name.clone(),
                        container: container.name.clone(),
                        ..Names::default()
                    };
                    if !holders.contains(&names) {
                        holders.push(names);
                    }
                }
            }
        }
    }
    out
}

#[derive(Debug, Default)]
struct Shared {
    assignments: RwLock<Arc<Assignments>>,
    up: AtomicBool,
    errors: AtomicU64,
}

/// What the kubelet last said; cheap to clone, never waits on the socket.
#[derive(Debug, Clone, Default)]
pub struct DevicesHandle(Arc<Shared>);

impl DevicesHandle {
    pub fn assignments(&self) -> Arc<Assignments> {
        self.0
            .assignments
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn up(&self) -> bool {
        self.0.up.load(Ordering::Relaxed)
    }

    /// Failed List calls so far.
    pub fn errors(&self) -> u64 {
        self.0.errors.load(Ordering::Relaxed)
    }
}

/// Why one List call failed. Each message ends with its cause's own, as the poller has always
/// logged it; so the cause is a plain field, not a `#[source]`, and is never printed twice.
#[derive(Debug, thiserror::Error)]
enum ListError {
    #[error("connecting to {}: {error}", socket.display())]
    Connect {
        socket: PathBuf,
        error: tonic::transport::Error,
    },
    #[error("{}: {error}", socket.display())]
    NotReady {
        socket: PathBuf,
        error: tonic::transport::Error,
    },
    #[error("List: {status}")]
    Refused { status: tonic::Status },
    #[error("List: no answer within {} ms", timeout.as_millis())]
    Deadline { timeout: Duration },
}

async fn list(socket: &Path, timeout: Duration) -> Result<Assignments, ListError> {
    let call = async {
        let channel = super::grpc::unix_channel(socket, timeout)
            .await
            .map_err(|error| ListError::Connect {
                socket: socket.to_path_buf(),
                error,
            })?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.map_err(|error| ListError::NotReady {
            socket: socket.to_path_buf(),
            error,
        })?;
        let response: tonic::Response<proto::ListPodResourcesResponse> = grpc
            .unary(
                tonic::Request::new(proto::ListPodResourcesRequest {}),
                PathAndQuery::from_static(proto::LIST),
                ProstCodec::default(),
            )
            .await
            .map_err(|status| ListError::Refused { status })?;
        Ok(assignments(response.get_ref()))
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| ListError::Deadline { timeout })?
}

/// Polls the kubelet every `interval` until `cancel`. A missing socket (not a Kubernetes node) is
/// one INFO line; failures keep the last answer, are counted, and are logged once per outage.
pub fn spawn(socket: PathBuf, interval: Duration, cancel: CancellationToken) -> DevicesHandle {
    let handle = DevicesHandle::default();
    let shared = handle.0.clone();
    tokio::spawn(async move {
        let timeout = interval.clamp(Duration::from_millis(200), Duration::from_secs(2));
        let mut logged = false;
        loop {
            match list(&socket, timeout).await {
                Ok(assignments) => {
                    *shared
                        .assignments
                        .write()
                        .unwrap_or_else(PoisonError::into_inner) = Arc::new(assignments);
                    if !shared.up.swap(true, Ordering::Relaxed) {
                        tracing::info!(socket = %socket.display(), "kubelet pod-resources answering");
                    }
                    logged = false;
                }
                Err(error) => {
                    shared.up.store(false, Ordering::Relaxed);
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    if !logged {
                        tracing::info!(%error, "kubelet pod-resources unavailable: devices are charged from visible processes only");
                        logged = true;
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    });
    handle
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::proto::*;
    use super::*;

    #[test]
    fn replicas_and_mig_devices_map_to_their_pod_containers() {
        let pod = |ns: &str, name: &str, ids: &[&str]| PodResources {
            name: name.into(),
            namespace: ns.into(),
            containers: vec![ContainerResources {
                name: "cuda".into(),
                devices: vec![ContainerDevices {
                    resource_name: "nvidia.com/gpu".into(),
                    device_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
                }],
            }],
        };
        let response = ListPodResourcesResponse {
            pod_resources: vec![
                pod("ml", "a", &["GPU-1::0"]),
                pod("ml", "b", &["GPU-1::1", "GPU-1::2"]),
                pod("ml", "c", &["MIG-7"]),
            ],
        };
        // Round-trip through the wire format with upstream's tags.
        let decoded = ListPodResourcesResponse::decode(&response.encode_to_vec()[..]).unwrap();
        let map = assignments(&decoded);
        let pods = |id: &str| -> Vec<String> { map[id].iter().map(|n| n.pod.clone()).collect() };
        assert_eq!(pods("GPU-1"), ["a", "b"]);
        assert_eq!(pods("MIG-7"), ["c"]);
        assert_eq!(device_uuid("GPU-1::12"), "GPU-1");
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_connect_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("kubelet.sock");
        let e = list(&socket, Duration::from_millis(200)).await.unwrap_err();
        assert!(matches!(e, ListError::Connect { .. }), "{e:?}");
        let prefix = format!("connecting to {}: ", socket.display());
        assert!(e.to_string().starts_with(&prefix), "{e}");
    }
}
