#!/bin/busybox sh
# shellcheck shell=dash # busybox sh runs it; dash is the nearest dialect shellcheck knows
# ublk-data-e2e, the whole guest side: the initramfs' /init on a kernel with ublk_drv (6.12).
# livemirror serves /dev/vda as /dev/ublkb0 (serve --ublk-device auto); /dev/vdb is the target,
# /dev/vdc the tools disk (fio, util-linux blkdiscard). Checks, in one boot:
#   1. the device's parameters in sysfs tell the truth (512-byte logical blocks, discard
#      granularity = region size, 1 GiB discard and write-zeroes, write-back cache with FUA,
#      1 MiB requests, one hardware queue per CPU); status says kernel_device /dev/ublkb0;
#   2. a byte-for-byte model written and read back; discard and write-zeroes of whole regions
#      read back as zeroes;
#   3. fio writes with CRC verification (verify_backlog: every block read back and checked
#      while the load runs) during an attach and sync; mid-sync the daemon is killed with
#      kill -9 and started again with the same arguments: it takes /dev/ublkb0 over (user
#      recovery), the sync resumes, fio sees no error; verify; detach-source;
#   4. grow on this kernel (no UPDATE_SIZE before 6.16) exits 1 saying so, and changes nothing;
#   5. SIGTERM: the device is removed (no /sys/block/ublkb0, no /dev/ublkc0), exit 0, the
#      model is on /dev/vdb byte for byte;
#   6. as a root storage daemon on the target alone (state file: source-detached): SIGTERM
#      leaves the device; a read and a write issued while no daemon runs wait, and complete
#      once a new daemon started with the same arguments took the device over; a second
#      SIGTERM leaves it again and `livemirror ublk-remove /dev/ublkb0` removes it.
# No I/O error may reach the kernel (dmesg) at any point.
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o size=75%,mode=755 tmpfs /run
. /lmtest/common.sh
mkdir -p /run/lmtest /run/livemirror /run/w
cp /bin/busybox /run/lmtest/busybox
cp /lmtest/*.sh /run/lmtest/
cp /usr/sbin/livemirror /run/livemirror/livemirror
echo boot > /run/lmtest/phase
start_watchdog
echo "LMTEST INFO: ublk-data start kernel=$(uname -r) cpus=$(nproc) t=$(up)"
for m in $(cat /etc/modules.order); do insmod "/lib/modules/$m" || fail "insmod $m"; done
ok "modules loaded: $(tr '\n' ' ' < /etc/modules.order)"
[ -c /dev/ublk-control ] || fail "no /dev/ublk-control after insmod ublk_drv"
mkdir -p /tools && mount -t ext4 -o ro,noload /dev/vdc /tools || fail "mount the tools disk /dev/vdc"
FIO="/tools/run-tool fio"
W=/run/w
LOG=/run/livemirror.log
REGION=65536
phase() { echo "$1" > /run/lmtest/phase; info "phase=$1 t=$(up)"; }
dmesg_clean() {
  _e=$(dmesg_errors 'ublk.*(error|fail)')
  [ -z "$_e" ] && ok "$1: no I/O error in dmesg" || fail "$1: kernel messages: $_e"
}

# start_daemon ARGS...: livemirror serve ARGS in the background (plain, or with
# --root-storage-daemon), until it answers, /dev/ublkb0 has a size and the daemon said it
# serves or took over the device (the control socket answers before that). Sets PID.
start_daemon() {
  _n0=$(grep -c . "$LOG" 2>/dev/null || echo 0)
  _d0=$(grep -cE 'serving on /dev/ublkb|took over /dev/ublkb' "$LOG" 2>/dev/null || echo 0)
  ( cd / && exec /run/livemirror/livemirror serve --control "$LM_CTL" --listen unix:/run/livemirror/nbd.sock "$@" \
      </dev/null >>"$LOG" 2>&1 ) &
  PID=$!
  _i=0
  until "$LM" status --control "$LM_CTL" >/dev/null 2>&1 && [ "$(cat /sys/block/ublkb0/size 2>/dev/null || echo 0)" != 0 ] \
    && [ "$(grep -cE 'serving on /dev/ublkb|took over /dev/ublkb' "$LOG")" -gt "$_d0" ]; do
    kill -0 "$PID" 2>/dev/null || fail "livemirror serve $* exited: $(tail -n 5 "$LOG")"
    _i=$((_i + 1)); [ $_i -gt 600 ] && fail "livemirror serve $* not ready after 60 s: $(tail -n 5 "$LOG")"
    sleep 0.1
  done
  tail -n +"$((_n0 + 1))" "$LOG" | grep -E 'ublkb|took over|serving' | sed 's/^/LMLOG daemon: /'
}

# stop_daemon PID: SIGTERM, and the exit status within 60 s.
stop_daemon() {
  kill -TERM "$1" || fail "kill -TERM $1"
  _i=0
  while kill -0 "$1" 2>/dev/null; do
    _i=$((_i + 1)); [ $_i -gt 600 ] && fail "the daemon (pid $1) did not stop within 60 s after SIGTERM"
    sleep 0.1
  done
  wait "$1"
}

# fio_bg NAME ARGS...: fio in the background on /dev/ublkb0; fio_end NAME checks how it ended.
fio_bg() {
  _n=$1; shift
  $FIO --name="$_n" --filename=/dev/ublkb0 --direct=1 --ioengine=libaio --group_reporting "$@" > "$W/$_n.txt" 2>&1 &
  FIOPID=$!
}
fio_end() {
  wait "$FIOPID"; _rc=$?
  _ios=$(awk -F'[=, ]+' '/issued rwts: total=/{for (i = 1; i <= NF; i++) if ($i == "total") {print $(i+1) + $(i+2) + $(i+3); exit}}' "$W/$1.txt")
  if [ "$_rc" != 0 ] || grep -qE 'err= *[1-9]|verify failed|bad magic|bad header|crc32c: verify' "$W/$1.txt"; then
    sed 's/^/LMLOG fio: /' "$W/$1.txt" | tail -n 30
    fail "fio $1 exited $_rc or reported errors (above)"
  fi
  ok "fio $1: $_ios I/Os, every write read back and its CRC checked, no error"
}

sysval() { cat "/sys/block/ublkb0/$1" 2>/dev/null; }

# ---- 1. the device and what it tells the kernel
phase start
SERVE="--source /dev/vda --ublk-device auto --state /run/livemirror/state --max-rate 6M"
# shellcheck disable=SC2086
start_daemon $SERVE
J=$(lmstatus)
[ "$(jget kernel_device "$J")" = /dev/ublkb0 ] && ok "status: kernel_device /dev/ublkb0" || fail "status: $J"
VDA=$(blockdev --getsize64 /dev/vda)
[ "$(blockdev --getsize64 /dev/ublkb0)" = "$VDA" ] && ok "/dev/ublkb0 is $VDA bytes, the source's size" \
  || fail "/dev/ublkb0 is $(blockdev --getsize64 /dev/ublkb0) bytes, the source $VDA"
NQ=$(ls -d /sys/block/ublkb0/mq/* | wc -l)
for kv in "queue/logical_block_size=512" "queue/physical_block_size=512" "queue/discard_granularity=$REGION" \
  "queue/discard_max_hw_bytes=1073741824" "queue/write_zeroes_max_bytes=1073741824" "queue/max_hw_sectors_kb=1024" \
  "queue/write_cache=write back" "queue/fua=1" "ro=0"; do
  k=${kv%%=*} want=${kv#*=}
  got=$(sysval "$k")
  [ "$got" = "$want" ] || fail "/sys/block/ublkb0/$k is '$got', expected '$want'"
done
ok "sysfs: 512-byte logical and physical blocks (virtio disk), discard granularity $REGION, 1 GiB discard and write-zeroes, 1 MiB requests, write-back cache with FUA"
[ "$NQ" = "$(nproc)" ] && ok "$NQ hardware queues: one per CPU (one per I/O thread)" || fail "$NQ hardware queues on $(nproc) CPUs"
dmesg_clean "device start"

# ---- 2. a byte-for-byte model, discard and write-zeroes
MODEL_OFF=$((VDA / 1048576 - 16))   # MiB: the model sits in the source's last 16 MiB, written through the device
dd if=/dev/urandom of="$W/model" bs=1M count=8 2>/dev/null || fail "cannot make the model"
dd if="$W/model" of=/dev/ublkb0 bs=1M seek="$MODEL_OFF" oflag=direct conv=fsync 2>/dev/null || fail "writing the model to /dev/ublkb0"
dd if=/dev/ublkb0 of="$W/back" bs=1M skip="$MODEL_OFF" count=8 iflag=direct 2>/dev/null || fail "reading the model back"
cmp -s "$W/model" "$W/back" && ok "8 MiB model written and read back through /dev/ublkb0 byte for byte" || fail "the model read back differs"
# Unaligned in the page cache, 512-byte aligned on the wire: one sector in the middle of a block.
printf 'livemirror-ublk-sector' | dd of=/dev/ublkb0 bs=1 seek=$(( (MODEL_OFF + 8) * 1048576 + 4096 + 512 )) conv=notrunc,fsync 2>/dev/null || fail "a 22-byte write"
echo 3 > /proc/sys/vm/drop_caches
[ "$(dd if=/dev/ublkb0 bs=1 skip=$(( (MODEL_OFF + 8) * 1048576 + 4096 + 512 )) count=22 2>/dev/null)" = livemirror-ublk-sector ] \
  && ok "a sub-block write read back after drop_caches" || fail "a sub-block write did not read back"
Z=$(( (MODEL_OFF + 9) * 1048576 ))
dd if=/dev/urandom of=/dev/ublkb0 bs=1M count=2 seek=$((Z / 1048576)) oflag=direct 2>/dev/null || fail "filling the zero area"
/tools/run-tool blkdiscard -o "$Z" -l 1048576 /dev/ublkb0 || fail "blkdiscard (discard) of 1 MiB"
/tools/run-tool blkdiscard -z -o $((Z + 1048576)) -l 1048576 /dev/ublkb0 || fail "blkdiscard -z (write-zeroes) of 1 MiB"
dd if=/dev/zero of="$W/zero" bs=1M count=2 2>/dev/null
dd if=/dev/ublkb0 of="$W/zback" bs=1M skip=$((Z / 1048576)) count=2 iflag=direct 2>/dev/null
cmp -s "$W/zero" "$W/zback" && ok "a discarded and a write-zeroed MiB (whole regions) read back as zeroes" \
  || fail "discard or write-zeroes did not read back as zeroes"
dmesg_clean "model, discard, write-zeroes"

# ---- 3. fio with verification through an attach, a kill -9 mid-sync and the restart
phase sync
fio_bg verify --rw=randwrite --bsrange=4k-256k --iodepth=32 --numjobs=2 --size=16m --offset_increment=16m \
  --verify=crc32c --verify_backlog=16 --verify_fatal=1 --time_based --runtime=45
sleep 2
kill -0 "$FIOPID" 2>/dev/null || { sed 's/^/LMLOG fio: /' "$W/verify.txt" | tail -n 20; fail "fio ended at once"; }
OUT=$("$LM" attach /dev/vdb --control "$LM_CTL" 2>&1) && ok "attach /dev/vdb: $OUT" || fail "attach: $OUT"
J=$(lmstatus); TOTAL=$(jget regions_total "$J")
i=0
while :; do
  J=$(lmstatus); R0=$(jget regions_clean "$J")
  [ "$R0" -ge $((TOTAL * 35 / 100)) ] && break
  [ "$(jget state "$J")" = syncing ] || fail "the sync ended before the kill: $J"
  i=$((i + 1)); [ $i -gt 1200 ] && fail "the sync did not reach 35 % in 120 s: $J"
  sleep 0.1
done
kill -9 "$PID" || fail "kill -9 $PID"
T0=$(up)
ok "kill -9 of the daemon mid-sync ($R0 of $TOTAL regions clean) while fio writes"
wait "$PID" 2>/dev/null
sleep 1
[ -e /sys/block/ublkb0 ] && ok "/dev/ublkb0 stays while no daemon runs (its I/O waits)" || fail "/dev/ublkb0 went away with its daemon"
# shellcheck disable=SC2086
start_daemon $SERVE
grep -q 'took over /dev/ublkb0' "$LOG" && ok "the new daemon took /dev/ublkb0 over $(echo "$(up) $T0" | awk '{printf "%.1f", $1-$2}') s after the kill: $(grep 'took over' "$LOG" | tail -n 1 | sed 's/^[^ ]* *//')" \
  || fail "the daemon log does not say it took /dev/ublkb0 over"
