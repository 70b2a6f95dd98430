//! RDMA on a real kernel device: soft-RoCE (`rdma_rxe`, the stock kernel's module) on one end of
//! a veth pair, with reliable-connection traffic from Debian's `ibv_rc_pingpong` between two
//! queue pairs of that device. The agent's port counters must equal what `rdma statistic` (RDMA
//! netlink) says after the traffic, counter by counter.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tally_tests::agent::{sample, Agent};

use crate::{on_the_node, output, run_ok, wait_for};

const DEVICE: &str = "tallyrxe0";
const NETDEV: &str = "tally-r0";
const PEER: &str = "tally-r1";
const ADDRESS: &str = "10.77.0.1";

/// The rxe device on the veth pair, removed on drop.
struct SoftRoce;

impl SoftRoce {
    fn up() -> SoftRoce {
        run_ok(Command::new("modprobe").arg("rdma_rxe"));
        let _ = output(Command::new("rdma").args(["link", "delete", DEVICE]));
        let _ = output(Command::new("ip").args(["link", "delete", NETDEV]));
        run_ok(
            Command::new("ip").args(["link", "add", NETDEV, "type", "veth", "peer", "name", PEER]),
        );
        run_ok(Command::new("ip").args(["addr", "add", &format!("{ADDRESS}/24"), "dev", NETDEV]));
        run_ok(Command::new("ip").args(["link", "set", NETDEV, "up"]));
        run_ok(Command::new("ip").args(["link", "set", PEER, "up"]));
        run_ok(Command::new("rdma").args(["link", "add", DEVICE, "type", "rxe", "netdev", NETDEV]));
        wait_for(Duration::from_secs(10), "the rxe port ACTIVE", || {
            let state =
                std::fs::read_to_string(format!("/sys/class/infiniband/{DEVICE}/ports/1/state"))
                    .ok()?;
            state.contains("ACTIVE").then_some(())
        });
        SoftRoce
    }

    /// The index of the port's RoCE v2 GID that holds the veth's IPv4 address.
    fn gid_index() -> String {
        let port = Path::new("/sys/class/infiniband")
            .join(DEVICE)
            .join("ports/1");
        let wanted = {
            let octets: Vec<u8> = ADDRESS.split('.').map(|o| o.parse().unwrap()).collect();
            format!(
                "0000:0000:0000:0000:0000:ffff:{:02x}{:02x}:{:02x}{:02x}",
                octets[0], octets[1], octets[2], octets[3]
            )
        };
        wait_for(Duration::from_secs(10), "the IPv4 RoCE v2 GID", || {
            (0..16).find_map(|i| {
                let gid = std::fs::read_to_string(port.join(format!("gids/{i}"))).ok()?;
                let kind =
                    std::fs::read_to_string(port.join(format!("gid_attrs/types/{i}"))).ok()?;
                (gid.trim() == wanted && kind.trim() == "RoCE v2").then(|| i.to_string())
            })
        })
    }
}

impl Drop for SoftRoce {
    fn drop(&mut self) {
        let _ = output(Command::new("rdma").args(["link", "delete", DEVICE]));
        let _ = output(Command::new("ip").args(["link", "delete", NETDEV]));
    }
}

/// `rdma statistic show link DEVICE/1`'s counters, by name.
fn rdma_statistic() -> Vec<(String, u64)> {
    let text =
        run_ok(Command::new("rdma").args(["statistic", "show", "link", &format!("{DEVICE}/1")]));
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .filter_map(|w| Some((w[0].to_owned(), w[1].parse().ok()?)))
        .collect()
}

