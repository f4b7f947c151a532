#!/bin/busybox sh
# shellcheck shell=dash # busybox sh, checked as the shell closest to it
# The guest side of benches/guest/live-stack.sh: the initramfs' /init. Three ways of serving
# the same read-only ext4 image (vda) with the writes kept in RAM, each mounted at /mnt/STACK:
#   overlay        livemirror serve --source /dev/vda --overlay /run/lm/overlay --nbd-device /dev/nbdN
#   dm-livemirror  a dm snapshot of vda (COW: a loop device over a sparse tmpfs file, as dracut's
#                  dmsquash-live makes live-rw), served by livemirror serve --source
#                  /dev/mapper/live-rw-lm --nbd-device /dev/nbdN (the glue's stack until now)
#   dm             another such snapshot, live-rw, mounted directly (the medium without livemirror)
# Each repeat builds every stack afresh (fresh overlay and COW files), then runs each phase on
# every stack in turn, so that the measurements compared sit seconds apart, not minutes (the
# host's load drifts): fio 4K random reads, fio 4K random writes (direct I/O on /mnt/STACK/fio.dat,
# a file of the image's own data), `tar -x` of a package tree (from a copy in RAM) and `sync`,
# a cold-cache `tar -c` of what was extracted; then takes every stack down. The order of the
# stacks turns by one each repeat.
# Disks: vda the image (read-only), vdb the tools (fio, livemirror, dmsetup, GNU tar:
# lm_tools_image), vdc the package tree as a plain tar archive (the disk is the archive).
# Kernel command line: lmb.stacks=overlay,dm-livemirror,dm lmb.reps=N lmb.secs=S
#   lmb.entries=N (what the tree holds, checked after each extraction)
# Lines for the host (cpu_ms: the stack's daemon's CPU time, - without one; idle_ms: the other
# stacks' daemons' meanwhile; gcpu_ms: the whole guest's; rd.. fl: the requests the kernel
# completed on the mounted device):
#   LMBENCH row stack=S rep=R phase=randread|randwrite|untar|readback iops=I kib_s=B secs=T err=E
#     cpu_ms=C idle_ms=D gcpu_ms=G rd=N rd_kib=K wr=N wr_kib=K fl=N
#   LMBENCH ram stack=S rep=R kib=K          (what the overlay or COW file holds at the end)
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
# The tree's copy, the overlay and COW files and the daemons' sockets: RAM, as on a live medium.
mount -t tmpfs -o size=90% tmpfs /run
up() { read -r _u _ < /proc/uptime; echo "$_u"; }
say() { echo "LMBENCH info $* [t=$(up)]"; }
die() {
  echo "LMBENCH fail $* [t=$(up)]"
  for _l in /run/lm/*.log; do [ -s "$_l" ] && tail -n 5 "$_l" | sed "s|^|LMBENCH log ${_l##*/}: |"; done
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
mkdir -p /tools /run/lm && mount -t ext4 -o ro,noload /dev/vdb /tools || die "mount the tools disk"
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

# CPU time in clock ticks (USER_HZ 100): of processes (all their threads), of the whole guest.
ticks() { _s=0; for _p in "$@"; do [ -r "/proc/$_p/stat" ] && _s=$((_s + $(awk '{print $14 + $15}' "/proc/$_p/stat"))); done; echo "$_s"; }
gticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
# bstat FILE: what the kernel completed on a device so far (its /sys/block/NAME/stat):
# "reads read_KiB writes write_KiB flushes".
bstat() { awk '{printf "%d %d %d %d %d\n", $1, $3 / 2, $5, $7 / 2, $16}' "$1"; }
# Per stack: its daemon's pid (SPID_S), the device mounted (MDEV_S) and its stat file (BST_S),
# its dm snapshot's name and loop device (DMN_S, LOOP_S), the file that holds its writes in RAM
# (RAM_S); S is the stack's name with - as _.
v() { eval "echo \"\${$1_$(echo "$2" | tr - _)}\""; }
setv() { eval "$1_$(echo "$2" | tr - _)=\"\$3\""; }

