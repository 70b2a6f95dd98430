/* SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0 */
/* Map keys and values shared by the C programs and the loader.
 *
 * This header mirrors ebpf/common/src/lib.rs (TcpValue, DiskValue, DISK_LATENCY_BUCKETS,
 * LOST_SLOT, ExitValue, EVENTS_LOST_SLOT, CgroupEvent and its constants, CgroupStat, NO_VALUE): change both together.
 * Every field is a fixed-width integer with no implicit padding; the static asserts here and the
 * size asserts in ebpf/common's tests keep the two sides in step.
 * Per-cgroup maps are keyed by the cgroup v2 id, a __u64 (CgroupKey on the Rust side). */
#ifndef TALLY_SHARED_H
#define TALLY_SHARED_H

/* Index of the single slot of the per-CPU *_LOST arrays. */
#define TALLY_LOST_SLOT 0

/* TCP_STATS value (per CPU). */
struct tally_tcp_value {
	/* Segments retransmitted (tcp_skb_pcount() of each retransmitted skb). */
	__u64 retransmits;
	/* SYN_SENT -> ESTABLISHED. */
	__u64 active_opens;
	/* SYN_RECV -> ESTABLISHED. */
	__u64 passive_opens;
	/* -> CLOSE from a state that follows ESTABLISHED (so closes pair with opens). */
	__u64 closes;
};

/* Buckets of the disk latency histogram: bucket i counts completions that took
 * [2^i, 2^(i+1)) microseconds, bucket 0 also takes 0 us, the last one everything from 2^23 us. */
#define TALLY_DISK_LATENCY_BUCKETS 24

/* DISK_STATS value (per CPU). */
struct tally_disk_value {
	__u64 read_bytes;
	__u64 write_bytes;
	/* Completed read / write requests. */
	__u64 reads;
	__u64 writes;
	/* Sum of the completed requests' latencies, for the histogram's _sum. */
	__u64 latency_ns_total;
	__u64 latency_buckets[TALLY_DISK_LATENCY_BUCKETS];
};

/* LIFECYCLE_LOST's second slot: ring buffer records dropped. */
#define TALLY_EVENTS_LOST_SLOT 1

/* EXIT_CPU value (per CPU). */
struct tally_exit_value {
	/* CPU time of the tasks that ended in the cgroup (moved tasks: since they moved in), and of
	 * moved tasks while they were in it. */
	__u64 cpu_ns;
	/* Tasks (threads) that ended in the cgroup. */
	__u64 tasks;
};

/* tally_cgroup_event.kind */
#define TALLY_CGROUP_MKDIR 1
#define TALLY_CGROUP_RMDIR 2
/* Bytes of a path, its NUL included; a longer path is cut there (path_len == the size). */
#define TALLY_CGROUP_PATH_MAX 512

/* A CGROUP_EVENTS record. */
struct tally_cgroup_event {
	__u64 cgroup_id;
	__u32 kind;
	/* What bpf_probe_read_kernel_str() copied, the NUL included; 0 when it failed. */
	__u32 path_len;
	char path[TALLY_CGROUP_PATH_MAX];
};

/* Written where a cgroup has no such value (no memory controller in its hierarchy). */
#define TALLY_NO_VALUE 0xffffffffffffffffULL

/* One record of the cgroup_stats iterator (cgstat.bpf.c), one per cgroup. */
struct tally_cgroup_stat {
	/* The cgroup's kernfs id: its directory's inode number, in whichever hierarchy it is. */
	__u64 cgroup_id;
	/* cgroup->bstat.cputime.sum_exec_runtime, as of the last flush; TALLY_NO_VALUE in v1. */
	__u64 cpu_ns;
	/* The memory controller's page counter; TALLY_NO_VALUE without one. */
	__u64 memory_pages;
};

_Static_assert(sizeof(struct tally_cgroup_stat) == 24, "CgroupStat is 24 bytes");
_Static_assert(sizeof(struct tally_exit_value) == 16, "ExitValue is 16 bytes");
_Static_assert(sizeof(struct tally_cgroup_event) == 16 + TALLY_CGROUP_PATH_MAX,
	       "CgroupEvent has no padding");
_Static_assert(sizeof(struct tally_tcp_value) == 32, "TcpValue is 32 bytes");
_Static_assert(sizeof(struct tally_disk_value) == 40 + 8 * TALLY_DISK_LATENCY_BUCKETS,
	       "DiskValue has no padding");

#endif /* TALLY_SHARED_H */
