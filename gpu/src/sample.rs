//! What one [`Sampler::sample`](crate::Sampler::sample) returns. Plain data: devices, MIG
//! instances and pids, never containers.

use crate::error::{CallError, Unavailable};

/// One tick's readings of every GPU.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuSample {
    pub devices: Vec<DeviceSample>,
    /// One entry per NVML call that failed in this sample (`NOT_SUPPORTED` is not a failure:
    /// it shows as a `None`). The agent counts them by `(call, code)`.
    pub errors: Vec<CallError>,
}

/// One GPU. A field is `None` when the device does not support it, the call failed (then
/// [`GpuSample::errors`] says which) or the GPU is lost.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSample {
    /// NVML's index (not necessarily CUDA's).
    pub index: u32,
    /// `GPU-…`; empty until NVML has answered it once.
    pub uuid: String,
    pub name: String,
    /// The GPU answered `GPU_IS_LOST` (fell off the bus) this tick; every reading is empty.
    pub lost: bool,
    /// The driver's last reading, which covers its last sample period only (1/6 to 1 s).
    pub utilization_gpu_percent: Option<u32>,
    /// Busy time from the driver's device utilization samples (`nvmlDeviceGetSamples`) newer
    /// than the previous sample's, up to the driver's buffer (zero when none is new). `None`
    /// where the device has none (MIG, not supported) or the call failed.
    pub utilization_gpu_sampled: Option<SampledBusy>,
    pub utilization_memory_percent: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub power_watts: Option<f64>,
    /// The device's total-energy counter (since driver load), in joules.
    pub energy_joules_total: Option<f64>,
    pub temperature_celsius: Option<u32>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    /// `nvmlClocksEventReasons` bits (formerly throttle reasons), as NVML reports them.
    pub throttle_reasons: Option<u64>,
    /// PCIe byte counters (field values; drivers R535 and later).
    pub pcie_tx_bytes_total: Option<u64>,
    pub pcie_rx_bytes_total: Option<u64>,
    /// NVLink data bytes over all links (field values); `None` without NVLink.
    pub nvlink_tx_bytes_total: Option<u64>,
    pub nvlink_rx_bytes_total: Option<u64>,
    /// Volatile ECC error totals (since driver load).
    pub ecc_corrected_total: Option<u64>,
    pub ecc_uncorrected_total: Option<u64>,
    /// Retired pages, single- plus double-bit (pre-Ampere).
    pub retired_pages: Option<u64>,
    /// Remapped rows, correctable plus uncorrectable (Ampere and later).
    pub remapped_rows: Option<u64>,
    pub mig_enabled: bool,
    /// Every MIG device (GPU instance × compute instance) when MIG is on.
    pub mig: Vec<MigSample>,
    /// Where the process list of a MIG-enabled GPU came from; `None` without MIG (or before the
    /// layout is known).
    pub mig_processes: Option<MigProcesses>,
    /// Running compute processes. Under MPS this lists the MPS server
    /// (`nvidia-cuda-mps-server`), not its clients (a client the driver lists here too, "M+C",
    /// is left out: it is in [`mps_clients`](Self::mps_clients)).
    pub processes: Vec<ProcessSample>,
    /// MPS clients (processes with an MPS compute context); empty without MPS. NVML reports
    /// no utilization samples of their own: what they do shows in the server's samples, or
    /// in none.
    pub mps_clients: Vec<ProcessSample>,
    /// Utilization samples newer than the previous sample's, chained by `lastSeenTimeStamp`:
    /// each driver sample is delivered exactly once, including the last ones of a process
    /// that has exited since. Zeroed entries and pid 0 are left out.
    pub process_utilization: Result<Vec<UtilSample>, Unavailable>,
    /// The period those samples cover, `(previous lastSeenTimeStamp, newest timestamp]` in µs
    /// since the Unix epoch; `None` when there were no new samples. The first window starts
    /// when the sampler started.
    pub util_window_us: Option<(u64, u64)>,
    /// The driver's utilization sample period as observed (median spacing of one process's
    /// consecutive samples in one query), µs; `None` where the driver gives one entry per
    /// process, and the last estimate is kept while no samples arrive.
    pub util_sample_period_us: Option<u64>,
    /// Accounting stats for running processes and for exited ones not yet reported final;
    /// `None` when accounting mode is off (NVML answers `NOT_SUPPORTED`).
    pub accounting: Option<Vec<AccountingSample>>,
}

