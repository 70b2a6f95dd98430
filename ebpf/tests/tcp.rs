//! The TCP source on the real kernel: real cgroups, real loopback connections. Needs root; skips
//! loudly otherwise (fails under `TALLY_TEST_STRICT=1`).

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::{own_cgroup_id, poll, privileged, TestCgroup};
use tally_ebpf::tcp::{Tcp, TcpConfig};
use tally_ebpf::{ProbeStatus, TcpValue};

const CONNECTIONS: u64 = 5;

fn config(disabled: &[&str]) -> TcpConfig {
    TcpConfig {
        max_entries: 1024,
        disabled_methods: disabled.iter().map(|s| (*s).to_owned()).collect(),
    }
}

#[expect(clippy::unwrap_used, reason = "test helper")]
fn load_with_status(config: &TcpConfig) -> (Tcp, ProbeStatus) {
    let (tcp, status) = Tcp::load(config);
    eprintln!("tcp probe status: {status:?}");
    assert!(status.up, "tcp source did not load: {status:?}");
    assert_eq!(status.probe, "tcp");
    let tcp = tcp.unwrap();
    assert_eq!(tcp.method(), status.method);
    (tcp, status)
}

fn load(config: &TcpConfig) -> Tcp {
    load_with_status(config).0
}

#[expect(clippy::unwrap_used, reason = "test helper")]
fn value(tcp: &Tcp, cgroup_id: u64) -> TcpValue {
    tcp.read()
        .unwrap()
        .into_iter()
        .find(|(id, _)| *id == cgroup_id)
        .map(|(_, v)| v)
        .unwrap_or_default()
}

/// Has a child in `cgroup` open `n` connections to a listener of this process (outside the
/// cgroup) and close them; the listener reads each to EOF and closes its end.
#[expect(clippy::unwrap_used, clippy::panic, reason = "test helper")]
fn connect_and_close(cgroup: &TestCgroup, n: u64) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let acceptor = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut accepted = 0;
        while accepted < n && Instant::now() < deadline {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream.set_nonblocking(false).unwrap();
                    stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    let _ = stream.read_to_end(&mut Vec::new());
                    accepted += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
        accepted
    });
    let script = format!(
        "for i in $(seq {n}); do exec 3<>/dev/tcp/127.0.0.1/{port} || exit 1; exec 3>&-; done"
    );
    cgroup.run_ok("bash", &["-c", &script]);
    assert_eq!(acceptor.join().unwrap(), n, "listener accepted too few");
}

/// Waits until `cgroup`'s counters show `n` active opens and `n` closes, and returns them.
#[expect(clippy::panic, reason = "test helper")]
fn settled(tcp: &Tcp, cgroup_id: u64, n: u64) -> TcpValue {
    poll(10, || {
        let v = value(tcp, cgroup_id);
        (v.active_opens >= n && v.closes >= n).then_some(v)
    })
    .unwrap_or_else(|| {
        panic!(
            "cgroup {cgroup_id} never showed {n} opens and closes: {:?}",
            value(tcp, cgroup_id)
        )
    })
}

/// The counts of `n` connections a child made and closed, with the listener outside its cgroup.
fn assert_connections_counted(tcp: &Tcp, test: &str) {
    let cgroup = TestCgroup::create(test);
    connect_and_close(&cgroup, CONNECTIONS);
    let child = settled(tcp, cgroup.id(), CONNECTIONS);
    assert_eq!(child.active_opens, CONNECTIONS, "{child:?}");
    assert_eq!(child.closes, CONNECTIONS, "{child:?}");
    // The accepted sockets are the listener's: they belong to this process's cgroup.
    assert_eq!(child.passive_opens, 0, "{child:?}");
    let listener = value(tcp, own_cgroup_id());
    assert!(
        listener.passive_opens >= CONNECTIONS,
        "listener's cgroup: {listener:?}"
    );
}

