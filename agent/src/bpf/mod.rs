//! The agent's side of the eBPF sources: starts them as the configuration allows, turns their
//! per-cgroup-id cumulative counters into per-workload increments in the ledger, and deletes map
//! entries of cgroups that are gone once their final values are in.

mod families;
mod sampler;
mod scopes;

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_ebpf::disk::{Disk, DiskConfig};
use tally_ebpf::net::{Net, NetConfig};
use tally_ebpf::tcp::{Tcp, TcpConfig};
use tally_ebpf::throttle::EgressLimits;
use tally_ebpf::{DiskValue, NetKey, NetValue, ProbeStatus, ProgramStats, TcpValue};
use tally_error_chain::chain;

pub use families::BpfFamilies;
use sampler::StatsSampler;
pub use scopes::scope_name;

use crate::cgroupfs::Discovery;
use crate::config::Config;
use crate::errors::ErrorCounts;
use crate::host::layout::Layout;
use crate::identity::Workload;
use crate::ledger::{CounterId, DiskCounter, Ledger, TcpCounter};

const COLLECTOR: &str = "ebpf";

/// The loaded eBPF sources and what the agent remembers between ticks to turn their counters into
/// increments.
#[derive(Debug, Default)]
pub struct BpfSources {
    net: Option<Net>,
    tcp: Option<Tcp>,
    disk: Option<Disk>,
    stats: StatsSampler,
    statuses: Vec<ProbeStatus>,
    /// Last cumulative value of each map entry.
    last_net: HashMap<NetKey, NetValue>,
    last_tcp: HashMap<u64, TcpValue>,
    last_disk: HashMap<u64, DiskValue>,
    /// Cgroup id → workload as of the previous tick, for ids whose cgroup vanished since.
    owners: HashMap<u64, Arc<Workload>>,
}

/// Who a cgroup id belongs to this tick.
struct Owners<'a> {
    now: &'a HashMap<u64, Arc<Workload>>,
    before: &'a HashMap<u64, Arc<Workload>>,
    live: &'a HashMap<u64, Option<usize>>,
    host: &'a Arc<Workload>,
    host_used: bool,
}

