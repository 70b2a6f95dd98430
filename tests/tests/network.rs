//! Per-workload network bytes from the real `cgroup_skb` programs on real cgroups: exact for
//! UDP, within the header bound for TCP, by destination scope through a network namespace, and
//! the map's hygiene (removed cgroups, a full map).

use std::net::{TcpListener, UdpSocket};
use std::process::Command;
use std::time::Duration;

use tally_tests::agent::{sample, Agent};
use tally_tests::cgroup::{random_hex, TestCgroup};
use tally_tests::require;

/// Sends `count` UDP datagrams of `size` bytes to `addr`, then `tcp` bytes over one TCP
/// connection to `tcp_addr` (if given), from a fresh python3 process.
const SENDER: &str = r#"
import socket, sys
host, port, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(count):
    s.sendto(b"u" * size, (host, port))
if len(sys.argv) > 5:
    thost, tport, nbytes = sys.argv[5], int(sys.argv[6]), int(sys.argv[7])
    t = socket.create_connection((thost, tport))
    t.sendall(b"t" * nbytes)
    t.shutdown(socket.SHUT_WR)
    while t.recv(65536):
        pass
    t.close()
"#;

fn setup(test: &str) -> Option<std::path::PathBuf> {
    if !require::root(test) {
        return None;
    }
    require::binary(test, "python3")?;
    require::unified(test)
}

fn unit_needle(unit: &str) -> String {
    format!("unit=\"{unit}\"")
}

fn net(text: &str, family: &str, unit: &str, scope: &str) -> Option<f64> {
    sample(
        text,
        &format!("tally_workload_network_{family}_total"),
        &[&unit_needle(unit), &format!("scope=\"{scope}\"")],
    )
}

#[test]
fn udp_bytes_are_exact_and_tcp_within_the_header_bound_per_cgroup() {
    const TEST: &str = "udp_bytes_are_exact_and_tcp_within_the_header_bound_per_cgroup";
    let Some(unified) = setup(TEST) else { return };
    let agent = Agent::start("[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = []\n");

    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = udp.local_addr().unwrap().port().to_string();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_port = tcp.local_addr().unwrap().port().to_string();
    // Drain TCP connections so senders finish.
    std::thread::spawn(move || {
        for stream in tcp.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let _ = std::io::copy(&mut stream, &mut std::io::sink());
            });
        }
    });

    // Three workloads with different, known amounts.
    let plans = [
        (5usize, 100usize, 10_000usize),
        (10, 1000, 50_000),
        (20, 1400, 200_000),
    ];
    let mut cgroups = Vec::new();
    for (i, (count, size, tcp_bytes)) in plans.iter().enumerate() {
        let unit = format!("tally-net-{i}-{}.service", random_hex(6));
        let cg = TestCgroup::create(
            std::slice::from_ref(&unified),
            &format!("/system.slice/{unit}"),
        );
        let out = cg.run(
            "python3",
            &[
                "-c",
                SENDER,
                "127.0.0.1",
                &udp_port,
                &count.to_string(),
                &size.to_string(),
                "127.0.0.1",
                &tcp_port,
                &tcp_bytes.to_string(),
            ],
        );
        assert!(
            out.status.success(),
            "sender: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cgroups.push((unit, cg));
    }

    for ((unit, _), (count, size, tcp_bytes)) in cgroups.iter().zip(plans) {
        // IPv4 (20) + UDP (8) headers per datagram; TCP adds at least 40 and at most 120 bytes of
        // headers per segment (IPv4 and TCP, both with maximal options).
        let udp_bytes = (count * (size + 28)) as f64;
        let text = agent.scrape_until(Duration::from_secs(5), "sender's bytes", |t| {
            net(t, "transmit_bytes", unit, "node")
                .is_some_and(|b| b >= udp_bytes + tcp_bytes as f64)
        });
        let tx = net(&text, "transmit_bytes", unit, "node").unwrap();
        let tx_packets = net(&text, "transmit_packets", unit, "node").unwrap();
        let tcp_tx = tx - udp_bytes;
        let tcp_packets = tx_packets - count as f64;
        assert!(
            tcp_packets >= 3.0,
            "{unit}: SYN, data and FIN at least: {tcp_packets}"
        );
        let overhead = tcp_tx - tcp_bytes as f64;
        assert!(
            overhead >= 40.0 * tcp_packets && overhead <= 120.0 * tcp_packets,
            "{unit}: TCP header overhead {overhead} for {tcp_packets} segments (tx {tx}, UDP {udp_bytes})"
        );
        // The UDP part is exact (`udp_alone_is_exact`), so the rest of what it sent is TCP; what
        // it received is only the peer's ACKs and FIN, headers without payload.
        let rx_packets = net(&text, "receive_packets", unit, "node").unwrap_or(0.0);
        let rx = net(&text, "receive_bytes", unit, "node").unwrap_or(0.0);
        assert!(
            rx <= 120.0 * rx_packets,
            "{unit}: it received only ACKs and a FIN: {rx} in {rx_packets}"
        );
        for scope in ["cluster", "zone", "region", "internet"] {
            assert_eq!(
                net(&text, "transmit_bytes", unit, scope),
                None,
                "{unit} {scope}"
            );
        }
    }
}

