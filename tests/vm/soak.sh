#!/bin/bash
# Soak: one VM scenario many times in a row, for what a single run cannot show (a stall that
# needs several boots to appear). Not run by CI, which runs each scenario once.
#
#   tests/vm/soak.sh [SCENARIO [RUNS]]      default: multiconn-e2e 20
#
# Each run's whole output goes to $LIVEMIRROR_SOAK_OUT/run-N.log (default
# /tmp/livemirror-soak.SCENARIO.PID); the script prints one line per run (PASS or FAIL, its
# time, and for multiconn-e2e the kernel requests and timed-out ones it counted) and a summary,
# and exits non-zero if any run failed. The binary and knobs are the scenario's
# (LIVEMIRROR_BIN, LIVEMIRROR_VM_*), as for run-all.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
scenario=${1:-multiconn-e2e}
runs=${2:-20}
[ -f "$here/$scenario.sh" ] || { echo "soak.sh: no scenario $here/$scenario.sh" >&2; exit 2; }
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || { echo "soak.sh: RUNS must be a positive number, not $runs" >&2; exit 2; }
out=${LIVEMIRROR_SOAK_OUT:-/tmp/livemirror-soak.$scenario.$$}
mkdir -p "$out"
echo "soak: $scenario x $runs, logs in $out ($(date -u '+%Y-%m-%d %H:%M') UTC)"
pass=0 fail=0 requests=0 timeouts=0 start=$SECONDS
for i in $(seq 1 "$runs"); do
  t0=$SECONDS
  if bash "$here/$scenario.sh" >"$out/run-$i.log" 2>&1; then
    result=PASS pass=$((pass + 1))
  else
    result=FAIL fail=$((fail + 1))
  fi
  # multiconn-e2e's totals: "totals: requests N, timeouts M over K cycles".
  counts=$(sed -n 's/.*totals: requests \([0-9]*\), timeouts \([0-9]*\).*/\1 \2/p' "$out/run-$i.log" | tail -n 1)
  extra=""
  if [ -n "$counts" ]; then
    read -r r t <<<"$counts"
    requests=$((requests + r)) timeouts=$((timeouts + t))
    extra=", $r kernel requests, $t timed out"
  fi
  echo "run $i/$runs: $result in $((SECONDS - t0)) s$extra"
  [ "$result" = PASS ] || grep -a 'FAIL' "$out/run-$i.log" | head -n 5 | sed 's/^/    /'
done
echo "soak: $pass of $runs passed, $fail failed, in $(((SECONDS - start) / 60)) min$([ "$requests" -gt 0 ] && echo "; $requests kernel requests, $timeouts timed out")"
[ "$fail" = 0 ]
