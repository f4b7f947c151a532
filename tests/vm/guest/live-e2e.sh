# shellcheck shell=dash # run or sourced by busybox sh in the guest
# live-iso-e2e guest side: run by systemd (lmtest-live.service) on every boot of the live ISO
# and of the system installed from it. Which boot this is shows in the kernel command line
# (the host cannot pass options to the installed system: its own GRUB boots it):
#   rd.live.image rd.livemirror  boot 1: the live root is served by livemirror; under a write
#                                load, livemirror-install /dev/vda (the blank disk: the CD is
#                                on IDE), checks, systemctl poweroff
#   rd.live.image                the medium without livemirror: dmsquash-live's live-rw is the root
#   rd.live.overlay.overlayfs    (with rd.livemirror) an overlayfs root: the glue must step aside
#                                and the installer refuse, leaving the disk untouched
#   rd.livemirror.overlay        boot 1 on livemirror's own live stack (live-uefi-e2e): no
#                                device-mapper; livemirror serves LiveOS/rootfs.img from the
#                                squashfs with its overlay in RAM; the overlay is filled to a
#                                small limit (writes refused, the session lives on, fstrim gives
#                                room back), then the install as in boot 1
#   neither                      boot 2: the installed disk, booted by its own GRUB
# On UEFI firmware (/sys/firmware/efi: live-uefi-e2e) the installed disk is GPT with the EFI system
# partition first and the root second, and the boot loader is checked on the ESP and in NVRAM;
# on BIOS (live-iso-e2e) it is MBR with the root first and GRUB in the boot sector, and boot 1
# also checks a refusal and the RAM the release gives back.
. /lmtest/common.sh
exec </dev/null >/dev/console 2>&1
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
D=/data
RATE=24M # slow enough under TCG that the write load races the copy
phase() { echo "$1" > /run/lmtest/phase; info "phase=$1 t=$(up)"; }
count() { grep -c "^$1-" "$D/PHASES" 2>/dev/null || echo 0; }
count_within() { awk -v p="$1" '$2==p && $3==p' "$D/PHASES" 2>/dev/null | wc -l; }
wait_files() { # wait_files PHASE N
  _i=0
  while [ "$(count_within "$1")" -lt "$2" ]; do
    _i=$((_i + 1)); [ $_i -gt 900 ] && fail "the write load wrote fewer than $2 files in phase $1"
    kill -0 "$LOADPID" 2>/dev/null || fail "the write load died in phase $1"
    sleep 0.1
  done
}
poweroff_systemd() {
  info "systemctl poweroff at t=$(up)"
  touch /run/lmtest/done
  systemctl --no-block poweroff
  exit 0
}
has_arg() { for _a in $(cat /proc/cmdline); do [ "$_a" = "$1" ] && return 0; done; return 1; }
root_line() { awk '$2=="/"' /proc/mounts | tail -n 1; }
# systemd's start-up must finish (this service is Type=simple, so it does not hold it up) with
# the default target active and no failed unit.
check_default_target() {
  _s=$(timeout 300 systemctl is-system-running --wait 2>&1)
  _t=$(systemctl get-default)
  if [ "$_s" = running ] && [ "$(systemctl is-active "$_t")" = active ]; then
    ok "systemd reached its default target $_t (is-system-running: running)"
  else
    fail "systemd start-up: is-system-running says '$_s', $_t is $(systemctl is-active "$_t"); failed units: $(systemctl --failed --no-legend --plain 2>&1 | tr '\n' ';')"
  fi
}
no_livemirror() { # the glue stayed out of this boot
  [ -e /run/livemirror/pid ] && fail "livemirror was started (/run/livemirror/pid exists)"
  _p=$(grep -l '^@livemirror' /proc/[0-9]*/cmdline 2>/dev/null | tr '\n' ' ')
  [ -z "$_p" ] || fail "livemirror processes run: $_p"
  [ -e /sys/module/nbd ] && fail "the nbd module is loaded"
  ok "no livemirror process, no /run/livemirror, nbd not loaded"
}
check_files() { # every file the live session wrote, read back from the disk
  echo 3 > /proc/sys/vm/drop_caches
  cd "$D" || fail "no $D"
  _bad=$(sha256sum -c MANIFEST 2>&1 | grep -v ': OK$' || true)
  [ -z "$_bad" ] && ok "all $(wc -l < MANIFEST) manifest files intact" || fail "manifest mismatches: $_bad"
  sha256sum -c hot.sha256 >/dev/null 2>&1 && ok "hot.bin intact" || fail "hot.bin mismatch"
  for _p in pre copy after; do
    _n=$(grep -c "^$_p-" PHASES || true)
    [ "$_n" -gt 0 ] && ok "$_n files from phase $_p present" || fail "no files from phase $_p"
  done
  cd /
}
# ovget FIELD: a field of the daemon's overlay (status --get overlay.FIELD).
ovget() { "$LM" status --get "overlay.$1" --control "$LM_CTL" 2>/dev/null; }
mib() { echo "$(($1 / 1048576)) MiB"; }
# ballast_part SKIP COUNT: sha256 of COUNT MiB of the image's ballast file from MiB SKIP, read
# from the device (O_DIRECT), not from the page cache.
ballast_part() { dd if=/var/lib/lmtest/ballast.bin bs=1M skip="$1" count="$2" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1; }

