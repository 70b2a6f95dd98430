//! Workload identity: pid or cgroup → the container, systemd unit or host it belongs to.
//!
//! The cgroup path says what a workload is ([`crate::host::path`]); the container runtime's CRI
//! socket adds pod namespace, pod and container names when it answers ([`cri`]). Resolved
//! workloads are cached by cgroup id (the inode of the cgroup v2 directory, what BPF programs see)
//! and evicted when the cgroup disappears.

mod cgroupns;
pub mod cri;
pub mod grpc;
pub mod podresources;
pub mod tenants;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tally_exporters::LabelSet;

use crate::catalogue::WORKLOAD_LABELS;
use crate::config::TenantsConfig;
use crate::host::layout::Layout;
use crate::host::path;
pub use crate::host::path::{ContainerRef, Names, PathIdentity, QosClass, Runtime};
use tenants::{NamespaceFileError, TenantLabels, Tenants};

/// A metered workload: what its cgroup path says, plus CRI names when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub identity: PathIdentity,
    pub names: Names,
    /// Its promoted tenant labels (pods only, when `[tenants] labels` names any).
    pub tenant: TenantLabels,
    labels: LabelSet,
}

impl Workload {
    pub fn new(identity: PathIdentity, names: Names) -> Self {
        Self::with_tenant(identity, names, Arc::from(Vec::new()))
    }

    /// With tenant labels, which follow the workload labels in every series.
    pub fn with_tenant(identity: PathIdentity, names: Names, tenant: TenantLabels) -> Self {
        let empty = || Arc::<str>::from("");
        let (pod_uid, container_id, unit) = match &identity {
            PathIdentity::Container(c) => (
                Arc::from(c.pod_uid.as_deref().unwrap_or("")),
                Arc::from(c.container_id.as_str()),
                empty(),
            ),
            PathIdentity::Unit(u) => (empty(), empty(), Arc::from(u.as_str())),
            PathIdentity::Host | PathIdentity::Assigned(_) => (empty(), empty(), empty()),
        };
        let mut labels = vec![
            (WORKLOAD_LABELS[0], Arc::from(names.namespace.as_str())),
            (WORKLOAD_LABELS[1], Arc::from(names.pod.as_str())),
            (WORKLOAD_LABELS[2], pod_uid),
            (WORKLOAD_LABELS[3], Arc::from(names.container.as_str())),
            (WORKLOAD_LABELS[4], container_id),
            (WORKLOAD_LABELS[5], unit),
        ];
        labels.extend(tenant.iter().cloned());
        Self {
            identity,
            names,
            tenant,
            labels: Arc::from(labels),
        }
    }

    /// The value of a promoted tenant label (by its metric label name), as exported.
    pub fn tenant_value(&self, name: &str) -> Option<&str> {
        self.tenant
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| &**v)
    }

    /// The per-workload label set, built once.
    pub fn labels(&self) -> &LabelSet {
        &self.labels
    }

    pub fn container_id(&self) -> Option<&str> {
        match &self.identity {
            PathIdentity::Container(c) => Some(&c.container_id),
            _ => None,
        }
    }
}

/// Why a pid could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum PidError {
    /// The process exited before or while its cgroup file was read.
    #[error("process {pid} is gone")]
    Gone { pid: u32 },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Resolves cgroups and pids to shared [`Workload`]s, caching by cgroup id.
#[derive(Debug)]
pub struct Identity {
    proc_root: PathBuf,
    layout: Layout,
    /// Where the agent's cgroup namespace is rooted in the cgroup2 hierarchy (`/` outside one):
    /// cgroup2 paths in `/proc/<pid>/cgroup` are shown relative to it.
    ns_root: String,
    by_cgroup: HashMap<u64, Arc<Workload>, foldhash::fast::RandomState>,
    cri: Option<cri::CriHandle>,
    tenants: Tenants,
}

