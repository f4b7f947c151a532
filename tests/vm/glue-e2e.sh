#!/bin/bash
# vm-seconds: 160 (expected time on the CI machine, warm cache; run-all.sh starts the longest first)
# Scenario glue-e2e: initrd-glue/ exercised the way a user would.
#   host: a Debian root (debootstrap bookworm minbase + systemd, initramfs-tools, busybox,
#     dmsetup; cached), a copy of it gets the rig's kernel modules, livemirror and the glue
#     (the Debian package, dpkg -i), plus a TEST-ONLY hook that builds the live
#     stack (read-only disk + RAM overlay -> dm snapshot /dev/mapper/live-rw) in place of
#     dracut's dmsquash-live; the real mkinitramfs runs in the chroot for the rig's kernel.
#   boot 1: that initramfs: lmtest-live builds live-rw, the glue starts @livemirror on it and
#     mounts /dev/nbd0 as root; systemd boots; a service runs `livemirror-install /dev/vdb`
#     under a write load and checks the result (root on /dev/vdb's data, grown, source
#     released, every file intact), then `systemctl poweroff`: systemd pivots into
#     /run/initramfs and the glue's shutdown program unmounts the root, disconnects /dev/nbd0
#     and stops the daemon.
#   host: the shutdown lines on the console, e2fsck -fn of vdb (clean), file system size,
#     debugfs extracts the files and checks their sha256.
#   boot 2: vdb alone, root=/dev/vda with the same initramfs (no rd.livemirror): it boots and
#     every file is there, and /etc/fstab mounts / by its UUID.
# With LIVEMIRROR_VM_GLUE_TARGET=partition (scenario glue-partition-e2e) the host gives vdb an
# MBR partition table with one empty partition from 1 MiB, the install targets /dev/vdb1 (a
# partition TARGET: no --whole-disk) and boot 2 mounts root=/dev/vda1; otherwise the target is
# the whole disk (--whole-disk).
# With LIVEMIRROR_VM_GLUE_DOOR=ublk (scenario glue-ublk-e2e) it boots Debian 12's 6.12 kernel,
# whose ublk_drv the glue's hook puts into the initramfs, and the glue's default
# livemirror.kernel=auto takes ublk: the root is /dev/ublkb0; grow is refused there (no online
# resize before Linux 6.16), so livemirror-install leaves the growth to the first boot
# (x-systemd.growfs in fstab): boot 2's systemd grows the file system; the shutdown stops the
# daemon and removes /dev/ublkb0. The livemirror@ service check (NBD) is left to glue-e2e.
# Usage: LIVEMIRROR_BIN=path/to/livemirror tests/vm/glue-e2e.sh
# Knobs: LIVEMIRROR_VM_GLUE_RATE (copy rate limit during the install, default 40M),
#        LIVEMIRROR_VM_KEEPAPI=1 (test-only workaround for the switch_root path bug, see README),
#        LIVEMIRROR_VM_TIMEOUT (boot 1 host timeout, default 420 s), LIVEMIRROR_VM_BOOT2=0 (skip
#        boot 2), LIVEMIRROR_VM_DRACUT=1 (also build a dracut initramfs with the dracut module and
#        check its contents; adds ~40 s), LIVEMIRROR_VM_GLUE_MODE=bootonly and
#        LIVEMIRROR_VM_GLUE_DEBUG=1 (see README.md), LIVEMIRROR_VM_GLUE_TARGET=disk|partition
#        (above), the lib.sh knobs.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

GTARGET=${LIVEMIRROR_VM_GLUE_TARGET:-disk}
case $GTARGET in
  disk) NAME=glue-e2e TGT=/dev/vdb ROOT2=/dev/vda ;;
  partition) NAME=glue-partition-e2e TGT=/dev/vdb1 ROOT2=/dev/vda1 ;;
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
TIMEOUT1=${LIVEMIRROR_VM_TIMEOUT:-420}
KEEPAPI=${LIVEMIRROR_VM_KEEPAPI:-0}
GLUE=$LM_DIR/../../initrd-glue
VDA_MB=256 VDB_MB=384

