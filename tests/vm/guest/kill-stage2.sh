# shellcheck shell=dash # run or sourced by busybox sh in the guest
# kill-e2e, stage 2: runs as PID 1 with / on /dev/nbd0, served by @livemirror (supervisor +
# daemon) with --state /run/livemirror/state, a short --nbd-timeout and a copy rate limit
# (stage 1 knobs lm.state=1 lm.nbdtimeout=5 lm.serveargs=--max-rate,6M).
# Under a write load: `kill -9` the daemon (not the supervisor) while it serves the live root;
# attach /dev/vdb; mid-sync `kill -9` the daemon again: the
# supervisor restarts it, it resumes from the state file (regions_clean must not start over)
# and takes /dev/nbd0 back over netlink (RECONFIGURE) while the kernel holds the I/O; the load
# must see no error. Then, still mid-sync, three `livemirror upgrade`s in a row: each time the
# supervisor execs the new binary in place (its pid stays), the new daemon takes the live kernel
# connections, the sockets and the state over, the old one exits; no NBD request times out, the
# copy goes on, the load sees no error; the guest measures the longest write that spanned an
# upgrade. Then the sync completes, verify, detach-source, the source is removed, and
# the daemon is killed once more: it must come back without the source. Then grow + resize2fs
# through the restarted daemon, and every file is checked.
# lm.door=ublk: the root is /dev/ublkb0 (serve --ublk-device 0), taken over by each restarted
# daemon with user recovery; where the kernel cannot resize a live ublk device (6.12) grow must
# be refused with its reason and the file system is grown at the installed system's first boot
# (boot 2, lm.growfs=1) instead. lm.synckills=N: N kills during the sync (default 1, at 35 %;
# else at 1/(N+1), 2/(N+1), ... of the regions).
. /lmtest/common.sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
D=/data
phase() { echo "$1" > /run/lmtest/phase; info "phase=$1 t=$(up)"; }
count() { grep -c "^$1-" "$D/PHASES" 2>/dev/null || echo 0; }
count_within() { awk -v p="$1" '$2==p && $3==p' "$D/PHASES" 2>/dev/null | wc -l; }
wait_files() { # wait_files PHASE N: until N files were written entirely in PHASE (90 s at most)
  _i=0
  while [ "$(count_within "$1")" -lt "$2" ]; do
    _i=$((_i + 1)); [ $_i -gt 900 ] && fail "the write load wrote fewer than $2 files in phase $1"
    kill -0 "$LOADPID" 2>/dev/null || fail "the write load died in phase $1"
    sleep 0.1
  done
}
state_is() {
  _j=$(lmstatus) || fail "livemirror status --json failed"
  [ "$(jget state "$_j")" = "$1" ] || fail "expected state $1, status says: $_j"
  echo "$_j"
}
LOG=/run/livemirror.log
DOOR=$(cmdline door nbd)
RDEV=${LM_ROOTDEV#/dev/}
SYNCKILLS=$(cmdline synckills 1)
# check_own_namespace: with ublk the supervisor and the daemon must run in a mount namespace of
# their own that holds no mount of /dev/ublkbN (a server whose namespace holds a file system on
# its own device can deadlock when it exits: it would unmount it, and only it could serve the
# writes). Checked after every restart: the new daemon inherits the supervisor's namespace.
check_own_namespace() {
  [ "$DOOR" = ublk ] || return 0
  for _p in "$SUP" "$CHILD"; do
    [ "$(readlink "/proc/$_p/ns/mnt")" != "$(readlink /proc/1/ns/mnt)" ] \
      || fail "pid $_p shares PID 1's mount namespace ($(readlink /proc/1/ns/mnt))"
    grep -q '^/dev/ublkb' "/proc/$_p/mounts" && fail "pid $_p's mount namespace holds its own device: $(grep '^/dev/ublkb' "/proc/$_p/mounts")"
  done
  ok "supervisor and daemon run in a mount namespace of their own ($(readlink "/proc/$CHILD/ns/mnt"), PID 1: $(readlink /proc/1/ns/mnt)) with no mount of /dev/ublkb*"
}
# took_over: the log line of a restarted daemon that took the root device over.
took_over() {
  if [ "$DOOR" = ublk ]; then grep 'took over /dev/ublkb0' "$LOG"; else grep 'reconnected /dev/nbd0' "$LOG"; fi
}

# kill_daemon WHAT: kill -9 the daemon (the supervisor's child) and wait until the supervisor has
# started a new one and it answers on the control socket. Sets CHILD.
kill_daemon() {
  _old=$CHILD
  _t0=$(up)
  _n0=$(grep -c . "$LOG")
  kill -9 "$_old" || fail "kill -9 $_old"
  ok "kill -9 of the daemon (pid $_old, supervisor $SUP left alone): $1"
  _i=0
  while :; do
    _i=$((_i + 1))
    if ! kill -0 "$SUP" 2>/dev/null; then
      tail -n 10 "$LOG" | sed 's/^/LMLOG daemon: /'
      fail "the supervisor exited instead of restarting the daemon"
    fi
    _new=$(daemon_child "$SUP")
    if [ -n "$_new" ] && [ "$_new" != "$_old" ] && "$LM" status --control "$LM_CTL" >/dev/null 2>&1; then
      break
    fi
    if [ $_i -gt 300 ]; then
      tail -n +"$((_n0 + 1))" "$LOG" | tail -n 15 | sed 's/^/LMLOG daemon: /'
      [ -n "$_new" ] && [ "$_new" != "$_old" ] && info "the supervisor's child is pid $_new: $(tr '\0' ' ' < "/proc/$_new/cmdline" 2>/dev/null)"
      fail "no restarted daemon answering 30 s after the kill (supervisor $SUP alive)"
    fi
    sleep 0.1
  done
  CHILD=$_new
  ok "the supervisor restarted the daemon: pid $CHILD answers $(echo "$(up) $_t0" | awk '{printf "%.1f", $1-$2}') s after the kill"
  info "restart_secs=$(echo "$(up) $_t0" | awk '{printf "%.1f", $1-$2}')"
  tail -n +"$((_n0 + 1))" "$LOG" | head -n 12 | sed 's/^/LMLOG daemon: /'
}

echo "LMTEST INFO: kill-stage2 start (pid $$) t=$(up)"
start_watchdog
check_live_root
SUP=$(cat /run/livemirror/serve.pid)
check_daemon "$SUP"
check_own_namespace
[ -s /run/livemirror/state ] && ok "state file /run/livemirror/state: $(wc -c < /run/livemirror/state) bytes" || fail "no state file"
J=$(state_is serving)
VDB=$(blockdev --getsize64 /dev/vdb)

mkdir -p "$D"
dd if=/dev/urandom of="$D/hot.bin" bs=4096 count=64 conv=fsync 2>/dev/null || fail "creating hot.bin"
phase pre
sh /lmtest/load.sh "$D" &
LOADPID=$!
wait_files pre 3
ok "write load running (pid $LOADPID): $(count pre) files"

[ "$DOOR" = nbd ] && check_nbd_timeouts "boot, before any kill"

# ---- the simplest crash first: the daemon serving the live root, no target yet
kill_daemon "while serving the live root (no target attached yet)"
J=$(state_is serving)
ok "after the restart: serving $(jget source "$J") again"
wait_files pre 6
ok "$(count pre) files written in all before attach, through both daemons"

# ---- attach, then kill the daemon mid-sync
OUT=$("$LM" attach /dev/vdb --control "$LM_CTL" 2>&1) || {
  [ -b "/proc/$SUP/root/dev/vdb" ] || info "LIVEMIRROR BUG (see tests/vm/README.md, Traps): after a classic switch_root the daemon's root is the emptied initramfs; attach cannot find /dev/vdb there"
  fail "livemirror attach /dev/vdb: $OUT"
}
phase sync
ok "attach /dev/vdb: $OUT"
J=$(state_is syncing)
TOTAL=$(jget regions_total "$J")
k=0
while [ $k -lt "$SYNCKILLS" ]; do
  k=$((k + 1))
  if [ "$SYNCKILLS" = 1 ]; then PCT=35; else PCT=$((k * 100 / (SYNCKILLS + 1))); fi
  i=0
  while :; do
    J=$(lmstatus); R0=$(jget regions_clean "$J")
    [ "$R0" -ge $((TOTAL * PCT / 100)) ] && [ "$(count_within sync)" -ge 2 ] && break
    [ "$(jget state "$J")" = syncing ] || fail "the sync ended before kill $k (rate limit not applied?): $J"
    i=$((i + 1)); [ $i -gt 1200 ] && fail "the sync did not reach $PCT % in 120 s: $J"
    sleep 0.1
  done
  E=$(dmesg_errors)
  [ -z "$E" ] && ok "before mid-sync kill $k: no I/O errors in dmesg" || fail "before mid-sync kill $k already: $E"
  info "before kill $k: $R0/$TOTAL regions clean, bytes_copied=$(jget bytes_copied "$J")"
  N_TOOK=$(took_over | wc -l)
  kill_daemon "mid-sync ($k of $SYNCKILLS), $R0 of $TOTAL regions clean"
  phase killed
  J=$(lmstatus) || fail "status after the restart"
  R1=$(jget regions_clean "$J")
  case "$(jget state "$J")" in
    syncing|synced) ok "after the restart: state $(jget state "$J"), target $(jget target "$J")" ;;
    *) fail "after the restart the state is not syncing: $J" ;;
  esac
  # Clean regions whose 4 MiB intent chunk had a write in flight at the kill are copied again
  # (the daemon says how many); every other clean region must survive the restart.
  INF=$(echo "$J" | grep -o '[0-9]* regions had writes in flight' | awk '{print $1}')
  INF=${INF:-0}
  [ "$R1" -gt 0 ] && [ "$R1" -ge $((R0 - INF - R0 / 10)) ] \
    && ok "the sync resumed: $R1 regions clean right after the restart ($R0 before the kill, $INF copied again for writes in flight), not from zero" \
    || fail "the sync started over: $R1 regions clean after the restart, $R0 before the kill, $INF in flight: $J"
  # The control socket answers before the kernel device is taken over (as at any start):
  # wait for the daemon to say it did (30 s at most).
  i=0
  while [ "$(took_over | wc -l)" -le "$N_TOOK" ] && [ $i -lt 300 ]; do i=$((i + 1)); sleep 0.1; done
  [ "$(took_over | wc -l)" -gt "$N_TOOK" ] && ok "the new daemon took $LM_ROOTDEV over: $(took_over | tail -n 1 | sed 's/^[^ ]* *//')" \
    || fail "the daemon log does not say the new daemon took $LM_ROOTDEV over"
  check_daemon "$SUP"
  check_own_namespace
  wait_files killed $((3 * k))
  ok "$(count_within killed) files written (fsync'd) after the kills: writes go on through the restarted daemon"
