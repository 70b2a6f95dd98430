//! How many cgroup files the collector keeps open, and reading the rest by path.
//!
//! Keeping a workload's files open makes each tick one `pread` per file, but costs a descriptor
//! each: three per workload, against the process's `RLIMIT_NOFILE`. The budget for kept-open files
//! is sized once from the limit the agent runs with (after `sys::raise_fd_limit`), minus a reserve
//! for every other descriptor the agent holds. Files beyond the budget are opened, read and closed
//! each tick (and kept once a closing workload frees room), so every workload still gets its
//! values. `EMFILE` or `ENFILE` met anyway (the rest of the agent outgrew the reserve, or the
//! node's file table is full) is counted once for the tick, that read and the tick's later ones
//! are done through a spare descriptor held for that, and the budget gives back a reserve's worth
//! of kept files at the end of the tick, so the next tick does not meet the limit again.

use std::fs::File;
use std::io;
use std::path::Path;

use super::COLLECTOR;
use crate::errors::ErrorCounts;

/// The smallest number of descriptors left to the rest of the agent. At start the agent holds
/// about 45 with every eBPF program loaded (measured: 12 BPF maps, 8 programs, 8 links, 3 BTF
/// objects, the tokio runtime's epoll and eventfd, the listener, stdio); the rest of the reserve
/// is for what comes and goes: scrape and `tally top` connections, the CRI and pod-resources
/// sockets, OTLP and alert connections, NVML's device nodes (a few per GPU), the walk's open
/// directories, `/proc` reads and the spare descriptor below.
const RESERVE_MIN: u64 = 256;

/// The soft limit assumed when it cannot be read: the usual default.
pub(super) const DEFAULT_LIMIT: u64 = 1024;

/// Descriptors left to the rest of the agent under an open-file limit of `limit`: an eighth of
/// it, at least [`RESERVE_MIN`]. The agent's other descriptors grow with the node (per-CPU
/// buffers, GPUs, connections), as does the limit an operator gives a big node, so the reserve
/// is a share of the limit rather than a constant; 20,000 keeps 2,500 back, 1024 keeps 256.
pub(super) fn reserve(limit: u64) -> u64 {
    (limit / 8).max(RESERVE_MIN)
}

/// How many cgroup files may stay open under an open-file limit of `limit`.
pub(super) fn budget_for(limit: u64) -> usize {
    usize::try_from(limit.saturating_sub(reserve(limit))).unwrap_or(usize::MAX)
}

/// Opens cgroup files: the one seam unit tests replace to meet `EMFILE` at will.
pub(super) trait Open: Send + std::fmt::Debug {
    fn open(&mut self, path: &Path) -> io::Result<File>;
}

/// The real `open(2)`.
#[derive(Debug)]
pub(super) struct Kernel;

impl Open for Kernel {
    fn open(&mut self, path: &Path) -> io::Result<File> {
        File::open(path)
    }
}

/// The kept-open budget, and what reading by path has cost.
#[derive(Debug)]
pub(super) struct Fds {
    /// Files that may stay open.
    budget: usize,
    /// What a tick that meets the limit gives back: the reserve the budget was sized with.
    reserve: usize,
    /// Files open now.
    open: usize,
    /// Reads that opened the file by path and closed it again.
    path_reads: u64,
    /// Whether `EMFILE` or `ENFILE` was met this tick.
    limit_met: bool,
    /// A descriptor held to be closed when the limit is met, so that one read can still be done.
    spare: Option<File>,
    opener: Box<dyn Open>,
}

/// What [`Fds::read`] read: the length in the buffer, and the file when it is to be kept open.
pub(super) struct ReadByPath {
    pub len: usize,
    pub keep: Option<File>,
}

/// Nothing kept open and no spare: what a collector being replaced holds for a moment.
impl Default for Fds {
    fn default() -> Fds {
        Fds {
            budget: 0,
            reserve: 0,
            open: 0,
            path_reads: 0,
            limit_met: false,
            spare: None,
            opener: Box::new(Kernel),
        }
    }
}

impl Fds {
    /// The budget for an open-file limit of `limit`.
    pub fn for_limit(limit: u64, opener: Box<dyn Open>) -> Fds {
        let budget = budget_for(limit);
        let mut fds = Fds {
            budget,
            reserve: usize::try_from(reserve(limit)).unwrap_or(usize::MAX),
            open: 0,
            path_reads: 0,
            limit_met: false,
            spare: None,
            opener,
        };
        fds.take_spare();
        fds
    }

