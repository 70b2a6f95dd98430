//! CPU and memory of every workload in one read a tick: the `cgroup_stats` BPF iterator
//! (`ebpf/c/cgstat.bpf.c`), attached to the v2 root and, on a hybrid node, the v1 memory root.
//!
//! The values are the ones the files show: CPU is v2 cpu.stat's `usage_usec` (on a hybrid node
//! too, where the files would give v1 `cpuacct.usage`: the iterator's collector reads v2
//! `cpu.stat` as its fallback, so one workload's CPU comes from one count), memory is
//! `memory.current` or v1 `memory.usage_in_bytes`. CPU is folded in from per-CPU counters only
//! when a subtree is flushed, which reading its `cpu.stat` does; so before each walk the
//! `cpu.stat` of the top directory of every workload's path is read (a handful:
//! `kubepods.slice`, `system.slice`), which flushes everything below. A workload the walk did not
//! give a value for (the array was full, its directory is in no hierarchy the iterator walks) is
//! read from its files.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use tally_ebpf::cgstat::{CgroupStats, Tree};
use tally_ebpf::{CgroupStat, NO_VALUE};

use super::fds::pread_all;
use super::COLLECTOR;
use crate::errors::ErrorCounts;
use crate::host::layout::Layout;

/// `statfs` magic of cgroup2 and of a cgroup v1 hierarchy (include/uapi/linux/magic.h).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;

/// The loaded iterator, its trees, and the last walk's values.
#[derive(Debug)]
pub(super) struct Iterated {
    stats: CgroupStats,
    /// The v2 tree, which has CPU (and memory on a pure v2 node).
    v2: Option<Tree>,
    /// The v1 memory tree of a hybrid node.
    memory: Option<Tree>,
    /// The `cpu.stat` of each top directory with workloads below it, by its path below the root.
    flush: HashMap<String, Option<File>, foldhash::fast::RandomState>,
    /// The last walk's records by cgroup id (both trees: kernfs ids are unique per hierarchy,
    /// and a workload asks each tree's map only for its own directory there).
    v2_values: HashMap<u64, CgroupStat, foldhash::fast::RandomState>,
    memory_values: HashMap<u64, u64, foldhash::fast::RandomState>,
    scratch: Vec<CgroupStat>,
    buf: Vec<u8>,
    page_size: f64,
}

/// A workload's directories as the iterator names them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Ids {
    pub v2: Option<u64>,
    pub memory: Option<u64>,
}

/// Whether `dir` is on a cgroup filesystem of that `magic` (links followed).
fn is_cgroupfs(dir: &Path, magic: i64) -> bool {
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statfs is a valid value; `path` is NUL-terminated and `stat` a valid
    // out-pointer for statfs(2), which writes nothing else.
    let (rc, stat) = unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        (libc::statfs(path.as_ptr(), &mut stat), stat)
    };
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type is a long on x86-64 and narrower on other targets"
    )]
    let f_type = stat.f_type as i64;
    rc == 0 && f_type == magic
}

