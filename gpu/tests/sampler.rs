//! The sampler through the real `nvml-wrapper` loading path, against the fake NVML library
//! playing scenarios. Pids are real child processes; their GPU numbers come from the scenario.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::json;
use tally_gpu::{DeviceSample, Unavailable, UtilSample, XidEvent};

use common::{sleep_until_scenario_ms, wait_for, Children, FakeNvml};

const GIB: u64 = 1024 * 1024 * 1024;
/// The fake's default sample period.
const PERIOD_US: u64 = 100_000;

#[expect(clippy::panic, reason = "test helper")]
fn utilization(device: &DeviceSample) -> &[UtilSample] {
    match &device.process_utilization {
        Ok(samples) => samples,
        Err(e) => panic!("process utilization unavailable on {}: {e:?}", device.uuid),
    }
}

/// The ticks the fake generates in `(from_us, to_us]`, up to `last_tick_ms` when given, as
/// timestamps.
fn ticks(epoch_us: u64, from_us: u64, to_us: u64, last_tick_ms: Option<u64>) -> Vec<u64> {
    let first = from_us.saturating_sub(epoch_us) / PERIOD_US + 1;
    let mut last = to_us.saturating_sub(epoch_us) / PERIOD_US;
    if let Some(ms) = last_tick_ms {
        last = last.min(ms * 1000 / PERIOD_US);
    }
    (first..=last).map(|k| epoch_us + k * PERIOD_US).collect()
}

#[test]
fn an_exclusive_gpu_reports_every_device_reading_and_its_one_process() {
    let children = Children::spawn(1);
    let pid = children.pid(0);
    let fake = FakeNvml::new(&json!({
        "driver_version": "550.54.15",
        "sample_shape": "per_period",
        "devices": [{
            "uuid": "GPU-11111111-2222-3333-4444-555555555555",
            "name": "NVIDIA H100 80GB HBM3",
            "memory_total_bytes": 80 * GIB,
            "memory_reserved_bytes": GIB / 2,
            "power_watts": 300.0,
            "energy_start_joules": 1000.0,
            "temperature_celsius": 65,
            "sm_clock_mhz": 1755,
            "memory_clock_mhz": 2619,
            "clock_event_reasons": 4,
            "pcie_tx_bytes_per_second": 1.0e9,
            "pcie_rx_bytes_per_second": 2.0e9,
            "nvlink_links": 18,
            "nvlink_tx_bytes_per_second": 1.0e10,
            "nvlink_rx_bytes_per_second": 5.0e9,
            "ecc_corrected": 3,
            "ecc_uncorrected": 1,
            "remapped_rows_correctable": 2,
            "remapped_rows_uncorrectable": 1,
            "processes": [{
                "pid": pid, "used_memory_bytes": 2 * GIB,
                "sm_percent": 80, "memory_percent": 30
            }]
        }, {
            // An older driver without the PCIe byte counters, and no NVLink.
            "uuid": "GPU-22222222-2222-3333-4444-555555555555",
            "pcie_counters": false,
            "pcie_tx_bytes_per_second": 1024000,
            "pcie_rx_bytes_per_second": 2048000
        }]
    }));
    let mut sampler = fake.start();
    assert_eq!(sampler.driver_version(), Some("550.54.15"));
    sleep_until_scenario_ms(&fake, 450);

    let before_first = Instant::now();
    let first = sampler.sample();
    let after_first = Instant::now();
    assert_eq!(first.errors, vec![], "no call fails");
    assert_eq!(first.devices.len(), 2);
    let d = &first.devices[0];
    assert_eq!(d.index, 0);
    assert_eq!(d.uuid, "GPU-11111111-2222-3333-4444-555555555555");
    assert_eq!(d.name, "NVIDIA H100 80GB HBM3");
    assert!(!d.lost);
    assert_eq!(d.utilization_gpu_percent, Some(80));
    assert_eq!(d.utilization_memory_percent, Some(30));
    assert_eq!(d.memory_total_bytes, Some(80 * GIB));
    assert_eq!(d.memory_used_bytes, Some(2 * GIB + GIB / 2));
    assert_eq!(d.power_watts, Some(300.0));
    assert_eq!(d.temperature_celsius, Some(65));
    assert_eq!(d.sm_clock_mhz, Some(1755));
    assert_eq!(d.memory_clock_mhz, Some(2619));
    assert_eq!(d.throttle_reasons, Some(4));
    assert_eq!(d.ecc_corrected_total, Some(3));
    assert_eq!(d.ecc_uncorrected_total, Some(1));
    assert_eq!(d.retired_pages, Some(0));
    assert_eq!(d.remapped_rows, Some(3));
    assert!(d.pcie_tx_bytes_total.is_some_and(|b| b >= 300_000_000));
    assert!(d.pcie_rx_bytes_total.is_some_and(|b| b >= 600_000_000));
    assert!(d.nvlink_tx_bytes_total.is_some_and(|b| b >= 3_000_000_000));
    assert!(d.nvlink_rx_bytes_total.is_some());
    assert!(!d.mig_enabled);
    assert!(d.mig.is_empty());
    assert_eq!(d.accounting, None, "accounting is off");
    assert_eq!(d.processes.len(), 1);
    assert_eq!(d.processes[0].pid, pid);
    assert_eq!(d.processes[0].used_memory_bytes, Some(2 * GIB));
    assert_eq!(d.processes[0].gpu_instance_id, None);
    let samples = utilization(d);
    assert!(samples.len() >= 2, "{samples:?}");
    assert!(samples
        .iter()
        .all(|s| s.pid == pid && s.sm_percent == 80 && s.memory_percent == 30));
    assert_eq!(d.util_sample_period_us, Some(PERIOD_US));
    let (from, to) = d.util_window_us.expect("a window");
    assert!(
        from < to
            && samples
                .iter()
                .all(|s| s.timestamp_us > from && s.timestamp_us <= to)
    );

    let old = &first.devices[1];
    assert_eq!(old.pcie_tx_bytes_total, None, "no counters, no PCIe bytes");
    assert_eq!(old.nvlink_tx_bytes_total, None, "no NVLink");
    assert_eq!(old.process_utilization, Ok(vec![]), "no processes");

    std::thread::sleep(Duration::from_millis(200));
    let before_second = Instant::now();
    let second = sampler.sample();
    let after_second = Instant::now();
    // The energy counter integrates 300 W over wall time.
    let joules = second.devices[0].energy_joules_total.unwrap()
        - d.energy_joules_total.expect("energy counter");
    let shortest = (before_second - after_first).as_secs_f64();
    let longest = (after_second - before_first).as_secs_f64();
    assert!(
        joules >= 300.0 * shortest - 0.01 && joules <= 300.0 * longest + 0.01,
        "{joules} J in {shortest}..{longest} s at 300 W"
    );
    assert!(d.energy_joules_total.unwrap() >= 1000.0);
}

