#!/usr/bin/env bash
# `just build-cuda`: every stage with `--features cuda`, as one binary (`kd-all`), on a machine with no GPU and no
# CUDA toolkit. nvcc, its compiler back end and the CUDA headers come from NVIDIA's PyPI wheels,
# pinned to CUDA 13.0 (the lent H200's driver, 580, runs CUDA 13.0; PTX from a newer nvcc would
# not load there). The libraries candle's cudarc needs are loaded at run time (dlopen), so
# nothing links against them here. Output: $CARGO_TARGET_DIR_CUDA/release (default
# ~/.cache/kd-distill/target-cuda).
set -euo pipefail
cd "$(dirname "$0")/../.."
toolkit="${KD_CUDA_TOOLKIT:-$HOME/.cache/kd-distill/cuda-13.0}"
root="$toolkit/nvidia/cu13"
if [ ! -x "$root/bin/nvcc" ]; then
    echo "installing nvcc 13.0 from PyPI into $toolkit" >&2
    # One pip call: `--target` with a second call would replace the shared `nvidia/` folder.
    python3 -m pip install -q --target "$toolkit" \
        nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
fi
export PATH="$root/bin:$PATH" CUDA_ROOT="$root" CUDA_PATH="$root"
# candle-kernels' MoE kernels are a static library that links libcudart: the wheel ships only
# libcudart.so.13, so the linker gets an unversioned name in a folder of its own.
mkdir -p "$toolkit/link"
ln -sf "$root/lib/libcudart.so.13" "$toolkit/link/libcudart.so"
export LIBRARY_PATH="$toolkit/link${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR_CUDA:-$HOME/.cache/kd-distill/target-cuda}"
# One binary with every stage (`crates/kd-all`): what travels to the GPU machine.
cargo build --release --features cuda -p kd-all
# Each stage's name linked to it, so that `kd-experiment` finds the stages beside itself.
for stage in kd-teacher kd-precompute kd-student kd-report kd-export kd-experiment kd-bench kd-predict; do
    ln -sf kd-all "$CARGO_TARGET_DIR/release/$stage"
done
echo "$CARGO_TARGET_DIR/release"
