//! The state file (`<state_dir>/state.json`): every throttle is recorded here, with what it
//! replaced, before it is applied, so a graceful stop, a crash followed by a restart, or
//! `tally release` can always undo it; and window consumption, so a restart never hands a
//! workload a fresh budget. Written atomically (temporary file, fsync, rename, fsync of the
//! directory): a crash leaves the old state or the new one, never half of either.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::window::Window;
use crate::config::policy::Action;

pub const FILE_NAME: &str = "state.json";
const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// Unix seconds of the last save.
    pub saved_at: f64,
    pub throttles: Vec<Throttle>,
    pub windows: Vec<SavedWindow>,
    /// The last cumulative value the engine read per workload and metric, so consumption while
    /// the agent was down is still charged.
    pub baselines: Vec<Baseline>,
}

/// One applied (or about to be applied) throttle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Throttle {
    pub budget: String,
    /// The workload's key (see `engine::keys::subject_key`).
    pub subject: String,
    pub action: Action,
    /// The actuator's setting: cores, bytes per second, or running share of a freeze cycle.
    pub setting: f64,
    /// cgroupfs files written, with what they held before.
    pub writes: Vec<FileWrite>,
    /// The freeze file of a duty-cycled cgroup, thawed on release.
    pub freeze: Option<PathBuf>,
    /// The egress limit set in the BPF map (gone with the agent's maps; recorded for the
    /// record and for release while the agent runs).
    pub egress: Option<Egress>,
    /// Unix seconds when it was applied.
    pub applied_at: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileWrite {
    pub path: PathBuf,
    /// What the file held before (what writing it back restores).
    pub original: String,
    pub applied: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Egress {
    pub cgroup_id: u64,
    /// The cgroup's level in the cgroup2 hierarchy, by which the egress program finds it among a
    /// socket's ancestors; `None` in records written before levels were kept.
    #[serde(default)]
    pub level: Option<u32>,
    pub scope: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedWindow {
    pub budget: String,
    pub subject: String,
    pub window: Window,
    pub enforcing: bool,
    pub warning: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub workload: String,
    pub metric: String,
    pub value: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a Tally state file: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path} has state version {found}; this agent reads version {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl State {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(FILE_NAME)
    }

    /// Reads the state file; a missing file is an empty state.
    pub fn load(dir: &Path) -> Result<State, StateError> {
        let path = Self::path(dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        Self::parse(&text, &path)
    }

    /// Parses the text of the state file at `path` (named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<State, StateError> {
        let state: State = serde_json::from_str(text).map_err(|source| StateError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        if state.version != VERSION {
            return Err(StateError::Version {
                path: path.to_path_buf(),
                found: state.version,
            });
        }
        Ok(state)
    }

    /// Writes the state atomically, creating the directory if needed.
    pub fn save(&mut self, dir: &Path, now: f64) -> Result<(), StateError> {
        self.version = VERSION;
        self.saved_at = now;
        let path = Self::path(dir);
        let write = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(write)?;
        let tmp = dir.join(format!(".{FILE_NAME}.tmp"));
        let json = serde_json::to_vec(self).map_err(|e| write(std::io::Error::other(e)))?;
        let mut file = std::fs::File::create(&tmp).map_err(write)?;
        file.write_all(&json).map_err(write)?;
        file.sync_all().map_err(write)?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(write)?;
        // The rename is durable once the directory is.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write)?;
        Ok(())
    }
}

/// What the freeze file of a cgroup holds when thawed.
pub fn thawed_value(freeze_file: &Path) -> &'static str {
    if freeze_file.ends_with("freezer.state") {
        "THAWED"
    } else {
        "0"
    }
}

/// Undoes a throttle's cgroupfs side: writes back every original value and thaws. A cgroup that
/// no longer exists has nothing left to release. Returns the errors, each naming its file.
pub fn release_files(throttle: &Throttle) -> Vec<String> {
    let mut errors = Vec::new();
    if let Some(freeze) = &throttle.freeze {
        if let Err(e) = write_existing(freeze, thawed_value(freeze)) {
            errors.push(format!("thawing {}: {e}", freeze.display()));
        }
    }
    // Restore in reverse order of application (v1 CPU period before quota and so on).
    for w in throttle.writes.iter().rev() {
        if let Err(e) = write_existing(&w.path, &w.original) {
            errors.push(format!(
                "restoring `{}` to {}: {e}",
                w.original.trim(),
                w.path.display()
            ));
        }
    }
    errors
}

/// Writes `value` to a cgroup file, treating a vanished cgroup as done.
pub fn write_existing(path: &Path, value: &str) -> std::io::Result<()> {
    match std::fs::write(path, value) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        // The kernel answers ENODEV for a cgroup removed while the file was open.
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_atomically_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(State::load(dir.path()).unwrap(), State::default());
        let mut state = State {
            throttles: vec![Throttle {
                budget: "b".into(),
                subject: "unit:x.service".into(),
                action: Action::Cpu,
                setting: 0.3,
                writes: vec![FileWrite {
                    path: dir.path().join("cpu.max"),
                    original: "max 100000".into(),
                    applied: "30000 100000".into(),
                }],
                freeze: None,
                egress: None,
                applied_at: 1.0,
            }],
            ..State::default()
        };
        state.save(&dir.path().join("sub"), 5.0).unwrap();
        let loaded = State::load(&dir.path().join("sub")).unwrap();
        assert_eq!(loaded, state);
        assert!(!dir.path().join("sub/.state.json.tmp").exists());
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), "{nope").unwrap();
        let e = State::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("state.json"), "{e}");
    }

    #[test]
    fn release_restores_originals_and_ignores_vanished_cgroups() {
        let dir = tempfile::tempdir().unwrap();
        let quota = dir.path().join("cpu.cfs_quota_us");
        std::fs::write(&quota, "30000").unwrap();
        let freeze = dir.path().join("cgroup.freeze");
        std::fs::write(&freeze, "1").unwrap();
        let t = Throttle {
            budget: "b".into(),
            subject: "s".into(),
            action: Action::Cpu,
            setting: 0.3,
            writes: vec![
                FileWrite {
                    path: quota.clone(),
                    original: "-1".into(),
                    applied: "30000".into(),
                },
                FileWrite {
                    path: dir.path().join("gone/cpu.max"),
                    original: "max".into(),
                    applied: "1".into(),
                },
            ],
            freeze: Some(freeze.clone()),
            egress: None,
            applied_at: 0.0,
        };
        assert_eq!(release_files(&t), Vec::<String>::new());
        assert_eq!(std::fs::read_to_string(quota).unwrap(), "-1");
        assert_eq!(std::fs::read_to_string(freeze).unwrap(), "0");
    }
}
