//! Items about the host: kernel, BTF, cgroup mode, NVML, CRI sockets.

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use tally_gpu::{LibraryStatus, MigProcesses};

use super::{Item, Status};
use crate::host::layout::{Layout, Mode};

/// The kernel item, and the release string for checks that depend on it.
pub(super) fn kernel_item(proc_root: &Path) -> (Item, Option<String>) {
    let path = proc_root.join("sys/kernel/osrelease");
    match fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => {
            let release = text.trim().to_owned();
            (
                Item::new("kernel", Status::Ok, release.clone()),
                Some(release),
            )
        }
        Ok(_) => (
            Item::new(
                "kernel",
                Status::Failed,
                format!("{} is empty: is procfs mounted there?", path.display()),
            ),
            None,
        ),
        Err(e) => (
            Item::new(
                "kernel",
                Status::Failed,
                format!(
                    "cannot read {}: {e}: is procfs mounted there?",
                    path.display()
                ),
            ),
            None,
        ),
    }
}

/// `(major, minor)` of a release string such as `6.18.44-fc`.
pub(super) fn major_minor(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

pub(super) fn btf_item(sys_root: &Path) -> Item {
    let path = sys_root.join("kernel/btf/vmlinux");
    match fs::metadata(&path) {
        Ok(meta) if meta.is_file() && meta.len() > 0 => Item::new(
            "btf",
            Status::Ok,
            format!("{} ({} bytes)", path.display(), meta.len()),
        ),
        Ok(_) => Item::new(
            "btf",
            Status::Degraded,
            format!(
                "{} is empty or not a file: CO-RE eBPF programs cannot load",
                path.display()
            ),
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Item::new(
            "btf",
            Status::Degraded,
            format!(
                "no {}: CO-RE eBPF programs cannot load (kernel built without \
                 CONFIG_DEBUG_INFO_BTF)",
                path.display()
            ),
        ),
        Err(e) => Item::new(
            "btf",
            Status::Degraded,
            format!("cannot stat {}: {e}", path.display()),
        ),
    }
}

pub(super) fn cgroup_mode_item(cgroup_root: &Path) -> Item {
    const NAME: &str = "cgroup mode";
    let layout = match Layout::detect(cgroup_root) {
        Ok(layout) => layout,
        Err(e) => return Item::new(NAME, Status::Failed, e.to_string()),
    };
    let mut parts = Vec::new();
    let mut missing = Vec::new();
    let named = [
        ("unified", &layout.unified),
        ("cpuacct", &layout.cpuacct),
        ("memory", &layout.memory),
        ("blkio", &layout.blkio),
    ];
    for (name, path) in named {
        if let Some(path) = path {
            parts.push(format!("{name} {}", path.display()));
        }
    }
    match (layout.mode, &layout.unified) {
        (Mode::V2, Some(unified)) => {
            let file = unified.join("cgroup.controllers");
            match fs::read_to_string(&file) {
                Ok(text) => {
                    let controllers: Vec<&str> = text.split_whitespace().collect();
                    parts.push(format!("controllers: {}", controllers.join(" ")));
                    for (controller, what) in [("memory", "memory"), ("io", "disk I/O")] {
                        if !controllers.contains(&controller) {
                            missing.push(format!(
                                "no {controller} controller: cgroupfs {what} metering off"
                            ));
                        }
                    }
                }
                Err(e) => missing.push(format!("cannot read {}: {e}", file.display())),
            }
        }
        _ => {
            if layout.unified.is_none() {
                // bpf_get_current_cgroup_id() returns the cgroup2 id (kernel/bpf/helpers.c), so
                // without a cgroup2 hierarchy eBPF counters have nothing to join on.
                missing.push("no cgroup2 hierarchy: eBPF counters cannot be attributed".into());
            }
            if layout.cpuacct.is_none() {
                missing.push("no v1 cpuacct: cgroupfs CPU metering off".into());
            }
            if layout.memory.is_none() {
                missing.push("no v1 memory: cgroupfs memory metering off".into());
            }
            if layout.blkio.is_none() {
                missing.push("no v1 blkio: cgroupfs disk I/O metering off".into());
            }
        }
    }
    let mut detail = format!("{}: {}", layout.mode.as_str(), parts.join(", "));
    if missing.is_empty() {
        Item::new(NAME, Status::Ok, detail)
    } else {
        detail.push_str("; ");
        detail.push_str(&missing.join("; "));
        Item::new(NAME, Status::Degraded, detail)
    }
}

/// How one sampling round listed the processes of each MIG-enabled GPU.
pub(super) fn mig_process_lists(library: Option<&std::path::Path>) -> Vec<(String, MigProcesses)> {
    let options = tally_gpu::GpuOptions {
        library: library.map(std::path::Path::to_path_buf),
    };
    let Ok(mut sampler) = tally_gpu::Sampler::start(&options) else {
        return Vec::new();
    };
    sampler
        .sample()
        .devices
        .into_iter()
        .filter_map(|d| Some((d.uuid, d.mig_processes?)))
        .collect()
}

/// The NVML item; `mig` says, per MIG-enabled GPU, which way its processes were listed.
pub(super) fn nvml_item(status: LibraryStatus, mig: &[(String, MigProcesses)]) -> Item {
    let mut item = nvml_status_item(status);
    for (uuid, way) in mig {
        item.detail.push_str(&format!("; {uuid}: "));
        item.detail.push_str(match way {
            MigProcesses::GpuHandle => "MIG processes listed by the GPU handle",
            MigProcesses::MigHandles => {
                "MIG processes listed per MIG device (the GPU handle lists none: \
                 no MIG monitor capability, NVIDIA_MIG_MONITOR_DEVICES=all grants it)"
            }
        });
    }
    item
}

fn nvml_status_item(status: LibraryStatus) -> Item {
    const NAME: &str = "nvml";
    match status {
        LibraryStatus::Ready {
            devices: 0,
            driver_version,
        } => Item::new(
            NAME,
            Status::Absent,
            format!("driver {driver_version} loaded, no GPU visible: GPU metering off"),
        ),
        LibraryStatus::Ready {
            devices,
            driver_version,
        } => Item::new(
            NAME,
            Status::Ok,
            format!("{devices} GPU(s), driver {driver_version}"),
        ),
        LibraryStatus::NotFound { detail } => Item::new(
            NAME,
            Status::Absent,
            format!("no NVML library ({detail}): GPU metering off"),
        ),
        LibraryStatus::Failed { detail } => Item::new(
            NAME,
            Status::Degraded,
            format!("NVML failed to initialise ({detail}): GPU metering off"),
        ),
    }
}

/// Capability numbers from include/uapi/linux/capability.h.
pub(super) fn cri_item(endpoints: &[PathBuf]) -> Item {
    const NAME: &str = "cri socket";
    if endpoints.is_empty() {
        return Item::new(
            NAME,
            Status::NotChecked,
            "cri.endpoints is empty: CRI lookups disabled",
        );
    }
    let mut sockets = Vec::new();
    let mut problems = Vec::new();
    let mut missing = Vec::new();
    for endpoint in endpoints {
        match fs::metadata(endpoint) {
            Ok(meta) if meta.file_type().is_socket() => {
                sockets.push(endpoint.display().to_string())
            }
            Ok(_) => problems.push(format!("{} is not a socket", endpoint.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing.push(endpoint.display().to_string())
            }
            Err(e) => problems.push(format!("cannot stat {}: {e}", endpoint.display())),
        }
    }
    let mut parts = Vec::new();
    if !sockets.is_empty() {
        parts.push(format!("socket {}", sockets.join(", ")));
    }
    parts.extend(problems.iter().cloned());
    if !missing.is_empty() {
        parts.push(format!("missing {}", missing.join(", ")));
    }
    let detail = parts.join("; ");
    if !sockets.is_empty() {
        Item::new(NAME, Status::Ok, detail)
    } else if !problems.is_empty() {
        Item::new(
            NAME,
            Status::Degraded,
            format!("{detail}: pod and container names unavailable"),
        )
    } else {
        Item::new(
            NAME,
            Status::Absent,
            format!("no CRI socket ({detail}): pod and container names unavailable"),
        )
    }
}
