//! The agent's side of the eBPF sources: starts them as the configuration allows, turns their
//! per-cgroup-id cumulative counters into per-workload increments in the ledger, and deletes map
//! entries of cgroups that are gone once their final values are in.

mod churn;
mod keys;
mod sampler;
mod scopes;
mod source;

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_ebpf::disk::{Disk, DiskConfig};
use tally_ebpf::lifecycle::{Lifecycle, LifecycleConfig};
use tally_ebpf::net::{Net, NetConfig};
use tally_ebpf::tcp::{Tcp, TcpConfig};
use tally_ebpf::throttle::EgressLimits;
use tally_ebpf::{direction, DiskValue, NetKey, NetValue, ProbeStatus, ProgramStats, TcpValue};
use tally_error_chain::chain;

use keys::KEYS;
use sampler::StatsSampler;
pub use scopes::scope_name;

use crate::config::Config;
use crate::errors::ErrorCounts;
use crate::host::layout::Layout;
use crate::host::Discovery;
use crate::identity::{Identity, Workload};
use crate::ledger::{Ledger, Observed};

const COLLECTOR: &str = "ebpf";

/// The loaded eBPF sources and what the agent remembers between ticks to turn their counters into
/// increments.
#[derive(Debug, Default)]
pub struct BpfSources {
    net: Option<Net>,
    tcp: Option<Tcp>,
    disk: Option<Disk>,
    /// Cgroups and tasks as they come and go.
    churn: Option<churn::Churn>,
    /// Workloads of cgroups gone since the last tick or two: made and removed between walks
    /// (see `churn`), or listed by an earlier walk.
    churned: churn::Gone,
    stats: StatsSampler,
    statuses: Vec<ProbeStatus>,
    /// Last cumulative value of each map entry.
    last_net: HashMap<NetKey, NetValue>,
    last_tcp: HashMap<u64, TcpValue>,
    last_disk: HashMap<u64, DiskValue>,
    /// Cgroup id → workload as of the previous tick, for ids whose cgroup vanished since.
    owners: HashMap<u64, Owner>,
    /// Counter updates the programs dropped on full maps, by map, as of the last tick.
    lost: Vec<(&'static str, u64)>,
    /// The scope tries' contents, following the node's addresses.
    scopes: scopes::NodeScopes,
}

/// The workload a cgroup id belongs to, and which cgroup of it: the id of the workload's own
/// directory (a unit restarted, or a pod's container recreated, is the same workload in a new
/// cgroup), 0 where that is not known.
#[derive(Debug, Clone)]
struct Owner {
    workload: Arc<Workload>,
    cgroup: u64,
}

/// Who a cgroup id belongs to this tick.
struct Owners<'a> {
    now: &'a HashMap<u64, Owner>,
    before: &'a HashMap<u64, Owner>,
    live: &'a HashMap<u64, Option<usize>>,
    churned: &'a churn::Gone,
    /// Cgroups made since the last walk and not removed yet: their counts wait for the walk
    /// that lists them, or the record of their removal.
    pending: &'a HashSet<u64>,
    host: &'a Arc<Workload>,
    host_used: bool,
}

impl Owners<'_> {
    /// The workload of `cgroup_id` (the host for cgroups that are not a workload's), and whether
    /// the cgroup still exists.
    fn of(&mut self, cgroup_id: u64) -> (Arc<Workload>, bool) {
        let live = self.live.contains_key(&cgroup_id);
        let workload = match self.known(cgroup_id) {
            Some(owner) => owner.workload,
            None => {
                self.host_used = true;
                self.host.clone()
            }
        };
        (workload, live)
    }

    /// Whether `cgroup_id` is a cgroup made since the last walk, whose owner is not known yet.
    fn pending(&self, cgroup_id: u64) -> bool {
        self.pending.contains(&cgroup_id)
    }

    /// The workload of `cgroup_id`, listed this tick or the last, or gone between walks; `None`
    /// for the host.
    fn known(&self, cgroup_id: u64) -> Option<Owner> {
        self.now
            .get(&cgroup_id)
            .or_else(|| self.before.get(&cgroup_id))
            .or_else(|| self.churned.get(&cgroup_id).map(|(owner, _)| owner))
            .cloned()
    }
}

/// Growth of a cumulative value; a smaller value means the entry was deleted and re-created.
fn delta(now: u64, before: u64) -> f64 {
    (if now >= before { now - before } else { now }) as f64
}

/// Remembers `value` under `key`, returning the previous one (zero when new).
fn swap<K: Eq + Hash, V: Copy + Default>(last: &mut HashMap<K, V>, key: K, value: V) -> V {
    last.insert(key, value).unwrap_or_default()
}