#[test]
fn opens_and_closes_count_against_the_socket_cgroup() {
    if !privileged("opens_and_closes_count_against_the_socket_cgroup") {
        return;
    }
    let (tcp, status) = load_with_status(&config(&[]));
    if tcp.method() != "fentry" {
        // The development VMs refuse fentry (EPERM): the status says so and the next method runs.
        let error = status.error.unwrap_or_default();
        assert!(error.starts_with("fentry: "), "{error}");
    }
    let _stats = tally_ebpf::stats::StatsGuard::enable().unwrap();
    assert_connections_counted(&tcp, "tcp-default");
    let stats = tcp.program_stats();
    for s in &stats {
        eprintln!(
            "{}: {} runs, {} ns/run",
            s.program,
            s.run_count,
            s.run_time_ns.checked_div(s.run_count).unwrap_or(0)
        );
    }
    assert_eq!(stats.len(), 2, "{stats:?}");
    let state = stats.iter().find(|s| s.program.starts_with("tcp_state_"));
    assert!(state.is_some_and(|s| s.run_count > 0), "{stats:?}");
}

#[test]
fn falls_back_to_raw_tracepoint_then_tracepoint() {
    if !privileged("falls_back_to_raw_tracepoint_then_tracepoint") {
        return;
    }
    for (disabled, expected) in [
        (&["fentry", "tp_btf"][..], "raw_tracepoint"),
        (&["fentry", "tp_btf", "raw_tracepoint"][..], "tracepoint"),
    ] {
        let tcp = load(&config(disabled));
        assert_eq!(tcp.method(), expected);
        assert_connections_counted(&tcp, &format!("tcp-{expected}"));
    }
}

#[test]
fn disabling_every_method_reports_the_probe_down() {
    let (tcp, status) = Tcp::load(&config(&tally_ebpf::ATTACH_METHODS));
    assert!(tcp.is_none());
    assert!(!status.up);
    assert_eq!(status.method, "none");
    assert_eq!(
        status.error.as_deref(),
        Some("every attach method is disabled")
    );
}

/// A listener whose accept queue is full drops SYNs (net/ipv4/tcp_input.c, tcp_conn_request():
/// sk_acceptq_is_full), so the client's SYN is retransmitted by its timer, in softirq, where only
/// the socket knows the cgroup.
#[test]
fn retransmits_count_against_the_socket_cgroup() {
    if !privileged("retransmits_count_against_the_socket_cgroup") {
        return;
    }
    for method in ["tp_btf", "raw_tracepoint", "tracepoint"] {
        let disabled: Vec<&str> = tally_ebpf::ATTACH_METHODS
            .into_iter()
            .filter(|m| *m != method)
            .collect();
        let tcp = load(&config(&disabled));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // SAFETY: a valid listening socket; listen(2) again only changes its backlog.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let mut cgroup = TestCgroup::create(&format!("tcp-retrans-{method}"));
        // The first connection fills the queue; the second one's SYN is dropped and resent.
        let script = format!(
            "exec 3<>/dev/tcp/127.0.0.1/{port}; exec 4<>/dev/tcp/127.0.0.1/{port}; sleep 60"
        );
        cgroup.spawn("bash", &["-c", &script]);
        let retransmitted = poll(10, || {
            let v = value(&tcp, cgroup.id());
            (v.retransmits > 0).then_some(v)
        });
        assert!(
            retransmitted.is_some(),
            "{method}: no retransmit counted for the child: {:?}",
            value(&tcp, cgroup.id())
        );
    }
}

#[test]
fn a_full_map_counts_lost_updates() {
    if !privileged("a_full_map_counts_lost_updates") {
        return;
    }
    let tcp = load(&TcpConfig {
        max_entries: 1,
        disabled_methods: Vec::new(),
    });
    // Two cgroups at least: the child's (active opens) and this process's (passive opens).
    let cgroup = TestCgroup::create("tcp-full");
    connect_and_close(&cgroup, 2);
    let lost = poll(10, || tcp.lost().unwrap().checked_sub(1).map(|_| ()));
    assert!(lost.is_some(), "lost = {}", tcp.lost().unwrap());
    assert!(tcp.read().unwrap().len() <= 1);
}

#[test]
fn remove_deletes_a_cgroups_entry() {
    if !privileged("remove_deletes_a_cgroups_entry") {
        return;
    }
    let mut tcp = load(&config(&[]));
    let cgroup = TestCgroup::create("tcp-remove");
    connect_and_close(&cgroup, 1);
    settled(&tcp, cgroup.id(), 1);
    tcp.remove(&[cgroup.id(), u64::MAX]).unwrap();
    assert!(tcp.read().unwrap().iter().all(|(id, _)| *id != cgroup.id()));
}
