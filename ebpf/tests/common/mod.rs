//! Helpers of the privileged integration tests: loud skips, real cgroup v2 directories with
//! processes started inside them, and polling.
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The variable that turns every skip into a failure (set by `.ci/run`).
pub const STRICT_VAR: &str = "TALLY_TEST_STRICT";

/// Reports that `test` cannot run here; panics instead under `TALLY_TEST_STRICT=1`.
#[expect(clippy::panic, reason = "test helper")]
pub fn skip(test: &str, why: &str) {
    if std::env::var(STRICT_VAR).is_ok_and(|v| v == "1") {
        panic!("{test}: cannot run ({why}) and {STRICT_VAR}=1 forbids skipping");
    }
    eprintln!(
        "\n!!!!!!!! SKIPPED {test}: {why} (set {STRICT_VAR}=1 to make this a failure) !!!!!!!!\n"
    );
}

/// The cgroup v2 hierarchy this machine mounts.
pub fn unified_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(PathBuf::from)
        .find(|d| d.join("cgroup.controllers").is_file())
}

/// Whether `test` can run: root, a cgroup v2 hierarchy, and tracefs (mounted when missing, as
/// the tracepoint method needs it). Otherwise skips, or fails under strict mode.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        skip(test, "needs root to load BPF programs and create cgroups");
        return false;
    }
    if unified_root().is_none() {
        skip(test, "no cgroup2 hierarchy mounted");
        return false;
    }
    let tracefs = Path::new("/sys/kernel/tracing");
    if !tracefs.join("events").is_dir() {
        let mounted = Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status()
            .is_ok_and(|s| s.success());
        if !mounted && !tracefs.join("events").is_dir() {
            skip(test, "tracefs is not mounted and cannot be");
            return false;
        }
    }
    true
}

/// A name no other test run uses.
pub fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{prefix}-{}-{nanos:09}", std::process::id())
}

/// The cgroup v2 id of the calling process's cgroup (`0::/path` in /proc/self/cgroup).
#[expect(clippy::unwrap_used, reason = "test helper")]
pub fn own_cgroup_id() -> u64 {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap()
        .trim_start_matches('/');
    std::fs::metadata(unified_root().unwrap().join(path))
        .unwrap()
        .ino()
}

/// A cgroup v2 directory for one test. Dropping it kills what the test started inside and removes
/// the directory.
#[derive(Debug)]
pub struct TestCgroup {
    dir: PathBuf,
    level: u32,
    children: Vec<Child>,
}

impl TestCgroup {
    #[expect(clippy::unwrap_used, reason = "test helper")]
    pub fn create(test: &str) -> TestCgroup {
        let dir = unified_root()
            .unwrap()
            .join(unique(&format!("tally-{test}")));
        std::fs::create_dir(&dir).unwrap();
        TestCgroup {
            dir,
            level: 1,
            children: Vec::new(),
        }
    }

    /// A cgroup `name` inside this one, removed (before this one) when dropped.
    #[expect(clippy::unwrap_used, reason = "test helper")]
    pub fn child(&self, name: &str) -> TestCgroup {
        let dir = self.dir.join(name);
        std::fs::create_dir(&dir).unwrap();
        TestCgroup {
            dir,
            level: self.level + 1,
            children: Vec::new(),
        }
    }

    /// The depth in the cgroup2 hierarchy: 1 for [`TestCgroup::create`]'s, one more per
    /// [`TestCgroup::child`].
    pub fn level(&self) -> u32 {
        self.level
    }

    /// The cgroup id: the directory's inode.
    #[expect(clippy::unwrap_used, reason = "test helper")]
    pub fn id(&self) -> u64 {
        std::fs::metadata(&self.dir).unwrap().ino()
    }

    /// `program args…` set up to join this cgroup between fork and exec, so everything it does,
    /// from its first instruction, belongs to the cgroup.
    #[expect(clippy::unwrap_used, reason = "test helper")]
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        // Opened here: after fork only async-signal-safe calls are allowed, and write(2) is one.
        let procs = File::options()
            .write(true)
            .open(self.dir.join("cgroup.procs"))
            .unwrap();
        let mut command = Command::new(program);
        command.args(args).stdin(Stdio::null());
        // SAFETY: the closure calls write(2) on an fd that stays open (the closure owns the File)
        // and allocates nothing.
        unsafe {
            command.pre_exec(move || {
                let written = libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1);
                if written == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        command
    }

    /// Runs `program args…` inside this cgroup to completion and returns its output.
    #[expect(clippy::unwrap_used, reason = "test helper")]
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program, args).output().unwrap()
    }

    /// Like [`TestCgroup::run`], and fails the test unless it exits 0.
    #[expect(clippy::panic, reason = "test helper")]
    pub fn run_ok(&self, program: &str, args: &[&str]) {
        let out = self.run(program, args);
        if !out.status.success() {
            panic!(
                "{program} {args:?} in {}: {}\n{}",
                self.dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Starts `program args…` inside this cgroup; it is killed when the cgroup is dropped.
    #[expect(clippy::unwrap_used, reason = "test helper")]
    pub fn spawn(&mut self, program: &str, args: &[&str]) {
        let child = self
            .command(program, args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // rmdir fails with EBUSY while the kernel still counts exiting tasks in the cgroup.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) if Instant::now() > deadline => {
                    eprintln!("warning: could not remove {}: {e}", self.dir.display());
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// A file under /var/tmp (on a block device, unlike /tmp on many machines), removed on drop.
#[derive(Debug)]
pub struct ScratchFile(pub PathBuf);

impl ScratchFile {
    pub fn new(test: &str) -> ScratchFile {
        ScratchFile(PathBuf::from("/var/tmp").join(unique(&format!("tally-{test}"))))
    }

    #[expect(clippy::unwrap_used, reason = "test helper")]
    pub fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Calls `check` until it returns `Some`, for at most `secs` seconds; `None` on timeout.
pub fn poll<T>(secs: u64, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