#[test]
fn a_time_sliced_gpu_attributes_each_sample_to_its_own_process() {
    let children = Children::spawn(3);
    let shares = [10u32, 25, 50];
    let fake = FakeNvml::new(&json!({
        "sample_shape": "per_period",
        "devices": [{
            "uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000000",
            "processes": (0..3).map(|i| json!({
                "pid": children.pid(i),
                "used_memory_bytes": GIB * (i as u64 + 1),
                "sm_percent": shares[i],
                "memory_percent": 5
            })).collect::<Vec<_>>()
        }]
    }));
    let mut sampler = fake.start();
    let mut seen = BTreeMap::<u32, usize>::new();
    for wait_ms in [250, 180] {
        std::thread::sleep(Duration::from_millis(wait_ms));
        let sample = sampler.sample();
        assert_eq!(sample.errors, vec![]);
        let d = &sample.devices[0];
        assert_eq!(d.utilization_gpu_percent, Some(85), "the device total");
        assert_eq!(d.processes.len(), 3);
        for s in utilization(d) {
            let i = (0..3)
                .find(|&i| children.pid(i) == s.pid)
                .unwrap_or_else(|| panic!("unknown pid in {s:?}"));
            assert_eq!(
                s.sm_percent, shares[i],
                "sample {s:?} carries its own share"
            );
            assert_ne!(s.sm_percent, 85, "never the device total");
            *seen.entry(s.pid).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), 3, "every process has samples: {seen:?}");
    let counts: HashSet<usize> = seen.values().copied().collect();
    assert_eq!(
        counts.len(),
        1,
        "one sample per process per period: {seen:?}"
    );
}

