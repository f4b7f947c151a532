#!/bin/bash
# vm-seconds: 600 (expected time on the CI machine, warm cache; run-all.sh starts the longest first)
# Scenario glue-e2e: initrd-glue/ exercised the way a user would, on a Debian system whose
# initramfs initramfs-tools makes, from the live session to an installed system, and then the
# installed system's root moved onto another disk.
#   host: a Debian root (debootstrap bookworm minbase + systemd, initramfs-tools, busybox,
#     dmsetup, fdisk, dosfstools, then GRUB for BIOS, systemd-boot, efibootmgr; cached), a copy
#     of it gets the rig's kernel (vmlinuz in /boot, the modules its initramfs needs),
#     livemirror and the glue (the Debian package, dpkg -i), plus a TEST-ONLY hook that builds
#     the live stack (read-only disk + RAM overlay -> dm snapshot /dev/mapper/live-rw) in place
#     of dracut's dmsquash-live; the real mkinitramfs runs in the chroot for the rig's kernel.
#   boot 1 (-kernel): that initramfs: lmtest-live builds live-rw, the glue starts @livemirror on
#     it and mounts /dev/nbd0 as root; systemd boots; a service runs `livemirror-install
#     --partition-table gpt /dev/vdb` under a write load (GPT with a BIOS boot partition, the
#     initramfs by update-initramfs, GRUB for BIOS) and checks the result, then `systemctl
#     poweroff`: systemd pivots into /run/initramfs and the glue's shutdown program unmounts the
#     root, disconnects /dev/nbd0 and stops the daemon.
#   host: the shutdown lines on the console, e2fsck -fn of the installed partition (clean),
#     file system size, debugfs extracts the files and checks their sha256.
#   boot 2: disk A (the installed disk) alone, no kernel from the host: SeaBIOS boots its GRUB;
#     every file is there, /etc/fstab mounts / by UUID. Then what a user does once before moving
#     an installed root: the kernel options rd.livemirror livemirror.source=/dev/disk/by-partuuid/..
#     (here in /etc/default/grub.d, update-grub).
#   boot 3: disk A and a blank disk B; GRUB boots A with livemirror serving A's root partition;
#     under a write load `livemirror-install /dev/vdb` moves the running root onto B (MBR, GRUB).
#   boot 4: disk B alone: its GRUB boots it without livemirror; every file of every phase is
#     there. The host checks both file systems.
# With LIVEMIRROR_VM_GLUE_TARGET=partition (scenario glue-partition-e2e) the machine is UEFI
# (OVMF): the host gives vdb a GPT with an empty EFI system partition and an empty root
# partition, boot 1 runs `livemirror-install --bootloader systemd-boot /dev/vdb2` (the ESP is
# formatted, systemd-boot and the kernel go on it, the NVRAM gets a boot entry), boot 2 starts
# with a fresh variable store, so the firmware finds the disk's EFI/BOOT/BOOTX64.EFI
# (systemd-boot) by itself; the move's one boot goes through /etc/kernel/cmdline and
# kernel-install, the move picks systemd-boot by itself and puts disk B's ESP on /boot/efi, and
# boot 4 starts from disk B with a fresh variable store.
# With LIVEMIRROR_VM_GLUE_DOOR=ublk (scenario glue-ublk-e2e) it boots Debian 12's 6.12 kernel,
# whose ublk_drv the glue's hook puts into the initramfs, and the glue's default
# livemirror.kernel=auto takes ublk: the live root is /dev/ublkb0; grow is refused there (no
# online resize before Linux 6.16), so livemirror-install leaves the growth to the first boot
# (x-systemd.growfs in fstab): boot 2's systemd grows the file system; the shutdown stops the
# daemon and removes /dev/ublkb0. The livemirror@ service check (NBD) is left to glue-e2e, and
# so is the move (boots 3 and 4; LIVEMIRROR_VM_GLUE_MOVE=1 runs it over ublk too).
# Usage: LIVEMIRROR_BIN=path/to/livemirror tests/vm/glue-e2e.sh   (root: debootstrap, chroot)
# Knobs: LIVEMIRROR_VM_GLUE_RATE (copy rate limit during the installs, default 40M),
#        LIVEMIRROR_VM_KEEPAPI=1 (test-only workaround for the switch_root path bug, see README),
#        LIVEMIRROR_VM_TIMEOUT (host timeout of each boot, default 1500 s), LIVEMIRROR_VM_BOOT2=0 (stop
#        after boot 1), LIVEMIRROR_VM_DRACUT=1 (also build a dracut initramfs with the dracut module
#        and check its contents; adds ~40 s), LIVEMIRROR_VM_GLUE_MODE=bootonly and
#        LIVEMIRROR_VM_GLUE_DEBUG=1 (see README.md), LIVEMIRROR_VM_GLUE_TARGET=disk|partition
#        (above), LIVEMIRROR_VM_GLUE_DOOR=nbd|ublk (above), LIVEMIRROR_VM_GLUE_MOVE=0|1 (boots 3
#        and 4; default 1, 0 with the ublk door), the lib.sh knobs.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

