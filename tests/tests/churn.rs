//! Workloads that live and die between two of the agent's walks, billed exactly: each gets its
//! own row with its CPU time (within 2 % of the kernel's own count for its cgroup) and its UDP
//! bytes (exact), a cgroup that lived 50 ms still shows, and a workload that both the tick and
//! its exit saw is billed once.
#![expect(
    clippy::unwrap_used,
    reason = "integration test: its helpers fail the test with the error"
)]

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tally_tests::agent::{sample, Agent};
use tally_tests::cgroup::{random_hex, TestCgroup};
use tally_tests::require;

/// Burns `argv[1]` ms of CPU, then sends `argv[4]` UDP datagrams of `argv[5]` bytes to
/// `argv[2]:argv[3]`.
const BURN_AND_SEND: &str = r#"
import socket, sys, time
ms, host, port, count, size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
end = time.process_time() + ms / 1000
while time.process_time() < end:
    pass
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(count):
    s.sendto(b"b" * size, (host, port))
"#;

fn setup(test: &str) -> Option<PathBuf> {
    if !require::root(test) {
        return None;
    }
    require::binary(test, "python3")?;
    require::unified(test)
}

/// The interpreter itself, not a version manager's shim: a shim (pyenv's is a bash script) runs
/// dozens of short processes in the workload first, orphans among them, whose last CPU is
/// counted only when init reaps them. The tests bill one process, as a sandbox runs one.
fn python3() -> String {
    let system = Path::new("/usr/bin/python3");
    if system.exists() {
        return system.display().to_string();
    }
    "python3".to_owned()
}

/// The kernel's own count of the CPU time a cgroup used, in seconds (`cpu.stat` `usage_usec`,
/// a core file of every cgroup v2 cgroup).
fn kernel_cpu(dir: &Path) -> f64 {
    let stat = std::fs::read_to_string(dir.join("cpu.stat")).unwrap();
    let usec: f64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    usec / 1e6
}

fn unit(name: &str) -> String {
    format!("unit=\"{name}\"")
}

fn cpu(text: &str, name: &str) -> Option<f64> {
    sample(text, "tally_workload_cpu_seconds_total", &[&unit(name)])
}

fn state(text: &str, name: &str) -> Option<String> {
    let needle = unit(name);
    text.lines()
        .filter(|l| l.starts_with("tally_workload_info{") && l.contains(&needle))
        .find_map(|l| {
            let at = l.find("state=\"")? + 7;
            Some(l[at..].split('"').next()?.to_owned())
        })
}

/// How far one row's CPU may be from the kernel's: 2 %, or two scheduler ticks at 250 Hz where
/// that is more. A task's runtime is charged at its exit and the rest (what it ran since the
/// scheduler last accounted it, up to about a tick) when it is freed; under the full suite's
/// load about one row in several hundred has that last part missing (its free not seen), and
/// is short by a few milliseconds (5.2 ms the most seen). The burst's total must still be within
/// 0.2 %.
fn row_bound(kernel: f64) -> f64 {
    (0.02 * kernel).max(0.008)
}

/// What one short workload did, as the kernel counted it.
struct Done {
    name: String,
    cpu: f64,
    bytes: f64,
    packets: f64,
}

