#!/usr/bin/env bash
# Optional setup step: builds vmlet's tailored guest kernel from Debian's
# linux-source-6.1, guest/kernel/vmlet.config and the patches in
# guest/kernel/patches/ (applied in name order), and installs it where
# vmletd prefers it over Debian's cloud kernel:
#
#   ${VMLET_KERNELS_DIR:-/var/lib/vmlet/kernels}/
#     tailored -> tailored-<hash>       the one vmletd finds (a symlink, swapped atomically)
#     tailored-<hash>/vmlinux           the PVH ELF QEMU microvm boots
#     tailored-<hash>/config            its .config (vmletd reads CONFIG_ACPI etc. from it)
#     tailored-<hash>/kernel.release    e.g. 6.1.192-vmlet, written last: marks a complete build
#     tailored-<hash>/inputs.sha256     <hash>: of the fragment, the patches, the source
#                                       package version and this recipe
#
# The kernel config is `make tinyconfig` plus the fragment, then `make
# olddefconfig`; the build fails if any line of the fragment did not survive
# (a dependency the fragment lacks). Everything is built in: no modules, no
# PCI, no ACPI (QEMU passes the virtio-mmio devices on the command line).
#
# Idempotent: when the installed kernel was built from the same inputs it only
# says so. The build tree stays in ${VMLET_KERNEL_BUILD_DIR:-/var/cache/vmlet/kernel-build}
# so a changed fragment rebuilds only what changed; delete it to reclaim ~1.5 GB.
# A full build takes about 6-10 minutes on 2 cores.
#
# Environment:
#   VMLET_KERNELS_DIR          where kernels are installed
#   VMLET_KERNEL_BUILD_DIR     where the source is unpacked and built
#   VMLET_KERNEL_REBUILD=1     build and install even when the inputs match
set -euo pipefail
cd "$(dirname "$0")/.."

KERNELS_DIR=${VMLET_KERNELS_DIR:-/var/lib/vmlet/kernels}
BUILD_DIR=${VMLET_KERNEL_BUILD_DIR:-/var/cache/vmlet/kernel-build}
FRAGMENT=$PWD/guest/kernel/vmlet.config
PATCHES_DIR=$PWD/guest/kernel/patches
SOURCE_PACKAGE=linux-source-6.1
BUILD_PACKAGES=("$SOURCE_PACKAGE" build-essential bc bison flex libelf-dev xz-utils patch)
# Bump when the recipe below changes what gets built, so installed kernels are rebuilt.
RECIPE=2

log() { printf 'build-kernel: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

install_packages() {
    local missing=() p
    for p in "${BUILD_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$p")
        fi
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "installing ${missing[*]} needs root"
    log "installing ${missing[*]}"
    local install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}")
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null || ! "${install[@]}" >&2; then
        log "apt-get update"
        apt-get update -qq >&2
        "${install[@]}" >&2
    fi
}

# The hash that names a build: what goes in decides what comes out.
inputs_hash() {
    {
        echo "recipe $RECIPE"
        echo "source $SOURCE_PACKAGE $(dpkg-query -W -f='${Version}' "$SOURCE_PACKAGE")"
        cat "$FRAGMENT"
        patches_hash
    } | sha256sum | cut -c1-16
}

patches() {
    compgen -G "$PATCHES_DIR/*.patch" | LC_ALL=C sort || true
}

# Names and contents of the patches, in the order they are applied.
patches_hash() {
    local p
    for p in $(patches); do
        echo "patch $(basename "$p")"
        cat "$p"
    done | sha256sum | cut -c1-16
}

# Unpacks the source and applies the patches once per package version and
# patch set (the tarball's top directory is linux-source-6.1 whatever the
# version, so the version is kept beside it). A changed patch set starts from
# a fresh tree and an empty build directory: the tarball's old mtimes on a file
# a patch no longer touches would leave make's objects of the patched file.
unpack_source() {
    local version tarball src=$BUILD_DIR/src p
    version="$(dpkg-query -W -f='${Version}' "$SOURCE_PACKAGE") patches $(patches_hash)"
    if [ -f "$src/.vmlet-source-version" ] && [ "$(cat "$src/.vmlet-source-version")" = "$version" ]; then
        return 0
    fi
    tarball=$(dpkg -L "$SOURCE_PACKAGE" | grep -E '/linux-source-[0-9.]+\.tar\.(xz|bz2|gz)$' | head -n1)
    [ -n "$tarball" ] && [ -f "$tarball" ] || die "$SOURCE_PACKAGE installed no source tarball"
    log "unpacking $tarball ($version)"
    rm -rf "$src" "$BUILD_DIR/out"
    mkdir -p "$src"
    tar -xaf "$tarball" -C "$src" --strip-components=1
    for p in $(patches); do
        log "applying $(basename "$p")"
        patch -d "$src" -p1 --batch --forward --quiet <"$p" || die "$p does not apply to $SOURCE_PACKAGE $version"
    done
    echo "$version" >"$src/.vmlet-source-version"
}

