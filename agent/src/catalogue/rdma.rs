//! Node-level RDMA families, from sysfs and RDMA netlink, by device and port.

use tally_exporters::{Kind, Metric};

pub static PORT_INFO: Metric = Metric {
    name: "tally_rdma_port_info",
    help: "RDMA ports (always 1), with link layer, state and rate as sysfs shows them.",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &["device", "port", "link_layer", "state", "rate"],
};

pub static PORT_TRANSMIT_BYTES: Metric = Metric {
    name: "tally_rdma_port_transmit_bytes_total",
    help: "Bytes the port sent (port_xmit_data × 4).",
    kind: Kind::Counter,
    unit: "bytes",
    per_workload: false,
    labels: &["device", "port"],
};

pub static PORT_RECEIVE_BYTES: Metric = Metric {
    name: "tally_rdma_port_receive_bytes_total",
    help: "Bytes the port received (port_rcv_data × 4).",
    kind: Kind::Counter,
    unit: "bytes",
    per_workload: false,
    labels: &["device", "port"],
};

pub static PORT_TRANSMIT_PACKETS: Metric = Metric {
    name: "tally_rdma_port_transmit_packets_total",
    help: "Packets the port sent.",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &["device", "port"],
};

pub static PORT_RECEIVE_PACKETS: Metric = Metric {
    name: "tally_rdma_port_receive_packets_total",
    help: "Packets the port received.",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &["device", "port"],
};

pub static PORT_COUNTERS: Metric = Metric {
    name: "tally_rdma_port_counters_total",
    help: "The port's other IB PMA counters (errors, discards, waits), raw, by counter name.",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &["device", "port", "counter"],
};

pub static PORT_HW_COUNTERS: Metric = Metric {
    name: "tally_rdma_port_hw_counters_total",
    help: "The driver's own port counters (hw_counters), raw, by counter name.",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &["device", "port", "counter"],
};

pub static PORT_PER_PROCESS: Metric = Metric {
    name: "tally_rdma_port_per_process",
    help: "Whether the port's traffic is read per process (QP counters in auto mode by pid) (1) or only per port (0).",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &["device", "port"],
};

pub static QP_COUNTERS: Metric = Metric {
    name: "tally_rdma_qp_counters",
    help: "Per-process QP counters on the port in the last read.",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &["device", "port"],
};

pub static QPS_UNCOUNTED: Metric = Metric {
    name: "tally_rdma_qps_uncounted",
    help: "Processes' queue pairs on a per-process port that no QP counter holds, at the last listing: their traffic is in the port counters only (a driver that cannot bind QPs to counters, such as soft-RoCE, leaves every one so).",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &["device", "port"],
};
