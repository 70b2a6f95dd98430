//! The engine table: how each inference server is recognised on the node and how its own
//! metrics map to Tally's one schema. This table is the only place that knows an engine's
//! metric names; the README shows the same table.
//!
//! The schema, per model:
//! - tokens by kind: `prompt` counts every prompt token, prefix-cache hits included; `cached` is
//!   the part of them served from the prefix cache; `generation` the tokens generated;
//! - finished requests by outcome (`success`, `error`, `aborted`);
//! - KV-cache usage as a fraction of its capacity (0..1), and the capacity in tokens;
//! - prefix-cache hit tokens.
//!
//! Where an engine names a quantity twice (a renamed metric), the first name in the table that
//! the body has wins, so a version exposing both is not counted twice.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::exposition::Sample;

pub use crate::catalogue::inference::TOKEN_KINDS;

/// The `outcome` label values of `tally_workload_inference_requests_total`: `unknown` where the
/// engine counts finished requests without saying how they ended.
pub const OUTCOMES: [&str; 4] = ["success", "error", "aborted", "unknown"];

/// One quantity of the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    /// Tokens of a kind (an index into [`TOKEN_KINDS`]).
    Tokens(usize),
    /// Finished requests: with `Some(label)`, the outcome is that label's value mapped by
    /// [`outcome`]; with `None`, all are `fixed`.
    Requests {
        label: Option<&'static str>,
        fixed: &'static str,
    },
    /// KV-cache usage, a fraction (0..1).
    KvUsage,
    /// KV-cache usage in percent (0..100): divided by 100.
    KvUsagePercent,
    /// KV-cache capacity in tokens.
    KvCapacity,
    /// KV-cache capacity from an info series' labels: `tokens`, else `blocks` × `size`.
    KvCapacityFromLabels {
        tokens: &'static str,
        blocks: &'static str,
        size: &'static str,
    },
    /// KV-cache capacity in blocks, with the block size from another sample of the same body.
    KvCapacityBlocks,
    /// Tokens per KV-cache block (multiplies [`Quantity::KvCapacityBlocks`]).
    KvBlockTokens,
    /// Prefix-cache hit tokens.
    PrefixHits,
}

/// One row of an engine's mapping: a sample name and what it is; `when` restricts it to
/// samples with a label of that value (`kv_cache_block_type="max"`).
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub name: &'static str,
    pub quantity: Quantity,
    pub when: Option<(&'static str, &'static str)>,
}

const fn rule(name: &'static str, quantity: Quantity) -> Rule {
    Rule {
        name,
        quantity,
        when: None,
    }
}

const fn rule_when(
    name: &'static str,
    quantity: Quantity,
    label: &'static str,
    value: &'static str,
) -> Rule {
    Rule {
        name,
        quantity,
        when: Some((label, value)),
    }
}

const PROMPT: Quantity = Quantity::Tokens(0);
const GENERATION: Quantity = Quantity::Tokens(1);
const CACHED: Quantity = Quantity::Tokens(2);

/// One inference engine.
#[derive(Debug)]
pub struct Engine {
    /// The `engine` label.
    pub name: &'static str,
    /// How its process is recognised from its command line.
    pub matches: fn(&[&str]) -> bool,
    /// The label its series carry the model in, if any.
    pub model_label: Option<&'static str>,
    /// Command-line flags naming the model, in preference order, where the series carry none
    /// (a path is shown as its file name).
    pub model_flags: &'static [&'static str],
    /// Command-line flags naming the port its metrics are on.
    pub port_flags: &'static [&'static str],
    /// The port it listens on by default.
    pub default_port: u16,
    /// Where its metrics are.
    pub path: &'static str,
    /// Its prompt-token counter leaves out cached tokens: `prompt` is that counter plus the
    /// cached one.
    pub prompt_excludes_cached: bool,
    pub rules: &'static [Rule],
}

/// What argv[0] (or the script a Python runs) is called, without its directory.
fn base(arg: &str) -> &str {
    arg.rsplit('/').next().unwrap_or(arg)
}

/// Whether the command line runs Python module `module` (`python -m module`), or an entry
/// point named `entry` (`vllm serve`: argv[0] or a script argument ending in it).
fn runs(argv: &[&str], module: &str, entry: Option<(&str, Option<&str>)>) -> bool {
    let python = argv.first().is_some_and(|a| base(a).starts_with("python"));
    if python
        && argv
            .windows(2)
            .any(|w| w[0] == "-m" && (w[1] == module || w[1].starts_with(&format!("{module}."))))
    {
        return true;
    }
    let Some((name, sub)) = entry else {
        return false;
    };
    // The entry point itself, or run by a Python interpreter (`python3 /usr/bin/vllm serve`).
    let at = match argv.first() {
        Some(a) if base(a) == name => 0,
        Some(_) if python => match argv.get(1) {
            Some(a) if base(a) == name => 1,
            _ => return false,
        },
        _ => return false,
    };
    match sub {
        Some(sub) => argv.get(at + 1) == Some(&sub),
        None => true,
    }
}

