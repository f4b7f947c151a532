# shellcheck shell=dash # run or sourced by busybox sh in the guest
# glue-e2e guest side: run by systemd (lmtest-glue.service) on every boot of the Debian system:
# the live session whose initramfs mkinitramfs made (with initrd-glue's hook), and the installed
# system after it. /lmtest/params (written by the host) holds the run's settings; /lmtest/stage
# says which boot this is (each boot leaves it for the next, on the disk the next boot uses; the
# kernel options cannot: the installed system keeps the live session's):
#   live       (boot 1) root on /dev/nbd0 (DOOR=ublk: /dev/ublkb0) served by @livemirror from
#              /dev/mapper/live-rw; under a
#              write load, livemirror-install onto disk A (/dev/vdb: GPT on BIOS; /dev/vdb2 on
#              the UEFI variant, the disk partitioned by the host), checks, `systemctl poweroff`:
#              the shutdown goes through /run/initramfs/shutdown.
#   installed  (boot 2) disk A booted by the firmware and the boot loader the installer set up;
#              checks; with MOVE=1, what a user does before moving an installed root: the
#              kernel options rd.livemirror livemirror.source=/dev/disk/by-partuuid/... for the
#              next boot (/etc/default/grub.d, update-grub).
#   move       (boot 3) disk A's root served by livemirror; under a write load
#              livemirror-install /dev/vdb (disk B) moves it; checks; poweroff.
#   moved      (boot 4) disk B alone, booted by its own GRUB without livemirror; checks.
# With DOOR=ublk (glue-ublk-e2e, the 6.12 kernel) grow is refused during the install, so the
# installer writes x-systemd.growfs into fstab and boot 2's systemd grows the file system; the
# livemirror@ unit and the NBD timeout checks are glue-e2e's alone.
# lm.mode=bootonly on the kernel command line (LIVEMIRROR_VM_GLUE_MODE) only boots, checks the
# daemon and powers off.
. /lmtest/common.sh
exec </dev/null >/dev/console 2>&1
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
. /lmtest/params
# The kernel device the live root is served on (common.sh's LM_ROOTDEV, here from the params:
# the installed system's later boots keep the live session's kernel options).
case $DOOR in ublk) LM_ROOTDEV=/dev/ublkb0 ;; *) LM_ROOTDEV=/dev/nbd0 ;; esac
STAGE=$(cat /lmtest/stage 2>/dev/null || echo live)
[ "$(cmdline mode glue)" = bootonly ] && STAGE=bootonly
D=/data
phase() { echo "$1" > /run/lmtest/phase; info "phase=$1 t=$(up)"; }
count() { grep -c "^$1-" "$D/PHASES" 2>/dev/null || echo 0; }
count_within() { awk -v p="$1" '$2==p && $3==p' "$D/PHASES" 2>/dev/null | wc -l; }
wait_files() { # wait_files PHASE N
  _i=0
  while [ "$(count_within "$1")" -lt "$2" ]; do
    _i=$((_i + 1)); [ $_i -gt 600 ] && fail "the write load wrote fewer than $2 files in phase $1"
    kill -0 "$LOADPID" 2>/dev/null || fail "the write load died in phase $1"
    sleep 0.1
  done
}
# next STAGE: what the next boot does; then power off through systemd.
next() {
  echo "$1" > /lmtest/stage
  sync
  info "systemctl poweroff at t=$(up) (next boot: $1)"
  touch /run/lmtest/done
  systemctl --no-block poweroff
  exit 0
}
root_line() { awk '$2=="/"' /proc/mounts | tail -n 1; }
root_served() {
  case "$(root_line)" in "$LM_ROOTDEV / ext4 "*) ok "root is $LM_ROOTDEV: $(root_line)" ;; *) fail "root is not $LM_ROOTDEV: $(root_line)" ;; esac
}
has_arg() { for _a in $(cat /proc/cmdline); do [ "$_a" = "$1" ] && return 0; done; return 1; }

