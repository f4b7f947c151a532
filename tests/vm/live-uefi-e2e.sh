#!/bin/bash
# vm-seconds: 700 (expected time on the CI machine, warm cache; run-all.sh starts the longest first)
# Scenario live-uefi-e2e: the journey of live-iso-e2e on a UEFI machine, from the same hybrid ISO,
# on livemirror's own live stack (no device-mapper; live-iso-e2e keeps dmsquash-live's).
#   host: the live tree and the ISO, shared with live-iso-e2e (tests/vm/live/live-lib.sh: one
#     cached ISO, El Torito images for BIOS and for UEFI).
#   boot 1: OVMF (Debian's ovmf package, a blank variable store) boots the CD through its UEFI
#     El Torito image; the ISO's GRUB for UEFI starts its third entry, root=live:CDLABEL=LMLIVE
#     rd.livemirror rd.livemirror.overlay with the initramfs built without dmsquash-live and
#     device-mapper: livemirror serves LiveOS/rootfs.img from the squashfs read-only with its
#     overlay in RAM; the guest checks that no dm module is loaded and no /dev/mapper device
#     exists, fills the overlay to a small limit (writes refused, reads fine, / read-write, the
#     75/90 % and refusal events, fstrim gives room back), then, under a write load `livemirror-install --yes --wipe --json /dev/vda`: GPT
#     with an EFI system partition and the root, the copy, the release (CD ejected), the grow,
#     fstab (/ and /boot/efi), the initramfs by dracut, GRUB for x86_64-efi in EFI/debian and at
#     the removable-media path EFI/BOOT/BOOTX64.EFI, an NVRAM boot entry (OVMF's variables are
#     writable); the overlay deleted at detach-source and its RAM back (MemAvailable), the
#     squashfs and the CD released; the installer's --json stream is kept on the disk; `systemctl poweroff`
#     through dracut's shutdown.
#   host: the CD was ejected (QMP), the shutdown detached livemirror; GPT with the ESP and the
#     root; the ESP: fsck.vfat -n clean, BOOTX64.EFI and grubx64.efi in it (mtools); the root:
#     e2fsck -fn clean, every file's sha256; the JSON stream, parsed with python's json
#     (check-install-json.py): every step started and ended in order, progress during the copy
#     only and monotone, the result line matching the disk (partitions, UUIDs, size, firmware,
#     boot loader, initramfs).
#   boot 2: a fresh, empty variable store and only the disk (no kernel, no initrd, no CD): OVMF
#     finds no boot entry and starts the disk's EFI/BOOT/BOOTX64.EFI; the installed system reaches
#     its default target with /boot/efi mounted from the ESP, every file is there; the host runs
#     fsck.vfat -n and e2fsck -fn again.
# Usage: LIVEMIRROR_BIN=path/to/livemirror tests/vm/live-uefi-e2e.sh   (root: debootstrap, chroot)
# Knobs: LIVEMIRROR_VM_TIMEOUT (boot 1 host timeout, default 1500 s), LIVEMIRROR_VM_LIVE_ENTRY
#        (the ISO's GRUB entry boot 1 starts, default 2: livemirror's own overlay), LIVEMIRROR_VM_SMP (1), LIVEMIRROR_VM_MEM
#        (1024), LIVEMIRROR_VM_REBUILD=1, the lib.sh knobs.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

NAME=live-uefi-e2e
BIN=${LIVEMIRROR_BIN:-$LM_DIR/../../target/release/livemirror}
TIMEOUT1=${LIVEMIRROR_VM_TIMEOUT:-1500}
# shellcheck disable=SC2034 # read by lib.sh's lm_qemu
LM_SMP=${LIVEMIRROR_VM_SMP:-1}   # one host core per QEMU
# shellcheck disable=SC2034
LM_MEM=${LIVEMIRROR_VM_MEM:-1024}
VDA_MB=1280
. "$LM_DIR/live/live-lib.sh"
LIVE_ENTRY=${LIVEMIRROR_VM_LIVE_ENTRY:-2}   # the ISO's GRUB entry for livemirror's own overlay

[ -x "$BIN" ] || lm_die "no livemirror binary at $BIN (cargo build --release, or set LIVEMIRROR_BIN)"
[ "$(id -u)" = 0 ] || lm_die "$NAME needs root (debootstrap, chroot)"
live_prepare "$NAME"
lm_phase "build: the blank disk, a blank UEFI variable store"
rm -f "$O/vda.img" "$O/vars1.fd" "$O/vars2.fd"; truncate -s "${VDA_MB}M" "$O/vda.img"
lm_ovmf "$O/vars1.fd" || lm_die "no UEFI firmware (see above)"
lm_say "ISO $(du -m "$ISO/live.iso" | cut -f1) MiB (kernel $KVER, token $TOKEN); blank disk ${VDA_MB} MiB; OVMF $LM_OVMF_CODE"
lm_phase_end
live_cd_args
DISK=(-drive "file=$O/vda.img,if=virtio,format=raw")

