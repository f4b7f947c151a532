#!/bin/bash
# vm-seconds: 700 (expected time on the CI machine, warm cache; run-all.sh starts the longest first)
# Scenario live-iso-e2e: the whole journey on a real live medium.
#   host: a Debian tree (debootstrap bookworm + kernel, systemd, dracut, dracut-live, grub-pc;
#     cached) becomes a Fedora-style live ISO (tests/vm/live/build-iso.sh: ISO9660 labelled
#     LMLIVE, LiveOS/squashfs.img holding LiveOS/rootfs.img, livemirror and initrd-glue/ from the
#     Debian package, the initramfs by dracut with dmsquash-live and 90livemirror, GRUB on the
#     ISO); cached, keyed by everything that went into it.
#   boot 0: the ISO (kernel and initramfs taken from it) without rd.livemirror: dmsquash-live's
#     live-rw is the root, nothing of livemirror runs.
#   boot 0b: the same with rd.live.overlay.overlayfs rd.livemirror: an overlayfs root, which has no
#     block device to serve: the glue says so and steps aside, livemirror-install refuses, the
#     disk stays blank.
#   boot 1: the firmware boots the CD, the ISO's GRUB boots root=live:CDLABEL=LMLIVE
#     rd.live.image rd.livemirror: dmsquash-live builds live-rw, the dracut module serves it over
#     /dev/nbd0, the system switches to it; under a write load `livemirror-install /dev/vda`
#     (partition, trim, copy, verify, detach, release the live stack and eject the CD, grow,
#     fstab, initramfs, GRUB); `systemctl poweroff` through dracut's shutdown.
#   host: QEMU's own word (QMP) that the tray was opened; the shutdown detached livemirror;
#     e2fsck -fn and every file's sha256 on the installed partition; GRUB in the MBR.
#   boot 2: no kernel, no initrd, no CD: SeaBIOS boots the disk's GRUB, the installed system
#     reaches its default target, every file is there; e2fsck -fn again.
# Usage: LIVEMIRROR_BIN=path/to/livemirror tests/vm/live-iso-e2e.sh   (root: debootstrap, chroot)
# Knobs: LIVEMIRROR_VM_TIMEOUT (boot 1 host timeout, default 1500 s), LIVEMIRROR_VM_SMP (1),
#        LIVEMIRROR_VM_MEM (1024), LIVEMIRROR_VM_REBUILD=1 (build the ISO even if cached), the
#        lib.sh knobs.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

NAME=live-iso-e2e
BIN=${LIVEMIRROR_BIN:-$LM_DIR/../../target/release/livemirror}
TIMEOUT1=${LIVEMIRROR_VM_TIMEOUT:-1500}
# shellcheck disable=SC2034 # read by lib.sh's lm_qemu
LM_SMP=${LIVEMIRROR_VM_SMP:-1}   # one host core per QEMU
# shellcheck disable=SC2034
LM_MEM=${LIVEMIRROR_VM_MEM:-1024}
LABEL=LMLIVE
VDA_MB=1280
# The live tree: debootstrap's part, then what apt installs into it (lib.sh).
LIVE_INCLUDE=$LM_LIVE_INCLUDE
LIVE_APT=$LM_LIVE_APT

[ -x "$BIN" ] || lm_die "no livemirror binary at $BIN (cargo build --release, or set LIVEMIRROR_BIN)"
[ "$(id -u)" = 0 ] || lm_die "$NAME needs root (debootstrap, chroot)"
lm_need mksquashfs:squashfs-tools xorriso:xorriso sfdisk:fdisk python3:python3 debootstrap:debootstrap \
  || lm_die "host tools missing (see above)"
lm_prepare || exit 1
lm_phase "prepare: the live tree (debootstrap + dracut, kernel, GRUB; cached)"
lm_lock_cache
lm_fetch_rootfs "live-$LM_SUITE" "$LIVE_INCLUDE" "$LIVE_APT" || { lm_unlock_cache; lm_die "cannot build the live tree (see above)"; }
lm_unlock_cache
lm_phase_end
lm_outdir "$NAME"
O=$LM_OUT
lm_say "$NAME: binary $BIN, live tree $LM_ROOTFS, output $O"

