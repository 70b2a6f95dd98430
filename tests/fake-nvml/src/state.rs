//! The library's global state: the loaded scenario, its clock, the device handles it hands out,
//! init reference counting, and the checks every call goes through (lost GPU, injected errors).

use std::ffi::CStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::ffi::{self, NvmlDevice, NvmlReturn};
use crate::scenario::{self, Scenario};

/// Environment variable naming the scenario file; without it the fake reads `scenario.json`
/// next to the loaded library file.
pub const SCENARIO_ENV: &str = "TALLY_FAKE_NVML_SCENARIO";
pub const SCENARIO_BESIDE_LIBRARY: &str = "scenario.json";

/// What a device handle points at. Allocated once per scenario and never freed, so a handle
/// stays valid across `nvmlShutdown` / `nvmlInit` as NVML's do.
#[derive(Debug)]
pub struct Handle {
    pub gpu: usize,
    pub mig: Option<usize>,
}

#[derive(Debug)]
pub struct State {
    pub scenario: Scenario,
    /// Wall clock at time 0, µs since the Unix epoch (utilization sample timestamps).
    pub epoch_us: u64,
    started: Instant,
    gpus: Vec<&'static Handle>,
    migs: Vec<Vec<&'static Handle>>,
}

impl State {
    fn load() -> Result<State, NvmlReturn> {
        let path = scenario_path().ok_or(ffi::ERROR_DRIVER_NOT_LOADED)?;
        let text = std::fs::read_to_string(&path).map_err(|e| {
            eprintln!("fake-nvml: cannot read {}: {e}", path.display());
            ffi::ERROR_DRIVER_NOT_LOADED
        })?;
        let mut scenario: Scenario = serde_json::from_str(&text).map_err(|e| {
            eprintln!("fake-nvml: bad scenario {}: {e}", path.display());
            ffi::ERROR_UNKNOWN
        })?;
        if scenario.period_ms() == 0 || scenario.buffer_periods() == 0 {
            eprintln!("fake-nvml: sample_period_ms and sample_buffer_periods must be positive");
            return Err(ffi::ERROR_UNKNOWN);
        }
        scenario.xids.sort_by_key(|x| x.at_ms);
        let gpus = (0..scenario.devices.len())
            .map(|gpu| &*Box::leak(Box::new(Handle { gpu, mig: None })))
            .collect();
        let migs = scenario
            .devices
            .iter()
            .enumerate()
            .map(|(gpu, device)| {
                let count = device.mig.as_ref().map_or(0, |m| m.instances.len());
                (0..count)
                    .map(|i| &*Box::leak(Box::new(Handle { gpu, mig: Some(i) })))
                    .collect()
            })
            .collect();
        let epoch_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Ok(State {
            scenario,
            epoch_us,
            started: Instant::now(),
            gpus,
            migs,
        })
    }

    /// Milliseconds since time 0.
    pub fn now_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1000.0
    }

    pub fn gpu_handle(&self, index: usize) -> Option<NvmlDevice> {
        self.gpus.get(index).map(|h| as_device(h))
    }

    pub fn mig_handle(&self, gpu: usize, index: usize) -> Option<NvmlDevice> {
        self.migs.get(gpu)?.get(index).map(|h| as_device(h))
    }

    /// The record behind a handle this library handed out, or `None` for anything else.
    pub fn resolve(&self, device: NvmlDevice) -> Option<&'static Handle> {
        self.gpus
            .iter()
            .chain(self.migs.iter().flatten())
            .find(|h| as_device(h) == device)
            .copied()
    }

    pub fn device(&self, gpu: usize) -> &scenario::Device {
        &self.scenario.devices[gpu]
    }

    /// Whether `call` on `gpu` fails now: lost GPU first, then injected errors.
    pub fn failure(&self, call: &str, gpu: usize, now_ms: f64) -> Option<NvmlReturn> {
        if self
            .device(gpu)
            .lost_at_ms
            .is_some_and(|at| now_ms >= at as f64)
        {
            return Some(ffi::ERROR_GPU_IS_LOST);
        }
        self.scenario
            .errors
            .iter()
            .find(|e| {
                e.call == call
                    && e.device.is_none_or(|d| d == gpu)
                    && now_ms >= e.from_ms as f64
                    && e.until_ms.is_none_or(|until| now_ms < until as f64)
            })
            .map(|e| e.code.0)
    }
}

