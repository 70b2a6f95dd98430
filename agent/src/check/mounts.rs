//! `mountinfo` parsing and the mount items (cgroup hierarchies, bpffs, tracefs).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use super::{Item, Status};

/// One line of `/proc/<pid>/mountinfo`, the fields this report uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Mount {
    pub(super) point: PathBuf,
    pub(super) fs_type: String,
    pub(super) super_options: String,
}

/// Parsed mountinfo, or why it could not be read (a detail naming the file).
#[derive(Debug)]
pub(super) struct Mounts {
    file: PathBuf,
    parsed: Result<Vec<Mount>, String>,
    /// Lines that did not parse and were skipped.
    skipped: usize,
}

pub(super) fn read_mountinfo(file: &Path) -> Mounts {
    let text = match fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) => {
            return Mounts {
                file: file.to_path_buf(),
                parsed: Err(format!("cannot read {}: {e}", file.display())),
                skipped: 0,
            }
        }
    };
    let (mounts, skipped) = parse_mountinfo(&text);
    let parsed = if mounts.is_empty() {
        Err(format!("no parsable line in {}", file.display()))
    } else {
        Ok(mounts)
    };
    Mounts {
        file: file.to_path_buf(),
        parsed,
        skipped,
    }
}

/// Parses mountinfo lines (format in Documentation/filesystems/proc.rst, "3.5 /proc/<pid>/mountinfo"):
/// `id parent major:minor root mount-point options [optional...] - fstype source super-options`.
pub(super) fn parse_mountinfo(text: &str) -> (Vec<Mount>, usize) {
    let mut mounts = Vec::new();
    let mut skipped = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match parse_mountinfo_line(line) {
            Some(mount) => mounts.push(mount),
            None => skipped += 1,
        }
    }
    (mounts, skipped)
}

pub(super) fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let separator = fields.iter().position(|f| *f == "-")?;
    if separator < 6 || !fields.first()?.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let point = fields.get(4)?;
    let fs_type = fields.get(separator + 1)?;
    let super_options = fields.get(separator + 3).copied().unwrap_or("");
    Some(Mount {
        point: PathBuf::from(unescape_octal(point)),
        fs_type: (*fs_type).to_owned(),
        super_options: super_options.to_owned(),
    })
}

/// Undoes the `\040`-style escapes the kernel writes for space, tab, newline and backslash
/// (fs/proc_namespace.c, `show_mountinfo` → `seq_path_root(..., " \t\n\\")`).
pub(super) fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let digits = bytes.get(i + 1..i + 4);
        match (bytes[i], digits) {
            (b'\\', Some(d)) if d.iter().all(|b| (b'0'..=b'7').contains(b)) => {
                let value = d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                match u8::try_from(value) {
                    Ok(byte) => out.push(byte),
                    Err(_) => out.extend_from_slice(&bytes[i..i + 4]),
                }
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Appends "(N unparsable lines in <file> skipped)" when lines were skipped.
pub(super) fn with_skipped(mut detail: String, mounts: &Mounts) -> String {
    if mounts.skipped > 0 {
        let _ = write!(
            detail,
            " ({} unparsable lines in {} skipped)",
            mounts.skipped,
            mounts.file.display()
        );
    }
    detail
}

pub(super) fn cgroup_mounts_item(mounts: &Mounts) -> Item {
    const NAME: &str = "cgroup mounts";
    let all = match &mounts.parsed {
        Ok(all) => all,
        Err(detail) => return Item::new(NAME, Status::Degraded, detail.clone()),
    };
    let listed: Vec<String> = all
        .iter()
        .filter(|m| m.fs_type == "cgroup" || m.fs_type == "cgroup2")
        .map(|m| {
            let options: Vec<&str> = m
                .super_options
                .split(',')
                .filter(|o| !o.is_empty() && *o != "rw" && *o != "ro")
                .collect();
            if options.is_empty() {
                format!("{} {}", m.fs_type, m.point.display())
            } else {
                format!(
                    "{} {} ({})",
                    m.fs_type,
                    m.point.display(),
                    options.join(",")
                )
            }
        })
        .collect();
    if listed.is_empty() {
        Item::new(
            NAME,
            Status::Absent,
            with_skipped(
                format!("no cgroup or cgroup2 mount in {}", mounts.file.display()),
                mounts,
            ),
        )
    } else {
        Item::new(NAME, Status::Ok, with_skipped(listed.join("; "), mounts))
    }
}

/// bpffs or tracefs: mounted somewhere, or `degraded` with `impact`.
pub(super) fn fs_mount_item(
    name: &'static str,
    fs_type: &str,
    mounts: &Mounts,
    impact: &str,
) -> Item {
    let all = match &mounts.parsed {
        Ok(all) => all,
        Err(detail) => return Item::new(name, Status::Degraded, format!("cannot tell: {detail}")),
    };
    let points: Vec<String> = all
        .iter()
        .filter(|m| m.fs_type == fs_type)
        .map(|m| m.point.display().to_string())
        .collect();
    if points.is_empty() {
        Item::new(
            name,
            Status::Degraded,
            with_skipped(format!("not mounted: {impact}"), mounts),
        )
    } else {
        Item::new(
            name,
            Status::Ok,
            with_skipped(format!("mounted at {}", points.join(", ")), mounts),
        )
    }
}
