#!/usr/bin/env bash
# Builds a one-layer Debian image, as `docker save` would write it, for
# benchmarks that want a distribution's image rather than busybox (the
# smallest image there is): a `mmdebstrap --variant=minbase` tree of
# Debian 12 (~170 MB, dynamically linked coreutils, bash, apt).
#
#   scripts/make-debian-image.sh [OUT.tar]     # default /var/cache/vmlet/debian-bookworm.tar
#   vmlet image import OUT.tar                 # named debian:bookworm
#
# Needs root (the tree's owners) and Debian's mirror; installs mmdebstrap
# when it is missing. Rebuilding gives another image id: the tree's
# timestamps differ.
set -euo pipefail
OUT=${1:-/var/cache/vmlet/debian-bookworm.tar}
SUITE=${SUITE:-bookworm}
log() { printf 'make-debian-image: %s\n' "$*" >&2; }

if ! command -v mmdebstrap >/dev/null; then
    log "installing mmdebstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mmdebstrap >&2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log "building a minbase $SUITE tree"
# Device nodes are left out, as in published images: a layer may not
# carry them (the runtime makes /dev).
mmdebstrap --variant=minbase --quiet --skip=output/dev "$SUITE" "$work/layer.tar"

mkdir -p "$(dirname "$OUT")"
python3 - "$work/layer.tar" "$SUITE" "$OUT.tmp" <<'PY'
import hashlib, io, json, sys, tarfile
layer, suite, out = sys.argv[1:]
h = hashlib.sha256()
with open(layer, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
config = json.dumps({
    "architecture": "amd64",
    "os": "linux",
    "config": {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": ["bash"],
    },
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + h.hexdigest()]},
}, sort_keys=True).encode()
config_name = hashlib.sha256(config).hexdigest() + ".json"
layer_name = h.hexdigest() + "/layer.tar"
manifest = json.dumps([{
    "Config": config_name,
    "RepoTags": ["debian:" + suite],
    "Layers": [layer_name],
}]).encode()
with tarfile.open(out, "w") as t:
    for name, data in [("manifest.json", manifest), (config_name, config)]:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    t.add(layer, arcname=layer_name)
PY
mv "$OUT.tmp" "$OUT"
log "wrote $OUT ($(du -h "$OUT" | cut -f1)); import with: vmlet image import $OUT"