# overlay_fill_check: the session lives through a full overlay (livemirror's own live stack).
# The limit is set a little above what the overlay holds and the image's own ballast file
# (/var/lib/lmtest/ballast.bin, 64 MiB in rootfs.img) is overwritten in place with O_DIRECT:
# every MiB takes overlay room and no file-system metadata, until a write is refused. Then
# everything written reads back, the daemon serves on, / stays read-write, and deleting a file
# plus fstrim gives room back that the next write uses. First the ext4 journal is made to go
# round once, so that every journal block already has its room in the overlay: a commit at the
# limit must not need new room (a refused journal write would make ext4 remount read-only, as
# a full disk under any journal would).
overlay_fill_check() {
  # First a daemon killed mid-session: the supervisor's next one takes the same overlay back
  # (its own root was emptied at switch_root: the file is found through PID 1's root).
  dd if=/dev/urandom of=/var/lib/lmtest/before-kill.bin bs=64k count=16 conv=fsync 2>/dev/null || fail "writing before-kill.bin"
  _sum=$(sha256sum < /var/lib/lmtest/before-kill.bin)
  _u0=$(ovget bytes_used) _sup=$(cat /run/livemirror/pid) _old=$CHILD
  check_nbd_timeouts "boot, before the kill"
  kill -9 "$_old" || fail "kill -9 $_old"
  _i=0
  while :; do
    _i=$((_i + 1)); [ $_i -gt 600 ] && fail "no new daemon 60 s after kill -9 of $_old: $(tail -n 5 /run/livemirror/log | tr '\n' ' ')"
    _new=$(daemon_child "$_sup")
    [ -n "$_new" ] && [ "$_new" != "$_old" ] && "$LM" status --control "$LM_CTL" >/dev/null 2>&1 && break
    sleep 0.1
  done
  CHILD=$_new
  # (the kernel saw its connection die with the daemon: from here on none may)
  sleep 1; dmesg > /run/lmtest/dmesg-kill
  [ "$(ovget path)" = /run/livemirror/ram/overlay ] && [ "$(ovget bytes_used)" -ge "$_u0" ] \
    && ok "kill -9 of the daemon: the supervisor's new one (pid $_new) serves the same overlay ($(ovget bytes_used) bytes used)" \
    || fail "after kill -9 the overlay is $(ovget path), $(ovget bytes_used) bytes (was $_u0): $(lmstatus)"
  echo 3 > /proc/sys/vm/drop_caches
  [ "$(sha256sum < /var/lib/lmtest/before-kill.bin)" = "$_sum" ] && ok "a file written before the kill reads back" \
    || fail "before-kill.bin changed across the kill"
  B=/var/lib/lmtest/ballast.bin
  [ "$(stat -c %s $B)" = $((64 << 20)) ] || fail "no 64 MiB ballast file in the image"
  ORIG=$(yes lmtest-ballast-of-the-image | head -c 67108864 | sha256sum | cut -d' ' -f1)
  [ "$(ballast_part 0 64)" = "$ORIG" ] && ok "the image's ballast file reads as built" || fail "the ballast file differs from the image's"
  LIMIT0=$(ovget bytes_limit)
  # The journal goes round: a thousand empty files made and deleted per commit (their inodes
  # and directory blocks are the same ones each time), until a commit takes no new room.
  mkdir -p /var/lib/lmtest/wrap
  NAMES=$(seq 1 1000 | sed 's,^,/var/lib/lmtest/wrap/f,')
  touch $B; sync
  _prev=$(ovget chunks_present) _calm=0 _n=0 _first=$_prev
  while [ $_calm -lt 3 ]; do
    _n=$((_n + 1)); [ $_n -gt 400 ] && fail "the overlay kept growing over 400 metadata commits ($_first -> $_prev chunks)"
    # shellcheck disable=SC2086 # (a list of names without blanks)
    touch $NAMES; sync
    # shellcheck disable=SC2086
    rm -f $NAMES; touch $B; sync
    _cur=$(ovget chunks_present)
    if [ $((_cur - _prev)) -lt 24 ]; then _calm=$((_calm + 1)); else _calm=0; fi
    _prev=$_cur
  done
  rmdir /var/lib/lmtest/wrap
  info "the journal went round in $_n rounds: the overlay went from $_first to $_prev chunks"
  # A file of the session's, to delete at the limit.
  dd if=/dev/urandom of=$D/trim-me.bin bs=1M count=32 conv=fsync 2>/dev/null || fail "writing trim-me.bin"
  sync
  dd if=/dev/urandom of=/run/lmtest/fill.src bs=1M count=64 2>/dev/null
  U0=$(ovget bytes_used); R0=$(ovget writes_refused)
  LIMIT=$((U0 + (24 << 20)))
  dmesg > /run/lmtest/dmesg-before-fill
  OUT=$("$LM" set-overlay-limit "$LIMIT" --control "$LM_CTL" 2>&1) || fail "set-overlay-limit $LIMIT: $OUT"
  ok "overlay limit set to $(mib "$LIMIT") ($(mib "$U0") used): $OUT"
  dd if=/run/lmtest/fill.src of=$B bs=1M count=64 oflag=direct conv=notrunc > /run/lmtest/fill.out 2>&1; _rc=$?
  W=$(sed -n 's/^\([0-9]*\)+[0-9]* records out.*/\1/p' /run/lmtest/fill.out | head -n 1)
  [ "$_rc" != 0 ] && [ -n "$W" ] && [ "$W" -lt 64 ] && [ "$W" -ge 16 ] \
    && ok "at the limit dd was refused after $W MiB: $(grep -v records /run/lmtest/fill.out | tr '\n' ' ')" \
    || fail "dd into the full overlay: exit $_rc, $W MiB written: $(tr '\n' ' ' < /run/lmtest/fill.out)"
  U1=$(ovget bytes_used); R1=$(ovget writes_refused)
  [ "$U1" -le "$LIMIT" ] && [ "$R1" -gt "$R0" ] && ok "status: $(mib "$U1") used of $(mib "$LIMIT"), $((R1 - R0)) writes refused" \
    || fail "status after the refusal: used $U1 limit $LIMIT refused $R0 -> $R1"
  [ "$(jget state "$(lmstatus)")" = serving ] && ok "the daemon serves on" || fail "the daemon: $(lmstatus)"
  grep -q ' / ext4 rw' /proc/mounts && ok "/ is still read-write at the limit" || fail "/ is not read-write at the limit: $(grep ' / ' /proc/mounts)"
  # Reads: what dd wrote, then the image's own bytes behind it.
  echo 3 > /proc/sys/vm/drop_caches
  _want=$(dd if=/run/lmtest/fill.src bs=1M count="$W" 2>/dev/null | sha256sum | cut -d' ' -f1)
  [ "$(ballast_part 0 "$W")" = "$_want" ] && ok "the $W MiB written before the refusal read back" || fail "the ballast's first $W MiB differ from what dd wrote"
  _rest=$((64 - W - 1))
  _want=$(yes lmtest-ballast-of-the-image | head -c 67108864 | dd bs=1M iflag=fullblock skip=$((W + 1)) 2>/dev/null | sha256sum | cut -d' ' -f1)
  [ "$(ballast_part $((W + 1)) $_rest)" = "$_want" ] && ok "the image's bytes after the refused write read as before ($_rest MiB)" \
    || fail "the ballast's last $_rest MiB changed"
  # The events: 75 % and 90 % crossed, and the refusal (at most one a second).
  _i=0
  while ! grep -q "overlay /run/livemirror/ram/overlay is full: " /run/livemirror/log && [ $_i -lt 50 ]; do _i=$((_i + 1)); sleep 0.1; done
  for _e in "is 75% full" "is 90% full" "is full: "; do
    _l=$(grep -a "overlay /run/livemirror/ram/overlay $_e" /run/livemirror/log | tail -n 1)
    [ -n "$_l" ] && ok "event: ${_l#*overlay }" || fail "no '$_e' event in the daemon's log"
  done
  # Room back: a file deleted, fstrim; the rest of the write then fits.
  rm -f $D/trim-me.bin; sync
  _t=$(fstrim -v / 2>&1) || fail "fstrim /: $_t"
  U2=$(ovget bytes_used)
  [ "$U2" -le $((U1 - (28 << 20))) ] && ok "fstrim gave room back: $(mib "$U1") -> $(mib "$U2") used ($_t)" \
    || fail "fstrim gave back too little: $U1 -> $U2 bytes used ($_t)"
  dd if=/run/lmtest/fill.src of=$B bs=1M skip="$W" seek="$W" count=8 oflag=direct conv=notrunc 2>/dev/null \
    && ok "8 MiB more fit after the trim" || fail "the write after the trim was refused too"
  dmesg | grep -avxF -f /run/lmtest/dmesg-before-fill > /run/lmtest/dmesg-fill || true
  _bad=$(grep -aE "EXT4-fs error|Aborting journal|Remounting filesystem read-only|JBD2" /run/lmtest/dmesg-fill || true)
  [ -z "$_bad" ] && ok "the kernel logged $(grep -ac 'I/O error' /run/lmtest/dmesg-fill) refused writes and no file-system error" \
    || fail "the file system suffered from the full overlay: $_bad"
  OUT=$("$LM" set-overlay-limit "$LIMIT0" --control "$LM_CTL" 2>&1) || fail "set-overlay-limit $LIMIT0: $OUT"
  rm -f /run/lmtest/fill.src
  info "overlay limit back to $(mib "$LIMIT0")"
}

