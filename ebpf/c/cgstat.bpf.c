// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/* Every cgroup's CPU time and memory in one read: a cgroup iterator (kernel/bpf/cgroup_iter.c)
 * that stores one struct tally_cgroup_stat per cgroup of the subtree it is attached to, in
 * pre-order, in CGROUP_STATS, so the agent reads a thousand workloads with one read() instead of
 * two file reads each.
 *
 * A cgroup iterator cannot resume a walk in a second read() (cgroup_iter_seq_start() answers
 * EOPNOTSUPP), and one read() holds at most the 32 KiB seq buffer: 1,365 records. So the records
 * go to CGROUP_STATS, an array the agent maps into its memory, one after another from index 0,
 * and the read() itself carries only the count of cgroups stored, written at the end; a count
 * above the array's size says how many did not fit. Dead cgroups (removed, still pinned by
 * memory or a reference) are not shown to the program (cgroup_iter_seq_show()).
 *
 * CPU is the cgroup's base stat, cgroup->bstat.cputime.sum_exec_runtime: what cpu.stat shows as
 * usage_usec (kernel/cgroup/rstat.c, cgroup_base_stat_cputime_show()), kept for every cgroup of
 * the v2 hierarchy whatever controllers it has. It is folded in from per-CPU counters when the
 * subtree is flushed. The flush is a kfunc (css_rstat_flush, cgroup_rstat_flush before 6.16)
 * that the loader cannot link, so the agent flushes by reading the cpu.stat of the subtree's top
 * cgroups, which flushes everything below them, just before it reads the iterator. Cgroups of a
 * v1 hierarchy get TALLY_NO_VALUE for CPU.
 *
 * Memory is the memory controller's page counter, what memory.current (v2) and
 * memory.usage_in_bytes (v1, below the root) show, in pages: it is kept exact at every charge, no
 * flush needed. A cgroup without a memory controller in its hierarchy (the v2 hierarchy of a
 * hybrid node) gets TALLY_NO_VALUE; the agent attaches a second iterator to the v1 memory
 * hierarchy there. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "tally_shared.h"

char LICENSE[] SEC("license") = "Dual MIT/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 16384); /* the loader sets the configured size */
	__type(key, __u32);
	__type(value, struct tally_cgroup_stat);
} CGROUP_STATS SEC(".maps");

/* Cgroups met so far in the walk under way (one walk at a time: the agent reads from one
 * thread). */
__u64 stored = 0;

SEC("iter/cgroup")
int cgroup_stats(struct bpf_iter__cgroup *ctx)
{
	struct cgroup *cgrp = ctx->cgroup;
	struct tally_cgroup_stat stat = {
		.cpu_ns = TALLY_NO_VALUE,
		.memory_pages = TALLY_NO_VALUE,
	};

	/* Called once more with no cgroup at the end of the walk. */
	if (!cgrp) {
		bpf_seq_write(ctx->meta->seq, &stored, sizeof(stored));
		stored = 0;
		return 0;
	}
	/* The first cgroup of a walk is the one it starts at, alive while the agent holds it. */
	if (ctx->meta->seq_num == 0)
		stored = 0;
	/* Plain loads through the iterator's trusted pointer (CO-RE relocated), not probe reads:
	 * the walk reads a few thousand cgroups a second. The id is kernfs_node's u64 (every kernel
	 * with cgroup iterators, 6.1 and later). */
	stat.cgroup_id = cgrp->kn->id;
	if (cgrp->root->hierarchy_id == 0)
		stat.cpu_ns = cgrp->bstat.cputime.sum_exec_runtime;
	if (bpf_core_enum_value_exists(enum cgroup_subsys_id, memory_cgrp_id)) {
		struct cgroup_subsys_state *css =
			cgrp->subsys[bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id)];

		if (css) {
			/* The css is a member of struct mem_cgroup (its first); its page counter is
			 * beyond what the css's type lets the verifier load, so it is probe-read. */
			__u64 usage = (__u64)css - bpf_core_field_offset(struct mem_cgroup, css) +
				      bpf_core_field_offset(struct mem_cgroup, memory.usage);
			long pages;

			if (!bpf_probe_read_kernel(&pages, sizeof(pages), (void *)usage))
				stat.memory_pages = pages;
		}
	}
	__u32 index = stored;
	struct tally_cgroup_stat *slot = bpf_map_lookup_elem(&CGROUP_STATS, &index);

	/* Beyond the array: counted by the total, not stored. */
	if (slot && stored == index)
		*slot = stat;
	stored++;
	return 0;
}
