#!/usr/bin/env bash
# Start-latency benchmark: builds vmlet in release and runs vmlet-bench,
# which starts its own private vmletd per mode (state and sockets under a
# fresh /tmp directory) and measures every mode side by side: the
# hand-written baseline, cold, pre-staged, pool (plain and with a warm-up)
# and template starts. Writes
# bench/results/<date>-<host>.{md,json,svg}; kills every process that names
# its directory when it ends.
#
#   scripts/bench.sh [vmlet-bench arguments...]
#   N=10 C=1,2 WARMUP=1 scripts/bench.sh --modes baseline,cold,pool
#   OUT=bench/results/mine scripts/bench.sh
#
# Defaults are sized for a 2-core TCG machine: ten starts per mode at
# concurrency 1 and 2 take about a quarter of an hour.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-10}
C=${C:-1,2}
WARMUP=${WARMUP:-1}
# The kernel vmletd itself boots by default: the tailored one where
# scripts/build-kernel.sh installed it, else Debian's. The baseline boots
# the same kernel, so every ratio compares like with like.
TAILORED=${VMLET_TAILORED_KERNEL_DIR:-/var/lib/vmlet/kernels/tailored}
if [ -z "${VMLET_GUEST_DIR:-}" ] && [ -f "$TAILORED/vmlinux" ] && [ -f "$TAILORED/kernel.release" ]; then
    GUEST_DIR=$TAILORED
else
    GUEST_DIR=${VMLET_GUEST_DIR:-/var/lib/vmlet/guest}
fi
log() { printf 'bench: %s\n' "$*" >&2; }

PROFILE=release scripts/build.sh

tmp=$(mktemp -d /tmp/vmlet-bench.XXXXXX)
# QEMU runs as the unprivileged VMM user, which must be able to enter it.
chmod 711 "$tmp"
cleanup() {
    # vmlet-bench ends its agents and their VMs itself; this is the
    # backstop for a run that was killed: whatever still names our
    # directory (vmletd, QEMU, vhost-device-vsock), by pid.
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        [ "$pid" = $$ ] && continue
        if { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -qF "$tmp"; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$tmp"
    # The agents' cgroup parents (one per agent, named after $tmp), empty by
    # now: rmdir refuses any that still holds a process.
    find /sys/fs/cgroup -mindepth 1 -maxdepth 6 -type d \
        -name "vmlet-bench-${tmp##*/}-*" -depth -exec rmdir {} + 2>/dev/null || true
}
trap cleanup EXIT

mkdir -p bench/results
out=${OUT:-bench/results/$(date -u +%Y-%m-%d)-$(hostname -s)}
log "running vmlet-bench: N=$N C=$C warm-up $WARMUP; kernel $GUEST_DIR; load: $(cut -d' ' -f1-3 /proc/loadavg)"
target/release/vmlet-bench \
    --vmletd target/release/vmletd \
    --tether target/x86_64-unknown-linux-musl/tether/tether \
    --guest-dir "$GUEST_DIR" \
    --work-dir "$tmp" \
    -n "$N" --warmup "$WARMUP" -c "$C" \
    --markdown "$out.md" --json "$out.json" --svg "$out.svg" \
    "$@"
cat "$out.md"
log "results in $out.{md,json,svg}"
