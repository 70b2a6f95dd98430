//! Start times of cumulative OTLP series. A cumulative point says "this much since `start_time`";
//! a receiver computes rates from points with the same start. When a series' total goes backwards
//! (a workload forgotten after the grace period and seen again, an agent restarted behind the same
//! resource) it must come with a new start time, or the receiver sees a sum that shrinks.
//!
//! Each series keeps its start and its last total. A series seen for the first time after the
//! first batch starts at the previous batch's time: it was zero then, or did not exist. A total
//! below the last one is a restart: the series starts again at the previous batch's time, the
//! last instant it is known to have held the old total. A series absent from a batch is kept for
//! [`FORGET_AFTER`] batches, so one that drops out for a tick and comes back unchanged keeps its
//! start.

use std::collections::HashMap;
use std::time::SystemTime;

/// Batches a series may be absent from before its start is forgotten.
pub const FORGET_AFTER: u64 = 60;

/// A series: its family's name and its attributes as sent.
pub type SeriesKey = (&'static str, Vec<(&'static str, String)>);

#[derive(Debug)]
struct Start {
    at: SystemTime,
    /// The last total: a counter's value, a histogram's count.
    last: f64,
    /// The batch it was last in.
    batch: u64,
}

#[derive(Debug)]
pub struct Starts {
    /// When the exporter started: the start of every series in the first batch.
    origin: SystemTime,
    series: HashMap<SeriesKey, Start>,
    /// The number and time of the batch being built, and of the one before.
    batch: u64,
    previous: Option<SystemTime>,
    now: SystemTime,
}

impl Starts {
    pub fn new(origin: SystemTime) -> Starts {
        Starts {
            origin,
            series: HashMap::new(),
            batch: 0,
            previous: None,
            now: origin,
        }
    }

    /// Begins a batch at `now`.
    pub fn begin(&mut self, now: SystemTime) {
        if self.batch > 0 {
            self.previous = Some(self.now);
        }
        self.batch += 1;
        self.now = now;
    }

    /// The start time of `key`, whose cumulative total is `total` in this batch.
    pub fn start(&mut self, key: SeriesKey, total: f64) -> SystemTime {
        let since = self.previous.unwrap_or(self.origin);
        let batch = self.batch;
        let start = self.series.entry(key).or_insert(Start {
            at: since,
            last: total,
            batch,
        });
        if total < start.last {
            start.at = since;
        }
        start.last = total;
        start.batch = batch;
        start.at
    }

    /// Ends the batch: forgets series absent for more than [`FORGET_AFTER`] batches.
    pub fn end(&mut self) {
        let batch = self.batch;
        self.series
            .retain(|_, s| batch.saturating_sub(s.batch) <= FORGET_AFTER);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.series.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.series.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    fn key(workload: &str) -> SeriesKey {
        (
            "tally_workload_gpu_seconds_total",
            vec![("unit", workload.to_owned())],
        )
    }

    #[test]
    fn a_total_that_goes_back_starts_again_at_the_previous_batch() {
        let mut starts = Starts::new(at(0));
        starts.begin(at(10));
        assert_eq!(
            starts.start(key("a"), 5.0),
            at(0),
            "first batch: the origin"
        );
        starts.end();
        starts.begin(at(20));
        assert_eq!(starts.start(key("a"), 9.0), at(0), "growing: same start");
        assert_eq!(
            starts.start(key("b"), 1.0),
            at(10),
            "new after the first batch: the previous batch"
        );
        starts.end();
        starts.begin(at(30));
        assert_eq!(
            starts.start(key("a"), 2.0),
            at(20),
            "restarted: the previous batch"
        );
        assert_eq!(starts.start(key("b"), 1.0), at(10), "unchanged: same start");
        starts.end();
        starts.begin(at(40));
        assert_eq!(
            starts.start(key("a"), 2.5),
            at(20),
            "after a restart, growing"
        );
        starts.end();
    }

    #[test]
    fn an_absent_series_keeps_its_start_for_a_while_then_is_forgotten() {
        let mut starts = Starts::new(at(0));
        starts.begin(at(1));
        starts.start(key("a"), 7.0);
        starts.end();
        for batch in 2..=FORGET_AFTER + 1 {
            starts.begin(at(batch));
            starts.end();
        }
        assert_eq!(starts.len(), 1);
        starts.begin(at(FORGET_AFTER + 2));
        // Still known: back at the same total, same start; back lower, a new one.
        assert_eq!(starts.start(key("a"), 7.0), at(0));
        starts.end();
        for batch in FORGET_AFTER + 3..=2 * FORGET_AFTER + 3 {
            starts.begin(at(batch));
            starts.end();
        }
        assert!(starts.is_empty(), "forgotten after {FORGET_AFTER} batches");
        starts.begin(at(2 * FORGET_AFTER + 4));
        assert_eq!(starts.start(key("a"), 7.0), at(2 * FORGET_AFTER + 3));
    }
}
