//! What a cluster budget asks, and where: the PromQL every node sends (the budget's own, or built
//! from it so every node asks the same thing of the same series) and the query endpoint's URL.
//! Checked with the rest of the configuration; `crate::cluster` asks.

use crate::catalogue::{cost, inference, workload};
use crate::config::labels::label_name;
use crate::config::policy::{self, Budget, Per, Resource, Span};
use crate::config::{Config, TenantsConfig};

/// Where queries go, from `cluster.query_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix, without a trailing `/`.
    pub prefix: String,
}

/// Reads `url`, or says what is wrong with it.
pub fn endpoint(url: &str) -> Result<Endpoint, String> {
    let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("`{url}` must start with http:// or https://"));
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.contains('@') {
        return Err(format!(
            "`{url}`: credentials go in files (`bearer_token_file`, `basic_auth_password_file`), not the URL"
        ));
    }
    if path.contains(['?', '#']) {
        return Err(format!("`{url}`: a base URL has no query or fragment"));
    }
    let default_port = if https { 443 } else { 80 };
    let (host, port) = match authority.strip_prefix('[') {
        // An IPv6 literal.
        Some(inner) => match inner.split_once(']') {
            Some((h, "")) => (h, None),
            Some((h, p)) => (h, Some(p.strip_prefix(':').unwrap_or(p))),
            None => return Err(format!("`{url}`: an unclosed `[`")),
        },
        None => match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("`{url}`: `{p}` is not a port"))?,
    };
    if host.is_empty() {
        return Err(format!("`{url}` names no host"));
    }
    Ok(Endpoint {
        https,
        host: host.to_owned(),
        port,
        prefix: path.trim_end_matches('/').to_owned(),
    })
}

/// The label a budget's answer is grouped by: `per`'s label name, none for one total.
pub fn group_label(b: &Budget) -> Option<&'static str> {
    match policy::per_label(b.per.as_deref()?).ok()? {
        Per::Namespace => Some("namespace"),
        Per::Label { name, .. } => Some(name),
    }
}

/// The budget's PromQL, or the key path and message of why none can be built.
pub fn build(b: &Budget, tenants: &TenantsConfig) -> Result<String, (String, String)> {
    if let Some(q) = &b.query {
        return Ok(q.clone());
    }
    let promoted = |key: &str| tenants.labels.iter().any(|k| k == key);
    let mut matchers: Vec<String> = Vec::new();
    let (selector_name, fixed) = match b.resource {
        Resource::CpuSeconds => (workload::CPU_SECONDS.name, None),
        Resource::GpuSeconds => (workload::GPU_SECONDS.name, None),
        Resource::GpuEnergyJoules => (workload::GPU_ENERGY_JOULES.name, None),
        Resource::GpuMemoryBytes => (workload::GPU_MEMORY_BYTES.name, None),
        Resource::NetworkEgressBytes => (
            workload::NETWORK_TRANSMIT_BYTES.name,
            b.scope.as_deref().map(|s| exact("scope", s)),
        ),
        Resource::Cost => (cost::WORKLOAD_COST.name, None),
        // The kernel's cgroup files: the figure node budgets and the cost counter charge.
        Resource::DiskReadBytes => (workload::DISK_READ_BYTES.name, Some(cgroupfs())),
        Resource::DiskWriteBytes => (workload::DISK_WRITE_BYTES.name, Some(cgroupfs())),
        Resource::DiskBytes => ("", Some(cgroupfs())),
        Resource::Tokens => (
            inference::TOKENS.name,
            Some(match b.kind.as_deref() {
                Some(kind) => exact("kind", kind),
                None => "kind=~\"prompt|generation\"".to_owned(),
            }),
        ),
        Resource::KvCacheRatio => (inference::KV_CACHE_USAGE_RATIO.name, None),
    };
    if b.resource == Resource::DiskBytes {
        matchers.push(format!(
            "__name__=~\"{}|{}\"",
            workload::DISK_READ_BYTES.name,
            workload::DISK_WRITE_BYTES.name
        ));
    }
    matchers.extend(fixed);
    let s = &b.select;
    if let Some(ns) = &s.namespace {
        matchers.push(exact("namespace", ns));
    }
    if let Some(c) = &s.container {
        matchers.push(exact("container", c));
    }
    if let Some(pod) = &s.pod {
        matchers.push(glob("pod", pod));
    }
    if let Some(unit) = &s.unit {
        matchers.push(glob("unit", unit));
    }
    for (key, value) in &s.labels {
        if !promoted(key) {
            return Err((
                format!("select.labels.{key}"),
                format!("no series carries `{key}`: list it in `tenants.labels`, or give `query`"),
            ));
        }
        matchers.push(exact(&label_name(key), value));
    }
    let by = match (b.per.as_deref(), group_label(b)) {
        (Some(key), Some(name)) => {
            if key != "namespace" && !promoted(key) {
                return Err((
                    "per".to_owned(),
                    format!(
                        "no series carries `{key}`: list it in `tenants.labels`, or give `query`"
                    ),
                ));
            }
            format!(" by ({name})")
        }
        _ => String::new(),
    };
    let selector = format!("{selector_name}{{{}}}", matchers.join(","));
    if b.resource == Resource::KvCacheRatio {
        return Ok(format!("max{by} ({selector})"));
    }
    if b.resource.is_gauge() {
        return Ok(format!("sum{by} ({selector})"));
    }
    let window = b
        .window
        .as_deref()
        .and_then(|w| policy::parse_duration(w).ok())
        .ok_or_else(|| {
            (
                "window".to_owned(),
                "a built cluster query needs `window`".to_owned(),
            )
        })?;
    Ok(format!(
        "sum{by} (increase({selector}[{}s]))",
        window.as_secs()
    ))
}

/// The cluster budgets' checks that need the rest of the configuration: an endpoint to ask,
/// and series that carry what the built query selects on.
pub fn check(config: &Config) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    for (i, b) in config.budget.iter().enumerate() {
        if b.span != Span::Cluster {
            continue;
        }
        if config.cluster.query_url.is_empty() {
            errors.push((
                format!("budget.{i}.span"),
                "a cluster budget needs `cluster.query_url`".to_owned(),
            ));
        }
        if let Err((field, message)) = build(b, &config.tenants) {
            errors.push((format!("budget.{i}.{field}"), message));
        }
    }
    errors
}

fn cgroupfs() -> String {
    exact("method", "cgroupfs")
}

fn exact(label: &str, value: &str) -> String {
    format!("{label}=\"{}\"", quoted(value))
}

/// A glob as an anchored PromQL regex match (`=` where it has no wildcard).
fn glob(label: &str, pattern: &str) -> String {
    if !pattern.contains(['*', '?']) {
        return exact(label, pattern);
    }
    let mut re = String::new();
    for c in pattern.chars() {
        match c {
            '*' => re.push_str(".*"),
            '?' => re.push('.'),
            c if "\\.+()[]{}^$|".contains(c) => {
                re.push('\\');
                re.push(c);
            }
            c => re.push(c),
        }
    }
    format!("{label}=~\"{}\"", quoted(&re))
}

/// A PromQL double-quoted string's contents.
fn quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}