done

# ---- three upgrades in a row, mid-sync, under the load
# A probe writes 4 KiB with O_DIRECT and fsync in a loop and logs how long each write took (ms,
# from /proc/uptime's centiseconds), so the longest write that spanned an upgrade is measured
# from the file system's side.
cs() { read -r _u _ < /proc/uptime; echo "${_u%.*}${_u#*.}"; }
rm -f /run/lmtest/probe.stop
( while [ ! -e /run/lmtest/probe.stop ]; do
    _a=$(cs)
    dd if=/dev/zero of=/probe.bin bs=4096 count=1 oflag=direct conv=notrunc,fsync 2>/dev/null || echo "ERR"
    _b=$(cs)
    echo "$(( (_b - _a) * 10 ))"
  done > /run/lmtest/probe.log ) &
PROBEPID=$!
J=$(lmstatus); RU0=$(jget regions_clean "$J")
DMESG0=$(dmesg | wc -l)
TK0=$(grep -c 'took over /dev/ublkb0' "$LOG" || true)
phase upgraded
for _n in 1 2 3; do
  _old=$CHILD
  _lines=$(wc -l < /run/lmtest/probe.log)
  OUT=$("$LM" upgrade --control "$LM_CTL" 2>&1) || fail "livemirror upgrade #$_n: $OUT"
  ok "upgrade #$_n: $OUT"
  info "upgrade_pause_ms=$(echo "$OUT" | sed -n 's/.*paused \([0-9]*\) ms.*/\1/p')"
  kill -0 "$SUP" 2>/dev/null || fail "the supervisor (pid $SUP) is gone after upgrade #$_n"
  # The old daemon exits once it has answered; the supervisor reaps it.
  _i=0
  while [ "$(wc -w < "/proc/$SUP/task/$SUP/children" 2>/dev/null)" != 1 ] || [ "$(daemon_child "$SUP")" = "$_old" ]; do
    _i=$((_i + 1)); [ $_i -gt 100 ] && fail "upgrade #$_n: the supervisor's children are $(cat "/proc/$SUP/task/$SUP/children") (old daemon $_old)"
    sleep 0.1
  done
  check_daemon "$SUP"
  kill -0 "$_old" 2>/dev/null && fail "upgrade #$_n: the old daemon (pid $_old) still runs"
  J=$(lmstatus) || fail "status after upgrade #$_n"
  case "$(jget state "$J")" in syncing|synced) ;; *) fail "after upgrade #$_n: $J" ;; esac
  sleep 1
  _max=$(tail -n +"$((_lines + 1))" /run/lmtest/probe.log | sort -n | tail -n 1)
  info "upgrade_probe_max_ms=${_max:-?}"
  wait_files upgraded "$_n"
