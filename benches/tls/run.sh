#!/usr/bin/env bash
# What TLS costs when serving: livemirror, qemu-nbd and nbdkit, each in
# plaintext, with X.509 and with a pre-shared key, measured side by side with
# the same client.
#
#   benches/tls/run.sh [--quick] [--reps N] [--out FILE] [--no-build]
#                      [--servers livemirror,qemu-nbd,nbdkit] [--baseline OLD_BINARY]
#
# --baseline measures another livemirror binary (the build before a change) as the
# server livemirror-baseline, in the same run: every server runs from the start and
# each repetition goes through all of them in turn.
#
# The client is nbdcopy (libnbd, gnutls): fio's nbd engine refuses the local
# certificate and key files a TLS URI names, nbdcopy takes them. Copying the
# export to null: with one connection,
#   - 4K at queue depth 1 (--request-size=4096 --requests=1): wall time per
#     request, and the server's CPU time per request (from /proc/PID/stat);
#   - 1M at queue depth 8 (--request-size=1048576 --requests=8): MiB/s;
# each the median of --reps runs (default 5). The export is a random-data file
# in /dev/shm (no holes for block status to skip), so storage is out of the
# picture and the numbers are protocol, TLS and copies. Writes a markdown table
# to --out (default benches/tls/results/latest.md) and prints it.
# Needs qemu-nbd, nbdkit, nbdcopy, certtool and psktool.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

build=1
for a in "$@"; do
    [[ "$a" == "--no-build" ]] && build=0
    [[ "$a" == "-h" || "$a" == "--help" ]] && { sed -n '2,20p' "$0"; exit 0; }
done
if [[ $build == 1 ]]; then
    (cd "$repo" && cargo build --release --quiet) >&2
fi
export LMBENCH_CMDLINE="benches/tls/run.sh${*:+ $*}"
exec "${PYTHON:-python3}" "$here/bench.py" --repo "$repo" "$@"
