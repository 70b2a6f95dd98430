//! CRI client: pod namespace, pod and container names from the container runtime.
//!
//! The cgroup path only carries ids; the runtime's CRI socket (containerd, CRI-O) knows the names.
//! [`spawn`] runs one background task that lists containers and pod sandboxes, and publishes the
//! joined result in a [`CriHandle`], so the tick reads names from memory and never waits on the
//! socket.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tally_error_chain::chain;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::codec::ProstCodec;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use super::Names;
use crate::config::CriConfig;

pub mod proto;

/// Container name given to a pod sandbox id, as the kubelet and cAdvisor name the pause container.
pub const SANDBOX_CONTAINER: &str = "POD";

/// Reasons [`CriHandle::errors`] counts, a fixed set so they can be metric labels.
pub const ERROR_REASONS: [&str; 3] = ["connect", "list", "timeout"];

/// kubelet's limit for CRI answers; tonic's default of 4 MiB is too small for a ListContainers on a
/// node with a few thousand containers (exited ones included).
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Listings triggered by [`CriHandle::request_refresh`] are at least this far apart, because a
/// container the runtime does not know (not a CRI container) is requested again on every tick.
const MIN_LIST_GAP: Duration = Duration::from_secs(1);

/// First retry delay when no endpoint answers; doubles up to the refresh interval.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// A failed CRI call; the variant names the call.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("no CRI endpoint configured")]
    NoEndpoints,
    #[error("connecting to CRI socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("calling ListContainers on {path}")]
    ListContainers {
        path: PathBuf,
        #[source]
        source: tonic::Status,
    },
    #[error("calling ListPodSandbox on {path}")]
    ListPodSandbox {
        path: PathBuf,
        #[source]
        source: tonic::Status,
    },
    #[error("call {call} on {path} got no answer within {timeout_ms} ms")]
    Timeout {
        call: &'static str,
        path: PathBuf,
        timeout_ms: u64,
    },
    /// Every endpoint failed; `last` is the failure of the last one tried.
    #[error("none of {tried} CRI endpoints answered")]
    Unreachable {
        tried: usize,
        #[source]
        last: Box<CriError>,
    },
}

impl CriError {
    /// The counter label of this failure, one of [`ERROR_REASONS`].
    pub fn reason(&self) -> &'static str {
        match self {
            CriError::NoEndpoints | CriError::Connect { .. } => "connect",
            CriError::ListContainers { .. } | CriError::ListPodSandbox { .. } => "list",
            CriError::Timeout { .. } => "timeout",
            CriError::Unreachable { last, .. } => last.reason(),
        }
    }
}

/// A connection to one CRI socket that answered.
#[derive(Debug, Clone)]
pub struct CriClient {
    endpoint: PathBuf,
    grpc: tonic::client::Grpc<Channel>,
    timeout: Duration,
}

