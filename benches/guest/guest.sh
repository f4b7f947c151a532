#!/bin/busybox sh
# shellcheck shell=dash # busybox sh, checked as the shell closest to it
# The guest side of benches/guest/run.sh: the initramfs' /init. The kernel's NBD client on
# /dev/nbdN (or livemirror's ublk device), fio inside the guest, and each server serving the
# same virtio disk:
#   livemirror serve --source /dev/vda --nbd-device /dev/nbdN --nbd-connections C (its own netlink
#     attach), nbd-server + nbd-client -C C, qemu-nbd + nbd-client -C C; all over Unix sockets;
#   ublk: livemirror serve --source /dev/vda --ublk-device auto (one queue per CPU, no
#     connections: measured once, conns=q); ublk-hop: the same with LIVEMIRROR_UBLK_HOP=1 (each
#     request carried out on another engine thread: docs/decisions.md, ublk).
# Disks: vda = the served disk (random data), vdb = a blank target (the sync measurement), vdc =
# the tools (fio, nbd-server, qemu-nbd, nbd-client, livemirror: lm_tools_image).
# Kernel command line: lmb.secs=S (per fio run), lmb.conns=1,2,4, lmb.servers=livemirror,ublk,nbd-server,qemu-nbd,
# lmb.workloads=randread4k,randwrite4k,read1m,write1m, lmb.sync=1 (the copy-while-fio runs),
# lmb.ublkdepth=N (--ublk-queue-depth).
# One line per measurement for the host (cpu_us: the server process's CPU time per request,
# when its pid is known; gcpu_us: the whole guest's busy CPU time per request):
#   LMBENCH row server=S conns=C workload=W iops=I kib_s=B err=E timeouts=T cpu_us=U gcpu_us=G
#   LMBENCH sync conns=C iops=I copied=BYTES secs=S synced=0|1 timeouts=T
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /run
up() { read -r _u _ < /proc/uptime; echo "$_u"; }
say() { echo "LMBENCH info $* [t=$(up)]"; }
die() { echo "LMBENCH fail $* [t=$(up)]"; dmesg | grep -a nbd | tail -n 20 | sed 's/^/LMBENCH dmesg: /'; echo o > /proc/sysrq-trigger; sleep 10; }
arg() { _v=$(tr ' ' '\n' < /proc/cmdline | sed -n "s/^lmb\.$1=//p" | tail -n 1); echo "${_v:-$2}" | tr ',' ' '; }

for m in $(cat /etc/modules.order); do insmod "/lib/modules/$m" || die "insmod $m"; done
mkdir -p /tools && mount -t ext4 -o ro,noload /dev/vdc /tools || die "mount the tools disk"
ip link set lo up
T=/tools/run-tool
SECS=$(arg secs 10)
CONNS=$(arg conns 1,2,4)
SERVERS=$(arg servers livemirror,ublk,nbd-server,qemu-nbd)
UDEPTH=$(arg ublkdepth 128)
WORKLOADS=$(arg workloads randread4k,randwrite4k,read1m,write1m)
NCPU=$(grep -c ^processor /proc/cpuinfo)
DISK=$(blockdev --getsize64 /dev/vda)
say "kernel $(uname -r), $NCPU CPUs, $(awk '/MemTotal/{print $2}' /proc/meminfo) KiB, served disk $DISK bytes"
say "versions: $($T fio --version); $($T nbd-server -V 2>&1 | head -n 1); $($T qemu-nbd --version | head -n 1); $($T nbd-client -V 2>&1 | head -n 1); $($T livemirror --version)"
timeouts() { dmesg | grep -ac 'Connection timed out' || true; }

