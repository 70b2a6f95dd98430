//! The narrow seam to NVML's raw bindings, for calls `nvml-wrapper` 0.11 does not wrap: MIG
//! device enumeration, field values with a scope id (NVLink totals over all links), clock
//! event reasons under their current name, and MPS clients
//! (`nvmlDeviceGetMPSComputeRunningProcesses_v3`, which the wrapper's sys crate loads but its
//! `Device` has no method for). It opens the same library file as the wrapper, so
//! the loader hands back the already-loaded, already-initialised instance. [`device_of`] turns a
//! raw handle back into the wrapper's `Device`.

use std::ffi::OsStr;

use nvml_wrapper::error::{nvml_sym, nvml_try, NvmlError};
use nvml_wrapper::{Device, Nvml};
use nvml_wrapper_sys::bindings::{
    nvmlDevice_t, nvmlFieldValue_t, nvmlProcessInfo_t,
    nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE as INSUFFICIENT_SIZE, NvmlLib,
};

/// An NVML device handle (GPU or MIG device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawDevice(pub(crate) nvmlDevice_t);

// SAFETY: an NVML device handle is an opaque identifier that stays valid until `nvmlShutdown`,
// and NVML is thread-safe ("it is safe to make simultaneous NVML calls from multiple threads").
unsafe impl Send for RawDevice {}
// SAFETY: as above; the handle is never dereferenced on our side.
unsafe impl Sync for RawDevice {}

/// A wrapper `Device` for a handle this `Nvml` handed out.
pub(crate) fn device_of(nvml: &Nvml, handle: RawDevice) -> Device<'_> {
    // SAFETY: every RawDevice comes from this Nvml instance (handle by index or MIG handle), and
    // NVML keeps handles valid until nvmlShutdown, which runs only when that Nvml drops.
    unsafe { Device::new(handle.0, nvml) }
}

/// `NVML_VALUE_TYPE_*`.
const VALUE_DOUBLE: u32 = 0;
const VALUE_UNSIGNED_INT: u32 = 1;
const VALUE_UNSIGNED_LONG: u32 = 2;
const VALUE_UNSIGNED_LONG_LONG: u32 = 3;
const VALUE_SIGNED_LONG_LONG: u32 = 4;
const VALUE_SIGNED_INT: u32 = 5;
const VALUE_UNSIGNED_SHORT: u32 = 6;

pub(crate) struct RawNvml {
    lib: NvmlLib,
}

impl std::fmt::Debug for RawNvml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawNvml")
    }
}

impl RawNvml {
    /// Opens `path` again (after the wrapper did) for its symbol table.
    pub(crate) fn open(path: &OsStr) -> Result<RawNvml, NvmlError> {
        // SAFETY: the wrapper has already loaded this library, so opening it again only takes
        // another reference; no initialiser runs. Symbols are resolved, not called.
        let lib = unsafe { NvmlLib::new(path) }?;
        Ok(RawNvml { lib })
    }