DEV_I=0
# serve STACK SOURCE [EXTRA...]: livemirror serves SOURCE on the next /dev/nbdN (its own netlink
# attach, the default connections: one per CPU); returns once every connection is live.
serve() {
  _st=$1 _src=$2; shift 2
  _dev=/dev/nbd$DEV_I; DEV_I=$((DEV_I + 1))
  rm -f "/run/lm/$_st.sock" "/run/lm/$_st.ctl"
  $T livemirror serve --source "$_src" "$@" --nbd-device "$_dev" --nbd-timeout 30 \
    --listen "unix:/run/lm/$_st.sock" --control "/run/lm/$_st.ctl" </dev/null >"/run/lm/$_st.log" 2>&1 &
  setv SPID "$_st" $!
  setv MDEV "$_st" "$_dev"
  _i=0
  until [ "$(cat "/sys/block/${_dev#/dev/}/size" 2>/dev/null || echo 0)" != 0 ]; do
    _i=$((_i + 1)); [ $_i -gt 600 ] && die "$_st: $_dev not connected"; sleep 0.1
  done
  if [ "$NCPU" -gt 1 ]; then
    _i=0
    until grep -q "all connections of $_dev are live" "/run/lm/$_st.log"; do
      _i=$((_i + 1)); [ $_i -gt 600 ] && die "$_st: not all connections of $_dev came up"; sleep 0.1
    done
  fi
}
# snapshot STACK NAME: /dev/mapper/NAME as dmsquash-live makes live-rw: a sparse 32 GiB file on
# tmpfs (its default rd.live.overlay.size), a loop device over it, a persistent snapshot with
# overflow, 4 KiB chunks.
snapshot() {
  truncate -s 32G "/run/lm/$1.cow" || die "$1: the COW file"
  _loop=$(losetup -f) && losetup "$_loop" "/run/lm/$1.cow" || die "$1: losetup $_loop"
  echo "0 $SECT snapshot /dev/vda $_loop PO 8" | $T dmsetup --noudevsync create "$2" || die "$1: dmsetup create $2"
  $T dmsetup --noudevsync mknodes "$2"
  [ -b "/dev/mapper/$2" ] || die "$1: no /dev/mapper/$2"
  setv DMN "$1" "$2"; setv LOOP "$1" "$_loop"; setv RAM "$1" "/run/lm/$1.cow"
}
# setup STACK: the stack built from nothing and mounted at /mnt/STACK.
setup() {
  setv SPID "$1" ''; setv DMN "$1" ''
  case $1 in
    overlay) rm -f /run/lm/overlay; serve "$1" /dev/vda --overlay /run/lm/overlay; setv RAM "$1" /run/lm/overlay ;;
    dm-livemirror) snapshot "$1" live-rw-lm; serve "$1" /dev/mapper/live-rw-lm ;;
    dm) snapshot "$1" live-rw; setv MDEV "$1" /dev/mapper/live-rw ;;
    *) die "unknown stack $1 (overlay, dm-livemirror, dm)" ;;
  esac
  _dev=$(v MDEV "$1")
  mkdir -p "/mnt/$1" && mount -t ext4 "$_dev" "/mnt/$1" || die "$1: mount $_dev"
  _b=$(printf '/sys/dev/block/%d:%d/stat' "0x$(stat -L -c %t "$_dev")" "0x$(stat -L -c %T "$_dev")")
  [ -r "$_b" ] || die "$1: no $_b for $_dev"
  setv BST "$1" "$_b"
}
teardown() {
  umount "/mnt/$1" || die "$1: umount"
  _pid=$(v SPID "$1") _dev=$(v MDEV "$1") _dmn=$(v DMN "$1")
  if [ -n "$_pid" ]; then
    # A clean stop flushes and disconnects the device.
    kill -TERM "$_pid"; wait "$_pid" || die "$1: the daemon exited $?"
    _i=0
    while [ "$(cat "/sys/block/${_dev#/dev/}/size" 2>/dev/null || echo 0)" != 0 ]; do
      _i=$((_i + 1)); [ $_i -gt 100 ] && die "$1: $_dev still connected after the daemon stopped"; sleep 0.1
    done
  fi
  if [ -n "$_dmn" ]; then
    $T dmsetup --noudevsync remove "$_dmn" || die "$1: dmsetup remove $_dmn"
    losetup -d "$(v LOOP "$1")" || die "$1: losetup -d"
  fi
  rm -f "$(v RAM "$1")"
}

# fio_job STACK RW: 4 KiB RW on /mnt/STACK/fio.dat, QD32 spread over one job per CPU, each on
# its own part of the file; the same offsets in every run (fio's default random seed). Prints
# "iops kib_s err".
FSIZE=0
fio_job() {
  _per=$((32 / NCPU)); [ "$_per" -ge 1 ] || _per=1
  $T fio --name=b --filename="/mnt/$1/fio.dat" --direct=1 --ioengine=libaio --rw="$2" --bs=4k \
    --iodepth="$_per" --numjobs="$NCPU" --size=$((FSIZE / NCPU)) --offset_increment=$((FSIZE / NCPU)) \
    --time_based --runtime="$SECS" --group_reporting --minimal 2>/run/fio.err \
    | awk -F';' 'NF > 50 {printf "%d %d %d\n", $8 + $49, $7 + $48, $5}'
}
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
# measure STACK REP PHASE: one phase on one stack, with the counters around it.
measure() {
  _pid=$(v SPID "$1") _b=$(v BST "$1") _others=
  for _s in $ORDER; do [ "$_s" = "$1" ] || _others="$_others $(v SPID "$_s")"; done
  drop
  # shellcheck disable=SC2086 # pids, split on purpose
  B0=$(bstat "$_b") P0=$(ticks "$_pid") O0=$(ticks $_others) G0=$(gticks) T0=$(up)
  case $3 in
    randread|randwrite) R=$(fio_job "$1" "$3") ;;
    # The package tree: extraction and sync, timed together (the data reaches the stack in sync).
    untar) mkdir "/mnt/$1/tree" && $T tar -x --numeric-owner -f /run/tree.tar -C "/mnt/$1/tree" && sync || die "$1: tar -x"
           R="- - 0" ;;
    # Reading back what was written, from a cold cache: the chunks the overlay or COW holds.
    readback) $T tar -c -f - -C "/mnt/$1" tree | cat > /dev/null || die "$1: tar -c"
              R="- - 0" ;;
  esac
  # shellcheck disable=SC2086 # pids, split on purpose
  T1=$(up) G1=$(gticks) O1=$(ticks $_others) P1=$(ticks "$_pid") B1=$(bstat "$_b")
  # shellcheck disable=SC2086 # three fields, split on purpose
  set -- "$1" "$2" "$3" ${R:-0 0 1}
  [ "$6" = 0 ] || sed 's/^/LMBENCH fio: /' /run/fio.err | tail -n 5
  _secs=$SECS; [ "$4" = - ] && _secs=$(echo "$T1 $T0" | awk '{printf "%.2f", $1 - $2}')
  _cpu=-; [ -n "$_pid" ] && _cpu=$(((P1 - P0) * 10))
  echo "LMBENCH row stack=$1 rep=$2 phase=$3 iops=$4 kib_s=$5 secs=$_secs err=$6 cpu_ms=$_cpu idle_ms=$(((O1 - O0) * 10)) gcpu_ms=$(((G1 - G0) * 10)) $(echo "$B0 $B1" | awk '{printf "rd=%d rd_kib=%d wr=%d wr_kib=%d fl=%d", $6 - $1, $7 - $2, $8 - $3, $9 - $4, $10 - $5}')"
}

