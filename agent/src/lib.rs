//! The Tally node agent: workload identity, the ledger, budgets, the HTTP API and the CLI.
//!
//! It joins what the source crates measure (`tally-ebpf` by cgroup id, `tally-gpu` by device and
//! pid, cgroupfs by path) into per-workload counters, and never touches BPF maps or NVML handles
//! itself.

pub mod alerts;
pub mod bpf;
pub mod budget;
pub mod catalogue;
pub mod cgroupfs;
pub mod check;
pub mod cluster;
pub mod config;
pub mod cost;
pub mod errors;
pub mod gpu;
pub mod health;
pub mod host;
pub mod identity;
pub mod inference;
pub mod ledger;
pub mod nri;
pub mod otlp;
pub mod rdma;
pub mod registry;
pub mod runtime;
pub mod server;
pub mod source;
pub mod supervise;
mod sys;
pub mod tick;
pub mod top;
