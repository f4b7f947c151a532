# shellcheck shell=dash # run or sourced by busybox sh in the guest
# Stage 2: runs as PID 1 with / on /dev/nbd0 (served by @livemirror from the dm snapshot).
# The rebootless install under write load: attach /dev/vdb, wait, verify, detach the source,
# free the RAM overlay, grow (the kernel device and the mounted file system). One marker line
# per check.
# Knobs (kernel command line): lm.rate=RATE (copy rate limit during the sync, default 20M)
#   lm.nbd=livemirror|nbd-client|ioctl (as stage 1; only livemirror's own netlink attach can
#   resize /dev/nbd0 online, so the resize step runs in that mode only)
. /lmtest/common.sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
RATE=$(cmdline rate 20M)
D=/data
phase() { echo "$1" > /run/lmtest/phase; info "phase=$1 t=$(up)"; }
count() { grep -c "^$1-" "$D/PHASES" 2>/dev/null || echo 0; }  # files started in phase $1
count_within() { awk -v p="$1" '$2==p && $3==p' "$D/PHASES" 2>/dev/null | wc -l; }
wait_files() { # wait_files PHASE N: until N files of PHASE were written (60 s at most)
  _i=0
  while [ "$(count_within "$1")" -lt "$2" ]; do
    _i=$((_i + 1)); [ $_i -gt 600 ] && fail "the write load wrote fewer than $2 files in phase $1"
    kill -0 "$LOADPID" 2>/dev/null || fail "the write load died in phase $1"
    sleep 0.1
  done
}
state_is() { # state_is STATE: status --json says so (else fail, with the JSON)
  _j=$(lmstatus) || fail "livemirror status --json failed"
  [ "$(jget state "$_j")" = "$1" ] || fail "expected state $1, status says: $_j"
  echo "$_j"
}

echo "LMTEST INFO: stage2 start (pid $$) t=$(up)"
check_live_root

start_watchdog
LMPID=$(cat /run/livemirror/serve.pid)
check_daemon "$LMPID"
ok "the root storage daemon survived switch_root ($(cmdline switchroot move))"
NBDMODE=$(cmdline nbd livemirror)
# Where the daemon resolves paths: its root directory is the initramfs it was started in.
if [ -b "/proc/$LMPID/root/dev/vdb" ]; then
  info "the daemon's root directory has /dev/vdb"
else
  info "the daemon's root directory is the emptied initramfs (no /dev, no /proc): $(ls -a "/proc/$LMPID/root/" 2>&1 | tr '\n' ' ')"
fi
J=$(state_is serving)
ok "status: serving, export_size=$(jget export_size "$J"), source=$(jget source "$J")"
VDB=$(blockdev --getsize64 /dev/vdb)
info "target_size=$VDB"

# ---- write load, files before the attach
mkdir -p "$D"
dd if=/dev/urandom of="$D/hot.bin" bs=4096 count=64 conv=fsync 2>/dev/null || fail "creating hot.bin"
phase pre
sh /lmtest/load.sh "$D" &
LOADPID=$!
wait_files pre 5
ok "write load running (pid $LOADPID): $(count pre) files before attach"

# ---- attach the target; the copy is slowed down so that the writes race it
"$LM" set-rate "$RATE" --control "$LM_CTL" || fail "livemirror set-rate $RATE (before attach)"
ok "set-rate $RATE"
T_ATTACH=$(up)
OUT=$("$LM" attach /dev/vdb --control "$LM_CTL" 2>&1) || {
  [ -b "/proc/$LMPID/root/dev/vdb" ] || info "LIVEMIRROR BUG (see tests/vm/README.md, Traps): after a classic switch_root the daemon's root is the emptied initramfs; attach cannot find /dev/vdb there, nor /proc to look through the caller's root"
  fail "livemirror attach /dev/vdb: $OUT"
}
phase sync
ok "attach /dev/vdb: $OUT"
J=$(state_is syncing)
ok "status: syncing ($(jget regions_clean "$J")/$(jget regions_total "$J") regions clean)"

