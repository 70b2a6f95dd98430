//! The one place the agent counts failures: the agent's own (`tally_collector_errors_total`, by
//! `collector` and `reason`) and those a source reports by a family of its own
//! (`tally_gpu_nvml_errors_total`, by NVML call and error code). Every family's labels are a small
//! fixed set of static values. The agent's own failures are logged once per kind at WARN, after
//! that at DEBUG, so a persistent problem does not flood the log.

use std::collections::BTreeMap;
use std::sync::Arc;

use tally_exporters::{Family, Metric};

use crate::catalogue::agent::COLLECTOR_ERRORS;

/// Counts by family (its name) and the values of its two labels.
type Counts = BTreeMap<(&'static str, [&'static str; 2]), (&'static Metric, u64)>;

#[derive(Debug, Default, Clone)]
pub struct ErrorCounts {
    counts: Counts,
}

impl ErrorCounts {
    /// Counts one failure of the agent's `collector`; `detail` is only formatted when logged.
    pub fn record(
        &mut self,
        collector: &'static str,
        reason: &'static str,
        detail: impl FnOnce() -> String,
    ) {
        let count = self.slot(&COLLECTOR_ERRORS, [collector, reason]);
        *count += 1;
        if *count == 1 {
            tracing::warn!(
                collector,
                reason,
                detail = %detail(),
                "collector error (counted in tally_collector_errors_total; further ones logged at debug)"
            );
        } else {
            tracing::debug!(collector, reason, detail = %detail(), "collector error");
        }
    }

    /// Counts one failure in a family of its own, whose two labels are `labels` (the caller
    /// logs it).
    pub fn count(&mut self, family: &'static Metric, labels: [&'static str; 2]) {
        debug_assert_eq!(family.labels.len(), 2, "{}", family.name);
        *self.slot(family, labels) += 1;
    }

    /// Adds counts kept elsewhere (the CRI task's), under its collector name.
    pub fn set_external(&mut self, collector: &'static str, reason: &'static str, total: u64) {
        *self.slot(&COLLECTOR_ERRORS, [collector, reason]) = total;
    }

    /// The agent's own failures of `collector` for `reason`.
    pub fn get(&self, collector: &str, reason: &str) -> u64 {
        self.counts
            .iter()
            .find(|((f, [c, r]), _)| *f == COLLECTOR_ERRORS.name && *c == collector && *r == reason)
            .map_or(0, |(_, (_, n))| *n)
    }

    /// One family per declaration with a count, series in label order.
    pub fn families(&self) -> Vec<Family> {
        let mut families: Vec<Family> = Vec::new();
        for ((_, values), (metric, n)) in &self.counts {
            if families.last().is_none_or(|f| f.name != metric.name) {
                families.push(Family::new(metric));
            }
            if let Some(family) = families.last_mut() {
                let labels = metric.labels.iter().zip(values);
                let labels = labels.map(|(l, v)| (*l, Arc::from(*v))).collect();
                family.push_labeled(labels, *n as f64);
            }
        }
        families
    }

    fn slot(&mut self, family: &'static Metric, labels: [&'static str; 2]) -> &mut u64 {
        &mut self
            .counts
            .entry((family.name, labels))
            .or_insert((family, 0))
            .1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::gpu::NVML_ERRORS;

    /// `name{a="x",b="y"} n` per series, in output order.
    fn lines(errors: &ErrorCounts) -> Vec<String> {
        let mut out = Vec::new();
        for family in errors.families() {
            for s in &family.samples {
                let labels: Vec<String> = s
                    .extra
                    .iter()
                    .map(|(l, v)| format!("{l}=\"{v}\""))
                    .collect();
                out.push(format!(
                    "{}{{{}}} {}",
                    family.name,
                    labels.join(","),
                    s.value
                ));
            }
        }
        out
    }

    #[test]
    fn each_family_counts_its_own_series_in_label_order() {
        let mut errors = ErrorCounts::default();
        errors.record("cgroupfs", "read", || "x".into());
        errors.count(&NVML_ERRORS, ["nvmlDeviceGetPowerUsage", "NotSupported"]);
        errors.record("cgroupfs", "parse", || "x".into());
        errors.count(&NVML_ERRORS, ["nvmlDeviceGetPowerUsage", "NotSupported"]);
        errors.set_external("cri", "connect", 7);
        errors.record("cgroupfs", "read", || "x".into());
        assert_eq!(
            lines(&errors),
            [
                r#"tally_collector_errors_total{collector="cgroupfs",reason="parse"} 1"#,
                r#"tally_collector_errors_total{collector="cgroupfs",reason="read"} 2"#,
                r#"tally_collector_errors_total{collector="cri",reason="connect"} 7"#,
                r#"tally_gpu_nvml_errors_total{call="nvmlDeviceGetPowerUsage",code="NotSupported"} 2"#,
            ]
        );
        assert_eq!(errors.get("cgroupfs", "read"), 2);
        assert_eq!(errors.get("nvmlDeviceGetPowerUsage", "NotSupported"), 0);
    }
}
