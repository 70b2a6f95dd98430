//! One workload's cgroup files, chosen once and kept open.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::{parse, Reading, COLLECTOR};
use crate::errors::ErrorCounts;
use crate::host::layout::Layout;

/// How to turn a file's text into numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    CpuStat,
    CpuacctUsage,
    Single,
    IoStat,
    Blkio,
}

/// A cgroup file, open when the fd limit allowed it, else read by path each time.
#[derive(Debug)]
struct CgroupFile {
    path: PathBuf,
    file: Option<File>,
    format: Format,
}

/// What a file read gave.
enum Read {
    Cpu(f64),
    Bytes(u64),
    Io(u64, u64),
    Nothing,
}

#[derive(Debug)]
pub(super) struct WorkloadFiles {
    cpu: Option<CgroupFile>,
    memory: Option<CgroupFile>,
    io: Option<CgroupFile>,
}

impl WorkloadFiles {
    /// Picks each measurement's file (see the module doc) and opens it.
    pub(super) fn resolve(layout: &Layout, rel: &str, errors: &mut ErrorCounts) -> WorkloadFiles {
        let rel = rel.trim_start_matches('/');
        let v2 = layout.unified.as_deref().map(|r| r.join(rel));
        let v1 = |root: &Option<PathBuf>| root.as_deref().map(|r| r.join(rel));
        let mut first = |candidates: [(Option<PathBuf>, &str, Format); 2]| {
            candidates
                .into_iter()
                .find_map(|(dir, name, format)| {
                    let path = dir?.join(name);
                    path.exists().then_some((path, format))
                })
                .map(|(path, format)| CgroupFile::open(path, format, errors))
        };
        WorkloadFiles {
            cpu: first([
                (v1(&layout.cpuacct), "cpuacct.usage", Format::CpuacctUsage),
                (v2.clone(), "cpu.stat", Format::CpuStat),
            ]),
            memory: first([
                (v2.clone(), "memory.current", Format::Single),
                (v1(&layout.memory), "memory.usage_in_bytes", Format::Single),
            ]),
            io: first([
                (v2, "io.stat", Format::IoStat),
                (
                    v1(&layout.blkio),
                    "blkio.throttle.io_service_bytes",
                    Format::Blkio,
                ),
            ]),
        }
    }

    /// Whether some measurement has no file (yet).
    pub(super) fn incomplete(&self) -> bool {
        self.cpu.is_none() || self.memory.is_none() || self.io.is_none()
    }

    pub(super) fn read(&mut self, buf: &mut Vec<u8>, errors: &mut ErrorCounts) -> Reading {
        let mut reading = Reading::default();
        for file in [&mut self.cpu, &mut self.memory, &mut self.io]
            .into_iter()
            .flatten()
        {
            match file.read(buf, errors) {
                Read::Cpu(s) => reading.cpu_seconds = Some(s),
                Read::Bytes(b) => reading.memory_bytes = Some(b as f64),
                Read::Io(r, w) => {
                    reading.disk_read_bytes = Some(r as f64);
                    reading.disk_write_bytes = Some(w as f64);
                }
                Read::Nothing => {}
            }
        }
        reading
    }
}

impl CgroupFile {
    fn open(path: PathBuf, format: Format, errors: &mut ErrorCounts) -> CgroupFile {
        let file = match File::open(&path) {
            Ok(f) => Some(f),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                errors.record(COLLECTOR, "fd_limit", || {
                    format!(
                        "opening {}: {e}; reading by path instead (raise LimitNOFILE)",
                        path.display()
                    )
                });
                None
            }
            // Gone or unreadable: the read below reports it.
            Err(_) => None,
        };
        CgroupFile { path, file, format }
    }

    fn read(&mut self, buf: &mut Vec<u8>, errors: &mut ErrorCounts) -> Read {
        let len = match &self.file {
            Some(file) => pread_all(file, buf),
            None => std::fs::read(&self.path).map(|bytes| {
                let n = bytes.len();
                *buf = bytes;
                n
            }),
        };
        let len = match len {
            Ok(len) => len,
            Err(e) if is_gone(&e) => return Read::Nothing,
            Err(e) => {
                let path = &self.path;
                errors.record(COLLECTOR, "read", || {
                    format!("reading {}: {e}", path.display())
                });
                return Read::Nothing;
            }
        };
        let text = String::from_utf8_lossy(&buf[..len]);
        let parsed = match self.format {
            Format::CpuStat => parse::cpu_stat_seconds(&text).map(Read::Cpu),
            Format::CpuacctUsage => parse::cpuacct_usage_seconds(&text).map(Read::Cpu),
            Format::Single => parse::single(&text).map(Read::Bytes),
            Format::IoStat => parse::io_stat_bytes(&text).map(|(r, w)| Read::Io(r, w)),
            Format::Blkio => parse::blkio_bytes(&text).map(|(r, w)| Read::Io(r, w)),
        };
        parsed.unwrap_or_else(|| {
            let path = &self.path;
            errors.record(COLLECTOR, "parse", || {
                format!("malformed {}", path.display())
            });
            Read::Nothing
        })
    }
}

/// Reads the whole file from offset 0 into `buf`, growing it when the file does not fit.
fn pread_all(file: &File, buf: &mut Vec<u8>) -> io::Result<usize> {
    loop {
        let n = file.read_at(buf, 0)?;
        if n < buf.len() {
            return Ok(n);
        }
        // A seq_file returns at most what fits; read again with room to spare.
        let grown = buf.len() * 2;
        buf.resize(grown, 0);
    }
}

/// ENOENT, or ENODEV which cgroupfs returns for a file of a cgroup being removed.
fn is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV)
}