impl BpfSources {
    /// Hands the egress limit maps over to the budget engine's egress actuator; `None` without
    /// the network programs, or once taken.
    pub fn take_egress_limits(&mut self) -> Option<EgressLimits> {
        self.net.as_mut()?.take_egress_limits()
    }

    /// Loads what this kernel and configuration allow; failures become probe statuses, never
    /// errors.
    pub fn start(config: &Config, layout: &Layout) -> BpfSources {
        let mut sources = BpfSources::default();
        if !config.ebpf.enabled {
            tracing::info!("eBPF sources disabled by `ebpf.enabled = false`");
            return sources;
        }
        sources.stats = StatsSampler::new(
            config.ebpf.program_stats,
            Duration::from_secs(config.ebpf.program_stats_every_secs),
        );
        sources.stats.tick(Instant::now());
        sources.scopes = scopes::NodeScopes::new(config);
        let disabled = &config.ebpf.disabled_methods;
        let net = match (&layout.unified, disabled.iter().any(|m| m == "cgroup_skb")) {
            (_, true) => Err("disabled by `ebpf.disabled_methods`".to_owned()),
            (None, false) => Err("no cgroup v2 hierarchy to attach to".to_owned()),
            (Some(root), false) => Net::load(&NetConfig {
                cgroup2_root: root.clone(),
                max_entries: config.ebpf.max_net_entries,
                scopes: sources.scopes.ranges(),
            })
            .map_err(|e| chain(&e)),
        };
        sources.statuses.push(ProbeStatus {
            probe: "network",
            method: "cgroup_skb",
            up: net.is_ok(),
            error: net.as_ref().err().cloned(),
        });
        sources.net = net.ok();
        let (tcp, status) = Tcp::load(&TcpConfig {
            max_entries: config.ebpf.max_cgroup_entries,
            disabled_methods: disabled.clone(),
        });
        sources.tcp = tcp;
        sources.statuses.push(status);
        let (disk, status) = Disk::load(&DiskConfig {
            max_entries: config.ebpf.max_cgroup_entries,
            disabled_methods: disabled.clone(),
        });
        sources.disk = disk;
        sources.statuses.push(status);
        let (lifecycle, status) = Lifecycle::load(&LifecycleConfig {
            max_entries: config.ebpf.max_cgroup_entries,
            disabled_methods: disabled.clone(),
        });
        let unified = layout.unified.as_deref();
        sources.churn = lifecycle.map(|l| churn::Churn::new(l, unified));
        sources.statuses.push(status);
        for status in &sources.statuses {
            match (&status.error, status.up) {
                (None, _) => {
                    tracing::info!(probe = status.probe, method = status.method, "probe loaded")
                }
                (Some(error), true) => tracing::info!(
                    probe = status.probe,
                    method = status.method,
                    fell_back_from = %error,
                    "probe loaded with a fallback method"
                ),
                (Some(error), false) => {
                    tracing::warn!(probe = status.probe, method = status.method, %error, "probe not loaded")
                }
            }
        }
        // CO-RE relocation parsed the kernel's BTF (several MB of types, once per object and
        // method tried), all freed once the programs are loaded, but kept by the allocator as
        // resident memory unless handed back.
        crate::sys::trim_heap();
        sources
    }

    /// Applies a reloaded configuration's scopes and `bpf_stats` sampling.
    fn apply(&mut self, config: &Config, errors: &mut ErrorCounts) {
        if config.ebpf.enabled {
            self.stats.reconfigure(
                config.ebpf.program_stats,
                Duration::from_secs(config.ebpf.program_stats_every_secs),
            );
        }
        if let Some(net) = &mut self.net {
            self.scopes.reconfigure(config);
            if let Err(e) = net.set_scopes(&self.scopes.ranges()) {
                errors.record(COLLECTOR, "map", || chain(&e));
            }
        }
    }

    /// Updates scope `node` when the node's addresses changed.
    fn follow_addresses(&mut self, errors: &mut ErrorCounts) {
        let Some(net) = &mut self.net else {
            return;
        };
        let now = Instant::now();
        if !self.scopes.due(now) {
            return;
        }
        if let Some(ranges) = self.scopes.update(now, scopes::node_addresses()) {
            if let Err(e) = net.set_scopes(&ranges) {
                errors.record(COLLECTOR, "map", || chain(&e));
            }
        }
    }

    pub fn statuses(&self) -> &[ProbeStatus] {
        &self.statuses
    }

