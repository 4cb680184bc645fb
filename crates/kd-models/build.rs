//! With `--features cuda`, compiles `cuda/kernels.cu` to PTX for `src/gpu.rs` (nvcc from
//! `$CUDA_ROOT/bin` or `PATH`, for `sm_$CUDA_COMPUTE_CAP`, default 90: the H200). Without the
//! feature it does nothing, so the CPU build never needs nvcc.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=cuda/kernels.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var_os("CUDA_ROOT")
        .map(|root| PathBuf::from(root).join("bin/nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ptx = out.join("kd_kernels.ptx");
    let status = Command::new(&nvcc)
        .args([
            "--ptx",
            "-O3",
            &format!("-arch=sm_{cap}"),
            "cuda/kernels.cu",
            "-o",
        ])
        .arg(&ptx)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{} failed ({s}) on cuda/kernels.cu", nvcc.display()),
        Err(e) => panic!(
            "cannot run {} ({e}): `just build-cuda` installs nvcc and sets CUDA_ROOT",
            nvcc.display()
        ),
    }
}
