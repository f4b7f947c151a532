#!/bin/bash
# vm-seconds: 90 (expected time on the CI machine, warm cache; run-all.sh starts the longest first)
# Scenario ublk-root-e2e: the seed's journey with the root file system over ublk, on Debian 12's
# 6.12 kernel.
#   boot 1: the live stack of install-e2e (vda + RAM overlay -> dm-snapshot -> @livemirror),
#     the root on /dev/ublkb0 (serve --ublk-device 0, user recovery) instead of /dev/nbd0,
#     --state, --max-rate 6M; guest kill-stage2.sh with lm.door=ublk: under a write load, kill -9
#     of the daemon while it serves the live root, attach /dev/vdb, kill -9 three times during
#     the sync (at 25, 50 and 75 % of the regions) with the file system mounted: each time the
#     supervisor's new daemon takes /dev/ublkb0 over, the sync resumes and the load sees no
#     error; three `livemirror upgrade`s mid-sync (the device left and taken over by user
#     recovery each time); sync, verify, detach-source, the source removed, kill -9 once more; grow is refused
#     (no online resize before Linux 6.16) and changes nothing; no I/O error in dmesg; every
#     file intact.
#   host: e2fsck -fn + debugfs on vdb, files of every phase.
#   boot 2: the installed disk alone as root; its first boot grows the file system to the disk
#     (lm.growfs=1: what is left to do where the live device could not grow); every file there;
#     the host checks e2fsck again and that the file system fills vdb.
# Usage: LIVEMIRROR_BIN=path/to/livemirror tests/vm/ublk-root-e2e.sh
# Knobs: LIVEMIRROR_VM_KILL_RATE (copy rate, default 6M), LIVEMIRROR_VM_TIMEOUT (480 s), the
#        lib.sh knobs.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
# shellcheck disable=SC2034  # read by lib.sh: the 6.12 kernel, which has ublk_drv
LM_KSERIES=6.12
# shellcheck disable=SC2034  # read by lm_build_live_images
LM_EXTRA_MODULES=ublk_drv

NAME=ublk-root-e2e
BIN=${LIVEMIRROR_BIN:-$LM_DIR/../../target/release/livemirror}
RATE=${LIVEMIRROR_VM_KILL_RATE:-6M}
TIMEOUT1=${LIVEMIRROR_VM_TIMEOUT:-480}
VDA_MB=96 VDB_MB=160

[ -x "$BIN" ] || lm_die "no livemirror binary at $BIN (cargo build --release, or set LIVEMIRROR_BIN)"
lm_prepare || exit 1
lm_outdir "$NAME"
lm_say "$NAME: binary $BIN, kernel $LM_KVER, rate $RATE, output $LM_OUT"

lm_phase "build: root image, target, initramfs"
O=$LM_OUT
TOKEN=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
lm_build_live_images "$O" "$BIN" "$VDA_MB" "$VDB_MB" || lm_die "building the images failed"
lm_phase_end

lm_phase "boot 1: the live root over ublk, install with the daemon killed five times"
set +e
lm_boot "$O/boot1.log" "$TIMEOUT1" "$O/initrd1.gz" \
  "lm.mode=kill lm.door=ublk lm.state=1 lm.synckills=3 lm.growfs=1 lm.serveargs=--max-rate,$RATE lm.token=$TOKEN lm.watchdog=$((TIMEOUT1 - 30))" \
  -drive "file=$O/vda.img,if=virtio,format=raw,readonly=on" \
  -drive "file=$O/vdb.img,if=virtio,format=raw"
RC=$?
set -e
[ "$RC" = 0 ] || lm_fail "boot 1: QEMU exited $RC$([ "$RC" = 124 ] && echo " (host timeout ${TIMEOUT1}s)")"
BOOT_OK=1
lm_judge "$O/boot1.log" || BOOT_OK=
grep -aq 'LMTEST DONE' "$O/boot1.log.txt" || BOOT_OK=
lm_phase_end
lm_say "restarts took $(sed -n 's/.*LMTEST INFO: restart_secs=\([^ ]*\).*/\1/p' "$O/boot1.log.txt" | tr '\n' ' ')s"
if [ -z "$BOOT_OK" ]; then
  lm_say "boot 1 failed: skipping the host checks and boot 2 (serial log: $O/boot1.log)"
  lm_summary "$NAME"; exit 1
fi

lm_phase "host: e2fsck + debugfs on vdb"
lm_host_check_files "$O/vdb.img" pre sync killed synced detached released resized
lm_phase_end

lm_phase "boot 2: the installed disk as root, its first boot grows the file system"
lm_boot_installed "$O" 180 "$O/initrd2.gz" "lm.mode=installed lm.growfs=1 lm.token=$TOKEN"
BC=$(dumpe2fs -h "$O/vdb.img" 2>/dev/null | awk -F: '/^Block count/{gsub(/ /,"",$2); print $2}')
[ $((BC * 4096)) -ge $((VDB_MB * 1024 * 1024 * 95 / 100)) ] && lm_ok "host: the file system on vdb fills it: $((BC * 4096 / 1048576)) MiB" \
  || lm_fail "host: the file system on vdb is $((BC * 4096 / 1048576)) MiB, not grown to ${VDB_MB} MiB"
lm_phase_end

lm_summary "$NAME"