    fn program_stats(&self) -> Vec<ProgramStats> {
        let mut stats = self
            .net
            .as_ref()
            .map(Net::program_stats)
            .unwrap_or_default();
        stats.extend(self.tcp.iter().flat_map(Tcp::program_stats));
        stats.extend(self.disk.iter().flat_map(Disk::program_stats));
        let churn = self.churn.iter().flat_map(|c| c.source().program_stats());
        stats.extend(churn);
        stats
    }

    /// Updates lost to full maps, by map.
    fn read_lost(&mut self, errors: &mut ErrorCounts) -> Vec<(&'static str, u64)> {
        let mut lost = Vec::new();
        let mut push = |map, result: Result<u64, tally_ebpf::Error>| match result {
            Ok(n) => lost.push((map, n)),
            Err(e) => errors.record(COLLECTOR, "map", || chain(&e)),
        };
        if let Some(net) = &self.net {
            push("NET_STATS", net.lost());
        }
        if let Some(tcp) = &self.tcp {
            push("TCP_STATS", tcp.lost());
        }
        if let Some(disk) = &self.disk {
            push("DISK_STATS", disk.lost());
        }
        if let Some(churn) = &mut self.churn {
            lost.push(("EXIT_CPU", churn.read_lost(errors)));
        }
        lost
    }

    /// Reads the maps and adds what grew since the last tick to the owning workloads.
    /// `workloads[i]` is the workload of `discovery.found[i]`; ids of cgroups that are not
    /// workloads go to `host`. Cgroups made and removed since the last walk are learnt of first,
    /// so what was counted under their ids is theirs.
    fn collect_maps(
        &mut self,
        discovery: &Discovery,
        workloads: &[Arc<Workload>],
        host: &Arc<Workload>,
        identity: &mut Identity,
        ledger: &mut Ledger,
        errors: &mut ErrorCounts,
    ) {
        self.churned.retain(|_, (_, age)| {
            *age += 1;
            *age <= churn::LATE_TICKS
        });
        if let Some(churn) = &mut self.churn {
            churn.learn(&mut self.churned, discovery, identity, ledger, errors);
        }
        let now: HashMap<u64, Owner> = discovery
            .v2_ids
            .iter()
            .filter_map(|(id, index)| {
                let index = (*index)?;
                let owner = Owner {
                    workload: workloads.get(index)?.clone(),
                    cgroup: discovery.found.get(index)?.cgroup_id,
                };
                Some((*id, owner))
            })
            .collect();
        let pending = self.churn.as_ref().map(|c| c.pending()).unwrap_or_default();
        let mut owners = Owners {
            now: &now,
            before: &self.owners,
            live: &discovery.v2_ids,
            churned: &self.churned,
            pending: &pending,
            host,
            host_used: false,
        };
        if let Some(net) = &mut self.net {
            collect_net(net, &mut self.last_net, &mut owners, ledger, errors);
        }
        if let Some(tcp) = &mut self.tcp {
            let gone = per_cgroup(
                tcp.read(),
                &mut self.last_tcp,
                &mut owners,
                errors,
                |w, v, last| {
                    let k = &*KEYS;
                    let mut row = ledger.row(w);
                    for (key, now, before) in [
                        (&k.retransmits, v.retransmits, last.retransmits),
                        (&k.opened_active, v.active_opens, last.active_opens),
                        (&k.opened_passive, v.passive_opens, last.passive_opens),
                        (&k.closed, v.closes, last.closes),
                    ] {
                        row.add(key, delta(now, before));
                    }
                },
            );
            if let Err(e) = tcp.remove(&gone) {
                errors.record(COLLECTOR, "map", || chain(&e));
            }
        }
        if let Some(disk) = &mut self.disk {
            let gone = per_cgroup(
                disk.read(),
                &mut self.last_disk,
                &mut owners,
                errors,
                |w, v, last| {
                    let k = &*KEYS;
                    let mut row = ledger.row(w);
                    let reads = delta(v.reads, last.reads);
                    let writes = delta(v.writes, last.writes);
                    for (key, value) in [
                        (&k.disk_read, delta(v.read_bytes, last.read_bytes)),
                        (&k.disk_write, delta(v.write_bytes, last.write_bytes)),
                        (&k.reads, reads),
                        (&k.writes, writes),
                    ] {
                        row.add(key, value);
                    }
                    let buckets: Vec<f64> = v
                        .latency_buckets
                        .iter()
                        .zip(last.latency_buckets)
                        .map(|(now, before)| delta(*now, before))
                        .collect();
                    let observed = Observed {
                        bounds: &DISK_LATENCY_BOUNDS,
                        buckets: &buckets,
                        count: reads + writes,
                        sum: delta(v.latency_ns_total, last.latency_ns_total),
                        scale: 1e-9,
                    };
                    row.add_observed(&k.latency, observed);
                },
            );
            if let Err(e) = disk.remove(&gone) {
                errors.record(COLLECTOR, "map", || chain(&e));
            }
        }
        if let Some(churn) = &mut self.churn {
            let live: HashSet<&crate::host::path::PathIdentity> =
                workloads.iter().map(|w| &w.identity).collect();
            churn.bill_exits(discovery, &live, &mut owners, ledger, errors);
        }
        if owners.host_used {
            ledger.touch(host);
        }
        if self.disk.is_some() {
            // A workload the block-layer programs see that did no I/O did none: 0 is a number
            // too, and it is what keeps its cgroupfs counters from showing instead.
            let seen = discovery
                .found
                .iter()
                .zip(workloads)
                .filter(|(f, _)| discovery.v2_ids.contains_key(&f.cgroup_id))
                .map(|(_, w)| w);
            let host = owners.host_used.then_some(host);
            for w in seen.chain(host) {
                let mut row = ledger.row(w);
                row.add(&KEYS.disk_read, 0.0);
                row.add(&KEYS.disk_write, 0.0);
            }
        }
        // Ids listed last tick and not now stay known a while: a task is counted when it is
        // freed, which can come after the tick that found its cgroup gone.
        for (id, owner) in self.owners.drain() {
            if !now.contains_key(&id) {
                self.churned.insert(id, (owner, 0));
            }
        }
        self.owners = now;
    }
}

