//! The binary as a black box: readiness, scrape, health, gzip, SIGTERM drain, SIGHUP reload.

use std::io::Read;
use std::time::Duration;

use tally_tests::agent::{http_get, sample, Agent};
use tally_tests::require;

#[test]
fn starts_serves_and_drains_on_sigterm() {
    let mut agent = Agent::start("[agent]\ntick_interval_ms = 200\n");
    let text = agent.scrape();
    assert_eq!(
        sample(&text, "tally_build_info", &["version=\""]),
        Some(1.0)
    );
    assert!(sample(&text, "tally_ticks_total", &[]).unwrap() >= 1.0);
    assert_eq!(
        sample(&text, "tally_probe_up", &["probe=\"cgroupfs\""]),
        Some(1.0),
        "{text}"
    );

    let r = agent.get("/metrics").unwrap();
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );

    // The first gzip request gets plain text (nothing was compressed yet: compressing is skipped
    // until someone asks); from the next tick on, gzip.
    let gzip_scrape = || {
        http_get(
            agent.port,
            "/metrics",
            &[("Accept-Encoding", "gzip, deflate")],
        )
        .unwrap()
    };
    let first = gzip_scrape();
    assert_eq!(first.status, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let gz = loop {
        let r = gzip_scrape();
        if r.header("content-encoding") == Some("gzip") {
            break r;
        }
        assert!(r.header("content-encoding").is_none());
        assert!(String::from_utf8_lossy(&r.body).contains("# TYPE tally_build_info gauge"));
        assert!(std::time::Instant::now() < deadline, "never served gzip");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut unzipped = String::new();
    flate2::read::GzDecoder::new(&gz.body[..])
        .read_to_string(&mut unzipped)
        .unwrap();
    assert!(unzipped.contains("# TYPE tally_build_info gauge"));

    let health = agent.get("/healthz").unwrap();
    assert_eq!(health.status, 200);
    let json: serde_json::Value = serde_json::from_slice(&health.body).unwrap();
    assert_eq!(json["status"], "ok");
    assert_eq!(json["components"]["tick"]["healthy"], true);

    agent.signal(libc::SIGTERM);
    let status = agent
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no exit within 5 s after SIGTERM; log:\n{}", agent.log()));
    assert_eq!(status.code(), Some(0), "log:\n{}", agent.log());
    assert!(agent.log().contains("draining"), "{}", agent.log());
}

#[test]
fn sigint_drains_too() {
    let mut agent = Agent::start("");
    agent.signal(libc::SIGINT);
    let status = agent
        .wait_exit(Duration::from_secs(5))
        .expect("exit after SIGINT");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn sighup_reloads_a_valid_config_and_keeps_running_on_an_invalid_one() {
    // A one-minute tick: after the first, no other tick comes unless a reload shortens it.
    let agent = Agent::start("[agent]\ntick_interval_ms = 60000\n");
    let listen = format!("listen = \"127.0.0.1:{}\"", agent.port);

    std::fs::write(
        &agent.config,
        "[agent]\nnot_a_key = 1\ntick_interval_ms = -5\n",
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !agent.log().contains("reload refused") {
        assert!(
            std::time::Instant::now() < deadline,
            "log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = agent.log();
    assert!(log.contains("agent.not_a_key"), "{log}");
    assert!(log.contains("agent.tick_interval_ms"), "{log}");
    assert_eq!(agent.get("/readyz").unwrap().status, 200);

    std::fs::write(
        &agent.config,
        format!("[agent]\n{listen}\ntick_interval_ms = 100\n[ledger]\ngrace_period_secs = 1\n"),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !agent.log().contains("configuration reloaded") {
        assert!(
            std::time::Instant::now() < deadline,
            "log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The 100 ms tick is in force: ticks come within seconds instead of a minute.
    let before = sample(&agent.scrape(), "tally_ticks_total", &[]).unwrap();
    assert!(before <= 2.0, "a one-minute tick ticked {before} times");
    agent.scrape_until(
        Duration::from_secs(5),
        "ticks at the reloaded interval",
        |t| sample(t, "tally_ticks_total", &[]).is_some_and(|n| n >= before + 3.0),
    );
}

#[test]
fn sd_notify_ready_and_stopping_reach_the_notify_socket() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let port = tally_tests::agent::free_port();
    let mut child = std::process::Command::new(tally_tests::agent::tally_bin())
        .args(["agent", "--listen", &format!("127.0.0.1:{port}")])
        .env_remove("TALLY_CONFIG")
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("READY=1 within 10 s");
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), "READY=1");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = socket.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), "STOPPING=1");
    assert!(child.wait().unwrap().success());
}

/// `/readyz` is 503 until the first tick has published, however long that takes, and 200 once it
/// has; TALLY_LISTEN wins over the file's `agent.listen`. The first tick is held up by real input:
/// under a cgroup root the test owns, a workload's `cpu.stat` is a FIFO nobody writes to yet, so
/// reading it blocks until the test writes.
#[test]
fn readiness_is_503_until_the_first_tick_and_the_port_is_configurable_by_env() {
    use std::io::Write;
    use std::os::unix::ffi::OsStrExt;
    let port = tally_tests::agent::free_port();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cgroup");
    let unit = root.join("system.slice/held.service");
    std::fs::create_dir_all(&unit).unwrap();
    std::fs::write(root.join("cgroup.controllers"), "").unwrap();
    let fifo = unit.join("cpu.stat");
    let path = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let config = dir.path().join("t.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nlisten = \"127.0.0.1:1\"\n[paths]\ncgroup_root = \"{}\"\n[ebpf]\nenabled = false\n[rdma]\nenabled = false\n[cri]\nendpoints = []\n",
            root.display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(tally_tests::agent::tally_bin())
        .args(["agent", "--config"])
        .arg(&config)
        .env("TALLY_LISTEN", format!("127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let poll = |what: &str, want: u16| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(r) = http_get(port, "/readyz", &[]) {
                return r.status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: nothing answers on the TALLY_LISTEN port (wanted {want})"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // Up, with the first tick held: 503, and still 503 a second later.
    assert_eq!(poll("serving", 503), 503);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(poll("still held", 503), 503);
    // Let the tick read its file: ready. A tick that gave up on the FIFO between our open and
    // our write leaves no reader (EPIPE): write again to the next one.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let written = std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .and_then(|mut f| f.write_all(b"usage_usec 1000000\n"));
        match written {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no reader kept the FIFO open"
                );
            }
            Err(e) => panic!("writing {}: {e}", fifo.display()),
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while poll("released", 200) != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "not ready after the first tick could complete"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn strict_mode_turns_skips_into_failures() {
    let strict = std::env::var(require::STRICT_VAR).is_ok_and(|v| v == "1");
    let result = std::panic::catch_unwind(|| require::skip("probe", "testing the skip itself"));
    assert_eq!(result.is_err(), strict);
}

/// A client stuck halfway through a request holds the graceful drain open: the agent still exits
/// 0 within 5 s, and a second signal ends it at once.
#[test]
fn a_stuck_client_cannot_hold_the_drain_and_a_second_signal_exits_at_once() {
    use std::io::Write;
    for second_signal in [false, true] {
        let mut agent = Agent::start("");
        let mut stuck = std::net::TcpStream::connect(("127.0.0.1", agent.port)).unwrap();
        stuck
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let started = std::time::Instant::now();
        agent.signal(libc::SIGTERM);
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            agent.child.try_wait().unwrap().is_none(),
            "the drain should be waiting on the stuck client"
        );
        if second_signal {
            agent.signal(libc::SIGTERM);
            let status = agent
                .wait_exit(Duration::from_secs(1))
                .expect("exit at once");
            assert_eq!(status.code(), Some(130));
            assert!(agent.log().contains("second signal"), "{}", agent.log());
        } else {
            let status = agent
                .wait_exit(Duration::from_secs(5).saturating_sub(started.elapsed()))
                .unwrap_or_else(|| panic!("no exit within 5 s; log:\n{}", agent.log()));
            assert_eq!(status.code(), Some(0), "{}", agent.log());
        }
        drop(stuck);
    }
}

#[test]
fn check_reports_this_node_as_json() {
    let out = std::process::Command::new(tally_tests::agent::tally_bin())
        .args(["check", "--json"])
        .env_remove("TALLY_CONFIG")
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(
        out.status.code(),
        json["exit_code"].as_i64().map(|c| c as i32)
    );
    let items = json["items"].as_array().unwrap();
    for name in [
        "kernel",
        "btf",
        "cgroup mode",
        "bpf network",
        "bpf tcp",
        "bpf disk",
        "nvml",
        "rdma",
        "privileges",
    ] {
        assert!(
            items.iter().any(|i| i["name"] == name),
            "item {name} missing: {json:#}"
        );
    }
    // Really loaded on this kernel (root, BTF): each probe reports the method it attached with.
    if require::root("check_reports_this_node_as_json") {
        for (name, method) in [
            ("bpf network", "cgroup_skb"),
            ("bpf tcp", "tp_btf"),
            ("bpf disk", "tp_btf"),
        ] {
            let item = items.iter().find(|i| i["name"] == name).unwrap();
            assert_eq!(item["status"], "ok", "{item}");
            assert!(
                item["detail"].as_str().unwrap().starts_with(method),
                "{item}"
            );
        }
    }
    let kernel = items.iter().find(|i| i["name"] == "kernel").unwrap();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(kernel["detail"], release.trim());
}
