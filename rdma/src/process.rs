//! Per-process RDMA traffic from QP counters.
//!
//! In auto mode with the pid criterion (`rdma statistic qp set link DEV/PORT auto type pid on`)
//! the kernel binds every QP a process creates on a port to a counter of that process
//! (`rdma_counter_bind_qp_auto`, drivers/infiniband/core/counters.c), so a counter dump is a
//! per-pid table. [`ProcessCounters`] reads the mode of every port at start, turns auto pid
//! mode on where it is off — only when allowed, since it changes device state for every user of
//! the port — and turns it back off when dropped. Each [`sample`](ProcessCounters::sample)
//! dumps the counters of every device and returns what each pid moved since the previous one.
//!
//! A counter without a pid (manual binding, auto mode by QP type) is attributed through the QPs
//! bound to it when they all belong to one process (`RDMA_NLDEV_CMD_RES_QP_GET`); a kernel
//! consumer's counter (IPoIB, NVMe-oF, ...) has no pid at all.
//!
//! Counts a QP makes between the last sample and its destruction are lost to per-pid
//! attribution: the kernel folds a freed counter into the port's totals (`rdma_counter_free`),
//! which the port counters still show.
//!
//! Auto mode can be on while a driver binds nothing: soft-RoCE (rxe) accepts the mode but has no
//! `counter_bind_qp`, so the kernel's automatic binding fails quietly and its processes' QPs have
//! no counter. Every [`QP_LISTING_ROUNDS`] rounds the reader lists the QPs of devices with a
//! per-process port and reports, per port, the processes' QPs that no counter holds
//! ([`ProcessSample::uncounted`]): their traffic is in the port counters only.

use std::collections::{BTreeMap, HashMap};

use tally_error_chain::chain;

use crate::netlink::consts::{mask, mode};
use crate::netlink::{Client, CounterMode, NetlinkError, Qp, QpCounter, Transport};

/// How often (in samples) the QPs of devices with a per-process port are listed to find those
/// no counter holds. A listing walks every QP of the device, so it is not done every round.
pub const QP_LISTING_ROUNDS: u64 = 10;

/// What the reader may do to the ports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessOptions {
    /// Turn auto pid mode on where it is off (and back off on drop).
    pub allow_auto_mode: bool,
    /// Ask for the port's optional counters in auto-mode counters too
    /// (`STAT_OPCOUNTER_ENABLED`, Linux 6.15+): on mlx5 this is where per-QP `rdma_tx_bytes`,
    /// `rdma_rx_bytes` and the packet counts come from.
    pub optional_counters: bool,
}

/// One port and its QP counter mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMode {
    pub device: String,
    pub device_index: u32,
    pub port: u32,
    /// The mode found at start.
    pub found: Option<CounterMode>,
    /// The reader turned auto pid mode on, and turns it off when dropped.
    pub enabled_by_tally: bool,
    /// Counters on this port belong to processes (auto pid mode).
    pub per_process: bool,
    /// Why not, when not.
    pub problem: Option<String>,
}

/// Bytes and packets of one window; `None` where the driver's counter has no such entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub transmit_bytes: Option<u64>,
    pub receive_bytes: Option<u64>,
    pub transmit_packets: Option<u64>,
    pub receive_packets: Option<u64>,
}

/// Counter names that mean bytes or packets, by driver: mlx5's optional counters
/// (`rdma_tx_bytes`, drivers/infiniband/hw/mlx5/counters.c), EFA's and bnxt_re's
/// (`tx_bytes`, `tx_pkts`), rxe's (`sent_pkts`, `rcvd_pkts`).
const TRANSMIT_BYTES: [&str; 2] = ["rdma_tx_bytes", "tx_bytes"];
const RECEIVE_BYTES: [&str; 2] = ["rdma_rx_bytes", "rx_bytes"];
const TRANSMIT_PACKETS: [&str; 4] = ["rdma_tx_packets", "tx_pkts", "tx_packets", "sent_pkts"];
const RECEIVE_PACKETS: [&str; 4] = ["rdma_rx_packets", "rx_pkts", "rx_packets", "rcvd_pkts"];

