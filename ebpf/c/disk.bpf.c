// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/* Block I/O per cgroup: bytes read and written, completed requests and a latency histogram, in
 * DISK_STATS (per-CPU hash, cgroup v2 id -> struct tally_disk_value).
 *
 * Written in C with CO-RE, not in Rust like ebpf/programs, because it reads kernel structs whose
 * layout differs between kernels: struct request and struct bio, the cgroup a bio is charged to
 * through bio->bi_blkg->blkcg (present only with CONFIG_BLK_CGROUP), and the tracepoints'
 * argument lists (block_rq_issue / block_rq_insert / block_bio_queue lost their request_queue
 * argument in 5.11). clang's preserve_access_index relocations, applied by the loader against the
 * kernel's BTF, let one object read them everywhere.
 *
 * Bytes are counted per bio at block_bio_queue, in the submitter's context, where the kernel
 * charges them to io.stat too (block/blk-core.c, submit_bio_noacct_nocheck(): blk_cgroup_bio_start()
 * then the tracepoint, once per bio: BIO_TRACE_COMPLETION marks it traced, so the remainder of a
 * split bio is not counted twice). Nothing there can be lost or charged to someone else: no map
 * entry has to survive until completion. Counting bytes at request completion, as this program
 * once did, charged whole requests to the wrong cgroup under load: on a node where the v2 cgroups
 * carry no io controller (hybrid nodes, where blkio is v1), every bio shares one blkg, so the
 * scheduler merges requests of different cgroups that touch adjacent sectors
 * (block/blk-merge.c, blk_rq_merge_ok() compares only bi_blkg), and a bio merged into another
 * cgroup's request paid that cgroup. Bytes of failed I/O are counted as io.stat counts them.
 * Only bios of request-based (blk-mq) disks are counted: a bio-based stacked device (dm, md)
 * passes its bios on to the disks below it, where they are counted, so a stack counts once.
 *
 * Which cgroup pays: the blkcg the bio is charged to, when that is a cgroup v2 cgroup below the
 * root. That is right even when a kernel flusher writes the pages back, because the kernel
 * records the owner on the bio (block/blk-cgroup.c, bio_associate_blkg(); writeback:
 * wbc_init_bio()). Otherwise — the io controller is not enabled for the cgroup (its bios carry
 * the root blkcg), blkio is a v1 controller on a hybrid node (the blkcg is not a v2 cgroup), or
 * there is no blkg — it is the cgroup of the submitting task.
 *
 * Requests (reads, writes) and their latency are counted at completion, tracked from issue in
 * DISK_IN_FLIGHT, keyed by the request's address (the plain-tracepoint fallback has no request
 * pointer and keys by (dev, sector) instead). A request is charged to the cgroup that queued it,
 * captured at block_rq_insert in the submitter's context or at block_rq_issue for requests issued
 * directly; a request merged from several cgroups' bios counts for the first. A request the
 * driver was too busy to take is issued again later from kblockd (block/blk-mq.c,
 * blk_mq_requeue_work() and blk_mq_run_work_fn()); it keeps its first owner.
 *
 * One program per attach method and hook, all thin wrappers of the same bodies, so the loader
 * (ebpf/src/disk.rs) can load the best method this kernel allows and fall back: tp_btf, raw_tp,
 * tracepoint. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "tally_shared.h"
#include "tally_cgroup.h"

char LICENSE[] SEC("license") = "Dual MIT/GPL";

#define EEXIST 17
/* include/linux/blk_types.h: the operation is the low REQ_OP_BITS (8) bits of cmd_flags. */
#define REQ_OP_MASK ((1u << 8) - 1)

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 10240); /* the loader sets the configured size */
	__type(key, __u64);
	__type(value, struct tally_disk_value);
} DISK_STATS SEC(".maps");

/* A request being tracked: the request's address (and 0), or for the tracepoint fallback its
 * device and first sector. */
struct in_flight_key {
	__u64 id;
	__u64 sector;
};

