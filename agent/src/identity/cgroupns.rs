//! The agent's own cgroup namespace. In one (a DaemonSet pod on cgroup v2: `privileged: false`
//! gives each container its own), `/proc/<pid>/cgroup` shows every other process's cgroup
//! relative to the agent's namespace root: `0::/../../kubepods.slice/…/cri-containerd-<id>.scope`.
//! Joined to where that root lies in the host's hierarchy, the path is the host's again.
//!
//! The root is found once, at start and on reload: the agent looks for its own pid in the
//! `cgroup.procs` of the host hierarchy it meters, and takes away the path its namespace shows
//! for itself. Outside a namespace the path shown is where the pid is, and the root is `/`.
//! (Comparing `<proc_root>/{self,1}/ns/cgroup` would be simpler, but reading PID 1's needs
//! ptrace access to it, which the DaemonSet's five capabilities do not give.)

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

/// Why the namespace root could not be placed; paths shown relative to it cannot be resolved.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no cgroup2 line (0::)")]
    NoUnifiedLine { path: PathBuf },
    #[error("pid {pid} is in no cgroup.procs under {root}: is the host's cgroup2 hierarchy mounted at paths.cgroup_root?")]
    NotFound { pid: u32, root: PathBuf },
}

/// Where the agent's cgroup namespace is rooted in the cgroup2 hierarchy at `unified` (`/` when
/// it shares the host's).
pub fn namespace_root(proc_root: &Path, unified: &Path) -> Result<String, NamespaceError> {
    let read = |path: PathBuf| {
        std::fs::read_to_string(&path).map_err(|source| NamespaceError::Read { path, source })
    };
    let self_cgroup = proc_root.join("self/cgroup");
    let shown = read(self_cgroup.clone())?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .ok_or(NamespaceError::NoUnifiedLine { path: self_cgroup })?;
    let link = proc_root.join("self");
    let pid: u32 = std::fs::read_link(&link)
        .map_err(|source| NamespaceError::Read {
            path: link.clone(),
            source,
        })?
        .to_string_lossy()
        .parse()
        .map_err(|_| NamespaceError::Read {
            path: link,
            source: std::io::Error::from(std::io::ErrorKind::InvalidData),
        })?;
    let lists = |dir: &Path| {
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .is_ok_and(|procs| procs.lines().any(|l| l.trim().parse() == Ok(pid)))
    };
    if lists(&unified.join(shown.trim_start_matches('/'))) {
        return Ok("/".to_owned());
    }
    let own = find_pid(unified, pid).ok_or_else(|| NamespaceError::NotFound {
        pid,
        root: unified.to_path_buf(),
    })?;
    // The host path of our cgroup ends with what our namespace shows of it; the rest is the root.
    let root = own
        .strip_suffix(shown.trim_end_matches('/'))
        .filter(|_| shown != "/")
        .unwrap_or(&own);
    Ok(if root.is_empty() {
        "/".to_owned()
    } else {
        root.to_owned()
    })
}

/// The host path (`/a/b`) of the cgroup whose `cgroup.procs` lists `pid`, breadth first.
fn find_pid(unified: &Path, pid: u32) -> Option<String> {
    let mut queue = VecDeque::from([PathBuf::new()]);
    while let Some(rel) = queue.pop_front() {
        let dir = unified.join(&rel);
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            if procs.lines().any(|l| l.trim().parse() == Ok(pid)) {
                return Some(format!("/{}", rel.to_string_lossy()));
            }
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push_back(rel.join(entry.file_name()));
            }
        }
    }
    None
}

/// `shown` (a `/proc/<pid>/cgroup` path relative to the namespace rooted at `root`) as a host
/// path. `..` never climbs above the host root.
pub fn join(root: &str, shown: &str) -> String {
    if root == "/" && !shown.starts_with("/..") {
        return shown.to_owned();
    }
    let mut parts: Vec<&str> = root.split('/').filter(|c| !c.is_empty()).collect();
    for component in shown.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_paths_join_the_namespace_root() {
        let root = "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-poda.slice/cri-containerd-1.scope";
        assert_eq!(
            join(root, "/../../kubepods-besteffort-podb.slice/cri-containerd-2.scope"),
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podb.slice/cri-containerd-2.scope"
        );
        assert_eq!(join(root, "/"), root);
        assert_eq!(join(root, "/child"), format!("{root}/child"));
        assert_eq!(join("/t/agent", "/../work"), "/t/work");
        assert_eq!(
            join("/", "/system.slice/a.service"),
            "/system.slice/a.service"
        );
        assert_eq!(join("/a", "/../../../x"), "/x");
    }

    #[test]
    fn the_root_is_where_our_pid_is_less_what_our_namespace_shows() {
        let dir = tempfile::tempdir().unwrap();
        let proc_root = dir.path().join("proc");
        let unified = dir.path().join("cgroup");
        let own = unified.join("t/agent");
        std::fs::create_dir_all(&own).unwrap();
        std::fs::write(unified.join("cgroup.procs"), "1\n").unwrap();
        std::fs::write(own.join("cgroup.procs"), "4242\n").unwrap();
        std::fs::create_dir_all(proc_root.join("4242")).unwrap();
        std::os::unix::fs::symlink("4242", proc_root.join("self")).unwrap();
        std::fs::write(proc_root.join("4242/cgroup"), "0::/\n").unwrap();
        assert_eq!(namespace_root(&proc_root, &unified).unwrap(), "/t/agent");
        // Moved below its namespace root after unsharing: the root is still /t/agent.
        std::fs::create_dir_all(own.join("leaf")).unwrap();
        std::fs::write(own.join("cgroup.procs"), "").unwrap();
        std::fs::write(own.join("leaf/cgroup.procs"), "4242\n").unwrap();
        std::fs::write(proc_root.join("4242/cgroup"), "0::/leaf\n").unwrap();
        assert_eq!(namespace_root(&proc_root, &unified).unwrap(), "/t/agent");
        // No namespace of its own: the path shown is where the pid is.
        std::fs::write(proc_root.join("4242/cgroup"), "0::/t/agent/leaf\n").unwrap();
        assert_eq!(namespace_root(&proc_root, &unified).unwrap(), "/");
        // In a namespace but nowhere in the hierarchy: an error naming the pid.
        std::fs::write(proc_root.join("4242/cgroup"), "0::/leaf\n").unwrap();
        std::fs::write(own.join("leaf/cgroup.procs"), "").unwrap();
        let err = namespace_root(&proc_root, &unified)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("pid 4242 is in no cgroup.procs under"),
            "{err}"
        );
    }
}
