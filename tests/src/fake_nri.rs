//! A container runtime's NRI side, scripted: it listens on a socket, takes one plugin's
//! registration, configures and synchronizes it as containerd 1.7 does, and then asks it about
//! containers. The framing and messages are the agent's own (`tally_agent::nri`), whose bytes
//! the agent's unit tests hold to golden frames written from the proto definitions; the VM
//! suite asks the same questions of a real containerd.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use prost::Message as _;
use tally_agent::nri::proto::{self, Request, Response, Status};
use tally_agent::nri::wire::{self, Demux, Message, PLUGIN_CONN, RUNTIME_CONN};

/// The socket, waiting for a plugin.
#[derive(Debug)]
pub struct FakeRuntime {
    listener: UnixListener,
    pub socket: PathBuf,
}

/// One registered plugin's connection.
#[derive(Debug)]
pub struct Session {
    stream: UnixStream,
    demux: Demux,
    pending: Vec<(u32, Message)>,
    next_stream: u32,
    /// What the plugin registered as.
    pub name: String,
    pub index: String,
    /// The event mask its `Configure` answer subscribed to.
    pub events: i32,
}

/// What the plugin answered to `CreateContainer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Admitted; with `(quota, period)` where it set the CPU quota.
    Admitted(Option<(i64, u64)>),
    /// Refused: the status code and message the kubelet would show.
    Refused(i32, String),
}

impl FakeRuntime {
    pub fn listen(dir: &Path) -> FakeRuntime {
        let socket = dir.join("nri.sock");
        let listener = UnixListener::bind(&socket).expect("bind the NRI socket");
        listener.set_nonblocking(true).expect("nonblocking");
        FakeRuntime { listener, socket }
    }

    /// Waits for a plugin, takes its registration, configures and synchronizes it.
    pub fn accept(&self, timeout: Duration) -> Session {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "no plugin connected within {timeout:?}"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).expect("blocking");
        let mut session = Session {
            stream,
            demux: Demux::default(),
            pending: Vec::new(),
            next_stream: 1,
            name: String::new(),
            index: String::new(),
            events: 0,
        };
        let (conn, register) = session.next_message(Duration::from_secs(5));
        assert_eq!(
            conn, RUNTIME_CONN,
            "the registration comes on the runtime's connection"
        );
        let request = Request::decode(register.payload.as_slice()).expect("a ttrpc request");
        assert_eq!(
            (request.service.as_str(), request.method.as_str()),
            (proto::RUNTIME_SERVICE, "RegisterPlugin")
        );
        let registration = proto::RegisterPluginRequest::decode(request.payload.as_slice())
            .expect("RegisterPluginRequest");
        session.name = registration.plugin_name;
        session.index = registration.plugin_idx;
        // containerd configures the plugin before it answers the registration.
        let configured = session.call(
            "Configure",
            &proto::ConfigureRequest {
                config: String::new(),
                runtime_name: "fake-runtime".to_owned(),
                runtime_version: "1.0".to_owned(),
            }
            .encode_to_vec(),
        );
        session.events =
            proto::ConfigureResponse::decode(configured.expect("Configure answered OK").as_slice())
                .expect("ConfigureResponse")
                .events;
        let ok = Response {
            status: Some(Status::default()),
            payload: Vec::new(),
        };
        session.send(
            RUNTIME_CONN,
            register.stream,
            wire::TYPE_RESPONSE,
            &ok.encode_to_vec(),
        );
        session
            .call(
                "Synchronize",
                &proto::SynchronizeRequest::default().encode_to_vec(),
            )
            .expect("Synchronize answered OK");
        session
    }
}

impl Session {
    fn send(&mut self, conn: u32, stream: u32, kind: u8, payload: &[u8]) {
        let bytes = wire::trunk_frames(conn, &wire::ttrpc_message(stream, kind, payload));
        self.stream.write_all(&bytes).expect("write to the plugin");
    }

    fn next_message(&mut self, timeout: Duration) -> (u32, Message) {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            if !self.pending.is_empty() {
                return self.pending.remove(0);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the plugin sent nothing within {timeout:?}"
            );
            self.stream.set_read_timeout(Some(left)).expect("timeout");
            let n = self.stream.read(&mut buf).expect("read from the plugin");
            assert!(n > 0, "the plugin closed the connection");
            self.pending
                .extend(self.demux.feed(&buf[..n]).expect("well-formed frames"));
        }
    }

    /// Calls the plugin's service; its payload, or its error status. The plugin has the
    /// runtime's 2 s to answer.
    pub fn call(&mut self, method: &str, payload: &[u8]) -> Result<Vec<u8>, Status> {
        let stream = self.next_stream;
        self.next_stream += 2;
        let request = Request {
            service: proto::PLUGIN_SERVICE.to_owned(),
            method: method.to_owned(),
            payload: payload.to_vec(),
            timeout_nano: 2_000_000_000,
            metadata: Vec::new(),
        };
        self.send(
            PLUGIN_CONN,
            stream,
            wire::TYPE_REQUEST,
            &request.encode_to_vec(),
        );
        let (conn, reply) = self.next_message(Duration::from_secs(2));
        assert_eq!(
            (conn, reply.stream, reply.kind),
            (PLUGIN_CONN, stream, wire::TYPE_RESPONSE),
            "the answer to {method}"
        );
        let response = Response::decode(reply.payload.as_slice()).expect("a ttrpc response");
        match response.status {
            Some(s) if s.code != 0 => Err(s),
            _ => Ok(response.payload),
        }
    }

    /// Asks whether a container may be created in a pod of `namespace` with `labels`.
    pub fn create_container(
        &mut self,
        namespace: &str,
        pod: &str,
        labels: &[(&str, &str)],
    ) -> Answer {
        self.create_container_with_id(namespace, pod, &format!("container-{pod}"), labels)
    }

    /// As [`Session::create_container`], for a container of id `id` named `main`.
    pub fn create_container_with_id(
        &mut self,
        namespace: &str,
        pod: &str,
        id: &str,
        labels: &[(&str, &str)],
    ) -> Answer {
        let request = proto::CreateContainerRequest {
            pod: Some(proto::PodSandbox {
                id: format!("sandbox-{pod}"),
                name: pod.to_owned(),
                uid: format!("uid-{pod}"),
                namespace: namespace.to_owned(),
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect::<HashMap<_, _>>(),
                annotations: HashMap::new(),
            }),
            container: Some(proto::Container {
                id: id.to_owned(),
                pod_sandbox_id: format!("sandbox-{pod}"),
                name: "main".to_owned(),
                labels: HashMap::new(),
                linux: None,
            }),
        };
        match self.call("CreateContainer", &request.encode_to_vec()) {
            Err(status) => Answer::Refused(status.code, status.message),
            Ok(payload) => {
                let response = proto::CreateContainerResponse::decode(payload.as_slice())
                    .expect("CreateContainerResponse");
                let cpu = response
                    .adjust
                    .and_then(|a| a.linux)
                    .and_then(|l| l.resources)
                    .and_then(|r| r.cpu);
                Answer::Admitted(cpu.map(|c| {
                    (
                        c.quota.map_or(-1, |q| q.value),
                        c.period.map_or(0, |p| p.value),
                    )
                }))
            }
        }
    }

    /// Whether the plugin closed its end within `timeout`.
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let mut buf = [0u8; 4096];
        self.stream
            .set_read_timeout(Some(timeout))
            .expect("timeout");
        matches!(self.stream.read(&mut buf), Ok(0))
    }
}
