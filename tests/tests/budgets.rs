//! Budgets enforced on real cgroups by the real agent: CPU bandwidth, duty-cycle freezing (and
//! its guard thawing after SIGKILL), egress rate through the BPF token bucket, windows kept
//! across a restart, throttles released on stop, by `tally release` and at start-up, and bad
//! policy refused whole.
//!
//! These tests measure shares of a CPU; `.config/nextest.toml` runs them alone.
#![expect(
    clippy::expect_used,
    reason = "test helpers: a cgroup file that cannot be read is a failed test"
)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tally_tests::agent::{sample, tally_bin, Agent};
use tally_tests::cgroup::{random_hex, TestCgroup};
use tally_tests::receiver::Receiver;
use tally_tests::require;

/// A cgroup named like a systemd service in the unified hierarchy and the v1 `cpu`, `cpuacct`
/// and `freezer` ones, so the agent sees a unit it can throttle and the test can measure it.
struct Unit {
    name: String,
    cgroup: TestCgroup,
}

fn hierarchies(test: &str) -> Option<Vec<PathBuf>> {
    if !require::root(test) {
        return None;
    }
    let unified = require::unified(test)?;
    let cpuacct = require::v1(test, "cpuacct")?;
    let cpu = require::v1(test, "cpu")?;
    Some(vec![unified, cpu, cpuacct])
}

fn unit(roots: &[PathBuf], tag: &str) -> Unit {
    let name = format!("tally-budget-{tag}-{}.service", random_hex(8));
    let rel = format!("/system.slice/{name}");
    Unit {
        cgroup: TestCgroup::create(roots, &rel),
        name,
    }
}

/// CPU seconds the unit's cgroup used, from cpuacct.
fn cpu_seconds(u: &Unit) -> f64 {
    let dir = u
        .cgroup
        .dirs
        .iter()
        .find(|d| d.starts_with("/sys/fs/cgroup/cpuacct"))
        .expect("cpuacct dir");
    let ns: f64 = std::fs::read_to_string(dir.join("cpuacct.usage"))
        .expect("cpuacct.usage")
        .trim()
        .parse()
        .expect("number");
    ns / 1e9
}

/// The unit's CPU share (cores) over `secs`.
fn share_over(units: &[&Unit], secs: f64) -> Vec<f64> {
    let before: Vec<f64> = units.iter().map(|u| cpu_seconds(u)).collect();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let elapsed = t0.elapsed().as_secs_f64();
    units
        .iter()
        .zip(before)
        .map(|(u, b)| (cpu_seconds(u) - b) / elapsed)
        .collect()
}

fn quota(u: &Unit) -> String {
    let dir = u
        .cgroup
        .dirs
        .iter()
        .find(|d| d.starts_with("/sys/fs/cgroup/cpu/"))
        .expect("cpu dir");
    std::fs::read_to_string(dir.join("cpu.cfs_quota_us"))
        .expect("quota")
        .trim()
        .to_owned()
}

fn unified_dir(u: &Unit) -> &Path {
    &u.cgroup.dirs[0]
}

fn frozen(u: &Unit) -> bool {
    std::fs::read_to_string(unified_dir(u).join("cgroup.events"))
        .expect("cgroup.events")
        .lines()
        .any(|l| l == "frozen 1")
}

fn active(text: &str, budget: &str) -> bool {
    sample(
        text,
        "tally_enforcement_active",
        &[&format!("budget=\"{budget}\"")],
    ) == Some(1.0)
}

/// No CRI, no kubelet; `[enforcement]` last, so a caller may add keys to it.
fn state_config(dir: &Path) -> String {
    format!(
        "[cri]\nendpoints = []\n[gpu]\npod_resources_socket = \"\"\n[enforcement]\nstate_dir = \"{}\"\n",
        dir.display()
    )
}

