//! `tally_workload_cost_total` end to end: a real workload burning CPU in a real cgroup is
//! charged its measured CPU seconds at the configured price, a reload prices only what comes
//! after it, and GPU time through the fake NVML costs its device model's price.

use std::time::Duration;

use serde_json::json;
use tally_tests::agent::{sample, Agent};
use tally_tests::cgroup::{random_hex, TestCgroup};
use tally_tests::fake_nvml::{FakeNvml, FULL};
use tally_tests::gpu::{seconds, setup, total, unit, GPU};

fn cpu_of(text: &str, unit: &str) -> Option<f64> {
    sample(
        text,
        "tally_workload_cpu_seconds_total",
        &[&format!("unit=\"{unit}\"")],
    )
}

fn cost_of(text: &str, unit: &str, resource: &str) -> Option<f64> {
    sample(
        text,
        "tally_workload_cost_total",
        &[
            &format!("unit=\"{unit}\""),
            &format!("resource=\"{resource}\""),
        ],
    )
}

fn config(cpu_price: f64) -> String {
    format!(
        "[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = []\n[ebpf]\nenabled = false\n\
         [prices]\ncurrency = \"EUR\"\ncpu_core_second = {cpu_price}\n"
    )
}

/// `got` is `want` but for float rounding: both come from the same tick's snapshot.
#[track_caller]
fn assert_exact(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= 1e-9 * want.abs().max(1e-3),
        "{what}: {got}, want {want}"
    );
}

#[test]
fn cpu_cost_is_the_measured_cpu_seconds_at_the_price_and_a_reload_prices_only_later_use() {
    const TEST: &str =
        "cpu_cost_is_the_measured_cpu_seconds_at_the_price_and_a_reload_prices_only_later_use";
    let Some(unified) = setup(TEST) else { return };
    let name = format!("tally-cost-{}.service", random_hex(6));
    let mut cg = TestCgroup::create(&[unified], &format!("/system.slice/{name}"));
    cg.burn();

    let agent = Agent::start(&config(0.5));
    let text = agent.scrape_until(Duration::from_secs(10), "a second of CPU", |t| {
        cpu_of(t, &name).is_some_and(|c| c >= 1.0)
    });
    let cpu = cpu_of(&text, &name).unwrap();
    assert_exact(cost_of(&text, &name, "cpu").unwrap(), cpu * 0.5, "cpu cost");
    assert!(
        text.contains(
            "tally_price{resource=\"cpu\",gpu_model=\"\",scope=\"\",per=\"core_second\",currency=\"EUR\"} 0.5"
        ),
        "{text}"
    );
    // Nothing else of it has a price.
    assert_eq!(cost_of(&text, &name, "memory"), None);

    // Reprice. The tick that takes the new price is between the last scrape before the signal
    // and the first that shows it: the CPU seconds at the switch lie between theirs.
    let before = cpu_of(&agent.scrape(), &name).unwrap();
    let reloaded = agent.config.clone();
    let listen = format!("[agent]\nlisten = \"127.0.0.1:{}\"", agent.port);
    std::fs::write(&reloaded, config(2.0).replacen("[agent]", &listen, 1)).unwrap();
    agent.signal(libc::SIGHUP);
    let switched = agent.scrape_until(Duration::from_secs(10), "the new price", |t| {
        t.contains("per=\"core_second\",currency=\"EUR\"} 2\n")
    });
    let after = cpu_of(&switched, &name).unwrap();
    let last = agent.scrape_until(Duration::from_secs(10), "a second more", |t| {
        cpu_of(t, &name).is_some_and(|c| c >= after + 1.0)
    });
    let cpu = cpu_of(&last, &name).unwrap();
    let cost = cost_of(&last, &name, "cpu").unwrap();
    // 0.5 per second up to the switch, 2 after: 2 × cpu − 1.5 × (seconds at the switch).
    let (low, high) = (2.0 * cpu - 1.5 * after, 2.0 * cpu - 1.5 * before);
    assert!(
        cost >= low - 1e-9 && cost <= high + 1e-9,
        "cost {cost} of {cpu} s outside [{low}, {high}] (switch between {before} s and {after} s)"
    );
}

