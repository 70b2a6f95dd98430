//! The cgroupfs collector: per-workload CPU, memory and disk from cgroup files, v1 and v2.
//!
//! Each tick walks the hierarchies for workload directories (a directory that names a workload is
//! not descended into: its files already count its children), then reads each workload's files
//! once: CPU from v1 `cpuacct.usage` where the workload has a cpuacct cgroup, else v2 `cpu.stat`
//! (a core file, present even with no controller enabled); memory from v2 `memory.current`, else
//! v1 `memory.usage_in_bytes`; disk from v2 `io.stat`, else v1 `blkio.throttle.io_service_bytes`,
//! summed over the devices that are not stacked on others (see `stacks`), so a byte written
//! through dm or md counts once.
//!
//! Which files a workload has is decided once, when it is first seen, and the files stay open:
//! each tick is one `pread` at offset 0 per file (cgroup files are seq_files, regenerated when read
//! from the start: fs/seq_file.c, `seq_read_iter`), not a path lookup, open, read and close. A
//! workload whose cgroup is gone gets `ENODEV` from its open files and is dropped. Files kept
//! open are limited by a budget sized from the open-file limit (see `fds`): beyond it a file is
//! opened, read and closed each tick, so a node with more workloads than descriptors still gets
//! every workload's values, at the cost of the path lookups.
//!
//! Where the kernel allows it (`cgroupfs.bpf_iterator`, on by default with eBPF), CPU and memory
//! come instead from one walk a tick of a BPF cgroup iterator over every cgroup (see `iter`):
//! the files are then read only for disk, and for what the walk did not have.
//!
//! `cgroupfs.read_interval_ms` spreads the reads of workloads no budget selects over that
//! interval: each is read on one tick in every `ceil(interval / tick)`, its phase given in turn as
//! it is first seen, so the cost per tick stays even. Budgeted and newly seen workloads are read
//! every tick; the others' series keep their values in between.

mod blkio;
mod fds;
mod files;
mod iter;
mod parse;
mod stacks;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use fds::Fds;
use files::{Want, WorkloadFiles};
use iter::{Ids, Iterated};
use stacks::Stacks;
use tally_exporters::Family;

use crate::catalogue::agent::{
    CGROUPFS_OPEN_FILES, CGROUPFS_OPEN_FILES_LIMIT, CGROUPFS_PATH_READS, CGROUPFS_READ_INTERVAL,
};
use crate::config::Config;
use crate::errors::ErrorCounts;
use crate::host::layout::Layout;
use crate::identity::Workload;
use crate::ledger::{Key, Ledger};
use crate::source::{Probe, Source, TickCtx};

/// What one workload's cgroup files said this tick; `None` where a file was absent or bad.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reading {
    pub cpu_seconds: Option<f64>,
    pub memory_bytes: Option<f64>,
    pub disk_read_bytes: Option<f64>,
    pub disk_write_bytes: Option<f64>,
}

/// Reads cgroup files for the workloads the walk finds.
#[derive(Debug)]
pub struct Collector {
    layout: Layout,
    /// Where sysfs is (`paths.sys_root`), for which block devices are stacked.
    sys_root: PathBuf,
    stacks: Stacks,
    /// blk-throttle activated on the disks, so v1 blkio counts their bytes.
    activation: blkio::Activation,
    /// Open files by workload path.
    files: HashMap<String, Kept, foldhash::fast::RandomState>,
    /// How many of those may stay open, and how many are.
    fds: Fds,
    tick: u64,
    /// Workloads no budget selects are read one tick in this many (1: every tick).
    every: u64,
    /// The effective interval of those reads, for `tally_cgroupfs_read_interval_seconds`.
    interval: Duration,
    /// The phase the next new workload gets.
    next_phase: u64,
    buf: Vec<u8>,
    /// The BPF iterator, where it is on and loaded.
    iterated: Option<Iterated>,
    /// `None` where the iterator is off (by configuration, or no cgroup filesystem to walk),
    /// else whether it loaded.
    iterator_up: Option<bool>,
}

