//! The nldev client and the per-process reader against a kernel played by the test: dumps split
//! over datagrams, stale answers, refusals, auto mode turned on only when allowed and restored
//! on drop, per-pid windows across samples. Then the real socket transports.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{device_index, op, seq, u32_attr, Scripted};
use tally_rdma::netlink::consts::{attr, cmd, mask, mode, nl};
use tally_rdma::netlink::nldev::{answer, CounterMode, DeviceInfo, Qp, QpCounter};
use tally_rdma::netlink::{Availability, Client, Endpoint, NetlinkError};
use tally_rdma::{ProcessCounters, ProcessOptions};

const PORT_ID: u32 = 4321;

/// The kernel's nldev state as far as these tests need it.
#[derive(Default)]
struct Kernel {
    devices: Vec<DeviceInfo>,
    modes: Vec<((u32, u32), CounterMode)>,
    counters: Vec<QpCounter>,
    qps: Vec<Qp>,
    /// STAT_SET requests seen: (device index, port, mask).
    sets: Vec<(u32, u32, u32)>,
    /// Refuse STAT_SET with this errno.
    refuse_set: Option<i32>,
    /// Answer every request with a stale message (wrong sequence number) first.
    stale_first: bool,
    /// Devices whose mode query fails (a driver without QP counters).
    refuse_mode: Vec<u32>,
    /// Counter dumps asked for, by device index.
    dumped: Vec<u32>,
}

impl Kernel {
    #[expect(
        clippy::unwrap_used,
        reason = "test helper: a request without its attributes fails the test"
    )]
    fn answer(&mut self, req: &[u8]) -> Vec<Vec<u8>> {
        let s = seq(req);
        let flags = u16::from_ne_bytes([req[6], req[7]]);
        let mut out = Vec::new();
        if self.stale_first {
            out.push(answer::done(s.wrapping_sub(1), PORT_ID, 0));
        }
        let dump = flags & nl::NLM_F_DUMP == nl::NLM_F_DUMP;
        match (op(req), dump) {
            (cmd::GET, true) => {
                for d in &self.devices {
                    out.push(answer::device(s, PORT_ID, d));
                }
                out.push(answer::done(s, PORT_ID, 0));
            }
            (cmd::STAT_GET, false) => {
                let (dev, port) = (
                    device_index(req).unwrap(),
                    u32_attr(req, attr::PORT_INDEX).unwrap(),
                );
                if self.refuse_mode.contains(&dev) {
                    out.push(answer::error(PORT_ID, req, -95)); // EOPNOTSUPP
                    return out;
                }
                let m = self
                    .modes
                    .iter()
                    .find(|(k, _)| *k == (dev, port))
                    .map_or(CounterMode::NONE, |(_, m)| *m);
                out.push(answer::qp_mode(s, PORT_ID, dev, &self.name(dev), port, m));
                out.push(answer::error(PORT_ID, req, 0));
            }
            (cmd::STAT_SET, false) => {
                let (dev, port) = (
                    device_index(req).unwrap(),
                    u32_attr(req, attr::PORT_INDEX).unwrap(),
                );
                let m = u32_attr(req, attr::STAT_AUTO_MODE_MASK).unwrap();
                self.sets.push((dev, port, m));
                if let Some(errno) = self.refuse_set {
                    out.push(answer::error(PORT_ID, req, -errno));
                    return out;
                }
                let new = if m == 0 {
                    CounterMode::NONE
                } else {
                    CounterMode {
                        mode: mode::AUTO,
                        mask: m,
                    }
                };
                self.modes.retain(|(k, _)| *k != (dev, port));
                self.modes.push(((dev, port), new));
                out.push(answer::stat_set(s, PORT_ID, dev, &self.name(dev), port));
                out.push(answer::error(PORT_ID, req, 0));
            }
            (cmd::STAT_GET, true) => {
                let dev = device_index(req).unwrap();
                self.dumped.push(dev);
                let mine: Vec<QpCounter> = self
                    .counters
                    .iter()
                    .filter(|c| c.device_index == dev)
                    .cloned()
                    .collect();
                // The first counter alone, then two messages per datagram, DONE with the last.
                let mut messages = mine.chunks(1).map(|c| answer::qp_counters(s, PORT_ID, c));
                out.extend(messages.next());
                let mut rest: Vec<Vec<u8>> = messages.collect();
                rest.push(answer::done(s, PORT_ID, 0));
                out.extend(rest.chunks(2).map(<[Vec<u8>]>::concat));
            }
            (cmd::RES_QP_GET, true) => {
                let dev = device_index(req).unwrap();
                let mine: Vec<Qp> = self
                    .qps
                    .iter()
                    .filter(|q| q.device_index == dev)
                    .cloned()
                    .collect();
                out.push(answer::qps(s, PORT_ID, &self.name(dev), &mine));
                out.push(answer::done(s, PORT_ID, 0));
            }
            _ => out.push(answer::error(PORT_ID, req, -22)),
        }
        out
    }

    fn name(&self, index: u32) -> String {
        self.devices
            .iter()
            .find(|d| d.index == index)
            .map(|d| d.name.clone())
            .unwrap_or_default()
    }
}