# pause / resume while syncing
sleep 1
"$LM" pause --control "$LM_CTL" || fail "livemirror pause"
J0=$(lmstatus); sleep 1   # copies already in flight may still land (queue depth x chunk)
J1=$(lmstatus); sleep 1; J2=$(lmstatus)
B0=$(jget bytes_copied "$J0"); B1=$(jget bytes_copied "$J1")
[ "$B0" = "$B1" ] || note "bytes_copied moved in the first second after pause returned: $B0 -> $B1 ($((B1 - B0)) bytes)"
[ "$(jget paused "$J2")" = true ] && [ "$(jget state "$J2")" = syncing ] && ok "pause: paused=true, still syncing" \
  || fail "after pause: $J2"
B1=$(jget bytes_copied "$J1"); B2=$(jget bytes_copied "$J2")
[ "$B1" = "$B2" ] && ok "pause: no copy progress while paused (bytes_copied stays $B1)" \
  || fail "the copy goes on while paused: bytes_copied $B1 -> $B2 one second apart"
"$LM" resume --control "$LM_CTL" || fail "livemirror resume"
J=$(lmstatus)
[ "$(jget paused "$J")" = false ] && ok "resume: paused=false" || fail "after resume: $J"

# wait (plain progress lines: no TTY)
( "$LM" wait --timeout 150 --control "$LM_CTL"; echo $? > /run/lmtest/wait.rc ) 2>&1 | while read -r l; do info "wait: $l"; done
RC=$(cat /run/lmtest/wait.rc)
T_SYNCED=$(up)
phase synced
[ "$RC" = 0 ] || fail "livemirror wait exited $RC"
ok "wait: synced after $(echo "$T_SYNCED $T_ATTACH" | awk '{printf "%.1f", $1-$2}') s"
info "sync_secs=$(echo "$T_SYNCED $T_ATTACH" | awk '{printf "%.1f", $1-$2}')"
N=$(count_within sync)
[ "$N" -ge 3 ] && ok "$N files were written entirely while the copy ran" \
  || fail "only $N files were written while the copy ran: the writes did not race the copy"
J=$(state_is synced)
[ "$(jget regions_clean "$J")" = "$(jget regions_total "$J")" ] && [ "$(jget error "$J")" = null ] \
  && ok "status: synced, $(jget regions_clean "$J")/$(jget regions_total "$J") regions clean, copied $(jget bytes_copied "$J") bytes, error null" \
  || fail "synced but: $J"
"$LM" set-rate 0 --control "$LM_CTL" || fail "livemirror set-rate 0"

# verify while the load keeps writing
OUT=$("$LM" verify --control "$LM_CTL" 2>&1); RC=$?
echo "$OUT" | tail -n 5 | while read -r l; do info "verify: $l"; done
[ $RC = 0 ] && ok "verify: source and target match" || fail "verify exited $RC: $(echo "$OUT" | tail -n 3)"
wait_files synced 2

# ---- release the source: the snapshot and its RAM overlay must go away
OUT=$("$LM" detach-source --control "$LM_CTL" 2>&1) || fail "livemirror detach-source: $OUT"
phase detached
J=$(state_is source-detached)
[ "$(jget source "$J")" = null ] && ok "detach-source: state source-detached, source null" || fail "after detach-source: $J"
OPEN=$(/usr/sbin/dmsetup info -c --noheadings -o open live 2>&1)
info "dm live open count after detach-source: $OPEN"
OUT=$(/usr/sbin/dmsetup --noudevsync remove live 2>&1) && ok "dmsetup remove live: the daemon closed the source" \
  || fail "dmsetup remove live failed (open count $OPEN): $OUT"
