#!/usr/bin/env bash
# `just gpu-check` (after build.sh): what the GPU machine needs, in `.gpu/` (git-ignored, at
# most 64 MiB travel with the working tree): the stripped CUDA binary of every stage (`kd-all`),
# xz-compressed, and the
# Fashion-MNIST files. The session holding the GPU runs `bash deploy/gpu/check.sh` there with
# `.gpu` carried.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="${CARGO_TARGET_DIR_CUDA:-$HOME/.cache/kd-distill/target-cuda}/release"
data="${KD_FASHION_DIR:-/usr/share/datasets/fashion-mnist}"
rm -rf .gpu && mkdir -p .gpu/bin .gpu/data
strip -o .gpu/bin/kd-all "$bin/kd-all"
xz -9 -T0 .gpu/bin/kd-all
cp "$data"/*-ubyte.gz .gpu/data/
du -sh .gpu/bin .gpu/data >&2
total=$(( $(du -sb .gpu | cut -f1) + $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) ))
echo "travels: $(( total / 1048576 )) MiB of 64" >&2
[ "$total" -lt $(( 64 * 1048576 )) ] || { echo "over the 64 MiB a call carries" >&2; exit 1; }
