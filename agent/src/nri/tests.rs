//! The plugin's bytes against bytes written by hand from the proto definitions (containerd/nri
//! v0.6.1 `pkg/api/api.proto`, containerd/ttrpc `request.proto`, the multiplexer's framing), and
//! whole sessions against a scripted runtime on a socket pair.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use super::*;
use crate::budget::verdict::{BudgetVerdict, Spent, Verdicts};
use crate::config::policy::{Admission, Resource, Selector};
use crate::identity::cri::CriHandle;

/// Concatenates byte strings and text, as the golden frames are written.
fn bytes(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn settings() -> Settings {
    Settings {
        socket: PathBuf::from("/nonexistent"),
        name: "tally".to_owned(),
        index: "50".to_owned(),
        max_age: Duration::from_secs(5),
        on_unknown: OnUnknown::Admit,
    }
}

/// A board whose verdicts refuse namespace `spent` (budget `gpu`, 150 of 100 GPU-seconds,
/// release in 90 s) and throttle namespace `slow` (budget `slow`, 0.5 cores shared by one).
fn board() -> Arc<Board> {
    let board = Arc::new(Board::default());
    let budget = |name: &str, ns: &str, admission, resource| BudgetVerdict {
        name: Arc::from(name),
        admission,
        select: Selector {
            namespace: Some(ns.to_owned()),
            ..Selector::default()
        },
        per: None,
        resource,
        limit: 100.0,
        cpu_cores: Some(0.5),
        spent: HashMap::from([(
            String::new(),
            Spent {
                usage: 150.0,
                release_in: Some(90.0),
                members: 1,
            },
        )]),
    };
    board.publish(Verdicts {
        at: Some(Instant::now() + Duration::from_secs(3600)),
        exempt: HashSet::from(["kube-system".to_owned()]),
        namespace_labels: Default::default(),
        budgets: vec![
            budget("gpu", "spent", Admission::Deny, Resource::GpuSeconds),
            budget("slow", "slow", Admission::Throttle, Resource::CpuSeconds),
        ],
    });
    board.enable_nri();
    board
}

#[test]
fn register_plugin_is_framed_as_the_runtime_reads_it() {
    let plugin = Plugin::new(settings(), board(), None);
    let golden = bytes(&[
        // Trunk: connection 2 (the runtime's service), 69 bytes.
        &[0, 0, 0, 2, 0, 0, 0, 69],
        // ttrpc: 59 bytes, stream 1, request, no flags.
        &[0, 0, 0, 59, 0, 0, 0, 1, 1, 0],
        // Request.service (1), .method (2), .payload (3) = RegisterPluginRequest{1, 2}.
        &[0x0a, 28],
        b"nri.pkg.api.v1alpha1.Runtime",
        &[0x12, 14],
        b"RegisterPlugin",
        &[0x1a, 11, 0x0a, 5],
        b"tally",
        &[0x12, 2],
        b"50",
    ]);
    assert_eq!(plugin.register(), golden);
}

/// A runtime's request on the plugin's connection, framed.
fn call(stream: u32, method: &str, payload: &[u8]) -> Vec<u8> {
    let request = Request {
        service: proto::PLUGIN_SERVICE.to_owned(),
        method: method.to_owned(),
        payload: payload.to_vec(),
        timeout_nano: 2_000_000_000,
        metadata: vec![proto::KeyValue {
            key: "containerd-namespace-ttrpc".to_owned(),
            value: "k8s.io".to_owned(),
        }],
    };
    wire::trunk_frames(
        PLUGIN_CONN,
        &wire::ttrpc_message(stream, TYPE_REQUEST, &request.encode_to_vec()),
    )
}

/// Feeds `input` to a plugin and returns its one reply's ttrpc payload (a `Response`), after
/// checking its framing: the plugin's connection, the request's stream, a response.
fn reply(plugin: &mut Plugin, stream: u32, input: &[u8]) -> Vec<u8> {
    let mut demux = Demux::default();
    let messages = demux.feed(input).unwrap();
    assert_eq!(messages.len(), 1);
    let (conn, message) = messages.into_iter().next().unwrap();
    let out = plugin.handle(conn, message).unwrap().unwrap();
    let mut back = Demux::default();
    let mut replies = back.feed(&out).unwrap();
    assert_eq!(replies.len(), 1);
    let (conn, m) = replies.remove(0);
    assert_eq!(
        (conn, m.stream, m.kind, m.flags),
        (PLUGIN_CONN, stream, TYPE_RESPONSE, 0)
    );
    // Trunk header + ttrpc header + payload, nothing else.
    assert_eq!(out.len(), 8 + 10 + m.payload.len());
    m.payload
}

#[test]
fn configure_subscribes_to_new_pods_and_containers() {
    let board = board();
    let mut plugin = Plugin::new(settings(), board.clone(), None);
    let request = ConfigureRequest {
        config: String::new(),
        runtime_name: "containerd".to_owned(),
        runtime_version: "1.7.24".to_owned(),
    };
    let payload = reply(
        &mut plugin,
        1,
        &call(1, "Configure", &request.encode_to_vec()),
    );
    // Response{status{} (OK), payload = ConfigureResponse{events (field 2) = RunPodSandbox
    // 1 << (1 - 1) | CreateContainer 1 << (4 - 1)}}.
    assert_eq!(payload, [0x0a, 0x00, 0x12, 0x02, 0x10, 0x09]);
    assert!(plugin.registered);
    assert_eq!(connected(&board), 1.0);
}

fn connected(board: &Board) -> f64 {
    board
        .families()
        .iter()
        .find(|f| f.name == "tally_admission_nri_connected")
        .map(|f| f.samples[0].value)
        .unwrap()
}

fn create(namespace: &str) -> Vec<u8> {
    CreateContainerRequest {
        pod: Some(proto::PodSandbox {
            id: "sb1".to_owned(),
            name: "train-0".to_owned(),
            uid: "u1".to_owned(),
            namespace: namespace.to_owned(),
            ..proto::PodSandbox::default()
        }),
        container: Some(proto::Container {
            id: "c1".to_owned(),
            pod_sandbox_id: "sb1".to_owned(),
            name: "main".to_owned(),
            ..proto::Container::default()
        }),
    }
    .encode_to_vec()
}

#[test]
fn create_container_admits_throttles_and_denies_in_the_protos_bytes() {
    let board = board();
    let mut plugin = Plugin::new(settings(), board.clone(), None);
    // Admit: OK and an empty CreateContainerResponse.
    assert_eq!(
        reply(
            &mut plugin,
            3,
            &call(3, "CreateContainer", &create("other"))
        ),
        [0x0a, 0x00]
    );
    // Throttle: adjust (1) → linux (6) → resources (2) → cpu (2) → quota (2) {25000 µs: 0.5
    // cores shared by the one member and the new container, in a 100 ms period}, period (3).
    let throttled = reply(&mut plugin, 5, &call(5, "CreateContainer", &create("slow")));
    let golden = bytes(&[
        &[0x0a, 0x00],
        &[0x12, 20],
        &[0x0a, 18],
        &[0x32, 16],
        &[0x12, 14],
        &[0x12, 12],
        &[0x12, 4, 0x08, 0xa8, 0xc3, 0x01],
        &[0x1a, 4, 0x08, 0xa0, 0x8d, 0x06],
    ]);
    assert_eq!(throttled, golden);
    // Deny: status {code 7 (PermissionDenied), message}, no payload.
    let denied = reply(
        &mut plugin,
        7,
        &call(7, "CreateContainer", &create("spent")),
    );
    let message = "tally: budget gpu is spent (150 gpu_seconds of 100); it releases in about 90 s";
    let status = bytes(&[&[0x08, 7, 0x12, message.len() as u8], message.as_bytes()]);
    assert_eq!(denied, bytes(&[&[0x0a, status.len() as u8], &status]));
    // Exempt, whatever its budget says.
    assert_eq!(
        reply(
            &mut plugin,
            9,
            &call(9, "CreateContainer", &create("kube-system"))
        ),
        [0x0a, 0x00]
    );
    let rendered = tally_exporters::prometheus_text::render(
        &tally_exporters::Snapshot {
            families: board.families(),
        },
        false,
    )
    .unwrap();
    let text = String::from_utf8(rendered.text).unwrap();
    for (decision, n) in [
        ("admit", 1),
        ("exempt", 1),
        ("unknown", 0),
        ("throttle", 1),
        ("deny", 1),
    ] {
        let line = format!("tally_admission_nri_decisions_total{{decision=\"{decision}\"}} {n}");
        assert!(text.contains(&line), "{line}\n{text}");
    }
    assert!(
        text.contains("tally_admission_decision_seconds_count 4"),
        "{text}"
    );
    assert_eq!(
        board.by_budget(),
        std::collections::BTreeMap::from([
            ((Arc::from("gpu"), "deny"), 1),
            ((Arc::from("slow"), "throttle"), 1)
        ])
    );
}

#[test]
fn stale_verdicts_follow_on_unknown() {
    let board = Arc::new(Board::default());
    board.publish(Verdicts {
        at: Some(Instant::now() - Duration::from_secs(60)),
        ..Verdicts::default()
    });
    let mut plugin = Plugin::new(settings(), board.clone(), None);
    assert_eq!(
        reply(&mut plugin, 1, &call(1, "CreateContainer", &create("x"))),
        [0x0a, 0x00]
    );
    let mut strict = Plugin::new(
        Settings {
            on_unknown: OnUnknown::Deny,
            ..settings()
        },
        board,
        None,
    );
    let denied = Response::decode(
        reply(&mut strict, 1, &call(1, "CreateContainer", &create("x"))).as_slice(),
    )
    .unwrap();
    let status = denied.status.unwrap();
    assert_eq!(status.code, proto::CODE_PERMISSION_DENIED);
    assert!(
        status
            .message
            .starts_with("tally: no current budget verdict (60.")
            && status
                .message
                .ends_with(" s old; the agent's tick is late) and admission.on_unknown = \"deny\""),
        "{}",
        status.message
    );
}

#[test]
fn a_stall_of_the_tick_is_logged_once_and_a_later_one_again() {
    let mut plugin = Plugin::new(settings(), Arc::new(Board::default()), None);
    let first = Some(Instant::now() - Duration::from_secs(60));
    // Nothing published yet is a stall of its own.
    assert!(plugin.first_of_stall(None));
    assert!(!plugin.first_of_stall(None));
    // The tick published once, then stalled: one line for however many containers.
    assert!(plugin.first_of_stall(first));
    assert!(!plugin.first_of_stall(first));
    assert!(!plugin.first_of_stall(first));
    // It published again and stalled again: a new line.
    let second = first.map(|at| at + Duration::from_secs(30));
    assert!(plugin.first_of_stall(second));
    assert!(!plugin.first_of_stall(second));
}

#[test]
fn unknown_methods_and_garbage_are_answered_not_fatal() {
    let mut plugin = Plugin::new(settings(), board(), None);
    let unknown =
        Response::decode(reply(&mut plugin, 1, &call(1, "PostStart", &[])).as_slice()).unwrap();
    assert_eq!(
        unknown.status,
        Some(Status {
            code: proto::CODE_UNIMPLEMENTED,
            message: "tally: no method PostStart".to_owned()
        })
    );
    let garbage = Response::decode(
        reply(
            &mut plugin,
            3,
            &call(3, "CreateContainer", &[0x0a, 0x05, 0x01]),
        )
        .as_slice(),
    )
    .unwrap();
    assert_eq!(garbage.status.unwrap().code, proto::CODE_UNKNOWN);
    // Stop, update, state changes and shutdown: OK, nothing to change.
    for (stream, method) in [
        (5, "StopContainer"),
        (7, "UpdateContainer"),
        (9, "StateChange"),
        (11, "Shutdown"),
    ] {
        assert_eq!(
            reply(&mut plugin, stream, &call(stream, method, &[])),
            [0x0a, 0x00]
        );
    }
}

#[test]
fn a_refused_registration_ends_the_session_with_the_runtimes_reason() {
    let mut plugin = Plugin::new(settings(), board(), None);
    let refused = Response {
        status: Some(Status {
            code: 2,
            message: "invalid plugin index".to_owned(),
        }),
        payload: Vec::new(),
    };
    let frame = wire::trunk_frames(
        RUNTIME_CONN,
        &wire::ttrpc_message(1, TYPE_RESPONSE, &refused.encode_to_vec()),
    );
    let (conn, message) = Demux::default().feed(&frame).unwrap().remove(0);
    let e = plugin.handle(conn, message).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the runtime refused the registration: invalid plugin index"
    );
    assert!(!plugin.registered);
}

