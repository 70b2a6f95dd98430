//! Skips that cannot hide in CI: a test that cannot run here says so loudly, and when
//! `TALLY_TEST_STRICT=1` (set by `.ci/run`) the skip is a failure instead.

/// The variable that turns every skip into a failure.
pub const STRICT_VAR: &str = "TALLY_TEST_STRICT";

/// Reports that the calling test cannot run; panics under `TALLY_TEST_STRICT=1`. Returns so the
/// caller can `return` after it.
pub fn skip(test: &str, why: &str) {
    if std::env::var(STRICT_VAR).is_ok_and(|v| v == "1") {
        panic!("{test}: cannot run ({why}) and {STRICT_VAR}=1 forbids skipping");
    }
    eprintln!(
        "\n!!!!!!!! SKIPPED {test}: {why} (set {STRICT_VAR}=1 to make this a failure) !!!!!!!!\n"
    );
}

/// True when running as root; otherwise skips (or fails under strict mode).
pub fn root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return true;
    }
    skip(test, "needs root for real cgroups");
    false
}

/// The path of an executable on PATH, or a skip.
pub fn binary(test: &str, name: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        skip(test, &format!("`{name}` is not installed"));
    }
    found
}

/// The cgroup2 hierarchy of this machine (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`), or a skip.
pub fn unified(test: &str) -> Option<std::path::PathBuf> {
    let dir = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|d| d.join("cgroup.controllers").is_file());
    if dir.is_none() {
        skip(test, "no cgroup2 hierarchy mounted");
    }
    dir
}

/// A v1 controller hierarchy (`/sys/fs/cgroup/<name>`), or a skip.
pub fn v1(test: &str, controller: &str) -> Option<std::path::PathBuf> {
    let dir = std::path::PathBuf::from("/sys/fs/cgroup").join(controller);
    if dir.join("cgroup.procs").is_file() && !dir.join("cgroup.controllers").exists() {
        Some(dir)
    } else {
        skip(
            test,
            &format!("no cgroup v1 `{controller}` hierarchy mounted"),
        );
        None
    }
}