[ -x "$BIN" ] || lm_die "no livemirror binary at $BIN (cargo build --release, or set LIVEMIRROR_BIN)"
lm_prepare || exit 1
lm_phase "prepare: Debian root (debootstrap, cached)"
lm_lock_cache
lm_fetch_rootfs || { lm_unlock_cache; lm_die "cannot build the Debian root (see above)"; }
lm_unlock_cache
lm_phase_end
lm_outdir "$NAME"
lm_say "$NAME: binary $BIN, rate $RATE, Debian root $LM_ROOTFS, output $LM_OUT"

# ------------------------------------------------------------------ the system + its initramfs
lm_phase "build: install the glue, mkinitramfs in the chroot, disk images"
O=$LM_OUT
TOKEN=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
G=$O/root
cp -a "$LM_ROOTFS" "$G"
# The rig's kernel, as its package would install it: the modules (indexed by the chroot's
# depmod: modprobe needs the binary indexes) and the config (mkinitramfs reads it).
mkdir -p "$G/lib/modules"
cp -a "$LM_MODDIR" "$G/lib/modules/$LM_KVER"
cp "$LM_KROOT/boot/config-$LM_KVER" "$LM_KROOT/boot/System.map-$LM_KVER" "$G/boot/"
chroot "$G" /sbin/depmod -a "$LM_KVER" || lm_die "depmod in the chroot failed"
# livemirror and the glue: the Debian package, installed by the root's own dpkg.
{ lm_livemirror_deb "$BIN" "$O/deb" && lm_install_deb "$G" "$LM_LIVEMIRROR_DEB"; } > "$O/glue-install.log" 2>&1 \
  || { cat "$O/glue-install.log"; lm_die "installing the livemirror package failed"; }
# The man pages and completions the package holds, generated from the CLI definition.
for f in usr/share/man/man1/livemirror.1.gz usr/share/man/man1/livemirror-serve.1.gz \
         usr/share/man/man1/livemirror-set-rate.1.gz usr/share/bash-completion/completions/livemirror \
         usr/share/zsh/vendor-completions/_livemirror usr/share/fish/vendor_completions.d/livemirror.fish; do
  [ -s "$G/$f" ] && lm_ok "the package installed /$f" || lm_fail "the package did not install /$f"
done
zgrep -q -e 'min\\-rate' -e 'min-rate' "$G/usr/share/man/man1/livemirror-set-rate.1.gz" \
  && grep -q 'set-rate' "$G/usr/share/bash-completion/completions/livemirror" \
  && lm_ok "the man page and the bash completion describe this binary's set-rate --min-rate" \
  || lm_fail "the installed man page or completion does not match the binary's CLI"
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
# The image does not need the kernel modules (they are in the initramfs).
rm -rf "$G/lib/modules/$LM_KVER"
# The guest side of the test: a service that runs after boot, quiet consoles.
mkdir -p "$G/lmtest"
install -m644 "$LM_GUEST"/{common,load,glue-stage2,watchdog}.sh "$G/lmtest/"
install -m644 "$LM_DIR/glue/lmtest-glue.service" "$G/etc/systemd/system/lmtest-glue.service"
ln -sf /etc/systemd/system/lmtest-glue.service "$G/etc/systemd/system/multi-user.target.wants/lmtest-glue.service"
for u in serial-getty@ttyS0.service getty@tty1.service getty-static.service apt-daily.timer apt-daily-upgrade.timer \
         e2scrub_all.timer e2scrub_reap.service fstrim.timer dpkg-db-backup.timer; do
  ln -sf /dev/null "$G/etc/systemd/system/$u"
