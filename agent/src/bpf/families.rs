//! Per-workload families of the eBPF sources: network bytes and packets by scope, TCP health,
//! and block I/O (bytes by method, operations, a latency histogram).

use std::sync::Arc;

use tally_exporters::{Family, Histogram, LabelSet, Sample};

use super::scope_name;
use crate::catalogue;
use crate::ledger::{CounterId, DiskCounter, Entry, TcpCounter};

/// Upper bound (seconds) of disk latency bucket `i`: `2^(i+1)` µs. The last BPF bucket has no
/// upper bound and is only in `+Inf`.
fn latency_bound(i: usize) -> f64 {
    (1u64 << (i + 1)) as f64 * 1e-6
}

pub struct BpfFamilies {
    /// `disk_*` below come from the block-layer programs (`method="ebpf"`); otherwise the
    /// cgroupfs counters are exported with `method="cgroupfs"` by the caller.
    disk_ebpf: bool,
    net: [Family; 4],
    tcp_retransmits: Family,
    tcp_opened: Family,
    tcp_closed: Family,
    disk_bytes: [Family; 2],
    disk_ops: Family,
    disk_latency: Family,
}

impl std::fmt::Debug for BpfFamilies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpfFamilies").finish_non_exhaustive()
    }
}

fn labelled(labels: &LabelSet, extra: Vec<(&'static str, Arc<str>)>, value: f64) -> Sample {
    Sample {
        labels: labels.clone(),
        extra,
        value,
        histogram: None,
    }
}

impl BpfFamilies {
    pub fn new(disk_ebpf: bool) -> Self {
        Self {
            disk_ebpf,
            net: [
                Family::new(&catalogue::workload::NETWORK_RECEIVE_BYTES),
                Family::new(&catalogue::workload::NETWORK_TRANSMIT_BYTES),
                Family::new(&catalogue::workload::NETWORK_RECEIVE_PACKETS),
                Family::new(&catalogue::workload::NETWORK_TRANSMIT_PACKETS),
            ],
            tcp_retransmits: Family::new(&catalogue::workload::TCP_RETRANSMITTED_SEGMENTS),
            tcp_opened: Family::new(&catalogue::workload::TCP_CONNECTIONS_OPENED),
            tcp_closed: Family::new(&catalogue::workload::TCP_CONNECTIONS_CLOSED),
            disk_bytes: [
                Family::new(&catalogue::workload::DISK_READ_BYTES),
                Family::new(&catalogue::workload::DISK_WRITE_BYTES),
            ],
            disk_ops: Family::new(&catalogue::workload::DISK_OPERATIONS),
            disk_latency: Family::new(&catalogue::workload::DISK_IO_LATENCY_SECONDS),
        }
    }

    pub fn push(&mut self, labels: &LabelSet, entry: &Entry) {
        // A workload the block-layer programs cannot see (no cgroup v2 cgroup, on a v1 or
        // hybrid node) keeps its cgroupfs disk counters.
        let disk_ebpf = self.disk_ebpf && entry.in_v2;
        let mut buckets = [0u64; tally_ebpf::DISK_LATENCY_BUCKETS];
        let mut latency_ns = None;
        let mut ops = 0.0;
        let mut disk_bytes_seen = false;
        for (id, value) in entry.counters() {
            match *id {
                CounterId::NetBytes { direction, scope }
                | CounterId::NetPackets { direction, scope } => {
                    let packets = matches!(id, CounterId::NetPackets { .. });
                    let index = direction as usize + if packets { 2 } else { 0 };
                    if let Some(family) = self.net.get_mut(index) {
                        family.samples.push(labelled(
                            labels,
                            vec![("scope", Arc::from(scope_name(scope)))],
                            value,
                        ));
                    }
                }
                CounterId::Tcp(TcpCounter::Retransmits) => {
                    self.tcp_retransmits
                        .samples
                        .push(labelled(labels, Vec::new(), value));
                }
                CounterId::Tcp(c @ (TcpCounter::ActiveOpens | TcpCounter::PassiveOpens)) => {
                    let direction = if c == TcpCounter::ActiveOpens {
                        "active"
                    } else {
                        "passive"
                    };
                    self.tcp_opened.samples.push(labelled(
                        labels,
                        vec![("direction", Arc::from(direction))],
                        value,
                    ));
                }
                CounterId::Tcp(TcpCounter::Closes) => {
                    self.tcp_closed
                        .samples
                        .push(labelled(labels, Vec::new(), value));
                }
                CounterId::Disk(c) if disk_ebpf => match c {
                    DiskCounter::ReadBytes | DiskCounter::WriteBytes => {
                        disk_bytes_seen = true;
                        let index = usize::from(c == DiskCounter::WriteBytes);
                        self.disk_bytes[index].samples.push(labelled(
                            labels,
                            vec![("method", Arc::from("ebpf"))],
                            value,
                        ));
                    }
                    DiskCounter::Reads | DiskCounter::Writes => {
                        ops += value;
                        let op = if c == DiskCounter::Reads {
                            "read"
                        } else {
                            "write"
                        };
                        self.disk_ops.samples.push(labelled(
                            labels,
                            vec![("op", Arc::from(op))],
                            value,
                        ));
                    }
                    DiskCounter::LatencyNanos => latency_ns = Some(value),
                    DiskCounter::LatencyBucket(i) => {
                        if let Some(b) = buckets.get_mut(usize::from(i)) {
                            *b = value as u64;
                        }
                    }
                },
                _ => {}
            }
        }
        if disk_ebpf && !disk_bytes_seen && entry.is_live() {
            // No I/O seen yet: the workload did none, which is a number too.
            for family in &mut self.disk_bytes {
                family
                    .samples
                    .push(labelled(labels, vec![("method", Arc::from("ebpf"))], 0.0));
            }
        }
        if let Some(ns) = latency_ns {
            let mut cumulative = 0;
            let bounds = buckets.len() - 1;
            let buckets = buckets[..bounds]
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    cumulative += n;
                    (latency_bound(i), cumulative)
                })
                .collect();
            self.disk_latency.push_histogram(
                labels,
                Vec::new(),
                Histogram {
                    buckets,
                    sum: ns / 1e9,
                    count: ops as u64,
                },
            );
        }
    }

    /// A workload's cgroupfs disk counters, when the block-layer programs are not its source.
    pub fn push_cgroupfs_disk(
        &mut self,
        labels: &LabelSet,
        entry: &Entry,
        read: Option<f64>,
        write: Option<f64>,
    ) {
        if self.disk_ebpf && entry.in_v2 {
            return;
        }
        for (family, value) in self.disk_bytes.iter_mut().zip([read, write]) {
            if let Some(v) = value {
                family
                    .samples
                    .push(labelled(labels, vec![("method", Arc::from("cgroupfs"))], v));
            }
        }
    }

    pub fn into_families(self) -> Vec<Family> {
        let [db_read, db_write] = self.disk_bytes;
        let mut families = vec![db_read, db_write, self.disk_ops, self.disk_latency];
        families.extend(self.net);
        families.extend([self.tcp_retransmits, self.tcp_opened, self.tcp_closed]);
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_bounds_double_from_two_microseconds() {
        assert_eq!(latency_bound(0), 2e-6);
        assert_eq!(latency_bound(9), 1024e-6);
    }
}
