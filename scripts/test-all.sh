#!/usr/bin/env bash
# The whole test suite, as README.md names it and .ci/run runs it:
#   formatting and lints (shellcheck over every shell script too), the release
#   binary and the Debian package made from it, every unit and integration test
#   of the workspace (real NBD clients, fault injection, crash tests), the QEMU
#   guest scenarios and the package test (tests/vm/run-all.sh, two at a time),
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

step "shellcheck (scripts/shellcheck.sh: every tracked *.sh and shell-shebang file)"
scripts/shellcheck.sh

step "cargo build --release (the binary the VM boots carry in their initramfs)"
cargo build --release

step "Debian package (scripts/build-deb.sh; the VM scenarios install it)"
DEB=$(scripts/build-deb.sh --bin target/release/livemirror | tail -n 1)
echo "$DEB"

step "cargo test --workspace (unit, integration, interop, faults)"
cargo test --workspace --no-fail-fast
t_cargo=$(date +%s)

step "VM scenarios (tests/vm/run-all.sh, ${LIVEMIRROR_VM_JOBS:=2} at a time)"
LIVEMIRROR_BIN="$PWD/target/release/livemirror" LIVEMIRROR_DEB=$DEB LIVEMIRROR_VM_JOBS=$LIVEMIRROR_VM_JOBS tests/vm/run-all.sh
t_vm=$(date +%s)

step "fuzz targets (${LIVEMIRROR_FUZZ_SECONDS:-60} s each)"
scripts/fuzz.sh "${LIVEMIRROR_FUZZ_SECONDS:-60}"

t_end=$(date +%s)
step "all tests passed in $((t_end - t0)) s (to the end of cargo test $((t_cargo - t0)) s, VM scenarios $((t_vm - t_cargo)) s, fuzzing $((t_end - t_vm)) s)"