#[test]
fn mig_lists_instances_and_processes_and_has_no_process_utilization() {
    let children = Children::spawn(2);
    let fake = FakeNvml::new(&json!({
        "devices": [{
            "uuid": "GPU-bbbbbbbb-0000-0000-0000-000000000000",
            "name": "NVIDIA A100-SXM4-80GB",
            "mig": { "instances": [
                { "uuid": "MIG-11111111-0000-0000-0000-000000000000",
                  "gpu_instance_id": 1, "compute_instance_id": 0,
                  "memory_total_bytes": 40 * GIB },
                { "uuid": "MIG-22222222-0000-0000-0000-000000000000",
                  "gpu_instance_id": 2, "compute_instance_id": 0,
                  "memory_total_bytes": 20 * GIB }
            ]},
            "processes": [
                { "pid": children.pid(0), "used_memory_bytes": 3 * GIB, "sm_percent": 90,
                  "gpu_instance_id": 1, "compute_instance_id": 0 },
                { "pid": children.pid(1), "used_memory_bytes": 5 * GIB, "sm_percent": 40,
                  "gpu_instance_id": 2, "compute_instance_id": 0 }
            ]
        }]
    }));
    let mut sampler = fake.start();
    std::thread::sleep(Duration::from_millis(150));
    let first = sampler.sample();
    let first_calls = sampler.calls_last_sample();
    assert_eq!(first.errors, vec![], "NOT_SUPPORTED is not a failure");
    let d = &first.devices[0];
    assert!(d.mig_enabled);
    assert_eq!(
        d.process_utilization,
        Err(Unavailable::NotSupported),
        "NVML has no per-process utilization under MIG"
    );
    assert_eq!(d.util_window_us, None);
    assert_eq!(d.utilization_gpu_percent, None, "not supported with MIG on");
    assert_eq!(d.memory_used_bytes, Some(8 * GIB));
    let mig: Vec<_> = d
        .mig
        .iter()
        .map(|m| {
            (
                m.uuid.as_str(),
                m.gpu_instance_id,
                m.compute_instance_id,
                m.memory_used_bytes,
                m.memory_total_bytes,
            )
        })
        .collect();
    assert_eq!(
        mig,
        vec![
            (
                "MIG-11111111-0000-0000-0000-000000000000",
                1,
                0,
                Some(3 * GIB),
                Some(40 * GIB)
            ),
            (
                "MIG-22222222-0000-0000-0000-000000000000",
                2,
                0,
                Some(5 * GIB),
                Some(20 * GIB)
            ),
        ]
    );
    let procs: Vec<_> = d
        .processes
        .iter()
        .map(|p| (p.pid, p.gpu_instance_id, p.compute_instance_id))
        .collect();
    assert_eq!(
        procs,
        vec![
            (children.pid(0), Some(1), Some(0)),
            (children.pid(1), Some(2), Some(0)),
        ]
    );

    let second = sampler.sample();
    assert_eq!(second.errors, vec![]);
    assert_eq!(second.devices[0].mig.len(), 2);
    assert_eq!(
        second.devices[0].process_utilization,
        Err(Unavailable::NotSupported)
    );
    assert!(
        sampler.calls_last_sample() < first_calls,
        "the layout is cached and unsupported calls are not repeated: {} then {}",
        first_calls,
        sampler.calls_last_sample()
    );
}

#[test]
fn mps_clients_are_listed_apart_from_the_server_which_carries_their_samples() {
    // More clients than the sampler's first MPS buffer holds (16), so the first round also
    // goes through NVML's INSUFFICIENT_SIZE answer and its retry.
    const CLIENTS: usize = 20;
    let children = Children::spawn(CLIENTS + 2);
    let server = children.pid(0);
    let mut processes = vec![json!({
        "pid": server, "mps": "server", "used_memory_bytes": 32 << 20
    })];
    processes.extend((1..=CLIENTS).map(|i| {
        json!({
            "pid": children.pid(i), "mps": "client",
            "used_memory_bytes": GIB * i as u64, "sm_percent": 2
        })
    }));
    let plain = children.pid(CLIENTS + 1);
    let fake = FakeNvml::new(&json!({
        "devices": [{
            "uuid": "GPU-dddddddd-0000-0000-0000-000000000000",
            "processes": processes
        }, {
            // No MPS here: the query answers an empty list.
            "uuid": "GPU-eeeeeeee-0000-0000-0000-000000000000",
            "processes": [{ "pid": plain, "used_memory_bytes": GIB, "sm_percent": 30 }]
        }]
    }));
    let mut sampler = fake.start();
    for wait_ms in [250, 150] {
        std::thread::sleep(Duration::from_millis(wait_ms));
        let before = fake.calls();
        let sample = sampler.sample();
        assert_eq!(sample.errors, vec![], "INSUFFICIENT_SIZE is no failure");
        assert_eq!(sampler.calls_last_sample(), fake.calls() - before);
        let d = &sample.devices[0];
        let listed: Vec<_> = d
            .processes
            .iter()
            .map(|p| (p.pid, p.used_memory_bytes))
            .collect();
        assert_eq!(
            listed,
            vec![(server, Some(32 << 20))],
            "the compute list is the server"
        );
        let mut clients: Vec<_> = d
            .mps_clients
            .iter()
            .map(|p| (p.pid, p.used_memory_bytes, p.gpu_instance_id))
            .collect();
        clients.sort_unstable();
        let mut want: Vec<_> = (1..=CLIENTS)
            .map(|i| (children.pid(i), Some(GIB * i as u64), None))
            .collect();
        want.sort_unstable();
        assert_eq!(clients, want, "every client, with its own memory");
        assert_eq!(d.utilization_gpu_percent, Some(2 * CLIENTS as u32));
        let samples = utilization(d);
        assert!(!samples.is_empty());
        assert!(
            samples
                .iter()
                .all(|s| s.pid == server && s.sm_percent == 2 * CLIENTS as u32),
            "per-process samples are the server's, the clients' sum: {samples:?}"
        );

        let other = &sample.devices[1];
        assert_eq!(other.mps_clients, vec![]);
        assert_eq!(other.processes.len(), 1);
        assert!(utilization(other).iter().all(|s| s.pid == plain));
    }
}

