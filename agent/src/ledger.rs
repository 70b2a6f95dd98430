//! The ledger: monotonic per-workload counters that survive what the sources do.
//!
//! Sources report cumulative values that reset when a cgroup is recreated (a restarted unit gets a
//! new cgroup and starts from zero). The ledger folds each reset into a base so the exported
//! counter never goes down, keeps an exited workload's final values for a grace period (a job that
//! lived between two scrapes is still billed), then forgets it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cgroupfs::Reading;
use crate::identity::{PathIdentity, Workload};

/// The monotonic counters kept per workload.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CounterId {
    CpuSeconds,
    DiskReadBytes,
    DiskWriteBytes,
    /// Network bytes by direction and scope (`tally_ebpf_common::{direction, scope}` values).
    NetBytes {
        direction: u32,
        scope: u32,
    },
    NetPackets {
        direction: u32,
        scope: u32,
    },
    /// TCP health from the socket-state and retransmit programs.
    Tcp(TcpCounter),
    /// Block I/O from the block-layer programs.
    Disk(DiskCounter),
    /// A GPU counter on one device or MIG instance (`gpu` is its UUID).
    Gpu {
        counter: GpuCounter,
        gpu: Arc<str>,
        /// How busy time was attributed (`tally_workload_gpu_seconds_total{method}`); `None` for
        /// the other GPU counters.
        method: Option<&'static str>,
    },
    /// RDMA traffic on one port of an RDMA device (`device` is its name, `mlx5_0`), and how it
    /// was attributed (`qp_counter`: the process's own QP counter; `device`: the port counters
    /// of a device the kubelet assigned to the workload).
    Rdma {
        counter: RdmaCounter,
        device: Arc<str>,
        port: u32,
        method: &'static str,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TcpCounter {
    Retransmits,
    ActiveOpens,
    PassiveOpens,
    Closes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DiskCounter {
    ReadBytes,
    WriteBytes,
    Reads,
    Writes,
    LatencyNanos,
    /// Requests that completed in bucket `i` (`[2^i, 2^(i+1))` µs).
    LatencyBucket(u8),
}

/// The per-workload GPU counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GpuCounter {
    BusySeconds,
    EnergyJoules,
    MemoryByteSeconds,
}

/// The per-workload RDMA counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RdmaCounter {
    TransmitBytes,
    ReceiveBytes,
    TransmitPackets,
    ReceivePackets,
}

/// A cumulative source value made monotonic across resets.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Monotonic {
    base: f64,
    last: Option<f64>,
    /// Fed by `add` at least once (a delta source that reported zero still has a value: 0).
    added: bool,
}

impl Monotonic {
    fn observe(&mut self, raw: f64) {
        if let Some(last) = self.last {
            if raw < last {
                self.base += last;
            }
        }
        self.last = Some(raw);
    }

    /// The source restarted from zero (new cgroup): keep what was counted so far.
    fn rebase(&mut self) {
        if let Some(last) = self.last.take() {
            self.base += last;
        }
    }

    /// A source that reports increments (BPF maps, whose entries come and go per cgroup id).
    fn add(&mut self, delta: f64) {
        self.base += delta;
        self.added = true;
    }

    fn value(&self) -> Option<f64> {
        self.last
            .map(|l| self.base + l)
            .or((self.added || self.base > 0.0).then_some(self.base))
    }
}

/// One workload's row.
#[derive(Debug, Clone)]
pub struct Entry {
    pub workload: Arc<Workload>,
    cgroup_id: u64,
    counters: BTreeMap<CounterId, Monotonic>,
    pub memory_bytes: Option<f64>,
    /// Whether the workload has a cgroup v2 cgroup, so per-cgroup-id (BPF) sources can see it.
    pub in_v2: bool,
    /// When the workload was last seen; `exited` once a tick did not see it.
    pub exited_at: Option<Instant>,
}

impl Entry {
    pub fn counter(&self, id: CounterId) -> Option<f64> {
        self.counters.get(&id).and_then(Monotonic::value)
    }

    /// Every counter with a value, in a stable order.
    pub fn counters(&self) -> impl Iterator<Item = (&CounterId, f64)> + '_ {
        self.counters
            .iter()
            .filter_map(|(id, m)| m.value().map(|v| (id, v)))
    }

    pub fn is_live(&self) -> bool {
        self.exited_at.is_none()
    }
}

#[derive(Debug)]
pub struct Ledger {
    entries: HashMap<PathIdentity, Entry>,
    grace: Duration,
    seen: Vec<PathIdentity>,
}