impl Iterated {
    /// Loads the iterator and attaches it to the layout's trees; `None` where neither tree is a
    /// cgroup filesystem (the layout names plain directories), an error where the kernel
    /// refused.
    pub(super) fn start(layout: &Layout, capacity: u32) -> Result<Option<Self>, String> {
        let v2_root = layout
            .unified
            .as_deref()
            .filter(|root| is_cgroupfs(root, CGROUP2_SUPER_MAGIC));
        let memory_root = layout
            .memory
            .as_deref()
            .filter(|root| is_cgroupfs(root, CGROUP_SUPER_MAGIC));
        if v2_root.is_none() && memory_root.is_none() {
            return Ok(None);
        }
        let chain = |e: tally_ebpf::Error| tally_error_chain::chain(&e);
        let stats = CgroupStats::load(capacity).map_err(chain)?;
        let v2 = v2_root
            .map(|root| stats.attach(root))
            .transpose()
            .map_err(chain)?;
        let memory = memory_root
            .map(|root| stats.attach(root))
            .transpose()
            .map_err(chain)?;
        // SAFETY: sysconf has no preconditions.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Ok(Some(Self {
            stats,
            v2,
            memory,
            flush: HashMap::default(),
            v2_values: HashMap::default(),
            memory_values: HashMap::default(),
            scratch: Vec::new(),
            buf: vec![0; 1024],
            page_size: page_size.max(1) as f64,
        }))
    }

    /// The ids of the workload at `rel` in the trees the iterator walks (one `stat` each, when
    /// the workload is first seen).
    pub(super) fn ids(&self, rel: &str) -> Ids {
        let id = |tree: &Option<Tree>| {
            let dir = tree.as_ref()?.root().join(rel.trim_start_matches('/'));
            std::fs::metadata(dir).ok().map(|m| m.ino())
        };
        Ids {
            v2: id(&self.v2),
            memory: id(&self.memory),
        }
    }

    /// Flushes the subtrees of the workloads at `rels` and walks every tree. A failed walk is
    /// counted and leaves its tree's values empty: its workloads are read from files this tick.
    pub(super) fn walk<'a>(
        &mut self,
        rels: impl Iterator<Item = &'a str>,
        errors: &mut ErrorCounts,
    ) {
        self.v2_values.clear();
        self.memory_values.clear();
        if let Some(tree) = &self.v2 {
            flush_tops(&mut self.flush, &mut self.buf, tree.root(), rels, errors);
            if read_tree(&self.stats, tree, &mut self.scratch, errors) {
                self.v2_values
                    .extend(self.scratch.iter().map(|s| (s.cgroup_id, *s)));
            }
        }
        if let Some(tree) = &self.memory {
            if read_tree(&self.stats, tree, &mut self.scratch, errors) {
                self.memory_values.extend(
                    self.scratch
                        .iter()
                        .filter(|s| s.memory_pages != NO_VALUE)
                        .map(|s| (s.cgroup_id, s.memory_pages)),
                );
            }
        }
    }

    /// The CPU time, in seconds, of the workload with these ids, if the last walk had it.
    pub(super) fn cpu_seconds(&self, ids: Ids) -> Option<f64> {
        let stat = self.v2_values.get(&ids.v2?)?;
        // Whole microseconds, as cpu.stat shows them, so a tick that reads the file instead
        // gives the same number, never a smaller one.
        (stat.cpu_ns != NO_VALUE).then(|| (stat.cpu_ns / 1000) as f64 / 1e6)
    }

    /// The memory in use, in bytes, of the workload with these ids, if the last walk had it.
    pub(super) fn memory_bytes(&self, ids: Ids) -> Option<f64> {
        let v2 = ids
            .v2
            .and_then(|id| self.v2_values.get(&id))
            .map(|s| s.memory_pages)
            .filter(|&p| p != NO_VALUE);
        let pages = v2.or_else(|| self.memory_values.get(&ids.memory?).copied())?;
        Some(pages as f64 * self.page_size)
    }
}

/// Reads the `cpu.stat` of the top directory of each of `rels` (which flushes the CPU time
/// of everything below it), keeping the files open; forgets tops with no workload left. A
/// top with no `cpu.stat` (a workload in v1 hierarchies only) is remembered as such.
fn flush_tops<'a>(
    flush: &mut HashMap<String, Option<File>, foldhash::fast::RandomState>,
    buf: &mut Vec<u8>,
    root: &Path,
    rels: impl Iterator<Item = &'a str>,
    errors: &mut ErrorCounts,
) {
    let mut seen: HashSet<&str, foldhash::fast::RandomState> = HashSet::default();
    let mut gone = Vec::new();
    for rel in rels {
        let top = rel.trim_start_matches('/').split('/').next().unwrap_or("");
        if top.is_empty() || !seen.insert(top) {
            continue;
        }
        if !flush.contains_key(top) {
            let path = root.join(top).join("cpu.stat");
            let file = match File::open(&path) {
                Ok(file) => Some(file),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    errors.record(COLLECTOR, "read", || {
                        format!("opening {}: {e}", path.display())
                    });
                    None
                }
            };
            flush.insert(top.to_owned(), file);
        }
        if let Some(Some(file)) = flush.get(top) {
            if pread_all(file, buf).is_err() {
                // Gone with its cgroup: opened again while a workload is below it.
                gone.push(top);
            }
        }
    }
    flush.retain(|top, _| seen.contains(top.as_str()) && !gone.contains(&top.as_str()));
}

/// One walk of `tree` into `out`; whether it worked. A failure, and cgroups beyond the room,
/// are counted.
fn read_tree(
    stats: &CgroupStats,
    tree: &Tree,
    out: &mut Vec<CgroupStat>,
    errors: &mut ErrorCounts,
) -> bool {
    match stats.read(tree, out) {
        Ok(walked) => {
            if walked.dropped > 0 {
                let (dropped, capacity) = (walked.dropped, stats.capacity());
                errors.record(COLLECTOR, "iterator_full", || {
                    format!(
                        "{dropped} cgroups beyond the iterator's {capacity} \
                         (ebpf.max_cgroup_entries) are read from their files"
                    )
                });
            }
            true
        }
        Err(e) => {
            errors.record(COLLECTOR, "iterator", || tally_error_chain::chain(&e));
            false
        }
    }
}
