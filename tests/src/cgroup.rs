//! Real cgroups for tests: created under the node's hierarchies, processes moved in, and removed
//! again (processes killed first) by a `Drop` guard.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Cgroup directories (the same relative path in one or more hierarchies) and the processes the
/// test put in them.
#[derive(Debug)]
pub struct TestCgroup {
    pub dirs: Vec<PathBuf>,
    children: Vec<Child>,
}

impl TestCgroup {
    /// Creates `rel` (e.g. `/kubepods/besteffort/pod…/…`) under each hierarchy root.
    pub fn create(roots: &[PathBuf], rel: &str) -> TestCgroup {
        let dirs: Vec<PathBuf> = roots
            .iter()
            .map(|root| root.join(rel.trim_start_matches('/')))
            .collect();
        for dir in &dirs {
            create_dir_retrying(dir);
        }
        TestCgroup {
            dirs,
            children: Vec::new(),
        }
    }

    /// Starts `sh -c script` and moves it into every directory of this cgroup.
    pub fn spawn(&mut self, script: &str) -> u32 {
        let child = Command::new("sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sh");
        let pid = child.id();
        self.children.push(child);
        self.add(pid);
        pid
    }

    /// Starts `program args…` inside this cgroup from its first instruction (moved between fork
    /// and exec, so everything it charges from exec on is the cgroup's) and leaves it running.
    pub fn start(&mut self, program: &str, args: &[&str]) -> u32 {
        use std::os::unix::process::CommandExt;
        let procs: Vec<PathBuf> = self.dirs.iter().map(|d| d.join("cgroup.procs")).collect();
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: as in `run`: the closure only writes files whose paths were built beforehand.
        unsafe {
            command.pre_exec(move || {
                for p in &procs {
                    std::fs::write(p, b"0")?;
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("start in cgroup");
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Runs `program args…` inside this cgroup from its first instruction: the child moves itself
    /// (writes `0` to `cgroup.procs`) between fork and exec, so even the sockets it opens at once
    /// belong to the cgroup. Waits for it and returns its output.
    pub fn run(&self, program: &str, args: &[&str]) -> std::process::Output {
        use std::os::unix::process::CommandExt;
        let procs: Vec<PathBuf> = self.dirs.iter().map(|d| d.join("cgroup.procs")).collect();
        let mut command = Command::new(program);
        command.args(args);
        // SAFETY: the closure only calls async-signal-safe functions (open/write/close through
        // std::fs::write, which allocates nothing more than the path it was given beforehand).
        unsafe {
            command.pre_exec(move || {
                for p in &procs {
                    std::fs::write(p, b"0")?;
                }
                Ok(())
            });
        }
        command.output().expect("run in cgroup")
    }

    /// Runs `program args…` inside this cgroup placed the way container runtimes place their
    /// first process: a shell waits, asleep, for the move, and only then execs the program. A
    /// process that moves itself while running (as `run` does) has the CPU time it used since the
    /// kernel last accounted it charged to the new cgroup or the old one depending on when the
    /// scheduler next looks, which nothing outside the kernel can see; a sleeping one has none.
    /// Waits for the program and returns its output.
    pub fn run_placed(&self, program: &str, args: &[&str]) -> std::process::Output {
        use std::io::Write;
        let mut child = Command::new("sh")
            .args(["-c", "read _ready; exec \"$0\" \"$@\"", program])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let pid = child.id();
        // Asleep: state `S` in /proc/<pid>/stat (after the command name, in parens).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            // In read(2), syscall 0 on x86-64, where the kernel says which syscall it sleeps in.
            let syscall =
                std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
            let in_read = !cfg!(target_arch = "x86_64") || syscall.starts_with("0 ");
            if state == Some("S") && in_read {
                break;
            }
            assert!(Instant::now() < deadline, "sh {pid} never waited: {stat}");
            std::thread::sleep(Duration::from_millis(1));
        }
        self.add(pid);
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(b"\n").expect("release the shell");
        drop(stdin);
        child.wait_with_output().expect("wait")
    }

    /// The cgroup id of the first directory (the cgroup v2 one, when created there first).
    pub fn id(&self) -> u64 {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&self.dirs[0]).expect("cgroup dir"))
    }

    /// A busy loop in this cgroup.
    pub fn burn(&mut self) -> u32 {
        self.spawn("while :; do :; done")
    }

    pub fn add(&self, pid: u32) {
        for dir in &self.dirs {
            std::fs::write(dir.join("cgroup.procs"), pid.to_string())
                .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", dir.display()));
        }
    }

    /// Kills every process in the cgroup (the children the test started and whatever they
    /// forked) and removes the directories.
    pub fn remove(&mut self) {
        for dir in &self.dirs {
            kill_all_in(dir);
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.clear();
        for dir in &self.dirs {
            rmdir_when_empty(dir);
        }
        self.dirs.clear();
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A systemd-unit workload, `/system.slice/<prefix>-<tag>-<random>.service`, with one
/// long-sleeping process (whose pid goes in fake-device scenarios).
#[derive(Debug)]
pub struct Unit {
    pub name: String,
    pub pid: u32,
    _cgroup: TestCgroup,
}

impl Unit {
    pub fn sleeping(unified: &Path, prefix: &str, tag: &str) -> Unit {
        let name = format!("{prefix}-{tag}-{}.service", random_hex(6));
        let mut cgroup =
            TestCgroup::create(&[unified.to_path_buf()], &format!("/system.slice/{name}"));
        let pid = cgroup.spawn("exec sleep 600");
        Unit {
            name,
            pid,
            _cgroup: cgroup,
        }
    }
}

/// rmdir, retrying while the kernel still counts exiting tasks in the cgroup.
fn rmdir_when_empty(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() > deadline => {
                eprintln!(
                    "warning: could not remove test cgroup {}: {e}",
                    dir.display()
                );
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Removes `rel`'s directory and then each empty parent up to (not including) `stop` levels,
/// for tests that created a chain like `/kubepods/besteffort/pod…/…`.
pub fn remove_parents(roots: &[PathBuf], rel: &str, levels: usize) {
    let mut rel = PathBuf::from(rel.trim_start_matches('/'));
    for _ in 0..levels {
        if !rel.pop() || rel.as_os_str().is_empty() {
            return;
        }
        for root in roots {
            let _ = std::fs::remove_dir(root.join(&rel));
        }
    }
}

/// A random lowercase hex string of `len` digits, for ids that do not collide between runs.
pub fn random_hex(len: usize) -> String {
    let mut bytes = vec![0u8; len.div_ceil(2)];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    assert!(ok.is_ok(), "reading /dev/urandom");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    hex[..len].to_owned()
}

/// A random pod UID in the 8-4-4-4-12 form.
pub fn random_uid() -> String {
    let h = random_hex(32);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// `create_dir_all`, retried: another test may remove a shared empty parent (`kubepods.slice`)
/// between our creating it and creating its child.
fn create_dir_retrying(dir: &Path) {
    let mut tries = 0;
    loop {
        match std::fs::create_dir_all(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 20 => tries += 1,
            Err(e) => panic!("mkdir {}: {e}", dir.display()),
        }
    }
}

/// SIGKILLs every process listed in `dir/cgroup.procs`, until the list is empty or a deadline.
fn kill_all_in(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            // SAFETY: kill(2) with a pid read from our own test cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