    /// The same budget and counts with no file open (the files were dropped with the collector a
    /// reload replaced).
    pub fn all_closed(self) -> Fds {
        Fds { open: 0, ..self }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    pub fn open(&self) -> usize {
        self.open
    }

    pub fn path_reads(&self) -> u64 {
        self.path_reads
    }

    /// Opens `path`, reads it whole into `buf` and returns the file to keep if the budget has
    /// room, else closes it. The first `EMFILE` or `ENFILE` of a tick is counted
    /// (`reason="fd_limit"`, once per tick that meets the limit, however many files it reads
    /// after); from then until the tick ends every file is read through the spare descriptor.
    pub fn read(
        &mut self,
        path: &Path,
        buf: &mut Vec<u8>,
        errors: &mut ErrorCounts,
    ) -> io::Result<ReadByPath> {
        if !self.limit_met {
            match self.opener.open(path) {
                Ok(file) => {
                    let len = pread_all(&file, buf)?;
                    if self.open < self.budget {
                        self.open += 1;
                        return Ok(ReadByPath {
                            len,
                            keep: Some(file),
                        });
                    }
                    self.path_reads += 1;
                    return Ok(ReadByPath { len, keep: None });
                }
                Err(e) if is_fd_limit(&e) => {
                    errors.record(COLLECTOR, "fd_limit", || {
                        format!(
                            "opening {}: {e}; reading through a spare descriptor and keeping fewer cgroup files open",
                            path.display()
                        )
                    });
                    self.limit_met = true;
                }
                Err(e) => return Err(e),
            }
        }
        self.read_through_spare(path, buf)
    }

    /// Closes the spare descriptor, opens, reads and closes `path` in its place and takes the
    /// spare again: a read that works with no descriptor free.
    fn read_through_spare(&mut self, path: &Path, buf: &mut Vec<u8>) -> io::Result<ReadByPath> {
        if self.spare.take().is_none() {
            // Lost to another thread's open after the last read through it.
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        let read = self.opener.open(path).and_then(|f| pread_all(&f, buf));
        self.take_spare();
        let len = read?;
        self.path_reads += 1;
        Ok(ReadByPath { len, keep: None })
    }

    /// Counts `n` kept files closed.
    pub fn closed(&mut self, n: usize) {
        debug_assert!(n <= self.open, "closing {n} of {} open", self.open);
        self.open = self.open.saturating_sub(n);
    }

    /// At the end of a tick: when the limit was met, lowers the budget by a reserve's worth below
    /// what is open; returns how many kept files must be closed to fit.
    pub fn end_tick(&mut self) -> usize {
        if std::mem::take(&mut self.limit_met) {
            let budget = self.open.min(self.budget).saturating_sub(self.reserve);
            tracing::warn!(
                from = self.budget,
                to = budget,
                "open-file limit met: keeping fewer cgroup files open"
            );
            self.budget = budget;
        }
        if self.spare.is_none() {
            self.take_spare();
        }
        self.open.saturating_sub(self.budget)
    }

    fn take_spare(&mut self) {
        self.spare = self.opener.open(Path::new("/")).ok();
    }
}

/// Whether `e` is the process (`EMFILE`) or the node (`ENFILE`) out of file descriptors.
pub(super) fn is_fd_limit(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Reads the whole file from offset 0 into `buf`, growing it when the file does not fit.
pub(super) fn pread_all(file: &File, buf: &mut Vec<u8>) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Opens for real, except that the next `refuse` opens fail with `EMFILE`.
    #[derive(Debug, Default)]
    pub struct Refusing {
        pub refuse: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Open for Refusing {
        fn open(&mut self, path: &Path) -> io::Result<File> {
            use std::sync::atomic::Ordering::Relaxed;
            let left = self.refuse.load(Relaxed);
            if left > 0 {
                self.refuse.store(left - 1, Relaxed);
                return Err(io::Error::from_raw_os_error(libc::EMFILE));
            }
            File::open(path)
        }
    }

    #[test]
    fn the_budget_is_the_limit_less_an_eighth_or_256() {
        assert_eq!(budget_for(20_000), 17_500);
        assert_eq!(budget_for(1024), 768);
        assert_eq!(budget_for(2048), 1792);
        assert_eq!(budget_for(4096), 3584);
        assert_eq!(budget_for(1_048_576), 917_504);
        // Below the reserve nothing is kept open: every file is read by path.
        assert_eq!(budget_for(256), 0);
        assert_eq!(budget_for(100), 0);
        assert_eq!(budget_for(u64::MAX), (u64::MAX - u64::MAX / 8) as usize);
    }

    fn fixture(n: usize) -> (tempfile::TempDir, Vec<std::path::PathBuf>) {
        let dir = tempfile::tempdir().unwrap();
        let paths = (0..n)
            .map(|i| {
                let path = dir.path().join(format!("f{i}"));
                std::fs::write(&path, format!("{i}\n")).unwrap();
                path
            })
            .collect();
        (dir, paths)
    }

    #[test]
    fn files_within_the_budget_are_kept_and_the_rest_read_by_path() {
        let (_dir, paths) = fixture(4);
        // A limit of 258 leaves a budget of 2.
        let mut fds = Fds::for_limit(258, Box::new(Kernel));
        let mut errors = ErrorCounts::default();
        let mut buf = vec![0; 1];
        let kept: Vec<bool> = paths
            .iter()
            .enumerate()
            .map(|(i, path)| {
                let read = fds.read(path, &mut buf, &mut errors).unwrap();
                assert_eq!(&buf[..read.len], format!("{i}\n").as_bytes());
                read.keep.is_some()
            })
            .collect();
        assert_eq!(kept, [true, true, false, false]);
        assert_eq!((fds.open(), fds.budget(), fds.path_reads()), (2, 2, 2));
        // A closing workload frees room: the next read by path is kept.
        fds.closed(1);
        assert_eq!(fds.end_tick(), 0);
        assert!(fds
            .read(&paths[2], &mut buf, &mut errors)
            .unwrap()
            .keep
            .is_some());
        assert!(fds
            .read(&paths[3], &mut buf, &mut errors)
            .unwrap()
            .keep
            .is_none());
        assert_eq!((fds.open(), fds.path_reads()), (2, 3));
        assert!(errors.families().is_empty());
    }

    #[test]
    fn emfile_is_counted_once_the_value_read_and_the_budget_shrinks() {
        let (_dir, paths) = fixture(2);
        let opener = Refusing::default();
        let refuse = opener.refuse.clone();
        let mut fds = Fds::for_limit(2048, Box::new(opener));
        let mut errors = ErrorCounts::default();
        let mut buf = vec![0; 16];
        assert!(fds
            .read(&paths[0], &mut buf, &mut errors)
            .unwrap()
            .keep
            .is_some());

        // The limit met: one count, and the value still read, through the spare descriptor.
        refuse.store(1, std::sync::atomic::Ordering::Relaxed);
        let read = fds.read(&paths[1], &mut buf, &mut errors).unwrap();
        assert_eq!(&buf[..read.len], b"1\n");
        assert!(read.keep.is_none());
        assert_eq!(fd_limit_count(&errors), 1);
        assert!(fds.spare.is_some(), "the spare descriptor is taken again");
        // Nothing more is kept this tick, and what it reads after is not counted again.
        for path in &paths {
            assert!(fds
                .read(path, &mut buf, &mut errors)
                .unwrap()
                .keep
                .is_none());
        }
        assert_eq!(fds.path_reads(), 3);
        assert_eq!(fd_limit_count(&errors), 1);

        // The tick's end gives back a reserve's worth (256) below what is open: the one kept
        // file must close.
        assert_eq!(fds.end_tick(), 1);
        assert_eq!(fds.budget(), 0);
        fds.closed(1);
        assert_eq!(fds.end_tick(), 0);
        assert_eq!(
            fd_limit_count(&errors),
            1,
            "counted once, not again each tick"
        );
        // A later tick that meets the limit is another event.
        refuse.store(1, std::sync::atomic::Ordering::Relaxed);
        fds.read(&paths[0], &mut buf, &mut errors).unwrap();
        assert_eq!(fd_limit_count(&errors), 2);
    }

    #[test]
    fn emfile_again_without_a_spare_is_one_count_and_an_error() {
        let (_dir, paths) = fixture(1);
        let opener = Refusing::default();
        let refuse = opener.refuse.clone();
        let mut fds = Fds::for_limit(2048, Box::new(opener));
        let mut errors = ErrorCounts::default();
        // Both the open and the try through the spare descriptor are refused.
        refuse.store(2, std::sync::atomic::Ordering::Relaxed);
        let e = fds
            .read(&paths[0], &mut vec![0; 16], &mut errors)
            .err()
            .unwrap();
        assert!(is_fd_limit(&e));
        assert_eq!(fd_limit_count(&errors), 1);
        assert_eq!(fds.path_reads(), 0);
    }

    pub fn fd_limit_count(errors: &ErrorCounts) -> u64 {
        let count: f64 = errors
            .families()
            .iter()
            .flat_map(|f| &f.samples)
            .filter(|s| s.extra.iter().any(|(_, v)| &**v == "fd_limit"))
            .map(|s| s.value)
            .sum();
        count as u64
    }
}
