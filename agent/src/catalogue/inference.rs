//! Inference families: what the inference servers inside workloads said, per model, in one
//! schema whatever the engine (`inference::engines` maps each engine's own metrics).

use tally_exporters::{Kind, Metric};

/// The `kind` label values of [`TOKENS`], in this order: `prompt` (every prompt token, cached
/// ones included), `generation`, `cached` (the prompt tokens served from the prefix cache).
pub const TOKEN_KINDS: [&str; 3] = ["prompt", "generation", "cached"];

pub static TOKENS: Metric = Metric {
    name: "tally_workload_tokens_total",
    help: "Tokens the workload's inference servers processed, by engine, model and kind (prompt: every prompt token, cached ones included; cached: the prompt tokens served from the prefix cache; generation: tokens generated).",
    kind: Kind::Counter,
    unit: "tokens",
    per_workload: true,
    labels: &["engine", "model", "kind"],
};

pub static REQUESTS: Metric = Metric {
    name: "tally_workload_inference_requests_total",
    help: "Inference requests the workload's servers finished, by engine, model and outcome (success, error, aborted; unknown where the engine does not say).",
    kind: Kind::Counter,
    unit: "",
    per_workload: true,
    labels: &["engine", "model", "outcome"],
};

pub static KV_CACHE_USAGE_RATIO: Metric = Metric {
    name: "tally_workload_kv_cache_usage_ratio",
    help:
        "Fraction of its KV cache the workload's inference server holds now, by engine and model.",
    kind: Kind::Gauge,
    unit: "ratio",
    per_workload: true,
    labels: &["engine", "model"],
};

pub static KV_CACHE_CAPACITY_TOKENS: Metric = Metric {
    name: "tally_workload_kv_cache_capacity_tokens",
    help: "Tokens the workload's inference server's KV cache holds at most, where the engine says.",
    kind: Kind::Gauge,
    unit: "tokens",
    per_workload: true,
    labels: &["engine", "model"],
};

pub static PREFIX_CACHE_HIT_TOKENS: Metric = Metric {
    name: "tally_workload_prefix_cache_hit_tokens_total",
    help: "Prompt tokens the workload's inference servers found in their prefix cache, by engine and model.",
    kind: Kind::Counter,
    unit: "tokens",
    per_workload: true,
    labels: &["engine", "model"],
};

pub static SERVERS: Metric = Metric {
    name: "tally_inference_servers",
    help: "Inference servers found on the node, by engine and whether their last scrape answered (up 1 or 0).",
    kind: Kind::Gauge,
    unit: "",
    per_workload: false,
    labels: &["engine", "up"],
};

pub static INTERVAL_SECONDS: Metric = Metric {
    name: "tally_inference_interval_seconds",
    help: "How often inference servers are found and scraped (inference.interval_secs).",
    kind: Kind::Gauge,
    unit: "seconds",
    per_workload: false,
    labels: &[],
};

pub static ROUND_SECONDS: Metric = Metric {
    name: "tally_inference_round_seconds",
    help: "Time the last round of discovery and scrapes took, off the tick, by phase (discovery, scrape).",
    kind: Kind::Gauge,
    unit: "seconds",
    per_workload: false,
    labels: &["phase"],
};
