#!/bin/busybox sh
# shellcheck shell=dash # busybox sh, checked as the shell closest to it
# Stage 1 (the initramfs' /init): what a live CD's initrd does, with livemirror in the middle.
#   /dev/vda (read-only image) + RAM overlay (loop on a tmpfs file) -> dm-snapshot "live"
#   -> @livemirror serve (root storage daemon: supervisor + daemon, from /run, survives
#   switch_root) -> kernel NBD client -> /dev/nbd0 -> mount -> classic switch_root (mount --move
#   /dev /proc /sys /run) -> /sbin/init on the served root (stage 2).
# Kernel command line knobs:
#   lm.nbd=livemirror|nbd-client|ioctl  who connects /dev/nbd0: livemirror itself over netlink
#       (serve --nbd-device, the default), `nbd-client -unix` (netlink), or `nbd-client -L` (ioctl)
#   lm.switchroot=move|keep  move (default): the classic way. keep: a variant where /dev /proc
#       /sys /run are bind-mounted into the new root and the originals stay in the initramfs
#       (the daemon's root), with the libraries on a tmpfs that switch_root does not empty.
#   lm.door=nbd|ublk  the kernel device of the root: /dev/nbd0 (default) or /dev/ublkb0
#       (serve --ublk-device 0; needs a kernel with ublk_drv, LIVEMIRROR_VM_KERNEL=6.12)
#   lm.state=1  serve --state /run/livemirror/state      lm.nbdtimeout=SECS  (--nbd-timeout)
#   lm.serveargs=A,B,...  more serve arguments           lm.overlay=MiB
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o size=75%,mode=755 tmpfs /run
. /lmtest/common.sh

