//! Tally as an NRI plugin: the container runtime (containerd 1.7 with NRI enabled, 2.x, CRI-O
//! 1.30+) asks it on every `CreateContainer` whether the container may start, and how.
//!
//! The plugin connects to the runtime's socket, registers, answers `Configure` (subscribing to
//! `CreateContainer` only) and `Synchronize`, then decides each new container from the verdicts
//! the budget engine published at its last tick (`budget::verdict`): admit, admit under a CPU
//! quota, or refuse with a message naming the budget. The call path reads memory only; a verdict
//! older than `admission.max_verdict_age_ticks` ticks is unknown, and `admission.on_unknown`
//! decides.
//!
//! The runtime fails open: while Tally is not registered (not started, restarting, crashed) it
//! creates containers without asking. The first tick's hold at start (`admission = "deny"`)
//! still catches those.
//!
//! `wire` is the socket's framing, `proto` the messages. The ttrpc crate (containerd/ttrpc-rust)
//! was not used: it serves a whole socket, and NRI multiplexes two ttrpc connections over one.

pub mod proto;
#[cfg(test)]
mod tests;
pub mod wire;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use thiserror::Error;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use crate::budget::verdict::{Board, Candidate, Decision, CPU_PERIOD_US};
use crate::config::admission::OnUnknown;
use crate::config::Config;
use crate::identity::cri::{kept_annotations, pod_labels, CriHandle, SANDBOX_CONTAINER};
use crate::identity::Names;
use proto::{
    event_mask, ConfigureRequest, ConfigureResponse, ContainerAdjustment, CreateContainerRequest,
    CreateContainerResponse, Empty, LinuxContainerAdjustment, LinuxCpu, LinuxResources, NoUpdates,
    OptionalInt64, OptionalUInt64, PodSandbox, RegisterPluginRequest, Request, Response,
    StateChangeEvent, Status, SynchronizeRequest, SynchronizeResponse,
};
use wire::{Demux, Message, PLUGIN_CONN, RUNTIME_CONN, TYPE_REQUEST, TYPE_RESPONSE};

/// The runtime drops a plugin that has not registered within 5 s; so does Tally a runtime that
/// has not answered by then.
const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnection backoff.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(30);

/// What the plugin needs from the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub socket: PathBuf,
    pub name: String,
    pub index: String,
    /// Verdicts older than this are unknown.
    pub max_age: Duration,
    pub on_unknown: OnUnknown,
}

impl Settings {
    /// The plugin's settings; `None` when `admission.nri_socket` is unset.
    pub fn of(config: &Config) -> Option<Settings> {
        let a = &config.admission;
        if a.nri_socket.as_os_str().is_empty() {
            return None;
        }
        Some(Settings {
            socket: a.nri_socket.clone(),
            name: a.plugin_name.clone(),
            index: a.plugin_index.clone(),
            max_age: config.tick_interval() * a.max_verdict_age_ticks,
            on_unknown: a.on_unknown,
        })
    }
}

