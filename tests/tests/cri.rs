//! The CRI client and background task against a real gRPC server on a unix socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use tally_agent::config::CriConfig;
use tally_agent::identity::cri::{self, CriClient, CriError, CriHandle};
use tally_agent::identity::Names;
use tally_tests::fake_cri::{FakeCri, FakePod};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const TIMEOUT: Duration = Duration::from_secs(2);
/// How long a poll may wait for the background task; generous for loaded CI machines.
const DEADLINE: Duration = Duration::from_secs(20);

fn pods() -> Vec<FakePod> {
    vec![
        FakePod::new(
            "ml",
            "trainer-0",
            &[("c-train", "worker"), ("c-side", "sidecar")],
        ),
        FakePod::new("web", "api-7f9", &[("c-api", "api")]),
    ]
}

fn names(namespace: &str, pod: &str, container: &str) -> Names {
    Names {
        namespace: namespace.into(),
        pod: pod.into(),
        container: container.into(),
        ..Names::default()
    }
}

fn config(endpoints: Vec<PathBuf>) -> CriConfig {
    CriConfig {
        endpoints,
        // Long, so that only `request_refresh` can explain a second listing within a test.
        refresh_interval_secs: 3600,
        timeout_ms: 2000,
    }
}

/// Polls `check` until it holds or [`DEADLINE`] passes.
async fn wait_for(what: &str, mut check: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        if Instant::now() > deadline {
            bail!("timed out after {DEADLINE:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn error_count(handle: &CriHandle, reason: &str) -> u64 {
    handle
        .errors()
        .iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, n)| *n)
}

#[tokio::test]
async fn client_lists_names_from_fake_runtime() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeCri::start(dir.path().join("cri.sock"), pods())?;

    let client = CriClient::connect_first(&[fake.socket().to_path_buf()], TIMEOUT).await?;
    assert_eq!(client.endpoint(), fake.socket());
    let map = client.list().await?;

    assert_eq!(
        map.get("c-train"),
        Some(&names("ml", "trainer-0", "worker"))
    );
    assert_eq!(
        map.get("c-side"),
        Some(&names("ml", "trainer-0", "sidecar"))
    );
    assert_eq!(map.get("c-api"), Some(&names("web", "api-7f9", "api")));
    assert_eq!(
        map.get("sandbox-ml-trainer-0"),
        Some(&names("ml", "trainer-0", "POD"))
    );
    assert_eq!(
        map.get("sandbox-web-api-7f9"),
        Some(&names("web", "api-7f9", "POD"))
    );
    assert_eq!(map.len(), 5);
    assert!(fake.list_containers_calls() >= 1);
    Ok(())
}

#[tokio::test]
async fn client_skips_a_missing_endpoint() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeCri::start(dir.path().join("crio.sock"), pods())?;
    let missing = dir.path().join("containerd.sock");

    let client = CriClient::connect_first(&[missing, fake.socket().to_path_buf()], TIMEOUT).await?;
    assert_eq!(client.endpoint(), fake.socket());
    ensure!(client.list().await?.contains_key("c-api"));
    Ok(())
}

