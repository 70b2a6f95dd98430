//! GPU sampling as real drivers answer (issue 14, items 10–14), end to end: the fake NVML plays
//! the real driver's shape by default (one utilization entry per process holding its mean since
//! `lastSeenTimeStamp`, a fixed count probe with zeroed entries, a short sample buffer, device
//! utilization over the last sample period only) and the per-period shape on request; the agent
//! must charge the same under both.

use std::time::{Duration, Instant};

use serde_json::json;
use tally_tests::agent::{sample, Agent};
use tally_tests::fake_nvml::{FakeNvml, FULL};
use tally_tests::gpu::{assert_conserved, seconds, setup, total, unit, GPU, HOST_ROW};

fn start(fake: &FakeNvml, tick_ms: u64) -> Agent {
    Agent::start(&format!(
        "[agent]\ntick_interval_ms = {tick_ms}\n[cri]\nendpoints = []\n[ebpf]\nenabled = false\n{}",
        fake.config()
    ))
}

fn ticks(text: &str) -> f64 {
    sample(text, "tally_ticks_total", &[]).unwrap_or(0.0)
}

/// Item 10: one process at 50 % for 3 s, 1 s ticks: about 1.5 s, whatever the sample shape.
fn half_busy_for_three_seconds(test: &str, shape: &str) {
    let Some(unified) = setup(test) else { return };
    let a = unit(&unified, "half");
    let fake = FakeNvml::new(
        FULL,
        &json!({
            "sample_shape": shape,
            "devices": [{
                "uuid": GPU,
                "processes": [{
                    "pid": a.pid, "used_memory_bytes": 1_000_000_000u64,
                    "sm_percent": [[0, 50], [3000, 0]]
                }]
            }]
        }),
    );
    let agent = start(&fake, 1000);
    // 3 s of work, then two more ticks for the last samples to arrive.
    let text = agent.scrape_until(Duration::from_secs(20), "6 ticks", |t| ticks(t) >= 6.0);
    let busy = total(&text, "tally_gpu_busy_seconds_total", &[]);
    let charged = seconds(&text, &a, "method=\"process_utilization\"");
    let unattributed = total(&text, "tally_gpu_unattributed_seconds_total", &[]);
    assert!(
        (busy - 1.5).abs() <= 0.15,
        "{shape}: the device was busy 1.5 s, not {busy}"
    );
    assert!(
        (charged - 1.5).abs() <= 0.15,
        "{shape}: 50 % for 3 s is 1.5 s, not {charged} (device busy {busy})"
    );
    assert!(
        unattributed < 0.1 * busy,
        "{shape}: {unattributed} s of {busy} s unattributed"
    );
    assert_conserved(&text, GPU, 0.1);
}

#[test]
fn one_process_at_half_for_three_seconds_is_charged_one_and_a_half_as_drivers_report() {
    half_busy_for_three_seconds(
        "one_process_at_half_for_three_seconds_is_charged_one_and_a_half_as_drivers_report",
        "driver",
    );
}

#[test]
fn one_process_at_half_for_three_seconds_is_charged_one_and_a_half_per_period() {
    half_busy_for_three_seconds(
        "one_process_at_half_for_three_seconds_is_charged_one_and_a_half_per_period",
        "per_period",
    );
}

/// Item 12: the device at 100 % for 200 ms, idle for 200 ms, over and over; 5 s ticks. One
/// utilization reading covers only the driver's last sample period, so it says 0 % or 100 %
/// for the whole tick (the 100 ms period here lines up with the steps, so it is never in
/// between); the samples over the tick say 50 %.
#[test]
fn device_busy_time_is_integrated_over_a_tick_longer_than_the_sample_period() {
    const TEST: &str = "device_busy_time_is_integrated_over_a_tick_longer_than_the_sample_period";
    let Some(unified) = setup(TEST) else { return };
    let a = unit(&unified, "square");
    let steps: Vec<(u64, u64)> = (0..200).map(|i| (i * 200, 100 * ((i + 1) % 2))).collect();
    let fake = FakeNvml::new(
        FULL,
        &json!({
            "sample_period_ms": 100,
            "devices": [{
                "uuid": GPU,
                "power_watts": 100,
                "utilization_gpu_percent": steps,
                "processes": [{ "pid": a.pid, "used_memory_bytes": 1_000_000_000u64 }]
            }]
        }),
    );
    let agent = start(&fake, 5000);
    // Each sampler round moves the device's energy counter (100 W: joules / 100 are its wall
    // seconds) and adds its window's busy time; a tick may take in two rounds at once. Every
    // step of the counter: busy time over wall time.
    let begun = Instant::now();
    let mut ratios: Vec<f64> = Vec::new();
    let mut last: Option<(f64, f64)> = None;
    while ratios.len() < 2 && begun.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
        let text = agent.scrape();
        let joules = total(&text, "tally_gpu_energy_joules_total", &[]);
        let busy = total(&text, "tally_gpu_busy_seconds_total", &[]);
        match last {
            Some((j, b)) if joules > j => {
                ratios.push((busy - b) / ((joules - j) / 100.0));
                last = Some((joules, busy));
            }
            None if joules > 0.0 => last = Some((joules, busy)),
            _ => {}
        }
    }
    assert_eq!(ratios.len(), 2, "two windows in 30 s: {ratios:?}");
    for r in &ratios {
        assert!(
            (0.45..=0.55).contains(r),
            "200 ms on, 200 ms off is 50 % busy, not {:.1} % (windows {ratios:?})",
            r * 100.0
        );
    }
    let text = agent.scrape();
    // The process reports no SM samples of its own: the busy time may all go unattributed.
    assert_conserved(&text, GPU, 1.0);
}