done
touch /run/lmtest/probe.stop; wait "$PROBEPID"
grep -q ERR /run/lmtest/probe.log && fail "a probe write failed during the upgrades"
ok "probe: $(wc -l < /run/lmtest/probe.log) direct, fsync'd writes during the upgrades, the longest $(sort -n /run/lmtest/probe.log | tail -n 1) ms (the median $(sort -n /run/lmtest/probe.log | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}') ms)"
J=$(lmstatus); RU1=$(jget regions_clean "$J")
[ "$RU1" -ge "$RU0" ] && ok "the copy went on through the upgrades: $RU0 -> $RU1 regions clean" \
  || fail "regions clean went back across the upgrades: $RU0 -> $RU1: $J"
[ "$(grep -c 'took over:' "$LOG")" -ge 3 ] || fail "the daemon log does not show three takeovers"
grep 'took over:' "$LOG" | sed 's/^/LMLOG daemon: /'
if [ "$DOOR" = ublk ]; then
  # ublk: each new daemon took the device over by user recovery (the old one left it).
  [ "$(grep -c 'took over /dev/ublkb0' "$LOG")" -ge $((TK0 + 3)) ] && ok "the new daemons took /dev/ublkb0 over by user recovery: $(grep 'took over /dev/ublkb0' "$LOG" | tail -n 1 | sed 's/^[^ ]* *//')" \
    || fail "the daemon log does not show /dev/ublkb0 taken over after each upgrade"