GTARGET=${LIVEMIRROR_VM_GLUE_TARGET:-disk}
case $GTARGET in
  disk) NAME=glue-e2e FIRMWARE=bios ;;
  partition) NAME=glue-partition-e2e FIRMWARE=uefi ;;
  *) echo "LIVEMIRROR_VM_GLUE_TARGET must be disk or partition, not $GTARGET" >&2; exit 2 ;;
esac
GDOOR=${LIVEMIRROR_VM_GLUE_DOOR:-nbd}
# shellcheck disable=SC2034  # LM_KSERIES is read by lib.sh: the 6.12 kernel has ublk_drv
case $GDOOR in
  nbd) KDEV=/dev/nbd0 ;;
  ublk) KDEV=/dev/ublkb0 NAME=${NAME/glue-/glue-ublk-} LM_KSERIES=6.12 ;;
  *) echo "LIVEMIRROR_VM_GLUE_DOOR must be nbd or ublk, not $GDOOR" >&2; exit 2 ;;
esac
BIN=${LIVEMIRROR_BIN:-$LM_DIR/../../target/release/livemirror}
RATE=${LIVEMIRROR_VM_GLUE_RATE:-40M}
TIMEOUT1=${LIVEMIRROR_VM_TIMEOUT:-1500}
KEEPAPI=${LIVEMIRROR_VM_KEEPAPI:-0}
GLUE=$LM_DIR/../../initrd-glue
# vda: the live image; vdb: disk A, the first install's target; vdc: disk B, the move's target.
VDA_MB=320 VDB_MB=512 VDC_MB=1024
# (over ublk the root cannot grow before the first boot: step 11's initramfs and GRUB, and the
# write load that runs through the whole install, need room on the live image's file system as
# it is; 320 MiB left them under 100 MiB, which a fast write load filled)
[ "$GDOOR" = ublk ] && VDA_MB=448
# The Debian root of these scenarios: what the installer runs on BIOS and UEFI besides the glue.
GLUE_INCLUDE="$LM_ROOTFS_PKGS,fdisk,dosfstools"
GLUE_APT="grub-pc systemd-boot efibootmgr"

[ -x "$BIN" ] || lm_die "no livemirror binary at $BIN (cargo build --release, or set LIVEMIRROR_BIN)"
[ "$(id -u)" = 0 ] || lm_die "$NAME needs root (debootstrap, chroot)"
lm_need sfdisk:fdisk || lm_die "host tools missing (see above)"
[ "$FIRMWARE" = uefi ] && { lm_need fsck.vfat:dosfstools mcopy:mtools || lm_die "host tools missing (see above)"; }
lm_prepare || exit 1
lm_phase "prepare: Debian root (debootstrap + GRUB, systemd-boot; cached)"
lm_lock_cache
lm_fetch_rootfs "glue-$LM_SUITE" "$GLUE_INCLUDE" "$GLUE_APT" || { lm_unlock_cache; lm_die "cannot build the Debian root (see above)"; }
lm_unlock_cache
lm_phase_end
lm_outdir "$NAME"
lm_say "$NAME: binary $BIN, rate $RATE, Debian root $LM_ROOTFS, output $LM_OUT"
O=$LM_OUT
OVMF_ARGS=()
# ovmf VARS: the UEFI firmware with the variable store VARS (fresh when it does not exist yet);
# nothing on BIOS.
ovmf() { [ "$FIRMWARE" = uefi ] || return 0; lm_ovmf "$1" || lm_die "no UEFI firmware (see above)"; OVMF_ARGS=("${LM_OVMF[@]}"); }

