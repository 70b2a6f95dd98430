//! Egress rate limits: a token bucket per cgroup, and per destination scope where one is set,
//! checked by `net_egress` before it counts a packet. The loader writes the limits
//! (`EGRESS_LIMITS`), the bitmask of the scopes that have any and the bitmask of the hierarchy
//! levels of the cgroups that have any (`EGRESS_LIMITS_ACTIVE`); while the scope mask is 0 a
//! packet costs one inlined array lookup and nothing else.
//!
//! A limit covers the cgroup's descendants too: a socket in `<unit>/child` (crun's
//! `…/container`, systemd inside a container, a `Delegate=` unit's subtree) is held by the limit
//! on `<unit>`. The program walks the socket cgroup's ancestors at the limited levels only,
//! deepest first (`bpf_skb_ancestor_cgroup_id`, whose level 0 is the root and which answers 0
//! past the socket's own level), and the nearest limited cgroup's limits apply, alone: a limit on
//! a cgroup nested inside another limited one replaces the outer one for its sockets.
//!
//! A packet over a limit is dropped with congestion notification: the program returns 2, which
//! the kernel turns into `NET_XMIT_DROP` (kernel/bpf/cgroup.c, `__cgroup_bpf_run_filter_skb()`;
//! bit 0 of an egress verdict is "pass", bit 1 "congestion"). TCP sees a positive error from
//! `ip_queue_xmit()`, enters CWR (net/ipv4/tcp_output.c, `__tcp_transmit_skb()` calls
//! `tcp_enter_cwr()` when `err > 0`) and keeps the segment queued to send again, so the drop
//! costs neither a retransmission timeout nor loss recovery. UDP gets ENOBUFS
//! (`net_xmit_errno()`), which `udp_send_skb()` (net/ipv4/udp.c) counts as `SndbufErrors` and
//! hides from `send()` unless the socket set IP_RECVERR; a plain drop (0) would fail `send()` with
//! EPERM instead. Passing packets that leave the bucket below a quarter of its burst return 3
//! ("pass with congestion"), so TCP backs off before it meets a drop.
//!
//! The bucket state (`EgressLimit::clock_ns`) is shared by every CPU and kept without a lock;
//! BPF offers no compare-and-swap here (the object targets BPF v1, whose only atomic is an add
//! that returns nothing). Checking reads the clock, passing adds the packet's cost with an atomic
//! add, so no charge is lost while the bucket is not full. The error this leaves is bounded:
//! - packets that check the same bucket at the same instant on different CPUs may all pass where
//!   the last of them should not: at most one packet per other CPU over the limit, and still
//!   charged, so later packets repay it (the long-run rate is unchanged);
//! - a packet that finds the bucket full stores the clock instead of adding to it (the clock is
//!   more than a burst behind), and may overwrite the charge of a packet passing on another CPU
//!   at that instant: the burst can grow by one packet per other CPU, once per idle period.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_skb_ancestor_cgroup_id},
    macros::map,
    maps::{Array, HashMap, PerCpuHashMap},
    programs::SkBuffContext,
};
use tally_ebpf_common::{
    limit_bit, CgroupKey, EgressLimit, EgressLimitKey, NetValue, ACTIVE_SLOT, ALL_SCOPES,
    COST_SHIFT, LEVELS_SLOT, MAX_LIMIT_LEVEL,
};

use tally_ebpf_programs::{
    counter::add,
    verdict::{DROP_CN, PASS, PASS_CN},
};

#[map]
static EGRESS_LIMITS: HashMap<EgressLimitKey, EgressLimit> = HashMap::with_max_entries(4096, 0);

#[map]
static EGRESS_LIMITS_ACTIVE: Array<u32> = Array::with_max_entries(2, 0);

/// Packets and bytes dropped over a limit, per limited cgroup (the one whose limit dropped them,
/// which may be an ancestor of the socket's). Twice the limits' size: a cgroup's
/// counters outlive its limit until the agent has read them and removes them.
#[map]
static EGRESS_DROPS: PerCpuHashMap<CgroupKey, NetValue> = PerCpuHashMap::with_max_entries(8192, 0);

