//! `bench.bpf.o`: the reference programs `bench/ebpf.sh` measures the agent's `net_egress` and
//! `net_ingress` against, under the same traffic (`ebpf/examples/bench_attach.rs` loads this
//! object beside `tally.bpf.o`). A separate object so that no node loads them, nor creates
//! `BENCH_COUNTS`: aya creates every map of an object it loads, used or not.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::bpf_skb_cgroup_id,
    macros::{cgroup_skb, map},
    maps::PerCpuHashMap,
    programs::SkBuffContext,
};
use tally_ebpf_common::{CgroupKey, CounterValue};
use tally_ebpf_programs::{counter::add, verdict::PASS};

/// The reference counter of the benchmark: what any per-cgroup meter must at least do.
#[map]
static BENCH_COUNTS: PerCpuHashMap<CgroupKey, CounterValue> =
    PerCpuHashMap::with_max_entries(16384, 0);

/// Does nothing: the floor of what a `cgroup_skb` program costs.
#[cgroup_skb(egress)]
pub fn bench_empty(_ctx: SkBuffContext) -> i32 {
    PASS
}

/// A per-CPU hash keyed by cgroup id, bytes and packets: the minimal counter. A full map loses
/// the count, never the packet.
#[cgroup_skb(egress)]
pub fn bench_counter(ctx: SkBuffContext) -> i32 {
    // SAFETY: the helper only reads the skb the kernel handed us.
    let key = CgroupKey {
        cgroup_id: unsafe { bpf_skb_cgroup_id(ctx.skb.skb) },
    };
    let _ = add(&BENCH_COUNTS, &key, u64::from(ctx.len()));
    PASS
}

/// The license the kernel checks before offering GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
