//! Benchmark: how long the agent takes to answer the runtime's `CreateContainer` over NRI, on a
//! node of `BENCH_WORKLOADS` (1,000) Kubernetes-shaped workloads, with `BENCH_BUDGETS` (50)
//! admission budgets: one `deny` budget that is spent and selects every container, the others
//! `throttle` budgets per namespace, one of which selects each call's pod and has room. Run by
//! `bench/admission.sh` (root, release build); prints the round trip as the runtime sees it
//! (write of the request to read of the answer), p50/p99/max over `BENCH_CALLS` (2,000) calls,
//! and the agent's own decision histogram.
#![expect(clippy::expect_used, reason = "a benchmark: a failed setup stops it")]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tally_tests::agent::{sample, Agent};
use tally_tests::cgroup::{random_hex, random_uid, remove_parents, TestCgroup};
use tally_tests::fake_nri::{Answer, FakeRuntime};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let workloads = env("BENCH_WORKLOADS", 1000);
    let budgets = env("BENCH_BUDGETS", 50).max(1);
    let calls = env("BENCH_CALLS", 2000);
    let unified = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.procs").is_file())
        .expect("a cgroup2 mount");
    let scope = format!("tally-bench-nri-{}", random_hex(6));
    let mut cgroups = Vec::with_capacity(workloads + 1);
    let mut rels = Vec::with_capacity(workloads + 1);
    for _ in 0..workloads {
        let uid = random_uid();
        let rel = format!(
            "/{scope}/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{}.scope",
            uid.replace('-', "_"),
            random_hex(64)
        );
        let mut c = TestCgroup::create(std::slice::from_ref(&unified), &rel);
        c.spawn("exec sleep 3600");
        cgroups.push(c);
        rels.push(rel);
    }
    // One burner spends the budget that selects everything.
    let mut burner = TestCgroup::create(
        std::slice::from_ref(&unified),
        &format!("/{scope}/system.slice/bench-burner.service"),
    );
    burner.burn();
    cgroups.push(burner);

    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = FakeRuntime::listen(dir.path());
    // The one that is spent: CPU of every workload, 0.01 core-seconds in 10 minutes.
    let mut policy = String::from(
        "[[budget]]\nname = 'all'\nresource = 'cpu_seconds'\nlimit = 0.01\nwindow = '600s'\nshared = true\nadmission = 'deny'\n",
    );
    for i in 1..budgets {
        policy.push_str(&format!(
            "[[budget]]\nname = 'tenant-{i}'\nresource = 'cpu_seconds'\nlimit = 1000.0\nwindow = '600s'\nper = 'namespace'\nadmission = 'throttle'\naction = 'cpu'\nthrottle = {{ cpu_cores = 1.0 }}\nselect.labels = {{ team = 't{i}' }}\n"
        ));
    }
    let config = format!(
        "[agent]\ntick_interval_ms = 1000\n[paths]\ncgroup_root = \"{}\"\n[cri]\nendpoints = []\n[gpu]\npod_resources_socket = \"\"\n\
         [enforcement]\nstate_dir = \"{}\"\n[admission]\nnri_socket = \"{}\"\n{policy}",
        unified.join(&scope).display(),
        dir.path().join("state").display(),
        runtime.socket.display(),
    );
    let agent = Agent::start(&config);
    let mut session = runtime.accept(Duration::from_secs(30));
    agent.scrape_until(
        Duration::from_secs(60),
        "every workload and the budget spent",
        |t| {
            sample(t, "tally_workloads", &["state=\"running\""])
                .is_some_and(|n| n >= workloads as f64)
                && sample(t, "tally_budget_usage_ratio", &["budget=\"all\""])
                    .is_some_and(|r| r >= 1.0)
        },
    );
    println!("workloads {workloads}, admission budgets {budgets}, CreateContainer calls {calls}");
    let mut rtt = Vec::with_capacity(calls);
    for i in 0..calls {
        let labels = [("team", "t7")];
        let t0 = Instant::now();
        let answer = session.create_container(&format!("ns-{}", i % 40), &format!("p{i}"), &labels);
        rtt.push(t0.elapsed());
        assert!(matches!(answer, Answer::Refused(7, _)), "{answer:?}");
    }
    rtt.sort();
    let at = |q: f64| {
        rtt[((rtt.len() as f64 * q).ceil() as usize)
            .saturating_sub(1)
            .min(rtt.len() - 1)]
    };
    // The agent's histogram, from the snapshot of the tick after the last call.
    let text = agent.scrape_until(Duration::from_secs(10), "every call counted", |t| {
        sample(t, "tally_admission_decision_seconds_count", &[]) == Some(calls as f64)
    });
    let sum = sample(&text, "tally_admission_decision_seconds_sum", &[]).unwrap_or(0.0);
    println!(
        "round trip at the runtime: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        at(0.50).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6,
        rtt.last().copied().unwrap_or_default().as_secs_f64() * 1e6
    );
    println!(
        "in the agent (decoded request to answer): mean {:.1} µs; cumulative buckets:",
        sum / calls.max(1) as f64 * 1e6
    );
    for line in text
        .lines()
        .filter(|l| l.starts_with("tally_admission_decision_seconds_bucket"))
    {
        println!("  {line}");
    }
    drop(agent);
    drop(cgroups);
    // The pod slices, their parents and the scope: nothing left for the next agent to walk.
    rels.push(format!("/{scope}/system.slice/bench-burner.service"));
    for rel in &rels {
        remove_parents(std::slice::from_ref(&unified), rel, 5);
    }
}
