//! RDMA metering. RDMA bypasses the kernel's network stack, so the socket programs never see it;
//! what there is to read:
//!
//! - every port's counters in sysfs (`<paths.sys_root>/class/infiniband`), node-level;
//! - per-process QP counters through RDMA netlink (auto mode by pid: one counter per process),
//!   attributed through identity like GPU processes (`method="qp_counter"`);
//! - a device the kubelet assigned to a pod (an SR-IOV VF or a whole HCA, by PCI address or
//!   device name in pod-resources): its port counters belong to that pod (`method="device"`),
//!   and per-process counters on it are not counted again.
//!
//! No RDMA device: one INFO line at start and nothing exported. RDMA netlink missing or not
//! permitted: port counters only, said once at start and by `tally check`.

mod metrics;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tally_exporters::Family;
use tally_rdma::netlink::Socket;
use tally_rdma::sysfs::{self, PortCounters};
use tally_rdma::{Availability, Client, Endpoint, ProcessCounters, ProcessOptions, Traffic};

use crate::catalogue::workload;
use crate::config::Config;
use crate::errors::ErrorCounts;
use crate::identity::podresources::Assignments;
use crate::identity::{Identity, Workload};
use crate::ledger::{Key, Ledger};
use crate::source::{Probe, Source, TickCtx};

/// `method` of traffic read from a process's own QP counter.
pub const METHOD_QP_COUNTER: &str = "qp_counter";
/// `method` of a device's port counters charged to the pod it is assigned to.
pub const METHOD_DEVICE: &str = "device";

/// The per-process side.
enum Netlink {
    /// `rdma.netlink = false`.
    Off,
    /// RDMA netlink could not be used (logged once at start).
    Unavailable,
    Up {
        reader: ProcessCounters<Socket>,
        /// `nldev` (the kernel) or `nldev_relay` (a unix socket).
        method: &'static str,
    },
}

/// RDMA devices on the node and what was last read from them.
pub struct RdmaSource {
    sys_root: PathBuf,
    devices: Vec<sysfs::Device>,
    ports: BTreeMap<(Arc<str>, u32), PortCounters>,
    netlink: Netlink,
    /// pid → workload of the last round's processes (pids are reused, so only those).
    pids: HashMap<u32, Arc<Workload>>,
    /// Per-process counters per port in the last round.
    qp_counters: BTreeMap<(String, u32), usize>,
    /// Processes' QPs no counter holds, per per-process port, from the last listing.
    uncounted: BTreeMap<(String, u32), usize>,
    told_without_traffic: bool,
    /// Ports already warned about for uncounted QPs.
    told_uncounted: std::collections::BTreeSet<(String, u32)>,
}

impl std::fmt::Debug for RdmaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaSource")
            .field("devices", &self.devices.len())
            .field("netlink_up", &matches!(self.netlink, Netlink::Up { .. }))
            .finish_non_exhaustive()
    }
}

impl RdmaSource {
    /// Finds the RDMA devices and, when configured, starts the per-process reader (which may
    /// turn QP counter auto mode on, and turns it off again when the source is dropped).
    pub fn start(config: &Config) -> RdmaSource {
        let mut source = RdmaSource {
            sys_root: config.paths.sys_root.clone(),
            devices: Vec::new(),
            ports: BTreeMap::new(),
            netlink: Netlink::Off,
            pids: HashMap::new(),
            qp_counters: BTreeMap::new(),
            uncounted: BTreeMap::new(),
            told_without_traffic: false,
            told_uncounted: std::collections::BTreeSet::new(),
        };
        if !config.rdma.enabled {
            return source;
        }
        let class = sysfs::class_dir(&source.sys_root);
        source.devices = match sysfs::devices(&source.sys_root) {
            Ok(devices) => devices,
            Err(e) => {
                tracing::warn!(error = %tally_error_chain::chain(&e), "RDMA devices could not be listed: RDMA metering off");
                Vec::new()
            }
        };
        if source.devices.is_empty() {
            tracing::info!(path = %class.display(), "no RDMA devices: RDMA metering off");
            return source;
        }
        let names: Vec<String> = source.devices.iter().map(|d| d.name.clone()).collect();
        tracing::info!(devices = %names.join(","), "RDMA port counters from sysfs");
        if config.rdma.netlink {
            source.netlink = start_netlink(config, &names);
        }
        source
    }

