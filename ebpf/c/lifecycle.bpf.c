// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/* Cgroups as they are made and removed, and the CPU time of tasks as they end, so a workload that
 * lives and dies between two of the agent's walks is still billed.
 *
 * CGROUP_EVENTS (ring buffer): one record per cgroup v2 directory made (cgroup_mkdir) or removed
 * (cgroup_rmdir), with its id and its path from the hierarchy's root, as the kernel's
 * cgroup_path() writes it (absolute in the hierarchy, whatever cgroup namespace the agent is in).
 * Controller hierarchies of cgroup v1 are skipped: the agent joins everything by v2 id. Every
 * mkdir and rmdir, of every hierarchy, also counts in CGROUP_CHANGES.
 *
 * EXIT_CPU (per-CPU hash, cgroup v2 id -> struct tally_exit_value): CPU time of the tasks that
 * ended in the cgroup, counted in two steps. At sched_process_exit the task's runtime is charged
 * as it stands, and remembered; the task still runs then, and the time since the scheduler last
 * updated it (up to a tick, 4 ms at HZ=250) is not in the sum yet. When the task is freed
 * (sched_process_free, an RCU callback after it was reaped) se.sum_exec_runtime is final and
 * what it grew since the exit is charged too. A free that never comes, or comes after the agent
 * gave up on the cgroup, leaves the count short by that tail only. The task's css_set, and so
 * its cgroup, stays until after the free (kernel/exit.c, delayed_put_task_struct();
 * cgroup_free() runs in __put_task_struct()).
 *
 * A task moved between cgroups (cgroup_attach_task) had its time until then charged to where it
 * ran. CPU_MARKS (task storage) records the runtime at the move and the cgroup moved to, so the
 * cgroup moved from is charged the time spent there and the new one only what follows. A task
 * never moved (born in the cgroup, the usual case) has no mark and is charged its whole runtime.
 * The tracepoint fires once per move, for the thread group leader: the other threads of a
 * process moved whole carry no mark and are charged their whole runtime where they end.
 *
 * One program per attach method and hook, thin wrappers of the same bodies, so the loader
 * (ebpf/src/lifecycle.rs) can load the best this kernel allows: tp_btf, then raw_tp. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "tally_shared.h"
#include "tally_cgroup.h"

char LICENSE[] SEC("license") = "Dual MIT/GPL";

#define EEXIST 17

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} CGROUP_EVENTS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 10240); /* the loader sets the configured size */
	__type(key, __u64);
	__type(value, struct tally_exit_value);
} EXIT_CPU SEC(".maps");

/* Where a task's time is charged from: its runtime when it last moved (or, once it exited, its
 * runtime at the exit, charged then), and the cgroup it moved to. */
struct cpu_mark {
	__u64 runtime_ns;
	__u64 cgroup_id;
	/* Set at sched_process_exit: runtime_ns is what was charged at the exit. */
	__u64 exited;
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct cpu_mark);
} CPU_MARKS SEC(".maps");

/* Slot 0: cgroups made or removed in any hierarchy, v1 controllers' too, since load. The agent
 * walks the hierarchies again only when it moved. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} CGROUP_CHANGES SEC(".maps");

/* Slot TALLY_LOST_SLOT: charges dropped because EXIT_CPU was full. Slot TALLY_EVENTS_LOST_SLOT:
 * records dropped because CGROUP_EVENTS was full (the agent drains it once a tick). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} LIFECYCLE_LOST SEC(".maps");

static __always_inline void count_lost(__u32 slot)
{
	__u64 *lost = bpf_map_lookup_elem(&LIFECYCLE_LOST, &slot);
	if (lost)
		*lost += 1;
}

static __always_inline void charge(__u64 cgroup_id, __u64 cpu_ns, __u64 tasks)
{
	if (!cgroup_id)
		return;
	struct tally_exit_value *value = bpf_map_lookup_elem(&EXIT_CPU, &cgroup_id);
	if (!value) {
		struct tally_exit_value zero = {};
		long err = bpf_map_update_elem(&EXIT_CPU, &cgroup_id, &zero, BPF_NOEXIST);
		if (err && err != -EEXIST) {
			count_lost(TALLY_LOST_SLOT);
			return;
		}
		value = bpf_map_lookup_elem(&EXIT_CPU, &cgroup_id);
		if (!value)
			return;
	}
	value->cpu_ns += cpu_ns;
	value->tasks += tasks;
}

static __always_inline int on_cgroup_event(struct cgroup *cgrp, const char *path, __u32 kind)
{
	__u32 slot = 0;
	__u64 *changes = bpf_map_lookup_elem(&CGROUP_CHANGES, &slot);
	if (changes)
		__sync_fetch_and_add(changes, 1);
	if (!cgrp || !tally_cgroup_is_v2(cgrp))
		return 0;
	struct tally_cgroup_event *event =
		bpf_ringbuf_reserve(&CGROUP_EVENTS, sizeof(struct tally_cgroup_event), 0);
	if (!event) {
		count_lost(TALLY_EVENTS_LOST_SLOT);
		return 0;
	}
	event->cgroup_id = tally_cgroup_id(cgrp);
	event->kind = kind;
	long len = bpf_probe_read_kernel_str(event->path, sizeof(event->path), path);
	event->path_len = len > 0 ? (__u32)len : 0;
	bpf_ringbuf_submit(event, 0);
	return 0;
}

static __always_inline __u64 task_cgroup_id(struct task_struct *task)
{
	return tally_cgroup_id(BPF_CORE_READ(task, cgroups, dfl_cgrp));
}

static __always_inline int on_attach(struct cgroup *dst, struct task_struct *task)
{
	if (!dst || !task || !tally_cgroup_is_v2(dst))
		return 0;
	__u64 runtime = BPF_CORE_READ(task, se.sum_exec_runtime);
	struct cpu_mark *mark =
		bpf_task_storage_get(&CPU_MARKS, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!mark)
		return 0;
	/* A fresh mark is zero: the time before the first move stays with the cgroup's own
	 * accounting (and the agent's reading of it), unknown here. */
	if (mark->cgroup_id && !mark->exited && runtime > mark->runtime_ns)
		charge(mark->cgroup_id, runtime - mark->runtime_ns, 0);
	mark->runtime_ns = runtime;
	mark->cgroup_id = tally_cgroup_id(dst);
	return 0;
}