mkdir -p /run/lmtest
echo boot > /run/lmtest/phase
cp /bin/busybox /run/lmtest/busybox; cp /lmtest/watchdog.sh /run/lmtest/
FW=bios
[ -d /sys/firmware/efi ] && FW=uefi
# The installed disk's partitions (see above).
if [ "$FW" = uefi ]; then ROOTP=/dev/vda2 ESPP=/dev/vda1; else ROOTP=/dev/vda1 ESPP=; fi
MODE=installed
has_arg rd.live.image && MODE=plain
has_arg rd.live.image && has_arg rd.livemirror && MODE=live
has_arg rd.live.overlay.overlayfs && MODE=overlayfs
has_arg rd.livemirror.overlay && MODE=ovl
WD=300; case $MODE in live | ovl) WD=1200 ;; esac
/run/lmtest/busybox sh /run/lmtest/watchdog.sh "$WD" &
echo "LMTEST INFO: live guest start mode=$MODE kernel=$(uname -r) t=$(up)"
info "mode=$MODE"
info "firmware=$FW"
info "token=$(sed -n 's/^base-marker //p' /etc/base-marker)"
info "cmdline=$(tr ' ' ',' < /proc/cmdline)"

# ---------------------------------------------------------------- the medium without livemirror
if [ "$MODE" = plain ]; then
  case "$(root_line)" in /dev/mapper/live-rw\ /\ ext4\ *) ok "root is dmsquash-live's /dev/mapper/live-rw: $(root_line)" ;;
    *) fail "root is not /dev/mapper/live-rw: $(root_line)" ;; esac
  case "$(dmsetup table live-rw 2>&1)" in *" snapshot "*) ok "live-rw is a dm snapshot: $(dmsetup table live-rw)" ;;
    *) fail "live-rw: $(dmsetup table live-rw 2>&1)" ;; esac
  grep -q '^/dev/sr0 /run/initramfs/live iso9660 ' /proc/mounts && ok "the CD is mounted at /run/initramfs/live" \
    || fail "no /dev/sr0 on /run/initramfs/live: $(grep initramfs /proc/mounts | tr '\n' ';')"
  no_livemirror
  check_default_target
  echo "LMTEST DONE t=$(up)"
  poweroff_systemd
