//! Whether each cluster budget's query answers: asked once, as the agent would, with what it does
//! meanwhile (`on_unavailable`) when it does not.

use super::{Item, Status};
use crate::cluster::{http::Client, query};
use crate::config::cluster::{build, group_label};
use crate::config::policy::Span;
use crate::config::Config;

pub(super) fn cluster_item(config: &Config) -> Item {
    let budgets: Vec<_> = config
        .budget
        .iter()
        .filter(|b| b.span == Span::Cluster)
        .collect();
    if budgets.is_empty() {
        return Item::new("cluster budgets", Status::NotChecked, "no cluster budgets");
    }
    let Some(client) = Client::new(&config.cluster) else {
        return Item::new(
            "cluster budgets",
            Status::Failed,
            format!(
                "`cluster.query_url` `{}` is unusable",
                config.cluster.query_url
            ),
        );
    };
    // A runtime of its own on a thread of its own: `gather` may run inside another runtime.
    let answers: Vec<String> = std::thread::scope(|s| {
        s.spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            budgets
                .iter()
                .map(|b| {
                    let answer = match (&runtime, build(b, &config.tenants)) {
                        (Err(e), _) => Err(format!("no runtime: {e}")),
                        (_, Err((_, why))) => Err(why),
                        (Ok(rt), Ok(promql)) => rt
                            .block_on(client.query(&promql))
                            .and_then(|body| query::parse(&body, group_label(b)))
                            .map_err(|f| format!("{} ({f})", f.reason())),
                    };
                    match answer {
                        Ok(values) => {
                            let values: Vec<String> = values
                                .iter()
                                .map(|(g, v)| match g.as_str() {
                                    "" => format!("{v}"),
                                    g => format!("{g}={v}"),
                                })
                                .collect();
                            format!("{}: {} of {}", b.name, values.join(" "), b.limit)
                        }
                        Err(why) => format!(
                            "{}: no answer, {why}; on_unavailable = {} after {} s",
                            b.name,
                            b.on_unavailable.as_str(),
                            config.cluster.max_staleness_secs
                        ),
                    }
                })
                .collect()
        })
        .join()
        .unwrap_or_default()
    });
    let status = if answers.iter().any(|a| a.contains(": no answer, ")) {
        Status::Degraded
    } else {
        Status::Ok
    };
    Item::new("cluster budgets", status, answers.join("; "))
}
