#!/usr/bin/env bash
# Prepares a host to run vmlet guests:
#   - installs the host packages vmlet drives (QEMU, vhost-device-vsock, image tools);
#   - creates the system user QEMU runs as (vmlet-vmm, or $VMLET_VMM_USER; in group kvm if any);
#   - fetches Debian's cloud kernel and writes, into ${VMLET_GUEST_DIR:-/var/lib/vmlet/guest}:
#       vmlinux          the PVH ELF QEMU microvm boots (a bzImage will not do)
#       modules/*.ko     the modules the guest needs that the kernel does not build in
#       modules/modules.order   their file names, dependencies first (the tether loads them in order)
#       kernel.release   the kernel's version string, written last: it marks a complete install
#
# Idempotent: when the guest directory is complete and every tool is present it only checks.
# Environment:
#   VMLET_GUEST_DIR       where the guest files go
#   VMLET_KERNEL_PACKAGE  a concrete package to use instead of the newest linux-image-6.1.0-N-cloud-amd64
#   VMLET_GUEST_REFRESH=1 rebuild the guest directory even when it is complete
#   VMLET_VMM_USER        the user QEMU runs as (default vmlet-vmm)
set -euo pipefail

GUEST_DIR=${VMLET_GUEST_DIR:-/var/lib/vmlet/guest}
HOST_PACKAGES=(qemu-system-x86 qemu-utils busybox-static erofs-utils e2fsprogs cpio lz4)
VSOCK_BACKEND_VERSION=0.3.0
VMM_USER=${VMLET_VMM_USER:-vmlet-vmm}

# Modules the guest needs. A name that is built in (modules.builtin) is skipped; the ones
# marked optional are only there to be loaded if this kernel builds them as modules.
# virtio_console carries the host link of template clones (QEMU 7.2 cannot snapshot
# vhost-user-vsock); the tether loads it only in those guests. vsock_loopback carries the
# pool's rehearsal of a start inside the guest (tether/src/rehearsal.rs), which loads it.
REQUIRED_MODULES=(virtio virtio_ring virtio_mmio virtio_blk vsock
    vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport overlay erofs ext4
    virtio_console vsock_loopback)
OPTIONAL_MODULES=(jbd2 mbcache crc16 crc32c_generic libcrc32c)

log() { printf 'setup-guest: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        apt-get update -qq >&2
        APT_UPDATED=1
    fi
}

# apt lists may be missing (fresh machine) or stale: update only when a lookup comes back empty.
apt_lists_empty() { ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; }

need_root() {
    [ "$(id -u)" = 0 ] || die "$1 needs root (run this script as root)"
}

# The packages among the arguments that are not installed.
missing_packages() {
    local p
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            printf '%s\n' "$p"
        fi
    done
}

