#!/usr/bin/env bash
# Comparative benchmark: livemirror vs qemu-nbd / nbdkit / dd / qemu-img / nbdcopy.
#
#   benches/compare/run.sh [--quick] [--out FILE] [--sections ABCDE] [--no-build]
#                          [--disk-dir DIR] [--tmpfs-dir DIR]
#
# Builds the release binary, runs every section in one go and writes a markdown
# table (default benches/compare/results/latest.md) plus a JSON file next to it.
# Needs root (drop_caches), fio with the nbd engine, qemu-nbd, qemu-img, nbdkit,
# nbdcopy and dd. See benches/compare/README.md.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

build=1
for a in "$@"; do
    [[ "$a" == "--no-build" ]] && build=0
    [[ "$a" == "-h" || "$a" == "--help" ]] && build=0
done

if [[ $build == 1 ]]; then
    (cd "$repo" && cargo build --release --quiet) >&2
fi

py="${PYTHON:-python3}"
export LMBENCH_CMDLINE="benches/compare/run.sh${*:+ $*}"
exec "$py" "$here/bench.py" --repo "$repo" "$@"