# ------------------------------------------------------------------ the system + its initramfs
lm_phase "build: install the glue, mkinitramfs in the chroot, disk images"
TOKEN=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
G=$O/root
cp -a "$LM_ROOTFS" "$G"
# The rig's kernel, as its package would install it: the image, config and System.map in /boot
# (the installer needs the running kernel there), the modules (indexed by the chroot's depmod).
mkdir -p "$G/lib/modules"
cp -a "$LM_MODDIR" "$G/lib/modules/$LM_KVER"
cp "$LM_VMLINUZ" "$LM_KROOT/boot/config-$LM_KVER" "$LM_KROOT/boot/System.map-$LM_KVER" "$G/boot/"
chroot "$G" /sbin/depmod -a "$LM_KVER" || lm_die "depmod in the chroot failed"
# livemirror and the glue: the Debian package, installed by the root's own dpkg.
{ lm_livemirror_deb "$BIN" "$O/deb" && lm_install_deb "$G" "$LM_LIVEMIRROR_DEB"; } > "$O/glue-install.log" 2>&1 \
  || { cat "$O/glue-install.log"; lm_die "installing the livemirror package failed"; }
# The man pages and completions the package holds, generated from the CLI definition, and the
# installer's parts beside the glue.
for f in usr/share/man/man1/livemirror.1.gz usr/share/man/man1/livemirror-serve.1.gz \
         usr/share/man/man1/livemirror-set-rate.1.gz usr/share/bash-completion/completions/livemirror \
         usr/share/zsh/vendor-completions/_livemirror usr/share/fish/vendor_completions.d/livemirror.fish \
         usr/lib/livemirror/install-common.sh usr/lib/livemirror/install-disk.sh \
         usr/lib/livemirror/install-release.sh usr/lib/livemirror/install-boot.sh; do
  [ -s "$G/$f" ] && lm_ok "the package installed /$f" || lm_fail "the package did not install /$f"
done
zgrep -q -e 'min\\-rate' -e 'min-rate' "$G/usr/share/man/man1/livemirror-set-rate.1.gz" \
  && grep -q 'set-rate' "$G/usr/share/bash-completion/completions/livemirror" \
  && lm_ok "the man page and the bash completion describe this binary's set-rate --min-rate" \
  || lm_fail "the installed man page or completion does not match the binary's CLI"
# The initramfs gets the virtio drivers by name (MODULES=list) instead of every storage driver the
# kernel has (Debian's default, most): the same update-initramfs, a fifth of its work, which
# under TCG is minutes (the installer runs it in the guest). The installer only treats dep apart.
echo 'MODULES=list # (livemirror VM test: see glue-e2e.sh)' > "$G/etc/initramfs-tools/conf.d/lmtest-modules"
printf 'virtio_pci\nvirtio_blk\n' >> "$G/etc/initramfs-tools/modules"
# The TEST-ONLY stand-in for a live-CD initrd (and the keepapi workaround, off by default).
install -m755 "$LM_DIR/glue/hooks/lmtest-live" "$G/etc/initramfs-tools/hooks/lmtest-live"
install -m755 "$LM_DIR/glue/scripts/init-premount/lmtest-live" "$G/etc/initramfs-tools/scripts/init-premount/lmtest-live"
install -m755 "$LM_DIR/glue/scripts/init-bottom/lmtest-keepapi" "$G/etc/initramfs-tools/scripts/init-bottom/lmtest-keepapi"
T=$(lm_now)
if ! chroot "$G" /usr/sbin/mkinitramfs -o "/boot/initrd.img-$LM_KVER" "$LM_KVER" > "$O/mkinitramfs.log" 2>&1; then
  cat "$O/mkinitramfs.log"; lm_die "mkinitramfs failed in the chroot"
fi
lm_say "mkinitramfs took $(lm_secs $(($(lm_now) - T)))s: $(du -k "$G/boot/initrd.img-$LM_KVER" | cut -f1) KiB"
if grep -q 'livemirror' "$O/mkinitramfs.log"; then
  lm_fail "mkinitramfs printed livemirror warnings: $(grep livemirror "$O/mkinitramfs.log" | tr '\n' ' ')"
fi
cp "$G/boot/initrd.img-$LM_KVER" "$O/initrd.img"
chroot "$G" /usr/bin/lsinitramfs "/boot/initrd.img-$LM_KVER" > "$O/initrd.list" 2>/dev/null || true
for f in usr/sbin/livemirror usr/lib/livemirror/initrd.sh usr/lib/livemirror/shutdown \
         usr/lib/livemirror/shutdown-files scripts/local-top/livemirror scripts/init-bottom/livemirror \
         scripts/init-premount/lmtest-live; do
  if grep -qx "$f" "$O/initrd.list"; then lm_ok "the generated initramfs has /$f"; else lm_fail "the generated initramfs lacks /$f"; fi
done
if grep -q '/nbd\.ko' "$O/initrd.list"; then lm_ok "the generated initramfs has the nbd module"; else lm_fail "no nbd.ko in the generated initramfs"; fi
if [ "$GDOOR" = ublk ]; then
  if grep -q '/ublk_drv\.ko' "$O/initrd.list"; then lm_ok "the generated initramfs has the ublk_drv module"; else lm_fail "no ublk_drv.ko in the generated initramfs"; fi