#[test]
fn the_demux_reassembles_split_and_joined_frames_and_drops_other_connections() {
    let one = call(1, "Synchronize", &[]);
    let two = call(3, "Synchronize", &[]);
    // A frame for connection 9 (dropped), then two messages split across three reads, the
    // second message itself in two trunk frames.
    let other = wire::trunk_frames(9, b"ignored");
    let inner = {
        let mut d = Demux::default();
        let (_, m) = d.feed(&two).unwrap().remove(0);
        let request = wire::ttrpc_message(m.stream, m.kind, &m.payload);
        let (a, b) = request.split_at(7);
        bytes(&[
            &wire::trunk_frames(PLUGIN_CONN, a),
            &wire::trunk_frames(PLUGIN_CONN, b),
        ])
    };
    let all = bytes(&[&other, &one, &inner]);
    let mut demux = Demux::default();
    let mut got = Vec::new();
    for chunk in [&all[..3], &all[3..30], &all[30..]] {
        got.extend(demux.feed(chunk).unwrap());
    }
    assert_eq!(got.len(), 2);
    assert_eq!((got[0].0, got[0].1.stream), (PLUGIN_CONN, 1));
    assert_eq!((got[1].0, got[1].1.stream), (PLUGIN_CONN, 3));
    // Nothing half-read is left behind.
    assert!(demux.feed(&[]).unwrap().is_empty());
}