struct in_flight {
	/* bpf_ktime_get_ns() at issue; 0 while only inserted. */
	__u64 start_ns;
	__u64 cgroup_id;
	/* Bytes not completed yet. */
	__u64 bytes;
	/* Which request at this address: its rq->start_time_ns (see rq_alloc_ns()). */
	__u64 alloc_ns;
	/* REQ_OP_READ or REQ_OP_WRITE. */
	__u32 op;
	__u32 _pad;
};

/* Bounded by the requests a node can have queued: a request's address is reused for the next
 * request of the same tag, so entries do not pile up. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct in_flight_key);
	__type(value, struct in_flight);
} DISK_IN_FLIGHT SEC(".maps");

/* Updates dropped because DISK_STATS or DISK_IN_FLIGHT was full. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} DISK_LOST SEC(".maps");

/* Exists on kernels before 5.11, where block_rq_issue and block_rq_insert still took
 * (struct request_queue *, struct request *): "block: remove the request_queue argument to the
 * block_rq_issue tracepoint" and the removal of struct hd_struct landed in the same release. */
struct hd_struct {
	int unused;
};

static __always_inline void count_lost(void)
{
	__u32 slot = TALLY_LOST_SLOT;
	__u64 *lost = bpf_map_lookup_elem(&DISK_LOST, &slot);
	if (lost)
		*lost += 1;
}

static __always_inline struct tally_disk_value *disk_value(__u64 cgroup_id)
{
	struct tally_disk_value *value = bpf_map_lookup_elem(&DISK_STATS, &cgroup_id);
	if (value)
		return value;
	struct tally_disk_value zero = {};
	long err = bpf_map_update_elem(&DISK_STATS, &cgroup_id, &zero, BPF_NOEXIST);
	if (err && err != -EEXIST) {
		count_lost();
		return NULL;
	}
	return bpf_map_lookup_elem(&DISK_STATS, &cgroup_id);
}

static __always_inline __u32 log2_u32(__u32 v)
{
	__u32 r, shift;

	r = (v > 0xFFFF) << 4;
	v >>= r;
	shift = (v > 0xFF) << 3;
	v >>= shift;
	r |= shift;
	shift = (v > 0xF) << 2;
	v >>= shift;
	r |= shift;
	shift = (v > 0x3) << 1;
	v >>= shift;
	r |= shift;
	r |= (v >> 1);
	return r;
}

/* Bucket of a latency: floor(log2(microseconds)), 0 for 0 and 1 us, capped at the last. */
static __always_inline __u32 latency_bucket(__u64 ns)
{
	__u64 us = ns / 1000;
	__u32 hi = us >> 32;
	__u32 bucket = hi ? 32 + log2_u32(hi) : log2_u32((__u32)us);
	if (bucket >= TALLY_DISK_LATENCY_BUCKETS)
		bucket = TALLY_DISK_LATENCY_BUCKETS - 1;
	return bucket;
}

/* The cgroup v2 id a bio is charged to (see the header comment). */
static __always_inline __u64 bio_cgroup_id(const struct bio *bio)
{
	if (bio && bpf_core_field_exists(struct bio, bi_blkg)) {
		const struct cgroup *cgrp = BPF_CORE_READ(bio, bi_blkg, blkcg, css.cgroup);
		if (cgrp && tally_cgroup_is_v2(cgrp) && BPF_CORE_READ(cgrp, level) > 0)
			return tally_cgroup_id(cgrp);
	}
	return bpf_get_current_cgroup_id();
}

/* The cgroup v2 id a request is charged to: its first bio's. */
static __always_inline __u64 rq_cgroup_id(const struct request *rq)
{
	return bio_cgroup_id(BPF_CORE_READ(rq, bio));
}

/* REQ_OP_READ, REQ_OP_WRITE, or -1 for anything else (flush, discard, zone and driver ops). */
static __always_inline int rq_op(const struct request *rq)
{
	__u32 op = BPF_CORE_READ(rq, cmd_flags) & REQ_OP_MASK;
	return op == REQ_OP_READ || op == REQ_OP_WRITE ? (int)op : -1;
}

