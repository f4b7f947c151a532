#!/bin/busybox sh
# shellcheck shell=dash # busybox sh, checked as the shell closest to it
# The guest side of benches/guest/live-stack.sh: the initramfs' /init. Three ways of serving
# the same read-only ext4 image (vda) with the writes kept in RAM, each mounted at /mnt:
#   overlay        livemirror serve --source /dev/vda --overlay /run/lm/overlay --nbd-device /dev/nbdN
#   dm-livemirror  dm snapshot live-rw of vda (COW: a loop device over a sparse tmpfs file, as
#                  dracut's dmsquash-live makes it), served by livemirror serve --source
#                  /dev/mapper/live-rw --nbd-device /dev/nbdN (the glue's stack today)
#   dm             the same dm snapshot mounted directly (the medium without livemirror)
# Per stack and repeat, from a fresh overlay or COW: fio 4K random reads, then 4K random writes
# (direct I/O on /mnt/fio.dat, a file of the image's own data), then `tar -x` of a package tree
# (from a copy in RAM) and `sync`, then a cold-cache `tar -c` of what was extracted.
# Disks: vda the image (read-only), vdb the tools (fio, livemirror, dmsetup, GNU tar:
# lm_tools_image), vdc the package tree as a plain tar archive (the disk is the archive).
# Kernel command line: lmb.stacks=overlay,dm-livemirror,dm lmb.reps=N lmb.secs=S
#   lmb.entries=N (what the tree holds, checked after each extraction)
# Lines for the host (cpu_ms: the daemon's CPU time, - without one; gcpu_ms: the whole guest's):
#   LMBENCH row stack=S rep=R phase=randread|randwrite|untar|readback iops=I kib_s=B secs=T err=E cpu_ms=C gcpu_ms=G
#   LMBENCH ram stack=S rep=R kib=K          (what the overlay or COW file holds at the end)
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
# The tree's copy, the overlay or COW file and the daemon's sockets: RAM, as on a live medium.
mount -t tmpfs -o size=90% tmpfs /run
up() { read -r _u _ < /proc/uptime; echo "$_u"; }
say() { echo "LMBENCH info $* [t=$(up)]"; }
die() {
  echo "LMBENCH fail $* [t=$(up)]"
  [ -s /run/lm/srv.log ] && tail -n 5 /run/lm/srv.log | sed 's/^/LMBENCH log: /'
  dmesg | tail -n 20 | sed 's/^/LMBENCH dmesg: /'
  echo o > /proc/sysrq-trigger; sleep 10
}
arg() { _v=$(tr ' ' '\n' < /proc/cmdline | sed -n "s/^lmb\.$1=//p" | tail -n 1); echo "${_v:-$2}" | tr ',' ' '; }

for m in $(cat /etc/modules.order); do
  case $m in
    nbd.ko) insmod "/lib/modules/$m" nbds_max=64 || die "insmod $m" ;;   # a fresh device per run
    *) insmod "/lib/modules/$m" || die "insmod $m" ;;
  esac
done
mkdir -p /tools /mnt /run/lm && mount -t ext4 -o ro,noload /dev/vdb /tools || die "mount the tools disk"
T=/tools/run-tool
STACKS=$(arg stacks overlay,dm-livemirror,dm)
REPS=$(arg reps 3)
SECS=$(arg secs 10)
ENTRIES=$(arg entries 0)
NCPU=$(grep -c ^processor /proc/cpuinfo)
SECT=$(blockdev --getsz /dev/vda)
say "kernel $(uname -r), $NCPU CPUs, $(awk '/MemTotal/{print $2}' /proc/meminfo) KiB, image $((SECT / 2048)) MiB"
say "versions: $($T fio --version); $($T livemirror --version); $($T tar --version | head -n 1); dmsetup $($T dmsetup --version | head -n 1)"
# The archive once into RAM: every extraction reads it from there, not from a disk.
cat /dev/vdc > /run/tree.tar || die "copy the tree archive into RAM"
say "tree archive $(($(wc -c < /run/tree.tar) >> 20)) MiB in RAM"
$T fio --version >/dev/null; $T livemirror --version >/dev/null; $T dmsetup --version >/dev/null