#[test]
fn oversized_frames_and_messages_are_errors_and_long_replies_are_cut_at_4_kib() {
    let mut demux = Demux::default();
    assert_eq!(
        demux.feed(&[0, 0, 0, 1, 0x01, 0, 0, 1]),
        Err(wire::WireError::FrameTooLarge((1 << 24) + 1))
    );
    let mut demux = Demux::default();
    let header = [0x00, 0x40, 0x00, 0x01, 0, 0, 0, 1, 1, 0];
    assert_eq!(
        demux.feed(&wire::trunk_frames(PLUGIN_CONN, &header)),
        Err(wire::WireError::MessageTooLarge((4 << 20) + 1))
    );
    let long = vec![7u8; 10_000];
    let framed = wire::trunk_frames(PLUGIN_CONN, &long);
    // 4096 + 4096 + 1808, each with its 8-byte header.
    assert_eq!(framed.len(), 10_000 + 3 * 8);
    assert_eq!(&framed[4..8], &4096u32.to_be_bytes());
    assert_eq!(&framed[4104 + 4..4104 + 8], &4096u32.to_be_bytes());
    assert_eq!(&framed[8208 + 4..8208 + 8], &1808u32.to_be_bytes());
}

/// The next message the plugin sent.
async fn read_one(runtime: &mut tokio::net::UnixStream, demux: &mut Demux) -> (u32, Message) {
    let mut buf = vec![0u8; 65536];
    loop {
        let n = runtime.read(&mut buf).await.unwrap();
        assert!(n > 0, "the plugin closed");
        if let Some(m) = demux.feed(&buf[..n]).unwrap().into_iter().next() {
            return m;
        }
    }
}