# The watchdog runs from RAM (the root may hang); /run itself is noexec on initramfs-tools systems.
mkdir -p /run/lmtest
mount -t tmpfs -o size=16m,mode=0755 lmtest /run/lmtest || fail "cannot mount a tmpfs on /run/lmtest"
echo boot > /run/lmtest/phase
cp /bin/busybox /run/lmtest/busybox; cp /lmtest/watchdog.sh /run/lmtest/
/run/lmtest/busybox sh /run/lmtest/watchdog.sh "$((WATCHDOG - $(cut -d. -f1 /proc/uptime)))" &
echo "LMTEST INFO: glue guest start stage=$STAGE kernel=$(uname -r) t=$(up)"
info "stage=$STAGE"
info "systemd_version=$(systemctl --version | awk 'NR==1{print $2}')"
info "cmdline=$(tr ' ' ',' < /proc/cmdline)"
grep -q "$TOKEN" /etc/base-marker && ok "this run's root (token $TOKEN)" || fail "/etc/base-marker does not hold this run's token"

# check_files: every file the sessions wrote, read back from the disk.
check_files() {
  echo 3 > /proc/sys/vm/drop_caches
  cd "$D" || fail "no $D"
  _bad=$(sha256sum -c MANIFEST 2>&1 | grep -v ': OK$' || true)
  [ -z "$_bad" ] && ok "all $(wc -l < MANIFEST) manifest files intact" || fail "manifest mismatches: $_bad"
  sha256sum -c hot.sha256 >/dev/null 2>&1 && ok "hot.bin intact" || fail "hot.bin mismatch"
  for _p in "$@"; do
    _n=$(grep -c "^$_p-" PHASES || true)
    [ "$_n" -gt 0 ] && ok "$_n files from phase $_p present" || fail "no files from phase $_p"
  done
  cd /
}
# check_installed ROOTDEV: a system booted from its disk by the firmware and its boot loader.
check_installed() {
  _root=$(root_line)
  case "$_root" in "$1 / ext4 "*) ok "root is the installed disk's $1: $_root" ;; *) fail "root is not $1: $_root" ;; esac
  [ -e /run/livemirror/pid ] && fail "livemirror runs in the installed boot"
  has_arg rd.livemirror && fail "rd.livemirror is on the installed system's command line: $(cat /proc/cmdline)"
  _p=$(grep -l '^@livemirror' /proc/[0-9]*/cmdline 2>/dev/null | tr '\n' ' ')
  [ -z "$_p" ] && ok "no livemirror process, no rd.livemirror (the boot loader's command line: $(cat /proc/cmdline))" \
    || fail "livemirror processes run: $_p"
  _u=$(blkid -p -o value -s UUID "$1" 2>/dev/null)
  grep -Eq "^UUID=$_u / ext4 " /etc/fstab && [ -n "$_u" ] && ok "/etc/fstab mounts / by the installed file system's UUID ($_u)" \
    || fail "/etc/fstab has no line for / by UUID $_u: $(grep -v '^#' /etc/fstab | tr '\n' '|')"
  case " $(cat /proc/cmdline) " in *" root=UUID=$_u "*) ok "the boot loader booted root=UUID=$_u" ;;
    *) fail "the command line does not say root=UUID=$_u: $(cat /proc/cmdline)" ;; esac
  if [ "$DOOR" = ublk ]; then
    # (the install could not grow the ublk device: this first boot's systemd grew the file system)
    grep -Eq "^UUID=$_u / ext4 [^ ]*x-systemd\.growfs" /etc/fstab && ok "/etc/fstab asks systemd to grow / at boot (x-systemd.growfs)" \
      || fail "/etc/fstab lacks x-systemd.growfs for /: $(grep -v '^#' /etc/fstab | tr '\n' '|')"
    info "growfs: $(journalctl -b -u systemd-growfs-root.service --no-pager -o cat 2>/dev/null | tail -n 2 | tr '\n' ' ')"
  fi
  _fs=$(df -k / | awk 'NR==2{print $2}'); _sz=$(blockdev --getsize64 "$1")
  [ "$_fs" -gt $((_sz * 85 / 102400)) ] && ok "the file system fills the partition: $_fs KiB on $((_sz / 1024)) KiB" \
    || fail "the file system is $_fs KiB on a $((_sz / 1024)) KiB partition"
  # (this service is a oneshot that the default target waits for: no waiting for the target here)
  _f=$(systemctl --failed --no-legend --plain 2>&1)
  [ -z "$_f" ] && ok "systemd started the system with no failed unit" || fail "failed units: $(echo "$_f" | tr '\n' ';')"
}
# check_uefi_boot WHEN: systemd-boot started this system from a fresh variable store (the host
# gives one): the firmware took the disk's removable-media path; /boot/efi is this disk's ESP.
check_uefi_boot() {
  # (efivarfs cannot seek: the variable is read from its start, through a pipe)
  # shellcheck disable=SC2002 # (the cat is the point: tail would seek)
  case $(cat /sys/firmware/efi/efivars/LoaderInfo-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f 2>/dev/null | tail -c +5 | tr -d '\000') in
    systemd-boot*) ok "$1: systemd-boot started this system (LoaderInfo)" ;;
    *) fail "$1: LoaderInfo does not name systemd-boot: $(echo /sys/firmware/efi/efivars/Loader*)" ;;
  esac
  efibootmgr -v 2>&1 | grep -q 'systemd-bootx64.efi' && fail "$1: the NVRAM has the installer's entry: this boot proves nothing about the removable path" \
    || ok "$1: a fresh NVRAM without the installer's entry: the firmware started EFI/BOOT/BOOTX64.EFI"
  _eu=$(blkid -p -o value -s UUID /dev/vda1)
  grep -q '^/dev/vda1 /boot/efi vfat ' /proc/mounts && grep -q "^UUID=$_eu /boot/efi vfat " /etc/fstab \
    && ok "$1: fstab mounted this disk's ESP (UUID=$_eu) on /boot/efi" || fail "$1: /boot/efi: $(grep /boot/efi /proc/mounts); fstab: $(grep /boot/efi /etc/fstab)"
}
# install_under_load TARGET PREPHASE LOADPHASE ARGS...: the write load starts (files named after
# PREPHASE), then livemirror-install TARGET runs under it (files named after LOADPHASE); at least
# 6 files must have been written entirely while it ran.
install_under_load() {
  _tgt=$1 _pp=$2 _lp=$3
  shift 3
  mkdir -p "$D"
  [ -f "$D/hot.bin" ] || dd if=/dev/urandom of="$D/hot.bin" bs=4096 count=64 conv=fsync 2>/dev/null || fail "creating hot.bin"
  rm -f /run/lmtest/stop
  phase "$_pp"
  busybox sh /lmtest/load.sh "$D" &
  LOADPID=$!
  wait_files "$_pp" 3
  ok "write load running (pid $LOADPID): $(count "$_pp") files before the install"
  phase "$_lp"
  T0=$(up)
  ( livemirror-install --yes --rate "$RATE" "$@" "$_tgt"; echo $? > /run/lmtest/install.rc ) 2>&1 | while read -r l; do
    echo "$l" >> /run/lmtest/install.out
    info "install: $l"
  done
  RC=$(cat /run/lmtest/install.rc)
  T1=$(up)
  SECS=$(echo "$T1 $T0" | awk '{printf "%.1f", $1-$2}')
  [ "$RC" = 0 ] && ok "livemirror-install $* $_tgt exited 0 after $SECS s" || fail "livemirror-install $* $_tgt exited $RC"
  info "install_secs=$SECS"
  N=$(count_within "$_lp")
  [ "$N" -ge 6 ] && ok "$N files were written entirely in phase $_lp (the install ran meanwhile)" \
    || fail "only $N files were written in phase $_lp: the writes did not race the copy"
}
# check_result ROOTPART DISK: after an install: the daemon serves ROOTPART alone, grown.
check_result() {
  J=$(lmstatus) || fail "livemirror status --json failed after the install"
  [ "$(jget state "$J")" = source-detached ] && [ "$(jget source "$J")" = null ] && [ "$(jget target "$J")" = "$1" ] \
    && ok "status: source-detached, target $1" || fail "after the install: $J"
  _sz=$(blockdev --getsize64 "$1")
  _u=$(blkid -p -o value -s UUID "$LM_ROOTDEV")
  if [ "$DOOR" = ublk ]; then
    # No online resize of a ublk device before Linux 6.16: grow was refused, the export keeps its
    # size, and the installed system's first boot grows the file system (x-systemd.growfs).
    [ "$(jget export_size "$J")" -lt "$_sz" ] && [ "$(blockdev --getsize64 "$LM_ROOTDEV")" = "$(jget export_size "$J")" ] \
      && ok "grow was refused on this kernel: export and $LM_ROOTDEV keep $(jget export_size "$J") bytes" || fail "after the install: $J"
    grep -Eq "^UUID=$_u / ext4 [^ ]*x-systemd\.growfs" /etc/fstab && ok "fstab: / by UUID=$_u, with x-systemd.growfs for the first boot" \
      || fail "fstab lacks x-systemd.growfs: $(grep -v '^#' /etc/fstab | tr '\n' '|')"
  else
    [ "$(jget export_size "$J")" = "$_sz" ] && ok "export grown to $1's $_sz bytes" || fail "export_size $(jget export_size "$J") != $_sz"
    [ "$(($(cat /sys/block/nbd0/size) * 512))" = "$_sz" ] && ok "kernel: /dev/nbd0 is $_sz bytes" \
      || fail "kernel: /dev/nbd0 is $(($(cat /sys/block/nbd0/size) * 512)) bytes, not $_sz"
    _fs=$(df -k / | awk 'NR==2{print $2}')
    [ "$_fs" -gt $((_sz * 85 / 102400)) ] && ok "df: / is $_fs KiB (the partition is $((_sz / 1024)) KiB)" || fail "df: / is only $_fs KiB"
    grep -q "^UUID=$_u / ext4 " /etc/fstab && ok "fstab mounts / by UUID=$_u" || fail "fstab: $(tr '\n' ';' < /etc/fstab)"
  fi
  _img=/boot/initrd.img-$(uname -r)
  lsinitramfs "$_img" > /run/lmtest/initrd.list 2>/dev/null
  grep -q 'virtio_blk\.ko' /run/lmtest/initrd.list && grep -q 'scripts/local-top/livemirror' /run/lmtest/initrd.list \
    && ok "$_img: made by update-initramfs (virtio_blk for the disk; livemirror's hook, off without rd.livemirror)" \
    || fail "$_img lacks virtio_blk or the glue"
  grep -q 'update-initramfs' /run/lmtest/install.out && ok "the installer ran update-initramfs (initramfs-tools)" \
    || fail "the installer did not say update-initramfs: $(grep -i initramfs /run/lmtest/install.out | tr '\n' ' ')"
}
# The unit the package put on this root, run by the real service manager: start returns once
# READY=1 (the kernel device attached, the listeners up), STATUS= carries the state, and a stop
# flushes and disconnects the kernel device (outside root-storage-daemon mode) instead of
# leaving I/O to hang on a dead connection.
service_check() {
  U=livemirror@svc.service
  S=/var/lib/lmtest-svc
  mkdir -p "$S" /etc/livemirror
  dd if=/dev/urandom of="$S/src.img" bs=1M count=16 conv=fsync 2>/dev/null || fail "service: creating the source"
  systemctl start livemirror@absent.service 2>/dev/null && fail "service: a start without /etc/livemirror/absent.conf succeeded"
  ok "service: a start without its .conf fails"
  # This root file system is itself served over NBD, and livemirror refuses a
  # state file on an NBD device, so the state goes to a tmpfs here.
  mkdir -p /run/lmtest-svc
  echo "LIVEMIRROR_ARGS=--source $S/src.img --state /run/lmtest-svc/svc.state --nbd-device /dev/nbd1 --nbd-timeout 10" \
    > /etc/livemirror/svc.conf
  timeout 60 systemctl start "$U" || fail "service: systemctl start $U failed: $(journalctl -b -u "$U" --no-pager -o cat 2>&1 | tail -n 6 | tr '\n' '|')"
  # Type=notify: when start returns the device is already there.
  [ -e /sys/block/nbd1/pid ] && [ "$(($(cat /sys/block/nbd1/size) * 512))" = $((16 << 20)) ] \
    && ok "service: started; /dev/nbd1 is attached and 16 MiB the moment start returned" \
    || fail "service: start returned but /dev/nbd1 is not ready (size $(cat /sys/block/nbd1/size))"
  [ "$(systemctl show -p ActiveState --value "$U")" = active ] || fail "service: $U is $(systemctl show -p ActiveState --value "$U")"
  ST=$(systemctl show -p StatusText --value "$U")
  case "$ST" in *serving*) ok "service: STATUS= \"$ST\"" ;; *) fail "service: StatusText is \"$ST\"" ;; esac
  G=$("$LM" status --get state --control /run/livemirror/svc/control.sock 2>&1) && [ "$G" = serving ] \
    && ok "service: status --get state over the unit's control socket: $G" || fail "service: status --get state: $G"
  dd if=/dev/urandom of="$S/chunk" bs=64K count=16 2>/dev/null
  # Buffered, no fsync: the stop itself must flush the page cache to the export.
  dd if="$S/chunk" of=/dev/nbd1 bs=64K seek=64 conv=notrunc 2>/dev/null || fail "service: write to /dev/nbd1"
  T0=$(up)
  timeout 60 systemctl stop "$U" || fail "service: systemctl stop $U failed"
  T1=$(up)
  R=$(systemctl show -p Result --value "$U"); A=$(systemctl show -p ActiveState --value "$U")
  [ "$A" = inactive ] && [ "$R" = success ] && ok "service: stopped cleanly in $(echo "$T1 $T0" | awk '{printf "%.1f", $1-$2}') s (inactive, result $R)" \
    || fail "service: after stop: $A, result $R"
  [ -e /sys/block/nbd1/pid ] && fail "service: /dev/nbd1 is still connected after the stop" \
    || ok "service: /dev/nbd1 disconnected by the stop"
  T0=$(up)
  timeout 20 dd if=/dev/nbd1 of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null
  RC=$?
  [ "$RC" != 124 ] && ok "service: I/O to the stopped device returns at once (dd exit $RC after $(echo "$(up) $T0" | awk '{printf "%.1f", $1-$2}') s)" \
    || fail "service: I/O to /dev/nbd1 hangs after the stop"
  dd if="$S/src.img" of="$S/back" bs=64K skip=64 count=16 2>/dev/null
  cmp -s "$S/chunk" "$S/back" && ok "service: the unsynced write reached the source before the stop ended" \
    || fail "service: the 1 MiB written before the stop is not in the source"
  [ -s /run/lmtest-svc/svc.state ] && ok "service: the state file was written" || fail "service: no /run/lmtest-svc/svc.state"
  [ -e /run/livemirror/svc ] && fail "service: /run/livemirror/svc outlived the stop" || ok "service: runtime directory removed"
  rm -rf "$S" /etc/livemirror/svc.conf
}
finish_load() { # finish_load PHASE: files of PHASE (after the install), stop the load, check
  wait_files "$1" 3
  stop_load "$LOADPID"
  verify_load_files "$D"
  [ "$DOOR" = nbd ] && check_nbd_timeouts "whole run"
  E=$(dmesg_errors)
  [ -z "$E" ] && ok "no I/O errors, ext4 errors or read-only remount in dmesg" || fail "kernel messages: $E"
  grep -q ' / ext4 rw' /proc/mounts && ok "/ is still mounted read-write" || fail "/ is not read-write: $(grep ' / ' /proc/mounts)"
  tail -n 12 /run/livemirror/log | sed 's/^/LMLOG daemon: /'
}

