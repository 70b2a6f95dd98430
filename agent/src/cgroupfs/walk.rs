//! Finding workload cgroups: a walk of each hierarchy that stops at the first directory naming a
//! workload, merged across hierarchies by relative path.

use std::collections::HashMap;
use std::path::Path;

use super::layout::Layout;
use super::COLLECTOR;
use crate::errors::ErrorCounts;
use crate::identity::path::{self, Context, PathIdentity, Step};

/// A workload cgroup found by the walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The cgroup v2 directory's inode where the workload has one, else its first v1 directory's.
    pub cgroup_id: u64,
    /// Path relative to each hierarchy root, starting with `/`.
    pub rel: String,
    pub identity: PathIdentity,
}

/// Walks the unified hierarchy and the v1 cpuacct and memory ones (blkio mirrors them).
pub fn discover(layout: &Layout, errors: &mut ErrorCounts) -> Vec<Found> {
    let mut found: HashMap<String, Found> = HashMap::new();
    let roots = [&layout.unified, &layout.cpuacct, &layout.memory];
    for root in roots.into_iter().flatten() {
        let mut out = Vec::new();
        walk(root, root, &Context::default(), &mut out, errors);
        for (rel, identity, id) in out {
            found.entry(rel.clone()).or_insert(Found {
                cgroup_id: id,
                rel,
                identity,
            });
        }
    }
    let mut found: Vec<Found> = found.into_values().collect();
    found.sort_by(|a, b| a.rel.cmp(&b.rel));
    found
}

type Out = Vec<(String, PathIdentity, u64)>;

fn walk(root: &Path, dir: &Path, ctx: &Context, out: &mut Out, errors: &mut ErrorCounts) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        // Removed between listing its parent and reading it.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            errors.record(COLLECTOR, "walk", || {
                format!("listing {}: {e}", dir.display())
            });
            return;
        }
    };
    for entry in entries.flatten() {
        // cgroupfs has only directories and regular files; `file_type` costs no extra syscall.
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let child = entry.path();
        match path::classify(ctx, name) {
            Step::Workload(identity) => {
                let Some(rel) = relative(root, &child) else {
                    continue;
                };
                let Ok(meta) = entry.metadata() else { continue };
                let unit = matches!(identity, PathIdentity::Unit(_));
                out.push((rel, identity, std::os::unix::fs::MetadataExt::ino(&meta)));
                if unit {
                    // Runtimes nested in a unit (kind nodes) put containers below it.
                    walk(root, &child, &path::below_unit(), out, errors);
                }
            }
            Step::Ignore => {}
            Step::Descend(next) => walk(root, &child, &next, out, errors),
        }
    }
}

fn relative(root: &Path, dir: &Path) -> Option<String> {
    let rel = dir.strip_prefix(root).ok()?.to_str()?;
    Some(format!("/{rel}"))
}
