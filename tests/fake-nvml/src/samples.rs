//! The driver's utilization sampling: per-process samples and device samples, in the shape the
//! scenario asks for (see [`SampleShape`]), within the driver's buffer.

use std::os::raw::c_uint;

use crate::ffi::ProcessUtilizationSample;
use crate::scenario::{MpsRole, Process, SampleShape, Timeline};
use crate::state::Call;

#[cfg_attr(
    feature = "without-process-utilization",
    expect(dead_code, reason = "only nvmlDeviceGetProcessUtilization uses it")
)]
/// An unused entry as real drivers leave it in the count.
pub const ZEROED: ProcessUtilizationSample = ProcessUtilizationSample {
    pid: 0,
    time_stamp: 0,
    sm_util: 0,
    mem_util: 0,
    enc_util: 0,
    dec_util: 0,
};

/// The sample periods `k` (sample `k` is taken at `k × period + offset` ms and covers the
/// period before it) that are in the buffer now and newer than `last_seen_us`.
fn periods(call: &Call, offset_us: u64, last_seen_us: u64) -> std::ops::RangeInclusive<u64> {
    let scenario = &call.state.scenario;
    let period_ms = scenario.period_ms();
    let now = call.now_ms - offset_us as f64 / 1000.0;
    // 0 (no sample yet, the range is empty) before the first period ends; `as` saturates.
    let newest = (now / period_ms as f64).floor() as u64;
    let oldest = newest
        .saturating_sub(scenario.buffer_periods())
        .saturating_add(1)
        .max(1);
    let first_unseen = last_seen_us
        .checked_sub(call.state.epoch_us + offset_us)
        .map_or(0, |since| since / (period_ms * 1000) + 1);
    oldest.max(first_unseen)..=newest
}

fn time_stamp(call: &Call, k: u64, offset_us: u64) -> u64 {
    call.state.epoch_us + k * call.state.scenario.period_ms() * 1000 + offset_us
}

/// Each process's samples carry a timestamp of their own under the driver shape (the CPU time
/// each was taken at, within the same sampling pass: under a millisecond after the device's);
/// the period itself per period.
fn offset_us(call: &Call, p: &Process) -> u64 {
    match call.state.scenario.sample_shape {
        SampleShape::Driver => 1 + u64::from(p.pid).wrapping_mul(7919) % 999,
        SampleShape::PerPeriod => 0,
    }
}

/// A process's SM and memory utilization in sample `k` (value at the sample's time per period,
/// mean over the period it covers with the driver shape); an MPS server carries its clients'.
fn process_value(call: &Call, p: &Process, k: u64, offset_us: u64) -> (f64, f64) {
    let period = call.state.scenario.period_ms() as f64;
    let t = (k as f64) * period + offset_us as f64 / 1000.0;
    let value = |timeline: &Timeline| match call.state.scenario.sample_shape {
        SampleShape::Driver => timeline.mean(t - period, t),
        SampleShape::PerPeriod => timeline.at(t),
    };
    let (mut sm, mut mem) = (value(&p.sm_percent), value(&p.memory_percent));
    if p.mps == Some(MpsRole::Server) {
        for client in call
            .device()
            .processes
            .iter()
            .filter(|c| c.is_mps_client() && c.alive_at(t))
        {
            sm += value(&client.sm_percent);
            mem += value(&client.memory_percent);
        }
    }
    if p.zombie {
        (sm, mem)
    } else {
        (sm.min(100.0), mem.min(100.0))
    }
}

