#!/usr/bin/env bash
# Dev-only end-to-end check of the tether: boots the real guest kernel in QEMU microvm (TCG)
# with the static tether as /init, a busybox root filesystem as the only layer, and
# vhost-device-vsock in front of examples/host.rs, then runs a few scenarios.
#
#   tether/scripts/boot-test.sh [scenario...]     (default: all)
#
# Environment: VMLET_GUEST_DIR (vmlinux + modules/, from scripts/setup-guest.sh),
# WORK (scratch dir, default /tmp/vmlet-tether-boot), QUIET=0 for a verbose kernel console.
# Every QEMU and vhost-device-vsock it starts is killed on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
GUEST=${VMLET_GUEST_DIR:-/var/lib/vmlet/guest}
WORK=${WORK:-/tmp/vmlet-tether-boot}
QUIET=${QUIET:-1}
TARGET=x86_64-unknown-linux-musl
TETHER=$ROOT/target/$TARGET/tether/tether
HOST=$ROOT/target/debug/examples/host
VHOST=$(command -v vhost-device-vsock || echo "$HOME/.cargo/bin/vhost-device-vsock")

log() { printf '== %s\n' "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

if [ ! -s "$GUEST/vmlinux" ] || [ ! -f "$GUEST/modules/modules.order" ]; then
    die "no guest kernel in $GUEST (run scripts/setup-guest.sh)"
fi

PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

build() {
    log "building the tether ($TARGET) and the host example"
    (cd "$ROOT" && cargo build -q -p vmlet-tether --profile tether --target "$TARGET" &&
        cargo build -q -p vmlet-tether --example host)
    log "tether: $(stat -c %s "$TETHER") bytes"
}

images() {
    rm -rf "$WORK/initrd" "$WORK/rootfs"
    mkdir -p "$WORK/initrd/lib/modules" "$WORK/rootfs/bin"
    cp "$TETHER" "$WORK/initrd/init"
    cp "$GUEST"/modules/*.ko "$GUEST/modules/modules.order" "$WORK/initrd/lib/modules/"
    (cd "$WORK/initrd" && find . | cpio -o -H newc --quiet) >"$WORK/initrd.cpio"
    # Only bin/: proc, sys, dev and the working directory are the tether's to create.
    cp /bin/busybox "$WORK/rootfs/bin/busybox"
    local a
    for a in $(/bin/busybox --list); do
        [ "$a" = busybox ] || ln -sf busybox "$WORK/rootfs/bin/$a"
    done
    printf 'not a program\n' >"$WORK/rootfs/bin/not-executable"
    chmod 644 "$WORK/rootfs/bin/not-executable"
    rm -f "$WORK/rootfs.ext4" "$WORK/rw.ext4"
    mkfs.ext4 -q -F -d "$WORK/rootfs" -L layer0 "$WORK/rootfs.ext4" 16M
    mkfs.ext4 -q -F "$WORK/rw.ext4" 64M
    log "initrd $(stat -c %s "$WORK/initrd.cpio") bytes, rootfs.ext4 16 MiB"
}

# run_vm NAME EXPECTED_RC [qemu args...] -- [host args...]
# Boots one VM, runs the host example against it, checks its exit code and that QEMU
# ends by itself after the exit was acknowledged.
run_vm() {
    local name=$1 want=$2 d=$WORK/$1 qemu_extra=() cmdline
    shift 2
    while [ $# -gt 0 ] && [ "$1" != -- ]; do qemu_extra+=("$1"); shift; done
    shift
    rm -rf "$d"
    mkdir -p "$d"
    cmdline="console=ttyS0 tsc_early_khz=2000000 lpj=4000000 no_timer_check panic=-1 reboot=t"
    [ "$QUIET" = 1 ] && cmdline+=" quiet"

    "$VHOST" --guest-cid 3 --socket "$d/vhost.sock" --uds-path "$d/vm.vsock" >"$d/vhost.log" 2>&1 &
    local vhost=$!
    PIDS+=("$vhost")
    "$HOST" --listen "$d/vm.vsock_1024" "$@" >"$d/host.log" 2>&1 &
    local host=$!
    PIDS+=("$host")
    for _ in $(seq 100); do [ -S "$d/vhost.sock" ] && [ -S "$d/vm.vsock_1024" ] && break; sleep 0.05; done

    local t0
    t0=$(date +%s%N)
    qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=on,pit=on,pic=on,memory-backend=mem \
        -accel tcg -cpu max -m 256 -object memory-backend-memfd,id=mem,size=256M,share=on \
        -nodefaults -no-user-config -no-reboot -display none -serial "file:$d/console.log" \
        -kernel "$GUEST/vmlinux" -initrd "$WORK/initrd.cpio" -append "$cmdline" \
        -drive id=d0,file="$WORK/rootfs.ext4",format=raw,if=none,readonly=on \
        -device virtio-blk-device,drive=d0,serial=layer0 \
        "${qemu_extra[@]}" \
        -chardev socket,id=vs0,path="$d/vhost.sock" -device vhost-user-vsock-device,chardev=vs0 \
        >"$d/qemu.log" 2>&1 &
    local qemu=$!
    PIDS+=("$qemu")

    local rc=0
    wait "$host" || rc=$?
    local t_host
    t_host=$(date +%s%N)
    local gone=0
    for _ in $(seq 200); do
        if ! kill -0 "$qemu" 2>/dev/null; then gone=1; break; fi
        sleep 0.05
    done
    local t_qemu
    t_qemu=$(date +%s%N)
    kill "$qemu" "$vhost" 2>/dev/null || true
    wait "$qemu" 2>/dev/null || true
    wait "$vhost" 2>/dev/null || true

    sed 's/^/   host| /' "$d/host.log" >&2
    grep -a 'tether\[' "$d/console.log" | sed 's/^/   cons| /' >&2 || true
    [ "$gone" = 1 ] || die "$name: QEMU still running 10 s after the host finished"
    log "$name: host done $(((t_host - t0) / 1000000)) ms after QEMU start; QEMU gone $(((t_qemu - t_host) / 1000000)) ms later"
    [ "$rc" = "$want" ] || die "$name: host example exited $rc, expected $want"
    log "$name: ok"
}

expect() { # expect NAME PATTERN: a line of the scenario's host log matches
    grep -qE -- "$2" "$WORK/$1/host.log" || die "$1: no line matching /$2/ in the host log"
}

scenario_exit() {
    run_vm exit 7 -- -- sh -c 'echo out; echo err >&2; exit 7'
    expect exit '\] Stdout "out\\n"$'
    expect exit '\] Stderr "err\\n"$'
    expect exit 'Exited \{ code: Some\(7\), signal: None \}'
    expect exit 'Hello \{ version: 1, boot: GuestBoot \{ kernel_us: [0-9]+, modules_us: [0-9]+, hello_us: [0-9]+'
}

scenario_cat() {
    run_vm cat 0 -- --stdin hello --stdin 'second line' -- cat
    expect cat 'summary: stdout=18 bytes stderr=0 bytes code=Some\(0\)'
}

scenario_notfound() {
    run_vm notfound 127 -- -- no-such-command
    # shellcheck disable=SC2016 # a literal $PATH
    expect notfound 'Failed \{ message: "no-such-command: executable file not found in \$PATH", code: 127 \}'
}

scenario_notexec() {
    run_vm notexec 126 -- -- not-executable
    expect notexec 'Failed \{ message: "/bin/not-executable: permission denied", code: 126 \}'
}

scenario_nodisk() {
    run_vm nodisk 125 -- --layer missing:ext4 -- sh
    expect nodisk 'Failed \{ message: "no disk with serial \\"missing\\" appeared within 5s", code: 125 \}'
}

# The main process exits while a background child still holds stdout: the tether kills
# the leftovers, so output ends and the exit is reported at once.
scenario_orphans() {
    run_vm orphans 3 -- -- sh -c 'sleep 1000 & echo bg; exit 3'
    expect orphans 'Exited \{ code: Some\(3\), signal: None \}'
}

scenario_signal() {
    run_vm signal 143 -- --signal 15 -- sh -c 'echo ready; exec sleep 1000'
    expect signal 'Exited \{ code: None, signal: Some\(15\) \}'
}

scenario_bulk() {
    run_vm bulk 0 -- -- sh -c 'yes 0123456789abcdef | head -c 4000000; echo done >&2'
    expect bulk 'summary: stdout=4000000 bytes stderr=5 bytes code=Some\(0\)'
}

scenario_writable() {
    run_vm writable 0 -drive id=d1,file="$WORK/rw.ext4",format=raw,if=none \
        -device virtio-blk-device,drive=d1,serial=rw0 -- \
        --writable rw0:ext4 --workdir /srv/app --hostname box1 -- \
        sh -c 'echo kept > note; cat /srv/app/note; hostname; pwd; echo "$$"; ls /proc/1/exe >/dev/null && echo proc'
    local line
    for line in kept box1 /srv/app proc; do expect writable "Stdout \"$line\\\\n\""; done
}

scenario_reconnect() {
    run_vm reconnect 0 -- --drop-after-started -- sh -c 'sleep 2; echo after the reconnect'
    expect reconnect 're-hello after reconnect'
    expect reconnect 'Stdout "after the reconnect\\n"'
}

# The host hangs up mid-stream of a few MB, having read ~300 KB more than it stored (as an
# agent that dies before storing what it received), accepts the redial and resumes from
# what it stored: the tether must resend, and the stream arrive whole, once, in order.
scenario_resume() {
    local d=$WORK/resume
    run_vm resume 0 -- --drop-after-bytes 1000000 \
        --stdout-file "$d/stdout" --stderr-file "$d/stderr" -- \
        sh -c 'head -c 3000000 /dev/urandom >/blob && md5sum </blob >&2 && cat /blob'
    expect resume 'dropping the connection mid-stream with stdout=[0-9]+ stderr=36 stored, [1-9][0-9]* more bytes'
    grep -qE 'resending [1-9][0-9]* \+ 0 bytes' "$d/console.log" ||
        die "resume: the tether resent nothing (no line 'resending N + 0 bytes' on its console)"
    expect resume 're-hello after reconnect: Resume from stdout=[0-9]+ stderr=36'
    expect resume 'summary: stdout=3000000 bytes stderr=36 bytes code=Some\(0\)'
    local want got
    want=$(cut -d' ' -f1 "$d/stderr")
    got=$(md5sum <"$d/stdout" | cut -d' ' -f1)
    [ "$want" = "$got" ] || die "resume: the host stored md5 $got, the guest wrote $want"
    log "resume: md5 $got matches what the guest wrote"
}

ALL=(exit cat notfound notexec nodisk orphans signal bulk writable reconnect resume)
build
images
for s in "${@:-${ALL[@]}}"; do
    log "scenario $s"
    "scenario_$s"
done
log "all passed"