impl CriClient {
    /// Connects to the socket at `path` and checks that it answers a ListPodSandbox call; `timeout`
    /// bounds the connection and the check together, and every later call.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, CriError> {
        tokio::time::timeout(timeout, Self::connect_inner(path, timeout))
            .await
            .map_err(|_| CriError::Timeout {
                call: "ListPodSandbox",
                path: path.to_path_buf(),
                timeout_ms: millis(timeout),
            })?
    }

    async fn connect_inner(path: &Path, timeout: Duration) -> Result<Self, CriError> {
        let channel = super::grpc::unix_channel(path, timeout)
            .await
            .map_err(|source| CriError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let client = Self {
            endpoint: path.to_path_buf(),
            grpc: tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES),
            timeout,
        };
        client.list_pod_sandboxes().await?;
        Ok(client)
    }

    /// Connects to the first of `endpoints` that answers, trying them in order.
    pub async fn connect_first(endpoints: &[PathBuf], timeout: Duration) -> Result<Self, CriError> {
        let mut last = None;
        for path in endpoints {
            match Self::connect(path, timeout).await {
                Ok(client) => return Ok(client),
                Err(e) => {
                    debug!(endpoint = %path.display(), error = %chain(&e), "CRI endpoint did not answer");
                    last = Some(e);
                }
            }
        }
        match last {
            None => Err(CriError::NoEndpoints),
            Some(last) => Err(CriError::Unreachable {
                tried: endpoints.len(),
                last: Box::new(last),
            }),
        }
    }

    /// The socket this client talks to.
    pub fn endpoint(&self) -> &Path {
        &self.endpoint
    }

    async fn unary<Req, Resp>(
        &self,
        call: &'static str,
        path: &'static str,
        request: Req,
    ) -> Result<Resp, CallError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        // Grpc needs `&mut` to poll readiness; a clone shares the channel, so `&self` suffices.
        let mut grpc = self.grpc.clone();
        let call_fut = async move {
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(format!("channel not ready: {e}")))?;
            let codec = ProstCodec::<Req, Resp>::default();
            grpc.unary(
                tonic::Request::new(request),
                PathAndQuery::from_static(path),
                codec,
            )
            .await
            .map(tonic::Response::into_inner)
        };
        match tokio::time::timeout(self.timeout, call_fut).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(status)) => Err(CallError::Status(status)),
            Err(_) => Err(CallError::Timeout(CriError::Timeout {
                call,
                path: self.endpoint.clone(),
                timeout_ms: millis(self.timeout),
            })),
        }
    }

    /// Every container the runtime knows, exited ones included.
    pub async fn list_containers(&self) -> Result<Vec<proto::Container>, CriError> {
        let resp: proto::ListContainersResponse = self
            .unary(
                "ListContainers",
                proto::LIST_CONTAINERS,
                proto::ListContainersRequest::default(),
            )
            .await
            .map_err(|e| {
                e.into_cri(|source| CriError::ListContainers {
                    path: self.endpoint.clone(),
                    source,
                })
            })?;
        Ok(resp.containers)
    }

    /// Every pod sandbox the runtime knows, not-ready ones included.
    pub async fn list_pod_sandboxes(&self) -> Result<Vec<proto::PodSandbox>, CriError> {
        let resp: proto::ListPodSandboxResponse = self
            .unary(
                "ListPodSandbox",
                proto::LIST_POD_SANDBOX,
                proto::ListPodSandboxRequest::default(),
            )
            .await
            .map_err(|e| {
                e.into_cri(|source| CriError::ListPodSandbox {
                    path: self.endpoint.clone(),
                    source,
                })
            })?;
        Ok(resp.items)
    }

    /// Names keyed by container id and by pod sandbox id (see [`join_names`]).
    pub async fn list(&self) -> Result<HashMap<String, Names>, CriError> {
        // Sandboxes first, so a container created between the two calls is still listed (named
        // from its labels) rather than missed until the next listing.
        let sandboxes = self.list_pod_sandboxes().await?;
        let containers = self.list_containers().await?;
        Ok(join_names(&sandboxes, &containers))
    }
}

/// How one call failed before it is named: a status, or the deadline.
enum CallError {
    Status(tonic::Status),
    Timeout(CriError),
}

impl CallError {
    fn into_cri(self, named: impl FnOnce(tonic::Status) -> CriError) -> CriError {
        match self {
            CallError::Status(status) => named(status),
            CallError::Timeout(e) => e,
        }
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

fn label<'a>(labels: &'a HashMap<String, String>, key: &str) -> &'a str {
    labels.get(key).map(String::as_str).unwrap_or("")
}

fn or_label(value: &str, labels: &HashMap<String, String>, key: &str) -> String {
    if value.is_empty() {
        label(labels, key).to_owned()
    } else {
        value.to_owned()
    }
}

