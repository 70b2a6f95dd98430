//! A fake CRI runtime: a real tonic gRPC server on a unix socket answering `ListContainers` and
//! `ListPodSandbox` from a pod list the test controls.
//!
//! It runs on its own thread with its own tokio runtime, so plain `#[test]`s can use it and the
//! agent binary, a separate process, can dial its socket file.

use std::collections::HashMap;
use std::convert::Infallible;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use tally_agent::identity::cri::proto;
use tally_agent::identity::podresources::proto as podresources;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::body::BoxBody;
use tonic::codec::ProstCodec;
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::{NamedService, UnaryService};
use tonic::{Request, Response, Status};

/// One pod as the fake runtime reports it: a sandbox plus its containers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakePod {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub sandbox_id: String,
    /// `(container id, container name)`.
    pub containers: Vec<(String, String)>,
    /// `(container name, device ids)` the kubelet's pod-resources API reports (`nvidia.com/gpu`).
    pub devices: Vec<(String, Vec<String>)>,
    /// The pod's own labels, which the kubelet puts on its sandbox (not on its containers).
    pub labels: Vec<(String, String)>,
    /// The pod's annotations, which the kubelet puts on its sandbox.
    pub annotations: Vec<(String, String)>,
}

impl FakePod {
    /// A pod whose uid and sandbox id are derived from its name, for tests that do not care.
    pub fn new(namespace: &str, name: &str, containers: &[(&str, &str)]) -> Self {
        Self {
            uid: format!("uid-{namespace}-{name}"),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            sandbox_id: format!("sandbox-{namespace}-{name}"),
            containers: containers
                .iter()
                .map(|(id, name)| ((*id).to_owned(), (*name).to_owned()))
                .collect(),
            devices: Vec::new(),
            labels: Vec::new(),
            annotations: Vec::new(),
        }
    }

    /// The labels the kubelet puts on this pod's sandbox and containers.
    fn labels(&self) -> HashMap<String, String> {
        HashMap::from([
            (proto::LABEL_NAMESPACE.to_owned(), self.namespace.clone()),
            (proto::LABEL_POD_NAME.to_owned(), self.name.clone()),
            (proto::LABEL_POD_UID.to_owned(), self.uid.clone()),
        ])
    }
}

#[derive(Debug, Default)]
struct State {
    pods: Mutex<Vec<FakePod>>,
    list_containers: AtomicU64,
    list_pod_sandbox: AtomicU64,
    unavailable: AtomicBool,
}

impl State {
    fn pods(&self) -> Vec<FakePod> {
        self.pods
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The error every call answers while [`FakeCri::set_unavailable`] is set.
    fn refusal(&self) -> Option<Status> {
        self.unavailable
            .load(Ordering::Relaxed)
            .then(|| Status::unavailable("fake CRI set unavailable"))
    }

    fn list_containers(&self) -> proto::ListContainersResponse {
        let containers = self
            .pods()
            .iter()
            .flat_map(|pod| {
                pod.containers.iter().map(move |(id, name)| {
                    let mut labels = pod.labels();
                    labels.insert(proto::LABEL_CONTAINER_NAME.to_owned(), name.clone());
                    proto::Container {
                        id: id.clone(),
                        pod_sandbox_id: pod.sandbox_id.clone(),
                        metadata: Some(proto::ContainerMetadata {
                            name: name.clone(),
                            attempt: 0,
                        }),
                        state: proto::ContainerState::ContainerRunning as i32,
                        labels,
                        annotations: HashMap::new(),
                    }
                })
            })
            .collect();
        proto::ListContainersResponse { containers }
    }

    fn list_pod_resources(&self) -> podresources::ListPodResourcesResponse {
        let pod_resources = self
            .pods()
            .iter()
            .map(|pod| podresources::PodResources {
                name: pod.name.clone(),
                namespace: pod.namespace.clone(),
                containers: pod
                    .devices
                    .iter()
                    .map(|(container, ids)| podresources::ContainerResources {
                        name: container.clone(),
                        devices: vec![podresources::ContainerDevices {
                            resource_name: "nvidia.com/gpu".to_owned(),
                            device_ids: ids.clone(),
                        }],
                    })
                    .collect(),
            })
            .collect();
        podresources::ListPodResourcesResponse { pod_resources }
    }

    fn list_pod_sandbox(&self) -> proto::ListPodSandboxResponse {
        let items = self
            .pods()
            .iter()
            .map(|pod| proto::PodSandbox {
                id: pod.sandbox_id.clone(),
                metadata: Some(proto::PodSandboxMetadata {
                    name: pod.name.clone(),
                    uid: pod.uid.clone(),
                    namespace: pod.namespace.clone(),
                    attempt: 0,
                }),
                state: proto::PodSandboxState::SandboxReady as i32,
                labels: pod.labels().into_iter().chain(pod.labels.clone()).collect(),
                annotations: pod.annotations.iter().cloned().collect(),
            })
            .collect();
        proto::ListPodSandboxResponse { items }
    }
}

/// `runtime.v1.RuntimeService`, routed by hand since there is no generated server code.
#[derive(Debug, Clone)]
struct RuntimeService {
    state: Arc<State>,
}

impl NamedService for RuntimeService {
    const NAME: &'static str = proto::SERVICE;
}

/// The kubelet's `v1.PodResourcesLister` on the same server (tonic routes by service name), for
/// tests that point the agent's pod-resources socket here.
#[derive(Debug, Clone)]
struct PodResourcesLister(RuntimeService);

impl NamedService for PodResourcesLister {
    const NAME: &'static str = "v1.PodResourcesLister";
}

impl Service<http::Request<BoxBody>> for PodResourcesLister {
    type Response = http::Response<BoxBody>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<BoxBody>) -> Self::Future {
        self.0.call(req)
    }
}

