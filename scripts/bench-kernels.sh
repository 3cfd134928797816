#!/usr/bin/env bash
# Boot latency of the two guest kernels: Debian's cloud kernel against
# vmlet's tailored one, each measured by vmlet-bench's cold mode (a private
# vmletd booting that kernel). The two runs follow each other, so compare
# them on a quiet machine. Writes bench/results/<date>-<host>-kernel-{debian,tailored}.*
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
base=bench/results/$(date -u +%Y-%m-%d)-$(hostname -s)-kernel
export N=${N:-20} C=${C:-1}
VMLET_GUEST_DIR=$DEBIAN OUT=$base-debian scripts/bench.sh --modes cold "$@"
VMLET_GUEST_DIR=$TAILORED OUT=$base-tailored scripts/bench.sh --modes cold "$@"
