//! Duty-cycle freezing through the freeze cycle ([`crate::budget::freeze::Freezer`]), which
//! this actuator owns: `cgroup.freeze` (v2) or `freezer.state` (v1) written each cycle.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use super::{Actuator, ActuatorError, Plan, Site};
use crate::budget::freeze::{CycleError, Freezer};
use crate::budget::state::Throttle;
use crate::config::Config;

#[derive(Debug)]
pub(super) struct Freeze {
    freezer: Freezer,
}

fn period(config: &Config) -> Duration {
    Duration::from_millis(config.enforcement.freeze_period_ms)
}

impl Freeze {
    pub(super) fn new(config: &Config) -> Freeze {
        Freeze {
            freezer: Freezer::new(period(config)),
        }
    }

    pub(super) fn reconfigure(&mut self, config: &Config) {
        self.freezer.set_period(period(config));
    }

    pub(super) fn take_failures(&self) -> HashMap<PathBuf, CycleError> {
        self.freezer.take_failures()
    }

    pub(super) fn stop(&mut self) {
        self.freezer.stop();
    }
}

impl Actuator for Freeze {
    fn plan(&self, site: Site<'_>, _: f64) -> Result<Plan, ActuatorError> {
        Ok(Plan {
            freeze: Some(site.dirs.freeze_file()?),
            ..Plan::default()
        })
    }

    fn apply(
        &mut self,
        t: &Throttle,
        setting: f64,
        _: Option<Site<'_>>,
    ) -> Result<(), ActuatorError> {
        let file = t.freeze.as_ref().ok_or(ActuatorError::NoFreezeFile)?;
        Ok(self.freezer.set(file, setting)?)
    }

    /// Cheap, and re-arms the cycle after a restart adopted the record.
    fn needs_reapply(&self, t: &Throttle, setting: f64) -> bool {
        t.freeze
            .as_ref()
            .is_some_and(|file| self.freezer.share(file) != Some(setting))
    }

    fn release(&mut self, t: &Throttle) -> Result<(), ActuatorError> {
        match &t.freeze {
            Some(file) => Ok(self.freezer.remove(file)?),
            None => Ok(()),
        }
    }
}