# ------------------------------------------------------------------ the ISO (cached by its inputs)
lm_phase "build: the live ISO (cached by its inputs)"
lm_livemirror_deb "$BIN" "$O/deb" || lm_die "building the livemirror package failed"
KEY=$( {
  cat "$LM_ROOTFS.complete"; echo "label $LABEL"
  sha256sum "$BIN" "$LM_LIVEMIRROR_DEB" | cut -d' ' -f1
  (cd "$LM_DIR/../.." && find initrd-glue tests/vm/live -type f | sort | xargs sha256sum)
  (cd "$LM_DIR" && sha256sum guest/common.sh guest/load.sh guest/watchdog.sh guest/live-e2e.sh)
} | sha256sum | cut -c1-16)
ISO=$LM_CACHE/live-iso/$KEY
lm_lock_cache
if [ -f "$ISO/.complete" ] && [ -z "${LIVEMIRROR_VM_REBUILD:-}" ]; then
  lm_say "cached ISO $ISO/live.iso"
else
  # Only the newest ISO is kept: each is ~150 MiB and a new binary makes a new one.
  rm -rf --one-file-system "$LM_CACHE/live-iso"; mkdir -p "$ISO.tmp"
  TOKEN=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
  if ! bash "$LM_DIR/live/build-iso.sh" "$LM_ROOTFS" "$ISO.tmp" "$LM_LIVEMIRROR_DEB" "$LABEL" "$TOKEN"; then
    lm_unlock_cache; lm_die "building the live ISO failed (logs in $ISO.tmp)"
  fi
  echo "$TOKEN" > "$ISO.tmp/token"
  touch "$ISO.tmp/.complete"; mv "$ISO.tmp" "$ISO"
fi
lm_unlock_cache
TOKEN=$(cat "$ISO/token")
KVER=$(cat "$ISO/kver")
for f in usr/sbin/livemirror usr/lib/livemirror/initrd.sh hooks/pre-mount/50-livemirror-pre-mount.sh \
         hooks/shutdown/10-livemirror-shutdown.sh dmsquash-live-root /nbd.ko /sr_mod.ko /isofs.ko /squashfs.ko; do
  if grep -q "$f" "$ISO/initrd.list"; then lm_ok "the live initramfs (dracut) has $f"; else lm_fail "the live initramfs lacks $f"; fi
done
rm -f "$O/vda.img"; truncate -s "${VDA_MB}M" "$O/vda.img"
lm_say "ISO $(du -m "$ISO/live.iso" | cut -f1) MiB (kernel $KVER, token $TOKEN); blank disk ${VDA_MB} MiB"
lm_phase_end

# The CD drive: IDE, so that the blank disk is the only virtio disk (/dev/vda) and so that the
# firmware and the guest eject it the way a real drive is ejected.
CD=(-drive "if=none,id=cd0,file=$ISO/live.iso,media=cdrom,readonly=on" -device "ide-cd,drive=cd0,id=cdrom0")
DISK=(-drive "file=$O/vda.img,if=virtio,format=raw")
# check_boot LOG MODE: the guest ran the expected mode of live-e2e.sh on this ISO's root.
check_boot() {
  local m t
  m=$(lm_marker "$1" mode) t=$(lm_marker "$1" token)
  [ "$m" = "$2" ] && lm_ok "$(basename "$1"): the guest ran in mode $2" || lm_fail "$(basename "$1"): guest mode '$m', expected $2"
  [ "$t" = "$TOKEN" ] && lm_ok "$(basename "$1"): the root is this ISO's (token $TOKEN)" || lm_fail "$(basename "$1"): token '$t', expected $TOKEN"
}
# The installed partition as a file of its own (e2fsck and debugfs take no offset).
extract_part() {
  local start size
  read -r start size < <(sfdisk -d "$O/vda.img" 2>/dev/null | sed -n 's/^[^:]*1 : start= *\([0-9]*\), size= *\([0-9]*\).*/\1 \2/p')
  [ -n "${start:-}" ] || { lm_fail "no partition 1 on vda.img: $(sfdisk -d "$O/vda.img" 2>&1 | tr '\n' ' ')"; return 1; }
  rm -f "$O/part1.img"
  dd if="$O/vda.img" of="$O/part1.img" bs=4M iflag=skip_bytes,count_bytes skip=$((start * 512)) count=$((size * 512)) conv=sparse status=none
}

