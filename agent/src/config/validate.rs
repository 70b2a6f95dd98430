//! Parsing with every error reported at once, each with its key path and line.
//!
//! serde stops at the first error, so deserialization is repeated: each failing key is recorded
//! and removed from the parsed table, until the rest deserializes. Semantic checks (ranges,
//! addresses) then run on the result. Lines come from a span-keeping parse of the original text.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use serde_path_to_error::Segment;

use super::Config;

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, when not the configuration file itself (a policy file).
    pub file: Option<std::path::PathBuf>,
    /// Dotted key path (`agent.listen`), empty for file-level problems.
    pub path: String,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "`{}`: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in one file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// More removals than this means something is wrong with the removal itself; stop rather than loop.
const MAX_ERRORS: usize = 100;

pub(super) fn parse(text: &str) -> Result<Config, ConfigErrors> {
    let (mut table, lines) = parse_toml(text)?;
    let budget_items = table.remove("budget");
    let (config, mut errors) = deserialize_table::<Config>(table, &[], &lines);
    // Every field of `Config` has a default: only a removal that went wrong leaves nothing.
    let Some(mut config) = config else {
        return Err(sorted(errors));
    };
    let (budgets, budget_errors) = deserialize_budgets(budget_items, &lines);
    errors.extend(budget_errors);
    let mut semantic: Vec<(String, String)> = semantic_errors(&config)
        .into_iter()
        .map(|(path, message)| (path.to_owned(), message))
        .collect();
    semantic.extend(tenant_errors(&config.tenants));
    semantic.extend(super::policy::check(&budgets, &config.prices));
    if config.enforcement.policy_file.is_some() {
        for (i, _) in &budgets {
            semantic.push((
                format!("budget.{i}"),
                "`enforcement.policy_file` is set: budgets belong in that file".to_owned(),
            ));
        }
    }
    config.budget = budgets.into_iter().map(|(_, b)| b).collect();
    semantic.extend(super::cluster::check(&config));
    semantic.extend(super::admission::check(&config));
    errors.extend(located(semantic, &lines));
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(sorted(errors))
    }
}

/// Parses a separate policy file; errors name it.
pub(super) fn parse_policy(
    text: &str,
    file: &std::path::Path,
) -> Result<super::policy::PolicyFile, ConfigErrors> {
    let in_file = |mut errors: Vec<ConfigError>| {
        for e in &mut errors {
            e.file = Some(file.to_path_buf());
        }
        ConfigErrors(errors)
    };
    let (mut table, lines) = parse_toml(text).map_err(|e| in_file(e.0))?;
    let budget_items = table.remove("budget");
    let (policy, mut errors) = deserialize_table::<super::policy::PolicyFile>(table, &[], &lines);
    let Some(mut policy) = policy else {
        return Err(in_file(sorted(errors).0));
    };
    let (budgets, budget_errors) = deserialize_budgets(budget_items, &lines);
    errors.extend(budget_errors);
    let prices = policy.prices.clone().unwrap_or_default();
    errors.extend(located(super::policy::check(&budgets, &prices), &lines));
    policy.budget = budgets.into_iter().map(|(_, b)| b).collect();
    if errors.is_empty() {
        Ok(policy)
    } else {
        Err(in_file(sorted(errors).0))
    }
}

/// Label names a promoted tenant label may not take: the workload's, every family's own, and
/// the histogram bucket's.
pub(super) fn reserved_label_names() -> std::collections::BTreeSet<&'static str> {
    let mut names: std::collections::BTreeSet<&'static str> =
        crate::catalogue::WORKLOAD_LABELS.into_iter().collect();
    for metric in crate::catalogue::ALL {
        names.extend(metric.labels.iter().copied());
    }
    names.insert("le");
    names
}

/// `[tenants]`: each key a Kubernetes label key whose label name is free and its own.
fn tenant_errors(tenants: &super::TenantsConfig) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    let reserved = reserved_label_names();
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for (i, key) in tenants.labels.iter().enumerate() {
        let at = format!("tenants.labels.{i}");
        let name = super::labels::label_name(key);
        if !valid_label_key(key) {
            errors.push((
                at,
                format!("`{key}` is not a Kubernetes label key ([prefix/]name, name of 1 to 63 of [A-Za-z0-9._-], alphanumeric at both ends)"),
            ));
        } else if reserved.contains(name.as_str()) || name.starts_with("__") {
            errors.push((
                at,
                format!("`{key}` would be the label `{name}`, which Tally's series already use"),
            ));
        } else if let Some(other) = seen.insert(name.clone(), key) {
            errors.push((
                at,
                format!("`{key}` and `{other}` would both be the label `{name}`"),
            ));
        }
    }
    if !(1..=10_000).contains(&tenants.max_values_per_label) {
        errors.push((
            "tenants.max_values_per_label".to_owned(),
            format!("{} is out of range 1..=10000", tenants.max_values_per_label),
        ));
    }
    errors
}

