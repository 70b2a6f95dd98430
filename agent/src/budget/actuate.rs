//! The cgroupfs actuators: what to write where for a CPU or disk throttle, planned (originals
//! read) before anything is written so the state file can record how to undo it.
//!
//! A throttle never loosens what was already there: a pod whose CPU limit is below the budget's
//! keeps its own limit, and release writes back exactly what was read.

use std::path::{Path, PathBuf};

use super::state::FileWrite;
use crate::cgroupfs::layout::Layout;

/// The CFS period Tally writes when the cgroup has none of its own (the kernel default).
const DEFAULT_PERIOD_US: u64 = 100_000;
/// The smallest quota the kernel accepts.
const MIN_QUOTA_US: u64 = 1_000;

/// Why a throttle cannot be planned or applied on a workload's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum ActuateError {
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("listing {}", dir.display())]
    List {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing `{value}` to {}", path.display())]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the workload's cgroup has neither cgroup.freeze (v2) nor a v1 freezer")]
    NoFreezer,
    #[error("the workload has no cgroup directory")]
    NoCgroup,
    #[error(
        "no CPU bandwidth control for the workload's cgroup (no cpu.max, no v1 cpu controller)"
    )]
    NoCpuControl,
    #[error("no block I/O control for the workload's cgroup (no io.max, no v1 blkio)")]
    NoIoControl,
    #[error("no block devices under {}", dir.display())]
    NoBlockDevices { dir: PathBuf },
    /// Some processes did not take SIGTERM (the others did).
    #[error(
        "SIGTERM refused for {} of {} processes ({}); the agent needs CAP_KILL",
        refused.len(),
        refused.len() + sent,
        refused_list(refused)
    )]
    SigtermRefused {
        sent: usize,
        refused: Vec<(i32, std::io::Error)>,
    },
}