# ------------------------------------------------------------------ boot 0: no rd.livemirror
lm_phase "boot 0: the ISO without rd.livemirror (dmsquash-live's live-rw is the root)"
set +e
lm_qemu "$O/boot0.log" 420 -monitor none -kernel "$ISO/vmlinuz" -initrd "$ISO/initrd.img" \
  -append "root=live:CDLABEL=$LABEL rd.live.image console=ttyS0 panic=-1 loglevel=4" "${CD[@]}" "${DISK[@]}"
RC=$?
set -e
[ "$RC" = 0 ] || lm_fail "boot 0: QEMU exited $RC"
lm_judge "$O/boot0.log" || true
check_boot "$O/boot0.log" plain
lm_phase_end

# ------------------------------------------------------------------ boot 0b: an overlayfs root
lm_phase "boot 0b: the ISO with rd.live.overlay.overlayfs rd.livemirror (no block device to serve)"
set +e
lm_qemu "$O/boot0b.log" 420 -monitor none -kernel "$ISO/vmlinuz" -initrd "$ISO/initrd.img" \
  -append "root=live:CDLABEL=$LABEL rd.live.image rd.live.overlay.overlayfs rd.livemirror console=ttyS0 panic=-1 loglevel=4" \
  "${CD[@]}" "${DISK[@]}"
RC=$?
set -e
[ "$RC" = 0 ] || lm_fail "boot 0b: QEMU exited $RC"
lm_judge "$O/boot0b.log" || true
check_boot "$O/boot0b.log" overlayfs
if grep -aq "livemirror: this live medium's root is overlayfs" "$O/boot0b.log.txt"; then
  lm_ok "boot 0b: the console shows the glue's overlayfs message"
else
  lm_fail "boot 0b: no overlayfs message from the glue on the console"
fi
if cmp -s "$O/vda.img" <(head -c $((VDA_MB * 1048576)) /dev/zero); then lm_ok "host: vda.img is still all zeroes"; else lm_fail "host: boot 0b wrote to vda.img"; fi
lm_phase_end

# ------------------------------------------------------------------ boot 1: the live session, the install
lm_phase "boot 1: the CD's GRUB, live root over livemirror, livemirror-install, poweroff"
rm -f "$O/qmp.sock" "$O/qmp.log"
set +e
lm_qemu "$O/boot1.log" "$TIMEOUT1" -monitor none -qmp "unix:$O/qmp.sock,server=on,wait=off" "${CD[@]/%id=cdrom0/id=cdrom0,bootindex=0}" "${DISK[@]}" &
QPID=$!
python3 "$LM_DIR/qmp-watch.py" "$O/qmp.sock" "$O/qmp.log" &
WPID=$!
wait "$QPID"; RC=$?
wait "$WPID"; WRC=$?
set -e
[ "$RC" = 0 ] || lm_fail "boot 1: QEMU exited $RC$([ "$RC" = 124 ] && echo " (host timeout ${TIMEOUT1}s)")"
[ "$WRC" = 0 ] || lm_fail "the QMP watcher exited $WRC"
BOOT1_OK=1
lm_judge "$O/boot1.log" || BOOT1_OK=
grep -aq 'LMTEST DONE' "$O/boot1.log.txt" || BOOT1_OK=
check_boot "$O/boot1.log" live
lm_phase_end
lm_say "boot 1: livemirror-install took $(lm_marker "$O/boot1.log" install_secs)s"
if [ -z "$BOOT1_OK" ]; then
  lm_say "boot 1 failed: skipping the host checks and boot 2 (serial log: $O/boot1.log)"
  lm_summary "$NAME"; exit 1
