//! The RDMA item: devices in sysfs, and whether RDMA netlink answers for per-process counters.
//! Only reads: the QP counter mode is asked, never changed.

use std::time::Duration;

use tally_rdma::netlink::{Client, Endpoint};
use tally_rdma::{sysfs, Availability};

use super::{Item, Status};
use crate::config::Config;

const NAME: &str = "rdma";

pub(super) fn rdma_item(config: &Config) -> Item {
    if !config.rdma.enabled {
        return Item::new(
            NAME,
            Status::NotChecked,
            "disabled by `rdma.enabled = false`",
        );
    }
    let dir = sysfs::class_dir(&config.paths.sys_root);
    let devices = match sysfs::devices(&config.paths.sys_root) {
        Ok(devices) => devices,
        Err(e) => {
            return Item::new(NAME, Status::Degraded, tally_error_chain::chain(&e));
        }
    };
    if devices.is_empty() {
        let why = if dir.exists() {
            "is empty"
        } else {
            "does not exist"
        };
        return Item::new(
            NAME,
            Status::Absent,
            format!("{} {why}: no RDMA devices", dir.display()),
        );
    }
    let listed = devices
        .iter()
        .map(|d| match d.ports.len() {
            1 => format!("{} (1 port)", d.name),
            n => format!("{} ({n} ports)", d.name),
        })
        .collect::<Vec<_>>()
        .join(", ");
    if !config.rdma.netlink {
        return Item::new(
            NAME,
            Status::Ok,
            format!(
                "{listed}; per-process counters off by `rdma.netlink = false`: port counters only"
            ),
        );
    }
    let endpoint = if config.rdma.netlink_socket.as_os_str().is_empty() {
        Endpoint::Kernel
    } else {
        Endpoint::Unix(config.rdma.netlink_socket.clone())
    };
    let timeout = Duration::from_millis(config.rdma.netlink_timeout_ms);
    let modes = Client::connect(&endpoint, timeout).and_then(|mut client| {
        let known = client.devices()?;
        let mut modes = Vec::new();
        for d in &devices {
            let Some(nl) = known.iter().find(|k| k.name == d.name) else {
                modes.push(format!("{}: not known to RDMA netlink", d.name));
                continue;
            };
            for &port in &d.ports {
                let mode = client.qp_mode(nl.index, port)?;
                let what = if mode.is_auto_pid() {
                    "per process".to_owned()
                } else if mode.describe() == "qp auto off" {
                    if config.rdma.allow_qp_counter_auto_mode {
                        "the agent turns auto mode on".to_owned()
                    } else {
                        "per port only: `rdma.allow_qp_counter_auto_mode` is false".to_owned()
                    }
                } else {
                    "set by someone else: counters attributed where their QPs share a process"
                        .to_owned()
                };
                modes.push(format!("{}/{port}: {} ({what})", d.name, mode.describe()));
            }
        }
        Ok(modes)
    });
    match modes {
        Ok(modes) => Item::new(NAME, Status::Ok, format!("{listed}; {}", modes.join(", "))),
        Err(e) => {
            let what = match e.availability() {
                Availability::Unsupported => "unsupported",
                Availability::NotPermitted => "not permitted",
                Availability::Failed => "failed",
            };
            Item::new(
                NAME,
                Status::Degraded,
                format!(
                    "{listed}; RDMA netlink ({endpoint}) {what}: {}: port counters only, no per-process attribution",
                    tally_error_chain::chain(&e)
                ),
            )
        }
    }
}
