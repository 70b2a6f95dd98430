//! Cgroups as they are made and removed, and the CPU time of tasks as they end
//! (`ebpf/c/lifecycle.bpf.c`): what the agent needs to bill a workload that lived and died
//! between two of its walks.
//!
//! Attach methods, best first: `tp_btf` and `raw_tracepoint` (`cgroup_mkdir`, `cgroup_rmdir`,
//! `cgroup_attach_task`, `sched_process_exit`, `sched_process_free`, all with their pointer
//! arguments). The plain
//! tracepoints carry no task pointer for a move, so there is no `tracepoint` method.

use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::Ebpf;
use tally_ebpf_common::{
    CgroupEvent, ExitValue, CGROUP_MKDIR, CGROUP_PATH_MAX, EVENTS_LOST_SLOT, LOST_SLOT,
};

use crate::source::{read_summed, remove_keys, take_map, Hook, Method, Source};
use crate::{Error, ProbeStatus, ProgramStats, LIFECYCLE_OBJECT};

const EVENTS: &str = "CGROUP_EVENTS";
const EXIT_CPU: &str = "EXIT_CPU";
const LOST: &str = "LIFECYCLE_LOST";
const CHANGES: &str = "CGROUP_CHANGES";

/// Frees attach before exits, so every task whose exit is charged has its free seen too (a task
/// freed without a charged exit is charged whole at the free).
static SOURCE: Source = Source {
    probe: "lifecycle",
    object_name: "lifecycle.bpf.o",
    object: LIFECYCLE_OBJECT,
    methods: &[
        Method {
            name: "tp_btf",
            programs: &[
                (
                    "lifecycle_free_btf",
                    Hook::BtfTracePoint("sched_process_free"),
                ),
                (
                    "lifecycle_exit_btf",
                    Hook::BtfTracePoint("sched_process_exit"),
                ),
                (
                    "lifecycle_attach_btf",
                    Hook::BtfTracePoint("cgroup_attach_task"),
                ),
                ("lifecycle_mkdir_btf", Hook::BtfTracePoint("cgroup_mkdir")),
                ("lifecycle_rmdir_btf", Hook::BtfTracePoint("cgroup_rmdir")),
            ],
        },
        Method {
            name: "raw_tracepoint",
            programs: &[
                (
                    "lifecycle_free_raw",
                    Hook::RawTracePoint("sched_process_free"),
                ),
                (
                    "lifecycle_exit_raw",
                    Hook::RawTracePoint("sched_process_exit"),
                ),
                (
                    "lifecycle_attach_raw",
                    Hook::RawTracePoint("cgroup_attach_task"),
                ),
                ("lifecycle_mkdir_raw", Hook::RawTracePoint("cgroup_mkdir")),
                ("lifecycle_rmdir_raw", Hook::RawTracePoint("cgroup_rmdir")),
            ],
        },
    ],
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleConfig {
    /// Entries of `EXIT_CPU`: one per cgroup a task ended in since its entry was last removed.
    pub max_entries: u32,
    /// Attach methods not to try (names from [`crate::ATTACH_METHODS`]).
    pub disabled_methods: Vec<String>,
}

/// A cgroup v2 directory made or removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupChange {
    pub cgroup_id: u64,
    pub made: bool,
    /// From the hierarchy's root, starting with `/`; `None` when the kernel's copy failed or was
    /// cut at [`CGROUP_PATH_MAX`] bytes.
    pub path: Option<String>,
}

impl CgroupChange {
    /// Decodes a ring buffer record; `None` for a record of another size.
    pub fn parse(record: &[u8]) -> Option<CgroupChange> {
        if record.len() != std::mem::size_of::<CgroupEvent>() {
            return None;
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&record[at..at + 8]);
            u64::from_ne_bytes(b)
        };
        let u32_at = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&record[at..at + 4]);
            u32::from_ne_bytes(b)
        };
        let cgroup_id = u64_at(0);
        let (kind, len) = (u32_at(8), u32_at(12) as usize);
        let bytes = &record[16..];
        let path = (1..CGROUP_PATH_MAX)
            .contains(&len)
            .then(|| std::str::from_utf8(&bytes[..len - 1]).ok())
            .flatten()
            .map(str::to_owned);
        Some(CgroupChange {
            cgroup_id,
            made: kind == CGROUP_MKDIR,
            path,
        })
    }
}

/// Records and charges the programs dropped, since load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LifecycleLost {
    /// `CGROUP_EVENTS` records (the ring buffer was full).
    pub events: u64,
    /// `EXIT_CPU` charges (the map was full).
    pub charges: u64,
}

/// The loaded and attached programs. Dropping it detaches them and frees the maps.
pub struct Lifecycle {
    ebpf: Ebpf,
    method: &'static Method,
    events: RingBuf<MapData>,
    exit_cpu: PerCpuHashMap<MapData, u64, ExitValue>,
    lost: PerCpuArray<MapData, u64>,
    changes: Array<MapData, u64>,
}

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifecycle")
            .field("method", &self.method.name)
            .finish_non_exhaustive()
    }
}