/// A Kubernetes label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// characters of `[A-Za-z0-9._-]` that starts and ends alphanumeric.
pub(super) fn valid_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            })
    });
    let name_ok = (1..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    prefix_ok && name_ok
}

/// Each `[[budget]]` on its own, so one bad budget neither hides another's errors nor shifts
/// their indices; returns the good ones with their index in the file.
fn deserialize_budgets(
    items: Option<toml::Value>,
    lines: &Lines,
) -> (Vec<(usize, super::policy::Budget)>, Vec<ConfigError>) {
    let mut budgets = Vec::new();
    let mut errors = Vec::new();
    let items = match items {
        None => return (budgets, errors),
        Some(toml::Value::Array(items)) => items,
        Some(_) => {
            let path = vec!["budget".to_owned()];
            errors.push(ConfigError {
                file: None,
                line: lines.line_of(&path),
                path: "budget".to_owned(),
                message: "`budget` is an array of tables: write each as `[[budget]]`".to_owned(),
            });
            return (budgets, errors);
        }
    };
    for (i, item) in items.into_iter().enumerate() {
        let prefix = ["budget".to_owned(), i.to_string()];
        let toml::Value::Table(table) = item else {
            errors.push(ConfigError {
                file: None,
                line: lines.line_of(&prefix),
                path: prefix.join("."),
                message: "a budget is a table".to_owned(),
            });
            continue;
        };
        let (budget, e) = deserialize_table(table, &prefix, lines);
        errors.extend(e);
        if let Some(b) = budget {
            budgets.push((i, b));
        }
    }
    (budgets, errors)
}

fn located(errors: Vec<(String, String)>, lines: &Lines) -> Vec<ConfigError> {
    errors
        .into_iter()
        .map(|(path, message)| {
            let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
            ConfigError {
                file: None,
                line: lines.line_of(&segments),
                path,
                message,
            }
        })
        .collect()
}

/// The text's lines and the span-keeping parse, to find where a key path is.
struct Lines {
    index: LineIndex,
    spans: Option<toml_edit::ImDocument<String>>,
}

impl Lines {
    fn line_of(&self, path: &[String]) -> Option<usize> {
        let doc = self.spans.as_ref()?;
        key_span(doc.as_table(), path).map(|s| self.index.line_of(s.start))
    }
}

/// The TOML table of `text`; a syntax error is returned alone.
fn parse_toml(text: &str) -> Result<(toml::Table, Lines), ConfigErrors> {
    let index = LineIndex::new(text);
    match text.parse::<toml::Table>() {
        Ok(t) => Ok((
            t,
            Lines {
                index,
                spans: toml_edit::ImDocument::parse(text.to_owned()).ok(),
            },
        )),
        Err(e) => Err(ConfigErrors(vec![ConfigError {
            file: None,
            path: String::new(),
            line: e.span().map(|s| index.line_of(s.start)),
            message: e.message().trim().to_owned(),
        }])),
    }
}

/// Deserializes `table` (found at key path `prefix`) as `T`, collecting every type error: each
/// failing key is recorded and removed until the rest deserializes. `None` when what is left
/// lacks a required field (the removed key was one: its error is already recorded).
fn deserialize_table<T: serde::de::DeserializeOwned>(
    mut table: toml::Table,
    prefix: &[String],
    lines: &Lines,
) -> (Option<T>, Vec<ConfigError>) {
    let mut errors = Vec::new();
    loop {
        let value = toml::Value::Table(table.clone());
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(parsed) => return (Some(parsed), errors),
            Err(e) => {
                let message = e.inner().message().trim().to_owned();
                let mut path: Vec<String> = e
                    .path()
                    .iter()
                    .filter_map(|seg| match seg {
                        Segment::Map { key } => Some(key.clone()),
                        Segment::Seq { index } => Some(index.to_string()),
                        Segment::Enum { variant } => Some(variant.clone()),
                        Segment::Unknown => None,
                    })
                    .collect();
                if let Some(field) = unknown_field(&message) {
                    if path.last().map(String::as_str) != Some(field) {
                        path.push(field.to_owned());
                    }
                }
                let missing = message
                    .strip_prefix("missing field `")
                    .and_then(|r| r.split('`').next())
                    .map(str::to_owned);
                let full: Vec<String> =
                    prefix.iter().cloned().chain(path.iter().cloned()).collect();
                let removed_it = missing.as_deref().is_some_and(|field| {
                    errors.iter().any(|e: &ConfigError| {
                        e.path
                            == full
                                .iter()
                                .cloned()
                                .chain([field.to_owned()])
                                .collect::<Vec<_>>()
                                .join(".")
                    })
                });
                if !removed_it {
                    errors.push(ConfigError {
                        file: None,
                        path: full.join("."),
                        line: lines.line_of(&full),
                        message,
                    });
                }
                if missing.is_some() || errors.len() >= MAX_ERRORS || !remove(&mut table, &path) {
                    return (None, errors);
                }
            }
        }
    }
}

