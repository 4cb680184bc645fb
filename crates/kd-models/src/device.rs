//! Which device a model runs on, by name: `cpu`, or the GPU's model and driver.

use candle_core::Device;

/// Whether this build can run on a CUDA GPU (`--features cuda`).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// Whether the CUDA driver's library can be loaded (a CUDA build opens it at run time; without
/// it candle's first CUDA call would panic instead of failing).
pub fn cuda_driver_present() -> bool {
    #[cfg(feature = "cuda")]
    #[allow(unsafe_code)]
    // SAFETY: tries to dlopen libcuda under its usual names and closes it again; no call into it.
    unsafe {
        candle_core::cuda_backend::cudarc::driver::sys::is_culib_present()
    }
    #[cfg(not(feature = "cuda"))]
    false
}

/// A CUDA device, with cuBLAS and cuRAND opened. A library that cannot be loaded is an error
/// here, not a panic later (cudarc panics when it loads one it cannot find).
pub fn open_cuda(ordinal: usize) -> candle_core::Result<Device> {
    if !cuda_driver_present() {
        candle_core::bail!("no CUDA driver (libcuda.so) on this machine");
    }
    match std::panic::catch_unwind(|| Device::new_cuda(ordinal)) {
        Ok(device) => {
            let device = device?;
            #[cfg(feature = "cuda")]
            if let Device::Cuda(dev) = &device {
                // cudarc records a CUDA event at every use of every buffer, so that buffers
                // shared between streams are waited for: a few microseconds on each of the
                // thousands of launches of a training step. We use one stream (candle's, one
                // per device), on which every launch is ordered after the ones before.
                #[allow(unsafe_code)]
                // SAFETY: one stream only: no buffer is ever used on another stream, so the
                // events that cudarc would record have nothing to order. Called before any
                // tensor is made on this device.
                unsafe {
                    dev.disable_event_tracking()
                };
            }
            Ok(device)
        }
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a CUDA library could not be loaded".into());
            candle_core::bail!("{why}")
        }
    }
}

/// `cpu`, or `cuda:N (<GPU model>, CUDA driver <major.minor>)`.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => cuda_name(dev),
        other => format!("{other:?}"),
    }
}

#[cfg(feature = "cuda")]
fn cuda_name(dev: &candle_core::CudaDevice) -> String {
    let ctx = dev.cuda_stream().context().clone();
    let name = ctx.name().unwrap_or_else(|e| format!("unnamed GPU ({e})"));
    format!(
        "cuda:{} ({name}, CUDA driver {})",
        ctx.ordinal(),
        driver_version()
    )
}

/// The CUDA version the driver supports, `13.0`.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
fn driver_version() -> String {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let mut v: std::ffi::c_int = 0;
    // SAFETY: writes one int through a valid pointer; the driver is loaded (a context exists).
    let status = unsafe { sys::cuDriverGetVersion(&mut v) };
    if status == sys::CUresult::CUDA_SUCCESS {
        format!("{}.{}", v / 1000, (v % 1000) / 10)
    } else {
        format!("unknown ({status:?})")
    }
}