    /// Reads every port, charges assigned devices to their pods and per-process counters to
    /// their processes' workloads.
    fn collect_traffic(
        &mut self,
        identity: &mut Identity,
        host: &Arc<Workload>,
        ledger: &mut Ledger,
        assignments: Option<&Assignments>,
        errors: &mut ErrorCounts,
    ) {
        if self.devices.is_empty() {
            return;
        }
        let holders = self.holders(identity, assignments);
        for device in &self.devices {
            let name: Arc<str> = Arc::from(device.name.as_str());
            for &port in &device.ports {
                let now = match sysfs::read_port(&self.sys_root, &device.name, port) {
                    Ok(now) => now,
                    Err(e) => {
                        errors.record("rdma", "sysfs", || tally_error_chain::chain(&e));
                        continue;
                    }
                };
                let key = (name.clone(), port);
                if let (Some(before), Some(assignees)) =
                    (self.ports.get(&key), holders.get(&device.name))
                {
                    let window = port_window(before, &now);
                    let share = 1.0 / assignees.len() as f64;
                    for w in assignees {
                        add(ledger, w, &name, port, METHOD_DEVICE, &window, share);
                    }
                }
                self.ports.insert(key, now);
            }
        }
        let Netlink::Up { reader, .. } = &mut self.netlink else {
            return;
        };
        let sample = reader.sample();
        for (device, e) in &sample.errors {
            errors.record("rdma", e.reason(), || {
                format!("{device}: {}", tally_error_chain::chain(e))
            });
        }
        if sample.without_traffic > 0 && !self.told_without_traffic {
            self.told_without_traffic = true;
            tracing::info!(
                counters = sample.without_traffic,
                "per-process RDMA counters hold no byte or packet counts (on mlx5 they are optional counters: see `rdma.qp_optional_counters`)"
            );
        }
        self.qp_counters = sample.counters;
        for ((device, port), n) in sample.uncounted {
            if n > 0 && self.told_uncounted.insert((device.clone(), port)) {
                tracing::warn!(
                    %device,
                    port,
                    queue_pairs = n,
                    "processes' queue pairs have no QP counter although auto mode is on: the driver does not bind QPs to counters (soft-RoCE does not); their traffic is counted per port only, not per workload"
                );
            }
            self.uncounted.insert((device, port), n);
        }
        let mut pids = HashMap::new();
        for t in sample.traffic {
            if holders.contains_key(&t.device) {
                // The pod holding the device is charged its port counters already.
                continue;
            }
            let w = match t.pid {
                Some(pid) => {
                    crate::identity::resolve_sampled_pid(identity, host, &self.pids, &mut pids, pid)
                }
                None => host.clone(),
            };
            let device: Arc<str> = Arc::from(t.device.as_str());
            add(
                ledger,
                &w,
                &device,
                t.port,
                METHOD_QP_COUNTER,
                &t.traffic,
                1.0,
            );
        }
        self.pids = pids;
    }

    /// Device name → the workloads the kubelet assigned it to (by PCI address or name).
    fn holders(
        &self,
        identity: &mut Identity,
        assignments: Option<&Assignments>,
    ) -> HashMap<String, Vec<Arc<Workload>>> {
        let mut out = HashMap::new();
        let Some(assignments) = assignments else {
            return out;
        };
        for d in &self.devices {
            let ids = std::iter::once(d.name.as_str()).chain(d.pci_address.as_deref());
            let Some(names) = ids.filter_map(|id| assignments.get(id)).next() else {
                continue;
            };
            let workloads = names
                .iter()
                .map(|n| identity.assigned(n))
                .collect::<Vec<_>>();
            if !workloads.is_empty() {
                out.insert(d.name.clone(), workloads);
            }
        }
        out
    }
}