# ------------------------------------------------------------------ boot 1: the live session, the install
lm_phase "boot 1: OVMF boots the CD (El Torito for UEFI), GRUB entry $LIVE_ENTRY, livemirror-install --json, poweroff"
live_boot_cd "$O/boot1.log" "$TIMEOUT1" "${LM_OVMF[@]}" "${DISK[@]}"
live_check_boot "$O/boot1.log" ovl
lm_phase_end
lm_say "boot 1: livemirror-install took $(lm_marker "$O/boot1.log" install_secs)s"
if [ -z "$BOOT_OK" ]; then
  lm_say "boot 1 failed: skipping the host checks and boot 2 (serial log: $O/boot1.log)"
  lm_summary "$NAME"; exit 1
fi
[ "$(lm_marker "$O/boot1.log" firmware)" = uefi ] && lm_ok "boot 1 ran on UEFI firmware (/sys/firmware/efi)" \
  || lm_fail "boot 1 did not run on UEFI: firmware=$(lm_marker "$O/boot1.log" firmware)"

# ------------------------------------------------------------------ host: the CD, the shutdown, the disk
lm_phase "host: QMP tray state, shutdown path, the GPT, fsck.vfat of the ESP, e2fsck + debugfs of the root"
live_check_install_console "$O/boot1.log.txt"
PT=$(sfdisk -d "$O/vda.img" 2>&1)
if [[ $PT == *"label: gpt"* ]] && [[ $PT == *"vda.img1 : start=        2048, size=      524288, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B"* ]] \
   && [[ $PT == *"vda.img2 : start=      526336,"*"type=0FC63DAF-8483-4772-8E79-3D69D8477DE4"* ]]; then
  lm_ok "host: vda is GPT: 1 EFI system partition (256 MiB from 1 MiB), 2 the root"
else
  lm_fail "host: vda's partition table: $(echo "$PT" | tr '\n' ' ')"
fi
# check_esp WHEN: partition 1 is a clean FAT file system with the boot loader where the firmware
# looks for it.
check_esp() {
  live_extract_part "$O/vda.img" 1 "$O/esp.img" || return 0
  if fsck.vfat -n "$O/esp.img" > "$O/fsck-vfat-$1.log" 2>&1; then
    lm_ok "fsck.vfat -n on the ESP $1: clean"
  else
    lm_fail "fsck.vfat -n on the ESP $1: $(tail -n 3 "$O/fsck-vfat-$1.log" | tr '\n' ' ')"
  fi
  local f
  ESP_UUID=$(blkid -p -o value -s UUID "$O/esp.img" 2>/dev/null)
  for f in EFI/BOOT/BOOTX64.EFI EFI/debian/grubx64.efi; do
    if mcopy -n -i "$O/esp.img" "::/$f" "$O/esp-file" 2>/dev/null && [ -s "$O/esp-file" ]; then
      lm_ok "the ESP holds /$f ($(stat -c %s "$O/esp-file") bytes) $1"
    else
      lm_fail "the ESP has no /$f $1"
    fi
    rm -f "$O/esp-file"
  done
  rm -f "$O/esp.img"
}
check_esp "after the install"
live_check_root_part "$O/vda.img" 2 pre copy after
# The JSON stream of `livemirror-install --json`, kept by the guest on the installed disk, read
# with a real JSON parser against what the host finds on the disk (check-install-json.py).
debugfs -R "cat /var/log/lmtest-install.jsonl" "$O/root.img" > "$O/install.jsonl" 2>/dev/null || true
ROOT_UUID=$(dumpe2fs -h "$O/root.img" 2>/dev/null | awk -F': *' '/^Filesystem UUID/{print $2}')
ROOT_BYTES=$(( $(sfdisk -d "$O/vda.img" | sed -n 's/^[^:]*2 : start= *[0-9]*, size= *\([0-9]*\),.*/\1/p') * 512 ))
if python3 "$LM_DIR/check-install-json.py" "$O/install.jsonl" "$ROOT_UUID" "$ESP_UUID" "$ROOT_BYTES" > "$O/json-check.log" 2>&1; then
  lm_ok "$(tail -n 1 "$O/json-check.log")"
else
  lm_fail "the installer's JSON stream: $(tail -n 3 "$O/json-check.log" | tr '\n' ' ')"
fi
lm_phase_end

# ------------------------------------------------------------------ boot 2: the disk alone, no boot entry
lm_phase "boot 2: a fresh variable store, no kernel, initrd or CD: OVMF starts EFI/BOOT/BOOTX64.EFI"
lm_ovmf "$O/vars2.fd"
set +e
lm_qemu "$O/boot2.log" 600 -monitor none "${LM_OVMF[@]}" -drive "file=$O/vda.img,if=virtio,format=raw"
RC=$?
set -e
[ "$RC" = 0 ] || lm_fail "boot 2: QEMU exited $RC"
lm_judge "$O/boot2.log" || true
live_check_boot "$O/boot2.log" installed
check_esp "after boot 2"
live_check_after_boot2 "$O/vda.img" 2
lm_phase_end

lm_summary "$NAME"