/* Tells requests that reuse one address apart: rq->start_time_ns is stamped once per request
 * when it is set up (block/blk-mq.c) and kept through requeues; 0 where nothing stamps it, which
 * only turns this check off. An entry whose value differs is left over from an earlier request
 * at the same address whose end this program did not see. */
static __always_inline __u64 rq_alloc_ns(const struct request *rq)
{
	if (!bpf_core_field_exists(rq->start_time_ns))
		return 0;
	return BPF_CORE_READ(rq, start_time_ns);
}

/* Whether a bio is on a request-based (blk-mq) disk, where it is counted; a bio-based stacked
 * device passes it on to the disks below. Kernels before 5.12 have no bio->bi_bdev: there every
 * bio counts. */
static __always_inline int bio_on_mq_disk(const struct bio *bio)
{
	if (!bpf_core_field_exists(bio->bi_bdev))
		return 1;
	return BPF_CORE_READ(bio, bi_bdev, bd_disk, queue, mq_ops) != NULL;
}

static __always_inline struct bio *bio_of_queue_event(__u64 *ctx)
{
	struct bio *bio;

	/* Before 5.11 block_bio_queue took (struct request_queue *, struct bio *); see
	 * rq_of_queue_event(). */
	if (bpf_core_type_exists(struct hd_struct)) {
		bio = (struct bio *)ctx[1];
		barrier_var(bio);
	} else {
		bio = (struct bio *)ctx[0];
		barrier_var(bio);
	}
	return bio;
}

/* Adds `bytes` of operation `op` to `cgroup_id`'s counters. */
static __always_inline void add_bytes(__u64 cgroup_id, int op, __u64 bytes)
{
	struct tally_disk_value *value = disk_value(cgroup_id);
	if (!value)
		return;
	if (op == REQ_OP_READ)
		value->read_bytes += bytes;
	else
		value->write_bytes += bytes;
}

static __always_inline int on_bio_queue(const struct bio *bio)
{
	__u32 op = BPF_CORE_READ(bio, bi_opf) & REQ_OP_MASK;

	if (op != REQ_OP_READ && op != REQ_OP_WRITE)
		return 0;
	if (!bio_on_mq_disk(bio))
		return 0;
	add_bytes(bio_cgroup_id(bio), op, BPF_CORE_READ(bio, bi_iter.bi_size));
	return 0;
}

static __always_inline struct request *rq_of_queue_event(__u64 *ctx)
{
	struct request *rq;

	/* The barriers keep clang from merging the two loads into one at a computed offset, which
	 * the verifier refuses (a context pointer may only be read at a constant offset). */
	if (bpf_core_type_exists(struct hd_struct)) {
		rq = (struct request *)ctx[1];
		barrier_var(rq);
	} else {
		rq = (struct request *)ctx[0];
		barrier_var(rq);
	}
	return rq;
}

static __always_inline int on_insert(const struct request *rq)
{
	struct in_flight_key key = { .id = (__u64)rq };
	struct in_flight *known;
	__u64 alloc_ns = rq_alloc_ns(rq);
	int op = rq_op(rq);

	if (op < 0)
		return 0;
	known = bpf_map_lookup_elem(&DISK_IN_FLIGHT, &key);
	/* A requeued request goes back through insert from kblockd; keep its first owner. */
	if (known && known->start_ns && known->alloc_ns == alloc_ns)
		return 0;
	struct in_flight entry = {
		.cgroup_id = rq_cgroup_id(rq),
		.alloc_ns = alloc_ns,
		.op = op,
	};
	if (bpf_map_update_elem(&DISK_IN_FLIGHT, &key, &entry, BPF_ANY))
		count_lost();
	return 0;
}