/* The time a task used in its cgroup up to `runtime`: since it moved there, or all of it. */
static __always_inline __u64 since_mark(struct cpu_mark *mark, __u64 runtime)
{
	if (mark && mark->cgroup_id && runtime >= mark->runtime_ns)
		return runtime - mark->runtime_ns;
	return runtime;
}

static __always_inline int on_exit(struct task_struct *task)
{
	if (!task)
		return 0;
	__u64 runtime = BPF_CORE_READ(task, se.sum_exec_runtime);
	__u64 cgroup_id = task_cgroup_id(task);
	struct cpu_mark *mark =
		bpf_task_storage_get(&CPU_MARKS, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	charge(cgroup_id, since_mark(mark, runtime), 1);
	if (mark) {
		mark->runtime_ns = runtime;
		mark->cgroup_id = cgroup_id;
		mark->exited = 1;
	}
	return 0;
}

static __always_inline int on_free(struct task_struct *task)
{
	if (!task)
		return 0;
	__u64 runtime = BPF_CORE_READ(task, se.sum_exec_runtime);
	struct cpu_mark *mark = bpf_task_storage_get(&CPU_MARKS, task, 0, 0);
	if (mark && mark->exited) {
		/* The tail since the exit; the rest was charged then. */
		if (runtime > mark->runtime_ns)
			charge(task_cgroup_id(task), runtime - mark->runtime_ns, 0);
		return 0;
	}
	/* No exit seen (the storage could not be made then): all of it now. */
	charge(task_cgroup_id(task), since_mark(mark, runtime), 1);
	return 0;
}

SEC("tp_btf/cgroup_mkdir")
int BPF_PROG(lifecycle_mkdir_btf, struct cgroup *cgrp, const char *path)
{
	return on_cgroup_event(cgrp, path, TALLY_CGROUP_MKDIR);
}

SEC("tp_btf/cgroup_rmdir")
int BPF_PROG(lifecycle_rmdir_btf, struct cgroup *cgrp, const char *path)
{
	return on_cgroup_event(cgrp, path, TALLY_CGROUP_RMDIR);
}

SEC("tp_btf/cgroup_attach_task")
int BPF_PROG(lifecycle_attach_btf, struct cgroup *dst, const char *path, struct task_struct *task)
{
	return on_attach(dst, task);
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(lifecycle_exit_btf, struct task_struct *task)
{
	return on_exit(task);
}

SEC("tp_btf/sched_process_free")
int BPF_PROG(lifecycle_free_btf, struct task_struct *task)
{
	return on_free(task);
}

/* raw_tp: the same arguments, untyped. */

SEC("raw_tp/cgroup_mkdir")
int lifecycle_mkdir_raw(__u64 *ctx)
{
	return on_cgroup_event((struct cgroup *)ctx[0], (const char *)ctx[1], TALLY_CGROUP_MKDIR);
}

SEC("raw_tp/cgroup_rmdir")
int lifecycle_rmdir_raw(__u64 *ctx)
{
	return on_cgroup_event((struct cgroup *)ctx[0], (const char *)ctx[1], TALLY_CGROUP_RMDIR);
}

SEC("raw_tp/cgroup_attach_task")
int lifecycle_attach_raw(__u64 *ctx)
{
	return on_attach((struct cgroup *)ctx[0], (struct task_struct *)ctx[2]);
}

SEC("raw_tp/sched_process_exit")
int lifecycle_exit_raw(__u64 *ctx)
{
	return on_exit((struct task_struct *)ctx[0]);
}

SEC("raw_tp/sched_process_free")
int lifecycle_free_raw(__u64 *ctx)
{
	return on_free((struct task_struct *)ctx[0]);
}
