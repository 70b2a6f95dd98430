//! Finding workload cgroups: a walk of each hierarchy that, below a directory naming a workload,
//! looks only for containers nested in it, merged across hierarchies by relative path. In the cgroup v2
//! hierarchy it also records every directory's id, and which workload each id below a workload
//! belongs to, so per-cgroup-id sources (BPF) can be joined and their removed cgroups recognised.

use std::collections::HashMap;
use std::os::unix::fs::DirEntryExt;
use std::path::Path;

use super::layout::Layout;
use super::path::{self, Context, PathIdentity, Step};
use crate::errors::ErrorCounts;

/// The walk's failures are the cgroupfs collector's (`reason="walk"`).
const COLLECTOR: &str = "cgroupfs";

/// A workload cgroup found by the walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The cgroup v2 directory's inode where the workload has one, else its first v1 directory's.
    pub cgroup_id: u64,
    /// Path relative to each hierarchy root, starting with `/`.
    pub rel: String,
    pub identity: PathIdentity,
}

/// What one walk of every hierarchy found.
#[derive(Debug, Default)]
pub struct Discovery {
    pub found: Vec<Found>,
    /// Every cgroup v2 directory's id → the index in `found` of the workload it belongs to (the
    /// workload's own directory and everything below it), or `None` (root, slices, other).
    pub v2_ids: HashMap<u64, Option<usize>>,
}

/// Walks the unified hierarchy and the v1 cpuacct and memory ones (blkio mirrors them).
pub fn discover(layout: &Layout, errors: &mut ErrorCounts) -> Discovery {
    let mut by_rel: HashMap<String, (PathIdentity, u64)> = HashMap::new();
    let mut v2_owner: HashMap<u64, Option<String>> = HashMap::new();
    if let Some(root) = &layout.unified {
        if let Ok(meta) = std::fs::metadata(root) {
            v2_owner.insert(std::os::unix::fs::MetadataExt::ino(&meta), None);
        }
    }
    // Runtimes and systemd create a cgroup in every v1 controller they use, so the memory tree
    // mirrors cpuacct; it is walked only when there is no cpuacct hierarchy. A v1 directory is a
    // dozen files to list, so this halves the walk on hybrid nodes.
    let memory = if layout.cpuacct.is_some() {
        &None
    } else {
        &layout.memory
    };
    let roots = [&layout.unified, &layout.cpuacct, memory];
    // Directories of the first hierarchy walked, with their subdirectory counts: a v1 directory
    // whose twin in the cgroup v2 tree has as many subdirectories is the same subtree (systemd and
    // runc create both), already walked, and is not listed again.
    let mut walked: HashMap<String, u64> = HashMap::new();
    for (i, root) in roots.into_iter().enumerate() {
        let Some(root) = root else { continue };
        let first = i == 0 || (layout.unified.is_none() && walked.is_empty());
        let mut walker = Walker {
            root,
            out: Vec::new(),
            ids: (i == 0).then_some(&mut v2_owner),
            seen: if first {
                Seen::Record(&mut walked)
            } else {
                Seen::Skip(&walked)
            },
            errors,
        };
        walker.walk(root, &Context::default(), None);
        for (rel, identity, id) in walker.out {
            by_rel.entry(rel).or_insert((identity, id));
        }
    }
    let mut found: Vec<Found> = by_rel
        .into_iter()
        .map(|(rel, (identity, cgroup_id))| Found {
            cgroup_id,
            rel,
            identity,
        })
        .collect();
    found.sort_by(|a, b| a.rel.cmp(&b.rel));
    let index: HashMap<&str, usize> = found
        .iter()
        .enumerate()
        .map(|(i, f)| (f.rel.as_str(), i))
        .collect();
    let v2_ids = v2_owner
        .into_iter()
        .map(|(id, owner)| (id, owner.and_then(|rel| index.get(rel.as_str()).copied())))
        .collect();
    Discovery { found, v2_ids }
}

struct Walker<'a> {
    root: &'a Path,
    out: Vec<(String, PathIdentity, u64)>,
    /// Set for the cgroup v2 hierarchy only: id → relative path of the owning workload.
    ids: Option<&'a mut HashMap<u64, Option<String>>>,
    seen: Seen<'a>,
    errors: &'a mut ErrorCounts,
}