    /// The name of the clock-reasons function this driver exports: the current one, or the
    /// deprecated one on drivers older than R535.
    pub(crate) fn clock_reasons_call(&self) -> &'static str {
        if self.lib.nvmlDeviceGetCurrentClocksEventReasons.is_ok() {
            "nvmlDeviceGetCurrentClocksEventReasons"
        } else {
            "nvmlDeviceGetCurrentClocksThrottleReasons"
        }
    }

    /// `nvmlDeviceGetCurrentClocksEventReasons` (or its deprecated name).
    pub(crate) fn clock_reasons(&self, device: RawDevice) -> Result<u64, NvmlError> {
        let sym = match self.lib.nvmlDeviceGetCurrentClocksEventReasons.as_ref() {
            Ok(sym) => sym,
            Err(_) => nvml_sym(self.lib.nvmlDeviceGetCurrentClocksThrottleReasons.as_ref())?,
        };
        let mut reasons = 0;
        // SAFETY: a valid handle and a valid out-pointer.
        nvml_try(unsafe { sym(device.0, &mut reasons) })?;
        Ok(reasons)
    }

    /// `nvmlDeviceGetFieldValues`: fills `values` (ids and scopes set by the caller) and leaves
    /// each entry's own return code in it.
    pub(crate) fn field_values(
        &self,
        device: RawDevice,
        values: &mut [nvmlFieldValue_t],
    ) -> Result<(), NvmlError> {
        let sym = nvml_sym(self.lib.nvmlDeviceGetFieldValues.as_ref())?;
        let count = i32::try_from(values.len()).map_err(|_| NvmlError::InvalidArg)?;
        // SAFETY: `values` holds `count` initialised entries.
        nvml_try(unsafe { sym(device.0, count, values.as_mut_ptr()) })
    }

    /// Whether the library exports `nvmlDeviceGetMPSComputeRunningProcesses_v3` (older drivers
    /// have only earlier versions of it, with another struct layout, which are not used).
    pub(crate) fn has_mps_processes(&self) -> bool {
        self.lib.nvmlDeviceGetMPSComputeRunningProcesses_v3.is_ok()
    }

    /// `nvmlDeviceGetMPSComputeRunningProcesses_v3` into a buffer of `capacity` entries: one
    /// call, no count probe. When more clients run than fit, NVML answers `INSUFFICIENT_SIZE`
    /// and writes the count it needs, returned as `InsufficientSize(Some(needed))`.
    pub(crate) fn mps_compute_processes(
        &self,
        device: RawDevice,
        capacity: u32,
    ) -> Result<Vec<nvmlProcessInfo_t>, NvmlError> {
        let sym = nvml_sym(self.lib.nvmlDeviceGetMPSComputeRunningProcesses_v3.as_ref())?;
        // SAFETY: nvmlProcessInfo_t is plain old data (integers); all zeroes is a valid value.
        let mut infos: Vec<nvmlProcessInfo_t> =
            vec![unsafe { std::mem::zeroed() }; capacity as usize];
        let mut count = capacity;
        // SAFETY: a valid handle, a valid count, and `infos` holds `count` entries.
        match unsafe { sym(device.0, &mut count, infos.as_mut_ptr()) } {
            INSUFFICIENT_SIZE => Err(NvmlError::InsufficientSize(Some(count as usize))),
            code => {
                nvml_try(code)?;
                infos.truncate(count.min(capacity) as usize);
                Ok(infos)
            }
        }
    }

    /// `nvmlDeviceGetMaxMigDeviceCount`.
    pub(crate) fn max_mig_device_count(&self, device: RawDevice) -> Result<u32, NvmlError> {
        let sym = nvml_sym(self.lib.nvmlDeviceGetMaxMigDeviceCount.as_ref())?;
        let mut count = 0;
        // SAFETY: a valid handle and a valid out-pointer.
        nvml_try(unsafe { sym(device.0, &mut count) })?;
        Ok(count)
    }

    /// `nvmlDeviceGetMigDeviceHandleByIndex`; `NotFound` for an empty slot.
    pub(crate) fn mig_device(&self, device: RawDevice, index: u32) -> Result<RawDevice, NvmlError> {
        let sym = nvml_sym(self.lib.nvmlDeviceGetMigDeviceHandleByIndex.as_ref())?;
        let mut mig = std::ptr::null_mut();
        // SAFETY: a valid handle and a valid out-pointer.
        nvml_try(unsafe { sym(device.0, index, &mut mig) })?;
        Ok(RawDevice(mig))
    }

    /// `nvmlDeviceGetGpuInstanceId` of a MIG device.
    pub(crate) fn gpu_instance_id(&self, mig: RawDevice) -> Result<u32, NvmlError> {
        let sym = nvml_sym(self.lib.nvmlDeviceGetGpuInstanceId.as_ref())?;
        let mut id = 0;
        // SAFETY: a valid handle and a valid out-pointer.
        nvml_try(unsafe { sym(mig.0, &mut id) })?;
        Ok(id)
    }

    /// `nvmlDeviceGetComputeInstanceId` of a MIG device.
    pub(crate) fn compute_instance_id(&self, mig: RawDevice) -> Result<u32, NvmlError> {
        let sym = nvml_sym(self.lib.nvmlDeviceGetComputeInstanceId.as_ref())?;
        let mut id = 0;
        // SAFETY: a valid handle and a valid out-pointer.
        nvml_try(unsafe { sym(mig.0, &mut id) })?;
        Ok(id)
    }
}

/// A zeroed field-value request.
pub(crate) fn field_request(field_id: u32, scope_id: u32) -> nvmlFieldValue_t {
    // SAFETY: nvmlFieldValue_t is plain old data (integers and a union of numbers); all zeroes
    // is a valid value.
    let mut value: nvmlFieldValue_t = unsafe { std::mem::zeroed() };
    value.fieldId = field_id;
    value.scopeId = scope_id;
    value
}

/// A filled field value as an unsigned count, or the entry's own error.
pub(crate) fn field_u64(value: &nvmlFieldValue_t) -> Result<u64, NvmlError> {
    nvml_try(value.nvmlReturn)?;
    // SAFETY: `valueType` says which union member NVML wrote.
    let v = unsafe {
        match value.valueType {
            VALUE_DOUBLE => value.value.dVal.max(0.0) as u64,
            VALUE_UNSIGNED_INT => u64::from(value.value.uiVal),
            VALUE_UNSIGNED_LONG => value.value.ulVal,
            VALUE_UNSIGNED_LONG_LONG => value.value.ullVal,
            VALUE_SIGNED_LONG_LONG => value.value.sllVal.max(0) as u64,
            VALUE_SIGNED_INT => value.value.siVal.max(0) as u64,
            VALUE_UNSIGNED_SHORT => u64::from(value.value.usVal),
            other => return Err(NvmlError::UnexpectedVariant(other)),
        }
    };
    Ok(v)
}
