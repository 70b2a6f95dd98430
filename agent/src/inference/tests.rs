//! Golden parsing per engine, from exposition text written to each engine's own names and
//! types; the command-line and socket-table parsers of discovery; and the bounded HTTP client
//! against servers on loopback that answer well, slowly, hugely or not at all.

use std::collections::HashSet;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use super::discover::{self, parse_listeners};
use super::engines::{self, by_name, ModelReadings, Readings};
use super::exposition::{parse, ParseError};
use super::scrape;

fn readings(engine: &str, body: &str, model: &str) -> Readings {
    let e = by_name(engine).unwrap();
    let samples = parse(body, |n| e.wants(n)).unwrap();
    e.convert(&samples, model)
}

fn one(engine: &str, body: &str, model: &str) -> ModelReadings {
    let r = readings(engine, body, model);
    assert_eq!(r.len(), 1, "{r:?}");
    r.into_values().next().unwrap()
}

#[test]
fn the_parser_reads_labels_escapes_timestamps_and_special_values() {
    let text = "# HELP x help\n# TYPE x counter\nx_total{a=\"b\\\"c\\\\d\\n\",e=\"\"} 1.5e3 1700000000000\ny NaN\nz{q=\"é,}\"} +Inf\n\n# EOF\n";
    let s = parse(text, |_| true).unwrap();
    assert_eq!(s.len(), 3);
    assert_eq!(s[0].name, "x_total");
    assert_eq!(s[0].label("a"), Some("b\"c\\d\n"));
    assert_eq!(s[0].label("e"), Some(""));
    assert_eq!(s[0].value, 1500.0);
    assert!(s[1].value.is_nan());
    assert_eq!(s[2].label("q"), Some("é,}"));
    assert_eq!(s[2].value, f64::INFINITY);
}

#[test]
fn the_parser_refuses_what_is_not_exposition_text_naming_the_line() {
    for (text, line, what) in [
        ("ok 1\n<html>", 2, "no metric name"),
        ("a{b=\"c\" 1", 1, "labels not separated by `,`"),
        ("a{b=c} 1", 1, "a label value without quotes"),
        ("a 1 2 3", 1, "text after the timestamp"),
        ("a one", 1, "the value is not a number"),
        ("a{b=\"c\\q\"} 1", 1, "a bad escape in a label value"),
        ("a{b=\"c", 1, "an unterminated label value"),
        ("a", 1, "no value after the name"),
    ] {
        assert_eq!(
            parse(text, |_| true),
            Err(ParseError { line, what }),
            "{text:?}"
        );
    }
}

