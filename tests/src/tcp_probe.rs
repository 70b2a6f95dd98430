//! The TCP probe through the agent, one attach method at a time: what the host suite's `probes`
//! checks on whatever kernel it runs on, and the VM suite on the distribution kernel.

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use crate::agent::{sample, Agent};
use crate::cgroup::{random_hex, TestCgroup};

/// The TCP attach methods, best first, as the agent tries them (`tally_ebpf::ATTACH_METHODS`).
pub const TCP_METHODS: [&str; 5] = ["fentry", "tp_btf", "raw_tracepoint", "tracepoint", "kprobe"];

const CONNECTOR: &str = r#"
import socket, sys
for _ in range(int(sys.argv[2])):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    s.sendall(b"x")
    s.close()
"#;

/// Opens one connection (it fills the listener's accept queue of one), then a second whose SYN the
/// listener drops, so the kernel resends it from its timer (1 s, then 2 s later), and exits after
/// `argv[2]` seconds, which ends the resending.
const HELD_SYN: &str = r#"
import socket, sys, time
port = int(sys.argv[1])
first = socket.create_connection(("127.0.0.1", port))
second = socket.socket()
second.setblocking(False)
try:
    second.connect(("127.0.0.1", port))
except BlockingIOError:
    pass
time.sleep(float(sys.argv[2]))
"#;

/// An agent (200 ms tick, no CRI) with `disabled` attach methods (`"a", "b"`).
pub fn agent(disabled: &str) -> Agent {
    Agent::start(&format!(
        "[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = []\n[ebpf]\ndisabled_methods = [{disabled}]\n"
    ))
}

/// An agent whose TCP probe may use `method` only.
pub fn agent_with_only(method: &str) -> Agent {
    let disabled: Vec<String> = TCP_METHODS
        .iter()
        .filter(|m| **m != method)
        .map(|m| format!("\"{m}\""))
        .collect();
    agent(&disabled.join(", "))
}

/// `tally_probe_up{probe="tcp",method}`: 1 or 0 (anything else fails the test).
pub fn tcp_up(agent: &Agent, method: &str) -> bool {
    let text = agent.scrape();
    let up = sample(
        &text,
        "tally_probe_up",
        &["probe=\"tcp\"", &format!("method=\"{method}\"")],
    );
    assert!(
        up == Some(1.0) || up == Some(0.0),
        "tally_probe_up for tcp through {method}: {up:?}\n{text}"
    );
    up == Some(1.0)
}

/// A unit cgroup `tally-<tag>-<random>.service` under `<unified>/system.slice`.
fn unit(unified: &Path, tag: &str) -> (String, TestCgroup) {
    let unit = format!("tally-{tag}-{}.service", random_hex(6));
    let cg = TestCgroup::create(
        std::slice::from_ref(&unified.to_path_buf()),
        &format!("/system.slice/{unit}"),
    );
    (unit, cg)
}

/// Starts an agent with every TCP method but `method` disabled. Where this kernel loads it,
/// checks that 7 connections from a unit are counted exactly and returns true; where it does
/// not, checks that the probe says so (down, naming the method) and returns false.
#[expect(clippy::unwrap_used, reason = "test helper")]
pub fn counts_through(unified: &Path, method: &str) -> bool {
    let agent = agent_with_only(method);
    if !tcp_up(&agent, method) {
        return false;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            drop(stream);
        }
    });
    let (unit, cg) = unit(unified, "tcp");
    let out = cg.run("python3", &["-c", CONNECTOR, &port, "7"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let needle = format!("unit=\"{unit}\"");
    let text = agent.scrape_until(Duration::from_secs(5), "7 connections closed", |t| {
        sample(t, "tally_workload_tcp_connections_closed_total", &[&needle]) == Some(7.0)
    });
    assert_eq!(
        sample(
            &text,
            "tally_workload_tcp_connections_opened_total",
            &[&needle, "direction=\"active\""]
        ),
        Some(7.0),
        "through {method}"
    );
    // The accepting side is the test process's cgroup, not the connector's.
    assert_eq!(
        sample(
            &text,
            "tally_workload_tcp_connections_opened_total",
            &[&needle, "direction=\"passive\""]
        ),
        Some(0.0),
        "through {method}"
    );
    true
}

/// The kernel's own count of retransmitted segments in this network namespace (`RetransSegs`).
#[expect(clippy::unwrap_used, reason = "test helper")]
pub fn kernel_retransmitted_segments() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "RetransSegs")
        .unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// Through an agent whose TCP probe uses `agent`'s method: a unit's SYN held by a full accept
/// queue is resent by the kernel's timer, in softirq; the unit's retransmitted segments equal what
/// the kernel counted in `RetransSegs` meanwhile. Exact only where nothing else on the node
/// retransmits (the VM suite runs one test at a time). Returns the count.
#[expect(clippy::unwrap_used, reason = "test helper")]
pub fn retransmits_equal_the_kernels(unified: &Path, agent: &Agent, method: &str) -> u64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    // SAFETY: a valid listening socket; listen(2) again only changes its backlog.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let (unit, cg) = unit(unified, "retrans");
    let before = kernel_retransmitted_segments();
    let out = cg.run("python3", &["-c", HELD_SYN, &port, "3.5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kernel = kernel_retransmitted_segments() - before;
    assert!(kernel >= 1, "the kernel resent nothing in 3.5 s");
    let needle = format!("unit=\"{unit}\"");
    let text = agent.scrape_until(
        Duration::from_secs(5),
        &format!("{kernel} retransmitted segments through {method}"),
        |t| {
            sample(
                t,
                "tally_workload_tcp_retransmitted_segments_total",
                &[&needle],
            ) == Some(kernel as f64)
        },
    );
    // Nothing more arrives later: the sockets are gone with the unit's process.
    std::thread::sleep(Duration::from_millis(600));
    let later = agent.scrape();
    assert_eq!(
        sample(
            &later,
            "tally_workload_tcp_retransmitted_segments_total",
            &[&needle]
        ),
        sample(
            &text,
            "tally_workload_tcp_retransmitted_segments_total",
            &[&needle]
        ),
        "through {method}"
    );
    drop(listener);
    kernel
}