# CPU time in clock ticks (USER_HZ 100): of a process (all its threads), of the whole guest.
ticks() { [ -n "$1" ] && [ -r "/proc/$1/stat" ] && awk '{print $14 + $15}' "/proc/$1/stat" || echo -; }
gticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
ms() { case $1 in -*|'') echo - ;; *) echo $(($1 * 10)) ;; esac; }

DEV_I=0 SPID='' COW=''
# serve SOURCE [EXTRA...]: livemirror serves SOURCE on the next /dev/nbdN (its own netlink
# attach, the default connections: one per CPU); sets DEV and SPID once every connection is live.
serve() {
  DEV=/dev/nbd$DEV_I; DEV_I=$((DEV_I + 1))
  _src=$1; shift
  rm -f /run/lm/s.sock /run/lm/ctl.sock
  $T livemirror serve --source "$_src" "$@" --nbd-device "$DEV" --nbd-timeout 30 \
    --listen unix:/run/lm/s.sock --control /run/lm/ctl.sock </dev/null >/run/lm/srv.log 2>&1 &
  SPID=$!
  _i=0
  until [ "$(cat "/sys/block/${DEV#/dev/}/size" 2>/dev/null || echo 0)" != 0 ]; do
    _i=$((_i + 1)); [ $_i -gt 600 ] && die "$DEV not connected"; sleep 0.1
  done
  if [ "$NCPU" -gt 1 ]; then
    _i=0
    until grep -q "all connections of $DEV are live" /run/lm/srv.log; do
      _i=$((_i + 1)); [ $_i -gt 600 ] && die "not all connections of $DEV came up"; sleep 0.1
    done
  fi
}
# live_rw: /dev/mapper/live-rw as dmsquash-live makes it: a sparse 32 GiB file on tmpfs (its
# default rd.live.overlay.size), a loop device over it, a persistent snapshot with overflow, 4 KiB chunks.
live_rw() {
  truncate -s 32G /run/lm/cow || die "the COW file"
  COW=$(losetup -f) && losetup "$COW" /run/lm/cow || die "losetup $COW"
  echo "0 $SECT snapshot /dev/vda $COW PO 8" | $T dmsetup --noudevsync create live-rw || die "dmsetup create live-rw"
  $T dmsetup --noudevsync mknodes live-rw
  [ -b /dev/mapper/live-rw ] || die "no /dev/mapper/live-rw"
}
# setup STACK: the stack built from nothing; sets MDEV (what is mounted) and RAMFILE.
setup() {
  SPID='' COW=''
  case $1 in
    overlay) rm -f /run/lm/overlay; serve /dev/vda --overlay /run/lm/overlay; MDEV=$DEV RAMFILE=/run/lm/overlay ;;
    dm-livemirror) live_rw; serve /dev/mapper/live-rw; MDEV=$DEV RAMFILE=/run/lm/cow ;;
    dm) live_rw; MDEV=/dev/mapper/live-rw RAMFILE=/run/lm/cow ;;
    *) die "unknown stack $1 (overlay, dm-livemirror, dm)" ;;
  esac
  mount -t ext4 "$MDEV" /mnt || die "$1: mount $MDEV"
}
teardown() {
  umount /mnt || die "$1: umount"
  if [ -n "$SPID" ]; then
    # A clean stop flushes and disconnects the device.
    kill -TERM "$SPID"; wait "$SPID" || die "$1: the daemon exited $? ($(tail -n 2 /run/lm/srv.log))"
    _i=0
    while [ "$(cat "/sys/block/${DEV#/dev/}/size" 2>/dev/null || echo 0)" != 0 ]; do
      _i=$((_i + 1)); [ $_i -gt 100 ] && die "$DEV still connected after the daemon stopped"; sleep 0.1
    done
  fi
  if [ -n "$COW" ]; then
    $T dmsetup --noudevsync remove live-rw || die "dmsetup remove live-rw"
    losetup -d "$COW" || die "losetup -d $COW"
  fi
  rm -f /run/lm/overlay /run/lm/cow
}

# fio_job RW: 4 KiB RW on /mnt/fio.dat, QD32 spread over one job per CPU, each on its own part
# of the file; the same offsets in every run (fio's default random seed). Prints "iops kib_s err".
FSIZE=
fio_job() {
  _per=$((32 / NCPU)); [ "$_per" -ge 1 ] || _per=1
  $T fio --name=b --filename=/mnt/fio.dat --direct=1 --ioengine=libaio --rw="$1" --bs=4k \
    --iodepth="$_per" --numjobs="$NCPU" --size=$((FSIZE / NCPU)) --offset_increment=$((FSIZE / NCPU)) \
    --time_based --runtime="$SECS" --group_reporting --minimal 2>/run/fio.err \
    | awk -F';' 'NF > 50 {printf "%d %d %d\n", $8 + $49, $7 + $48, $5}'
}
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
# row STACK REP PHASE IOPS KIB_S SECS ERR P0 P1 G0 G1
row() {
  _pd=-; [ "$8" != - ] && [ "$9" != - ] && _pd=$(($9 - $8))
  echo "LMBENCH row stack=$1 rep=$2 phase=$3 iops=$4 kib_s=$5 secs=$6 err=$7 cpu_ms=$(ms "$_pd") gcpu_ms=$(ms $((${11} - ${10})))"
}

# measure STACK REP: everything on one freshly built stack.
measure() {
  setup "$1"
  [ -z "$FSIZE" ] && { FSIZE=$(stat -c %s /mnt/fio.dat) || die "no /mnt/fio.dat in the image"; }
  say "$1 (rep $2) on $MDEV"
  for rw in randread randwrite; do
    drop
    P0=$(ticks "$SPID") G0=$(gticks)
    R=$(fio_job "$rw")
    P1=$(ticks "$SPID") G1=$(gticks)
    # shellcheck disable=SC2086 # three numbers, split on purpose
    set -- "$1" "$2" ${R:-0 0 1}
    [ "$5" = 0 ] || sed 's/^/LMBENCH fio: /' /run/fio.err | tail -n 5
    row "$1" "$2" "$rw" "$3" "$4" "$SECS" "$5" "$P0" "$P1" "$G0" "$G1"
    set -- "$1" "$2"
  done
  # The package tree: extraction and sync, timed together (the data reaches the stack in sync).
  drop
  mkdir /mnt/tree
  P0=$(ticks "$SPID") G0=$(gticks) T0=$(up)
  $T tar -x --numeric-owner -f /run/tree.tar -C /mnt/tree || die "$1: tar -x"
  sync
  T1=$(up) P1=$(ticks "$SPID") G1=$(gticks)
  row "$1" "$2" untar - - "$(echo "$T1 $T0" | awk '{printf "%.2f", $1 - $2}')" 0 "$P0" "$P1" "$G0" "$G1"
  # Reading back what was written, from a cold cache: the chunks the overlay or COW holds.
  drop
  P0=$(ticks "$SPID") G0=$(gticks) T0=$(up)
  $T tar -c -f - -C /mnt tree | cat > /dev/null || die "$1: tar -c"
  T1=$(up) P1=$(ticks "$SPID") G1=$(gticks)
  row "$1" "$2" readback - - "$(echo "$T1 $T0" | awk '{printf "%.2f", $1 - $2}')" 0 "$P0" "$P1" "$G0" "$G1"
  N=$(find /mnt/tree | wc -l)
  [ "$ENTRIES" = 0 ] || [ "$N" = "$ENTRIES" ] || die "$1: the extracted tree has $N entries, the archive $ENTRIES"
  sync
  echo "LMBENCH ram stack=$1 rep=$2 kib=$(du -k "$RAMFILE" | cut -f1)"
  [ -n "$COW" ] && say "$1: $($T dmsetup status live-rw)"
  teardown "$1"
}

# Each repeat starts the order one stack later, so that every stack takes every position once
# every (number of stacks) repeats: the guest's state drifts (page cache, slab, the host's load).
# shellcheck disable=SC2086 # the stacks, split on purpose
set -- $STACKS
NS=$#
r=0
while [ "$r" -lt "$REPS" ]; do
  i=0
  while [ "$i" -lt "$NS" ]; do
    j=$(( (r + i) % NS + 1 ))
    eval "S=\${$j}"
    measure "$S" "$((r + 1))"
    i=$((i + 1))
  done
  r=$((r + 1))
done
echo "LMBENCH done [t=$(up)]"
echo o > /proc/sysrq-trigger
sleep 10