fn is_vllm(argv: &[&str]) -> bool {
    runs(argv, "vllm.entrypoints", Some(("vllm", Some("serve"))))
}

/// SGLang serves metrics only with `--enable-metrics`.
fn is_sglang(argv: &[&str]) -> bool {
    (runs(
        argv,
        "sglang.launch_server",
        Some(("sglang", Some("serve"))),
    )) && argv.contains(&"--enable-metrics")
}

fn is_triton(argv: &[&str]) -> bool {
    argv.first().is_some_and(|a| base(a) == "tritonserver")
}

fn is_trtllm_serve(argv: &[&str]) -> bool {
    runs(argv, "tensorrt_llm.serve", Some(("trtllm-serve", None)))
}

fn is_tgi(argv: &[&str]) -> bool {
    argv.first()
        .is_some_and(|a| base(a) == "text-generation-router")
}

/// llama.cpp's server exposes metrics only with `--metrics` (or its environment variable,
/// which the command line does not show: such a server is found through the annotation).
fn is_llamacpp(argv: &[&str]) -> bool {
    argv.first().is_some_and(|a| base(a) == "llama-server") && argv.contains(&"--metrics")
}

fn is_dynamo(argv: &[&str]) -> bool {
    runs(argv, "dynamo.frontend", None)
}