DEV_I=0
# connect SERVER CONNS: serves /dev/vda with SERVER and connects the next /dev/nbdN to it with
# CONNS connections (a fresh device each time); ublk makes /dev/ublkbN. Sets DEV, SPID.
connect() {
  DEV=/dev/nbd$DEV_I; DEV_I=$((DEV_I + 1))
  rm -f /run/s.sock /run/ctl.sock /run/srv.pid
  case $1 in
    ublk|ublk-hop)
      _hop=0; [ "$1" = ublk-hop ] && _hop=1
      LIVEMIRROR_UBLK_HOP=$_hop $T livemirror serve --source /dev/vda --ublk-device auto --ublk-queue-depth "$UDEPTH" \
        --listen unix:/run/s.sock --control /run/ctl.sock </dev/null >/run/srv.log 2>&1 &
      SPID=$!
      _i=0
      until DEV=$($T livemirror status --get kernel_device --control /run/ctl.sock 2>/dev/null) && [ -b "$DEV" ]; do
        _i=$((_i + 1)); [ $_i -gt 300 ] && die "$1: no ublk device: $(tail -n 3 /run/srv.log)"; sleep 0.1
      done ;;
    livemirror)
      $T livemirror serve --source /dev/vda --nbd-device "$DEV" --nbd-connections "$2" --nbd-timeout 10 \
        --listen unix:/run/s.sock --control /run/ctl.sock </dev/null >/run/srv.log 2>&1 &
      SPID=$! ;;
    nbd-server)
      printf '[generic]\n    unixsock = /run/s.sock\n[bench]\n    exportname = /dev/vda\n    flush = true\n    fua = true\n' > /run/nbd-server.conf
      $T nbd-server -C /run/nbd-server.conf -p /run/srv.pid >/run/srv.log 2>&1 || die "nbd-server: $(cat /run/srv.log)"
      SPID= ;;
    qemu-nbd)
      $T qemu-nbd -k /run/s.sock -x bench -t -e 8 --cache=none --aio=io_uring -f raw /dev/vda </dev/null >/run/srv.log 2>&1 &
      SPID=$! ;;
  esac
  _i=0
  until [ -S /run/s.sock ]; do _i=$((_i + 1)); [ $_i -gt 300 ] && die "$1 did not listen: $(cat /run/srv.log)"; sleep 0.1; done
  if [ "$1" = nbd-server ] || [ "$1" = qemu-nbd ]; then
    $T nbd-client -unix /run/s.sock "$DEV" -N bench -C "$2" -t 10 >/run/client.log 2>&1 || die "nbd-client -C $2 to $1: $(cat /run/client.log)"
  fi
  _i=0
  until [ "$(cat /sys/block/"${DEV#/dev/}"/size 2>/dev/null || echo 0)" != 0 ]; do
    _i=$((_i + 1)); [ $_i -gt 300 ] && die "$DEV not connected to $1: $(cat /run/srv.log)"; sleep 0.1
  done
  blockdev --getsize64 "$DEV" >/dev/null
  # livemirror gives the kernel its connections one at a time (docs/decisions.md): measure once
  # all are live.
  if [ "$1" = livemirror ] && [ "$2" -gt 1 ] && [ "$NCPU" -gt 1 ]; then
    _i=0
    until grep -q "all connections of $DEV are live" /run/srv.log; do
      _i=$((_i + 1)); [ $_i -gt 300 ] && die "livemirror did not bring up all connections of $DEV: $(tail -n 3 /run/srv.log)"; sleep 0.1
    done
  fi
}
disconnect() {
  case $1 in
    livemirror|ublk|ublk-hop) kill -TERM "$SPID"; wait "$SPID" ;;
    *) $T nbd-client -d "$DEV" >/dev/null 2>&1
       [ -n "$SPID" ] && { kill -TERM "$SPID"; wait "$SPID"; }
       [ -s /run/srv.pid ] && kill -TERM "$(cat /run/srv.pid)" 2>/dev/null ;;
  esac
  _i=0
  while [ "$(cat /sys/block/"${DEV#/dev/}"/size 2>/dev/null || echo 0)" != 0 ]; do
    _i=$((_i + 1)); [ $_i -gt 100 ] && { say "$DEV still connected after stopping $1"; break; }; sleep 0.1
  done
  sleep 1
}
# fio_job WORKLOAD EXTRA...: one fio run on $DEV; prints "iops kib_s err" (reads + writes).
# The queue depth is the workload's total, spread over one job per CPU (requests are sent on
# the connection of the CPU that submits them), each on its own part of the disk.
fio_job() {
  case $1 in
    randread4k) _a="--rw=randread --bs=4k"; _qd=32 ;;
    randwrite4k) _a="--rw=randwrite --bs=4k"; _qd=32 ;;
    randread4kqd128) _a="--rw=randread --bs=4k"; _qd=128 ;;
    read1m) _a="--rw=read --bs=1m"; _qd=8 ;;
    write1m) _a="--rw=write --bs=1m"; _qd=8 ;;
  esac
  shift
  _per=$(( _qd / NCPU )); [ "$_per" -ge 1 ] || _per=1
  # shellcheck disable=SC2086
  $T fio --name=b --filename="$DEV" --direct=1 --ioengine=libaio $_a --iodepth="$_per" --numjobs="$NCPU" \
    --size=$(( DISK / NCPU )) --offset_increment=$(( DISK / NCPU )) --time_based --runtime="$SECS" \
    --group_reporting --minimal "$@" 2>/run/fio.err | awk -F';' 'NF > 50 {printf "%d %d %d\n", $8 + $49, $7 + $48, $5}'
}

