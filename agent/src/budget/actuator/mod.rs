//! The actuators: each turns a throttle the engine wants into changes on the node, undoes them,
//! and owns what that takes (the freeze cycle, the BPF egress map, the sysfs root). A throttle
//! is planned first (the originals read) so the state file records how to undo it before
//! anything is applied.
//!
//! A throttle never loosens what was already there: a pod whose CPU limit is below the budget's
//! keeps its own limit, and release writes back exactly what was read.

mod cpu;
mod egress;
mod freeze;
mod io;
mod terminate;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use egress::EgressMap;
pub(crate) use io::whole_disks;

use super::freeze::CycleError;
use super::state::{Egress, FileWrite, Throttle};
use crate::config::policy::Action;
use crate::config::Config;
use crate::host::layout::Layout;

/// Why a throttle cannot be planned or applied on a workload's cgroup files.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
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

fn refused_list(refused: &[(i32, std::io::Error)]) -> String {
    let each: Vec<String> = refused
        .iter()
        .map(|(pid, e)| format!("{pid}: {e}"))
        .collect();
    each.join(", ")
}

/// Why a throttle could not be planned, applied or released, whichever actuator it is.
#[derive(Debug, thiserror::Error)]
pub enum ActuatorError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Freeze(#[from] crate::budget::freeze::FreezeError),
    #[error(transparent)]
    Egress(#[from] tally_ebpf::Error),
    #[error("no freeze file")]
    NoFreezeFile,
    #[error("the network programs are not loaded")]
    NoNetworkPrograms,
    #[error("the workload has no cgroup2 directory for the egress program")]
    NoCgroup2,
    #[error("the egress limit was recorded without its cgroup's level (a state file from before levels were kept); it is released, not applied")]
    NoCgroupLevel,
    #[error("the workload's cgroup lies at level {0}, deeper than the egress program's 31")]
    TooDeep(usize),
    /// Some block devices refused their rule; the others have it.
    #[error("{} of {of} block device rules not written: {}", failed.len(), device_list(failed))]
    Devices { failed: Vec<CgroupError>, of: usize },
}

fn device_list(failed: &[CgroupError]) -> String {
    let each: Vec<String> = failed.iter().map(|e| tally_error_chain::chain(e)).collect();
    each.join("; ")
}

/// Where a throttle goes: the workload's cgroup, as the tick found it.
#[derive(Debug, Clone, Copy)]
pub struct Site<'a> {
    pub dirs: &'a CgroupDirs,
    /// The workload's path below each hierarchy root, starting with `/`.
    pub rel: &'a str,
    /// The cgroup2 id, when the workload has a cgroup2 directory.
    pub v2_id: Option<u64>,
    /// The network scope index of an egress throttle (all scopes when `None`).
    pub scope: Option<u32>,
}

/// What a throttle will change, recorded in the state file before it is applied.
#[derive(Debug, Default)]
pub struct Plan {
    /// cgroupfs files to write, with what they held before.
    pub writes: Vec<FileWrite>,
    /// The freeze file to duty-cycle.
    pub freeze: Option<PathBuf>,
    /// The egress limit to set in the BPF map.
    pub egress: Option<Egress>,
}

/// One kind of throttle.
pub trait Actuator: std::fmt::Debug + Send {
    /// What throttling `site` to `setting` (cores, bytes per second, running share) changes,
    /// read before anything is written.
    fn plan(&self, site: Site<'_>, setting: f64) -> Result<Plan, ActuatorError>;

    /// Puts a recorded throttle in place at `setting`. `new` is the workload when the throttle
    /// was not in force before (not a changed setting, not a re-arm).
    fn apply(
        &mut self,
        throttle: &Throttle,
        setting: f64,
        new: Option<Site<'_>>,
    ) -> Result<(), ActuatorError>;

    /// Whether a throttle in force at `setting` must be applied again: a restart adopted its
    /// record, not its effect.
    fn needs_reapply(&self, _throttle: &Throttle, _setting: f64) -> bool {
        false
    }

    /// Undoes what only the running agent holds. The cgroupfs files the record lists are
    /// restored from the record (`state::release_files`), as `tally release` does.
    fn release(&mut self, _throttle: &Throttle) -> Result<(), ActuatorError> {
        Ok(())
    }

    /// Reads the kernel's counts `held_back` answers from, once a tick.
    fn refresh(&mut self) {}

    /// The kernel's running count of times the throttle held its workload back (CFS throttled
    /// periods, dropped packets), where it keeps one.
    fn held_back(&self, _throttle: &Throttle) -> Option<u64> {
        None
    }
}

/// Every actuator, one per enforcing action.
#[derive(Debug)]
pub struct Actuators {
    cpu: cpu::Cpu,
    io: io::Io,
    freeze: freeze::Freeze,
    egress: egress::EgressLimit,
    terminate: terminate::Terminate,
}

impl Actuators {
    pub fn new(config: &Config) -> Actuators {
        Actuators {
            cpu: cpu::Cpu,
            io: io::Io::new(config.paths.sys_root.clone()),
            freeze: freeze::Freeze::new(config),
            egress: egress::EgressLimit::default(),
            terminate: terminate::Terminate,
        }
    }

    /// Takes a reloaded configuration's sysfs root and freeze period.
    pub fn reconfigure(&mut self, config: &Config) {
        self.io.set_sys_root(config.paths.sys_root.clone());
        self.freeze.reconfigure(config);
    }

