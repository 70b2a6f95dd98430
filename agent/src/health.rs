//! Liveness from per-component heartbeats and readiness, shared between the tick thread, the
//! HTTP server and the signal handler.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use serde::Serialize;
use tally_exporters::prometheus_text::Rendered;

/// What the HTTP server reads; written by the tick thread once per tick.
#[derive(Debug, Default)]
pub struct Shared {
    rendered: RwLock<Arc<Body>>,
    ready: AtomicBool,
    draining: AtomicBool,
    /// Set by the first scrape that asks for gzip; from then on every tick compresses.
    gzip_wanted: AtomicBool,
    beats: Mutex<BTreeMap<&'static str, Beat>>,
}

/// The last rendered `/metrics` body, plain and gzip; cloning shares the bytes.
#[derive(Debug, Default)]
pub struct Body {
    pub text: Bytes,
    pub gzip: Bytes,
}

#[derive(Debug, Clone, Copy)]
struct Beat {
    last: Instant,
    /// Older than this and the component counts as stuck.
    max_age: Duration,
    /// Its last run failed (the tick panicked): unhealthy and not ready until it beats again.
    failed: bool,
}

/// One component's line in `/healthz`.
#[derive(Debug, Serialize)]
pub struct ComponentHealth {
    pub healthy: bool,
    /// Its last run failed (rather than stopped beating).
    pub failed: bool,
    pub last_beat_seconds_ago: f64,
    pub max_age_seconds: f64,
}

impl Shared {
    pub fn publish(&self, rendered: Rendered) {
        let rendered = Arc::new(Body {
            text: Bytes::from(rendered.text),
            gzip: Bytes::from(rendered.gzip),
        });
        match self.rendered.write() {
            Ok(mut slot) => *slot = rendered,
            Err(poisoned) => *poisoned.into_inner() = rendered,
        }
        self.ready.store(true, Ordering::Release);
    }

    pub fn rendered(&self) -> Arc<Body> {
        match self.rendered.read() {
            Ok(slot) => slot.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Ready once the first tick has been published, until draining starts, and not while a
    /// component's last run failed.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && !self.draining.load(Ordering::Acquire)
            && !self.lock_beats().values().any(|b| b.failed)
    }

    /// A scraper asked for gzip: render it from the next tick on.
    pub fn want_gzip(&self) {
        self.gzip_wanted.store(true, Ordering::Relaxed);
    }

    pub fn gzip_wanted(&self) -> bool {
        self.gzip_wanted.load(Ordering::Relaxed)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn beat(&self, component: &'static str, max_age: Duration) {
        self.lock_beats().insert(
            component,
            Beat {
                last: Instant::now(),
                max_age,
                failed: false,
            },
        );
    }

    /// `component`'s last run failed: unhealthy and not ready until its next beat.
    pub fn fail(&self, component: &'static str) {
        let mut beats = self.lock_beats();
        let beat = beats.entry(component).or_insert(Beat {
            last: Instant::now(),
            max_age: Duration::ZERO,
            failed: true,
        });
        beat.failed = true;
    }

    fn lock_beats(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Beat>> {
        self.beats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every component's state; healthy overall when each has beaten recently.
    pub fn health(&self) -> (bool, BTreeMap<&'static str, ComponentHealth>) {
        let beats = self.lock_beats();
        let now = Instant::now();
        let components: BTreeMap<_, _> = beats
            .iter()
            .map(|(name, beat)| {
                let age = now.duration_since(beat.last);
                (
                    *name,
                    ComponentHealth {
                        healthy: !beat.failed && age <= beat.max_age,
                        failed: beat.failed,
                        last_beat_seconds_ago: age.as_secs_f64(),
                        max_age_seconds: beat.max_age.as_secs_f64(),
                    },
                )
            })
            .collect();
        let healthy = components.values().all(|c| c.healthy);
        (healthy, components)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_first_publish_and_draining() {
        let shared = Shared::default();
        assert!(!shared.is_ready());
        shared.publish(Rendered::default());
        assert!(shared.is_ready());
        shared.start_draining();
        assert!(!shared.is_ready());
    }

    #[test]
    fn a_component_that_stops_beating_is_unhealthy() {
        let shared = Shared::default();
        shared.beat("tick", Duration::from_secs(60));
        shared.beat("stuck", Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        let (healthy, components) = shared.health();
        assert!(!healthy);
        assert!(components["tick"].healthy);
        assert!(!components["stuck"].healthy);
    }
}