/// vLLM V1: `model_name` on every series; `kv_cache_usage_perc` is a fraction despite its name;
/// the capacity is `num_gpu_blocks × block_size` from `cache_config_info`'s labels; finished
/// reasons map to outcomes.
#[test]
fn vllm_maps_by_model_name_and_counts_renamed_series_once() {
    let body = r#"# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B"} 1200.0
vllm:prompt_tokens_total{engine="0",model_name="qwen"} 7.0
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B"} 340.0
# TYPE vllm:prompt_tokens_cached_total counter
vllm:prompt_tokens_cached_total{engine="0",model_name="meta-llama/Llama-3.1-8B"} 500.0
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="meta-llama/Llama-3.1-8B"} 1200.0
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="meta-llama/Llama-3.1-8B"} 512.0
# TYPE vllm:gpu_prefix_cache_hits_total counter
vllm:gpu_prefix_cache_hits_total{engine="0",model_name="meta-llama/Llama-3.1-8B"} 512.0
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="meta-llama/Llama-3.1-8B"} 9.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="meta-llama/Llama-3.1-8B"} 2.0
vllm:request_success_total{engine="0",finished_reason="abort",model_name="meta-llama/Llama-3.1-8B"} 1.0
vllm:request_success_total{engine="0",finished_reason="repetition",model_name="meta-llama/Llama-3.1-8B"} 1.0
vllm:request_success_total{engine="0",finished_reason="error",model_name="meta-llama/Llama-3.1-8B"} 4.0
vllm:request_success_total{engine="0",finished_reason="novel",model_name="meta-llama/Llama-3.1-8B"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B"} 0.25
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B"} 0.75
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",num_gpu_blocks="2048",kv_cache_size_tokens="None",model_name="meta-llama/Llama-3.1-8B"} 1.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",num_gpu_blocks="10",kv_cache_size_tokens="4000",model_name="qwen"} 1.0
"#;
    let r = readings("vllm", body, "from-cmdline");
    let llama = &r["meta-llama/Llama-3.1-8B"];
    // Cached: the prompt's cached tokens, not the prefix cache's hits (which count the
    // scheduler's re-checks of waiting requests again).
    assert_eq!(llama.tokens, [Some(1200.0), Some(340.0), Some(500.0)]);
    assert_eq!(llama.prefix_hits, Some(512.0));
    assert_eq!(
        llama
            .requests
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect::<Vec<_>>(),
        [
            ("aborted", 1.0),
            ("error", 4.0),
            ("success", 12.0),
            ("unknown", 1.0)
        ]
    );
    // The current name wins over the deprecated one, which is not added to it.
    assert_eq!(llama.kv_usage, Some(0.25));
    // `kv_cache_size_tokens` where the engine says it; blocks × block size where "None".
    assert_eq!(llama.kv_capacity, Some(2048.0 * 16.0));
    assert_eq!(r["qwen"].kv_capacity, Some(4000.0));
    assert_eq!(r["qwen"].tokens, [Some(7.0), None, None]);
}

#[test]
fn vllm_before_the_rename_is_read_from_its_old_names() {
    let body = "vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.5\nvllm:gpu_prefix_cache_hits_total{model_name=\"m\"} 30\n";
    let m = one("vllm", body, "");
    assert_eq!(m.kv_usage, Some(0.5));
    assert_eq!(m.tokens[2], Some(30.0));
    assert_eq!(m.prefix_hits, Some(30.0));
}

/// SGLang counts every prompt token in `prompt_tokens_total`, and the cached part in
/// `cached_tokens_total`; `token_usage` is the fraction of the KV pool in use.
#[test]
fn sglang_maps_its_counters_and_its_token_pool() {
    let body = r#"# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="Qwen/Qwen2.5-7B"} 900.0
# TYPE sglang:generation_tokens_total counter
sglang:generation_tokens_total{model_name="Qwen/Qwen2.5-7B"} 120.0
# TYPE sglang:cached_tokens_total counter
sglang:cached_tokens_total{model_name="Qwen/Qwen2.5-7B",cache_source="device"} 250.0
sglang:cached_tokens_total{model_name="Qwen/Qwen2.5-7B",cache_source="host"} 50.0
# TYPE sglang:num_requests_total counter
sglang:num_requests_total{model_name="Qwen/Qwen2.5-7B"} 6.0
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="Qwen/Qwen2.5-7B"} 0.125
# TYPE sglang:max_total_num_tokens gauge
sglang:max_total_num_tokens{model_name="Qwen/Qwen2.5-7B"} 65536.0
"#;
    let m = one("sglang", body, "");
    assert_eq!(m.tokens, [Some(900.0), Some(120.0), Some(300.0)]);
    // Every finished request, aborted ones included, without an outcome.
    assert_eq!(m.requests.get("unknown"), Some(&6.0));
    assert_eq!(m.kv_usage, Some(0.125));
    assert_eq!(m.kv_capacity, Some(65536.0));
}