/// One workload's files, the last tick it was listed in, and the phase of its reads.
#[derive(Debug)]
struct Kept {
    files: WorkloadFiles,
    /// Its directories' ids in the iterator's trees.
    ids: Ids,
    listed: u64,
    phase: u64,
}

/// The collector label of every error this module counts.
const COLLECTOR: &str = "cgroupfs";

/// A workload missing some file is looked at again this often (ticks): a controller may have been
/// enabled for it after it was first seen.
const RESOLVE_MISSING_EVERY: u64 = 30;

impl Collector {
    /// The collector for a process whose open-file limit is `open_file_limit` (`None`: it could
    /// not be read, and the usual default of 1024 is assumed).
    pub fn new(config: &Config, layout: Layout, open_file_limit: Option<u64>) -> Self {
        let limit = open_file_limit.unwrap_or(fds::DEFAULT_LIMIT);
        let fds = Fds::for_limit(limit, Box::new(fds::Kernel));
        tracing::info!(
            open_file_limit = limit,
            budget = fds.budget(),
            "cgroup files kept open up to the budget, the rest read by path"
        );
        let mut collector = Self::with_fds(layout, &config.paths.sys_root, fds);
        collector.set_interval(config);
        collector.start_iterator(config);
        collector
    }

    /// Loads the BPF iterator when the configuration wants it, or drops it when it does not.
    fn start_iterator(&mut self, config: &Config) {
        self.iterated = None;
        self.iterator_up = None;
        if !(config.ebpf.enabled && config.cgroupfs.bpf_iterator) {
            return;
        }
        match Iterated::start(&self.layout, config.ebpf.max_cgroup_entries) {
            Ok(Some(iterated)) => {
                tracing::info!("CPU and memory read by the BPF cgroup iterator");
                self.iterated = Some(iterated);
                self.iterator_up = Some(true);
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(
                    %error,
                    "BPF cgroup iterator not loaded; CPU and memory are read from cgroup files \
                     (cgroupfs.bpf_iterator = false silences this)"
                );
                self.iterator_up = Some(false);
            }
        }
        // Loading parsed the kernel's BTF (several MB, freed since): as after the other eBPF

        // workloads without this, against 25 before the iterator).
        crate::sys::trim_heap();
        // Ids are looked up again for the new trees.
        for (rel, kept) in &mut self.files {
            kept.ids = self
                .iterated
                .as_ref()
                .map_or_else(Ids::default, |i| i.ids(rel));
        }
    }

    fn with_fds(layout: Layout, sys_root: &Path, fds: Fds) -> Self {
        Self {
            layout,
            sys_root: sys_root.to_owned(),
            stacks: Stacks::new(sys_root),
            activation: blkio::Activation::default(),
            files: HashMap::default(),
            fds,
            tick: 0,
            every: 1,
            interval: Duration::ZERO,
            next_phase: 0,
            buf: vec![0; 4096],
            iterated: None,
            iterator_up: None,
        }
    }

