//! The cgroupfs collector: per-workload CPU, memory and disk from cgroup files, v1 and v2.
//!
//! Each tick walks the hierarchies for workload directories (a directory that names a workload is
//! not descended into: its files already count its children), then reads each workload's files
//! once: CPU from v1 `cpuacct.usage` where the workload has a cpuacct cgroup, else v2 `cpu.stat`
//! (a core file, present even with no controller enabled); memory from v2 `memory.current`, else
//! v1 `memory.usage_in_bytes`; disk from v2 `io.stat`, else v1 `blkio.throttle.io_service_bytes`.

pub mod layout;
mod parse;
mod walk;

use std::io;
use std::path::{Path, PathBuf};

use layout::Layout;
pub use walk::{Discovery, Found};

use crate::errors::ErrorCounts;

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
}

/// The collector label of every error this module counts.
const COLLECTOR: &str = "cgroupfs";

impl Collector {
    pub fn new(layout: Layout) -> Self {
        Self { layout }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Every workload cgroup on the node, and every cgroup v2 id with the workload it belongs to.
    pub fn discover(&self, errors: &mut ErrorCounts) -> Discovery {
        walk::discover(&self.layout, errors)
    }

    /// Reads the files of the workload at `rel` (relative to each hierarchy root). A file that
    /// vanished with its cgroup is not an error; any other failure is counted.
    pub fn read(&self, rel: &str, errors: &mut ErrorCounts) -> Reading {
        let rel = rel.trim_start_matches('/');
        let v2 = self.layout.unified.as_deref().map(|r| r.join(rel));
        let v1 = |root: &Option<PathBuf>| root.as_deref().map(|r| r.join(rel));
        let cpu_seconds = match v1(&self.layout.cpuacct).filter(|d| d.is_dir()) {
            Some(dir) => read_with(
                &dir.join("cpuacct.usage"),
                parse::cpuacct_usage_seconds,
                errors,
            ),
            None => v2
                .as_ref()
                .and_then(|dir| read_with(&dir.join("cpu.stat"), parse::cpu_stat_seconds, errors)),
        };

        let memory_current = v2.as_ref().map(|d| d.join("memory.current"));
        let memory_bytes = match memory_current.filter(|f| f.exists()) {
            Some(file) => read_with(&file, parse::single, errors),
            None => v1(&self.layout.memory).and_then(|dir| {
                read_with(&dir.join("memory.usage_in_bytes"), parse::single, errors)
            }),
        }
        .map(|b| b as f64);

        let io_stat = v2.as_ref().map(|d| d.join("io.stat"));
        let disk = match io_stat.filter(|f| f.exists()) {
            Some(file) => read_with(&file, parse::io_stat_bytes, errors),
            None => v1(&self.layout.blkio).and_then(|dir| {
                read_with(
                    &dir.join("blkio.throttle.io_service_bytes"),
                    parse::blkio_bytes,
                    errors,
                )
            }),
        };
        Reading {
            cpu_seconds,
            memory_bytes,
            disk_read_bytes: disk.map(|(read, _)| read as f64),
            disk_write_bytes: disk.map(|(_, write)| write as f64),
        }
    }
}

/// Reads and parses one file; a missing file (the cgroup went away, or the controller is not
/// there) is `None` without an error, anything else is counted by reason.
fn read_with<T>(
    path: &Path,
    parse: impl Fn(&str) -> Option<T>,
    errors: &mut ErrorCounts,
) -> Option<T> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let value = parse(&text);
            if value.is_none() {
                errors.record(COLLECTOR, "parse", || {
                    format!("malformed {}", path.display())
                });
            }
            value
        }
        Err(e) if is_gone(&e) => None,
        Err(e) => {
            errors.record(COLLECTOR, "read", || {
                format!("reading {}: {e}", path.display())
            });
            None
        }
    }
}

/// ENOENT, or ENODEV which cgroupfs returns for a file of a cgroup being removed.
fn is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV)
}