impl Owners<'_> {
    /// The workload of `cgroup_id` (the host for cgroups that are not a workload's), and whether
    /// the cgroup still exists.
    fn of(&mut self, cgroup_id: u64) -> (Arc<Workload>, bool) {
        let live = self.live.contains_key(&cgroup_id);
        let workload = match self
            .now
            .get(&cgroup_id)
            .or_else(|| self.before.get(&cgroup_id))
        {
            Some(w) => w.clone(),
            None => {
                self.host_used = true;
                self.host.clone()
            }
        };
        (workload, live)
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
        let disabled = &config.ebpf.disabled_methods;
        let net = match (&layout.unified, disabled.iter().any(|m| m == "cgroup_skb")) {
            (_, true) => Err("disabled by `ebpf.disabled_methods`".to_owned()),
            (None, false) => Err("no cgroup v2 hierarchy to attach to".to_owned()),
            (Some(root), false) => Net::load(&NetConfig {
                cgroup2_root: root.clone(),
                max_entries: config.ebpf.max_net_entries,
                scopes: scopes::scope_ranges(config),
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
        sources
    }

    /// Applies a reloaded configuration's scopes and `bpf_stats` sampling.
    pub fn reconfigure(&mut self, config: &Config, errors: &mut ErrorCounts) {
        if config.ebpf.enabled {
            self.stats.reconfigure(
                config.ebpf.program_stats,
                Duration::from_secs(config.ebpf.program_stats_every_secs),
            );
        }
        if let Some(net) = &mut self.net {
            if let Err(e) = net.set_scopes(&scopes::scope_ranges(config)) {
                errors.record(COLLECTOR, "map", || chain(&e));
            }
        }
    }

    pub fn statuses(&self) -> &[ProbeStatus] {
        &self.statuses
    }

    /// Whether per-workload disk bytes come from the block-layer programs.
    pub fn disk_up(&self) -> bool {
        self.disk.is_some()
    }

    /// Turns `bpf_stats` on or off for the tick starting at `now` (see [`StatsSampler`]).
    pub fn sample_stats(&mut self, now: Instant) {
        self.stats.tick(now);
    }

    /// How long the agent has held `bpf_stats` on: the time `program_stats` covers.
    pub fn stats_held(&self, now: Instant) -> Duration {
        self.stats.held(now)
    }

    pub fn program_stats(&self) -> Vec<ProgramStats> {
        let mut stats = self
            .net
            .as_ref()
            .map(Net::program_stats)
            .unwrap_or_default();
        stats.extend(self.tcp.iter().flat_map(Tcp::program_stats));
        stats.extend(self.disk.iter().flat_map(Disk::program_stats));
        stats
    }

    /// Updates lost to full maps, by map.
    pub fn lost(&self, errors: &mut ErrorCounts) -> Vec<(&'static str, u64)> {
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
        lost
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
        let now: HashMap<u64, Arc<Workload>> = discovery
            .v2_ids
            .iter()
            .filter_map(|(id, owner)| Some((*id, workloads.get((*owner)?)?.clone())))
            .collect();
        let mut owners = Owners {
            now: &now,
            before: &self.owners,
            live: &discovery.v2_ids,
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
                    for (counter, now, before) in [
                        (TcpCounter::Retransmits, v.retransmits, last.retransmits),
                        (TcpCounter::ActiveOpens, v.active_opens, last.active_opens),
                        (
                            TcpCounter::PassiveOpens,
                            v.passive_opens,
                            last.passive_opens,
                        ),
                        (TcpCounter::Closes, v.closes, last.closes),
                    ] {
                        ledger.add(w.clone(), CounterId::Tcp(counter), delta(now, before));
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
                    let mut add = |c, now, before| {
                        ledger.add(w.clone(), CounterId::Disk(c), delta(now, before))
                    };
                    add(DiskCounter::ReadBytes, v.read_bytes, last.read_bytes);
                    add(DiskCounter::WriteBytes, v.write_bytes, last.write_bytes);
                    add(DiskCounter::Reads, v.reads, last.reads);
                    add(DiskCounter::Writes, v.writes, last.writes);
                    add(
                        DiskCounter::LatencyNanos,
                        v.latency_ns_total,
                        last.latency_ns_total,
                    );
                    for (i, (now, before)) in v
                        .latency_buckets
                        .iter()
                        .zip(last.latency_buckets)
                        .enumerate()
                    {
                        add(DiskCounter::LatencyBucket(i as u8), *now, before);
                    }
                },
            );
            if let Err(e) = disk.remove(&gone) {
                errors.record(COLLECTOR, "map", || chain(&e));
            }
        }
        if owners.host_used {
            ledger.touch(host.clone());
        }
        self.owners = now;
    }
}

/// Feeds each entry of a map keyed by cgroup id to `add` with its previous value, and returns
/// the ids of cgroups that are gone (their final values are in; the caller deletes them).
fn per_cgroup<V: Copy + Default>(
    entries: Result<Vec<(u64, V)>, tally_ebpf::Error>,
    last: &mut HashMap<u64, V>,
    owners: &mut Owners<'_>,
    errors: &mut ErrorCounts,
    mut add: impl FnMut(Arc<Workload>, &V, &V),
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
        let (workload, live) = owners.of(id);
        let before = swap(last, id, value);
        add(workload, &value, &before);
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
        let (workload, live) = owners.of(key.cgroup_id);
        let before = swap(last, key, value);
        let packets = delta(value.packets, before.packets);
        if packets > 0.0 {
            let (direction, scope) = (key.direction, key.scope);
            ledger.add(
                workload.clone(),
                CounterId::NetBytes { direction, scope },
                delta(value.bytes, before.bytes),
            );
            ledger.add(
                workload,
                CounterId::NetPackets { direction, scope },
                packets,
            );
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
