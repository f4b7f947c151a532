#!/bin/busybox sh
# Stage 1 (the initramfs' /init): what a live CD's initrd does, with livemirror in the middle.
#   /dev/vda (read-only image) + RAM overlay (loop on a tmpfs file) -> dm-snapshot "live"
#   -> livemirror serve (from /run, survives switch_root) -> unix socket -> kernel NBD client
#   -> /dev/nbd0 -> mount -> switch_root -> /sbin/init on the served root (stage 2).
# Kernel command line knobs: lm.nbd=netlink|ioctl|livemirror  lm.switchroot=keep|move
#   lm.watchdog=SECS  lm.overlay=MiB
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o size=75%,mode=755 tmpfs /run
. /lmtest/common.sh

echo "LMTEST INFO: stage1 start kernel=$(uname -r) t=$(up)"
NBDMODE=$(cmdline nbd netlink)
WATCHDOG=$(cmdline watchdog 200)

# Everything that must keep working after switch_root, whatever happens to the served root,
# lives in /run (tmpfs, moved into the new root): a busybox for the watchdog, the guest
# scripts, and the daemon with its own loader and libraries.
mkdir -p /run/lmtest /run/livemirror
cp /bin/busybox /run/lmtest/busybox
cp /lmtest/*.sh /run/lmtest/
cp -a /lmbundle/bin /lmbundle/lib /run/livemirror/
printf '#!/run/lmtest/busybox sh\nexec /run/livemirror/lib/ld-linux-x86-64.so.2 --library-path /run/livemirror/lib /run/livemirror/bin/livemirror "$@"\n' > /run/livemirror/run
chmod 755 /run/livemirror/run
echo install > /run/lmtest/phase
/run/lmtest/busybox sh /run/lmtest/watchdog.sh "$WATCHDOG" &

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

# ---- livemirror serve, running from /run (never from the root it serves: a page fault on its
# own text must not need an NBD read that only it can answer).
# HOOK(root-storage-daemon): once argv[0] '@' is implemented, start it with --argv0 @livemirror
# so a systemd initrd leaves it alone on switch_root/shutdown.
# HOOK(nbd-device): with lm.nbd=livemirror, livemirror attaches /dev/nbd0 itself over netlink.
SERVE_EXTRA=""
[ "$NBDMODE" = livemirror ] && SERVE_EXTRA="--nbd-device /dev/nbd0"
cd /run/livemirror
T_SERVE=$(up)
/run/livemirror/lib/ld-linux-x86-64.so.2 --library-path /run/livemirror/lib \
  /run/livemirror/bin/livemirror serve --source /dev/mapper/live \
  --listen unix:/run/livemirror/nbd.sock --control "$LM_CTL" $SERVE_EXTRA \
  </dev/null >/run/livemirror.log 2>&1 &
LMPID=$!
echo "$LMPID" > /run/livemirror/serve.pid
cd /
i=0
until [ -S /run/livemirror/nbd.sock ] && /run/livemirror/run status --control "$LM_CTL" >/dev/null 2>&1; do
  kill -0 "$LMPID" 2>/dev/null || fail "livemirror serve exited: $(tail -n 5 /run/livemirror.log)"
  i=$((i + 1)); [ $i -gt 300 ] && fail "livemirror serve not ready after 30 s"
  sleep 0.1
done
ok "livemirror serve ready (pid $LMPID) in $(echo "$(up) $T_SERVE" | awk '{printf "%.2f", $1-$2}') s"

# ---- the kernel's NBD client
T_CONN=$(up)
case $NBDMODE in
  netlink) /usr/sbin/nbd-client -unix /run/livemirror/nbd.sock /dev/nbd0 || fail "nbd-client (netlink)" ;;
  ioctl) /usr/sbin/nbd-client -unix /run/livemirror/nbd.sock /dev/nbd0 -L || fail "nbd-client -L (ioctl)" ;;
  livemirror) : ;;   # HOOK(nbd-device): serve --nbd-device connects it
  *) fail "unknown lm.nbd=$NBDMODE" ;;
esac
i=0
while [ "$(cat /sys/block/nbd0/size 2>/dev/null)" = 0 ] || [ ! -e /sys/block/nbd0/size ]; do
  i=$((i + 1)); [ $i -gt 600 ] && fail "/dev/nbd0 has no size after 60 s (mode $NBDMODE)"
  sleep 0.1
done
NBDSIZE=$(blockdev --getsize64 /dev/nbd0)
VDASIZE=$(blockdev --getsize64 /dev/vda)
[ "$NBDSIZE" = "$VDASIZE" ] || fail "/dev/nbd0 is $NBDSIZE bytes, the source is $VDASIZE"
ok "/dev/nbd0 connected ($NBDMODE mode) in $(echo "$(up) $T_CONN" | awk '{printf "%.2f", $1-$2}') s, $NBDSIZE bytes"
info "nbd_connect_secs=$(echo "$(up) $T_CONN" | awk '{printf "%.2f", $1-$2}')"

mount -t ext4 /dev/nbd0 /newroot || fail "mount /dev/nbd0"
[ -x /newroot/sbin/init ] || fail "no /sbin/init on /dev/nbd0"
ok "root mounted from /dev/nbd0; switch_root at t=$(up)"
# How /dev /proc /sys /run reach the new root (lm.switchroot=):
#  keep (default): bind-mount them into the new root and leave the originals mounted in the
#    initramfs, which stays the daemon's root directory after switch_root. The daemon resolves
#    the paths it is given (attach /dev/vdb) in ITS root, so it needs a /dev there.
#  move: the classic initrd way (mount --move). switch_root then empties the initramfs and the
#    daemon is left with a root that has no /dev at all: `attach /dev/vdb` fails with ENOENT.
#    HOOK(path-resolution): make move the default once livemirror resolves control-command
#    paths in the caller's root (e.g. the client passes an open fd over the control socket).
SWITCHROOT=$(cmdline switchroot keep)
for d in dev proc sys run; do
  mkdir -p /newroot/$d
  case $SWITCHROOT in
    move) mount --move /$d /newroot/$d || fail "mount --move /$d" ;;
    *) mount --rbind /$d /newroot/$d || fail "mount --rbind /$d" ;;
  esac
done
info "switchroot_mode=$SWITCHROOT"
exec switch_root /newroot /sbin/init
