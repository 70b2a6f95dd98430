//! The sampler degrading as NVML does: no library, a missing symbol, a lost GPU, a GPU without a
//! handle at start, injected call errors; accounting on and off; and the call count it reports.
//! Through the real `nvml-wrapper` loading path against the fake NVML library.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use tally_gpu::{CallError, GpuError, GpuOptions, Sampler, Unavailable};

use common::{sleep_until_scenario_ms, Children, FakeNvml};

const GIB: u64 = 1024 * 1024 * 1024;

#[test]
fn a_missing_library_is_library_not_found() {
    let err = Sampler::start(&GpuOptions {
        library: Some("/nonexistent/dir/libnvidia-ml.so.1".into()),
    })
    .err();
    assert!(
        matches!(err, Some(GpuError::LibraryNotFound { .. })),
        "{err:?}"
    );
}

#[test]
fn a_library_without_process_utilization_still_samples_the_rest() {
    let children = Children::spawn(1);
    let fake = FakeNvml::variant(
        common::WITHOUT_PROCESS_UTILIZATION,
        &json!({
            "devices": [{
                "uuid": "GPU-12121212-0000-0000-0000-000000000000",
                "power_watts": 250,
                "processes": [{ "pid": children.pid(0), "used_memory_bytes": GIB, "sm_percent": 50 }]
            }]
        }),
    );
    let mut sampler = fake.start();
    // Past the driver's first complete sample period (167 ms), which the reading covers.
    sleep_until_scenario_ms(&fake, 400);
    for _ in 0..2 {
        let sample = sampler.sample();
        let d = &sample.devices[0];
        assert_eq!(
            d.process_utilization,
            Err(Unavailable::Error("symbol_missing"))
        );
        assert_eq!(
            sample.errors,
            vec![CallError {
                call: "nvmlDeviceGetProcessUtilization",
                code: "symbol_missing"
            }],
            "counted every tick"
        );
        assert_eq!(d.power_watts, Some(250.0));
        assert_eq!(d.utilization_gpu_percent, Some(50));
        assert_eq!(d.processes.len(), 1);
        assert_eq!(d.processes[0].used_memory_bytes, Some(GIB));
    }
}

#[test]
fn a_lost_gpu_is_reported_not_fatal() {
    let fake = FakeNvml::new(&json!({
        "devices": [
            { "uuid": "GPU-01010101-0000-0000-0000-000000000000", "power_watts": 100 },
            { "uuid": "GPU-02020202-0000-0000-0000-000000000000", "power_watts": 200,
              "lost_at_ms": 1000 }
        ]
    }));
    let mut sampler = fake.start();
    let before = sampler.sample();
    assert!(before.devices.iter().all(|d| !d.lost));
    assert_eq!(before.devices[1].power_watts, Some(200.0));
    assert_eq!(before.errors, vec![]);

    sleep_until_scenario_ms(&fake, 1050);
    for _ in 0..2 {
        let calls_before = fake.calls();
        let after = sampler.sample();
        let calls = fake.calls() - calls_before;
        let (ok, lost) = (&after.devices[0], &after.devices[1]);
        assert!(!ok.lost);
        assert_eq!(ok.power_watts, Some(100.0));
        assert!(lost.lost);
        assert_eq!(lost.uuid, "GPU-02020202-0000-0000-0000-000000000000");
        assert_eq!(lost.power_watts, None);
        assert_eq!(lost.memory_used_bytes, None);
        assert_eq!(
            lost.process_utilization,
            Err(Unavailable::Error("gpu_is_lost"))
        );
        assert_eq!(
            after.errors,
            vec![CallError {
                call: "nvmlDeviceGetUtilizationRates",
                code: "gpu_is_lost"
            }],
            "one failed call for the lost GPU, then its other calls are skipped"
        );
        assert_eq!(calls, sampler.calls_last_sample());
    }
}

#[test]
fn a_gpu_without_a_handle_at_start_is_retried_each_tick() {
    let fake = FakeNvml::new(&json!({
        "devices": [
            { "uuid": "GPU-0a0a0a0a-0000-0000-0000-000000000000" },
            { "uuid": "GPU-0b0b0b0b-0000-0000-0000-000000000000", "power_watts": 90 }
        ],
        "errors": [
            { "call": "nvmlDeviceGetHandleByIndex_v2", "device": 1, "code": "UNKNOWN",
              "until_ms": 1000 }
        ]
    }));
    let mut sampler = fake.start();
    let early = sampler.sample();
    assert_eq!(
        early.errors,
        vec![CallError {
            call: "nvmlDeviceGetHandleByIndex_v2",
            code: "unknown"
        }]
    );
    assert_eq!(
        early.devices[0].uuid,
        "GPU-0a0a0a0a-0000-0000-0000-000000000000"
    );
    let missing = &early.devices[1];
    assert_eq!(
        (missing.index, missing.uuid.as_str(), missing.lost),
        (1, "", false)
    );
    assert_eq!(missing.power_watts, None);
    assert_eq!(
        missing.process_utilization,
        Err(Unavailable::Error("unknown"))
    );
    sleep_until_scenario_ms(&fake, 1050);
    let later = sampler.sample();
    assert_eq!(later.errors, vec![]);
    assert_eq!(
        later.devices[1].uuid,
        "GPU-0b0b0b0b-0000-0000-0000-000000000000"
    );
    assert_eq!(later.devices[1].power_watts, Some(90.0));
}