/// Every engine, in the order a command line is matched against them. Names checked against
/// each engine's source (vLLM 0.34, SGLang 0.5.23, llama.cpp 0.7.0, TGI 3.x, Triton with the
/// TensorRT-LLM backend, TensorRT-LLM's `trtllm-serve`, Dynamo's frontend).
pub static ENGINES: &[Engine] = &[
    // vLLM: `prompt_tokens_total` counts every prompt token, cache hits included; cached ones
    // are `prompt_tokens_cached_total` (before it existed, the prefix cache's hit tokens).
    // `kv_cache_usage_perc` is a fraction. Series of data-parallel engines (`engine` label)
    // add up.
    Engine {
        name: "vllm",
        matches: is_vllm,
        model_label: Some("model_name"),
        model_flags: &["--served-model-name", "--model"],
        port_flags: &["--port"],
        default_port: 8000,
        path: "/metrics",
        prompt_excludes_cached: false,
        rules: &[
            rule("vllm:prompt_tokens_total", PROMPT),
            rule("vllm:generation_tokens_total", GENERATION),
            rule("vllm:prompt_tokens_cached_total", CACHED),
            rule("vllm:prefix_cache_hits_total", CACHED),
            rule("vllm:gpu_prefix_cache_hits_total", CACHED),
            rule(
                "vllm:request_success_total",
                Quantity::Requests {
                    label: Some("finished_reason"),
                    fixed: "unknown",
                },
            ),
            rule("vllm:kv_cache_usage_perc", Quantity::KvUsage),
            rule("vllm:gpu_cache_usage_perc", Quantity::KvUsage),
            rule(
                "vllm:cache_config_info",
                Quantity::KvCapacityFromLabels {
                    tokens: "kv_cache_size_tokens",
                    blocks: "num_gpu_blocks",
                    size: "block_size",
                },
            ),
            rule("vllm:prefix_cache_hits_total", Quantity::PrefixHits),
            rule("vllm:gpu_prefix_cache_hits_total", Quantity::PrefixHits),
        ],
    },
    // SGLang (metrics only with `--enable-metrics`): `prompt_tokens_total` includes cached
    // tokens; `cached_tokens_total` adds up over `cache_source`; `num_requests_total` counts
    // every finished request, aborted ones included, without saying how it ended.
    Engine {
        name: "sglang",
        matches: is_sglang,
        model_label: Some("model_name"),
        model_flags: &["--served-model-name", "--model-path", "--model"],
        port_flags: &["--port"],
        default_port: 30000,
        path: "/metrics",
        prompt_excludes_cached: false,
        rules: &[
            rule("sglang:prompt_tokens_total", PROMPT),
            rule("sglang:generation_tokens_total", GENERATION),
            rule("sglang:cached_tokens_total", CACHED),
            rule(
                "sglang:num_requests_total",
                Quantity::Requests {
                    label: None,
                    fixed: "unknown",
                },
            ),
            rule("sglang:token_usage", Quantity::KvUsage),
            rule("sglang:max_total_num_tokens", Quantity::KvCapacity),
            rule("sglang:cached_tokens_total", Quantity::PrefixHits),
        ],
    },
    // Triton with the TensorRT-LLM backend (metrics on their own port, 8002): tokens only as
    // per-request histograms (their `_sum`), no cached tokens; the model is Triton's model
    // name; KV blocks by `kv_cache_block_type`.
    Engine {
        name: "triton",
        matches: is_triton,
        model_label: Some("model"),
        model_flags: &[],
        port_flags: &["--metrics-port"],
        default_port: 8002,
        path: "/metrics",
        prompt_excludes_cached: false,
        rules: &[
            rule("nv_llm_input_token_len_sum", PROMPT),
            rule("nv_llm_output_token_len_sum", GENERATION),
            rule(
                "nv_inference_request_success",
                Quantity::Requests {
                    label: None,
                    fixed: "success",
                },
            ),
            rule(
                "nv_inference_request_failure",
                Quantity::Requests {
                    label: Some("reason"),
                    fixed: "error",
                },
            ),
            rule_when(
                "nv_trt_llm_kv_cache_block_metrics",
                Quantity::KvUsage,
                "kv_cache_block_type",
                "fraction",
            ),
            rule_when(
                "nv_trt_llm_kv_cache_block_metrics",
                Quantity::KvCapacityBlocks,
                "kv_cache_block_type",
                "max",
            ),
            rule_when(
                "nv_trt_llm_kv_cache_block_metrics",
                Quantity::KvBlockTokens,
                "kv_cache_block_type",
                "tokens_per",
            ),
        ],
    },
    // trtllm-serve: Prometheus text at `/prometheus/metrics` (its `/metrics` is JSON), with
    // `return_perf_metrics` on.
    Engine {
        name: "trtllm-serve",
        matches: is_trtllm_serve,
        model_label: Some("model_name"),
        model_flags: &[],
        port_flags: &["--port"],
        default_port: 8000,
        path: "/prometheus/metrics",
        prompt_excludes_cached: false,
        rules: &[
            rule("trtllm_prompt_tokens_total", PROMPT),
            rule("trtllm_generation_tokens_total", GENERATION),
            rule("trtllm_prompt_cached_tokens_total", CACHED),
            rule(
                "trtllm_request_success_total",
                Quantity::Requests {
                    label: Some("finished_reason"),
                    fixed: "unknown",
                },
            ),
            rule(
                "trtllm_request_error_total",
                Quantity::Requests {
                    label: None,
                    fixed: "error",
                },
            ),
            rule("trtllm_kv_cache_utilization", Quantity::KvUsage),
            rule("trtllm_kv_cache_max_blocks", Quantity::KvCapacityBlocks),
            rule("trtllm_kv_cache_tokens_per_block", Quantity::KvBlockTokens),
            rule("trtllm_prompt_cached_tokens_total", Quantity::PrefixHits),
        ],
    },
    // TGI's router: token counts only as histograms (their `_sum`; the input length also
    // counts requests that failed later), counters without `_total`, no model label, no KV
    // cache or prefix cache series.
    Engine {
        name: "tgi",
        matches: is_tgi,
        model_label: None,
        model_flags: &["--model-id", "--tokenizer-name"],
        port_flags: &["--port", "--prometheus-port"],
        default_port: 3000,
        path: "/metrics",
        prompt_excludes_cached: false,
        rules: &[
            rule("tgi_request_input_length_sum", PROMPT),
            rule("tgi_request_generated_tokens_sum", GENERATION),
            rule(
                "tgi_request_success",
                Quantity::Requests {
                    label: None,
                    fixed: "success",
                },
            ),
            rule(
                "tgi_request_failure",
                Quantity::Requests {
                    label: None,
                    fixed: "error",
                },
            ),
        ],
    },
    // llama.cpp's `llama-server --metrics`: `prompt_tokens_total` leaves cached tokens out
    // (prompt is it plus `prompt_tokens_cached_total`); no labels, no request outcomes; the KV
    // ratio only in builds before May 2025.
    Engine {
        name: "llamacpp",
        matches: is_llamacpp,
        model_label: None,
        model_flags: &["--alias", "-a", "--model", "-m"],
        port_flags: &["--port"],
        default_port: 8080,
        path: "/metrics",
        prompt_excludes_cached: true,
        rules: &[
            rule("llamacpp:prompt_tokens_total", PROMPT),
            rule("llamacpp:tokens_predicted_total", GENERATION),
            rule("llamacpp:prompt_tokens_cached_total", CACHED),
            rule("llamacpp:kv_cache_usage_ratio", Quantity::KvUsage),
            rule("llamacpp:prompt_tokens_cached_total", Quantity::PrefixHits),
        ],
    },
    // Dynamo's frontend (its workers re-export their engine's own series, which would count
    // the same tokens twice: only the frontend is scraped).
    Engine {
        name: "dynamo",
        matches: is_dynamo,
        model_label: Some("model"),
        model_flags: &[],
        port_flags: &["--http-port"],
        default_port: 8000,
        path: "/metrics",
        prompt_excludes_cached: false,
        rules: &[
            rule("dynamo_frontend_input_sequence_tokens_sum", PROMPT),
            rule("dynamo_frontend_output_tokens_total", GENERATION),
            rule("dynamo_frontend_output_sequence_tokens_sum", GENERATION),
            rule("dynamo_frontend_cached_tokens_sum", CACHED),
            rule(
                "dynamo_frontend_requests_total",
                Quantity::Requests {
                    label: Some("status"),
                    fixed: "unknown",
                },
            ),
            rule(
                "dynamo_frontend_model_total_kv_blocks",
                Quantity::KvCapacityBlocks,
            ),
            rule(
                "dynamo_frontend_model_kv_cache_block_size",
                Quantity::KvBlockTokens,
            ),
            rule("dynamo_frontend_cached_tokens_sum", Quantity::PrefixHits),
        ],
    },
];

