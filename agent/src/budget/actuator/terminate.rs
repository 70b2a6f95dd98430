//! SIGTERM to every process of the workload, once, when the throttle is new.

use super::{Actuator, ActuatorError, CgroupDirs, CgroupError, Plan, Site};
use crate::budget::state::Throttle;

#[derive(Debug)]
pub(super) struct Terminate;

impl Actuator for Terminate {
    fn plan(&self, _: Site<'_>, _: f64) -> Result<Plan, ActuatorError> {
        Ok(Plan::default())
    }

    fn apply(&mut self, t: &Throttle, _: f64, new: Option<Site<'_>>) -> Result<(), ActuatorError> {
        let Some(site) = new else {
            return Ok(());
        };
        let n = terminate(site.dirs)?;
        tracing::warn!(budget = %t.budget, workload = %t.subject, processes = n, "sent SIGTERM");
        Ok(())
    }
}

/// Sends SIGTERM to every process of the workload; returns how many got it.
fn terminate(dirs: &CgroupDirs) -> Result<usize, CgroupError> {
    let mut sent = 0;
    let mut refused = Vec::new();
    for pid in dirs.pids()? {
        // `cgroup.procs` lists 0 for a process outside the reader's pid namespace, and kill(0)
        // would signal the agent's own process group; -1 every process; 1 is an init.
        if pid <= 1 {
            tracing::debug!(pid, "not signalled: no process of this pid namespace");
            continue;
        }
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
        Err(CgroupError::SigtermRefused { sent, refused })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids_zero_and_one_are_never_signalled() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(
            dir.path().join("cgroup.procs"),
            format!("0\n1\n{}\n", child.id()),
        )
        .unwrap();
        let dirs = CgroupDirs {
            unified: Some(dir.path().to_path_buf()),
            cpu: None,
            blkio: None,
            freezer: None,
        };
        assert_eq!(terminate(&dirs).unwrap(), 1);
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGTERM)
        );
    }
}
