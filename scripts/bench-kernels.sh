#!/usr/bin/env bash
# Boot latency of the two guest kernels in one run: Debian's cloud kernel
# (mode `cold`) against vmlet's tailored one (mode `alt`), each through its
# own private vmletd, starts interleaved batch by batch so load on the shared
# machine falls on both alike. Writes bench/results/<date>-<host>-kernels.*;
# the report's alt/cold ratio is tailored/Debian.
#
#   scripts/bench-kernels.sh                 # N=20 at C=1
#   N=10 C=1,2 scripts/bench-kernels.sh
#
# Needs both kernels: scripts/setup-guest.sh and scripts/build-kernel.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN=${VMLET_GUEST_DIR:-/var/lib/vmlet/guest}
TAILORED=${VMLET_TAILORED_KERNEL_DIR:-/var/lib/vmlet/kernels/tailored}
for d in "$DEBIAN" "$TAILORED"; do
    [ -f "$d/vmlinux" ] || { echo "bench-kernels: no kernel in $d" >&2; exit 1; }
done
N=${N:-20} C=${C:-1} VMLET_GUEST_DIR=$DEBIAN ALT_GUEST_DIR=$TAILORED SUFFIX=-kernels \
    exec scripts/bench.sh --modes cold,alt "$@"
