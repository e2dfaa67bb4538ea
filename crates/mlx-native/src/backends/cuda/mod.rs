//! The CUDA backend (cudarc: driver API, NVRTC). Loads the driver at run time.

use crate::core::device::Device;
use crate::{Error, Result};

/// Whether a CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to load the library; no other CUDA state is touched.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

pub fn cuda_device(ordinal: usize) -> Result<Device> {
    if !driver_present() {
        return Err(Error::DeviceUnavailable(format!(
            "cuda:{ordinal}: no CUDA driver library found on this machine"
        )));
    }
    Err(Error::DeviceUnavailable(format!(
        "cuda:{ordinal}: the CUDA backend is not implemented in this build"
    )))
}
