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
    pub utilization_gpu_percent: Option<u32>,
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
    /// PCIe throughput (`nvmlDeviceGetPcieThroughput`, a 20 ms sample), read only where the
    /// byte counters are not supported.
    pub pcie_tx_bytes_per_second: Option<u64>,
    pub pcie_rx_bytes_per_second: Option<u64>,
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
    /// Running compute processes. Under MPS this lists the MPS server
    /// (`nvidia-cuda-mps-server`), not its clients.
    pub processes: Vec<ProcessSample>,
    /// MPS clients (processes with an MPS compute context); empty without MPS. NVML reports
    /// no utilization samples of their own: what they do shows in the server's samples, or
    /// in none.
    pub mps_clients: Vec<ProcessSample>,
    /// Utilization samples newer than the previous sample's, chained by `lastSeenTimeStamp`:
    /// each driver sample is delivered exactly once, including the last ones of a process
    /// that has exited since.
    pub process_utilization: Result<Vec<UtilSample>, Unavailable>,
    /// The period those samples cover, `(previous lastSeenTimeStamp, newest timestamp]` in µs
    /// since the Unix epoch; `None` when there were no new samples. The first window starts
    /// when the sampler started.
    pub util_window_us: Option<(u64, u64)>,
    /// The driver's utilization sample period as observed (median spacing of one process's
    /// consecutive samples), µs; the last estimate is kept while no samples arrive. Each
    /// [`UtilSample`] stands for about this long.
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
            pcie_tx_bytes_per_second: None,
            pcie_rx_bytes_per_second: None,
            nvlink_tx_bytes_total: None,
            nvlink_rx_bytes_total: None,
            ecc_corrected_total: None,
            ecc_uncorrected_total: None,
            retired_pages: None,
            remapped_rows: None,
            mig_enabled: false,
            mig: Vec::new(),
            processes: Vec::new(),
            mps_clients: Vec::new(),
            process_utilization: Ok(Vec::new()),
            util_window_us: None,
            util_sample_period_us: None,
            accounting: None,
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
    /// SM (compute) utilization over the driver's sample period.
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
