//! The GPU source's own families: the per-workload memory gauge and node-level device state
//! from the latest sample (its per-workload counters are in the ledger).

use std::sync::Arc;

use tally_exporters::{Family, LabelSet, Sample};

use super::GpuSource;
use crate::catalogue;

impl GpuSource {
    /// Node-level GPU families and the per-workload memory gauge.
    pub(super) fn node_families(&self) -> Vec<Family> {
        let mut up = Family::new(&catalogue::gpu::UP);
        up.push_labeled(Vec::new(), if self.up() { 1.0 } else { 0.0 });
        let mut families = vec![up];
        if !self.up() {
            return families;
        }

        let mut memory = Family::new(&catalogue::workload::GPU_MEMORY_BYTES);
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

        let mut info = Family::new(&catalogue::gpu::INFO);
        let mut util = Family::new(&catalogue::gpu::UTILIZATION_RATIO);
        let mut used = Family::new(&catalogue::gpu::MEMORY_USED_BYTES);
        let mut total = Family::new(&catalogue::gpu::MEMORY_TOTAL_BYTES);
        let mut power = Family::new(&catalogue::gpu::POWER_WATTS);
        let mut energy = Family::new(&catalogue::gpu::ENERGY_JOULES);
        let mut temp = Family::new(&catalogue::gpu::TEMPERATURE_CELSIUS);
        let mut sm_clock = Family::new(&catalogue::gpu::SM_CLOCK_HERTZ);
        let mut mem_clock = Family::new(&catalogue::gpu::MEMORY_CLOCK_HERTZ);
        let mut throttle = Family::new(&catalogue::gpu::CLOCK_EVENT_REASONS);
        let mut pcie = Family::new(&catalogue::gpu::PCIE_BYTES);
        let mut nvlink = Family::new(&catalogue::gpu::NVLINK_BYTES);
        let mut ecc = Family::new(&catalogue::gpu::ECC_ERRORS);
        let mut retired = Family::new(&catalogue::gpu::RETIRED_PAGES);
        let mut remapped = Family::new(&catalogue::gpu::REMAPPED_ROWS);
        let mut lost = Family::new(&catalogue::gpu::LOST);
        let mut busy = Family::new(&catalogue::gpu::BUSY_SECONDS);
        let mut unattributed = Family::new(&catalogue::gpu::UNATTRIBUTED_SECONDS);
        let mut unallocated = Family::new(&catalogue::gpu::UNALLOCATED_ENERGY_JOULES);
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
        let mut xid = Family::new(&catalogue::gpu::XID_ERRORS);
        for ((uuid, code), n) in &self.xids {
            xid.push_labeled(
                vec![
                    ("gpu", Arc::from(uuid.as_str())),
                    ("xid", Arc::from(code.to_string().as_str())),
                ],
                *n as f64,
            );
        }
        let mut calls = Family::new(&catalogue::gpu::NVML_CALLS_PER_GPU);
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
            calls,
        ]);
        families.iter_mut().for_each(Family::sort_samples);
        families
    }
}
