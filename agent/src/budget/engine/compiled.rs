//! The policy as the engine uses it, compiled when the configuration is loaded or reloaded: each
//! budget with its actuator target, the metric it counts and its network scope resolved once,
//! and found by name without a search.

use std::collections::HashMap;
use std::sync::Arc;

use serde::de::IntoDeserializer as _;
use serde::Deserialize as _;

use crate::config::policy::{self, Budget, Resource, Target};
use crate::config::Config;

/// What a budget counts: its resource and, where it counts part of it (an egress budget's
/// destination scope, a token budget's kind), that part's index in [`Resource::parts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Metric {
    pub resource: Resource,
    pub scope: Option<u32>,
}

impl Metric {
    fn of(b: &Budget) -> Metric {
        let part = match b.resource {
            Resource::NetworkEgressBytes => b.scope.as_deref(),
            Resource::Tokens => b.kind.as_deref(),
            _ => None,
        };
        Metric {
            resource: b.resource,
            scope: part.and_then(|p| index_of(b.resource, p)),
        }
    }

    /// Its name in the state file's baselines: the resource, with `:<part>` for a budget of
    /// one scope or kind.
    pub fn name(self) -> String {
        match self.part() {
            Some(part) => format!("{}:{part}", self.resource.as_str()),
            None => self.resource.as_str().to_owned(),
        }
    }

    /// The scope or kind it counts, when only one.
    pub fn part(self) -> Option<&'static str> {
        self.resource.parts().get(self.scope? as usize).copied()
    }

    /// The metric a state file's name stands for; `None` for a name this agent never writes.
    pub fn parse(name: &str) -> Option<Metric> {
        let (resource, part) = match name.split_once(':') {
            Some((r, p)) => (r, Some(p)),
            None => (name, None),
        };
        let resource = Resource::deserialize(resource.into_deserializer())
            .map_err(|_: serde::de::value::Error| ())
            .ok()?;
        let scope = match part {
            Some(p) => Some(index_of(resource, p)?),
            None => None,
        };
        Some(Metric { resource, scope })
    }
}

/// The index of a scope or kind among those of `resource`.
fn index_of(resource: Resource, part: &str) -> Option<u32> {
    resource
        .parts()
        .iter()
        .position(|x| *x == part)
        .map(|i| i as u32)
}

/// One budget, compiled.
#[derive(Debug, Clone)]
pub(super) struct Compiled {
    pub budget: Budget,
    /// The budget's name, shared by the keys of its windows and throttles.
    pub name: Arc<str>,
    pub target: Target,
    pub metric: Metric,
    /// Network scope index of an egress throttle.
    pub scope: Option<u32>,
    /// What a `per` budget groups its workloads by.
    pub per: Option<policy::Per>,
}

impl Compiled {
    /// Whether its usage is summed over workloads (`shared`, one sum per group with `per`, or
    /// the cluster's).
    pub fn grouped(&self) -> bool {
        self.budget.shared || self.per.is_some() || self.cluster()
    }

    /// Whether its usage is the cluster's, from `[cluster]`'s query endpoint.
    pub fn cluster(&self) -> bool {
        self.budget.span == policy::Span::Cluster
    }
}

/// Every budget of the configuration, compiled.
#[derive(Debug, Default)]
pub(super) struct Policy {
    pub budgets: Vec<Compiled>,
    /// Every metric some budget counts, each once.
    pub metrics: Vec<Metric>,
    by_name: HashMap<Arc<str>, usize>,
}

impl Policy {
    pub fn compile(config: &Config) -> Policy {
        let budgets: Vec<Compiled> = config
            .budget
            .iter()
            .filter_map(|b| {
                // Validation refused anything without a target already.
                let target = policy::actuator_target(b).ok()?;
                Some(Compiled {
                    budget: b.clone(),
                    name: Arc::from(b.name.as_str()),
                    target,
                    metric: Metric::of(b),
                    scope: b
                        .scope
                        .as_deref()
                        .and_then(|s| index_of(Resource::NetworkEgressBytes, s)),
                    per: b.per.as_deref().and_then(|p| policy::per_label(p).ok()),
                })
            })
            .collect();
        let mut metrics: Vec<Metric> = Vec::new();
        let mut by_name = HashMap::new();
        for (i, c) in budgets.iter().enumerate() {
            if !metrics.contains(&c.metric) {
                metrics.push(c.metric);
            }
            by_name.entry(c.name.clone()).or_insert(i);
        }
        Policy {
            budgets,
            metrics,
            by_name,
        }
    }

    /// The budget named `name`.
    pub fn get(&self, name: &str) -> Option<&Compiled> {
        self.by_name.get(name).map(|i| &self.budgets[*i])
    }

    pub fn is_empty(&self) -> bool {
        self.budgets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_round_trip_through_the_state_file() {
        for name in [
            "cpu_seconds",
            "network_egress_bytes",
            "network_egress_bytes:zone",
            "cost",
        ] {
            assert_eq!(Metric::parse(name).map(Metric::name).as_deref(), Some(name));
        }
        assert_eq!(
            Metric::parse("network_egress_bytes:zone"),
            Some(Metric {
                resource: Resource::NetworkEgressBytes,
                scope: Some(2)
            })
        );
        assert_eq!(Metric::parse("network_egress_bytes:moon"), None);
        assert_eq!(Metric::parse("bogus"), None);
    }
}