#[tokio::test]
async fn socket_that_is_not_a_server_is_an_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;

    // A plain file where the socket should be: connecting is refused.
    let file = dir.path().join("file.sock");
    std::fs::write(&file, b"")?;
    match CriClient::connect(&file, TIMEOUT).await {
        Err(CriError::Connect { path, .. }) => assert_eq!(path, file),
        other => bail!("expected a connect error, got {other:?}"),
    }

    // A socket that accepts (the kernel queues the connection) but never speaks gRPC: the call
    // must hit the deadline instead of hanging.
    let silent = dir.path().join("silent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&silent)?;
    let short = Duration::from_millis(300);
    let started = Instant::now();
    match CriClient::connect(&silent, short).await {
        Err(e @ CriError::Timeout { .. }) => {
            assert_eq!(e.reason(), "timeout");
            assert!(e.to_string().contains("silent.sock"), "{e}");
        }
        other => bail!("expected a timeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));

    // Both, as a list: one error naming how many were tried.
    match CriClient::connect_first(&[file, silent], short).await {
        Err(e @ CriError::Unreachable { tried: 2, .. }) => assert_eq!(e.reason(), "timeout"),
        other => bail!("expected unreachable, got {other:?}"),
    }
    match CriClient::connect_first(&[], short).await {
        Err(CriError::NoEndpoints) => {}
        other => bail!("expected no endpoints, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_task_publishes_and_refreshes_on_request() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeCri::start(dir.path().join("cri.sock"), pods())?;
    let cancel = CancellationToken::new();
    let handle = cri::spawn(
        &config(vec![
            dir.path().join("absent.sock"),
            fake.socket().to_path_buf(),
        ]),
        cancel.clone(),
    );

    wait_for("the first listing", || handle.lookup("c-train").is_some()).await?;
    assert!(handle.up());
    assert_eq!(handle.endpoint().as_deref(), Some(fake.socket()));
    assert_eq!(
        handle.lookup("c-train"),
        Some(names("ml", "trainer-0", "worker"))
    );
    assert_eq!(handle.lookup("c-new"), None);

    let mut changed = pods();
    changed.push(FakePod::new("batch", "job-1", &[("c-new", "main")]));
    fake.set_pods(changed);
    handle.request_refresh();
    wait_for("the requested listing", || handle.lookup("c-new").is_some()).await?;
    assert_eq!(
        handle.lookup("c-new"),
        Some(names("batch", "job-1", "main"))
    );
    assert!(
        handle.errors().iter().all(|(_, n)| *n == 0),
        "{:?}",
        handle.errors()
    );

    // Many requests in a burst produce far fewer listings (one a second at most).
    let before = handle.listings();
    let started = Instant::now();
    for _ in 0..50 {
        handle.request_refresh();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let allowed = 2 + started.elapsed().as_secs();
    let done = handle.listings() - before;
    assert!(
        done <= allowed,
        "{done} listings, at most {allowed} expected"
    );

    cancel.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_listing_keeps_names_and_recovers() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("cri.sock");
    let fake = FakeCri::start(&socket, pods())?;
    let cancel = CancellationToken::new();
    let handle = cri::spawn(&config(vec![socket.clone()]), cancel.clone());
    wait_for("the first listing", || handle.up()).await?;

    fake.set_unavailable(true);
    handle.request_refresh();
    wait_for("the handle to go down", || !handle.up()).await?;
    assert!(error_count(&handle, "list") >= 1, "{:?}", handle.errors());
    assert_eq!(
        handle.lookup("c-api"),
        Some(names("web", "api-7f9", "api")),
        "names of the last listing stay"
    );

    fake.set_unavailable(false);
    wait_for("the handle to come back", || handle.up()).await?;

    // The runtime restarts: the socket goes away and comes back with other pods.
    drop(fake);
    let fake = FakeCri::start(&socket, vec![FakePod::new("ml", "p2", &[("c-after", "w")])])?;
    handle.request_refresh();
    wait_for("names from the restarted runtime", || {
        handle.lookup("c-after").is_some()
    })
    .await?;
    assert_eq!(
        handle.lookup("c-api"),
        None,
        "a full listing replaces the map"
    );
    assert!(fake.calls() >= 2);

    cancel.cancel();
    Ok(())
}

#[tokio::test]
async fn no_endpoints_never_connects() -> anyhow::Result<()> {
    let handle = cri::spawn(&config(Vec::new()), CancellationToken::new());
    assert!(!handle.up());
    assert_eq!(handle.endpoint(), None);
    assert_eq!(handle.lookup("anything"), None);
    Ok(())
}

#[test]
fn fake_runs_without_an_async_caller() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("cri.sock");
    let fake = FakeCri::start(&socket, pods())?;
    ensure!(
        socket_exists(&socket),
        "socket file is there once start returns"
    );
    drop(fake);
    ensure!(!socket_exists(&socket), "drop removes the socket file");
    // The path can be served again, as a restarted runtime does.
    let again = FakeCri::start(&socket, Vec::new()).context("restarting on the same path")?;
    assert_eq!(again.calls(), 0);
    Ok(())
}

fn socket_exists(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}
