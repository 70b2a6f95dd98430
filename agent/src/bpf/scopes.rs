//! What the scope tries hold: loopback and the node's own addresses as `node`, then the
//! configured ranges.

use std::net::IpAddr;

use tally_ebpf::net::ScopeCidr;
use tally_ebpf::scope;

use crate::config::{Cidr, Config};

/// The scope tries' contents: loopback and the node's own addresses, then the configured ranges.
pub(super) fn scope_ranges(config: &Config) -> Vec<ScopeCidr> {
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
    use crate::config::Config;

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
