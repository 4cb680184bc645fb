#!/usr/bin/env bash
# A one-node SLURM cluster on localhost (Debian's slurm-wlm 22.05 and munge), with its own munge
# key, ports and state under one folder, so it touches nothing of the system's.
#
#   deploy/slurm/local/cluster.sh start [DIR]   install slurm-wlm + munge if missing (apt), start
#                                               munged, slurmctld and slurmd; print `export SLURM_CONF=...`
#   deploy/slurm/local/cluster.sh stop [DIR]    stop them (the folder stays, for the logs)
#   deploy/slurm/local/cluster.sh status [DIR]
#
# DIR defaults to $KD_SLURM_DIR or /tmp/kd-slurm-$USER. Ports: $KD_SLURM_PORT (slurmctld) and the
# next one (slurmd), default 16817. Clients find the cluster through SLURM_CONF=DIR/slurm.conf.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cmd="${1:-status}"
user="$(id -un)"
dir="${2:-${KD_SLURM_DIR:-/tmp/kd-slurm-$user}}"
port="${KD_SLURM_PORT:-16817}"
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"

say() { echo "local-cluster: $*" >&2; }

install() {
    local missing=()
    for bin in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
        command -v "${bin%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${bin%%:*}" ] || missing+=("${bin#*:}")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing Debian's ${missing[*]}"
    local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

stop() {
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        if running "$pidfile"; then
            kill "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null || true
            for _ in $(seq 50); do running "$pidfile" || break; sleep 0.1; done
            running "$pidfile" && kill -9 "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
}

case "$cmd" in
start)
    install
    PATH="$PATH:/usr/sbin"
    if running "$dir/slurmctld.pid" && running "$dir/slurmd.pid" && sinfo -h >/dev/null 2>&1; then
        say "already running ($conf)"
        echo "export SLURM_CONF=$conf"
        exit 0
    fi
    stop
    mkdir -p "$dir"/{munge,state,spool,log}
    chmod 700 "$dir/munge"
    # munge: a key of our own, a socket of our own.
    [ -s "$dir/munge/munge.key" ] || mungekey --create --keyfile="$dir/munge/munge.key" --force >/dev/null 2>&1 \
        || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 600 "$dir/munge/munge.key"
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    host="$(hostname -s)"
    cpus="$(nproc)"
    mem="$(awk '/MemTotal/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)"
    sed -e "s|@DIR@|$dir|g" -e "s|@HOST@|$host|g" -e "s|@USER@|$user|g" \
        -e "s|@CTLD_PORT@|$port|g" -e "s|@SLURMD_PORT@|$((port + 1))|g" \
        -e "s|@CPUS@|$cpus|g" -e "s|@MEM@|$mem|g" "$here/slurm.conf.in" > "$conf.tmp"
    mv "$conf.tmp" "$conf"
    # Start from a clean controller state: jobs of an earlier run are not ours to resume.
    slurmctld -c -f "$conf"
    slurmd -f "$conf"
    for _ in $(seq 100); do
        state="$(sinfo -h -o %T 2>/dev/null || true)"
        case "$state" in idle*|mixed*|allocated*) break ;; esac
        sleep 0.2
    done
    if ! sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mixed|allocated'; then
        say "the cluster did not come up; last lines of its logs:"
        tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" "$dir/munge/munged.log" >&2 || true
        stop
        exit 1
    fi
    say "up: node $host, $cpus CPUs, partition kd ($conf)"
    echo "export SLURM_CONF=$conf"
    ;;
stop)
    stop
    say "stopped ($dir kept, with the logs)"
    ;;
status)
    if sinfo 2>/dev/null; then exit 0; else say "not running ($conf)"; exit 1; fi
    ;;
*)
    echo "usage: $0 start|stop|status [DIR]" >&2
    exit 2
    ;;
esac