/// Item 11: a tick three times as long as the driver's buffer (1 s here: 6 samples at 1/6 s,
/// the equivalent of a 30 s tick against the real 72), junk entries as real drivers return
/// them (pid 0; a zombie pid at 250 %), and a device whose utilization cannot be read (so
/// nothing scales the process samples down). Attributed time stays within the device's busy
/// time, no workload is charged more than the wall time, and pid 0 is nobody's.
#[test]
fn a_tick_longer_than_the_buffer_and_junk_samples_never_charge_beyond_the_device() {
    const TEST: &str =
        "a_tick_longer_than_the_buffer_and_junk_samples_never_charge_beyond_the_device";
    let Some(unified) = setup(TEST) else { return };
    let (a, zombie) = (unit(&unified, "long"), unit(&unified, "zombie"));
    const OTHER: &str = "GPU-22222222-2222-3333-4444-555555555555";
    let fake = FakeNvml::new(
        FULL,
        &json!({
            "sample_buffer_periods": 6,
            "devices": [{
                "uuid": GPU,
                "processes": [
                    { "pid": a.pid, "used_memory_bytes": 1_000_000_000u64, "sm_percent": 60 },
                    { "pid": 0, "zombie": true, "sm_percent": 50 }
                ]
            }, {
                "uuid": OTHER,
                "processes": [
                    { "pid": zombie.pid, "zombie": true, "sm_percent": 250 }
                ]
            }],
            "errors": [
                { "call": "nvmlDeviceGetUtilizationRates", "device": 1, "code": "UNKNOWN" },
                { "call": "nvmlDeviceGetSamples", "device": 1, "code": "UNKNOWN" }
            ]
        }),
    );
    let started = Instant::now();
    let agent = start(&fake, 3000);
    let text = agent.scrape_until(Duration::from_secs(20), "two 3 s windows", |t| {
        ticks(t) >= 3.0 && seconds(t, &a, "") > 0.0 && seconds(t, &zombie, "") > 0.0
    });
    let wall = started.elapsed().as_secs_f64();
    assert_conserved(&text, GPU, 0.1);
    let busy = total(
        &text,
        "tally_gpu_busy_seconds_total",
        &[&format!("gpu=\"{GPU}\"")],
    );
    let charged_a = seconds(&text, &a, "");
    assert!(
        busy > 0.0 && (charged_a - busy).abs() <= 1e-6,
        "a gets the device's busy time, no more: {charged_a} of {busy}"
    );
    let charged_zombie = seconds(&text, &zombie, "");
    assert!(
        charged_zombie <= wall,
        "a 250 % junk sample charged {charged_zombie} s in {wall} s"
    );
    assert_eq!(
        total(&text, "tally_workload_gpu_seconds_total", &[HOST_ROW]),
        0.0,
        "pid 0 is nobody's: {text}"
    );
}

/// Item 14: an MPS client the driver lists in the compute list too ("M+C") holds its memory
/// once, and the device's busy time is split by that.
#[test]
fn an_mps_client_in_both_lists_counts_its_memory_once() {
    const TEST: &str = "an_mps_client_in_both_lists_counts_its_memory_once";
    let Some(unified) = setup(TEST) else { return };
    let (server, a, b) = (
        unit(&unified, "mc-server"),
        unit(&unified, "mc-a"),
        unit(&unified, "mc-b"),
    );
    let fake = FakeNvml::new(
        FULL,
        &json!({ "devices": [{ "uuid": GPU, "processes": [
            { "pid": server.pid, "mps": "server", "used_memory_bytes": 32_000_000u64 },
            { "pid": a.pid, "mps": "compute_client", "used_memory_bytes": 3_000_000_000u64, "sm_percent": 30 },
            { "pid": b.pid, "mps": "client", "used_memory_bytes": 1_000_000_000u64, "sm_percent": 30 }
        ]}]}),
    );
    let agent = start(&fake, 200);
    let method = "method=\"mps_memory\"";
    let text = agent.scrape_until(Duration::from_secs(15), "MPS time", |t| {
        seconds(t, &a, method) >= 0.5 && seconds(t, &b, method) > 0.0
    });
    let memory = |u: &tally_tests::gpu::Unit| {
        sample(
            &text,
            "tally_workload_gpu_memory_bytes",
            &[&format!("unit=\"{}\"", u.name)],
        )
    };
    assert_eq!(memory(&a), Some(3e9), "once, not once per list");
    assert_eq!(memory(&b), Some(1e9));
    let (sa, sb) = (seconds(&text, &a, method), seconds(&text, &b, method));
    assert!((sa / sb - 3.0).abs() < 0.01, "3:1 by memory: {sa} vs {sb}");
    assert_eq!(seconds(&text, &server, ""), 0.0);
    assert_conserved(&text, GPU, 0.1);
}

