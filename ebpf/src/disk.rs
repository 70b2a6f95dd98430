//! Block I/O per cgroup: bytes read and written, completed requests and a latency histogram,
//! counted by `ebpf/c/disk.bpf.c` against the cgroup the I/O is charged to.
//!
//! Bytes are counted per bio at `block_bio_queue`, in the submitter's context, where io.stat
//! counts them: exact, and never charged to another cgroup whose request a bio was merged into.
//! Requests and their latency are counted at completion.
//!
//! Attach methods, best first: `tp_btf`, `raw_tracepoint` (`block_bio_queue`, `block_rq_insert`,
//! `block_rq_issue`, `block_rq_complete`, with the bio and request pointers) and `tracepoint`
//! (`block:block_bio_queue`, `block:block_rq_issue`, `block:block_rq_complete`: no request
//! pointer, so requests are matched by device and sector and charged to the task that issued
//! them, and the bios of stacked devices count on every layer). There is no `fentry` method: the functions that fire
//! these tracepoints are internal to blk-mq, and `tp_btf` works on every kernel that has fentry.
//!
//! Attribution, and its limit on hybrid nodes: a bio belongs to the cgroup v2 it is charged to
//! (`bio->bi_blkg`), which holds even for writeback by a kernel flusher — when the io controller
//! is enabled on cgroup v2. Where it is not (cgroup v1 `blkio`, or v2 without `io` in the
//! parents' `subtree_control`), it goes to the task that submitted it, so direct I/O lands on the
//! right cgroup and buffered writeback on the flusher's (the root).

use tally_ebpf_common::DiskValue;

use crate::source::{Counters, Hook, Method, Source};
use crate::{Error, ProbeStatus, ProgramStats, DISK_OBJECT};

const STATS: &str = "DISK_STATS";
const LOST: &str = "DISK_LOST";

/// Programs attach in the order listed: bytes (per bio, at `block_bio_queue`) first, then
/// completion, so that every request the issue program sees has its end seen too and no entry
/// outlives its request.
static SOURCE: Source = Source {
    probe: "disk",
    object_name: "disk.bpf.o",
    object: DISK_OBJECT,
    methods: &[
        Method {
            name: "tp_btf",
            programs: &[
                ("disk_bio_btf", Hook::BtfTracePoint("block_bio_queue")),
                (
                    "disk_complete_btf",
                    Hook::BtfTracePoint("block_rq_complete"),
                ),
                ("disk_issue_btf", Hook::BtfTracePoint("block_rq_issue")),
                ("disk_insert_btf", Hook::BtfTracePoint("block_rq_insert")),
            ],
        },
        Method {
            name: "raw_tracepoint",
            programs: &[
                ("disk_bio_raw", Hook::RawTracePoint("block_bio_queue")),
                (
                    "disk_complete_raw",
                    Hook::RawTracePoint("block_rq_complete"),
                ),
                ("disk_issue_raw", Hook::RawTracePoint("block_rq_issue")),
                ("disk_insert_raw", Hook::RawTracePoint("block_rq_insert")),
            ],
        },
        Method {
            name: "tracepoint",
            programs: &[
                ("disk_bio_tp", Hook::TracePoint("block", "block_bio_queue")),
                (
                    "disk_complete_tp",
                    Hook::TracePoint("block", "block_rq_complete"),
                ),
                ("disk_issue_tp", Hook::TracePoint("block", "block_rq_issue")),
            ],
        },
    ],
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Entries of `DISK_STATS`: one per cgroup that did block I/O since its entry was last
    /// removed. Updates beyond it are dropped and counted ([`Disk::lost`]).
    pub max_entries: u32,
    /// Attach methods not to try (names from [`crate::ATTACH_METHODS`]).
    pub disabled_methods: Vec<String>,
}

/// The loaded and attached block I/O programs of one method. Dropping it detaches them and frees
/// the maps; nothing is pinned.
#[derive(Debug)]
pub struct Disk(Counters<DiskValue>);

impl Disk {
    /// Tries the attach methods best first (`tp_btf`, `raw_tracepoint`, `tracepoint`), skipping disabled ones. Returns the
    /// loaded source with its status (the method in use; `error` lists what failed before it),
    /// or no source and the status of total failure.
    pub fn load(config: &DiskConfig) -> (Option<Disk>, ProbeStatus) {
        let (counters, status) = Counters::load(
            &SOURCE,
            (STATS, LOST),
            config.max_entries,
            &config.disabled_methods,
        );
        (counters.map(Disk), status)
    }

    /// The attach method in use.
    pub fn method(&self) -> &'static str {
        self.0.method()
    }

    /// Every cgroup's counters, summed over CPUs: cumulative since the entry was created.
    pub fn read(&self) -> Result<Vec<(u64, DiskValue)>, Error> {
        self.0.read(|sum, v| {
            sum.read_bytes = sum.read_bytes.wrapping_add(v.read_bytes);
            sum.write_bytes = sum.write_bytes.wrapping_add(v.write_bytes);
            sum.reads = sum.reads.wrapping_add(v.reads);
            sum.writes = sum.writes.wrapping_add(v.writes);
            sum.latency_ns_total = sum.latency_ns_total.wrapping_add(v.latency_ns_total);
            for (s, b) in sum.latency_buckets.iter_mut().zip(v.latency_buckets) {
                *s = s.wrapping_add(b);
            }
        })
    }

    /// Deletes the entries of cgroups that no longer exist, after their final values were read.
    pub fn remove(&mut self, cgroup_ids: &[u64]) -> Result<(), Error> {
        self.0.remove(cgroup_ids)
    }

    /// Updates dropped because the stats map was full, since load.
    pub fn lost(&self) -> Result<u64, Error> {
        self.0.lost()
    }

    pub fn program_stats(&self) -> Vec<ProgramStats> {
        self.0.program_stats()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_method_names_programs_the_object_has() {
        crate::source::tests::assert_table_matches_object(&super::SOURCE);
    }
}