/// TGI: token counts only as histograms (their `_sum`), no model label (the model is
/// `--model-id`'s), success and failure as separate counters without `_total`.
#[test]
fn tgi_sums_its_histograms_and_takes_the_model_from_the_command_line() {
    let body = r#"# TYPE tgi_request_input_length histogram
tgi_request_input_length_bucket{le="10"} 1
tgi_request_input_length_bucket{le="+Inf"} 3
tgi_request_input_length_sum 61
tgi_request_input_length_count 3
# TYPE tgi_request_generated_tokens histogram
tgi_request_generated_tokens_bucket{le="+Inf"} 3
tgi_request_generated_tokens_sum 48
tgi_request_generated_tokens_count 3
# TYPE tgi_request_success counter
tgi_request_success 3
# TYPE tgi_request_failure counter
tgi_request_failure{err="validation"} 2
tgi_request_failure{err="overloaded"} 1
"#;
    let argv = [
        "text-generation-router",
        "--model-id",
        "/data/models/mistral-7b",
    ];
    let tgi = by_name("tgi").unwrap();
    let model = tgi.model_from_cmdline(&argv).unwrap();
    assert_eq!(model, "mistral-7b");
    let r = readings("tgi", body, &model);
    let m = &r["mistral-7b"];
    assert_eq!(m.tokens, [Some(61.0), Some(48.0), None]);
    assert_eq!(m.requests.get("success"), Some(&3.0));
    assert_eq!(m.requests.get("error"), Some(&3.0));
    assert_eq!(m.kv_usage, None);
}

/// Triton with TensorRT-LLM: tokens from the per-request histograms' sums, failures by reason
/// (cancelled ones aborted), KV capacity as max blocks × tokens per block, the fraction as is.
#[test]
fn triton_maps_histogram_sums_failure_reasons_and_kv_blocks() {
    let body = r#"# TYPE nv_inference_request_success counter
nv_inference_request_success{model="ensemble",version="1"} 10
nv_inference_request_success{model="tensorrt_llm",version="1"} 10
# TYPE nv_inference_request_failure counter
nv_inference_request_failure{model="tensorrt_llm",reason="REJECTED",version="1"} 2
nv_inference_request_failure{model="tensorrt_llm",reason="CANCELED",version="1"} 1
# TYPE nv_llm_input_token_len histogram
nv_llm_input_token_len_bucket{model="tensorrt_llm",response_metric_type="total_input_tokens",version="1",le="+Inf"} 10
nv_llm_input_token_len_sum{model="tensorrt_llm",response_metric_type="total_input_tokens",version="1"} 4321
nv_llm_input_token_len_count{model="tensorrt_llm",response_metric_type="total_input_tokens",version="1"} 10
nv_llm_output_token_len_sum{model="tensorrt_llm",response_metric_type="total_output_tokens",version="1"} 987
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="tensorrt_llm",version="1"} 512
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="tensorrt_llm",version="1"} 64
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="tensorrt_llm",version="1"} 64
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="tensorrt_llm",version="1"} 0.125
"#;
    let r = readings("triton", body, "");
    let t = &r["tensorrt_llm"];
    assert_eq!(t.tokens, [Some(4321.0), Some(987.0), None]);
    assert_eq!(
        t.requests.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(),
        [("aborted", 1.0), ("error", 2.0), ("success", 10.0)]
    );
    assert_eq!(t.kv_usage, Some(0.125));
    assert_eq!(t.kv_capacity, Some(512.0 * 64.0));
    assert_eq!(r["ensemble"].requests.get("success"), Some(&10.0));
}