fn sorted(mut errors: Vec<ConfigError>) -> ConfigErrors {
    errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
    ConfigErrors(errors)
}

/// Range and format checks serde cannot express.
fn semantic_errors(config: &Config) -> Vec<(&'static str, String)> {
    let mut errors = Vec::new();
    if let Err(e) = config.agent.listen.parse::<std::net::SocketAddr>() {
        errors.push((
            "agent.listen",
            format!(
                "`{}` is not a socket address (host:port): {e}",
                config.agent.listen
            ),
        ));
    }
    if !(100..=60_000).contains(&config.agent.tick_interval_ms) {
        errors.push((
            "agent.tick_interval_ms",
            format!(
                "{} is out of range 100..=60000",
                config.agent.tick_interval_ms
            ),
        ));
    }
    if config.cgroupfs.read_interval_ms > 300_000 {
        errors.push((
            "cgroupfs.read_interval_ms",
            format!(
                "{} is out of range 0..=300000",
                config.cgroupfs.read_interval_ms
            ),
        ));
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&config.agent.log_level) {
        errors.push(("agent.log_level", format!("invalid log filter: {e}")));
    }
    if config.ledger.grace_period_secs > 7 * 24 * 3600 {
        errors.push((
            "ledger.grace_period_secs",
            format!(
                "{} is out of range 0..=604800 (one week)",
                config.ledger.grace_period_secs
            ),
        ));
    }
    if !(1..=3600).contains(&config.cri.refresh_interval_secs) {
        errors.push((
            "cri.refresh_interval_secs",
            format!(
                "{} is out of range 1..=3600",
                config.cri.refresh_interval_secs
            ),
        ));
    }
    if !(10..=60_000).contains(&config.cri.timeout_ms) {
        errors.push((
            "cri.timeout_ms",
            format!("{} is out of range 10..=60000", config.cri.timeout_ms),
        ));
    }
    if !(64..=4_194_304).contains(&config.ebpf.max_net_entries) {
        errors.push((
            "ebpf.max_net_entries",
            format!(
                "{} is out of range 64..=4194304",
                config.ebpf.max_net_entries
            ),
        ));
    }
    if !(64..=4_194_304).contains(&config.ebpf.max_cgroup_entries) {
        errors.push((
            "ebpf.max_cgroup_entries",
            format!(
                "{} is out of range 64..=4194304",
                config.ebpf.max_cgroup_entries
            ),
        ));
    }
    if !(1..=3600).contains(&config.ebpf.program_stats_every_secs) {
        errors.push((
            "ebpf.program_stats_every_secs",
            format!(
                "{} is out of range 1..=3600",
                config.ebpf.program_stats_every_secs
            ),
        ));
    }
    for method in &config.ebpf.disabled_methods {
        if !super::ATTACH_METHODS.contains(&method.as_str()) {
            errors.push((
                "ebpf.disabled_methods",
                format!(
                    "unknown attach method `{method}`, expected one of {}",
                    super::ATTACH_METHODS.join(", ")
                ),
            ));
        }
    }
    for (name, list) in [
        ("network.node_cidrs", &config.network.node_cidrs),
        ("network.cluster_cidrs", &config.network.cluster_cidrs),
        ("network.zone_cidrs", &config.network.zone_cidrs),
        ("network.region_cidrs", &config.network.region_cidrs),
    ] {
        for cidr in list {
            if let Err(e) = cidr.parse::<super::Cidr>() {
                errors.push((name, e));
            }
        }
    }
    let otlp = &config.otlp;
    let scheme_ok = ["http://", "https://"]
        .iter()
        .any(|scheme| otlp.endpoint.starts_with(scheme));
    if !otlp.endpoint.is_empty() && !scheme_ok {
        errors.push((
            "otlp.endpoint",
            format!("`{}` must start with http:// or https://", otlp.endpoint),
        ));
    }
    errors.extend(out_of_range([
        ("otlp.interval_secs", otlp.interval_secs, 1..=3600),
        ("otlp.timeout_ms", otlp.timeout_ms, 10..=60_000),
        ("otlp.queue_batches", otlp.queue_batches as u64, 1..=1000),
        ("otlp.max_attempts", u64::from(otlp.max_attempts), 1..=10),
    ]));
    errors.extend(cluster_errors(&config.cluster));
    if !(20..=10_000).contains(&config.enforcement.freeze_period_ms) {
        errors.push((
            "enforcement.freeze_period_ms",
            format!(
                "{} is out of range 20..=10000",
                config.enforcement.freeze_period_ms
            ),
        ));
    }
    let alerts = &config.alerts;
    for (name, urls) in [
        ("alerts.alertmanager_urls", &alerts.alertmanager_urls),
        ("alerts.webhook_urls", &alerts.webhook_urls),
    ] {
        for url in urls {
            if !url.starts_with("http://") {
                errors.push((name, format!("`{url}` must start with http://")));
            }
        }
    }
    for (name, value, range) in [
        ("alerts.timeout_ms", alerts.timeout_ms, 10..=60_000),
        (
            "alerts.max_attempts",
            u64::from(alerts.max_attempts),
            1..=20,
        ),
        (
            "alerts.resend_interval_secs",
            alerts.resend_interval_secs,
            10..=3600,
        ),
    ] {
        if !range.contains(&value) {
            errors.push((
                name,
                format!(
                    "{value} is out of range {}..={}",
                    range.start(),
                    range.end()
                ),
            ));
        }
    }
    if let Some(path) = &config.enforcement.policy_file {
        if !path.is_absolute() {
            errors.push((
                "enforcement.policy_file",
                format!("`{}` is not an absolute path", path.display()),
            ));
        }
    }
    for (name, path) in [
        ("enforcement.state_dir", &config.enforcement.state_dir),
        ("paths.proc_root", &config.paths.proc_root),
        ("paths.sys_root", &config.paths.sys_root),
        ("paths.cgroup_root", &config.paths.cgroup_root),
    ] {
        if !path.is_absolute() {
            errors.push((
                name,
                format!("`{}` is not an absolute path", path.display()),
            ));
        }
    }
    errors.extend(rdma_errors(&config.rdma));
    errors
}

