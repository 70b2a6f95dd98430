//! Network bytes per cgroup, direction and destination scope: the `net_egress` / `net_ingress`
//! `cgroup_skb` programs attached at the cgroup v2 root, and the LPM tries that classify remote
//! addresses. `net_egress` also enforces the egress rate limits ([`crate::throttle`]), whose maps
//! [`Net::take_egress_limits`] hands over.

use std::fs::File;
use std::net::IpAddr;
use std::path::PathBuf;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};
use aya::programs::cgroup_skb::CgroupSkbAttachType;
use aya::programs::{CgroupAttachMode, CgroupSkb};
use aya::{Ebpf, EbpfLoader};
use tally_ebpf_common::{NetKey, NetValue};

use crate::throttle::EgressLimits;
use crate::{Error, ProgramStats, TALLY_OBJECT};

const OBJECT: &str = "tally.bpf.o";
const PROGRAMS: [(&str, CgroupSkbAttachType); 2] = [
    ("net_egress", CgroupSkbAttachType::Egress),
    ("net_ingress", CgroupSkbAttachType::Ingress),
];

/// One configured address range and the scope it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScopeCidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
    /// One of `tally_ebpf_common::scope`'s values.
    pub scope: u32,
}

#[derive(Debug, Clone)]
pub struct NetConfig {
    /// The cgroup v2 mount the programs attach to (its root applies to every cgroup below).
    pub cgroup2_root: PathBuf,
    /// Entries of `NET_STATS` (one per cgroup × direction × scope seen).
    pub max_entries: u32,
    pub scopes: Vec<ScopeCidr>,
}

/// The loaded and attached network programs. Dropping it detaches them and frees the maps;
/// nothing is pinned.
pub struct Net {
    ebpf: Ebpf,
    stats: PerCpuHashMap<MapData, NetKey, NetValue>,
    lost: PerCpuArray<MapData, u64>,
    v4: LpmTrie<MapData, [u8; 4], u32>,
    v6: LpmTrie<MapData, [u8; 16], u32>,
    installed: Vec<ScopeCidr>,
    limits: Option<EgressLimits>,
}