type Shared = Arc<Mutex<Kernel>>;
type Answer = Box<dyn FnMut(&[u8]) -> Vec<Vec<u8>>>;

#[expect(clippy::unwrap_used, reason = "test helper")]
fn client(kernel: &Shared) -> Client<Scripted<Answer>> {
    let k = kernel.clone();
    Client::new(
        Scripted::new(Box::new(move |req: &[u8]| k.lock().unwrap().answer(req))),
        Duration::from_secs(1),
    )
}

fn mlx5(index: u32, ports: u32) -> DeviceInfo {
    DeviceInfo {
        index,
        name: format!("mlx5_{}", index - 1),
        ports,
    }
}

fn counter(dev: u32, port: u32, id: u32, pid: Option<u32>, tx: u64, rx: u64) -> QpCounter {
    QpCounter {
        device_index: dev,
        device: format!("mlx5_{}", dev - 1),
        port,
        id,
        mode: mode::AUTO,
        pid,
        kernel_name: None,
        qp_type: None,
        qps: vec![100 + id],
        values: vec![
            ("out_of_sequence".into(), 0),
            ("rdma_tx_bytes".into(), tx),
            ("rdma_rx_bytes".into(), rx),
            ("rdma_tx_packets".into(), tx / 1000),
            ("rdma_rx_packets".into(), rx / 1000),
        ],
    }
}

#[test]
fn a_dump_over_several_datagrams_is_read_whole_and_stale_answers_are_skipped() {
    let kernel: Shared = Arc::default();
    {
        let mut k = kernel.lock().unwrap();
        k.devices = vec![mlx5(1, 1)];
        k.counters = (1..=5)
            .map(|i| counter(1, 1, i, Some(1000 + i), 1000 * u64::from(i), 0))
            .collect();
        k.stale_first = true;
    }
    let mut c = client(&kernel);
    assert_eq!(c.devices().unwrap(), vec![mlx5(1, 1)]);
    let counters = c.qp_counters(1).unwrap();
    let ids: Vec<u32> = counters.iter().map(|c| c.id).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5]);
    assert_eq!(counters[4].pid, Some(1005));
    assert_eq!(c.qp_mode(1, 1).unwrap(), CounterMode::NONE);
}

#[test]
fn refusals_carry_their_errno_and_mean_not_permitted() {
    let kernel: Shared = Arc::default();
    {
        let mut k = kernel.lock().unwrap();
        k.devices = vec![mlx5(1, 1)];
        k.refuse_set = Some(1); // EPERM: no CAP_NET_ADMIN
    }
    let mut c = client(&kernel);
    let err = c.set_auto_mode(1, 1, mask::PID, None).unwrap_err();
    assert!(
        matches!(err, NetlinkError::Kernel { errno: 1, .. }),
        "{err:?}"
    );
    assert_eq!(err.availability(), Availability::NotPermitted);
    assert_eq!(err.reason(), "not_permitted");
}

#[test]
fn no_answer_is_a_timeout_and_a_datagram_too_big_is_an_error() {
    let mut silent = Client::new(Scripted::new(|_: &[u8]| Vec::new()), Duration::from_secs(1));
    let err = silent.devices().unwrap_err();
    assert_eq!(err.reason(), "timeout", "{err:?}");

    let mut flood = Client::new(
        Scripted::new(|_: &[u8]| vec![vec![0u8; 70_000]]),
        Duration::from_secs(1),
    );
    let err = flood.devices().unwrap_err();
    assert!(
        matches!(err, NetlinkError::Decode { .. }),
        "an oversized datagram: {err:?}"
    );
    let mut garbage = Client::new(
        Scripted::new(|req: &[u8]| {
            let mut m = answer::done(seq(req), 0, 0);
            m[0] = 200; // nlmsg_len past the datagram
            vec![m]
        }),
        Duration::from_secs(1),
    );
    assert_eq!(garbage.devices().unwrap_err().reason(), "malformed");
}

