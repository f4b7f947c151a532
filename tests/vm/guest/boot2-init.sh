#!/bin/busybox sh
# shellcheck shell=dash # busybox sh, checked as the shell closest to it
# The second boot's initramfs /init: mount /dev/vda (the disk livemirror installed onto) as
# root, read-write, and hand over to its /sbin/init with lm.mode=installed on the command line.
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
. /lmtest/common.sh
for m in $(cat /etc/modules.order); do insmod "/lib/modules/$m" || fail "insmod $m"; done
i=0
while [ ! -b /dev/vda ]; do i=$((i + 1)); [ $i -gt 100 ] && fail "no /dev/vda"; sleep 0.1; done
mount -t ext4 /dev/vda /newroot || fail "mount /dev/vda"
ok "installed disk mounted as root at t=$(up)"
for d in dev proc sys; do mkdir -p /newroot/$d; mount --move /$d /newroot/$d; done
exec switch_root /newroot /sbin/init