fi
# Optional (LIVEMIRROR_VM_DRACUT=1): the dracut module in a real dracut build. In a throwaway
# copy of the tree, dracut 059 from the package registry (dracut, dracut-core, dracut-live,
# unpacked: they conflict with initramfs-tools), the glue's dracut module, then
# `dracut --no-hostonly --add "dmsquash-live livemirror"`; the image must hold the binary, the
# glue, nbd.ko and the three hooks. It is not booted.
if [ "${LIVEMIRROR_VM_DRACUT:-0}" = 1 ]; then
  T=$(lm_now)
  lm_lock_cache
  lm_download dracut dracut-core dracut-live || { lm_unlock_cache; lm_die "cannot download dracut"; }
  lm_unlock_cache
  DR=$O/dracut-root
  cp -a "$G" "$DR"
  for p in dracut dracut-core dracut-live; do
    # tar, not dpkg -x: that would replace the root's /lib -> usr/lib symlink by a directory
    dpkg-deb --fsys-tarfile "$(lm_deb "$p")" | tar -x --keep-directory-symlink -C "$DR"
  done
  sh "$GLUE/install.sh" --root "$DR" --dracut >> "$O/glue-install.log" 2>&1 || lm_fail "install.sh --dracut failed"
  if chroot "$DR" /usr/bin/env PATH=/usr/sbin:/usr/bin:/sbin:/bin dracut --no-hostonly --force \
       --add "dmsquash-live livemirror" /boot/dracut.img "$LM_KVER" > "$O/dracut.log" 2>&1; then
    lm_ok "dracut built an initramfs with the livemirror module"
    chroot "$DR" /usr/bin/lsinitrd /boot/dracut.img > "$O/dracut.list" 2>/dev/null || true
    for f in usr/sbin/livemirror usr/lib/livemirror/initrd.sh usr/lib/dracut/hooks/cmdline/95-parse-livemirror.sh \
             usr/lib/dracut/hooks/pre-mount/50-livemirror-pre-mount.sh usr/lib/dracut/hooks/shutdown/10-livemirror-shutdown.sh \
             /nbd.ko usr/lib/dracut/hooks/cmdline/30-parse-dmsquash-live.sh; do
      if grep -q "$f" "$O/dracut.list"; then lm_ok "dracut image has $f"; else lm_fail "dracut image lacks $f"; fi
    done
  else
    lm_fail "dracut failed: $(tail -n 5 "$O/dracut.log" | tr '\n' ' ')"
  fi
  rm -rf "$DR"
  lm_say "dracut check took $(lm_secs $(($(lm_now) - T)))s"
fi
# The installed system builds its own initramfs (update-initramfs, in the guest): it keeps the
# modules that the one built here took, plus what /boot/efi needs (vfat) and efivarfs; the rest
# of the kernel's 90 MiB is left out of the image.
KEEP=$O/modules-keep
{ sed -n "s|^usr/lib/modules/$LM_KVER/||p; s|^lib/modules/$LM_KVER/||p" "$O/initrd.list" | grep '\.ko'
  (cd "$G/lib/modules/$LM_KVER" && find kernel/fs/fat kernel/fs/nls kernel/fs/efivarfs -name '*.ko*' 2>/dev/null)
} | sort -u > "$KEEP"
(cd "$G/lib/modules/$LM_KVER" && find kernel -name '*.ko*') | sort | comm -23 - "$KEEP" | (cd "$G/lib/modules/$LM_KVER" && xargs rm -f)
chroot "$G" /sbin/depmod -a "$LM_KVER" || lm_die "depmod in the chroot failed"
lm_say "kept $(wc -l < "$KEEP") kernel modules in the image ($(du -sm "$G/lib/modules/$LM_KVER" | cut -f1) MiB)"
# The guest side of the test: a service that runs after boot, quiet consoles, its settings.
mkdir -p "$G/lmtest"
install -m644 "$LM_GUEST"/{common,load,glue-stage2,watchdog}.sh "$G/lmtest/"
install -m644 "$LM_DIR/glue/lmtest-glue.service" "$G/etc/systemd/system/lmtest-glue.service"
ln -sf /etc/systemd/system/lmtest-glue.service "$G/etc/systemd/system/multi-user.target.wants/lmtest-glue.service"
for u in serial-getty@ttyS0.service getty@tty1.service getty-static.service apt-daily.timer apt-daily-upgrade.timer \
         e2scrub_all.timer e2scrub_reap.service fstrim.timer dpkg-db-backup.timer; do
  ln -sf /dev/null "$G/etc/systemd/system/$u"