struct ListContainers(Arc<State>);

impl UnaryService<proto::ListContainersRequest> for ListContainers {
    type Response = proto::ListContainersResponse;
    type Future = std::future::Ready<Result<Response<Self::Response>, Status>>;

    fn call(&mut self, _request: Request<proto::ListContainersRequest>) -> Self::Future {
        let state = &self.0;
        state.list_containers.fetch_add(1, Ordering::Relaxed);
        std::future::ready(match state.refusal() {
            Some(status) => Err(status),
            None => Ok(Response::new(state.list_containers())),
        })
    }
}

struct ListPodResources(Arc<State>);

impl UnaryService<podresources::ListPodResourcesRequest> for ListPodResources {
    type Response = podresources::ListPodResourcesResponse;
    type Future = std::future::Ready<Result<Response<Self::Response>, Status>>;

    fn call(&mut self, _request: Request<podresources::ListPodResourcesRequest>) -> Self::Future {
        let state = &self.0;
        std::future::ready(match state.refusal() {
            Some(status) => Err(status),
            None => Ok(Response::new(state.list_pod_resources())),
        })
    }
}

struct ListPodSandbox(Arc<State>);

impl UnaryService<proto::ListPodSandboxRequest> for ListPodSandbox {
    type Response = proto::ListPodSandboxResponse;
    type Future = std::future::Ready<Result<Response<Self::Response>, Status>>;

    fn call(&mut self, _request: Request<proto::ListPodSandboxRequest>) -> Self::Future {
        let state = &self.0;
        state.list_pod_sandbox.fetch_add(1, Ordering::Relaxed);
        std::future::ready(match state.refusal() {
            Some(status) => Err(status),
            None => Ok(Response::new(state.list_pod_sandbox())),
        })
    }
}

impl Service<http::Request<BoxBody>> for RuntimeService {
    type Response = http::Response<BoxBody>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<BoxBody>) -> Self::Future {
        let state = self.state.clone();
        match req.uri().path() {
            proto::LIST_CONTAINERS => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
                Ok(grpc.unary(ListContainers(state), req).await)
            }),
            podresources::LIST => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
                Ok(grpc.unary(ListPodResources(state), req).await)
            }),
            proto::LIST_POD_SANDBOX => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
                Ok(grpc.unary(ListPodSandbox(state), req).await)
            }),
            other => {
                let status = Status::unimplemented(format!("fake CRI does not serve {other}"));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// A running fake runtime; dropping it stops the server and removes the socket file.
#[derive(Debug)]
pub struct FakeCri {
    socket: PathBuf,
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeCri {
    /// Serves `pods` on a new unix socket at `socket_path`. The socket is bound (and accepting)
    /// when this returns, so a client may connect at once.
    pub fn start(socket_path: impl Into<PathBuf>, pods: Vec<FakePod>) -> std::io::Result<FakeCri> {
        let socket = socket_path.into();
        // Bound here rather than on the server thread so that a bad path fails `start`, and so
        // that no caller can race the bind.
        let listener = StdUnixListener::bind(&socket)?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let state = Arc::new(State {
            pods: Mutex::new(pods),
            ..State::default()
        });
        let service = RuntimeService {
            state: state.clone(),
        };
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("fake-cri".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::UnixListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("fake CRI: registering the listener: {e}");
                            return;
                        }
                    };
                    let serve = tonic::transport::Server::builder()
                        .add_service(PodResourcesLister(service.clone()))
                        .add_service(service)
                        .serve_with_incoming(UnixListenerStream::new(listener));
                    // Not a graceful shutdown, which would wait for clients to hang up: dropping
                    // the runtime below closes open connections at once, as a runtime crash does.
                    tokio::select! {
                        served = serve => {
                            if let Err(e) = served {
                                eprintln!("fake CRI: serving: {e}");
                            }
                        }
                        // A dropped sender stops the server too.
                        _ = stopped => {}
                    }
                });
                drop(runtime);
            })?;
        Ok(FakeCri {
            socket,
            state,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// The socket file clients dial.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Replaces the pods every later call reports.
    pub fn set_pods(&self, pods: Vec<FakePod>) {
        *self
            .state
            .pods
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = pods;
    }

    /// While set, every call fails with `UNAVAILABLE`, as a runtime that is restarting does.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.state.unavailable.store(unavailable, Ordering::Relaxed);
    }

    /// `ListContainers` calls received so far, failed ones included.
    pub fn list_containers_calls(&self) -> u64 {
        self.state.list_containers.load(Ordering::Relaxed)
    }

    /// `ListPodSandbox` calls received so far, failed ones included (each client connection
    /// starts with one).
    pub fn list_pod_sandbox_calls(&self) -> u64 {
        self.state.list_pod_sandbox.load(Ordering::Relaxed)
    }

    /// All calls received so far.
    pub fn calls(&self) -> u64 {
        self.list_containers_calls() + self.list_pod_sandbox_calls()
    }
}

impl Drop for FakeCri {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}