/// `ibv_rc_pingpong` on the device's IPv4 GID: 4 KiB messages, `iterations` round trips; the
/// server without `server`, the client with its address.
fn pingpong(gid: &str, server: Option<&str>, iterations: u32) -> Child {
    let mut command = Command::new("ibv_rc_pingpong");
    command.args([
        "-d",
        DEVICE,
        "-i",
        "1",
        "-g",
        gid,
        "-p",
        "18515",
        "-n",
        &iterations.to_string(),
        "-s",
        "4096",
    ]);
    if let Some(host) = server {
        command.arg(host);
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn port_sample(text: &str, family: &str) -> Option<f64> {
    sample(
        text,
        family,
        &[&format!("device=\"{DEVICE}\""), "port=\"1\""],
    )
}

/// Soft-RoCE traffic between two processes' QPs on one rxe port. What rxe counts per port (its
/// `hw_counters`; it has no `counters/` and no byte count) is what the agent exports, counter by
/// counter, equal to `rdma statistic`; its packet counts are the port's packet families. rxe
/// takes QP counter auto mode but binds no QP to a counter (it has no `counter_bind_qp`), so
/// nothing is attributed per process: the agent says so, with both processes' QPs uncounted,
/// rather than showing a per-process port that never counts.
#[test]
fn vm_soft_roce_port_counters_agree_with_rdma_statistic() {
    on_the_node("vm_soft_roce_port_counters_agree_with_rdma_statistic");
    let _rxe = SoftRoce::up();
    let gid = SoftRoce::gid_index();
    let agent = Agent::start(
        "[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = []\n[gpu]\npod_resources_socket = \"\"\n[rdma]\nallow_qp_counter_auto_mode = true\n",
    );
    let text = agent.scrape();
    assert_eq!(
        port_sample(&text, "tally_rdma_port_per_process"),
        Some(1.0),
        "{text}"
    );
    assert!(
        run_ok(Command::new("rdma").args([
            "statistic",
            "qp",
            "mode",
            "link",
            &format!("{DEVICE}/1")
        ]))
        .contains("auto"),
        "the agent turned auto mode on"
    );

    // About 10 s of round trips under emulation: long enough for QP listings while they run.
    let server = pingpong(&gid, None, 1000);
    std::thread::sleep(Duration::from_millis(500));
    let client = pingpong(&gid, Some(ADDRESS), 1000);
    agent.scrape_until(
        Duration::from_secs(8),
        "both processes' QPs uncounted",
        |t| port_sample(t, "tally_rdma_qps_uncounted") == Some(2.0),
    );
    let client = client.wait_with_output().unwrap();
    let server = server.wait_with_output().unwrap();
    for (who, out) in [("client", &client), ("server", &server)] {
        assert!(
            out.status.success(),
            "{who}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let kernel = rdma_statistic();
    eprintln!("rdma statistic after 1000 round trips: {kernel:?}");
    let counter = |name: &str| kernel.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
    // 1000 round trips of one 4 KiB message each way (4 packets at rxe's 1 KiB MTU) and their
    // acknowledgements: thousands of packets each way, every one of them looped back.
    let sent = counter("sent_pkts").unwrap_or(0);
    assert!(sent >= 8000, "{kernel:?}");
    assert_eq!(counter("rcvd_pkts"), Some(sent), "{kernel:?}");
    let text = agent.scrape_until(Duration::from_secs(5), "the port counters", |t| {
        port_sample(t, "tally_rdma_port_transmit_packets_total") == Some(sent as f64)
    });
    assert_eq!(
        port_sample(&text, "tally_rdma_port_receive_packets_total"),
        Some(sent as f64)
    );
    assert_eq!(
        port_sample(&text, "tally_rdma_port_transmit_bytes_total"),
        None,
        "rxe counts no bytes"
    );
    for (name, value) in &kernel {
        assert_eq!(
            sample(
                &text,
                "tally_rdma_port_hw_counters_total",
                &[
                    &format!("device=\"{DEVICE}\""),
                    "port=\"1\"",
                    &format!("counter=\"{name}\"")
                ]
            ),
            Some(*value as f64),
            "{name}"
        );
    }
    // Nothing per process: no counter, no workload charged.
    assert_eq!(
        port_sample(&text, "tally_rdma_qp_counters"),
        Some(0.0),
        "{text}"
    );
    assert!(
        !text.contains("tally_workload_rdma_transmit_packets_total{"),
        "{text}"
    );
    agent.assert_logged_once("have no QP counter although auto mode is on");
}
