//! What the node's cgroup tree says on its own: which hierarchies it has and where ([`layout`]),
//! what workload a cgroup path names ([`path`]), and which workload cgroups exist now ([`walk`]).
//!
//! Below everything but the error counts: the cgroupfs collector, workload identity, the sources,
//! budgets and `tally check` can all build on it without depending on each other.

pub mod layout;
pub mod path;
mod walk;

pub use walk::{discover, Discovery, Found};
