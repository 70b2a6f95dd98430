//! The tick thread, supervised. A tick that panics (a parser meeting input nobody foresaw, say)
//! must not stop metering for good while `/readyz` stays 200 and throttles stay on: it is caught,
//! logged and counted (`tally_collector_errors_total{collector="tick",reason="panic"}`, shown from
//! the next tick that completes), `/readyz` and `/healthz` answer 503 until a tick completes
//! again, `/metrics` keeps serving the last completed tick, and systemd's watchdog is not fed. After
//! [`GIVE_UP_AFTER`] failed ticks in a row every throttle is released: a budget nobody measures
//! must not hold a workload. The next tick that completes enforces again.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_exporters::Snapshot;

use crate::config::Config;
use crate::health::Shared;
use crate::host::layout::NoHierarchy;

/// Failed ticks in a row after which every throttle is released.
pub const GIVE_UP_AFTER: u32 = 3;

/// What the signal handler asks of the tick thread.
#[derive(Debug)]
pub enum Command {
    Reload(Box<Config>),
    Stop,
}

/// What the tick thread drives: [`crate::tick::Ticker`].
pub trait Tick {
    fn tick(&mut self) -> Snapshot;
    fn reconfigure(&mut self, config: &Config) -> Result<(), NoHierarchy>;
    /// Counts a tick that panicked.
    fn count_failed_tick(&mut self);
    /// Releases every throttle and keeps enforcement ready for when ticks complete again.
    fn release_throttles(&mut self);
    /// Releases every throttle on the way out.
    fn shutdown(&mut self);
}

impl Tick for crate::tick::Ticker {
    fn tick(&mut self) -> Snapshot {
        crate::tick::Ticker::tick(self)
    }

    fn reconfigure(&mut self, config: &Config) -> Result<(), NoHierarchy> {
        crate::tick::Ticker::reconfigure(self, config)
    }

    fn count_failed_tick(&mut self) {
        crate::tick::Ticker::count_failed_tick(self);
    }

    fn release_throttles(&mut self) {
        crate::tick::Ticker::release_throttles(self);
    }

    fn shutdown(&mut self) {
        crate::tick::Ticker::shutdown(self);
    }
}

/// Ticks every `interval` until told to stop, publishing each snapshot to `/metrics` and to
/// `snapshots` (OTLP).
pub fn tick_loop(
    mut ticker: impl Tick,
    mut interval: Duration,
    shared: Arc<Shared>,
    inbox: mpsc::Receiver<Command>,
    snapshots: tokio::sync::watch::Sender<Arc<Snapshot>>,
) {
    crate::sys::lower_priority();
    let watchdog = std::env::var_os("WATCHDOG_USEC").is_some();
    let mut first = true;
    let mut failed = 0u32;
    let mut next = Instant::now();
    loop {
        match catch_unwind(AssertUnwindSafe(|| ticker.tick())) {
            Ok(snapshot) => {
                if failed > 0 {
                    tracing::warn!(failed, "a tick completed again after failed ones");
                    failed = 0;
                }
                match tally_exporters::prometheus_text::render(&snapshot, shared.gzip_wanted()) {
                    Ok(rendered) => shared.publish(rendered),
                    Err(e) => tracing::error!(
                        error = %e,
                        "rendering /metrics failed; serving the previous tick"
                    ),
                }
                // No receiver (OTLP off) is fine.
                let _ = snapshots.send(Arc::new(snapshot));
                shared.beat("tick", (interval * 3).max(Duration::from_secs(5)));
                if first {
                    notify(&[("READY", "1")]);
                    first = false;
                } else if watchdog {
                    notify(&[("WATCHDOG", "1")]);
                }
            }
            Err(panic) => {
                failed += 1;
                shared.fail("tick");
                tracing::error!(
                    failed,
                    panic = %panic_message(&*panic),
                    "tick failed: serving the last completed tick's /metrics; /readyz and /healthz answer 503"
                );
                guarded("counting the failed tick", || ticker.count_failed_tick());
                if failed == GIVE_UP_AFTER {
                    tracing::error!(
                        failed,
                        "ticks keep failing: releasing every throttle until one completes"
                    );
                    guarded("releasing every throttle", || ticker.release_throttles());
                }
            }
        }
        next += interval;
        let now = Instant::now();
        if next < now {
            // Fell behind (a slow tick or a suspended VM): skip the missed ticks, keep the phase.
            next = now + interval;
        }
        loop {
            match inbox.recv_timeout(next.saturating_duration_since(Instant::now())) {
                Ok(Command::Reload(config)) => {
                    if let Err(e) = ticker.reconfigure(&config) {
                        tracing::error!(error = %e, "reload: keeping the previous cgroup layout");
                    }
                    interval = config.tick_interval();
                    next = next.min(Instant::now() + interval);
                }
                Ok(Command::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    guarded("releasing every throttle on the way out", || {
                        ticker.shutdown()
                    });
                    return;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
            }
        }
    }
}

/// Runs `f`, logging a panic in it instead of letting it end the thread.
fn guarded(what: &str, f: impl FnOnce()) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(f)) {
        tracing::error!(panic = %panic_message(&*panic), "{what} failed");
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "a panic without a message"
    }
}