done
# (the move is glue-e2e's and glue-partition-e2e's: over ublk it would add two long boots)
MOVE=${LIVEMIRROR_VM_GLUE_MOVE:-$([ "$GDOOR" = ublk ] && echo 0 || echo 1)}
# (a file, not kernel options: the installed system keeps the live session's options, and its
# later boots are told apart by /lmtest/stage, which each boot leaves for the next)
cat > "$G/lmtest/params" <<EOF
TOKEN=$TOKEN
RATE=$RATE
FIRMWARE=$FIRMWARE
GTARGET=$GTARGET
MOVE=$MOVE
DOOR=$GDOOR
WATCHDOG=$((TIMEOUT1 - 30))
EOF
echo "base-marker $TOKEN" > "$G/etc/base-marker"
echo "lmglue" > "$G/etc/hostname"
lm_ext4 "$G" "$O/vda.img" "${VDA_MB}M" -L lmglue
rm -rf "$G"
rm -f "$O/vdb.img" "$O/vdc.img"; truncate -s "${VDB_MB}M" "$O/vdb.img"; truncate -s "${VDC_MB}M" "$O/vdc.img"
if [ "$GTARGET" = partition ]; then
  # A disk partitioned beforehand, as a user with a UEFI machine has it: an EFI system partition
  # that holds nothing yet and an empty partition for the system. Neither counts as data.
  printf 'label: gpt\nstart=1MiB, size=128MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\nstart=129MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n' \
    | sfdisk -q "$O/vdb.img" || lm_die "sfdisk on vdb.img failed"
fi
lm_say "initrd $(du -k "$O/initrd.img" | cut -f1) KiB, vda ${VDA_MB} MiB ($(du -k "$O/vda.img" | cut -f1) KiB used), vdb ${VDB_MB} MiB, vdc ${VDC_MB} MiB"
lm_phase_end

