//! Block I/O rate: `io.max` on cgroup2 where the io controller is enabled, else v1 blkio
//! throttle rules, on every whole disk of the node that holds data of its own.
//!
//! Which block devices get a rule is decided from sysfs (`<sys>/block/<name>/`): not loop, ram
//! or zram devices (memory, or a file whose disk is throttled itself), not optical drives
//! (`sr*`), not devices of size 0 (an nbd device with no server, a drive with no medium: the
//! kernel refuses rules on them), and not stacked devices, those with entries in `slaves/` (dm,
//! md). The kernel allows io.max on a dm device, but a bio throttled there is throttled again on
//! the disk below, charged to the same cgroup (block/bio.c, bio_clone_blkg_association()), so a
//! stack would be throttled twice and a rule on the stack alone would miss direct I/O to the
//! disks; the disks at the bottom of every stack carry the rule instead.

use std::path::{Path, PathBuf};

use super::{read, write_each, Actuator, ActuatorError, CgroupDirs, CgroupError, Plan, Site};
use crate::budget::state::{FileWrite, Throttle};

#[derive(Debug)]
pub(super) struct Io {
    /// Where the block devices are listed (`<sys_root>/block`).
    sys_root: PathBuf,
}

impl Io {
    pub(super) fn new(sys_root: PathBuf) -> Io {
        Io { sys_root }
    }

    pub(super) fn set_sys_root(&mut self, sys_root: PathBuf) {
        self.sys_root = sys_root;
    }
}

impl Actuator for Io {
    fn plan(&self, site: Site<'_>, setting: f64) -> Result<Plan, ActuatorError> {
        Ok(Plan {
            writes: plan_disk(site.dirs, &self.sys_root, setting)?,
            ..Plan::default()
        })
    }

    /// Writes every device's rule, each on its own: one device refusing its rule leaves the
    /// others limited, and the refusals are returned together.
    fn apply(&mut self, t: &Throttle, _: f64, _: Option<Site<'_>>) -> Result<(), ActuatorError> {
        let failed = write_each(&t.writes);
        if failed.is_empty() {
            return Ok(());
        }
        Err(ActuatorError::Devices {
            failed,
            of: t.writes.len(),
        })
    }
}

/// Block I/O of `bytes_per_sec` per device, reads and writes each, on every whole disk of the
/// node: `io.max` on cgroup2 where the io controller is enabled, else v1 blkio throttle rules.
pub(super) fn plan_disk(
    dirs: &CgroupDirs,
    sys_root: &Path,
    bytes_per_sec: f64,
) -> Result<Vec<FileWrite>, CgroupError> {
    let devices = whole_disks(sys_root)?;
    if devices.is_empty() {
        return Err(CgroupError::NoBlockDevices {
            dir: sys_root.join("block"),
        });
    }
    let bps = (bytes_per_sec.round() as u64).max(1);
    if let Some(dir) = &dirs.unified {
        let file = dir.join("io.max");
        if file.is_file() {
            let current = read(&file)?;
            return Ok(devices
                .iter()
                .map(|dev| {
                    let line = current
                        .lines()
                        .find(|l| l.split_whitespace().next() == Some(dev.as_str()));
                    FileWrite {
                        path: file.clone(),
                        original: line.map_or_else(
                            || format!("{dev} rbps=max wbps=max riops=max wiops=max"),
                            str::to_owned,
                        ),
                        applied: format!(
                            "{dev} rbps={} wbps={}",
                            tighter(line, "rbps", bps),
                            tighter(line, "wbps", bps)
                        ),
                    }
                })
                .collect());
        }
    }
    if let Some(dir) = &dirs.blkio {
        let mut writes = Vec::new();
        for name in [
            "blkio.throttle.read_bps_device",
            "blkio.throttle.write_bps_device",
        ] {
            let file = dir.join(name);
            let current = read(&file)?;
            for dev in &devices {
                let existing = current
                    .lines()
                    .find(|l| l.split_whitespace().next() == Some(dev.as_str()));
                let applied = match existing.and_then(|l| l.split_whitespace().nth(1)) {
                    Some(v) => match v.parse::<u64>() {
                        Ok(n) if n > 0 && n <= bps => n,
                        _ => bps,
                    },
                    None => bps,
                };
                writes.push(FileWrite {
                    path: file.clone(),
                    // Writing a rate of 0 removes the rule.
                    original: existing.map_or_else(|| format!("{dev} 0"), str::to_owned),
                    applied: format!("{dev} {applied}"),
                });
            }
        }
        return Ok(writes);
    }
    Err(CgroupError::NoIoControl)
}

/// The `key` limit (`rbps`, `wbps`) of an `io.max` line if one is set and at most `bps`, else
/// `bps`: a throttle never loosens a tighter limit found in place.
fn tighter(line: Option<&str>, key: &str, bps: u64) -> u64 {
    line.into_iter()
        .flat_map(str::split_whitespace)
        .filter_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .find_map(|v| v.parse::<u64>().ok())
        .filter(|&n| n > 0)
        .map_or(bps, |n| n.min(bps))
}