J=$(lmstatus); R1=$(jget regions_clean "$J")
# Regions whose 4 MiB intent chunk had a write in flight at the kill are copied again (the
# daemon says how many: fio writes all over its 32 MiB); every other clean region stays clean.
INF=$(echo "$J" | grep -o '[0-9]* regions had writes in flight' | awk '{print $1}')
INF=${INF:-0}
[ "$(jget state "$J")" = syncing ] && [ "$R1" -ge $((R0 - INF - R0 / 10)) ] \
  && ok "the sync resumed at $R1 regions clean ($R0 before the kill, $INF copied again for writes in flight)" \
  || fail "after the restart: $J"
"$LM" set-rate 0 --control "$LM_CTL" || fail "set-rate 0"
"$LM" wait --timeout 200 --control "$LM_CTL" >/dev/null 2>&1 || fail "wait: $(lmstatus)"
ok "synced"
fio_end verify
dmesg_clean "fio through the sync and the kill"
OUT=$("$LM" verify --control "$LM_CTL" 2>&1) && ok "verify: $OUT" || fail "verify: $OUT"
OUT=$("$LM" detach-source --control "$LM_CTL" 2>&1) || fail "detach-source: $OUT"
ok "detach-source"

# ---- 4. grow without UPDATE_SIZE
phase grow
SIZE0=$(blockdev --getsize64 /dev/ublkb0)
OUT=$("$LM" grow --control "$LM_CTL" 2>&1); RC=$?
case "$RC:$OUT" in
  1:*"cannot change size"*"UPDATE_SIZE"*) ok "grow exits 1 on this kernel: $OUT" ;;
  *) fail "grow on a kernel without UPDATE_SIZE: exit $RC: $OUT" ;;
