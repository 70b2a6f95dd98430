//! The RDMA source's own families: node-level port state and counters from the last read (its
//! per-workload traffic is in the ledger).

use std::sync::Arc;

use tally_exporters::Family;

use super::{Netlink, RdmaSource};
use crate::catalogue;

/// The four data counters, which have families of their own (in bytes).
const DATA_COUNTERS: [&str; 4] = [
    "port_xmit_data",
    "port_rcv_data",
    "port_xmit_packets",
    "port_rcv_packets",
];

impl RdmaSource {
    /// Node-level RDMA families; none without RDMA devices.
    pub(super) fn node_families(&self) -> Vec<Family> {
        if self.devices.is_empty() {
            return Vec::new();
        }
        let mut info = Family::new(&catalogue::rdma::PORT_INFO);
        let mut tx = Family::new(&catalogue::rdma::PORT_TRANSMIT_BYTES);
        let mut rx = Family::new(&catalogue::rdma::PORT_RECEIVE_BYTES);
        let mut tx_packets = Family::new(&catalogue::rdma::PORT_TRANSMIT_PACKETS);
        let mut rx_packets = Family::new(&catalogue::rdma::PORT_RECEIVE_PACKETS);
        let mut counters = Family::new(&catalogue::rdma::PORT_COUNTERS);
        let mut hw = Family::new(&catalogue::rdma::PORT_HW_COUNTERS);
        let mut per_process = Family::new(&catalogue::rdma::PORT_PER_PROCESS);
        let mut qp_counters = Family::new(&catalogue::rdma::QP_COUNTERS);
        let mut uncounted = Family::new(&catalogue::rdma::QPS_UNCOUNTED);
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
            if on {
                let key = (device.to_string(), *port);
                if let Some(n) = self.uncounted.get(&key) {
                    uncounted.push_labeled(labels(), *n as f64);
                }
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
            uncounted,
        ]
    }
}