/// Each value outside its range, as `(key, message)`.
fn out_of_range<const N: usize>(
    checks: [(&'static str, u64, std::ops::RangeInclusive<u64>); N],
) -> impl Iterator<Item = (&'static str, String)> {
    checks
        .into_iter()
        .filter(|(_, value, range)| !range.contains(value))
        .map(|(name, value, range)| {
            (
                name,
                format!(
                    "{value} is out of range {}..={}",
                    range.start(),
                    range.end()
                ),
            )
        })
}

/// `[cluster]`: an endpoint that parses, one way to authenticate, and bounds.
fn cluster_errors(cluster: &super::ClusterConfig) -> Vec<(&'static str, String)> {
    let mut errors = Vec::new();
    if !cluster.query_url.is_empty() {
        if let Err(e) = super::cluster::endpoint(&cluster.query_url) {
            errors.push(("cluster.query_url", e));
        }
    }
    errors.extend(out_of_range([
        ("cluster.interval_secs", cluster.interval_secs, 1..=3600),
        ("cluster.timeout_ms", cluster.timeout_ms, 10..=60_000),
        (
            "cluster.max_response_bytes",
            cluster.max_response_bytes as u64,
            1024..=64 << 20,
        ),
    ]));
    if cluster.timeout_ms > cluster.interval_secs.saturating_mul(1000) {
        errors.push((
            "cluster.timeout_ms",
            format!(
                "{} ms is longer than `cluster.interval_secs` ({} s)",
                cluster.timeout_ms, cluster.interval_secs
            ),
        ));
    }
    if cluster.max_staleness_secs < cluster.interval_secs {
        errors.push((
            "cluster.max_staleness_secs",
            format!(
                "{} is shorter than `cluster.interval_secs` ({}): every answer would be stale before the next",
                cluster.max_staleness_secs, cluster.interval_secs
            ),
        ));
    }
    if cluster.bearer_token_file.is_some() && cluster.basic_auth_password_file.is_some() {
        errors.push((
            "cluster.bearer_token_file",
            "set a bearer token or basic auth, not both".to_owned(),
        ));
    }
    if cluster.basic_auth_password_file.is_some() && cluster.basic_auth_username.is_empty() {
        errors.push((
            "cluster.basic_auth_username",
            "basic auth needs a user name".to_owned(),
        ));
    }
    if !cluster.basic_auth_username.is_empty() && cluster.basic_auth_password_file.is_none() {
        errors.push((
            "cluster.basic_auth_password_file",
            "basic auth needs a password file".to_owned(),
        ));
    }
    errors
}

fn rdma_errors(rdma: &super::RdmaConfig) -> Vec<(&'static str, String)> {
    let mut errors = Vec::new();
    if !(10..=60_000).contains(&rdma.netlink_timeout_ms) {
        errors.push((
            "rdma.netlink_timeout_ms",
            format!("{} is out of range 10..=60000", rdma.netlink_timeout_ms),
        ));
    }
    let socket = &rdma.netlink_socket;
    if !socket.as_os_str().is_empty() && !socket.is_absolute() {
        errors.push((
            "rdma.netlink_socket",
            format!(
                "`{}` is not an absolute path (empty: the kernel)",
                socket.display()
            ),
        ));
    }
    if rdma.qp_optional_counters && !rdma.allow_qp_counter_auto_mode {
        errors.push((
            "rdma.qp_optional_counters",
            "has no effect without `rdma.allow_qp_counter_auto_mode = true`".to_owned(),
        ));
    }
    errors
}

/// The field name of serde's `unknown field `x`, expected ...` message.
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

/// Removes the key at `path` from `table`; false when there is nothing at that path.
fn remove(table: &mut toml::Table, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut value: &mut toml::Value = match parents.first() {
        None => return table.remove(last).is_some(),
        Some(first) => match table.get_mut(first) {
            Some(v) => v,
            None => return false,
        },
    };
    for seg in &parents[1..] {
        value = match value {
            toml::Value::Table(t) => match t.get_mut(seg) {
                Some(v) => v,
                None => return false,
            },
            toml::Value::Array(a) => match seg.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match value {
        toml::Value::Table(t) => t.remove(last).is_some(),
        toml::Value::Array(a) => match last.parse::<usize>() {
            Ok(i) if i < a.len() => {
                a.remove(i);
                true
            }
            _ => false,
        },
        _ => false,
    }
}

/// Span of the key (or array element) at `path` in the span-keeping parse.
fn key_span(table: &toml_edit::Table, path: &[String]) -> Option<Range<usize>> {
    let (first, rest) = path.split_first()?;
    let (key, item) = table.get_key_value(first)?;
    if rest.is_empty() {
        return key.span().or_else(|| item.span());
    }
    item_span(item, rest).or_else(|| key.span())
}

fn item_span(item: &toml_edit::Item, path: &[String]) -> Option<Range<usize>> {
    match item {
        toml_edit::Item::Table(t) => key_span(t, path),
        toml_edit::Item::Value(v) => value_span(v, path),
        toml_edit::Item::ArrayOfTables(a) => {
            let (first, rest) = path.split_first()?;
            let t = a.get(first.parse().ok()?)?;
            if rest.is_empty() {
                t.span()
            } else {
                key_span(t, rest)
            }
        }
        toml_edit::Item::None => None,
    }
}

fn value_span(value: &toml_edit::Value, path: &[String]) -> Option<Range<usize>> {
    let (first, rest) = path.split_first()?;
    let inner = match value {
        toml_edit::Value::InlineTable(t) => {
            let (key, item) = t.get_key_value(first)?;
            let v = item.as_value()?;
            if rest.is_empty() {
                return key.span().or_else(|| v.span());
            }
            v
        }
        toml_edit::Value::Array(a) => {
            let v = a.get(first.parse().ok()?)?;
            if rest.is_empty() {
                return v.span();
            }
            v
        }
        _ => return None,
    };
    value_span(inner, rest)
}

/// Byte offset → 1-based line.
struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Self { starts }
    }

    fn line_of(&self, offset: usize) -> usize {
        self.starts.partition_point(|&s| s <= offset)
    }
}

#[cfg(test)]
mod tests;
