#!/bin/bash
# Runs every VM scenario (tests/vm/*-e2e.sh, or only those named as arguments), prints
# "N passed, M failed" and exits non-zero if any failed.
#   LIVEMIRROR_BIN=path/to/livemirror  (default: target/release/livemirror of this checkout)
# See tests/vm/README.md. Cargo runs this from tests/vm_boot.rs.
set -uo pipefail
. "$(dirname "$0")/lib.sh"
export LIVEMIRROR_BIN=${LIVEMIRROR_BIN:-$LM_DIR/../../target/release/livemirror}
case $LIVEMIRROR_BIN in /*) ;; *) LIVEMIRROR_BIN=$PWD/$LIVEMIRROR_BIN ;; esac
[ -x "$LIVEMIRROR_BIN" ] || lm_die "no livemirror binary at $LIVEMIRROR_BIN (cargo build --release, or set LIVEMIRROR_BIN)"

if [ $# -gt 0 ]; then
  SCENARIOS=()
  for s in "$@"; do SCENARIOS+=("$LM_DIR/${s%.sh}.sh"); done
else
  SCENARIOS=("$LM_DIR"/*-e2e.sh)
fi

# Fetch the kernel and QEMU once, up front (so a missing prerequisite fails here, loudly).
lm_prepare || { echo "0 passed, ${#SCENARIOS[@]} failed (the rig's prerequisites are missing; see above)"; exit 1; }

PASSED=0 FAILED=0 RESULTS=()
for s in "${SCENARIOS[@]}"; do
  name=$(basename "$s" .sh)
  T=$(lm_now)
  lm_say "=== scenario $name"
  if bash "$s"; then PASSED=$((PASSED + 1)); r=PASS; else FAILED=$((FAILED + 1)); r=FAIL; fi
  RESULTS+=("$(printf '%-4s %-24s %7ss' "$r" "$name" "$(lm_secs $(($(lm_now) - T)))")")
done
lm_say "=== results (binary $LIVEMIRROR_BIN):"
printf '    %s\n' "${RESULTS[@]}"
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
