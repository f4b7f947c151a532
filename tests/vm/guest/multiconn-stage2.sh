# shellcheck shell=dash # run or sourced by busybox sh in the guest
# shellcheck disable=SC2046 # set -- $(kstat ...) splits a counter line into its numbers on purpose
# multiconn-e2e, stage 2 (lm.mode=multiconn): runs as PID 1 with / on /dev/nbd0, which
# @livemirror serves over several kernel connections (stage 1's lm.serveargs=--nbd-connections,N).
# Many connections x deep queues with the kernel's NBD client, and every reply must arrive:
#   1. fio on files of the mounted root (direct I/O, QD64 x 4 jobs, writes verified by CRC);
#   2. cycles on /dev/nbd1: a second livemirror serves /dev/vdb with --nbd-device /dev/nbd1
#      --nbd-connections N (lm.cycles, e.g. 2,4,8,16); each cycle connects (a fresh CONNECT and
#      partition scan: where the old two-connection stall struck), runs a mixed 4K load at QD128 x
#      4 jobs and then writes with CRC verification read back, stops the daemon (which flushes and
#      disconnects /dev/nbd1).
# A request that never gets its reply shows up as an NBD timeout in dmesg (--nbd-timeout is 10 s
# and every fio run waits for all of its I/O, so a lost reply cannot hide), an I/O error, or a
# fio error; each is a FAIL. Also checked per cycle: the kernel has min(N, CPUs) hardware queues
# (one per connection) and the daemon serves that many connections once the staged attach is
# done, exactly E-1 connections ended with end-of-file (those the staged CONNECT gave closed),
# 16 MiB written by one dd per CPU read back equal to a model byte for byte (and /dev/vdb holds
# it after the daemon stopped), nothing is in flight afterwards, the daemon answered exactly the
# reads and bytes the kernel completed (none twice: nothing was resent), no request errors, no
# reconnect.
# Counts go to the console as "LMTEST INFO: cycle ..." lines for the host (and the soak); a
# cycle whose requests timed out or errored is a FAIL but the run goes on, so that a soak counts
# every cycle.
. /lmtest/common.sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
FIO="/tools/run-tool fio"
TMO=$(cmdline nbdtimeout 10)
CYCLES=$(cmdline cycles 2,4,8,16 | tr ',' ' ')
JOBS=$(cmdline jobs 4)
MIXSECS=$(cmdline mixsecs 4)
VERIFYMB=$(cmdline verifymb 8)    # per job and cycle, written and read back
W=/run/lmmc
mkdir -p "$W"
echo multiconn > /run/lmtest/phase

echo "LMTEST INFO: multiconn stage2 start (pid $$) t=$(up)"
check_live_root
start_watchdog
LMPID=$(cat /run/livemirror/serve.pid)
check_daemon "$LMPID"