# Every line of the fragment must hold in the final .config: "CONFIG_X=v"
# literally, "# CONFIG_X is not set" as no CONFIG_X= line at all.
check_config() {
    local config=$1 line name bad=0
    while IFS= read -r line; do
        case "$line" in
        CONFIG_*=*)
            if ! grep -qxF -- "$line" "$config"; then
                name=${line%%=*}
                log "did not stick: $line (got: $(grep -E "^(# )?$name[= ]" "$config" || echo unset))"
                bad=1
            fi
            ;;
        "# CONFIG_"*" is not set")
            name=${line#\# }
            name=${name%% *}
            if grep -q "^$name=" "$config"; then
                log "did not stick: $line (got: $(grep "^$name=" "$config"))"
                bad=1
            fi
            ;;
        esac
    done <"$FRAGMENT"
    [ "$bad" = 0 ] || die "the kernel config lacks options of $FRAGMENT (a dependency is missing from it)"
}

# QEMU microvm boots vmlinux through its PVH entry point, an ELF note of type
# XEN_ELFNOTE_PHYS32_ENTRY (18) owned by "Xen".
check_pvh() {
    readelf -n "$1" | grep -A1 -E '^ +Xen ' | grep -qE '0x00000012|PHYS32_ENTRY' ||
        die "$1 has no PVH entry note; QEMU microvm cannot boot it"
}

build() {
    local hash=$1 src=$BUILD_DIR/src out=$BUILD_DIR/out jobs start
    jobs=$(nproc)
    mkdir -p "$out"
    log "configuring: tinyconfig + $FRAGMENT"
    make -s -C "$src" O="$out" tinyconfig >/dev/null
    # -m: merge only; olddefconfig below resolves the dependencies.
    (cd "$out" && "$src/scripts/kconfig/merge_config.sh" -m -O "$out" "$out/.config" "$FRAGMENT" >/dev/null)
    make -s -C "$src" O="$out" olddefconfig >/dev/null
    check_config "$out/.config"
    start=$(date +%s)
    log "building vmlinux with -j$jobs (several minutes)"
    make -s -C "$src" O="$out" -j"$jobs" vmlinux >&2
    log "built in $(($(date +%s) - start)) s"
    check_pvh "$out/vmlinux"
    install_kernel "$hash" "$out" "$(make -s -C "$src" O="$out" kernelrelease)"
}

# Writes tailored-<hash> beside the current one, then swaps the symlink in one
# rename: a reader sees the old kernel or the new one, never half of either.
install_kernel() {
    local hash=$1 out=$2 release=$3 dir tmp old
    dir=$KERNELS_DIR/tailored-$hash
    mkdir -p "$KERNELS_DIR"
    tmp=$(mktemp -d "$KERNELS_DIR/.tailored.XXXXXX")
    cp "$out/vmlinux" "$tmp/vmlinux"
    cp "$out/.config" "$tmp/config"
    echo "$hash" >"$tmp/inputs.sha256"
    echo "$release" >"$tmp/kernel.release"
    chmod 755 "$tmp"
    rm -rf "$dir"
    mv "$tmp" "$dir"
    old=$(readlink "$KERNELS_DIR/tailored" 2>/dev/null || true)
    ln -sfn "tailored-$hash" "$KERNELS_DIR/.tailored.link"
    mv -T "$KERNELS_DIR/.tailored.link" "$KERNELS_DIR/tailored"
    if [ -n "$old" ] && [ "$old" != "tailored-$hash" ]; then rm -rf "${KERNELS_DIR:?}/$old"; fi
    log "tailored kernel $release installed in $KERNELS_DIR/tailored ($dir)"
}

installed_hash() {
    local d=$KERNELS_DIR/tailored
    [ -s "$d/kernel.release" ] && [ -s "$d/vmlinux" ] && cat "$d/inputs.sha256" 2>/dev/null
}

main() {
    [ -f "$FRAGMENT" ] || die "no $FRAGMENT"
    install_packages
    # One build at a time: two runs (two checkouts testing on one host) would
    # otherwise configure and build in the same tree at once. The second waits,
    # then finds the kernel built or builds its own inputs.
    mkdir -p "$BUILD_DIR"
    exec 9>"$BUILD_DIR/.lock"
    if ! flock -n 9; then
        log "another build holds $BUILD_DIR/.lock; waiting"
        flock 9
    fi
    local hash
    hash=$(inputs_hash)
    if [ "$(installed_hash || true)" = "$hash" ] && [ "${VMLET_KERNEL_REBUILD:-0}" != 1 ]; then
        log "tailored kernel $(cat "$KERNELS_DIR/tailored/kernel.release") already built from these inputs ($hash)"
        return 0
    fi
    unpack_source
    build "$hash"
}

main "$@"