#[test]
fn an_injected_call_error_is_counted_and_the_rest_is_sampled() {
    let fake = FakeNvml::new(&json!({
        "devices": [
            { "uuid": "GPU-03030303-0000-0000-0000-000000000000", "temperature_celsius": 70,
              "power_watts": 150 },
            { "uuid": "GPU-04040404-0000-0000-0000-000000000000", "temperature_celsius": 50 }
        ],
        "errors": [
            { "call": "nvmlDeviceGetTemperature", "device": 0, "code": "UNKNOWN",
              "until_ms": 1000 }
        ]
    }));
    let mut sampler = fake.start();
    for _ in 0..2 {
        let sample = sampler.sample();
        assert_eq!(
            sample.errors,
            vec![CallError {
                call: "nvmlDeviceGetTemperature",
                code: "unknown"
            }]
        );
        assert_eq!(sample.devices[0].temperature_celsius, None);
        assert_eq!(sample.devices[0].power_watts, Some(150.0));
        assert_eq!(sample.devices[1].temperature_celsius, Some(50));
    }
    sleep_until_scenario_ms(&fake, 1050);
    let recovered = sampler.sample();
    assert_eq!(recovered.errors, vec![], "a transient failure is retried");
    assert_eq!(recovered.devices[0].temperature_celsius, Some(70));
}

#[test]
fn accounting_stats_when_accounting_is_on_and_none_when_off() {
    let children = Children::spawn(2);
    let (running, exited) = (children.pid(0), children.pid(1));
    let procs = json!([
        { "pid": running, "sm_percent": 40, "memory_percent": 10,
          "used_memory_bytes": [[0, GIB], [100, 3 * GIB]] },
        { "pid": exited, "sm_percent": 80, "end_ms": 200, "used_memory_bytes": 2 * GIB }
    ]);
    let fake = FakeNvml::new(&json!({
        "devices": [
            { "uuid": "GPU-05050505-0000-0000-0000-000000000000", "accounting": true,
              "processes": procs },
            { "uuid": "GPU-06060606-0000-0000-0000-000000000000", "accounting": false,
              "processes": procs }
        ]
    }));
    let mut sampler = fake.start();
    sleep_until_scenario_ms(&fake, 400);
    let first = sampler.sample();
    assert_eq!(first.errors, vec![]);
    let stats = first.devices[0].accounting.as_ref().expect("accounting on");
    let by_pid: BTreeMap<u32, _> = stats.iter().map(|s| (s.pid, *s)).collect();
    assert_eq!(by_pid.len(), 2, "{stats:?}");
    let r = by_pid[&running];
    assert!(r.is_running);
    assert_eq!(r.time_ms, 0, "0 while running, as NVML reports");
    assert_eq!(r.gpu_utilization_percent, Some(40));
    assert_eq!(r.max_memory_usage_bytes, Some(3 * GIB));
    let e = by_pid[&exited];
    assert!(!e.is_running);
    assert_eq!(e.time_ms, 200);
    assert_eq!(e.gpu_utilization_percent, Some(80));
    assert_eq!(e.max_memory_usage_bytes, Some(2 * GIB));
    assert_eq!(e.start_time_us, fake.epoch_us());
    assert_eq!(first.devices[1].accounting, None, "accounting off");

    let second = sampler.sample();
    let again: Vec<u32> = second.devices[0]
        .accounting
        .as_ref()
        .expect("accounting on")
        .iter()
        .map(|s| s.pid)
        .collect();
    assert_eq!(
        again,
        vec![running],
        "final stats of an exited process are delivered once"
    );
}

