//! MIG process lists: the GPU's own handle lists every instance's processes only for a caller
//! with the MIG monitor capability; without it NVML answers `NO_PERMISSION` or nothing, and the
//! sampler asks each MIG device handle. Through the fake NVML, each way.

mod common;

use std::time::Duration;

use serde_json::json;
use tally_gpu::MigProcesses;

use common::{Children, FakeNvml};

const GIB: u64 = 1024 * 1024 * 1024;

/// Each process as (which child, GPU instance, compute instance, memory).
type Listed = Vec<(u32, Option<u32>, Option<u32>, Option<u64>)>;

fn processes_listed(parent: &str) -> (Listed, Option<MigProcesses>) {
    let children = Children::spawn(2);
    let fake = FakeNvml::new(&json!({
        "devices": [{
            "uuid": "GPU-13131313-0000-0000-0000-000000000000",
            "mig_parent_processes": parent,
            "mig": { "instances": [
                { "uuid": "MIG-13131313-0001-0000-0000-000000000000",
                  "gpu_instance_id": 1, "compute_instance_id": 0, "memory_total_bytes": 40 * GIB },
                { "uuid": "MIG-13131313-0002-0000-0000-000000000000",
                  "gpu_instance_id": 2, "compute_instance_id": 0, "memory_total_bytes": 20 * GIB }
            ]},
            "processes": [
                { "pid": children.pid(0), "used_memory_bytes": 3 * GIB,
                  "gpu_instance_id": 1, "compute_instance_id": 0 },
                { "pid": children.pid(1), "used_memory_bytes": 5 * GIB,
                  "gpu_instance_id": 2, "compute_instance_id": 0 }
            ]
        }]
    }));
    let mut sampler = fake.start();
    std::thread::sleep(Duration::from_millis(50));
    let mut last = None;
    for _ in 0..2 {
        let before = fake.calls();
        let sample = sampler.sample();
        assert_eq!(sample.errors, vec![], "{parent}: no call fails");
        assert_eq!(
            sampler.calls_last_sample(),
            fake.calls() - before,
            "{parent}"
        );
        let d = &sample.devices[0];
        let mut listed: Vec<_> = d
            .processes
            .iter()
            .map(|p| {
                let i = if p.pid == children.pid(0) { 0 } else { 1 };
                (
                    i,
                    p.gpu_instance_id,
                    p.compute_instance_id,
                    p.used_memory_bytes,
                )
            })
            .collect();
        listed.sort_unstable();
        last = Some((listed, d.mig_processes));
    }
    last.unwrap_or_default()
}

#[test]
fn with_the_monitor_capability_the_gpu_handle_lists_every_instance() {
    let (listed, way) = processes_listed("aggregated");
    assert_eq!(
        listed,
        vec![
            (0, Some(1), Some(0), Some(3 * GIB)),
            (1, Some(2), Some(0), Some(5 * GIB))
        ]
    );
    assert_eq!(way, Some(MigProcesses::GpuHandle));
}

#[test]
fn without_it_each_mig_device_handle_is_asked() {
    for parent in ["no_permission", "empty"] {
        let (listed, way) = processes_listed(parent);
        assert_eq!(
            listed,
            vec![
                (0, Some(1), Some(0), Some(3 * GIB)),
                (1, Some(2), Some(0), Some(5 * GIB))
            ],
            "{parent}"
        );
        assert_eq!(way, Some(MigProcesses::MigHandles), "{parent}");
    }
}

/// Prices need the share of its GPU each instance is: its compute slices (one when the scenario
/// names none) out of the GPU's MIG slots.
#[test]
fn each_instance_reports_its_slices_of_the_gpu() {
    let fake = FakeNvml::new(&json!({
        "devices": [{
            "uuid": "GPU-14141414-0000-0000-0000-000000000000",
            "mig": { "instances": [
                { "uuid": "MIG-14141414-0001-0000-0000-000000000000", "compute_slices": 3,
                  "gpu_instance_id": 1, "compute_instance_id": 0, "memory_total_bytes": 40 * GIB },
                { "uuid": "MIG-14141414-0002-0000-0000-000000000000",
                  "gpu_instance_id": 2, "compute_instance_id": 0, "memory_total_bytes": 10 * GIB }
            ]}
        }]
    }));
    let mut sampler = fake.start();
    let sample = sampler.sample();
    assert_eq!(sample.errors, vec![]);
    let slices: Vec<_> = sample.devices[0]
        .mig
        .iter()
        .map(|m| (m.uuid.as_str(), m.compute_slices, m.gpu_slices))
        .collect();
    assert_eq!(
        slices,
        [
            ("MIG-14141414-0001-0000-0000-000000000000", Some(3), Some(7)),
            ("MIG-14141414-0002-0000-0000-000000000000", Some(1), Some(7))
        ]
    );
}