static __always_inline int on_issue(const struct request *rq)
{
	struct in_flight_key key = { .id = (__u64)rq };
	struct in_flight *known;
	int op = rq_op(rq);

	if (op < 0)
		return 0;
	__u64 bytes = BPF_CORE_READ(rq, __data_len);
	__u64 alloc_ns = rq_alloc_ns(rq);
	__u64 now = bpf_ktime_get_ns();
	known = bpf_map_lookup_elem(&DISK_IN_FLIGHT, &key);
	/* Inserted (charged to who queued it), or issued before and requeued. */
	if (known && known->alloc_ns == alloc_ns) {
		known->start_ns = now;
		known->bytes = bytes;
		known->op = op;
		return 0;
	}
	struct in_flight entry = {
		.start_ns = now,
		.cgroup_id = rq_cgroup_id(rq),
		.bytes = bytes,
		.alloc_ns = alloc_ns,
		.op = op,
	};
	if (bpf_map_update_elem(&DISK_IN_FLIGHT, &key, &entry, BPF_ANY))
		count_lost();
	return 0;
}

/* Accounts the completion of `done` bytes of the tracked request `entry` (a completion may cover
 * part of a request: block/blk-mq.c, blk_update_request()); the request counts once its last
 * byte is done. Returns 1 when it still has bytes to go. Its bytes were counted per bio. */
static __always_inline int account(struct in_flight *entry, __u64 done)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 cgroup_id = entry->cgroup_id;
	__u64 start_ns = entry->start_ns;
	__u32 op = entry->op;

	if (done < entry->bytes) {
		entry->bytes -= done;
		return 1;
	}
	struct tally_disk_value *value = disk_value(cgroup_id);
	if (!value)
		return 0;
	if (op == REQ_OP_READ)
		value->reads += 1;
	else
		value->writes += 1;
	value->latency_ns_total += now - start_ns;
	value->latency_buckets[latency_bucket(now - start_ns)] += 1;
	return 0;
}

static __always_inline int on_complete(const struct request *rq, __u64 done)
{
	struct in_flight_key key = { .id = (__u64)rq };
	struct in_flight *entry = bpf_map_lookup_elem(&DISK_IN_FLIGHT, &key);

	/* Unknown (issued before the program was attached, or not a read or write) or never issued. */
	if (!entry || !entry->start_ns)
		return 0;
	if (entry->alloc_ns != rq_alloc_ns(rq)) {
		bpf_map_delete_elem(&DISK_IN_FLIGHT, &key);
		return 0;
	}
	if (!account(entry, done))
		bpf_map_delete_elem(&DISK_IN_FLIGHT, &key);
	return 0;
}

/* tp_btf: typed tracepoint arguments. */

SEC("tp_btf/block_bio_queue")
int disk_bio_btf(__u64 *ctx)
{
	return on_bio_queue(bio_of_queue_event(ctx));
}

SEC("tp_btf/block_rq_insert")
int disk_insert_btf(__u64 *ctx)
{
	return on_insert(rq_of_queue_event(ctx));
}

