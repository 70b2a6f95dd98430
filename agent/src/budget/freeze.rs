//! Duty-cycle freezing: each cycle, every throttled cgroup runs for its share of the cycle and is
//! frozen for the rest. This holds any resource's rate (GPU time included: a frozen process
//! submits no work) to a fraction of what the workload would use.
//!
//! A frozen cgroup must never outlive the agent by more than one cycle, even when the agent is
//! killed with SIGKILL and runs no code of its own. So a guard process (`tally freeze-guard`,
//! started on first use) is told every cgroup the cycle may freeze, over a pipe; when the pipe
//! closes — the agent exited, however — it thaws them all and exits.

use std::collections::HashMap;
use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::state::thawed_value;

/// What went wrong duty-cycling a cgroup or talking to the guard.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("thawing {}", path.display())]
    Thaw {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("freezing {} for a hold", path.display())]
    Hold {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the freeze thread")]
    StartThread(#[source] std::io::Error),
    #[error("starting the freeze guard ({} freeze-guard)", program.display())]
    StartGuard {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the freeze guard has no stdin")]
    GuardStdin,
    #[error("telling the freeze guard")]
    TellGuard(#[source] std::io::Error),
}

/// A write of the cycle thread that failed: the thaw at the start of a cycle, or the freeze
/// when the cgroup's share has run.
#[derive(Debug, thiserror::Error)]
pub enum CycleError {
    #[error("thaw")]
    Thaw(#[source] std::io::Error),
    #[error("freeze")]
    Freeze(#[source] std::io::Error),
}

/// The freeze file of a cgroup: `cgroup.freeze` (v2) or `freezer.state` (v1).
pub fn frozen_value(freeze_file: &Path) -> &'static str {
    if freeze_file.ends_with("freezer.state") {
        "FROZEN"
    } else {
        "1"
    }
}

#[derive(Debug, Default)]
struct Cycle {
    period: Duration,
    /// Freeze file → fraction of each cycle the cgroup runs.
    shares: HashMap<PathBuf, f64>,
    stop: bool,
    /// Write failures, by file, since last taken.
    failures: HashMap<PathBuf, CycleError>,
}

#[derive(Debug, Default)]
struct Shared {
    cycle: Mutex<Cycle>,
    wake: Condvar,
}

/// The duty-cycle thread and its guard.
#[derive(Debug)]
pub struct Freezer {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    guard: Option<Guard>,
    /// The program that runs `freeze-guard` (this executable).
    guard_program: PathBuf,
}

#[derive(Debug)]
struct Guard {
    child: Child,
    stdin: ChildStdin,
}

impl Freezer {
    pub fn new(period: Duration) -> Freezer {
        Freezer {
            shared: Arc::new(Shared {
                cycle: Mutex::new(Cycle {
                    period,
                    ..Cycle::default()
                }),
                wake: Condvar::new(),
            }),
            thread: None,
            guard: None,
            guard_program: PathBuf::from("/proc/self/exe"),
        }
    }

    pub fn set_period(&mut self, period: Duration) {
        self.lock().period = period;
        self.shared.wake.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cycle> {
        self.shared
            .cycle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Duty-cycles the cgroup whose freeze file is `file` so it runs `share` of each cycle.
    /// The guard learns of it first: no freeze happens that the guard could not undo.
    pub fn set(&mut self, file: &Path, share: f64) -> Result<(), FreezeError> {
        let known = self.lock().shares.contains_key(file);
        if !known {
            self.tell_guard(&format!("+{}", file.display()))?;
        }
        let share = share.clamp(0.0, 1.0);
        {
            let mut cycle = self.lock();
            cycle.shares.insert(file.to_path_buf(), share);
            // A hold freezes now, not when the cycle thread next wakes; under the lock, so a
            // `remove` cannot come between.
            if share <= 0.0 {
                std::fs::write(file, frozen_value(file)).map_err(|source| FreezeError::Hold {
                    path: file.to_owned(),
                    source,
                })?;
            }
        }
        self.ensure_thread()?;
        self.shared.wake.notify_all();
        Ok(())
    }

    /// Stops duty-cycling `file` and thaws it.
    pub fn remove(&mut self, file: &Path) -> Result<(), FreezeError> {
        let removed = self.lock().shares.remove(file).is_some();
        let thawed = super::state::write_existing(file, thawed_value(file)).map_err(|source| {
            FreezeError::Thaw {
                path: file.to_owned(),
                source,
            }
        });
        if removed {
            // Best effort: the guard thawing an already thawed cgroup is harmless.
            let _ = self.tell_guard(&format!("-{}", file.display()));
        }
        thawed
    }

    pub fn share(&self, file: &Path) -> Option<f64> {
        self.lock().shares.get(file).copied()
    }

    /// Write failures of the cycle thread since the last call.
    pub fn take_failures(&self) -> HashMap<PathBuf, CycleError> {
        std::mem::take(&mut self.lock().failures)
    }

    /// Thaws everything and stops the thread; the guard exits when its pipe closes.
    pub fn stop(&mut self) {
        let files: Vec<PathBuf> = {
            let mut cycle = self.lock();
            cycle.stop = true;
            cycle.shares.drain().map(|(f, _)| f).collect()
        };
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        for file in files {
            if let Err(e) = super::state::write_existing(&file, thawed_value(&file)) {
                tracing::error!(file = %file.display(), error = %e, "thawing on stop failed");
            }
        }
        if let Some(mut guard) = self.guard.take() {
            drop(guard.stdin);
            let _ = guard.child.wait();
        }
    }

    fn ensure_thread(&mut self) -> Result<(), FreezeError> {
        if self.thread.is_some() {
            return Ok(());
        }
        let shared = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name("tally-freeze".into())
            .spawn(move || run_cycles(&shared))
            .map_err(FreezeError::StartThread)?;
        self.thread = Some(thread);
        Ok(())
    }

    /// Sends `line` to the guard; when that fails, to another guard started in its place.
    fn tell_guard(&mut self, line: &str) -> Result<(), FreezeError> {
        if let Err(e) = send(self.guard()?, line) {
            tracing::warn!(error = %tally_error_chain::chain(&e), "the freeze guard is gone; starting another");
            if let Some(mut old) = self.guard.take() {
                let _ = old.child.kill();
                let _ = old.child.wait();
            }
            send(self.guard()?, line)?;
        }
        Ok(())
    }

    /// The guard, started when there is none (and told every cgroup already cycled: a new
    /// guard knows nothing yet).
    fn guard(&mut self) -> Result<&mut Guard, FreezeError> {
        match self.guard {
            Some(ref mut guard) => Ok(guard),
            None => {
                let mut guard = self.spawn_guard()?;
                let known: Vec<PathBuf> = self.lock().shares.keys().cloned().collect();
                for file in known {
                    send(&mut guard, &format!("+{}", file.display()))?;
                }
                Ok(self.guard.insert(guard))
            }
        }
    }

    fn spawn_guard(&self) -> Result<Guard, FreezeError> {
        let mut child = Command::new(&self.guard_program)
            .arg("freeze-guard")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|source| FreezeError::StartGuard {
                program: self.guard_program.clone(),
                source,
            })?;
        let stdin = child.stdin.take().ok_or(FreezeError::GuardStdin)?;
        Ok(Guard { child, stdin })
    }
}

fn send(guard: &mut Guard, line: &str) -> Result<(), FreezeError> {
    writeln!(guard.stdin, "{line}")
        .and_then(|()| guard.stdin.flush())
        .map_err(FreezeError::TellGuard)
}

impl Drop for Freezer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The cycle: thaw everything at the start, freeze each cgroup when its share has run.
fn run_cycles(shared: &Shared) {
    raise_priority();
    let mut frozen: HashMap<PathBuf, bool> = HashMap::new();
    loop {
        let start = Instant::now();
        let (period, mut plan) = {
            let cycle = shared
                .cycle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if cycle.stop {
                return;
            }
            let plan: Vec<(PathBuf, f64)> =
                cycle.shares.iter().map(|(f, s)| (f.clone(), *s)).collect();
            (cycle.period, plan)
        };
        frozen.retain(|f, _| plan.iter().any(|(p, _)| p == f));
        let mut failures = HashMap::new();
        for (file, share) in &plan {
            // A share of 0 is a hold: frozen for the whole of every cycle, never thawed.
            if *share > 0.0 && frozen.get(file).copied().unwrap_or(true) {
                match std::fs::write(file, thawed_value(file)) {
                    Ok(()) => {
                        frozen.insert(file.clone(), false);
                    }
                    Err(e) => {
                        failures.insert(file.clone(), CycleError::Thaw(e));
                    }
                }
            }
        }
        plan.sort_by(|a, b| a.1.total_cmp(&b.1));
        for (file, share) in &plan {
            if *share >= 1.0 || (*share <= 0.0 && frozen.get(file) == Some(&true)) {
                continue;
            }
            let at = start + period.mul_f64(*share);
            if !sleep_until(shared, at) {
                return;
            }
            // Under the lock, and only while the cgroup is still cycled: a `remove` while this
            // thread slept thawed it, and a freeze written after that thaw would hold it frozen
            // for good (it is in no later plan, and the guard was told to forget it).
            let cycle = shared
                .cycle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !cycle.shares.contains_key(file) {
                continue;
            }
            match std::fs::write(file, frozen_value(file)) {
                Ok(()) => {
                    frozen.insert(file.clone(), true);
                }
                Err(e) => {
                    failures.insert(file.clone(), CycleError::Freeze(e));
                }
            }
            drop(cycle);
        }
        if !failures.is_empty() {
            shared
                .cycle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .failures
                .extend(failures);
        }
        if !sleep_until(shared, start + period) {
            return;
        }
    }
}

/// Cycle timing is the throttle's precision: ask for a higher priority than the tick thread's.
/// Without CAP_SYS_NICE this fails harmlessly.
fn raise_priority() {
    // SAFETY: gettid and setpriority take and return plain integers.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, -5);
    }
}

/// Sleeps until `at`; false when the freezer is stopping.
fn sleep_until(shared: &Shared, at: Instant) -> bool {
    let mut cycle = shared
        .cycle
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        if cycle.stop {
            return false;
        }
        let now = Instant::now();
        if now >= at {
            return true;
        }
        cycle = shared
            .wake
            .wait_timeout(cycle, at - now)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0;
    }
}

/// `tally freeze-guard`: reads `+FILE` / `-FILE` lines on stdin; at end of input (the agent
/// exited) thaws every file still listed. Ignores the signals a service stop sends, so it
/// outlives the agent long enough to thaw.
pub fn guard_main() -> std::process::ExitCode {
    // SAFETY: setting signal dispositions to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let mut files: Vec<PathBuf> = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if let Some(file) = line.strip_prefix('+') {
            files.push(PathBuf::from(file));
        } else if let Some(file) = line.strip_prefix('-') {
            files.retain(|f| f.as_path() != Path::new(file));
        }
    }
    let mut failed = false;
    for file in &files {
        if let Err(e) = super::state::write_existing(file, thawed_value(file)) {
            eprintln!("tally freeze-guard: thawing {}: {e}", file.display());
            failed = true;
        }
    }
    if !files.is_empty() {
        eprintln!(
            "tally freeze-guard: the agent exited; thawed {} cgroup(s)",
            files.len()
        );
    }
    if failed {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_removed_while_the_cycle_sleeps_is_never_frozen_again() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cgroup.freeze");
        std::fs::write(&file, "0").unwrap();
        let mut freezer = Freezer::new(Duration::from_millis(200));
        // A guard that reads its stdin to the end and does nothing: this test's cgroup is a file.
        let guard = dir.path().join("guard");
        std::fs::write(&guard, "#!/bin/sh\nexec cat >/dev/null\n").unwrap();
        std::fs::set_permissions(&guard, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        freezer.guard_program = guard;
        // Each removal lands at some point of the cycle; half of them while the thread sleeps
        // before the freeze it planned (share 0.5), which it must then not write.
        for round in 0..10 {
            freezer.set(&file, 0.5).unwrap();
            std::thread::sleep(Duration::from_millis(30 + 17 * round));
            freezer.remove(&file).unwrap();
            std::thread::sleep(Duration::from_millis(250));
            assert_eq!(
                std::fs::read_to_string(&file).unwrap(),
                "0",
                "round {round}: frozen after its removal"
            );
        }
        freezer.stop();
    }
}