/// Item 13: an agent without the MIG monitor capability (the GPU's handle answers
/// `NO_PERMISSION` for its process list) still finds each instance's processes through the MIG
/// device handles and charges each holder its instance.
#[test]
fn without_the_mig_monitor_capability_instances_are_still_charged_to_their_holders() {
    const TEST: &str =
        "without_the_mig_monitor_capability_instances_are_still_charged_to_their_holders";
    let Some(unified) = setup(TEST) else { return };
    let (a, b) = (unit(&unified, "nomon1"), unit(&unified, "nomon2"));
    let mig = |n: &str| format!("MIG-{n}{n}{n}{n}{n}{n}{n}{n}-0000-0000-0000-000000000000");
    let fake = FakeNvml::new(
        FULL,
        &json!({ "devices": [{
            "uuid": GPU,
            "mig_parent_processes": "no_permission",
            "mig": { "instances": [
                { "uuid": mig("c"), "gpu_instance_id": 1, "compute_instance_id": 0, "memory_total_bytes": 40_000_000_000u64 },
                { "uuid": mig("d"), "gpu_instance_id": 2, "compute_instance_id": 0, "memory_total_bytes": 20_000_000_000u64 }
            ]},
            "processes": [
                { "pid": a.pid, "used_memory_bytes": 5_000_000_000u64, "gpu_instance_id": 1, "compute_instance_id": 0 },
                { "pid": b.pid, "used_memory_bytes": 3_000_000_000u64, "gpu_instance_id": 2, "compute_instance_id": 0 }
            ]
        }]}),
    );
    let started = Instant::now();
    let agent = start(&fake, 200);
    let method = "method=\"mig_allocation\"";
    let text = agent.scrape_until(Duration::from_secs(15), "MIG time", |t| {
        seconds(t, &a, method) >= 0.5 && seconds(t, &b, method) >= 0.5
    });
    for (u, instance, bytes) in [(&a, mig("c"), 5e9), (&b, mig("d"), 3e9)] {
        let unit = format!("unit=\"{}\"", u.name);
        let gpu = format!("gpu=\"{instance}\"");
        assert_eq!(
            sample(&text, "tally_workload_gpu_memory_bytes", &[&unit, &gpu]),
            Some(bytes),
            "{text}"
        );
        // Held for as long as the agent ran, at most.
        let held = seconds(&text, u, &gpu);
        assert!(
            (0.5..=started.elapsed().as_secs_f64()).contains(&held),
            "{held} s on {instance}: {text}"
        );
    }
    assert_eq!(
        total(&text, "tally_gpu_nvml_errors_total", &[]),
        0.0,
        "NO_PERMISSION is how NVML answers, not a failure: {text}"
    );
}

/// Item 13: `tally check` says which way each MIG GPU's processes are listed.
#[test]
fn tally_check_says_how_mig_processes_are_listed() {
    for (parent, says) in [
        ("aggregated", "MIG processes listed by the GPU handle"),
        ("no_permission", "MIG processes listed per MIG device"),
    ] {
        let fake = FakeNvml::new(
            FULL,
            &json!({ "devices": [{
                "uuid": GPU,
                "mig_parent_processes": parent,
                "mig": { "instances": [
                    { "uuid": "MIG-eeeeeeee-0000-0000-0000-000000000000", "gpu_instance_id": 1,
                      "compute_instance_id": 0, "memory_total_bytes": 40_000_000_000u64 }
                ]},
                "processes": [
                    { "pid": 4242, "used_memory_bytes": 1_000_000u64, "gpu_instance_id": 1, "compute_instance_id": 0 }
                ]
            }]}),
        );
        let config = fake.dir.path().join("tally.toml");
        std::fs::write(&config, format!("[cri]\nendpoints = []\n{}", fake.config()))
            .expect("write config");
        let out = std::process::Command::new(tally_tests::agent::tally_bin())
            .args(["check", "--json", "--config"])
            .arg(&config)
            .output()
            .expect("tally check");
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("tally check --json");
        let items = json["items"].as_array().cloned().unwrap_or_default();
        let nvml = items
            .iter()
            .find(|i| i["name"] == "nvml")
            .unwrap_or_else(|| panic!("no nvml item: {json}"));
        assert_eq!(
            nvml["detail"].as_str().unwrap_or_default(),
            format!("1 GPU(s), driver 550.54.15; {GPU}: {says}")
                + if parent == "aggregated" {
                    ""
                } else {
                    " (the GPU handle lists none: no MIG monitor capability, \
                     NVIDIA_MIG_MONITOR_DEVICES=all grants it)"
                },
            "{parent}"
        );
    }
}
