//! Privileges: effective uid and capabilities, and whether other processes' cgroups are readable.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::Path;

use super::host::major_minor;
use super::{Item, Status};

pub(super) const CAP_DAC_READ_SEARCH: u32 = 2;
pub(super) const CAP_KILL: u32 = 5;
pub(super) const CAP_NET_ADMIN: u32 = 12;
pub(super) const CAP_SYS_PTRACE: u32 = 19;
pub(super) const CAP_SYS_ADMIN: u32 = 21;
pub(super) const CAP_SYS_RESOURCE: u32 = 24;
pub(super) const CAP_PERFMON: u32 = 38;
pub(super) const CAP_BPF: u32 = 39;

/// The capabilities the report names, in the order it names them.
pub(super) const REPORTED_CAPS: [(u32, &str); 8] = [
    (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    (CAP_BPF, "CAP_BPF"),
    (CAP_PERFMON, "CAP_PERFMON"),
    (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    (CAP_SYS_RESOURCE, "CAP_SYS_RESOURCE"),
    (CAP_DAC_READ_SEARCH, "CAP_DAC_READ_SEARCH"),
    (CAP_SYS_PTRACE, "CAP_SYS_PTRACE"),
    (CAP_KILL, "CAP_KILL"),
];

/// Effective uid and `CapEff` from the text of `/proc/<pid>/status`.
pub(super) fn parse_status(text: &str) -> (Option<u32>, Option<u64>) {
    let mut euid = None;
    let mut cap_eff = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Uid:") {
            // Real, effective, saved, filesystem (fs/proc/array.c, task_state).
            euid = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok());
        } else if let Some(rest) = line.strip_prefix("CapEff:") {
            cap_eff = u64::from_str_radix(rest.trim(), 16).ok();
        }
    }
    (euid, cap_eff)
}

pub(super) fn privileges_item(proc_root: &Path, release: Option<&str>) -> Item {
    const NAME: &str = "privileges";
    let file = proc_root.join("self/status");
    let text = match fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) => {
            return Item::new(
                NAME,
                Status::Degraded,
                format!("cannot read {}: {e}: privileges unknown", file.display()),
            )
        }
    };
    let (euid, cap_eff) = parse_status(&text);
    let Some(caps) = cap_eff else {
        return Item::new(
            NAME,
            Status::Degraded,
            format!(
                "no parsable CapEff line in {}: privileges unknown",
                file.display()
            ),
        );
    };
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    let (held, lacking): (Vec<_>, Vec<_>) = REPORTED_CAPS.iter().partition(|(cap, _)| has(*cap));
    let names = |caps: Vec<&(u32, &'static str)>| caps.iter().map(|(_, n)| *n).collect::<Vec<_>>();
    let mut detail = match euid {
        Some(uid) => format!("euid {uid}"),
        None => "euid unknown".to_owned(),
    };
    let held = names(held);
    if held.is_empty() {
        detail.push_str("; have none of the capabilities below");
    } else {
        let _ = write!(detail, "; have {}", held.join(" "));
    }
    let lacking = names(lacking);
    if !lacking.is_empty() {
        let _ = write!(detail, "; lack {}", lacking.join(" "));
    }

    // kernel/bpf/syscall.c: bpf_prog_load() wants CAP_PERFMON for tracing program types and
    // CAP_NET_ADMIN for cgroup_skb (checked again at attach), each satisfied by CAP_SYS_ADMIN
    // (bpf_token_capable); CAP_BPF alone covers maps and the load itself.
    let mut problems = Vec::new();
    let admin = has(CAP_SYS_ADMIN);
    if !(admin || (has(CAP_BPF) && has(CAP_PERFMON))) {
        problems.push("no eBPF: needs CAP_SYS_ADMIN, or CAP_BPF with CAP_PERFMON");
    } else if !(admin || has(CAP_NET_ADMIN)) {
        problems.push("no per-workload network bytes: attaching cgroup_skb needs CAP_NET_ADMIN");
    }
    // Before 5.11 BPF memory was charged to RLIMIT_MEMLOCK, not the memory cgroup (commit
    // 97306be45fbe, "Merge branch 'switch to memcg-based memory accounting'").
    if !has(CAP_SYS_RESOURCE) && release.and_then(major_minor).is_some_and(|v| v < (5, 11)) {
        problems
            .push("kernel before 5.11 charges BPF maps to RLIMIT_MEMLOCK: needs CAP_SYS_RESOURCE");
    }
    if problems.is_empty() {
        Item::new(NAME, Status::Ok, detail)
    } else {
        let _ = write!(detail, "; {}", problems.join("; "));
        Item::new(NAME, Status::Degraded, detail)
    }
}

/// Reads another process's `cgroup` file: without that, pids (NVML's per-process samples) cannot
/// be joined to workloads. `hidepid=` or a private pid namespace hides them.
pub(super) fn process_cgroups_item(proc_root: &Path) -> Item {
    const NAME: &str = "process cgroups";
    let self_pid: Option<u32> = fs::read_link(proc_root.join("self"))
        .ok()
        .and_then(|p| p.to_str().and_then(|s| s.parse().ok()));
    let entries = match fs::read_dir(proc_root) {
        Ok(entries) => entries,
        Err(e) => {
            return Item::new(
                NAME,
                Status::Failed,
                format!("cannot list {}: {e}", proc_root.display()),
            )
        }
    };
    let mut pids: Vec<u32> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .filter(|pid| Some(*pid) != self_pid)
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let file = proc_root.join(pid.to_string()).join("cgroup");
        match fs::read_to_string(&file) {
            Ok(text) => {
                let hierarchies = text.lines().filter(|l| is_cgroup_line(l)).count();
                if hierarchies == 0 {
                    return Item::new(
                        NAME,
                        Status::Failed,
                        format!("no parsable line in {}", file.display()),
                    );
                }
                return Item::new(
                    NAME,
                    Status::Ok,
                    format!("read {} ({hierarchies} hierarchies)", file.display()),
                );
            }
            // The process exited between the listing and the read: try the next one.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Item::new(
                    NAME,
                    Status::Failed,
                    format!(
                        "cannot read {}: {e}: other processes' cgroups are needed to attribute \
                         pids",
                        file.display()
                    ),
                )
            }
        }
    }
    Item::new(
        NAME,
        Status::Failed,
        format!(
            "no other process visible under {} (hidepid= or a private pid namespace): \
             mount the host's procfs",
            proc_root.display()
        ),
    )
}

/// `hierarchy-id:controllers:path` (Documentation/admin-guide/cgroup-v1/cgroups.rst; v2 has id 0
/// and no controllers).
pub(super) fn is_cgroup_line(line: &str) -> bool {
    let mut parts = line.splitn(3, ':');
    matches!(
        (parts.next(), parts.next(), parts.next()),
        (Some(id), Some(_), Some(path)) if id.parse::<u32>().is_ok() && path.starts_with('/')
    )
}