esac
J=$(lmstatus)
[ "$(jget export_size "$J")" = "$SIZE0" ] && [ "$(blockdev --getsize64 /dev/ublkb0)" = "$SIZE0" ] \
  && ok "the refused grow changed nothing ($SIZE0 bytes)" || fail "after the refused grow: $J"

# ---- 5. SIGTERM removes the device
phase stop
stop_daemon "$PID" && ok "SIGTERM: the daemon exited 0" || fail "SIGTERM: the daemon exited $?"
[ ! -e /sys/block/ublkb0 ] && [ ! -e /dev/ublkc0 ] && ok "the device is gone (no /sys/block/ublkb0, no /dev/ublkc0)" \
  || fail "the device is still there after a clean stop: $(echo /sys/block/ublk* /dev/ublk*)"
dd if=/dev/vdb of="$W/back" bs=1M skip="$MODEL_OFF" count=8 iflag=direct 2>/dev/null
cmp -s "$W/model" "$W/back" && ok "the model is on /dev/vdb byte for byte" || fail "the model on /dev/vdb differs"

# ---- 6. the root storage daemon leaves its device; the next one takes it over
phase leave
ROOTSERVE="--state /run/livemirror/state --ublk-device auto --root-storage-daemon"
# shellcheck disable=SC2086
start_daemon $ROOTSERVE
J=$(lmstatus)
[ "$(jget state "$J")" = source-detached ] && ok "a root storage daemon serves /dev/vdb alone as /dev/ublkb0" || fail "$J"
stop_daemon "$PID" && ok "SIGTERM to the root storage daemon: exit 0" || fail "the root storage daemon exited $?"
[ -e /sys/block/ublkb0 ] && ok "it left /dev/ublkb0 for the next daemon" || fail "the root storage daemon removed its device"
dd if=/dev/urandom of="$W/gap" bs=64K count=4 2>/dev/null
( dd if="$W/gap" of=/dev/ublkb0 bs=64K seek=$((MODEL_OFF * 16)) oflag=direct 2>/dev/null && \
  dd if=/dev/ublkb0 of="$W/gapback" bs=64K skip=$((MODEL_OFF * 16)) count=4 iflag=direct 2>/dev/null; echo $? > "$W/gap.rc" ) &
