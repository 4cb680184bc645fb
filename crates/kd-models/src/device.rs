//! Which device a model runs on, by name: `cpu`, or the GPU's model and driver.

use candle_core::Device;

/// Whether this build can run on a CUDA GPU (`--features cuda`).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

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
