#!/usr/bin/env bash
# What a pool start makes QEMU translate. Under TCG the first run of any
# guest code is translated first, and that is most of a pool start here
# (docs/pools.md). This runs a private vmletd with a pool of one, its QEMU
# wrapped to log every block it translates (`-d in_asm`), waits for the
# member to be ready, starts one container, and counts the blocks
# translated from the start until the guest is gone: guest kernel, user
# code of position-independent binaries (the tether, static-pie) and of
# fixed-address ones (busybox's), with the kernel functions that had the
# most new blocks.
#
#   scripts/tcg-blocks.sh                       # busybox, echo ready
#   scripts/tcg-blocks.sh -- ls /              # another command (IMAGE= another image)
#   IMAGE=debian:bookworm IMAGE_ARCHIVE=/var/cache/vmlet/debian-bookworm.tar scripts/tcg-blocks.sh
#                                              # an image the agent imports first
#
# Slow (the log of the member's boot alone is ~20 MB); not a latency
# measurement: logging makes every translation slower.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-busybox}
[ "${1:-}" = "--" ] && shift
CMD=("$@")
[ ${#CMD[@]} -eq 0 ] && CMD=(echo ready)

PROFILE=release scripts/build.sh
tmp=$(mktemp -d /tmp/vmlet-tcg-blocks.XXXXXX)
chmod 711 "$tmp"
mkdir -m 1777 "$tmp/log"
cleanup() {
    pkill -f -- "$tmp/state" 2>/dev/null || true
    sleep 1
    rm -rf "$tmp"
}
trap cleanup EXIT
cat >"$tmp/qemu" <<EOF
#!/bin/sh
exec /usr/bin/qemu-system-x86_64 "\$@" -d in_asm -D $tmp/log/qemu.\$\$.log
EOF
chmod 755 "$tmp/qemu"

VMLET_QEMU=$tmp/qemu target/release/vmletd --state-dir "$tmp/state" \
    --socket "$tmp/api.sock" --pool "$IMAGE=1" --cgroup-parent vmlet-tcg-blocks \
    --tether target/x86_64-unknown-linux-musl/tether/tether >"$tmp/agent.log" 2>&1 &
vmlet() { target/release/vmlet --socket "$tmp/api.sock" "$@"; }
if [ -n "${IMAGE_ARCHIVE:-}" ]; then
    for _ in $(seq 1 100); do vmlet ps >/dev/null 2>&1 && break; sleep 0.2; done
    vmlet image import "$IMAGE_ARCHIVE" >/dev/null
fi
for _ in $(seq 1 120); do
    ready=$(vmlet pool 2>/dev/null | awk 'NR==2 {print $3}') || true
    [ "${ready:-0}" = 1 ] && break
    sleep 1
done
[ "${ready:-0}" = 1 ] || { echo "tcg-blocks: the pool never filled; agent log:" >&2; tail "$tmp/agent.log" >&2; exit 1; }
# The member is the only QEMU so far; its log is the one to read.
log=$(ls "$tmp"/log/qemu.*.log)
sleep 2
before=$(stat -c %s "$log")
# A command that fails still made its start: count it anyway.
vmlet run "$IMAGE" -- "${CMD[@]}" || echo "tcg-blocks: the command exited with $?" >&2
sleep 2
tail -c +"$((before + 1))" "$log" >"$tmp/start.log"

python3 - "$tmp/start.log" <<'EOF'
import collections, re, sys
blocks = []  # (first guest address, kernel function or "")
name = None
for line in open(sys.argv[1], errors="replace"):
    if line.startswith("IN:"):
        name = line[3:].strip()
        continue
    m = re.match(r"^0x([0-9a-f]+):", line)
    if m and name is not None:
        blocks.append((int(m.group(1), 16), name))
        name = None
kinds = collections.Counter()
funcs = collections.Counter()
for addr, fn in blocks:
    if addr >= 0xFFFF800000000000:
        kinds["guest kernel"] += 1
        funcs[fn or "?"] += 1
    elif addr < 0x1000000:
        kinds["user, fixed-address binaries (below 16 MiB)"] += 1
    else:
        kinds["user, position-independent (tether, libraries)"] += 1
print(f"blocks translated from the start until the guest was gone: {len(blocks)}")
for k, n in kinds.most_common():
    print(f"  {n:6d}  {k}")
print("kernel functions with the most new blocks:")
for f, n in funcs.most_common(15):
    print(f"  {n:6d}  {f}")
EOF
