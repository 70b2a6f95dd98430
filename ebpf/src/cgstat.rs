//! Every cgroup's CPU time and memory in one read (`ebpf/c/cgstat.bpf.c`): a cgroup iterator
//! attached to the root of a hierarchy, read once a tick instead of two cgroup files per workload.
//!
//! The program is loaded once; [`CgroupStats::attach`] makes one iterator link per hierarchy root
//! (the v2 root, and on a hybrid node the v1 memory root), and [`CgroupStats::read`] runs a fresh
//! iteration of one. aya attaches iterators without link info, which a cgroup iterator refuses
//! (it needs a walk order), so the link is made here with `BPF_LINK_CREATE` and the iteration
//! with `BPF_ITER_CREATE` (include/uapi/linux/bpf.h).
//!
//! The records are not in what read() returns (a cgroup walk must fit one read(), 32 KiB): the
//! program stores them in the `CGROUP_STATS` array, which is mapped into this process, and the
//! read() gives their count.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::maps::Map;
use aya::programs::{Iter, ProgramFd};
use aya::{Btf, Ebpf, EbpfLoader};
use tally_ebpf_common::CgroupStat;

use crate::{Error, CGSTAT_OBJECT};

const OBJECT: &str = "cgstat.bpf.o";
const PROGRAM: &str = "cgroup_stats";
const STATS: &str = "CGROUP_STATS";
const RECORD: usize = std::mem::size_of::<CgroupStat>();

/// `enum bpf_cmd` and `enum bpf_attach_type` values (include/uapi/linux/bpf.h).
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
const BPF_TRACE_ITER: u32 = 28;
/// `enum bpf_cgroup_iter_order`: the start cgroup, then its descendants, parents first.
const BPF_CGROUP_ITER_DESCENDANTS_PRE: u32 = 2;

/// The loaded iterator program and its records' array, mapped.
pub struct CgroupStats {
    /// Owns the program and the array.
    _ebpf: Ebpf,
    program_fd: ProgramFd,
    /// `CGROUP_STATS`, mapped read-only: `capacity` records.
    records: *const CgroupStat,
    mapped_len: usize,
    capacity: u32,
}

// SAFETY: the mapping is only read, through `&self`, and lives as long as the struct; the raw
// pointer is what keeps the struct from being Send and Sync by default.
unsafe impl Send for CgroupStats {}
// SAFETY: as above.
unsafe impl Sync for CgroupStats {}

impl Drop for CgroupStats {
    fn drop(&mut self) {
        // SAFETY: `records` and `mapped_len` are the mapping made in `load`, unmapped once.
        unsafe { libc::munmap(self.records as *mut libc::c_void, self.mapped_len) };
    }
}

/// What one walk found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walked {
    /// Cgroups walked.
    pub cgroups: u64,
    /// Of those, the ones the array had no room for (not in the records).
    pub dropped: u64,
}

/// One hierarchy's iterator link.
pub struct Tree {
    root: PathBuf,
    link: OwnedFd,
}

impl std::fmt::Debug for CgroupStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CgroupStats").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tree").field("root", &self.root).finish()
    }
}

/// `union bpf_attr`'s `link_create` with `iter_info` (the fields it needs, zero after them).
#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    iter_info: u64,
    iter_info_len: u32,
    _rest: [u32; 9],
}

/// `union bpf_iter_link_info`'s `cgroup`.
#[repr(C)]
struct CgroupIterInfo {
    order: u32,
    cgroup_fd: u32,
    cgroup_id: u64,
}

