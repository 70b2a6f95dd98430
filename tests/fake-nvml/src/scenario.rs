//! The scenario file the fake plays: devices, MIG layout, processes with timelines, injected XIDs
//! and errors. Times are milliseconds since the first successful `nvmlInit*` in the process.
//! `example-scenario.json` next to this crate's `Cargo.toml` uses every key.

use serde::Deserialize;

use crate::ffi::{self, NvmlReturn};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// What `nvmlSystemGetDriverVersion` reports.
    #[serde(default = "default_driver_version")]
    pub driver_version: String,
    /// How utilization samples answer: as the real driver (the default) or one entry per
    /// process per period (`per_period`, the fake's first shape, kept for tests about it).
    #[serde(default)]
    pub sample_shape: SampleShape,
    /// Period of the utilization samples the "driver" takes; 167 ms (1/6 s, the fastest real
    /// drivers sample) with the driver shape, 100 ms per period, when absent.
    pub sample_period_ms: Option<u64>,
    /// How many sample periods the driver's utilization buffers hold (older samples are gone);
    /// 72 with the driver shape, 600 per period, when absent.
    pub sample_buffer_periods: Option<u64>,
    pub devices: Vec<Device>,
    /// XID errors to deliver through event sets.
    #[serde(default)]
    pub xids: Vec<Xid>,
    /// Calls made to fail.
    #[serde(default)]
    pub errors: Vec<InjectedError>,
    /// Calls made slow: each waits this long before it reads the clock and answers, as a
    /// driver call can while it holds a lock the sampling thread wants.
    #[serde(default)]
    pub slow_calls: Vec<SlowCall>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlowCall {
    /// The NVML function name, e.g. `nvmlDeviceGetSamples`.
    pub call: String,
    pub ms: u64,
}

/// The shape of utilization samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleShape {
    /// As real drivers answer (nvtop #110, go-nvml #11 and #51): `nvmlDeviceGetProcessUtilization`
    /// gives one entry per process that ran since `lastSeenTimeStamp`, its mean over the
    /// samples since then, stamped with its own newest sample's time (not the period's: each
    /// process's is its own, within a millisecond of the sampling pass); the NULL-buffer probe answers a fixed 100 entries
    /// whatever the load, and the fetch leaves the unused entries zeroed (pid 0) in the count;
    /// `nvmlDeviceGetUtilizationRates` is the mean over the last complete sample period.
    #[default]
    Driver,
    /// One entry per process per period, timestamps aligned on the period, the probe count
    /// exact; `nvmlDeviceGetUtilizationRates` the value at the moment of the call.
    PerPeriod,
}

impl Scenario {
    pub fn period_ms(&self) -> u64 {
        self.sample_period_ms.unwrap_or(match self.sample_shape {
            SampleShape::Driver => 167,
            SampleShape::PerPeriod => 100,
        })
    }

