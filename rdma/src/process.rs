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

use std::collections::{BTreeMap, HashMap};

use tally_error_chain::chain;

use crate::netlink::consts::{mask, mode};
use crate::netlink::{Client, CounterMode, NetlinkError, QpCounter, Transport};

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
        for (index, name) in devices {
            match self.sample_device(index, &name, &mut sample) {
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
        sample: &mut ProcessSample,
    ) -> Result<(), NetlinkError> {
        let counters = self.client.qp_counters(index)?;
        let needs_qps = counters
            .iter()
            .any(|c| c.pid.is_none() && c.kernel_name.is_none() && !c.qps.is_empty());
        let qp_pids: HashMap<u32, Option<u32>> = if needs_qps {
            self.client
                .qps(index)?
                .into_iter()
                .map(|q| (q.lqpn, q.pid))
                .collect()
        } else {
            HashMap::new()
        };
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
}
