//! Per-workload families: one series per workload (its labels first) and the labels below.

use tally_exporters::{Kind, Metric};

pub static CPU_SECONDS: Metric = Metric {
    name: "tally_workload_cpu_seconds_total",
    help: "CPU time used by the workload's cgroup, in seconds.",
    kind: Kind::Counter,
    unit: "seconds",
    per_workload: true,
    labels: &[],
};

pub static MEMORY_BYTES: Metric = Metric {
    name: "tally_workload_memory_bytes",
    help: "Memory charged to the workload's cgroup, in bytes.",
    kind: Kind::Gauge,
    unit: "bytes",
    per_workload: true,
    labels: &[],
};

pub static DISK_READ_BYTES: Metric = Metric {
    name: "tally_workload_disk_read_bytes_total",
    help: "Bytes the workload read from block devices; method says the source (ebpf: block-layer programs, cgroupfs: io.stat / blkio).",
    kind: Kind::Counter,
    unit: "bytes",
    per_workload: true,
    labels: &["method"],
};

pub static DISK_WRITE_BYTES: Metric = Metric {
    name: "tally_workload_disk_write_bytes_total",
    help: "Bytes the workload wrote to block devices; method says the source (ebpf: block-layer programs, cgroupfs: io.stat / blkio).",
    kind: Kind::Counter,
    unit: "bytes",
    per_workload: true,
    labels: &["method"],
};

pub static DISK_OPERATIONS: Metric = Metric {
    name: "tally_workload_disk_operations_total",
    help: "Block I/O requests the workload completed, by operation.",
    kind: Kind::Counter,
    unit: "",
    per_workload: true,
    labels: &["op"],
};

pub static DISK_IO_LATENCY_SECONDS: Metric = Metric {
    name: "tally_workload_disk_io_latency_seconds",
    help: "Block I/O request latency, issue to completion, of the workload's requests.",
    kind: Kind::Histogram,
    unit: "seconds",
    per_workload: true,
    labels: &[],
};

pub static NETWORK_RECEIVE_BYTES: Metric = Metric {
    name: "tally_workload_network_receive_bytes_total",
    help: "Bytes the workload's sockets received (IP header and up), by where the sender is.",
    kind: Kind::Counter,
    unit: "bytes",
    per_workload: true,
    labels: &["scope"],
};

pub static NETWORK_TRANSMIT_BYTES: Metric = Metric {
    name: "tally_workload_network_transmit_bytes_total",
    help: "Bytes the workload's sockets sent (IP header and up), by where the receiver is.",
    kind: Kind::Counter,
    unit: "bytes",
    per_workload: true,
    labels: &["scope"],
};

pub static NETWORK_RECEIVE_PACKETS: Metric = Metric {
    name: "tally_workload_network_receive_packets_total",
    help: "Packets the workload's sockets received, by where the sender is.",
    kind: Kind::Counter,
    unit: "",
    per_workload: true,
    labels: &["scope"],
};

pub static NETWORK_TRANSMIT_PACKETS: Metric = Metric {
    name: "tally_workload_network_transmit_packets_total",
    help: "Packets the workload's sockets sent, by where the receiver is.",
    kind: Kind::Counter,
    unit: "",
    per_workload: true,
    labels: &["scope"],
};

pub static TCP_RETRANSMITTED_SEGMENTS: Metric = Metric {
    name: "tally_workload_tcp_retransmitted_segments_total",
    help: "TCP segments the workload's sockets retransmitted.",
    kind: Kind::Counter,
    unit: "",
    per_workload: true,
    labels: &[],
};

pub static TCP_CONNECTIONS_OPENED: Metric = Metric {
    name: "tally_workload_tcp_connections_opened_total",
    help: "TCP connections established by the workload's sockets: active (it connected) or passive (it accepted).",
    kind: Kind::Counter,
    unit: "",
    per_workload: true,
    labels: &["direction"],
};

pub static TCP_CONNECTIONS_CLOSED: Metric = Metric {
    name: "tally_workload_tcp_connections_closed_total",
    help: "Established TCP connections of the workload that closed.",
    kind: Kind::Counter,
    unit: "",
    per_workload: true,
    labels: &[],
};

pub static GPU_SECONDS: Metric = Metric {
    name: "tally_workload_gpu_seconds_total",
    help: "Accelerator busy time attributed to the workload, by device (or MIG instance) and how it was attributed (method).",
    kind: Kind::Counter,
    unit: "seconds",
    per_workload: true,
    labels: &["gpu", "method"],
};

pub static GPU_ENERGY_JOULES: Metric = Metric {
    name: "tally_workload_gpu_energy_joules_total",
    help: "GPU energy attributed to the workload: its busy share of each window's energy, plus an equal part of the idle energy of devices it holds.",
    kind: Kind::Counter,
    unit: "joules",
    per_workload: true,
    labels: &["gpu"],
};

pub static GPU_MEMORY_BYTE_SECONDS: Metric = Metric {
    name: "tally_workload_gpu_memory_byte_seconds_total",
    help: "GPU memory held by the workload's processes, integrated over time.",
    kind: Kind::Counter,
    unit: "byte_seconds",
    per_workload: true,
    labels: &["gpu"],
};

pub static GPU_MEMORY_BYTES: Metric = Metric {
    name: "tally_workload_gpu_memory_bytes",
    help: "GPU memory held by the workload's processes, by device (or MIG instance).",
    kind: Kind::Gauge,
    unit: "bytes",
    per_workload: true,
    labels: &["gpu"],
};

pub static RDMA_TRANSMIT_BYTES: Metric = Metric {
    name: "tally_workload_rdma_transmit_bytes_total",
    help: "RDMA bytes the workload sent, by device, port and how they were attributed (method: qp_counter, its processes' own QP counters; device, the port counters of a device assigned to it).",
    kind: Kind::Counter,
    unit: "bytes",
    per_workload: true,
    labels: &["device", "port", "method"],
};

pub static RDMA_RECEIVE_BYTES: Metric = Metric {
    name: "tally_workload_rdma_receive_bytes_total",
    help: "RDMA bytes the workload received, by device, port and method.",
    kind: Kind::Counter,
    unit: "bytes",
    per_workload: true,
    labels: &["device", "port", "method"],
};

pub static RDMA_TRANSMIT_PACKETS: Metric = Metric {
    name: "tally_workload_rdma_transmit_packets_total",
    help: "RDMA packets the workload sent, by device, port and method.",
    kind: Kind::Counter,
    unit: "",
    per_workload: true,
    labels: &["device", "port", "method"],
};

pub static RDMA_RECEIVE_PACKETS: Metric = Metric {
    name: "tally_workload_rdma_receive_packets_total",
    help: "RDMA packets the workload received, by device, port and method.",
    kind: Kind::Counter,
    unit: "",
    per_workload: true,
    labels: &["device", "port", "method"],
};

pub static INFO: Metric = Metric {
    name: "tally_workload_info",
    help:
        "Workloads the ledger holds (1), with their runtime, QoS class and whether they still run.",
    kind: Kind::Gauge,
    unit: "",
    per_workload: true,
    labels: &["runtime", "qos_class", "state"],
};
