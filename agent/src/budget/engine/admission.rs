//! Hold at start, the admission fallback without a runtime hook: a workload that starts while a
//! `admission = "deny"` budget selecting it is enforced is frozen from the first tick that sees
//! it, and stays frozen until that budget is released. Workloads found running when the agent
//! starts are never held: they were admitted before it.

use super::*;

/// A held workload: which subject holds it, since when, and its labels for metrics and alerts.
#[derive(Debug, Clone)]
pub(super) struct Hold {
    pub subject: SubjectKey,
    pub since: f64,
    pub labels: LabelSet,
}

/// The admission decisions, as `tally_admission_decisions_total`'s `decision` label.
pub(super) const DECISIONS: [&str; 3] = ["admit", "hold", "exempt"];

impl Engine {
    /// Decides a new workload's admission under a `deny` budget whose subject `subject` was
    /// enforced (or not) at the last evaluation.
    pub(super) fn admit(
        &mut self,
        key: ThrottleKey,
        subject: SubjectKey,
        enforced: bool,
        labels: &LabelSet,
        now: f64,
    ) {
        let label = |name: &str| label_value(labels, name);
        let exempt = self.exempt.contains(&label("namespace"));
        let decision = match (exempt, enforced) {
            (true, _) => "exempt",
            (false, true) => "hold",
            (false, false) => "admit",
        };
        *self
            .admissions
            .entry((key.budget.to_string(), decision))
            .or_default() += 1;
        if decision != "hold" {
            return;
        }
        tracing::warn!(
            budget = %key.budget,
            workload = %key.workload,
            subject = subject.id.as_str(),
            namespace = %label("namespace"),
            pod = %label("pod"),
            container = %label("container"),
            unit = %label("unit"),
            "admission denied: the workload started while its budget is spent; held frozen until the budget is released"
        );
        if let Some(alerts) = &self.alerts {
            let mut alert = BTreeMap::from([
                ("alertname".to_owned(), "TallyAdmissionHeld".to_owned()),
                ("severity".to_owned(), "warning".to_owned()),
                ("budget".to_owned(), key.budget.to_string()),
                ("node".to_owned(), self.node.clone()),
                ("workload".to_owned(), key.workload.to_string()),
            ]);
            for name in ["namespace", "pod", "container", "unit"] {
                let v = label(name);
                if !v.is_empty() {
                    alert.insert(name.to_owned(), v);
                }
            }
            let annotations = BTreeMap::from([(
                "summary".to_owned(),
                format!(
                    "{} started while budget {} is spent: held frozen until it is released",
                    key.workload, key.budget
                ),
            )]);
            alerts.fire(hold_alert_key(&key), alert, annotations);
        }
        self.holds.insert(
            key,
            Hold {
                subject,
                since: now,
                labels: labels.clone(),
            },
        );
    }

    /// Lets go of the holds whose budget is no longer enforced, or whose workload is gone.
    pub(super) fn settle_holds(&mut self, now: f64) {
        let subjects = &self.subjects;
        let mut lifted = Vec::new();
        self.holds.retain(|key, hold| {
            let keep = subjects.get(&hold.subject).is_some_and(|s| {
                s.enforcing && s.members.iter().any(|m| m.workload == key.workload)
            });
            if !keep {
                lifted.push((key.clone(), now - hold.since));
            }
            keep
        });
        for (key, held_for) in lifted {
            tracing::info!(
                budget = %key.budget,
                workload = %key.workload,
                held_secs = held_for,
                "admission hold lifted: the budget was released or the workload is gone"
            );
            if let Some(alerts) = &self.alerts {
                alerts.resolve(hold_alert_key(&key));
            }
        }
    }
}

fn hold_alert_key(key: &ThrottleKey) -> String {
    format!("held/{}/{}", key.budget, key.workload)
}
