//! What a `cgroup_skb` program returns: bit 0 is "pass"; on egress, bit 1 is "congestion"
//! (kernel/bpf/cgroup.c, `__cgroup_bpf_run_filter_skb()`). The egress limits' module
//! (`throttle` in the `tally` object) says what TCP and UDP make of the congestion bit.

/// Let the packet through.
pub const PASS: i32 = 1;
/// Let it through and tell TCP to reduce its congestion window (egress only).
pub const PASS_CN: i32 = 3;
/// Drop it and tell TCP it was congestion (`NET_XMIT_DROP`), not an error (egress only).
pub const DROP_CN: i32 = 2;
