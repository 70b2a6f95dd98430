//! What the scope tries hold: loopback and the node's own addresses as `node`, then the
//! configured ranges. The node's addresses are followed: an rtnetlink socket subscribed to
//! address changes is drained every tick (one `recv` that finds nothing, while nothing changes),
//! and when it says anything changed, or every [`RECHECK`] where no such socket opens, the
//! addresses are read again and the tries updated.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use tally_ebpf::net::ScopeCidr;
use tally_ebpf::scope;

use crate::config::{Cidr, Config};

/// How often the addresses are read again where no rtnetlink socket could be opened.
pub(super) const RECHECK: Duration = Duration::from_secs(10);

/// The tries' contents, and what they were built from.
#[derive(Debug, Default)]
pub(super) struct NodeScopes {
    /// The configured ranges, masked, in order.
    configured: Vec<ScopeCidr>,
    /// The node's addresses, sorted.
    addresses: Vec<IpAddr>,
    /// Address-change notifications; `None` where the socket could not be opened.
    events: Option<OwnedFd>,
    checked: Option<Instant>,
}

impl NodeScopes {
    pub(super) fn new(config: &Config) -> NodeScopes {
        let events = address_events()
            .inspect_err(|e| {
                tracing::warn!(error = %e, every = ?RECHECK, "no rtnetlink socket for address changes: reading the node's addresses periodically")
            })
            .ok();
        NodeScopes {
            configured: configured(config),
            addresses: node_addresses(),
            events,
            checked: Some(Instant::now()),
        }
    }

    /// Takes a reloaded configuration's ranges (and reads the addresses again).
    pub(super) fn reconfigure(&mut self, config: &Config) {
        self.configured = configured(config);
        self.addresses = node_addresses();
        self.checked = Some(Instant::now());
    }

    /// What the tries should hold.
    pub(super) fn ranges(&self) -> Vec<ScopeCidr> {
        ranges(&self.addresses, &self.configured)
    }

    /// Whether the node's addresses may have changed since the last look: a notification
    /// arrived, or (without the socket) [`RECHECK`] passed.
    pub(super) fn due(&mut self, now: Instant) -> bool {
        match &self.events {
            Some(fd) => drain(fd),
            None => self
                .checked
                .is_none_or(|at| now.saturating_duration_since(at) >= RECHECK),
        }
    }

    /// Takes the node's addresses as read at `now`; the new ranges when they changed.
    pub(super) fn update(
        &mut self,
        now: Instant,
        mut addresses: Vec<IpAddr>,
    ) -> Option<Vec<ScopeCidr>> {
        self.checked = Some(now);
        addresses.sort();
        addresses.dedup();
        if addresses == self.addresses {
            return None;
        }
        let added: Vec<&IpAddr> = addresses
            .iter()
            .filter(|a| !self.addresses.contains(a))
            .collect();
        let removed: Vec<&IpAddr> = self
            .addresses
            .iter()
            .filter(|a| !addresses.contains(a))
            .collect();
        tracing::info!(
            ?added,
            ?removed,
            "the node's addresses changed: updating scope `node`"
        );
        self.addresses = addresses;
        Some(self.ranges())
    }
}

/// The node's addresses, sorted.
pub(super) fn node_addresses() -> Vec<IpAddr> {
    let mut addresses = interface_addresses();
    addresses.sort();
    addresses.dedup();
    addresses
}

/// The configured ranges, masked, in the order the tries are filled.
fn configured(config: &Config) -> Vec<ScopeCidr> {
    config
        .network
        .ranges()
        .into_iter()
        .map(|(name, Cidr { addr, prefix_len })| ScopeCidr {
            addr: mask(addr, prefix_len),
            prefix_len,
            scope: match name {
                "node" => scope::NODE,
                "cluster" => scope::CLUSTER,
                "zone" => scope::ZONE,
                _ => scope::REGION,
            },
        })
        .collect()
}

/// The scope tries' contents: loopback and the node's own addresses, then the configured ranges.
fn ranges(addresses: &[IpAddr], configured: &[ScopeCidr]) -> Vec<ScopeCidr> {
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
    for &addr in addresses {
        ranges.push(ScopeCidr {
            addr,
            prefix_len: if addr.is_ipv4() { 32 } else { 128 },
            scope: scope::NODE,
        });
    }
    ranges.extend_from_slice(configured);
    // An LPM trie holds one value per prefix: the first statement of a range wins.
    let mut seen = std::collections::HashSet::new();
    ranges.retain(|r| seen.insert((r.addr, r.prefix_len)));
    ranges
}

/// An rtnetlink socket subscribed to IPv4 and IPv6 address changes, non-blocking.
fn address_events() -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscalls on a socket this function owns from creation; the address struct is
    // zeroed and then filled field by field.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = (libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
        let bound = libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        );
        if bound != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// Reads every pending notification; whether there was any (an overrun counts: something
/// changed, and what is lost does not matter, as the addresses are read afresh).
fn drain(fd: &OwnedFd) -> bool {
    let mut any = false;
    let mut buf = [0u8; 8192];
    loop {
        // SAFETY: recv into a buffer of the length given.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n > 0 {
            any = true;
            continue;
        }
        if n == 0 {
            return any;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ENOBUFS) => any = true,
            _ => return any,
        }
    }
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn changed_addresses_replace_the_node_ranges_and_configured_ones_stay() {
        let mut config = Config::default();
        config.network.cluster_cidrs = vec!["10.96.0.0/12".into()];
        let t0 = Instant::now();
        let mut scopes = NodeScopes {
            configured: configured(&config),
            addresses: vec![ip("10.0.0.5")],
            events: None,
            checked: Some(t0),
        };
        // Without the rtnetlink socket: due every RECHECK.
        assert!(!scopes.due(t0 + RECHECK / 2));
        assert!(scopes.due(t0 + RECHECK));
        assert_eq!(scopes.update(t0 + RECHECK, vec![ip("10.0.0.5")]), None);
        assert!(!scopes.due(t0 + RECHECK + RECHECK / 2));

        let ranges = scopes
            .update(
                t0 + RECHECK * 2,
                vec![ip("fd00::7"), ip("10.0.0.6"), ip("10.0.0.6")],
            )
            .unwrap();
        let node = |addr: &str, prefix_len| ScopeCidr {
            addr: ip(addr),
            prefix_len,
            scope: scope::NODE,
        };
        assert_eq!(
            ranges,
            [
                node("127.0.0.0", 8),
                node("::1", 128),
                node("10.0.0.6", 32),
                node("fd00::7", 128),
                ScopeCidr {
                    addr: ip("10.96.0.0"),
                    prefix_len: 12,
                    scope: scope::CLUSTER,
                },
            ]
        );
    }

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
        let ranges = ranges(&[], &configured(&config));
        assert_eq!(ranges[0].scope, scope::NODE);
        let cluster = ranges.iter().find(|r| r.scope == scope::CLUSTER).unwrap();
        assert_eq!(cluster.addr, "10.96.0.0".parse::<IpAddr>().unwrap());
        assert!(ranges
            .iter()
            .any(|r| r.addr == "127.0.0.0".parse::<IpAddr>().unwrap()));
    }
}
