//! CPU bandwidth: `cpu.max` on cgroup2 where the cpu controller is enabled, else the v1
//! `cpu.cfs_quota_us`.

use super::{read, write_all, Actuator, ActuatorError, CgroupError, Plan, Site};
use crate::budget::state::{FileWrite, Throttle};

/// The CFS period Tally writes when the cgroup has none of its own (the kernel default).
const DEFAULT_PERIOD_US: u64 = 100_000;
/// The smallest quota the kernel accepts.
const MIN_QUOTA_US: u64 = 1_000;

#[derive(Debug)]
pub(super) struct Cpu;

impl Actuator for Cpu {
    fn plan(&self, site: Site<'_>, setting: f64) -> Result<Plan, ActuatorError> {
        Ok(Plan {
            writes: plan_cpu(site.dirs, setting)?,
            ..Plan::default()
        })
    }

    fn apply(&mut self, t: &Throttle, _: f64, _: Option<Site<'_>>) -> Result<(), ActuatorError> {
        Ok(write_all(&t.writes)?)
    }

    /// CFS periods in which the cgroup was throttled (`nr_throttled` of the `cpu.stat` next to
    /// the file written).
    fn held_back(&self, t: &Throttle) -> Option<u64> {
        let dir = t.writes.first()?.path.parent()?;
        let stat = std::fs::read_to_string(dir.join("cpu.stat")).ok()?;
        stat.lines()
            .find_map(|l| l.strip_prefix("nr_throttled "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    }
}

/// CPU bandwidth of `cores`: `cpu.max` on cgroup2 where the cpu controller is enabled, else
/// the v1 `cpu.cfs_quota_us`.
pub(super) fn plan_cpu(
    dirs: &super::CgroupDirs,
    cores: f64,
) -> Result<Vec<FileWrite>, CgroupError> {
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
    Err(CgroupError::NoCpuControl)
}

fn quota_us(cores: f64, period: u64) -> u64 {
    ((cores * period as f64).round() as u64).max(MIN_QUOTA_US)
}