/// Why a session with the runtime ended.
#[derive(Debug, Error)]
pub enum SessionError {
    #[error("cannot connect to {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading or writing the NRI socket")]
    Io(#[from] std::io::Error),
    #[error("the runtime sent a malformed frame")]
    Wire(#[from] wire::WireError),
    #[error("the runtime's answer to RegisterPlugin does not decode")]
    Decode(#[from] prost::DecodeError),
    #[error("the runtime refused the registration: {0}")]
    Refused(String),
    #[error("the runtime did not answer RegisterPlugin within {0:?}")]
    RegistrationTimeout(Duration),
}

impl SessionError {
    /// Its kind, for telling a new failure from the same one again.
    fn kind(&self) -> &'static str {
        match self {
            SessionError::Connect { .. } => "connect",
            SessionError::Io(_) => "io",
            SessionError::Wire(_) => "wire",
            SessionError::Decode(_) => "decode",
            SessionError::Refused(_) => "refused",
            SessionError::RegistrationTimeout(_) => "timeout",
        }
    }
}

/// Starts the plugin task when `admission.nri_socket` is set, until `cancel` fires. It
/// reconnects (1 s, doubling to 30 s) whenever the runtime is away or drops it.
/// The runtime's announcements of pods and containers go to `cri`, where identity finds them
/// before the next CRI listing has them.
pub fn spawn(
    config: &Config,
    board: Arc<Board>,
    cri: Option<CriHandle>,
    cancel: CancellationToken,
) {
    let Some(settings) = Settings::of(config) else {
        return;
    };
    board.enable_nri();
    tokio::spawn(run(settings, board, cri, cancel));
}

async fn run(
    settings: Settings,
    board: Arc<Board>,
    cri: Option<CriHandle>,
    cancel: CancellationToken,
) {
    let mut backoff = FIRST_RETRY;
    let mut last_failure: Option<&'static str> = None;
    loop {
        let result = tokio::select! {
            () = cancel.cancelled() => return,
            r = session(&settings, &board, cri.clone()) => r,
        };
        board.set_connected(false);
        match result {
            Ok(()) => {
                tracing::warn!(
                    socket = %settings.socket.display(),
                    "the container runtime closed the NRI connection: it creates containers without asking Tally until the plugin registers again"
                );
                backoff = FIRST_RETRY;
                last_failure = None;
            }
            Err(e) => {
                // Once per kind of failure: a runtime that is away stays away for a while.
                if last_failure != Some(e.kind()) {
                    tracing::warn!(
                        socket = %settings.socket.display(),
                        error = %tally_error_chain::chain(&e),
                        "NRI plugin not registered; retrying (the runtime admits every container meanwhile)"
                    );
                }
                last_failure = Some(e.kind());
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(LAST_RETRY);
    }
}

/// One connection to the runtime, until it closes (`Ok`) or fails.
async fn session(
    settings: &Settings,
    board: &Arc<Board>,
    cri: Option<CriHandle>,
) -> Result<(), SessionError> {
    let mut stream = tokio::net::UnixStream::connect(&settings.socket)
        .await
        .map_err(|source| SessionError::Connect {
            path: settings.socket.display().to_string(),
            source,
        })?;
    let mut plugin = Plugin::new(settings.clone(), board.clone(), cri);
    stream.write_all(&plugin.register()).await?;
    let deadline = tokio::time::Instant::now() + REGISTRATION_TIMEOUT;
    let mut demux = Demux::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = if plugin.registered {
            stream.read(&mut buf).await?
        } else {
            tokio::time::timeout_at(deadline, stream.read(&mut buf))
                .await
                .map_err(|_| SessionError::RegistrationTimeout(REGISTRATION_TIMEOUT))??
        };
        if n == 0 {
            return Ok(());
        }
        for (conn, message) in demux.feed(&buf[..n])? {
            if let Some(reply) = plugin.handle(conn, message)? {
                stream.write_all(&reply).await?;
            }
        }
    }
}

/// The protocol's state, apart from the socket: what to send, and what each message means.
#[derive(Debug)]
pub struct Plugin {
    settings: Settings,
    board: Arc<Board>,
    /// Where pod and container names the runtime announces go.
    cri: Option<CriHandle>,
    registered: bool,
    /// The runtime's name and version, once it configured the plugin.
    runtime: Option<String>,
    /// The publication time (`Verdicts::at`) of the verdicts that were stale when an unknown
    /// decision was last logged: one line per stall of the tick, not one per container.
    stall_logged: Option<Option<Instant>>,
}

impl Plugin {
    pub fn new(settings: Settings, board: Arc<Board>, cri: Option<CriHandle>) -> Plugin {
        Plugin {
            settings,
            board,
            cri,
            registered: false,
            runtime: None,
            stall_logged: None,
        }
    }

    /// Whether an unknown decision on verdicts published at `at` starts a stall not logged yet.
    /// Every decision is counted (`tally_admission_nri_decisions_total{decision="unknown"}`);
    /// only the first of a stall is logged, and a later stall (the tick published since) is
    /// logged again.
    fn first_of_stall(&mut self, at: Option<Instant>) -> bool {
        if self.stall_logged == Some(at) {
            return false;
        }
        self.stall_logged = Some(at);
        true
    }

    /// The runtime's name and version, once it configured the plugin.
    pub fn runtime(&self) -> Option<&str> {
        self.runtime.as_deref()
    }

    /// The `RegisterPlugin` call: the first message on the runtime's connection, stream 1.
    pub fn register(&self) -> Vec<u8> {
        let request = Request {
            service: proto::RUNTIME_SERVICE.to_owned(),
            method: "RegisterPlugin".to_owned(),
            payload: RegisterPluginRequest {
                plugin_name: self.settings.name.clone(),
                plugin_idx: self.settings.index.clone(),
            }
            .encode_to_vec(),
            ..Request::default()
        };
        wire::trunk_frames(
            RUNTIME_CONN,
            &wire::ttrpc_message(1, TYPE_REQUEST, &request.encode_to_vec()),
        )
    }

    /// Handles one message; returns the bytes to send back, if any.
    pub fn handle(&mut self, conn: u32, message: Message) -> Result<Option<Vec<u8>>, SessionError> {
        match (conn, message.kind) {
            (RUNTIME_CONN, TYPE_RESPONSE) => {
                let response = Response::decode(message.payload.as_slice())?;
                match response.status {
                    Some(s) if s.code != 0 => Err(SessionError::Refused(s.message)),
                    _ => {
                        self.registered = true;
                        self.board.set_connected(true);
                        Ok(None)
                    }
                }
            }
            (PLUGIN_CONN, TYPE_REQUEST) => {
                let response = match Request::decode(message.payload.as_slice()) {
                    Ok(request) => self.serve(&request),
                    Err(e) => failure(
                        proto::CODE_UNKNOWN,
                        format!("tally: a request that does not decode: {e}"),
                    ),
                };
                let payload =
                    wire::ttrpc_message(message.stream, TYPE_RESPONSE, &response.encode_to_vec());
                Ok(Some(wire::trunk_frames(PLUGIN_CONN, &payload)))
            }
            // Data frames, or a request on the runtime's connection: nothing Tally asked for.
            _ => Ok(None),
        }
    }

    /// Answers one call of the plugin's service.
    fn serve(&mut self, request: &Request) -> Response {
        let payload = request.payload.as_slice();
        let answer = |result: Result<Vec<u8>, prost::DecodeError>| match result {
            Ok(payload) => Response {
                status: Some(Status::default()),
                payload,
            },
            Err(e) => failure(
                proto::CODE_UNKNOWN,
                format!("tally: {} request does not decode: {e}", request.method),
            ),
        };
        if request.service != proto::PLUGIN_SERVICE {
            return failure(
                proto::CODE_UNIMPLEMENTED,
                format!("tally: no service {}", request.service),
            );
        }
        match request.method.as_str() {
            "Configure" => answer(ConfigureRequest::decode(payload).map(|c| {
                // Registration is done once the runtime configures us: it may call this before
                // its answer to RegisterPlugin arrives.
                self.registered = true;
                self.board.set_connected(true);
                self.runtime = Some(format!("{} {}", c.runtime_name, c.runtime_version));
                tracing::info!(
                    runtime = %c.runtime_name,
                    version = %c.runtime_version,
                    plugin = %format!("{}-{}", self.settings.index, self.settings.name),
                    "registered with the container runtime over NRI: CreateContainer calls are decided from the budgets"
                );
                ConfigureResponse {
                    events: event_mask(&[
                        proto::EVENT_RUN_POD_SANDBOX,
                        proto::EVENT_CREATE_CONTAINER,
                    ]),
                }
                .encode_to_vec()
            })),
            "Synchronize" => answer(SynchronizeRequest::decode(payload).map(|s| {
                self.announce_all(&s);
                tracing::info!(
                    pods = s.pods.len(),
                    containers = s.containers.len(),
                    "NRI synchronize: the runtime's existing pods and containers were admitted before"
                );
                SynchronizeResponse::default().encode_to_vec()
            })),
            "CreateContainer" => match CreateContainerRequest::decode(payload) {
                Ok(create) => self.create_container(create),
                Err(e) => answer(Err(e)),
            },
            "UpdateContainer" | "StopContainer" => answer(Ok(NoUpdates::default().encode_to_vec())),
            "StateChange" => answer(StateChangeEvent::decode(payload).map(|e| {
                if let (proto::EVENT_RUN_POD_SANDBOX_I32, Some(pod)) = (e.event, &e.pod) {
                    self.announce_pod(pod);
                }
                Empty::default().encode_to_vec()
            })),
            "Shutdown" => answer(Ok(Empty::default().encode_to_vec())),
            other => failure(
                proto::CODE_UNIMPLEMENTED,
                format!("tally: no method {other}"),
            ),
        }
    }

    /// Decides a new container from the verdicts in memory.
    fn create_container(&mut self, create: CreateContainerRequest) -> Response {
        let started = Instant::now();
        let pod = create.pod.unwrap_or_default();
        let container = create.container.unwrap_or_default();
        self.announce_pod(&pod);
        self.announce(container.id.clone(), &pod, &container.name);
        let candidate = Candidate {
            namespace: pod.namespace,
            pod: pod.name,
            container: container.name,
            labels: pod.labels,
        };
        let verdicts = self.board.verdicts();
        let decision = verdicts.decide(&candidate, started, self.settings.max_age);
        let response = match &decision {
            Decision::Admit | Decision::Exempt => ok(CreateContainerResponse::default()),
            Decision::Unknown => match self.settings.on_unknown {
                OnUnknown::Admit => ok(CreateContainerResponse::default()),
                OnUnknown::Deny => {
                    let age = verdicts.at.map_or_else(
                        || "none yet".to_owned(),
                        |at| {
                            format!(
                                "{:.1} s old",
                                started.saturating_duration_since(at).as_secs_f64()
                            )
                        },
                    );
                    failure(
                        proto::CODE_PERMISSION_DENIED,
                        format!("tally: no current budget verdict ({age}; the agent's tick is late) and admission.on_unknown = \"deny\""),
                    )
                }
            },
            Decision::Throttle {
                quota_us,
                period_us,
                ..
            } => ok(CreateContainerResponse {
                adjust: Some(cpu_adjustment(*quota_us, *period_us)),
            }),
            Decision::Deny { message, .. } => {
                failure(proto::CODE_PERMISSION_DENIED, message.clone())
            }
        };
        self.board.record(&decision, &candidate, started.elapsed());
        match &decision {
            Decision::Deny {
                budget, message, ..
            } => tracing::warn!(
                budget = %budget,
                namespace = %candidate.namespace,
                pod = %candidate.pod,
                container = %candidate.container,
                reason = %message,
                "admission denied at CreateContainer"
            ),
            Decision::Throttle {
                budget, quota_us, ..
            } => tracing::info!(
                budget = %budget,
                namespace = %candidate.namespace,
                pod = %candidate.pod,
                container = %candidate.container,
                cpu_max = %format!("{quota_us} {CPU_PERIOD_US}"),
                "admitted under its budget's CPU throttle"
            ),
            Decision::Unknown => {
                if self.first_of_stall(verdicts.at) {
                    tracing::warn!(
                        namespace = %candidate.namespace,
                        pod = %candidate.pod,
                        container = %candidate.container,
                        on_unknown = ?self.settings.on_unknown,
                        "CreateContainer decided without a current verdict; said once while the tick stays late, every such decision is counted as unknown"
                    );
                }
            }
            Decision::Admit | Decision::Exempt => {}
        }
        response
    }
}

impl Plugin {
    /// Every pod and container the runtime has, at `Synchronize`.
    fn announce_all(&self, s: &SynchronizeRequest) {
        let pods: std::collections::HashMap<&str, &PodSandbox> =
            s.pods.iter().map(|p| (p.id.as_str(), p)).collect();
        for pod in &s.pods {
            self.announce_pod(pod);
        }
        for c in &s.containers {
            if let Some(pod) = pods.get(c.pod_sandbox_id.as_str()) {
                self.announce(c.id.clone(), pod, &c.name);
            }
        }
    }

    /// A pod sandbox (its pause container's cgroup is named by the sandbox id).
    fn announce_pod(&self, pod: &PodSandbox) {
        self.announce(pod.id.clone(), pod, SANDBOX_CONTAINER);
    }

    fn announce(&self, id: String, pod: &PodSandbox, container: &str) {
        let Some(cri) = &self.cri else { return };
        if id.is_empty() {
            return;
        }
        cri.announce(
            id,
            Names {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                container: container.to_owned(),
                labels: Arc::new(pod_labels(&pod.labels)),
                annotations: Arc::new(kept_annotations(&pod.annotations)),
            },
        );
    }
}

/// A container adjustment that creates the container with `cpu.max` = `quota period`.
pub fn cpu_adjustment(quota_us: i64, period_us: u64) -> ContainerAdjustment {
    ContainerAdjustment {
        linux: Some(LinuxContainerAdjustment {
            resources: Some(LinuxResources {
                cpu: Some(LinuxCpu {
                    quota: Some(OptionalInt64 { value: quota_us }),
                    period: Some(OptionalUInt64 { value: period_us }),
                }),
            }),
        }),
        ..ContainerAdjustment::default()
    }
}

fn ok(message: impl prost::Message) -> Response {
    Response {
        status: Some(Status::default()),
        payload: message.encode_to_vec(),
    }
}

fn failure(code: i32, message: String) -> Response {
    Response {
        status: Some(Status { code, message }),
        payload: Vec::new(),
    }
}
