//! The per-CPU bytes-and-packets update every counting program makes (`net_egress`,
//! `net_ingress`, the egress drop counters, the benchmark's `bench_counter`).

use aya_ebpf::{bindings::BPF_NOEXIST, maps::PerCpuHashMap};
use tally_ebpf_common::NetValue;

/// Adds one packet of `len` bytes under `key`; false when the map is full and the update is lost.
#[inline(always)]
pub fn add<K>(map: &PerCpuHashMap<K, NetValue>, key: &K, len: u64) -> bool {
    if let Some(value) = map.get_ptr_mut(key) {
        // SAFETY: this CPU's copy of the value; BPF programs are not preempted by themselves on
        // one CPU, so the read-modify-write is not torn.
        unsafe {
            (*value).bytes += len;
            (*value).packets += 1;
        }
        return true;
    }
    let first = NetValue {
        bytes: len,
        packets: 1,
    };
    match map.insert(key, &first, u64::from(BPF_NOEXIST)) {
        Ok(()) => true,
        // Inserted meanwhile by a nested run on this CPU: add to it.
        Err(_) => match map.get_ptr_mut(key) {
            Some(value) => {
                // SAFETY: as above.
                unsafe {
                    (*value).bytes += len;
                    (*value).packets += 1;
                }
                true
            }
            None => false,
        },
    }
}
