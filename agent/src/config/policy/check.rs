//! The policy's checks: each budget's fields against one another and the prices, and budgets
//! that would fight over one workload.

use super::*;

/// Checks serde cannot express, as `(key path, message)`, for budgets with their index in the
/// file (budgets that did not even deserialize are left out, their errors already known).
pub fn check(budgets: &[(usize, Budget)], prices: &Prices) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, b) in budgets {
        let i = *i;
        let at = |field: &str| format!("budget.{i}.{field}");
        if b.name.is_empty()
            || !b
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        {
            errors.push((
                at("name"),
                format!(
                    "`{}`: a budget name is non-empty ASCII letters, digits and `-_.:`",
                    b.name
                ),
            ));
        }
        if let Some(first) = names.insert(&b.name, i) {
            errors.push((
                at("name"),
                format!("`{}` is already the name of budget {first}", b.name),
            ));
        }
        if let Some(per) = b.per.as_deref() {
            if let Err(message) = per_label(per) {
                errors.push((at("per"), message));
            }
        }
        if !(b.limit.is_finite() && b.limit > 0.0) {
            errors.push((
                at("limit"),
                format!("{} must be a positive number", b.limit),
            ));
        }
        match (&b.window, b.period, b.resource.is_gauge()) {
            (Some(_), Some(_), _) => errors.push((
                at("period"),
                "set either `window` (a rate) or `period` (a quota), not both".to_owned(),
            )),
            // A cluster budget's own query says over what time it counts.
            (None, None, false) if b.span == Span::Cluster && b.query.is_some() => {}
            (None, None, false) => errors.push((
                at("window"),
                format!(
                    "`{}` is an amount: set `window` (e.g. \"60s\") or `period` (\"hour\", \"day\")",
                    b.resource.as_str()
                ),
            )),
            (Some(_), _, true) | (_, Some(_), true) => errors.push((
                at("window"),
                format!(
                    "`{}` is a level, compared as it is: it takes no window or period",
                    b.resource.as_str()
                ),
            )),
            _ => {}
        }
        if let Some(window) = &b.window {
            match parse_duration(window) {
                Ok(d) if (1..=7 * 86_400).contains(&d.as_secs()) => {}
                Ok(_) => errors.push((at("window"), format!("`{window}` is out of range 1s..=7d"))),
                Err(e) => errors.push((at("window"), e.to_string())),
            }
        }
        if !(b.warn_at > 0.0 && b.warn_at <= 1.0) {
            errors.push((
                at("warn_at"),
                format!("{} is out of range (0, 1]", b.warn_at),
            ));
        }
        if !(b.release_below > 0.0 && b.release_below < 1.0) {
            errors.push((
                at("release_below"),
                format!("{} is out of range (0, 1)", b.release_below),
            ));
        }
        if let Some(kind) = &b.kind {
            if b.resource != Resource::Tokens {
                errors.push((
                    at("kind"),
                    "`kind` applies to `tokens` budgets only".to_owned(),
                ));
            } else if !Resource::Tokens.parts().contains(&kind.as_str()) {
                errors.push((
                    at("kind"),
                    format!(
                        "unknown token kind `{kind}`, expected one of {}",
                        Resource::Tokens.parts().join(", ")
                    ),
                ));
            }
        }
        if let Some(scope) = &b.scope {
            if b.resource != Resource::NetworkEgressBytes {
                errors.push((
                    at("scope"),
                    "`scope` applies to `network_egress_bytes` budgets only".to_owned(),
                ));
            } else if !SCOPES.contains(&scope.as_str()) {
                errors.push((
                    at("scope"),
                    format!(
                        "unknown scope `{scope}`, expected one of {}",
                        SCOPES.join(", ")
                    ),
                ));
            }
        }
        match (b.span, b.query.as_deref()) {
            (Span::Node, Some(_)) => errors.push((
                at("query"),
                "`query` applies to `span = \"cluster\"` budgets only".to_owned(),
            )),
            (Span::Cluster, Some(q)) if q.trim().is_empty() => errors.push((
                at("query"),
                "an empty query: give PromQL, or leave `query` out to have it built".to_owned(),
            )),
            (Span::Cluster, None) if b.period.is_some() => errors.push((
                at("period"),
                "a cluster budget's built query counts over a `window`; give `query` for a calendar period".to_owned(),
            )),
            (Span::Cluster, None) if b.select.cgroup.is_some() => errors.push((
                at("select.cgroup"),
                "no series carries the cgroup path, so the cluster query cannot select on it; give `query`".to_owned(),
            )),
            _ => {}
        }
        let grouped = b.shared || b.per.is_some() || b.span == Span::Cluster;
        if b.admission != Admission::None && !grouped {
            errors.push((
                at("admission"),
                "a budget per workload starts each workload with a fresh window, so nothing is spent when it starts: `admission` needs `shared`, `per` or `span = \"cluster\"`".to_owned(),
            ));
        }
        if b.admission == Admission::Throttle && b.action != Action::Cpu {
            errors.push((
                at("admission"),
                "`admission = \"throttle\"` starts a container under the budget's CPU throttle: it needs `action = \"cpu\"`".to_owned(),
            ));
        }
        if b.resource == Resource::Cost && prices.is_free() {
            errors.push((
                at("resource"),
                "a `cost` budget needs a `[prices]` table with a price above zero".to_owned(),
            ));
        }
        for (field, value) in [
            ("cpu_cores", b.throttle.cpu_cores),
            ("egress_bytes_per_sec", b.throttle.egress_bytes_per_sec),
            ("disk_bytes_per_sec", b.throttle.disk_bytes_per_sec),
        ] {
            if let Some(v) = value {
                if !(v.is_finite() && v > 0.0) {
                    errors.push((
                        at(&format!("throttle.{field}")),
                        format!("{v} must be a positive number"),
                    ));
                }
            }
        }
        if let Some(share) = b.throttle.share {
            if !(share > 0.0 && share <= 1.0) {
                errors.push((
                    at("throttle.share"),
                    format!("{share} is out of range (0, 1]"),
                ));
            }
        }
        if let Err(e) = actuator_target(b) {
            errors.push((at("action"), e.to_string()));
        }
    }
    errors.extend(conflicts(budgets));
    for (field, value) in [
        ("prices.cpu_core_second", prices.cpu_core_second),
        ("prices.gpu_energy_kwh", prices.gpu_energy_kwh),
        ("prices.disk_gb", prices.disk_gb),
        ("prices.memory_gb_hour", prices.memory_gb_hour),
    ] {
        if !(value.is_finite() && value >= 0.0) {
            errors.push((
                field.to_owned(),
                format!("{value} must be zero or positive"),
            ));
        }
    }
    if prices.currency.trim().is_empty() || prices.currency.chars().any(char::is_control) {
        errors.push((
            "prices.currency".to_owned(),
            format!(
                "`{}`: a currency is a non-empty name, e.g. \"USD\"",
                prices.currency
            ),
        ));
    }
    for (model, value) in &prices.gpu_second {
        if !(value.is_finite() && *value >= 0.0) {
            errors.push((
                format!("prices.gpu_second.{model}"),
                format!("{value} must be zero or positive"),
            ));
        }
    }
    for (scope, value) in &prices.network_egress_gb {
        if !SCOPES.contains(&scope.as_str()) {
            errors.push((
                format!("prices.network_egress_gb.{scope}"),
                format!(
                    "unknown scope `{scope}`, expected one of {}",
                    SCOPES.join(", ")
                ),
            ));
        } else if !(value.is_finite() && *value >= 0.0) {
            errors.push((
                format!("prices.network_egress_gb.{scope}"),
                format!("{value} must be zero or positive"),
            ));
        }
    }
    errors
}

/// Two enforcing budgets driving the same actuator on workloads both may select: which one
/// holds would depend on evaluation order, so the policy is refused.
fn conflicts(budgets: &[(usize, Budget)]) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    for (n, (_, a)) in budgets.iter().enumerate() {
        for (j, b) in budgets.iter().skip(n + 1) {
            // A hold at start freezes: it drives the freeze actuator as `freeze` does.
            let freezes = |x: &Budget| x.action == Action::Freeze || x.admission == Admission::Deny;
            let same = (a.action.actuates() && a.action == b.action) || (freezes(a) && freezes(b));
            if a.dry_run || b.dry_run || !same {
                continue;
            }
            if a.select.may_overlap(&b.select) {
                let what = if a.action.actuates() && a.action == b.action {
                    a.action.as_str()
                } else {
                    Action::Freeze.as_str()
                };
                errors.push((
                    format!("budget.{j}.action"),
                    format!(
                        "budgets `{}` and `{}` both enforce `{what}` on selectors that can match the same workload; make the selectors disjoint, merge them, or set `dry_run` on one",
                        a.name,
                        b.name,
                    ),
                ));
            }
        }
    }
    errors
}
