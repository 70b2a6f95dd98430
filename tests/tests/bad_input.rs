//! Bad input gets a clear message or a counted error, never a panic: malformed and unknown
//! configuration, bad listen addresses, a port in use, unreadable cgroup files.

use std::process::{Command, Output};
use std::time::Duration;

use tally_tests::agent::{sample, tally_bin, Agent};

#[expect(clippy::expect_used, reason = "test helper")]
fn tally(args: &[&str]) -> Output {
    Command::new(tally_bin())
        .args(args)
        .env_remove("TALLY_LISTEN")
        .env_remove("TALLY_CONFIG")
        .output()
        .expect("run tally")
}

fn no_panic(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn validate_lists_every_error_with_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[agent]\nlisten = \"not an address\"\nwat = true\n\n[ledger]\ngrace_period_secs = \"long\"\n",
    )
    .unwrap();
    let out = tally(&["validate", file.to_str().unwrap()]);
    no_panic(&out);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let f = file.display();
    assert!(
        stderr.contains(&format!("{f}:2: `agent.listen`")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{f}:3: `agent.wat`: unknown field")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{f}:6: `ledger.grace_period_secs`: invalid type")),
        "{stderr}"
    );
    assert!(stderr.contains("3 error(s)"), "{stderr}");

    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[agent]\ntick_interval_ms = 500\n").unwrap();
    let out = tally(&["validate", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn malformed_toml_is_refused_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.toml");
    std::fs::write(&file, "[agent]\nlisten = \"127.0.0.1:1\"\n[agent\n").unwrap();
    let out = tally(&["validate", file.to_str().unwrap()]);
    no_panic(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(":3: "));

    let out = tally(&["agent", "--config", file.to_str().unwrap()]);
    no_panic(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid configuration"));
}

#[test]
fn the_agent_refuses_unknown_keys_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("unknown.toml");
    std::fs::write(&file, "[gpu]\nnvml_libary = \"/x\"\n").unwrap();
    let out = tally(&["agent", "--config", file.to_str().unwrap()]);
    no_panic(&out);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`gpu.nvml_libary`"), "{stderr}");

    let out = tally(&["agent", "--config", "/nonexistent/tally.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/tally.toml"));
}

#[test]
fn bad_listen_addresses_are_named() {
    let out = tally(&["agent", "--listen", "localhost"]);
    no_panic(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`localhost` is not a socket address"));

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = tally(&["agent", "--listen", &addr]);
    no_panic(&out);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
}

#[test]
fn a_cgroup_root_without_hierarchies_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.toml");
    std::fs::write(
        &file,
        format!("[paths]\ncgroup_root = \"{}\"\n", dir.path().display()),
    )
    .unwrap();
    let out = tally(&[
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--config",
        file.to_str().unwrap(),
    ]);
    no_panic(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no cgroup hierarchy under"));
}

/// A fixture v2 tree: one unit whose files are malformed or unreadable. The agent keeps serving,
/// counts each failure, and exports what it could read.
#[test]
fn unreadable_and_malformed_cgroup_files_are_counted() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::write(r.join("cgroup.controllers"), "cpu memory io\n").unwrap();
    let good = r.join("system.slice/good.service");
    let bad = r.join("system.slice/bad.service");
    std::fs::create_dir_all(&good).unwrap();
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(good.join("cpu.stat"), "usage_usec 2000000\n").unwrap();
    std::fs::write(good.join("memory.current"), "4096\n").unwrap();
    std::fs::write(
        good.join("io.stat"),
        "8:0 rbytes=10 wbytes=20 rios=1 wios=1\n",
    )
    .unwrap();
    std::fs::write(bad.join("cpu.stat"), "usage_usec lots\n").unwrap();
    // A directory where a file should be: read() fails with EISDIR.
    std::fs::create_dir_all(bad.join("memory.current")).unwrap();
    std::fs::write(bad.join("io.stat"), "garbage\n").unwrap();

    let agent = Agent::start(&format!(
        "[agent]\ntick_interval_ms = 100\n[paths]\ncgroup_root = \"{}\"\n[cri]\nendpoints = []\n# A fixture tree: the kernel's BPF programs cannot see its cgroups.\n[ebpf]\nenabled = false\n",
        r.display()
    ));
    let text = agent.scrape_until(Duration::from_secs(5), "error counters", |t| {
        sample(t, "tally_collector_errors_total", &["reason=\"parse\""]).is_some_and(|n| n >= 4.0)
    });
    assert!(
        sample(
            &text,
            "tally_collector_errors_total",
            &["collector=\"cgroupfs\"", "reason=\"read\""]
        )
        .is_some_and(|n| n >= 2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "tally_workload_cpu_seconds_total",
            &["unit=\"good.service\""]
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            "tally_workload_memory_bytes",
            &["unit=\"good.service\""]
        ),
        Some(4096.0)
    );
    assert_eq!(
        sample(
            &text,
            "tally_workload_disk_write_bytes_total",
            &["unit=\"good.service\""]
        ),
        Some(20.0)
    );
    assert_eq!(
        sample(
            &text,
            "tally_workload_cpu_seconds_total",
            &["unit=\"bad.service\""]
        ),
        None,
        "a malformed file must not become a number"
    );
    assert_eq!(
        sample(&text, "tally_workload_info", &["unit=\"bad.service\""]),
        Some(1.0)
    );
    // Logged once per kind, not per tick.
    let log = agent.log();
    assert_eq!(
        log.matches("reason=\"parse\"").count() + log.matches("reason=parse").count(),
        1,
        "{log}"
    );
    assert_eq!(agent.get("/readyz").unwrap().status, 200);
}
