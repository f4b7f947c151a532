#!/usr/bin/env bash
# The whole test suite, as README.md names it and .ci/run runs it:
#   formatting and lints, every unit and integration test of the workspace
#   (real NBD clients, fault injection, crash tests, the QEMU guest boots),
#   and each fuzz target for a bounded time.
# Prerequisites (packages, nightly toolchain, cargo-fuzz) are installed by
# .ci/run; run that once on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
t0=$(date +%s)

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo build --release (the binary the VM boots carry in their initramfs)"
cargo build --release

step "cargo test --workspace (unit, integration, interop, faults, VM boots)"
LIVEMIRROR_VM_BIN="$PWD/target/release/livemirror" cargo test --workspace --no-fail-fast

step "fuzz targets (${LIVEMIRROR_FUZZ_SECONDS:-60} s each)"
scripts/fuzz.sh "${LIVEMIRROR_FUZZ_SECONDS:-60}"

step "all tests passed in $(( $(date +%s) - t0 )) s"