GAPPID=$!
sleep 3
[ -e "$W/gap.rc" ] && fail "I/O completed while no daemon served /dev/ublkb0"
ok "a write and a read issued with no daemon wait"
# shellcheck disable=SC2086
start_daemon $ROOTSERVE
wait "$GAPPID"
[ "$(cat "$W/gap.rc")" = 0 ] && cmp -s "$W/gap" "$W/gapback" && ok "after the takeover they completed, and the data read back is what was written" \
  || fail "the I/O issued during the gap failed or read back wrong"
grep -c 'took over /dev/ublkb0' "$LOG" | grep -q '^2$' && ok "the log says the device was taken over again" || fail "no second takeover in the log"
stop_daemon "$PID" || fail "the root storage daemon exited $? on the second SIGTERM"
[ -e /sys/block/ublkb0 ] || fail "the device went away on the second SIGTERM"
OUT=$("$LM" ublk-remove /dev/ublkb0 2>&1) && ok "livemirror ublk-remove /dev/ublkb0: $OUT" || fail "ublk-remove: $OUT"
[ ! -e /sys/block/ublkb0 ] && [ ! -e /dev/ublkc0 ] && ok "ublk-remove removed the device" || fail "the device is still there after ublk-remove"
dmesg_clean "the whole run"
grep -E 'ERROR|WARN' "$LOG" | tail -n 12 | sed 's/^/LMLOG daemon: /'
touch /run/lmtest/done
echo "LMTEST DONE t=$(up)"
lm_poweroff
