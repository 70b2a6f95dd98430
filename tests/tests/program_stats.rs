//! `ebpf.program_stats`: when the agent holds the kernel's `bpf_stats` on. While it is on, the
//! kernel counts runs of every BPF program, so the tests read the agent's `net_egress` run count
//! straight from the kernel (bpftool) every 10 ms under steady loopback traffic: it grows exactly
//! while stats are on. `bpf_stats` is node-wide (and `kernel.bpf_stats_enabled` does not show a
//! hold taken through `BPF_ENABLE_STATS`), so these tests run alone (`.config/nextest.toml`).
#![expect(
    clippy::unwrap_used,
    reason = "integration test: its helpers fail the test with the error"
)]

use std::collections::HashSet;
use std::net::UdpSocket;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_tests::agent::{sample, Agent};
use tally_tests::require;

/// Run counts of every loaded program named `net_egress`, by program id.
fn net_egress_runs() -> Vec<(u64, u64)> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool: {out:?}");
    let progs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    progs
        .iter()
        .filter(|p| p["name"] == "net_egress")
        .map(|p| {
            (
                p["id"].as_u64().unwrap(),
                p["run_cnt"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// The run count of the one `net_egress` not in `before`: the agent's.
fn agent_runs(before: &HashSet<u64>) -> u64 {
    let new: Vec<_> = net_egress_runs()
        .into_iter()
        .filter(|(id, _)| !before.contains(id))
        .collect();
    assert_eq!(new.len(), 1, "expected the agent's one net_egress: {new:?}");
    new[0].1
}

/// Loopback UDP sent continuously until dropped, so `net_egress` runs whenever stats are on.
struct Traffic(Arc<AtomicBool>);

impl Traffic {
    fn start() -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = sink.local_addr().unwrap();
        std::thread::spawn(move || {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            while !flag.load(Ordering::Relaxed) {
                let _ = socket.send_to(&[0u8; 64], to);
                std::thread::sleep(Duration::from_micros(200));
            }
            drop(sink);
        });
        Traffic(stop)
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Reads the agent's run count every 10 ms for `span`; returns the share of those 10 ms steps in
/// which it grew, i.e. in which `bpf_stats` was on (the traffic sends a packet every 0.2 ms).
fn share_on(before: &HashSet<u64>, span: Duration) -> f64 {
    let deadline = Instant::now() + span;
    let mut last = agent_runs(before);
    let (mut grew, mut steps) = (0u32, 0u32);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        let now = agent_runs(before);
        grew += u32::from(now > last);
        steps += 1;
        last = now;
    }
    f64::from(grew) / f64::from(steps)
}

fn programs() -> HashSet<u64> {
    net_egress_runs().into_iter().map(|(id, _)| id).collect()
}

fn agent(mode: &str) -> Agent {
    Agent::start(&format!(
        "[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = []\n\
         [ebpf]\nprogram_stats = \"{mode}\"\nprogram_stats_every_secs = 2\n"
    ))
}

fn runs(text: &str) -> f64 {
    sample(
        text,
        "tally_ebpf_program_runs_total",
        &["program=\"net_egress\""],
    )
    .unwrap()
}

fn held(text: &str) -> f64 {
    sample(text, "tally_ebpf_program_stats_seconds_total", &[]).unwrap()
}

/// Whether `test` can run here (root, cgroup v2, bpftool); if so, starts the traffic it watches.
fn ready(test: &str) -> Option<Traffic> {
    let can = require::root(test)
        && require::unified(test).is_some()
        && require::binary(test, "bpftool").is_some();
    can.then(Traffic::start)
}

#[test]
fn sampled_mode_holds_bpf_stats_for_one_tick_in_each_period() {
    let Some(_traffic) = ready("sampled_mode_holds_bpf_stats_for_one_tick_in_each_period") else {
        return;
    };
    let before = programs();
    let started = Instant::now();
    let agent = agent("sampled");
    // One 200 ms tick in every 2 s: on a tenth of the time, give or take a tick.
    let share = share_on(&before, Duration::from_secs(7));
    assert!(
        (0.04..=0.25).contains(&share),
        "bpf_stats on {:.0}% of the time, expected about 10%",
        share * 100.0
    );
    let text = agent.scrape();
    let elapsed = started.elapsed().as_secs_f64();
    let held = held(&text);
    assert!(
        held > 0.3 && held < elapsed * 0.3,
        "held {held:.2} s of {elapsed:.1} s"
    );
    assert!(runs(&text) > 0.0, "{text}");
}

#[test]
fn always_holds_it_and_off_never_turns_it_on() {
    let Some(_traffic) = ready("always_holds_it_and_off_never_turns_it_on") else {
        return;
    };

    let before = programs();
    let started = Instant::now();
    let always = agent("always");
    assert!(share_on(&before, Duration::from_secs(2)) > 0.95);
    let text = always.scrape();
    assert!(held(&text) <= started.elapsed().as_secs_f64(), "{text}");
    assert!(held(&text) >= 2.0, "{text}");
    assert!(runs(&text) > 0.0, "{text}");
    drop(always);

    let before = programs();
    let off = agent("off");
    assert_eq!(share_on(&before, Duration::from_secs(2)), 0.0);
    let text = off.scrape();
    assert_eq!(held(&text), 0.0, "{text}");
    assert_eq!(runs(&text), 0.0, "{text}");
}
