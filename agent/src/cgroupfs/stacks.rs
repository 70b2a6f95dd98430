//! Which block devices are stacked on others (dm, md), so that a cgroup's per-device byte
//! counts are summed once per byte.
//!
//! `io.stat` (and v1 `blkio.throttle.io_service_bytes`) list a cgroup's bytes per device, and a
//! bio sent to a dm or md device is counted there and again on each device below it, charged to
//! the same cgroup (block/blk-cgroup.c, blk_cgroup_bio_start() runs for every bio a stack
//! submits; block/bio.c, bio_clone_blkg_association()). The sum counts the devices that are not
//! stacked: those with no entries in `/sys/dev/block/MAJ:MIN/slaves`, the bottom of every stack.
//! Not the top: whether a device is stacked is fixed when its table is loaded, before it does
//! I/O, whereas whether a disk has a holder changes whenever someone builds a stack on it, and a
//! sum that dropped a disk from then on would go backwards; the bottom also keeps the I/O a
//! cgroup does on a disk directly, and is what the block-layer programs and the disk throttle
//! count (blk-mq disks, disks without slaves). A mirror (md RAID1, dm-mirror) writes each byte to
//! every disk below it, and the sum counts every copy.

use std::collections::HashMap;
use std::path::PathBuf;

/// Whether each `major:minor` seen so far is stacked, read from sysfs on first sight.
#[derive(Debug)]
pub struct Stacks {
    /// `<sys_root>/dev/block`.
    dev_block: PathBuf,
    stacked: HashMap<String, bool>,
}

impl Stacks {
    pub fn new(sys_root: &std::path::Path) -> Stacks {
        Stacks {
            dev_block: sys_root.join("dev/block"),
            stacked: HashMap::new(),
        }
    }

    /// Whether the device `dev` (`major:minor`) sits on other devices. A device sysfs does not
    /// show (gone, or an odd name) is not stacked: its bytes count.
    pub fn is_stacked(&mut self, dev: &str) -> bool {
        if let Some(&known) = self.stacked.get(dev) {
            return known;
        }
        // `dev` comes from a cgroup file: only `digits:digits` names a sysfs entry.
        let well_formed = dev.split_once(':').is_some_and(|(major, minor)| {
            [major, minor]
                .iter()
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        });
        let stacked = well_formed
            && std::fs::read_dir(self.dev_block.join(dev).join("slaves"))
                .is_ok_and(|mut d| d.next().is_some());
        self.stacked.insert(dev.to_owned(), stacked);
        stacked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_with_slaves_is_stacked_and_sysfs_is_read_once() {
        let sys = tempfile::tempdir().unwrap();
        let dev_block = sys.path().join("dev/block");
        for (dev, slaves) in [
            ("8:0", &[][..]),
            ("253:0", &["sda"][..]),
            ("9:0", &["sdb", "sdc"][..]),
        ] {
            std::fs::create_dir_all(dev_block.join(dev).join("slaves")).unwrap();
            for s in slaves {
                std::fs::create_dir(dev_block.join(dev).join("slaves").join(s)).unwrap();
            }
        }
        let mut stacks = Stacks::new(sys.path());
        let got: Vec<bool> = ["8:0", "253:0", "9:0", "8:16", "../8:0", "253:0/.."]
            .iter()
            .map(|d| stacks.is_stacked(d))
            .collect();
        assert_eq!(got, [false, true, true, false, false, false]);
        // Known devices are not looked up again.
        std::fs::remove_dir_all(&dev_block).unwrap();
        assert!(stacks.is_stacked("253:0"));
        assert!(!stacks.is_stacked("8:0"));
    }
}
