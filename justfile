# The front door. `just --list` shows every recipe; `just pipeline` runs everything.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Threads for candle's matmul/conv (set once, here).
export RAYON_NUM_THREADS := env("RAYON_NUM_THREADS", num_cpus())
# One target folder that outlives a clone: dependencies compile once per machine.
export CARGO_TARGET_DIR := env("CARGO_TARGET_DIR", home_directory() / ".cache/kd-distill/target")

bin := CARGO_TARGET_DIR / "release"
fashion_dir := "/usr/share/datasets/fashion-mnist"

default:
    @just --list

# Run every stage in order: `just pipeline [NAME] [FLAGS]` (a stage whose inputs and settings are unchanged is skipped)
[group('pipeline')]
[positional-arguments]
pipeline *args: data build python-env
    if [ "${1:-}" = photos ]; then just data-photos; fi
    {{bin}}/kd-experiment pipeline "$@"

# Stage 1: train the teacher (`just teacher [NAME] [FLAGS]`, e.g. `just teacher smoke --epochs 2`)
[group('stages')]
teacher *args='': (_stage "kd-teacher" args)

# Stage 2: the teacher's soft targets for the whole training set -> knowledge file
[group('stages')]
precompute *args='': (_stage "kd-precompute" args)

# Stage 2 on a SLURM cluster: an N-task job array and a dependent merge, waited for and verified (`just precompute-slurm 3 smoke`); without a cluster, starts a one-node one here
[group('stages')]
precompute-slurm n='3' name='fashion-mnist' *args='': build
    #!/usr/bin/env bash
    set -euo pipefail
    pipeline="pipelines/{{name}}.toml"
    if [ ! -f "artifacts/{{name}}/teacher/model.safetensors" ]; then
        echo "no teacher for {{name}} yet: run \`just teacher {{name}}\` first" >&2; exit 1
    fi
    if [ -z "${SLURM_CONF:-}" ] && ! sinfo -h >/dev/null 2>&1; then
        eval "$(deploy/slurm/local/cluster.sh start)"
    fi
    KD_BIN="{{bin}}" deploy/slurm/submit.sh --wait {{n}} "$pipeline" artifacts -- {{args}}
    {{bin}}/kd-precompute verify --pipeline "$pipeline" {{args}}

# KD student and baseline per seed and label count, and the variants asked for, then the report: `just compare [NAME] [seeds=3] [labels="1000 5000 all"] [views=8] [storage="f16 top3-f16"] [variant=e30 -- --epochs 30]` (defaults: the pipeline's [experiment] section)
[group('experiments')]
[positional-arguments]
compare *args: data build
    {{bin}}/kd-experiment compare "$@"

# KD students over a grid of temperature, hard/soft weights and teacher heads from the one knowledge file: `just sweep [NAME] [temps="1 2 4 8"] [weights="0.55:0.45 0.1:0.9"] [heads="main all"] [-- FLAGS]`
[group('experiments')]
[positional-arguments]
sweep *args: data build
    {{bin}}/kd-experiment sweep "$@"

# The one-node SLURM cluster on this machine: `just slurm-local start|stop|status`
[group('setup')]
slurm-local cmd='status':
    deploy/slurm/local/cluster.sh {{cmd}}

# Stage 3: train the student from the knowledge file (KD)
[group('stages')]
student *args='': (_stage "kd-student" args)

# Stage 3': train the same student on labels alone (the control)
[group('stages')]
baseline *args='': (_stage "kd-student --baseline" args)

# Stage 4: compare teacher and students -> artifacts/<name>/report/report.md
[group('stages')]
report *args='': (_stage "kd-report" args)

