//! Inference metering end to end: servers that serve each engine's format run as real processes
//! in real cgroups (one bound to loopback inside a network namespace of its own), found by their
//! command lines and listening sockets; the agent's per-workload counters must equal what the
//! servers report, stay monotonic across a restart, keep two models apart, survive endpoints
//! that hang, flood or answer garbage without the tick noticing, and drive budgets.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a failed setup is a failed test"
)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tally_tests::agent::{free_port, sample, Agent};
use tally_tests::cgroup::{random_hex, random_uid, TestCgroup};
use tally_tests::fake_cri::{FakeCri, FakePod};
use tally_tests::fake_engine::{kill, llamacpp_body, vllm_body, write_body, Mode};
use tally_tests::require;

const FAKE_ENGINE: &str = env!("CARGO_BIN_EXE_fake-engine");

/// A systemd-unit cgroup in the unified hierarchy.
struct Unit {
    name: String,
    cgroup: TestCgroup,
}

fn unit(unified: &Path, tag: &str) -> Unit {
    let name = format!("tally-inference-{tag}-{}.service", random_hex(8));
    Unit {
        cgroup: TestCgroup::create(&[unified.to_owned()], &format!("/system.slice/{name}")),
        name,
    }
}

fn setup(test: &str) -> Option<PathBuf> {
    if !require::root(test) {
        return None;
    }
    require::binary(test, "unshare")?;
    require::binary(test, "ip")?;
    require::unified(test)
}

/// Starts a fake server in `u` (see [`tally_tests::fake_engine::start`]).
fn start_server(u: &mut Unit, argv: &[&str], body: &Path, mode: Mode, netns: bool) -> u32 {
    tally_tests::fake_engine::start(FAKE_ENGINE, &mut u.cgroup, argv, body, mode, netns)
}

fn config(extra: &str) -> String {
    format!(
        "[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = []\n[ebpf]\nenabled = false\n[gpu]\npod_resources_socket = \"\"\n[inference]\ninterval_secs = 1\ntimeout_ms = 500\n{extra}"
    )
}