impl Traffic {
    /// The bytes and packets among a counter's values.
    pub fn from_values(values: &[(String, u64)]) -> Traffic {
        let find = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| values.iter().find(|(k, _)| k == n).map(|(_, v)| *v))
        };
        Traffic {
            transmit_bytes: find(&TRANSMIT_BYTES),
            receive_bytes: find(&RECEIVE_BYTES),
            transmit_packets: find(&TRANSMIT_PACKETS),
            receive_packets: find(&RECEIVE_PACKETS),
        }
    }

    /// No byte or packet entry at all.
    pub fn is_unknown(&self) -> bool {
        self.fields().iter().all(Option::is_none)
    }

    fn fields(&self) -> [Option<u64>; 4] {
        [
            self.transmit_bytes,
            self.receive_bytes,
            self.transmit_packets,
            self.receive_packets,
        ]
    }

    /// Whether every value is at least `before`'s (no reset in between).
    fn covers(&self, before: &Traffic) -> bool {
        self.fields()
            .iter()
            .zip(before.fields())
            .all(|(now, then)| match (now, then) {
                (Some(n), Some(t)) => *n >= t,
                _ => true,
            })
    }

    /// `self - before`, field by field (a field `before` lacks counts whole).
    fn since(&self, before: &Traffic) -> Traffic {
        let d = |now: Option<u64>, then: Option<u64>| now.map(|n| n - then.unwrap_or(0).min(n));
        Traffic {
            transmit_bytes: d(self.transmit_bytes, before.transmit_bytes),
            receive_bytes: d(self.receive_bytes, before.receive_bytes),
            transmit_packets: d(self.transmit_packets, before.transmit_packets),
            receive_packets: d(self.receive_packets, before.receive_packets),
        }
    }
}

/// What one process moved on one port since the previous sample. `pid` is `None` for kernel
/// consumers and for counters shared by several processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessTraffic {
    pub device: String,
    pub port: u32,
    pub pid: Option<u32>,
    pub traffic: Traffic,
}

/// One round of counter dumps.
#[derive(Debug, Default)]
pub struct ProcessSample {
    pub traffic: Vec<ProcessTraffic>,
    /// Counters per (device, port) in this round.
    pub counters: BTreeMap<(String, u32), usize>,
    /// Counters whose values hold no byte or packet entry (the driver counts only errors and
    /// operations per QP, or optional counters are off).
    pub without_traffic: usize,
    /// Devices whose dump failed this round.
    pub errors: Vec<(String, NetlinkError)>,
    /// Per (device, port) in auto pid mode, of the devices whose QPs were listed this round:
    /// processes' QPs bound to that port that no counter holds. Empty in rounds without a
    /// listing.
    pub uncounted: BTreeMap<(String, u32), usize>,
}

#[derive(Debug, Clone, Copy)]
struct Last {
    own_pid: Option<u32>,
    traffic: Traffic,
}

/// Per-process QP counters of every RDMA device on the node.
#[derive(Debug)]
pub struct ProcessCounters<T: Transport> {
    client: Client<T>,
    ports: Vec<PortMode>,
    /// (device index, device name) of devices to dump.
    devices: Vec<(u32, String)>,
    last: HashMap<(u32, u32, u32), Last>,
    restored: bool,
    /// Samples taken.
    rounds: u64,
}

impl<T: Transport> ProcessCounters<T> {
    /// Lists the devices (only those named in `only`, unless empty), reads each port's mode and
    /// turns auto pid mode on where allowed. Fails only when the device list cannot be had.
    pub fn start(
        mut client: Client<T>,
        options: ProcessOptions,
        only: &[String],
    ) -> Result<Self, NetlinkError> {
        let devices: Vec<_> = client
            .devices()?
            .into_iter()
            .filter(|d| only.is_empty() || only.contains(&d.name))
            .collect();
        let mut ports = Vec::new();
        for d in &devices {
            for port in 1..=d.ports {
                let mut p = PortMode {
                    device: d.name.clone(),
                    device_index: d.index,
                    port,
                    found: None,
                    enabled_by_tally: false,
                    per_process: false,
                    problem: None,
                };
                match client.qp_mode(d.index, port) {
                    Ok(found) => {
                        p.found = Some(found);
                        configure(&mut client, &mut p, found, options);
                    }
                    Err(e) => p.problem = Some(chain(&e)),
                }
                ports.push(p);
            }
        }
        // A device whose ports all refused the mode query has no QP counters to dump (drivers
        // without counter support answer EOPNOTSUPP or EINVAL).
        let dumpable = devices
            .into_iter()
            .filter(|d| {
                ports
                    .iter()
                    .any(|p| p.device_index == d.index && p.found.is_some())
            })
            .map(|d| (d.index, d.name))
            .collect();
        Ok(Self {
            client,
            ports,
            devices: dumpable,
            last: HashMap::new(),
            restored: false,
            rounds: 0,
        })
    }

    pub fn ports(&self) -> &[PortMode] {
        &self.ports
    }

