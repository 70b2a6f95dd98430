//! Node-level GPU families, from the latest NVML sample, by device.

use tally_exporters::{Kind, Metric};

pub static UP: Metric = Metric {
    name: "tally_gpu_up",
    help: "Whether NVML loaded and the GPUs are being sampled.",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &[],
};

pub static INFO: Metric = Metric {
    name: "tally_gpu_info",
    help: "GPUs NVML reports (always 1), with name, index, driver and MIG mode.",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &["gpu", "name", "index", "driver_version", "mig_mode"],
};

pub static UTILIZATION_RATIO: Metric = Metric {
    name: "tally_gpu_utilization_ratio",
    help: "Fraction of the last sample period the GPU was busy.",
    kind: Kind::Gauge,
    unit: "ratio",
    per_workload: false,
    labels: &["gpu"],
};

pub static MEMORY_USED_BYTES: Metric = Metric {
    name: "tally_gpu_memory_used_bytes",
    help: "GPU memory in use.",
    kind: Kind::Gauge,
    unit: "bytes",
    per_workload: false,
    labels: &["gpu"],
};

pub static MEMORY_TOTAL_BYTES: Metric = Metric {
    name: "tally_gpu_memory_total_bytes",
    help: "GPU memory installed.",
    kind: Kind::Gauge,
    unit: "bytes",
    per_workload: false,
    labels: &["gpu"],
};

pub static POWER_WATTS: Metric = Metric {
    name: "tally_gpu_power_watts",
    help: "Power draw.",
    kind: Kind::Gauge,
    unit: "watts",
    per_workload: false,
    labels: &["gpu"],
};

pub static ENERGY_JOULES: Metric = Metric {
    name: "tally_gpu_energy_joules_total",
    help: "Energy since the driver loaded (NVML total-energy counter).",
    kind: Kind::Counter,
    unit: "joules",
    per_workload: false,
    labels: &["gpu"],
};

pub static TEMPERATURE_CELSIUS: Metric = Metric {
    name: "tally_gpu_temperature_celsius",
    help: "GPU temperature.",
    kind: Kind::Gauge,
    unit: "celsius",
    per_workload: false,
    labels: &["gpu"],
};

pub static SM_CLOCK_HERTZ: Metric = Metric {
    name: "tally_gpu_sm_clock_hertz",
    help: "SM clock.",
    kind: Kind::Gauge,
    unit: "hertz",
    per_workload: false,
    labels: &["gpu"],
};

pub static MEMORY_CLOCK_HERTZ: Metric = Metric {
    name: "tally_gpu_memory_clock_hertz",
    help: "Memory clock.",
    kind: Kind::Gauge,
    unit: "hertz",
    per_workload: false,
    labels: &["gpu"],
};

pub static CLOCK_EVENT_REASONS: Metric = Metric {
    name: "tally_gpu_clock_event_reasons",
    help: "NVML clock event (throttle) reasons bitmask; 0 when the clocks run free.",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &["gpu"],
};

pub static PCIE_BYTES: Metric = Metric {
    name: "tally_gpu_pcie_bytes_total",
    help: "PCIe bytes by direction.",
    kind: Kind::Counter,
    unit: "bytes",
    per_workload: false,
    labels: &["gpu", "direction"],
};

pub static NVLINK_BYTES: Metric = Metric {
    name: "tally_gpu_nvlink_bytes_total",
    help: "NVLink bytes over all links, by direction.",
    kind: Kind::Counter,
    unit: "bytes",
    per_workload: false,
    labels: &["gpu", "direction"],
};

pub static ECC_ERRORS: Metric = Metric {
    name: "tally_gpu_ecc_errors_total",
    help: "ECC errors since the driver loaded, by type.",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &["gpu", "type"],
};

pub static RETIRED_PAGES: Metric = Metric {
    name: "tally_gpu_retired_pages",
    help: "Memory pages retired (single and double bit).",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &["gpu"],
};

pub static REMAPPED_ROWS: Metric = Metric {
    name: "tally_gpu_remapped_rows",
    help: "Memory rows remapped (correctable and uncorrectable).",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &["gpu"],
};

pub static LOST: Metric = Metric {
    name: "tally_gpu_lost",
    help: "1 when the GPU fell off the bus (GPU_IS_LOST).",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &["gpu"],
};

pub static BUSY_SECONDS: Metric = Metric {
    name: "tally_gpu_busy_seconds_total",
    help: "Device busy time (utilization × sample period).",
    kind: Kind::Counter,
    unit: "seconds",
    per_workload: false,
    labels: &["gpu"],
};

pub static UNATTRIBUTED_SECONDS: Metric = Metric {
    name: "tally_gpu_unattributed_seconds_total",
    help: "Device busy time no workload was charged with (busy time of processes that could not be seen, or beyond what process samples cover).",
    kind: Kind::Counter,
    unit: "seconds",
    per_workload: false,
    labels: &["gpu"],
};

pub static UNALLOCATED_ENERGY_JOULES: Metric = Metric {
    name: "tally_gpu_unallocated_energy_joules_total",
    help: "Energy the GPU spent while no workload held it.",
    kind: Kind::Counter,
    unit: "joules",
    per_workload: false,
    labels: &["gpu"],
};

pub static XID_ERRORS: Metric = Metric {
    name: "tally_gpu_xid_errors_total",
    help: "XID errors NVML reported, by device and XID.",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &["gpu", "xid"],
};

pub static NVML_ERRORS: Metric = Metric {
    name: "tally_gpu_nvml_errors_total",
    help: "NVML calls that failed, by call and error code.",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &["call", "code"],
};

pub static NVML_CALLS_PER_GPU: Metric = Metric {
    name: "tally_gpu_nvml_calls_per_gpu",
    help: "NVML calls per GPU in the last sampling round.",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &[],
};