#[test]
fn a_burst_of_200_sub_second_workloads_is_billed_row_by_row() {
    const TEST: &str = "a_burst_of_200_sub_second_workloads_is_billed_row_by_row";
    let Some(unified) = setup(TEST) else { return };
    let agent = Agent::start("[agent]\ntick_interval_ms = 1000\n[cri]\nendpoints = []\n");
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = udp.local_addr().unwrap().port().to_string();
    let tag = random_hex(6);
    const N: usize = 200;
    let next = AtomicUsize::new(0);
    let done = Mutex::new(Vec::with_capacity(N));
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= N {
                    return;
                }
                let name = format!("tally-churn-{tag}-{i}.service");
                let mut cg = TestCgroup::create(
                    std::slice::from_ref(&unified),
                    &format!("/system.slice/{name}"),
                );
                // 20 to 219 ms of CPU beyond the interpreter's start, then 1 to 5 datagrams.
                let (ms, count, size) = (20 + (i * 37) % 200, 1 + i % 5, 100 + i);
                let out = cg.run_placed(
                    &python3(),
                    &[
                        "-c",
                        BURN_AND_SEND,
                        &ms.to_string(),
                        "127.0.0.1",
                        &port,
                        &count.to_string(),
                        &size.to_string(),
                    ],
                );
                assert!(out.status.success(), "{out:?}");
                let cpu = kernel_cpu(&cg.dirs[0]);
                cg.remove();
                done.lock().unwrap().push(Done {
                    name,
                    cpu,
                    bytes: (count * (size + 28)) as f64,
                    packets: count as f64,
                });
            });
        }
    });
    let done = done.into_inner().unwrap();
    let lived = started.elapsed().as_secs_f64() / N as f64 * 3.0;
    eprintln!("{N} workloads, {lived:.3} s each on average");
    // Every row, once the tick after the last removal has run.
    let wrong = |t: &str| -> Vec<String> {
        let mut wrong = Vec::new();
        for d in &done {
            let billed = cpu(t, &d.name);
            let sent = |family: &str, extra: &[&str]| {
                let mut needles = vec![unit(&d.name)];
                needles.extend(extra.iter().map(|e| e.to_string()));
                let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
                sample(t, family, &needles)
            };
            let bytes = sent(
                "tally_workload_network_transmit_bytes_total",
                &["scope=\"node\""],
            );
            let packets = sent("tally_workload_network_transmit_packets_total", &[]);
            let state = state(t, &d.name);
            let cpu_ok = billed.is_some_and(|b| (b - d.cpu).abs() <= row_bound(d.cpu));
            if !cpu_ok
                || bytes != Some(d.bytes)
                || packets != Some(d.packets)
                || state.as_deref() != Some("exited")
            {
                wrong.push(format!(
                    "{}: cpu {billed:?} (kernel {}), bytes {bytes:?} (sent {}), packets {packets:?} (sent {}), state {state:?}",
                    d.name, d.cpu, d.bytes, d.packets
                ));
            }
        }
        wrong
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = agent.scrape();
        let wrong = wrong(&text);
        if wrong.is_empty() {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {N} rows wrong:\n{}\n{}",
            wrong.len(),
            wrong.join("\n"),
            text.lines()
                .filter(|l| l.contains("lost_total{") || l.contains("missed_total{"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let worst = done
        .iter()
        .map(|d| (cpu(&text, &d.name).unwrap() - d.cpu).abs() / d.cpu)
        .fold(0.0, f64::max);
    let billed: f64 = done.iter().map(|d| cpu(&text, &d.name).unwrap()).sum();
    let kernel: f64 = done.iter().map(|d| d.cpu).sum();
    eprintln!("burst total: billed {billed:.6} s, the kernel counted {kernel:.6} s");
    assert!(
        (billed - kernel).abs() <= 0.002 * kernel,
        "{billed} against {kernel}"
    );
    eprintln!(
        "CPU billed against the kernel's count: worst {:.3} %",
        worst * 100.0
    );
    for reason in ["event_lost", "path_unreadable"] {
        assert_eq!(
            sample(
                &text,
                "tally_workloads_missed_total",
                &[&format!("reason=\"{reason}\"")]
            ),
            Some(0.0),
            "{reason}"
        );
    }
}

#[test]
fn a_cgroup_made_and_removed_within_50_ms_still_has_its_row() {
    const TEST: &str = "a_cgroup_made_and_removed_within_50_ms_still_has_its_row";
    let Some(unified) = setup(TEST) else { return };
    let agent = Agent::start("[agent]\ntick_interval_ms = 1000\n[cri]\nendpoints = []\n");
    let name = format!("tally-blink-{}.service", random_hex(6));
    // Right after a tick, so the next is most of a second away.
    let ticks = |t: &str| sample(t, "tally_ticks_total", &[]).unwrap();
    let first = ticks(&agent.scrape());
    agent.scrape_until(Duration::from_secs(3), "a tick", |t| ticks(t) > first);
    let began = Instant::now();
    let mut cg = TestCgroup::create(
        std::slice::from_ref(&unified),
        &format!("/system.slice/{name}"),
    );
    assert!(cg.run_placed("true", &[]).status.success());
    let used = kernel_cpu(&cg.dirs[0]);
    cg.remove();
    let lived = began.elapsed();
    assert!(lived < Duration::from_millis(50), "lived {lived:?}");
    let text = agent.scrape_until(Duration::from_secs(3), "the row", |t| {
        cpu(t, &name).is_some()
    });
    let billed = cpu(&text, &name).unwrap();
    eprintln!("lived {lived:?}: billed {billed} s, the kernel counted {used} s");
    assert!(used > 0.0);
    assert!(
        (billed - used).abs() <= 0.02 * used,
        "{billed} against {used}"
    );
    assert_eq!(state(&text, &name).as_deref(), Some("exited"));
}

#[test]
fn a_workload_the_tick_and_its_exit_both_saw_is_billed_once() {
    const TEST: &str = "a_workload_the_tick_and_its_exit_both_saw_is_billed_once";
    let Some(unified) = setup(TEST) else { return };
    let agent = Agent::start("[agent]\ntick_interval_ms = 500\n[cri]\nendpoints = []\n");
    let name = format!("tally-both-{}.service", random_hex(6));
    let cg = TestCgroup::create(
        std::slice::from_ref(&unified),
        &format!("/system.slice/{name}"),
    );
    let dir = cg.dirs[0].clone();
    let seen_running = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            // The tick's own reading while it runs: live, and past a second of CPU.
            agent.scrape_until(Duration::from_secs(20), "a live reading", |t| {
                cpu(t, &name).is_some_and(|c| c > 1.0)
                    && state(t, &name).as_deref() == Some("running")
            })
        });
        let out = cg.run_placed(
            &python3(),
            &["-c", BURN_AND_SEND, "2500", "127.0.0.1", "9", "0", "1"],
        );
        assert!(out.status.success(), "{out:?}");
        watcher.join().unwrap()
    });
    assert!(cpu(&seen_running, &name).unwrap() < 2.5);
    let used = kernel_cpu(&dir);
    let mut cg = cg;
    cg.remove();
    agent.scrape_until(Duration::from_secs(5), "the final row", |t| {
        state(t, &name).as_deref() == Some("exited")
    });
    // Later ticks change nothing: what is billed is final.
    std::thread::sleep(Duration::from_millis(1500));
    let text = agent.scrape();
    // The last tick read up to half a second of CPU before the end; the exit count has it all,
    // and replaces the reading rather than adding to it.
    let billed = cpu(&text, &name).unwrap();
    eprintln!("billed {billed} s, the kernel counted {used} s");
    assert!(
        (billed - used).abs() <= 0.02 * used,
        "{billed} against {used}"
    );
}

