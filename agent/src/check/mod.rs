//! `tally check`: the node readiness report.
//!
//! Every item reads the host through the configured roots (`paths.proc_root`, `paths.sys_root`,
//! `paths.cgroup_root`), so tests run it against fixture trees. An item never panics on odd input:
//! an unreadable or garbled file makes that item `degraded` or `failed`, with a detail naming the
//! file.
//!
//! Statuses, and what they do to the exit code:
//! - `ok`: works.
//! - `absent`: optional hardware or software is simply not there (no GPU driver, no RDMA device, no
//!   CRI socket); nothing the node could offer is lost. Exit 0.
//! - `not_checked`: nothing to check yet, or the check is turned off in the configuration. Exit 0.
//! - `degraded`: a kernel or privilege feature is missing and a Tally capability is off with it.
//!   Exit 1.
//! - `failed`: a requirement is not met; the agent cannot run. Exit 2.

use std::fmt::Write as _;

use serde::Serialize;

use crate::config::Config;

mod admission;
mod cluster;
mod enforcement;
mod host;
mod mounts;
mod privileges;
mod rdma;
#[cfg(test)]
mod tests;

use host::*;
use mounts::*;
use privileges::*;

/// Exit code when every item is `ok`, `absent` or `not_checked`.
pub const EXIT_READY: i32 = 0;
/// Exit code when some item is `degraded`.
pub const EXIT_DEGRADED: i32 = 1;
/// Exit code when some item is `failed`.
pub const EXIT_CANNOT_RUN: i32 = 2;

/// The outcome of one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Degraded,
    Absent,
    Failed,
    NotChecked,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Degraded => "degraded",
            Status::Absent => "absent",
            Status::Failed => "failed",
            Status::NotChecked => "not_checked",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Item {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
}

impl Item {
    fn new(name: &'static str, status: Status, detail: impl Into<String>) -> Item {
        Item {
            name,
            status,
            detail: detail.into(),
        }
    }
}

/// The node readiness report: one entry per item, in a fixed order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub items: Vec<Item>,
}

/// What `Report` serializes as, the same shape as [`Report::to_json`].
#[derive(Serialize)]
struct Wire<'a> {
    verdict: String,
    exit_code: i32,
    items: &'a [Item],
}

impl Serialize for Report {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        Wire {
            verdict: self.verdict(),
            exit_code: self.exit_code(),
            items: &self.items,
        }
        .serialize(serializer)
    }
}

impl Report {
    /// 0 ready, 1 degraded, 2 cannot run.
    pub fn exit_code(&self) -> i32 {
        if self.with(Status::Failed).next().is_some() {
            EXIT_CANNOT_RUN
        } else if self.with(Status::Degraded).next().is_some() {
            EXIT_DEGRADED
        } else {
            EXIT_READY
        }
    }

    /// `ready`, `degraded: <items>` or `cannot run: <items>`.
    pub fn verdict(&self) -> String {
        let names = |status| self.with(status).collect::<Vec<_>>().join(", ");
        match self.exit_code() {
            EXIT_CANNOT_RUN => format!("cannot run: {}", names(Status::Failed)),
            EXIT_DEGRADED => format!("degraded: {}", names(Status::Degraded)),
            _ => "ready".to_owned(),
        }
    }

    /// An aligned table, one line per item, then the verdict line.
    pub fn render_text(&self) -> String {
        let name_width = self.items.iter().map(|i| i.name.len()).max().unwrap_or(0);
        let status_width = self
            .items
            .iter()
            .map(|i| i.status.as_str().len())
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        for item in &self.items {
            // Writing to a String cannot fail.
            let _ = writeln!(
                out,
                "{:name_width$}  {:status_width$}  {}",
                item.name,
                item.status.as_str(),
                item.detail
            );
        }
        out.push_str(&self.verdict());
        out.push('\n');
        out
    }