/// sd_notify when running under systemd (`NOTIFY_SOCKET` set); a no-op otherwise.
pub fn notify(state: &[(&str, &str)]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = systemd::daemon::notify(false, state.iter()) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A ticker that panics on the ticks its script says, recording what it was asked and, at the
    /// start of each tick, what `/readyz` and `/healthz` said after the one before.
    struct Scripted {
        log: Arc<Mutex<Vec<&'static str>>>,
        /// Per tick, whether it panics; after the last, the loop is told to stop.
        script: Vec<bool>,
        ticks: usize,
        shared: Arc<Shared>,
        seen: Arc<Mutex<Vec<(bool, bool)>>>,
        commands: mpsc::Sender<Command>,
    }

    impl Tick for Scripted {
        fn tick(&mut self) -> Snapshot {
            let state = (self.shared.is_ready(), self.shared.health().0);
            self.seen.lock().unwrap().push(state);
            let panics = self.script[self.ticks];
            self.ticks += 1;
            if self.ticks == self.script.len() {
                self.commands.send(Command::Stop).unwrap();
            }
            if panics {
                self.log.lock().unwrap().push("panic");
                panic!("tick {} broke", self.ticks);
            }
            self.log.lock().unwrap().push("tick");
            Snapshot::default()
        }

        fn reconfigure(&mut self, _: &Config) -> Result<(), NoHierarchy> {
            Ok(())
        }

        fn count_failed_tick(&mut self) {
            self.log.lock().unwrap().push("counted");
        }

        fn release_throttles(&mut self) {
            self.log.lock().unwrap().push("released");
        }

        fn shutdown(&mut self) {
            self.log.lock().unwrap().push("shutdown");
        }
    }

    /// Runs the loop over `script`; returns what the ticker was asked, and (ready, healthy)
    /// after each tick.
    fn run(script: &[bool]) -> (Vec<&'static str>, Vec<(bool, bool)>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::new(Shared::default());
        let (commands, inbox) = mpsc::channel();
        let ticker = Scripted {
            log: log.clone(),
            script: script.to_vec(),
            ticks: 0,
            shared: shared.clone(),
            seen: seen.clone(),
            commands,
        };
        let (snapshots, _rx) = tokio::sync::watch::channel(Arc::new(Snapshot::default()));
        let thread = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                tick_loop(ticker, Duration::from_millis(1), shared, inbox, snapshots)
            })
        };
        thread.join().unwrap();
        let mut seen = seen.lock().unwrap().clone();
        // Before the first tick: not ready, and no component to be unhealthy.
        assert_eq!(seen.remove(0), (false, true));
        seen.push((shared.is_ready(), shared.health().0));
        let log = log.lock().unwrap().clone();
        (log, seen)
    }

    #[test]
    fn a_panicking_tick_is_counted_reported_and_survived() {
        let (log, seen) = run(&[false, true, false]);
        assert_eq!(
            log,
            ["tick", "panic", "counted", "tick", "shutdown"],
            "the thread outlives the panic and ticks again"
        );
        // Red while the last tick failed, green once one completes again.
        assert_eq!(seen, [(true, true), (false, false), (true, true)]);
    }

    #[test]
    fn throttles_are_released_once_ticks_keep_failing() {
        let (log, seen) = run(&[true, true, true, true, false]);
        assert_eq!(
            log,
            [
                "panic", "counted", "panic", "counted", "panic", "counted", "released", "panic",
                "counted", "tick", "shutdown"
            ]
        );
        assert_eq!(
            seen,
            [
                (false, false),
                (false, false),
                (false, false),
                (false, false),
                (true, true)
            ]
        );
    }
}
