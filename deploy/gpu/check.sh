#!/usr/bin/env bash
# The GPU check, run on the lent GPU machine in one call, from the repository root, with `.gpu`
# (made by `just gpu-check`: the CUDA binaries and Fashion-MNIST) carried:
#
#     bash deploy/gpu/check.sh [quick|full|side]
#
#   1. parity of every op and network, CPU against CUDA (`kd-bench --parity`);
#   2. the smoke pipeline on CUDA, every stage, and the teacher trained twice: same bytes?;
#   3. speed: our `kd-bench` on CUDA, then PyTorch's script on the same GPU, same models and
#      batches (the machine's PyTorch);
#   4. (full) the default Fashion-MNIST pipeline on CUDA, each stage timed, bounded by what is
#      left of the call's time.
#
# Each step has its own time limit, so the script always reaches its end; everything it writes
# is packed into $OUT/results.tgz after every step (a call brings back at most 8 files), and a
# summary goes to $OUT/summary.txt and stdout.
set -uo pipefail
cd "$(dirname "$0")/../.."
mode="${1:-full}"
budget="${KD_GPU_BUDGET:-450}"   # seconds for the whole script
OUT="${OUT:-/tmp/kd-gpu-out}"
work=/tmp/kd
res="$work/out"
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
left() { echo $(( budget - $(elapsed) )); }
say() { echo "[$(elapsed)s] $*" | tee -a "$res/summary.txt"; }
pack() { tar czf "$OUT/results.tgz" -C "$res" . 2>/dev/null; cp "$res/summary.txt" "$OUT/summary.txt"; }

rm -rf "$work" && mkdir -p "$work/bin" "$work/data/fashion-mnist" "$res" "$OUT"
xz -dc .gpu/bin/kd-all.xz >"$work/bin/kd-all" && chmod +x "$work/bin/kd-all"
for stage in kd-teacher kd-precompute kd-student kd-report kd-export kd-experiment kd-bench kd-predict; do
    ln -s kd-all "$work/bin/$stage"
done
cp .gpu/data/*.gz "$work/data/fashion-mnist/"
B="$work/bin"
data="$work/data/fashion-mnist"

# candle's cudarc opens cuBLAS, cuRAND and NVRTC at run time: the machine's PyTorch has them.
libs=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for pat in ("nvidia/*/lib", "nvidia/*/*/lib", "torch/lib"):
        dirs.update(d for d in glob.glob(os.path.join(sp, pat)) if os.path.isdir(d))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export KD_PYTHON=python3
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv >"$res/gpu.txt" 2>&1
say "GPU: $(tail -1 "$res/gpu.txt"); CPU cores: $(nproc); mode $mode, budget ${budget}s"

run() { # run NAME LIMIT COMMAND...: logs to $res/NAME.log, says how it ended
    local name=$1 limit=$2; shift 2
    local t0; t0=$(date +%s)
    timeout "$limit" "$@" >"$res/$name.log" 2>&1
    local rc=$?
    say "$name: exit $rc in $(( $(date +%s) - t0 ))s (limit ${limit}s)"
    [ $rc -eq 0 ] || tail -5 "$res/$name.log" | sed 's/^/    /' | tee -a "$res/summary.txt"
    pack
    return $rc
}

# 1. Parity.
run parity 120 "$B/kd-bench" --parity --device cuda --out "$res/parity"
grep -E "^\| (convolution|BatchNorm|max|avg|Adam|student|googlenet)" "$res/parity/parity.md" 2>/dev/null \
    | awk -F'|' '{printf "    %-70s %s %s\n", $2, $5, $7}' | tee -a "$res/summary.txt"

# `side`: after the parity, only `kd-bench --pytorch` (ours and PyTorch's alternating, one
# invocation, the side-by-side table in bench.md), then stop.
if [ "$mode" = side ]; then
    run side "$(( $(left) - 10 ))" "$B/kd-bench" --device cuda --data-dir "$data" --artifacts "$work/artifacts" \
        --reps 3 --batches 10 --rounds "${KD_GPU_ROUNDS:-1}" --pytorch python3 --out "$res/side"
    sed -n '/Side by side/,$p' "$res/side/bench.md" | head -30 | tee -a "$res/summary.txt"
    say "done"; pack; exit 0