    /// Gives the egress actuator the BPF map it limits through.
    pub fn set_egress_map(&mut self, map: Box<dyn EgressMap>) {
        self.egress.set_map(map);
    }

    /// The actuator of `action`; `None` for `alert`, which throttles nothing.
    pub fn get(&self, action: Action) -> Option<&dyn Actuator> {
        Some(match action {
            Action::Alert => return None,
            Action::Cpu => &self.cpu,
            Action::Disk => &self.io,
            Action::Freeze => &self.freeze,
            Action::Network => &self.egress,
            Action::Terminate => &self.terminate,
        })
    }

    pub fn get_mut(&mut self, action: Action) -> Option<&mut dyn Actuator> {
        Some(match action {
            Action::Alert => return None,
            Action::Cpu => &mut self.cpu,
            Action::Disk => &mut self.io,
            Action::Freeze => &mut self.freeze,
            Action::Network => &mut self.egress,
            Action::Terminate => &mut self.terminate,
        })
    }

    /// Reads the kernel counts of every actuator that keeps one.
    pub fn refresh(&mut self) {
        for action in ACTIONS {
            if let Some(a) = self.get_mut(action) {
                a.refresh();
            }
        }
    }

    /// Write failures of the freeze cycle since the last call, by freeze file.
    pub fn freeze_failures(&self) -> HashMap<PathBuf, CycleError> {
        self.freeze.take_failures()
    }

    /// Thaws everything the freeze cycle holds and stops it.
    pub fn stop(&mut self) {
        self.freeze.stop();
    }
}

/// The actions that throttle.
const ACTIONS: [Action; 5] = [
    Action::Cpu,
    Action::Disk,
    Action::Freeze,
    Action::Network,
    Action::Terminate,
];

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
    pub fn freeze_file(&self) -> Result<PathBuf, CgroupError> {
        if let Some(dir) = &self.unified {
            let f = dir.join("cgroup.freeze");
            if f.is_file() {
                return Ok(f);
            }
        }
        if let Some(dir) = &self.freezer {
            return Ok(dir.join("freezer.state"));
        }
        Err(CgroupError::NoFreezer)
    }

    /// Every process of the workload (from the first hierarchy that has it).
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let dir = [&self.unified, &self.cpu, &self.freezer, &self.blkio]
            .into_iter()
            .flatten()
            .next()
            .ok_or(CgroupError::NoCgroup)?;
        let procs = read(&dir.join("cgroup.procs"))?;
        Ok(procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Writes every planned value, in order.
/// Writes every file, each on its own whatever the others do, and returns the failures.
pub fn write_each(writes: &[FileWrite]) -> Vec<CgroupError> {
    writes
        .iter()
        .filter_map(|w| {
            std::fs::write(&w.path, &w.applied)
                .err()
                .map(|source| CgroupError::Write {
                    path: w.path.clone(),
                    value: w.applied.clone(),
                    source,
                })
        })
        .collect()
}

pub fn write_all(writes: &[FileWrite]) -> Result<(), CgroupError> {
    for w in writes {
        std::fs::write(&w.path, &w.applied).map_err(|source| CgroupError::Write {
            path: w.path.clone(),
            value: w.applied.clone(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::cpu::plan_cpu;
    use super::io::plan_disk;
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
            tally_error_chain::chain(&e),
            format!(
                "reading {}: No such file or directory (os error 2)",
                file.display()
            )
        );
        let e = CgroupError::SigtermRefused {
            sent: 2,
            refused: vec![(7, std::io::Error::from_raw_os_error(libc::EPERM))],
        };
        assert_eq!(
            e.to_string(),
            "SIGTERM refused for 1 of 3 processes (7: Operation not permitted (os error 1)); \
             the agent needs CAP_KILL"
        );
    }

    /// A `<root>/sys` whose `block/` lists `(name, major:minor)` devices of 1 GiB.
    fn block_devices(root: &Path, devices: &[(&str, &str)]) -> PathBuf {
        let sys = root.join("sys");
        for (name, dev) in devices {
            std::fs::create_dir_all(sys.join("block").join(name)).unwrap();
            std::fs::write(sys.join("block").join(name).join("dev"), dev).unwrap();
            std::fs::write(sys.join("block").join(name).join("size"), "2097152\n").unwrap();
        }
        sys
    }

    #[test]
    fn disk_rules_per_whole_disk_with_removable_originals() {
        let root = tempfile::tempdir().unwrap();
        let sys = block_devices(root.path(), &[("vda", "254:0"), ("loop0", "7:0")]);
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

    #[test]
    fn io_max_keeps_a_tighter_limit_and_restores_the_line_found() {
        let root = tempfile::tempdir().unwrap();
        let sys = block_devices(root.path(), &[("vda", "254:0"), ("vdb", "254:16")]);
        let d = dirs(root.path());
        std::fs::create_dir_all(root.path().join("unified")).unwrap();
        let found = "254:0 rbps=500 wbps=max riops=max wiops=40";
        std::fs::write(root.path().join("unified/io.max"), format!("{found}\n")).unwrap();
        let w = plan_disk(&d, &sys, 1e6).unwrap();
        let got: Vec<(&str, &str)> = w
            .iter()
            .map(|w| (w.original.as_str(), w.applied.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (found, "254:0 rbps=500 wbps=1000000"),
                (
                    "254:16 rbps=max wbps=max riops=max wiops=max",
                    "254:16 rbps=1000000 wbps=1000000"
                )
            ]
        );
    }
}
