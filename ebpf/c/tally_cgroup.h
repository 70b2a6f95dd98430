/* SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0 */
/* Reading a cgroup's id out of kernel structs, with CO-RE, for the C programs. Include after
 * vmlinux.h and the libbpf headers. */
#ifndef TALLY_CGROUP_H
#define TALLY_CGROUP_H

/* Before 5.5 ("kernfs: convert kernfs_node->id from union kernfs_node_id to u64") the id was a
 * union whose `id` member is what bpf_get_current_cgroup_id() returned. */
union kernfs_node_id {
	struct {
		__u32 ino;
		__u32 generation;
	};
	__u64 id;
};

struct kernfs_node___old {
	union kernfs_node_id id;
} __attribute__((preserve_access_index));

/* The cgroup id of `cgrp`: its kernfs node id, the inode number of the cgroup directory
 * (kernel/cgroup/cgroup.c, cgroup_id()). 0 when cgrp is NULL. */
static __always_inline __u64 tally_cgroup_id(const struct cgroup *cgrp)
{
	if (!cgrp)
		return 0;
	struct kernfs_node *kn = BPF_CORE_READ(cgrp, kn);
	if (!kn)
		return 0;
	if (bpf_core_type_exists(union kernfs_node_id))
		return BPF_CORE_READ((struct kernfs_node___old *)kn, id.id);
	return BPF_CORE_READ(kn, id);
}

/* Whether `cgrp` belongs to the cgroup v2 hierarchy, whose ids are the ones the loader and
 * bpf_get_current_cgroup_id() speak. The default hierarchy is set up first and gets hierarchy
 * id 0 (kernel/cgroup/cgroup.c, cgroup_init() -> cgroup_setup_root(&cgrp_dfl_root)); a v1
 * controller's cgroup (blkio on a hybrid node) has another id and a directory elsewhere. */
static __always_inline int tally_cgroup_is_v2(const struct cgroup *cgrp)
{
	return BPF_CORE_READ(cgrp, root, hierarchy_id) == 0;
}

#endif /* TALLY_CGROUP_H */
