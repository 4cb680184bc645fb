#!/usr/bin/env bash
# Submits the precompute as an N-task SLURM job array and a merge job that runs once every task
# succeeded; with --wait, waits for the merge and says which tasks failed, if any.
#
#   deploy/slurm/submit.sh [--wait] [--only I] N PIPELINE ARTIFACTS [-- KD-PRECOMPUTE ARGS]
#
#   --only I   resubmit task I alone (after it failed or was killed), then the merge
#
# KD_BIN: folder of the kd-* binaries (default: PATH). Logs go to ARTIFACTS/<pipeline>/knowledge/
# slurm-logs/. Extra sbatch options (partition, account, time): SBATCH_PARTITION, SBATCH_ACCOUNT,
# SBATCH_TIMELIMIT ... are read by sbatch itself.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
wait=""; only=""
while [ $# -gt 0 ]; do
    case "$1" in
    --wait) wait=1; shift ;;
    --only) only="$2"; shift 2 ;;
    *) break ;;
    esac
done
if [ $# -lt 3 ]; then
    sed -n '2,12p' "$0" >&2
    exit 2
fi
n="$1"; pipeline_arg="$2"; pipeline="$(realpath "$2")"; artifacts="$(realpath -m "$3")"; shift 3
[ "${1:-}" = "--" ] && shift
name="$(basename "$pipeline" .toml)"
logs="$artifacts/$name/knowledge/slurm-logs"
mkdir -p "$logs"
export KD_PIPELINE="$pipeline" KD_ARTIFACTS="$artifacts" KD_BIN="${KD_BIN:-}"

if [ -n "$only" ]; then
    array=$(sbatch --parsable --array="$only" --chdir="$artifacts" \
        --output="$logs/precompute-%A_%a.out" --export=ALL,KD_SHARDS="$n" "$here/precompute.sbatch" "$@")
else
    array=$(sbatch --parsable --array="0-$((n - 1))" --chdir="$artifacts" \
        --output="$logs/precompute-%A_%a.out" "$here/precompute.sbatch" "$@")
fi
array="${array%%;*}"
echo "submitted precompute array job $array (${only:+task $only of }$n shard(s)); logs in $logs"
merge_args=(--dependency="afterok:$array" --kill-on-invalid-dep=yes --chdir="$artifacts"
    --output="$logs/merge-%j.out" "$here/merge.sbatch" --shards "$n" "$@")
if [ -z "$wait" ]; then
    merge=$(sbatch --parsable "${merge_args[@]}")
    echo "submitted merge job ${merge%%;*} (runs when every task of $array succeeded)"
    exit 0
fi
echo "waiting for the merge job (runs when every task of $array succeeded) ..."
status=0
sbatch --wait --parsable "${merge_args[@]}" >/dev/null || status=$?
if [ "$status" -ne 0 ]; then
    echo "the merge did not run or failed (sbatch exit $status). Tasks of $array:" >&2
    scontrol show job -o "$array" 2>/dev/null \
        | grep -o 'ArrayTaskId=[^ ]*\|JobState=[^ ]*\|ExitCode=[^ ]*' | paste - - - >&2 || true
    echo "resubmit a failed task with: $0 --wait --only I $n $pipeline_arg $artifacts (finished shards are kept)" >&2
    tail -n 5 "$logs"/merge-*.out 2>/dev/null >&2 || true
    exit 1
fi
echo "merged: $artifacts/$name/knowledge/soft-targets.safetensors"
