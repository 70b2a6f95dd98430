//! Throttles: which ones the decisions want, reconciling them with those in force (recorded in
//! the state file first), releasing, and noticing when one holds a workload back.

use super::*;
use crate::budget::actuator::{Member, Plan};
use tally_ebpf::chain;

impl Engine {
    /// Marks the subjects whose throttles held them back since the last tick.
    pub(super) fn find_binding(&mut self) {
        self.actuators.refresh();
        let shared: HashSet<&str> = self
            .budgets
            .iter()
            .filter(|c| c.budget.shared)
            .map(|c| c.budget.name.as_str())
            .collect();
        for s in self.subjects.values_mut() {
            s.binding = false;
        }
        for (key, t) in &self.throttles {
            let count = self.actuators.get(t.action).and_then(|a| a.held_back(t));
            let binding = match (t.action, count) {
                // A steered freeze below a full share is holding the rate down.
                (Action::Freeze, _) => {
                    self.budgets.iter().any(|c| {
                        c.budget.name == t.budget && matches!(c.target, Target::FreezeRate(_))
                    }) && t.setting < 0.999
                }
                (_, Some(n)) => {
                    let before = self.held_back.insert(key.clone(), n);
                    before.is_none_or(|b| n > b)
                }
                (_, None) => false,
            };
            if binding {
                let subject = if shared.contains(t.budget.as_str()) {
                    SHARED.to_owned()
                } else {
                    t.subject.clone()
                };
                if let Some(s) = self.subjects.get_mut(&(t.budget.clone(), subject)) {
                    s.binding = true;
                }
            }
        }
        let throttles = &self.throttles;
        self.held_back.retain(|k, _| throttles.contains_key(k));
    }

    /// Steers the running share of rate-held freezes: the share that would have made the last
    /// tick's rate the budget's, moved at most a factor of two per tick.
    pub(super) fn steer_freeze(&mut self, elapsed: f64) {
        if elapsed <= 0.0 {
            return;
        }
        for c in &self.budgets {
            let Target::FreezeRate(target) = c.target else {
                continue;
            };
            for ((name, _), s) in self.subjects.iter_mut() {
                if name != &c.budget.name || !s.enforcing {
                    continue;
                }
                let rate = s.last_amount / elapsed;
                let share = s.freeze_share.max(MIN_SHARE);
                let wanted = if rate > 0.0 {
                    share * target / rate
                } else {
                    share * MAX_STEP
                };
                s.freeze_share = wanted
                    .clamp(share / MAX_STEP, share * MAX_STEP)
                    .clamp(MIN_SHARE, 1.0);
            }
        }
    }

    /// What should be in force: (budget, workload) → (action, setting, member).
    pub(super) fn desired(&self) -> BTreeMap<(String, String), Wanted> {
        let mut want = BTreeMap::new();
        if !self.enforce {
            return want;
        }
        for c in &self.budgets {
            let b = &c.budget;
            if b.dry_run || !b.action.actuates() {
                continue;
            }
            for ((name, _), s) in &self.subjects {
                if name != &b.name || !s.enforcing || s.members.is_empty() {
                    continue;
                }
                let n = s.members.len() as f64;
                let setting = match c.target {
                    Target::CpuCores(v)
                    | Target::EgressBytesPerSec(v)
                    | Target::DiskBytesPerSec(v) => v / n,
                    Target::FreezeShare(v) => v,
                    Target::FreezeRate(_) => s.freeze_share,
                    Target::Terminate | Target::None => 0.0,
                };
                let scope = b
                    .scope
                    .as_deref()
                    .and_then(|s| policy::SCOPES.iter().position(|x| *x == s))
                    .map(|i| i as u32);
                for (wkey, dirs, id) in &s.members {
                    want.insert(
                        (b.name.clone(), wkey.clone()),
                        Wanted {
                            action: b.action,
                            setting,
                            dirs: dirs.clone(),
                            v2_id: *id,
                            scope,
                        },
                    );
                }
            }
        }
        want
    }