# CPU time in clock ticks: of a process (all its threads), and of the whole guest (busy).
ticks() { [ -n "$1" ] && [ -r "/proc/$1/stat" ] && awk '{print $14 + $15}' "/proc/$1/stat" || echo -; }
gticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
HZ=100
# per_req TICKS IOPS: microseconds of CPU per request over a SECS-long run.
per_req() { case $1 in -*|'') echo - ;; *) awk -v t="$1" -v i="$2" -v s="$SECS" -v hz="$HZ" 'BEGIN {printf (i > 0) ? "%.0f" : "-", t * 1e6 / hz / (i * s)}' ;; esac; }

for S in $SERVERS; do
  CS=$CONNS
  case $S in ublk*) CS=q ;; esac
  for C in $CS; do
    T0=$(timeouts)
    connect "$S" "$C"
    say "$S with $C connections on $DEV ($(ls -d /sys/block/"${DEV#/dev/}"/mq/* | wc -l) hardware queues)"
    for W in $WORKLOADS; do
      TW=$(timeouts)
      P0=$(ticks "$SPID") G0=$(gticks)
      R=$(fio_job "$W")
      P1=$(ticks "$SPID") G1=$(gticks)
      # shellcheck disable=SC2086 # three numbers, split on purpose
      set -- ${R:-0 0 1}
      PD=-; [ "$P0" != - ] && [ "$P1" != - ] && PD=$((P1 - P0))
      echo "LMBENCH row server=$S conns=$C workload=$W iops=$1 kib_s=$2 err=$3 timeouts=$(($(timeouts) - TW)) cpu_us=$(per_req "$PD" "$1") gcpu_us=$(per_req $((G1 - G0)) "$1")"
      [ "$3" = 0 ] || sed 's/^/LMBENCH fio: /' /run/fio.err | tail -n 5
    done
    disconnect "$S"
    [ "$(timeouts)" = "$T0" ] || dmesg | grep -a 'nbd' | tail -n 5 | sed 's/^/LMBENCH dmesg: /'
  done
done

# The copy rate of a sync while fio writes: livemirror serves vda with C connections, fio runs
# 4K random writes at QD32 for lmb.secs, `attach /dev/vdb` right as it starts; bytes_copied when
# fio ends (or the time to synced, if earlier).
if [ "$(arg sync 1)" = 1 ]; then
  for C in $CONNS; do
    T0=$(timeouts)
    connect livemirror "$C"
    ( fio_job randwrite4k > /run/sync-fio.out ) &
    FP=$!
    sleep 0.5
    TA=$(up)
    $T livemirror attach /dev/vdb --control /run/ctl.sock >/dev/null || die "attach /dev/vdb"
    SYNCED=0 TS=
    while kill -0 "$FP" 2>/dev/null; do
      if [ -z "$TS" ] && [ "$($T livemirror status --get state --control /run/ctl.sock)" = synced ]; then TS=$(up); SYNCED=1; fi
      sleep 0.2
    done
    wait "$FP"
    TE=$(up)
    B=$($T livemirror status --get bytes_copied --control /run/ctl.sock)
    # shellcheck disable=SC2046 # three numbers, split on purpose
    set -- $(cat /run/sync-fio.out) 0 0 1
    echo "LMBENCH sync conns=$C iops=$1 err=$3 copied=$B secs=$(echo "${TS:-$TE} $TA" | awk '{printf "%.2f", $1 - $2}') synced=$SYNCED timeouts=$(($(timeouts) - T0))"
    $T livemirror detach-target --control /run/ctl.sock >/dev/null 2>&1
    disconnect livemirror
  done
fi
echo "LMBENCH done [t=$(up)]"
echo o > /proc/sysrq-trigger
sleep 10