#[test]
fn a_process_exiting_mid_window_has_its_last_samples_delivered_once() {
    let children = Children::spawn(2);
    let (stays, exits) = (children.pid(0), children.pid(1));
    let fake = FakeNvml::new(&json!({
        "sample_shape": "per_period",
        "devices": [{
            "uuid": "GPU-cccccccc-0000-0000-0000-000000000000",
            "processes": [
                { "pid": stays, "sm_percent": 30 },
                { "pid": exits, "sm_percent": 60, "end_ms": 450 }
            ]
        }]
    }));
    let mut sampler = fake.start();
    let epoch = fake.epoch_us();
    let mut delivered: Vec<UtilSample> = Vec::new();
    let mut windows = Vec::new();
    for (at_ms, last) in [(0, false), (900, false), (1200, true)] {
        sleep_until_scenario_ms(&fake, at_ms);
        let sample = sampler.sample();
        let d = &sample.devices[0];
        if at_ms >= 900 {
            assert_eq!(
                d.processes.iter().map(|p| p.pid).collect::<Vec<_>>(),
                vec![stays],
                "the exited process no longer runs"
            );
        }
        if last {
            assert!(
                utilization(d).iter().all(|s| s.pid == stays),
                "nothing new from the exited process"
            );
        }
        delivered.extend_from_slice(utilization(d));
        windows.extend(d.util_window_us);
    }

    let mut exited: Vec<u64> = delivered
        .iter()
        .filter(|s| s.pid == exits)
        .map(|s| s.timestamp_us)
        .collect();
    let count = exited.len();
    exited.dedup();
    assert_eq!(exited.len(), count, "no sample twice");
    // Alive until 450 ms: its ticks are 100..=400 ms, those after the sampler started (the
    // first window starts then).
    let from = windows.first().expect("a window").0;
    assert_eq!(
        exited,
        ticks(epoch, from, u64::MAX, Some(400)),
        "every sample of the exited process, once"
    );
    assert_eq!(exited.last(), Some(&(epoch + 400_000)));
}

#[test]
fn chained_samples_never_repeat_and_cover_every_generated_sample() {
    let children = Children::spawn(2);
    let fake = FakeNvml::new(&json!({
        "sample_shape": "per_period",
        "devices": [{
            "uuid": "GPU-dddddddd-0000-0000-0000-000000000000",
            "processes": [
                { "pid": children.pid(0), "sm_percent": [[0, 20], [500, 70]] },
                { "pid": children.pid(1), "sm_percent": 35, "start_ms": 250 }
            ]
        }]
    }));
    let mut sampler = fake.start();
    let epoch = fake.epoch_us();
    let mut all: Vec<UtilSample> = Vec::new();
    let mut windows = Vec::new();
    for wait_ms in [0, 37, 120, 5, 250, 90, 0, 310, 60] {
        std::thread::sleep(Duration::from_millis(wait_ms));
        let sample = sampler.sample();
        assert_eq!(sample.errors, vec![]);
        let d = &sample.devices[0];
        all.extend_from_slice(utilization(d));
        if let Some(w) = d.util_window_us {
            windows.push(w);
        } else {
            assert!(utilization(d).is_empty(), "samples without a window");
        }
    }
    assert!(windows.len() >= 3, "{windows:?}");
    for pair in windows.windows(2) {
        assert_eq!(pair[0].1, pair[1].0, "windows chain: {windows:?}");
    }
    let unique: HashSet<(u32, u64)> = all.iter().map(|s| (s.pid, s.timestamp_us)).collect();
    assert_eq!(unique.len(), all.len(), "no (pid, timestamp) twice");
    let (from, to) = (windows[0].0, windows[windows.len() - 1].1);
    for (i, start_ms) in [(0, 0u64), (1, 250)] {
        let pid = children.pid(i);
        let mut got: Vec<u64> = all
            .iter()
            .filter(|s| s.pid == pid)
            .map(|s| s.timestamp_us)
            .collect();
        got.sort_unstable();
        let expected: Vec<u64> = ticks(epoch, from, to, None)
            .into_iter()
            .filter(|ts| *ts >= epoch + start_ms * 1000)
            .collect();
        assert_eq!(got, expected, "pid {pid}: every generated sample, once");
    }
    // The SM timeline steps at 500 ms: each sample carries the value at its own time.
    for s in all.iter().filter(|s| s.pid == children.pid(0)) {
        let expected = if s.timestamp_us < epoch + 500_000 {
            20
        } else {
            70
        };
        assert_eq!(s.sm_percent, expected, "{s:?}");
    }
}

