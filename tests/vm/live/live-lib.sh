# shellcheck shell=bash
# tests/vm/live/live-lib.sh: what the live-medium scenarios share (live-iso-e2e: BIOS,
# live-uefi-e2e: UEFI): the live tree, the hybrid live ISO built from it (one cached ISO boots
# both ways), and the host's checks of the installed disk. Sourced after tests/vm/lib.sh.

LIVE_LABEL=LMLIVE
# The live tree's package lists are lib.sh's (benches/guest/live-stack.sh builds the same tree).
LIVE_INCLUDE=$LM_LIVE_INCLUDE
LIVE_APT=$LM_LIVE_APT
# The GRUB menu entry a firmware boot of the ISO starts (0: rd.livemirror; see live/grub.cfg).
# The ISO's GRUB reads it from the SMBIOS system serial number, so that a scenario picks the
# entry without another ISO.
LIVE_ENTRY=${LIVEMIRROR_VM_LIVE_ENTRY:-0}

# live_prepare NAME: the kernel and QEMU, the live tree, the ISO (built, or cached by its
# inputs: livemirror goes in as its Debian package, lm_livemirror_deb), an output dir. Sets ISO (its cache dir; live.iso, vmlinuz, initrd.img inside),
# TOKEN, KVER, O (= LM_OUT).
live_prepare() {
  local name=$1 key
  lm_need mksquashfs:squashfs-tools xorriso:xorriso sfdisk:fdisk python3:python3 debootstrap:debootstrap \
    mkfs.vfat:dosfstools fsck.vfat:dosfstools mcopy:mtools \
    || lm_die "host tools missing (see above)"
  lm_prepare || exit 1
  lm_phase "prepare: the live tree (debootstrap + dracut, kernel, GRUB; cached)"
  lm_lock_cache
  lm_fetch_rootfs "live-hybrid-$LM_SUITE" "$LIVE_INCLUDE" "$LIVE_APT" || { lm_unlock_cache; lm_die "cannot build the live tree (see above)"; }
  lm_unlock_cache
  lm_phase_end
  lm_outdir "$name"
  O=$LM_OUT
  lm_say "$name: binary $BIN, live tree $LM_ROOTFS, output $O"

  lm_phase "build: the hybrid live ISO (BIOS and UEFI; cached by its inputs)"
  lm_livemirror_deb "$BIN" "$O/deb" || lm_die "building the livemirror package failed"
  key=$( {
    cat "$LM_ROOTFS.complete"; echo "label $LIVE_LABEL"
    sha256sum "$BIN" "$LM_LIVEMIRROR_DEB" | cut -d' ' -f1
    (cd "$LM_DIR/../.." && find initrd-glue tests/vm/live -type f | sort | xargs sha256sum)
    (cd "$LM_DIR" && sha256sum guest/common.sh guest/load.sh guest/watchdog.sh guest/live-e2e.sh)
  } | sha256sum | cut -c1-16)
  ISO=$LM_CACHE/live-iso-hybrid/$key
  lm_lock_cache
  if [ -f "$ISO/.complete" ] && [ -z "${LIVEMIRROR_VM_REBUILD:-}" ]; then
    lm_say "cached ISO $ISO/live.iso"
  else
    # Only the newest ISO is kept: each is ~150 MiB and a new binary makes a new one. (The
    # hybrid tree and ISO have names of their own, so that a checkout of the BIOS-only rig
    # sharing the cache does not rebuild them, nor they its.)
    rm -rf --one-file-system "$LM_CACHE/live-iso-hybrid"; mkdir -p "$ISO.tmp"
    TOKEN=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
    if ! bash "$LM_DIR/live/build-iso.sh" "$LM_ROOTFS" "$ISO.tmp" "$LM_LIVEMIRROR_DEB" "$LIVE_LABEL" "$TOKEN"; then
      lm_unlock_cache; lm_die "building the live ISO failed (logs in $ISO.tmp)"
    fi
    echo "$TOKEN" > "$ISO.tmp/token"
    touch "$ISO.tmp/.complete"; mv "$ISO.tmp" "$ISO"
  fi
  lm_unlock_cache
  TOKEN=$(cat "$ISO/token")
  # shellcheck disable=SC2034 # (for the scenario that sourced this file)
  KVER=$(cat "$ISO/kver")
  local f
  for f in usr/sbin/livemirror usr/lib/livemirror/initrd.sh hooks/pre-mount/50-livemirror-pre-mount.sh \
           hooks/shutdown/10-livemirror-shutdown.sh dmsquash-live-root /nbd.ko /sr_mod.ko /isofs.ko /squashfs.ko; do
    if grep -q "$f" "$ISO/initrd.list"; then lm_ok "the live initramfs (dracut) has $f"; else lm_fail "the live initramfs lacks $f"; fi
  done
  # livemirror's own live stack: its initramfs has the glue's live mode and no device-mapper.
  for f in usr/lib/livemirror/live.sh dracut-livemirror-generator /nbd.ko /squashfs.ko /isofs.ko; do
    if grep -q "$f" "$ISO/initrd-overlay.list"; then lm_ok "the overlay initramfs has $f"; else lm_fail "the overlay initramfs lacks $f"; fi
  done
  for f in dmsquash-live-root /dm-mod.ko /dm-snapshot.ko bin/dmsetup; do
    if grep -q "$f" "$ISO/initrd-overlay.list"; then lm_fail "the overlay initramfs has $f"; else lm_ok "the overlay initramfs has no $f"; fi
  done
  # Both El Torito boot images: GRUB for BIOS, and the EFI system partition image with GRUB for UEFI.
  if xorriso -indev "$ISO/live.iso" -report_el_torito plain 2>/dev/null > "$O/eltorito.txt" &&
     grep -Eq 'El Torito boot img :.*BIOS' "$O/eltorito.txt" && grep -Eq 'El Torito boot img :.*UEFI' "$O/eltorito.txt"; then
    lm_ok "the ISO boots both ways: El Torito images for BIOS and UEFI"
  else
    lm_fail "the ISO lacks a BIOS or a UEFI El Torito image: $(tr '\n' ' ' < "$O/eltorito.txt")"
  fi
  lm_phase_end
}