r=0
while [ "$r" -lt "$REPS" ]; do
  # This repeat's order: the stacks turned by r, so that each takes every place in turn.
  # shellcheck disable=SC2086 # the stacks, split on purpose
  set -- $STACKS
  ORDER=
  i=0
  while [ "$i" -lt $# ]; do
    j=$(( (r + i) % $# + 1 ))
    eval "ORDER=\"\$ORDER \${$j}\""
    i=$((i + 1))
  done
  for S in $ORDER; do setup "$S"; done
  [ "$FSIZE" -gt 0 ] || { FSIZE=$(stat -c %s "/mnt/$S/fio.dat") || die "no fio.dat in the image"; }
  say "repeat $((r + 1)):$(for S in $ORDER; do printf ' %s on %s' "$S" "$(v MDEV "$S")"; done)"
  for PH in randread randwrite untar readback; do
    for S in $ORDER; do measure "$S" "$((r + 1))" "$PH"; done
  done
  for S in $ORDER; do
    N=$(find "/mnt/$S/tree" | wc -l)
    [ "$ENTRIES" = 0 ] || [ "$N" = "$ENTRIES" ] || die "$S: the extracted tree has $N entries, the archive $ENTRIES"
  done
  sync
  for S in $ORDER; do
    echo "LMBENCH ram stack=$S rep=$((r + 1)) kib=$(du -k "$(v RAM "$S")" | cut -f1)"
    _d=$(v DMN "$S"); [ -n "$_d" ] && say "$S: $($T dmsetup status "$_d")"
  done
  for S in $ORDER; do teardown "$S"; done
  r=$((r + 1))
done
echo "LMBENCH done [t=$(up)]"
echo o > /proc/sysrq-trigger
sleep 10