# The kernel makes at most one hardware queue per CPU and sends only on the connection of a queue,
# so the daemon gives it min(N, CPUs) connections (nbd-frontend's usable_connections).
NCPU=$(grep -c '^processor' /proc/cpuinfo)
# shellcheck disable=SC2317 # called through $(...)
eff() { if [ "$1" -lt "$NCPU" ]; then echo "$1"; else echo "$NCPU"; fi; }
# The staged attach hands the kernel E connections in its CONNECT, the first E-1 of them closed on
# the daemon's side: the kernel logs one "Receive control failed (result -32)" for each (their
# receive work reads end-of-file) and the daemon replaces them (RECONFIGURE). Those lines are
# expected, counted by closed_lines and checked to be exactly E-1 per CONNECT; any other NBD error
# fails.
# shellcheck disable=SC2317 # called through $(...)
closed_lines() { dmesg | grep -ac "$1: Receive control failed (result -32)" || true; }
# The kernel makes at most one hardware queue per CPU and sends only on the connection of a queue,
# so the daemon gives it min(N, CPUs) connections (nbd-frontend's usable_connections).
NCPU=$(grep -c '^processor' /proc/cpuinfo)
eff() { if [ "$1" -lt "$NCPU" ]; then echo "$1"; else echo "$NCPU"; fi; }
# The staged attach hands the kernel E connections in its CONNECT, the first E-1 of them closed on
# the daemon's side: the kernel logs one "Receive control failed (result -32)" for each (their
# receive work reads end-of-file) and the daemon replaces them (RECONFIGURE). Those lines are
# expected, counted by closed_lines and checked to be exactly E-1 per CONNECT; any other NBD error
# fails.
closed_lines() { dmesg | grep -ac "$1: Receive control failed (result -32)" || true; }
# NBD errors of the kernel: a request timed out (nobody answered it for --nbd-timeout), a
# connection died or carried a reply the kernel could not match, or the block layer failed one.
nbd_errors() {
  dmesg | grep -aE "nbd[0-9]+: (Connection timed out|Dead connection|Receive control failed|Send control failed|Request send failed|Unexpected reply|Suspicious reply|Double reply|Wrong magic|Attempted send on invalid socket|Unexpected request)|I/O error, dev nbd|Buffer I/O error on dev nbd" \
    | grep -av 'Receive control failed (result -32)' || true
}
# timeouts DEV: how many times the kernel timed out a request of DEV so far.
timeouts() { dmesg | grep -ac "$1: Connection timed out" || true; }
# kstat DEV: requests the kernel completed on DEV, from /sys/block/DEV/stat: "data inflight flushes"
# (data: reads, writes and discards; flushes apart: the block layer answers flushes that arrive
# while one is in flight with that one, so it completes more than it sends).
kstat() { awk '{print $1 + $5 + $12, $9, $16}' "/sys/block/$1/stat"; }
# kio DEV: "reads read_bytes written_bytes" the kernel completed on DEV. Reads and bytes compare
# exactly with what the daemon answered (a request sent twice after a lost reply counts twice
# there); write counts do not: an fsync is an empty write with a preflush, which the kernel counts
# as a write and sends as a flush only.
kio() { awk '{print $1, $3 * 512, $7 * 512}' "/sys/block/$1/stat"; }
# hwqueues DEV: the block layer's hardware queues of DEV; the NBD driver makes one per connection.
hwqueues() { ls -d "/sys/block/$1/mq/"* 2>/dev/null | wc -l; }
# metric NAME: the sum of a counter of the nbd1 daemon over its labels.
metric() { wget -q -O - http://127.0.0.1:9811/metrics | awk -v n="$1" '$1 == n || index($1, n "{") == 1 {s += $2} END {print s + 0}'; }
# cmetric NAME CMD...: the sum of a counter of the nbd1 daemon over the commands CMD.
cmetric() {
  _m=$1; shift
  wget -q -O - http://127.0.0.1:9811/metrics | awk -v n="$_m" -v cs="$*" '
    BEGIN {k = split(cs, c, " ")} {for (i = 1; i <= k; i++) if ($1 == n "{command=\"" c[i] "\"}") s += $2} END {print s + 0}'
}
# fio_run NAME ARGS...: runs fio (output in $W/NAME.txt); fails on a non-zero exit, an error in
# any job or a verify failure. Sets FIO_IOS (I/Os fio issued) and FIO_MAXMS (its slowest one).
fio_run() {
  _n=$1; shift
  $FIO --name="$_n" --direct=1 --ioengine=libaio --group_reporting --randrepeat=0 "$@" > "$W/$_n.txt" 2>&1
  _rc=$?
  FIO_IOS=$(awk -F'[=, ]+' '/issued rwts: total=/{for (i = 1; i <= NF; i++) if ($i == "total") {print $(i+1) + $(i+2) + $(i+3); exit}}' "$W/$_n.txt")
  FIO_MAXMS=$(awk '/^ *lat \((nsec|usec|msec)\)/{u = $2; gsub(/[():]/, "", u); split($0, a, "max="); m = a[2] + 0; f = (u == "nsec") ? 1e-6 : (u == "usec") ? 1e-3 : 1; if (m * f > x) x = m * f} END {printf "%.0f", x}' "$W/$_n.txt")
  if [ "$_rc" != 0 ] || grep -qE 'err= *[1-9]|verify failed|bad magic|bad header|crc32c: verify' "$W/$_n.txt"; then
    sed 's/^/LMLOG fio: /' "$W/$_n.txt" | tail -n 30
    fail "fio $_n exited $_rc or reported errors (above)"
  fi
  ok "fio $_n: $FIO_IOS I/Os, no error, slowest ${FIO_MAXMS} ms"
}

mkdir -p /tools && mount -t ext4 -o ro,noload /dev/vdc /tools || fail "mount the tools disk /dev/vdc"
$FIO --version >/dev/null 2>&1 || fail "fio does not run from the tools disk: $($FIO --version 2>&1 | head -n 2)"
ip link set lo up || fail "ip link set lo up"

# ---- 1. the root: its connections, and fio on its files
RC=$(hwqueues nbd0)
RN=$(sed -n 's/.*--nbd-connections \([0-9]*\).*/\1/p' /run/lmtest/serve-args)
[ -n "$RN" ] || RN=1
RE=$(eff "$RN")
[ "$RC" = "$RE" ] && ok "the root /dev/nbd0 has $RC hardware queues: $RE kernel connections (--nbd-connections $RN, $NCPU CPUs)" \
  || fail "/dev/nbd0 has $RC hardware queues, expected $RE (--nbd-connections $RN, $NCPU CPUs)"
[ "$RE" -ge 2 ] || softfail "the root runs on $RE connection(s): nothing multi-connection is tested on it"
# The root daemon's connections: one pid per served connection is not visible, but its metrics are
# (if --metrics was given) and its log says when the staged attach has given the last one.
i=0
until grep -q "all connections of /dev/nbd0 are live" /run/livemirror.log 2>/dev/null || [ "$RE" = 1 ]; do
  i=$((i + 1)); [ $i -gt 300 ] && { softfail "the root daemon did not say all connections of /dev/nbd0 are live in 30 s: $(tail -n 3 /run/livemirror.log 2>/dev/null)"; break; }
  sleep 0.1
done
CL=$(closed_lines nbd0)
[ "$CL" = "$((RE - 1))" ] && ok "root: the kernel read end-of-file on exactly the $CL connections the CONNECT gave closed" \
  || softfail "root: $CL connections of /dev/nbd0 ended with end-of-file, the staged CONNECT closed $((RE - 1))"
mkdir -p /data/fio
fio_run root --directory=/data/fio --rw=randwrite --bsrange=4k-128k --iodepth=64 --numjobs="$JOBS" \
  --size=6m --fsync=32 --verify=crc32c --verify_fatal=1
sync
set -- $(kstat nbd0); R1=$1 RIN=$2
[ "$RIN" = 0 ] && ok "root: nothing in flight on /dev/nbd0 after fio" || fail "root: $RIN requests still in flight on /dev/nbd0"
E=$(nbd_errors)
[ -z "$E" ] && ok "root: no NBD timeout or I/O error (boot and fio: $R1 requests over $RN connections)" \
  || softfail "root: kernel NBD errors with $RN connections: $(echo "$E" | tr '\n' ';')"
info "cycle dev=nbd0 conns=$RN live=$RE kernel_requests=$R1 fio_ios=$FIO_IOS max_ms=$FIO_MAXMS timeouts=$(timeouts nbd0)"
rm -rf /data/fio

# ---- 2. connect, load, disconnect /dev/nbd1 with each connection count
[ -b /dev/vdb ] || fail "no /dev/vdb"
VDB=$(blockdev --getsize64 /dev/vdb)
TOTAL=0 NCYC=0
# The byte-for-byte model: MODELMB MiB of random data after fio's verify area, written through
# /dev/nbd1 by one dd per CPU (so over every hardware queue, hence every connection), read back
# the same way, and after the daemon stopped read from /dev/vdb itself; all must equal the model.
MODELMB=16 OFFMB=$((JOBS * VERIFYMB))
[ $(((OFFMB + MODELMB) * 1048576)) -le "$VDB" ] || fail "/dev/vdb ($VDB bytes) has no room for the model at $OFFMB MiB"
SLICE=$((MODELMB * 4 / NCPU))     # 256 KiB blocks per CPU
# model_io write|read: the model area through /dev/nbd1 (write: from $W/model; read: into
# $W/back), one direct dd per CPU, each bound to its CPU.
model_io() {
  _p=0 _pids=
  while [ $_p -lt "$NCPU" ]; do
    if [ "$1" = write ]; then
      taskset -c $_p dd if="$W/model" of=/dev/nbd1 bs=256k skip=$((_p * SLICE)) seek=$((OFFMB * 4 + _p * SLICE)) \
        count=$SLICE oflag=direct conv=notrunc,fsync 2>"$W/dd.$_p" &
    else
      taskset -c $_p dd if=/dev/nbd1 of="$W/back.$_p" bs=256k skip=$((OFFMB * 4 + _p * SLICE)) count=$SLICE \
        iflag=direct 2>"$W/dd.$_p" &
    fi
    _pids="$_pids $!" _p=$((_p + 1))
  done
  _rc=0
  for _q in $_pids; do wait "$_q" || _rc=1; done
  [ $_rc = 0 ] || fail "model $1 through /dev/nbd1 failed: $(cat "$W"/dd.* | tr '\n' ';')"
  if [ "$1" = read ]; then
    _p=0; : > "$W/back"
    while [ $_p -lt "$NCPU" ]; do cat "$W/back.$_p" >> "$W/back"; rm -f "$W/back.$_p"; _p=$((_p + 1)); done
  fi
}
for N in $CYCLES; do
  T0=$(up)
  # Counted from before the CONNECT: the partition scan's requests are the first ones.
  set -- $(kstat nbd1); K0=$1 F0=$3
  set -- $(kio nbd1); KR0=$1 KRB0=$2 KWB0=$3
  TO0=$(timeouts nbd1) E0=$(nbd_errors | wc -l) CL0=$(closed_lines nbd1)
  NE=$(eff "$N")
  /usr/sbin/livemirror serve --source /dev/vdb --nbd-device /dev/nbd1 --nbd-connections "$N" \
    --nbd-timeout "$TMO" --listen "unix:$W/nbd.sock" --control "$W/control.sock" \
    --metrics tcp:127.0.0.1:9811 </dev/null > "$W/serve-$N.log" 2>&1 &
  SP=$!
  i=0
  until [ "$(cat /sys/block/nbd1/size 2>/dev/null || echo 0)" != 0 ] && "$LM" status --control "$W/control.sock" >/dev/null 2>&1; do
    kill -0 "$SP" 2>/dev/null || fail "livemirror serve --nbd-device /dev/nbd1 --nbd-connections $N exited: $(tail -n 5 "$W/serve-$N.log")"
    i=$((i + 1)); [ $i -gt 300 ] && fail "/dev/nbd1 not connected 30 s after serve --nbd-connections $N"
    sleep 0.1
  done
  # The first open (blockdev) makes the kernel scan the partition table: the first requests.
  SZ=$(blockdev --getsize64 /dev/nbd1)
  [ "$SZ" = "$VDB" ] || fail "/dev/nbd1 is $SZ bytes, /dev/vdb $VDB"
  HW=$(hwqueues nbd1)
  [ "$HW" = "$NE" ] || fail "/dev/nbd1 has $HW hardware queues with --nbd-connections $N on $NCPU CPUs (expected $NE)"
  # The staged attach gives the connections one after the other: wait (bounded) until all serve.
  i=0
  while C=$(metric livemirror_nbd_connections); [ "$C" != "$NE" ]; do
    i=$((i + 1)); [ $i -gt 300 ] && fail "the daemon serves $C connections of /dev/nbd1 30 s after the CONNECT, not $NE: $(tail -n 5 "$W/serve-$N.log")"
    sleep 0.1
  done
  ok "cycle $N: /dev/nbd1 connected with $NE live connections ($HW hardware queues) in $(echo "$(up) $T0" | awk '{printf "%.2f", $1-$2}') s"
  fio_run "mix$N" --filename=/dev/nbd1 --rw=randrw --rwmixread=70 --bs=4k --iodepth=128 \
    --numjobs="$JOBS" --size="$((VERIFYMB * JOBS))m" --time_based --runtime="$MIXSECS"
  IOS=$FIO_IOS MAXMS=$FIO_MAXMS
  fio_run "verify$N" --filename=/dev/nbd1 --rw=randwrite --bsrange=4k-256k --iodepth=128 \
    --numjobs="$JOBS" --size="${VERIFYMB}m" --offset_increment="${VERIFYMB}m" --fsync=64 \
    --verify=crc32c --verify_fatal=1
  IOS=$((IOS + FIO_IOS)); [ "$FIO_MAXMS" -gt "$MAXMS" ] && MAXMS=$FIO_MAXMS
  dd if=/dev/urandom of="$W/model" bs=1M count=$MODELMB 2>/dev/null || fail "cannot make the model"
  model_io write
  model_io read
  cmp -s "$W/model" "$W/back" && ok "cycle $N: $MODELMB MiB written and read back through /dev/nbd1 by $NCPU CPUs equal the model byte for byte" \
    || fail "cycle $N: what /dev/nbd1 gave back differs from the model: $(cmp "$W/model" "$W/back" 2>&1 | head -n 1)"
  set -- $(kstat nbd1); K1=$1 KIN=$2 F1=$3
  set -- $(kio nbd1); KR=$(($1 - KR0)) KRB=$(($2 - KRB0)) KWB=$(($3 - KWB0))
  [ "$KIN" = 0 ] || fail "cycle $N: $KIN requests still in flight on /dev/nbd1 after fio"
  D1=$(cmetric livemirror_nbd_requests_total read write trim write_zeroes)
  DF=$(cmetric livemirror_nbd_requests_total flush)
  DR=$(cmetric livemirror_nbd_requests_total read)
  DRB=$(cmetric livemirror_nbd_request_bytes_total read) DWB=$(cmetric livemirror_nbd_request_bytes_total write)
  DERR=$(metric livemirror_nbd_request_errors_total)
  RECON=$(metric livemirror_nbd_kernel_reconnects_total)
  KREQ=$((K1 - K0)) DREQ=$D1 KF=$((F1 - F0)) TO=$(($(timeouts nbd1) - TO0))
  CYC_OK=1
  [ "$DERR" = 0 ] || { CYC_OK=; softfail "cycle $N: the daemon answered $DERR requests with an error"; }
  [ "$RECON" = 0 ] || { CYC_OK=; softfail "cycle $N: the kernel reported $RECON dead connections (the daemon replaced them)"; }
  CL=$(($(closed_lines nbd1) - CL0))
  [ "$CL" = "$((NE - 1))" ] || { CYC_OK=; softfail "cycle $N: $CL connections of /dev/nbd1 ended with end-of-file, the staged CONNECT closed $((NE - 1))"; }
  [ "$DR" = "$KR" ] && [ "$DRB" = "$KRB" ] && [ "$DWB" = "$KWB" ] \
    && ok "cycle $N: the daemon answered exactly the $KR reads ($KRB bytes) and the $KWB written bytes the kernel completed; $DREQ requests, none in flight, no error" \
    || { CYC_OK=; softfail "cycle $N: the daemon answered $DR reads, $DRB bytes read, $DWB written; the kernel completed $KR reads, $KRB bytes read, $KWB written (a request sent twice means one timed out)"; }
  [ "$DREQ" -le "$KREQ" ] || { CYC_OK=; softfail "cycle $N: the daemon answered $DREQ requests, more than the $KREQ the kernel completed"; }
  [ "$DF" -ge 1 ] && [ "$DF" -le "$KF" ] && ok "cycle $N: the daemon answered $DF flushes for the kernel's $KF (the block layer merges concurrent ones)" \
    || { CYC_OK=; softfail "cycle $N: the daemon answered $DF flushes, the kernel completed $KF"; }
  E=$(nbd_errors | tail -n +$((E0 + 1)))
  [ -z "$E" ] || { CYC_OK=; softfail "cycle $N: kernel NBD errors ($TO timeouts): $(echo "$E" | tr '\n' ';')"; }
  # A clean stop flushes /dev/nbd1 and disconnects it.
  kill -TERM "$SP"; wait "$SP"; RC=$?
  [ "$RC" = 0 ] || fail "cycle $N: the daemon exited $RC on SIGTERM: $(tail -n 5 "$W/serve-$N.log")"
  i=0
  while [ "$(cat /sys/block/nbd1/size 2>/dev/null || echo 0)" != 0 ]; do
    i=$((i + 1)); [ $i -gt 100 ] && fail "cycle $N: /dev/nbd1 still connected 10 s after the daemon stopped"
    sleep 0.1
  done
  dd if=/dev/vdb bs=256k skip=$((OFFMB * 4)) count=$((MODELMB * 4)) iflag=direct 2>/dev/null | cmp -s - "$W/model" \
    && ok "cycle $N: /dev/vdb itself holds the model byte for byte after the daemon stopped" \
    || fail "cycle $N: /dev/vdb differs from the model after the daemon stopped"
  rm -f "$W/back"
  grep -q 'disconnected /dev/nbd1' "$W/serve-$N.log" || fail "cycle $N: the daemon did not say it disconnected /dev/nbd1: $(tail -n 3 "$W/serve-$N.log")"
  [ -n "$CYC_OK" ] && ok "cycle $N: $IOS fio I/Os, $KREQ NBD requests over $NE connections, all answered; slowest ${MAXMS} ms (timeout ${TMO} s); daemon stopped, /dev/nbd1 disconnected, in $(echo "$(up) $T0" | awk '{printf "%.1f", $1-$2}') s"
  info "cycle dev=nbd1 conns=$N live=$NE kernel_requests=$KREQ daemon_requests=$DREQ flushes=$DF/$KF fio_ios=$IOS max_ms=$MAXMS timeouts=$TO"
  TOTAL=$((TOTAL + KREQ)) NCYC=$((NCYC + 1))
done

# ---- the whole boot
E=$(nbd_errors)
[ -z "$E" ] && ok "whole run: no NBD timeout or I/O error in dmesg ($NCYC cycles on /dev/nbd1, $TOTAL requests there)" \
  || softfail "whole run: kernel NBD errors: $(echo "$E" | tr '\n' ';')"
E=$(dmesg_errors)
[ -z "$E" ] && ok "no I/O errors, ext4 errors or read-only remount in dmesg" || fail "kernel messages: $E"
J=$(lmstatus) || fail "livemirror status --json (root daemon) failed"
[ "$(jget state "$J")" = serving ] && [ "$(jget error "$J")" = null ] && ok "the root daemon still serves, no error" \
  || fail "root daemon status: $J"
dmesg | grep -a 'nbd' | tail -n 20 | sed 's/^/LMLOG dmesg: /'
umount /tools
sync
mount -o remount,ro / && ok "root remounted read-only" || { softfail "remount,ro / failed"; echo u > /proc/sysrq-trigger; sleep 1; }
touch /run/lmtest/done
echo "LMTEST DONE t=$(up)"
lm_poweroff
