//! The sampler against the fake NVML in the real driver's shape (its default): one utilization
//! entry per process per query, holding its mean since `lastSeenTimeStamp`, a fixed count probe
//! whose unused entries come back zeroed, junk entries for pid 0. Each delivered sample must
//! say how long it stands for.

mod common;

use serde_json::json;

use common::{sleep_until_scenario_ms, Children, FakeNvml};

#[test]
fn one_entry_per_process_spans_the_time_since_its_previous_entry() {
    let children = Children::spawn(2);
    let (a, b) = (children.pid(0), children.pid(1));
    let fake = FakeNvml::new(&json!({
        "devices": [{
            "uuid": "GPU-14141414-0000-0000-0000-000000000000",
            "processes": [
                { "pid": a, "sm_percent": 50 },
                { "pid": b, "sm_percent": 20, "start_ms": 1000 },
                { "pid": 0, "zombie": true, "sm_percent": 30 }
            ]
        }]
    }));
    let mut sampler = fake.start();
    let mut spans: Vec<Vec<(u32, u32, u64)>> = Vec::new();
    for at_ms in [700, 1700, 2700] {
        sleep_until_scenario_ms(&fake, at_ms);
        let sample = sampler.sample();
        assert_eq!(sample.errors, vec![]);
        let d = &sample.devices[0];
        let mut got: Vec<(u32, u32, u64)> = d
            .process_utilization
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|s| (s.pid, s.sm_percent, s.span_us))
            .collect();
        got.sort_unstable();
        spans.push(got);
    }
    let period_us = 167_000;
    // Query 1 (0.7 s): a only, since the sampler started. Queries 2 and 3: each a second.
    // b, new in query 2, started at 1 s; nothing NVML returns says when, so its first entry
    // spans the whole time since the previous query (its mean is over its own samples: an
    // overcharge of up to one tick at a process's start, which the device's busy time caps).
    let near = |got: u64, want: u64| got.abs_diff(want) <= period_us;
    let [first, second, third] = &spans[..] else {
        unreachable!("three queries")
    };
    assert_eq!(first.len(), 1, "one entry per process, no pid 0: {first:?}");
    assert_eq!((first[0].0, first[0].1), (a, 50));
    assert!(near(first[0].2, 700_000), "{first:?}");
    for (query, want_b) in [(second, 1_000_000), (third, 1_000_000)] {
        let mut pids: Vec<u32> = query.iter().map(|s| s.0).collect();
        pids.sort_unstable();
        let mut want = vec![a, b];
        want.sort_unstable();
        assert_eq!(pids, want, "one entry each, no pid 0: {query:?}");
        for &(pid, sm, span) in query {
            if pid == a {
                assert_eq!(sm, 50);
                assert!(near(span, 1_000_000), "a: {query:?}");
            } else {
                assert_eq!(sm, 20);
                assert!(near(span, want_b), "b: {query:?}");
            }
        }
    }
    assert!(
        sampler.sample().devices[0].util_sample_period_us.is_none(),
        "one entry per process shows no period"
    );
}
