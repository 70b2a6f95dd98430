//! Map key and value types shared by Tally's kernel-side BPF programs and the user-space loader.
//!
//! Every type here is `#[repr(C)]`, `Copy`, built from fixed-width fields with no implicit padding,
//! so that both sides agree on the layout byte for byte. The `user` feature adds what only the
//! loader needs (`aya::Pod`).
#![no_std]

/// Key of the per-cgroup counter maps that need nothing else: the cgroup v2 id
/// (`bpf_skb_cgroup_id()` / `bpf_get_current_cgroup_id()`, the inode of the cgroup directory).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CgroupKey {
    pub cgroup_id: u64,
}

/// Key of `NET_STATS`: traffic of one cgroup, one direction, one destination scope.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetKey {
    pub cgroup_id: u64,
    /// [`direction::INGRESS`] or [`direction::EGRESS`].
    pub direction: u32,
    /// One of [`scope`]'s values.
    pub scope: u32,
}

/// Value of `NET_STATS` (per CPU): bytes from the IP header on, and packets.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetValue {
    pub bytes: u64,
    pub packets: u64,
}

/// Value of `BENCH_COUNTS`, the reference counter the benchmark compares against. Only the bench
/// object (`ebpf/programs/src/bench.rs`, `bench.bpf.o`) has that map; nodes never load it.
pub type CounterValue = NetValue;

/// Traffic direction as the cgroup sees it.
pub mod direction {
    pub const INGRESS: u32 = 0;
    pub const EGRESS: u32 = 1;
}

/// Where the remote end of a packet is. The scope maps (`SCOPES_V4`, `SCOPES_V6`, LPM tries)
/// hold the first four; an address they do not match is [`INTERNET`].
pub mod scope {
    /// Loopback and the node's own addresses.
    pub const NODE: u32 = 0;
    /// Pod and service CIDRs.
    pub const CLUSTER: u32 = 1;
    /// The node's zone.
    pub const ZONE: u32 = 2;
    /// The node's region.
    pub const REGION: u32 = 3;
    /// Everything else.
    pub const INTERNET: u32 = 4;
    /// How many scopes there are.
    pub const COUNT: usize = 5;
}

/// Index of the single slot of the per-CPU `*_LOST` arrays: updates dropped because a map was full.
pub const LOST_SLOT: u32 = 0;

/// [`EgressLimitKey::scope`] of a limit on a cgroup's egress to every scope together.
pub const ALL_SCOPES: u32 = u32::MAX;

/// Key of `EGRESS_LIMITS`: one cgroup's egress limit towards one destination scope (one of
/// [`scope`]'s values), or towards all of them ([`ALL_SCOPES`]). A packet is charged to both its
/// scope's limit and the all-scopes limit where each is set, and dropped when either is over.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EgressLimitKey {
    pub cgroup_id: u64,
    pub scope: u32,
    /// Always 0: hash map keys compare every byte.
    pub pad: u32,
}

/// Value of `EGRESS_LIMITS`: a token bucket kept as a virtual clock. The loader writes the whole
/// value; the egress program only moves [`EgressLimit::clock_ns`].
///
/// The bucket holds `now - clock_ns` nanoseconds' worth of bytes at the rate, at most
/// [`EgressLimit::burst_ns`]. A packet passes when the bucket holds its cost, or (a packet larger
/// than the whole burst) when the bucket is full; passing moves the clock forward by its cost, so
/// over any interval `T` the bytes passed are at most `burst + rate × T` (plus the race bound the
/// program documents).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EgressLimit {
    pub bytes_per_sec: u64,
    pub burst_bytes: u64,
    /// Nanoseconds one byte costs at the rate, scaled by `2^`[`COST_SHIFT`], so the program
    /// multiplies and never divides.
    pub ns_per_byte_scaled: u64,
    /// The burst in nanoseconds of the rate.
    pub burst_ns: u64,
    /// The `bpf_ktime_get_ns()` instant (CLOCK_MONOTONIC) at which the bytes passed so far would
    /// all have left at the rate; 0 (or anything older than `now - burst_ns`) is a full bucket.
    pub clock_ns: u64,
}