done
echo "base-marker $TOKEN" > "$G/etc/base-marker"
echo "lmglue" > "$G/etc/hostname"
lm_ext4 "$G" "$O/vda.img" "${VDA_MB}M" -L lmglue
rm -rf "$G"
rm -f "$O/vdb.img"; truncate -s "${VDB_MB}M" "$O/vdb.img"
# FS: where the installed file system lands in vdb.img, as e2fsprogs' tools name it.
FS=$O/vdb.img FS_MB=$VDB_MB
if [ "$GTARGET" = partition ]; then
  # One empty partition from 1 MiB to the end: a target that holds no data, on a disk that
  # does hold a partition table (which a partition TARGET must not be refused for).
  echo 'start=2048, type=83' | sfdisk -q "$O/vdb.img" || lm_die "sfdisk on vdb.img failed"
  FS="$O/vdb.img?offset=1048576" FS_MB=$((VDB_MB - 1))
fi
lm_say "initrd $(du -k "$O/initrd.img" | cut -f1) KiB, vda ${VDA_MB} MiB ($(du -k "$O/vda.img" | cut -f1) KiB used), vdb ${VDB_MB} MiB"
lm_phase_end

# ------------------------------------------------------------------ boot 1
lm_phase "boot 1: Debian live root over livemirror, livemirror-install, poweroff"
GMODE=${LIVEMIRROR_VM_GLUE_MODE:-glue}
APPEND="rw rd.livemirror=1 lmtest.live=/dev/vda livemirror.args=--nbd-timeout,10 lm.mode=$GMODE lm.door=$GDOOR lm.rate=$RATE lm.target=$TGT lm.token=$TOKEN lm.watchdog=$((TIMEOUT1 - 30))"
[ -n "${LIVEMIRROR_VM_GLUE_DEBUG:-}" ] && APPEND="$APPEND livemirror.debug=1"
[ "$KEEPAPI" = 1 ] && APPEND="$APPEND lmtest.keepapi=1"
set +e
lm_boot "$O/boot1.log" "$TIMEOUT1" "$O/initrd.img" "$APPEND" \
  -drive "file=$O/vda.img,if=virtio,format=raw,readonly=on" \
  -drive "file=$O/vdb.img,if=virtio,format=raw"
RC=$?
set -e
[ "$RC" = 0 ] || lm_fail "boot 1: QEMU exited $RC$([ "$RC" = 124 ] && echo " (host timeout ${TIMEOUT1}s)")"
BOOT1_OK=1
lm_judge "$O/boot1.log" || BOOT1_OK=
grep -aq 'LMTEST DONE' "$O/boot1.log.txt" || BOOT1_OK=
lm_phase_end
lm_say "boot 1: livemirror-install took $(lm_marker "$O/boot1.log" install_secs)s"
if [ -z "$BOOT1_OK" ]; then
  lm_say "boot 1 failed: skipping the host checks and boot 2 (serial log: $O/boot1.log)"
  lm_summary "$NAME"; exit 1
fi
# What the shutdown says about the kernel device: NBD is disconnected, ublk removed.
KLINE="livemirror: disconnected $KDEV"; [ "$GDOOR" = ublk ] && KLINE="livemirror: removed $KDEV"
if [ "$GMODE" = bootonly ]; then
  for pat in "livemirror: shutdown: the old root is unmounted" "$KLINE" \
             "livemirror: the daemon stopped" "livemirror: shutdown: detached cleanly"; do
    if grep -aqF "$pat" "$O/boot1.log.txt"; then lm_ok "shutdown: console says \"$pat\""; else lm_fail "shutdown: no \"$pat\" on the console"; fi
  done
  lm_summary "$NAME"; exit $?
fi

# ------------------------------------------------------------------ host: the shutdown + the disk
lm_phase "host: shutdown path, e2fsck + debugfs on vdb"
L=$O/boot1.log.txt
for pat in "livemirror: shutdown: the old root is unmounted" "$KLINE" \
           "livemirror: the daemon stopped" "livemirror: shutdown: detached cleanly"; do
  if grep -aqF "$pat" "$L"; then lm_ok "shutdown: console says \"$pat\""; else lm_fail "shutdown: no \"$pat\" on the console"; fi
done
if grep -aq 'Successfully changed into root pivot' "$L" || grep -aqF 'livemirror: shutdown: detaching the root' "$L"; then
  lm_ok "systemd pivoted into /run/initramfs and ran the glue's shutdown program"
else
  lm_fail "systemd did not run /run/initramfs/shutdown"
