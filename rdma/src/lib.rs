//! Tally's RDMA metering: port counters from sysfs and per-process QP counters through RDMA
//! netlink (nldev). It knows devices, ports, pids and QPs, never containers or pods.
//!
//! - [`sysfs`]: devices, their PCI functions and port counters under a configurable sysfs root.
//! - [`netlink`]: our own nldev codec (tested byte for byte against messages built from the
//!   kernel's `rdma_netlink.h`) and a client over the kernel's socket or a unix socket relaying
//!   the same datagrams.
//! - [`process`]: QP counters in auto pid mode, turned on only when allowed and restored on
//!   drop, sampled into per-pid traffic windows.

pub mod netlink;
pub mod process;
pub mod sysfs;

pub use netlink::{Availability, Client, Endpoint, NetlinkError};
pub use process::{
    PortMode, ProcessCounters, ProcessOptions, ProcessSample, ProcessTraffic, Traffic,
};