/// trtllm-serve and Dynamo's frontend, each with its own names.
#[test]
fn trtllm_serve_and_dynamo_map_their_own_names() {
    let body = r#"trtllm_prompt_tokens_total{model_name="llama",engine_type="pytorch"} 100
trtllm_generation_tokens_total{model_name="llama",engine_type="pytorch"} 40
trtllm_prompt_cached_tokens_total{model_name="llama",engine_type="pytorch"} 30
trtllm_request_success_total{model_name="llama",engine_type="pytorch",finished_reason="end_id"} 5
trtllm_request_error_total{model_name="llama",engine_type="pytorch",http_code="500"} 1
trtllm_kv_cache_utilization{model_name="llama",engine_type="pytorch"} 0.5
trtllm_kv_cache_max_blocks{model_name="llama",engine_type="pytorch"} 100
trtllm_kv_cache_tokens_per_block{model_name="llama",engine_type="pytorch"} 32
"#;
    let m = one("trtllm-serve", body, "");
    assert_eq!(m.tokens, [Some(100.0), Some(40.0), Some(30.0)]);
    assert_eq!(m.requests.get("success"), Some(&5.0));
    assert_eq!(m.requests.get("error"), Some(&1.0));
    assert_eq!((m.kv_usage, m.kv_capacity), (Some(0.5), Some(3200.0)));
    let body = r#"dynamo_frontend_input_sequence_tokens_sum{model="qwen"} 700
dynamo_frontend_output_sequence_tokens_sum{model="qwen"} 90
dynamo_frontend_output_tokens_total{model="qwen"} 95
dynamo_frontend_cached_tokens_sum{model="qwen"} 200
dynamo_frontend_requests_total{model="qwen",endpoint="chat_completions",request_type="stream",status="success",error_type=""} 8
dynamo_frontend_requests_total{model="qwen",endpoint="chat_completions",request_type="unary",status="error",error_type="internal"} 2
dynamo_frontend_model_total_kv_blocks{model="qwen"} 1000
dynamo_frontend_model_kv_cache_block_size{model="qwen"} 16
"#;
    let m = one("dynamo", body, "");
    // The real-time output counter before the per-request histogram's sum.
    assert_eq!(m.tokens, [Some(700.0), Some(95.0), Some(200.0)]);
    assert_eq!(m.requests.get("success"), Some(&8.0));
    assert_eq!(m.requests.get("error"), Some(&2.0));
    assert_eq!(m.kv_capacity, Some(16000.0));
}

/// llama.cpp's `prompt_tokens_total` leaves cached tokens out: prompt is it plus
/// `prompt_tokens_cached_total`. The figures are those of a real `llama-server` 0.7.0 after three
/// completions of a 22-token prompt (0, 21 and 21 tokens cached).
#[test]
fn llamacpp_adds_the_cached_tokens_its_prompt_counter_leaves_out() {
    let body = r#"# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 24
# TYPE llamacpp:prompt_seconds_total counter
llamacpp:prompt_seconds_total 0.01
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 36
# TYPE llamacpp:prompt_tokens_cached_total counter
llamacpp:prompt_tokens_cached_total 42
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 0
"#;
    let argv = [
        "/usr/bin/llama-server",
        "-m",
        "/models/tiny.gguf",
        "--metrics",
        "--port",
        "8089",
    ];
    let e = engines::recognise(&argv).unwrap();
    assert_eq!(e.name, "llamacpp");
    assert_eq!(e.port_from_cmdline(&argv), Some(8089));
    let m = one("llamacpp", body, &e.model_from_cmdline(&argv).unwrap());
    assert_eq!(m.tokens, [Some(66.0), Some(36.0), Some(42.0)]);
    assert_eq!(m.prefix_hits, Some(42.0));
    assert_eq!(
        readings("llamacpp", body, "tiny.gguf")
            .keys()
            .next()
            .unwrap()
            .as_ref(),
        "tiny.gguf"
    );
}

#[test]
fn negative_and_non_finite_values_are_not_readings() {
    let body = "vllm:prompt_tokens_total{model_name=\"m\"} -5\nvllm:generation_tokens_total{model_name=\"m\"} NaN\nvllm:kv_cache_usage_perc{model_name=\"m\"} 7\n";
    let m = one("vllm", body, "");
    assert_eq!(m.tokens, [None, None, None]);
    // A fraction above one is clamped to a full cache.
    assert_eq!(m.kv_usage, Some(1.0));
}

