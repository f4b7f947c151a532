#!/usr/bin/env bash
# Copy to a remote target over an emulated link, side by side in one run:
# livemirror (serve + attach nbd://…, timed to `synced`, the target flushed),
# `qemu-img convert -n -m 16 -W -O raw … nbd://…` and `nbdcopy --flush`, at
# 0, 5 and 25 ms round-trip time with the same bandwidth cap, next to the
# link's own capacity (one TCP stream through it).
#
# The link joins two network namespaces made here (tests/scripts/linkem.py:
# the kernel has no netem); qemu-nbd serves a tmpfs file in one, the copiers
# run in the other, from a tmpfs source. Needs root. Never a timed test.
#
# Usage: benches/remote/run.sh [--size MIB] [--rate-mbit R] [--reps N] [--no-build] [--out FILE]
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
SIZE_MIB=512
RATE=500
REPS=3
BUILD=1
OUT=benches/remote/results/latest.md
while [ $# -gt 0 ]; do
    case "$1" in
        --size) SIZE_MIB=$2; shift 2 ;;
        --rate-mbit) RATE=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --out) OUT=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
for t in ip python3 qemu-nbd qemu-img nbdcopy nbdinfo; do
    command -v "$t" >/dev/null || { echo "$t is required" >&2; exit 1; }
done
[ "$BUILD" = 1 ] && cargo build --release -q
BIN=$ROOT/target/release/livemirror
WORK=$(mktemp -d /dev/shm/lmremote.XXXXXX)
NSA=lmbenchA$$
NSB=lmbenchB$$
ADDR=10.77.0.2
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    ip netns del "$NSA" 2>/dev/null || true
    ip netns del "$NSB" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

SRC=$WORK/src.img
TGT=$WORK/tgt.img
head -c $((SIZE_MIB << 20)) /dev/urandom > "$SRC"
BYTES=$((SIZE_MIB << 20))

LINK_PID=
start_link() { # one-way delay in ms
    ip netns add "$NSA"
    ip netns add "$NSB"
    coproc LINK { exec python3 "$ROOT/tests/scripts/linkem.py" "$NSA" 10.77.0.1 "$NSB" "$ADDR" \
        --delay-ms "$1" --rate-mbit "$RATE"; }
    read -r line <&"${LINK[0]}"
    [ "$line" = ready ] || { echo "linkem did not start" >&2; exit 1; }
}
stop_link() {
    kill "$LINK_PID" 2>/dev/null || true
    wait "$LINK_PID" 2>/dev/null || true
    ip netns del "$NSA"
    ip netns del "$NSB"
}

now() { date +%s.%N; }

QEMU_PID=
start_server() {
    truncate -s 0 "$TGT"
    truncate -s "$BYTES" "$TGT"
    ip netns exec "$NSB" qemu-nbd -f raw -t -e 8 -b "$ADDR" -p 10809 -x exp "$TGT" 2>"$WORK/qemu-nbd.log" &
    QEMU_PID=$!
    PIDS+=("$QEMU_PID")
    for _ in $(seq 100); do
        ip netns exec "$NSA" nbdinfo --size "nbd://$ADDR/exp" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "qemu-nbd did not start" >&2; exit 1
}
stop_server() { kill "$QEMU_PID"; wait "$QEMU_PID" 2>/dev/null || true; }

check_copy() {
    cmp -s "$SRC" "$TGT" || { echo "$1: the target differs from the source" >&2; exit 1; }
}

# Seconds for one method; the copy is checked byte for byte afterwards.
run_livemirror() {
    local ctl=$WORK/ctl.sock sock=$WORK/nbd.sock
    ip netns exec "$NSA" "$BIN" serve --source "$SRC" --listen "unix:$sock" --control "$ctl" \
        2>"$WORK/livemirror.log" &
    local pid=$!
    PIDS+=("$pid")
    for _ in $(seq 200); do "$BIN" status --control "$ctl" >/dev/null 2>&1 && break; sleep 0.05; done
    local t0 t1
    t0=$(now)
    "$BIN" attach --control "$ctl" "nbd://$ADDR/exp" >/dev/null
    # Polled without python (its start takes longer than the polling interval).
    until "$BIN" status --json --control "$ctl" | grep -q '"state":"synced"'; do
        sleep 0.02
    done
    t1=$(now)
    # The daemon's own account: from its `attached` event to `synced`.
    "$BIN" status --json --control "$ctl" | python3 -c '
import json, sys
ev = json.load(sys.stdin)["events"]
a = [e["unix_time"] for e in ev if e["message"].startswith("attached target")]
s = [e["unix_time"] for e in ev if e["message"].startswith("synced")]
print("    livemirror internal (attached -> synced): %.3f s" % (s[-1] - a[-1]), file=sys.stderr)'
    kill "$pid"; wait "$pid" 2>/dev/null || true
    echo "$t1 - $t0" | bc -l
}
run_qemu_img() {
    local t0 t1
    t0=$(now)
    ip netns exec "$NSA" qemu-img convert -n -m 16 -W -f raw -O raw "$SRC" "nbd://$ADDR:10809/exp"
    t1=$(now)
    echo "$t1 - $t0" | bc -l
}
run_nbdcopy() {
    local t0 t1
    t0=$(now)
    ip netns exec "$NSA" nbdcopy --flush "$SRC" "nbd://$ADDR/exp"
    t1=$(now)
    echo "$t1 - $t0" | bc -l
}
# One TCP stream through the link: what it carries at most.
link_capacity() {
    ip netns exec "$NSB" python3 -c '
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1)
c, _ = s.accept(); n = 0; t = None
while True:
    d = c.recv(1 << 20)
    if not d: break
    if t is None: t = time.monotonic()
    n += len(d)
