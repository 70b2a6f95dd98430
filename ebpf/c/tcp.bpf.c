// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/* TCP health per cgroup: segments retransmitted, connections opened (active and passive) and
 * connections closed, in TCP_STATS (per-CPU hash, cgroup v2 id -> struct tally_tcp_value).
 *
 * Written in C with CO-RE, not in Rust like ebpf/programs, because it reads kernel structs whose
 * layout differs between kernels: struct sock's cgroup (sk_cgrp_data became a plain cgroup
 * pointer in 5.15), the tracepoints' argument lists (tcp_retransmit_skb gained `err` in 6.x) and
 * tracepoint formats (inet_sock_set_state gained `family` in 4.20, moving `protocol`). clang's
 * preserve_access_index relocations, applied by the loader against the kernel's BTF, let one
 * object read them everywhere.
 *
 * Counts go to the SOCKET's cgroup, not the current task's: retransmits and most state changes
 * run in softirq on behalf of whoever was interrupted. A socket belongs to the cgroup v2 of the
 * task that created it, and an accepted socket to its listener's (kernel/cgroup/cgroup.c,
 * cgroup_sk_alloc() and cgroup_sk_clone()).
 *
 * One program per attach method and hook, all thin wrappers of the same bodies, so the loader
 * (ebpf/src/tcp.rs) can load the best method this kernel allows and fall back: fentry/fexit,
 * tp_btf, raw_tp, tracepoint, kprobe/kretprobe. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "tally_shared.h"
#include "tally_cgroup.h"

char LICENSE[] SEC("license") = "Dual MIT/GPL";

#define EEXIST 17

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 10240); /* the loader sets the configured size */
	__type(key, __u64);
	__type(value, struct tally_tcp_value);
} TCP_STATS SEC(".maps");

/* Updates dropped because TCP_STATS was full. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} TCP_LOST SEC(".maps");

/* The kprobe method's arguments of __tcp_retransmit_skb() calls in flight, from entry to return
 * (a kretprobe sees only the return value). LRU: an entry whose return was missed (the kernel
 * counts those in the kretprobe's nmissed) is evicted, never leaked. */
struct retransmit_call {
	const struct sock *sk;
	const struct sk_buff *skb;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct retransmit_call);
} TCP_RETRANSMIT_CALLS SEC(".maps");

/* sock_cgroup_data before 5.15 ("bpf, cgroups: Fix cgroup v2 fallback on v1/v2 mixed mode"): the
 * cgroup v2 pointer shared a word with net_prio / net_cls data, which set bit 0 when in use. */
struct sock_cgroup_data___old {
	union {
		__u64 val;
	};
} __attribute__((preserve_access_index));

/* The cgroup v2 id of the socket's cgroup; 0 when the kernel does not record it. */
static __always_inline __u64 sock_cgroup_id(const struct sock *sk)
{
	if (!bpf_core_field_exists(sk->sk_cgrp_data))
		return 0;
	if (bpf_core_field_exists(struct sock_cgroup_data, cgroup))
		return tally_cgroup_id(BPF_CORE_READ(sk, sk_cgrp_data.cgroup));
	struct sock_cgroup_data___old *data =
		(void *)__builtin_preserve_access_index(&sk->sk_cgrp_data);
	__u64 val = BPF_CORE_READ(data, val);
	if (val & 1)
		return 0;
	return tally_cgroup_id((const struct cgroup *)val);
}

static __always_inline struct tally_tcp_value *tcp_value(__u64 cgroup_id)
{
	struct tally_tcp_value *value = bpf_map_lookup_elem(&TCP_STATS, &cgroup_id);
	if (value)
		return value;
	struct tally_tcp_value zero = {};
	long err = bpf_map_update_elem(&TCP_STATS, &cgroup_id, &zero, BPF_NOEXIST);
	if (err && err != -EEXIST) {
		__u32 slot = TALLY_LOST_SLOT;
		__u64 *lost = bpf_map_lookup_elem(&TCP_LOST, &slot);
		if (lost)
			*lost += 1;
		return NULL;
	}
	return bpf_map_lookup_elem(&TCP_STATS, &cgroup_id);
}