SEC("tp_btf/block_rq_issue")
int disk_issue_btf(__u64 *ctx)
{
	return on_issue(rq_of_queue_event(ctx));
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(disk_complete_btf, struct request *rq, int error, unsigned int nr_bytes)
{
	return on_complete(rq, nr_bytes);
}

/* raw_tp: the same arguments, untyped; every read goes through bpf_probe_read_kernel. */

SEC("raw_tp/block_bio_queue")
int disk_bio_raw(__u64 *ctx)
{
	return on_bio_queue(bio_of_queue_event(ctx));
}

SEC("raw_tp/block_rq_insert")
int disk_insert_raw(__u64 *ctx)
{
	return on_insert(rq_of_queue_event(ctx));
}

SEC("raw_tp/block_rq_issue")
int disk_issue_raw(__u64 *ctx)
{
	return on_issue(rq_of_queue_event(ctx));
}

SEC("raw_tp/block_rq_complete")
int BPF_PROG(disk_complete_raw, struct request *rq, int error, unsigned int nr_bytes)
{
	return on_complete(rq, nr_bytes);
}

/* blk_fill_rwbs() (block/blktrace.c): 'F' first for a preflush, then the operation. Takes the
 * characters, not the record: the verifier refuses a context pointer moved by an offset. */
static __always_inline int rwbs_op(char first, char second)
{
	char c = first == 'F' ? second : first;
	if (c == 'R')
		return REQ_OP_READ;
	if (c == 'W')
		return REQ_OP_WRITE;
	return -1;
}

/* tracepoint: the formatted record (/sys/kernel/tracing/events/block/<name>/format), which
 * carries no request pointer. */

/* block:block_bio_queue's record (the block_bio event class), in the submitter's context. It
 * names only the device, so here the bios of stacked devices (dm, md) count on every layer. */
SEC("tracepoint/block/block_bio_queue")
int disk_bio_tp(struct trace_event_raw_block_bio *ctx)
{
	int op = rwbs_op(ctx->rwbs[0], ctx->rwbs[1]);
	if (op < 0)
		return 0;
	add_bytes(bpf_get_current_cgroup_id(), op, (__u64)ctx->nr_sector << 9);
	return 0;
}

/* block:block_rq_issue's record is vmlinux.h's trace_event_raw_block_rq (the block_rq event
 * class), read through CO-RE because `rwbs` moved when `ioprio` was added (6.x). */
SEC("tracepoint/block/block_rq_issue")
int disk_issue_tp(struct trace_event_raw_block_rq *ctx)
{
	int op = rwbs_op(ctx->rwbs[0], ctx->rwbs[1]);
	if (op < 0)
		return 0;
	struct in_flight_key key = { .id = ctx->dev, .sector = ctx->sector };
	__u64 bytes = bpf_core_field_exists(ctx->bytes) ? ctx->bytes : (__u64)ctx->nr_sector << 9;
	__u64 now = bpf_ktime_get_ns();
	struct in_flight *known = bpf_map_lookup_elem(&DISK_IN_FLIGHT, &key);
	/* Issued again after the driver was busy (requeued), from kblockd: keep the first owner. */
	if (known && known->op == op) {
		known->start_ns = now;
		known->bytes = bytes;
		return 0;
	}
	struct in_flight entry = {
		.start_ns = now,
		.cgroup_id = bpf_get_current_cgroup_id(),
		.bytes = bytes,
		.op = op,
	};
	if (bpf_map_update_elem(&DISK_IN_FLIGHT, &key, &entry, BPF_ANY))
		count_lost();
	return 0;
}

/* block:block_rq_complete's record up to `error`. These fields have sat at these offsets on every
 * kernel (the event class was renamed, so CO-RE could not find it by one name). */
struct block_rq_complete_record {
	__u64 common; /* common_type, common_flags, common_preempt_count, common_pid */
	__u32 dev;
	__u32 _pad;
	__u64 sector;
	/* The completed bytes >> 9. */
	__u32 nr_sector;
	__s32 error;
};

SEC("tracepoint/block/block_rq_complete")
int disk_complete_tp(struct block_rq_complete_record *ctx)
{
	struct in_flight_key key = { .id = ctx->dev, .sector = ctx->sector };
	struct in_flight *entry = bpf_map_lookup_elem(&DISK_IN_FLIGHT, &key);
	__u64 done = (__u64)ctx->nr_sector << 9;

	if (!entry)
		return 0;
	if (account(entry, done)) {
		/* The rest of a partly completed request starts after what completed. */
		struct in_flight rest = *entry;
		struct in_flight_key next = { .id = key.id, .sector = key.sector + ctx->nr_sector };
		if (bpf_map_update_elem(&DISK_IN_FLIGHT, &next, &rest, BPF_ANY))
			count_lost();
	}
	bpf_map_delete_elem(&DISK_IN_FLIGHT, &key);
	return 0;
}
