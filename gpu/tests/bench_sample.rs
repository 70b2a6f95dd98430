//! Cost of one `sample()` on a large node: 8 GPUs × 50 processes on the fake library. The call
//! count per GPU is bounded (asserted: it must not grow with the number of processes); the timing
//! is printed for the benchmark report:
//! `cargo test -p tally-gpu --release --test bench_sample -- --nocapture`
//! (after `cargo build --release -p tally-fake-nvml`; a debug build works too, slower).

mod common;

use std::time::{Duration, Instant};

use serde_json::json;

use common::{Children, FakeNvml};

fn scenario(children: &Children, accounting: bool) -> serde_json::Value {
    json!({
        "devices": (0..8).map(|g| json!({
            "uuid": format!("GPU-{g:08}-0000-0000-0000-000000000000"),
            "accounting": accounting,
            "nvlink_links": 18,
            "processes": (0..50).map(|p| json!({
                "pid": children.pid(p),
                "used_memory_bytes": 1 << 30,
                "sm_percent": 1 + (p + g) % 20,
                "memory_percent": 1
            })).collect::<Vec<_>>()
        })).collect::<Vec<_>>()
    })
}

#[test]
fn sample_cost_8_gpus_50_processes() {
    let children = Children::spawn(50);
    for accounting in [false, true] {
        let fake = FakeNvml::new(&scenario(&children, accounting));
        let mut sampler = fake.start();
        let mut times = Vec::new();
        let mut calls = Vec::new();
        // Ticks 200 ms apart: 2 new utilization samples per process per GPU each time.
        for _ in 0..15 {
            std::thread::sleep(Duration::from_millis(200));
            let t = Instant::now();
            let sample = sampler.sample();
            times.push(t.elapsed());
            calls.push(sampler.calls_last_sample());
            assert_eq!(sample.errors, vec![]);
            assert_eq!(sample.devices.len(), 8);
        }
        // The first tick enumerates and learns what is unsupported; report the steady state.
        let steady_calls = &calls[1..];
        // Bounded per GPU whatever the number of processes: 18 calls (16 before the device
        // utilization samples, 15 before the MPS client query), plus accounting stats for at
        // most 32 pids when accounting is on.
        let bound = if accounting { 51 * 8 } else { 18 * 8 };
        // A sample the driver adds between a list's count probe and its fetch costs that list
        // two more calls (device and process utilization samples, each at most once per GPU);
        // the fake's samples follow the wall clock as a driver's do, so a slow moment between
        // the two calls does it now and then (a CI run saw 410 of 408).
        let retries = 2 * 2 * 8;
        assert!(
            steady_calls.iter().all(|&c| c <= bound + retries),
            "NVML calls per sample {steady_calls:?} exceed {bound} and its retries"
        );
        let without_retry = steady_calls.iter().filter(|&&c| c <= bound).count();
        assert!(
            without_retry * 2 > steady_calls.len(),
            "most samples need no retry: {steady_calls:?} against {bound}"
        );
        let mut steady_times: Vec<Duration> = times[1..].to_vec();
        steady_times.sort();
        println!(
            "accounting {}: first sample {} calls ({:.1}/GPU) in {:?}; steady {}..{} calls \
             ({:.1}/GPU), sample() median {:?}, max {:?}",
            if accounting { "on" } else { "off" },
            calls[0],
            calls[0] as f64 / 8.0,
            times[0],
            steady_calls.iter().min().unwrap(),
            steady_calls.iter().max().unwrap(),
            *steady_calls.iter().max().unwrap() as f64 / 8.0,
            steady_times[steady_times.len() / 2],
            steady_times[steady_times.len() - 1],
        );
    }
}
