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
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap >&2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log "building a minbase $SUITE tree"
# Device nodes are left out, as in published images: a layer may not
# carry them (the runtime makes /dev).
mmdebstrap --variant=minbase --quiet --skip=output/dev "$SUITE" "$work/layer.tar"

python3 - "$work" "$SUITE" <<'PY'
import hashlib, json, os, sys
work, suite = sys.argv[1], sys.argv[2]
h = hashlib.sha256()
with open(os.path.join(work, "layer.tar"), "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
diff_id = "sha256:" + h.hexdigest()
config = {
    "architecture": "amd64",
    "os": "linux",
    "config": {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": ["bash"],
    },
    "rootfs": {"type": "layers", "diff_ids": [diff_id]},
}
cfg = json.dumps(config, sort_keys=True).encode()
cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
with open(os.path.join(work, cfg_name), "wb") as f:
    f.write(cfg)
layer_dir = os.path.join(work, h.hexdigest())
os.mkdir(layer_dir)
os.rename(os.path.join(work, "layer.tar"), os.path.join(layer_dir, "layer.tar"))
manifest = [{
    "Config": cfg_name,
    "RepoTags": ["debian:" + suite],
    "Layers": [h.hexdigest() + "/layer.tar"],
}]
with open(os.path.join(work, "manifest.json"), "w") as f:
    json.dump(manifest, f)
PY

mkdir -p "$(dirname "$OUT")"
tar -C "$work" -cf "$OUT.tmp" manifest.json "$(cd "$work" && ls ./*.json | grep -v manifest | sed 's|^\./||')" \
    "$(cd "$work" && find . -name layer.tar | sed 's|^\./||')"
mv "$OUT.tmp" "$OUT"
log "wrote $OUT ($(du -h "$OUT" | cut -f1)); import with: vmlet image import $OUT"
