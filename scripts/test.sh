#!/usr/bin/env bash
# The test command: installs what the tests need (host packages, both guest
# kernels, the musl target), builds everything, checks formatting and lints,
# then runs every test, end-to-end tests on real QEMU guests included.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-guest.sh
# The tailored kernel is optional for users, not here: build it (about 6
# minutes the first time, a check afterwards) and make its test fail rather
# than skip if it is missing.
scripts/build-kernel.sh
export VMLET_REQUIRE_TAILORED_KERNEL=1
scripts/install-test-deps.sh
scripts/build.sh
cargo fmt --all -- --check
cargo clippy -q --workspace --all-targets -- -D warnings
# The hostile tether (tests only) is behind a feature the line above leaves off.
cargo clippy -q -p vmlet-tether --features hostile --all-targets -- -D warnings
# The API docs build without a broken link (the engine's developers read them).
RUSTDOCFLAGS="-D warnings" cargo doc -q --no-deps --workspace
# Every decoder of untrusted bytes, fuzzed for a bounded time (20 s each;
# installs the nightly toolchain and cargo-fuzz if missing).
scripts/fuzz.sh 20
# TCG guests are CPU-bound: two test threads on two cores keep every boot
# well inside its timeout.
cargo test --workspace --no-fail-fast -- --test-threads="${VMLET_TEST_THREADS:-2}"
# The same lifecycle suites again with every agent keeping a warm pool, so
# pool starts are held to exactly the behaviour of cold ones.
VMLET_TEST_POOL=2 cargo test -p vmlet-tests --no-fail-fast \
    --test run --test lifecycle --test api -- --test-threads="${VMLET_TEST_THREADS:-2}"
# And with pool members that ran a warm-up from the image first (whatever
# it did must not reach the container), on the tailored kernel: the
# configuration the pool's latency promises are measured in.
VMLET_GUEST_DIR=${VMLET_TAILORED_KERNEL_DIR:-/var/lib/vmlet/kernels/tailored} \
    VMLET_TEST_POOL=2 VMLET_TEST_WARMUP='sh -c "echo warm > /warm; sleep 600 &"' \
    cargo test -p vmlet-tests --no-fail-fast \
    --test run --test lifecycle --test api -- --test-threads="${VMLET_TEST_THREADS:-2}"
# And again with every busybox start restored from a template snapshot.
VMLET_TEST_TEMPLATE=1 cargo test -p vmlet-tests --no-fail-fast \
    --test run --test lifecycle --test api -- --test-threads="${VMLET_TEST_THREADS:-2}"