impl Ledger {
    pub fn new(grace: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            grace,
            seen: Vec::new(),
        }
    }

    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// Records what a workload's cgroup said this tick.
    pub fn observe(
        &mut self,
        workload: Arc<Workload>,
        cgroup_id: u64,
        in_v2: bool,
        reading: &Reading,
    ) {
        let key = workload.identity.clone();
        let entry = self.entry(workload, Some(cgroup_id));
        entry.in_v2 = in_v2;
        let raw = [
            (CounterId::CpuSeconds, reading.cpu_seconds),
            (CounterId::DiskReadBytes, reading.disk_read_bytes),
            (CounterId::DiskWriteBytes, reading.disk_write_bytes),
        ];
        for (id, value) in raw {
            if let Some(v) = value {
                entry.counters.entry(id).or_default().observe(v);
            }
        }
        entry.memory_bytes = reading.memory_bytes;
        self.seen.push(key);
    }

    /// Adds an increment from a source that reports deltas. Does not change whether the workload
    /// is live: an exited workload's last bytes still count.
    pub fn add(&mut self, workload: Arc<Workload>, counter: CounterId, delta: f64) {
        self.entry(workload, None)
            .counters
            .entry(counter)
            .or_default()
            .add(delta);
    }

    /// Keeps a workload live without a cgroupfs reading (the host row of per-cgroup-id sources).
    pub fn touch(&mut self, workload: Arc<Workload>) {
        let key = workload.identity.clone();
        self.entry(workload, None).exited_at = None;
        self.seen.push(key);
    }

    fn entry(&mut self, workload: Arc<Workload>, cgroup_id: Option<u64>) -> &mut Entry {
        let entry = self
            .entries
            .entry(workload.identity.clone())
            .or_insert_with(|| Entry {
                workload: workload.clone(),
                cgroup_id: cgroup_id.unwrap_or(0),
                counters: BTreeMap::new(),
                memory_bytes: None,
                in_v2: true,
                exited_at: None,
            });
        if let Some(id) = cgroup_id {
            if entry.cgroup_id != id {
                entry.counters.values_mut().for_each(Monotonic::rebase);
                entry.cgroup_id = id;
            }
            entry.exited_at = None;
            entry.workload = workload;
        }
        entry
    }

    /// Ends a tick: workloads not observed since the last call have exited (their final values
    /// stay), and those exited longer than the grace period are forgotten.
    pub fn end_tick(&mut self, now: Instant) {
        let seen: std::collections::HashSet<PathIdentity> = self.seen.drain(..).collect();
        let grace = self.grace;
        self.entries.retain(|key, entry| {
            if seen.contains(key) {
                return true;
            }
            let exited = *entry.exited_at.get_or_insert(now);
            entry.memory_bytes = None;
            now.duration_since(exited) < grace
        });
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Names;

    fn unit(name: &str) -> Arc<Workload> {
        Arc::new(Workload::new(
            PathIdentity::Unit(name.into()),
            Names::default(),
        ))
    }

    fn cpu(v: f64) -> Reading {
        Reading {
            cpu_seconds: Some(v),
            memory_bytes: Some(100.0),
            ..Reading::default()
        }
    }

    #[test]
    fn counters_stay_monotonic_across_a_recreated_cgroup() {
        let mut ledger = Ledger::new(Duration::from_secs(60));
        let w = unit("a.service");
        let t0 = Instant::now();
        ledger.observe(w.clone(), 1, true, &cpu(5.0));
        ledger.end_tick(t0);
        ledger.observe(w.clone(), 1, true, &cpu(7.0));
        ledger.end_tick(t0);
        // The unit restarted: new cgroup id, counter from zero.
        ledger.observe(w.clone(), 2, true, &cpu(1.0));
        ledger.end_tick(t0);
        let e = ledger.entries().next().unwrap();
        assert_eq!(e.counter(CounterId::CpuSeconds), Some(8.0));
        // A reset without an id change (counter wrapped or was reset) is folded the same way.
        ledger.observe(w, 2, true, &cpu(0.5));
        ledger.end_tick(t0);
        let e = ledger.entries().next().unwrap();
        assert_eq!(e.counter(CounterId::CpuSeconds), Some(8.5));
        assert_eq!(e.counter(CounterId::DiskReadBytes), None);
    }

    #[test]
    fn exited_workloads_keep_final_values_for_the_grace_period() {
        let mut ledger = Ledger::new(Duration::from_secs(60));
        let t0 = Instant::now();
        ledger.observe(unit("job.service"), 1, true, &cpu(3.0));
        ledger.observe(unit("stays.service"), 2, true, &cpu(1.0));
        ledger.end_tick(t0);
        ledger.observe(unit("stays.service"), 2, true, &cpu(1.0));
        ledger.end_tick(t0 + Duration::from_secs(1));
        let job = ledger
            .entries()
            .find(|e| e.workload.identity == PathIdentity::Unit("job.service".into()))
            .unwrap();
        assert!(!job.is_live());
        assert_eq!(job.counter(CounterId::CpuSeconds), Some(3.0));
        assert_eq!(job.memory_bytes, None);

        ledger.observe(unit("stays.service"), 2, true, &cpu(1.0));
        ledger.end_tick(t0 + Duration::from_secs(30));
        assert_eq!(ledger.len(), 2);
        ledger.observe(unit("stays.service"), 2, true, &cpu(1.0));
        ledger.end_tick(t0 + Duration::from_secs(62));
        assert_eq!(ledger.len(), 1);

        // A workload that comes back within the grace period continues its counters.
        ledger.observe(unit("job.service"), 3, true, &cpu(2.0));
        ledger.end_tick(t0 + Duration::from_secs(63));
        assert_eq!(ledger.len(), 2);
    }
}