install_host_packages() {
    local wanted=("${HOST_PACKAGES[@]}" "$@") missing round
    # Twice: apt may remove an installed package to resolve a conflict with
    # one it installs (qemu-utils from bookworm-backports goes when Debian
    # 12's qemu-system-x86 comes in), and the second round brings it back
    # at a matching version.
    for round in 1 2; do
        mapfile -t missing < <(missing_packages "${wanted[@]}")
        [ ${#missing[@]} -eq 0 ] && return 0
        need_root "installing ${missing[*]}"
        log "installing ${missing[*]}"
        if apt_lists_empty; then apt_update_once; fi
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; then
            apt_update_once
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
        fi
    done
    mapfile -t missing < <(missing_packages "${wanted[@]}")
    [ ${#missing[@]} -eq 0 ] || die "still not installed after two rounds of apt-get install: ${missing[*]}"
}

# vhost-device-vsock runs as the unprivileged VMM user, so it must be where every user may run
# it: /usr/local/bin, not root's ~/.cargo/bin (a copy of a build already there will do).
install_vsock_backend() {
    local p
    if [ -x /usr/local/bin/vhost-device-vsock ]; then return 0; fi
    need_root "installing vhost-device-vsock into /usr/local/bin"
    for p in "$(command -v vhost-device-vsock || true)" \
        "${CARGO_HOME:-$HOME/.cargo}/bin/vhost-device-vsock" /usr/local/cargo/bin/vhost-device-vsock; do
        if [ -n "$p" ] && [ -x "$p" ] && "$p" --version 2>/dev/null | grep -qF "$VSOCK_BACKEND_VERSION"; then
            log "installing $p into /usr/local/bin"
            install -m 0755 "$p" /usr/local/bin/vhost-device-vsock
            return 0
        fi
    done
    command -v cargo >/dev/null || die "vhost-device-vsock is missing and cargo is not installed to build it"
    log "cargo install vhost-device-vsock $VSOCK_BACKEND_VERSION (takes a few minutes)"
    cargo install vhost-device-vsock --version "$VSOCK_BACKEND_VERSION" --locked --root /usr/local >&2
}

# QEMU and vhost-device-vsock run as this unprivileged system user (vmletd --vmm-user), in the
# kvm group where there is one (for /dev/kvm). Idempotent.
ensure_vmm_user() {
    if ! getent passwd "$VMM_USER" >/dev/null; then
        need_root "creating the user $VMM_USER"
        log "creating the system user $VMM_USER (QEMU runs as it)"
        useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$VMM_USER"
    fi
    if getent group kvm >/dev/null && ! id -nG "$VMM_USER" | tr ' ' '\n' | grep -qx kvm; then
        need_root "adding $VMM_USER to the kvm group"
        log "adding $VMM_USER to the kvm group"
        usermod -aG kvm "$VMM_USER"
    fi
}

# The module list a guest directory was built for: a directory built for another list
# (an older vmlet) is rebuilt.
wanted_modules() { echo "${REQUIRED_MODULES[*]} ${OPTIONAL_MODULES[*]}"; }

guest_complete() {
    [ -s "$GUEST_DIR/kernel.release" ] && [ -s "$GUEST_DIR/vmlinux" ] &&
        [ -f "$GUEST_DIR/modules/modules.order" ] &&
        [ "$(cat "$GUEST_DIR/modules.wanted" 2>/dev/null)" = "$(wanted_modules)" ]
}

newest_kernel_package() {
    local pkg
    pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64$' |
        awk '{print $1}' | sort -V | tail -n1)
    if [ -z "$pkg" ]; then
        apt_update_once
        pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64$' |
            awk '{print $1}' | sort -V | tail -n1)
    fi
    [ -n "$pkg" ] || die "apt-cache finds no linux-image-6.1.0-*-cloud-amd64 package"
    echo "$pkg"
}

# The bzImage carries the kernel as an LZ4 legacy-format stream; try each occurrence of the
# magic until one decompresses to an ELF (the approach of the kernel's scripts/extract-vmlinux).
extract_vmlinux() {
    local bzimage=$1 out=$2 off
    # shellcheck disable=SC2013 # one offset per line, digits only
    for off in $(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$bzimage" | cut -d: -f1); do
        # lz4 exits non-zero on the bytes that follow the stream; the ELF check is the verdict.
        tail -c "+$((off + 1))" "$bzimage" | lz4 -dc >"$out" 2>/dev/null || true
        if [ "$(head -c 4 "$out" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
            return 0
        fi
    done
    die "no LZ4 stream in $bzimage decompresses to an ELF"
}

read_module() {
    case "$1" in
    *.ko) cat "$1" ;;
    *.ko.xz) xz -dc "$1" ;;
    *.ko.zst) zstd -qdc "$1" ;;
    *.ko.gz) gzip -dc "$1" ;;
    *) die "unknown module format: $1" ;;
    esac
}