/// The value of one series of a per-workload inference family, by unit and labels.
fn value(text: &str, family: &str, unit: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut needles = vec![format!("unit=\"{unit}\"")];
    needles.extend(labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")));
    let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
    sample(text, family, &needles)
}

fn tokens(text: &str, unit: &str, engine: &str, model: &str, kind: &str) -> Option<f64> {
    value(
        text,
        "tally_workload_tokens_total",
        unit,
        &[("engine", engine), ("model", model), ("kind", kind)],
    )
}

#[test]
fn servers_found_by_command_line_and_socket_are_charged_exactly_and_stay_monotonic() {
    const TEST: &str =
        "servers_found_by_command_line_and_socket_are_charged_exactly_and_stay_monotonic";
    let Some(unified) = setup(TEST) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut a = unit(&unified, "vllm");
    let mut b = unit(&unified, "llama");
    // Servers started after the agent: everything they counted is the workload's.
    let agent = Agent::start(&config(""));

    // A: vLLM's format, two models in one server, on a port of the node's namespace.
    let vllm = dir.path().join("vllm.prom");
    write_body(
        &vllm,
        &vllm_body(&[
            ("chat", 1000.0, 200.0, 300.0, 0.25),
            ("embed", 50.0, 0.0, 0.0, 0.5),
        ]),
    );
    let port = free_port().to_string();
    start_server(
        &mut a,
        &["vllm", "serve", "org/chat", "--port", &port],
        &vllm,
        Mode::Serve,
        false,
    );
    // B: llama.cpp's format, bound to loopback inside a network namespace of its own.
    let llama = dir.path().join("llama.prom");
    write_body(&llama, &llamacpp_body(24.0, 42.0, 36.0));
    let llama_argv = [
        "llama-server",
        "-m",
        "/models/tiny.gguf",
        "--metrics",
        "--host",
        "127.0.0.1",
        "--port",
        "8080",
    ];
    let first = start_server(&mut b, &llama_argv, &llama, Mode::Serve, true);
    let text = agent.scrape_until(Duration::from_secs(20), "both servers' tokens", |t| {
        tokens(t, &b.name, "llamacpp", "tiny.gguf", "prompt").is_some()
            && tokens(t, &a.name, "vllm", "embed", "prompt").is_some()
    });
    let expect = [
        (&a.name, "vllm", "chat", "prompt", 1000.0),
        (&a.name, "vllm", "chat", "generation", 200.0),
        (&a.name, "vllm", "chat", "cached", 300.0),
        (&a.name, "vllm", "embed", "prompt", 50.0),
        (&a.name, "vllm", "embed", "generation", 0.0),
        // llama.cpp's prompt counter leaves cached tokens out: 24 + 42.
        (&b.name, "llamacpp", "tiny.gguf", "prompt", 66.0),
        (&b.name, "llamacpp", "tiny.gguf", "cached", 42.0),
        (&b.name, "llamacpp", "tiny.gguf", "generation", 36.0),
    ];
    for (unit, engine, model, kind, want) in expect {
        assert_eq!(
            tokens(&text, unit, engine, model, kind),
            Some(want),
            "{unit} {engine} {model} {kind}:\n{text}"
        );
    }
    let kv = |t: &str, m: &str| {
        value(
            t,
            "tally_workload_kv_cache_usage_ratio",
            &a.name,
            &[("model", m)],
        )
    };
    assert_eq!(kv(&text, "chat"), Some(0.25));
    assert_eq!(kv(&text, "embed"), Some(0.5));
    assert_eq!(
        value(
            &text,
            "tally_workload_kv_cache_capacity_tokens",
            &a.name,
            &[("model", "chat")]
        ),
        Some(1600.0)
    );
    assert_eq!(
        value(
            &text,
            "tally_workload_inference_requests_total",
            &a.name,
            &[("model", "chat"), ("outcome", "success")]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            &text,
            "tally_workload_prefix_cache_hit_tokens_total",
            &b.name,
            &[]
        ),
        Some(42.0)
    );
    // Nothing is charged to the other workload.
    assert_eq!(tokens(&text, &b.name, "vllm", "chat", "prompt"), None);

    // The counters move; a restarted server counts from zero again (here on another port), and
    // the workload's counter goes on from where it was.
    write_body(&llama, &llamacpp_body(100.0, 50.0, 80.0));
    agent.scrape_until(Duration::from_secs(10), "the new counters", |t| {
        tokens(t, &b.name, "llamacpp", "tiny.gguf", "generation") == Some(80.0)
    });
    kill(first);
    write_body(&llama, &llamacpp_body(5.0, 0.0, 7.0));
    // Restarted on another port: followed there.
    let mut moved = llama_argv;
    moved[7] = "8081";
    let second = start_server(&mut b, &moved, &llama, Mode::Serve, true);
    assert_ne!(first, second);
    let text = agent.scrape_until(Duration::from_secs(10), "the restarted server's", |t| {
        tokens(t, &b.name, "llamacpp", "tiny.gguf", "generation") == Some(87.0)
    });
    assert_eq!(
        tokens(&text, &b.name, "llamacpp", "tiny.gguf", "prompt"),
        Some(155.0)
    );
    assert_eq!(
        tokens(&text, &b.name, "llamacpp", "tiny.gguf", "cached"),
        Some(50.0)
    );

    // A server that goes away takes its gauges with it; its counters stay.
    kill(first_pid_of(&a));
    let text = agent.scrape_until(Duration::from_secs(10), "the gauges gone", |t| {
        kv(t, "chat").is_none()
    });
    assert_eq!(
        tokens(&text, &a.name, "vllm", "chat", "prompt"),
        Some(1000.0)
    );
}

/// The pid of the (only) process in a unit's cgroup.
fn first_pid_of(u: &Unit) -> u32 {
    std::fs::read_to_string(u.cgroup.dirs[0].join("cgroup.procs"))
        .unwrap()
        .lines()
        .next()
        .and_then(|l| l.parse().ok())
        .expect("a process in the cgroup")
}

#[test]
fn endpoints_that_hang_flood_or_answer_garbage_are_counted_and_never_slow_the_tick() {
    const TEST: &str =
        "endpoints_that_hang_flood_or_answer_garbage_are_counted_and_never_slow_the_tick";
    let Some(unified) = setup(TEST) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut bad = unit(&unified, "bad");
    let mut good = unit(&unified, "good");
    let agent = Agent::start(&config(""));
    let body = dir.path().join("good.prom");
    write_body(&body, &vllm_body(&[("m", 10.0, 20.0, 0.0, 0.1)]));
    for mode in [Mode::Hang, Mode::Huge, Mode::Garbage] {
        let port = free_port().to_string();
        start_server(
            &mut bad,
            &["vllm", "serve", "m", "--port", &port],
            &body,
            mode,
            false,
        );
    }
    let port = free_port().to_string();
    start_server(
        &mut good,
        &["vllm", "serve", "m", "--port", &port],
        &body,
        Mode::Serve,
        false,
    );
    let errors = |t: &str, reason: &str| {
        sample(
            t,
            "tally_collector_errors_total",
            &["collector=\"inference\"", &format!("reason=\"{reason}\"")],
        )
        .unwrap_or(0.0)
    };
    let text = agent.scrape_until(Duration::from_secs(20), "each bad endpoint counted", |t| {
        errors(t, "timeout") >= 1.0 && errors(t, "too_large") >= 1.0 && errors(t, "parse") >= 1.0
    });
    assert_eq!(
        tokens(&text, &good.name, "vllm", "m", "generation"),
        Some(20.0)
    );
    // At least the three bad ones (servers of tests running beside this one count too).
    assert!(
        sample(
            &text,
            "tally_inference_servers",
            &["engine=\"vllm\"", "up=\"0\""]
        )
        .is_some_and(|n| n >= 3.0),
        "{text}"
    );
    // Nothing of the bad servers reached the ledger (the flood's partial lines included).
    assert_eq!(tokens(&text, &bad.name, "vllm", "flood", "prompt"), None);
    assert_eq!(tokens(&text, &bad.name, "vllm", "m", "prompt"), None);

    // Rounds wait up to 500 ms on the hanging server every second; the tick never does.
    let mut slowest: f64 = 0.0;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let t = agent.scrape();
        let collect = sample(
            &t,
            "tally_source_collect_duration_seconds",
            &["source=\"inference\""],
        )
        .unwrap();
        let tick = sample(&t, "tally_tick_duration_seconds", &[]).unwrap();
        slowest = slowest.max(collect).max(tick);
        std::thread::sleep(Duration::from_millis(40));
    }
    eprintln!("slowest tick or inference collect seen: {slowest:.4} s");
    assert!(slowest < 0.1, "{slowest}");
    let rounds = sample(
        &agent.scrape(),
        "tally_inference_round_seconds",
        &["phase=\"scrape\""],
    );
    assert!(
        rounds.is_some_and(|s| (0.45..1.5).contains(&s)),
        "a round waits out the hanging server's deadline: {rounds:?}"
    );
}

