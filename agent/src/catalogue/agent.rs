//! The agent's own families: build, ticks, probes, errors, kept-open cgroup files, eBPF program cost,
//! OTLP and alert delivery.

use tally_exporters::{Kind, Metric};

pub static BUILD_INFO: Metric = Metric {
    name: "tally_build_info",
    help: "Version of the running agent (always 1).",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &["version"],
};

pub static WORKLOADS: Metric = Metric {
    name: "tally_workloads",
    help: "Workloads in the ledger, by state.",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &["state"],
};

pub static COLLECTOR_ERRORS: Metric = Metric {
    name: "tally_collector_errors_total",
    help: "Failures of the agent's collectors, by collector and reason.",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &["collector", "reason"],
};

pub static CGROUPFS_OPEN_FILES: Metric = Metric {
    name: "tally_cgroupfs_open_files",
    help: "Cgroup files the cgroupfs collector keeps open, each read with one pread a tick.",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &[],
};

pub static CGROUPFS_OPEN_FILES_LIMIT: Metric = Metric {
    name: "tally_cgroupfs_open_files_limit",
    help: "How many cgroup files the cgroupfs collector may keep open: the open-file limit less a reserve for the rest of the agent (an eighth, at least 256), lowered by a reserve each tick the limit is met anyway.",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &[],
};

pub static CGROUPFS_PATH_READS: Metric = Metric {
    name: "tally_cgroupfs_path_reads_total",
    help: "Cgroup file reads that opened the file by path and closed it again, for files beyond tally_cgroupfs_open_files_limit.",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &[],
};

pub static CGROUPFS_READ_INTERVAL: Metric = Metric {
    name: "tally_cgroupfs_read_interval_seconds",
    help: "How often the cgroup files of a workload that no budget selects are read (cgroupfs.read_interval_ms, at least one tick); budgeted and new workloads are read every tick.",
    kind: Kind::Gauge,
    unit: "seconds",
    per_workload: false,
    labels: &[],
};

pub static PROBE_UP: Metric = Metric {
    name: "tally_probe_up",
    help: "Whether a measurement source works (1) or not (0), by probe and the method in use.",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &["probe", "method"],
};

pub static TICKS: Metric = Metric {
    name: "tally_ticks_total",
    help: "Ticks the agent has completed.",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &[],
};

pub static TICK_DURATION_SECONDS: Metric = Metric {
    name: "tally_tick_duration_seconds",
    help: "How long the last tick took to read every source, in seconds.",
    kind: Kind::Gauge,
    unit: "seconds",
    per_workload: false,
    labels: &[],
};

pub static SOURCE_COLLECT_DURATION_SECONDS: Metric = Metric {
    name: "tally_source_collect_duration_seconds",
    help: "How long each source took to collect in the last tick, in seconds.",
    kind: Kind::Gauge,
    unit: "seconds",
    per_workload: false,
    labels: &["source"],
};

pub static EBPF_PROGRAM_RUN_SECONDS: Metric = Metric {
    name: "tally_ebpf_program_run_seconds_total",
    help: "Time the kernel spent running each of the agent's BPF programs, counted while bpf_stats is on (tally_ebpf_program_stats_seconds_total).",
    kind: Kind::Counter,
    unit: "seconds",
    per_workload: false,
    labels: &["program"],
};

pub static EBPF_PROGRAM_RUNS: Metric = Metric {
    name: "tally_ebpf_program_runs_total",
    help: "Runs of each of the agent's BPF programs, counted while bpf_stats is on.",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &["program"],
};

pub static EBPF_PROGRAM_STATS_SECONDS: Metric = Metric {
    name: "tally_ebpf_program_stats_seconds_total",
    help: "Time the agent has held bpf_stats on (ebpf.program_stats), the time the tally_ebpf_program_* counters cover.",
    kind: Kind::Counter,
    unit: "seconds",
    per_workload: false,
    labels: &[],
};

pub static EBPF_MAP_UPDATES_LOST: Metric = Metric {
    name: "tally_ebpf_map_updates_lost_total",
    help: "Counter updates the BPF programs dropped because a map was full.",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &["map"],
};

pub static CGROUP_WALKS: Metric = Metric {
    name: "tally_cgroup_walks_total",
    help: "Ticks by how they found the workloads: walked the cgroup hierarchies, or reused the last walk because no cgroup was made or removed since (the lifecycle probe says so; a walk at least every 60 ticks regardless).",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &["result"],
};

pub static TENANT_VALUES_FOLDED: Metric = Metric {
    name: "tally_tenant_values_folded_total",
    help: "Distinct values of a promoted tenant label ([tenants] labels) beyond max_values_per_label, exported as other since the agent started.",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &["label"],
};

pub static WORKLOADS_MISSED: Metric = Metric {
    name: "tally_workloads_missed_total",
    help: "Cgroups that may have lived and died between two walks without a row: their creation record was dropped (reason event_lost) or their path could not be read (path_unreadable). Their usage stayed with the host row or the workload above them.",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &["reason"],
};

pub static OTLP_BATCHES: Metric = Metric {
    name: "tally_otlp_batches_total",
    help: "OTLP batches by outcome: exported, or dropped from a full queue while the collector was unreachable.",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &["result"],
};

pub static OTLP_EXPORT_FAILURES: Metric = Metric {
    name: "tally_otlp_export_failures_total",
    help: "OTLP export attempts that failed or timed out.",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &[],
};

pub static OTLP_QUEUE_BATCHES: Metric = Metric {
    name: "tally_otlp_queue_batches",
    help: "OTLP batches waiting for the collector.",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &[],
};

pub static ALERT_REQUESTS: Metric = Metric {
    name: "tally_alert_requests_total",
    help: "Alert deliveries by target and result: sent (accepted), failed (given up after every attempt), dropped (shed from a full target queue).",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &["kind", "url", "result"],
};

pub static ALERT_FAILED_ATTEMPTS: Metric = Metric {
    name: "tally_alert_failed_attempts_total",
    help: "Alert delivery attempts that failed (connection, timeout, non-2xx), retried or not.",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &["kind", "url"],
};

pub static ALERTS_DROPPED: Metric = Metric {
    name: "tally_alerts_dropped_total",
    help: "Budget alert events not queued for delivery because the queue was full.",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &[],
};

pub static ALERTS_ACTIVE: Metric = Metric {
    name: "tally_alerts_active",
    help: "Budget alerts firing now.",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &[],
};