#[cfg_attr(
    feature = "without-process-utilization",
    expect(dead_code, reason = "only nvmlDeviceGetProcessUtilization uses it")
)]
/// Samples newer than `last_seen_us` of every process that was alive with a non-zero SM or
/// memory utilization, within the driver's buffer. MPS clients have none of their own: their
/// utilization shows in the MPS server's samples.
pub fn process_samples(call: &Call, last_seen_us: u64) -> Vec<ProcessUtilizationSample> {
    let period = call.state.scenario.period_ms() as f64;
    let mut samples = Vec::new();
    for p in call
        .device()
        .processes
        .iter()
        .filter(|p| !p.is_mps_client())
    {
        let offset = offset_us(call, p);
        let alive = periods(call, offset, last_seen_us)
            .filter(|&k| p.alive_at(k as f64 * period + offset as f64 / 1000.0));
        let values: Vec<(u64, f64, f64)> = alive
            .map(|k| {
                let (sm, mem) = process_value(call, p, k, offset);
                (time_stamp(call, k, offset), sm, mem)
            })
            .collect();
        let entry = |time_stamp, sm: f64, mem: f64| ProcessUtilizationSample {
            pid: p.pid,
            time_stamp,
            sm_util: sm.round() as c_uint,
            mem_util: mem.round() as c_uint,
            enc_util: 0,
            dec_util: 0,
        };
        match call.state.scenario.sample_shape {
            SampleShape::PerPeriod => samples.extend(
                values
                    .iter()
                    .map(|&(ts, sm, mem)| entry(ts, sm.floor(), mem.floor()))
                    .filter(|s| s.sm_util > 0 || s.mem_util > 0),
            ),
            SampleShape::Driver => {
                let ran = values.iter().any(|&(_, sm, mem)| sm > 0.0 || mem > 0.0);
                if let (true, Some(&(newest, _, _))) = (ran, values.last()) {
                    let n = values.len() as f64;
                    let sm = values.iter().map(|v| v.1).sum::<f64>() / n;
                    let mem = values.iter().map(|v| v.2).sum::<f64>() / n;
                    samples.push(entry(newest, sm, mem));
                }
            }
        }
    }
    samples
}

/// Device GPU and memory utilization over `(from_ms, to_ms]`: the scenario's timelines, or the
/// sum of the live processes' (capped at 100) when absent.
pub fn device_utilization(call: &Call, from_ms: f64, to_ms: f64) -> (f64, f64) {
    let d = call.device();
    let summed = |f: fn(&Process) -> &Timeline| {
        let parts = 20;
        let step = (to_ms - from_ms) / f64::from(parts);
        if step <= 0.0 {
            return call
                .device()
                .processes
                .iter()
                .filter(|p| p.alive_at(to_ms) && !p.zombie)
                .map(|p| f(p).at(to_ms))
                .sum::<f64>()
                .min(100.0);
        }
        // Processes come and go within the period: the sum at points through it.
        (0..parts)
            .map(|i| {
                let t = from_ms + step * (f64::from(i) + 0.5);
                d.processes
                    .iter()
                    .filter(|p| p.alive_at(t) && !p.zombie)
                    .map(|p| f(p).mean(t - step / 2.0, t + step / 2.0))
                    .sum::<f64>()
                    .min(100.0)
            })
            .sum::<f64>()
            / f64::from(parts)
    };
    let mean = |t: &Timeline| {
        if to_ms > from_ms {
            t.mean(from_ms, to_ms)
        } else {
            t.at(to_ms)
        }
    };
    let gpu = d
        .utilization_gpu_percent
        .as_ref()
        .map_or_else(|| summed(|p| &p.sm_percent), mean);
    let memory = d
        .utilization_memory_percent
        .as_ref()
        .map_or_else(|| summed(|p| &p.memory_percent), mean);
    (gpu, memory)
}

/// What `nvmlDeviceGetUtilizationRates` answers now: the value at this moment per period, the
/// mean over the last complete sample period with the driver shape.
pub fn utilization_rates(call: &Call) -> (f64, f64) {
    match call.state.scenario.sample_shape {
        SampleShape::PerPeriod => device_utilization(call, call.now_ms, call.now_ms),
        SampleShape::Driver => {
            let period = call.state.scenario.period_ms() as f64;
            let end = (call.now_ms / period).floor() * period;
            device_utilization(call, end - period, end)
        }
    }
}

/// Device GPU utilization samples newer than `last_seen_us` in the buffer: `(timestamp µs,
/// mean percent over the period the sample covers)`.
pub fn device_samples(call: &Call, last_seen_us: u64) -> Vec<(u64, u32)> {
    let period = call.state.scenario.period_ms() as f64;
    periods(call, 0, last_seen_us)
        .map(|k| {
            let end = k as f64 * period;
            let (gpu, _) = device_utilization(call, end - period, end);
            (time_stamp(call, k, 0), gpu.round() as u32)
        })
        .collect()
}