/// `major:minor` of every whole disk that can carry a rule of its own (see the module comment),
/// sorted.
pub(crate) fn whole_disks(sys_root: &Path) -> Result<Vec<String>, CgroupError> {
    let block = sys_root.join("block");
    let entries = std::fs::read_dir(&block).map_err(|source| CgroupError::List {
        dir: block.clone(),
        source,
    })?;
    let mut disks = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        let name = entry.file_name();
        if let Some(why) = skipped(&dir, &name.to_string_lossy()) {
            tracing::debug!(device = %name.to_string_lossy(), why, "no disk throttle on this device");
            continue;
        }
        if let Ok(dev) = std::fs::read_to_string(dir.join("dev")) {
            disks.push(dev.trim().to_owned());
        }
    }
    disks.sort();
    Ok(disks)
}

/// Why the block device `name` (its sysfs directory `dir`) gets no rule, or `None` when it does.
fn skipped(dir: &Path, name: &str) -> Option<&'static str> {
    if ["loop", "ram", "zram"].iter().any(|p| name.starts_with(p)) {
        return Some("virtual");
    }
    if name.starts_with("sr") {
        return Some("optical");
    }
    // 512-byte sectors; a device whose size cannot be read is left out too.
    let size = std::fs::read_to_string(dir.join("size")).ok();
    if size.and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0) == 0 {
        return Some("empty");
    }
    let stacked = std::fs::read_dir(dir.join("slaves")).is_ok_and(|mut d| d.next().is_some());
    if stacked {
        return Some("stacked");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::state::FileWrite;
    use crate::config::policy::Action;

    /// `<sys>/block/<name>` with `dev`, `size` (sectors) and `slaves/` holding `slaves`.
    fn device(sys: &Path, name: &str, dev: &str, size: u64, slaves: &[&str]) {
        let dir = sys.join("block").join(name);
        std::fs::create_dir_all(dir.join("slaves")).unwrap();
        std::fs::write(dir.join("dev"), format!("{dev}\n")).unwrap();
        std::fs::write(dir.join("size"), format!("{size}\n")).unwrap();
        for s in slaves {
            std::fs::create_dir_all(dir.join("slaves").join(s)).unwrap();
        }
    }

    #[test]
    fn rules_go_on_the_disks_that_hold_data_at_the_bottom_of_each_stack() {
        let root = tempfile::tempdir().unwrap();
        let sys = root.path();
        device(sys, "vda", "254:0", 2048, &[]);
        device(sys, "nvme0n1", "259:0", 2048, &[]);
        device(sys, "nbd1", "43:32", 2048, &[]);
        device(sys, "loop0", "7:0", 2048, &[]);
        device(sys, "zram0", "253:0", 2048, &[]);
        device(sys, "ram0", "1:0", 2048, &[]);
        device(sys, "sr0", "11:0", 2048, &[]);
        device(sys, "nbd0", "43:0", 0, &[]);
        device(sys, "dm-0", "252:0", 2048, &["vda"]);
        device(sys, "md0", "9:0", 2048, &["nvme0n1", "nbd1"]);
        assert_eq!(whole_disks(sys).unwrap(), ["254:0", "259:0", "43:32"]);
        assert_eq!(skipped(&sys.join("block/dm-0"), "dm-0"), Some("stacked"));
        assert_eq!(skipped(&sys.join("block/nbd0"), "nbd0"), Some("empty"));
        assert_eq!(skipped(&sys.join("block/sr0"), "sr0"), Some("optical"));
        assert_eq!(skipped(&sys.join("block/loop0"), "loop0"), Some("virtual"));
        // Unreadable size: left out, not guessed.
        std::fs::remove_file(sys.join("block/nvme0n1/size")).unwrap();
        assert_eq!(whole_disks(sys).unwrap(), ["254:0", "43:32"]);
    }

    #[test]
    fn one_device_refusing_its_rule_leaves_the_others_limited() {
        let root = tempfile::tempdir().unwrap();
        let file = |name: &str| root.path().join(name);
        // A directory cannot be written: that device's rule fails.
        std::fs::create_dir(file("refuses")).unwrap();
        let write = |name: &str, applied: &str| FileWrite {
            path: file(name),
            original: String::new(),
            applied: applied.to_owned(),
        };
        let t = Throttle {
            budget: "b".to_owned(),
            subject: "w".to_owned(),
            action: Action::Disk,
            setting: 1e6,
            writes: vec![
                write("first", "254:0 rbps=1000000 wbps=1000000"),
                write("refuses", "252:0 rbps=1000000 wbps=1000000"),
                write("last", "259:0 rbps=1000000 wbps=1000000"),
            ],
            freeze: None,
            egress: None,
            applied_at: 0.0,
        };
        let e = Io::new(root.path().to_owned())
            .apply(&t, 1e6, None)
            .unwrap_err();
        let ActuatorError::Devices { failed, of } = &e else {
            panic!("{e:?}");
        };
        assert_eq!((failed.len(), *of), (1, 3));
        assert_eq!(
            e.to_string(),
            format!(
                "1 of 3 block device rules not written: writing `252:0 rbps=1000000 \
                 wbps=1000000` to {}: Is a directory (os error 21)",
                file("refuses").display()
            )
        );
        for (name, applied) in [
            ("first", "254:0 rbps=1000000 wbps=1000000"),
            ("last", "259:0 rbps=1000000 wbps=1000000"),
        ] {
            assert_eq!(std::fs::read_to_string(file(name)).unwrap(), applied);
        }
    }
}
