//! RDMA devices and port counters from sysfs (`<sys_root>/class/infiniband`), laid out by
//! drivers/infiniband/core/sysfs.c:
//!
//! ```text
//! class/infiniband/<dev>/device            -> the PCI function (its name is the PCI address)
//! class/infiniband/<dev>/ports/<n>/state       "4: ACTIVE"
//! class/infiniband/<dev>/ports/<n>/rate        "200 Gb/sec (4X HDR)"
//! class/infiniband/<dev>/ports/<n>/link_layer  "InfiniBand" | "Ethernet"
//! class/infiniband/<dev>/ports/<n>/counters/   IB PMA counters: port_xmit_data, port_rcv_data
//!                                              (4-octet units), port_xmit_packets, errors, ...
//! class/infiniband/<dev>/ports/<n>/hw_counters/ the driver's own (mlx5, rxe, bnxt_re, ...)
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// `hw_counters` files that are settings, not counters (`lifespan`: how long the kernel caches
/// the values, in ms).
const NOT_COUNTERS: [&str; 1] = ["lifespan"];

#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    #[error("listing {}", path.display())]
    List {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An RDMA device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    /// The PCI address of the function behind it (an SR-IOV VF's own), from the `device` link.
    pub pci_address: Option<String>,
    /// Port numbers, ascending.
    pub ports: Vec<u32>,
}

/// A port's state and counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortCounters {
    pub device: String,
    pub port: u32,
    /// `ACTIVE`, `DOWN`, ... (the name after the number).
    pub state: Option<String>,
    pub link_layer: Option<String>,
    pub rate: Option<String>,
    /// `counters/`, raw (data counters in 4-octet units).
    pub counters: BTreeMap<String, u64>,
    /// `hw_counters/`.
    pub hw_counters: BTreeMap<String, u64>,
}

impl PortCounters {
    /// `port_xmit_data` × 4: the IB PMA counts data in units of 4 octets.
    pub fn transmit_bytes(&self) -> Option<u64> {
        self.counters
            .get("port_xmit_data")
            .map(|v| v.saturating_mul(4))
    }

    /// `port_rcv_data` × 4.
    pub fn receive_bytes(&self) -> Option<u64> {
        self.counters
            .get("port_rcv_data")
            .map(|v| v.saturating_mul(4))
    }

    /// `port_xmit_packets`; on a port without `counters/`, soft-RoCE's `sent_pkts` (rxe counts
    /// every packet it hands to the network or loops back, ACKs included, as the PMA counter
    /// does: drivers/infiniband/sw/rxe/rxe_net.c, `rxe_xmit_packet`).
    pub fn transmit_packets(&self) -> Option<u64> {
        self.counters
            .get("port_xmit_packets")
            .or_else(|| self.hw_counters.get("sent_pkts"))
            .copied()
    }

    /// `port_rcv_packets`; on a port without `counters/`, soft-RoCE's `rcvd_pkts` (every packet
    /// rxe accepted: rxe_recv.c, `rxe_rcv`).
    pub fn receive_packets(&self) -> Option<u64> {
        self.counters
            .get("port_rcv_packets")
            .or_else(|| self.hw_counters.get("rcvd_pkts"))
            .copied()
    }
}

/// `<sys_root>/class/infiniband`.
pub fn class_dir(sys_root: &Path) -> PathBuf {
    sys_root.join("class/infiniband")
}

/// Every RDMA device, sorted by name; none (not an error) when the class directory is missing.
pub fn devices(sys_root: &Path) -> Result<Vec<Device>, SysfsError> {
    let dir = class_dir(sys_root);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(SysfsError::List { path: dir, source }),
    };
    let mut out = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = dir.join(&name);
        let pci_address = fs::read_link(path.join("device"))
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()));
        let mut ports: Vec<u32> = fs::read_dir(path.join("ports"))
            .map(|it| {
                it.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        ports.sort_unstable();
        out.push(Device {
            name,
            pci_address,
            ports,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Reads one port. Files that are missing or do not hold a number are left out: some drivers
/// refuse reads of counters they lack (`EINVAL`), and a port without `counters/` (rxe, siw) has
/// only `hw_counters/`.
pub fn read_port(sys_root: &Path, device: &str, port: u32) -> Result<PortCounters, SysfsError> {
    let dir = class_dir(sys_root)
        .join(device)
        .join("ports")
        .join(port.to_string());
    if let Err(source) = fs::metadata(&dir) {
        return Err(SysfsError::List { path: dir, source });
    }
    let text = |name: &str| {
        fs::read_to_string(dir.join(name))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    Ok(PortCounters {
        device: device.to_owned(),
        port,
        state: text("state").map(|s| match s.split_once(':') {
            Some((_, name)) => name.trim().to_owned(),
            None => s,
        }),
        link_layer: text("link_layer"),
        rate: text("rate"),
        counters: numbers(&dir.join("counters")),
        hw_counters: numbers(&dir.join("hw_counters")),
    })
}

fn numbers(dir: &Path) -> BTreeMap<String, u64> {
    let Ok(entries) = fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if NOT_COUNTERS.contains(&name.as_str()) {
                return None;
            }
            let value = fs::read_to_string(e.path()).ok()?.trim().parse().ok()?;
            Some((name, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::PortCounters;

    fn port(counters: &[(&str, u64)], hw_counters: &[(&str, u64)]) -> PortCounters {
        let map =
            |pairs: &[(&str, u64)]| pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
        PortCounters {
            counters: map(counters),
            hw_counters: map(hw_counters),
            ..PortCounters::default()
        }
    }

    #[test]
    fn packets_come_from_the_pma_counters_else_from_soft_roces_own() {
        // rxe: no counters/, its own packet counts; no bytes anywhere.
        let rxe = port(
            &[],
            &[("sent_pkts", 412), ("rcvd_pkts", 409), ("rdma_sends", 200)],
        );
        assert_eq!(rxe.transmit_packets(), Some(412));
        assert_eq!(rxe.receive_packets(), Some(409));
        assert_eq!(rxe.transmit_bytes(), None);
        // A port with both: the PMA counter wins.
        let both = port(
            &[
                ("port_xmit_packets", 7),
                ("port_rcv_packets", 8),
                ("port_xmit_data", 10),
            ],
            &[("sent_pkts", 1), ("rcvd_pkts", 2)],
        );
        assert_eq!(both.transmit_packets(), Some(7));
        assert_eq!(both.receive_packets(), Some(8));
        assert_eq!(both.transmit_bytes(), Some(40));
        // A driver's counter of another name is not a packet count.
        let mlx5 = port(&[], &[("out_of_sequence", 3)]);
        assert_eq!(mlx5.transmit_packets(), None);
    }
}
