//! The cgroupfs collector: per-workload CPU, memory and disk from cgroup files, v1 and v2.

pub mod layout;