# part_of IMG N: "IMG?offset=BYTES", partition N of IMG as e2fsprogs' tools name it.
part_of() {
  local start
  start=$(sfdisk -d "$1" 2>/dev/null | sed -n "s/^[^:]*[^0-9]$2 : start= *\([0-9]*\),.*/\1/p")
  [ -n "$start" ] && echo "$1?offset=$((start * 512))"
}
# fs_bytes IMG N, part_bytes IMG N: the size of the ext4 file system on partition N of IMG; of the partition.
fs_bytes() { dumpe2fs -h "$(part_of "$1" "$2")" 2>/dev/null | awk -F: '/^Block count/{gsub(/ /,"",$2); c=$2} /^Block size/{gsub(/ /,"",$2); s=$2} END{print c*s}'; }
part_bytes() { echo $(( $(sfdisk -d "$1" 2>/dev/null | sed -n "s/^[^:]*[^0-9]$2 : start= *[0-9]*, size= *\([0-9]*\),.*/\1/p") * 512 )); }
# check_installed_fs IMG N WHEN PHASES...: partition N of IMG: e2fsck -fn clean, state clean,
# grown to the partition (over ublk, after the install: not yet, the first boot grows it), the
# token, every manifest file, files of each PHASE.
check_installed_fs() {
  local img=$1 n=$2 when=$3 fs st psize fsize X p c; shift 3
  fs=$(part_of "$img" "$n") || { lm_fail "$when: no partition $n on $(basename "$img")"; return 0; }
  if e2fsck -fn "$fs" > "$O/e2fsck-$when.log" 2>&1; then lm_ok "$when: e2fsck -fn on $(basename "$img") partition $n: clean"
  else lm_fail "$when: e2fsck -fn reported problems: $(tail -n 3 "$O/e2fsck-$when.log" | tr '\n' ' ')"; fi
  st=$(dumpe2fs -h "$fs" 2>/dev/null | awk -F: '/^Filesystem state/{gsub(/^ +/,"",$2); print $2}')
  [ "$st" = clean ] && lm_ok "$when: the file system was unmounted cleanly (state: clean)" || lm_fail "$when: file system state: $st"
  psize=$(part_bytes "$img" "$n") fsize=$(fs_bytes "$img" "$n")
  if [ "$GDOOR" = ublk ] && [ "$when" = install ]; then
    # (grow was refused on the 6.12 kernel: the installed system's first boot grows it)
    if [ "$fsize" -lt $((psize * 95 / 100)) ]; then lm_ok "$when: the file system is not grown yet: $((fsize / 1048576)) of $((psize / 1048576)) MiB (the first boot grows it)"
    else lm_fail "$when: the file system on partition $n was grown although the ublk device could not grow"; fi
  elif [ "$fsize" -ge $((psize * 95 / 100)) ]; then lm_ok "$when: the file system fills its partition: $((fsize / 1048576)) of $((psize / 1048576)) MiB"
  else lm_fail "$when: the file system is $((fsize / 1048576)) MiB on a $((psize / 1048576)) MiB partition"; fi
  X=$O/files-$when
  rm -rf "$X"; mkdir -p "$X"
  debugfs -R "rdump /data $X" "$fs" >/dev/null 2>&1 || true
  debugfs -R "cat /etc/base-marker" "$fs" 2>/dev/null > "$X/base-marker" || true
  lm_check "$when: base image marker (token $TOKEN) on the disk" grep -q "$TOKEN" "$X/base-marker"
  if [ -s "$X/data/MANIFEST" ]; then
    if (cd "$X/data" && sha256sum --quiet -c MANIFEST > "$O/host-sha-$when.log" 2>&1); then
      lm_ok "$when: all $(wc -l < "$X/data/MANIFEST") manifest files intact"
    else
      lm_fail "$when: manifest mismatches: $(head -n 5 "$O/host-sha-$when.log" | tr '\n' ' ')"
    fi
    lm_check "$when: hot.bin matches its final sha256" bash -c "cd '$X/data' && sha256sum --quiet -c hot.sha256"
    for p in "$@"; do
      c=$(grep -c "^$p-" "$X/data/PHASES" || true)
      [ "$c" -gt 0 ] && lm_ok "$when: $c files from phase $p" || lm_fail "$when: no files from phase $p"
    done
  else
    lm_fail "$when: no /data/MANIFEST on the disk"
  fi
  rm -rf "$X"
}
# boot LOG TIMEOUT QEMU-ARGS...: one boot, judged; BOOT_OK when it finished without a failure.
boot() {
  local log=$1 tmo=$2 rc; shift 2
  set +e
  lm_qemu "$log" "$tmo" -monitor none "$@"
  rc=$?
  set -e
  [ "$rc" = 0 ] || lm_fail "$(basename "$log"): QEMU exited $rc$([ "$rc" = 124 ] && echo " (host timeout ${tmo}s)")"
  BOOT_OK=1
  lm_judge "$log" || BOOT_OK=
  grep -aq 'LMTEST DONE' "$log.txt" || BOOT_OK=
}
# stage_was LOG STAGE: the guest ran the stage the host expected.
stage_was() {
  local s; s=$(lm_marker "$1" stage)
  [ "$s" = "$2" ] && lm_ok "$(basename "$1"): the guest ran stage $2" || lm_fail "$(basename "$1"): guest stage '$s', expected $2"
}
# What the shutdown says about the kernel device: NBD is disconnected, ublk removed.
KLINE="livemirror: disconnected $KDEV"; [ "$GDOOR" = ublk ] && KLINE="livemirror: removed $KDEV"
shutdown_lines() {
  local pat
  for pat in "livemirror: shutdown: the old root is unmounted" "$KLINE" \
             "livemirror: the daemon stopped" "livemirror: shutdown: detached cleanly"; do
    if grep -aqF "$pat" "$1"; then lm_ok "shutdown: console says \"$pat\""; else lm_fail "shutdown: no \"$pat\" on the console"; fi
  done
}
stop_unless_ok() {
  [ -n "$BOOT_OK" ] && return 0
  lm_say "$1 failed: skipping the rest (serial log: $2)"
  lm_summary "$NAME"; exit 1
}

# ------------------------------------------------------------------ boot 1
lm_phase "boot 1: Debian live root over livemirror, livemirror-install, poweroff"
GMODE=${LIVEMIRROR_VM_GLUE_MODE:-glue}
APPEND="rw rd.livemirror=1 lmtest.live=/dev/vda livemirror.args=--nbd-timeout,10"
[ "$GMODE" = glue ] || APPEND="$APPEND lm.mode=$GMODE"
[ -n "${LIVEMIRROR_VM_GLUE_DEBUG:-}" ] && APPEND="$APPEND livemirror.debug=1"
[ "$KEEPAPI" = 1 ] && APPEND="$APPEND lmtest.keepapi=1"
ovmf "$O/vars1.fd"
boot "$O/boot1.log" "$TIMEOUT1" "${OVMF_ARGS[@]}" -kernel "$LM_VMLINUZ" -initrd "$O/initrd.img" \
  -append "console=ttyS0 panic=-1 loglevel=4 $APPEND${LIVEMIRROR_VM_TOLERATE:+ lm.tolerate=$LIVEMIRROR_VM_TOLERATE}" \
  -drive "file=$O/vda.img,if=virtio,format=raw,readonly=on" -drive "file=$O/vdb.img,if=virtio,format=raw"