case $STAGE in
bootonly)
  # Debugging aid (LIVEMIRROR_VM_GLUE_MODE=bootonly): check the boot, power off at once.
  root_served
  check_daemon "$(cat /run/livemirror/pid)"
  echo "LMTEST DONE t=$(up)"
  next bootonly
  ;;

live)
  root_served
  [ -r /run/livemirror/pid ] || fail "no /run/livemirror/pid: the glue did not start the daemon"
  check_daemon "$(cat /run/livemirror/pid)"
  [ -x /run/initramfs/shutdown ] && ok "the shutdown environment is ready (/run/initramfs/shutdown)" \
    || fail "no /run/initramfs/shutdown: the glue's init-bottom script did not prepare it"
  grep -q ' /run/initramfs tmpfs ' /proc/mounts && ! grep ' /run/initramfs ' /proc/mounts | grep -q noexec \
    && ok "/run/initramfs is an exec-able tmpfs" || fail "/run/initramfs is not an exec-able tmpfs: $(grep ' /run/initramfs ' /proc/mounts)"
  J=$(lmstatus) || fail "livemirror status --json failed"
  [ "$(jget state "$J")" = serving ] && ok "status: serving $(jget source "$J"), export $(jget export_size "$J") bytes" || fail "status: $J"
  [ "$FIRMWARE" = uefi ] && { [ -d /sys/firmware/efi ] && ok "booted on UEFI firmware" || fail "no /sys/firmware/efi on the UEFI variant"; }
  # The unit serves over the kernel's NBD client; with the ublk door nbd is not loaded (glue-e2e
  # covers the unit).
  [ "$DOOR" = nbd ] && service_check
  if [ "$FIRMWARE" = uefi ]; then
    install_under_load /dev/vdb2 pre install --bootloader systemd-boot
    ROOTP=/dev/vdb2
  else
    install_under_load /dev/vdb pre install --partition-table gpt
    ROOTP=/dev/vdb2
  fi
  phase after
  check_result "$ROOTP"
  [ -e /dev/mapper/live-rw ] && fail "/dev/mapper/live-rw still exists" || ok "/dev/mapper/live-rw is gone"
  L=$(ls -d /sys/block/loop*/loop 2>/dev/null | wc -l)
  [ "$L" = 0 ] && ok "no loop device is bound any more" || fail "$L loop devices still bound: $(losetup -a 2>&1)"
  [ -e /run/lmtest-live/overlay.img ] && fail "the RAM overlay file is still there" || ok "the RAM overlay file was deleted"
  if [ "$FIRMWARE" = uefi ]; then
    grep -q '^/dev/vdb1 /boot/efi vfat ' /proc/mounts && ok "the ESP /dev/vdb1 is mounted on /boot/efi" || fail "/boot/efi: $(grep /boot/efi /proc/mounts)"
    grep -q 'formatted (FAT32)' /run/lmtest/install.out && ok "the installer formatted the empty ESP" || fail "the installer did not format the ESP"
    [ -s /boot/efi/EFI/BOOT/BOOTX64.EFI ] && [ -s /boot/efi/EFI/systemd/systemd-bootx64.efi ] \
      && ok "systemd-boot on the ESP and at EFI/BOOT/BOOTX64.EFI" || fail "no systemd-boot on the ESP: $(find /boot/efi -type f | tr '\n' ' ')"
    E=$(grep -l "root=UUID=$(blkid -p -o value -s UUID "$LM_ROOTDEV")" /boot/efi/loader/entries/*.conf 2>/dev/null | head -n 1)
    [ -n "$E" ] && ! grep -q 'livemirror' "$E" && ok "boot entry $E: root=UUID=..., no livemirror options: $(grep '^options' "$E")" \
      || fail "no boot entry for the installed root: $(cat /boot/efi/loader/entries/*.conf 2>&1 | tr '\n' ' ')"
    efibootmgr -v 2>&1 | grep -q 'systemd-bootx64.efi' && ok "NVRAM: a boot entry for systemd-boot" \
      || fail "NVRAM has no boot entry for systemd-boot: $(efibootmgr -v 2>&1 | tr '\n' ';')"
  else
    grep -q 'GRUB for BIOS installed on /dev/vdb' /run/lmtest/install.out && grep -q 'root=UUID=' /boot/grub/grub.cfg \
      && ok "GRUB for BIOS on /dev/vdb, grub.cfg boots root=UUID=" || fail "GRUB: $(grep -i grub /run/lmtest/install.out | tr '\n' ' ')"
  fi
  finish_load after
  echo "LMTEST DONE t=$(up)"
  # The shutdown goes through systemd and then /run/initramfs/shutdown (the glue).
  next installed
  ;;

installed)
  check_installed /dev/vda2
  [ "$FIRMWARE" = uefi ] && check_uefi_boot installed
  check_files pre install after
  dd if=/dev/urandom of=$D/boot2.bin bs=1024 count=256 conv=fsync 2>/dev/null || fail "write on the installed disk"
  (cd $D && sha256sum boot2.bin > boot2.sha256)
  E=$(dmesg_errors); [ -z "$E" ] && ok "no I/O errors in dmesg" || fail "kernel errors: $E"
  if [ "$MOVE" = 1 ]; then
    # What a user does once, before moving this system's root to another disk: boot with
    # livemirror serving the root partition, named by its partition UUID.
    PU=$(blkid -p -o value -s PART_ENTRY_UUID /dev/vda2)
    [ -n "$PU" ] || fail "no partition UUID for /dev/vda2"
    OPTS="rd.livemirror livemirror.source=/dev/disk/by-partuuid/$PU"
    if [ "$FIRMWARE" = uefi ]; then
      # systemd-boot: the command line in /etc/kernel/cmdline, the boot entry made again.
      sed -i "s|\$| $OPTS|" /etc/kernel/cmdline
      kernel-install add "$(uname -r)" "/boot/vmlinuz-$(uname -r)" "/boot/initrd.img-$(uname -r)" > /run/lmtest/ki.log 2>&1 \
        || fail "kernel-install: $(tail -n 3 /run/lmtest/ki.log)"
      grep -q "$OPTS" /boot/efi/loader/entries/*.conf && ok "the next boot has $OPTS (systemd-boot entry)" \
        || fail "the boot entry lacks the livemirror options: $(cat /boot/efi/loader/entries/*.conf)"
    else
      # shellcheck disable=SC2016 # (GRUB's own variable, expanded by grub-mkconfig)
      printf 'GRUB_CMDLINE_LINUX_DEFAULT="$GRUB_CMDLINE_LINUX_DEFAULT %s"\n' "$OPTS" > /etc/default/grub.d/livemirror-move.cfg
      update-grub > /run/lmtest/update-grub.log 2>&1 || fail "update-grub: $(tail -n 3 /run/lmtest/update-grub.log)"
      grep -q "$OPTS" /boot/grub/grub.cfg && ok "the next boot has $OPTS (grub.cfg)" || fail "grub.cfg lacks the livemirror options"
    fi
    echo "LMTEST DONE t=$(up)"
    next move
  fi
  echo "LMTEST DONE t=$(up)"
  next finished
  ;;

move)
  root_served
  [ -r /run/livemirror/pid ] || fail "no /run/livemirror/pid: the glue did not start the daemon"
  check_daemon "$(cat /run/livemirror/pid)"
  J=$(lmstatus) || fail "livemirror status --json failed"
  SRC=$(jget source "$J")
  [ "$(jget state "$J")" = serving ] && [ "$(readlink -f "$SRC")" = /dev/vda2 ] \
    && ok "status: serving $SRC (= /dev/vda2, the installed root partition)" || fail "status: $J"
  check_files pre install after
  # No options but the target: the firmware, the partition table and the boot loader are the
  # installer's own choice (on UEFI systemd-boot, since systemd-boot booted this system).
  install_under_load /dev/vdb premove move
  phase postmove
  if [ "$FIRMWARE" = uefi ]; then
    check_result /dev/vdb2
    grep -q 'boot: systemd-boot, initramfs by initramfs-tools' /run/lmtest/install.out \
      && ok "the installer chose systemd-boot by itself (it booted this system)" || fail "the installer did not choose systemd-boot: $(grep 'boot:' /run/lmtest/install.out)"
    grep -q '^/dev/vdb1 /boot/efi vfat ' /proc/mounts && ! grep -q '^/dev/vda1 ' /proc/mounts \
      && ok "/boot/efi is disk B's ESP now, disk A's is unmounted" || fail "/boot/efi: $(grep -E 'vda1|/boot/efi' /proc/mounts)"
    EU=$(blkid -p -o value -s UUID /dev/vdb1)
    grep -q "^UUID=$EU /boot/efi vfat " /etc/fstab && ok "fstab mounts /boot/efi by disk B's ESP (UUID=$EU)" || fail "fstab: $(tr '\n' ';' < /etc/fstab)"
    grep -q 'livemirror' /etc/kernel/cmdline /boot/efi/loader/entries/*.conf && fail "livemirror options stay: $(cat /etc/kernel/cmdline)" \
      || ok "/etc/kernel/cmdline and disk B's boot entry have no livemirror options"
    efibootmgr -v 2>&1 | grep -i "$(blkid -p -o value -s PART_ENTRY_UUID /dev/vdb1)" | grep -q 'systemd-bootx64.efi' \
      && ok "NVRAM: a boot entry for systemd-boot on disk B's ESP" || fail "no NVRAM entry for disk B: $(efibootmgr -v 2>&1 | tr '\n' ';')"
  else
    check_result /dev/vdb1
    grep -q 'GRUB for BIOS installed on /dev/vdb' /run/lmtest/install.out && ok "GRUB for BIOS on /dev/vdb" || fail "no GRUB on /dev/vdb"
    # The options for the one boot into livemirror are taken out of GRUB's settings again.
    grep -q "removed livemirror's boot options from /etc/default/grub.d/livemirror-move.cfg" /run/lmtest/install.out \
      && ! grep -q 'livemirror' /etc/default/grub.d/livemirror-move.cfg \
      && ok "the installer removed the one-boot options from /etc/default/grub.d/livemirror-move.cfg" \
      || fail "the one-boot options are still set: $(cat /etc/default/grub.d/livemirror-move.cfg)"
    grep -q 'livemirror' /boot/grub/grub.cfg && fail "grub.cfg still boots with livemirror options: $(grep -m1 'linux.*livemirror' /boot/grub/grub.cfg)" \
      || ok "grub.cfg boots without rd.livemirror and livemirror.source"
  fi
  grep -q "closed: nothing runs from it" /run/lmtest/install.out && grep -q 'the old disk /dev/vda is not in use any more' /run/lmtest/install.out \
    && ok "the installer says the old disk /dev/vda is closed and not in use" || fail "no word on the old disk: $(tail -n 4 /run/lmtest/install.out | tr '\n' ' ')"
  finish_load postmove
  echo "LMTEST DONE t=$(up)"
  next moved
  ;;

moved)
  if [ "$FIRMWARE" = uefi ]; then
    check_installed /dev/vda2
    check_uefi_boot moved
  else
    check_installed /dev/vda1
  fi
  check_files pre install after premove move postmove
  dd if=/dev/urandom of=$D/boot4.bin bs=1024 count=256 conv=fsync 2>/dev/null || fail "write on the moved disk"
  (cd $D && sha256sum boot4.bin > boot4.sha256)
  E=$(dmesg_errors); [ -z "$E" ] && ok "no I/O errors in dmesg" || fail "kernel errors: $E"
  echo "LMTEST DONE t=$(up)"
  next finished
  ;;

*) fail "unknown stage $STAGE" ;;
esac
