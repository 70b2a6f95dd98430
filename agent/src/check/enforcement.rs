//! Whether budgets can be enforced here: which actuators this node's cgroups offer and whether
//! the state directory takes the record every throttle is written to first.

use std::path::{Path, PathBuf};

use tally_error_chain::chain;

use super::{Item, Status};
use crate::config::policy::Action;
use crate::config::Config;
use crate::host::layout::Layout;

pub(super) fn enforcement_item(config: &Config) -> Item {
    let Ok(layout) = Layout::detect(&config.paths.cgroup_root) else {
        return Item::new("enforcement", Status::Degraded, "no cgroup hierarchy");
    };
    let controllers = layout
        .unified
        .as_ref()
        .and_then(|u| std::fs::read_to_string(u.join("cgroup.subtree_control")).ok())
        .unwrap_or_default();
    let v2 = |c: &str| controllers.split_whitespace().any(|x| x == c);
    let cpu = if v2("cpu") {
        Some("cpu.max")
    } else {
        layout.cpu.as_ref().map(|_| "v1 cpu.cfs_quota_us")
    };
    // cgroup.freeze exists in every non-root cgroup2 directory (Linux 5.2+); the root's
    // cgroup.stat says whether this kernel has it (nr_dying_descendants is older).
    let freeze = match (&layout.unified, &layout.freezer) {
        (Some(u), _) if has_v2_freezer(u) => Some("cgroup.freeze"),
        (_, Some(_)) => Some("v1 freezer.state"),
        _ => None,
    };
    let disk = if v2("io") {
        Some("io.max")
    } else {
        layout.blkio.as_ref().map(|_| "v1 blkio.throttle")
    };
    let actuators = [
        (Action::Cpu, cpu),
        (Action::Freeze, freeze),
        (Action::Disk, disk),
    ];
    let mut parts: Vec<String> = actuators
        .iter()
        .map(|(a, how)| format!("{}: {}", a.as_str(), how.unwrap_or("unavailable")))
        .collect();
    parts.push(format!(
        "network: egress token bucket ({})",
        if layout.unified.is_some() {
            "needs the bpf network probe"
        } else {
            "unavailable: no cgroup2"
        }
    ));
    let state = writable(&config.enforcement.state_dir);
    parts.push(match &state {
        Ok(()) => format!("state: {} writable", config.enforcement.state_dir.display()),
        Err(e) => format!("state: {}", chain(e)),
    });
    let mut missing: Vec<String> = Vec::new();
    for b in &config.budget {
        if b.dry_run || !config.enforcement.enabled {
            continue;
        }
        if let Some((_, None)) = actuators.iter().find(|(a, _)| *a == b.action) {
            missing.push(format!("budget `{}` needs `{}`", b.name, b.action.as_str()));
        }
    }
    let enforcing = config.enforcement.enabled && config.budget.iter().any(|b| !b.dry_run);
    if enforcing && state.is_err() {
        missing.push("throttles cannot be recorded before they are applied".to_owned());
    }
    let detail = parts.join("; ");
    if missing.is_empty() {
        let status = if config.budget.is_empty() {
            Status::NotChecked
        } else {
            Status::Ok
        };
        let detail = if config.budget.is_empty() {
            format!("no budgets configured; {detail}")
        } else {
            detail
        };
        Item::new("enforcement", status, detail)
    } else {
        Item::new(
            "enforcement",
            Status::Degraded,
            format!("{}; {detail}", missing.join("; ")),
        )
    }
}

fn has_v2_freezer(unified: &Path) -> bool {
    std::fs::read_dir(unified)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.path().join("cgroup.freeze").is_file())
}

/// Why the state directory would not take the throttle record.
#[derive(Debug, thiserror::Error)]
enum StateDirError {
    /// The path holds a NUL byte, which no system call takes.
    #[error("{} is not a valid path", dir.display())]
    InvalidPath { dir: PathBuf },
    /// `access(2)` refused write access to the nearest existing ancestor.
    #[error("{} is not writable", existing.display())]
    NotWritable {
        existing: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Whether the agent could write there: the directory, or its nearest existing ancestor (the
/// agent creates the rest), is writable. Writes nothing.
fn writable(dir: &Path) -> Result<(), StateDirError> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let c = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes()).map_err(|_| {
        StateDirError::InvalidPath {
            dir: dir.to_path_buf(),
        }
    })?;
    // SAFETY: access(2) reads the NUL-terminated path we own.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0 {
        Ok(())
    } else {
        Err(StateDirError::NotWritable {
            existing: existing.to_path_buf(),
            source: std::io::Error::last_os_error(),
        })
    }
}