# live_check_boot LOG MODE: the guest ran the expected mode of live-e2e.sh on this ISO's root.
live_check_boot() {
  local m t
  m=$(lm_marker "$1" mode) t=$(lm_marker "$1" token)
  [ "$m" = "$2" ] && lm_ok "$(basename "$1"): the guest ran in mode $2" || lm_fail "$(basename "$1"): guest mode '$m', expected $2"
  [ "$t" = "$TOKEN" ] && lm_ok "$(basename "$1"): the root is this ISO's (token $TOKEN)" || lm_fail "$(basename "$1"): token '$t', expected $TOKEN"
}

# live_extract_part IMG N OUT: partition N of the disk image IMG as a file of its own (e2fsck,
# debugfs and fsck.vfat take no offset).
live_extract_part() {
  local start size
  read -r start size < <(sfdisk -d "$1" 2>/dev/null | sed -n "s/^[^:]*[^0-9]$2 : start= *\([0-9]*\), size= *\([0-9]*\).*/\1 \2/p")
  [ -n "${start:-}" ] || { lm_fail "no partition $2 on $(basename "$1"): $(sfdisk -d "$1" 2>&1 | tr '\n' ' ')"; return 1; }
  rm -f "$3"
  dd if="$1" of="$3" bs=4M iflag=skip_bytes,count_bytes skip=$((start * 512)) count=$((size * 512)) conv=sparse status=none
}

# live_qmp_tray_check QMPLOG: the guest's eject opened cdrom0's tray (DEVICE_TRAY_MOVED), QEMU's
# own query-block right after says so, and nothing closed it again before the power-off.
live_qmp_tray_check() {
  if python3 - "$1" <<'EOF'
import json, sys
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
    lm_fail "QMP: the CD was not ejected (see $1)"
  fi
}

