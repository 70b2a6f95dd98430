//! Usage windows: how much of a budget a subject used, by the wall clock so a restart resumes the
//! same window (times are Unix seconds).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::config::policy::{self, Budget};

/// Buckets per sliding window: usage is exact to one bucket, interpolated inside the oldest.
const BUCKETS: u64 = 60;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Window {
    /// The last `length` seconds, in buckets of `bucket` seconds: `(bucket start, amount)`.
    Sliding {
        length: u64,
        bucket: u64,
        buckets: VecDeque<(u64, f64)>,
    },
    /// A quota that resets every `period` seconds, aligned to the Unix epoch (UTC hours, days).
    Calendar {
        period: u64,
        start: u64,
        consumed: f64,
    },
    /// A level (GPU memory held now).
    Level { value: f64 },
}

impl Window {
    pub fn for_budget(budget: &Budget) -> Window {
        if let Some(period) = budget.period {
            return Window::Calendar {
                period: period.secs(),
                start: 0,
                consumed: 0.0,
            };
        }
        match budget.window.as_deref().map(policy::parse_duration) {
            Some(Ok(d)) => {
                let length = d.as_secs().max(1);
                Window::Sliding {
                    length,
                    bucket: length.div_ceil(BUCKETS).max(1),
                    buckets: VecDeque::new(),
                }
            }
            _ => Window::Level { value: 0.0 },
        }
    }

    /// Whether `self` (restored from the state file) still measures what `budget` asks.
    pub fn fits(&self, budget: &Budget) -> bool {
        match (self, Window::for_budget(budget)) {
            // The bucket too: a restored bucket of 0 (a hand-edited or corrupt file) would
            // divide by zero on the first tick.
            (
                Window::Sliding { length, bucket, .. },
                Window::Sliding {
                    length: l,
                    bucket: b,
                    ..
                },
            ) => *length == l && *bucket == b,
            (Window::Calendar { period, .. }, Window::Calendar { period: p, .. }) => *period == p,
            (Window::Level { .. }, Window::Level { .. }) => true,
            _ => false,
        }
    }

    /// Adds `amount` used at `now`.
    pub fn add(&mut self, now: f64, amount: f64) {
        if amount <= 0.0 || !amount.is_finite() {
            return;
        }
        let now_s = now.max(0.0) as u64;
        match self {
            Window::Sliding {
                length,
                bucket,
                buckets,
            } => {
                let start = now_s - now_s % *bucket;
                match buckets.back_mut() {
                    Some((s, a)) if *s == start => *a += amount,
                    _ => buckets.push_back((start, amount)),
                }
                let horizon = now_s.saturating_sub(*length + *bucket);
                while buckets.front().is_some_and(|(s, _)| *s < horizon) {
                    buckets.pop_front();
                }
            }
            Window::Calendar {
                period,
                start,
                consumed,
            } => {
                roll(*period, start, consumed, now_s);
                *consumed += amount;
            }
            Window::Level { value } => *value = amount,
        }
    }

    /// Sets a level window's value (zero included, which `add` ignores).
    pub fn set_level(&mut self, level: f64) {
        if let Window::Level { value } = self {
            *value = level;
        }
    }

    /// What was used in the window that ends at `now`.
    pub fn usage(&mut self, now: f64) -> f64 {
        match self {
            Window::Sliding {
                length,
                bucket,
                buckets,
            } => {
                let from = now - *length as f64;
                buckets
                    .iter()
                    .map(|(start, amount)| {
                        // In f64: a restored bucket's start can be anything, even near u64::MAX.
                        let (s, e) = (*start as f64, *start as f64 + *bucket as f64);
                        // The part of the bucket inside the window, assuming even use within it.
                        let inside = ((e - from) / (e - s)).clamp(0.0, 1.0);
                        amount * inside
                    })
                    .sum()
            }
            Window::Calendar {
                period,
                start,
                consumed,
            } => {
                roll(*period, start, consumed, now.max(0.0) as u64);
                *consumed
            }
            Window::Level { value } => *value,
        }
    }
}

impl Window {
    /// Seconds from `now` until the usage, with no further use, falls below `threshold`: when a
    /// spent budget lets go. `None` for a level, which falls when the workload lets go of it.
    pub fn release_in(&self, now: f64, threshold: f64) -> Option<f64> {
        let mut w = self.clone();
        if w.usage(now) < threshold {
            return Some(0.0);
        }
        match self {
            Window::Level { .. } => None,
            Window::Calendar { period, .. } => {
                let end = (now.max(0.0) as u64 / period + 1) * period;
                Some(end as f64 - now)
            }
            Window::Sliding { length, bucket, .. } => {
                // Without new use the usage only falls: bisect to a tenth of a second.
                let (mut lo, mut hi) = (now, now + (*length + *bucket) as f64);
                if w.usage(hi) >= threshold {
                    return None;
                }
                while hi - lo > 0.1 {
                    let mid = (lo + hi) / 2.0;
                    if w.usage(mid) < threshold {
                        hi = mid;
                    } else {
                        lo = mid;
                    }
                }
                Some(hi - now)
            }
        }
    }
}

