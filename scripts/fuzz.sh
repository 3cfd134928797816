#!/usr/bin/env bash
# Fuzzes every decoder of untrusted bytes for a bounded time: builds the
# cargo-fuzz targets in fuzz/ and runs each for SECONDS (default 30), growing
# its corpus in fuzz/corpus/<target>/ (only the committed seed-* files are
# tracked). Exits non-zero if a target crashes (the input is left in
# fuzz/artifacts/<target>/ and the panic printed) or does not build.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Needs a nightly toolchain and cargo-fuzz; installs both if missing
# (cargo-fuzz from source: about a minute on two cores).
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH=${1:-30}
shift || true
log() { printf 'fuzz: %s\n' "$*" >&2; }

if ! rustup toolchain list | grep -q '^nightly'; then
    log "installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal >&2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz"
    cargo install cargo-fuzz --locked >&2
fi

if [ $# -gt 0 ]; then
    targets=("$@")
else
    targets=(frame_api frame_guest roundtrip logstore)
fi

# -O: optimised; -a: debug assertions (integer overflow checks) on, as in tests.
log "building ${targets[*]}"
cargo +nightly fuzz build --fuzz-dir fuzz -O -a >&2

# Run the built binaries directly: `cargo fuzz run` would rebuild first, and
# in a busy checkout that is minutes per target.
bin_dir=fuzz/target/x86_64-unknown-linux-gnu/release
status=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    out=$(mktemp)
    # -rss_limit_mb: the targets hold at most a few frames; 1 GiB is a leak.
    # -timeout: one input taking 10 s is a hang worth reporting.
    if "$bin_dir/$t" -artifact_prefix="fuzz/artifacts/$t/" \
        -max_total_time="$SECONDS_EACH" -rss_limit_mb=1024 -timeout=10 \
        -print_final_stats=1 "fuzz/corpus/$t" >"$out" 2>&1; then
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -1)
        cov=$(grep -o 'cov: [0-9]*' "$out" | tail -1 || true)
        corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
        log "$t: ok, ${execs:-?} inputs in ${SECONDS_EACH}s, ${cov:-cov: ?}, corpus $corpus files"
    else
        status=1
        log "$t: CRASHED"
        grep -E -A12 'panicked|ERROR: |SUMMARY|Test unit written' "$out" >&2 || tail -40 "$out" >&2
    fi
    rm -f "$out"
done
exit $status
