//! Every metric family the agent exports, declared once: name, help, type, unit and labels.
//!
//! Sources build their [`Family`](tally_exporters::Family) from these declarations and the ledger
//! is keyed by them; nothing else in the agent spells a metric name. [`ALL`] is the exposition
//! order. A new family is one `static` in the file of its area plus its place in [`ALL`]; the
//! golden file (`catalogue/golden.txt`) and the README's metric table are checked against it.

pub mod agent;
pub mod budget;
pub mod cost;
pub mod gpu;
pub mod inference;
pub mod rdma;
pub mod workload;

use tally_exporters::Metric;

/// The one label set of every per-workload family, in this order; a family's own labels (`gpu`,
/// `direction`, …) come after it. A container leaves `unit` empty; a systemd unit has only `unit`.
pub const WORKLOAD_LABELS: [&str; 6] = [
    "namespace",
    "pod",
    "pod_uid",
    "container",
    "container_id",
    "unit",
];

/// Every family, in the order `/metrics` shows them.
pub static ALL: &[&Metric] = &[
    &workload::CPU_SECONDS,
    &workload::MEMORY_BYTES,
    &workload::DISK_READ_BYTES,
    &workload::DISK_WRITE_BYTES,
    &workload::DISK_OPERATIONS,
    &workload::DISK_IO_LATENCY_SECONDS,
    &workload::NETWORK_RECEIVE_BYTES,
    &workload::NETWORK_TRANSMIT_BYTES,
    &workload::NETWORK_RECEIVE_PACKETS,
    &workload::NETWORK_TRANSMIT_PACKETS,
    &workload::TCP_RETRANSMITTED_SEGMENTS,
    &workload::TCP_CONNECTIONS_OPENED,
    &workload::TCP_CONNECTIONS_CLOSED,
    &workload::GPU_SECONDS,
    &workload::GPU_ENERGY_JOULES,
    &workload::GPU_MEMORY_BYTE_SECONDS,
    &gpu::UP,
    &workload::GPU_MEMORY_BYTES,
    &gpu::INFO,
    &gpu::UTILIZATION_RATIO,
    &gpu::MEMORY_USED_BYTES,
    &gpu::MEMORY_TOTAL_BYTES,
    &gpu::POWER_WATTS,
    &gpu::ENERGY_JOULES,
    &gpu::TEMPERATURE_CELSIUS,
    &gpu::SM_CLOCK_HERTZ,
    &gpu::MEMORY_CLOCK_HERTZ,
    &gpu::CLOCK_EVENT_REASONS,
    &gpu::PCIE_BYTES,
    &gpu::NVLINK_BYTES,
    &gpu::ECC_ERRORS,
    &gpu::RETIRED_PAGES,
    &gpu::REMAPPED_ROWS,
    &gpu::LOST,
    &gpu::BUSY_SECONDS,
    &gpu::UNATTRIBUTED_SECONDS,
    &gpu::UNALLOCATED_ENERGY_JOULES,
    &gpu::XID_ERRORS,
    &gpu::NVML_ERRORS,
    &gpu::NVML_CALLS_PER_GPU,
    &workload::RDMA_TRANSMIT_BYTES,
    &workload::RDMA_RECEIVE_BYTES,
    &workload::RDMA_TRANSMIT_PACKETS,
    &workload::RDMA_RECEIVE_PACKETS,
    &rdma::PORT_INFO,
    &rdma::PORT_TRANSMIT_BYTES,
    &rdma::PORT_RECEIVE_BYTES,
    &rdma::PORT_TRANSMIT_PACKETS,
    &rdma::PORT_RECEIVE_PACKETS,
    &rdma::PORT_COUNTERS,
    &rdma::PORT_HW_COUNTERS,
    &rdma::PORT_PER_PROCESS,
    &rdma::QP_COUNTERS,
    &rdma::QPS_UNCOUNTED,
    &inference::TOKENS,
    &inference::REQUESTS,
    &inference::KV_CACHE_USAGE_RATIO,
    &inference::KV_CACHE_CAPACITY_TOKENS,
    &inference::PREFIX_CACHE_HIT_TOKENS,
    &inference::SERVERS,
    &inference::INTERVAL_SECONDS,
    &inference::ROUND_SECONDS,
    &cost::WORKLOAD_COST,
    &cost::PRICE,
    &workload::INFO,
    &budget::USAGE_RATIO,
    &budget::USAGE,
    &budget::LIMIT,
    &budget::ENFORCEMENT_ACTIVE,
    &budget::ENFORCEMENT_FREEZE_SHARE_RATIO,
    &budget::ENFORCEMENT_ACTIONS,
    &budget::ENFORCEMENT_ERRORS,
    &budget::ENFORCEMENT_LATENCY_SECONDS,
    &budget::ENFORCEMENT_THROTTLES,
    &budget::ADMISSION_HELD,
    &budget::ADMISSION_DECISIONS,
    &budget::ADMISSION_NRI_CONNECTED,
    &budget::ADMISSION_NRI_DECISIONS,
    &budget::ADMISSION_DECISION_SECONDS,
    &budget::CLUSTER_AVAILABLE,
    &budget::CLUSTER_ANSWER_AGE,
    &budget::CLUSTER_QUERIES,
    &budget::CLUSTER_QUERY_FAILURES,
    &agent::BUILD_INFO,
    &agent::WORKLOADS,
    &agent::COLLECTOR_ERRORS,
    &agent::CGROUPFS_OPEN_FILES,
    &agent::CGROUPFS_OPEN_FILES_LIMIT,
    &agent::CGROUPFS_PATH_READS,
    &agent::CGROUPFS_READ_INTERVAL,
    &agent::PROBE_UP,
    &agent::TICKS,
    &agent::TICK_DURATION_SECONDS,
    &agent::SOURCE_COLLECT_DURATION_SECONDS,
    &agent::EBPF_PROGRAM_RUN_SECONDS,
    &agent::EBPF_PROGRAM_RUNS,
    &agent::EBPF_PROGRAM_STATS_SECONDS,
    &agent::EBPF_MAP_UPDATES_LOST,
    &agent::CGROUP_WALKS,
    &agent::TENANT_VALUES_FOLDED,
    &agent::WORKLOADS_MISSED,
    &agent::OTLP_BATCHES,
    &agent::OTLP_EXPORT_FAILURES,
    &agent::OTLP_QUEUE_BATCHES,
    &agent::ALERT_REQUESTS,
    &agent::ALERT_FAILED_ATTEMPTS,
    &agent::ALERTS_DROPPED,
    &agent::ALERTS_ACTIVE,
];

/// The declaration named `name`.
pub fn find(name: &str) -> Option<&'static Metric> {
    ALL.iter().copied().find(|m| m.name == name)
}

#[cfg(test)]
mod tests;