/// The engine a command line runs, if any.
pub fn recognise(argv: &[&str]) -> Option<&'static Engine> {
    ENGINES.iter().find(|e| (e.matches)(argv))
}

/// The engine whose metrics a body holds: the one with the most of its names among the
/// samples' (the first in the table on a tie); `None` where no engine's name is there.
pub fn detect(samples: &[Sample<'_>]) -> Option<&'static Engine> {
    let mut best: Option<(&'static Engine, usize)> = None;
    for e in ENGINES {
        let mut names: Vec<&str> = samples
            .iter()
            .map(|s| s.name)
            .filter(|n| e.wants(n))
            .collect();
        names.sort_unstable();
        names.dedup();
        if !names.is_empty() && best.is_none_or(|(_, n)| names.len() > n) {
            best = Some((e, names.len()));
        }
    }
    best.map(|(e, _)| e)
}

/// The engine named `name` (the `engine` label).
pub fn by_name(name: &str) -> Option<&'static Engine> {
    ENGINES.iter().find(|e| e.name == name)
}

/// The value of `--flag value` or `--flag=value` in a command line.
pub fn flag<'a>(argv: &[&'a str], flag: &str) -> Option<&'a str> {
    argv.iter().enumerate().find_map(|(i, a)| {
        if *a == flag {
            argv.get(i + 1).copied()
        } else {
            a.strip_prefix(flag)?.strip_prefix('=')
        }
    })
}

impl Engine {
    /// The model its command line names, as the `model` label where its series carry none.
    pub fn model_from_cmdline(&self, argv: &[&str]) -> Option<String> {
        let value = self.model_flags.iter().find_map(|f| flag(argv, f))?;
        Some(base(value).to_owned())
    }

    /// The port its command line names for its metrics.
    pub fn port_from_cmdline(&self, argv: &[&str]) -> Option<u16> {
        self.port_flags
            .iter()
            .find_map(|f| flag(argv, f)?.parse().ok())
    }

    /// Whether `name` is a sample this engine's table maps.
    pub fn wants(&self, name: &str) -> bool {
        self.rules.iter().any(|r| r.name == name)
    }

