//! Tally's eBPF loader: loads the kernel-side programs, attaches them, and reads their per-cgroup
//! counters. It knows cgroup ids, pids and sockets, never containers or pods.
//!
//! Until the programs land, this crate provides the one fact both sides share: how a cgroup
//! directory maps to the id the kernel reports for it.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

pub use tally_ebpf_common::CgroupKey;

/// The cgroup id of a cgroup v2 directory: its kernfs inode number, the same number
/// `bpf_get_current_cgroup_id()` returns for tasks inside it (kernel/cgroup/cgroup.c,
/// `cgroup_id()` is `kernfs_node` id, which `kernfs_ino()` exposes as the inode).
pub fn cgroup_id(dir: &Path) -> std::io::Result<u64> {
    Ok(std::fs::metadata(dir)?.ino())
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
}