impl Identity {
    pub fn new(proc_root: &Path, layout: Layout, cri: Option<cri::CriHandle>) -> Self {
        let ns_root = match &layout.unified {
            Some(unified) => match cgroupns::namespace_root(proc_root, unified) {
                Ok(root) => {
                    if root != "/" {
                        tracing::info!(
                            root,
                            "in a cgroup namespace: resolving process cgroups against its root"
                        );
                    }
                    root
                }
                Err(e) => {
                    tracing::warn!(
                        error = %tally_error_chain::chain(&e),
                        "in a cgroup namespace whose root is not found: processes outside it are charged to the host row"
                    );
                    "/".to_owned()
                }
            },
            None => "/".to_owned(),
        };
        Self {
            proc_root: proc_root.to_path_buf(),
            layout,
            ns_root,
            by_cgroup: HashMap::default(),
            cri,
            tenants: Tenants::default(),
        }
    }

    /// Applies `[tenants]`; workloads take their new labels as they are next looked up.
    pub fn set_tenants(&mut self, config: &TenantsConfig) {
        self.tenants.configure(config);
    }

    /// Reads the namespace labels file again when it changed.
    /// The namespace labels `[tenants]` promotes, by namespace.
    pub fn namespace_labels(
        &self,
    ) -> std::sync::Arc<std::collections::HashMap<String, std::collections::BTreeMap<String, String>>>
    {
        self.tenants.promoted_by_namespace()
    }

    pub fn refresh_tenants(&mut self) -> Result<(), NamespaceFileError> {
        self.tenants.refresh()
    }

    /// `(label, values folded into other)` per promoted label.
    pub fn tenants_folded(&self) -> Vec<(&'static str, u64)> {
        self.tenants.folded()
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The workload of the cgroup with id `cgroup_id`, whose path relative to its hierarchy root
    /// is `rel_path`. Cached; a container's CRI names are filled in as soon as CRI knows them.
    pub fn workload(&mut self, cgroup_id: u64, identity: PathIdentity) -> Arc<Workload> {
        let (names, tenant) = self.names_for(&identity);
        if let Some(w) = self.by_cgroup.get(&cgroup_id) {
            if w.identity == identity && w.names == names && w.tenant == tenant {
                return w.clone();
            }
        }
        let w = Arc::new(Workload::with_tenant(identity, names, tenant));
        self.by_cgroup.insert(cgroup_id, w.clone());
        w
    }

    /// CRI names of a container, and its tenant labels (every container's, when any label is
    /// promoted; empty ones until CRI names it). Units and the host have none.
    fn names_for(&mut self, identity: &PathIdentity) -> (Names, TenantLabels) {
        let PathIdentity::Container(c) = identity else {
            return (Names::default(), Arc::from(Vec::new()));
        };
        let mut names = self
            .cri
            .as_ref()
            .and_then(|cri| cri.lookup(&c.container_id))
            .unwrap_or_default();
        if !self.tenants.enabled() {
            return (names, Arc::from(Vec::new()));
        }
        let (tenant, selectable) = self.tenants.resolve(&names.namespace, &names.labels);
        names.labels = selectable;
        (names, tenant)
    }

    /// A cached workload with these CRI names (the kubelet's device assignments carry names only).
    pub fn by_names(&self, names: &Names) -> Option<Arc<Workload>> {
        self.by_cgroup.values().find(|w| &w.names == names).cloned()
    }

    /// The workload of a pod container known only from the kubelet's device assignments: a
    /// cached one with its names, else one of its own, with its namespace's tenant labels.
    pub fn assigned(&mut self, names: &Names) -> Arc<Workload> {
        if let Some(w) = self.by_names(names) {
            return w;
        }
        if !self.tenants.enabled() {
            return Arc::new(Workload::new(
                PathIdentity::Assigned(names.clone()),
                names.clone(),
            ));
        }
        let (tenant, selectable) = self.tenants.resolve(&names.namespace, &names.labels);
        let mut with_labels = names.clone();
        with_labels.labels = selectable;
        Arc::new(Workload::with_tenant(
            PathIdentity::Assigned(names.clone()),
            with_labels,
            tenant,
        ))
    }

    /// Forgets every cgroup id not in `live`.
    pub fn retain(&mut self, live: impl Fn(u64) -> bool) {
        self.by_cgroup.retain(|id, _| live(*id));
    }

    pub fn cached(&self) -> usize {
        self.by_cgroup.len()
    }

    /// The workload a process belongs to, from `/proc/<pid>/cgroup`. A line naming a container
    /// wins over one naming a systemd unit (on a mixed v1/v2 node a pod's processes can sit in
    /// v1 pod cgroups while the cgroup2 line names `containerd.service`); among equals, the
    /// cgroup2 line first. cgroup2 paths are shown relative to the agent's cgroup namespace.
    pub fn resolve_pid(&mut self, pid: u32) -> Result<Arc<Workload>, PidError> {
        let file = self.proc_root.join(pid.to_string()).join("cgroup");
        let text =
            std::fs::read_to_string(&file).map_err(|source| match source.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ESRCH) => PidError::Gone { pid },
                _ => PidError::Read { path: file, source },
            })?;
        let mut lines: Vec<(bool, String)> = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (hid, _controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                let v2 = hid == "0";
                let path = if v2 {
                    cgroupns::join(&self.ns_root, path)
                } else {
                    path.to_owned()
                };
                Some((v2, path))
            })
            .collect();
        lines.sort_by_key(|(v2, path)| {
            let container = matches!(path::resolve(path).0, PathIdentity::Container(_));
            (!container, !v2)
        });
        for (v2, path) in lines {
            let (identity, len) = path::resolve(&path);
            if identity == PathIdentity::Host {
                continue;
            }
            let rel = &path[..len];
            let dir = match (v2, &self.layout.unified) {
                (true, Some(unified)) => unified.join(rel.trim_start_matches('/')),
                _ => match self
                    .layout
                    .roots()
                    .map(|r| r.join(rel.trim_start_matches('/')))
                    .find(|d| d.is_dir())
                {
                    Some(d) => d,
                    None => continue,
                },
            };
            let Ok(id) = tally_ebpf::cgroup_id(&dir) else {
                continue;
            };
            return Ok(self.workload(id, identity));
        }
        Ok(Arc::new(Workload::new(
            PathIdentity::Host,
            Names::default(),
        )))
    }
}

