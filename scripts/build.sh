#!/usr/bin/env bash
# Builds vmlet: the host binaries (vmletd, vmlet, vmlet-bench) and the static
# tether that runs as every guest's init. PROFILE=release for an optimised build.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-dev}

log() { printf 'build: %s\n' "$*" >&2; }

# The tether must be static: it is the guest's PID 1 and the initramfs has no libc.
if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
    log "adding the x86_64-unknown-linux-musl target"
    rustup target add x86_64-unknown-linux-musl >&2
fi
log "tether (static, musl)"
cargo build -q -p vmlet-tether --profile tether --target x86_64-unknown-linux-musl
log "hostile tether for the hostile-guest tests (target/hostile)"
cargo build -q -p vmlet-tether --profile tether --target x86_64-unknown-linux-musl \
    --features hostile --target-dir target/hostile
log "host binaries ($PROFILE)"
cargo build -q --workspace --exclude vmlet-tether --bins --profile "$PROFILE"