fn cpu_budget(name: &str, unit: &str, cores: f64, action: &str) -> String {
    format!(
        "[[budget]]\nname = \"{name}\"\nresource = \"cpu_seconds\"\nlimit = {}\nwindow = \"4s\"\naction = \"{action}\"\nselect.unit = \"{unit}\"\n",
        cores * 4.0
    )
}

#[test]
fn cpu_budgets_of_30_and_70_percent_hold_at_once() {
    const TEST: &str = "cpu_budgets_of_30_and_70_percent_hold_at_once";
    let Some(roots) = hierarchies(TEST) else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let mut a = unit(&roots, "a");
    let mut b = unit(&roots, "b");
    let config = format!(
        "{}{}{}",
        state_config(state.path()),
        cpu_budget("thirty", &a.name, 0.3, "cpu"),
        cpu_budget("seventy", &b.name, 0.7, "cpu")
    );
    let mut agent = Agent::start(&config);
    a.cgroup.burn();
    b.cgroup.burn();
    agent.scrape_until(Duration::from_secs(20), "both budgets enforced", |t| {
        active(t, "thirty") && active(t, "seventy")
    });
    assert_eq!(quota(&a), "30000");
    assert_eq!(quota(&b), "70000");
    // `tally top` shows both, throttled.
    let top = std::process::Command::new(tally_bin())
        .args(["top", "--once", "--interval", "1", "--agent"])
        .arg(format!("127.0.0.1:{}", agent.port))
        .output()
        .unwrap();
    let view = String::from_utf8_lossy(&top.stdout);
    assert!(
        top.status.success(),
        "{view}{}",
        String::from_utf8_lossy(&top.stderr)
    );
    for u in [&a, &b] {
        let row = view
            .lines()
            .find(|l| l.starts_with(&u.name))
            .unwrap_or_else(|| panic!("{} not in:\n{view}", u.name));
        assert!(row.trim_end().ends_with("cpu"), "{row}");
    }

    let shares = share_over(&[&a, &b], 6.0);
    eprintln!("achieved shares: {shares:?} (targets 0.30, 0.70)");
    // Never above its quota; below it only by what the suite's own parallel load on two cores
    // took from the burner (a quota that was too tight fails the exact quota checks above).
    for (share, target) in shares.iter().zip([0.30, 0.70]) {
        assert!(
            (target - 0.08..=target + 0.03).contains(share),
            "{shares:?}"
        );
    }

    // A graceful stop releases both.
    agent.signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(6)).is_some());
    assert_eq!(quota(&a), "-1");
    assert_eq!(quota(&b), "-1");
}

