//! The ledger keys the eBPF sources record under, made once: every tick lends them to the ledger,
//! which clones one only for a workload's first value.

use std::sync::{Arc, LazyLock};

use tally_ebpf::scope;

use super::scope_name;
use crate::catalogue::workload;
use crate::ledger::Key;

pub(super) struct Keys {
    pub retransmits: Key,
    pub opened_active: Key,
    pub opened_passive: Key,
    pub closed: Key,
    pub disk_read: Key,
    pub disk_write: Key,
    pub reads: Key,
    pub writes: Key,
    pub latency: Key,
    /// CPU time, the same series the cgroupfs collector reads (no `method`: one truth).
    pub cpu: Key,
    /// By direction (receive, transmit), then bytes or packets, then scope.
    net: Vec<Key>,
}

pub(super) static KEYS: LazyLock<Keys> = LazyLock::new(Keys::new);

/// Scopes by index; what the programs report beyond them is `internet`.
const SCOPES: usize = scope::INTERNET as usize + 1;

impl Keys {
    fn new() -> Keys {
        let with = |metric, label, value: &str| Key::new(metric, vec![(label, Arc::from(value))]);
        let bare = |metric| Key::new(metric, Vec::new());
        let families = [
            &workload::NETWORK_RECEIVE_BYTES,
            &workload::NETWORK_RECEIVE_PACKETS,
            &workload::NETWORK_TRANSMIT_BYTES,
            &workload::NETWORK_TRANSMIT_PACKETS,
        ];
        let net = families
            .into_iter()
            .flat_map(|metric| {
                (0..SCOPES as u32).map(move |s| with(metric, "scope", scope_name(s)))
            })
            .collect();
        Keys {
            retransmits: bare(&workload::TCP_RETRANSMITTED_SEGMENTS),
            opened_active: with(&workload::TCP_CONNECTIONS_OPENED, "direction", "active"),
            opened_passive: with(&workload::TCP_CONNECTIONS_OPENED, "direction", "passive"),
            closed: bare(&workload::TCP_CONNECTIONS_CLOSED),
            disk_read: with(&workload::DISK_READ_BYTES, "method", "ebpf"),
            disk_write: with(&workload::DISK_WRITE_BYTES, "method", "ebpf"),
            reads: with(&workload::DISK_OPERATIONS, "op", "read"),
            writes: with(&workload::DISK_OPERATIONS, "op", "write"),
            latency: bare(&workload::DISK_IO_LATENCY_SECONDS),
            cpu: bare(&workload::CPU_SECONDS),
            net,
        }
    }

    /// Network bytes or packets, sent (`transmit`) or received, to or from `scope`.
    pub fn net(&self, transmit: bool, packets: bool, scope: u32) -> &Key {
        let scope = (scope as usize).min(SCOPES - 1);
        let index = (usize::from(transmit) * 2 + usize::from(packets)) * SCOPES + scope;
        &self.net[index]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_keys_name_their_family_and_scope() {
        let key = KEYS.net(true, false, scope::ZONE);
        assert_eq!(key.metric.name, workload::NETWORK_TRANSMIT_BYTES.name);
        assert_eq!(key.label("scope"), Some("zone"));
        let key = KEYS.net(false, true, 99);
        assert_eq!(key.metric.name, workload::NETWORK_RECEIVE_PACKETS.name);
        assert_eq!(key.label("scope"), Some("internet"));
    }
}
