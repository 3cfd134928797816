#!/usr/bin/env bash
# Sets up a fresh Debian machine for vmlet and runs a first containerVM:
# installs QEMU, the vsock backend and the guest kernel, builds vmlet, starts
# vmletd in the background and runs `vmlet run --rm busybox -- echo ...`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-guest.sh
PROFILE=release scripts/build.sh

SOCKET=${VMLET_SOCKET:-/run/vmlet/vmlet.sock}
STATE=${VMLET_STATE_DIR:-/var/lib/vmlet/state}
export VMLET_SOCKET=$SOCKET
if ! target/release/vmlet version >/dev/null 2>&1; then
    mkdir -p "$(dirname "$SOCKET")" "$STATE"
    echo "setup: starting vmletd (log: $STATE/vmletd.log)" >&2
    nohup target/release/vmletd --state-dir "$STATE" --socket "$SOCKET" \
        >>"$STATE/vmletd.log" 2>&1 </dev/null &
    for _ in $(seq 1 600); do
        [ -S "$SOCKET" ] && break
        sleep 0.1
    done
fi
target/release/vmlet version
echo "setup: running a first containerVM" >&2
target/release/vmlet run --rm busybox -- sh -c 'echo "hello from a containerVM: $(uname -sr)"'