/// Starts a new calendar period when `now` is past the current one.
fn roll(period: u64, start: &mut u64, consumed: &mut f64, now: u64) {
    let current = now - now % period;
    if current != *start {
        *start = current;
        *consumed = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(window: &str) -> Budget {
        toml::from_str(&format!(
            "name='b'\nresource='cpu_seconds'\nlimit=1.0\n{window}"
        ))
        .unwrap()
    }

    #[test]
    fn release_is_when_the_window_has_shed_enough() {
        // 60 s in 1 s buckets, 1 unit in each of the last 60 s: usage 60. Below 30 after the
        // older half has left, 30 s from now.
        let mut w = Window::for_budget(&budget("window='60s'"));
        let t0 = 1_000_000.0;
        for i in 0..60 {
            w.add(t0 + f64::from(i), 1.0);
        }
        let now = t0 + 60.0;
        let r = w.release_in(now, 30.0).unwrap();
        assert!((r - 30.0).abs() <= 0.2, "{r}");
        assert_eq!(w.release_in(now, 100.0), Some(0.0));
        // A calendar day: at its end, whatever the threshold.
        let mut day = Window::for_budget(&budget("period='day'"));
        day.add(86_400.0 * 3.0 + 100.0, 5.0);
        assert_eq!(day.release_in(86_400.0 * 3.0 + 400.0, 1.0), Some(86_000.0));
        let level = Window::Level { value: 5.0 };
        assert_eq!(level.release_in(0.0, 1.0), None);
    }

    #[test]
    fn a_restored_window_with_another_bucket_does_not_fit() {
        let b = budget("window='60s'");
        let restored = |bucket| Window::Sliding {
            length: 60,
            bucket,
            buckets: VecDeque::from([(0, 1.0)]),
        };
        assert!(restored(1).fits(&b));
        assert!(!restored(0).fits(&b));
        assert!(!restored(2).fits(&b));
    }

    #[test]
    fn a_restored_bucket_dated_at_the_end_of_time_does_not_overflow() {
        let mut w = Window::Sliding {
            length: 60,
            bucket: 1,
            buckets: VecDeque::from([(u64::MAX, 2.0), (100, 1.0)]),
        };
        // The bucket from the future counts whole; the one at 100 s has left the window.
        assert_eq!(w.usage(1_000.0), 2.0);
    }

    #[test]
    fn sliding_window_forgets_what_left_it() {
        let mut w = Window::for_budget(&budget("window='60s'"));
        let t0 = 1_000_000.0;
        for i in 0..60 {
            w.add(t0 + f64::from(i), 1.0);
        }
        assert!(
            (w.usage(t0 + 59.5) - 60.0).abs() < 1.0,
            "{}",
            w.usage(t0 + 59.5)
        );
        // Half a minute later, half of it is still inside.
        let half = w.usage(t0 + 90.0);
        assert!((half - 30.0).abs() < 1.5, "{half}");
        assert_eq!(w.usage(t0 + 200.0), 0.0);
        w.add(t0 + 300.0, 2.0);
        let Window::Sliding { buckets, .. } = &w else {
            unreachable!()
        };
        assert_eq!(buckets.len(), 1, "old buckets are dropped");
    }

    #[test]
    fn calendar_quota_resets_at_the_period_boundary() {
        let mut w = Window::for_budget(&budget("period='hour'"));
        let hour = 3600.0 * 500_000.0;
        w.add(hour + 10.0, 5.0);
        w.add(hour + 3599.0, 1.0);
        assert_eq!(w.usage(hour + 3599.5), 6.0);
        assert_eq!(w.usage(hour + 3600.0), 0.0);
        w.add(hour + 3601.0, 2.0);
        assert_eq!(w.usage(hour + 3602.0), 2.0);
    }

    #[test]
    fn a_restored_window_fits_only_the_same_shape() {
        let w = Window::for_budget(&budget("window='60s'"));
        assert!(w.fits(&budget("window='1m'")));
        assert!(!w.fits(&budget("window='2m'")));
        assert!(!w.fits(&budget("period='day'")));
        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(serde_json::from_str::<Window>(&json).unwrap(), w);
    }
}
