#!/bin/bash
# vm-seconds: 110 (expected time on the CI machine, warm cache; run-all.sh starts the longest first)
# Scenario kill-e2e: crash and resume under a write load, in a QEMU guest.
#   boot: as install-e2e (live stack -> @livemirror --nbd-device /dev/nbd0 -> root, classic
#     switch_root), with --state /run/livemirror/state, --nbd-timeout 5 and --max-rate 6M.
#   guest (kill-stage2.sh): `kill -9` the daemon (not its supervisor) while it serves the live
#     root; attach /dev/vdb; at 35 % `kill -9` it again:
#     the supervisor restarts it, the sync resumes (regions_clean does not start over), /dev/nbd0
#     is taken over with netlink RECONFIGURE, the write load sees no error; three `livemirror
#     upgrade`s in a row mid-sync (the supervisor execs the new binary in place, the new daemon
#     serves the live kernel connections on: no NBD timeout, no I/O error, the copy goes on; the
#     pause each reports and the longest O_DIRECT write that spanned it are printed); sync, verify,
#     detach-source, remove the source; kill -9 again: it comes back without the source; grow +
#     resize2fs; no I/O error in dmesg; every file intact.
#   host: e2fsck -fn + debugfs on vdb, sha256 of files from every phase (before, during and
#     after each kill and the upgrades).
# Usage: LIVEMIRROR_BIN=path/to/livemirror tests/vm/kill-e2e.sh
# Knobs: LIVEMIRROR_VM_SWITCHROOT=move|keep (see install-e2e.sh), LIVEMIRROR_VM_KILL_RATE (copy
#        rate limit until the kill, default 6M), LIVEMIRROR_VM_TIMEOUT, the lib.sh knobs.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

NAME=kill-e2e
BIN=${LIVEMIRROR_BIN:-$LM_DIR/../../target/release/livemirror}
SWITCHROOT=${LIVEMIRROR_VM_SWITCHROOT:-move}
RATE=${LIVEMIRROR_VM_KILL_RATE:-6M}
TIMEOUT1=${LIVEMIRROR_VM_TIMEOUT:-420}
VDA_MB=96 VDB_MB=160

[ -x "$BIN" ] || lm_die "no livemirror binary at $BIN (cargo build --release, or set LIVEMIRROR_BIN)"
lm_prepare || exit 1
lm_outdir "$NAME"
lm_say "$NAME: binary $BIN, switchroot $SWITCHROOT, rate $RATE until the kill, output $LM_OUT"

lm_phase "build: root image, target, initramfs"
O=$LM_OUT
TOKEN=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
lm_build_live_images "$O" "$BIN" "$VDA_MB" "$VDB_MB" || lm_die "building the images failed"
lm_phase_end

lm_phase "boot: install with the daemon killed three times and upgraded three times"
set +e
lm_boot "$O/boot1.log" "$TIMEOUT1" "$O/initrd1.gz" \
  "lm.mode=kill lm.nbd=livemirror lm.state=1 lm.nbdtimeout=5 lm.serveargs=--max-rate,$RATE lm.switchroot=$SWITCHROOT lm.token=$TOKEN lm.watchdog=$((TIMEOUT1 - 30))" \
  -drive "file=$O/vda.img,if=virtio,format=raw,readonly=on" \
  -drive "file=$O/vdb.img,if=virtio,format=raw"
RC=$?
set -e
[ "$RC" = 0 ] || lm_fail "boot: QEMU exited $RC$([ "$RC" = 124 ] && echo " (host timeout ${TIMEOUT1}s)")"
BOOT_OK=1
lm_judge "$O/boot1.log" || BOOT_OK=
grep -aq 'LMTEST DONE' "$O/boot1.log.txt" || BOOT_OK=
lm_phase_end
lm_say "restarts took $(sed -n 's/.*LMTEST INFO: restart_secs=\([^ ]*\).*/\1/p' "$O/boot1.log.txt" | tr '\n' ' ')s"
lm_say "upgrades: the daemon paused $(sed -n 's/.*LMTEST INFO: upgrade_pause_ms=\([^ ]*\).*/\1/p' "$O/boot1.log.txt" | tr '\n' ' ')ms; the longest probe write across each took $(sed -n 's/.*LMTEST INFO: upgrade_probe_max_ms=\([^ ]*\).*/\1/p' "$O/boot1.log.txt" | tr '\n' ' ')ms"
if [ -z "$BOOT_OK" ]; then
  lm_say "the guest run failed: skipping the host checks (serial log: $O/boot1.log)"
  lm_summary "$NAME"; exit 1
fi

lm_phase "host: e2fsck + debugfs on vdb"
lm_host_check_files "$O/vdb.img" pre sync killed upgraded synced detached released resized
lm_phase_end

lm_summary "$NAME"
