//! XID errors: a dedicated thread owns an NVML event set registered for critical XID errors on
//! every GPU that supports them, waits on it with a timeout, logs each XID and sends it to the
//! sampler's channel. It stops within one wait timeout once its `XidWatcher` drops.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{EventSet, Nvml};
use tracing::{info, warn};

use crate::error::error_code;
use crate::raw::{device_of, RawDevice};
use crate::sample::XidEvent;

/// How long one `nvmlEventSetWait_v2` blocks; also the longest a drop waits for the thread.
const WAIT_MS: u32 = 500;

/// The running XID thread. Dropping it stops and joins the thread.
#[derive(Debug)]
pub(crate) struct XidWatcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl XidWatcher {
    /// Starts the thread for `devices` (handle, uuid).
    pub(crate) fn spawn(
        nvml: Arc<Nvml>,
        devices: Vec<(RawDevice, String)>,
        xids: Sender<XidEvent>,
    ) -> std::io::Result<XidWatcher> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("tally-nvml-xid".to_owned())
            .spawn(move || run(&nvml, &devices, &xids, &flag))?;
        Ok(XidWatcher {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for XidWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                warn!("the NVML XID event thread panicked");
            }
        }
    }
}

fn run(nvml: &Nvml, devices: &[(RawDevice, String)], xids: &Sender<XidEvent>, stop: &AtomicBool) {
    let Some(mut set) = register(nvml, devices) else {
        return;
    };
    let mut logged = HashSet::new();
    while !stop.load(Ordering::Relaxed) {
        match set.wait(WAIT_MS) {
            Ok(event) => {
                let Some(xid) = event.event_data else {
                    continue;
                };
                let xid = match xid {
                    XidError::Value(xid) => xid,
                    XidError::Unknown => 999,
                };
                // SAFETY: only the raw handle value is read, to compare it with ours.
                let handle = RawDevice(unsafe { event.device.handle() });
                let device_uuid = devices
                    .iter()
                    .find(|(h, uuid)| *h == handle && !uuid.is_empty())
                    .map(|(_, uuid)| uuid.clone())
                    .or_else(|| event.device.uuid().ok())
                    .unwrap_or_default();
                warn!(gpu = %device_uuid, xid, "GPU XID error");
                if xids.send(XidEvent { device_uuid, xid }).is_err() {
                    return;
                }
            }
            Err(NvmlError::Timeout) => {}
            // A registered GPU fell off the bus (its XID 79 came first): the set answers this
            // from now on, which would hide every other GPU's XIDs. A new set without the GPUs
            // that no longer answer (register skips them).
            Err(NvmlError::GpuLost) => {
                warn!("a GPU in the XID event set is lost; registering the others again");
                drop(set);
                match register(nvml, devices) {
                    Some(again) => set = again,
                    None => return,
                }
            }
            Err(e) => {
                if logged.insert(error_code(&e)) {
                    warn!(error = %e, "waiting for NVML events failed; retrying");
                }
                std::thread::sleep(Duration::from_millis(WAIT_MS.into()));
            }
        }
    }
}

/// An event set with every XID-capable GPU registered, or `None` when there is none.
fn register<'n>(nvml: &'n Nvml, devices: &[(RawDevice, String)]) -> Option<EventSet<'n>> {
    let mut skip = HashSet::new();
    // A failed registration frees the set (NVML leaves it undefined), so start over without
    // that GPU; at most one round per GPU.
    'build: loop {
        let mut set = match nvml.create_event_set() {
            Ok(set) => set,
            Err(e) => {
                warn!(error = %e, "nvmlEventSetCreate failed; XID errors will not be reported");
                return None;
            }
        };
        let mut registered = 0;
        for (i, (handle, uuid)) in devices.iter().enumerate() {
            if skip.contains(&i) {
                continue;
            }
            let device = device_of(nvml, *handle);
            let supported = device
                .supported_event_types()
                .is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR));
            if !supported {
                info!(gpu = %uuid, "GPU does not report XID events");
                skip.insert(i);
                continue;
            }
            match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                Ok(s) => {
                    set = s;
                    registered += 1;
                }
                Err(e) => {
                    warn!(gpu = %uuid, error = %e, "nvmlDeviceRegisterEvents failed; no XID events from this GPU");
                    skip.insert(i);
                    continue 'build;
                }
            }
        }
        if registered == 0 {
            info!("no GPU reports XID events");
            return None;
        }
        return Some(set);
    }
}
