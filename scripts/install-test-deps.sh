#!/usr/bin/env bash
# Installs the host tools the end-to-end tests drive besides vmlet's own
# (scripts/setup-guest.sh installs those):
#   docker-registry   Debian's Docker registry, run on loopback by tests/tests/pull.rs
#   skopeo            pushes the tests' OCI layouts into it
#   mmdebstrap        builds the Debian image tests/tests/images.rs runs
#                     ($VMLET_DEBIAN_IMAGE, by scripts/make-debian-image.sh)
# Idempotent: installs and builds only what is missing. Needs root for that.
set -euo pipefail

PACKAGES=(docker-registry skopeo mmdebstrap)
DEBIAN_IMAGE=${VMLET_DEBIAN_IMAGE:-/var/cache/vmlet/debian-bookworm.tar}

log() { printf 'install-test-deps: %s\n' "$*" >&2; }

missing=()
for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
build_image() {
    [ -f "$DEBIAN_IMAGE" ] && return 0
    "$(dirname "$0")/make-debian-image.sh" "$DEBIAN_IMAGE"
}
if [ ${#missing[@]} -eq 0 ]; then
    build_image
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    log "error: installing ${missing[*]} needs root"
    exit 1
fi
log "installing ${missing[*]}"
# (The package's own service, if the init system starts it, takes port 5000;
# the tests run their own registry on a free port and do not use it.)
install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}
if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null || ! install; then
    log "apt-get update"
    apt-get update -qq >&2
    install
fi
build_image