/* tcp_skb_pcount(): the segments an skb carries under TSO, TCP_SKB_CB(skb)->tcp_gso_segs, kept
 * in skb->cb (include/net/tcp.h). What the RetransSegs MIB counter adds per retransmit. */
static __always_inline __u64 skb_segments(const struct sk_buff *skb)
{
	struct tcp_skb_cb *cb = (void *)__builtin_preserve_access_index(&skb->cb);
	__u16 segs = BPF_CORE_READ(cb, tcp_gso_segs);
	return segs ? segs : 1;
}

static __always_inline int count_retransmit(const struct sock *sk, const struct sk_buff *skb)
{
	__u64 id = sock_cgroup_id(sk);
	if (!id)
		return 0;
	struct tally_tcp_value *value = tcp_value(id);
	if (value)
		value->retransmits += skb_segments(skb);
	return 0;
}

static __always_inline int count_state(const struct sock *sk, int oldstate, int newstate)
{
	__u64 *counter;
	__u64 id;
	struct tally_tcp_value *value;

	if (newstate == TCP_ESTABLISHED) {
		if (oldstate != TCP_SYN_SENT && oldstate != TCP_SYN_RECV)
			return 0;
	} else if (newstate == TCP_CLOSE) {
		/* A listener, a failed connect or a handshake that never completed is not the end of
		 * a connection that was counted as opened. */
		if (oldstate == TCP_LISTEN || oldstate == TCP_SYN_SENT ||
		    oldstate == TCP_SYN_RECV || oldstate == TCP_CLOSE)
			return 0;
	} else {
		return 0;
	}
	id = sock_cgroup_id(sk);
	if (!id)
		return 0;
	value = tcp_value(id);
	if (!value)
		return 0;
	if (newstate == TCP_CLOSE)
		counter = &value->closes;
	else if (oldstate == TCP_SYN_SENT)
		counter = &value->active_opens;
	else
		counter = &value->passive_opens;
	*counter += 1;
	return 0;
}

/* inet_sock_set_state also reports SCTP and MPTCP sockets. */
static __always_inline int is_tcp(const struct sock *sk)
{
	return BPF_CORE_READ_BITFIELD_PROBED(sk, sk_protocol) == IPPROTO_TCP;
}

/* Whether tcp:tcp_retransmit_skb reports a failed attempt. Since 6.x ("tcp: add a new arg err to
 * tcp_retransmit_skb tracepoint") it fires at the end of __tcp_retransmit_skb() whatever happened
 * and passes `err` as its third argument; before, it fired on success only, with two. */
static __always_inline int retransmit_failed(__u64 *ctx)
{
	if (!bpf_core_field_exists(struct trace_event_raw_tcp_retransmit_skb, err))
		return 0;
	return (int)ctx[2] != 0;
}

/* fentry / fexit: the functions that fire the tracepoints. */

SEC("fexit/__tcp_retransmit_skb")
int BPF_PROG(tcp_retransmit_fexit, struct sock *sk, struct sk_buff *skb, int segs, int ret)
{
	if (ret)
		return 0;
	return count_retransmit(sk, skb);
}

SEC("fentry/tcp_set_state")
int BPF_PROG(tcp_state_fentry, struct sock *sk, int state)
{
	/* On entry sk_state still holds the old state, which the tracepoint reports as oldstate. */
	return count_state(sk, BPF_CORE_READ(sk, __sk_common.skc_state), state);
}

