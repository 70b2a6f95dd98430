//! Tally's eBPF loader: loads the kernel-side programs, attaches them, and reads their per-cgroup
//! counters. It knows cgroup ids, pids and sockets, never containers or pods.
//!
//! The programs are compiled ahead of time (`ebpf/build.sh`) and the debug-stripped objects in
//! `ebpf/bpf/` are embedded, so building the agent needs stable Rust only. Every source is
//! optional: one that cannot load on this kernel is reported as down with the reason, and the rest
//! of the agent keeps running.

pub mod cgstat;
pub mod disk;
pub mod lifecycle;
pub mod net;
mod source;
pub mod stats;
pub mod tcp;
pub mod throttle;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub use tally_ebpf_common::NO_VALUE;
pub use tally_ebpf_common::{direction, scope, CgroupKey, NetKey, NetValue, ALL_SCOPES};
pub use tally_ebpf_common::{CgroupStat, DiskValue, ExitValue, TcpValue, DISK_LATENCY_BUCKETS};

/// The Rust programs (`ebpf/programs`), built by `ebpf/build.sh`.
pub static TALLY_OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/tally.bpf.o");

/// The C CO-RE TCP programs (`ebpf/c/tcp.bpf.c`), built by `ebpf/build.sh`.
pub static TCP_OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/tcp.bpf.o");

/// The C CO-RE block I/O programs (`ebpf/c/disk.bpf.c`), built by `ebpf/build.sh`.
pub static DISK_OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/disk.bpf.o");

/// The C CO-RE cgroup and task lifecycle programs (`ebpf/c/lifecycle.bpf.c`), built by
/// `ebpf/build.sh`.
pub static LIFECYCLE_OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/lifecycle.bpf.o");

/// The C CO-RE cgroup iterator (`ebpf/c/cgstat.bpf.c`), built by `ebpf/build.sh`.
pub static CGSTAT_OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/cgstat.bpf.o");

/// The attach methods a tracing source may use, best first (`ProbeStatus::method`, and the names
/// `TcpConfig::disabled_methods` / `DiskConfig::disabled_methods` take). A source offers the ones
/// it has programs for.
pub const ATTACH_METHODS: [&str; 5] =
    ["fentry", "tp_btf", "raw_tracepoint", "tracepoint", "kprobe"];

/// The cgroup id of a cgroup v2 directory: its kernfs inode number, the same number
/// `bpf_get_current_cgroup_id()` returns for tasks inside it (kernel/cgroup/cgroup.c,
/// `cgroup_id()` is `kernfs_node` id, which `kernfs_ino()` exposes as the inode).
pub fn cgroup_id(dir: &Path) -> std::io::Result<u64> {
    Ok(std::fs::metadata(dir)?.ino())
}

/// What went wrong loading or using a BPF source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading BPF object {object}")]
    Load {
        object: &'static str,
        #[source]
        source: aya::EbpfError,
    },
    #[error("BPF object {object} has no program `{program}`")]
    MissingProgram {
        object: &'static str,
        program: &'static str,
    },
    #[error("BPF object {object} has no map `{map}`")]
    MissingMap {
        object: &'static str,
        map: &'static str,
    },
    #[error("program `{program}`: {action}")]
    Program {
        program: &'static str,
        action: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map `{map}`: {action}")]
    Map {
        map: &'static str,
        action: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("egress limit of cgroup {cgroup_id} on {}: {reason}", scope_name(*scope))]
    InvalidEgressLimit {
        cgroup_id: u64,
        scope: Option<u32>,
        reason: &'static str,
    },
    #[error("map `{map}` is full ({max_entries} entries)")]
    MapFull { map: &'static str, max_entries: u32 },
    #[error("opening cgroup {path}")]
    OpenCgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup iterator: {action}")]
    IteratorLoad {
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup iterator at {root}: {action}")]
    Iterator {
        root: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("enabling bpf_stats")]
    Stats(#[source] aya::sys::SyscallError),
    /// The C CO-RE objects cannot be relocated without it.
    #[error("reading kernel BTF (/sys/kernel/btf/vmlinux)")]
    KernelBtf {
        #[source]
        source: aya::BtfError,
    },
}

fn scope_name(scope: Option<u32>) -> String {
    match scope {
        Some(s) => format!("scope {s}"),
        None => "all scopes".to_owned(),
    }
}

/// Whether a measurement works, and how: one row of `tally_probe_up{probe,method}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeStatus {
    pub probe: &'static str,
    /// The attach method in use, or the best one tried when none loaded.
    pub method: &'static str,
    pub up: bool,
    /// Why it is down (every method tried, in order).
    pub error: Option<String>,
}

/// Runtime statistics of one loaded program (`bpf_stats`; zero while stats are off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramStats {
    pub program: &'static str,
    pub run_time_ns: u64,
    pub run_count: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_id_is_the_inode_and_errors_name_missing_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let id = cgroup_id(dir.path()).unwrap();
        assert_eq!(id, std::fs::metadata(dir.path()).unwrap().ino());
        let err = cgroup_id(&dir.path().join("gone")).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn the_embedded_object_is_a_bpf_elf() {
        assert_eq!(&TALLY_OBJECT[..4], b"\x7fELF");
        // e_machine at offset 18: EM_BPF = 247.
        assert_eq!(
            u16::from_le_bytes([TALLY_OBJECT[18], TALLY_OBJECT[19]]),
            247
        );
    }

    /// aya creates every map of an object it loads, so a benchmark map left in the production
    /// object would cost every node its memory. The names are in the symbol table and `.BTF`.
    #[test]
    fn the_embedded_object_has_no_benchmark_programs_or_maps() {
        for name in [&b"bench_empty"[..], b"bench_counter", b"BENCH_COUNTS"] {
            assert!(
                !TALLY_OBJECT.windows(name.len()).any(|w| w == name),
                "{} is in tally.bpf.o",
                String::from_utf8_lossy(name)
            );
        }
        // The search itself finds what is there.
        assert!(TALLY_OBJECT.windows(10).any(|w| w == b"net_egress"));
    }
}