lm_phase_end
lm_say "boot 1: livemirror-install took $(lm_marker "$O/boot1.log" install_secs)s"
stop_unless_ok "boot 1" "$O/boot1.log"
if [ "$GMODE" = bootonly ]; then
  shutdown_lines "$O/boot1.log.txt"
  lm_summary "$NAME"; exit $?
fi
stage_was "$O/boot1.log" live

# ------------------------------------------------------------------ host: the shutdown + the disk
lm_phase "host: shutdown path, e2fsck + debugfs on disk A"
L=$O/boot1.log.txt
shutdown_lines "$L"
if grep -aq 'Successfully changed into root pivot' "$L" || grep -aqF 'livemirror: shutdown: detaching the root' "$L"; then
  lm_ok "systemd pivoted into /run/initramfs and ran the glue's shutdown program"
else
  lm_fail "systemd did not run /run/initramfs/shutdown"
fi
PT=$(sfdisk -d "$O/vdb.img" 2>&1)
if [ "$FIRMWARE" = bios ]; then
  [[ $PT == *"label: gpt"*"vdb.img1 : start=        2048, size=        2048, type=21686148-6449-6E6F-744E-656564454649"*"vdb.img2 : start=        4096,"* ]] \
    && lm_ok "disk A: GPT, 1 BIOS boot partition (1 MiB), 2 the root" || lm_fail "disk A's partition table: $(echo "$PT" | tr '\n' ' ')"
  dd if="$O/vdb.img" bs=512 count=1 status=none | grep -aq GRUB && lm_ok "disk A: GRUB's boot code in the protective MBR" || lm_fail "disk A: no GRUB boot code"
  # GRUB's core image is embedded in the BIOS boot partition (which was all zeroes before).
  NZ=$(dd if="$O/vdb.img" bs=512 skip=2048 count=2048 status=none | tr -d '\0' | wc -c)
  [ "$NZ" -gt 10000 ] && lm_ok "disk A: GRUB's core image in the BIOS boot partition ($NZ non-zero bytes)" \
    || lm_fail "disk A: the BIOS boot partition holds no core image ($NZ non-zero bytes)"
  ROOTN=2
else
  ROOTN=2
fi
check_installed_fs "$O/vdb.img" "$ROOTN" install pre install after
lm_phase_end
if [ "${LIVEMIRROR_VM_BOOT2:-1}" = 0 ]; then lm_summary "$NAME"; exit $?; fi

# check_esp IMG WHEN: partition 1 of IMG is a clean FAT file system with systemd-boot where the
# firmware looks for it.
check_esp() {
  local esp=$O/esp.img s n f
  read -r s n < <(sfdisk -d "$1" | sed -n 's/^[^:]*1 : start= *\([0-9]*\), size= *\([0-9]*\).*/\1 \2/p')
  dd if="$1" of="$esp" bs=512 skip="$s" count="$n" status=none
  fsck.vfat -n "$esp" > "$O/fsck-vfat-$2.log" 2>&1 && lm_ok "$2: fsck.vfat -n on the ESP: clean" \
    || lm_fail "$2: fsck.vfat -n on the ESP: $(tail -n 3 "$O/fsck-vfat-$2.log" | tr '\n' ' ')"
  for f in EFI/BOOT/BOOTX64.EFI EFI/systemd/systemd-bootx64.efi; do
    mcopy -n -i "$esp" "::/$f" "$O/f" 2>/dev/null && [ -s "$O/f" ] && lm_ok "$2: the ESP holds /$f" || lm_fail "$2: the ESP lacks /$f"
    rm -f "$O/f"
  done
  rm -f "$esp"
}

# ------------------------------------------------------------------ boot 2: disk A by firmware alone
if [ "$FIRMWARE" = uefi ]; then
  lm_phase "boot 2: disk A alone, a fresh variable store: OVMF starts EFI/BOOT/BOOTX64.EFI (systemd-boot)"
  ovmf "$O/vars2.fd"
else
  lm_phase "boot 2: disk A alone, no kernel from the host: SeaBIOS boots its GRUB"
