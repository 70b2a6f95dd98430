//! Test harness for Tally's end-to-end tests.
#![expect(
    clippy::expect_used,
    clippy::panic,
    reason = "test harness: a failed setup is a failed test, with its message"
)]

pub mod agent;
pub mod alertmanager;
pub mod catalogue;
pub mod cgroup;
pub mod cri_client;
pub mod fake_cri;
pub mod fake_engine;
pub mod fake_nri;
pub mod fake_nvml;
pub mod fake_rdma;
pub mod gpu;
pub mod llama;
pub mod module_graph;
pub mod otlp_receiver;
pub mod prometheus;
pub mod receiver;
pub mod require;
pub mod tcp_probe;
