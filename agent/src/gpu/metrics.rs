//! The GPU families: per-workload counters from the ledger, the per-workload memory gauge, and
//! node-level device state from the latest sample.

use std::sync::Arc;

use tally_exporters::{Family, Kind, LabelSet, Sample};

use super::GpuSource;
use crate::ledger::{CounterId, Entry, GpuCounter};

/// `tally_workload_gpu_{seconds,energy_joules,memory_byte_seconds}_total`.
#[derive(Debug)]
pub struct WorkloadGpuFamilies {
    pub families: [Family; 3],
}

impl Default for WorkloadGpuFamilies {
    fn default() -> Self {
        Self {
            families: [
                Family::new(
                    "tally_workload_gpu_seconds_total",
                    "Accelerator busy time attributed to the workload, by device (or MIG instance) and how it was attributed (method).",
                    Kind::Counter,
                ),
                Family::new(
                    "tally_workload_gpu_energy_joules_total",
                    "GPU energy attributed to the workload: its busy share of each window's energy, plus an equal part of the idle energy of devices it holds.",
                    Kind::Counter,
                ),
                Family::new(
                    "tally_workload_gpu_memory_byte_seconds_total",
                    "GPU memory held by the workload's processes, integrated over time.",
                    Kind::Counter,
                ),
            ],
        }
    }
}

impl WorkloadGpuFamilies {
    pub fn push(&mut self, labels: &LabelSet, entry: &Entry) {
        for (id, value) in entry.counters() {
            let CounterId::Gpu {
                counter,
                gpu,
                method,
            } = id
            else {
                continue;
            };
            let index = match counter {
                GpuCounter::BusySeconds => 0,
                GpuCounter::EnergyJoules => 1,
                GpuCounter::MemoryByteSeconds => 2,
            };
            let mut extra = vec![("gpu", Arc::<str>::clone(gpu))];
            if let Some(method) = method {
                extra.push(("method", Arc::from(*method)));
            }
            self.families[index].samples.push(Sample {
                labels: labels.clone(),
                extra,
                value,
                histogram: None,
            });
        }
    }
}