fi
boot "$O/boot2.log" "$TIMEOUT1" "${OVMF_ARGS[@]}" -drive "file=$O/vdb.img,if=virtio,format=raw"
stage_was "$O/boot2.log" installed
[ "$FIRMWARE" = uefi ] && check_esp "$O/vdb.img" "disk A"
# (boot 2 wrote a file: e2fsck again after it)
FS=$(part_of "$O/vdb.img" "$ROOTN")
e2fsck -fn "$FS" > "$O/e2fsck-boot2.log" 2>&1 && lm_ok "e2fsck -fn after boot 2: clean" || lm_fail "e2fsck -fn after boot 2: $(tail -n 3 "$O/e2fsck-boot2.log" | tr '\n' ' ')"
PSIZE=$(part_bytes "$O/vdb.img" "$ROOTN") FSIZE=$(fs_bytes "$O/vdb.img" "$ROOTN")
[ "$FSIZE" -ge $((PSIZE * 95 / 100)) ] && lm_ok "after boot 2 the file system fills its partition: $((FSIZE / 1048576)) of $((PSIZE / 1048576)) MiB" \
  || lm_fail "after boot 2 the file system is $((FSIZE / 1048576)) MiB on a $((PSIZE / 1048576)) MiB partition"
lm_phase_end
stop_unless_ok "boot 2" "$O/boot2.log"
[ "$MOVE" = 1 ] || { lm_summary "$NAME"; exit $?; }

# ------------------------------------------------------------------ boot 3: the installed root moves to disk B
# (UEFI: the machine keeps its variable store from boot 2)
lm_phase "boot 3: disk A boots with livemirror serving its root; livemirror-install moves it onto disk B"
boot "$O/boot3.log" "$TIMEOUT1" "${OVMF_ARGS[@]}" -drive "file=$O/vdb.img,if=virtio,format=raw" -drive "file=$O/vdc.img,if=virtio,format=raw"
stage_was "$O/boot3.log" move
shutdown_lines "$O/boot3.log.txt"
lm_phase_end
lm_say "boot 3: the move took $(lm_marker "$O/boot3.log" install_secs)s"
stop_unless_ok "boot 3" "$O/boot3.log"
lm_phase "host: disk B after the move"
PT=$(sfdisk -d "$O/vdc.img" 2>&1)
if [ "$FIRMWARE" = uefi ]; then
  [[ $PT == *"label: gpt"*"vdc.img1 : start=        2048, size=     1048576, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B"*"vdc.img2 : start=     1050624,"* ]] \
    && lm_ok "disk B: GPT, 1 EFI system partition (512 MiB, systemd-boot's size), 2 the root" || lm_fail "disk B's partition table: $(echo "$PT" | tr '\n' ' ')"
  check_esp "$O/vdc.img" "disk B"
  BROOT=2
else
  [[ $PT == *"label: dos"*"vdc.img1 : start=        2048,"*"type=83, bootable"* ]] \
    && lm_ok "disk B: MBR, the root from 1 MiB, bootable" || lm_fail "disk B's partition table: $(echo "$PT" | tr '\n' ' ')"
  dd if="$O/vdc.img" bs=512 count=1 status=none | grep -aq GRUB && lm_ok "disk B: GRUB in the MBR" || lm_fail "disk B: no GRUB in the MBR"
  BROOT=1
fi
check_installed_fs "$O/vdc.img" "$BROOT" move pre install after premove move postmove
lm_phase_end

# ------------------------------------------------------------------ boot 4: disk B alone
if [ "$FIRMWARE" = uefi ]; then
  lm_phase "boot 4: disk B alone, a fresh variable store: its systemd-boot boots the moved system, no livemirror"
  ovmf "$O/vars4.fd"
else
  lm_phase "boot 4: disk B alone: its GRUB boots the moved system, no livemirror"
fi
boot "$O/boot4.log" "$TIMEOUT1" "${OVMF_ARGS[@]}" -drive "file=$O/vdc.img,if=virtio,format=raw"
stage_was "$O/boot4.log" moved
[ "$FIRMWARE" = uefi ] && check_esp "$O/vdc.img" "disk B after boot 4"
FS=$(part_of "$O/vdc.img" "$BROOT")
e2fsck -fn "$FS" > "$O/e2fsck-boot4.log" 2>&1 && lm_ok "e2fsck -fn after boot 4: clean" || lm_fail "e2fsck -fn after boot 4: $(tail -n 3 "$O/e2fsck-boot4.log" | tr '\n' ' ')"
B2=$(debugfs -R "cat /data/boot4.bin" "$FS" 2>/dev/null | sha256sum | cut -d' ' -f1)
lm_check "host: the file boot 4 wrote is on disk B" bash -c "debugfs -R 'cat /data/boot4.sha256' '$FS' 2>/dev/null | grep -q '^$B2 '"
lm_phase_end

lm_summary "$NAME"
