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