else
  grep -q 'took over /dev/nbd0 with its' "$LOG" && ok "the new daemons served /dev/nbd0's live connections on: $(grep 'took over /dev/nbd0' "$LOG" | tail -n 1 | sed 's/^[^ ]* *//')" \
    || fail "the daemon log does not say it took /dev/nbd0 over"
fi
# The kernel must not have seen a connection end at all: the live ones were handed over.
_k=$(dmesg | tail -n +"$((DMESG0 + 1))" | grep -aE 'nbd0: (Connection timed out|Dead connection|Receive control failed|Send control failed)' || true)
[ -z "$_k" ] && ok "across three upgrades: no NBD connection ended, timed out or failed in dmesg" \
  || fail "across the upgrades the kernel saw NBD connections fail: $(echo "$_k" | tr '\n' ';')"
E=$(dmesg_errors)
[ -z "$E" ] && ok "across three upgrades: no I/O errors in dmesg" || fail "across the upgrades: $E"
wait_files upgraded 4

# ---- finish the sync, verify, detach, release the source
"$LM" set-rate 0 --control "$LM_CTL" || fail "set-rate 0"
( "$LM" wait --timeout 150 --control "$LM_CTL"; echo $? > /run/lmtest/wait.rc ) 2>&1 | tail -n 3 | while read -r l; do info "wait: $l"; done
[ "$(cat /run/lmtest/wait.rc)" = 0 ] || fail "livemirror wait exited $(cat /run/lmtest/wait.rc)"
phase synced
J=$(state_is synced)
[ "$(jget regions_clean "$J")" = "$TOTAL" ] && ok "synced: $TOTAL/$TOTAL regions clean" || fail "synced but $J"
OUT=$("$LM" verify --control "$LM_CTL" 2>&1) && ok "verify: $OUT" || fail "verify: $OUT"
wait_files synced 2
OUT=$("$LM" detach-source --control "$LM_CTL" 2>&1) || fail "detach-source: $OUT"
phase detached
OUT=$(/usr/sbin/dmsetup --noudevsync remove live 2>&1) && ok "dmsetup remove live: the source is gone" || fail "dmsetup remove live: $OUT"
losetup -d "$(cat /run/lmtest/overlay-loop)" || fail "losetup -d"
rm -f /run/overlay.img
wait_files detached 3