print(n / (time.monotonic() - t))
' "$ADDR" > "$WORK/cap.txt" &
    local pid=$!
    sleep 0.5
    ip netns exec "$NSA" python3 -c '
import socket, sys
s = socket.create_connection((sys.argv[1], 5001)); b = b"x" * (1 << 20)
for _ in range(int(sys.argv[2])): s.sendall(b)
s.close()' "$ADDR" "$((SIZE_MIB / 2))"
    wait "$pid"
    cat "$WORK/cap.txt"
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

declare -A RESULT
CAPS=()
LATENCIES=(0 5 25)
START=$(date -u '+%Y-%m-%d %H:%M')
T_START=$(date +%s)
for rtt in "${LATENCIES[@]}"; do
    start_link "$(echo "$rtt / 2" | bc -l)"
    cap=$(link_capacity)
    CAPS+=("$cap")
    start_server
    for rep in $(seq "$REPS"); do
        # The order rotates between repetitions.
        methods=(livemirror qemu_img nbdcopy)
        for _ in $(seq 0 $(( (rep - 1) % 3 - 1 ))); do methods=("${methods[@]:1}" "${methods[0]}"); done
        for m in "${methods[@]}"; do
            truncate -s 0 "$TGT"; truncate -s "$BYTES" "$TGT"
            secs=$("run_$m")
            check_copy "$m"
            echo "rtt ${rtt} ms, $m, rep $rep: $secs s" >&2
            RESULT[$rtt,$m]+="$secs "
        done
    done
    stop_server
    stop_link
done
T_END=$(date +%s)

rate() { echo "$BYTES / $1 / 1000000" | bc -l; }
{
    echo "### Remote target: copy over a link with latency"
    echo
    echo "- Date (UTC): $START; run took $(( (T_END - T_START) / 60 )) min"
    echo "- Command: \`benches/remote/run.sh --size $SIZE_MIB --rate-mbit $RATE --reps $REPS\`"
    echo "- Machine: $(nproc) cores, kernel $(uname -r); $(qemu-nbd --version | head -1); $(qemu-img --version | head -1); $(nbdcopy --version | head -1); livemirror $(git rev-parse --short HEAD)"
    echo "- Link: two network namespaces joined by tests/scripts/linkem.py (userspace: this kernel has no netem), $RATE Mbit/s each way, MTU 65000; qemu-nbd \`-t -e 8\` serving a tmpfs file; source: $SIZE_MIB MiB of random data on tmpfs; every copy compared byte for byte afterwards."
    echo "- livemirror: \`serve --source SRC\` (defaults: 2 MiB pieces, 16 in flight, 4 connections as the server allows), timed from \`attach nbd://…\` to the \`synced\` state (target flushed; status polled every 20 ms). qemu-img: \`convert -n -m 16 -W\`. nbdcopy: \`--flush\` (its defaults: 4 connections, 64 requests of 256 KiB)."
    echo "- Median of $REPS run(s), MB/s (10^6 bytes/s). The link's capacity is its bottleneck rate, $RATE Mbit/s = $(echo "$RATE / 8" | bc -l | xargs printf '%.1f') MB/s (headers cost 0.06 % at this MTU); one TCP stream of Python's through the same link is shown for reference (Python's own CPU shares the 2 cores with the forwarder)."
    echo
    echo "| RTT | one TCP stream | livemirror | qemu-img convert | nbdcopy | livemirror / best peer | livemirror / link capacity |"
    echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    i=0
    linkcap=$(echo "$RATE / 8" | bc -l)
    for rtt in "${LATENCIES[@]}"; do
        stream=$(echo "${CAPS[$i]} / 1000000" | bc -l)
        lm=$(rate "$(echo "${RESULT[$rtt,livemirror]}" | tr ' ' '\n' | grep . | median)")
        qi=$(rate "$(echo "${RESULT[$rtt,qemu_img]}" | tr ' ' '\n' | grep . | median)")
        nc=$(rate "$(echo "${RESULT[$rtt,nbdcopy]}" | tr ' ' '\n' | grep . | median)")
        best=$(printf '%s\n%s\n' "$qi" "$nc" | sort -g | tail -1)
        printf '| %s ms | %.1f | %.1f | %.1f | %.1f | **%.2f×** | %.2f× |\n' "$rtt" "$stream" "$lm" "$qi" "$nc" \
            "$(echo "$lm / $best" | bc -l)" "$(echo "$lm / $linkcap" | bc -l)"
        i=$((i + 1))
    done
} > "$WORK/table.md"
mkdir -p "$(dirname "$OUT")"
cp "$WORK/table.md" "$OUT"
cat "$OUT"