#[test]
fn a_token_budget_freezes_and_releases_and_a_kv_cache_level_budget_fires() {
    const TEST: &str = "a_token_budget_freezes_and_releases_and_a_kv_cache_level_budget_fires";
    let Some(unified) = setup(TEST) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut u = unit(&unified, "budget");
    let body = dir.path().join("b.prom");
    write_body(&body, &vllm_body(&[("m", 10.0, 20.0, 0.0, 0.5)]));
    let port = free_port().to_string();
    start_server(
        &mut u,
        &["vllm", "serve", "m", "--port", &port],
        &body,
        Mode::Serve,
        false,
    );
    let extra = format!(
        "[enforcement]\nstate_dir = \"{}\"\nfreeze_period_ms = 100\n\
         [[budget]]\nname = \"gen\"\nresource = \"tokens\"\nkind = \"generation\"\nlimit = 100\nwindow = \"3s\"\naction = \"freeze\"\nthrottle.share = 0.5\nselect.unit = \"{unit}\"\n\
         [[budget]]\nname = \"kv\"\nresource = \"kv_cache_ratio\"\nlimit = 0.8\naction = \"alert\"\nselect.unit = \"{unit}\"\n",
        state.path().display(),
        unit = u.name
    );
    let agent = Agent::start(&config(&extra));
    let active =
        |t: &str, b: &str| sample(t, "tally_enforcement_active", &[&format!("budget=\"{b}\"")]);
    // The server ran before the agent: it is counted from the agent's start, so its 20 tokens
    // are history, in neither the counter nor the window.
    let text = agent.scrape_until(Duration::from_secs(20), "both budgets evaluated", |t| {
        tokens(t, &u.name, "vllm", "m", "generation") == Some(0.0)
            && active(t, "gen").is_some()
            && active(t, "kv").is_some()
    });
    assert_eq!(active(&text, "gen"), Some(0.0), "0 of 100 tokens");
    assert_eq!(active(&text, "kv"), Some(0.0), "0.5 of 0.8");

    // 150 generated tokens within the window: over the budget, frozen half of each cycle.
    write_body(&body, &vllm_body(&[("m", 10.0, 170.0, 0.0, 0.9)]));
    let text = agent.scrape_until(Duration::from_secs(10), "the token budget enforced", |t| {
        active(t, "gen") == Some(1.0)
    });
    assert_eq!(
        sample(&text, "tally_budget_usage", &["budget=\"gen\""]),
        Some(150.0)
    );
    assert_eq!(
        tokens(&text, &u.name, "vllm", "m", "generation"),
        Some(150.0)
    );
    let events = u.cgroup.dirs[0].join("cgroup.events");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&events)
        .unwrap()
        .contains("frozen 1")
    {
        assert!(
            Instant::now() < deadline,
            "never saw the server's cgroup frozen"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // The KV cache at 0.9 of a 0.8 budget: a level, compared as it is.
    let text = agent.scrape_until(Duration::from_secs(10), "the KV budget over", |t| {
        active(t, "kv") == Some(1.0)
    });
    assert_eq!(
        sample(&text, "tally_budget_usage", &["budget=\"kv\""]),
        Some(0.9)
    );

    // No more tokens: the window slides past them and the budget is released, the cgroup thawed.
    agent.scrape_until(Duration::from_secs(15), "the token budget released", |t| {
        active(t, "gen") == Some(0.0)
    });
    let deadline = Instant::now() + Duration::from_secs(2);
    while std::fs::read_to_string(&events)
        .unwrap()
        .contains("frozen 1")
    {
        assert!(Instant::now() < deadline, "still frozen after the release");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Pods of namespace `ml` with one container each (`server`), in cgroups named as containerd
/// names them, with these names and annotations.
fn pods(unified: &Path, specs: &[(&str, &[(&str, &str)])]) -> (Vec<TestCgroup>, Vec<FakePod>) {
    let mut cgroups = Vec::new();
    let mut pods = Vec::new();
    for (name, annotations) in specs {
        let (uid, id) = (random_uid(), random_hex(64));
        let rel = format!(
            "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{id}.scope",
            uid.replace('-', "_")
        );
        cgroups.push(TestCgroup::create(&[unified.to_owned()], &rel));
        pods.push(FakePod {
            uid,
            namespace: "ml".into(),
            name: (*name).into(),
            sandbox_id: random_hex(64),
            containers: vec![(id, "server".into())],
            devices: Vec::new(),
            labels: Vec::new(),
            annotations: annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        });
    }
    (cgroups, pods)
}

/// A pod annotated `tally.io/inference: "off"` is never scraped, not even once; its neighbour
/// is.
#[test]
fn a_pod_annotated_off_is_never_scraped() {
    const TEST: &str = "a_pod_annotated_off_is_never_scraped";
    let Some(unified) = setup(TEST) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sockets = tempfile::tempdir().unwrap();
    let socket = sockets.path().join("containerd.sock");
    let (mut cgroups, pods) = pods(
        &unified,
        &[("off-0", &[("tally.io/inference", "off")]), ("on-0", &[])],
    );
    let _cri = FakeCri::start(&socket, pods).unwrap();
    let agent = Agent::start(&config("").replace(
        "endpoints = []",
        &format!("endpoints = [\"{}\"]", socket.display()),
    ));
    // Both containers named (the annotation is the pod's) before their servers start.
    agent.scrape_until(Duration::from_secs(10), "both pods named", |t| {
        ["off-0", "on-0"]
            .iter()
            .all(|p| sample(t, "tally_workload_info", &[&format!("pod=\"{p}\"")]).is_some())
    });
    let mut bodies = Vec::new();
    for (i, cg) in cgroups.iter_mut().enumerate() {
        let body = dir.path().join(format!("{i}.prom"));
        write_body(&body, &vllm_body(&[("m", 10.0, 20.0, 0.0, 0.5)]));
        let port = free_port().to_string();
        tally_tests::fake_engine::start(
            FAKE_ENGINE,
            cg,
            &["vllm", "serve", "m", "--port", &port],
            &body,
            Mode::Serve,
            false,
        );
        bodies.push(body);
    }
    let pod_tokens = |t: &str, pod: &str| {
        sample(
            t,
            "tally_workload_tokens_total",
            &[&format!("pod=\"{pod}\""), "kind=\"generation\""],
        )
    };
    let text = agent.scrape_until(Duration::from_secs(10), "the open pod's tokens", |t| {
        pod_tokens(t, "on-0") == Some(20.0)
    });
    // Two more rounds: the annotated pod's server stays untouched.
    std::thread::sleep(Duration::from_millis(2200));
    let text2 = agent.scrape();
    assert_eq!(pod_tokens(&text, "off-0"), None);
    assert_eq!(pod_tokens(&text2, "off-0"), None);
    let pid = agent.child.id();
    assert_eq!(tally_tests::fake_engine::hits(&bodies[0], pid), 0);
    assert!(tally_tests::fake_engine::hits(&bodies[1], pid) >= 2);
}

/// A pod whose `prometheus.io/port` annotation points at its server is scraped there whatever
/// its command line, inside its own network namespace, and the engine is told by the body; an
/// annotated pod that serves no engine's metrics (an exporter) is read once and left alone.
#[test]
fn an_annotated_pod_is_scraped_at_its_port_and_its_engine_told_by_its_body() {
    const TEST: &str = "an_annotated_pod_is_scraped_at_its_port_and_its_engine_told_by_its_body";
    let Some(unified) = setup(TEST) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sockets = tempfile::tempdir().unwrap();
    let socket = sockets.path().join("containerd.sock");
    let (engine_port, exporter_port) = (free_port(), free_port());
    let (engine_port_s, exporter_port_s) = (engine_port.to_string(), exporter_port.to_string());
    let (mut cgroups, pods) = pods(
        &unified,
        &[
            (
                "sglang-0",
                &[
                    ("prometheus.io/scrape", "true"),
                    ("prometheus.io/port", &engine_port_s),
                    ("prometheus.io/path", "/custom/metrics"),
                ],
            ),
            ("exporter-0", &[("prometheus.io/port", &exporter_port_s)]),
        ],
    );
    let _cri = FakeCri::start(&socket, pods).unwrap();
    let agent = Agent::start(&config("").replace(
        "endpoints = []",
        &format!("endpoints = [\"{}\"]", socket.display()),
    ));
    agent.scrape_until(Duration::from_secs(10), "both pods named", |t| {
        ["sglang-0", "exporter-0"]
            .iter()
            .all(|p| sample(t, "tally_workload_info", &[&format!("pod=\"{p}\"")]).is_some())
    });
    // SGLang's format from a process no engine's command line matches, on loopback in a
    // network namespace of its own.
    let sglang = dir.path().join("sglang.prom");
    write_body(
        &sglang,
        "sglang:prompt_tokens_total{model_name=\"qwen\"} 900\n\
         sglang:generation_tokens_total{model_name=\"qwen\"} 120\n\
         sglang:cached_tokens_total{model_name=\"qwen\",cache_source=\"device\"} 300\n\
         sglang:token_usage{model_name=\"qwen\"} 0.25\n",
    );
    tally_tests::fake_engine::start(
        FAKE_ENGINE,
        &mut cgroups[0],
        &["model-server", "--port", &engine_port_s],
        &sglang,
        Mode::Serve,
        true,
    );
    let exporter = dir.path().join("exporter.prom");
    write_body(&exporter, "node_load1 0.5\nprocess_open_fds 12\n");
    tally_tests::fake_engine::start(
        FAKE_ENGINE,
        &mut cgroups[1],
        &["exporter", "--port", &exporter_port_s],
        &exporter,
        Mode::Serve,
        false,
    );
    let tokens = |t: &str, kind: &str| {
        sample(
            t,
            "tally_workload_tokens_total",
            &[
                "pod=\"sglang-0\"",
                "engine=\"sglang\"",
                "model=\"qwen\"",
                &format!("kind=\"{kind}\""),
            ],
        )
    };
    let text = agent.scrape_until(
        Duration::from_secs(10),
        "the annotated server's tokens",
        |t| tokens(t, "prompt").is_some(),
    );
    assert_eq!(tokens(&text, "prompt"), Some(900.0));
    assert_eq!(tokens(&text, "generation"), Some(120.0));
    assert_eq!(tokens(&text, "cached"), Some(300.0));
    assert_eq!(
        sample(
            &text,
            "tally_workload_kv_cache_usage_ratio",
            &["pod=\"sglang-0\""]
        ),
        Some(0.25)
    );
    // Two more rounds: the exporter was read once, found to be no engine, and left alone.
    std::thread::sleep(Duration::from_millis(2200));
    let pid = agent.child.id();
    assert_eq!(tally_tests::fake_engine::hits(&exporter, pid), 1);
    let asked = tally_tests::fake_engine::requests(&sglang, pid);
    assert!(asked.len() >= 3, "{asked:?}");
    assert!(
        asked.iter().all(|r| r == "GET /custom/metrics HTTP/1.1"),
        "the annotated path: {asked:?}"
    );
}

/// `[inference] enabled = false`: nothing is scraped and no inference family is served.
#[test]
fn inference_off_scrapes_nothing() {
    const TEST: &str = "inference_off_scrapes_nothing";
    let Some(unified) = setup(TEST) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut u = unit(&unified, "off");
    let agent = Agent::start(&config("enabled = false\n"));
    let body = dir.path().join("b.prom");
    write_body(&body, &vllm_body(&[("m", 10.0, 20.0, 0.0, 0.5)]));
    let port = free_port().to_string();
    start_server(
        &mut u,
        &["vllm", "serve", "m", "--port", &port],
        &body,
        Mode::Serve,
        false,
    );
    // Three rounds' worth of the interval it would have had.
    std::thread::sleep(Duration::from_millis(3200));
    let text = agent.scrape();
    assert!(
        sample(
            &text,
            "tally_workload_cpu_seconds_total",
            &[&format!("unit=\"{}\"", u.name)]
        )
        .is_some(),
        "the unit is metered: {text}"
    );
    for family in [
        "tally_workload_tokens_total",
        "tally_inference_servers",
        "tally_inference_interval_seconds",
    ] {
        assert!(
            !text.contains(family),
            "{family} with inference off:\n{text}"
        );
    }
    assert_eq!(tally_tests::fake_engine::hits(&body, agent.child.id()), 0);
}