    /// `{"verdict", "exit_code", "items": [{"name", "status", "detail"}]}`.
    pub fn to_json(&self) -> serde_json::Value {
        let items: Vec<serde_json::Value> = self
            .items
            .iter()
            .map(|i| {
                serde_json::json!({
                    "name": i.name,
                    "status": i.status.as_str(),
                    "detail": i.detail,
                })
            })
            .collect();
        serde_json::json!({
            "verdict": self.verdict(),
            "exit_code": self.exit_code(),
            "items": items,
        })
    }

    fn with(&self, status: Status) -> impl Iterator<Item = &'static str> + '_ {
        self.items
            .iter()
            .filter(move |i| i.status == status)
            .map(|i| i.name)
    }
}

/// Runs every check against the roots in `config.paths`. Loads NVML once to count devices.
pub fn gather(config: &Config) -> Report {
    let paths = &config.paths;
    let (kernel, release) = kernel_item(&paths.proc_root);
    let mounts = read_mountinfo(&paths.proc_root.join("self/mountinfo"));
    let mut items = vec![
        kernel,
        btf_item(&paths.sys_root),
        cgroup_mode_item(&paths.cgroup_root),
        cgroup_mounts_item(&mounts),
        fs_mount_item(
            "bpffs",
            "bpf",
            &mounts,
            "pinned BPF maps unavailable (mount -t bpf bpf /sys/fs/bpf)",
        ),
        fs_mount_item(
            "tracefs",
            "tracefs",
            &mounts,
            "tracepoint programs cannot find their event ids \
             (mount -t tracefs nodev /sys/kernel/tracing)",
        ),
        {
            let library = config.gpu.nvml_library.as_deref();
            let status = tally_gpu::probe_library(library);
            let mig = match status {
                tally_gpu::LibraryStatus::Ready { devices, .. } if devices > 0 => {
                    mig_process_lists(library)
                }
                _ => Vec::new(),
            };
            nvml_item(status, &mig)
        },
        rdma::rdma_item(config),
        privileges_item(&paths.proc_root, release.as_deref()),
        process_cgroups_item(&paths.proc_root),
        cri_item(&config.cri.endpoints),
        enforcement::enforcement_item(config),
        cluster::cluster_item(config),
        admission::admission_item(config),
    ];
    items.splice(6..6, bpf_items(config));
    Report { items }
}

/// Each eBPF probe, from really loading and attaching it (and detaching it again).
fn bpf_items(config: &Config) -> Vec<Item> {
    const NAMES: [(&str, &str); 3] = [
        ("network", "bpf network"),
        ("tcp", "bpf tcp"),
        ("disk", "bpf disk"),
    ];
    if !config.ebpf.enabled {
        return NAMES
            .iter()
            .map(|(_, name)| {
                Item::new(
                    name,
                    Status::NotChecked,
                    "disabled by `ebpf.enabled = false`",
                )
            })
            .collect();
    }
    let Ok(layout) = crate::host::layout::Layout::detect(&config.paths.cgroup_root) else {
        return NAMES
            .iter()
            .map(|(_, name)| Item::new(name, Status::Degraded, "no cgroup hierarchy"))
            .collect();
    };
    let sources = crate::bpf::BpfSources::start(config, &layout);
    NAMES
        .iter()
        .map(
            |(probe, name)| match sources.statuses().iter().find(|s| s.probe == *probe) {
                Some(s) if s.up => {
                    let detail = match &s.error {
                        None => format!("{} loaded and attached", s.method),
                        Some(e) => format!("{} loaded and attached (fell back: {e})", s.method),
                    };
                    Item::new(name, Status::Ok, detail)
                }
                Some(s) => Item::new(
                    name,
                    Status::Degraded,
                    format!(
                        "not loaded ({}): {}",
                        s.method,
                        s.error.as_deref().unwrap_or("")
                    ),
                ),
                None => Item::new(name, Status::Degraded, "not tried"),
            },
        )
        .collect()
}