/// A whole session over a unix socket: register, configure and synchronize in the order
/// containerd uses (Configure before the registration's answer), one decision, then the runtime
/// closes and the session ends cleanly.
#[tokio::test]
async fn a_session_registers_decides_and_ends_when_the_runtime_closes() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nri.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let board = board();
    let task = {
        let settings = Settings {
            socket: socket.clone(),
            ..settings()
        };
        let board = board.clone();
        tokio::spawn(async move { session(&settings, &board, None).await })
    };
    let (mut runtime, _) = listener.accept().await.unwrap();
    let mut demux = Demux::default();
    let (conn, register) = read_one(&mut runtime, &mut demux).await;
    assert_eq!(
        (conn, register.stream, register.kind),
        (RUNTIME_CONN, 1, TYPE_REQUEST)
    );
    let configure = ConfigureRequest {
        runtime_name: "containerd".to_owned(),
        ..ConfigureRequest::default()
    };
    runtime
        .write_all(&call(1, "Configure", &configure.encode_to_vec()))
        .await
        .unwrap();
    let (_, configured) = read_one(&mut runtime, &mut demux).await;
    assert_eq!(configured.stream, 1);
    let ok = Response {
        status: Some(Status::default()),
        payload: Vec::new(),
    };
    runtime
        .write_all(&wire::trunk_frames(
            RUNTIME_CONN,
            &wire::ttrpc_message(1, TYPE_RESPONSE, &ok.encode_to_vec()),
        ))
        .await
        .unwrap();
    runtime
        .write_all(&call(
            3,
            "Synchronize",
            &SynchronizeRequest::default().encode_to_vec(),
        ))
        .await
        .unwrap();
    let (_, synced) = read_one(&mut runtime, &mut demux).await;
    assert_eq!(synced.payload, [0x0a, 0x00]);
    runtime
        .write_all(&call(5, "CreateContainer", &create("spent")))
        .await
        .unwrap();
    let (_, denied) = read_one(&mut runtime, &mut demux).await;
    let status = Response::decode(denied.payload.as_slice())
        .unwrap()
        .status
        .unwrap();
    assert_eq!(status.code, proto::CODE_PERMISSION_DENIED);
    assert_eq!(connected(&board), 1.0);
    drop(runtime);
    task.await.unwrap().unwrap();
}

