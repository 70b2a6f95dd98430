//! What the node's cgroup tree says on its own: which hierarchies it has and where ([`layout`]),
//! and what workload a cgroup path names ([`path`]).
//!
//! A leaf: it uses no other module of the agent, so the cgroupfs collector, workload identity,
//! budgets and `tally check` can all build on it without depending on each other.

pub mod layout;
pub mod path;