# ---- kill again: the source device no longer exists
kill_daemon "after detach-source, with the source device removed"
phase released
J=$(lmstatus) || fail "status after the second restart"
[ "$(jget state "$J")" = source-detached ] && [ "$(jget source "$J")" = null ] \
  && ok "after the second restart: source-detached, serving $(jget target "$J") alone" || fail "after the second restart: $J"
check_daemon "$SUP"
wait_files released 3

# ---- grow + online resize through the restarted daemon
if [ "$DOOR" = ublk ] && [ "$(cmdline growfs 0)" = 1 ]; then
  # No UPDATE_SIZE in this kernel: grow is refused with its reason and changes nothing; the
  # file system is grown at the installed system's first boot (boot 2) instead.
  SZ0=$(blockdev --getsize64 "$LM_ROOTDEV")
  OUT=$("$LM" grow --control "$LM_CTL" 2>&1) && fail "grow succeeded where the kernel cannot resize $LM_ROOTDEV: $OUT"
  case "$OUT" in *"cannot change size"*) ok "grow refused, saying why: $OUT" ;; *) fail "grow failed without the reason: $OUT" ;; esac
  [ "$(blockdev --getsize64 "$LM_ROOTDEV")" = "$SZ0" ] && [ "$(jget export_size "$(lmstatus)")" = "$SZ0" ] \
    && ok "the refused grow changed nothing ($SZ0 bytes)" || fail "the refused grow changed the size: $(lmstatus)"
else
  OUT=$("$LM" grow --control "$LM_CTL" 2>&1) || fail "grow: $OUT"
  i=0
  while [ "$(($(cat /sys/block/"$RDEV"/size) * 512))" != "$VDB" ] && [ $i -lt 100 ]; do i=$((i + 1)); sleep 0.1; done
  [ "$(($(cat /sys/block/"$RDEV"/size) * 512))" = "$VDB" ] && ok "grow: the kernel sees $LM_ROOTDEV at $VDB bytes" \
    || fail "after grow the kernel sees $(($(cat /sys/block/"$RDEV"/size) * 512)) bytes, not $VDB"
  OUT=$(/usr/sbin/resize2fs "$LM_ROOTDEV" 2>&1) || fail "resize2fs: $OUT"
  FS=$(df -k / | awk 'NR==2{print $2}')
  [ "$FS" -gt $((VDB * 85 / 102400)) ] && ok "resize2fs: / is $FS KiB" || fail "after resize2fs / is $FS KiB"
fi
phase resized
echo "pre sync killed upgraded synced detached released resized" > "$D/EXPECTED_PHASES"
wait_files resized 3

# ---- stop the load, check everything
stop_load "$LOADPID"
info "files: pre=$(count pre) sync=$(count sync) killed=$(count killed) upgraded=$(count upgraded) synced=$(count synced) detached=$(count detached) released=$(count released) resized=$(count resized)"
E=$(dmesg_errors)
[ -z "$E" ] && ok "no I/O errors, ext4 errors or read-only remount in dmesg" || fail "kernel messages: $E"
[ "$DOOR" = nbd ] && info "kernel NBD messages: $(dmesg | grep -acE 'nbd0: (Connection timed out|Dead connection|reconnected)' ) lines: $(dmesg | grep -aE 'block nbd0' | sed 's/^\[ *[0-9.]*\] //' | sort | uniq -c | tr -s ' ' | tr '\n' ';')"
grep -q ' / ext4 rw' /proc/mounts && ok "/ is still mounted read-write" || fail "/ is not read-write: $(grep ' / ' /proc/mounts)"
verify_load_files "$D"
J=$(state_is source-detached)
[ "$(jget error "$J")" = null ] || fail "the daemon reports an error: $J"
grep -E 'supervisor|ERROR|WARN' "$LOG" | tail -n 12 | sed 's/^/LMLOG daemon: /'
sync
mount -o remount,ro / && ok "root remounted read-only" || { softfail "remount,ro / failed"; echo u > /proc/sysrq-trigger; sleep 1; }
touch /run/lmtest/done
echo "LMTEST DONE t=$(up)"
lm_poweroff