fn as_device(handle: &'static Handle) -> NvmlDevice {
    std::ptr::from_ref(handle).cast_mut().cast()
}

fn scenario_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(SCENARIO_ENV) {
        return Some(PathBuf::from(path));
    }
    let dir = library_path()?.parent()?.to_path_buf();
    Some(dir.join(SCENARIO_BESIDE_LIBRARY))
}

/// The path this library was loaded from, as the loader recorded it.
fn library_path() -> Option<PathBuf> {
    let mut info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    let addr = library_path as fn() -> Option<PathBuf> as *const libc::c_void;
    // SAFETY: dladdr only reads the loader's tables; `info` is a valid out-pointer.
    let found = unsafe { libc::dladdr(addr, &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is a NUL-terminated string owned by the loader while we are loaded.
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(name.to_bytes())))
}

static STATE: Mutex<Option<Arc<State>>> = Mutex::new(None);
static INIT_COUNT: AtomicU32 = AtomicU32::new(0);
static CALLS: AtomicU64 = AtomicU64::new(0);
static EVENT_CALLS: AtomicU64 = AtomicU64::new(0);

fn lock() -> MutexGuard<'static, Option<Arc<State>>> {
    STATE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `nvmlInit*`: loads the scenario on the first success (time 0 starts then) and counts.
pub fn init() -> NvmlReturn {
    count_call();
    let mut state = lock();
    if state.is_none() {
        match State::load() {
            Ok(loaded) => *state = Some(Arc::new(loaded)),
            Err(code) => return code,
        }
    }
    INIT_COUNT.fetch_add(1, Ordering::SeqCst);
    ffi::SUCCESS
}

/// `nvmlShutdown`: NVML reference-counts init; the scenario and its clock stay loaded.
pub fn shutdown() -> NvmlReturn {
    count_call();
    let _state = lock();
    match INIT_COUNT.load(Ordering::SeqCst) {
        0 => ffi::ERROR_UNINITIALIZED,
        n => {
            INIT_COUNT.store(n - 1, Ordering::SeqCst);
            ffi::SUCCESS
        }
    }
}

pub fn count_call() {
    CALLS.fetch_add(1, Ordering::Relaxed);
}

/// Event-set calls come from a caller's event thread at its own pace; they are counted apart so
/// that [`calls`] is a caller's sampling calls only.
pub fn count_event_call() {
    EVENT_CALLS.fetch_add(1, Ordering::Relaxed);
}

pub fn calls() -> u64 {
    CALLS.load(Ordering::Relaxed)
}

pub fn epoch_us() -> u64 {
    lock().as_ref().map_or(0, |s| s.epoch_us)
}

/// The state, if NVML is initialised.
pub fn current() -> Result<Arc<State>, NvmlReturn> {
    if INIT_COUNT.load(Ordering::SeqCst) == 0 {
        return Err(ffi::ERROR_UNINITIALIZED);
    }
    lock().clone().ok_or(ffi::ERROR_UNINITIALIZED)
}

/// What a device call sees: the state, which device, and the time of the call.
#[derive(Debug)]
pub struct Call {
    pub state: Arc<State>,
    pub gpu: usize,
    pub mig: Option<usize>,
    pub now_ms: f64,
}

impl Call {
    pub fn device(&self) -> &scenario::Device {
        self.state.device(self.gpu)
    }

    pub fn mig_instance(&self) -> Option<&scenario::MigInstance> {
        self.device().mig.as_ref()?.instances.get(self.mig?)
    }