# Sets REPLY to the module name of a path: directory and .ko* suffix dropped, '-' read as '_'
# (as the kernel does). A variable, not output: it runs for every module in the package.
mod_name() {
    REPLY=${1##*/}
    REPLY=${REPLY%%.ko*}
    REPLY=${REPLY//-/_}
}

# Writes the resolved modules into $out_dir, dependencies first, and modules.order beside them.
# Dependencies come from the package's modules.dep when it ships one. Debian's package does
# not (depmod writes it at install time), so otherwise they come from each module's .modinfo
# "depends=" field, which modpost computed and depmod would copy; only the modules visited
# are read.
collect_modules() {
    local moddir=$1 out_dir=$2 line p deps m
    declare -A dep_of=() path_of=() builtin=() state=()
    ORDER=()
    while IFS= read -r p; do
        mod_name "$p"
        path_of[$REPLY]=$p
    done < <(cd "$moddir" && find kernel -name '*.ko*' | sort)
    if [ -s "$moddir/modules.dep" ]; then
        while IFS= read -r line; do
            deps=""
            for p in ${line#*:}; do
                mod_name "$p"
                deps+=" $REPLY"
            done
            mod_name "${line%%:*}"
            dep_of[$REPLY]=$deps
        done <"$moddir/modules.dep"
    fi
    if [ -f "$moddir/modules.builtin" ]; then
        while IFS= read -r p; do
            mod_name "$p"
            builtin[$REPLY]=1
        done <"$moddir/modules.builtin"
    fi

    visit() { # depth-first, post-order: every dependency lands before its dependent
        local m=$1 d
        case "${state[$m]:-}" in
        visited) return 0 ;;
        active) die "module dependency cycle through $m" ;;
        esac
        [ -n "${path_of[$m]:-}" ] || die "a module depends on $m, which the package lacks"
        state[$m]=active
        if [ -z "${dep_of[$m]+set}" ]; then
            d=$(read_module "$moddir/${path_of[$m]}" | tr '\0' '\n' |
                LC_ALL=C grep -a -m1 '^depends=' || true)
            d=${d#depends=}
            dep_of[$m]=${d//,/ }
        fi
        for d in ${dep_of[$m]}; do
            mod_name "$d"
            visit "$REPLY"
        done
        state[$m]=visited
        ORDER+=("$m")
    }

    for m in "${REQUIRED_MODULES[@]}" "${OPTIONAL_MODULES[@]}"; do
        if [ -n "${builtin[$m]:-}" ]; then
            log "built in: $m"
        elif [ -n "${path_of[$m]:-}" ]; then
            visit "$m"
        elif [[ " ${REQUIRED_MODULES[*]} " == *" $m "* ]]; then
            die "module $m is neither built in nor shipped by the package"
        fi
    done

    mkdir -p "$out_dir"
    : >"$out_dir/modules.order"
    for m in "${ORDER[@]}"; do
        read_module "$moddir/${path_of[$m]}" >"$out_dir/$m.ko"
        echo "$m.ko" >>"$out_dir/modules.order"
    done
    log "modules (load order): ${ORDER[*]}"
}

build_guest() {
    local pkg tmp kver moddir
    pkg=${VMLET_KERNEL_PACKAGE:-$(newest_kernel_package)}
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/vmlet-guest.XXXXXX")
    # shellcheck disable=SC2064 # expand $tmp now: it is local
    trap "rm -rf '$tmp'" EXIT
    log "downloading $pkg"
    # The download runs as root into a private temp dir: tell apt not to drop to _apt for it.
    (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "$pkg" >&2) || {
        apt_update_once
        (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "$pkg" >&2)
    }
    dpkg-deb -x "$tmp"/*.deb "$tmp/root"

    kver=$(find "$tmp/root/boot" -name 'vmlinuz-*' -printf '%f\n' | head -n1)
    kver=${kver#vmlinuz-}
    if [ -z "$kver" ] || [ ! -d "$tmp/root/lib/modules/$kver" ]; then
        die "$pkg holds no kernel image with its modules"
    fi
    moddir=$tmp/root/lib/modules/$kver
    # Compressed modules need their decompressor.
    if [ -n "$(find "$moddir" -name '*.ko.xz' -print -quit)" ]; then install_host_packages xz-utils; fi
    if [ -n "$(find "$moddir" -name '*.ko.zst' -print -quit)" ]; then install_host_packages zstd; fi

    mkdir -p "$tmp/out"
    extract_vmlinux "$tmp/root/boot/vmlinuz-$kver" "$tmp/out/vmlinux"
    collect_modules "$moddir" "$tmp/out/modules"
    cp "$tmp/root/boot/config-$kver" "$tmp/out/config"
    echo "$kver" >"$tmp/out/kernel.release"
    wanted_modules >"$tmp/out/modules.wanted"

    # Replace the old files; kernel.release goes last so a half-written directory never looks done.
    mkdir -p "$GUEST_DIR"
    rm -f "$GUEST_DIR/kernel.release"
    mv -f "$tmp/out/vmlinux" "$GUEST_DIR/vmlinux"
    mv -f "$tmp/out/config" "$GUEST_DIR/config"
    mv -f "$tmp/out/modules.wanted" "$GUEST_DIR/modules.wanted"
    rm -rf "$GUEST_DIR/modules.old"
    if [ -d "$GUEST_DIR/modules" ]; then mv "$GUEST_DIR/modules" "$GUEST_DIR/modules.old"; fi
    mv "$tmp/out/modules" "$GUEST_DIR/modules"
    rm -rf "$GUEST_DIR/modules.old"
    mv -f "$tmp/out/kernel.release" "$GUEST_DIR/kernel.release"
    log "guest kernel $kver ready in $GUEST_DIR"
}

main() {
    install_host_packages
    install_vsock_backend
    ensure_vmm_user
    if guest_complete && [ "${VMLET_GUEST_REFRESH:-0}" != 1 ]; then
        log "guest kernel $(cat "$GUEST_DIR/kernel.release") already in $GUEST_DIR"
        return 0
    fi
    build_guest
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
