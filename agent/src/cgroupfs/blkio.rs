//! v1 `blkio.throttle.io_service_bytes` counts only on disks where blk-throttle is active, and
//! the kernel activates it lazily, on the first rule written for a disk in any cgroup
//! (block/blk-throttle.c, Linux ≥ 6.9: `tg_set_conf()` calls `blk_throtl_init()`, and
//! `blk_throtl_bio()` returns before counting while `!blk_throtl_activated()`). On a node where
//! nobody ever throttled a disk, every v1 cgroup reads 0 bytes for it, and a disk budget would
//! never see its workload write.
//!
//! So the collector activates it on each disk the disk throttle would limit: it writes
//! `MAJ:MIN 0` ("no limit") to the root cgroup's `blkio.throttle.read_bps_device`. That sets no
//! rule; a disk that already has a root rule is left alone (writing would remove the rule). New
//! disks are picked up when the collector looks again. Activation costs each bio on the disk a
//! throttle-group lookup, as any throttle rule on the node would.

use std::collections::BTreeSet;
use std::path::Path;

use tally_error_chain::chain;

use crate::errors::ErrorCounts;

/// The root rule file written to activate a disk.
const RULES: &str = "blkio.throttle.read_bps_device";

/// The disks activated so far.
#[derive(Debug, Default)]
pub(super) struct Activation {
    done: BTreeSet<String>,
}

impl Activation {
    /// Activates blk-throttle on each of `disks` (`major:minor`) not done yet, through the root
    /// of the v1 blkio hierarchy at `root`. A refused write is counted
    /// (`tally_collector_errors_total{collector="cgroupfs",reason="blkio_activate"}`) and tried
    /// again next time.
    pub(super) fn run(&mut self, root: &Path, disks: &[String], errors: &mut ErrorCounts) {
        let rules = root.join(RULES);
        let existing = std::fs::read_to_string(&rules).unwrap_or_default();
        for disk in disks {
            if self.done.contains(disk) {
                continue;
            }
            let ruled = existing
                .lines()
                .any(|l| l.split_whitespace().next() == Some(disk.as_str()));
            if !ruled {
                if let Err(e) = std::fs::write(&rules, format!("{disk} 0")) {
                    errors.record(super::COLLECTOR, "blkio_activate", || {
                        format!("{}: writing `{disk} 0`: {}", rules.display(), chain(&e))
                    });
                    continue;
                }
                tracing::info!(
                    disk,
                    "blk-throttle activated, so v1 blkio counts this disk's bytes"
                );
            }
            self.done.insert(disk.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::agent::COLLECTOR_ERRORS;

    #[test]
    fn each_disk_is_activated_once_and_a_root_rule_is_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let rules = root.path().join(RULES);
        // 8:0 already has a root rule: writing `8:0 0` would remove it.
        std::fs::write(&rules, "8:0 1048576\n").unwrap();
        let mut activation = Activation::default();
        let mut errors = ErrorCounts::default();
        let disks = ["8:0".to_owned(), "254:0".to_owned()];
        activation.run(root.path(), &disks, &mut errors);
        // A plain file keeps the last write: the one activation of 254:0.
        assert_eq!(std::fs::read_to_string(&rules).unwrap(), "254:0 0");
        std::fs::write(&rules, "").unwrap();
        activation.run(root.path(), &disks, &mut errors);
        assert_eq!(std::fs::read_to_string(&rules).unwrap(), "", "done once");
        assert_eq!(
            errors.count(&COLLECTOR_ERRORS, &["cgroupfs", "blkio_activate"]),
            1,
            "no failure before this count"
        );
    }

    #[test]
    fn a_refused_write_is_counted_and_tried_again() {
        let root = tempfile::tempdir().unwrap();
        // A directory in the rule file's place refuses the write.
        std::fs::create_dir(root.path().join(RULES)).unwrap();
        let mut activation = Activation::default();
        let mut errors = ErrorCounts::default();
        let disks = ["254:0".to_owned()];
        activation.run(root.path(), &disks, &mut errors);
        activation.run(root.path(), &disks, &mut errors);
        assert_eq!(
            errors.count(&COLLECTOR_ERRORS, &["cgroupfs", "blkio_activate"]),
            3,
            "two refusals before this count"
        );
        std::fs::remove_dir(root.path().join(RULES)).unwrap();
        activation.run(root.path(), &disks, &mut errors);
        assert_eq!(
            std::fs::read_to_string(root.path().join(RULES)).unwrap(),
            "254:0 0"
        );
    }
}