    /// Dumps every device's counters and returns each counter's traffic since the previous
    /// sample. A counter seen for the first time counts whole: it was created after the
    /// previous sample, or before the reader started (its counts are then the process's since
    /// its QPs were created).
    pub fn sample(&mut self) -> ProcessSample {
        let mut sample = ProcessSample::default();
        let devices = self.devices.clone();
        let listing = self.rounds % QP_LISTING_ROUNDS == 0;
        self.rounds += 1;
        for (index, name) in devices {
            match self.sample_device(index, &name, listing, &mut sample) {
                Ok(()) => {}
                Err(e) => {
                    // Keep the previous values: the next good round counts the gap.
                    sample.errors.push((name, e));
                }
            }
        }
        sample
    }

    fn sample_device(
        &mut self,
        index: u32,
        name: &str,
        listing: bool,
        sample: &mut ProcessSample,
    ) -> Result<(), NetlinkError> {
        let counters = self.client.qp_counters(index)?;
        let needs_qps = counters
            .iter()
            .any(|c| c.pid.is_none() && c.kernel_name.is_none() && !c.qps.is_empty());
        let per_process: Vec<u32> = self
            .ports
            .iter()
            .filter(|p| p.device_index == index && p.per_process)
            .map(|p| p.port)
            .collect();
        let qps: Vec<Qp> = if needs_qps || (listing && !per_process.is_empty()) {
            self.client.qps(index)?
        } else {
            Vec::new()
        };
        if listing {
            for (port, n) in uncounted(&qps, &counters, &per_process) {
                sample.uncounted.insert((name.to_owned(), port), n);
            }
        }
        let qp_pids: HashMap<u32, Option<u32>> = qps.iter().map(|q| (q.lqpn, q.pid)).collect();
        let mut seen = Vec::with_capacity(counters.len());
        for c in &counters {
            *sample
                .counters
                .entry((name.to_owned(), c.port))
                .or_default() += 1;
            let traffic = Traffic::from_values(&c.values);
            if traffic.is_unknown() {
                sample.without_traffic += 1;
            }
            let key = (index, c.port, c.id);
            seen.push(key);
            let window = match self.last.get(&key) {
                Some(last) if last.own_pid == c.pid && traffic.covers(&last.traffic) => {
                    traffic.since(&last.traffic)
                }
                _ => traffic,
            };
            self.last.insert(
                key,
                Last {
                    own_pid: c.pid,
                    traffic,
                },
            );
            let pid = owner(c, &qp_pids);
            if window.fields().iter().any(|v| v.is_some_and(|v| v > 0)) {
                sample.traffic.push(ProcessTraffic {
                    device: name.to_owned(),
                    port: c.port,
                    pid,
                    traffic: window,
                });
            }
        }
        self.last.retain(|k, _| k.0 != index || seen.contains(k));
        Ok(())
    }

    /// Turns auto mode back off on the ports the reader turned it on; returns what failed.
    /// Runs once (dropping the reader calls it too).
    pub fn restore(&mut self) -> Vec<(String, u32, NetlinkError)> {
        if std::mem::replace(&mut self.restored, true) {
            return Vec::new();
        }
        let mut failed = Vec::new();
        for p in self.ports.iter_mut().filter(|p| p.enabled_by_tally) {
            let back = p.found.map_or(0, |m| m.mask);
            match self
                .client
                .set_auto_mode(p.device_index, p.port, back, None)
            {
                Ok(()) => {
                    p.enabled_by_tally = false;
                    tracing::info!(device = %p.device, port = p.port, "QP counter auto mode restored");
                }
                Err(e) => failed.push((p.device.clone(), p.port, e)),
            }
        }
        failed
    }
}

impl<T: Transport> Drop for ProcessCounters<T> {
    fn drop(&mut self) {
        for (device, port, e) in self.restore() {
            tracing::warn!(
                %device,
                port,
                error = %chain(&e),
                "restoring the QP counter mode failed: run `rdma statistic qp set link {device}/{port} auto off`"
            );
        }
    }
}

/// Per port of `ports`: the processes' QPs bound to it (a pid, no kernel owner) that no counter
/// holds.
fn uncounted(qps: &[Qp], counters: &[QpCounter], ports: &[u32]) -> Vec<(u32, usize)> {
    ports
        .iter()
        .map(|&port| {
            let n = qps
                .iter()
                .filter(|q| q.port == Some(port) && q.pid.is_some() && q.kernel_name.is_none())
                .filter(|q| {
                    !counters
                        .iter()
                        .any(|c| c.port == port && c.qps.contains(&q.lqpn))
                })
                .count();
            (port, n)
        })
        .collect()
}

