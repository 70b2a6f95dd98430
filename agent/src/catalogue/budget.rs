//! Budget and enforcement families.

use tally_exporters::{Kind, Metric};

pub static USAGE_RATIO: Metric = Metric {
    name: "tally_budget_usage_ratio",
    help: "Usage of a budget in its window divided by its limit, per workload (all labels empty for a shared budget).",
    kind: Kind::Gauge,
    unit: "ratio",
    per_workload: true,
    labels: &["budget", "resource"],
};

pub static USAGE: Metric = Metric {
    name: "tally_budget_usage",
    help: "Usage of a budget in its window, in the resource's base unit.",
    kind: Kind::Gauge,
    unit: "",
    per_workload: true,
    labels: &["budget", "resource"],
};

pub static LIMIT: Metric = Metric {
    name: "tally_budget_limit",
    help: "A budget's limit, in the resource's base unit.",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &["budget", "resource"],
};

pub static ENFORCEMENT_ACTIVE: Metric = Metric {
    name: "tally_enforcement_active",
    help: "Whether a budget is being enforced on the workload (1) or not (0); dry_run says whether anything was actually throttled.",
    kind: Kind::Gauge,
    unit: "",
    per_workload: true,
    labels: &["budget", "action", "dry_run"],
};

pub static ENFORCEMENT_FREEZE_SHARE_RATIO: Metric = Metric {
    name: "tally_enforcement_freeze_share_ratio",
    help: "Fraction of each freeze cycle a duty-cycled workload runs.",
    kind: Kind::Gauge,
    unit: "ratio",
    per_workload: true,
    labels: &["budget"],
};

pub static ENFORCEMENT_ACTIONS: Metric = Metric {
    name: "tally_enforcement_actions_total",
    help: "Budget state changes, by budget, action and event (warn, enforce, release).",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &["budget", "action", "event"],
};

pub static ENFORCEMENT_ERRORS: Metric = Metric {
    name: "tally_enforcement_errors_total",
    help: "Throttles that could not be applied or released, by budget, action and reason.",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &["budget", "action", "reason"],
};

pub static ENFORCEMENT_LATENCY_SECONDS: Metric = Metric {
    name: "tally_enforcement_latency_seconds",
    help: "Time from the start of the tick that detected an exceeded budget to its throttle being in place.",
    kind: Kind::Histogram,
    unit: "seconds",
    per_workload: false,
    labels: &[],
};

pub static ENFORCEMENT_THROTTLES: Metric = Metric {
    name: "tally_enforcement_throttles",
    help: "Throttles in force, by action.",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &["action"],
};

pub static CLUSTER_AVAILABLE: Metric = Metric {
    name: "tally_cluster_budget_available",
    help: "Whether a cluster budget has an answer younger than cluster.max_staleness_secs (1) or does what on_unavailable says (0).",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &["budget", "on_unavailable"],
};

pub static CLUSTER_ANSWER_AGE: Metric = Metric {
    name: "tally_cluster_budget_answer_age_seconds",
    help: "Age of a cluster budget's last good answer from the query endpoint; absent before the first.",
    kind: Kind::Gauge,
    unit: "seconds",
    per_workload: false,
    labels: &["budget"],
};

pub static CLUSTER_QUERIES: Metric = Metric {
    name: "tally_cluster_queries_total",
    help: "Queries this agent sent for a cluster budget, answered or not.",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &["budget"],
};

pub static CLUSTER_QUERY_FAILURES: Metric = Metric {
    name: "tally_cluster_query_failures_total",
    help: "Cluster budget queries that gave no usable answer, by reason.",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &["budget", "reason"],
};

pub static ADMISSION_HELD: Metric = Metric {
    name: "tally_admission_held",
    help: "1 while a workload that started under a spent admission = \"deny\" budget is held frozen, until the budget is released.",
    kind: Kind::Gauge,
    unit: "",
    per_workload: true,
    labels: &["budget"],
};

pub static ADMISSION_DECISIONS: Metric = Metric {
    name: "tally_admission_decisions_total",
    help: "Admission decisions by budget: containers refused (deny) or started throttled (throttle) at creation through NRI, and new workloads admitted, held or exempt at the first tick that sees them.",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &["budget", "decision"],
};

pub static ADMISSION_NRI_CONNECTED: Metric = Metric {
    name: "tally_admission_nri_connected",
    help: "1 while the NRI plugin is registered with the container runtime; 0 means the runtime creates containers without asking Tally (it fails open).",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &[],
};

pub static ADMISSION_NRI_DECISIONS: Metric = Metric {
    name: "tally_admission_nri_decisions_total",
    help: "The container runtime's CreateContainer calls, by what Tally answered: admit, exempt, unknown (verdicts too old; admission.on_unknown decided), throttle or deny.",
    kind: Kind::Counter,
    unit: "",
    per_workload: false,
    labels: &["decision"],
};

pub static ADMISSION_DECISION_SECONDS: Metric = Metric {
    name: "tally_admission_decision_seconds",
    help: "Time the agent takes to decide a CreateContainer call over NRI, from the decoded request to the answer.",
    kind: Kind::Histogram,
    unit: "seconds",
    per_workload: false,
    labels: &[],
};