echo "LMTEST INFO: stage1 start kernel=$(uname -r) t=$(up)"
NBDMODE=$(cmdline nbd livemirror)
[ "$(cmdline door nbd)" = ublk ] && NBDMODE=ublk
RDEV=${LM_ROOTDEV#/dev/}
SWITCHROOT=$(cmdline switchroot move)

# Everything that must keep working after switch_root, whatever happens to the served root,
# lives in /run (tmpfs, moved into the new root): a busybox for the watchdog (started by stage 2)
# and the guest scripts, and the daemon's binary. The daemon is started as "@livemirror" (argv[0]
# '@': root storage daemon mode) from /run/livemirror, with cwd /.
mkdir -p /run/lmtest /run/livemirror
cp /bin/busybox /run/lmtest/busybox
cp /lmtest/*.sh /run/lmtest/
cp /usr/sbin/livemirror /run/livemirror/livemirror
ln -s livemirror /run/livemirror/@livemirror
echo install > /run/lmtest/phase

for m in $(cat /etc/modules.order); do insmod "/lib/modules/$m" || fail "insmod $m"; done
ok "modules loaded: $(tr '\n' ' ' < /etc/modules.order)"

# ---- the live-CD stack: read-only image + RAM overlay -> dm-snapshot
[ -b /dev/vda ] || fail "no /dev/vda"
[ -b /dev/vdb ] || fail "no /dev/vdb"
SECT=$(cat /sys/block/vda/size)
truncate -s "$(cmdline overlay 160)M" /run/overlay.img
OVL=$(losetup -f) || fail "no free loop device"
losetup "$OVL" /run/overlay.img || fail "losetup $OVL"
echo "$OVL" > /run/lmtest/overlay-loop
echo "0 $SECT snapshot /dev/vda $OVL N 8" | /usr/sbin/dmsetup --noudevsync create live || fail "dmsetup create live"
/usr/sbin/dmsetup --noudevsync mknodes live
[ -b /dev/mapper/live ] || fail "no /dev/mapper/live"
ok "live-CD stack: /dev/mapper/live = $(/usr/sbin/dmsetup table live)"

# ---- @livemirror serve
SERVE_EXTRA=""
[ "$NBDMODE" = livemirror ] && SERVE_EXTRA="--nbd-device /dev/nbd0 --nbd-timeout $(cmdline nbdtimeout 10)"
[ "$NBDMODE" = ublk ] && SERVE_EXTRA="--ublk-device 0"
[ "$(cmdline state 0)" = 1 ] && SERVE_EXTRA="$SERVE_EXTRA --state /run/livemirror/state"
SERVE_EXTRA="$SERVE_EXTRA $(cmdline serveargs '' | tr ',' ' ')"
echo "serve --source /dev/mapper/live --listen unix:/run/livemirror/nbd.sock --control $LM_CTL $SERVE_EXTRA" > /run/lmtest/serve-args
T_SERVE=$(up)
(
  cd / || exit 1
  PATH=/run/livemirror:$PATH
  # shellcheck disable=SC2086
  exec @livemirror serve --source /dev/mapper/live --listen unix:/run/livemirror/nbd.sock \
    --control "$LM_CTL" $SERVE_EXTRA </dev/null >/run/livemirror.log 2>&1
) &
LMPID=$!
echo "$LMPID" > /run/livemirror/serve.pid
i=0
until [ -S "$LM_CTL" ] && /run/livemirror/livemirror status --control "$LM_CTL" >/dev/null 2>&1; do
  kill -0 "$LMPID" 2>/dev/null || fail "livemirror serve exited: $(tail -n 5 /run/livemirror.log)"
  i=$((i + 1)); [ $i -gt 300 ] && fail "livemirror serve not ready after 30 s"
  sleep 0.1
done
ok "@livemirror serve ready (supervisor pid $LMPID) in $(echo "$(up) $T_SERVE" | awk '{printf "%.2f", $1-$2}') s: $SERVE_EXTRA"

# ---- the kernel's NBD client
T_CONN=$(up)
case $NBDMODE in
  nbd-client|netlink) /usr/sbin/nbd-client -unix /run/livemirror/nbd.sock /dev/nbd0 || fail "nbd-client -unix (netlink)" ;;
  ioctl) /usr/sbin/nbd-client -unix /run/livemirror/nbd.sock /dev/nbd0 -L || fail "nbd-client -unix -L (ioctl)" ;;
  livemirror) : ;;   # serve --nbd-device connected it over netlink
  ublk) : ;;         # serve --ublk-device made /dev/ublkb0
  *) fail "unknown lm.nbd=$NBDMODE" ;;
esac
i=0
while [ "$(cat /sys/block/"$RDEV"/size 2>/dev/null)" = 0 ] || [ ! -e /sys/block/"$RDEV"/size ]; do
  i=$((i + 1)); [ $i -gt 600 ] && fail "$LM_ROOTDEV has no size after 60 s (mode $NBDMODE)"
  sleep 0.1
done
T_SIZE=$(up)
# The first open reads the partition table through the daemon.
NBDSIZE=$(blockdev --getsize64 "$LM_ROOTDEV")
VDASIZE=$(blockdev --getsize64 /dev/vda)
[ "$NBDSIZE" = "$VDASIZE" ] || fail "$LM_ROOTDEV is $NBDSIZE bytes, the source is $VDASIZE"
ok "$LM_ROOTDEV connected ($NBDMODE mode) in $(echo "$T_SIZE $T_CONN" | awk '{printf "%.2f", $1-$2}') s, first open after $(echo "$(up) $T_SIZE" | awk '{printf "%.2f", $1-$2}') s, $NBDSIZE bytes"
info "nbd_connect_secs=$(echo "$(up) $T_CONN" | awk '{printf "%.2f", $1-$2}')"

mount -t ext4 "$LM_ROOTDEV" /newroot || fail "mount $LM_ROOTDEV"
[ -x /newroot/sbin/init ] || fail "no /sbin/init on $LM_ROOTDEV"
ok "root mounted from $LM_ROOTDEV; switch_root ($SWITCHROOT) at t=$(up)"
if [ "$SWITCHROOT" = keep ]; then
  # The keep variant (see the header): the libraries stay on a tmpfs switch_root does not empty.
  for d in /lib/x86_64-linux-gnu /lib64; do
    [ -d "$d" ] || continue
    mkdir -p "/run/lmtest/keep$d"; cp -a "$d"/. "/run/lmtest/keep$d/"
    mount -t tmpfs tmpfs "$d" && cp -a "/run/lmtest/keep$d"/. "$d"/
  done
fi
for d in dev proc sys run; do
  mkdir -p /newroot/$d
  case $SWITCHROOT in
    keep) mount --rbind /$d /newroot/$d || fail "mount --rbind /$d" ;;
    *) mount --move /$d /newroot/$d || fail "mount --move /$d" ;;
  esac
done
exec switch_root /newroot /sbin/init
