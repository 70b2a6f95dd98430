//! Map key and value types shared by Tally's kernel-side BPF programs and the user-space loader.
//!
//! Every type here is `#[repr(C)]`, `Copy`, built from fixed-width fields with no implicit padding,
//! so that both sides agree on the layout byte for byte. The `user` feature adds what only the
//! loader needs. The programs themselves arrive with the eBPF network and disk work.
#![no_std]

/// Key of the per-cgroup counter maps: the cgroup v2 id (`bpf_get_current_cgroup_id()`, the inode
/// of the cgroup directory).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CgroupKey {
    pub cgroup_id: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_key_has_no_padding() {
        assert_eq!(core::mem::size_of::<CgroupKey>(), 8);
    }
}