/// Joins containers to their sandboxes: namespace and pod name come from the sandbox metadata, the
/// container name from the container metadata; the kubelet's `io.kubernetes.*` labels fill in
/// what is missing (a sandbox not listed, empty metadata). Sandbox ids map to container
/// [`SANDBOX_CONTAINER`], since the pause container's cgroup is named by the sandbox id.
pub fn join_names(
    sandboxes: &[proto::PodSandbox],
    containers: &[proto::Container],
) -> HashMap<String, Names> {
    let mut names = HashMap::with_capacity(sandboxes.len() + containers.len());
    for sandbox in sandboxes {
        let meta = sandbox.metadata.clone().unwrap_or_default();
        names.insert(
            sandbox.id.clone(),
            Names {
                namespace: or_label(&meta.namespace, &sandbox.labels, proto::LABEL_NAMESPACE),
                pod: or_label(&meta.name, &sandbox.labels, proto::LABEL_POD_NAME),
                container: SANDBOX_CONTAINER.to_owned(),
                labels: Arc::new(pod_labels(&sandbox.labels)),
                annotations: Arc::new(kept_annotations(&sandbox.annotations)),
            },
        );
    }
    for container in containers {
        let (namespace, pod, labels, annotations) = match names.get(&container.pod_sandbox_id) {
            Some(pod) if !container.pod_sandbox_id.is_empty() => (
                pod.namespace.clone(),
                pod.pod.clone(),
                pod.labels.clone(),
                pod.annotations.clone(),
            ),
            _ => (
                label(&container.labels, proto::LABEL_NAMESPACE).to_owned(),
                label(&container.labels, proto::LABEL_POD_NAME).to_owned(),
                Arc::default(),
                Arc::default(),
            ),
        };
        let meta_name = container
            .metadata
            .as_ref()
            .map(|m| m.name.as_str())
            .unwrap_or("");
        let container_name = or_label(meta_name, &container.labels, proto::LABEL_CONTAINER_NAME);
        names.insert(
            container.id.clone(),
            Names {
                namespace,
                pod,
                container: container_name,
                labels,
                annotations,
            },
        );
    }
    names
}

/// The prefixes of the pod annotations Tally reads: its own (`tally.io/inference`) and the
/// scrape annotations that point at an inference server's metrics (`prometheus.io/port`).
pub const ANNOTATION_PREFIXES: [&str; 2] = ["tally.io/", "prometheus.io/"];

