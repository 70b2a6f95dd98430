//! The agent's own failures, counted by a small fixed label set (`collector`, `reason`) and logged
//! once per kind at WARN, after that at DEBUG, so a persistent problem does not flood the log.

use std::collections::BTreeMap;

#[derive(Debug, Default, Clone)]
pub struct ErrorCounts {
    counts: BTreeMap<(&'static str, &'static str), u64>,
}

impl ErrorCounts {
    /// Counts one failure; `detail` is only formatted when it is logged.
    pub fn record(
        &mut self,
        collector: &'static str,
        reason: &'static str,
        detail: impl FnOnce() -> String,
    ) {
        let count = self.counts.entry((collector, reason)).or_insert(0);
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

    /// Adds counts kept elsewhere (the CRI task's), under its collector name.
    pub fn set_external(&mut self, collector: &'static str, reason: &'static str, total: u64) {
        self.counts.insert((collector, reason), total);
    }

    pub fn get(&self, collector: &str, reason: &str) -> u64 {
        self.counts
            .iter()
            .find(|((c, r), _)| *c == collector && *r == reason)
            .map_or(0, |(_, n)| *n)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> + '_ {
        self.counts.iter().map(|((c, r), n)| (*c, *r, *n))
    }
}