/// Upper bounds (seconds) of the block-layer programs' latency buckets, `2^(i+1)` µs; their last
/// bucket has no upper bound and is only in `+Inf`.
static DISK_LATENCY_BOUNDS: [f64; tally_ebpf::DISK_LATENCY_BUCKETS - 1] = latency_bounds();

const fn latency_bounds() -> [f64; tally_ebpf::DISK_LATENCY_BUCKETS - 1] {
    let mut bounds = [0.0; tally_ebpf::DISK_LATENCY_BUCKETS - 1];
    let mut i = 0;
    while i < bounds.len() {
        bounds[i] = (1u64 << (i + 1)) as f64 * 1e-6;
        i += 1;
    }
    bounds
}

/// Feeds each entry of a map keyed by cgroup id to `add` with its previous value, and returns
/// the ids of cgroups that are gone (their final values are in; the caller deletes them).
fn per_cgroup<V: Copy + Default>(
    entries: Result<Vec<(u64, V)>, tally_ebpf::Error>,
    last: &mut HashMap<u64, V>,
    owners: &mut Owners<'_>,
    errors: &mut ErrorCounts,
    mut add: impl FnMut(&Arc<Workload>, &V, &V),
) -> Vec<u64> {
    let entries = match entries {
        Ok(entries) => entries,
        Err(e) => {
            errors.record(COLLECTOR, "map", || chain(&e));
            return Vec::new();
        }
    };
    let mut gone = Vec::new();
    for (id, value) in entries {
        if owners.pending(id) {
            continue;
        }
        let (workload, live) = owners.of(id);
        let before = swap(last, id, value);
        add(&workload, &value, &before);
        if !live {
            gone.push(id);
            last.remove(&id);
        }
    }
    gone
}

fn collect_net(
    net: &mut Net,
    last: &mut HashMap<NetKey, NetValue>,
    owners: &mut Owners<'_>,
    ledger: &mut Ledger,
    errors: &mut ErrorCounts,
) {
    let entries = match net.read() {
        Ok(entries) => entries,
        Err(e) => {
            errors.record(COLLECTOR, "map", || chain(&e));
            return;
        }
    };
    let mut gone = Vec::new();
    for (key, value) in entries {
        if owners.pending(key.cgroup_id) {
            continue;
        }
        let (workload, live) = owners.of(key.cgroup_id);
        let before = swap(last, key, value);
        let packets = delta(value.packets, before.packets);
        if packets > 0.0 {
            let transmit = key.direction == direction::EGRESS;
            let bytes = delta(value.bytes, before.bytes);
            let mut row = ledger.row(&workload);
            row.add(KEYS.net(transmit, false, key.scope), bytes);
            row.add(KEYS.net(transmit, true, key.scope), packets);
        }
        if !live {
            gone.push(key);
        }
    }
    if let Err(e) = net.remove(&gone) {
        errors.record(COLLECTOR, "map", || chain(&e));
    }
    for key in &gone {
        last.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_bounds_double_from_two_microseconds() {
        assert_eq!(DISK_LATENCY_BOUNDS.len(), 23);
        assert_eq!(DISK_LATENCY_BOUNDS[0], 2e-6);
        assert_eq!(DISK_LATENCY_BOUNDS[9], 1024e-6);
    }
}
