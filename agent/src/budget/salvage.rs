//! A state file the agent cannot read (corrupt, or written by a newer version) is never
//! discarded: the throttles it records could then never be lifted. It is kept aside under a new
//! name, and whatever it still says of its throttles is undone: every freeze file it names is
//! thawed and every control file it recorded gets its original value back.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::state::{thawed_value, write_existing, State, FILE_NAME};

/// The cgroup control files a throttle writes; salvage restores nothing else.
const CONTROL_FILES: [&str; 8] = [
    "cpu.max",
    "io.max",
    "cgroup.freeze",
    "cpu.cfs_quota_us",
    "cpu.cfs_period_us",
    "freezer.state",
    "blkio.throttle.read_bps_device",
    "blkio.throttle.write_bps_device",
];

/// What was made of an unreadable state file.
#[derive(Debug)]
pub struct Salvaged {
    /// Where the file now is.
    pub kept_as: PathBuf,
    /// Control files restored or thawed.
    pub restored: usize,
    /// Each failure, naming its file.
    pub errors: Vec<String>,
}

/// Undoes what the unreadable `<dir>/state.json` records and renames it
/// `state.json.unreadable-<unix seconds>`.
pub fn salvage(dir: &Path, now: u64) -> std::io::Result<Salvaged> {
    let path = State::path(dir);
    let text = std::fs::read(&path)?;
    let mut restored = 0;
    let mut errors = Vec::new();
    for undo in undos(&text) {
        let file = Path::new(&undo.file);
        if !undo.control_file {
            errors.push(format!(
                "{}: not a cgroup control file; left alone",
                file.display()
            ));
            continue;
        }
        match write_existing(file, &undo.value) {
            Ok(()) => restored += 1,
            Err(e) => errors.push(format!("{}: {e}", file.display())),
        }
    }
    let kept_as = dir.join(format!("{FILE_NAME}.unreadable-{now}"));
    std::fs::rename(&path, &kept_as)?;
    Ok(Salvaged {
        kept_as,
        restored,
        errors,
    })
}

/// One write that undoes a throttle recorded in an unreadable state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undo {
    pub file: String,
    pub value: String,
    /// Whether `file` is a cgroup control file a throttle writes; only those are written.
    pub control_file: bool,
}

/// What the unreadable state file `text` still says of its throttles, in the order to undo it:
/// per throttle, its freeze file thawed, then its writes restored last first. Reads anything
/// that parses as JSON, however far from the current format; nothing otherwise.
pub fn undos(text: &[u8]) -> Vec<Undo> {
    let mut out = Vec::new();
    let mut push = |file: &str, value: &str| {
        let control_file = Path::new(file)
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| CONTROL_FILES.contains(&n));
        out.push(Undo {
            file: file.to_owned(),
            value: value.to_owned(),
            control_file,
        });
    };
    let parsed: Option<Value> = serde_json::from_slice(text).ok();
    let throttles = parsed
        .as_ref()
        .and_then(|v| v.get("throttles"))
        .and_then(Value::as_array);
    for t in throttles.into_iter().flatten() {
        if let Some(freeze) = t.get("freeze").and_then(Value::as_str) {
            push(freeze, thawed_value(Path::new(freeze)));
        }
        let writes = t.get("writes").and_then(Value::as_array);
        for w in writes.into_iter().flatten().rev() {
            let file = w.get("path").and_then(Value::as_str);
            let original = w.get("original").and_then(Value::as_str);
            if let (Some(file), Some(original)) = (file, original) {
                push(file, original);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_state_file_is_kept_aside_and_what_it_names_is_undone() {
        let dir = tempfile::tempdir().unwrap();
        let cgroup = dir.path().join("cg");
        std::fs::create_dir_all(&cgroup).unwrap();
        std::fs::write(cgroup.join("cgroup.freeze"), "1").unwrap();
        std::fs::write(cgroup.join("cpu.max"), "20000 100000").unwrap();
        let elsewhere = dir.path().join("notes.txt");
        let text = serde_json::json!({
            "version": 9,
            "throttles": [{
                "freeze": cgroup.join("cgroup.freeze"),
                "writes": [
                    { "path": cgroup.join("cpu.max"), "original": "max 100000" },
                    { "path": elsewhere, "original": "x" }
                ],
                "something_new": true
            }]
        })
        .to_string();
        std::fs::write(dir.path().join(FILE_NAME), &text).unwrap();
        let s = salvage(dir.path(), 1700000000).unwrap();
        assert_eq!(s.restored, 2);
        assert_eq!(s.errors.len(), 1, "{:?}", s.errors);
        assert_eq!(
            std::fs::read_to_string(cgroup.join("cgroup.freeze")).unwrap(),
            "0"
        );
        assert_eq!(
            std::fs::read_to_string(cgroup.join("cpu.max")).unwrap(),
            "max 100000"
        );
        assert!(!elsewhere.exists());
        assert_eq!(
            s.kept_as,
            dir.path().join("state.json.unreadable-1700000000")
        );
        assert_eq!(std::fs::read_to_string(&s.kept_as).unwrap(), text);
        assert!(!dir.path().join(FILE_NAME).exists());
    }

    #[test]
    fn garbage_is_kept_aside_with_nothing_undone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"\x00{not json").unwrap();
        let s = salvage(dir.path(), 5).unwrap();
        assert_eq!((s.restored, s.errors.len()), (0, 0));
        assert_eq!(std::fs::read(&s.kept_as).unwrap(), b"\x00{not json");
    }
}