fi

# ---------------------------------------------------------------- an overlayfs live root
if [ "$MODE" = overlayfs ]; then
  case "$(root_line)" in *" / overlay "*) ok "root is dmsquash-live's overlayfs: $(root_line)" ;;
    *) fail "root is not overlayfs: $(root_line)" ;; esac
  # (the initramfs' journal, which the system's journald took over from /run)
  M=$(journalctl -b -o cat 2>/dev/null | grep -a "livemirror: this live medium's root is overlayfs" | head -n 1)
  [ -n "$M" ] && ok "the glue said why it stepped aside: $M" || fail "no message from the glue about the overlayfs root in the journal"
  [ -e /run/livemirror/pid ] && fail "livemirror was started on an overlayfs medium"
  _p=$(grep -l '^@livemirror' /proc/[0-9]*/cmdline 2>/dev/null | tr '\n' ' ')
  [ -z "$_p" ] && ok "no livemirror process" || fail "livemirror processes run: $_p"
  check_default_target
  OUT=$(livemirror-install --yes /dev/vda 2>&1); RC=$?
  echo "$OUT" | while read -r l; do info "install: $l"; done
  case "$RC:$OUT" in 1:*"root file system is overlayfs"*"Nothing was changed"*) ok "livemirror-install refused the overlayfs root with exit 1" ;;
    *) fail "livemirror-install on an overlayfs root exited $RC" ;; esac
  blkid -p /dev/vda >/dev/null 2>&1; [ $? = 2 ] && ok "the disk is untouched (blkid -p finds nothing on /dev/vda)" \
    || fail "the installer changed /dev/vda: $(blkid -p /dev/vda 2>&1)"
  echo "LMTEST DONE t=$(up)"
  poweroff_systemd
fi

# ---------------------------------------------------------------- boot 2: the installed disk
if [ "$MODE" = installed ]; then
  case "$(root_line)" in "$ROOTP / ext4 "*) ok "root is the installed disk's partition: $(root_line)" ;;
    *) fail "root is not $ROOTP: $(root_line)" ;; esac
  if [ "$FW" = uefi ]; then
    grep -q "^$ESPP /boot/efi vfat " /proc/mounts && ok "fstab mounted the EFI system partition $ESPP on /boot/efi" \
      || fail "/boot/efi is not $ESPP: $(grep /boot/efi /proc/mounts)"
    # A fresh variable store: no entry of the installer's, so the firmware took the removable path.
    B=$(efibootmgr -v 2>&1)
    case "$B" in *grubx64.efi*) fail "the NVRAM has the installer's boot entry: this boot proves nothing about the removable path: $B" ;;
      *) ok "the NVRAM holds no boot entry of the installer's: the firmware started EFI/BOOT/BOOTX64.EFI ($(echo "$B" | grep -m1 BootCurrent))" ;; esac
  fi
  C=$(cat /proc/cmdline)
  case " $C " in *" BOOT_IMAGE=/boot/vmlinuz-$(uname -r) "*) ;; *) fail "the kernel was not booted by the installed GRUB: $C" ;; esac
  case " $C " in *" root=UUID="*) ok "GRUB from the disk booted /boot/vmlinuz-$(uname -r) with root=UUID=: $C" ;;
    *) fail "no root=UUID= on the installed system's command line: $C" ;; esac
  case " $C " in *" rd.live"* | *" livemirror."* | *" root=live:"*) fail "live options on the installed system's command line: $C" ;;
    *) ok "no live or livemirror options on the command line" ;; esac
  no_livemirror
  # (lsinitrd takes many seconds under TCG: once per image)
  N=$(lsinitrd "/boot/initrd.img-$(uname -r)" 2>/dev/null | grep -cE 'livemirror|dmsquash' || true)
  [ "$N" = 0 ] && ok "the initramfs this boot used holds no livemirror and no dmsquash-live" \
    || fail "the installed initramfs still holds $N livemirror/dmsquash files"
  check_default_target
  FS=$(df -k / | awk 'NR==2{print $2}'); DISK=$(blockdev --getsize64 "$ROOTP")
  [ "$FS" -gt $((DISK * 85 / 102400)) ] && ok "the file system fills the partition: $FS KiB on $((DISK / 1024)) KiB" \
    || fail "the file system is $FS KiB on a $((DISK / 1024)) KiB partition"
  check_files
  dd if=/dev/urandom of=$D/boot2.bin bs=1024 count=256 conv=fsync 2>/dev/null || fail "write on the installed disk"
  (cd $D && sha256sum boot2.bin > boot2.sha256); sync
  E=$(dmesg_errors); [ -z "$E" ] && ok "no I/O errors in dmesg" || fail "kernel errors: $E"
  echo "LMTEST DONE t=$(up)"
  poweroff_systemd
