#!/usr/bin/env bash
# What `livemirror upgrade` costs on this machine: the pause the new daemon reports (from the
# moment the old one stopped answering until it serves), over several upgrades in a row of a
# daemon whose 256 MiB tmpfs image is mirrored to another (synced: every write goes to both
# legs, and the state file is written at each stop), while a client writes random data through
# its Unix socket the whole time (tests/scripts/nbd_writer.py, which reconnects when its
# connection is handed over and reports its longest write, reconnection included). At the end
# the export must hold exactly what the client wrote.
#
#   benches/upgrade/run.sh [--upgrades N] [--no-build]      (default 10 upgrades)
#
# The kernel device's handover is measured in the VM instead (tests/vm/kill-e2e.sh prints the
# pauses and the longest O_DIRECT write across each upgrade).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
n=10 build=1
while [ $# -gt 0 ]; do
    case "$1" in
    --upgrades) n=$2; shift ;;
    --no-build) build=0 ;;
    -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
[ "$build" = 1 ] && (cd "$repo" && cargo build --release --quiet)
lm="$repo/target/release/livemirror"
work=$(mktemp -d /dev/shm/lmupgrade.XXXXXX)
cleanup() {
    [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
head -c 256M /dev/urandom >"$work/s.img"
truncate -s 256M "$work/t.img"
"$lm" serve --source "$work/s.img" --target "$work/t.img" --state "$work/state" \
    --listen "unix:$work/nbd.sock" --control "$work/ctl.sock" 2>"$work/log" &
pid=$!
for _ in $(seq 1 200); do [ -S "$work/ctl.sock" ] && break; sleep 0.1; done # (the daemon binds it as it starts)
"$lm" wait --control "$work/ctl.sock" --timeout 120 >/dev/null 2>&1 || { echo "no sync"; cat "$work/log"; exit 1; }
/usr/bin/python3 "$repo/tests/scripts/nbd_writer.py" "nbd+unix:///?socket=$work/nbd.sock" 7 "$work/model" "$work/stop" \
    >"$work/writer.out" 2>"$work/writer.err" &
writer=$!
sleep 2
pauses=()
for i in $(seq 1 "$n"); do
    out=$("$lm" upgrade --control "$work/ctl.sock")
    pid=$(sed -n 's/.*pid \([0-9]*\) serves now.*/\1/p' <<<"$out")
    pauses+=("$(sed -n 's/.*paused \([0-9]*\) ms.*/\1/p' <<<"$out")")
    echo "upgrade $i: $out"
    sleep 1
done
touch "$work/stop"
wait "$writer" || { echo "the writer failed: $(cat "$work/writer.err")"; exit 1; }
"$lm" verify --control "$work/ctl.sock" >/dev/null || { echo "verify failed"; exit 1; }
nbdcopy "nbd+unix:///?socket=$work/nbd.sock" "$work/export"
cmp -s "$work/export" "$work/model" || { echo "the export differs from what the client wrote"; exit 1; }
sorted=$(printf '%s\n' "${pauses[@]}" | sort -n)
echo "$(date -u '+%Y-%m-%d %H:%M') UTC, $n upgrades of a synced 256 MiB mirror under a write load ($(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg)):"
echo "  pause ms: median $(sed -n "$(((n + 1) / 2))p" <<<"$sorted"), min $(head -n 1 <<<"$sorted"), max $(tail -n 1 <<<"$sorted") (all: ${pauses[*]})"
echo "  client: $(cat "$work/writer.out"); the export holds exactly what it wrote"
