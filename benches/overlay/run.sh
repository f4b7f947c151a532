#!/usr/bin/env bash
# What the copy-on-write overlay costs when serving: the same image served by
# livemirror plain (`serve --source IMG`) and through an overlay (`serve --source
# IMG --overlay OV`), both on tmpfs, with fio's nbd engine over a Unix socket.
#
#   benches/overlay/run.sh [--quick] [--reps N] [--secs S] [--out FILE] [--no-build]
#
# Rows: 4K random writes QD32, 4K random reads of data nobody wrote (the
# overlay's lookup on the way to the image) QD32, 1M sequential writes QD8. Every
# run starts from a fresh copy of the image and, for the overlay, a fresh empty
# overlay, so first writes (which record chunks in the overlay's map) are
# measured every time; the two configurations alternate, median of --reps
# (default 5). Writes a markdown table to --out (default
# benches/overlay/results/latest.md) and prints it. Needs fio.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
build=1
for a in "$@"; do
    [[ "$a" == "--no-build" ]] && build=0
    [[ "$a" == "-h" || "$a" == "--help" ]] && { sed -n '2,16p' "$0"; exit 0; }
done
if [[ $build == 1 ]]; then
    (cd "$repo" && cargo build --release --quiet) >&2
fi
export LMBENCH_CMDLINE="benches/overlay/run.sh${*:+ $*}"
exec "${PYTHON:-python3}" "$here/bench.py" --repo "$repo" "$@"