fi
if e2fsck -fn "$FS" > "$O/e2fsck1.log" 2>&1; then
  lm_ok "e2fsck -fn on the installed disk: clean"
else
  lm_fail "e2fsck -fn on the installed disk reported problems: $(tail -n 3 "$O/e2fsck1.log" | tr '\n' ' ')"
fi
BC=$(dumpe2fs -h "$FS" 2>/dev/null | awk -F: '/^Block count/{gsub(/ /,"",$2); print $2}')
BS=$(dumpe2fs -h "$FS" 2>/dev/null | awk -F: '/^Block size/{gsub(/ /,"",$2); print $2}')
STATE=$(dumpe2fs -h "$FS" 2>/dev/null | awk -F: '/^Filesystem state/{gsub(/^ +/,"",$2); print $2}')
[ "$STATE" = clean ] && lm_ok "the file system on vdb was unmounted cleanly (state: clean)" || lm_fail "file system state: $STATE"
if [ "$GDOOR" = ublk ]; then
  # Grown by boot 2, not during the install (checked after boot 2).
  [ $((BC * BS)) -lt $((FS_MB * 1024 * 1024 * 95 / 100)) ] && lm_ok "the file system is not grown yet: $((BC * BS / 1048576)) MiB (the first boot grows it)" \
    || lm_fail "the file system on $TGT was grown although the ublk device could not grow"
elif [ $((BC * BS)) -ge $((FS_MB * 1024 * 1024 * 95 / 100)) ]; then
  lm_ok "the file system was grown: $((BC * BS / 1048576)) MiB on the ${FS_MB} MiB $TGT"
else
  lm_fail "the file system is $((BC * BS / 1048576)) MiB on the ${FS_MB} MiB $TGT"
fi
X=$O/vdb-files
rm -rf "$X"; mkdir -p "$X"
debugfs -R "rdump /data $X" "$FS" >/dev/null 2>&1 || true
debugfs -R "cat /etc/base-marker" "$FS" 2>/dev/null > "$X/base-marker" || true
lm_check "base image marker (token $TOKEN) on the installed disk" grep -q "$TOKEN" "$X/base-marker"
if [ -s "$X/data/MANIFEST" ]; then
  N=$(wc -l < "$X/data/MANIFEST")
  if (cd "$X/data" && sha256sum --quiet -c MANIFEST > "$O/host-sha.log" 2>&1); then
    lm_ok "host: all $N manifest files intact on the installed disk"
  else
    lm_fail "host: manifest mismatches: $(head -n 5 "$O/host-sha.log" | tr '\n' ' ')"
  fi
  lm_check "host: hot.bin matches its final sha256" bash -c "cd '$X/data' && sha256sum --quiet -c hot.sha256"
  for p in pre install after; do
    n=$(grep -c "^$p-" "$X/data/PHASES" || true)
    [ "$n" -gt 0 ] && lm_ok "host: $n files from phase $p" || lm_fail "host: no files from phase $p"
  done
else
  lm_fail "no /data/MANIFEST on the installed disk"
fi
lm_phase_end

# ------------------------------------------------------------------ boot 2
if [ "${LIVEMIRROR_VM_BOOT2:-1}" != 0 ]; then
  lm_phase "boot 2: the installed disk as root (same initramfs, no rd.livemirror)"
  lm_boot_installed "$O" 240 "$O/initrd.img" "root=$ROOT2 rw lm.mode=installed lm.door=$GDOOR lm.token=$TOKEN" "$FS"
  BC=$(dumpe2fs -h "$FS" 2>/dev/null | awk -F: '/^Block count/{gsub(/ /,"",$2); print $2}')
  [ $((BC * BS)) -ge $((FS_MB * 1024 * 1024 * 95 / 100)) ] && lm_ok "after boot 2 the file system fills $TGT: $((BC * BS / 1048576)) MiB" \
    || lm_fail "after boot 2 the file system is $((BC * BS / 1048576)) MiB on the ${FS_MB} MiB $TGT"
  lm_phase_end
fi

lm_summary "$NAME"