/// Why a throttle could not be planned, applied or released, whichever actuator it is.
#[derive(Debug, thiserror::Error)]
pub enum ActuatorError {
    #[error(transparent)]
    Cgroup(#[from] ActuateError),
    #[error(transparent)]
    Freeze(#[from] super::freeze::FreezeError),
    #[error(transparent)]
    Egress(#[from] tally_ebpf::Error),
    #[error("no freeze file")]
    NoFreezeFile,
    #[error("the network programs are not loaded")]
    NoNetworkPrograms,
    #[error("the workload has no cgroup2 directory for the egress program")]
    NoCgroup2,
}

fn refused_list(refused: &[(i32, std::io::Error)]) -> String {
    let each: Vec<String> = refused
        .iter()
        .map(|(pid, e)| format!("{pid}: {e}"))
        .collect();
    each.join(", ")
}

/// Where a workload's cgroup is in each hierarchy.
#[derive(Debug, Clone)]
pub struct CgroupDirs {
    pub unified: Option<PathBuf>,
    pub cpu: Option<PathBuf>,
    pub blkio: Option<PathBuf>,
    pub freezer: Option<PathBuf>,
}

impl CgroupDirs {
    /// `rel` is the path below each hierarchy root, starting with `/`.
    pub fn new(layout: &Layout, rel: &str) -> CgroupDirs {
        let at = |root: &Option<PathBuf>| {
            root.as_ref()
                .map(|r| r.join(rel.trim_start_matches('/')))
                .filter(|p| p.is_dir())
        };
        CgroupDirs {
            unified: at(&layout.unified),
            cpu: at(&layout.cpu),
            blkio: at(&layout.blkio),
            freezer: at(&layout.freezer),
        }
    }

    /// The file that freezes the cgroup: `cgroup.freeze` where cgroup2 has it, else v1's
    /// `freezer.state`.
    pub fn freeze_file(&self) -> Result<PathBuf, ActuateError> {
        if let Some(dir) = &self.unified {
            let f = dir.join("cgroup.freeze");
            if f.is_file() {
                return Ok(f);
            }
        }
        if let Some(dir) = &self.freezer {
            return Ok(dir.join("freezer.state"));
        }
        Err(ActuateError::NoFreezer)
    }

    /// Every process of the workload (from the first hierarchy that has it).
    pub fn pids(&self) -> Result<Vec<i32>, ActuateError> {
        let dir = [&self.unified, &self.cpu, &self.freezer, &self.blkio]
            .into_iter()
            .flatten()
            .next()
            .ok_or(ActuateError::NoCgroup)?;
        let procs = read(&dir.join("cgroup.procs"))?;
        Ok(procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }
}

fn read(path: &Path) -> Result<String, ActuateError> {
    std::fs::read_to_string(path).map_err(|source| ActuateError::Read {
        path: path.to_owned(),
        source,
    })
}

/// CPU bandwidth of `cores`: `cpu.max` on cgroup2 where the cpu controller is enabled, else
/// the v1 `cpu.cfs_quota_us`.
pub fn plan_cpu(dirs: &CgroupDirs, cores: f64) -> Result<Vec<FileWrite>, ActuateError> {
    if let Some(dir) = &dirs.unified {
        let file = dir.join("cpu.max");
        if file.is_file() {
            let original = read(&file)?;
            let mut fields = original.split_whitespace();
            let quota = fields.next().unwrap_or("max");
            let period: u64 = fields
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(DEFAULT_PERIOD_US);
            let ours = quota_us(cores, period);
            let applied = match quota.parse::<u64>() {
                Ok(existing) if existing <= ours => existing,
                _ => ours,
            };
            return Ok(vec![FileWrite {
                path: file,
                original: original.trim().to_owned(),
                applied: format!("{applied} {period}"),
            }]);
        }
    }
    if let Some(dir) = &dirs.cpu {
        let file = dir.join("cpu.cfs_quota_us");
        let original = read(&file)?;
        let period: u64 = read(&dir.join("cpu.cfs_period_us"))?
            .trim()
            .parse()
            .unwrap_or(DEFAULT_PERIOD_US);
        let ours = quota_us(cores, period);
        let applied = match original.trim().parse::<i64>() {
            Ok(existing) if existing > 0 && (existing as u64) <= ours => existing as u64,
            _ => ours,
        };
        return Ok(vec![FileWrite {
            path: file,
            original: original.trim().to_owned(),
            applied: applied.to_string(),
        }]);
    }
    Err(ActuateError::NoCpuControl)
}

fn quota_us(cores: f64, period: u64) -> u64 {
    ((cores * period as f64).round() as u64).max(MIN_QUOTA_US)
}

/// Block I/O of `bytes_per_sec` per device, reads and writes each, on every whole disk of the
/// node: `io.max` on cgroup2 where the io controller is enabled, else v1 blkio throttle rules.
pub fn plan_disk(
    dirs: &CgroupDirs,
    sys_root: &Path,
    bytes_per_sec: f64,
) -> Result<Vec<FileWrite>, ActuateError> {
    let devices = whole_disks(sys_root)?;
    if devices.is_empty() {
        return Err(ActuateError::NoBlockDevices {
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
                        applied: format!("{dev} rbps={bps} wbps={bps}"),
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
    Err(ActuateError::NoIoControl)
}

/// `major:minor` of every whole disk that is a real device (not loop, ram or zram: they have
/// no `device` link), falling back to every disk when none has one (virtual machines).
fn whole_disks(sys_root: &Path) -> Result<Vec<String>, ActuateError> {
    let block = sys_root.join("block");
    let entries = std::fs::read_dir(&block).map_err(|source| ActuateError::List {
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

/// Writes every planned value, in order.
pub fn apply(writes: &[FileWrite]) -> Result<(), ActuateError> {
    for w in writes {
        std::fs::write(&w.path, &w.applied).map_err(|source| ActuateError::Write {
            path: w.path.clone(),
            value: w.applied.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Sends SIGTERM to every process of the workload; returns how many got it.
pub fn terminate(dirs: &CgroupDirs) -> Result<usize, ActuateError> {
    let mut sent = 0;
    let mut refused = Vec::new();
    for pid in dirs.pids()? {
        // SAFETY: kill takes plain integers.
        if unsafe { libc::kill(pid, libc::SIGTERM) } == 0 {
            sent += 1;
        } else {
            let e = std::io::Error::last_os_error();
            // A process that exited meanwhile is no failure.
            if e.raw_os_error() != Some(libc::ESRCH) {
                refused.push((pid, e));
            }
        }
    }
    if refused.is_empty() {
        Ok(sent)
    } else {
        Err(ActuateError::SigtermRefused { sent, refused })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(root: &Path) -> CgroupDirs {
        CgroupDirs {
            unified: Some(root.join("unified")),
            cpu: Some(root.join("cpu")),
            blkio: Some(root.join("blkio")),
            freezer: None,
        }
    }

    #[test]
    fn cpu_prefers_cgroup2_and_keeps_a_tighter_existing_limit() {
        let root = tempfile::tempdir().unwrap();
        let d = dirs(root.path());
        std::fs::create_dir_all(root.path().join("unified")).unwrap();
        std::fs::create_dir_all(root.path().join("cpu")).unwrap();
        std::fs::write(root.path().join("cpu/cpu.cfs_quota_us"), "-1\n").unwrap();
        std::fs::write(root.path().join("cpu/cpu.cfs_period_us"), "100000\n").unwrap();
        let w = plan_cpu(&d, 0.3).unwrap();
        assert_eq!(w[0].original, "-1");
        assert_eq!(w[0].applied, "30000");

        std::fs::write(root.path().join("unified/cpu.max"), "20000 50000\n").unwrap();
        let w = plan_cpu(&d, 0.3).unwrap();
        assert_eq!(w[0].path, root.path().join("unified/cpu.max"));
        assert_eq!(w[0].original, "20000 50000");
        assert_eq!(w[0].applied, "15000 50000");
        let w = plan_cpu(&d, 0.5).unwrap();
        assert_eq!(w[0].applied, "20000 50000", "a tighter pod limit stays");
    }

    #[test]
    fn errors_chain_to_the_lines_the_log_had() {
        let root = tempfile::tempdir().unwrap();
        let e = plan_cpu(&dirs(root.path()), 0.5).unwrap_err();
        let file = root.path().join("cpu/cpu.cfs_quota_us");
        assert_eq!(
            tally_ebpf::chain(&e),
            format!(
                "reading {}: No such file or directory (os error 2)",
                file.display()
            )
        );
        let e = ActuateError::SigtermRefused {
            sent: 2,
            refused: vec![(7, std::io::Error::from_raw_os_error(libc::EPERM))],
        };
        assert_eq!(
            e.to_string(),
            "SIGTERM refused for 1 of 3 processes (7: Operation not permitted (os error 1)); \
             the agent needs CAP_KILL"
        );
    }

    #[test]
    fn disk_rules_per_whole_disk_with_removable_originals() {
        let root = tempfile::tempdir().unwrap();
        let sys = root.path().join("sys");
        for (name, dev) in [("vda", "254:0"), ("loop0", "7:0")] {
            std::fs::create_dir_all(sys.join("block").join(name)).unwrap();
            std::fs::write(sys.join("block").join(name).join("dev"), dev).unwrap();
        }
        let d = CgroupDirs {
            unified: None,
            ..dirs(root.path())
        };
        std::fs::create_dir_all(root.path().join("blkio")).unwrap();
        std::fs::write(root.path().join("blkio/blkio.throttle.read_bps_device"), "").unwrap();
        std::fs::write(
            root.path().join("blkio/blkio.throttle.write_bps_device"),
            "254:0 500\n",
        )
        .unwrap();
        let w = plan_disk(&d, &sys, 1e6).unwrap();
        let got: Vec<(&str, &str)> = w
            .iter()
            .map(|w| (w.original.as_str(), w.applied.as_str()))
            .collect();
        assert_eq!(
            got,
            [("254:0 0", "254:0 1000000"), ("254:0 500", "254:0 500")]
        );
    }
}
