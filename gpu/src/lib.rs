//! Tally's GPU sampling through NVML: devices, MIG instances, per-process samples and XID events.
//! It knows devices and pids, never containers or pods.
//!
//! NVML is loaded at run time (`libnvidia-ml.so.1`, or a configured path) through `nvml-wrapper`,
//! so a node without a GPU driver runs the rest of the agent unchanged.
//!
//! [`Sampler`] is the entry point: [`Sampler::start`] once, [`Sampler::sample`] each tick (on a
//! thread of its own: every call blocks on NVML), [`Sampler::take_xids`] for XID errors.

mod calls;
mod device;
mod error;
mod events;
mod library;
mod mig;
mod process;
mod raw;
mod sample;
mod sampler;

pub use error::{error_code, CallError, GpuError, Unavailable};
pub use library::{probe_library, LibraryStatus, DEFAULT_LIBRARY};
pub use sample::{
    AccountingSample, DeviceSample, GpuSample, MigProcesses, MigSample, ProcessSample, SampledBusy,
    UtilSample, XidEvent,
};
pub use sampler::{GpuOptions, Sampler};
