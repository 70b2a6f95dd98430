//! Which cgroup hierarchies a node has and where: pure v2, hybrid (v1 controllers plus cgroup2 at
//! `unified/`), or v1 only. Detected from the configured root, so fixture trees work the same.

use std::path::{Path, PathBuf};

/// The cgroup mode of the node, as `tally check` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One cgroup2 hierarchy at the root, controllers in it.
    V2,
    /// v1 controllers under the root plus a cgroup2 hierarchy at `unified/`.
    Hybrid,
    /// v1 controllers only.
    V1,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::V2 => "v2",
            Mode::Hybrid => "hybrid",
            Mode::V1 => "v1",
        }
    }
}

/// The hierarchies the cgroupfs collector reads, by what each provides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub mode: Mode,
    /// The cgroup2 hierarchy, if any: cgroup ids, and `cpu.stat`, `memory.current`, `io.stat`
    /// where its controllers are enabled.
    pub unified: Option<PathBuf>,
    /// v1 `cpuacct` hierarchy (`cpuacct.usage`).
    pub cpuacct: Option<PathBuf>,
    /// v1 `memory` hierarchy (`memory.usage_in_bytes`).
    pub memory: Option<PathBuf>,
    /// v1 `blkio` hierarchy (`blkio.throttle.io_service_bytes`, and its throttle rules).
    pub blkio: Option<PathBuf>,
    /// v1 `cpu` hierarchy (CFS bandwidth: `cpu.cfs_quota_us`), for budget enforcement.
    pub cpu: Option<PathBuf>,
    /// v1 `freezer` hierarchy (`freezer.state`), where cgroup2 has no `cgroup.freeze`.
    pub freezer: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
#[error("no cgroup hierarchy under {root}: neither cgroup.controllers (v2), unified/cgroup.controllers (hybrid) nor a v1 cpuacct or memory controller directory")]
pub struct NoHierarchy {
    pub root: PathBuf,
}

impl Layout {
    /// Looks at `root` (normally `/sys/fs/cgroup`).
    pub fn detect(root: &Path) -> Result<Layout, NoHierarchy> {
        if root.join("cgroup.controllers").is_file() {
            return Ok(Layout {
                mode: Mode::V2,
                unified: Some(root.to_path_buf()),
                cpuacct: None,
                memory: None,
                blkio: None,
                cpu: None,
                freezer: None,
            });
        }
        let v1 = |names: &[&str]| {
            names
                .iter()
                .map(|n| root.join(n))
                .find(|p| p.join("cgroup.procs").is_file())
        };
        let unified = Some(root.join("unified")).filter(|p| p.join("cgroup.controllers").is_file());
        let cpuacct = v1(&["cpuacct", "cpu,cpuacct", "cpuacct,cpu"]);
        let memory = v1(&["memory"]);
        let blkio = v1(&["blkio", "io"]);
        let cpu = v1(&["cpu", "cpu,cpuacct", "cpuacct,cpu"])
            .filter(|p| p.join("cpu.cfs_quota_us").is_file());
        let freezer = v1(&["freezer"]);
        let mode = match (&unified, cpuacct.is_some() || memory.is_some()) {
            (Some(_), true) => Mode::Hybrid,
            (Some(_), false) => Mode::V2,
            (None, true) => Mode::V1,
            (None, false) => {
                return Err(NoHierarchy {
                    root: root.to_path_buf(),
                })
            }
        };
        Ok(Layout {
            mode,
            unified,
            cpuacct,
            memory,
            blkio,
            cpu,
            freezer,
        })
    }

    /// Every hierarchy root the collector walks, unified first.
    pub fn roots(&self) -> impl Iterator<Item = &Path> {
        [&self.unified, &self.cpuacct, &self.memory, &self.blkio]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "").unwrap();
    }

    #[test]
    fn detects_each_mode_from_a_fixture_tree() {
        let v2 = tempfile::tempdir().unwrap();
        touch(&v2.path().join("cgroup.controllers"));
        let layout = Layout::detect(v2.path()).unwrap();
        assert_eq!(layout.mode, Mode::V2);
        assert_eq!(layout.unified.as_deref(), Some(v2.path()));

        let hybrid = tempfile::tempdir().unwrap();
        touch(&hybrid.path().join("unified/cgroup.controllers"));
        touch(&hybrid.path().join("cpuacct/cgroup.procs"));
        touch(&hybrid.path().join("memory/cgroup.procs"));
        let layout = Layout::detect(hybrid.path()).unwrap();
        assert_eq!(layout.mode, Mode::Hybrid);
        assert_eq!(layout.memory, Some(hybrid.path().join("memory")));
        assert_eq!(layout.blkio, None);

        let v1 = tempfile::tempdir().unwrap();
        touch(&v1.path().join("cpu,cpuacct/cgroup.procs"));
        let layout = Layout::detect(v1.path()).unwrap();
        assert_eq!(layout.mode, Mode::V1);
        assert_eq!(layout.cpuacct, Some(v1.path().join("cpu,cpuacct")));

        let none = tempfile::tempdir().unwrap();
        let err = Layout::detect(none.path()).unwrap_err();
        assert!(err.to_string().contains(&none.path().display().to_string()));
    }
}
