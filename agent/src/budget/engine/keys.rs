//! The keys of the engine's maps: typed, cheap to clone, and ordered as their names in the state
//! file (budget name, then subject or workload name), so maps iterate as they always did.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use super::decide::Subject;
use crate::identity::PathIdentity;

/// A shared budget's one subject, by name.
pub(super) const SHARED: &str = "shared";

/// How the subject of one group of a `per` budget is named: `per:<value>`.
pub(super) const PER_PREFIX: &str = "per:";

/// A workload's key in the state file and the engine's maps.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct WorkloadKey(Arc<str>);

impl WorkloadKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for WorkloadKey {
    fn from(name: &str) -> WorkloadKey {
        WorkloadKey(Arc::from(name))
    }
}

impl std::fmt::Display for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The key of a workload in the state file and the engine's maps.
pub(super) fn subject_key(identity: &PathIdentity) -> WorkloadKey {
    let name = match identity {
        PathIdentity::Container(c) => format!("container:{}", c.container_id),
        PathIdentity::Unit(u) => format!("unit:{u}"),
        PathIdentity::Host => "host".to_owned(),
        PathIdentity::Assigned(n) => {
            format!("assigned:{}/{}/{}", n.namespace, n.pod, n.container)
        }
    };
    WorkloadKey(Arc::from(name))
}

/// Whom a budget's window is about: every workload a shared budget selects, or one workload.
/// Compared, ordered and hashed as its name.
#[derive(Debug, Clone)]
pub(super) enum SubjectId {
    Shared,
    /// The workloads of a `per` budget with one value, by its name (`per:<value>`).
    Group(Arc<str>),
    Workload(WorkloadKey),
}

impl SubjectId {
    /// The subject of the workloads of a `per` budget whose value is `value`.
    pub fn group(value: &str) -> SubjectId {
        SubjectId::Group(Arc::from(format!("{PER_PREFIX}{value}")))
    }

    /// Its name in the state file, logs and alerts.
    pub fn as_str(&self) -> &str {
        match self {
            SubjectId::Shared => SHARED,
            SubjectId::Group(name) => name,
            SubjectId::Workload(w) => w.as_str(),
        }
    }
}

impl PartialEq for SubjectId {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for SubjectId {}

impl std::hash::Hash for SubjectId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl Ord for SubjectId {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl PartialOrd for SubjectId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A window's key: its budget and whom it is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct SubjectKey {
    pub budget: Arc<str>,
    pub id: SubjectId,
}

impl SubjectKey {
    /// The key of the names the state file records.
    pub fn from_names(budget: &str, subject: &str) -> SubjectKey {
        SubjectKey {
            budget: Arc::from(budget),
            id: if subject == SHARED {
                SubjectId::Shared
            } else if subject.starts_with(PER_PREFIX) {
                SubjectId::Group(Arc::from(subject))
            } else {
                SubjectId::Workload(WorkloadKey::from(subject))
            },
        }
    }
}

/// A throttle's key: its budget and the workload it holds back.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct ThrottleKey {
    pub budget: Arc<str>,
    pub workload: WorkloadKey,
}

/// What a window can be looked up by: its key, or the `(budget, subject)` names of the state
/// file.
pub(super) trait SubjectName {
    fn key(&self) -> Cow<'_, SubjectKey>;
}

impl SubjectName for SubjectKey {
    fn key(&self) -> Cow<'_, SubjectKey> {
        Cow::Borrowed(self)
    }
}

// Tests look windows up by their names.
#[cfg(test)]
impl SubjectName for (String, String) {
    fn key(&self) -> Cow<'_, SubjectKey> {
        Cow::Owned(SubjectKey::from_names(&self.0, &self.1))
    }
}

/// Every window, in the order of their names.
#[derive(Debug, Default)]
pub(super) struct Subjects(BTreeMap<SubjectKey, Subject>);

impl Subjects {
    pub fn get(&self, name: &impl SubjectName) -> Option<&Subject> {
        self.0.get(name.key().as_ref())
    }
}

#[cfg(test)]
impl<K: SubjectName> std::ops::Index<&K> for Subjects {
    type Output = Subject;

    fn index(&self, name: &K) -> &Subject {
        &self.0[name.key().as_ref()]
    }
}

// The rest of the map's interface, as it is.
impl std::ops::Deref for Subjects {
    type Target = BTreeMap<SubjectKey, Subject>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Subjects {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}
