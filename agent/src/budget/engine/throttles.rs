//! Throttles: reconciling the ones the decisions want with those in force (recorded in the
//! state file first) through the actuators, releasing, and noticing when one holds a workload
//! back.

use super::decide::Wanted;
use super::*;
use crate::budget::actuator::{ActuatorError, CgroupDirs, Plan, Site};
use tally_error_chain::chain;

impl Engine {
    /// Marks the subjects whose throttles held them back since the last tick.
    pub(super) fn find_binding(&mut self) {
        self.actuators.refresh();
        for s in self.subjects.values_mut() {
            s.binding = false;
        }
        for (key, t) in &self.throttles {
            let budget = self.policy.get(&key.budget);
            let count = self.actuators.get(t.action).and_then(|a| a.held_back(t));
            let binding = match (t.action, count) {
                // A steered freeze below a full share is holding the rate down.
                (Action::Freeze, _) => {
                    budget.is_some_and(|c| matches!(c.target, Target::FreezeRate(_)))
                        && t.setting < 0.999
                }
                (_, Some(n)) => {
                    let before = self.held_back.insert(key.clone(), n);
                    before.is_none_or(|b| n > b)
                }
                (_, None) => false,
            };
            if binding {
                if budget.is_some_and(|c| c.grouped()) {
                    // The group (or the one shared subject) the workload is a member of.
                    if let Some((_, s)) = self.subjects.iter_mut().find(|(k, s)| {
                        k.budget == key.budget
                            && s.members.iter().any(|m| m.workload == key.workload)
                    }) {
                        s.binding = true;
                    }
                } else {
                    let subject = SubjectKey {
                        budget: key.budget.clone(),
                        id: SubjectId::Workload(key.workload.clone()),
                    };
                    if let Some(s) = self.subjects.get_mut(&subject) {
                        s.binding = true;
                    }
                }
            }
        }
        let throttles = &self.throttles;
        self.held_back.retain(|k, _| throttles.contains_key(k));
    }

    /// Makes the throttles in force the desired ones. New and changed throttles are recorded in
    /// the state file before they are applied.
    pub(super) fn reconcile(
        &mut self,
        layout: &Layout,
        tick_started: Instant,
        now: f64,
        errors: &mut ErrorCounts,
    ) {
        let want = self.desired();
        // Release what is no longer wanted, or wanted through another actuator now.
        let stale: Vec<ThrottleKey> = self
            .throttles
            .iter()
            .filter(|(k, t)| want.get(*k).is_none_or(|w| w.action != t.action))
            .map(|(k, _)| k.clone())
            .collect();
        let mut changed = !stale.is_empty();
        for key in stale {
            if let Some(t) = self.throttles.remove(&key) {
                self.release(&t, errors);
            }
        }
        // Plan what is new or changed.
        let mut to_apply = Vec::new();
        for (key, w) in want {
            let Wanted {
                action,
                setting,
                member,
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
            let dirs = CgroupDirs::new(layout, &member.rel);
            let v2_id = member.v2_id;
            let site = Site {
                dirs: &dirs,
                rel: &member.rel,
                v2_id,
                scope,
            };
            let Plan {
                mut writes,
                freeze,
                egress,
            } = match actuator.plan(site, setting) {
                Ok(p) => p,
                Err(e) => {
                    self.fail(errors, &key.budget, action, "unavailable", &chain(&e));
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
                    budget: key.budget.to_string(),
                    subject: key.workload.to_string(),
                    action,
                    setting,
                    writes,
                    freeze,
                    egress,
                    applied_at: now,
                },
            );
            changed = true;
            let new = first.then(|| (dirs, member.rel.clone(), v2_id, scope));
            to_apply.push((key, action, setting, new));
        }
        if changed {
            // Recorded before applied: a crash between the two leaves a record of a throttle
            // that may not be there, which releasing handles; never the reverse.
            self.save(now, errors);
        }
        for (key, action, setting, new) in to_apply {
            let (Some(t), Some(actuator)) =
                (self.throttles.get(&key), self.actuators.get_mut(action))
            else {
                continue;
            };
            let site = new.as_ref().map(|(dirs, rel, v2_id, scope)| Site {
                dirs,
                rel,
                v2_id: *v2_id,
                scope: *scope,
            });
            match actuator.apply(t, setting, site) {
                Ok(()) => {
                    if new.is_some() {
                        let latency = tick_started.elapsed();
                        self.observe_latency(latency);
                        self.applied.insert(key.clone(), latency);
                    }
                }
                Err(e) => self.fail_apply(errors, &key.budget, action, &e),
            }
        }
    }

    /// Undoes a throttle: what its actuator holds, then the files its record lists.
    pub(super) fn release(&mut self, t: &Throttle, errors: &mut ErrorCounts) {
        let released = self
            .actuators
            .get_mut(t.action)
            .map_or(Ok(()), |a| a.release(t));
        if let Err(e) = released {
            self.fail(errors, &t.budget, t.action, "release", &chain(&e));
        }
        for e in state::release_files(t) {
            self.fail(errors, &t.budget, t.action, "release", &e);
        }
    }

    /// Counts a throttle that could not be applied: each block device that refused its rule
    /// (`reason="device"`; the others have theirs), or the whole throttle (`reason="apply"`).
    pub(super) fn fail_apply(
        &self,
        errors: &mut ErrorCounts,
        budget: &str,
        action: Action,
        e: &ActuatorError,
    ) {
        match e {
            ActuatorError::Devices { failed, .. } => {
                for device in failed {
                    self.fail(errors, budget, action, "device", &chain(device));
                }
            }
            e => self.fail(errors, budget, action, "apply", &chain(e)),
        }
    }

    /// Counts a failed throttle in `errors`, logged the first time and then every 60th.
    pub(super) fn fail(
        &self,
        errors: &mut ErrorCounts,
        budget: &str,
        action: Action,
        reason: &'static str,
        error: &str,
    ) {
        let n = errors.count(&ENFORCEMENT_ERRORS, &[budget, action.as_str(), reason]);
        if (n - 1) % 60 == 0 {
            tracing::error!(
                budget,
                action = action.as_str(),
                reason,
                error,
                "enforcement failed"
            );
        }
    }

    pub(super) fn observe_latency(&mut self, latency: Duration) {
        self.latency.observe(latency.as_secs_f64());
    }
}