impl Source for RdmaSource {
    fn name(&self) -> &'static str {
        "rdma"
    }

    fn collect(&mut self, ctx: &mut TickCtx<'_>, ledger: &mut Ledger) {
        self.collect_traffic(ctx.identity, ctx.host, ledger, ctx.assignments, ctx.errors);
    }

    /// None without RDMA devices.
    fn probes(&self) -> Vec<Probe> {
        if self.devices.is_empty() {
            return Vec::new();
        }
        let probe = |probe, method, up| Probe { probe, method, up };
        let mut out = vec![probe("rdma", "sysfs", true)];
        match &self.netlink {
            Netlink::Off => {}
            Netlink::Unavailable => out.push(probe("rdma_netlink", "nldev", false)),
            Netlink::Up { method, .. } => out.push(probe("rdma_netlink", method, true)),
        }
        out
    }

    fn families(&self) -> Vec<Family> {
        let mut families = self.node_families();
        families.iter_mut().for_each(Family::sort_samples);
        families
    }
}

fn start_netlink(config: &Config, devices: &[String]) -> Netlink {
    let rdma = &config.rdma;
    let (endpoint, method) = if rdma.netlink_socket.as_os_str().is_empty() {
        (Endpoint::Kernel, "nldev")
    } else {
        (Endpoint::Unix(rdma.netlink_socket.clone()), "nldev_relay")
    };
    let timeout = Duration::from_millis(rdma.netlink_timeout_ms);
    let options = ProcessOptions {
        allow_auto_mode: rdma.allow_qp_counter_auto_mode,
        optional_counters: rdma.qp_optional_counters,
    };
    let started = Client::connect(&endpoint, timeout)
        .and_then(|client| ProcessCounters::start(client, options, devices));
    let reader = match started {
        Ok(reader) => reader,
        Err(e) => {
            let detail = tally_error_chain::chain(&e);
            match e.availability() {
                Availability::Unsupported => {
                    tracing::info!(%endpoint, error = %detail, "RDMA netlink unsupported: RDMA port counters only, no per-process attribution")
                }
                Availability::NotPermitted => {
                    tracing::warn!(%endpoint, error = %detail, "RDMA netlink not permitted: RDMA port counters only, no per-process attribution")
                }
                Availability::Failed => {
                    tracing::warn!(%endpoint, error = %detail, "RDMA netlink failed: RDMA port counters only, no per-process attribution")
                }
            }
            return Netlink::Unavailable;
        }
    };
    for p in reader.ports() {
        if p.per_process {
            tracing::info!(device = %p.device, port = p.port, turned_on_by_tally = p.enabled_by_tally, "per-process RDMA counters");
        } else {
            tracing::info!(
                device = %p.device,
                port = p.port,
                why = p.problem.as_deref().unwrap_or(""),
                "no per-process RDMA counters on this port"
            );
        }
    }
    Netlink::Up { reader, method }
}

/// What a port moved between two reads; a counter that went down (driver reload) counts from
/// zero.
fn port_window(before: &PortCounters, now: &PortCounters) -> Traffic {
    let d = |now: Option<u64>, before: Option<u64>| match (now, before) {
        (Some(n), Some(b)) if n >= b => Some(n - b),
        (Some(n), _) => Some(n),
        (None, _) => None,
    };
    Traffic {
        transmit_bytes: d(now.transmit_bytes(), before.transmit_bytes()),
        receive_bytes: d(now.receive_bytes(), before.receive_bytes()),
        transmit_packets: d(now.transmit_packets(), before.transmit_packets()),
        receive_packets: d(now.receive_packets(), before.receive_packets()),
    }
}

fn add(
    ledger: &mut Ledger,
    w: &Arc<Workload>,
    device: &Arc<str>,
    port: u32,
    method: &'static str,
    t: &Traffic,
    share: f64,
) {
    let labels = || {
        vec![
            ("device", device.clone()),
            ("port", Arc::from(port.to_string().as_str())),
            ("method", Arc::from(method)),
        ]
    };
    // Counted now, so it runs (see the GPU source): live even without a cgroup reading.
    ledger.touch(w);
    for (metric, value) in [
        (&workload::RDMA_TRANSMIT_BYTES, t.transmit_bytes),
        (&workload::RDMA_RECEIVE_BYTES, t.receive_bytes),
        (&workload::RDMA_TRANSMIT_PACKETS, t.transmit_packets),
        (&workload::RDMA_RECEIVE_PACKETS, t.receive_packets),
    ] {
        if let Some(v) = value {
            ledger.add(w, &Key::new(metric, labels()), v as f64 * share);
        }
    }
}
