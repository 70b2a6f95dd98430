//! `bpf_stats`: the kernel's per-program run time and run count, collected only while some
//! process holds a `BPF_ENABLE_STATS` fd (or `kernel.bpf_stats_enabled=1`). The agent holds one
//! for its lifetime so `tally_ebpf_program_run_seconds_total` means something.

use std::os::fd::OwnedFd;

use aya::programs::Program;

use crate::{Error, ProgramStats};

/// Keeps run-time statistics enabled while alive.
#[derive(Debug)]
pub struct StatsGuard {
    _fd: OwnedFd,
}

impl StatsGuard {
    pub fn enable() -> Result<StatsGuard, Error> {
        let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(Error::Stats)?;
        Ok(StatsGuard { _fd: fd })
    }
}

/// The statistics of `program`, loaded under `name`.
pub fn program_stats(name: &'static str, program: &Program) -> Option<ProgramStats> {
    let info = program.info().ok()?;
    Some(ProgramStats {
        program: name,
        run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
        run_count: info.run_count(),
    })
}
