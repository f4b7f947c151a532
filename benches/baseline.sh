#!/usr/bin/env bash
# Saves or compares criterion baselines.
#   benches/baseline.sh save [NAME]      run every criterion bench and keep the
#                                        results as baseline NAME (default main)
#   benches/baseline.sh compare [NAME]   run them again and print the change
#                                        against baseline NAME
# Criterion keeps baselines under target/criterion/*/NAME; this script copies
# them to benches/baselines/NAME so they survive `cargo clean` and can be
# committed, and restores them before comparing.
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=${1:-}; name=${2:-main}
store=benches/baselines/$name
case "$cmd" in
  save)
    cargo bench --bench protocol --bench bitmap --bench locks --bench copier --bench nbd_roundtrip -- --save-baseline "$name"
    rm -rf "$store"; mkdir -p "$store"
    (cd target/criterion && find . -type d -name "$name" -prune | while read -r d; do
        mkdir -p "../../$store/$(dirname "$d")"; cp -r "$d" "../../$store/$(dirname "$d")/"; done)
    echo "saved baseline $name in $store"
    ;;
  compare)
    [ -d "$store" ] || { echo "no baseline $name in $store (run: $0 save $name)" >&2; exit 1; }
    mkdir -p target/criterion
    cp -r "$store"/. target/criterion/
    cargo bench --bench protocol --bench bitmap --bench locks --bench copier --bench nbd_roundtrip -- --baseline "$name"
    ;;
  *) echo "usage: $0 save|compare [NAME]" >&2; exit 2 ;;
esac