impl Lifecycle {
    /// Tries `tp_btf`, then `raw_tracepoint`, skipping disabled ones.
    pub fn load(config: &LifecycleConfig) -> (Option<Lifecycle>, ProbeStatus) {
        let (loaded, mut status) =
            SOURCE.load(&[(EXIT_CPU, config.max_entries)], &config.disabled_methods);
        let Some((mut ebpf, method)) = loaded else {
            return (None, status);
        };
        let object = SOURCE.object_name;
        let maps = (|| {
            Ok::<_, Error>((
                take_map(&mut ebpf, object, EVENTS)?,
                take_map(&mut ebpf, object, EXIT_CPU)?,
                take_map(&mut ebpf, object, LOST)?,
                take_map(&mut ebpf, object, CHANGES)?,
            ))
        })();
        match maps {
            Ok((events, exit_cpu, lost, changes)) => (
                Some(Lifecycle {
                    ebpf,
                    method,
                    events,
                    exit_cpu,
                    lost,
                    changes,
                }),
                status,
            ),
            Err(e) => {
                status.up = false;
                status.error = Some(tally_error_chain::chain(&e));
                (None, status)
            }
        }
    }

    pub fn method(&self) -> &'static str {
        self.method.name
    }

    /// Every record waiting in the ring buffer, oldest first; records of another size (none
    /// should be) are skipped and counted in the second value.
    pub fn drain(&mut self) -> (Vec<CgroupChange>, u64) {
        let (mut changes, mut bad) = (Vec::new(), 0);
        while let Some(record) = self.events.next() {
            match CgroupChange::parse(&record) {
                Some(change) => changes.push(change),
                None => bad += 1,
            }
        }
        (changes, bad)
    }

    /// CPU time of ended tasks by cgroup id, summed over CPUs: cumulative since the entry was
    /// made.
    pub fn exit_cpu(&self) -> Result<Vec<(u64, ExitValue)>, Error> {
        read_summed(&self.exit_cpu, EXIT_CPU, |sum, v| {
            sum.cpu_ns = sum.cpu_ns.wrapping_add(v.cpu_ns);
            sum.tasks = sum.tasks.wrapping_add(v.tasks);
        })
    }

    /// Deletes the entries of cgroups that are gone, after their final values were read.
    pub fn remove(&mut self, cgroup_ids: &[u64]) -> Result<(), Error> {
        remove_keys(&mut self.exit_cpu, EXIT_CPU, cgroup_ids)
    }

    /// Cgroups made or removed in any hierarchy since load: while it stays the same, a walk of
    /// the hierarchies would find what the last one found.
    pub fn changes(&self) -> Result<u64, Error> {
        self.changes.get(&0, 0).map_err(|source| Error::Map {
            map: CHANGES,
            action: "reading",
            source,
        })
    }

    pub fn lost(&self) -> Result<LifecycleLost, Error> {
        let slot = |index| -> Result<u64, Error> {
            let per_cpu = self.lost.get(&index, 0).map_err(|source| Error::Map {
                map: LOST,
                action: "reading",
                source,
            })?;
            Ok(per_cpu.iter().copied().fold(0u64, u64::wrapping_add))
        };
        Ok(LifecycleLost {
            events: slot(EVENTS_LOST_SLOT)?,
            charges: slot(LOST_SLOT)?,
        })
    }

    pub fn program_stats(&self) -> Vec<ProgramStats> {
        Source::program_stats(&self.ebpf, self.method)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_names_programs_the_object_has() {
        crate::source::tests::assert_table_matches_object(&SOURCE);
    }

    fn record(id: u64, kind: u32, path: &[u8], len: u32) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend_from_slice(&id.to_ne_bytes());
        r.extend_from_slice(&kind.to_ne_bytes());
        r.extend_from_slice(&len.to_ne_bytes());
        let mut bytes = [0u8; CGROUP_PATH_MAX];
        bytes[..path.len()].copy_from_slice(path);
        r.extend_from_slice(&bytes);
        r
    }

    #[test]
    fn records_decode_with_their_path_and_cut_or_failed_paths_have_none() {
        let made = CgroupChange::parse(&record(7, CGROUP_MKDIR, b"/a/b.scope\0", 11)).unwrap();
        assert_eq!(
            made,
            CgroupChange {
                cgroup_id: 7,
                made: true,
                path: Some("/a/b.scope".to_owned()),
            }
        );
        let gone = CgroupChange::parse(&record(8, 2, b"/a\0", 3)).unwrap();
        assert!(!gone.made);
        assert_eq!(gone.path.as_deref(), Some("/a"));
        let cut = [b'x'; CGROUP_PATH_MAX];
        let cut = CgroupChange::parse(&record(9, 1, &cut, CGROUP_PATH_MAX as u32)).unwrap();
        assert_eq!(cut.path, None);
        assert_eq!(
            CgroupChange::parse(&record(9, 1, b"", 0)).unwrap().path,
            None
        );
        assert_eq!(CgroupChange::parse(&[0u8; 12]), None);
    }
}