#[test]
fn udp_alone_is_exact() {
    const TEST: &str = "udp_alone_is_exact";
    let Some(unified) = setup(TEST) else { return };
    let agent = Agent::start("[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = []\n");
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = udp.local_addr().unwrap().port().to_string();
    let unit = format!("tally-udp-{}.service", random_hex(6));
    let cg = TestCgroup::create(
        std::slice::from_ref(&unified),
        &format!("/system.slice/{unit}"),
    );
    let out = cg.run("python3", &["-c", SENDER, "127.0.0.1", &port, "37", "777"]);
    assert!(out.status.success());
    let want = (37 * (777 + 28)) as f64;
    let text = agent.scrape_until(Duration::from_secs(5), "udp bytes", |t| {
        net(t, "transmit_bytes", &unit, "node").is_some()
    });
    assert_eq!(
        net(&text, "transmit_bytes", &unit, "node"),
        Some(want),
        "{text}"
    );
    assert_eq!(net(&text, "transmit_packets", &unit, "node"), Some(37.0));
    // Nothing came back to it.
    assert_eq!(net(&text, "receive_bytes", &unit, "node"), None);
}

/// A veth pair into a network namespace, removed on drop.
struct Netns {
    name: String,
    host_if: String,
}

impl Netns {
    #[expect(clippy::unwrap_used, reason = "test helper")]
    fn create(octet: u8) -> Netns {
        let tag = random_hex(6);
        let (name, host_if, peer_if) = (
            format!("tally-{tag}"),
            format!("tv{tag}"),
            format!("tp{tag}"),
        );
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if,
        ]);
        ip(&["link", "set", &peer_if, "netns", &name]);
        ip(&[
            "addr",
            "add",
            &format!("10.213.{octet}.1/24"),
            "dev",
            &host_if,
        ]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("10.213.{octet}.2/24"),
            "dev",
            &peer_if,
        ]);
        ip(&["-n", &name, "link", "set", &peer_if, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns { name, host_if }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

#[test]
fn traffic_into_configured_cidrs_lands_in_their_scopes() {
    const TEST: &str = "traffic_into_configured_cidrs_lands_in_their_scopes";
    let Some(unified) = setup(TEST) else { return };
    require::binary(TEST, "ip");
    let octet = 100 + (std::process::id() % 100) as u8;
    let _ns = Netns::create(octet);
    let agent = Agent::start(&format!(
        "[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = []\n[network]\nzone_cidrs = [\"10.213.0.0/16\"]\ncluster_cidrs = [\"10.213.{octet}.128/25\"]\n"
    ));
    let unit = format!("tally-scope-{}.service", random_hex(6));
    let cg = TestCgroup::create(
        std::slice::from_ref(&unified),
        &format!("/system.slice/{unit}"),
    );
    // .2 is the namespace's end of the veth (zone); .200 is routed through the same link but
    // lies in the more specific cluster range.
    for (host, count) in [
        (format!("10.213.{octet}.2"), "7"),
        (format!("10.213.{octet}.200"), "3"),
    ] {
        let out = cg.run("python3", &["-c", SENDER, &host, "9", count, "500"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = agent.scrape_until(Duration::from_secs(5), "scoped bytes", |t| {
        net(t, "transmit_packets", &unit, "zone") == Some(7.0)
            && net(t, "transmit_packets", &unit, "cluster") == Some(3.0)
    });
    assert_eq!(
        net(&text, "transmit_bytes", &unit, "zone"),
        Some(7.0 * 528.0)
    );
    assert_eq!(
        net(&text, "transmit_bytes", &unit, "cluster"),
        Some(3.0 * 528.0)
    );
    assert_eq!(net(&text, "transmit_bytes", &unit, "node"), None);
    assert_eq!(net(&text, "transmit_bytes", &unit, "internet"), None);
}

/// An address the node gains while the agent runs is `node` from the next tick: the agent follows
/// address changes (rtnetlink), not only what it read at start. `lo` gets a TEST-NET-2 address
/// after the agent is ready; datagrams to it are `node` once the agent has caught up, and from
/// then on every one is.
#[test]
fn an_address_added_while_running_is_scope_node() {
    const TEST: &str = "an_address_added_while_running_is_scope_node";
    let Some(unified) = setup(TEST) else { return };
    require::binary(TEST, "ip");
    let agent = Agent::start("[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = []\n");
    let unit = format!("tally-addr-{}.service", random_hex(6));
    let cg = TestCgroup::create(
        std::slice::from_ref(&unified),
        &format!("/system.slice/{unit}"),
    );
    let link = Dummy::create();
    let send = |count: &str| {
        let out = cg.run("python3", &["-c", SENDER, &link.addr, "9", count, "100"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // Until the agent has read the new address, datagrams to it are `internet`.
    let sent = std::cell::Cell::new(0.0);
    agent.scrape_until(Duration::from_secs(15), "the new address as node", |t| {
        if net(t, "transmit_packets", &unit, "node").is_some() {
            return true;
        }
        send("1");
        sent.set(sent.get() + 1.0);
        false
    });
    let counted = |t: &str, scope| net(t, "transmit_packets", &unit, scope).unwrap_or(0.0);
    let caught_up = agent.scrape_until(Duration::from_secs(5), "every datagram counted", |t| {
        counted(t, "node") + counted(t, "internet") == sent.get()
    });
    let node = counted(&caught_up, "node");
    let internet = counted(&caught_up, "internet");
    send("5");
    let text = agent.scrape_until(Duration::from_secs(5), "five more as node", |t| {
        net(t, "transmit_packets", &unit, "node") == Some(node + 5.0)
    });
    assert_eq!(
        counted(&text, "internet"),
        internet,
        "none of the five after catching up is internet"
    );
    assert_eq!(
        net(&text, "transmit_bytes", &unit, "node"),
        Some((node + 5.0) * 128.0)
    );
}

/// A TEST-NET-2 address on `lo` (as a service VIP is often held), removed on drop.
struct Dummy {
    addr: String,
}

impl Dummy {
    #[expect(clippy::unwrap_used, reason = "test helper")]
    fn create() -> Dummy {
        let addr = format!("198.51.100.{}", 1 + std::process::id() % 250);
        let out = Command::new("ip")
            .args(["addr", "add", &format!("{addr}/32"), "dev", "lo"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip addr add {addr}/32 dev lo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Dummy { addr }
    }
}

impl Drop for Dummy {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["addr", "del", &format!("{}/32", self.addr), "dev", "lo"])
            .output();
    }
}

/// Whether any NET_STATS map on the machine holds a key of `cgroup_id` (bpftool's JSON dump).
#[expect(clippy::unwrap_used, reason = "test helper")]
fn map_holds(cgroup_id: u64) -> bool {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "name", "NET_STATS"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let le: Vec<String> = cgroup_id
        .to_le_bytes()
        .iter()
        .map(|b| format!("\"0x{b:02x}\""))
        .collect();
    text.contains(&format!("[{}", le.join(",")))
}

#[test]
fn a_removed_cgroup_leaves_no_map_entry_and_keeps_its_final_counts() {
    const TEST: &str = "a_removed_cgroup_leaves_no_map_entry_and_keeps_its_final_counts";
    let Some(unified) = setup(TEST) else { return };
    if require::binary(TEST, "bpftool").is_none() {
        return;
    }
    let agent = Agent::start("[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = []\n");
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = udp.local_addr().unwrap().port().to_string();
    let unit = format!("tally-gone-{}.service", random_hex(6));
    let mut cg = TestCgroup::create(
        std::slice::from_ref(&unified),
        &format!("/system.slice/{unit}"),
    );
    let id = cg.id();
    let out = cg.run("python3", &["-c", SENDER, "127.0.0.1", &port, "11", "100"]);
    assert!(out.status.success());
    agent.scrape_until(Duration::from_secs(5), "bytes before removal", |t| {
        net(t, "transmit_packets", &unit, "node") == Some(11.0)
    });
    assert!(map_holds(id), "the live cgroup's entry is in the map");
    cg.remove();
    let text = agent.scrape_until(Duration::from_secs(5), "exited", |t| {
        t.contains(&format!(
            "unit=\"{unit}\",runtime=\"systemd\",qos_class=\"\",state=\"exited\""
        ))
    });
    assert_eq!(
        net(&text, "transmit_bytes", &unit, "node"),
        Some(11.0 * 128.0)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while map_holds(id) {
        assert!(
            std::time::Instant::now() < deadline,
            "stale NET_STATS entry for {id}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Still exported during the grace period after the entry is gone.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        net(&agent.scrape(), "transmit_bytes", &unit, "node"),
        Some(11.0 * 128.0)
    );
}

#[test]
fn a_full_map_counts_lost_updates_and_the_agent_keeps_running() {
    const TEST: &str = "a_full_map_counts_lost_updates_and_the_agent_keeps_running";
    let Some(unified) = setup(TEST) else { return };
    let agent = Agent::start(
        "[agent]\ntick_interval_ms = 1000\n[cri]\nendpoints = []\n[ebpf]\nmax_net_entries = 64\n",
    );
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = udp.local_addr().unwrap().port();
    let tag = random_hex(6);
    let cgroups: Vec<TestCgroup> = (0..80)
        .map(|i| {
            TestCgroup::create(
                std::slice::from_ref(&unified),
                &format!("/tally-full-{tag}/c{i}"),
            )
        })
        .collect();
    // One process hops through 80 cgroups, opening a socket in each (a socket belongs to the
    // cgroup it was created in): 80 egress keys within one tick, more than the map holds.
    let procs: Vec<String> = cgroups
        .iter()
        .map(|c| c.dirs[0].join("cgroup.procs").display().to_string())
        .collect();
    let script = format!(
        "import os, socket\nfor p in {procs:?}:\n    open(p, 'w').write(str(os.getpid()))\n    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {port}))\nopen('{}', 'w').write(str(os.getpid()))\n",
        unified.join("cgroup.procs").display()
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = agent.scrape_until(Duration::from_secs(5), "lost updates", |t| {
        sample(
            t,
            "tally_ebpf_map_updates_lost_total",
            &["map=\"NET_STATS\""],
        )
        .is_some_and(|n| n > 0.0)
    });
    assert!(text.contains("tally_probe_up{probe=\"network\",method=\"cgroup_skb\"} 1"));
    assert_eq!(agent.get("/readyz").unwrap().status, 200);
    let ticks = sample(&text, "tally_ticks_total", &[]).unwrap();
    agent.scrape_until(Duration::from_secs(5), "more ticks", |t| {
        sample(t, "tally_ticks_total", &[]).is_some_and(|n| n > ticks)
    });
    drop(cgroups);
    let _ = std::fs::remove_dir(unified.join(format!("tally-full-{tag}")));
}
