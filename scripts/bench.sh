#!/usr/bin/env bash
# Boot-latency benchmark: builds vmlet in release, starts a private vmletd
# (own state directory and socket under /tmp), runs vmlet-bench (the
# hand-written baseline and cold starts side by side), writes
# bench/results/<date>-<host>.{md,json,svg}, then stops vmletd and every
# process it or the baseline started.
#
#   scripts/bench.sh [vmlet-bench arguments...]
#   N=10 C=1,2 WARMUP=1 scripts/bench.sh
#   ALT_GUEST_DIR=/var/lib/vmlet/kernels/tailored scripts/bench.sh --modes cold,alt
#
# With ALT_GUEST_DIR a second private vmletd boots that kernel, and mode
# `alt` starts through it: an A/B of two guest kernels in one run
# (scripts/bench-kernels.sh does exactly that). SUFFIX is appended to the
# result file names.
#
# Defaults are sized for a 2-core TCG machine: ten starts per mode at
# concurrency 1 and 2 take about ten minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-10}
C=${C:-1,2}
WARMUP=${WARMUP:-1}
GUEST_DIR=${VMLET_GUEST_DIR:-/var/lib/vmlet/guest}
ALT_GUEST_DIR=${ALT_GUEST_DIR:-}
SUFFIX=${SUFFIX:-}
log() { printf 'bench: %s\n' "$*" >&2; }

PROFILE=release scripts/build.sh

tmp=$(mktemp -d /tmp/vmlet-bench.XXXXXX)
agent=
alt_agent=
cleanup() {
    for p in $agent $alt_agent; do
        kill "$p" 2>/dev/null && wait "$p" 2>/dev/null || true
    done
    # VMs outlive vmletd by design: kill whatever still names our directory
    # (QEMU, vhost-device-vsock), by pid.
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        [ "$pid" = $$ ] && continue
        # (2>/dev/null first: a process may exit before its cmdline is opened)
        if tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -qF "$tmp"; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$tmp"
}
trap cleanup EXIT

# start_agent NAME GUEST_DIR: a vmletd on $tmp/NAME.sock with state in
# $tmp/NAME; sets STARTED to its pid.
start_agent() {
    local name=$1 dir=$2 sock=$tmp/$1.sock
    log "starting a private vmletd ($name, kernel $dir) in $tmp"
    target/release/vmletd \
        --state-dir "$tmp/$name" \
        --socket "$sock" \
        --guest-dir "$dir" \
        --tether target/x86_64-unknown-linux-musl/tether/tether \
        >"$tmp/$name.log" 2>&1 &
    STARTED=$!
    for _ in $(seq 600); do
        [ -S "$sock" ] && return 0
        kill -0 "$STARTED" 2>/dev/null || { cat "$tmp/$name.log" >&2; exit 1; }
        sleep 0.2
    done
    log "vmletd ($name) did not open its socket"
    cat "$tmp/$name.log" >&2
    exit 1
}

start_agent state "$GUEST_DIR"
agent=$STARTED
alt_args=()
if [ -n "$ALT_GUEST_DIR" ]; then
    start_agent alt "$ALT_GUEST_DIR"
    alt_agent=$STARTED
    alt_args=(--alt-socket "$tmp/alt.sock")
fi

mkdir -p bench/results
out=bench/results/$(date -u +%Y-%m-%d)-$(hostname -s)$SUFFIX
log "running vmlet-bench: N=$N C=$C warm-up $WARMUP"
target/release/vmlet-bench \
    --socket "$tmp/state.sock" \
    --state-dir "$tmp/state" \
    --guest-dir "$GUEST_DIR" \
    --agent-pid "$agent" \
    --work-dir "$tmp" \
    -n "$N" --warmup "$WARMUP" -c "$C" \
    --markdown "$out.md" --json "$out.json" --svg "$out.svg" \
    "${alt_args[@]}" "$@"
cat "$out.md"
log "results in $out.{md,json,svg}"