fi

# ---------------------------------------------------------------- boot 1: the live system
case "$(root_line)" in /dev/nbd0\ /\ ext4\ *) ok "root is /dev/nbd0: $(root_line)" ;; *) fail "root is not /dev/nbd0: $(root_line)" ;; esac
[ -r /run/livemirror/pid ] || fail "no /run/livemirror/pid: the dracut module did not start the daemon"
check_daemon "$(cat /run/livemirror/pid)"
J=$(lmstatus) || fail "livemirror status --json failed"
if [ "$MODE" = ovl ]; then
  IMG=/run/initramfs/squashfs/LiveOS/rootfs.img
  [ "$(jget state "$J")" = serving ] && [ "$(jget source "$J")" = "$IMG" ] \
    && ok "status: serving $IMG, export $(jget export_size "$J") bytes" || fail "status: $J"
  OVP=$(ovget path)
  [ "$OVP" = /run/livemirror/ram/overlay ] && [ -f "$OVP" ] \
    && ok "status: overlay $OVP in RAM, $(ovget bytes_used) bytes used of $(ovget bytes_limit)" || fail "status: overlay '$OVP': $J"
  # Debian's systemd loads dm_mod by itself once it runs from the root (modprobe@dm_mod.service,
  # on every boot, whatever the storage; without dm in the kernel it fails quietly): what counts
  # is that nothing uses it and that the initramfs, which built the root, never loaded it.
  if [ -e /sys/module/dm_mod ]; then
    _rc=$(cat /sys/module/dm_mod/refcnt 2>/dev/null)
    _dm=$(dmesg | sed -n 's/^\[ *\([0-9.]*\)\] device-mapper: uevent.*/\1/p' | head -n 1)
    _root=$(dmesg | sed -n 's/^\[ *\([0-9.]*\)\] EXT4-fs (nbd0): mounted.*/\1/p' | head -n 1)
    [ "$_rc" = 0 ] && [ -n "$_dm" ] && [ -n "$_root" ] && [ "$(echo "$_dm $_root" | awk '{print ($1 > $2)}')" = 1 ] \
      && ok "device-mapper is unused (dm_mod refcount 0), loaded only at ${_dm}s by the running system, after the root was mounted at ${_root}s" \
      || fail "device-mapper was used or loaded by the initramfs: refcount '$_rc', loaded at '${_dm}', root mounted at '${_root}'"
  else
    ok "no device-mapper module is loaded (no /sys/module/dm_mod)"
  fi
  _dmdev=$(ls -d /sys/block/dm-* 2>/dev/null | tr '\n' ' ')
  [ -z "$_dmdev" ] && ok "no device-mapper block device (/sys/block/dm-*)" || fail "device-mapper devices: $_dmdev"
  MAP=
  for _m in /dev/mapper/*; do [ -e "$_m" ] && [ "$_m" != /dev/mapper/control ] && MAP="$MAP $_m"; done
  [ -z "$MAP" ] && ok "no /dev/mapper device" || fail "device-mapper devices exist: $MAP"
  LA=$(losetup -a 2>&1 | tr '\n' ';')
  case "$LA" in *rootfs.img*) fail "rootfs.img is on a loop device: $LA" ;; *squashfs.img*) ok "one loop device, the squashfs: $LA" ;;
    *) fail "no loop device for the squashfs: $LA" ;; esac
  grep -qE '^/dev/loop[0-9]+ /run/initramfs/squashfs squashfs ro[ ,]' /proc/mounts && ok "the squashfs is mounted read-only at /run/initramfs/squashfs" \
    || fail "no squashfs on /run/initramfs/squashfs: $(grep initramfs /proc/mounts | tr '\n' ';')"
else
  [ "$(jget state "$J")" = serving ] && [ "$(jget source "$J")" = /dev/mapper/live-rw ] \
    && ok "status: serving /dev/mapper/live-rw, export $(jget export_size "$J") bytes" || fail "status: $J"
  T=$(dmsetup table live-rw 2>&1)
  case "$T" in *" snapshot "*) ok "dmsquash-live built live-rw as a dm snapshot: $T" ;; *) fail "live-rw: $T" ;; esac
  dmsetup info live-base >/dev/null 2>&1 && ok "live-base exists: $(dmsetup table live-base)" || fail "no live-base"
  LA=$(losetup -a 2>&1 | tr '\n' ';')
  case "$LA" in *squashfs.img*rootfs.img* | *rootfs.img*squashfs.img*) ok "loop devices: $LA" ;; *) fail "the live loop devices are not there: $LA" ;; esac
fi
grep -q '^/dev/sr0 /run/initramfs/live iso9660 ' /proc/mounts && ok "the CD is mounted at /run/initramfs/live" \
  || fail "no /dev/sr0 on /run/initramfs/live"
[ -e /run/initramfs/.need_shutdown ] && ok "dracut will restore its initramfs at shutdown (/run/initramfs/.need_shutdown)" \
  || fail "no /run/initramfs/.need_shutdown: the shutdown would not detach livemirror"
check_default_target
VDA=$(blockdev --getsize64 /dev/vda)
info "target_size=$VDA"

# ---------------------------------------------------------------- write load + install
mkdir -p "$D"
dd if=/dev/urandom of="$D/hot.bin" bs=4096 count=64 conv=fsync 2>/dev/null || fail "creating hot.bin"
phase pre
[ "$MODE" = ovl ] && overlay_fill_check
if [ "$FW" = bios ] || [ "$MODE" = ovl ]; then
  # Ballast in the RAM overlay, so that the memory the release gives back stands out from what
  # the rest of the system allocates and frees meanwhile (about 25 MiB either way, measured).
  dd if=/dev/urandom of="$D/pre-ballast.bin" bs=1M count=160 conv=fsync 2>/dev/null || fail "writing the ballast"
  echo "$(sha256sum "$D/pre-ballast.bin" | cut -d' ' -f1)  pre-ballast.bin" >> "$D/MANIFEST"
  echo "pre-ballast.bin pre pre" >> "$D/PHASES"
fi
busybox sh /lmtest/load.sh "$D" &
LOADPID=$!
wait_files pre 5
ok "write load running (pid $LOADPID): $(count pre) files before the install"

# A disk that holds data (here: a partition table) is refused before anything changes; the
# install below then says --wipe. (BIOS only: the refusal does not depend on the firmware.)
if [ "$FW" = bios ]; then
  printf 'label: dos\nstart=2048, type=83\n' | sfdisk --quiet /dev/vda >/dev/null 2>&1 || fail "sfdisk /dev/vda"
  PT0=$(sfdisk -d /dev/vda 2>&1)
  OUT=$(livemirror-install --yes /dev/vda 2>&1); RC=$?
  case "$RC:$OUT" in 1:*"holds data"*"--wipe"*) ok "livemirror-install refuses a disk with a partition table: $(echo "$OUT" | grep FAILED)" ;;
    *) fail "livemirror-install on a disk with a partition table exited $RC: $(echo "$OUT" | tail -n 2 | tr '\n' ' ')" ;; esac
  [ "$(sfdisk -d /dev/vda 2>&1)" = "$PT0" ] && [ "$(jget state "$(lmstatus)")" = serving ] \
    && ok "after the refusal the partition table is unchanged and the daemon still serving" || fail "the refused install changed something"
fi

# The installer's step headers set the load's phase, so that every file is named after the step
# it was written in; the RAM overlay and MemAvailable are read around the release.
# on_step N: step N of the installer begins.
on_step() {
  case $1 in
  4) phase copy ;;
  6) phase verify ;;
  7) phase detach
     if [ "$MODE" = ovl ]; then
       # livemirror's overlay goes with detach-source: RAM is measured around that step.
       ovget bytes_used > /run/lmtest/cow
       awk '/^MemAvailable:/{print $2}' /proc/meminfo > /run/lmtest/mem0
     else
       dmsetup status live-rw 2>/dev/null | awk '{split($4,a,"/"); print a[1]*512}' > /run/lmtest/cow
     fi ;;
  8) phase release; [ "$MODE" = ovl ] || awk '/^MemAvailable:/{print $2}' /proc/meminfo > /run/lmtest/mem0
     info "meminfo before the release: $(grep -E '^(MemFree|MemAvailable|Cached|Shmem|Unevictable):' /proc/meminfo | tr -s ' \n' ' ')" ;;
  9) awk '/^MemAvailable:/{print $2}' /proc/meminfo > /run/lmtest/mem1; phase grow
     info "meminfo after the release: $(grep -E '^(MemFree|MemAvailable|Cached|Shmem|Unevictable):' /proc/meminfo | tr -s ' \n' ' ')" ;;
  10) phase boot ;;
  esac
}
phase install
T0=$(up)
if [ "$FW" = bios ]; then
  # The installer's words: its step headers set the load's phase.
  ( livemirror-install --yes --wipe --rate "$RATE" /dev/vda; echo $? > /run/lmtest/install.rc ) 2>&1 | while read -r l; do
    case $l in "==> ["*"/"*"] "*) n=${l#==> [}; on_step "${n%%/*}" ;; esac
    echo "$l" >> /run/lmtest/install.out
    info "install: $l"
  done
else
  # --json, as a graphical installer drives it: the JSON stream on stdout (kept on the installed
  # disk, /var/log/lmtest-install.jsonl, for the host to parse; its step lines set the load's
  # phase), the words on stderr.
  mkfifo /run/lmtest/install.err
  ( while IFS= read -r l; do echo "$l" >> /run/lmtest/install.out; info "install: $l"; done < /run/lmtest/install.err ) &
  RPID=$!
  ( livemirror-install --json --progress-interval 1 --yes --wipe --rate "$RATE" /dev/vda 2>/run/lmtest/install.err
    echo $? > /run/lmtest/install.rc ) | while IFS= read -r l; do
    echo "$l" >> /run/lmtest/install.jsonl
    case $l in '{"event":"step","step":'*',"status":"started"'*) n=${l#*\"step\":}; on_step "${n%%,*}" ;; esac
  done
  wait "$RPID"
  cp /run/lmtest/install.jsonl /var/log/lmtest-install.jsonl
  info "json_lines=$(wc -l < /var/log/lmtest-install.jsonl)"
  tail -n 1 /var/log/lmtest-install.jsonl | grep -q '^{"event":"result","status":"ok","exit_code":0,' \
    && ok "the JSON stream ends with a result line: ok" || fail "the JSON stream's last line: $(tail -n 1 /var/log/lmtest-install.jsonl)"
fi
RC=$(cat /run/lmtest/install.rc)
T1=$(up)
SECS=$(echo "$T1 $T0" | awk '{printf "%.1f", $1-$2}')
[ "$RC" = 0 ] && ok "livemirror-install /dev/vda exited 0 after $SECS s" || fail "livemirror-install /dev/vda exited $RC"
info "install_secs=$SECS"
# The trim step: what fstrim released is reported, and verify saw those regions as
# trimmed (never copied, so not compared).
SKIP=$(sed -n 's/.*the copy skips \([0-9.]* [A-Za-z]*\) that .*/\1/p' /run/lmtest/install.out | head -n 1)
TRIMMED=$(sed -n 's/.* \([0-9][0-9]*\) trimmed regions cannot be compared.*/\1/p' /run/lmtest/install.out | head -n 1)
case "$SKIP" in ''|0\ *|0.0\ *) SKIP= ;; esac
if [ -n "$SKIP" ] && [ "${TRIMMED:-0}" -gt 0 ]; then
  ok "the trim step: the copy skipped $SKIP; verify found $TRIMMED trimmed regions it did not need to compare"