    /// Makes the throttles in force the desired ones. New and changed throttles are recorded in
    /// the state file before they are applied.
    pub(super) fn reconcile(&mut self, inputs: &Inputs<'_>, now: f64) {
        let want = self.desired();
        // Release what is no longer wanted.
        let stale: Vec<(String, String)> = self
            .throttles
            .keys()
            .filter(|k| !want.contains_key(*k))
            .cloned()
            .collect();
        let mut changed = !stale.is_empty();
        for key in stale {
            if let Some(t) = self.throttles.remove(&key) {
                self.release(&t);
            }
        }
        // Plan what is new or changed.
        let mut to_apply = Vec::new();
        for (key, w) in want {
            let Wanted {
                action,
                setting,
                dirs,
                v2_id,
                scope,
            } = w;
            let Some(actuator) = self.actuators.get(action) else {
                continue;
            };
            let current = self.throttles.get(&key);
            if let Some(t) = current {
                if (t.setting - setting).abs() <= setting.abs() * 1e-3 {
                    if actuator.needs_reapply(t, setting) {
                        to_apply.push((key, action, setting, None));
                    }
                    continue;
                }
            }
            let member = Member {
                dirs: &dirs,
                v2_id,
                scope,
            };
            let Plan {
                mut writes,
                freeze,
                egress,
            } = match actuator.plan(member, setting) {
                Ok(p) => p,
                Err(e) => {
                    self.fail(&key.0, action, "unavailable", &chain(&e));
                    continue;
                }
            };
            // A changed setting keeps what the file held before Tally first touched it.
            if let Some(old) = current {
                for w in &mut writes {
                    if let Some(o) = old.writes.iter().find(|o| {
                        o.path == w.path && first_field(&o.original) == first_field(&w.original)
                    }) {
                        w.original = o.original.clone();
                    }
                }
            }
            let first = current.is_none();
            self.throttles.insert(
                key.clone(),
                Throttle {
                    budget: key.0.clone(),
                    subject: key.1.clone(),
                    action,
                    setting,
                    writes,
                    freeze,
                    egress,
                    applied_at: now,
                },
            );
            changed = true;
            to_apply.push((key, action, setting, first.then_some((dirs, v2_id, scope))));
        }
        if changed {
            // Recorded before applied: a crash between the two leaves a record of a throttle
            // that may not be there, which releasing handles; never the reverse.
            self.save(now);
        }
        for (key, action, setting, new) in to_apply {
            let (Some(t), Some(actuator)) =
                (self.throttles.get(&key), self.actuators.get_mut(action))
            else {
                continue;
            };
            let member = new.as_ref().map(|(dirs, v2_id, scope)| Member {
                dirs,
                v2_id: *v2_id,
                scope: *scope,
            });
            match actuator.apply(t, setting, member) {
                Ok(()) => {
                    if new.is_some() {
                        let latency = inputs.tick_started.elapsed();
                        self.observe_latency(latency);
                        self.applied.insert(key.clone(), latency);
                    }
                }
                Err(e) => self.fail(&key.0, action, "apply", &chain(&e)),
            }
        }
    }

    /// Undoes a throttle: what its actuator holds, then the files its record lists.
    pub(super) fn release(&mut self, t: &Throttle) {
        let released = self
            .actuators
            .get_mut(t.action)
            .map_or(Ok(()), |a| a.release(t));
        if let Err(e) = released {
            self.fail(&t.budget, t.action, "release", &chain(&e));
        }
        for e in state::release_files(t) {
            self.fail(&t.budget, t.action, "release", &e);
        }
    }

    pub(super) fn fail(&mut self, budget: &str, action: Action, reason: &'static str, error: &str) {
        let key = (budget.to_owned(), action.as_str(), reason.to_owned());
        let n = self.errors.entry(key).or_default();
        // Logged the first time and then every 60th, counted always.
        if *n % 60 == 0 {
            tracing::error!(
                budget,
                action = action.as_str(),
                reason,
                error,
                "enforcement failed"
            );
        }
        *n += 1;
    }

    pub(super) fn observe_latency(&mut self, latency: Duration) {
        let s = latency.as_secs_f64();
        for (bound, count) in &mut self.latency.buckets {
            if s <= *bound {
                *count += 1;
            }
        }
        self.latency.sum += s;
        self.latency.count += 1;
    }
}