/// Fixed-point shift of [`EgressLimit::ns_per_byte_scaled`].
pub const COST_SHIFT: u32 = 16;

/// The single slot of `EGRESS_LIMITS_ACTIVE`, an array the program reads before anything else:
/// [`limit_bit`] of a scope is set there while some cgroup has a limit on that scope, so traffic
/// pays one array lookup while no limit is set, and only looks up the keys that can exist.
pub const ACTIVE_SLOT: u32 = 0;

/// The slot of `EGRESS_LIMITS_ACTIVE` that holds a bit per cgroup2 hierarchy level (0: the root)
/// at which some limited cgroup lies: the program looks up the socket cgroup's ancestors at those
/// levels only.
pub const LEVELS_SLOT: u32 = 1;

/// The deepest level a limited cgroup may lie at: the levels' mask is one `u32`.
pub const MAX_LIMIT_LEVEL: u32 = 31;

/// The bit of `EGRESS_LIMITS_ACTIVE` that says limits on `scope` (or [`ALL_SCOPES`]) exist.
#[inline(always)]
pub const fn limit_bit(scope: u32) -> u32 {
    if scope == ALL_SCOPES {
        1 << 31
    } else {
        1 << (scope & 31)
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers with no padding (asserted in the tests below), valid for
    // every bit pattern.
    unsafe impl aya::Pod for super::CgroupKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NetKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NetValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EgressLimitKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EgressLimit {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn shared_types_have_no_padding() {
        assert_eq!(size_of::<CgroupKey>(), 8);
        assert_eq!(size_of::<NetKey>(), 16);
        assert_eq!(size_of::<NetValue>(), 16);
        assert_eq!(size_of::<EgressLimitKey>(), 16);
        assert_eq!(size_of::<EgressLimit>(), 5 * 8);
    }

    #[test]
    fn every_scope_has_its_own_limit_bit() {
        let mut seen = limit_bit(ALL_SCOPES);
        for s in 0..scope::COUNT as u32 {
            assert_eq!(seen & limit_bit(s), 0, "scope {s}");
            seen |= limit_bit(s);
        }
    }
}

/// Value of `TCP_STATS` (per CPU; `ebpf/c/tcp.bpf.c`), keyed by the socket's cgroup v2 id.
/// Mirrored by `struct tally_tcp_value` in `ebpf/c/tally_shared.h`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpValue {
    /// Segments retransmitted (`tcp_skb_pcount()` of each retransmitted skb).
    pub retransmits: u64,
    /// Connections this cgroup opened: `SYN_SENT` → `ESTABLISHED`.
    pub active_opens: u64,
    /// Connections its listeners accepted: `SYN_RECV` → `ESTABLISHED`.
    pub passive_opens: u64,
    /// Established connections that reached `CLOSE` (listeners, failed connects and unfinished
    /// handshakes are not counted, so `opens - closes` is the number open).
    pub closes: u64,
}

/// Buckets of [`DiskValue::latency_buckets`]: bucket `i` counts requests that took
/// `[2^i, 2^(i+1))` microseconds from issue to completion; bucket 0 also takes 0 µs, and the
/// last one everything from `2^23` µs (8.4 s) up.
pub const DISK_LATENCY_BUCKETS: usize = 24;

/// Value of `DISK_STATS` (per CPU; `ebpf/c/disk.bpf.c`), keyed by the cgroup v2 id the I/O is
/// charged to. Mirrored by `struct tally_disk_value` in `ebpf/c/tally_shared.h`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskValue {
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Completed read requests.
    pub reads: u64,
    /// Completed write requests.
    pub writes: u64,
    /// Sum of the completed requests' latencies in nanoseconds.
    pub latency_ns_total: u64,
    pub latency_buckets: [u64; DISK_LATENCY_BUCKETS],
}

