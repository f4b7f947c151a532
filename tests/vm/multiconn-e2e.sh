#!/bin/bash
# vm-seconds: 60 (expected time on the CI machine, warm cache; run-all.sh starts the longest first)
# Scenario multiconn-e2e: many kernel NBD connections x deep queues, and every reply arrives.
#   boot: 4 guest CPUs (the kernel makes at most one hardware queue, so uses at most one
#     connection, per CPU; LIVEMIRROR_VM_SMP), the live stack of install-e2e (vda + RAM overlay -> dm-snapshot -> @livemirror
#     --nbd-device /dev/nbd0 -> root, classic switch_root), the root served over
#     --nbd-connections 4 (LIVEMIRROR_VM_MC_ROOTCONNS); a third disk, vdc, carries fio
#     (lm_tools_image).
#   guest (multiconn-stage2.sh): the root has 4 hardware queues and the staged attach gave all 4
#     connections; fio on files of the root (direct, QD64 x 4 jobs, CRC-verified writes); then
#     for each connection count of LIVEMIRROR_VM_MC_CYCLES (2,4,8: 8 asks for more than there are
#     CPUs and must get 4) a second
#     livemirror connects /dev/nbd1 to /dev/vdb with that many connections, fio runs a mixed 4K
#     load at QD128 x 4 jobs and verified writes of 4K-256K, and the daemon stops (flush +
#     disconnect). Any NBD timeout, dead connection, I/O or fio error fails; so does a count of
#     requests the daemon answered that differs from what the kernel completed, a number of
#     hardware queues or served connections other than min(N, CPUs), or more end-of-file
#     connections than the staged CONNECT closed.
#   host: the counts of every cycle ("LMTEST INFO: cycle ..."), which must all be there.
# Usage: LIVEMIRROR_BIN=path/to/livemirror tests/vm/multiconn-e2e.sh
# Knobs: LIVEMIRROR_VM_MC_ROOTCONNS (4), LIVEMIRROR_VM_MC_CYCLES (2,4,8),
#        LIVEMIRROR_VM_MC_JOBS (4 fio jobs), LIVEMIRROR_VM_MC_MIXSECS (4 s of mixed load per
#        cycle), LIVEMIRROR_VM_MC_VERIFYMB (8 MiB written and verified per job and cycle),
#        LIVEMIRROR_VM_NAME, LIVEMIRROR_VM_TIMEOUT (300 s), LIVEMIRROR_VM_SMP (4 here) and the
#        lib.sh knobs. Loop it (for i in 1 2 3; do ...; done) to soak.
set -euo pipefail
export LIVEMIRROR_VM_SMP=${LIVEMIRROR_VM_SMP:-4}
. "$(dirname "$0")/lib.sh"

NAME=${LIVEMIRROR_VM_NAME:-multiconn-e2e}
BIN=${LIVEMIRROR_BIN:-$LM_DIR/../../target/release/livemirror}
ROOTCONNS=${LIVEMIRROR_VM_MC_ROOTCONNS:-4}
CYCLES=${LIVEMIRROR_VM_MC_CYCLES:-2,4,8}
JOBS=${LIVEMIRROR_VM_MC_JOBS:-4}
MIXSECS=${LIVEMIRROR_VM_MC_MIXSECS:-4}
VERIFYMB=${LIVEMIRROR_VM_MC_VERIFYMB:-8}
TIMEOUT1=${LIVEMIRROR_VM_TIMEOUT:-300}
VDA_MB=96 VDB_MB=$((JOBS * VERIFYMB + 32))

[ -x "$BIN" ] || lm_die "no livemirror binary at $BIN (cargo build --release, or set LIVEMIRROR_BIN)"
lm_need fio:fio || exit 1
lm_prepare || exit 1
lm_outdir "$NAME"
lm_say "$NAME: binary $BIN, root over $ROOTCONNS connections, /dev/nbd1 cycles $CYCLES, $JOBS fio jobs, output $LM_OUT"

lm_phase "build: root image, target, tools disk (fio), initramfs"
O=$LM_OUT
TOKEN=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
lm_build_live_images "$O" "$BIN" "$VDA_MB" "$VDB_MB" || lm_die "building the images failed"
lm_tools_image "$O/vdc.img" fio || lm_die "building the tools disk failed"
lm_say "tools disk $(du -m "$O/vdc.img" | cut -f1) MiB"
lm_phase_end

lm_phase "boot: kernel connections under deep queues"
set +e
lm_boot "$O/boot1.log" "$TIMEOUT1" "$O/initrd1.gz" \
  "lm.mode=multiconn lm.nbd=livemirror lm.serveargs=--nbd-connections,$ROOTCONNS lm.cycles=$CYCLES lm.jobs=$JOBS lm.mixsecs=$MIXSECS lm.verifymb=$VERIFYMB lm.token=$TOKEN lm.watchdog=$((TIMEOUT1 - 30))" \
  -drive "file=$O/vda.img,if=virtio,format=raw,readonly=on" \
  -drive "file=$O/vdb.img,if=virtio,format=raw" \
  -drive "file=$O/vdc.img,if=virtio,format=raw,readonly=on"
RC=$?
set -e
[ "$RC" = 0 ] || lm_fail "boot: QEMU exited $RC$([ "$RC" = 124 ] && echo " (host timeout ${TIMEOUT1}s)")"
lm_judge "$O/boot1.log" || true
lm_phase_end

# Every cycle reported its counts (a cycle the guest never reached is a failure too).
lm_phase "host: the counts of every cycle"
grep -a 'LMTEST INFO: cycle ' "$O/boot1.log.txt" | sed 's/.*LMTEST INFO: cycle //' > "$O/counts.txt" || true
for N in root ${CYCLES//,/ }; do
  if [ "$N" = root ]; then pat="dev=nbd0 conns=$ROOTCONNS "; else pat="dev=nbd1 conns=$N "; fi
  line=$(grep -a "^$pat" "$O/counts.txt" | head -n 1 || true)
  if [ -z "$line" ]; then lm_fail "no counts from the cycle $pat"; continue; fi
  to=$(sed -n 's/.*timeouts=\([0-9]*\).*/\1/p' <<< "$line")
  [ "$to" = 0 ] && lm_ok "cycle $line" || lm_fail "cycle with timed-out requests: $line"
done
awk '{for (i = 1; i <= NF; i++) {split($i, kv, "="); if (kv[1] == "kernel_requests") r += kv[2]; if (kv[1] == "timeouts") t += kv[2]}}
     END {printf "requests %d, timeouts %d over %d cycles\n", r, t, NR}' "$O/counts.txt" | while read -r l; do lm_say "totals: $l"; done
lm_phase_end

lm_summary "$NAME"
