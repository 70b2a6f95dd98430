//! Block I/O rate: `io.max` on cgroup2 where the io controller is enabled, else v1 blkio
//! throttle rules, on every whole disk of the node.

use std::path::{Path, PathBuf};

use super::{read, write_all, Actuator, ActuatorError, CgroupDirs, CgroupError, Plan, Site};
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

    fn apply(&mut self, t: &Throttle, _: f64, _: Option<Site<'_>>) -> Result<(), ActuatorError> {
        Ok(write_all(&t.writes)?)
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

/// `major:minor` of every whole disk that is a real device (not loop, ram or zram: they have
/// no `device` link), falling back to every disk when none has one (virtual machines).
fn whole_disks(sys_root: &Path) -> Result<Vec<String>, CgroupError> {
    let block = sys_root.join("block");
    let entries = std::fs::read_dir(&block).map_err(|source| CgroupError::List {
        dir: block.clone(),
        source,
    })?;
    let mut real = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if ["loop", "ram", "zram"].iter().any(|p| name.starts_with(p)) {
            continue;
        }
        if let Ok(dev) = std::fs::read_to_string(path.join("dev")) {
            real.push(dev.trim().to_owned());
        }
    }
    real.sort();
    Ok(real)
}
