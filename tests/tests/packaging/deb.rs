//! The Debian package installs, runs and purges cleanly.

use super::unit::*;
use super::*;

pub(super) const PACKAGE: &str = "tally";

/// Whether dpkg knows the package in any state but "not installed".
pub(super) fn dpkg_knows(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .ok()?;
    let status = text(&out.stdout);
    (out.status.success() && !status.ends_with("not-installed")).then_some(status)
}

/// Purges the package, and removes the policy-rc.d it put in place, even when the test fails.
pub(super) struct Installed {
    policy_rc_d: Option<PathBuf>,
}

impl Drop for Installed {
    fn drop(&mut self) {
        if dpkg_knows(PACKAGE).is_some() {
            let _ = Command::new("dpkg").args(["--purge", PACKAGE]).output();
        }
        if let Some(path) = &self.policy_rc_d {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[test]
fn deb_installs_runs_and_purges_cleanly() {
    const TEST: &str = "deb_installs_runs_and_purges_cleanly";
    if !require::root(TEST) {
        return;
    }
    let Some(analyze) = require::binary(TEST, "systemd-analyze") else {
        return;
    };
    for tool in ["dpkg", "dpkg-deb", "cargo-deb"] {
        if require::binary(TEST, tool).is_none() {
            return;
        }
    }
    // This test installs into the real /usr/bin and /etc; it never replaces a real install.
    if let Some(status) = dpkg_knows(PACKAGE) {
        require::skip(
            TEST,
            &format!("package `{PACKAGE}` is already on this machine ({status})"),
        );
        return;
    }
    if Path::new("/usr/bin/tally").exists() || Path::new("/etc/tally").exists() {
        require::skip(TEST, "/usr/bin/tally or /etc/tally exists already");
        return;
    }

    // cargo-deb packages `target/release/tally` of the target directory it is given: give it
    // one holding the binary under test.
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    std::fs::create_dir_all(target.join("release")).unwrap();
    std::fs::copy(tally_bin(), target.join("release/tally")).unwrap();
    let debs = dir.path().join("deb");
    run_ok(
        Command::new("cargo")
            .current_dir(root())
            .env("CARGO_TARGET_DIR", &target)
            .args([
                "deb",
                "--locked",
                "-p",
                "tally-agent",
                "--no-build",
                "--fast",
                "-o",
            ])
            .arg(&debs),
    );
    let deb = std::fs::read_dir(&debs)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .unwrap_or_else(|| panic!("no .deb in {}", debs.display()));
    eprintln!("built {} in {:?}", deb.display(), started.elapsed());

    let info = run_ok(Command::new("dpkg-deb").arg("--info").arg(&deb));
    assert!(info.contains(" Package: tally\n"), "{info}");
    assert!(info.contains("libsystemd0"), "Depends: {info}");
    let contents = run_ok(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for path in [
        "./usr/bin/tally",
        "./usr/lib/systemd/system/tally.service",
        "./etc/tally/tally.toml",
        "./usr/share/tally/grafana/tally.json",
        "./usr/share/tally/prometheus/rules.yml",
        "./usr/share/tally/prometheus/cluster-budgets.yml",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(path)),
            "{path} not in the package:\n{contents}"
        );
    }

    // Keep the maintainer scripts from starting the service where systemd runs (invoke-rc.d and
    // deb-systemd-invoke honour policy-rc.d); the test runs the binary itself.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let guard = Installed {
        policy_rc_d: (!policy.exists()).then(|| {
            std::fs::write(policy, "#!/bin/sh\nexit 101\n").unwrap();
            let mut perms = std::fs::metadata(policy).unwrap().permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
            std::fs::set_permissions(policy, perms).unwrap();
            policy.to_path_buf()
        }),
    };

    run_ok(Command::new("dpkg").arg("--install").arg(&deb));
    assert_eq!(dpkg_knows(PACKAGE).as_deref(), Some("install ok installed"));
    let conffiles = run_ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", PACKAGE]));
    assert!(
        conffiles.contains("/etc/tally/tally.toml"),
        "conffiles: {conffiles}"
    );
    assert_eq!(
        std::fs::read_to_string("/usr/lib/systemd/system/tally.service").unwrap(),
        read(UNIT)
    );
    // Enabled (deb-systemd-helper works without a running systemd).
    assert!(
        Path::new("/etc/systemd/system/multi-user.target.wants/tally.service").exists(),
        "the unit is not enabled"
    );
    // The installed unit, with its real paths, verifies.
    verify_unit(&analyze, Path::new("/usr/lib/systemd/system/tally.service"));

    let version = run_ok(Command::new("/usr/bin/tally").arg("--version"));
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
    let validate =
        run_ok(Command::new("/usr/bin/tally").args(["validate", "/etc/tally/tally.toml"]));
    assert!(validate.contains("/etc/tally/tally.toml: ok"), "{validate}");
    let check = output(Command::new("/usr/bin/tally").arg("check"));
    eprintln!("tally check:\n{}", text(&check.stdout));
    assert!(
        matches!(check.status.code(), Some(0 | 1)),
        "tally check: {} (2 = cannot run)\n{}{}",
        check.status,
        text(&check.stdout),
        text(&check.stderr)
    );

    // Remove: the binary and unit go, the edited-or-not conffile stays.
    run_ok(Command::new("dpkg").args(["--remove", PACKAGE]));
    assert!(!Path::new("/usr/bin/tally").exists());
    assert!(!Path::new("/usr/lib/systemd/system/tally.service").exists());
    assert!(Path::new("/etc/tally/tally.toml").exists());
    assert_eq!(
        dpkg_knows(PACKAGE).as_deref(),
        Some("deinstall ok config-files")
    );

    // Purge: nothing left.
    run_ok(Command::new("dpkg").args(["--purge", PACKAGE]));
    assert_eq!(dpkg_knows(PACKAGE), None);
    for gone in [
        "/etc/tally",
        "/etc/systemd/system/multi-user.target.wants/tally.service",
        "/etc/systemd/system/tally.service",
    ] {
        assert!(
            std::fs::symlink_metadata(gone).is_err(),
            "{gone} left after purge"
        );
    }
    drop(guard);
    eprintln!("package test took {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Kubernetes manifests