#[test]
fn announced_pods_and_containers_are_named_before_any_listing() {
    let cri = CriHandle::default();
    let mut plugin = Plugin::new(settings(), board(), Some(cri.clone()));
    let pod = |id: &str, name: &str| proto::PodSandbox {
        id: id.to_owned(),
        name: name.to_owned(),
        namespace: "team-a".to_owned(),
        labels: HashMap::from([
            ("team".to_owned(), "search".to_owned()),
            ("io.kubernetes.pod.name".to_owned(), name.to_owned()),
        ]),
        ..proto::PodSandbox::default()
    };
    let sync = SynchronizeRequest {
        pods: vec![pod("sb-old", "old-0")],
        containers: vec![proto::Container {
            id: "c-old".to_owned(),
            pod_sandbox_id: "sb-old".to_owned(),
            name: "server".to_owned(),
            ..proto::Container::default()
        }],
    };
    reply(
        &mut plugin,
        1,
        &call(1, "Synchronize", &sync.encode_to_vec()),
    );
    let started = StateChangeEvent {
        event: proto::EVENT_RUN_POD_SANDBOX_I32,
        pod: Some(pod("sb-new", "new-0")),
        container: None,
    };
    reply(
        &mut plugin,
        3,
        &call(3, "StateChange", &started.encode_to_vec()),
    );
    reply(
        &mut plugin,
        5,
        &call(5, "CreateContainer", &create("other")),
    );
    let names = |id: &str| {
        cri.lookup(id).map(|n| {
            (
                n.namespace,
                n.pod,
                n.container,
                n.labels.get("team").cloned(),
                n.labels.len(),
            )
        })
    };
    let search = Some("search".to_owned());
    assert_eq!(
        names("c-old"),
        Some((
            "team-a".into(),
            "old-0".into(),
            "server".into(),
            search.clone(),
            1
        ))
    );
    assert_eq!(
        names("sb-old"),
        Some((
            "team-a".into(),
            "old-0".into(),
            "POD".into(),
            search.clone(),
            1
        ))
    );
    assert_eq!(
        names("sb-new"),
        Some(("team-a".into(), "new-0".into(), "POD".into(), search, 1))
    );
    assert_eq!(
        names("c1"),
        Some(("other".into(), "train-0".into(), "main".into(), None, 0))
    );
    assert_eq!(
        names("sb1"),
        Some(("other".into(), "train-0".into(), "POD".into(), None, 0))
    );
    assert_eq!(names("unknown"), None);
}