#[test]
fn gpu_cost_through_nvml_is_the_gpu_seconds_at_the_device_models_price() {
    const TEST: &str = "gpu_cost_through_nvml_is_the_gpu_seconds_at_the_device_models_price";
    let Some(unified) = setup(TEST) else { return };
    let (a, b) = (unit(&unified, "cost-h100"), unit(&unified, "cost-l4"));
    const L4: &str = "GPU-99999999-8888-7777-6666-555555555555";
    let device = |uuid: &str, name: &str, pid: u32, sm: u32| {
        json!({
            "uuid": uuid,
            "name": name,
            "memory_total_bytes": 25769803776u64,
            "power_watts": 300,
            "energy_start_joules": 1000,
            "processes": [{ "pid": pid, "used_memory_bytes": 1_000_000_000u64, "sm_percent": sm }]
        })
    };
    let fake = FakeNvml::new(
        FULL,
        &json!({ "devices": [
            device(GPU, "NVIDIA H100 80GB HBM3", a.pid, 60),
            device(L4, "NVIDIA L4", b.pid, 40)
        ] }),
    );
    let agent = Agent::start(&format!(
        "[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = []\n[ebpf]\nenabled = false\n{}\
         [prices]\ngpu_second = {{ \"NVIDIA H100 80GB HBM3\" = 3.0, default = 1.25 }}\n\
         gpu_energy_kwh = 3600.0\n",
        fake.config()
    ));
    let text = agent.scrape_until(Duration::from_secs(15), "GPU time on both", |t| {
        seconds(t, &a, "") >= 1.0 && seconds(t, &b, "") >= 0.5
    });
    for (u, gpu, price) in [(&a, GPU, 3.0), (&b, L4, 1.25)] {
        let gpu_seconds = seconds(&text, u, &format!("gpu=\"{gpu}\""));
        assert!(gpu_seconds > 0.0, "{text}");
        assert_exact(
            cost_of(&text, &u.name, "gpu").unwrap(),
            gpu_seconds * price,
            &format!("{} gpu cost", u.name),
        );
        // 3600 per kWh is 0.001 per joule.
        let joules = total(
            &text,
            "tally_workload_gpu_energy_joules_total",
            &[&format!("unit=\"{}\"", u.name)],
        );
        assert!(joules > 0.0, "{text}");
        assert_exact(
            cost_of(&text, &u.name, "gpu_energy").unwrap(),
            joules * 0.001,
            &format!("{} energy cost", u.name),
        );
    }
    assert!(text.contains(
        "tally_price{resource=\"gpu\",gpu_model=\"default\",scope=\"\",per=\"gpu_second\",currency=\"USD\"} 1.25"
    ));
}

#[test]
fn a_mig_instance_costs_its_share_of_its_gpus_price() {
    const TEST: &str = "a_mig_instance_costs_its_share_of_its_gpus_price";
    let Some(unified) = setup(TEST) else { return };
    let (a, b) = (unit(&unified, "cost-3g"), unit(&unified, "cost-2g"));
    let mig = |n: &str| format!("MIG-{n}{n}{n}{n}{n}{n}{n}{n}-0000-0000-0000-000000000000");
    let device = json!({
        "uuid": GPU,
        "name": "NVIDIA H100 80GB HBM3",
        "memory_total_bytes": 85899345920u64,
        "power_watts": 400,
        "processes": [
            { "pid": a.pid, "used_memory_bytes": 5_000_000_000u64, "gpu_instance_id": 1, "compute_instance_id": 0 },
            { "pid": b.pid, "used_memory_bytes": 3_000_000_000u64, "gpu_instance_id": 2, "compute_instance_id": 0 }
        ],
        "mig": { "instances": [
            { "uuid": mig("a"), "gpu_instance_id": 1, "compute_instance_id": 0, "compute_slices": 3, "memory_total_bytes": 40_000_000_000u64 },
            { "uuid": mig("b"), "gpu_instance_id": 2, "compute_instance_id": 0, "compute_slices": 2, "memory_total_bytes": 20_000_000_000u64 }
        ]}
    });
    let fake = FakeNvml::new(FULL, &json!({ "devices": [device] }));
    let agent = Agent::start(&format!(
        "[agent]\ntick_interval_ms = 200\n[cri]\nendpoints = []\n[ebpf]\nenabled = false\n{}\
         [prices]\ngpu_second = {{ \"NVIDIA H100 80GB HBM3\" = 7.0 }}\n",
        fake.config()
    ));
    let text = agent.scrape_until(Duration::from_secs(15), "MIG time on both", |t| {
        seconds(t, &a, "method=\"mig_allocation\"") >= 1.0 && seconds(t, &b, "") >= 1.0
    });
    // A MIG second is a second the holder held the instance, not a fraction of the GPU's: it
    // costs the instance's compute slices out of the GPU's 7.
    for (u, slices) in [(&a, 3.0), (&b, 2.0)] {
        let held = seconds(&text, u, "");
        assert_exact(
            cost_of(&text, &u.name, "gpu").unwrap(),
            held * 7.0 * slices / 7.0,
            &format!("{} gpu cost", u.name),
        );
    }
}
