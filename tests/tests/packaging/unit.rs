//! The systemd unit: `systemd-analyze verify`, its capabilities and exposure.

use super::*;

pub(super) const UNIT: &str = "packaging/systemd/tally.service";

/// The unit's `ExecStopPost=`.
pub(super) const RELEASE: &str = "/usr/bin/tally release --config /etc/tally/tally.toml";

/// The values of every `key=` line of a unit file, in order.
pub(super) fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
        .collect()
}

pub(super) fn unit_value(unit: &str, key: &str) -> Option<String> {
    unit_values(unit, key).pop()
}

/// The unit's capabilities (`CAP_BPF`, ...), checked to be the same in both sets.
pub(super) fn unit_capabilities(unit: &str) -> BTreeSet<String> {
    let set = |key| -> BTreeSet<String> {
        unit_values(unit, key)
            .iter()
            .flat_map(|v| v.split_whitespace())
            .map(str::to_owned)
            .collect()
    };
    let bounding = set("CapabilityBoundingSet");
    assert!(!bounding.is_empty(), "no CapabilityBoundingSet= in {UNIT}");
    assert_eq!(
        bounding,
        set("AmbientCapabilities"),
        "{UNIT}: CapabilityBoundingSet= and AmbientCapabilities= must list the same capabilities"
    );
    bounding
}

/// The unit with the agent's path replaced by `bin`, in `dir`.
pub(super) fn unit_copy(dir: &Path, bin: &Path) -> PathBuf {
    let unit = read(UNIT).replace("/usr/bin/tally", &bin.display().to_string());
    let path = dir.join("tally.service");
    std::fs::write(&path, unit).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

/// `systemd-analyze verify` passes and says nothing about the unit (unknown keys and bad values
/// are only warnings, so stderr is checked too).
pub(super) fn verify_unit(analyze: &Path, unit: &Path) {
    let out = output(Command::new(analyze).arg("verify").arg(unit));
    let stderr = text(&out.stderr);
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("tally.service"))
        .collect();
    assert!(
        out.status.success() && about_unit.is_empty(),
        "systemd-analyze verify {}: {}\n{stderr}",
        unit.display(),
        out.status
    );
}

#[test]
fn systemd_unit_verifies_and_its_exposure_is_as_documented() {
    const TEST: &str = "systemd_unit_verifies_and_its_exposure_is_as_documented";
    let Some(analyze) = require::binary(TEST, "systemd-analyze") else {
        return;
    };
    let unit = read(UNIT);
    let caps = unit_capabilities(&unit);
    assert_eq!(
        caps,
        [
            "CAP_BPF",
            "CAP_KILL",
            "CAP_NET_ADMIN",
            "CAP_PERFMON",
            "CAP_SYS_ADMIN",
            "CAP_SYS_PTRACE"
        ]
        .map(str::to_owned)
        .into(),
    );
    for (key, want) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("WatchdogSec", "30s"),
        ("StateDirectory", "tally"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("MemoryDenyWriteExecute", "yes"),
        ("DevicePolicy", "closed"),
    ] {
        assert_eq!(unit_value(&unit, key).as_deref(), Some(want), "{key}=");
    }
    for forbidden in [
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectControlGroups",
    ] {
        assert!(
            unit_value(&unit, forbidden).is_none(),
            "{forbidden}= must stay out of the unit (see its comments)"
        );
    }
    assert_eq!(
        unit_values(&unit, "ExecStartPre"),
        ["/usr/bin/tally validate /etc/tally/tally.toml"]
    );
    // Whatever ended the agent, the throttles its state file records are lifted (the sandbox
    // test runs this command under the unit's sandbox).
    assert_eq!(unit_values(&unit, "ExecStopPost"), [RELEASE]);

    let dir = tempfile::tempdir().unwrap();
    let copy = unit_copy(dir.path(), &tally_bin());
    verify_unit(&analyze, &copy);

    let out = output(
        Command::new(&analyze)
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&copy),
    );
    let report = text(&out.stdout);
    let figure: f64 = report
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for tally.service:"))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure figure: {}\n{report}", text(&out.stderr)));
    eprintln!("systemd-analyze security: exposure {figure}");
    assert!(
        figure <= 3.8,
        "exposure {figure} > 3.8: hardening was lost\n{report}"
    );
    // The README states the figure of Debian 12's systemd 252; other versions score differently.
    let version = run_ok(Command::new(&analyze).arg("--version"));
    if version.starts_with("systemd 252 ") {
        let readme = read("README.md");
        assert!(
            readme.contains(&format!("exposure level {figure} ")),
            "README.md must state the unit's exposure level, {figure}"
        );
    }
}