impl GpuSource {
    /// Node-level GPU families and the per-workload memory gauge.
    pub fn families(&self) -> Vec<Family> {
        let mut up = Family::new(
            "tally_gpu_up",
            "Whether NVML loaded and the GPUs are being sampled.",
            Kind::Gauge,
        );
        up.push_labeled(Vec::new(), if self.up() { 1.0 } else { 0.0 });
        let mut families = vec![up];
        if !self.up() {
            return families;
        }

        let mut memory = Family::new(
            "tally_workload_gpu_memory_bytes",
            "GPU memory held by the workload's processes, by device (or MIG instance).",
            Kind::Gauge,
        );
        // Several processes of one workload on one device add up to one series.
        let mut held: Vec<(&LabelSet, &Arc<str>, f64)> = Vec::new();
        for (w, gpu, bytes) in &self.memory {
            match held
                .iter_mut()
                .find(|(l, g, _)| *l == w.labels() && *g == gpu)
            {
                Some(entry) => entry.2 += bytes,
                None => held.push((w.labels(), gpu, *bytes)),
            }
        }
        for (labels, gpu, bytes) in held {
            memory.samples.push(Sample {
                labels: labels.clone(),
                extra: vec![("gpu", gpu.clone())],
                value: bytes,
                histogram: None,
            });
        }
        families.push(memory);

        let gauge = |name, help| Family::new(name, help, Kind::Gauge);
        let counter = |name, help| Family::new(name, help, Kind::Counter);
        let mut info = gauge(
            "tally_gpu_info",
            "GPUs NVML reports (always 1), with name, index, driver and MIG mode.",
        );
        let mut util = gauge(
            "tally_gpu_utilization_ratio",
            "Fraction of the last sample period the GPU was busy.",
        );
        let mut used = gauge("tally_gpu_memory_used_bytes", "GPU memory in use.");
        let mut total = gauge("tally_gpu_memory_total_bytes", "GPU memory installed.");
        let mut power = gauge("tally_gpu_power_watts", "Power draw.");
        let mut energy = counter(
            "tally_gpu_energy_joules_total",
            "Energy since the driver loaded (NVML total-energy counter).",
        );
        let mut temp = gauge("tally_gpu_temperature_celsius", "GPU temperature.");
        let mut sm_clock = gauge("tally_gpu_sm_clock_hertz", "SM clock.");
        let mut mem_clock = gauge("tally_gpu_memory_clock_hertz", "Memory clock.");
        let mut throttle = gauge(
            "tally_gpu_clock_event_reasons",
            "NVML clock event (throttle) reasons bitmask; 0 when the clocks run free.",
        );
        let mut pcie = counter("tally_gpu_pcie_bytes_total", "PCIe bytes by direction.");
        let mut nvlink = counter(
            "tally_gpu_nvlink_bytes_total",
            "NVLink bytes over all links, by direction.",
        );
        let mut ecc = counter(
            "tally_gpu_ecc_errors_total",
            "ECC errors since the driver loaded, by type.",
        );
        let mut retired = gauge(
            "tally_gpu_retired_pages",
            "Memory pages retired (single and double bit).",
        );
        let mut remapped = gauge(
            "tally_gpu_remapped_rows",
            "Memory rows remapped (correctable and uncorrectable).",
        );
        let mut lost = gauge(
            "tally_gpu_lost",
            "1 when the GPU fell off the bus (GPU_IS_LOST).",
        );
        let mut busy = counter(
            "tally_gpu_busy_seconds_total",
            "Device busy time (utilization × sample period).",
        );
        let mut unattributed = counter("tally_gpu_unattributed_seconds_total", "Device busy time no workload was charged with (busy time of processes that could not be seen, or beyond what process samples cover).");
        let mut unallocated = counter(
            "tally_gpu_unallocated_energy_joules_total",
            "Energy the GPU spent while no workload held it.",
        );
        let driver: Arc<str> = Arc::from(self.driver_version.as_deref().unwrap_or(""));
        for (uuid, state) in &self.devices {
            let Some(d) = &state.last else { continue };
            let gpu = || vec![("gpu", Arc::<str>::from(uuid.as_str()))];
            let with = |k: &'static str, v: &str| {
                let mut l = gpu();
                l.push((k, Arc::from(v)));
                l
            };
            let mut labels = gpu();
            labels.push(("name", Arc::from(d.name.as_str())));
            labels.push(("index", Arc::from(d.index.to_string().as_str())));
            labels.push(("driver_version", driver.clone()));
            labels.push((
                "mig_mode",
                Arc::from(if d.mig_enabled { "enabled" } else { "disabled" }),
            ));
            info.push_labeled(labels, 1.0);
            lost.push_labeled(gpu(), if d.lost { 1.0 } else { 0.0 });
            busy.push_labeled(gpu(), state.busy_seconds_total);
            unattributed.push_labeled(gpu(), state.unattributed_seconds_total);
            unallocated.push_labeled(gpu(), state.unallocated_joules_total);
            let opt =
                |family: &mut Family, labels: Vec<(&'static str, Arc<str>)>, v: Option<f64>| {
                    if let Some(v) = v {
                        family.push_labeled(labels, v);
                    }
                };
            opt(
                &mut util,
                gpu(),
                d.utilization_gpu_percent.map(|u| f64::from(u) / 100.0),
            );
            opt(&mut used, gpu(), d.memory_used_bytes.map(|b| b as f64));
            opt(&mut total, gpu(), d.memory_total_bytes.map(|b| b as f64));
            opt(&mut power, gpu(), d.power_watts);
            opt(&mut energy, gpu(), d.energy_joules_total);
            opt(&mut temp, gpu(), d.temperature_celsius.map(f64::from));
            opt(
                &mut sm_clock,
                gpu(),
                d.sm_clock_mhz.map(|m| f64::from(m) * 1e6),
            );
            opt(
                &mut mem_clock,
                gpu(),
                d.memory_clock_mhz.map(|m| f64::from(m) * 1e6),
            );
            opt(&mut throttle, gpu(), d.throttle_reasons.map(|r| r as f64));
            opt(
                &mut pcie,
                with("direction", "transmit"),
                d.pcie_tx_bytes_total.map(|b| b as f64),
            );
            opt(
                &mut pcie,
                with("direction", "receive"),
                d.pcie_rx_bytes_total.map(|b| b as f64),
            );
            opt(
                &mut nvlink,
                with("direction", "transmit"),
                d.nvlink_tx_bytes_total.map(|b| b as f64),
            );
            opt(
                &mut nvlink,
                with("direction", "receive"),
                d.nvlink_rx_bytes_total.map(|b| b as f64),
            );
            opt(
                &mut ecc,
                with("type", "corrected"),
                d.ecc_corrected_total.map(|b| b as f64),
            );
            opt(
                &mut ecc,
                with("type", "uncorrected"),
                d.ecc_uncorrected_total.map(|b| b as f64),
            );
            opt(&mut retired, gpu(), d.retired_pages.map(|b| b as f64));
            opt(&mut remapped, gpu(), d.remapped_rows.map(|b| b as f64));
        }
        let mut xid = counter(
            "tally_gpu_xid_errors_total",
            "XID errors NVML reported, by device and XID.",
        );
        for ((uuid, code), n) in &self.xids {
            xid.push_labeled(
                vec![
                    ("gpu", Arc::from(uuid.as_str())),
                    ("xid", Arc::from(code.to_string().as_str())),
                ],
                *n as f64,
            );
        }
        let mut errors = counter(
            "tally_gpu_nvml_errors_total",
            "NVML calls that failed, by call and error code.",
        );
        for ((call, code), n) in &self.nvml_errors {
            errors.push_labeled(
                vec![("call", Arc::from(*call)), ("code", Arc::from(*code))],
                *n as f64,
            );
        }
        let mut calls = gauge(
            "tally_gpu_nvml_calls_per_gpu",
            "NVML calls per GPU in the last sampling round.",
        );
        if let Some(c) = self.calls_per_gpu {
            calls.push_labeled(Vec::new(), c);
        }
        families.extend([
            info,
            util,
            used,
            total,
            power,
            energy,
            temp,
            sm_clock,
            mem_clock,
            throttle,
            pcie,
            nvlink,
            ecc,
            retired,
            remapped,
            lost,
            busy,
            unattributed,
            unallocated,
            xid,
            errors,
            calls,
        ]);
        families
    }
}