#[test]
fn injected_xids_reach_take_xids() {
    let fake = FakeNvml::new(&json!({
        "devices": [
            { "uuid": "GPU-eeeeeeee-0000-0000-0000-000000000000" },
            { "uuid": "GPU-ffffffff-0000-0000-0000-000000000000" }
        ],
        "xids": [
            { "at_ms": 300, "device": 1, "xid": 79 },
            { "at_ms": 600, "device": 0, "xid": 48 }
        ]
    }));
    let sampler = fake.start();
    let mut got: Vec<XidEvent> = Vec::new();
    let both = wait_for(Duration::from_secs(10), || {
        got.extend(sampler.take_xids());
        (got.len() >= 2).then_some(())
    });
    assert!(both.is_some(), "XIDs not delivered in time: {got:?}");
    std::thread::sleep(Duration::from_millis(700));
    got.extend(sampler.take_xids());
    assert_eq!(
        got,
        vec![
            XidEvent {
                device_uuid: "GPU-ffffffff-0000-0000-0000-000000000000".into(),
                xid: 79
            },
            XidEvent {
                device_uuid: "GPU-eeeeeeee-0000-0000-0000-000000000000".into(),
                xid: 48
            },
        ],
        "each XID once, on its GPU"
    );
    let dropped = Instant::now();
    drop(sampler);
    assert!(
        dropped.elapsed() < Duration::from_secs(3),
        "dropping the sampler stops the XID thread promptly"
    );
}

/// A sampling pass the driver finishes between the device query and the process query (slow
/// calls between the two, one on either side of the process query, make one likely every tick) is delivered to both in the same sample, never to one
/// this tick and the other the next: each sample's process time is the device's busy time.
#[test]
fn the_device_and_its_processes_are_cut_at_the_same_pass() {
    let children = Children::spawn(1);
    let pid = children.pid(0);
    let fake = FakeNvml::new(&json!({
        "sample_shape": "per_period",
        "slow_calls": [
            { "call": "nvmlDeviceGetComputeRunningProcesses_v3", "ms": 60 },
            { "call": "nvmlDeviceGetAccountingPids", "ms": 120 }
        ],
        "devices": [{
            "uuid": "GPU-cccccccc-1111-0000-0000-000000000000",
            "processes": [{ "pid": pid, "used_memory_bytes": GIB, "sm_percent": 60 }]
        }]
    }));
    let mut sampler = fake.start();
    let (mut device_total, mut process_total) = (0.0, 0.0);
    for round in 0..8 {
        std::thread::sleep(Duration::from_millis(130));
        let sample = sampler.sample();
        assert_eq!(sample.errors, vec![]);
        let d = &sample.devices[0];
        let busy = d
            .utilization_gpu_sampled
            .expect("device samples")
            .busy_seconds;
        let processes: f64 = utilization(d)
            .iter()
            .map(|s| f64::from(s.sm_percent) / 100.0 * s.span_us as f64 / 1e6)
            .sum();
        // The first sample's spans start at the sampler's start, where the period is not
        // known yet to either stream.
        if round > 0 {
            assert!(
                (busy - processes).abs() <= 1e-9,
                "sample {round}: device busy {busy} s, its process {processes} s"
            );
            device_total += busy;
            process_total += processes;
        }
    }
    // Seven samples of about 0.25 s each at 60 %.
    assert!(
        device_total >= 0.6 && (device_total - process_total).abs() <= 1e-9,
        "device {device_total} s, process {process_total} s"
    );
}