#[test]
fn auto_mode_is_turned_on_only_when_allowed_and_restored_on_drop() {
    let kernel: Shared = Arc::default();
    kernel.lock().unwrap().devices = vec![mlx5(1, 2)];

    // Not allowed: the ports are read, never changed.
    let reader = ProcessCounters::start(client(&kernel), ProcessOptions::default(), &[]).unwrap();
    assert!(reader
        .ports()
        .iter()
        .all(|p| !p.per_process && !p.enabled_by_tally));
    assert!(reader.ports()[0]
        .problem
        .as_deref()
        .unwrap()
        .contains("not allowed"));
    drop(reader);
    assert!(
        kernel.lock().unwrap().sets.is_empty(),
        "no STAT_SET without permission"
    );

    // Allowed: both ports turned on (mask PID), and off again on drop.
    let options = ProcessOptions {
        allow_auto_mode: true,
        optional_counters: false,
    };
    let reader = ProcessCounters::start(client(&kernel), options, &[]).unwrap();
    assert!(reader
        .ports()
        .iter()
        .all(|p| p.per_process && p.enabled_by_tally));
    assert_eq!(
        kernel.lock().unwrap().sets,
        [(1, 1, mask::PID), (1, 2, mask::PID)]
    );
    drop(reader);
    {
        let k = kernel.lock().unwrap();
        assert_eq!(k.sets[2..], [(1, 1, 0), (1, 2, 0)]);
        assert!(k.modes.iter().all(|(_, m)| *m == CounterMode::NONE));
    }

    // Already on (an operator did it): used as it is and left on.
    {
        let mut k = kernel.lock().unwrap();
        k.sets.clear();
        k.modes = vec![(
            (1, 1),
            CounterMode {
                mode: mode::AUTO,
                mask: mask::PID,
            },
        )];
        k.modes.push((
            (1, 2),
            CounterMode {
                mode: mode::MANUAL,
                mask: 0,
            },
        ));
    }
    let reader = ProcessCounters::start(client(&kernel), options, &[]).unwrap();
    let ports = reader.ports();
    assert!(ports[0].per_process && !ports[0].enabled_by_tally);
    assert!(!ports[1].per_process, "manual binding is someone else's");
    assert!(ports[1].problem.as_deref().unwrap().contains("qp manual"));
    drop(reader);
    assert!(kernel.lock().unwrap().sets.is_empty(), "nothing to restore");

    // Refused (no CAP_NET_ADMIN): the port says why; nothing to restore.
    {
        let mut k = kernel.lock().unwrap();
        k.modes.clear();
        k.refuse_set = Some(1);
    }
    let reader = ProcessCounters::start(client(&kernel), options, &["mlx5_0".into()]).unwrap();
    assert!(reader.ports().iter().all(|p| !p.enabled_by_tally));
    assert!(reader.ports()[0]
        .problem
        .as_deref()
        .unwrap()
        .contains("Operation not permitted"));
    drop(reader);
    assert_eq!(
        kernel.lock().unwrap().sets.len(),
        2,
        "two refused attempts, no restore"
    );
}

