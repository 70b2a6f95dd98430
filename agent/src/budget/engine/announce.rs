//! State changes told: a structured log event, journald fields under systemd, counters, and
//! alerts to the sender.

use super::*;

impl Engine {
    /// Logs, counts and alerts a state change.
    pub(super) fn announce(&mut self, key: &SubjectKey, event: Event) {
        let Some(c) = self.policy.get(&key.budget) else {
            return;
        };
        let subject = key.id.as_str();
        let b = &c.budget;
        let (usage, ratio, labels, members) =
            self.subjects
                .get(key)
                .map_or((0.0, 0.0, empty_labels(), Vec::new()), |s| {
                    let members: Vec<WorkloadKey> =
                        s.members.iter().map(|m| m.workload.clone()).collect();
                    (s.usage, s.ratio, s.labels.clone(), members)
                });
        let grouped = c.grouped();
        *self
            .actions
            .entry((b.name.clone(), b.action.as_str(), event.as_str()))
            .or_default() += 1;
        let label = |name: &str| label_value(&labels, name);
        let enforced = self.enforce && !b.dry_run && b.action.actuates();
        // For a shared budget (or one group of a `per` budget), the slowest of its workloads'
        // throttles.
        let latency_ms = self
            .applied
            .iter()
            .filter(|(t, _)| {
                t.budget == key.budget
                    && if grouped {
                        members.contains(&t.workload)
                    } else {
                        t.workload.as_str() == subject
                    }
            })
            .map(|(_, d)| d.as_secs_f64() * 1e3)
            .fold(None, |m: Option<f64>, d| Some(m.map_or(d, |m| m.max(d))));
        let message = match event {
            Event::Warn => "budget warning",
            Event::Enforce if enforced => "budget exceeded: enforcing",
            Event::Enforce => "budget exceeded (not enforced: dry run or alert only)",
            Event::Release => "budget released",
        };
        tracing::warn!(
            budget = %b.name,
            event = event.as_str(),
            action = b.action.as_str(),
            dry_run = !enforced,
            resource = b.resource.as_str(),
            usage,
            limit = b.limit,
            ratio,
            workload = %subject,
            namespace = %label("namespace"),
            pod = %label("pod"),
            container = %label("container"),
            unit = %label("unit"),
            latency_ms,
            "{message}"
        );
        journal(&[
            format!(
                "MESSAGE=tally: {message}: budget {} workload {}",
                b.name, subject
            ),
            format!("PRIORITY={}", if event == Event::Release { 5 } else { 4 }),
            format!("TALLY_EVENT={}", event.as_str()),
            format!("TALLY_BUDGET={}", b.name),
            format!("TALLY_ACTION={}", b.action.as_str()),
            format!("TALLY_DRY_RUN={}", !enforced),
            format!("TALLY_RESOURCE={}", b.resource.as_str()),
            format!("TALLY_USAGE={usage}"),
            format!("TALLY_LIMIT={}", b.limit),
            format!("TALLY_USAGE_RATIO={ratio}"),
            format!("TALLY_WORKLOAD={subject}"),
            format!("TALLY_NAMESPACE={}", label("namespace")),
            format!("TALLY_POD={}", label("pod")),
            format!("TALLY_CONTAINER={}", label("container")),
            format!("TALLY_UNIT={}", label("unit")),
        ]);
        let Some(alerts) = &self.alerts else {
            return;
        };
        let alert_key = |kind: &str| format!("{kind}/{}/{subject}", b.name);
        let mut alert_labels = BTreeMap::from([
            ("budget".to_owned(), b.name.clone()),
            ("action".to_owned(), b.action.as_str().to_owned()),
            ("resource".to_owned(), b.resource.as_str().to_owned()),
            ("node".to_owned(), self.node.clone()),
        ]);
        for name in ["namespace", "pod", "container", "unit"] {
            let v = label(name);
            if !v.is_empty() {
                alert_labels.insert(name.to_owned(), v);
            }
        }
        match &c.per {
            Some(per) => {
                let (name, value) = match per {
                    Per::Namespace => ("namespace", label("namespace")),
                    Per::Label { name, .. } => (*name, label(name)),
                };
                alert_labels.insert(name.to_owned(), value);
                alert_labels.insert("workload".to_owned(), SHARED.to_owned());
            }
            None if c.grouped() => {
                alert_labels.insert("workload".to_owned(), SHARED.to_owned());
            }
            None => {}
        }
        let annotations = BTreeMap::from([
            (
                "summary".to_owned(),
                format!("{message}: budget {} on {subject}", b.name),
            ),
            ("usage".to_owned(), format!("{usage}")),
            ("limit".to_owned(), format!("{}", b.limit)),
            ("usage_ratio".to_owned(), format!("{ratio:.3}")),
            ("dry_run".to_owned(), (!enforced).to_string()),
        ]);
        let with = |name: &str, severity: &str| {
            let mut l = alert_labels.clone();
            l.insert("alertname".to_owned(), name.to_owned());
            l.insert("severity".to_owned(), severity.to_owned());
            l
        };
        match event {
            Event::Warn => alerts.fire(
                alert_key("warning"),
                with("TallyBudgetWarning", "warning"),
                annotations,
            ),
            Event::Enforce => {
                alerts.fire(
                    alert_key("warning"),
                    with("TallyBudgetWarning", "warning"),
                    annotations.clone(),
                );
                alerts.fire(
                    alert_key("exceeded"),
                    with("TallyBudgetExceeded", "critical"),
                    annotations,
                );
            }
            Event::Release => {
                alerts.resolve(alert_key("exceeded"));
                let still_warning = self.subjects.get(key).is_some_and(|s| s.warning);
                if !still_warning {
                    alerts.resolve(alert_key("warning"));
                }
            }
        }
    }
}

/// Sends a structured entry to the journal when the agent runs under systemd (its stderr is a
/// journal stream); elsewhere the tracing line is the record.
fn journal(fields: &[String]) {
    if std::env::var_os("JOURNAL_STREAM").is_none() {
        return;
    }
    let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
    systemd::journal::send(&fields);
}
