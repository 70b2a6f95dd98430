//! Splitting what a GPU did among the workloads holding it. Pure arithmetic over one sampling
//! window per device, generic over the workload key so it is tested without NVML or cgroups.
//!
//! - Per-process utilization samples available: each sample's SM share (at most 100 %) of the
//!   time it stands for (one sample period, or since the process's previous sample where the
//!   driver gives one mean per process, as real drivers do) is that process's busy time
//!   (`method="process_utilization"`), and no workload gets more than the window's length.
//!   dcgm-exporter's error on shared GPUs — every pod gets the device total — cannot happen:
//!   a pod only gets its own samples.
//! - Not available (MIG, NOT_SUPPORTED, missing symbol): a device with one holding workload gives
//!   it all busy time (`exclusive`); several share it by GPU memory held (`memory_share`).
//! - MIG instances: without per-instance utilization (DCGM profiling), an instance's holder is
//!   charged the time it held it (`mig_allocation`), labelled with the instance UUID.
//! - MPS: NVML has no utilization per MPS client (its samples, if any, are the MPS server's), so
//!   the device's busy time is split among the client workloads by the GPU memory each holds,
//!   the only per-client signal (`mps_memory`). The server's workload is not charged: it runs
//!   the clients' kernels, it does not order them. A server with no clients is an ordinary
//!   process and is charged as one. Processes outside MPS on a GPU whose MPS server has clients
//!   (possible only in the DEFAULT compute mode) are not told apart from the server.
//! - Conservation: per device, attributed seconds never exceed the device's busy seconds; when
//!   process samples add up to more (their windows and the device counter's differ), they are
//!   scaled down; what is left is exported as unattributed.
//! - Energy: the window's energy delta is split by busy share; the idle rest goes to the holding
//!   workloads equally (under MPS to the clients by memory, as the busy time), or to the
//!   unallocated row when nobody holds the device.

use std::collections::BTreeMap;

/// How a workload's GPU seconds were obtained: the `method` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    ProcessUtilization,
    Exclusive,
    MemoryShare,
    MigAllocation,
    MpsMemory,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::ProcessUtilization => "process_utilization",
            Method::Exclusive => "exclusive",
            Method::MemoryShare => "memory_share",
            Method::MigAllocation => "mig_allocation",
            Method::MpsMemory => "mps_memory",
        }
    }
}

/// A process holding a device (or a MIG instance of it), already resolved to its workload.
#[derive(Debug, Clone)]
pub struct Holder<W> {
    pub workload: W,
    pub memory_bytes: f64,
    /// The MIG instance UUID the process runs in, on a MIG-enabled device.
    pub mig_instance: Option<String>,
    /// An MPS client (listed by NVML's MPS query, not the compute list).
    pub mps_client: bool,
}

/// One device's sampling window.
#[derive(Debug, Clone)]
pub struct DeviceWindow<W> {
    pub uuid: String,
    /// Wall seconds the window covers.
    pub seconds: f64,
    /// Device busy seconds in the window (utilization × seconds), when the device reports it.
    pub busy_seconds: Option<f64>,
    pub energy_joules: Option<f64>,
    pub holders: Vec<Holder<W>>,
    /// Busy seconds per workload from process utilization samples, or `None` when the device
    /// gives none (MIG, NOT_SUPPORTED, an error).
    pub sampled: Option<Vec<(W, f64)>>,
    pub mig_enabled: bool,
}

/// What one workload gets from one device (or MIG instance) in one window.
#[derive(Debug, Clone, PartialEq)]
pub struct Share<W> {
    pub workload: W,
    /// The device UUID, or the MIG instance UUID.
    pub gpu: String,
    pub method: Method,
    pub busy_seconds: f64,
    pub energy_joules: f64,
    pub memory_bytes: f64,
}

/// Everything one device's window produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome<W> {
    pub shares: Vec<Share<W>>,
    /// Device busy time no workload was charged with.
    pub unattributed_seconds: f64,
    /// Energy spent while nobody held the device.
    pub unallocated_joules: f64,
}

