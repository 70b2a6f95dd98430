//! The RDMA families: per-workload traffic from the ledger, node-level port state and counters
//! from the last read.

use std::sync::Arc;

use tally_exporters::{Family, Kind, LabelSet, Sample};

use super::{Netlink, RdmaSource};
use crate::ledger::{CounterId, Entry, RdmaCounter};

/// `tally_workload_rdma_{transmit,receive}_{bytes,packets}_total{device,port,method}`.
#[derive(Debug)]
pub struct WorkloadRdmaFamilies {
    pub families: [Family; 4],
}

impl Default for WorkloadRdmaFamilies {
    fn default() -> Self {
        let family = |name, help| Family::new(name, help, Kind::Counter);
        Self {
            families: [
                family(
                    "tally_workload_rdma_transmit_bytes_total",
                    "RDMA bytes the workload sent, by device, port and how they were attributed (method: qp_counter, its processes' own QP counters; device, the port counters of a device assigned to it).",
                ),
                family(
                    "tally_workload_rdma_receive_bytes_total",
                    "RDMA bytes the workload received, by device, port and method.",
                ),
                family(
                    "tally_workload_rdma_transmit_packets_total",
                    "RDMA packets the workload sent, by device, port and method.",
                ),
                family(
                    "tally_workload_rdma_receive_packets_total",
                    "RDMA packets the workload received, by device, port and method.",
                ),
            ],
        }
    }
}

impl WorkloadRdmaFamilies {
    pub fn push(&mut self, labels: &LabelSet, entry: &Entry) {
        for (id, value) in entry.counters() {
            let CounterId::Rdma {
                counter,
                device,
                port,
                method,
            } = id
            else {
                continue;
            };
            let index = match counter {
                RdmaCounter::TransmitBytes => 0,
                RdmaCounter::ReceiveBytes => 1,
                RdmaCounter::TransmitPackets => 2,
                RdmaCounter::ReceivePackets => 3,
            };
            self.families[index].samples.push(Sample {
                labels: labels.clone(),
                extra: vec![
                    ("device", Arc::clone(device)),
                    ("port", Arc::from(port.to_string().as_str())),
                    ("method", Arc::from(*method)),
                ],
                value,
                histogram: None,
            });
        }
    }
}

/// The four data counters, which have families of their own (in bytes).
const DATA_COUNTERS: [&str; 4] = [
    "port_xmit_data",
    "port_rcv_data",
    "port_xmit_packets",
    "port_rcv_packets",
];

impl RdmaSource {
    /// Node-level RDMA families; none without RDMA devices.
    pub fn families(&self) -> Vec<Family> {
        if self.devices.is_empty() {
            return Vec::new();
        }
        let gauge = |name, help| Family::new(name, help, Kind::Gauge);
        let counter = |name, help| Family::new(name, help, Kind::Counter);
        let mut info = gauge(
            "tally_rdma_port_info",
            "RDMA ports (always 1), with link layer, state and rate as sysfs shows them.",
        );
        let mut tx = counter(
            "tally_rdma_port_transmit_bytes_total",
            "Bytes the port sent (port_xmit_data × 4).",
        );
        let mut rx = counter(
            "tally_rdma_port_receive_bytes_total",
            "Bytes the port received (port_rcv_data × 4).",
        );
        let mut tx_packets = counter(
            "tally_rdma_port_transmit_packets_total",
            "Packets the port sent.",
        );
        let mut rx_packets = counter(
            "tally_rdma_port_receive_packets_total",
            "Packets the port received.",
        );
        let mut counters = counter(
            "tally_rdma_port_counters_total",
            "The port's other IB PMA counters (errors, discards, waits), raw, by counter name.",
        );
        let mut hw = counter(
            "tally_rdma_port_hw_counters_total",
            "The driver's own port counters (hw_counters), raw, by counter name.",
        );
        let mut per_process = gauge(
            "tally_rdma_port_per_process",
            "Whether the port's traffic is read per process (QP counters in auto mode by pid) (1) or only per port (0).",
        );
        let mut qp_counters = gauge(
            "tally_rdma_qp_counters",
            "Per-process QP counters on the port in the last read.",
        );
        let modes = match &self.netlink {
            Netlink::Up { reader, .. } => Some(reader.ports()),
            _ => None,
        };
        for ((device, port), p) in &self.ports {
            let labels = || {
                vec![
                    ("device", Arc::clone(device)),
                    ("port", Arc::from(port.to_string().as_str())),
                ]
            };
            let with = |name: &'static str, value: &str| {
                let mut l = labels();
                l.push((name, Arc::from(value)));
                l
            };
            let mut l = labels();
            l.push((
                "link_layer",
                Arc::from(p.link_layer.as_deref().unwrap_or("")),
            ));
            l.push(("state", Arc::from(p.state.as_deref().unwrap_or(""))));
            l.push(("rate", Arc::from(p.rate.as_deref().unwrap_or(""))));
            info.push_labeled(l, 1.0);
            for (family, value) in [
                (&mut tx, p.transmit_bytes()),
                (&mut rx, p.receive_bytes()),
                (&mut tx_packets, p.transmit_packets()),
                (&mut rx_packets, p.receive_packets()),
            ] {
                if let Some(v) = value {
                    family.push_labeled(labels(), v as f64);
                }
            }
            for (name, v) in &p.counters {
                if !DATA_COUNTERS.contains(&name.as_str()) {
                    counters.push_labeled(with("counter", name), *v as f64);
                }
            }
            for (name, v) in &p.hw_counters {
                hw.push_labeled(with("counter", name), *v as f64);
            }
            let on = modes.is_some_and(|ports| {
                ports
                    .iter()
                    .any(|m| m.per_process && *m.device == **device && m.port == *port)
            });
            per_process.push_labeled(labels(), if on { 1.0 } else { 0.0 });
            if modes.is_some() {
                let n = self
                    .qp_counters
                    .get(&(device.to_string(), *port))
                    .copied()
                    .unwrap_or(0);
                qp_counters.push_labeled(labels(), n as f64);
            }
        }
        vec![
            info,
            tx,
            rx,
            tx_packets,
            rx_packets,
            counters,
            hw,
            per_process,
            qp_counters,
        ]
    }
}