# live_check_root_part IMG N PHASES...: the installed root file system, partition N of IMG:
# e2fsck -fn clean, state clean, every file the live session wrote (lm_host_check_files).
live_check_root_part() {
  local img=$1 n=$2 state; shift 2
  live_extract_part "$img" "$n" "$O/root.img" || return 0
  lm_host_check_files "$O/root.img" "$@"
  state=$(dumpe2fs -h "$O/root.img" 2>/dev/null | awk -F: '/^Filesystem state/{gsub(/^ +/,"",$2); print $2}')
  [ "$state" = clean ] && lm_ok "the installed file system was unmounted cleanly (state: clean)" || lm_fail "file system state: $state"
}

# live_cd_args: the CD drive: IDE, so that the blank disk is the only virtio disk (/dev/vda) and
# so that the firmware and the guest eject it the way a real drive is ejected. Sets CD (array).
live_cd_args() {
  CD=(-drive "if=none,id=cd0,file=$ISO/live.iso,media=cdrom,readonly=on" -device "ide-cd,drive=cd0,id=cdrom0")
}

# live_boot_cd LOG TIMEOUT QEMU-ARGS...: the firmware boots the CD (boot index 0) and the ISO's
# GRUB starts entry LIVE_ENTRY; QEMU's QMP events are logged to $O/qmp.log meanwhile
# (qmp-watch.py). Judges the log; sets BOOT_OK when the guest finished without a failure.
live_boot_cd() {
  local log=$1 tmo=$2 rc wrc qpid wpid; shift 2
  rm -f "$O/qmp.sock" "$O/qmp.log"
  set +e
  lm_qemu "$log" "$tmo" -monitor none -qmp "unix:$O/qmp.sock,server=on,wait=off" \
    -smbios "type=1,serial=lmtest-entry=$LIVE_ENTRY" "${CD[@]/%id=cdrom0/id=cdrom0,bootindex=0}" "$@" &
  qpid=$!
  python3 "$LM_DIR/qmp-watch.py" "$O/qmp.sock" "$O/qmp.log" &
  wpid=$!
  wait "$qpid"; rc=$?
  wait "$wpid"; wrc=$?
  set -e
  [ "$rc" = 0 ] || lm_fail "$(basename "$log"): QEMU exited $rc$([ "$rc" = 124 ] && echo " (host timeout ${tmo}s)")"
  [ "$wrc" = 0 ] || lm_fail "the QMP watcher exited $wrc"
  BOOT_OK=1
  lm_judge "$log" || BOOT_OK=
  # shellcheck disable=SC2034 # (for the scenario that sourced this file)
  grep -aq 'LMTEST DONE' "$log.txt" || BOOT_OK=
}

# live_check_install_console LOG: what boot 1's console must show: the CD ejected by the
# installer and seen ejected by QEMU, the shutdown detaching livemirror.
live_check_install_console() {
  grep -aq 'LMTEST INFO: install:.*ejected /dev/sr0' "$1" && lm_ok "the installer says it ejected /dev/sr0" \
    || lm_fail "the installer did not eject /dev/sr0"
  live_qmp_tray_check "$O/qmp.log"
  local pat
  for pat in "livemirror: disconnected /dev/nbd0" "livemirror: the daemon stopped"; do
    if grep -aqF "$pat" "$1"; then lm_ok "shutdown: console says \"$pat\""; else lm_fail "shutdown: no \"$pat\" on the console"; fi
  done
}

# live_check_after_boot2 IMG N: partition N of IMG after the installed system's boot: e2fsck -fn
# clean and the file that boot wrote.
live_check_after_boot2() {
  local b2
  live_extract_part "$1" "$2" "$O/root.img" || return 0
  if e2fsck -fn "$O/root.img" > "$O/e2fsck2.log" 2>&1; then
    lm_ok "e2fsck -fn after boot 2: clean"
  else
    lm_fail "e2fsck -fn after boot 2 reported problems: $(tail -n 3 "$O/e2fsck2.log" | tr '\n' ' ')"
  fi
  b2=$(debugfs -R "cat /data/boot2.bin" "$O/root.img" 2>/dev/null | sha256sum | cut -d' ' -f1)
  lm_check "host: the file boot 2 wrote is on the disk" bash -c "debugfs -R 'cat /data/boot2.sha256' '$O/root.img' 2>/dev/null | grep -q '^$b2 '"
  rm -f "$O/root.img"
}
