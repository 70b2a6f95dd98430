//! The engine's metric families.

use super::*;
use crate::catalogue;

impl Engine {
    /// Shows every enforcement failure a budget can have from zero (`errors` counts them), so
    /// the first is an increase; forgets the zero rows of budgets a reload removed.
    pub fn expect_errors(&self, errors: &mut ErrorCounts) {
        errors.forget_unused(&ENFORCEMENT_ERRORS);
        if self.policy.is_empty() && self.throttles.is_empty() {
            return;
        }
        for c in self
            .policy
            .budgets
            .iter()
            .filter(|c| c.budget.action.actuates())
        {
            // Only disk throttles write one rule per device, each of which can fail alone.
            let device = (c.budget.action == Action::Disk).then_some("device");
            for reason in ["unavailable", "apply", "release"]
                .into_iter()
                .chain(device)
            {
                let labels = [c.budget.name.as_str(), c.budget.action.as_str(), reason];
                errors.expect(&ENFORCEMENT_ERRORS, &labels);
            }
        }
        errors.expect(&ENFORCEMENT_ERRORS, &["", "state", "save"]);
        errors.expect(&ENFORCEMENT_ERRORS, &["", "state", "unreadable"]);
    }

    /// The engine's metric families; none on a node without budgets (nor throttles left).
    pub fn families(&self) -> Vec<Family> {
        let nri = self
            .board
            .as_ref()
            .map(|b| b.families())
            .unwrap_or_default();
        if self.policy.is_empty() && self.throttles.is_empty() {
            return nri;
        }
        let mut ratio = Family::new(&catalogue::budget::USAGE_RATIO);
        let mut usage = Family::new(&catalogue::budget::USAGE);
        let mut limit = Family::new(&catalogue::budget::LIMIT);
        let mut active = Family::new(&catalogue::budget::ENFORCEMENT_ACTIVE);
        let mut share = Family::new(&catalogue::budget::ENFORCEMENT_FREEZE_SHARE_RATIO);
        for c in &self.policy.budgets {
            let b = &c.budget;
            let extra = || {
                vec![
                    ("budget", Arc::from(b.name.as_str())),
                    ("resource", Arc::from(b.resource.as_str())),
                ]
            };
            limit.push_labeled(extra(), b.limit);
            let enforced = self.enforce && !b.dry_run && b.action.actuates();
            for (key, s) in self.subjects.iter() {
                if key.budget != c.name {
                    continue;
                }
                ratio.samples.push(sample(&s.labels, extra(), s.ratio));
                usage.samples.push(sample(&s.labels, extra(), s.usage));
                // An enforced budget is active where its throttle is in place, not merely
                // decided: a throttle that failed to apply is an error, not a throttle.
                let in_place = !enforced
                    || s.members.iter().any(|m| {
                        self.throttles.contains_key(&ThrottleKey {
                            budget: c.name.clone(),
                            workload: m.workload.clone(),
                        })
                    });
                active.samples.push(sample(
                    &s.labels,
                    vec![
                        ("budget", Arc::from(b.name.as_str())),
                        ("action", Arc::from(b.action.as_str())),
                        (
                            "dry_run",
                            Arc::from(if enforced { "false" } else { "true" }),
                        ),
                    ],
                    if s.enforcing && in_place { 1.0 } else { 0.0 },
                ));
                if s.enforcing
                    && enforced
                    && matches!(c.target, Target::FreezeRate(_) | Target::FreezeShare(_))
                {
                    let v = match c.target {
                        Target::FreezeShare(v) => v,
                        _ => s.freeze_share,
                    };
                    share.samples.push(sample(
                        &s.labels,
                        vec![("budget", Arc::from(b.name.as_str()))],
                        v,
                    ));
                }
            }
        }
        let mut actions = Family::new(&catalogue::budget::ENFORCEMENT_ACTIONS);
        // Every budget's events from zero, so the first one is an increase.
        let mut counts: BTreeMap<(String, &'static str, &'static str), u64> = self
            .policy
            .budgets
            .iter()
            .flat_map(|c| {
                [Event::Warn, Event::Enforce, Event::Release].map(|e| {
                    (
                        (c.budget.name.clone(), c.budget.action.as_str(), e.as_str()),
                        0,
                    )
                })
            })
            .collect();
        counts.extend(self.actions.iter().map(|(k, v)| (k.clone(), *v)));
        for ((budget, action, event), n) in &counts {
            actions.push_labeled(
                vec![
                    ("budget", Arc::from(budget.as_str())),
                    ("action", Arc::from(*action)),
                    ("event", Arc::from(*event)),
                ],
                *n as f64,
            );
        }
        let mut latency = Family::new(&catalogue::budget::ENFORCEMENT_LATENCY_SECONDS);
        latency.push_histogram(&Arc::from([]), Vec::new(), self.latency.clone());
        let mut throttles = Family::new(&catalogue::budget::ENFORCEMENT_THROTTLES);
        let mut by_action: BTreeMap<&'static str, u64> = [
            Action::Cpu,
            Action::Network,
            Action::Disk,
            Action::Freeze,
            Action::Terminate,
        ]
        .iter()
        .map(|a| (a.as_str(), 0))
        .collect();
        for t in self.throttles.values() {
            *by_action.entry(t.action.as_str()).or_default() += 1;
        }
        for (action, n) in by_action {
            throttles.push_labeled(vec![("action", Arc::from(action))], n as f64);
        }
        let mut held = Family::new(&catalogue::budget::ADMISSION_HELD);
        for (key, hold) in &self.holds {
            held.samples.push(sample(
                &hold.labels,
                vec![("budget", Arc::from(&*key.budget))],
                1.0,
            ));
        }
        let mut decisions = Family::new(&catalogue::budget::ADMISSION_DECISIONS);
        // Every admission budget's decisions from zero.
        let mut counts: BTreeMap<(String, &'static str), u64> = self
            .policy
            .budgets
            .iter()
            .filter(|c| c.budget.admission != policy::Admission::None)
            .flat_map(|c| {
                let at_creation = match c.budget.admission {
                    policy::Admission::Throttle => "throttle",
                    _ => "deny",
                };
                admission::DECISIONS
                    .into_iter()
                    .chain([at_creation])
                    .map(|d| ((c.budget.name.clone(), d), 0))
            })
            .collect();
        counts.extend(self.admissions.iter().map(|(k, v)| (k.clone(), *v)));
        if let Some(board) = &self.board {
            counts.extend(
                board
                    .by_budget()
                    .into_iter()
                    .map(|((budget, d), n)| ((budget.to_string(), d), n)),
            );
        }
        for ((budget, decision), n) in counts {
            decisions.push_labeled(
                vec![
                    ("budget", Arc::from(budget.as_str())),
                    ("decision", Arc::from(decision)),
                ],
                n as f64,
            );
        }
        let mut families = vec![
            ratio, usage, limit, active, share, actions, latency, throttles, held, decisions,
        ];
        if let Some(cluster) = &self.cluster {
            families.extend(cluster.families());
        }
        families.extend(nri);
        families
    }
}

fn sample(
    labels: &LabelSet,
    extra: Vec<(&'static str, Arc<str>)>,
    value: f64,
) -> tally_exporters::Sample {
    tally_exporters::Sample {
        labels: labels.clone(),
        extra,
        value,
        histogram: None,
    }
}
