//! The agent's side of the eBPF sources: starts them as the configuration allows, turns their
//! per-cgroup-id cumulative counters into per-workload increments in the ledger, and deletes map
//! entries of cgroups that are gone once their final values are in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use tally_ebpf::net::{Net, NetConfig, ScopeCidr};
use tally_ebpf::stats::StatsGuard;
use tally_ebpf::{chain, scope, NetKey, NetValue, ProbeStatus, ProgramStats};

use crate::cgroupfs::layout::Layout;
use crate::cgroupfs::Discovery;
use crate::config::{Cidr, Config};
use crate::errors::ErrorCounts;
use crate::identity::Workload;
use crate::ledger::{CounterId, Ledger};

const COLLECTOR: &str = "ebpf";

/// The loaded eBPF sources and what the agent remembers between ticks to turn their counters into
/// increments.
#[derive(Debug, Default)]
pub struct BpfSources {
    net: Option<Net>,
    _stats: Option<StatsGuard>,
    statuses: Vec<ProbeStatus>,
    /// Last cumulative value of each map entry.
    last: HashMap<NetKey, NetValue>,
    /// Cgroup id → workload as of the previous tick, for ids whose cgroup vanished since.
    owners: HashMap<u64, Arc<Workload>>,
}

impl BpfSources {
    /// Loads what this kernel and configuration allow; failures become probe statuses, never
    /// errors.
    pub fn start(config: &Config, layout: &Layout) -> BpfSources {
        let mut sources = BpfSources::default();
        if !config.ebpf.enabled {
            tracing::info!("eBPF sources disabled by `ebpf.enabled = false`");
            return sources;
        }
        sources._stats = match StatsGuard::enable() {
            Ok(guard) => Some(guard),
            Err(e) => {
                tracing::warn!(error = %chain(&e), "bpf_stats unavailable: program run times will read 0");
                None
            }
        };
        let disabled = |m: &str| config.ebpf.disabled_methods.iter().any(|d| d == m);
        let status = match (&layout.unified, disabled("cgroup_skb")) {
            (_, true) => down(
                "network",
                "cgroup_skb",
                "disabled by `ebpf.disabled_methods`",
            ),
            (None, false) => down(
                "network",
                "cgroup_skb",
                "no cgroup v2 hierarchy to attach to",
            ),
            (Some(root), false) => {
                let net_config = NetConfig {
                    cgroup2_root: root.clone(),
                    max_entries: config.ebpf.max_net_entries,
                    scopes: scope_ranges(config),
                };
                match Net::load(&net_config) {
                    Ok(net) => {
                        sources.net = Some(net);
                        ProbeStatus {
                            probe: "network",
                            method: "cgroup_skb",
                            up: true,
                            error: None,
                        }
                    }
                    Err(e) => down("network", "cgroup_skb", &chain(&e)),
                }
            }
        };
        if let Some(error) = &status.error {
            tracing::warn!(probe = status.probe, method = status.method, %error, "probe not loaded");
        } else {
            tracing::info!(probe = status.probe, method = status.method, "probe loaded");
        }
        sources.statuses.push(status);
        sources
    }

    /// Applies a reloaded configuration's scopes.
    pub fn reconfigure(&mut self, config: &Config, errors: &mut ErrorCounts) {
        if let Some(net) = &mut self.net {
            if let Err(e) = net.set_scopes(&scope_ranges(config)) {
                errors.record(COLLECTOR, "map", || chain(&e));
            }
        }
    }

    pub fn statuses(&self) -> &[ProbeStatus] {
        &self.statuses
    }

    pub fn program_stats(&self) -> Vec<ProgramStats> {
        self.net
            .as_ref()
            .map(Net::program_stats)
            .unwrap_or_default()
    }

    /// Updates lost to full maps, by map.
    pub fn lost(&self, errors: &mut ErrorCounts) -> Vec<(&'static str, u64)> {
        let Some(net) = &self.net else {
            return Vec::new();
        };
        match net.lost() {
            Ok(n) => vec![("NET_STATS", n)],
            Err(e) => {
                errors.record(COLLECTOR, "map", || chain(&e));
                Vec::new()
            }
        }
    }

