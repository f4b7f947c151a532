#!/bin/bash
# vm-seconds: 45 (expected time on the CI machine, warm cache; run-all.sh starts the longest first)
# Scenario 1, "rebootless install", end to end in a QEMU guest:
#   boot 1: vda = read-only base image (ext4 root), vdb = blank, larger target disk.
#     initramfs: RAM overlay + dm-snapshot "live" of vda -> @livemirror serve (root storage
#     daemon, binary in /run) which connects /dev/nbd0 itself over netlink (--nbd-device) ->
#     root -> classic switch_root (mount --move); stage 2 (on the NBD root) under a write load:
#     attach /dev/vdb, pause/resume, wait, verify, detach-source, dmsetup remove + free the
#     overlay, grow: the kernel's /dev/nbd0 grows online, resize2fs grows the mounted root, and
#     files keep being written; then every file is checked.
#   host: e2fsck -fn on vdb; debugfs extracts the files, sha256 against the guest's manifest.
#   boot 2: vdb alone, mounted straight as root: the install is all there.
# Usage: LIVEMIRROR_BIN=path/to/livemirror tests/vm/install-e2e.sh
# Knobs: LIVEMIRROR_VM_NBD=livemirror|nbd-client|ioctl (who connects /dev/nbd0; default
#          livemirror. nbd-client: the standard `nbd-client -unix SOCKET /dev/nbd0`; livemirror
#          cannot resize that device, so the resize step is skipped; see install-nbdclient-e2e.sh)
#        LIVEMIRROR_VM_SWITCHROOT=move|keep (default move, the classic switch_root; keep is the
#          workaround described in README.md, Traps)
#        LIVEMIRROR_VM_SHORT=1 (no boot 2), LIVEMIRROR_VM_NAME (the scenario's name in the output)
#        LIVEMIRROR_VM_RATE (copy rate limit during the sync, default 20M)
#        LIVEMIRROR_VM_TIMEOUT (boot 1 host timeout, default 420 s) and the lib.sh knobs.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

NAME=${LIVEMIRROR_VM_NAME:-install-e2e}
BIN=${LIVEMIRROR_BIN:-$LM_DIR/../../target/release/livemirror}
NBDMODE=${LIVEMIRROR_VM_NBD:-livemirror}
SWITCHROOT=${LIVEMIRROR_VM_SWITCHROOT:-move}
RATE=${LIVEMIRROR_VM_RATE:-20M}
TIMEOUT1=${LIVEMIRROR_VM_TIMEOUT:-420}
WATCHDOG=$((TIMEOUT1 - 30))
VDA_MB=96 VDB_MB=160

[ -x "$BIN" ] || lm_die "no livemirror binary at $BIN (cargo build --release, or set LIVEMIRROR_BIN)"
lm_prepare || exit 1
lm_outdir "$NAME"
lm_say "$NAME: binary $BIN, nbd mode $NBDMODE, switchroot $SWITCHROOT, rate $RATE, output $LM_OUT"

lm_phase "build: root image, target, initramfs x2"
O=$LM_OUT
TOKEN=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
lm_build_live_images "$O" "$BIN" "$VDA_MB" "$VDB_MB" || lm_die "building the images failed"
lm_phase_end

# ------------------------------------------------------------------ boot 1: the install
lm_phase "boot 1: live root over NBD, install onto vdb"
set +e
lm_boot "$O/boot1.log" "$TIMEOUT1" "$O/initrd1.gz" \
  "lm.nbd=$NBDMODE lm.switchroot=$SWITCHROOT lm.rate=$RATE lm.token=$TOKEN lm.watchdog=$WATCHDOG${LIVEMIRROR_VM_SERVEARGS:+ lm.serveargs=$LIVEMIRROR_VM_SERVEARGS}" \
  -drive "file=$O/vda.img,if=virtio,format=raw,readonly=on" \
  -drive "file=$O/vdb.img,if=virtio,format=raw"
RC=$?
set -e
[ "$RC" = 0 ] || lm_fail "boot 1: QEMU exited $RC$([ "$RC" = 124 ] && echo " (host timeout ${TIMEOUT1}s)")"
BOOT1_OK=1
lm_judge "$O/boot1.log" || BOOT1_OK=
grep -aq 'LMTEST DONE' "$O/boot1.log.txt" || BOOT1_OK=
lm_phase_end
lm_say "boot 1: nbd connect $(lm_marker "$O/boot1.log" nbd_connect_secs)s, sync $(lm_marker "$O/boot1.log" sync_secs)s"
if [ -z "$BOOT1_OK" ]; then
  # The install did not complete: the target holds a partial copy, nothing to check on it.
  lm_say "boot 1 failed: skipping the host checks and boot 2 (serial log: $O/boot1.log)"
  lm_summary "$NAME"; exit 1
fi

# ------------------------------------------------------------------ host: inspect the target
lm_phase "host: e2fsck + debugfs on vdb"
if [ "$NBDMODE" = livemirror ]; then
  lm_host_check_files "$O/vdb.img" pre sync detached resized
  BC=$(dumpe2fs -h "$O/vdb.img" 2>/dev/null | awk -F: '/^Block count/{gsub(/ /,"",$2); print $2}')
  [ $((BC * 4096)) -ge $((VDB_MB * 1024 * 1024 * 95 / 100)) ] && lm_ok "host: the file system on vdb was grown to $((BC * 4096 / 1048576)) MiB" \
    || lm_fail "host: the file system on vdb is $((BC * 4096 / 1048576)) MiB, not grown to ${VDB_MB} MiB"
else
  lm_host_check_files "$O/vdb.img" pre sync detached
fi
lm_phase_end

# ------------------------------------------------------------------ boot 2: from the disk
if [ -z "${LIVEMIRROR_VM_SHORT:-}" ]; then
  lm_phase "boot 2: the installed disk as root"
  lm_boot_installed "$O" 180 "$O/initrd2.gz" "lm.mode=installed lm.token=$TOKEN"
  lm_phase_end
fi

lm_summary "$NAME"