/// A sandbox's annotations that Tally reads (the rest can be large: last-applied configs).
pub fn kept_annotations(
    annotations: &HashMap<String, String>,
) -> std::collections::BTreeMap<String, String> {
    annotations
        .iter()
        .filter(|(k, _)| ANNOTATION_PREFIXES.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A sandbox's labels are the pod's, plus the kubelet's own (`io.kubernetes.*`), left out.
pub fn pod_labels(labels: &HashMap<String, String>) -> std::collections::BTreeMap<String, String> {
    labels
        .iter()
        .filter(|(k, _)| !k.starts_with("io.kubernetes."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[derive(Debug, Default)]
struct Shared {
    /// Swapped whole on each listing; readers clone the inner `Arc` and never wait on I/O.
    names: RwLock<Arc<HashMap<String, Names>>>,
    up: AtomicBool,
    /// Indexed like [`ERROR_REASONS`].
    errors: [AtomicU64; ERROR_REASONS.len()],
    endpoint: RwLock<Option<PathBuf>>,
    refresh: Notify,
    listings: AtomicU64,
    /// Names the runtime announced over NRI before a listing had them (a container being
    /// created), by id; dropped once a listing has them.
    announced: RwLock<HashMap<String, Names>>,
}

/// Announced names kept at most; beyond, the oldest listing's worth is forgotten (they are in
/// the next listing).
const MAX_ANNOUNCED: usize = 65_536;

/// Shared view of what the runtime reported, cheap to clone. The default handle is down and
/// knows no names.
#[derive(Debug, Clone, Default)]
pub struct CriHandle {
    shared: Arc<Shared>,
}

impl CriHandle {
    /// Names of a container or pod sandbox id, from the last successful listing, or else as the
    /// runtime announced them over NRI.
    pub fn lookup(&self, container_id: &str) -> Option<Names> {
        self.snapshot().get(container_id).cloned().or_else(|| {
            self.shared
                .announced
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(container_id)
                .cloned()
        })
    }

    /// Takes names the runtime announced (NRI) for a container or sandbox the last listing may
    /// not have yet: they are known from the first tick that sees its cgroup, without a listing.
    pub fn announce(&self, id: String, names: Names) {
        let mut announced = self
            .shared
            .announced
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if announced.len() >= MAX_ANNOUNCED {
            announced.clear();
        }
        announced.insert(id, names);
    }

    /// The whole map of the last successful listing.
    pub fn snapshot(&self) -> Arc<HashMap<String, Names>> {
        self.shared
            .names
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Asks the background task for a listing now (rate-limited to one a second), for a container
    /// id [`lookup`](Self::lookup) did not know.
    pub fn request_refresh(&self) {
        self.shared.refresh.notify_one();
    }

    /// Whether the last connection attempt or listing succeeded.
    pub fn up(&self) -> bool {
        self.shared.up.load(Ordering::Relaxed)
    }

    /// Failures so far, by reason; every reason of [`ERROR_REASONS`] is present.
    pub fn errors(&self) -> Vec<(&'static str, u64)> {
        ERROR_REASONS
            .iter()
            .zip(&self.shared.errors)
            .map(|(reason, n)| (*reason, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Successful listings so far.
    pub fn listings(&self) -> u64 {
        self.shared.listings.load(Ordering::Relaxed)
    }

    /// The socket in use, once one answered.
    pub fn endpoint(&self) -> Option<PathBuf> {
        self.shared
            .endpoint
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn count_error(&self, e: &CriError) {
        let reason = e.reason();
        if let Some(i) = ERROR_REASONS.iter().position(|r| *r == reason) {
            self.shared.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn publish(&self, names: HashMap<String, Names>) {
        self.shared
            .announced
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|id, _| !names.contains_key(id));
        *self
            .shared
            .names
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(names);
        self.shared.listings.fetch_add(1, Ordering::Relaxed);
        self.shared.up.store(true, Ordering::Relaxed);
    }

    /// After a failure: down, and no endpoint until one answers again.
    fn set_down(&self) {
        self.shared.up.store(false, Ordering::Relaxed);
        self.set_endpoint(None);
    }

    fn set_endpoint(&self, endpoint: Option<PathBuf>) {
        *self
            .shared
            .endpoint
            .write()
            .unwrap_or_else(PoisonError::into_inner) = endpoint;
    }
}

/// Starts the background task that keeps a [`CriHandle`] filled, until `cancel` fires.
///
/// With no endpoints configured nothing is started and the handle stays down. Must be called
/// from within a tokio runtime.
pub fn spawn(config: &CriConfig, cancel: CancellationToken) -> CriHandle {
    let handle = CriHandle::default();
    if config.endpoints.is_empty() {
        info!("no CRI endpoints configured, pod and container names stay empty");
        return handle;
    }
    tokio::spawn(run(config.clone(), handle.clone(), cancel));
    handle
}

async fn run(config: CriConfig, handle: CriHandle, cancel: CancellationToken) {
    let timeout = Duration::from_millis(config.timeout_ms.max(1));
    let interval = Duration::from_secs(config.refresh_interval_secs.max(1));
    let mut client: Option<CriClient> = None;
    let mut backoff = FIRST_BACKOFF;
    // An outage lasts from the first failure to the next published listing; it logs one WARN,
    // and its retries log at DEBUG.
    let mut in_outage = false;
    loop {
        let started = Instant::now();
        let attempt = async {
            let current = match client.take() {
                Some(c) => c,
                None => {
                    let c = CriClient::connect_first(&config.endpoints, timeout).await?;
                    info!(endpoint = %c.endpoint().display(), "connected to CRI runtime");
                    handle.set_endpoint(Some(c.endpoint().to_path_buf()));
                    c
                }
            };
            let names = current.list().await?;
            Ok::<_, CriError>((current, names))
        };
        match cancel.run_until_cancelled(attempt).await {
            None => return,
            Some(Ok((current, names))) => {
                debug!(entries = names.len(), "CRI listing published");
                handle.publish(names);
                client = Some(current);
                backoff = FIRST_BACKOFF;
                in_outage = false;
            }
            Some(Err(e)) => {
                // The old names stay: running containers keep their names across a runtime
                // restart, and empty labels would split their series.
                handle.count_error(&e);
                handle.set_down();
                if in_outage {
                    debug!(error = %chain(&e), retry_in = ?backoff, "CRI still failing");
                } else {
                    warn!(
                        error = %chain(&e),
                        "CRI runtime unavailable, keeping the last names and retrying"
                    );
                    in_outage = true;
                }
                // Also after a failed listing on a connection that answered its probe, so a
                // runtime that fails only ListContainers is not called in a tight loop.
                if cancel
                    .run_until_cancelled(tokio::time::sleep(backoff))
                    .await
                    .is_none()
                {
                    return;
                }
                backoff = (backoff * 2).min(interval);
                continue;
            }
        }

        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
            () = handle.shared.refresh.notified() => {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep_until(started + MIN_LIST_GAP) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