impl Net {
    pub fn load(config: &NetConfig) -> Result<Net, Error> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("NET_STATS", config.max_entries)
            .load(TALLY_OBJECT)
            .map_err(|source| Error::Load {
                object: OBJECT,
                source,
            })?;
        let cgroup = File::open(&config.cgroup2_root).map_err(|source| Error::OpenCgroup {
            path: config.cgroup2_root.clone(),
            source,
        })?;
        for (name, attach_type) in PROGRAMS {
            let program: &mut CgroupSkb = ebpf
                .program_mut(name)
                .ok_or(Error::MissingProgram {
                    object: OBJECT,
                    program: name,
                })?
                .try_into()
                .map_err(|source| Error::Program {
                    program: name,
                    action: "not a cgroup_skb program",
                    source,
                })?;
            program.load().map_err(|source| Error::Program {
                program: name,
                action: "loading",
                source,
            })?;
            program
                .attach(&cgroup, attach_type, attach_mode())
                .map_err(|source| Error::Program {
                    program: name,
                    action: "attaching at the cgroup v2 root",
                    source,
                })?;
        }
        let stats = take_map(&mut ebpf, "NET_STATS")?;
        let lost = take_map(&mut ebpf, "NET_LOST")?;
        let v4 = take_map(&mut ebpf, "SCOPES_V4")?;
        let v6 = take_map(&mut ebpf, "SCOPES_V6")?;
        let limits = Some(EgressLimits::new(
            take_map(&mut ebpf, "EGRESS_LIMITS")?,
            take_map(&mut ebpf, "EGRESS_LIMITS_ACTIVE")?,
            take_map(&mut ebpf, "EGRESS_DROPS")?,
        ));
        let mut net = Net {
            ebpf,
            stats,
            lost,
            v4,
            v6,
            installed: Vec::new(),
            limits,
        };
        net.set_scopes(&config.scopes)?;
        Ok(net)
    }

    /// Replaces the scope tries' contents with `scopes` (on start, on reload, when the node's
    /// addresses change): the new ranges are written first (a prefix already there takes its new
    /// scope in place), then the ranges no longer wanted are removed, so no packet meanwhile
    /// finds a range missing that both the old and the new contents have.
    pub fn set_scopes(&mut self, scopes: &[ScopeCidr]) -> Result<(), Error> {
        let lpm = |action| {
            move |source| Error::Map {
                map: "SCOPES",
                action,
                source,
            }
        };
        let prefix = |c: &ScopeCidr| (c.addr, c.prefix_len);
        for cidr in scopes {
            let len = u32::from(cidr.prefix_len);
            match cidr.addr {
                IpAddr::V4(a) => self
                    .v4
                    .insert(&Key::new(len, a.octets()), cidr.scope, 0)
                    .map_err(lpm("inserting a range"))?,
                IpAddr::V6(a) => self
                    .v6
                    .insert(&Key::new(len, a.octets()), cidr.scope, 0)
                    .map_err(lpm("inserting a range"))?,
            }
            match self
                .installed
                .iter_mut()
                .find(|c| prefix(c) == prefix(cidr))
            {
                Some(c) => *c = *cidr,
                None => self.installed.push(*cidr),
            }
        }
        let wanted: std::collections::HashSet<(IpAddr, u8)> = scopes.iter().map(prefix).collect();
        let stale: Vec<ScopeCidr> = (self.installed.iter())
            .filter(|c| !wanted.contains(&prefix(c)))
            .copied()
            .collect();
        for old in stale {
            let len = u32::from(old.prefix_len);
            match old.addr {
                IpAddr::V4(a) => self.v4.remove(&Key::new(len, a.octets())),
                IpAddr::V6(a) => self.v6.remove(&Key::new(len, a.octets())),
            }
            // Still listed on failure: the next call tries again.
            .map_err(lpm("removing a range"))?;
            self.installed.retain(|c| prefix(c) != prefix(&old));
        }
        Ok(())
    }

    /// Every entry, summed over CPUs: cumulative bytes and packets since the entry was created.
    pub fn read(&self) -> Result<Vec<(NetKey, NetValue)>, Error> {
        crate::source::read_summed(&self.stats, "NET_STATS", |sum, v| {
            sum.bytes = sum.bytes.wrapping_add(v.bytes);
            sum.packets = sum.packets.wrapping_add(v.packets);
        })
    }

    /// Deletes the entries of cgroups that no longer exist, after their final values were read.
    pub fn remove(&mut self, keys: &[NetKey]) -> Result<(), Error> {
        crate::source::remove_keys(&mut self.stats, "NET_STATS", keys)
    }

    /// Updates dropped because `NET_STATS` was full, since load.
    pub fn lost(&self) -> Result<u64, Error> {
        crate::source::read_lost(&self.lost, "NET_LOST")
    }

    /// Hands the egress limit maps over to whoever enforces limits; `None` once taken.
    pub fn take_egress_limits(&mut self) -> Option<EgressLimits> {
        self.limits.take()
    }

    pub fn program_stats(&self) -> Vec<ProgramStats> {
        PROGRAMS
            .iter()
            .filter_map(|(name, _)| crate::stats::program_stats(name, self.ebpf.program(name)?))
            .collect()
    }
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("scopes", &self.installed)
            .field("egress_limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// How to attach next to other programs at the same cgroup. From 5.7 aya attaches through
/// `bpf_link_create`, whose cgroup links always coexist and which refuses any flag
/// (kernel/bpf/cgroup.c, `cgroup_bpf_link_attach`); before, `BPF_PROG_ATTACH` needs
/// `BPF_F_ALLOW_MULTI` not to evict or be evicted.
pub(crate) fn attach_mode() -> CgroupAttachMode {
    match aya::util::KernelVersion::current() {
        Ok(v) if v >= aya::util::KernelVersion::new(5, 7, 0) => CgroupAttachMode::Single,
        _ => CgroupAttachMode::AllowMultiple,
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::MissingMap {
        object: OBJECT,
        map: name,
    })?;
    T::try_from(map).map_err(|source| Error::Map {
        map: name,
        action: "unexpected type",
        source,
    })
}
