//! The `.deb` and its systemd unit on a systemd node: installed and started ready, reloaded
//! (and a bad file refused), restarted by the watchdog when hung, no throttle left behind by a
//! stop that had to kill it, and nothing left after a purge.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tally_tests::agent::{http_get, sample};

use crate::{
    cpu_budget, on_the_node, payload, property, run_ok, shares_over, systemctl, wait_for, Burner,
};

const PORT: u16 = 9811;
const CONFIG: &str = "/etc/tally/tally.toml";
/// `WatchdogSec=`, `TimeoutStopSec=` (the abort's grace) and `RestartSec=` of tally.service.
const WATCHDOG: Duration = Duration::from_secs(30);
const ABORT_GRACE: Duration = Duration::from_secs(10);
const RESTART_DELAY: Duration = Duration::from_secs(5);

fn scrape() -> String {
    let r = http_get(PORT, "/metrics", &[]).expect("GET /metrics");
    assert_eq!(r.status, 200);
    String::from_utf8(r.body).expect("utf-8")
}

fn main_pid() -> u32 {
    property("tally", "MainPID").parse().expect("MainPID")
}

fn enforced(budget: &str) -> bool {
    http_get(PORT, "/metrics", &[])
        .ok()
        .and_then(|r| String::from_utf8(r.body).ok())
        .and_then(|t| {
            sample(
                &t,
                "tally_enforcement_active",
                &[&format!("budget=\"{budget}\"")],
            )
        })
        == Some(1.0)
}

/// The agent is up, ready, and has published at least one tick: what `Type=notify` promises
/// the moment `systemctl start` returns.
fn assert_ready_now() {
    let ready = http_get(PORT, "/readyz", &[]).expect("GET /readyz right after start");
    assert_eq!(
        ready.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&ready.body)
    );
    let ticks = sample(&scrape(), "tally_ticks_total", &[]).expect("tally_ticks_total");
    assert!(ticks >= 1.0, "{ticks} ticks when start returned");
}

#[test]
fn vm_the_package_starts_ready_reloads_recovers_and_purges_on_systemd() {
    const TEST: &str = "vm_the_package_starts_ready_reloads_recovers_and_purges_on_systemd";
    on_the_node(TEST);
    let deb = payload("deb");
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/config/tally.toml"),
    )
    .unwrap();

    // Installing enables and starts the unit; dpkg returns once it is ready.
    run_ok(Command::new("dpkg").arg("--install").arg(&deb));
    assert_eq!(property("tally", "ActiveState"), "active");
    assert_eq!(property("tally", "UnitFileState"), "enabled");
    assert_ready_now();

    // `systemctl start` returns only after READY=1, which follows the first tick.
    run_ok(Command::new("systemctl").args(["stop", "tally"]));
    assert!(
        http_get(PORT, "/readyz", &[]).is_err(),
        "still serving after stop"
    );
    run_ok(Command::new("systemctl").args(["start", "tally"]));
    assert_ready_now();
    let pid = main_pid();

    // Reload: a valid file is taken (a CPU budget now holds a burning unit at 30 % through
    // cpu.max), without a restart.
    let burner = Burner::start("tally-vm-burn.service");
    let with_budget = format!(
        "{shipped}\n{}",
        cpu_budget("vm-burn", &burner.unit, 0.3, "cpu")
    );
    std::fs::write(CONFIG, &with_budget).unwrap();
    run_ok(Command::new("systemctl").args(["reload", "tally"]));
    wait_for(
        Duration::from_secs(30),
        "the reloaded budget to act",
        || enforced("vm-burn").then_some(()),
    );
    assert_eq!(burner.cpu_max(), "30000 100000");
    let share = shares_over(&[&burner.cgroup()], 6.0)[0];
    eprintln!("share under cpu.max: {share:.3} (target 0.30)");
    assert!((share - 0.30).abs() <= 0.03, "{share}");
    assert_eq!(main_pid(), pid, "reload restarted the agent");

    // A bad file: the reload fails loudly, the agent keeps running on the previous one.
    std::fs::write(CONFIG, format!("{with_budget}\nthis is = = not toml\n")).unwrap();
    let refused = systemctl(&["reload", "tally"]);
    assert!(!refused.status.success(), "a bad file was reloaded");
    assert_eq!(property("tally", "ActiveState"), "active");
    assert_eq!(main_pid(), pid);
    assert!(enforced("vm-burn"));
    std::fs::write(CONFIG, &with_budget).unwrap();

    // A hung agent (SIGSTOP) stops petting the watchdog: systemd aborts it after WatchdogSec
    // (not before), and the unit's ExecStopPost (`tally release`) lifts the throttle the dead
    // agent could not; then it is restarted after RestartSec and enforces again.
    let restarts: u32 = property("tally", "NRestarts").parse().unwrap();
    let hung = Instant::now();
    run_ok(Command::new("kill").args(["-STOP", &pid.to_string()]));
    std::thread::sleep(WATCHDOG - Duration::from_secs(3));
    assert_eq!(main_pid(), pid, "restarted before WatchdogSec");
    assert_eq!(burner.cpu_max(), "30000 100000");
    wait_for(
        WATCHDOG + ABORT_GRACE,
        "ExecStopPost to release the hung agent's throttle",
        || (burner.cpu_max() == "max 100000").then_some(()),
    );
    eprintln!("throttle released {:?} after the hang", hung.elapsed());
    assert!(hung.elapsed() >= WATCHDOG, "{:?}", hung.elapsed());
    assert_ne!(main_pid(), pid);
    assert_eq!(property("tally", "Result"), "watchdog");
    // Starting under software emulation is slow: each CO-RE object's load parses the kernel's
    // BTF, and the lifecycle programs added one (68 s after the release seen before them, over
    // 95 s once after).
    let restarted = wait_for(
        RESTART_DELAY + Duration::from_secs(180),
        "the watchdog restart",
        || {
            let p = main_pid();
            (p != 0 && property("tally", "ActiveState") == "active").then_some(p)
        },
    );
    eprintln!("restarted {:?} after the hang", hung.elapsed());
    assert_ne!(restarted, pid);
    assert_eq!(
        property("tally", "NRestarts").parse::<u32>().unwrap(),
        restarts + 1
    );
    assert_ready_now();
    wait_for(
        Duration::from_secs(30),
        "the budget after the restart",
        || enforced("vm-burn").then_some(()),
    );
    assert_eq!(burner.cpu_max(), "30000 100000");

    // A graceful stop releases it too (the agent drains on SIGTERM).
    run_ok(Command::new("systemctl").args(["stop", "tally"]));
    assert_eq!(property("tally", "ActiveState"), "inactive");
    assert_eq!(burner.cpu_max(), "max 100000");

    // Purge: the package leaves no file behind, its state directory included.
    run_ok(Command::new("systemctl").args(["start", "tally"]));
    assert!(Path::new("/var/lib/tally").is_dir());
    run_ok(Command::new("dpkg").args(["--purge", "tally"]));
    for path in [
        "/usr/bin/tally",
        "/etc/tally",
        "/var/lib/tally",
        "/usr/lib/systemd/system/tally.service",
        "/etc/systemd/system/multi-user.target.wants/tally.service",
        "/usr/share/tally",
    ] {
        assert!(!Path::new(path).exists(), "{path} left after purge");
    }
    assert_eq!(property("tally", "LoadState"), "not-found");
    assert_eq!(burner.cpu_max(), "max 100000");
}