/// Directories already walked in another hierarchy, by relative path, with their link counts.
enum Seen<'a> {
    Record(&'a mut HashMap<String, u64>),
    Skip(&'a HashMap<String, u64>),
}

impl Walker<'_> {
    /// `owner` is the relative path of the workload `dir` belongs to, if any.
    fn walk(&mut self, dir: &Path, ctx: &Context, owner: Option<&str>) {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            // Removed between listing its parent and reading it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                self.errors.record(COLLECTOR, "walk", || {
                    format!("listing {}: {e}", dir.display())
                });
                return;
            }
        };
        for entry in entries.flatten() {
            // cgroupfs has only directories and regular files; `file_type` and `ino` come from
            // the directory listing itself, no extra syscall.
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let child = entry.path();
            let id = entry.ino();
            // A directory's link count is 2 plus its subdirectories (kernfs sets it so:
            // fs/kernfs/inode.c, `kernfs_refresh_inode`). Most cgroups are leaves, and listing
            // one means generating a dozen or more control-file entries for nothing, so leaves
            // are not listed. The stat is relative to the open parent, no path lookup.
            let nlink = entry
                .metadata()
                .map_or(u64::MAX, |m| std::os::unix::fs::MetadataExt::nlink(&m));
            let has_subdirs = nlink > 2;
            match &mut self.seen {
                Seen::Record(walked) => {
                    if let Some(rel) = relative(self.root, &child) {
                        walked.insert(rel, nlink);
                    }
                }
                Seen::Skip(walked) => {
                    let twin =
                        relative(self.root, &child).and_then(|rel| walked.get(&rel).copied());
                    if twin == Some(nlink) {
                        continue;
                    }
                }
            }
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            match path::classify(ctx, name) {
                Step::Workload(identity) => self.workload(&child, identity, id, has_subdirs),
                Step::Ignore => self.record_id(id, owner),
                Step::Descend(next) => {
                    self.record_id(id, owner);
                    if has_subdirs {
                        self.walk(&child, &next, owner);
                    }
                }
            }
        }
    }

    fn workload(&mut self, dir: &Path, identity: PathIdentity, id: u64, has_subdirs: bool) {
        let Some(rel) = relative(self.root, dir) else {
            return;
        };
        self.record_id(id, Some(&rel));
        self.out.push((rel.clone(), identity, id));
        if has_subdirs {
            // Runtimes nested in a unit, and Kubernetes nodes that are themselves containers
            // (kind, minikube), put containers below it; the workload owns the rest.
            self.walk(dir, &path::below_workload(), Some(&rel));
        }
    }

    fn record_id(&mut self, id: u64, owner: Option<&str>) {
        if let Some(ids) = self.ids.as_deref_mut() {
            ids.insert(id, owner.map(str::to_owned));
        }
    }
}

fn relative(root: &Path, dir: &Path) -> Option<String> {
    let rel = dir.strip_prefix(root).ok()?.to_str()?;
    Some(format!("/{rel}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::layout::Mode;
    use crate::host::path::{ContainerRef, QosClass, Runtime};

    const NODE: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "8d1f7c2e-4b5a-4c3d-9e8f-0a1b2c3d4e5f";

    /// A kind node (a Docker container) with a pod inside: the walk finds the node and the
    /// pod's container, and each cgroup id belongs to the innermost workload above it.
    #[test]
    fn a_pod_inside_a_node_container_is_its_own_workload() {
        let root = tempfile::tempdir().unwrap();
        let node = format!("system.slice/docker-{NODE}.scope");
        let pod = format!("{node}/kubepods/besteffort/pod{UID}/{ID}");
        for dir in [
            format!("{node}/system.slice/containerd.service"),
            format!("{pod}/sub"),
        ] {
            std::fs::create_dir_all(root.path().join(dir)).unwrap();
        }
        let layout = Layout {
            mode: Mode::V2,
            unified: Some(root.path().to_path_buf()),
            cpuacct: None,
            memory: None,
            blkio: None,
            cpu: None,
            freezer: None,
        };
        let discovery = discover(&layout, &mut ErrorCounts::default());
        let found: Vec<(&str, &PathIdentity)> = discovery
            .found
            .iter()
            .map(|f| (f.rel.as_str(), &f.identity))
            .collect();
        let container = |pod_uid: Option<&str>, id: &str, runtime, qos| {
            PathIdentity::Container(ContainerRef {
                pod_uid: pod_uid.map(str::to_owned),
                container_id: id.to_owned(),
                runtime,
                qos,
            })
        };
        let node_rel = format!("/{node}");
        let pod_rel = format!("/{pod}");
        assert_eq!(
            found,
            vec![
                (
                    node_rel.as_str(),
                    &container(None, NODE, Runtime::Docker, None)
                ),
                (
                    pod_rel.as_str(),
                    &container(Some(UID), ID, Runtime::Unknown, Some(QosClass::BestEffort))
                ),
            ]
        );
        let owner = |rel: &str| {
            let ino = std::os::unix::fs::MetadataExt::ino(
                &std::fs::metadata(root.path().join(rel)).unwrap(),
            );
            discovery.v2_ids[&ino]
        };
        assert_eq!(owner(&format!("{pod}/sub")), Some(1));
        assert_eq!(owner(&pod), Some(1));
        assert_eq!(
            owner(&format!("{node}/system.slice/containerd.service")),
            Some(0)
        );
        assert_eq!(owner(&format!("{node}/kubepods/besteffort")), Some(0));
        assert_eq!(owner(&node), Some(0));
        assert_eq!(owner("system.slice"), None);
    }
}