#[test]
fn freeze_duty_cycle_holds_a_share_and_a_killed_agent_leaves_nothing_frozen() {
    const TEST: &str = "freeze_duty_cycle_holds_a_share_and_a_killed_agent_leaves_nothing_frozen";
    let Some(roots) = hierarchies(TEST) else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let mut u = unit(&roots, "freeze");
    let config = format!(
        "{}freeze_period_ms = 100\n{}",
        state_config(state.path()),
        cpu_budget("duty", &u.name, 0.3, "freeze")
    );
    let mut agent = Agent::start(&config);
    u.cgroup.burn();
    agent.scrape_until(Duration::from_secs(20), "freeze enforced", |t| {
        active(t, "duty")
    });
    // The share is steered from the measured rate; give it a few ticks to settle.
    std::thread::sleep(Duration::from_secs(4));
    let share = share_over(&[&u], 6.0)[0];
    eprintln!("achieved share under freeze: {share:.3} (target 0.30)");
    assert!((share - 0.30).abs() <= 0.05, "{share}");

    // Kill the agent while the cgroup is frozen: the guard thaws it within one cycle.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !frozen(&u) {
        assert!(Instant::now() < deadline, "never saw the cgroup frozen");
        std::thread::sleep(Duration::from_millis(2));
    }
    agent.signal(libc::SIGKILL);
    let killed = Instant::now();
    // Polled from the kill on: reaping the agent first could take longer than the cycle.
    while frozen(&u) {
        assert!(
            killed.elapsed() < Duration::from_millis(100),
            "still frozen {:?} after SIGKILL; log:\n{}",
            killed.elapsed(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    eprintln!("thawed {:?} after SIGKILL", killed.elapsed());
    agent.wait_exit(Duration::from_secs(5));
    let after = share_over(&[&u], 1.0)[0];
    assert!(after > 0.5, "the burner runs freely again: {after}");
}

#[test]
fn a_killed_agents_throttle_is_released_by_tally_release_and_at_start_up() {
    const TEST: &str = "a_killed_agents_throttle_is_released_by_tally_release_and_at_start_up";
    let Some(roots) = hierarchies(TEST) else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let mut u = unit(&roots, "release");
    let config = format!(
        "{}{}",
        state_config(state.path()),
        cpu_budget("capped", &u.name, 0.2, "cpu")
    );
    let mut agent = Agent::start(&config);
    u.cgroup.burn();
    agent.scrape_until(Duration::from_secs(20), "enforced", |t| active(t, "capped"));
    assert_eq!(quota(&u), "20000");
    let recorded = std::fs::read_to_string(state.path().join("state.json")).unwrap();
    assert!(recorded.contains("cpu.cfs_quota_us"), "{recorded}");
    agent.signal(libc::SIGKILL);
    agent.wait_exit(Duration::from_secs(5));
    assert_eq!(quota(&u), "20000", "SIGKILL cannot release");

    let out = std::process::Command::new(tally_bin())
        .args(["release", "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 throttle(s) released"), "{stdout}");
    assert_eq!(quota(&u), "-1");

    // Again, and this time a restarted agent whose policy no longer has the budget releases it.
    let mut agent = Agent::start(&config);
    agent.scrape_until(Duration::from_secs(20), "enforced again", |t| {
        active(t, "capped")
    });
    assert_eq!(quota(&u), "20000");
    agent.signal(libc::SIGKILL);
    agent.wait_exit(Duration::from_secs(5));
    let without = state_config(state.path());
    let _agent = Agent::start(&without);
    assert_eq!(quota(&u), "-1", "released at start-up");
}

#[test]
fn a_restart_keeps_the_windows_consumption() {
    const TEST: &str = "a_restart_keeps_the_windows_consumption";
    let Some(roots) = hierarchies(TEST) else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let mut u = unit(&roots, "window");
    let config = format!(
        "{}[[budget]]\nname = \"daily\"\nresource = \"cpu_seconds\"\nlimit = 100000.0\nperiod = \"day\"\nselect.unit = \"{}\"\n",
        state_config(state.path()),
        u.name
    );
    let mut agent = Agent::start(&config);
    u.cgroup.burn();
    let usage = |t: &str| sample(t, "tally_budget_usage", &["budget=\"daily\""]);
    let text = agent.scrape_until(Duration::from_secs(20), "two CPU seconds used", |t| {
        usage(t).is_some_and(|v| v >= 2.0)
    });
    let before = usage(&text).unwrap();
    agent.signal(libc::SIGTERM);
    agent.wait_exit(Duration::from_secs(6));
    // Still burning while the agent is down: that counts too.
    std::thread::sleep(Duration::from_secs(1));
    let down_from = cpu_seconds(&u);
    let agent = Agent::start(&config);
    let text = agent.scrape_until(Duration::from_secs(10), "usage after restart", |t| {
        usage(t).is_some()
    });
    let after = usage(&text).unwrap();
    assert!(
        after >= before + 0.5,
        "before {before}, after restart {after}: the window started over or lost the downtime"
    );
    let used = cpu_seconds(&u) - down_from;
    eprintln!("usage {before:.2} before the restart, {after:.2} after ({used:.2} s used since)");
}

#[test]
fn an_egress_budget_of_10_mb_per_s_holds_and_sighup_raising_it_releases() {
    const TEST: &str = "an_egress_budget_of_10_mb_per_s_holds_and_sighup_raising_it_releases";
    if !require::root(TEST) {
        return;
    }
    let Some(unified) = require::unified(TEST) else {
        return;
    };
    let Some(python) = require::binary(TEST, "python3") else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let name = format!("tally-budget-net-{}.service", random_hex(8));
    // The sender runs in a child of the unit's cgroup (as in a `Delegate=` unit, or crun's
    // `…/container`): metered as the unit's, and held by the limit on the unit's cgroup.
    let _unit = TestCgroup::create(
        std::slice::from_ref(&unified),
        &format!("/system.slice/{name}"),
    );
    let mut cgroup = TestCgroup::create(&[unified], &format!("/system.slice/{name}/child"));
    let budget = |limit: f64| {
        format!(
            "{}[[budget]]\nname = \"egress\"\nresource = \"network_egress_bytes\"\nlimit = {limit}\nwindow = \"5s\"\naction = \"network\"\nselect.unit = \"{name}\"\n",
            state_config(state.path())
        )
    };
    let agent = Agent::start(&budget(50e6));
    let receiver = Receiver::start();
    // The sender waits until it has been moved into the cgroup before it opens its socket.
    cgroup.spawn(&format!(
        "sleep 0.5; exec {} -c \"import socket,time\ns=socket.create_connection(('127.0.0.1',{}))\nb=b'x'*65536\nend=time.time()+60\nwhile time.time()<end: s.sendall(b)\"",
        python.display(),
        receiver.port
    ));
    agent.scrape_until(Duration::from_secs(20), "egress enforced", |t| {
        active(t, "egress")
    });
    // Let the burst allowance drain, then measure.
    std::thread::sleep(Duration::from_secs(2));
    let rate = receiver.rate_over(6.0);
    eprintln!("egress under a 10 MB/s budget: {:.3} MB/s", rate / 1e6);
    // Never above the limit (5 % for the measurement); below it by what TCP gives up backing
    // off from the bucket's drops: 3–4 % alone, 5–6 % measured late in a full suite run on this
    // 2-core VM (9.43 and 9.48 MB/s), so 10 %.
    assert!((0.90..=1.05).contains(&(rate / 10e6)), "{rate}");

    // Raise the budget far above what loopback carries and reload: released.
    std::fs::write(
        &agent.config,
        format!(
            "[agent]\nlisten = \"127.0.0.1:{}\"\n{}",
            agent.port,
            budget(5e12)
        ),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    agent.scrape_until(Duration::from_secs(10), "released after SIGHUP", |t| {
        sample(t, "tally_enforcement_active", &["budget=\"egress\""]) == Some(0.0)
    });
    std::thread::sleep(Duration::from_millis(500));
    let free = receiver.rate_over(2.0);
    eprintln!("egress after the release: {:.1} MB/s", free / 1e6);
    assert!(free > 30e6, "{free}");
}

#[test]
fn bad_policy_lists_every_error_and_the_running_policy_stays() {
    let state = tempfile::tempdir().unwrap();
    let policy = state.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[budget]]\nname = \"ok\"\nresource = \"cpu_seconds\"\nlimit = 1.0\nwindow = \"10s\"\n",
    )
    .unwrap();
    let config = format!(
        "{}policy_file = \"{}\"\n",
        state_config(state.path()),
        policy.display()
    );
    let agent = Agent::start(&config);
    agent.scrape_until(Duration::from_secs(10), "the first policy", |t| {
        sample(t, "tally_budget_limit", &["budget=\"ok\""]) == Some(1.0)
    });

    let bad = "\
[[budget]]
name = \"gpu-a\"
resource = \"cpu_seconds\"
limit = 10.0
window = \"10s\"
action = \"cpu\"
select.namespace = \"ml\"

[[budget]]
name = \"gpu-b\"
resource = \"cpu_seconds\"
limit = 20.0
window = \"10s\"
action = \"cpu\"
select.pod = \"train-*\"

[[budget]]
name = \"typo\"
resource = \"gpu_hours\"
limit = 1.0
window = \"1m\"

[[budget]]
name = \"negative\"
resource = \"network_egress_bytes\"
limit = -5.0
window = \"1s\"
";
    std::fs::write(&policy, bad).unwrap();
    let out = std::process::Command::new(tally_bin())
        .arg("validate")
        .arg(&agent.config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let file = policy.display().to_string();
    for expected in [
        format!("{file}:19: `budget.2.resource`: unknown variant `gpu_hours`"),
        format!("{file}:26: `budget.3.limit`: -5 must be a positive number"),
        format!("{file}:14: `budget.1.action`: budgets `gpu-a` and `gpu-b` both enforce `cpu`"),
    ] {
        assert!(
            stderr.contains(&expected),
            "missing `{expected}` in:\n{stderr}"
        );
    }
    assert!(stderr.contains("3 error(s)"), "{stderr}");

    agent.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_secs(2));
    let text = agent.scrape();
    assert_eq!(
        sample(&text, "tally_budget_limit", &["budget=\"ok\""]),
        Some(1.0),
        "the running policy stays"
    );
    assert!(agent.log().contains("reload refused"), "{}", agent.log());
}

#[test]
fn alertmanager_gets_the_firing_alert_then_the_resolved_one() {
    const TEST: &str = "alertmanager_gets_the_firing_alert_then_the_resolved_one";
    let Some(roots) = hierarchies(TEST) else {
        return;
    };
    let Some(binary) = require::binary(TEST, "prometheus-alertmanager") else {
        return;
    };
    let sink = tally_tests::alertmanager::WebhookSink::start();
    let am = tally_tests::alertmanager::Alertmanager::start(&binary, None);
    let state = tempfile::tempdir().unwrap();
    let mut u = unit(&roots, "alert");
    // Alert only: a budget of 0.2 cores over 2 s, which a busy loop exceeds in a tick or two.
    let config = format!(
        "[alerts]\nalertmanager_urls = [\"{}\"]\nwebhook_urls = [\"{}\"]\n{}{}",
        am.url(),
        sink.url("/hook"),
        state_config(state.path()),
        cpu_budget("noisy", &u.name, 0.2, "alert").replace("\"4s\"", "\"2s\"")
    );
    let agent = Agent::start(&config);
    u.cgroup.burn();
    let ours = |a: &serde_json::Value| {
        a["labels"]["alertname"] == "TallyBudgetExceeded" && a["labels"]["unit"] == u.name.as_str()
    };
    let firing = am.wait_alert(Duration::from_secs(20), "the firing alert", ours);
    assert_eq!(firing["labels"]["budget"], "noisy");
    assert_eq!(firing["labels"]["action"], "alert");
    assert_eq!(firing["labels"]["severity"], "critical");
    assert_eq!(firing["status"]["state"], "active");
    let fingerprint = firing["fingerprint"].clone();

    // The workload calms down: the budget releases and Alertmanager learns the alert resolved.
    u.cgroup.remove();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let resolved = am.metric(
            "alertmanager_alerts_received_total",
            &["status=\"resolved\"", "version=\"v2\""],
        );
        let listed = am.alerts().iter().any(|a| a["fingerprint"] == fingerprint);
        if resolved.is_some_and(|n| n >= 1.0) && !listed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not resolved; alerts {:#?}; agent log:\n{}",
            am.alerts(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = agent.scrape();
    assert_eq!(
        sample(
            &text,
            "tally_enforcement_actions_total",
            &["budget=\"noisy\"", "event=\"release\""]
        ),
        Some(1.0),
        "{text}"
    );
    // The webhook saw the exceeded alert fire, then resolve.
    let posts = sink.posts("/hook");
    let exceeded: Vec<&str> = posts
        .iter()
        .filter(|p| p["alerts"][0]["labels"]["alertname"] == "TallyBudgetExceeded")
        .filter_map(|p| p["status"].as_str())
        .collect();
    assert_eq!(exceeded, ["firing", "resolved"], "{posts:#?}");
}

#[test]
fn a_disk_budget_sets_per_device_throttle_rules_and_releases_them() {
    const TEST: &str = "a_disk_budget_sets_per_device_throttle_rules_and_releases_them";
    if !require::root(TEST) {
        return;
    }
    let (Some(unified), Some(blkio)) = (require::unified(TEST), require::v1(TEST, "blkio")) else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let name = format!("tally-budget-disk-{}.service", random_hex(8));
    let rel = format!("/system.slice/{name}");
    let mut cgroup = TestCgroup::create(&[unified, blkio.clone()], &rel);
    let rules = blkio
        .join(rel.trim_start_matches('/'))
        .join("blkio.throttle.write_bps_device");
    let config = format!(
        "{}[[budget]]\nname = \"disk\"\nresource = \"disk_write_bytes\"\nlimit = 4e6\nwindow = \"2s\"\naction = \"disk\"\nthrottle.disk_bytes_per_sec = 2e6\nselect.unit = \"{name}\"\n",
        state_config(state.path())
    );
    let mut agent = Agent::start(&config);
    // Direct writes (no page cache) to the disk under /var/tmp, counted by blkio as they go.
    let file = format!("/var/tmp/{name}.data");
    cgroup.spawn(&format!(
        "sleep 0.3; while :; do dd if=/dev/zero of={file} bs=1M count=64 oflag=direct status=none; done"
    ));
    agent.scrape_until(Duration::from_secs(20), "disk enforced", |t| {
        active(t, "disk")
    });
    let written = std::fs::read_to_string(&rules).unwrap();
    let device = std::fs::read_to_string("/sys/block/vda/dev")
        .ok()
        .map(|d| d.trim().to_owned());
    assert!(
        written.lines().any(|l| l.ends_with(" 2000000")),
        "no 2 MB/s rule in {}: {written}",
        rules.display()
    );
    if let Some(dev) = device {
        assert!(written.contains(&format!("{dev} 2000000")), "{written}");
    }
    // Held near the throttle (direct writes, 1 MiB each, never idle), as the kernel counts what
    // passed blk-throttle for this cgroup: at most the rate and a request's worth over it, and
    // not starved below half of it.
    let stats = rules.with_file_name("blkio.throttle.io_service_bytes");
    let written = || -> f64 {
        let text = std::fs::read_to_string(&stats).unwrap();
        // `MAJ:MIN Write BYTES`, per device.
        let writes = text.lines().filter_map(|l| {
            let mut fields = l.split_whitespace().skip(1);
            match (fields.next(), fields.next()) {
                (Some("Write"), Some(n)) => n.parse::<f64>().ok(),
                _ => None,
            }
        });
        writes.sum()
    };
    // What /metrics shows for the unit is the figure the budget charges: it moves with the
    // kernel's count, not with the kworker that dispatches the delayed writes.
    let shown = |t: &str| sample(t, "tally_workload_disk_write_bytes_total", &[&name]);
    std::thread::sleep(Duration::from_secs(1));
    let (b0, s0, t0) = (written(), shown(&agent.scrape()), Instant::now());
    std::thread::sleep(Duration::from_secs(4));
    let (b1, s1) = (written(), shown(&agent.scrape()));
    let rate = (b1 - b0) / t0.elapsed().as_secs_f64();
    let shown_rate = (s1.expect("the unit's disk series") - s0.expect("the unit's disk series"))
        / t0.elapsed().as_secs_f64();
    eprintln!(
        "direct writes under a 2 MB/s disk throttle: {:.2} MB/s (the agent shows {:.2} MB/s)",
        rate / 1e6,
        shown_rate / 1e6
    );
    assert!(
        (1e6..=2e6 + 1048576.0 / 4.0).contains(&rate),
        "{rate}; log:\n{}",
        agent.log()
    );
    // Up to a tick and a request apart.
    assert!(
        (shown_rate - rate).abs() <= 0.5e6,
        "shown {shown_rate} against the kernel's {rate}"
    );

    agent.signal(libc::SIGTERM);
    agent.wait_exit(Duration::from_secs(6));
    let after = std::fs::read_to_string(&rules).unwrap();
    assert!(!after.contains("2000000"), "rule left behind: {after}");
    cgroup.remove();
    let _ = std::fs::remove_file(file);
}

#[test]
fn a_unit_starting_under_a_spent_budget_is_held_from_its_first_tick_and_released_with_it() {
    const TEST: &str =
        "a_unit_starting_under_a_spent_budget_is_held_from_its_first_tick_and_released_with_it";
    let Some(roots) = hierarchies(TEST) else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let tag = random_hex(6);
    // One shared budget over both units: 1 core-second in any 6 s, alert only, and new
    // workloads held while it is spent.
    let config = format!(
        "[agent]\ntick_interval_ms = 200\n{}[[budget]]\nname = \"door\"\nresource = \"cpu_seconds\"\nlimit = 1.0\nwindow = \"6s\"\nshared = true\nadmission = \"deny\"\nselect.unit = \"tally-budget-adm{tag}-*\"\n",
        state_config(state.path())
    );
    // Ready once its first tick is done: a, made now, is new to it.
    let agent = Agent::start(&config);
    let mut a = unit(&roots, &format!("adm{tag}-a"));
    a.cgroup.burn();
    agent.scrape_until(Duration::from_secs(20), "the budget spent", |t| {
        active(t, "door")
    });
    // b starts burning while the budget is spent.
    let mut b = unit(&roots, &format!("adm{tag}-b"));
    b.cgroup.burn();
    let text = agent.scrape_until(Duration::from_secs(10), "b held", |t| {
        sample(
            t,
            "tally_admission_held",
            &[&format!("unit=\"{}\"", b.name)],
        ) == Some(1.0)
    });
    let decision = |text: &str, d: &str| {
        sample(
            text,
            "tally_admission_decisions_total",
            &["budget=\"door\"", &format!("decision=\"{d}\"")],
        )
    };
    // a started after the agent, under budget: admitted; b held.
    assert_eq!(decision(&text, "admit"), Some(1.0));
    assert_eq!(decision(&text, "hold"), Some(1.0));
    // `frozen 1` once every task has stopped, which the kernel reports a moment after the write.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !frozen(&b) {
        assert!(Instant::now() < deadline, "b held but not frozen");
        std::thread::sleep(Duration::from_millis(20));
    }
    // What b used: what it burned before the first tick that saw it froze it, at most one
    // tick (200 ms) and the time to apply (the burner is one thread: at most one core).
    let before = cpu_seconds(&b);
    std::thread::sleep(Duration::from_secs(2));
    let after = cpu_seconds(&b);
    eprintln!(
        "b used {before:.3} s before its hold, {:.4} s in 2 s held",
        after - before
    );
    assert!(before <= 0.35, "b ran {before} s before it was held");
    assert!(
        after - before < 0.01,
        "b ran {} s while held",
        after - before
    );

    // The budget frees up once a stops: b is released and runs.
    a.cgroup.remove();
    let text = agent.scrape_until(Duration::from_secs(15), "b released", |t| {
        !active(t, "door")
            && sample(
                t,
                "tally_admission_held",
                &[&format!("unit=\"{}\"", b.name)],
            )
            .is_none()
    });
    assert_eq!(decision(&text, "hold"), Some(1.0));
    let share = share_over(&[&b], 1.0)[0];
    assert!(share > 0.5, "b runs at {share} cores once released");
    assert!(!frozen(&b));
}
