//! A fake `libnvidia-ml.so.1` for Tally's tests.
//!
//! It exports the subset of NVML's C ABI that `tally-gpu` (through `nvml-wrapper`) uses, with
//! NVML's own semantics: count probes answer `INSUFFICIENT_SIZE` with the needed count,
//! `nvmlDeviceGetProcessUtilization` answers `NOT_FOUND` when nothing is newer than
//! `lastSeenTimeStamp`, accounting calls answer `NOT_SUPPORTED` with accounting off, event waits
//! block up to their timeout and answer `TIMEOUT`, a lost GPU answers `GPU_IS_LOST`.
//! Utilization samples take the real driver's shape by default (one entry per process holding
//! its mean since `lastSeenTimeStamp`, a fixed count probe with zeroed entries, a 72-sample
//! buffer, device readings over the last sample period; see `scenario::SampleShape`), or one
//! entry per process per period with `"sample_shape": "per_period"`. `nvmlDeviceGetSamples`
//! answers GPU utilization samples.
//! Under MPS (scenario processes marked `"mps": "client"` / `"server"`), the clients are listed
//! by `nvmlDeviceGetMPSComputeRunningProcesses_v3` only, the compute list shows the MPS server,
//! and utilization samples are the server's.
//!
//! It plays a scenario (see `scenario.rs`): a JSON file named by `TALLY_FAKE_NVML_SCENARIO`,
//! or else `scenario.json` in the directory the library was loaded from (tests copy the library
//! into a temp dir as `libnvidia-ml.so.1` and write the scenario beside it, so tests running in
//! one process never share an environment variable; each copy is its own loaded instance).
//! The scenario is read at the first successful `nvmlInit*`; that moment is time 0.
//!
//! Building this same source with the feature `without-process-utilization` (the sibling package
//! `tally-fake-nvml-without-process-utilization` does) leaves `nvmlDeviceGetProcessUtilization`
//! out, as a driver lacking the symbol would.
//!
//! The fake starts no threads and keeps no thread-locals, so `dlclose` is safe.

mod exports {
    pub mod device;
    pub mod events;
    pub mod process;
    pub mod system;
}
mod ffi;
mod samples;
mod scenario;
mod state;