impl Default for DeviceSample {
    fn default() -> Self {
        DeviceSample {
            index: 0,
            uuid: String::new(),
            name: String::new(),
            lost: false,
            utilization_gpu_percent: None,
            utilization_gpu_sampled: None,
            utilization_memory_percent: None,
            memory_used_bytes: None,
            memory_total_bytes: None,
            power_watts: None,
            energy_joules_total: None,
            temperature_celsius: None,
            sm_clock_mhz: None,
            memory_clock_mhz: None,
            throttle_reasons: None,
            pcie_tx_bytes_total: None,
            pcie_rx_bytes_total: None,
            nvlink_tx_bytes_total: None,
            nvlink_rx_bytes_total: None,
            ecc_corrected_total: None,
            ecc_uncorrected_total: None,
            retired_pages: None,
            remapped_rows: None,
            mig_enabled: false,
            mig: Vec::new(),
            mig_processes: None,
            processes: Vec::new(),
            mps_clients: Vec::new(),
            process_utilization: Ok(Vec::new()),
            util_window_us: None,
            util_sample_period_us: None,
            accounting: None,
        }
    }
}

/// Device busy time over the span that new device utilization samples cover.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SampledBusy {
    /// Each sample's utilization times the time it covers, summed.
    pub busy_seconds: f64,
    /// The time the samples cover: from the previous newest sample to the newest one (each
    /// sample at most one sample period).
    pub covered_seconds: f64,
}

/// How the processes of a MIG-enabled GPU were listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigProcesses {
    /// The GPU's own handle listed every instance's processes (the caller has the MIG monitor
    /// capability, e.g. `NVIDIA_MIG_MONITOR_DEVICES=all`).
    GpuHandle,
    /// The GPU's handle answered `NO_PERMISSION` or nothing, as it does without the
    /// capability: each MIG device handle was asked for its own.
    MigHandles,
}

impl MigProcesses {
    pub fn as_str(self) -> &'static str {
        match self {
            MigProcesses::GpuHandle => "gpu_handle",
            MigProcesses::MigHandles => "mig_handles",
        }
    }
}

/// One MIG device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigSample {
    /// `MIG-…`.
    pub uuid: String,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
    /// Its compute slices (`nvmlDeviceGetAttributes_v2`), where the driver says.
    pub compute_slices: Option<u32>,
    /// Its GPU's compute slices: the most MIG devices the GPU can hold
    /// (`nvmlDeviceGetMaxMigDeviceCount`, 7 on A100 and H100).
    pub gpu_slices: Option<u32>,
    /// Memory of the GPU instance (compute instances of one GPU instance share it).
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
}

/// One running compute process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessSample {
    pub pid: u32,
    /// `None` where NVML cannot tell (e.g. Windows WDDM).
    pub used_memory_bytes: Option<u64>,
    /// MIG GPU / compute instance the process runs in; `None` without MIG.
    pub gpu_instance_id: Option<u32>,
    pub compute_instance_id: Option<u32>,
}

/// One driver utilization sample of one process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct UtilSample {
    pub pid: u32,
    /// CPU time of the sample, µs since the Unix epoch.
    pub timestamp_us: u64,
    /// The time this sample stands for, µs: one sample period where the driver returns one
    /// entry per period, the time since the process's previous entry (or since the previous
    /// query, for a process not in that one) where it returns one entry per process holding
    /// its mean since `lastSeenTimeStamp`, as real drivers do.
    pub span_us: u64,
    /// SM (compute) utilization over [`span_us`](Self::span_us), as the driver reports it
    /// (junk above 100 is possible for zombie pids).
    pub sm_percent: u32,
    /// Frame-buffer memory read/write utilization.
    pub memory_percent: u32,
}

/// NVML accounting stats of one process (accounting mode on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountingSample {
    pub pid: u32,
    /// Mean over the process's lifetime so far.
    pub gpu_utilization_percent: Option<u32>,
    pub memory_utilization_percent: Option<u32>,
    pub max_memory_usage_bytes: Option<u64>,
    /// Run time in ms; 0 while the process runs.
    pub time_ms: u64,
    /// Start of the process, µs since the Unix epoch (tells a reused pid apart).
    pub start_time_us: u64,
    pub is_running: bool,
}

/// One XID error the driver reported.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct XidEvent {
    pub device_uuid: String,
    /// The XID (999 where NVML reports it as unknown).
    pub xid: u64,
}