else
  fail "the trim step's saving is not reported (skips '$SKIP', verify '$TRIMMED' trimmed regions): $(grep -i trim /run/lmtest/install.out | tr '\n' ' ')"
fi
phase after
N=$(count_within copy)
[ "$N" -ge 3 ] && ok "$N files were written entirely during the copy" \
  || fail "only $N files were written during the copy: the writes did not race it"

# ---------------------------------------------------------------- the result
J=$(lmstatus) || fail "livemirror status --json failed after the install"
[ "$(jget state "$J")" = source-detached ] && [ "$(jget source "$J")" = null ] && [ "$(jget target "$J")" = "$ROOTP" ] \
  && ok "status: source-detached, target $ROOTP" || fail "after the install: $J"
P=$(blockdev --getsize64 "$ROOTP")
[ "$(jget export_size "$J")" = "$P" ] && ok "export grown to the partition's $P bytes" || fail "export_size $(jget export_size "$J") != $P"
[ "$(($(cat /sys/block/nbd0/size) * 512))" = "$P" ] && ok "kernel: /dev/nbd0 is $P bytes" \
  || fail "kernel: /dev/nbd0 is $(($(cat /sys/block/nbd0/size) * 512)) bytes, not $P"
FS=$(df -k / | awk 'NR==2{print $2}')
[ "$FS" -gt $((P * 85 / 102400)) ] && ok "df: / is $FS KiB (the partition is $((P / 1024)) KiB)" || fail "df: / is only $FS KiB"
PT=$(sfdisk -d /dev/vda 2>&1 | tr '\n' ';')
if [ "$FW" = bios ]; then
  case "$PT" in *"label: dos"*"/dev/vda1 : start=        2048,"*"bootable"*) ok "vda: MBR, vda1 from sector 2048, bootable" ;;
    *) fail "vda's partition table: $PT" ;; esac
