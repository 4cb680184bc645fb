//! With the `cuda` feature, the binary needs `libcudart.so.13` when it starts (candle's MoE
//! kernels link it). `deploy/gpu/build.sh` sets `CUDA_ROOT` to the CUDA wheels it installed:
//! their `lib` folder goes into the binary's search path (`RUNPATH`), so the binary starts on
//! the machine that built it; elsewhere the system's CUDA is found as usual.

fn main() {
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    if let Some(root) = std::env::var_os("CUDA_ROOT") {
        let lib = std::path::Path::new(&root).join("lib");
        if lib.join("libcudart.so.13").exists() {
            println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{}", lib.display());
        }
    }
}