/// Decides what to do with a port whose mode is `found`.
fn configure<T: Transport>(
    client: &mut Client<T>,
    p: &mut PortMode,
    found: CounterMode,
    options: ProcessOptions,
) {
    if found.is_auto_pid() {
        p.per_process = true;
        return;
    }
    let off = found.mode == mode::NONE || (found.mode == mode::AUTO && found.mask == 0);
    if !off {
        // Somebody configured the port otherwise (manual binding, auto by QP type): leave it,
        // and attribute what can be through the QPs' pids.
        p.problem = Some(format!(
            "{}: set by someone else, left as it is",
            found.describe()
        ));
        return;
    }
    if !options.allow_auto_mode {
        p.problem = Some("qp auto off, and turning it on is not allowed".to_owned());
        return;
    }
    let optional = options.optional_counters.then_some(true);
    match client.set_auto_mode(p.device_index, p.port, mask::PID, optional) {
        Ok(()) => {
            p.enabled_by_tally = true;
            p.per_process = true;
            tracing::info!(device = %p.device, port = p.port, "QP counter auto mode (pid) turned on; turned off again at exit");
        }
        Err(e) => p.problem = Some(chain(&e)),
    }
}

/// The process a counter belongs to: its own pid, or the one pid all its QPs share.
fn owner(c: &QpCounter, qp_pids: &HashMap<u32, Option<u32>>) -> Option<u32> {
    if c.pid.is_some() || c.kernel_name.is_some() {
        return c.pid;
    }
    let mut pids = c.qps.iter().map(|q| qp_pids.get(q).copied().flatten());
    let first = pids.next()??;
    pids.all(|p| p == Some(first)).then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn traffic_names_of_each_driver() {
        let mlx5 = Traffic::from_values(&values(&[
            ("out_of_sequence", 3),
            ("rdma_tx_bytes", 100),
            ("rdma_rx_bytes", 200),
            ("rdma_tx_packets", 1),
            ("rdma_rx_packets", 2),
        ]));
        assert_eq!(mlx5.transmit_bytes, Some(100));
        assert_eq!(mlx5.receive_packets, Some(2));
        let rxe = Traffic::from_values(&values(&[("sent_pkts", 5), ("rcvd_pkts", 6)]));
        assert_eq!(rxe.transmit_packets, Some(5));
        assert_eq!(rxe.transmit_bytes, None);
        assert!(Traffic::from_values(&values(&[("out_of_buffer", 1)])).is_unknown());
    }

    #[test]
    fn a_counter_shared_by_two_processes_has_no_owner() {
        let mut c = QpCounter {
            device_index: 1,
            device: "mlx5_0".into(),
            port: 1,
            id: 4,
            mode: mode::MANUAL,
            pid: None,
            kernel_name: None,
            qp_type: None,
            qps: vec![10, 11],
            values: Vec::new(),
        };
        let mut pids = HashMap::from([(10, Some(7)), (11, Some(7))]);
        assert_eq!(owner(&c, &pids), Some(7));
        pids.insert(11, Some(8));
        assert_eq!(owner(&c, &pids), None);
        c.qps.clear();
        assert_eq!(owner(&c, &pids), None);
    }

    #[test]
    fn processes_qps_no_counter_holds_are_uncounted_per_port() {
        let qp = |lqpn: u32, port: Option<u32>, pid: Option<u32>, kernel: bool| Qp {
            device_index: 1,
            port,
            lqpn,
            pid,
            kernel_name: kernel.then(|| "ib_core".to_owned()),
            qp_type: Some(2),
            state: Some(3),
        };
        let qps = [
            qp(0x11, Some(1), Some(40), false), // held by a counter
            qp(0x12, Some(1), Some(40), false), // not held: uncounted
            qp(0x13, Some(1), Some(41), false), // held by a counter of port 2 only: uncounted
            qp(0x14, Some(2), Some(41), false), // port 2, held
            qp(0x01, Some(1), None, true),      // the kernel's GSI QP: not a process's
            qp(0x15, None, Some(42), false),    // not bound to a port yet
        ];
        let counter = |port: u32, qps: Vec<u32>| QpCounter {
            device_index: 1,
            device: "rxe0".into(),
            port,
            id: port,
            mode: mode::AUTO,
            pid: Some(40),
            kernel_name: None,
            qp_type: None,
            qps,
            values: Vec::new(),
        };
        let counters = [counter(1, vec![0x11]), counter(2, vec![0x14, 0x13])];
        assert_eq!(uncounted(&qps, &counters, &[1, 2]), [(1, 2), (2, 0)]);
        // rxe: auto mode on, no counter at all.
        assert_eq!(uncounted(&qps, &[], &[1]), [(1, 3)]);
        // Only the ports asked about.
        assert_eq!(uncounted(&qps, &[], &[]), []);
    }
}