# Classify image files or folders with a trained model (`just predict [NAME] FILES... [--model teacher|student-baseline] [--top K] [--json]`)
[group('stages')]
predict *args='': build
    #!/usr/bin/env bash
    set -euo pipefail
    set -- {{args}}
    name=fashion-mnist
    if [ $# -gt 0 ] && [ -f "pipelines/$1.toml" ]; then name=$1; shift; fi
    {{bin}}/kd-predict --pipeline "pipelines/$name.toml" "$@"

# Stage 5: the distilled student (or `--model student-baseline|teacher`) as ONNX, run by ONNX Runtime on the test set -> artifacts/<name>/export/<model>.onnx
[group('stages')]
export *args='': python-env (_stage "kd-export" args)

# Runs one stage binary: the first argument, if it is not a flag, names the pipeline.
[private]
_stage binary *args='': build
    #!/usr/bin/env bash
    set -euo pipefail
    set -- {{args}}
    name=fashion-mnist
    if [ $# -gt 0 ] && [[ $1 != -* ]]; then name=$1; shift; fi
    {{bin}}/{{binary}} --pipeline "pipelines/$name.toml" "$@"

# Install Fashion-MNIST (Debian's dataset-fashion-mnist) if it is not there
[group('setup')]
data:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ -f {{fashion_dir}}/train-images-idx3-ubyte.gz ]; then exit 0; fi
    echo "installing Debian's dataset-fashion-mnist into {{fashion_dir}}"
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist

# Build data/photos: 5 classes of real photographs from Debian's tuxpaint-stamps-default, seeded train/val split
[group('setup')]
data-photos seed='0': build
    [ -d /usr/share/tuxpaint/stamps/animals/birds ] || { sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"; $sudo apt-get update -qq; DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq tuxpaint-stamps-default; }
    {{bin}}/kd-photos /usr/share/tuxpaint/stamps data/photos {{seed}}

# The Python the exported models are checked with: onnx, onnxruntime, safetensors, numpy in .venv/
[group('setup')]
python-env:
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/python -c 'import onnx, onnxruntime, safetensors, numpy' 2>/dev/null || .venv/bin/pip install --quiet -r crates/kd-export/python/requirements.txt

# Build the stage binaries (release: the tests use the same profile)
[group('setup')]
build:
    cargo build --release --workspace --bins

# The stage binaries with CUDA (`--features cuda`), no GPU or toolkit needed here: nvcc 13.0 from PyPI -> ~/.cache/kd-distill/target-cuda/release (docs/gpu.md)
[group('gpu')]
build-cuda:
    deploy/gpu/build.sh

# Build with CUDA and pack `.gpu/` for the GPU check; on the GPU machine: `bash deploy/gpu/check.sh` with `.gpu` carried (docs/gpu.md)
[group('gpu')]
gpu-check: data build-cuda
    deploy/gpu/pack.sh
    @echo 'packed .gpu/: on the GPU machine run `bash deploy/gpu/check.sh full` from the repository root'

# Run the test suite: unit and end-to-end tests on the smoke pipeline, then the SLURM test (`just test FILTER` runs the matching cargo tests only)
[group('checks')]
test *args='': data data-photos build python-env
    cargo test --release --workspace {{args}}
    if [ -z "{{args}}" ]; then just test-slurm; fi

# The slow test: a one-node SLURM cluster on this machine runs the precompute as a job array (installs slurm-wlm + munge)
[group('checks')]
test-slurm:
    timeout 600 cargo test --release -p kd-precompute --test slurm -- --ignored

# Measure every stage's hot path on the real data -> artifacts/bench/bench.md (`just bench [NAME] [FLAGS]`)
[group('checks')]
bench *args='': data build
    #!/usr/bin/env bash
    set -euo pipefail
    set -- {{args}}
    name=fashion-mnist
    if [ $# -gt 0 ] && [[ $1 != -* ]]; then name=$1; shift; fi
    {{bin}}/kd-bench --pipeline "pipelines/$name.toml" "$@"

# Ours and PyTorch's side by side (alternating, same data): installs torch into .venv-torch first (opt-in: ~5 GB with its CUDA libraries) -> artifacts/bench/bench.md
[group('checks')]
bench-pytorch *args='':
    [ -x .venv-torch/bin/python ] || python3 -m venv .venv-torch
    .venv-torch/bin/python -c 'import torch' 2>/dev/null || .venv-torch/bin/pip install torch numpy
    just bench {{args}} --pytorch .venv-torch/bin/python

# Fuzz the IDX reader, the knowledge-file reader and the pipeline-file parser (`just fuzz 600` = 10 minutes each); installs cargo-fuzz
[group('checks')]
fuzz seconds='60':
    #!/usr/bin/env bash
    set -euo pipefail
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
    cd fuzz
    # Stable Rust: coverage-guided libFuzzer without a sanitizer (-s none).
    # New inputs go to target/corpus (ignored); corpus/ holds the committed seeds.
    for target in idx knowledge pipeline; do
        mkdir -p "target/corpus/$target"
        cargo fuzz run -s none -O "$target" "target/corpus/$target" "corpus/$target" -- -max_total_time={{seconds}} -max_len=4096 -print_final_stats=1
    done

# Tests, clippy and formatting, as CI would want them
[group('checks')]
ci: test
    cargo clippy --release --workspace --all-targets -- -D warnings
    cargo fmt --all -- --check

# Remove a pipeline's outputs
[group('setup')]
clean name='fashion-mnist':
    rm -rf artifacts/{{name}}