#[test]
fn command_lines_are_recognised_per_engine() {
    let cases: &[(&[&str], Option<&str>)] = &[
        (&["vllm", "serve", "m"], Some("vllm")),
        (
            &["/usr/bin/python3", "/usr/local/bin/vllm", "serve", "m"],
            Some("vllm"),
        ),
        (
            &[
                "python3",
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                "m",
            ],
            Some("vllm"),
        ),
        (&["vllm", "bench"], None),
        (
            &[
                "python",
                "-m",
                "sglang.launch_server",
                "--model-path",
                "m",
                "--enable-metrics",
            ],
            Some("sglang"),
        ),
        (
            &["python", "-m", "sglang.launch_server", "--model-path", "m"],
            None,
        ),
        (&["sglang", "serve", "--enable-metrics"], Some("sglang")),
        (
            &[
                "/opt/tritonserver/bin/tritonserver",
                "--model-repository=/m",
            ],
            Some("triton"),
        ),
        (&["trtllm-serve", "m"], Some("trtllm-serve")),
        (&["text-generation-router", "--model-id", "m"], Some("tgi")),
        (&["text-generation-launcher", "--model-id", "m"], None),
        (
            &["llama-server", "-m", "x.gguf", "--metrics"],
            Some("llamacpp"),
        ),
        (&["llama-server", "-m", "x.gguf"], None),
        (
            &["python3", "-m", "dynamo.frontend", "--http-port", "8000"],
            Some("dynamo"),
        ),
        (&["bash", "-c", "vllm serve m"], None),
        (&["python3", "server.py"], None),
    ];
    for (argv, want) in cases {
        assert_eq!(engines::recognise(argv).map(|e| e.name), *want, "{argv:?}");
    }
    let argv = [
        "vllm",
        "serve",
        "m",
        "--port=9001",
        "--served-model-name",
        "chat",
    ];
    let vllm = by_name("vllm").unwrap();
    assert_eq!(vllm.port_from_cmdline(&argv), Some(9001));
    assert_eq!(vllm.model_from_cmdline(&argv).as_deref(), Some("chat"));
}

#[test]
fn listening_sockets_are_read_from_the_tcp_tables_by_inode() {
    let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n\
   1: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0 100 0 0 10 0\n\
   2: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 4243 1 0 100 0 0 10 0\n";
    let inodes: HashSet<u64> = [4242, 4243].into();
    assert_eq!(
        parse_listeners(v4, false, Some(&inodes)),
        vec!["127.0.0.1:8080".parse::<SocketAddr>().unwrap()]
    );
    let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000000000000000000001000000:1F40 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0 100 0 0 10 0\n\
   1: 00000000000000000000000000000000:0BB8 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 98 1 0 100 0 0 10 0\n";
    let inodes: HashSet<u64> = [99, 98].into();
    let got = parse_listeners(v6, true, Some(&inodes));
    assert_eq!(
        got,
        vec![
            "[::1]:8000".parse::<SocketAddr>().unwrap(),
            "[::]:3000".parse().unwrap()
        ]
    );
    // Without the process's own sockets: every listener of the namespace.
    assert_eq!(
        parse_listeners(v4, false, None),
        vec![
            "127.0.0.1:8080".parse::<SocketAddr>().unwrap(),
            "0.0.0.0:80".parse().unwrap()
        ]
    );
    assert_eq!(
        discover::connect_address(got[1]),
        "[::1]:3000".parse().unwrap()
    );
    let vllm = by_name("vllm").unwrap();
    let order = discover::in_preference(
        vllm,
        Some(9000),
        vec![
            "0.0.0.0:7000".parse().unwrap(),
            "0.0.0.0:8000".parse().unwrap(),
            "0.0.0.0:9000".parse().unwrap(),
        ],
    );
    let ports: Vec<u16> = order.iter().map(SocketAddr::port).collect();
    assert_eq!(ports, [9000, 8000, 7000]);
}

/// The test process's own start time and network namespace, from `/proc`.
#[test]
fn a_process_start_time_and_namespace_are_read_from_proc() {
    let proc = std::path::Path::new("/proc");
    let me = std::process::id();
    let start = discover::start_time(&proc.join(me.to_string())).unwrap();
    assert!(start > 0);
    assert_eq!(
        discover::netns_inode(proc, me).unwrap(),
        std::fs::metadata("/proc/self/ns/net")
            .map(|m| {
                use std::os::unix::fs::MetadataExt as _;
                m.ino()
            })
            .unwrap()
    );
}