pub fn attribute<W: Clone + Ord>(window: &DeviceWindow<W>) -> Outcome<W> {
    // Memory held per (workload, gpu label): the MIG instance when there is one.
    let mut memory: BTreeMap<(W, String), f64> = BTreeMap::new();
    for h in &window.holders {
        let gpu = h
            .mig_instance
            .clone()
            .unwrap_or_else(|| window.uuid.clone());
        *memory.entry((h.workload.clone(), gpu)).or_default() += h.memory_bytes;
    }
    let holders: Vec<W> = {
        let mut w: Vec<W> = memory.keys().map(|(w, _)| w.clone()).collect();
        w.dedup();
        w
    };

    // Memory held per MPS client workload, when MPS clients run (and MIG is off).
    let mps_clients: Option<Vec<(W, f64)>> = mps(window).then(|| {
        let mut held: BTreeMap<W, f64> = BTreeMap::new();
        for h in window.holders.iter().filter(|h| h.mps_client) {
            *held.entry(h.workload.clone()).or_default() += h.memory_bytes;
        }
        held.into_iter().collect()
    });

    let mut busy: BTreeMap<(W, String), (f64, Method)> = BTreeMap::new();
    let device_busy = window
        .busy_seconds
        .map(|b| b.clamp(0.0, window.seconds.max(0.0)));
    match (&window.sampled, window.mig_enabled) {
        // Utilization samples under MPS are the server's, never a client's: not used.
        _ if mps_clients.is_some() => {
            if let (Some(b), Some(clients)) = (device_busy, &mps_clients) {
                for (w, share) in split_by(clients, b) {
                    busy.insert((w, window.uuid.clone()), (share, Method::MpsMemory));
                }
            }
        }
        (Some(sampled), false) => {
            let mut per: BTreeMap<W, f64> = BTreeMap::new();
            for (w, s) in sampled {
                *per.entry(w.clone()).or_default() += s.max(0.0);
            }
            // No workload is busier than the window is long, whatever the samples say (a
            // sample's span can reach back before the window).
            for s in per.values_mut() {
                *s = s.min(window.seconds.max(0.0));
            }
            let total: f64 = per.values().sum();
            let scale = match device_busy {
                Some(b) if total > b && total > 0.0 => b / total,
                _ => 1.0,
            };
            for (w, s) in per {
                busy.insert(
                    (w, window.uuid.clone()),
                    (s * scale, Method::ProcessUtilization),
                );
            }
        }
        (_, true) => {
            // Each MIG instance is a device of its own for whoever holds it.
            let mut by_instance: BTreeMap<String, Vec<(W, f64)>> = BTreeMap::new();
            for ((w, gpu), m) in &memory {
                if gpu != &window.uuid {
                    by_instance
                        .entry(gpu.clone())
                        .or_default()
                        .push((w.clone(), *m));
                }
            }
            for (gpu, held) in by_instance {
                for (w, share) in split_by(&held, window.seconds) {
                    busy.insert((w, gpu.clone()), (share, Method::MigAllocation));
                }
            }
        }
        (None, false) => {
            if let Some(b) = device_busy {
                let held: Vec<(W, f64)> = holders
                    .iter()
                    .map(|w| {
                        let m = memory
                            .iter()
                            .filter(|((hw, _), _)| hw == w)
                            .map(|(_, m)| *m)
                            .sum();
                        (w.clone(), m)
                    })
                    .collect();
                let method = if held.len() == 1 {
                    Method::Exclusive
                } else {
                    Method::MemoryShare
                };
                for (w, share) in split_by(&held, b) {
                    busy.insert((w, window.uuid.clone()), (share, method));
                }
            }
        }
    }

    let attributed: f64 = busy
        .iter()
        .filter(|((_, gpu), _)| gpu == &window.uuid)
        .map(|(_, (s, _))| *s)
        .sum();
    let unattributed_seconds = device_busy.map_or(0.0, |b| (b - attributed).max(0.0));

    // Energy: busy share first, the idle rest to the holders.
    let mut energy: BTreeMap<W, f64> = BTreeMap::new();
    let mut unallocated_joules = 0.0;
    if let Some(e) = window.energy_joules.filter(|e| *e > 0.0) {
        let all_busy: f64 = busy.values().map(|(s, _)| *s).sum();
        let busy_fraction = if window.seconds > 0.0 {
            (all_busy / window.seconds).min(1.0)
        } else {
            0.0
        };
        if all_busy > 0.0 {
            for ((w, _), (s, _)) in &busy {
                *energy.entry(w.clone()).or_default() += e * busy_fraction * s / all_busy;
            }
        }
        let idle = e * (1.0 - busy_fraction);
        // Under MPS the clients, by memory as their busy time; otherwise every holder equally.
        let idle_to: Vec<(W, f64)> = mps_clients
            .clone()
            .unwrap_or_else(|| holders.iter().map(|w| (w.clone(), 1.0)).collect());
        if idle_to.is_empty() {
            unallocated_joules = idle;
        } else {
            for (w, share) in split_by(&idle_to, idle) {
                *energy.entry(w).or_default() += share;
            }
        }
    }

    // One share per (workload, gpu label) that held memory or was busy.
    let mut keys: Vec<(W, String)> = memory.keys().cloned().collect();
    keys.extend(busy.keys().cloned());
    keys.sort();
    keys.dedup();
    let mut energy_given: BTreeMap<W, bool> = BTreeMap::new();
    let shares = keys
        .into_iter()
        .map(|(w, gpu)| {
            let (busy_seconds, method) = busy
                .get(&(w.clone(), gpu.clone()))
                .copied()
                .unwrap_or((0.0, default_method(window)));
            // A workload's energy is reported once, on its first label of this device.
            let first = energy_given.insert(w.clone(), true).is_none();
            Share {
                energy_joules: if first {
                    energy.get(&w).copied().unwrap_or(0.0)
                } else {
                    0.0
                },
                memory_bytes: memory
                    .get(&(w.clone(), gpu.clone()))
                    .copied()
                    .unwrap_or(0.0),
                workload: w,
                gpu,
                method,
                busy_seconds,
            }
        })
        .collect();
    Outcome {
        shares,
        unattributed_seconds,
        unallocated_joules,
    }
}