#[test]
fn calls_last_sample_matches_the_calls_the_library_answered() {
    let children = Children::spawn(3);
    let fake = FakeNvml::new(&json!({
        "devices": [
            { "uuid": "GPU-07070707-0000-0000-0000-000000000000", "accounting": true,
              "processes": [
                  { "pid": children.pid(0), "sm_percent": 10 },
                  { "pid": children.pid(1), "sm_percent": 20 }
              ] },
            { "uuid": "GPU-08080808-0000-0000-0000-000000000000",
              "processes": [{ "pid": children.pid(2), "sm_percent": 30 }] },
            { "uuid": "GPU-09090909-0000-0000-0000-000000000000" }
        ]
    }));
    let mut sampler = fake.start();
    std::thread::sleep(Duration::from_millis(250));
    for _ in 0..3 {
        let before = fake.calls();
        let sample = sampler.sample();
        let answered = fake.calls() - before;
        assert_eq!(sample.errors, vec![]);
        assert_eq!(sampler.calls_last_sample(), answered);
        assert!(
            answered <= 3 * 20,
            "bounded calls per GPU: {answered} for 3 GPUs"
        );
    }
}

/// The MPS query costs one call on a GPU with processes, none on an idle one, and none after
/// the GPU said `NOT_SUPPORTED` (pre-Volta); `NOT_FOUND` reads as no MPS. Neither is an error.
#[test]
fn mps_costs_one_call_on_a_busy_gpu_and_none_once_not_supported() {
    let children = Children::spawn(1);
    // Device utilization samples arrive every 167 ms, so rounds 50 ms apart would make one or
    // two calls: not supported here (asked in round 0 only), so the rounds compare exactly.
    let no_samples = json!({ "call": "nvmlDeviceGetSamples", "code": "NOT_SUPPORTED" });
    let scenario = |mut errors: serde_json::Value| {
        if let Some(list) = errors.as_array_mut() {
            list.push(no_samples.clone());
        }
        json!({
            "devices": [
                // No utilization samples (all zero): a steady one NOT_FOUND call each round.
                { "uuid": "GPU-31313131-0000-0000-0000-000000000000",
                  "processes": [{ "pid": children.pid(0), "used_memory_bytes": GIB }] },
                { "uuid": "GPU-32323232-0000-0000-0000-000000000000" }
            ],
            "errors": errors
        })
    };
    let mps_error = |code: &str| json!([{ "call": "nvmlDeviceGetMPSComputeRunningProcesses_v3", "device": 0, "code": code }]);
    let rounds = |scenario: &serde_json::Value, listed: usize| -> Vec<u64> {
        let fake = FakeNvml::new(scenario);
        let mut sampler = fake.start();
        (0..3)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(50));
                let sample = sampler.sample();
                assert_eq!(sample.errors, vec![], "no MPS is not a failure");
                assert!(sample.devices.iter().all(|d| d.mps_clients.is_empty()));
                assert_eq!(sample.devices[0].processes.len(), listed);
                sampler.calls_last_sample()
            })
            .collect()
    };
    let plain = rounds(&scenario(json!([])), 1);
    let not_supported = rounds(&scenario(mps_error("NOT_SUPPORTED")), 1);
    let not_found = rounds(&scenario(mps_error("NOT_FOUND")), 1);
    assert_eq!(
        not_found, plain,
        "NOT_FOUND is asked again, counted, not failed"
    );
    assert_eq!(not_supported[0], plain[0], "asked once");
    assert_eq!(
        &not_supported[1..],
        &[plain[1] - 1, plain[2] - 1],
        "and never again"
    );
    // The busy GPU: the idle one's calls plus the fetch of its process list and the MPS query.
    let idle_only = rounds(
        &json!({
            "devices": [{ "uuid": "GPU-32323232-0000-0000-0000-000000000000" }],
            "errors": [no_samples]
        }),
        0,
    );
    assert_eq!(plain[2], 2 * idle_only[2] + 2, "{plain:?} vs {idle_only:?}");
}

/// A GPU falls off the bus: its XID 79 arrives, then every wait on the event set answers
/// `GPU_IS_LOST`. The other GPU's later XIDs must still arrive.
#[test]
fn a_lost_gpu_does_not_hide_the_xids_of_the_others() {
    let fake = FakeNvml::new(&json!({
        "devices": [
            { "uuid": "GPU-0c0c0c0c-0000-0000-0000-000000000000" },
            { "uuid": "GPU-0d0d0d0d-0000-0000-0000-000000000000", "lost_at_ms": 300 }
        ],
        "xids": [
            { "at_ms": 300, "device": 1, "xid": 79 },
            { "at_ms": 1500, "device": 0, "xid": 48 },
            { "at_ms": 2000, "device": 0, "xid": 31 }
        ]
    }));
    let sampler = fake.start();
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(6);
    while got.len() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        got.extend(
            sampler
                .take_xids()
                .into_iter()
                .map(|x| (x.device_uuid, x.xid)),
        );
    }
    assert_eq!(
        got,
        vec![
            ("GPU-0d0d0d0d-0000-0000-0000-000000000000".to_owned(), 79),
            ("GPU-0c0c0c0c-0000-0000-0000-000000000000".to_owned(), 48),
            ("GPU-0c0c0c0c-0000-0000-0000-000000000000".to_owned(), 31),
        ]
    );
}
