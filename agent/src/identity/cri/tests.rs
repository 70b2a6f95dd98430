use super::proto::*;
use super::*;

fn sandbox(id: &str, namespace: &str, name: &str) -> PodSandbox {
    PodSandbox {
        id: id.into(),
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: namespace.into(),
            attempt: 0,
        }),
        ..Default::default()
    }
}

fn container(id: &str, sandbox_id: &str, name: &str) -> Container {
    Container {
        id: id.into(),
        pod_sandbox_id: sandbox_id.into(),
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        state: ContainerState::ContainerRunning as i32,
        ..Default::default()
    }
}

fn names(namespace: &str, pod: &str, container: &str) -> Names {
    Names {
        namespace: namespace.into(),
        pod: pod.into(),
        container: container.into(),
        ..Names::default()
    }
}

#[test]
fn joins_container_to_its_sandbox() {
    let map = join_names(
        &[
            sandbox("s1", "ml", "trainer-0"),
            sandbox("s2", "web", "api"),
        ],
        &[
            container("c1", "s1", "worker"),
            container("c2", "s2", "nginx"),
        ],
    );
    assert_eq!(map.get("c1"), Some(&names("ml", "trainer-0", "worker")));
    assert_eq!(map.get("c2"), Some(&names("web", "api", "nginx")));
}

#[test]
fn sandbox_id_is_named_pod() {
    let map = join_names(&[sandbox("s1", "ml", "trainer-0")], &[]);
    assert_eq!(map.get("s1"), Some(&names("ml", "trainer-0", "POD")));
    assert_eq!(map.len(), 1);
}

#[test]
fn missing_sandbox_falls_back_to_labels() {
    let mut c = container("c1", "gone", "");
    c.metadata = None;
    c.labels = HashMap::from([
        (LABEL_NAMESPACE.to_owned(), "batch".to_owned()),
        (LABEL_POD_NAME.to_owned(), "job-x".to_owned()),
        (LABEL_CONTAINER_NAME.to_owned(), "main".to_owned()),
    ]);
    let map = join_names(&[], &[c]);
    assert_eq!(map.get("c1"), Some(&names("batch", "job-x", "main")));
}

#[test]
fn sandbox_without_metadata_uses_its_labels() {
    let s = PodSandbox {
        id: "s1".into(),
        labels: HashMap::from([
            (LABEL_NAMESPACE.to_owned(), "ml".to_owned()),
            (LABEL_POD_NAME.to_owned(), "p".to_owned()),
        ]),
        ..Default::default()
    };
    let map = join_names(&[s], &[container("c1", "s1", "w")]);
    assert_eq!(map.get("c1"), Some(&names("ml", "p", "w")));
    assert_eq!(map.get("s1"), Some(&names("ml", "p", "POD")));
}

#[test]
fn unknown_container_without_labels_has_empty_names() {
    let map = join_names(&[], &[container("c1", "", "w")]);
    assert_eq!(map.get("c1"), Some(&names("", "", "w")));
}

#[test]
fn decodes_fields_by_upstream_tag() -> Result<(), prost::DecodeError> {
    use prost::Message;
    // Container.id (1), metadata (3) { name (1) }, plus an unknown field 4 (image) that must be
    // skipped, encoded by hand so the test does not depend on our own encoder.
    let bytes = [
        0x0a, 0x02, b'c', b'1', // 1: "c1"
        0x1a, 0x03, 0x0a, 0x01, b'w', // 3: { 1: "w" }
        0x22, 0x00, // 4: {} (ImageSpec, unknown here)
        0x30, 0x01, // 6: RUNNING
    ];
    let c = Container::decode(&bytes[..])?;
    assert_eq!(c.id, "c1");
    assert_eq!(c.metadata.map(|m| m.name), Some("w".to_owned()));
    assert_eq!(c.state, ContainerState::ContainerRunning as i32);
    Ok(())
}

#[test]
fn error_reasons_are_in_the_fixed_set() {
    let timeout = CriError::Timeout {
        call: "ListContainers",
        path: "/x".into(),
        timeout_ms: 5,
    };
    let wrapped = CriError::Unreachable {
        tried: 2,
        last: Box::new(CriError::ListPodSandbox {
            path: "/x".into(),
            source: tonic::Status::unavailable("down"),
        }),
    };
    for e in [&CriError::NoEndpoints, &timeout, &wrapped] {
        assert!(ERROR_REASONS.contains(&e.reason()), "{e}");
    }
    assert_eq!(wrapped.reason(), "list");
    let chain = tally_error_chain::chain(&wrapped);
    assert!(
        chain.starts_with("none of 2 CRI endpoints answered: calling ListPodSandbox on /x: "),
        "{chain}"
    );
    assert!(chain.contains("down"), "{chain}");
}

#[test]
fn default_handle_is_down_and_empty() {
    let h = CriHandle::default();
    assert!(!h.up());
    assert_eq!(h.lookup("c1"), None);
    assert_eq!(h.endpoint(), None);
    assert!(h.errors().iter().all(|(_, n)| *n == 0));
    assert_eq!(h.errors().len(), ERROR_REASONS.len());
}
