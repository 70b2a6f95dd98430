//! The one place the agent counts failures: its collectors' (`tally_collector_errors_total`, by
//! `collector` and `reason`), NVML's (`tally_gpu_nvml_errors_total`, by call and error code) and
//! enforcement's (`tally_enforcement_errors_total`, by budget, action and reason). Label values are
//! bounded: fixed reasons, NVML's calls and codes, the configured budgets. Collector failures are
//! logged here, once per kind at WARN and after that at DEBUG, so a persistent problem does not
//! flood the log; the others are logged by whoever counts them, with what they know.

use std::collections::BTreeMap;
use std::sync::Arc;

use tally_exporters::{Family, Metric};

use crate::catalogue::agent::COLLECTOR_ERRORS;

/// Counts by family (its name) and the values of its labels, in the declared order.
type Counts = BTreeMap<(&'static str, Vec<Arc<str>>), (&'static Metric, u64)>;

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
        let count = self.slot(&COLLECTOR_ERRORS, &[collector, reason]);
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

    /// Counts one failure in `family` with label values `labels` (in the declared order) and
    /// returns how many there have been; the caller logs it.
    pub fn count(&mut self, family: &'static Metric, labels: &[&str]) -> u64 {
        let count = self.slot(family, labels);
        *count += 1;
        *count
    }

    /// Shows `family`'s series for `labels` from zero, so that its first failure is an increase.
    pub fn expect(&mut self, family: &'static Metric, labels: &[&str]) {
        self.slot(family, labels);
    }

    /// Forgets the series of `family` that never counted a failure (the rows `expect` made for
    /// what a reload removed); those that did keep their counts.
    pub fn forget_unused(&mut self, family: &'static Metric) {
        self.counts
            .retain(|(name, _), (_, n)| *name != family.name || *n > 0);
    }

    /// Adds counts kept elsewhere (the CRI task's), under its collector name.
    pub fn set_external(&mut self, collector: &'static str, reason: &'static str, total: u64) {
        *self.slot(&COLLECTOR_ERRORS, &[collector, reason]) = total;
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
                let labels = labels.map(|(l, v)| (*l, v.clone())).collect();
                family.push_labeled(labels, *n as f64);
            }
        }
        families
    }

    fn slot(&mut self, family: &'static Metric, labels: &[&str]) -> &mut u64 {
        debug_assert_eq!(family.labels.len(), labels.len(), "{}", family.name);
        let labels = labels.iter().map(|&l| Arc::from(l)).collect();
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
    use crate::catalogue::budget::ENFORCEMENT_ERRORS;
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
        errors.count(&NVML_ERRORS, &["nvmlDeviceGetPowerUsage", "NotSupported"]);
        errors.record("cgroupfs", "parse", || "x".into());
        let n = errors.count(&NVML_ERRORS, &["nvmlDeviceGetPowerUsage", "NotSupported"]);
        assert_eq!(n, 2);
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
    }

    #[test]
    fn expected_rows_show_from_zero_until_a_reload_forgets_the_unused() {
        let mut errors = ErrorCounts::default();
        errors.expect(&ENFORCEMENT_ERRORS, &["a", "cpu", "apply"]);
        errors.expect(&ENFORCEMENT_ERRORS, &["b", "cpu", "apply"]);
        errors.count(&ENFORCEMENT_ERRORS, &["b", "cpu", "apply"]);
        assert_eq!(
            lines(&errors),
            [
                r#"tally_enforcement_errors_total{budget="a",action="cpu",reason="apply"} 0"#,
                r#"tally_enforcement_errors_total{budget="b",action="cpu",reason="apply"} 1"#,
            ]
        );
        errors.forget_unused(&ENFORCEMENT_ERRORS);
        assert_eq!(
            lines(&errors),
            [r#"tally_enforcement_errors_total{budget="b",action="cpu",reason="apply"} 1"#]
        );
    }
}