    /// Processes alive now on this handle (all of the GPU's for a GPU handle; the instance's
    /// for a MIG handle); zombies are not.
    pub fn live_processes(&self) -> impl Iterator<Item = &scenario::Process> {
        let instance = self
            .mig_instance()
            .map(|i| (i.gpu_instance_id, i.compute_instance_id));
        let now = self.now_ms;
        self.device().processes.iter().filter(move |p| {
            p.alive_at(now)
                && !p.zombie
                && instance.is_none_or(|(gi, ci)| {
                    p.gpu_instance_id == Some(gi) && p.compute_instance_id == Some(ci)
                })
        })
    }
}

fn is_event_call(name: &str) -> bool {
    matches!(
        name,
        "nvmlEventSetCreate"
            | "nvmlEventSetFree"
            | "nvmlEventSetWait_v2"
            | "nvmlDeviceRegisterEvents"
            | "nvmlDeviceGetSupportedEventTypes"
    )
}

/// Runs a device call: counts it, checks init, the handle, a lost GPU and injected errors, then
/// `body`.
pub fn device_call(
    name: &str,
    device: NvmlDevice,
    body: impl FnOnce(&Call) -> Result<(), NvmlReturn>,
) -> NvmlReturn {
    if is_event_call(name) {
        count_event_call();
    } else {
        count_call();
    }
    let state = match current() {
        Ok(state) => state,
        Err(code) => return code,
    };
    let Some(handle) = state.resolve(device) else {
        return ffi::ERROR_INVALID_ARGUMENT;
    };
    if let Some(slow) = state.scenario.slow_calls.iter().find(|s| s.call == name) {
        std::thread::sleep(std::time::Duration::from_millis(slow.ms));
    }
    let now_ms = state.now_ms();
    if let Some(code) = state.failure(name, handle.gpu, now_ms) {
        return code;
    }
    let call = Call {
        gpu: handle.gpu,
        mig: handle.mig,
        now_ms,
        state,
    };
    match body(&call) {
        Ok(()) => ffi::SUCCESS,
        Err(code) => code,
    }
}

/// A system call (no device): counts it, checks init and injected errors for no device in
/// particular.
pub fn system_call(
    name: &str,
    body: impl FnOnce(&Arc<State>) -> Result<(), NvmlReturn>,
) -> NvmlReturn {
    if is_event_call(name) {
        count_event_call();
    } else {
        count_call();
    }
    let state = match current() {
        Ok(state) => state,
        Err(code) => return code,
    };
    let now_ms = state.now_ms();
    if let Some(e) = state.scenario.errors.iter().find(|e| {
        e.call == name
            && e.device.is_none()
            && now_ms >= e.from_ms as f64
            && e.until_ms.is_none_or(|until| now_ms < until as f64)
    }) {
        return e.code.0;
    }
    match body(&state) {
        Ok(()) => ffi::SUCCESS,
        Err(code) => code,
    }
}

/// `*ptr`, or `INVALID_ARGUMENT` for a null pointer.
///
/// # Safety
/// `ptr` must be null or valid for writes of a `T`.
pub unsafe fn out<'a, T>(ptr: *mut T) -> Result<&'a mut T, NvmlReturn> {
    // SAFETY: the caller guarantees `ptr` is null or valid.
    unsafe { ptr.as_mut() }.ok_or(ffi::ERROR_INVALID_ARGUMENT)
}

/// Copies `text` NUL-terminated into a caller buffer of `length` bytes.
///
/// # Safety
/// `buf` must be null or valid for writes of `length` bytes.
pub unsafe fn write_str(
    buf: *mut std::os::raw::c_char,
    length: std::os::raw::c_uint,
    text: &str,
) -> Result<(), NvmlReturn> {
    if buf.is_null() {
        return Err(ffi::ERROR_INVALID_ARGUMENT);
    }
    let bytes = text.as_bytes();
    if bytes.len() + 1 > length as usize {
        return Err(ffi::ERROR_INSUFFICIENT_SIZE);
    }
    // SAFETY: the caller guarantees `length` writable bytes; we write len + 1 <= length.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), bytes.len());
        *buf.add(bytes.len()) = 0;
    }
    Ok(())
}
