//! Per-cgroup network bytes and packets by direction and destination scope, from `cgroup_skb`
//! programs attached at the cgroup v2 root (so every socket in every cgroup passes through them).
//!
//! The cgroup is the socket's (`bpf_skb_cgroup_id`), not the current task's: ingress runs in
//! softirq context on whatever task was interrupted. The remote address is the destination on
//! egress and the source on ingress; the scope LPM tries, filled by the agent from config, say
//! where it is. The skb data of a `cgroup_skb` program starts at the network header, so
//! `skb->len` counts the IP header, transport header and payload.

use aya_ebpf::{
    helpers::bpf_skb_cgroup_id,
    macros::{cgroup_skb, map},
    maps::{lpm_trie::Key, LpmTrie, PerCpuArray, PerCpuHashMap},
    programs::SkBuffContext,
};
use tally_ebpf_common::{direction, scope, NetKey, NetValue, LOST_SLOT};
use tally_ebpf_programs::{counter::add, verdict::PASS};

use crate::throttle;

/// Sized by the loader from config (`ebpf.max_net_entries`); this is only the default.
#[map]
static NET_STATS: PerCpuHashMap<NetKey, NetValue> = PerCpuHashMap::with_max_entries(16384, 0);

#[map]
static NET_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
static SCOPES_V4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(1024, 0);

#[map]
static SCOPES_V6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(1024, 0);

const ETH_P_IP: u32 = 0x0800u16.to_be() as u32;
const ETH_P_IPV6: u32 = 0x86DDu16.to_be() as u32;
/// Offsets of the source address in the IPv4 and IPv6 headers; the destination follows it.
const IPV4_SADDR: usize = 12;
const IPV6_SADDR: usize = 8;

/// Counts what passes; a packet dropped over its cgroup's limit is counted by `throttle` alone
/// (TCP sends it again, and the resend is what leaves).
#[cgroup_skb(egress)]
pub fn net_egress(ctx: SkBuffContext) -> i32 {
    // SAFETY: the helper only reads the skb the kernel handed us.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    let scope = remote_scope(&ctx, direction::EGRESS);
    let verdict = throttle::egress(&ctx, scope);
    if verdict & PASS != 0 {
        account(&ctx, cgroup_id, direction::EGRESS, scope);
    }
    verdict
}

#[cgroup_skb(ingress)]
pub fn net_ingress(ctx: SkBuffContext) -> i32 {
    // SAFETY: as above.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    let scope = remote_scope(&ctx, direction::INGRESS);
    account(&ctx, cgroup_id, direction::INGRESS, scope);
    // Metering never drops; only an egress limit does (`throttle`).
    PASS
}

#[inline(always)]
fn account(ctx: &SkBuffContext, cgroup_id: u64, dir: u32, scope: u32) {
    let key = NetKey {
        cgroup_id,
        direction: dir,
        scope,
    };
    if !add(&NET_STATS, &key, u64::from(ctx.len())) {
        if let Some(lost) = NET_LOST.get_ptr_mut(LOST_SLOT) {
            // SAFETY: a per-CPU slot; nothing else on this CPU runs this program concurrently.
            unsafe { *lost += 1 };
        }
    }
}

#[inline(always)]
fn remote_scope(ctx: &SkBuffContext, dir: u32) -> u32 {
    let protocol = ctx.skb.protocol();
    if protocol == ETH_P_IP {
        let offset = if dir == direction::EGRESS {
            IPV4_SADDR + 4
        } else {
            IPV4_SADDR
        };
        match read::<4>(ctx, offset) {
            // Loopback needs no trie walk: it is always the node.
            Some(addr) if addr[0] == 127 => scope::NODE,
            Some(addr) => SCOPES_V4
                .get(Key::new(32, addr))
                .copied()
                .unwrap_or(scope::INTERNET),
            None => scope::INTERNET,
        }
    } else if protocol == ETH_P_IPV6 {
        let offset = if dir == direction::EGRESS {
            IPV6_SADDR + 16
        } else {
            IPV6_SADDR
        };
        match read::<16>(ctx, offset) {
            Some(addr) if addr == IPV6_LOOPBACK => scope::NODE,
            Some(addr) => SCOPES_V6
                .get(Key::new(128, addr))
                .copied()
                .unwrap_or(scope::INTERNET),
            None => scope::INTERNET,
        }
    } else {
        scope::INTERNET
    }
}

const IPV6_LOOPBACK: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// `N` bytes at `offset` from the network header: straight from the linear packet data when it
/// holds them (cgroup_skb may read packet data directly; no helper call), else through
/// `bpf_skb_load_bytes` for a header split across fragments.
#[inline(always)]
fn read<const N: usize>(ctx: &SkBuffContext, offset: usize) -> Option<[u8; N]> {
    // SAFETY: reading two fields of the context the kernel handed us.
    let (data, end) = unsafe {
        (
            (*ctx.skb.skb).data as usize,
            (*ctx.skb.skb).data_end as usize,
        )
    };
    if data + offset + N <= end {
        // SAFETY: the bounds check above is the one the verifier requires for direct access.
        Some(unsafe { core::ptr::read_unaligned((data + offset) as *const [u8; N]) })
    } else {
        ctx.load::<[u8; N]>(offset).ok()
    }
}