/* tp_btf: typed tracepoint arguments. */

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(tcp_retransmit_btf, const struct sock *sk, const struct sk_buff *skb)
{
	if (retransmit_failed(ctx))
		return 0;
	return count_retransmit(sk, skb);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(tcp_state_btf, const struct sock *sk, int oldstate, int newstate)
{
	if (!is_tcp(sk))
		return 0;
	return count_state(sk, oldstate, newstate);
}

/* raw_tp: the same arguments, untyped; every read goes through bpf_probe_read_kernel. */

SEC("raw_tp/tcp_retransmit_skb")
int BPF_PROG(tcp_retransmit_raw, const struct sock *sk, const struct sk_buff *skb)
{
	if (retransmit_failed(ctx))
		return 0;
	return count_retransmit(sk, skb);
}

SEC("raw_tp/inet_sock_set_state")
int BPF_PROG(tcp_state_raw, const struct sock *sk, int oldstate, int newstate)
{
	if (!is_tcp(sk))
		return 0;
	return count_state(sk, oldstate, newstate);
}

/* tracepoint: the formatted record (/sys/kernel/tracing/events/<category>/<name>/format). */

/* tcp:tcp_retransmit_skb's record up to the socket. These two pointers have sat at these offsets
 * since the event appeared (4.15); later fields moved, and `err` is read through CO-RE. */
struct tcp_retransmit_skb_record {
	__u64 common; /* common_type, common_flags, common_preempt_count, common_pid */
	const struct sk_buff *skbaddr;
	const struct sock *skaddr;
};

SEC("tracepoint/tcp/tcp_retransmit_skb")
int tcp_retransmit_tp(struct tcp_retransmit_skb_record *ctx)
{
	if (bpf_core_field_exists(struct trace_event_raw_tcp_retransmit_skb, err) &&
	    ((struct trace_event_raw_tcp_retransmit_skb *)ctx)->err)
		return 0;
	return count_retransmit(ctx->skaddr, ctx->skbaddr);
}

/* sock:inet_sock_set_state's record is vmlinux.h's trace_event_raw_inet_sock_set_state, read
 * through CO-RE because `protocol` moved when `family` was added (4.20). */
SEC("tracepoint/sock/inet_sock_set_state")
int tcp_state_tp(struct trace_event_raw_inet_sock_set_state *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	return count_state(ctx->skaddr, ctx->oldstate, ctx->newstate);
}

/* kprobe / kretprobe: the functions fentry/fexit hook, through the kernel's kprobes, for kernels
 * whose BTF lacks a hook's function (or no BTF at all: no fentry, no tp_btf) and whose tracepoints
 * are gone. Arguments are read from pt_regs; CO-RE still relocates the struct reads. */

/* Who a call in flight belongs to: the thread, or, in softirq on an idle CPU (where every CPU's
 * idle task is pid 0), the CPU. A softirq cannot migrate, and a thread that does keeps its id. */
static __always_inline __u64 call_key(void)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	if ((__u32)pid_tgid)
		return pid_tgid;
	return (1ULL << 63) | bpf_get_smp_processor_id();
}

SEC("kprobe/__tcp_retransmit_skb")
int BPF_KPROBE(tcp_retransmit_kprobe, const struct sock *sk, const struct sk_buff *skb)
{
	__u64 key = call_key();
	struct retransmit_call call = { .sk = sk, .skb = skb };
	if (bpf_map_update_elem(&TCP_RETRANSMIT_CALLS, &key, &call, BPF_ANY)) {
		__u32 slot = TALLY_LOST_SLOT;
		__u64 *lost = bpf_map_lookup_elem(&TCP_LOST, &slot);
		if (lost)
			*lost += 1;
	}
	return 0;
}

SEC("kretprobe/__tcp_retransmit_skb")
int BPF_KRETPROBE(tcp_retransmit_kretprobe, int ret)
{
	__u64 key = call_key();
	struct retransmit_call *found = bpf_map_lookup_elem(&TCP_RETRANSMIT_CALLS, &key);
	if (!found)
		return 0;
	struct retransmit_call call = *found;
	bpf_map_delete_elem(&TCP_RETRANSMIT_CALLS, &key);
	if (ret)
		return 0;
	return count_retransmit(call.sk, call.skb);
}

SEC("kprobe/tcp_set_state")
int BPF_KPROBE(tcp_state_kprobe, struct sock *sk, int state)
{
	return count_state(sk, BPF_CORE_READ(sk, __sk_common.skc_state), state);
}