impl Default for DiskValue {
    fn default() -> Self {
        DiskValue {
            read_bytes: 0,
            write_bytes: 0,
            reads: 0,
            writes: 0,
            latency_ns_total: 0,
            latency_buckets: [0; DISK_LATENCY_BUCKETS],
        }
    }
}

/// Value of `EXIT_CPU` (per CPU; `ebpf/c/lifecycle.bpf.c`), keyed by cgroup v2 id. Mirrored by
/// `struct tally_exit_value` in `ebpf/c/tally_shared.h`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitValue {
    /// CPU time of the tasks that ended in the cgroup (a task moved there: since it moved), and
    /// of moved tasks while they were in it, in nanoseconds.
    pub cpu_ns: u64,
    /// Tasks (threads) that ended in the cgroup.
    pub tasks: u64,
}

/// Written by the `cgroup_stats` iterator where a cgroup has no such value.
pub const NO_VALUE: u64 = u64::MAX;

/// One record of the `cgroup_stats` iterator (`ebpf/c/cgstat.bpf.c`), one per cgroup:
/// `struct tally_cgroup_stat` in `ebpf/c/tally_shared.h`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupStat {
    /// The cgroup's kernfs id: its directory's inode number, in whichever hierarchy it is.
    pub cgroup_id: u64,
    /// CPU time of the cgroup and its descendants, in nanoseconds, as of the subtree's last
    /// flush; [`NO_VALUE`] in a v1 hierarchy.
    pub cpu_ns: u64,
    /// The memory controller's page counter; [`NO_VALUE`] where the hierarchy has no memory
    /// controller.
    pub memory_pages: u64,
}

/// Slot of `LIFECYCLE_LOST` counting `CGROUP_EVENTS` records dropped on a full ring buffer (slot
/// [`LOST_SLOT`] counts `EXIT_CPU` charges dropped on a full map).
pub const EVENTS_LOST_SLOT: u32 = 1;

/// [`CgroupEvent::kind`] of a cgroup made.
pub const CGROUP_MKDIR: u32 = 1;
/// [`CgroupEvent::kind`] of a cgroup removed.
pub const CGROUP_RMDIR: u32 = 2;
/// Bytes of [`CgroupEvent::path`], its NUL included.
pub const CGROUP_PATH_MAX: usize = 512;

/// A record of `CGROUP_EVENTS` (`ebpf/c/lifecycle.bpf.c`): a cgroup v2 directory made or
/// removed. Mirrored by `struct tally_cgroup_event` in `ebpf/c/tally_shared.h`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupEvent {
    pub cgroup_id: u64,
    /// [`CGROUP_MKDIR`] or [`CGROUP_RMDIR`].
    pub kind: u32,
    /// Bytes of `path` the kernel copied, the NUL included; 0 when the copy failed, and
    /// [`CGROUP_PATH_MAX`] when the path was cut there.
    pub path_len: u32,
    /// The path from the hierarchy's root, as the kernel's `cgroup_path()` writes it.
    pub path: [u8; CGROUP_PATH_MAX],
}

#[cfg(feature = "user")]
mod pod_c {
    // SAFETY: as below.
    unsafe impl aya::Pod for super::ExitValue {}
    // SAFETY: plain `#[repr(C)]` integers with no padding (asserted in the tests below), valid for
    // every bit pattern.
    unsafe impl aya::Pod for super::TcpValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DiskValue {}
}

#[cfg(test)]
mod c_tests {
    use super::*;
    use core::mem::{align_of, size_of};

    #[test]
    fn c_mirrored_types_have_no_padding() {
        // The sizes `ebpf/c/tally_shared.h` static-asserts for its mirrors.
        assert_eq!(size_of::<TcpValue>(), 4 * 8);
        assert_eq!(size_of::<DiskValue>(), (5 + DISK_LATENCY_BUCKETS) * 8);
        assert_eq!(align_of::<DiskValue>(), 8);
        assert_eq!(size_of::<ExitValue>(), 16);
        assert_eq!(size_of::<CgroupStat>(), 24);
        assert_eq!(size_of::<CgroupEvent>(), 16 + CGROUP_PATH_MAX);
    }
}