fi

# ------------------------------------------------------------------ host: the CD, the shutdown, the disk
lm_phase "host: QMP tray state, shutdown path, e2fsck + debugfs on the installed partition"
L=$O/boot1.log.txt
grep -aq 'LMTEST INFO: install:.*ejected /dev/sr0' "$L" && lm_ok "the installer says it ejected /dev/sr0" \
  || lm_fail "the installer did not eject /dev/sr0"
if python3 - "$O/qmp.log" <<'EOF'
import json, sys
# The guest's eject must open the tray (DEVICE_TRAY_MOVED for cdrom0), QEMU's own query-block
# right after must say so, and nothing may close it again before the power-off.
opened = closed_after = False
queried_open = None
for line in open(sys.argv[1]):
    r = json.loads(line)
    d = r["data"]
    if r["kind"] == "event" and d.get("event") == "DEVICE_TRAY_MOVED" and d["data"].get("id") == "cdrom0":
        if d["data"]["tray-open"]:
            opened = True
        elif opened:
            closed_after = True
    if r["kind"].startswith("query-block after") and opened and queried_open is None:
        cd = [b for b in d if b.get("qdev") == "cdrom0"]
        queried_open = bool(cd) and cd[0].get("tray_open") is True
print(f"qmp: tray opened by the guest: {opened}; query-block tray_open: {queried_open}; closed again: {closed_after}")
sys.exit(0 if opened and queried_open and not closed_after else 1)
EOF
then
  lm_ok "QMP: the guest opened the CD tray (DEVICE_TRAY_MOVED, query-block tray_open) and it stayed open until the power-off"
else
  lm_fail "QMP: the CD was not ejected (see $O/qmp.log)"
fi
for pat in "livemirror: disconnected /dev/nbd0" "livemirror: the daemon stopped"; do
  if grep -aqF "$pat" "$L"; then lm_ok "shutdown: console says \"$pat\""; else lm_fail "shutdown: no \"$pat\" on the console"; fi
done
if dd if="$O/vda.img" bs=512 count=1 status=none | grep -aq GRUB; then lm_ok "host: GRUB's boot code is in vda's MBR"; else lm_fail "host: no GRUB in vda's MBR"; fi
if extract_part; then
  lm_host_check_files "$O/part1.img" pre copy after
  STATE=$(dumpe2fs -h "$O/part1.img" 2>/dev/null | awk -F: '/^Filesystem state/{gsub(/^ +/,"",$2); print $2}')
  [ "$STATE" = clean ] && lm_ok "the installed file system was unmounted cleanly (state: clean)" || lm_fail "file system state: $STATE"
fi
lm_phase_end

# ------------------------------------------------------------------ boot 2: the disk alone
lm_phase "boot 2: no kernel, no initrd, no CD: SeaBIOS boots the disk's own GRUB"
set +e
lm_qemu "$O/boot2.log" 420 -monitor none -drive "file=$O/vda.img,if=virtio,format=raw"
RC=$?
set -e
[ "$RC" = 0 ] || lm_fail "boot 2: QEMU exited $RC"
lm_judge "$O/boot2.log" || true
check_boot "$O/boot2.log" installed
if extract_part; then
  if e2fsck -fn "$O/part1.img" > "$O/e2fsck2.log" 2>&1; then
    lm_ok "e2fsck -fn after boot 2: clean"
  else
    lm_fail "e2fsck -fn after boot 2 reported problems: $(tail -n 3 "$O/e2fsck2.log" | tr '\n' ' ')"
  fi
  B2=$(debugfs -R "cat /data/boot2.bin" "$O/part1.img" 2>/dev/null | sha256sum | cut -d' ' -f1)
  lm_check "host: the file boot 2 wrote is on the disk" bash -c "debugfs -R 'cat /data/boot2.sha256' '$O/part1.img' 2>/dev/null | grep -q '^$B2 '"
fi
rm -f "$O/part1.img"
lm_phase_end

lm_summary "$NAME"