    /// Reads unbudgeted workloads one tick in `ceil(read_interval / tick)`.
    fn set_interval(&mut self, config: &Config) {
        let tick = config.agent.tick_interval_ms.max(1);
        self.every = config.cgroupfs.read_interval_ms.div_ceil(tick).max(1);
        self.interval = Duration::from_millis(self.every * tick);
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Reads the files of the workload at `rel` (relative to each hierarchy root; `cgroup_id`
    /// its directory's id, the v2 one where it has one), if it is new,
    /// `always`, or its turn; `None` where it is none of these. A file that vanished with its
    /// cgroup is not an error; any other failure is counted.
    fn read(
        &mut self,
        rel: &str,
        cgroup_id: u64,
        always: bool,
        errors: &mut ErrorCounts,
    ) -> Option<Reading> {
        let tick = self.tick;
        let mut new = false;
        let kept = match self.files.get_mut(rel) {
            Some(kept) => kept,
            None => {
                new = true;
                let phase = self.next_phase;
                self.next_phase = self.next_phase.wrapping_add(1);
                let files = WorkloadFiles::resolve(&self.layout, rel, self.iterated.is_some());
                let ids = self
                    .iterated
                    .as_ref()
                    .map_or_else(Ids::default, |i| i.ids(rel));
                self.files.entry(rel.to_owned()).or_insert(Kept {
                    files,
                    ids,
                    listed: tick,
                    phase,
                })
            }
        };
        kept.listed = tick;
        // The cgroup made again at the same path (a unit restarted between two ticks): the new
        // directories' ids.
        if let Some(iterated) = &self.iterated {
            if kept.ids.v2.is_some_and(|id| id != cgroup_id) {
                kept.ids = iterated.ids(rel);
            }
        }
        let walked = self.iterated.as_ref().map(|i| Reading {
            cpu_seconds: i.cpu_seconds(kept.ids),
            memory_bytes: i.memory_bytes(kept.ids),
            ..Reading::default()
        });
        if let Some(given) = &walked {
            let closed = kept.files.release(Want {
                cpu: given.cpu_seconds.is_some(),
                memory: given.memory_bytes.is_some(),
                io: false,
            });
            self.fds.closed(closed);
        }
        let due = new || always || (tick + kept.phase) % self.every == 0;
        if !due {
            return walked;
        }
        let walked = walked.unwrap_or_default();
        if kept.files.incomplete() && tick % RESOLVE_MISSING_EVERY == 0 {
            kept.files
                .fill_missing(&self.layout, rel, self.iterated.is_some());
        }
        let want = Want {
            cpu: walked.cpu_seconds.is_none(),
            memory: walked.memory_bytes.is_none(),
            io: true,
        };
        let read = kept
            .files
            .read(want, &mut self.buf, &mut self.stacks, &mut self.fds, errors);
        Some(Reading {
            cpu_seconds: walked.cpu_seconds.or(read.cpu_seconds),
            memory_bytes: walked.memory_bytes.or(read.memory_bytes),
            ..read
        })
    }

    /// Closes the files of workloads not read this tick (their cgroups are gone), and kept files
    /// beyond a budget that meeting the open-file limit lowered.
    fn end_tick(&mut self) {
        let tick = self.tick;
        let fds = &mut self.fds;
        self.files.retain(|_, kept| {
            let live = kept.listed == tick;
            if !live {
                fds.closed(kept.files.open_count());
            }
            live
        });
        let mut excess = self.fds.end_tick();
        for kept in self.files.values_mut() {
            if excess == 0 {
                break;
            }
            let closed = kept.files.close_kept(excess);
            self.fds.closed(closed);
            excess -= closed;
        }
    }
}

impl Source for Collector {
    fn name(&self) -> &'static str {
        COLLECTOR
    }

    fn collect(&mut self, ctx: &mut TickCtx<'_>, ledger: &mut Ledger) {
        // New disks are looked for as often as missing files.
        if let (Some(root), true) = (&self.layout.blkio, self.tick % RESOLVE_MISSING_EVERY == 0) {
            match crate::budget::actuator::whole_disks(&self.sys_root) {
                Ok(disks) => self.activation.run(root, &disks, ctx.errors),
                Err(e) => ctx
                    .errors
                    .record(COLLECTOR, "blkio_activate", || tally_error_chain::chain(&e)),
            }
        }
        self.tick += 1;
        if let Some(iterated) = &mut self.iterated {
            let rels = ctx.discovery.found.iter().map(|found| found.rel.as_str());
            iterated.walk(rels, ctx.errors);
        }
        for (found, workload) in ctx.discovery.found.iter().zip(ctx.workloads) {
            let always = self.every == 1 || ctx.facts.budgeted.contains(&found.rel);
            if let Some(reading) = self.read(&found.rel, found.cgroup_id, always, ctx.errors) {
                record(ledger, workload, &reading);
            }
        }
        self.end_tick();
    }

    fn probes(&self) -> Vec<Probe> {
        let mut probes = vec![Probe {
            probe: COLLECTOR,
            method: self.layout.mode.as_str(),
            up: true,
        }];
        if let Some(up) = self.iterator_up {
            probes.push(Probe {
                probe: "cgroup_iterator",
                method: "iter",
                up,
            });
        }
        probes
    }

    fn families(&self) -> Vec<Family> {
        let mut open = Family::new(&CGROUPFS_OPEN_FILES);
        open.push_labeled(Vec::new(), self.fds.open() as f64);
        let mut limit = Family::new(&CGROUPFS_OPEN_FILES_LIMIT);
        limit.push_labeled(Vec::new(), self.fds.budget() as f64);
        let mut path_reads = Family::new(&CGROUPFS_PATH_READS);
        path_reads.push_labeled(Vec::new(), self.fds.path_reads() as f64);
        let mut interval = Family::new(&CGROUPFS_READ_INTERVAL);
        interval.push_labeled(Vec::new(), self.interval.as_secs_f64());
        vec![open, limit, path_reads, interval]
    }

    fn reconfigure(&mut self, config: &Config, layout: &Layout, _errors: &mut ErrorCounts) {
        if layout != &self.layout || config.paths.sys_root != self.sys_root {
            // The budget (as lowered so far) and the path-read count carry over; the files
            // close with the collector replaced.
            let fds = std::mem::take(&mut self.fds).all_closed();
            *self = Collector::with_fds(layout.clone(), &config.paths.sys_root, fds);
            self.start_iterator(config);
        } else if (config.ebpf.enabled && config.cgroupfs.bpf_iterator)
            != self.iterator_up.is_some()
            || self.iterator_up == Some(false)
        {
            self.start_iterator(config);
        }
        self.set_interval(config);
    }
}

/// The ledger keys of what cgroup files say, made once.
struct Keys {
    cpu: Key,
    read: Key,
    write: Key,
    memory: Key,
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| {
    use crate::catalogue::workload::{
        CPU_SECONDS, DISK_READ_BYTES, DISK_WRITE_BYTES, MEMORY_BYTES,
    };
    let method = || vec![("method", Arc::from(COLLECTOR))];
    Keys {
        cpu: Key::new(&CPU_SECONDS, Vec::new()),
        read: Key::new(&DISK_READ_BYTES, method()),
        write: Key::new(&DISK_WRITE_BYTES, method()),
        memory: Key::new(&MEMORY_BYTES, Vec::new()),
    }
});

/// What a workload's cgroup files said this tick, into the ledger.
fn record(ledger: &mut Ledger, workload: &Arc<Workload>, reading: &Reading) {
    let keys = &*KEYS;
    let mut row = ledger.row(workload);
    let counters = [
        (&keys.cpu, reading.cpu_seconds),
        (&keys.read, reading.disk_read_bytes),
        (&keys.write, reading.disk_write_bytes),
    ];
    for (key, value) in counters {
        if let Some(v) = value {
            row.observe(key, v);
        }
    }
    if let Some(bytes) = reading.memory_bytes {
        row.set(&keys.memory, bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::fds::tests::{fd_limit_count, Refusing};
    use super::*;
    use crate::host::layout::Mode;

    /// `n` v2 workloads `/w{i}` with `cpu.stat`, `memory.current` and `io.stat` each, their
    /// values distinct: `i` seconds, `1000 + i` bytes, `i` bytes read and written on 8:0.
    fn fixture(n: usize) -> (tempfile::TempDir, Layout) {
        let root = tempfile::tempdir().unwrap();
        for i in 0..n {
            let dir = root.path().join(format!("cgroup/w{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                dir.join("cpu.stat"),
                format!("usage_usec {}\n", i * 1_000_000),
            )
            .unwrap();
            std::fs::write(dir.join("memory.current"), format!("{}\n", 1000 + i)).unwrap();
            std::fs::write(dir.join("io.stat"), format!("8:0 rbytes={i} wbytes={i}\n")).unwrap();
        }
        std::fs::create_dir_all(root.path().join("sys/dev/block/8:0/slaves")).unwrap();
        let layout = Layout {
            mode: Mode::V2,
            unified: Some(root.path().join("cgroup")),
            cpuacct: None,
            memory: None,
            blkio: None,
            cpu: None,
            freezer: None,
        };
        (root, layout)
    }

    fn expected(i: usize) -> Reading {
        Reading {
            cpu_seconds: Some(i as f64),
            memory_bytes: Some((1000 + i) as f64),
            disk_read_bytes: Some(i as f64),
            disk_write_bytes: Some(i as f64),
        }
    }

    /// One tick over the workloads `live`: each one's reading.
    fn tick(c: &mut Collector, live: &[usize], errors: &mut ErrorCounts) -> Vec<Reading> {
        c.tick += 1;
        let readings = live
            .iter()
            .map(|i| c.read(&format!("/w{i}"), 0, false, errors).unwrap())
            .collect();
        c.end_tick();
        readings
    }

    /// Files open by the collector's own count and by its workloads' files.
    fn open(c: &Collector) -> (usize, usize) {
        let held = c.files.values().map(|k| k.files.open_count()).sum();
        (c.fds.open(), held)
    }

    #[test]
    fn beyond_the_budget_every_workload_is_read_by_path() {
        let (root, layout) = fixture(5);
        // A limit of 262 leaves a budget of 6 files: two workloads' worth of five.
        let fds = Fds::for_limit(262, Box::new(fds::Kernel));
        let mut c = Collector::with_fds(layout, &root.path().join("sys"), fds);
        let mut errors = ErrorCounts::default();
        let all = [0, 1, 2, 3, 4];
        for n in 1..=3 {
            let readings = tick(&mut c, &all, &mut errors);
            assert_eq!(readings, all.map(expected));
            assert_eq!(open(&c), (6, 6));
            assert_eq!(c.fds.path_reads(), 9 * n);
        }
        assert!(errors.families().is_empty(), "{:?}", errors.families());

        // The two kept workloads go: their six files close at the end of the tick that no
        // longer finds them, and the next tick keeps six of the nine files it read by path.
        let live = [2, 3, 4];
        let reads = c.fds.path_reads();
        assert_eq!(tick(&mut c, &live, &mut errors), live.map(expected));
        assert_eq!(open(&c), (0, 0));
        assert_eq!(c.fds.path_reads(), reads + 9);
        assert_eq!(tick(&mut c, &live, &mut errors), live.map(expected));
        assert_eq!(open(&c), (6, 6));
        assert_eq!(c.fds.path_reads(), reads + 9 + 3);
        assert_eq!(tick(&mut c, &live, &mut errors), live.map(expected));
        assert_eq!(c.fds.path_reads(), reads + 9 + 3 + 3);
    }

    #[test]
    fn the_open_file_limit_met_loses_no_value_and_gives_files_back() {
        let (root, layout) = fixture(4);
        let opener = Refusing::default();
        let refuse = opener.refuse.clone();
        // A limit of 2048: a budget of 1792, room for every file, and a reserve of 256.
        let fds = Fds::for_limit(2048, Box::new(opener));
        let mut c = Collector::with_fds(layout, &root.path().join("sys"), fds);
        let mut errors = ErrorCounts::default();
        let all = [0, 1, 2, 3];
        assert_eq!(tick(&mut c, &all, &mut errors), all.map(expected));
        assert_eq!(open(&c), (12, 12));

        // A new workload's first open meets EMFILE (other descriptors ate the reserve).
        let dir = root.path().join("cgroup/w4");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cpu.stat"), "usage_usec 4000000\n").unwrap();
        std::fs::write(dir.join("memory.current"), "1004\n").unwrap();
        std::fs::write(dir.join("io.stat"), "8:0 rbytes=4 wbytes=4\n").unwrap();
        refuse.store(1, std::sync::atomic::Ordering::Relaxed);
        let all = [0, 1, 2, 3, 4];
        assert_eq!(tick(&mut c, &all, &mut errors), all.map(expected));
        assert_eq!(fd_limit_count(&errors), 1);
        // The budget fell a reserve below what was open, to 0: every kept file closed.
        assert_eq!(c.fds.budget(), 0);
        assert_eq!(open(&c), (0, 0));

        // From then on every file is read by path, every value still there, nothing counted.
        let reads = c.fds.path_reads();
        for _ in 0..3 {
            assert_eq!(tick(&mut c, &all, &mut errors), all.map(expected));
        }
        assert_eq!(c.fds.path_reads(), reads + 3 * 15);
        assert_eq!(fd_limit_count(&errors), 1, "counted once");
        assert_eq!(open(&c), (0, 0));
    }

    /// With reads every three ticks, each unbudgeted workload is read on its first tick and
    /// then once in every three, in turn (two of six a tick); a budgeted one every tick. A reload
    /// back to every tick reads them all again.
    #[test]
    fn unbudgeted_workloads_are_read_in_turn_and_budgeted_ones_every_tick() {
        let (root, layout) = fixture(6);
        let fds = Fds::for_limit(4096, Box::new(fds::Kernel));
        let mut c = Collector::with_fds(layout, &root.path().join("sys"), fds);
        let mut config = Config::default();
        config.cgroupfs.read_interval_ms = 2500;
        c.set_interval(&config);
        assert_eq!(c.interval, Duration::from_secs(3));
        let mut errors = ErrorCounts::default();
        let mut read = |c: &mut Collector, budgeted: &[usize]| -> Vec<usize> {
            c.tick += 1;
            let mut read = Vec::new();
            for i in 0..6 {
                let always = budgeted.contains(&i);
                if let Some(reading) = c.read(&format!("/w{i}"), 0, always, &mut errors) {
                    assert_eq!(reading, expected(i));
                    read.push(i);
                }
            }
            c.end_tick();
            read
        };
        assert_eq!(read(&mut c, &[]), [0, 1, 2, 3, 4, 5]);
        assert_eq!(read(&mut c, &[0]), [0, 1, 4]);
        assert_eq!(read(&mut c, &[0]), [0, 3]);
        assert_eq!(read(&mut c, &[0]), [0, 2, 5]);
        assert_eq!(read(&mut c, &[]), [1, 4]);
        // Files stay open between reads: none closed, none read by path.
        assert_eq!((open(&c), c.fds.path_reads()), ((18, 18), 0));

        config.cgroupfs.read_interval_ms = 0;
        c.reconfigure(&config, &c.layout.clone(), &mut ErrorCounts::default());
        assert_eq!(c.interval, Duration::from_secs(1));
        assert_eq!(read(&mut c, &[]), [0, 1, 2, 3, 4, 5]);
        assert!(errors.families().is_empty(), "{:?}", errors.families());
    }

    /// A reload that changes the layout closes every file with the collector it replaces; the
    /// budget and the count of reads by path carry over.
    #[test]
    fn a_new_layout_closes_the_files_and_keeps_the_budget_and_counts() {
        let (root, layout) = fixture(3);
        let fds = Fds::for_limit(262, Box::new(fds::Kernel));
        let sys = root.path().join("sys");
        let mut c = Collector::with_fds(layout.clone(), &sys, fds);
        let mut errors = ErrorCounts::default();
        tick(&mut c, &[0, 1, 2], &mut errors);
        assert_eq!((open(&c), c.fds.path_reads()), ((6, 6), 3));

        let mut config = Config::default();
        config.paths.sys_root = sys;
        let moved = Layout {
            unified: Some(root.path().join("elsewhere")),
            ..layout
        };
        c.reconfigure(&config, &moved, &mut errors);
        assert_eq!(
            (open(&c), c.fds.budget(), c.fds.path_reads()),
            ((0, 0), 6, 3)
        );
    }
}