#[test]
fn a_cgroup_made_while_walks_are_reused_is_listed_at_the_next_tick() {
    const TEST: &str = "a_cgroup_made_while_walks_are_reused_is_listed_at_the_next_tick";
    let Some(unified) = setup(TEST) else { return };
    let agent = Agent::start("[agent]\ntick_interval_ms = 500\n[cri]\nendpoints = []\n");
    let ticks = |t: &str| sample(t, "tally_ticks_total", &[]).unwrap();
    let walks = |t: &str, result: &str| {
        let needle = format!("result=\"{result}\"");
        sample(t, "tally_cgroup_walks_total", &[&needle]).unwrap()
    };
    let text = agent.scrape_until(Duration::from_secs(5), "two ticks", |t| ticks(t) >= 2.0);
    // Every tick either walked or reused the last walk, and the first walked.
    assert_eq!(
        walks(&text, "walked") + walks(&text, "reused"),
        ticks(&text)
    );
    assert!(walks(&text, "walked") >= 1.0);
    // Right after a tick, make a unit: the next tick lists it (the one after, at the latest,
    // when the next had begun its walk before the poll saw the last one end).
    let last = ticks(&agent.scrape());
    let text = agent.scrape_until(Duration::from_secs(3), "a tick", |t| ticks(t) > last);
    let made_after = ticks(&text);
    let name = format!("tally-walk-{}.service", random_hex(6));
    let _cg = TestCgroup::create(
        std::slice::from_ref(&unified),
        &format!("/system.slice/{name}"),
    );
    let text = agent.scrape_until(Duration::from_secs(5), "the new unit", |t| {
        state(t, &name).as_deref() == Some("running")
    });
    assert!(
        ticks(&text) <= made_after + 2.0,
        "listed at tick {} (made after tick {made_after})",
        ticks(&text)
    );
    assert_eq!(
        walks(&text, "walked") + walks(&text, "reused"),
        ticks(&text)
    );
}