else
  case "$PT" in *"label: gpt"*"/dev/vda1 : start=        2048,"*"type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B"*"/dev/vda2 : "*) ok "vda: GPT, vda1 the EFI system partition from 1 MiB, vda2 the root" ;;
    *) fail "vda's partition table: $PT" ;; esac
fi
if [ "$MODE" = ovl ]; then
  [ -e /run/livemirror/ram/overlay ] && fail "the overlay file /run/livemirror/ram/overlay is still there" || ok "the overlay file is deleted"
  [ "$("$LM" status --get overlay --control "$LM_CTL")" = null ] && ok "status: no overlay" || fail "status still has an overlay: $(lmstatus)"
  grep -q "unmounted /run/initramfs/squashfs (/dev/loop" /run/lmtest/install.out \
    && ok "the installer unmounted the squashfs that held the image" || fail "the installer did not say it unmounted the squashfs"
  grep -q "livemirror's overlay held .* of writes and is deleted; MemAvailable" /run/lmtest/install.out \
    && ok "the installer reported the overlay's RAM: $(grep -o "livemirror's overlay held.*" /run/lmtest/install.out)" \
    || fail "the installer did not report the overlay's RAM"
  _dmdev=$(ls -d /sys/block/dm-* 2>/dev/null | tr '\n' ' ')
  [ -z "$_dmdev" ] && [ "$(cat /sys/module/dm_mod/refcnt 2>/dev/null || echo 0)" = 0 ] \
    && ok "still no device-mapper device, dm_mod unused" || fail "device-mapper in use after the install: $_dmdev"
else
  for m in live-rw live-base; do
    [ -e /dev/mapper/$m ] && fail "/dev/mapper/$m still exists" || ok "/dev/mapper/$m is gone"
  done
fi
L=$(ls -d /sys/block/loop*/loop 2>/dev/null | wc -l)
[ "$L" = 0 ] && ok "no loop device is bound any more" || fail "$L loop devices still bound: $(losetup -a 2>&1)"
grep -qE ' /run/initramfs/(live|squashfs) ' /proc/mounts && fail "live media still mounted: $(grep initramfs /proc/mounts)" \
  || ok "the CD and the squashfs are unmounted"
COW=$(cat /run/lmtest/cow 2>/dev/null); M0=$(cat /run/lmtest/mem0 2>/dev/null); M1=$(cat /run/lmtest/mem1 2>/dev/null)
info "overlay_bytes=$COW mem_available_kib before_release=$M0 after_release=$M1"
if [ "$FW" = uefi ] && [ "$MODE" != ovl ]; then
  note "the RAM the release gives back is measured on BIOS (live-iso-e2e, with its ballast)"
