//! The eBPF programs as one source: map counters into the ledger, their probes, and what the
//! programs cost the kernel.

use std::sync::Arc;
use std::time::Instant;

use tally_exporters::Family;

use super::BpfSources;
use crate::catalogue::agent;
use crate::config::Config;
use crate::errors::ErrorCounts;
use crate::host::layout::Layout;
use crate::ledger::Ledger;
use crate::source::{Probe, Source, TickCtx};

impl Source for BpfSources {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn collect(&mut self, ctx: &mut TickCtx<'_>, ledger: &mut Ledger) {
        self.follow_addresses(ctx.errors);
        self.collect_maps(
            ctx.discovery,
            ctx.workloads,
            ctx.host,
            ctx.identity,
            ledger,
            ctx.errors,
        );
        self.lost = self.read_lost(ctx.errors);
        self.stats.tick(Instant::now());
    }

    fn probes(&self) -> Vec<Probe> {
        self.statuses
            .iter()
            .map(|s| Probe {
                probe: s.probe,
                method: s.method,
                up: s.up,
            })
            .collect()
    }

    fn families(&self) -> Vec<Family> {
        let mut run_seconds = Family::new(&agent::EBPF_PROGRAM_RUN_SECONDS);
        let mut runs = Family::new(&agent::EBPF_PROGRAM_RUNS);
        let mut stats_held = Family::new(&agent::EBPF_PROGRAM_STATS_SECONDS);
        stats_held.push_labeled(Vec::new(), self.stats.held(Instant::now()).as_secs_f64());
        for stats in self.program_stats() {
            let label = vec![("program", Arc::from(stats.program))];
            run_seconds.push_labeled(label.clone(), stats.run_time_ns as f64 / 1e9);
            runs.push_labeled(label, stats.run_count as f64);
        }
        let mut lost = Family::new(&agent::EBPF_MAP_UPDATES_LOST);
        for (map, n) in &self.lost {
            lost.push_labeled(vec![("map", Arc::from(*map))], *n as f64);
        }
        let missed = self.churn.as_ref().map(|c| c.missed());
        [run_seconds, runs, stats_held, lost]
            .into_iter()
            .chain(missed)
            .collect()
    }

    fn cgroup_changes(&self) -> Option<u64> {
        self.churn.as_ref()?.source().changes().ok()
    }

    fn reconfigure(&mut self, config: &Config, _layout: &Layout, errors: &mut ErrorCounts) {
        self.apply(config, errors);
    }
}
