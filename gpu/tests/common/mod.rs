//! Test harness: the fake NVML library (built by `cargo build -p tally-fake-nvml
//! -p tally-fake-nvml-without-process-utilization`) copied into a temp dir as
//! `libnvidia-ml.so.1` with its scenario beside it, and real child processes for pids.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]
#![expect(
    clippy::expect_used,
    reason = "test harness: a failed setup step fails the test with its message"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tally_gpu::{GpuOptions, Sampler};

/// The fake with every symbol.
pub const FULL: &str = "tally_fake_nvml";
/// The fake without `nvmlDeviceGetProcessUtilization`.
pub const WITHOUT_PROCESS_UTILIZATION: &str = "tally_fake_nvml_without_process_utilization";

/// `lib<name>.so` next to the test executable's profile dir (`target/<profile>/`), or in
/// `TALLY_FAKE_NVML_DIR`.
pub fn built_library(name: &str) -> PathBuf {
    let file = format!("lib{name}.so");
    let dir = match std::env::var_os("TALLY_FAKE_NVML_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().expect("current_exe");
            // target/<profile>/deps/<test>-<hash>
            exe.parent()
                .and_then(Path::parent)
                .expect("target dir")
                .to_path_buf()
        }
    };
    let path = dir.join(&file);
    assert!(
        path.is_file(),
        "{} not built: run `cargo build -p tally-fake-nvml -p tally-fake-nvml-without-process-utilization` \
         first (tests/run does), or point TALLY_FAKE_NVML_DIR at the directory holding {file}",
        path.display()
    );
    path
}

/// One copy of the fake library with its scenario. A copy (not a link) so that each test loads
/// its own instance, with its own clock and state, even when tests share a process.
#[derive(Debug)]
pub struct FakeNvml {
    pub dir: tempfile::TempDir,
    pub library: PathBuf,
}

impl FakeNvml {
    pub fn new(scenario: &serde_json::Value) -> FakeNvml {
        Self::variant(FULL, scenario)
    }

    pub fn variant(name: &str, scenario: &serde_json::Value) -> FakeNvml {
        let dir = tempfile::tempdir().expect("tempdir");
        let library = dir.path().join("libnvidia-ml.so.1");
        std::fs::copy(built_library(name), &library).expect("copy the fake library");
        std::fs::write(
            dir.path().join("scenario.json"),
            serde_json::to_vec_pretty(scenario).expect("scenario json"),
        )
        .expect("write scenario");
        FakeNvml { dir, library }
    }

    pub fn options(&self) -> GpuOptions {
        GpuOptions {
            library: Some(self.library.clone()),
        }
    }

    pub fn start(&self) -> Sampler {
        Sampler::start(&self.options()).expect("sampler starts on the fake library")
    }

    /// The fake's own hooks; the same loaded instance as the sampler's (same path).
    fn hook(&self, name: &[u8]) -> u64 {
        // SAFETY: the fake library has no initialisers beyond Rust's; the hooks are
        // `extern "C" fn() -> u64`.
        unsafe {
            let lib = libloading::Library::new(&self.library).expect("dlopen the fake");
            let hook: libloading::Symbol<'_, unsafe extern "C" fn() -> u64> =
                lib.get(name).expect("fake hook symbol");
            hook()
        }
    }

    /// NVML calls the fake answered so far, event-set calls excepted.
    pub fn calls(&self) -> u64 {
        self.hook(b"tally_fake_nvml_calls\0")
    }

    /// The scenario's time 0, µs since the Unix epoch.
    pub fn epoch_us(&self) -> u64 {
        self.hook(b"tally_fake_nvml_epoch_us\0")
    }
}

/// Real processes (`sleep 60`) whose pids scenarios use; killed and reaped on drop.
#[derive(Debug)]
pub struct Children(Vec<Child>);

impl Children {
    pub fn spawn(n: usize) -> Children {
        Children(
            (0..n)
                .map(|_| {
                    Command::new("sleep")
                        .arg("60")
                        .stdin(Stdio::null())
                        .spawn()
                        .expect("spawn sleep")
                })
                .collect(),
        )
    }

    pub fn pid(&self, i: usize) -> u32 {
        self.0[i].id()
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sleeps until the fake's clock reads at least `ms` (it starts at the first `nvmlInit`).
pub fn sleep_until_scenario_ms(fake: &FakeNvml, ms: u64) {
    let target = fake.epoch_us() + ms * 1000;
    let now = now_us();
    if target > now {
        std::thread::sleep(Duration::from_micros(target - now));
    }
}

pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as u64
}
