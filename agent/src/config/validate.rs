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
use semantic::semantic_errors;

mod semantic;

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
