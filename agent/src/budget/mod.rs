//! Budgets and local enforcement of the policy in `crate::config::policy`: usage windows over the
//! ledger, the decisions, the actuators that throttle, the state file that makes every throttle
//! reversible, and alerts.

pub mod actuator;
pub mod engine;
pub mod freeze;
pub mod salvage;
pub mod state;
pub mod verdict;
pub mod window;

pub use engine::{AlertSink, Engine, Inputs, Placement};