/// `union bpf_attr`'s `iter_create`.
#[repr(C)]
#[derive(Default)]
struct IterCreate {
    link_fd: u32,
    flags: u32,
    _rest: [u64; 6],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid, initialised `repr(C)` prefix of `union bpf_attr` for `cmd`, and
    // its size is passed with it; the kernel reads no further.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both commands return a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

impl CgroupStats {
    /// Loads the iterator program (relocated against the kernel's BTF), with room for
    /// `capacity` cgroups per walk.
    pub fn load(capacity: u32) -> Result<Self, Error> {
        let btf = Btf::from_sys_fs().map_err(|source| Error::KernelBtf { source })?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .map_max_entries(STATS, capacity)
            .load(CGSTAT_OBJECT)
            .map_err(|source| Error::Load {
                object: OBJECT,
                source,
            })?;
        let program: &mut Iter = ebpf
            .program_mut(PROGRAM)
            .ok_or(Error::MissingProgram {
                object: OBJECT,
                program: PROGRAM,
            })?
            .try_into()
            .map_err(|source| Error::Program {
                program: PROGRAM,
                action: "not an iterator",
                source,
            })?;
        let failed = |action: &'static str| {
            move |source| Error::Program {
                program: PROGRAM,
                action,
                source,
            }
        };
        program.load("cgroup", &btf).map_err(failed("loading"))?;
        let program_fd = program
            .fd()
            .map_err(failed("getting its descriptor"))?
            .try_clone()
            .map_err(|source| Error::IteratorLoad {
                action: "duplicating the program's descriptor",
                source,
            })?;
        let Some(Map::Array(map)) = ebpf.map(STATS) else {
            return Err(Error::MissingMap {
                object: OBJECT,
                map: STATS,
            });
        };
        let mapped_len = capacity as usize * RECORD;
        // SAFETY: a BPF_F_MMAPABLE array's descriptor maps its values, `max_entries` of them
        // back to back (kernel/bpf/arraymap.c, array_map_mmap()); read-only and shared, so the
        // program's stores show here.
        let records = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if records == libc::MAP_FAILED {
            return Err(Error::IteratorLoad {
                action: "mapping CGROUP_STATS",
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            _ebpf: ebpf,
            program_fd,
            records: records as *const CgroupStat,
            mapped_len,
            capacity,
        })
    }

    /// An iterator over the cgroup at `root` (the root of a hierarchy, or any cgroup directory)
    /// and everything below it.
    pub fn attach(&self, root: &Path) -> Result<Tree, Error> {
        let dir = File::open(root).map_err(|source| Error::OpenCgroup {
            path: root.to_owned(),
            source,
        })?;
        let info = CgroupIterInfo {
            order: BPF_CGROUP_ITER_DESCENDANTS_PRE,
            cgroup_fd: dir.as_raw_fd() as u32,
            cgroup_id: 0,
        };
        let mut attr = LinkCreate {
            prog_fd: self.program_fd.as_fd().as_raw_fd() as u32,
            attach_type: BPF_TRACE_ITER,
            iter_info: &info as *const CgroupIterInfo as u64,
            iter_info_len: std::mem::size_of::<CgroupIterInfo>() as u32,
            ..LinkCreate::default()
        };
        let link = bpf(BPF_LINK_CREATE, &mut attr).map_err(|source| Error::Iterator {
            root: root.to_owned(),
            action: "attaching",
            source,
        })?;
        Ok(Tree {
            root: root.to_owned(),
            link,
        })
    }
}

impl Tree {
    /// The directory the iterator starts at.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl CgroupStats {
    /// Runs one walk of `tree`: every cgroup in it, parents first, into `out` (cleared first).
    pub fn read(&self, tree: &Tree, out: &mut Vec<CgroupStat>) -> Result<Walked, Error> {
        let failed = |action: &'static str| {
            let root = tree.root.clone();
            move |source| Error::Iterator {
                root,
                action,
                source,
            }
        };
        let mut attr = IterCreate {
            link_fd: tree.link.as_raw_fd() as u32,
            ..IterCreate::default()
        };
        let mut iter = File::from(bpf(BPF_ITER_CREATE, &mut attr).map_err(failed("starting"))?);
        let mut count = [0u8; 8];
        let mut len = 0;
        while len < count.len() {
            match iter.read(&mut count[len..]).map_err(failed("reading"))? {
                0 => break,
                n => len += n,
            }
        }
        if len != count.len() {
            return Err(failed("reading")(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the walk's count is {len} bytes, not 8"),
            )));
        }
        let cgroups = u64::from_ne_bytes(count);
        let kept = cgroups.min(u64::from(self.capacity)) as usize;
        // SAFETY: `records` maps `capacity` records and `kept` is at most that; the walk that
        // wrote them has ended (its read() returned), and every bit pattern is a valid record.
        let records = unsafe { std::slice::from_raw_parts(self.records, kept) };
        out.clear();
        out.extend_from_slice(records);
        Ok(Walked {
            cgroups,
            dropped: cgroups - kept as u64,
        })
    }

    /// How many cgroups one walk has room for.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }
}