    /// Converts one body's samples into readings per model. `model` names the model where the
    /// series carry no model label.
    pub fn convert(&self, samples: &[Sample<'_>], model: &str) -> Readings {
        let mut out: BTreeMap<Arc<str>, ModelReadings> = BTreeMap::new();
        // For each quantity, the first rule (name) the body has.
        let mut taken: Vec<(Quantity, &'static str)> = Vec::new();
        let mut blocks: BTreeMap<Arc<str>, (Option<f64>, Option<f64>)> = BTreeMap::new();
        for r in self.rules {
            let have = |s: &&Sample<'_>| {
                s.name == r.name && r.when.is_none_or(|(l, v)| s.label(l) == Some(v))
            };
            if !samples.iter().any(|s| have(&s)) {
                continue;
            }
            if taken
                .iter()
                .any(|(q, name)| same_slot(*q, r.quantity) && *name != r.name)
            {
                continue;
            }
            taken.push((r.quantity, r.name));
            for s in samples.iter().filter(have) {
                if !s.value.is_finite() || s.value < 0.0 {
                    continue;
                }
                let m: Arc<str> = match self.model_label.and_then(|l| s.label(l)) {
                    Some(m) => Arc::from(m),
                    None => Arc::from(model),
                };
                let readings = out.entry(m.clone()).or_default();
                let add = |slot: &mut Option<f64>, v: f64| *slot = Some(slot.unwrap_or(0.0) + v);
                match r.quantity {
                    Quantity::Tokens(k) => add(&mut readings.tokens[k], s.value),
                    Quantity::Requests { label, fixed } => {
                        let o = match label.and_then(|l| s.label(l)) {
                            Some(reason) => outcome(reason).unwrap_or(fixed),
                            None => fixed,
                        };
                        *readings.requests.entry(o).or_default() += s.value;
                    }
                    Quantity::KvUsage => {
                        readings.kv_usage = Some(readings.kv_usage.unwrap_or(0.0).max(s.value))
                    }
                    Quantity::KvUsagePercent => {
                        readings.kv_usage =
                            Some(readings.kv_usage.unwrap_or(0.0).max(s.value / 100.0))
                    }
                    Quantity::KvCapacity => add(&mut readings.kv_capacity, s.value),
                    Quantity::KvCapacityFromLabels {
                        tokens,
                        blocks,
                        size,
                    } => {
                        // "None" where the engine had no value.
                        let n = |l| s.label(l).and_then(|v| v.parse::<f64>().ok());
                        let capacity = n(tokens).or_else(|| Some(n(blocks)? * n(size)?));
                        if let Some(c) = capacity {
                            add(&mut readings.kv_capacity, c);
                        }
                    }
                    Quantity::KvCapacityBlocks => blocks.entry(m).or_default().0 = Some(s.value),
                    Quantity::KvBlockTokens => blocks.entry(m).or_default().1 = Some(s.value),
                    Quantity::PrefixHits => add(&mut readings.prefix_hits, s.value),
                }
            }
        }
        for (m, (n, per)) in blocks {
            if let (Some(n), Some(per)) = (n, per) {
                let readings = out.entry(m).or_default();
                readings.kv_capacity = Some(readings.kv_capacity.unwrap_or(0.0) + n * per);
            }
        }
        if self.prompt_excludes_cached {
            for r in out.values_mut() {
                if let (Some(p), Some(c)) = (r.tokens[0], r.tokens[2]) {
                    r.tokens[0] = Some(p + c);
                }
            }
        }
        // What a body's label values or sums make of nothing sensible is no reading at all.
        let sane = |v: &mut Option<f64>| {
            if v.is_some_and(|x| !x.is_finite() || x < 0.0) {
                *v = None;
            }
        };
        for r in out.values_mut() {
            r.tokens.iter_mut().for_each(sane);
            sane(&mut r.kv_capacity);
            sane(&mut r.prefix_hits);
            sane(&mut r.kv_usage);
            r.kv_usage = r.kv_usage.map(|u| u.clamp(0.0, 1.0));
            r.requests.retain(|_, v| v.is_finite());
        }
        out
    }
}

/// Whether two quantities fill the same reading (so only one name may feed it).
fn same_slot(a: Quantity, b: Quantity) -> bool {
    use Quantity::*;
    match (a, b) {
        (KvUsage | KvUsagePercent, KvUsage | KvUsagePercent) => true,
        // No engine renamed a request counter: each is its own.
        (Requests { .. }, Requests { .. }) => false,
        _ => a == b,
    }
}

/// An engine's finished reason or status as an outcome: a request that stopped, ran to its
/// length or hit a stop condition succeeded; one aborted or cancelled was aborted; one that
/// failed is an error. `None` for a reason not known here (the rule's own outcome applies).
pub fn outcome(reason: &str) -> Option<&'static str> {
    Some(match reason.to_ascii_lowercase().as_str() {
        "stop" | "length" | "repetition" | "success" | "end_id" | "stop_words" => "success",
        "abort" | "aborted" | "cancelled" | "canceled" => "aborted",
        "error" | "rejected" | "backend" | "other" => "error",
        _ => return None,
    })
}

/// What one server said about one model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelReadings {
    /// Cumulative tokens by kind ([`TOKEN_KINDS`]).
    pub tokens: [Option<f64>; 3],
    /// Cumulative finished requests by outcome.
    pub requests: BTreeMap<&'static str, f64>,
    pub kv_usage: Option<f64>,
    pub kv_capacity: Option<f64>,
    /// Cumulative prefix-cache hit tokens.
    pub prefix_hits: Option<f64>,
}

/// What one server said, by model.
pub type Readings = BTreeMap<Arc<str>, ModelReadings>;