OVL=$(cat /run/lmtest/overlay-loop)
MEM0=$(awk '/MemAvailable/{print $2}' /proc/meminfo)
losetup -d "$OVL" || fail "losetup -d $OVL"
rm -f /run/overlay.img
MEM1=$(awk '/MemAvailable/{print $2}' /proc/meminfo)
ok "RAM overlay $OVL released (MemAvailable $MEM0 -> $MEM1 KiB)"
wait_files detached 5
ok "$(count_within detached) files written after detach-source"

# ---- grow the export to the target's size
OUT=$("$LM" grow --control "$LM_CTL" 2>&1) || fail "livemirror grow: $OUT"
J=$(lmstatus)
[ "$(jget export_size "$J")" = "$VDB" ] && ok "grow: export_size is now $VDB (the target's size)" \
  || fail "after grow export_size=$(jget export_size "$J"), target is $VDB: $J"
phase grown
if [ "$NBDMODE" = livemirror ]; then
  i=0
  while [ "$(($(cat /sys/block/nbd0/size) * 512))" != "$VDB" ] && [ $i -lt 100 ]; do i=$((i + 1)); sleep 0.1; done
  KSIZE=$(($(cat /sys/block/nbd0/size) * 512))
  [ "$KSIZE" = "$VDB" ] && ok "kernel: /sys/block/nbd0/size grew to $KSIZE bytes (the target's size) after $((i / 10)).$((i % 10)) s" \
    || fail "kernel still sees /dev/nbd0 as $KSIZE bytes 10 s after grow (export $VDB)"
  FS0=$(df -k / | awk 'NR==2{print $2}')
  T_RS=$(up)
  OUT=$(/usr/sbin/resize2fs /dev/nbd0 2>&1) || fail "resize2fs /dev/nbd0: $OUT"
  FS=$(df -k / | awk 'NR==2{print $2}')
  [ "$FS" -gt $((VDB * 85 / 102400)) ] && ok "resize2fs /dev/nbd0 (online, $(echo "$(up) $T_RS" | awk '{printf "%.1f", $1-$2}') s): df says / is $FS KiB (was $FS0 KiB)" \
    || fail "after resize2fs / is only $FS KiB (was $FS0)"
  echo "pre sync synced detached grown resized" > "$D/EXPECTED_PHASES"
  phase resized
  wait_files resized 5
  ok "$(count_within resized) files written after the online resize"
else
  note "nbd-client connected /dev/nbd0 ($NBDMODE): livemirror cannot resize the kernel's view of it, resize step skipped"
  echo "pre sync synced detached grown" > "$D/EXPECTED_PHASES"
  wait_files grown 2
fi

# ---- stop the load, check every file from the device (not the page cache)
stop_load "$LOADPID"
info "files: pre=$(count pre) sync=$(count sync) synced=$(count synced) detached=$(count detached) grown=$(count grown) resized=$(count resized)"
verify_load_files "$D"
J=$(state_is source-detached)
[ "$(jget error "$J")" = null ] || fail "daemon reports an error: $J"
ok "final status: $J"
check_nbd_timeouts "whole run"
E=$(dmesg_errors)
[ -z "$E" ] && ok "no I/O errors, ext4 errors or read-only remount in dmesg" || fail "kernel messages: $E"
grep -q ' / ext4 rw' /proc/mounts && ok "/ is still mounted read-write" || fail "/ is not read-write: $(grep ' / ' /proc/mounts)"
if grep -qE ' ERROR |panicked|supervisor' /run/livemirror.log; then
  grep -E ' ERROR |panicked' /run/livemirror.log | tail -n 5 | sed 's/^/LMLOG daemon: /'
  note "the daemon logged errors (above)"
fi
tail -n 15 /run/livemirror.log | sed 's/^/LMLOG daemon: /'

# ---- leave the disk clean: the host runs e2fsck -fn on it
sync
mount -o remount,ro / && ok "root remounted read-only" || { softfail "remount,ro / failed"; echo u > /proc/sysrq-trigger; sleep 1; }
touch /run/lmtest/done
echo "LMTEST DONE t=$(up)"
lm_poweroff
