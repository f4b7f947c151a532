# shellcheck shell=dash # run or sourced by busybox sh in the guest
# Second boot: the kernel came up with the former target disk as /dev/vda and mounted it
# directly as root (no NBD, no livemirror, no snapshot). Check that the install arrived.
. /lmtest/common.sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
echo "LMTEST INFO: installed-system check start (pid $$) t=$(up)"
ROOT=$(grep ' / ' /proc/mounts | tail -n 1)
case "$ROOT" in /dev/vda\ /\ ext4\ *) ok "root is the installed disk: $ROOT" ;; *) fail "root is not /dev/vda: $ROOT" ;; esac
[ -e /dev/nbd0 ] && fail "nbd is loaded in the installed boot" || true
grep -q "$(cmdline token none)" /etc/base-marker && ok "base image content present on the installed disk" \
  || fail "/etc/base-marker does not hold this run's token"
echo 3 > /proc/sys/vm/drop_caches
cd /data || fail "no /data"
TOTAL=$(wc -l < MANIFEST)
BADSUM=$(sha256sum -c MANIFEST 2>&1 | grep -v ': OK$' || true)
[ -z "$BADSUM" ] && ok "all $TOTAL manifest files intact on the installed disk" || fail "manifest mismatches: $BADSUM"
sha256sum -c hot.sha256 >/dev/null 2>&1 && ok "hot.bin intact" || fail "hot.bin mismatch"
for p in $(cat EXPECTED_PHASES 2>/dev/null || echo pre sync synced detached grown); do
  n=$(grep -c "^$p-" PHASES || true)
  [ "$n" -gt 0 ] && ok "$n files from phase $p present" || fail "no files from phase $p"
done
if [ "$(cmdline growfs 0)" = 1 ]; then
  # The first boot of the installed system grows its file system to the disk: what is left to
  # do where the kernel could not resize the live device (a ublk device before Linux 6.16).
  OUT=$(/usr/sbin/resize2fs /dev/vda 2>&1) || fail "resize2fs /dev/vda at the first boot: $OUT"
  FS=$(df -k / | awk 'NR==2{print $2}')
  DISK=$(blockdev --getsize64 /dev/vda)
  [ "$FS" -gt $((DISK * 85 / 100 / 1024)) ] && ok "first boot: the file system fills the disk ($FS KiB of $((DISK / 1024)))" \
    || fail "first boot: after resize2fs / is $FS KiB on a $DISK-byte disk"
fi
dd if=/dev/urandom of=/data/boot2.bin bs=1024 count=256 conv=fsync 2>/dev/null || fail "write on the installed disk"
S1=$(sha256sum boot2.bin); echo "$S1" > boot2.sha256; sync; echo 3 > /proc/sys/vm/drop_caches
[ "$(sha256sum boot2.bin)" = "$S1" ] && ok "the installed system writes and reads back" || fail "boot2.bin mismatch"
info "fs_kib=$(df -k / | awk 'NR==2{print $2}') disk_bytes=$(blockdev --getsize64 /dev/vda)"
cd /
sync
mount -o remount,ro / && ok "root remounted read-only" || softfail "remount,ro / failed"
echo "LMTEST DONE t=$(up)"
lm_poweroff