/// Resolves `pid` for a source that samples processes (GPU, RDMA): the answer of this sample
/// (`now`) or of the last (`last`: pids are reused, so only the last sample's are trusted), else
/// a fresh lookup. A pid that exited before it was looked at, or lives in another pid
/// namespace, is charged to `host`. Records the answer in `now`.
pub fn resolve_sampled_pid(
    identity: &mut Identity,
    host: &Arc<Workload>,
    last: &std::collections::HashMap<u32, Arc<Workload>>,
    now: &mut std::collections::HashMap<u32, Arc<Workload>>,
    pid: u32,
) -> Arc<Workload> {
    if let Some(w) = now.get(&pid).or_else(|| last.get(&pid)) {
        let w = w.clone();
        now.insert(pid, w.clone());
        return w;
    }
    let w = match identity.resolve_pid(pid) {
        Ok(w) => w,
        Err(PidError::Gone { .. } | PidError::Read { .. }) => host.clone(),
    };
    now.insert(pid, w.clone());
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mixed v1/v2 node: the pod's process sits in v1 pod cgroups while its cgroup2 line names
    /// the runtime's unit. The container line wins.
    #[test]
    fn a_container_line_wins_over_a_unit_line() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cgroup");
        let container = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let pod = "kubepods/besteffort/pod1a2b3c4d-0000-1111-2222-333344445555";
        for d in [
            "unified/system.slice/containerd.service".to_owned(),
            format!("cpu,cpuacct/{pod}/{container}"),
            format!("memory/{pod}/{container}"),
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("unified/cgroup.controllers"), "").unwrap();
        for v1 in ["cpu,cpuacct", "memory"] {
            std::fs::write(root.join(v1).join("cgroup.procs"), "").unwrap();
        }
        let proc_root = dir.path().join("proc");
        std::fs::create_dir_all(proc_root.join("77")).unwrap();
        std::fs::write(
            proc_root.join("77/cgroup"),
            format!(
                "5:memory:/{pod}/{container}\n3:cpu,cpuacct:/{pod}/{container}\n0::/system.slice/containerd.service\n"
            ),
        )
        .unwrap();
        let layout = Layout::detect(&root).unwrap();
        let mut identity = Identity::new(&proc_root, layout, None);
        let w = identity.resolve_pid(77).unwrap();
        let id = match &w.identity {
            PathIdentity::Container(c) => Some(c.container_id.as_str()),
            _ => None,
        };
        assert_eq!(id, Some(container), "charged to {:?}", w.identity);
    }
}