/// A one-connection HTTP server on loopback that answers `reply` (after `delay`), for the
/// client's tests; returns its address.
fn serve_once(reply: Vec<u8>, delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = conn.read(&mut buf);
        std::thread::sleep(delay);
        let _ = conn.write_all(&reply);
    });
    addr
}

fn get(addr: SocketAddr, timeout_ms: u64, max_body: usize) -> Result<Vec<u8>, scrape::Error> {
    let request = scrape::Request {
        netns: None,
        addr,
        path: "/metrics".into(),
    };
    scrape::get(
        &request,
        scrape::Limits {
            timeout: Duration::from_millis(timeout_ms),
            max_body,
        },
    )
}

#[test]
fn the_client_reads_sized_chunked_and_closed_bodies() {
    let sized = serve_once(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhelloTRAILING"
            .to_vec(),
        Duration::ZERO,
    );
    assert_eq!(get(sized, 2000, 1024).unwrap(), b"hello");
    let chunked = serve_once(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4;x=y\r\ndefg\r\n0\r\n\r\n"
            .to_vec(),
        Duration::ZERO,
    );
    assert_eq!(get(chunked, 2000, 1024).unwrap(), b"abcdefg");
    let closed = serve_once(
        b"HTTP/1.0 200 OK\r\n\r\nuntil close".to_vec(),
        Duration::ZERO,
    );
    assert_eq!(get(closed, 2000, 1024).unwrap(), b"until close");
}

#[test]
fn the_client_refuses_errors_large_bodies_and_garbage() {
    let status = serve_once(
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
        Duration::ZERO,
    );
    assert!(matches!(
        get(status, 2000, 1024),
        Err(scrape::Error::Status(404))
    ));
    let large = serve_once(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n".to_vec(),
        Duration::ZERO,
    );
    assert!(matches!(
        get(large, 2000, 1024),
        Err(scrape::Error::TooLarge(1024))
    ));
    let mut endless = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
    endless.extend(std::iter::repeat_n(b'x', 200_000));
    let endless = serve_once(endless, Duration::ZERO);
    assert!(matches!(
        get(endless, 2000, 1024),
        Err(scrape::Error::TooLarge(1024))
    ));
    let garbage = serve_once(b"\x00\x01garbage\r\n\r\n".to_vec(), Duration::ZERO);
    let e = get(garbage, 2000, 1024).unwrap_err();
    assert_eq!(e.reason(), "malformed", "{e}");
}

#[test]
fn the_client_gives_up_at_its_deadline() {
    let silent = serve_once(Vec::new(), Duration::from_secs(5));
    let started = Instant::now();
    let e = get(silent, 300, 1024).unwrap_err();
    let took = started.elapsed();
    assert_eq!(e.reason(), "timeout", "{e}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    let refused = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    assert_eq!(get(refused, 300, 1024).unwrap_err().reason(), "connect");
}

/// A server found by its pod's annotation is told by its body: the engine with the most of its
/// names there; none for an exporter's.
#[test]
fn an_engine_is_told_by_the_names_in_its_body() {
    let names = |body: &str| {
        let samples = parse(body, |_| true).unwrap();
        engines::detect(&samples).map(|e| e.name)
    };
    assert_eq!(
        names("sglang:prompt_tokens_total{model_name=\"q\"} 1\nsglang:token_usage{model_name=\"q\"} 0.1\n"),
        Some("sglang")
    );
    assert_eq!(names("node_load1 0.5\nprocess_open_fds 12\n"), None);
    // A Dynamo frontend that also re-exports one vLLM series is Dynamo's.
    assert_eq!(
        names(
            "dynamo_frontend_input_sequence_tokens_sum{model=\"m\"} 5\ndynamo_frontend_output_tokens_total{model=\"m\"} 2\nvllm:prompt_tokens_total{model_name=\"m\"} 5\n"
        ),
        Some("dynamo")
    );
    assert_eq!(names(""), None);
}