fi

# 2. The smoke pipeline on CUDA, then its teacher again: the same bytes?
smoke=(--pipeline pipelines/smoke.toml --device cuda --data-dir "$data" --artifacts "$work/artifacts")
run smoke 120 "$B/kd-experiment" pipeline "${smoke[@]}" --force
cp "$work/artifacts/smoke/report/report.md" "$res/smoke-report.md" 2>/dev/null
run smoke-again 45 "$B/kd-teacher" "${smoke[@]}" --tag again --force
a=$(sha256sum "$work/artifacts/smoke/teacher/model.safetensors" 2>/dev/null | cut -c1-16)
b=$(sha256sum "$work/artifacts/smoke/runs/again/teacher/model.safetensors" 2>/dev/null | cut -c1-16)
say "smoke teacher twice on the GPU: $a / $b ($([ -n "$a" ] && [ "$a" = "$b" ] && echo same bytes || echo DIFFERENT))"
grep -h '"test_accuracy"' "$work"/artifacts/smoke/*/manifest.json 2>/dev/null | head -4 | sed 's/^ */    /' | tee -a "$res/summary.txt"

# 3. Speed: ours, then PyTorch's, on the same GPU.
bench=(--device cuda --data-dir "$data" --artifacts "$work/artifacts" --reps 5 --batches 10)
run bench 150 "$B/kd-bench" "${bench[@]}" --out "$res/bench"
run bench-googlenet 40 "$B/kd-bench" "${bench[@]}" --only teacher-step --set teacher.arch=googlenet
py=(python3 crates/kd-bench/pytorch/bench.py --device cuda --data "$data" --reps 5 --batches 10)
for m in teacher-step precompute student-kd-step matmul-2048; do
    run "pytorch-$m" 45 "${py[@]}" --only "$m" && tail -1 "$res/pytorch-$m.log" >>"$res/pytorch.jsonl"
done
run pytorch-teacher-step-googlenet 45 "${py[@]}" --only teacher-step --teacher googlenet \
    && tail -1 "$res/pytorch-teacher-step-googlenet.log" >>"$res/pytorch.jsonl"
grep -E "^\| (teacher|precompute|student|online|matmul)" "$res/bench/bench.md" 2>/dev/null | head -12 | tee -a "$res/summary.txt"
python3 deploy/gpu/summary.py pytorch "$res/pytorch.jsonl" | tee -a "$res/summary.txt"

# In quick mode: the default pipeline's baseline student alone, seeds 0 and 1 (about 15 s each).
if [ "$mode" = quick ]; then
    for seed in 0 1; do
        run "baseline-seed-$seed" 60 "$B/kd-student" --baseline --device cuda --data-dir "$data" \
            --artifacts "$work/artifacts" --set student.seed=$seed --tag "seed-$seed"
        grep -E "epoch [0-9]+/[0-9]+: loss|test accuracy" "$res/baseline-seed-$seed.log" | cut -c28-150 | tee -a "$res/summary.txt"
    done
fi

# 4. The default pipeline on CUDA, as far as the time left allows.
if [ "$mode" = full ] && [ "$(left)" -gt 60 ]; then
    run pipeline $(( $(left) - 15 )) "$B/kd-experiment" pipeline --device cuda --data-dir "$data" --artifacts "$work/artifacts"
    grep -hE "epoch [0-9]+/[0-9]+:|test accuracy|wrote|skipped" "$res/pipeline.log" | tail -25 >"$res/pipeline-tail.txt"
    python3 deploy/gpu/summary.py manifests "$work"/artifacts/fashion-mnist/*/manifest.json | tee -a "$res/summary.txt"
fi
say "done"
pack
