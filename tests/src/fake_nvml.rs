//! The fake libnvidia-ml (`tests/fake-nvml`), installed for one agent: copied into a temp dir as
//! `libnvidia-ml.so.1` with its scenario beside it, where the fake looks for it. The agent loads
//! it through its normal path, `[gpu] nvml_library`.

use std::path::{Path, PathBuf};

/// The fake with every symbol, and the variant without `nvmlDeviceGetProcessUtilization`.
pub const FULL: &str = "tally_fake_nvml";
pub const WITHOUT_PROCESS_UTILIZATION: &str = "tally_fake_nvml_without_process_utilization";

/// A fake library and its scenario in a temp dir.
#[derive(Debug)]
pub struct FakeNvml {
    pub dir: tempfile::TempDir,
    pub library: PathBuf,
}

impl FakeNvml {
    pub fn new(variant: &str, scenario: &serde_json::Value) -> FakeNvml {
        let built = built(variant);
        let dir = tempfile::tempdir().expect("tempdir");
        let library = dir.path().join("libnvidia-ml.so.1");
        std::fs::copy(&built, &library).expect("copy the fake library");
        std::fs::write(
            dir.path().join("scenario.json"),
            serde_json::to_vec_pretty(scenario).expect("scenario json"),
        )
        .expect("write scenario");
        FakeNvml { dir, library }
    }

    /// The `[gpu]` section that points the agent at this library.
    pub fn config(&self) -> String {
        format!("[gpu]\nnvml_library = \"{}\"\n", self.library.display())
    }
}

/// `target/<profile>/lib<variant>.so`, built by `tests/run`.
fn built(variant: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(format!("lib{variant}.so"));
    assert!(
        path.is_file(),
        "{} not built: run `cargo build -p tally-fake-nvml -p tally-fake-nvml-without-process-utilization` (tests/run does)",
        path.display()
    );
    path
}