#[test]
fn per_pid_traffic_is_the_difference_between_samples() {
    let kernel: Shared = Arc::default();
    {
        let mut k = kernel.lock().unwrap();
        k.devices = vec![mlx5(1, 1), mlx5(2, 1)];
        k.counters = vec![
            counter(1, 1, 1, Some(100), 5000, 7000),
            counter(2, 1, 1, Some(200), 1000, 0),
        ];
        // Counter 2: manually bound QPs 102 and 103, both of pid 300.
        let mut manual = counter(1, 1, 2, None, 400, 0);
        manual.mode = mode::MANUAL;
        manual.qps = vec![102, 103];
        k.counters.push(manual);
        // Counter 3: a kernel consumer's (IPoIB).
        let mut kern = counter(1, 1, 3, None, 60, 0);
        kern.kernel_name = Some("ib_ipoib".into());
        k.counters.push(kern);
        k.qps = [102, 103]
            .into_iter()
            .map(|lqpn| Qp {
                device_index: 1,
                port: Some(1),
                lqpn,
                pid: Some(300),
                kernel_name: None,
                qp_type: Some(2),
                state: Some(3),
            })
            .collect();
    }
    let mut reader =
        ProcessCounters::start(client(&kernel), ProcessOptions::default(), &[]).unwrap();

    // First sample: everything counts whole (the counters started with their processes).
    let first = reader.sample();
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    let tx = |s: &tally_rdma::ProcessSample, dev: &str, pid: Option<u32>| -> u64 {
        s.traffic
            .iter()
            .filter(|t| t.device == dev && t.pid == pid)
            .map(|t| t.traffic.transmit_bytes.unwrap_or(0))
            .sum()
    };
    assert_eq!(tx(&first, "mlx5_0", Some(100)), 5000);
    assert_eq!(tx(&first, "mlx5_1", Some(200)), 1000);
    assert_eq!(tx(&first, "mlx5_0", Some(300)), 400, "through RES_QP_GET");
    assert_eq!(tx(&first, "mlx5_0", None), 60, "kernel consumer");
    assert_eq!(first.counters[&("mlx5_0".to_owned(), 1)], 3);

    // The counters advance; pid 200's counter was freed and its id reused by pid 201 (lower
    // values: a new counter), pid 100's advanced by 2500.
    {
        let mut k = kernel.lock().unwrap();
        k.counters[0] = counter(1, 1, 1, Some(100), 7500, 7000);
        k.counters[1] = counter(2, 1, 1, Some(201), 300, 0);
    }
    let second = reader.sample();
    assert_eq!(tx(&second, "mlx5_0", Some(100)), 2500);
    let rx100: u64 = second
        .traffic
        .iter()
        .filter(|t| t.pid == Some(100))
        .map(|t| t.traffic.receive_bytes.unwrap_or(0))
        .sum();
    assert_eq!(rx100, 0);
    assert_eq!(tx(&second, "mlx5_1", Some(200)), 0);
    assert_eq!(tx(&second, "mlx5_1", Some(201)), 300);
    assert_eq!(tx(&second, "mlx5_0", Some(300)), 0, "no change, no window");
    assert!(
        !second.traffic.iter().any(|t| t.pid == Some(300)),
        "no change, no window"
    );

    // A counter whose values hold no bytes or packets is reported as such.
    kernel.lock().unwrap().counters[0].values = vec![("out_of_sequence".into(), 1)];
    let third = reader.sample();
    assert_eq!(third.without_traffic, 1);
}

#[test]
fn a_device_without_qp_counters_is_not_dumped() {
    let kernel: Shared = Arc::default();
    {
        let mut k = kernel.lock().unwrap();
        k.devices = vec![mlx5(1, 1), mlx5(2, 1)];
        k.refuse_mode = vec![2];
    }
    let mut reader =
        ProcessCounters::start(client(&kernel), ProcessOptions::default(), &[]).unwrap();
    let problem = reader.ports()[1].problem.clone().unwrap_or_default();
    assert!(problem.contains("not supported"), "{problem}");
    let sample = reader.sample();
    assert!(sample.errors.is_empty(), "{:?}", sample.errors);
    assert_eq!(kernel.lock().unwrap().dumped, [1]);
}

#[test]
fn the_kernel_socket_is_unsupported_or_answers() {
    // Without CONFIG_INFINIBAND (as on the CI VMs) there is no NETLINK_RDMA protocol; on an RDMA
    // host the device list comes back.
    match Client::connect(&Endpoint::Kernel, Duration::from_secs(1)) {
        Err(e) => assert_eq!(e.availability(), Availability::Unsupported, "{e:?}"),
        Ok(mut c) => {
            let devices = c.devices();
            assert!(devices.is_ok(), "{devices:?}");
        }
    }
}

#[test]
fn a_unix_seqpacket_endpoint_speaks_the_same_datagrams() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nldev.sock");
    let kernel: Shared = Arc::default();
    kernel.lock().unwrap().devices = vec![mlx5(1, 1), mlx5(2, 1)];
    kernel.lock().unwrap().counters = vec![counter(2, 1, 9, Some(42), 10, 20)];
    let k = kernel.clone();
    let server = common::serve_seqpacket(&path, move |req| k.lock().unwrap().answer(req));
    let mut c = Client::connect(&Endpoint::Unix(path.clone()), Duration::from_secs(2)).unwrap();
    assert_eq!(c.devices().unwrap().len(), 2);
    let counters = c.qp_counters(2).unwrap();
    assert_eq!(counters[0].pid, Some(42));
    drop(c);
    server.join().unwrap();

    let missing = Client::connect(
        &Endpoint::Unix(dir.path().join("none.sock")),
        Duration::from_secs(1),
    )
    .unwrap_err();
    assert_eq!(missing.availability(), Availability::Unsupported);
}
