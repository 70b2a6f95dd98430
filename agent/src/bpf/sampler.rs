//! When `bpf_stats` is on. While it is, the kernel reads the clock twice around every run of every
//! BPF program on the node, not just ours. On the development VMs, loopback TCP lost 2.4–2.7 % of
//! its throughput with our two `cgroup_skb` programs attached and `bpf_stats` held on, against a
//! median 0.6 % (95 % interval −0.2 … 1.1 %) with it off (`bench/ebpf_toggle.py`). So by default the
//! agent turns it on for one tick in every `ebpf.program_stats_every_secs`: the
//! `tally_ebpf_program_*` counters still give the cost per run and the CPU share while sampled,
//! and the node pays for the clock reads a thirtieth of the time.

use std::time::{Duration, Instant};

use tally_ebpf::stats::StatsGuard;
use tally_error_chain::chain;

use crate::config::ProgramStatsMode;

#[derive(Debug)]
pub struct StatsSampler {
    mode: ProgramStatsMode,
    every: Duration,
    guard: Option<StatsGuard>,
    /// When the current window began, while the guard is held.
    on_since: Option<Instant>,
    /// When the last window began.
    last_start: Option<Instant>,
    /// Time held on in closed windows.
    held: Duration,
    /// Enabling failed once (no CAP_SYS_ADMIN, kernel < 5.8): not tried again.
    unavailable: bool,
}

impl Default for StatsSampler {
    fn default() -> Self {
        StatsSampler::new(ProgramStatsMode::Off, Duration::ZERO)
    }
}

/// Whether `bpf_stats` should be on for the tick that starts at `now`.
fn wants_on(
    mode: ProgramStatsMode,
    every: Duration,
    on_since: Option<Instant>,
    last_start: Option<Instant>,
    now: Instant,
) -> bool {
    match mode {
        ProgramStatsMode::Always => true,
        ProgramStatsMode::Off => false,
        // One tick on (it was turned on at the previous tick), then off until the period is up.
        ProgramStatsMode::Sampled => {
            on_since.is_none()
                && last_start.is_none_or(|start| now.saturating_duration_since(start) >= every)
        }
    }
}

impl StatsSampler {
    pub fn new(mode: ProgramStatsMode, every: Duration) -> StatsSampler {
        StatsSampler {
            mode,
            every,
            guard: None,
            on_since: None,
            last_start: None,
            held: Duration::ZERO,
            unavailable: false,
        }
    }

    pub fn reconfigure(&mut self, mode: ProgramStatsMode, every: Duration) {
        self.mode = mode;
        self.every = every;
    }

    /// Turns `bpf_stats` on or off for the tick starting at `now`.
    pub fn tick(&mut self, now: Instant) {
        let on = wants_on(self.mode, self.every, self.on_since, self.last_start, now);
        match (on, self.on_since) {
            (true, None) if !self.unavailable => match StatsGuard::enable() {
                Ok(guard) => {
                    self.guard = Some(guard);
                    self.on_since = Some(now);
                    self.last_start = Some(now);
                }
                Err(e) => {
                    self.unavailable = true;
                    tracing::warn!(error = %chain(&e), "bpf_stats unavailable: program run times will read 0");
                }
            },
            (false, Some(since)) => {
                self.guard = None;
                self.on_since = None;
                self.held += now.saturating_duration_since(since);
            }
            _ => {}
        }
    }

    /// How long the agent has held `bpf_stats` on, up to `now`.
    pub fn held(&self, now: Instant) -> Duration {
        self.held
            + self
                .on_since
                .map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVERY: Duration = Duration::from_secs(30);

    /// Plays ticks one second apart and returns the ticks at which stats were wanted on.
    fn schedule(mode: ProgramStatsMode, ticks: u64) -> Vec<u64> {
        let t0 = Instant::now();
        let (mut on_since, mut last_start) = (None, None);
        let mut on = Vec::new();
        for tick in 0..ticks {
            let now = t0 + Duration::from_secs(tick);
            if wants_on(mode, EVERY, on_since, last_start, now) {
                on.push(tick);
                if on_since.is_none() {
                    last_start = Some(now);
                }
                on_since = on_since.or(Some(now));
            } else {
                on_since = None;
            }
        }
        on
    }

    #[test]
    fn sampled_is_on_for_the_first_tick_of_each_period() {
        assert_eq!(schedule(ProgramStatsMode::Sampled, 95), vec![0, 30, 60, 90]);
    }

    #[test]
    fn always_and_off() {
        assert_eq!(schedule(ProgramStatsMode::Always, 5), vec![0, 1, 2, 3, 4]);
        assert!(schedule(ProgramStatsMode::Off, 100).is_empty());
    }

    #[test]
    fn a_period_shorter_than_a_tick_still_leaves_every_other_tick_off() {
        let t0 = Instant::now();
        let every = Duration::from_millis(100);
        let second = t0 + Duration::from_secs(1);
        assert!(wants_on(ProgramStatsMode::Sampled, every, None, None, t0));
        assert!(!wants_on(
            ProgramStatsMode::Sampled,
            every,
            Some(t0),
            Some(t0),
            second
        ));
        assert!(wants_on(
            ProgramStatsMode::Sampled,
            every,
            None,
            Some(t0),
            second
        ));
    }

    #[test]
    fn held_time_counts_closed_and_open_windows() {
        let mut sampler = StatsSampler::new(ProgramStatsMode::Off, EVERY);
        let t0 = Instant::now();
        sampler.held = Duration::from_secs(2);
        assert_eq!(sampler.held(t0), Duration::from_secs(2));
        sampler.on_since = Some(t0);
        assert_eq!(
            sampler.held(t0 + Duration::from_millis(500)),
            Duration::from_millis(2500)
        );
    }
}
