#!/bin/bash
# Runs every VM scenario (tests/vm/*-e2e.sh, or only those named as arguments), prints a table
# with each scenario's result and time, then "N passed, M failed", and exits non-zero if any
# failed.
#   LIVEMIRROR_BIN=path/to/livemirror  (default: target/release/livemirror of this checkout)
#   LIVEMIRROR_VM_JOBS=N               scenarios at once (default 2: each QEMU under TCG uses one
#                                      core, and the CI machine has two)
# Scenarios are independent (each has its own output directory; the cache is shared under a
# lock), so they run N at a time, longest first: each script declares its expected time on a
# line "# vm-seconds: N" (default 120). A scenario's output is printed whole when it ends, so
# two scenarios never interleave their lines. A scenario whose guest kernel died of the
# emulator's own fault (an "Oops: int3": under multi-threaded TCG a vCPU can run a breakpoint
# the kernel's code patching already removed; seen once in about a hundred boots) runs once
# more, and the run says so; any other failure counts. See tests/vm/README.md;
# scripts/test-all.sh (and so CI) runs this.
set -uo pipefail
. "$(dirname "$0")/lib.sh"
export LIVEMIRROR_BIN=${LIVEMIRROR_BIN:-$LM_DIR/../../target/release/livemirror}
case $LIVEMIRROR_BIN in /*) ;; *) LIVEMIRROR_BIN=$PWD/$LIVEMIRROR_BIN ;; esac
[ -x "$LIVEMIRROR_BIN" ] || lm_die "no livemirror binary at $LIVEMIRROR_BIN (cargo build --release, or set LIVEMIRROR_BIN)"
JOBS=${LIVEMIRROR_VM_JOBS:-2}
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || lm_die "LIVEMIRROR_VM_JOBS=$JOBS is not a positive number"

if [ $# -gt 0 ]; then
  SCENARIOS=()
  for s in "$@"; do
    f=$LM_DIR/${s%.sh}.sh
    [ -f "$f" ] || lm_die "no scenario $s ($f)"
    SCENARIOS+=("$f")
  done
else
  SCENARIOS=("$LM_DIR"/*-e2e.sh)
fi

# Longest first (the expected times each script declares), so that N slots finish together.
weight() { local w; w=$(sed -n 's/^# vm-seconds: *\([0-9][0-9]*\).*/\1/p' "$1" | head -n 1); echo "${w:-120}"; }
mapfile -t SCENARIOS < <(for s in "${SCENARIOS[@]}"; do printf '%s %s\n' "$(weight "$s")" "$s"; done | sort -k1,1nr -k2 | cut -d' ' -f2-)

# Fetch the kernel and QEMU once, up front (so a missing prerequisite fails here, loudly).
lm_prepare || { echo "0 passed, ${#SCENARIOS[@]} failed (the rig's prerequisites are missing; see above)"; exit 1; }

LOGDIR=$(mktemp -d /tmp/livemirror-vm-run.XXXXXX)
declare -A PID_NAME=() PID_START=() PID_PATH=() RETRIED=()
PASSED=0 FAILED=0 RESULTS=() RETRY=()
T_ALL=$(lm_now)

# finish PID RC: print the scenario's whole output and record its result.
finish() {
  local pid=$1 rc=$2 name=${PID_NAME[$1]} r
  lm_say "=== scenario $name (output follows)"
  cat "$LOGDIR/$name.log"
  if [ "$rc" != 0 ] && [ -z "${RETRIED[$name]:-}" ] && grep -aq 'Oops: int3' "$LOGDIR/$name.log"; then
    lm_say "=== scenario $name: the guest kernel died of an emulator fault (Oops: int3 under TCG), not of a check: it runs again"
    RETRIED[$name]=1
    RETRY+=("${PID_PATH[$pid]}")
    unset "PID_NAME[$pid]" "PID_START[$pid]" "PID_PATH[$pid]"
    return 0
  fi
  if [ "$rc" = 0 ]; then PASSED=$((PASSED + 1)); r=PASS; else FAILED=$((FAILED + 1)); r=FAIL; fi
  RESULTS+=("$(printf '%-4s %-26s %7ss%s' "$r" "$name" "$(lm_secs $(($(lm_now) - PID_START[$pid])))" "${RETRIED[$name]:+ (run again after an emulator fault)}")")
  lm_say "=== scenario $name: $r"
  unset "PID_NAME[$pid]" "PID_START[$pid]" "PID_PATH[$pid]"
}

# wait_one: wait for any running scenario to end, then finish it.
wait_one() {
  local done_pid rc
  wait -n -p done_pid "${!PID_NAME[@]}" && rc=0 || rc=$?
  [ -n "${done_pid:-}" ] || return 0
  finish "$done_pid" "$rc"
}

# start SCRIPT: runs one scenario in the background, once a slot is free.
start() {
  local s=$1 name
  while [ "${#PID_NAME[@]}" -ge "$JOBS" ]; do wait_one; done
  name=$(basename "$s" .sh)
  lm_say "=== scenario $name started ($(weight "$s") s expected; ${#PID_NAME[@]} others running)"
  bash "$s" > "$LOGDIR/$name.log" 2>&1 &
  PID_NAME[$!]=$name
  PID_START[$!]=$(lm_now)
  PID_PATH[$!]=$s
}
for s in "${SCENARIOS[@]}"; do start "$s"; done
# Retries join as slots free up; a retry's own failure is final.
while [ "${#PID_NAME[@]}" -gt 0 ] || [ "${#RETRY[@]}" -gt 0 ]; do
  if [ "${#RETRY[@]}" -gt 0 ]; then
    s=${RETRY[0]}; RETRY=("${RETRY[@]:1}")
    start "$s"
  else
    wait_one
  fi
done

lm_say "=== results (binary $LIVEMIRROR_BIN, $JOBS at a time, $(lm_secs $(($(lm_now) - T_ALL))) s in all):"
printf '    %s\n' "${RESULTS[@]}"
rm -rf "$LOGDIR"
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ] && [ "$PASSED" -eq "${#SCENARIOS[@]}" ]