    /// Reads the maps and adds what grew since the last tick to the owning workloads.
    /// `workloads[i]` is the workload of `discovery.found[i]`; ids of cgroups that are not
    /// workloads go to `host`.
    pub fn collect(
        &mut self,
        discovery: &Discovery,
        workloads: &[Arc<Workload>],
        host: &Arc<Workload>,
        ledger: &mut Ledger,
        errors: &mut ErrorCounts,
    ) {
        let Some(net) = &mut self.net else { return };
        let entries = match net.read() {
            Ok(entries) => entries,
            Err(e) => {
                errors.record(COLLECTOR, "map", || chain(&e));
                return;
            }
        };
        let owners: HashMap<u64, Arc<Workload>> = discovery
            .v2_ids
            .iter()
            .filter_map(|(id, owner)| Some((*id, workloads.get((*owner)?)?.clone())))
            .collect();
        let mut gone = Vec::new();
        let mut host_used = false;
        for (key, value) in entries {
            let live = discovery.v2_ids.contains_key(&key.cgroup_id);
            let workload = owners
                .get(&key.cgroup_id)
                .or_else(|| self.owners.get(&key.cgroup_id))
                .unwrap_or_else(|| {
                    host_used = true;
                    host
                });
            let last = self.last.insert(key, value).unwrap_or_default();
            // A smaller value means the entry was deleted and re-created in between.
            let delta = |now: u64, before: u64| if now >= before { now - before } else { now };
            let bytes = delta(value.bytes, last.bytes);
            let packets = delta(value.packets, last.packets);
            if packets > 0 {
                let (direction, scope) = (key.direction, key.scope);
                ledger.add(
                    workload.clone(),
                    CounterId::NetBytes { direction, scope },
                    bytes as f64,
                );
                ledger.add(
                    workload.clone(),
                    CounterId::NetPackets { direction, scope },
                    packets as f64,
                );
            }
            if !live {
                gone.push(key);
            }
        }
        if host_used {
            ledger.touch(host.clone());
        }
        if let Err(e) = net.remove(&gone) {
            errors.record(COLLECTOR, "map", || chain(&e));
        }
        for key in &gone {
            self.last.remove(key);
        }
        self.owners = owners;
    }
}

fn down(probe: &'static str, method: &'static str, error: &str) -> ProbeStatus {
    ProbeStatus {
        probe,
        method,
        up: false,
        error: Some(error.to_owned()),
    }
}

/// The scope tries' contents: loopback and the node's own addresses, then the configured ranges.
fn scope_ranges(config: &Config) -> Vec<ScopeCidr> {
    let mut ranges = vec![
        ScopeCidr {
            addr: IpAddr::from([127, 0, 0, 0]),
            prefix_len: 8,
            scope: scope::NODE,
        },
        ScopeCidr {
            addr: IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            prefix_len: 128,
            scope: scope::NODE,
        },
    ];
    for addr in interface_addresses() {
        ranges.push(ScopeCidr {
            addr,
            prefix_len: if addr.is_ipv4() { 32 } else { 128 },
            scope: scope::NODE,
        });
    }
    for (name, Cidr { addr, prefix_len }) in config.network.ranges() {
        let scope = match name {
            "node" => scope::NODE,
            "cluster" => scope::CLUSTER,
            "zone" => scope::ZONE,
            _ => scope::REGION,
        };
        ranges.push(ScopeCidr {
            addr: mask(addr, prefix_len),
            prefix_len,
            scope,
        });
    }
    // An LPM trie holds one value per prefix: the first statement of a range wins.
    let mut seen = std::collections::HashSet::new();
    ranges.retain(|r| seen.insert((r.addr, r.prefix_len)));
    ranges
}

/// The scope name of a `tally_ebpf_common::scope` value, for labels.
pub fn scope_name(scope: u32) -> &'static str {
    match scope {
        scope::NODE => "node",
        scope::CLUSTER => "cluster",
        scope::ZONE => "zone",
        scope::REGION => "region",
        _ => "internet",
    }
}

/// Zeroes the host bits, as the LPM trie expects.
fn mask(addr: IpAddr, prefix_len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::from((bits & m).to_be_bytes())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::from((bits & m).to_be_bytes())
        }
    }
}

/// The addresses of this node's interfaces (getifaddrs(3)).
fn interface_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs; we only read the
    // nodes while the list is alive, and check every pointer before dereferencing it.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut node = head;
        while !node.is_null() {
            let addr = (*node).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        out.push(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            node = (*node).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_masked_and_loopback_is_node() {
        assert_eq!(
            mask("10.1.2.3".parse().unwrap(), 8),
            "10.0.0.0".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            mask("fd00::1".parse().unwrap(), 16),
            "fd00::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            mask("1.2.3.4".parse().unwrap(), 0),
            "0.0.0.0".parse::<IpAddr>().unwrap()
        );
        let mut config = Config::default();
        config.network.cluster_cidrs = vec!["10.96.3.4/12".into()];
        let ranges = scope_ranges(&config);
        assert_eq!(ranges[0].scope, scope::NODE);
        let cluster = ranges.iter().find(|r| r.scope == scope::CLUSTER).unwrap();
        assert_eq!(cluster.addr, "10.96.0.0".parse::<IpAddr>().unwrap());
        assert!(ranges
            .iter()
            .any(|r| r.addr == "127.0.0.0".parse::<IpAddr>().unwrap()));
    }
}