/// The verdict on an egress packet towards `scope` of the socket whose cgroup `ctx` carries.
#[inline(always)]
pub(crate) fn egress(ctx: &SkBuffContext, scope: u32) -> i32 {
    let active = match EGRESS_LIMITS_ACTIVE.get(ACTIVE_SLOT) {
        Some(mask) => *mask,
        None => 0,
    };
    if active == 0 {
        return PASS;
    }
    let levels = match EGRESS_LIMITS_ACTIVE.get(LEVELS_SLOT) {
        Some(mask) => *mask,
        None => 0,
    };
    let mut level = MAX_LIMIT_LEVEL + 1;
    while level > 0 {
        level -= 1;
        if levels & (1 << level) == 0 {
            continue;
        }
        // SAFETY: the helper only reads the skb the kernel handed us.
        let cgroup_id = unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb, level as i32) };
        // 0: deeper than the socket's own cgroup. Only whether a limit exists is asked here;
        // `limited` looks them up again, so no value pointer is carried out of the loop (the
        // compiler may then compute field addresses before the null check, which the verifier
        // refuses).
        if cgroup_id != 0
            && ((active & limit_bit(scope) != 0 && lookup(cgroup_id, scope).is_some())
                || (active & limit_bit(ALL_SCOPES) != 0 && lookup(cgroup_id, ALL_SCOPES).is_some()))
        {
            return limited(ctx, cgroup_id, scope, active);
        }
    }
    PASS
}

/// The verdict under the limits of `cgroup_id`, the nearest limited ancestor of the socket's
/// cgroup (or that cgroup itself).
#[inline(always)]
fn limited(ctx: &SkBuffContext, cgroup_id: u64, scope: u32, active: u32) -> i32 {
    let scoped = if active & limit_bit(scope) != 0 {
        lookup(cgroup_id, scope)
    } else {
        None
    };
    let all = if active & limit_bit(ALL_SCOPES) != 0 {
        lookup(cgroup_id, ALL_SCOPES)
    } else {
        None
    };
    if scoped.is_none() && all.is_none() {
        // Cleared since the loop found it.
        return PASS;
    }
    // SAFETY: the helper has no arguments and no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let len = u64::from(ctx.len());
    // Both buckets must have room before either is charged.
    let scoped = match scoped {
        Some(limit) => match check(limit, now, len) {
            Some(charge) => Some((limit, charge)),
            None => return dropped(cgroup_id, len),
        },
        None => None,
    };
    let all = match all {
        Some(limit) => match check(limit, now, len) {
            Some(charge) => Some((limit, charge)),
            None => return dropped(cgroup_id, len),
        },
        None => None,
    };
    let mut mark = false;
    if let Some((limit, charge)) = scoped {
        commit(limit, &charge);
        mark |= charge.mark;
    }
    if let Some((limit, charge)) = all {
        commit(limit, &charge);
        mark |= charge.mark;
    }
    if mark {
        PASS_CN
    } else {
        PASS
    }
}

#[inline(always)]
fn lookup(cgroup_id: u64, scope: u32) -> Option<*mut EgressLimit> {
    let key = EgressLimitKey {
        cgroup_id,
        scope,
        pad: 0,
    };
    EGRESS_LIMITS.get_ptr_mut(&key)
}

#[inline(always)]
fn dropped(cgroup_id: u64, len: u64) -> i32 {
    // A full map loses the count, never the verdict.
    let _ = add(&EGRESS_DROPS, &CgroupKey { cgroup_id }, len);
    DROP_CN
}

/// What passing one packet does to one bucket.
struct Charge {
    /// The bucket was full: set the clock to `after` rather than add `cost` to it.
    full: bool,
    after: u64,
    cost: u64,
    /// Less than a quarter of the burst is left afterwards.
    mark: bool,
}

/// Whether a packet of `len` bytes fits in `limit`'s bucket at `now`, and what passing charges.
#[inline(always)]
fn check(limit: *mut EgressLimit, now: u64, len: u64) -> Option<Charge> {
    // SAFETY: a value of EGRESS_LIMITS, valid while this program runs (RCU). The clock is an
    // aligned u64, so the load is not torn by a concurrent add.
    let (scaled, burst_ns, clock) = unsafe {
        (
            (*limit).ns_per_byte_scaled,
            (*limit).burst_ns,
            core::ptr::read_volatile(&raw const (*limit).clock_ns),
        )
    };
    // The loader keeps `scaled` small enough that this cannot overflow for any skb length.
    let cost = len.wrapping_mul(scaled) >> COST_SHIFT;
    // The clock of a full bucket; an older clock means more tokens than the burst allows.
    let floor = now.saturating_sub(burst_ns);
    let full = clock <= floor;
    let start = if full { floor } else { clock };
    // A packet larger than the whole burst passes when the bucket is full, and leaves a debt.
    let need = if cost < burst_ns { cost } else { burst_ns };
    if start.wrapping_add(need) > now {
        return None;
    }
    let after = start.wrapping_add(cost);
    Some(Charge {
        full,
        after,
        cost,
        mark: after.wrapping_add(burst_ns >> 2) > now,
    })
}

#[inline(always)]
fn commit(limit: *mut EgressLimit, charge: &Charge) {
    // SAFETY: as in `check`; the store and the add are single aligned u64 accesses.
    unsafe {
        let clock = &raw mut (*limit).clock_ns;
        if charge.full {
            core::ptr::write_volatile(clock, charge.after);
        } else {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(clock, charge.cost);
        }
    }
}