elif [ -n "$COW" ] && [ -n "$M0" ] && [ -n "$M1" ] && [ "$COW" -ge $((160 * 1048576)) ]; then
  BACK=$(((M1 - M0) * 1024))
  [ "$BACK" -ge $((COW * 3 / 4)) ] && ok "the release gave back $((BACK / 1048576)) MiB of RAM (the overlay held $((COW / 1048576)) MiB)" \
    || fail "the release gave back only $((BACK / 1048576)) MiB of RAM; the overlay held $((COW / 1048576)) MiB"
else
  fail "could not measure the overlay (${COW:-?} bytes, at least the 160 MiB ballast expected) or MemAvailable (${M0:-?} -> ${M1:-?} KiB)"
fi
U=$(blkid -p -o value -s UUID /dev/nbd0)
grep -q "^UUID=$U / ext4 " /etc/fstab && ok "fstab mounts / by UUID=$U" || fail "fstab: $(tr '\n' ';' < /etc/fstab)"
G=/boot/grub/grub.cfg
grep -q "root=UUID=$U" $G && ! grep -qE 'rd\.live|rd\.livemirror|livemirror\.' $G \
  && ok "$G boots root=UUID=$U without live options" || fail "$G: $(grep -E '^\s*linux' $G | head -n 2 | tr '\n' ';')"
if [ "$FW" = bios ]; then
  dd if=/dev/vda bs=512 count=1 2>/dev/null | grep -aq GRUB && [ -f /boot/grub/i386-pc/core.img ] \
    && ok "GRUB is in vda's MBR, its modules in /boot/grub/i386-pc" || fail "no GRUB in vda's MBR"
else
  grep -q "^$ESPP /boot/efi vfat " /proc/mounts && ok "the installer mounted the ESP $ESPP on /boot/efi" \
    || fail "/boot/efi is not $ESPP: $(grep /boot/efi /proc/mounts)"
  EU=$(blkid -p -o value -s UUID "$ESPP")
  grep -q "^UUID=$EU /boot/efi vfat " /etc/fstab && ok "fstab mounts /boot/efi by UUID=$EU" || fail "fstab: $(tr '\n' ';' < /etc/fstab)"
  [ -s /boot/efi/EFI/BOOT/BOOTX64.EFI ] && [ -s /boot/efi/EFI/debian/grubx64.efi ] && [ -f /boot/grub/x86_64-efi/normal.mod ] \
    && ok "GRUB for UEFI in EFI/debian/grubx64.efi and at EFI/BOOT/BOOTX64.EFI, its modules in /boot/grub/x86_64-efi" \
    || fail "the ESP lacks GRUB: $(find /boot/efi -type f | tr '\n' ' ')"
  B=$(efibootmgr -v 2>&1)
  BN=$(echo "$B" | awk '/grubx64.efi/ && $2 == "debian" {sub(/^Boot/, "", $1); sub(/\*$/, "", $1); print $1; exit}')
  if [ -n "$BN" ] && [ "$(echo "$B" | sed -n 's/^BootOrder: //p' | cut -d, -f1)" = "$BN" ]; then
    ok "NVRAM: boot entry $BN \"debian\" for EFI/debian/grubx64.efi, first in BootOrder"
  else
    fail "NVRAM has no first boot entry for the installed GRUB: $(echo "$B" | tr '\n' ';')"
  fi

fi
I=/boot/initrd.img-$(uname -r)
lsinitrd "$I" > /run/lmtest/initrd.list 2>/dev/null
N=$(grep -cE 'livemirror|dmsquash' /run/lmtest/initrd.list || true)
[ "$N" = 0 ] && grep -q 'virtio_blk' /run/lmtest/initrd.list \
  && ok "$I: for booting from disk (virtio_blk, no livemirror, no dmsquash-live)" || fail "$I holds $N livemirror/dmsquash files or no virtio_blk"
wait_files after 5

# ---------------------------------------------------------------- stop the load, check
stop_load "$LOADPID"
info "files: pre=$(count pre) install=$(count install) copy=$(count copy) after=$(count after)"
verify_load_files "$D"
if [ -f /run/lmtest/dmesg-kill ]; then
  _k=$(dmesg | grep -avxF -f /run/lmtest/dmesg-kill | grep -aE 'nbd0: (Connection timed out|Dead connection)' || true)
  [ -z "$_k" ] && ok "since the daemon's restart: no timed-out or dead NBD connection in dmesg" \
    || fail "since the daemon's restart the kernel saw: $(echo "$_k" | tr '\n' ';')"
else
  check_nbd_timeouts "whole run"
fi
# (the overlay's refused writes, on purpose, are the only I/O errors allowed: before the mark)
if [ -f /run/lmtest/dmesg-fill ]; then E=$(dmesg_errors | grep -avxF -f /run/lmtest/dmesg-fill || true); else E=$(dmesg_errors); fi
[ -z "$E" ] && ok "no I/O errors, ext4 errors or read-only remount in dmesg" || fail "kernel messages: $E"
grep -q ' / ext4 rw' /proc/mounts && ok "/ is still mounted read-write" || fail "/ is not read-write: $(grep ' / ' /proc/mounts)"
tail -n 8 /run/livemirror/log | sed 's/^/LMLOG daemon: /'
sync
echo "LMTEST DONE t=$(up)"
# The shutdown goes through systemd and dracut's shutdown (the live initramfs, unpacked by the
# installer before it replaced /boot's image), whose livemirror hook detaches /dev/nbd0.
poweroff_systemd