    pub fn buffer_periods(&self) -> u64 {
        self.sample_buffer_periods
            .unwrap_or(match self.sample_shape {
                SampleShape::Driver => 72,
                SampleShape::PerPeriod => 600,
            })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    pub uuid: String,
    #[serde(default = "default_name")]
    pub name: String,
    #[serde(default = "default_memory_total")]
    pub memory_total_bytes: u64,
    /// Used memory beyond what processes hold (driver, contexts).
    #[serde(default)]
    pub memory_reserved_bytes: u64,
    /// Device utilization; the sum of the processes' (capped at 100) when absent.
    pub utilization_gpu_percent: Option<Timeline>,
    pub utilization_memory_percent: Option<Timeline>,
    #[serde(default = "Timeline::zero")]
    pub power_watts: Timeline,
    /// Energy counter value at time 0.
    #[serde(default)]
    pub energy_start_joules: f64,
    #[serde(default = "default_temperature")]
    pub temperature_celsius: Timeline,
    #[serde(default = "default_sm_clock")]
    pub sm_clock_mhz: Timeline,
    #[serde(default = "default_memory_clock")]
    pub memory_clock_mhz: Timeline,
    #[serde(default)]
    pub clock_event_reasons: u64,
    #[serde(default = "Timeline::zero")]
    pub pcie_tx_bytes_per_second: Timeline,
    #[serde(default = "Timeline::zero")]
    pub pcie_rx_bytes_per_second: Timeline,
    /// Whether the PCIe byte-count fields exist (newer drivers); otherwise only
    /// `nvmlDeviceGetPcieThroughput` answers.
    #[serde(default = "default_true")]
    pub pcie_counters: bool,
    /// NVLink links; 0 makes the NVLink fields `NOT_SUPPORTED`.
    #[serde(default)]
    pub nvlink_links: u32,
    #[serde(default = "Timeline::zero")]
    pub nvlink_tx_bytes_per_second: Timeline,
    #[serde(default = "Timeline::zero")]
    pub nvlink_rx_bytes_per_second: Timeline,
    #[serde(default = "Timeline::zero")]
    pub ecc_corrected: Timeline,
    #[serde(default = "Timeline::zero")]
    pub ecc_uncorrected: Timeline,
    #[serde(default = "Timeline::zero")]
    pub retired_pages_sbe: Timeline,
    #[serde(default = "Timeline::zero")]
    pub retired_pages_dbe: Timeline,
    #[serde(default = "Timeline::zero")]
    pub remapped_rows_correctable: Timeline,
    #[serde(default = "Timeline::zero")]
    pub remapped_rows_uncorrectable: Timeline,
    /// MIG mode on, with these instances.
    pub mig: Option<Mig>,
    /// What the process lists on this GPU's own handle answer with MIG on: every instance's
    /// processes (`aggregated`, a caller with the MIG monitor capability), `no_permission` or
    /// `empty` (a caller without it, as real drivers answer); MIG device handles always list
    /// their own.
    #[serde(default)]
    pub mig_parent_processes: MigParentProcesses,
    /// Accounting mode; off makes the accounting calls `NOT_SUPPORTED`, as NVML does.
    #[serde(default)]
    pub accounting: bool,
    /// From this time on, every call on the device returns `GPU_IS_LOST`.
    pub lost_at_ms: Option<u64>,
    #[serde(default)]
    pub processes: Vec<Process>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigParentProcesses {
    #[default]
    Aggregated,
    NoPermission,
    Empty,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mig {
    pub instances: Vec<MigInstance>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigInstance {
    pub uuid: String,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
    /// Compute slices of the instance (out of the GPU's 7), as `nvmlDeviceGetAttributes_v2`
    /// reports them; 1 when absent.
    #[serde(default = "one_slice")]
    pub compute_slices: u32,
    pub memory_total_bytes: u64,
    /// The sum of the memory of processes in this GPU instance when absent.
    pub memory_used_bytes: Option<Timeline>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Process {
    /// A real pid (the test's child), reported as is.
    pub pid: u32,
    #[serde(default)]
    pub start_ms: u64,
    /// The process is gone from this time on (still in the accounting buffer).
    pub end_ms: Option<u64>,
    #[serde(default = "Timeline::zero")]
    pub used_memory_bytes: Timeline,
    #[serde(default = "Timeline::zero")]
    pub sm_percent: Timeline,
    #[serde(default = "Timeline::zero")]
    pub memory_percent: Timeline,
    pub gpu_instance_id: Option<u32>,
    pub compute_instance_id: Option<u32>,
    /// The process's part in MPS (Multi-Process Service) on this device, if any. A `client` is
    /// listed by `nvmlDeviceGetMPSComputeRunningProcesses_v3` and not by the compute list, and
    /// has no utilization samples of its own; a `server` (`nvidia-cuda-mps-server`) is listed
    /// by the compute list and carries the utilization samples of every client, as NVML
    /// reports them under MPS.
    pub mps: Option<MpsRole>,
    /// Listed by no process query, yet in the utilization samples with its SM and memory
    /// values as written (not capped at 100): the junk real drivers report for zombie pids
    /// (pid 0 included).
    #[serde(default)]
    pub zombie: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MpsRole {
    Client,
    /// A client that the compute list shows too (nvidia-smi's "M+C" type).
    ComputeClient,
    Server,
}

impl Process {
    pub fn alive_at(&self, t_ms: f64) -> bool {
        t_ms >= self.start_ms as f64 && self.end_ms.is_none_or(|end| t_ms < end as f64)
    }

    pub fn is_mps_client(&self) -> bool {
        matches!(self.mps, Some(MpsRole::Client | MpsRole::ComputeClient))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Xid {
    pub at_ms: u64,
    pub device: usize,
    pub xid: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectedError {
    /// The NVML function name, e.g. `nvmlDeviceGetTemperature`.
    pub call: String,
    /// Device index; every device when absent.
    pub device: Option<usize>,
    /// `NVML_ERROR_*` name without the prefix (`UNKNOWN`) or the number.
    pub code: ErrorCode,
    #[serde(default)]
    pub from_ms: u64,
    pub until_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "serde_json::Value")]
pub struct ErrorCode(pub NvmlReturn);

/// Why a scenario's error code is not one.
#[derive(Debug, thiserror::Error)]
pub enum BadErrorCode {
    /// Negative, fractional or beyond `nvmlReturn_t`.
    #[error("bad error code {number}")]
    Number { number: serde_json::Number },
    #[error("unknown NVML error name {name:?}")]
    UnknownName { name: String },
    #[error("error code must be a name or a number, not {value}")]
    NotNameOrNumber { value: serde_json::Value },
}

impl TryFrom<serde_json::Value> for ErrorCode {
    type Error = BadErrorCode;

    fn try_from(value: serde_json::Value) -> Result<Self, BadErrorCode> {
        match value {
            serde_json::Value::Number(number) => number
                .as_u64()
                .and_then(|n| NvmlReturn::try_from(n).ok())
                .map(ErrorCode)
                .ok_or(BadErrorCode::Number { number }),
            serde_json::Value::String(name) => {
                let short = name.trim_start_matches("NVML_ERROR_");
                ffi::RETURN_NAMES
                    .iter()
                    .find(|(_, n)| *n == short)
                    .map(|(code, _)| ErrorCode(*code))
                    .ok_or(BadErrorCode::UnknownName { name })
            }
            value => Err(BadErrorCode::NotNameOrNumber { value }),
        }
    }
}

/// A value over time: a constant, or steps `[[t_ms, value], ...]` (each holds until the next;
/// 0 before the first).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Timeline {
    Constant(f64),
    Steps(Vec<(f64, f64)>),
}

impl Timeline {
    pub fn zero() -> Timeline {
        Timeline::Constant(0.0)
    }

    pub fn at(&self, t_ms: f64) -> f64 {
        match self {
            Timeline::Constant(v) => *v,
            Timeline::Steps(steps) => steps
                .iter()
                .take_while(|(t, _)| *t <= t_ms)
                .last()
                .map_or(0.0, |(_, v)| *v),
        }
    }

    /// The integral from 0 to `t_ms`, in value × seconds.
    pub fn integral_seconds(&self, t_ms: f64) -> f64 {
        if t_ms <= 0.0 {
            return 0.0;
        }
        match self {
            Timeline::Constant(v) => v * t_ms / 1000.0,
            Timeline::Steps(steps) => {
                let mut total = 0.0;
                for (i, (start, value)) in steps.iter().enumerate() {
                    let start = start.max(0.0);
                    if start >= t_ms {
                        break;
                    }
                    let end = steps
                        .get(i + 1)
                        .map_or(t_ms, |(next, _)| next.min(t_ms))
                        .max(start);
                    total += value * (end - start) / 1000.0;
                }
                total
            }
        }
    }

    /// The time-weighted mean over `[from_ms, to_ms)`.
    pub fn mean(&self, from_ms: f64, to_ms: f64) -> f64 {
        if to_ms <= from_ms {
            return self.at(from_ms);
        }
        (self.integral_seconds(to_ms) - self.integral_seconds(from_ms)) * 1000.0 / (to_ms - from_ms)
    }

    /// The largest value over `[from_ms, to_ms]`.
    pub fn max(&self, from_ms: f64, to_ms: f64) -> f64 {
        match self {
            Timeline::Constant(v) => *v,
            Timeline::Steps(steps) => steps
                .iter()
                .filter(|(t, _)| *t > from_ms && *t <= to_ms)
                .map(|(_, v)| *v)
                .fold(self.at(from_ms), f64::max),
        }
    }
}

fn default_driver_version() -> String {
    "550.54.15".to_owned()
}
fn default_name() -> String {
    "NVIDIA H100 80GB HBM3".to_owned()
}
fn default_memory_total() -> u64 {
    80 * 1024 * 1024 * 1024
}
fn default_temperature() -> Timeline {
    Timeline::Constant(40.0)
}
fn default_sm_clock() -> Timeline {
    Timeline::Constant(1980.0)
}
fn default_memory_clock() -> Timeline {
    Timeline::Constant(2619.0)
}
fn default_true() -> bool {
    true
}
fn one_slice() -> u32 {
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_hold_until_the_next_and_integrate() {
        let t = Timeline::Steps(vec![(0.0, 100.0), (1000.0, 300.0)]);
        assert_eq!(t.at(999.0), 100.0);
        assert_eq!(t.at(1000.0), 300.0);
        assert!((t.integral_seconds(2000.0) - 400.0).abs() < 1e-9);
        assert!((t.mean(500.0, 1500.0) - 200.0).abs() < 1e-9);
        assert_eq!(t.max(0.0, 999.0), 100.0);
        assert_eq!(t.max(0.0, 1000.0), 300.0);
    }

    #[test]
    fn the_example_scenario_parses() {
        let scenario: Scenario =
            serde_json::from_str(include_str!("../example-scenario.json")).unwrap();
        assert_eq!(scenario.devices.len(), 3);
        assert_eq!(scenario.devices[1].mig.as_ref().unwrap().instances.len(), 2);
        let mps: Vec<Option<MpsRole>> = scenario.devices[2]
            .processes
            .iter()
            .map(|p| p.mps)
            .collect();
        assert_eq!(
            mps,
            [
                Some(MpsRole::Server),
                Some(MpsRole::Client),
                Some(MpsRole::Client)
            ]
        );
    }

    #[test]
    fn error_codes_parse_by_name_or_number() {
        let e: ErrorCode = serde_json::from_str("\"GPU_IS_LOST\"").unwrap();
        assert_eq!(e.0, ffi::ERROR_GPU_IS_LOST);
        let e: ErrorCode = serde_json::from_str("\"NVML_ERROR_UNKNOWN\"").unwrap();
        assert_eq!(e.0, ffi::ERROR_UNKNOWN);
        let e: ErrorCode = serde_json::from_str("4").unwrap();
        assert_eq!(e.0, ffi::ERROR_NO_PERMISSION);
        assert!(serde_json::from_str::<ErrorCode>("\"NOPE\"").is_err());
    }

    #[test]
    fn bad_error_codes_say_what_was_wrong() {
        let why = |json: &str| {
            serde_json::from_str::<ErrorCode>(json)
                .unwrap_err()
                .to_string()
        };
        assert!(why("\"NOPE\"").contains("unknown NVML error name \"NOPE\""));
        assert!(why("-1").contains("bad error code -1"));
        assert!(why("true").contains("error code must be a name or a number, not true"));
    }
}
