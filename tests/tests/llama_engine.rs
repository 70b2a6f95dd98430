//! The llama.cpp test bed works: a real `llama-server --metrics` (Debian's package, in the chroot
//! `tests/llama/build` makes) serves the tiny model, and what its completions' `usage` reports
//! adds up exactly to its own `llamacpp:*` counters, cached prompt tokens included.

use std::time::Duration;

use tally_tests::agent::{free_port, sample, Agent};
use tally_tests::cgroup::{random_hex, TestCgroup};
use tally_tests::llama::{self, LlamaServer, Usage};
use tally_tests::require;

/// The value of the unlabelled series `name` in Prometheus text, or a panic naming what is there.
#[expect(clippy::panic, reason = "test helper")]
fn counter(text: &str, name: &str) -> u64 {
    let value = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no `{name}` in /metrics:\n{text}"));
    let value: f64 = value
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("`{name} {value}`: {e}"));
    assert!(
        value >= 0.0 && value.fract() == 0.0,
        "`{name}` is not a token count: {value}"
    );
    value as u64
}

#[test]
fn llama_server_usage_matches_its_metrics() {
    const TEST: &str = "llama_server_usage_matches_its_metrics";
    let Some(bed) = llama::bed(TEST) else {
        return;
    };
    let server = LlamaServer::start(&bed, None, free_port());

    // 20 ASCII characters: <s>, the leading word boundary, then one token each.
    let prompt = "Tally counts tokens!";
    let mut total = Usage::default();
    let mut each = Vec::new();
    for _ in 0..3 {
        let usage = llama::complete(server.port, prompt, 12);
        each.push(usage);
        total = total + usage;
    }
    let text = llama::metrics(server.port);
    let prompt_processed = counter(&text, "llamacpp:prompt_tokens_total");
    let prompt_cached = counter(&text, "llamacpp:prompt_tokens_cached_total");
    let predicted = counter(&text, "llamacpp:tokens_predicted_total");
    eprintln!(
        "usage per completion: {each:?}\nllamacpp:prompt_tokens_total {prompt_processed}\n\
         llamacpp:prompt_tokens_cached_total {prompt_cached}\n\
         llamacpp:tokens_predicted_total {predicted}"
    );

    // The server's counters exclude cached prompt tokens from prompt_tokens_total; usage's
    // prompt_tokens include them.
    assert_eq!(
        total.prompt_tokens,
        prompt_processed + prompt_cached,
        "prompt tokens: usage {each:?} against /metrics\n{text}"
    );
    assert_eq!(
        total.cached_tokens, prompt_cached,
        "cached prompt tokens: usage {each:?} against /metrics\n{text}"
    );
    assert_eq!(
        total.completion_tokens, predicted,
        "generated tokens: usage {each:?} against /metrics\n{text}"
    );
    assert!(
        total.cached_tokens > 0,
        "the repeated prompt's prefix was never reused: {each:?}"
    );
    // The model's vocabulary makes the counts exact: 22 prompt tokens, all but the last one
    // reused from the slot's cache after the first completion, 12 generated each time.
    assert_eq!(
        each,
        [
            Usage {
                prompt_tokens: 22,
                completion_tokens: 12,
                cached_tokens: 0
            },
            Usage {
                prompt_tokens: 22,
                completion_tokens: 12,
                cached_tokens: 21
            },
            Usage {
                prompt_tokens: 22,
                completion_tokens: 12,
                cached_tokens: 21
            },
        ],
        "log:\n{}",
        server.log()
    );
}

/// The agent meters the real server in a real cgroup: found by its command line and listening
/// socket, its tokens charged to the cgroup's workload, equal to the sums of the server's own
/// per-response `usage`: prompt = Σ prompt_tokens, cached = Σ cached_tokens, generation =
/// Σ completion_tokens.
#[test]
fn the_agent_meters_a_real_llama_server_as_its_responses_usage_says() {
    const TEST: &str = "the_agent_meters_a_real_llama_server_as_its_responses_usage_says";
    if !require::root(TEST) {
        return;
    }
    let Some(unified) = require::unified(TEST) else {
        return;
    };
    let Some(bed) = llama::bed(TEST) else {
        return;
    };
    let unit = format!("tally-test-llama-{}.service", random_hex(12));
    let cg = TestCgroup::create(
        std::slice::from_ref(&unified),
        &format!("/system.slice/{unit}"),
    );
    let agent = Agent::start(
        "[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = []\n[ebpf]\nenabled = false\n[gpu]\npod_resources_socket = \"\"\n[inference]\ninterval_secs = 1\n",
    );
    let server = LlamaServer::start(&bed, Some(&cg.dirs[0].join("cgroup.procs")), free_port());
    // Completions sharing a prefix, so the later ones reuse part of the slot's cache.
    let mut total = Usage::default();
    for suffix in ["", " and", " and bills", " and bills them", ""] {
        total = total + llama::complete(server.port, &format!("Tally counts tokens{suffix}!"), 7);
    }
    assert!(total.cached_tokens > 0, "no prefix was reused: {total:?}");
    let series = |t: &str, kind: &str| {
        sample(
            t,
            "tally_workload_tokens_total",
            &[
                &format!("unit=\"{unit}\""),
                "engine=\"llamacpp\"",
                "model=\"model.gguf\"",
                &format!("kind=\"{kind}\""),
            ],
        )
    };
    let text = agent.scrape_until(Duration::from_secs(20), "the completions' tokens", |t| {
        series(t, "generation") == Some(total.completion_tokens as f64)
    });
    eprintln!("usage sums {total:?}");
    assert_eq!(
        series(&text, "prompt"),
        Some(total.prompt_tokens as f64),
        "{text}"
    );
    assert_eq!(
        series(&text, "cached"),
        Some(total.cached_tokens as f64),
        "{text}"
    );
    assert_eq!(
        series(&text, "generation"),
        Some(total.completion_tokens as f64)
    );
    drop(server);
}
