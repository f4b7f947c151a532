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
VDA_MB=1280
. "$LM_DIR/live/live-lib.sh"
LABEL=$LIVE_LABEL

[ -x "$BIN" ] || lm_die "no livemirror binary at $BIN (cargo build --release, or set LIVEMIRROR_BIN)"
[ "$(id -u)" = 0 ] || lm_die "$NAME needs root (debootstrap, chroot)"
live_prepare "$NAME"
lm_phase "build: the blank disk"
rm -f "$O/vda.img"; truncate -s "${VDA_MB}M" "$O/vda.img"
lm_say "ISO $(du -m "$ISO/live.iso" | cut -f1) MiB (kernel $KVER, token $TOKEN); blank disk ${VDA_MB} MiB"
lm_phase_end

live_cd_args
DISK=(-drive "file=$O/vda.img,if=virtio,format=raw")
# ------------------------------------------------------------------ boot 0: no rd.livemirror
lm_phase "boot 0: the ISO without rd.livemirror (dmsquash-live's live-rw is the root)"
set +e
lm_qemu "$O/boot0.log" 420 -monitor none -kernel "$ISO/vmlinuz" -initrd "$ISO/initrd.img" \
  -append "root=live:CDLABEL=$LABEL rd.live.image console=ttyS0 panic=-1 loglevel=4" "${CD[@]}" "${DISK[@]}"
RC=$?
set -e
[ "$RC" = 0 ] || lm_fail "boot 0: QEMU exited $RC"
lm_judge "$O/boot0.log" || true
live_check_boot "$O/boot0.log" plain
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
live_check_boot "$O/boot0b.log" overlayfs
if grep -aq "livemirror: this live medium's root is overlayfs" "$O/boot0b.log.txt"; then
  lm_ok "boot 0b: the console shows the glue's overlayfs message"
else
  lm_fail "boot 0b: no overlayfs message from the glue on the console"
fi
if cmp -s "$O/vda.img" <(head -c $((VDA_MB * 1048576)) /dev/zero); then lm_ok "host: vda.img is still all zeroes"; else lm_fail "host: boot 0b wrote to vda.img"; fi
lm_phase_end

# ------------------------------------------------------------------ boot 1: the live session, the install
lm_phase "boot 1: SeaBIOS boots the CD, its GRUB entry $LIVE_ENTRY, live root over livemirror, livemirror-install, poweroff"
live_boot_cd "$O/boot1.log" "$TIMEOUT1" "${DISK[@]}"
live_check_boot "$O/boot1.log" live
lm_phase_end
lm_say "boot 1: livemirror-install took $(lm_marker "$O/boot1.log" install_secs)s"
if [ -z "$BOOT_OK" ]; then
  lm_say "boot 1 failed: skipping the host checks and boot 2 (serial log: $O/boot1.log)"
  lm_summary "$NAME"; exit 1
fi

# ------------------------------------------------------------------ host: the CD, the shutdown, the disk
lm_phase "host: QMP tray state, shutdown path, e2fsck + debugfs on the installed partition"
live_check_install_console "$O/boot1.log.txt"
if dd if="$O/vda.img" bs=512 count=1 status=none | grep -aq GRUB; then lm_ok "host: GRUB's boot code is in vda's MBR"; else lm_fail "host: no GRUB in vda's MBR"; fi
live_check_root_part "$O/vda.img" 1 pre copy after
lm_phase_end

# ------------------------------------------------------------------ boot 2: the disk alone
lm_phase "boot 2: no kernel, no initrd, no CD: SeaBIOS boots the disk's own GRUB"
set +e
lm_qemu "$O/boot2.log" 420 -monitor none -drive "file=$O/vda.img,if=virtio,format=raw"
RC=$?
set -e
[ "$RC" = 0 ] || lm_fail "boot 2: QEMU exited $RC"
lm_judge "$O/boot2.log" || true
live_check_boot "$O/boot2.log" installed
live_check_after_boot2 "$O/vda.img" 1
lm_phase_end

lm_summary "$NAME"
