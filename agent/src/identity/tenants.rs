//! Tenants: pod and namespace labels promoted to labels of every per-workload series.
//!
//! The allowlist (`[tenants] labels`) names label keys. A pod's value for one is its own label,
//! else its namespace's, else empty. Namespace labels come from a file in the shape
//! `kubectl get namespaces -o json` prints: the agent has no API-server access of its own (a
//! watch on namespaces from every node would load the API server with one connection per node
//! for data that changes a few times a day), so a cluster job or a ConfigMap keeps the file.
//! Each label takes at most `max_values_per_label` distinct values, first come first kept;
//! later ones are exported as `other` and counted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::Deserialize;

use crate::config::labels::intern;
pub use crate::config::labels::label_name;
use crate::config::TenantsConfig;

/// The value a label takes beyond its cap.
pub const OTHER: &str = "other";

/// How many folded values each label remembers, so that each is counted once; beyond it every
/// folded lookup of a new value counts.
const FOLDED_REMEMBERED: usize = 100_000;

/// The tenant label pairs of one workload, in the allowlist's order.
pub type TenantLabels = Arc<[(&'static str, Arc<str>)]>;

/// Why the namespace labels file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceFileError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a NamespaceList (`kubectl get namespaces -o json`)")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Deserialize)]
struct NamespaceList {
    items: Vec<NamespaceItem>,
}

#[derive(Deserialize)]
struct NamespaceItem {
    metadata: NamespaceMeta,
}

#[derive(Deserialize)]
struct NamespaceMeta {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// One promoted label: its key, its metric name, the values admitted so far and the folded.
#[derive(Debug)]
struct Promoted {
    key: String,
    name: &'static str,
    admitted: HashSet<Arc<str>>,
    folded: HashSet<Arc<str>>,
    folded_total: u64,
}

/// The allowlist, the namespace labels and each label's values.
#[derive(Debug, Default)]
pub struct Tenants {
    labels: Vec<Promoted>,
    max_values: usize,
    file: Option<PathBuf>,
    /// The file's modification time and length when last read (read again when either changes).
    read_stamp: Option<(SystemTime, u64)>,
    namespaces: HashMap<String, BTreeMap<String, String>>,
    /// `namespaces` with the promoted keys only, shared with the admission verdicts.
    promoted_by_namespace: Arc<HashMap<String, BTreeMap<String, String>>>,
    empty: Option<Arc<str>>,
}

impl Tenants {
    pub fn new(config: &TenantsConfig) -> Tenants {
        let mut tenants = Tenants::default();
        tenants.configure(config);
        tenants
    }

    /// Applies a (reloaded) configuration. A label kept keeps the values it admitted.
    pub fn configure(&mut self, config: &TenantsConfig) {
        let mut old: HashMap<String, Promoted> =
            self.labels.drain(..).map(|p| (p.key.clone(), p)).collect();
        self.labels = config
            .labels
            .iter()
            .map(|key| {
                old.remove(key).unwrap_or_else(|| Promoted {
                    key: key.clone(),
                    name: intern(&label_name(key)),
                    admitted: HashSet::new(),
                    folded: HashSet::new(),
                    folded_total: 0,
                })
            })
            .collect();
        self.max_values = config.max_values_per_label.max(1);
        if self.file != config.namespace_labels_file {
            self.file.clone_from(&config.namespace_labels_file);
            self.read_stamp = None;
            self.namespaces.clear();
        }
        self.promote_namespaces();
    }

    /// The promoted labels of each namespace that has any, for budgets that select on them
    /// before a workload exists (admission).
    pub fn promoted_by_namespace(&self) -> Arc<HashMap<String, BTreeMap<String, String>>> {
        self.promoted_by_namespace.clone()
    }

    fn promote_namespaces(&mut self) {
        let keys: HashSet<&str> = self.labels.iter().map(|p| p.key.as_str()).collect();
        self.promoted_by_namespace = Arc::new(
            self.namespaces
                .iter()
                .map(|(ns, labels)| {
                    let promoted: BTreeMap<String, String> = labels
                        .iter()
                        .filter(|(k, _)| keys.contains(k.as_str()))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    (ns.clone(), promoted)
                })
                .filter(|(_, promoted)| !promoted.is_empty())
                .collect(),
        );
    }

    /// Whether any label is promoted.
    pub fn enabled(&self) -> bool {
        !self.labels.is_empty()
    }

    /// Reads the namespace labels file again when it changed. On an error the labels read
    /// before stay in use, and the error is returned once per change of the file.
    pub fn refresh(&mut self) -> Result<(), NamespaceFileError> {
        let Some(path) = self.file.clone().filter(|_| self.enabled()) else {
            return Ok(());
        };
        let stamp = std::fs::metadata(&path)
            .and_then(|m| Ok((m.modified()?, m.len())))
            .map_err(|source| NamespaceFileError::Read {
                path: path.clone(),
                source,
            });
        let stamp = match stamp {
            Ok(stamp) if Some(stamp) == self.read_stamp => return Ok(()),
            Ok(stamp) => stamp,
            Err(e) => {
                // Reported once until the file is back.
                return if self.read_stamp == Some(MISSING) {
                    Ok(())
                } else {
                    self.read_stamp = Some(MISSING);
                    Err(e)
                };
            }
        };
        self.read_stamp = Some(stamp);
        self.namespaces = read_namespaces(&path)?;
        self.promote_namespaces();
        Ok(())
    }

    /// The tenant labels of a pod's workload, and the labels budgets select on: the pod's own,
    /// plus its namespace's for promoted keys the pod lacks.
    pub fn resolve(
        &mut self,
        namespace: &str,
        pod_labels: &Arc<BTreeMap<String, String>>,
    ) -> (TenantLabels, Arc<BTreeMap<String, String>>) {
        let from_namespace = self.namespaces.get(namespace);
        let mut merged: Option<BTreeMap<String, String>> = None;
        let empty = self.empty.get_or_insert_with(|| Arc::from("")).clone();
        let max_values = self.max_values;
        let pairs: Vec<(&'static str, Arc<str>)> = self
            .labels
            .iter_mut()
            .map(|p| {
                let value = match pod_labels.get(&p.key) {
                    Some(v) => Some(v.as_str()),
                    None => {
                        let v = from_namespace.and_then(|labels| labels.get(&p.key));
                        if let Some(v) = v {
                            merged
                                .get_or_insert_with(|| (**pod_labels).clone())
                                .insert(p.key.clone(), v.clone());
                        }
                        v.map(String::as_str)
                    }
                };
                let value = match value {
                    None | Some("") => empty.clone(),
                    Some(v) => p.admit(v, max_values),
                };
                (p.name, value)
            })
            .collect();
        let selectable = merged.map_or_else(|| pod_labels.clone(), Arc::new);
        (Arc::from(pairs), selectable)
    }

    /// `(label name, values folded into other so far)` for every promoted label.
    pub fn folded(&self) -> Vec<(&'static str, u64)> {
        self.labels
            .iter()
            .map(|p| (p.name, p.folded_total))
            .collect()
    }
}

/// A stamp no file has: the file was missing or unreadable at the last look.
const MISSING: (SystemTime, u64) = (SystemTime::UNIX_EPOCH, u64::MAX);

impl Promoted {
    /// The value to export: `value` while it is one of the first `max_values`, else `other`.
    fn admit(&mut self, value: &str, max_values: usize) -> Arc<str> {
        if let Some(v) = self.admitted.get(value) {
            return v.clone();
        }
        if self.admitted.len() < max_values {
            let v: Arc<str> = Arc::from(value);
            self.admitted.insert(v.clone());
            return v;
        }
        if !self.folded.contains(value) {
            self.folded_total += 1;
            if self.folded.len() < FOLDED_REMEMBERED {
                self.folded.insert(Arc::from(value));
            }
        }
        Arc::from(OTHER)
    }
}

fn read_namespaces(
    path: &Path,
) -> Result<HashMap<String, BTreeMap<String, String>>, NamespaceFileError> {
    let text = std::fs::read(path).map_err(|source| NamespaceFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let list: NamespaceList =
        serde_json::from_slice(&text).map_err(|source| NamespaceFileError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(list
        .items
        .into_iter()
        .map(|item| (item.metadata.name, item.metadata.labels))
        .collect())
}

#[cfg(test)]
mod tests;
