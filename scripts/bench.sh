#!/usr/bin/env bash
# Boot-latency benchmark: builds vmlet in release, starts a private vmletd
# (own state directory and socket under /tmp), runs vmlet-bench (the
# hand-written baseline and cold starts side by side), writes
# bench/results/<date>-<host>.{md,json,svg}, then stops vmletd and every
# process it or the baseline started.
#
#   scripts/bench.sh [vmlet-bench arguments...]
#   N=10 C=1,2 WARMUP=1 scripts/bench.sh
#
# Defaults are sized for a 2-core TCG machine: ten starts per mode at
# concurrency 1 and 2 take about ten minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-10}
C=${C:-1,2}
WARMUP=${WARMUP:-1}
GUEST_DIR=${VMLET_GUEST_DIR:-/var/lib/vmlet/guest}
log() { printf 'bench: %s\n' "$*" >&2; }

PROFILE=release scripts/build.sh

tmp=$(mktemp -d /tmp/vmlet-bench.XXXXXX)
# QEMU runs as the unprivileged VMM user, which must be able to enter it.
chmod 711 "$tmp"
agent=
cleanup() {
    [ -n "$agent" ] && kill "$agent" 2>/dev/null && wait "$agent" 2>/dev/null || true
    # VMs outlive vmletd by design: kill whatever still names our directory
    # (QEMU, vhost-device-vsock), by pid.
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        [ "$pid" = $$ ] && continue
        if tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF "$tmp"; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$tmp"
}
trap cleanup EXIT

log "starting a private vmletd in $tmp"
target/release/vmletd \
    --state-dir "$tmp/state" \
    --socket "$tmp/api.sock" \
    --guest-dir "$GUEST_DIR" \
    --tether target/x86_64-unknown-linux-musl/tether/tether \
    >"$tmp/vmletd.log" 2>&1 &
agent=$!
for _ in $(seq 600); do
    [ -S "$tmp/api.sock" ] && break
    kill -0 "$agent" 2>/dev/null || { cat "$tmp/vmletd.log" >&2; exit 1; }
    sleep 0.2
done
[ -S "$tmp/api.sock" ] || { log "vmletd did not open its socket"; cat "$tmp/vmletd.log" >&2; exit 1; }

mkdir -p bench/results
out=bench/results/$(date -u +%Y-%m-%d)-$(hostname -s)
log "running vmlet-bench: N=$N C=$C warm-up $WARMUP"
target/release/vmlet-bench \
    --socket "$tmp/api.sock" \
    --state-dir "$tmp/state" \
    --guest-dir "$GUEST_DIR" \
    --agent-pid "$agent" \
    --work-dir "$tmp" \
    -n "$N" --warmup "$WARMUP" -c "$C" \
    --markdown "$out.md" --json "$out.json" --svg "$out.svg" \
    "$@"
cat "$out.md"
log "results in $out.{md,json,svg}"