/// MPS clients hold the device (MIG off: an instance is charged by allocation either way).
fn mps<W>(window: &DeviceWindow<W>) -> bool {
    !window.mig_enabled && window.holders.iter().any(|h| h.mps_client)
}

fn default_method<W>(window: &DeviceWindow<W>) -> Method {
    if mps(window) {
        return Method::MpsMemory;
    }
    match (&window.sampled, window.mig_enabled) {
        (_, true) => Method::MigAllocation,
        (Some(_), false) => Method::ProcessUtilization,
        (None, false) if window.holders.len() <= 1 => Method::Exclusive,
        (None, false) => Method::MemoryShare,
    }
}

/// Splits `total` by weight; equal parts when every weight is zero.
fn split_by<W: Clone>(held: &[(W, f64)], total: f64) -> Vec<(W, f64)> {
    let sum: f64 = held.iter().map(|(_, m)| m.max(0.0)).sum();
    held.iter()
        .map(|(w, m)| {
            let share = if sum > 0.0 {
                total * m.max(0.0) / sum
            } else {
                total / held.len() as f64
            };
            (w.clone(), share)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(w: &str, mem: f64) -> Holder<String> {
        Holder {
            workload: w.to_owned(),
            memory_bytes: mem,
            mig_instance: None,
            mps_client: false,
        }
    }

    fn mps_client(w: &str, mem: f64) -> Holder<String> {
        Holder {
            mps_client: true,
            ..holder(w, mem)
        }
    }

    fn window(
        holders: Vec<Holder<String>>,
        sampled: Option<Vec<(&str, f64)>>,
    ) -> DeviceWindow<String> {
        DeviceWindow {
            uuid: "GPU-0".into(),
            seconds: 1.0,
            busy_seconds: Some(0.9),
            energy_joules: Some(300.0),
            holders,
            sampled: sampled.map(|s| s.into_iter().map(|(w, b)| (w.to_owned(), b)).collect()),
            mig_enabled: false,
        }
    }

    fn get<'a>(o: &'a Outcome<String>, w: &str) -> &'a Share<String> {
        o.shares.iter().find(|s| s.workload == w).unwrap()
    }

    #[test]
    fn time_sliced_pods_get_their_own_samples_never_the_device_total() {
        let o = attribute(&window(
            vec![holder("a", 1e9), holder("b", 2e9), holder("c", 1e9)],
            Some(vec![("a", 0.5), ("b", 0.25), ("c", 0.1)]),
        ));
        assert_eq!(get(&o, "a").busy_seconds, 0.5);
        assert_eq!(get(&o, "b").busy_seconds, 0.25);
        assert_eq!(get(&o, "c").busy_seconds, 0.1);
        assert!(o
            .shares
            .iter()
            .all(|s| s.method == Method::ProcessUtilization));
        assert!((o.unattributed_seconds - 0.05).abs() < 1e-9);
        // Energy: 85% busy of 300 J split 50:25:10, the idle 15% in thirds.
        let e: f64 = o.shares.iter().map(|s| s.energy_joules).sum();
        assert!((e - 300.0).abs() < 1e-9);
        assert!((get(&o, "a").energy_joules - (300.0 * 0.5 + 45.0 / 3.0)).abs() < 1e-9);
        assert_eq!(get(&o, "b").memory_bytes, 2e9);
    }

    #[test]
    fn samples_adding_up_to_more_than_the_device_are_scaled_down() {
        let o = attribute(&window(
            vec![holder("a", 1.0), holder("b", 1.0)],
            Some(vec![("a", 0.9), ("b", 0.9)]),
        ));
        let total: f64 = o.shares.iter().map(|s| s.busy_seconds).sum();
        assert!((total - 0.9).abs() < 1e-9, "conservation: {total}");
        assert_eq!(o.unattributed_seconds, 0.0);
    }

    #[test]
    fn without_samples_an_exclusive_holder_gets_everything_and_sharers_split_by_memory() {
        let o = attribute(&window(vec![holder("a", 5e9)], None));
        assert_eq!(get(&o, "a").busy_seconds, 0.9);
        assert_eq!(get(&o, "a").method, Method::Exclusive);
        assert_eq!(get(&o, "a").energy_joules, 300.0);

        let o = attribute(&window(vec![holder("a", 1e9), holder("b", 3e9)], None));
        assert!((get(&o, "a").busy_seconds - 0.225).abs() < 1e-9);
        assert!((get(&o, "b").busy_seconds - 0.675).abs() < 1e-9);
        assert_eq!(get(&o, "b").method, Method::MemoryShare);
        assert!(o.unattributed_seconds < 1e-9);
    }

    #[test]
    fn an_idle_unheld_device_spends_unallocated_energy() {
        let mut w = window(vec![], Some(vec![]));
        w.busy_seconds = Some(0.0);
        let o = attribute(&w);
        assert!(o.shares.is_empty());
        assert_eq!(o.unallocated_joules, 300.0);
    }

    #[test]
    fn mig_instances_are_charged_to_their_holders_by_allocation() {
        let mut w = window(
            vec![
                Holder {
                    workload: "a".into(),
                    memory_bytes: 1e9,
                    mig_instance: Some("MIG-1".into()),
                    mps_client: false,
                },
                Holder {
                    workload: "b".into(),
                    memory_bytes: 2e9,
                    mig_instance: Some("MIG-2".into()),
                    mps_client: false,
                },
            ],
            None,
        );
        w.mig_enabled = true;
        w.busy_seconds = None;
        let o = attribute(&w);
        let a = get(&o, "a");
        assert_eq!(
            (a.gpu.as_str(), a.method, a.busy_seconds),
            ("MIG-1", Method::MigAllocation, 1.0)
        );
        let b = get(&o, "b");
        assert_eq!(
            (b.gpu.as_str(), b.busy_seconds, b.memory_bytes),
            ("MIG-2", 1.0, 2e9)
        );
        assert_eq!(o.unattributed_seconds, 0.0);
    }

    #[test]
    fn mps_clients_split_the_device_by_memory_and_the_server_is_not_charged() {
        // The server's samples carry the clients' work; they must not reach the server.
        let o = attribute(&window(
            vec![
                holder("server", 5e7),
                mps_client("a", 3e9),
                mps_client("b", 1e9),
                mps_client("a", 2e9),
            ],
            Some(vec![("server", 0.9)]),
        ));
        let (a, b, server) = (get(&o, "a"), get(&o, "b"), get(&o, "server"));
        assert!((a.busy_seconds - 0.9 * 5.0 / 6.0).abs() < 1e-9, "{a:?}");
        assert!((b.busy_seconds - 0.9 / 6.0).abs() < 1e-9, "{b:?}");
        assert_eq!((a.method, b.method), (Method::MpsMemory, Method::MpsMemory));
        assert_eq!(a.memory_bytes, 5e9);
        assert_eq!(server.busy_seconds, 0.0);
        assert_eq!(server.energy_joules, 0.0);
        assert_eq!(server.memory_bytes, 5e7, "its memory is still its own");
        let total: f64 = o.shares.iter().map(|s| s.busy_seconds).sum();
        assert!((total - 0.9).abs() < 1e-9, "conservation: {total}");
        assert!(o.unattributed_seconds < 1e-9);
        // Energy by memory too: all of the 300 J, 5:1.
        assert!((a.energy_joules - 250.0).abs() < 1e-9, "{a:?}");
        assert!((b.energy_joules - 50.0).abs() < 1e-9, "{b:?}");
        assert_eq!(o.unallocated_joules, 0.0);
    }

    #[test]
    fn an_mps_server_without_clients_is_charged_like_any_process() {
        let o = attribute(&window(
            vec![holder("server", 5e7)],
            Some(vec![("server", 0.4)]),
        ));
        let server = get(&o, "server");
        assert_eq!(
            (server.method, server.busy_seconds),
            (Method::ProcessUtilization, 0.4)
        );
    }

    #[test]
    fn mps_without_device_utilization_charges_nothing_rather_than_guessing() {
        let mut w = window(vec![holder("server", 1.0), mps_client("a", 1e9)], None);
        w.busy_seconds = None;
        let o = attribute(&w);
        assert!(o.shares.iter().all(|s| s.busy_seconds == 0.0));
        assert_eq!(get(&o, "a").method, Method::MpsMemory);
    }
}
