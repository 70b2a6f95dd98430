//! The cgroupfs collector: per-workload CPU, memory and disk from cgroup files, v1 and v2.
//!
//! Each tick walks the hierarchies for workload directories (a directory that names a workload is
//! not descended into: its files already count its children), then reads each workload's files
//! once: CPU from v1 `cpuacct.usage` where the workload has a cpuacct cgroup, else v2 `cpu.stat`
//! (a core file, present even with no controller enabled); memory from v2 `memory.current`, else
//! v1 `memory.usage_in_bytes`; disk from v2 `io.stat`, else v1 `blkio.throttle.io_service_bytes`.
//!
//! Which files a workload has is decided once, when it is first seen, and the files stay open:
//! each tick is one `pread` at offset 0 per file (cgroup files are seq_files, regenerated when read
//! from the start: fs/seq_file.c, `seq_read_iter`), not a path lookup, open, read and close. A
//! workload whose cgroup is gone gets `ENODEV` from its open files and is dropped.

mod files;
mod parse;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use files::WorkloadFiles;

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
    /// Open files by workload path, with the tick they were last read in.
    files: HashMap<String, (WorkloadFiles, u64)>,
    tick: u64,
    buf: Vec<u8>,
}

/// The collector label of every error this module counts.
const COLLECTOR: &str = "cgroupfs";

/// A workload missing some file is looked at again this often (ticks): a controller may have been
/// enabled for it after it was first seen.
const RESOLVE_MISSING_EVERY: u64 = 30;

impl Collector {
    pub fn new(layout: Layout) -> Self {
        Self {
            layout,
            files: HashMap::new(),
            tick: 0,
            buf: vec![0; 4096],
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Reads the files of the workload at `rel` (relative to each hierarchy root). A file that
    /// vanished with its cgroup is not an error; any other failure is counted.
    fn read(&mut self, rel: &str, errors: &mut ErrorCounts) -> Reading {
        let tick = self.tick;
        let (files, last) = self
            .files
            .entry(rel.to_owned())
            .or_insert_with(|| (WorkloadFiles::resolve(&self.layout, rel, errors), tick));
        if files.incomplete() && tick % RESOLVE_MISSING_EVERY == 0 {
            *files = WorkloadFiles::resolve(&self.layout, rel, errors);
        }
        *last = tick;
        files.read(&mut self.buf, errors)
    }

    /// Closes the files of workloads not read this tick (their cgroups are gone).
    fn end_tick(&mut self) {
        let tick = self.tick;
        self.files.retain(|_, (_, last)| *last == tick);
    }
}

impl Source for Collector {
    fn name(&self) -> &'static str {
        COLLECTOR
    }

    fn collect(&mut self, ctx: &mut TickCtx<'_>, ledger: &mut Ledger) {
        self.tick += 1;
        for (found, workload) in ctx.discovery.found.iter().zip(ctx.workloads) {
            let reading = self.read(&found.rel, ctx.errors);
            record(ledger, workload, &reading);
        }
        self.end_tick();
    }

    fn probes(&self) -> Vec<Probe> {
        vec![Probe {
            probe: COLLECTOR,
            method: self.layout.mode.as_str(),
            up: true,
        }]
    }

    fn reconfigure(&mut self, _config: &Config, layout: &Layout, _errors: &mut ErrorCounts) {
        if layout != &self.layout {
            *self = Collector::new(layout.clone());
        }
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
