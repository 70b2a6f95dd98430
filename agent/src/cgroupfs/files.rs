//! One workload's cgroup files, chosen once and kept open while the fd budget allows.

use std::fs::File;
use std::io;
use std::path::PathBuf;

use super::fds::{is_fd_limit, pread_all, Fds};
use super::stacks::Stacks;
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

/// A cgroup file, kept open when the fd budget had room, else opened by path for each read.
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

/// Which measurements a read wants from files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Want {
    pub cpu: bool,
    pub memory: bool,
    pub io: bool,
}

#[derive(Debug)]
pub(super) struct WorkloadFiles {
    cpu: Option<CgroupFile>,
    memory: Option<CgroupFile>,
    io: Option<CgroupFile>,
}

impl WorkloadFiles {
    /// Picks each measurement's file (see the module doc); the first read opens it. With
    /// `v2_cpu`, CPU is v2 `cpu.stat` wherever the workload has a v2 directory, even where v1
    /// `cpuacct.usage` exists: the BPF iterator reads the v2 count, and a workload's CPU must
    /// come from one count (on a hybrid node the two differ by the moments a task spent between
    /// joining one hierarchy and the other, and a counter that went back would read as a reset).
    pub(super) fn resolve(layout: &Layout, rel: &str, v2_cpu: bool) -> WorkloadFiles {
        let rel = rel.trim_start_matches('/');
        let v2 = layout.unified.as_deref().map(|r| r.join(rel));
        let v1 = |root: &Option<PathBuf>| root.as_deref().map(|r| r.join(rel));
        let first = |candidates: &[(Option<PathBuf>, &str, Format)]| {
            candidates.iter().find_map(|(dir, name, format)| {
                let path = dir.as_ref()?.join(name);
                path.exists().then_some(CgroupFile {
                    path,
                    file: None,
                    format: *format,
                })
            })
        };
        let cpu_stat = (v2.clone(), "cpu.stat", Format::CpuStat);
        let cpuacct = (v1(&layout.cpuacct), "cpuacct.usage", Format::CpuacctUsage);
        WorkloadFiles {
            cpu: if v2_cpu {
                first(&[cpu_stat, cpuacct])
            } else {
                first(&[cpuacct, cpu_stat])
            },
            memory: first(&[
                (v2.clone(), "memory.current", Format::Single),
                (v1(&layout.memory), "memory.usage_in_bytes", Format::Single),
            ]),
            io: first(&[
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

    /// Looks again for the measurements that have no file, keeping the files it has (and their
    /// descriptors) as they are.
    pub(super) fn fill_missing(&mut self, layout: &Layout, rel: &str, v2_cpu: bool) {
        let found = WorkloadFiles::resolve(layout, rel, v2_cpu);
        for (slot, file) in [
            (&mut self.cpu, found.cpu),
            (&mut self.memory, found.memory),
            (&mut self.io, found.io),
        ] {
            if slot.is_none() {
                *slot = file;
            }
        }
    }

    /// How many of its files are kept open.
    pub(super) fn open_count(&self) -> usize {
        self.files().filter(|f| f.file.is_some()).count()
    }

    /// Closes up to `n` of its kept-open files (they are read by path from then on); returns how
    /// many it closed.
    pub(super) fn close_kept(&mut self, n: usize) -> usize {
        let mut closed = 0;
        for file in [&mut self.cpu, &mut self.memory, &mut self.io]
            .into_iter()
            .flatten()
        {
            if closed < n && file.file.take().is_some() {
                closed += 1;
            }
        }
        closed
    }

    /// Closes the kept CPU and memory files where `given` says the iterator gave that value (a
    /// workload read from files while the walk had no room for it, and in it again); returns how
    /// many it closed.
    pub(super) fn release(&mut self, given: Want) -> usize {
        let mut closed = 0;
        for (given, file) in [(given.cpu, &mut self.cpu), (given.memory, &mut self.memory)] {
            if given && file.as_mut().and_then(|f| f.file.take()).is_some() {
                closed += 1;
            }
        }
        closed
    }

    fn files(&self) -> impl Iterator<Item = &CgroupFile> {
        [&self.cpu, &self.memory, &self.io].into_iter().flatten()
    }

    /// Reads the files of the measurements `want` names (a file not read is not opened).
    pub(super) fn read(
        &mut self,
        want: Want,
        buf: &mut Vec<u8>,
        stacks: &mut Stacks,
        fds: &mut Fds,
        errors: &mut ErrorCounts,
    ) -> Reading {
        let mut reading = Reading::default();
        let files = [
            (want.cpu, &mut self.cpu),
            (want.memory, &mut self.memory),
            (want.io, &mut self.io),
        ];
        for file in files
            .into_iter()
            .filter_map(|(wanted, file)| wanted.then_some(file))
            .flatten()
        {
            match file.read(buf, stacks, fds, errors) {
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
    fn read(
        &mut self,
        buf: &mut Vec<u8>,
        stacks: &mut Stacks,
        fds: &mut Fds,
        errors: &mut ErrorCounts,
    ) -> Read {
        let len = match &self.file {
            Some(file) => pread_all(file, buf),
            None => fds.read(&self.path, buf, errors).map(|read| {
                self.file = read.keep;
                read.len
            }),
        };
        let len = match len {
            Ok(len) => len,
            // The cgroup went; a kept file of it is closed, so that one made again at the same
            // path is opened anew.
            Err(e) if is_gone(&e) => {
                if self.file.take().is_some() {
                    fds.closed(1);
                }
                return Read::Nothing;
            }
            // Counted where it was met (`reason="fd_limit"`).
            Err(e) if is_fd_limit(&e) => return Read::Nothing,
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
            Format::IoStat => parse::io_stat_bytes(&text, |dev| stacks.is_stacked(dev))
                .map(|(r, w)| Read::Io(r, w)),
            Format::Blkio => {
                parse::blkio_bytes(&text, |dev| stacks.is_stacked(dev)).map(|(r, w)| Read::Io(r, w))
            }
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

/// ENOENT, or ENODEV which cgroupfs returns for a file of a cgroup being removed.
fn is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::layout::Mode;

    /// A workload that wrote through dm-0 (253:0, on 8:0) and read 8:16 directly: its bytes
    /// from io.stat, the dm layer and the disk below it counted once.
    #[test]
    fn io_stat_counts_a_stack_once_from_the_fixture_sysfs() {
        let root = tempfile::tempdir().unwrap();
        let cgroup = root.path().join("cgroup/w");
        std::fs::create_dir_all(&cgroup).unwrap();
        std::fs::write(
            cgroup.join("io.stat"),
            "253:0 rbytes=0 wbytes=2097152 rios=0 wios=2 dbytes=0 dios=0\n\
             8:0 rbytes=0 wbytes=2097152 rios=0 wios=2 dbytes=0 dios=0\n\
             8:16 rbytes=12288 wbytes=0 rios=3 wios=0 dbytes=0 dios=0\n",
        )
        .unwrap();
        let sys = root.path().join("sys");
        for dev in ["8:0", "8:16", "253:0"] {
            std::fs::create_dir_all(sys.join("dev/block").join(dev).join("slaves")).unwrap();
        }
        std::fs::create_dir(sys.join("dev/block/253:0/slaves/sda")).unwrap();
        let layout = Layout {
            mode: Mode::V2,
            unified: Some(root.path().join("cgroup")),
            cpuacct: None,
            memory: None,
            blkio: None,
            cpu: None,
            freezer: None,
        };
        let mut errors = ErrorCounts::default();
        let mut files = WorkloadFiles::resolve(&layout, "/w", false);
        let mut fds = Fds::for_limit(1024, Box::new(super::super::fds::Kernel));
        let all = Want {
            cpu: true,
            memory: true,
            io: true,
        };
        let reading = files.read(
            all,
            &mut vec![0; 64],
            &mut Stacks::new(&sys),
            &mut fds,
            &mut errors,
        );
        assert_eq!(
            (reading.disk_read_bytes, reading.disk_write_bytes),
            (Some(12288.0), Some(2097152.0))
        );
    }
}
