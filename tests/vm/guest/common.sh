# shellcheck shell=dash # run or sourced by busybox sh in the guest
# Guest-side helpers (busybox sh), sourced by every guest script. Marker lines on the serial
# console are what the host judges: LMTEST OK / FAIL / NOTE / INFO / DONE.
# Real tools are called by full path: busybox sh runs its own applets before PATH.

LM_CTL=/run/livemirror/control.sock
LM=/usr/sbin/livemirror          # the control CLI (any copy will do; the daemon runs from /run)

up() { read -r _u _ < /proc/uptime; echo "$_u"; }
ok() { echo "LMTEST OK: $* [t=$(up)]"; }
note() { echo "LMTEST NOTE: $* [t=$(up)]"; }
info() { echo "LMTEST INFO: $*"; }

# A failed check ends the run: dump what helps, power off (the host sees FAIL and no DONE).
fail() {
  echo "LMTEST FAIL: $* [t=$(up)]"
  lm_dump
  lm_poweroff
}
# A failed check that does not stop the run.
softfail() { echo "LMTEST FAIL: $* [t=$(up)]"; }

lm_poweroff() {
  echo "LMTEST INFO: powering off at t=$(up)"
  echo o > /proc/sysrq-trigger
  sleep 10
  poweroff -f
}

# Diagnostics: the daemon's log tail, its status, the kernel's last messages.
lm_dump() {
  for _f in /run/livemirror.log /run/livemirror/log; do
    [ -f "$_f" ] && tail -n 40 "$_f" | sed 's/^/LMLOG daemon: /'
  done
  if [ -S "$LM_CTL" ]; then
    timeout 10 "$LM" status --control "$LM_CTL" 2>&1 | sed 's/^/LMLOG status: /'
  fi
  dmesg | grep -aiE 'nbd|ublk|device-mapper|dm-|snapshot|EXT4|I/O error|blk_update|hung|blocked|Call Trace|livemirror' \
    | tail -n 30 | sed 's/^/LMLOG dmesg: /'
}

# cmdline VAR DEFAULT: value of lm.VAR=... on the kernel command line.
cmdline() {
  _v=$(tr ' ' '\n' < /proc/cmdline | sed -n "s/^lm\.$1=//p" | tail -n 1)
  echo "${_v:-$2}"
}

# The kernel device the live root is served on: /dev/nbd0, or /dev/ublkb0 with lm.door=ublk.
case "$(cmdline door nbd)" in ublk) LM_ROOTDEV=/dev/ublkb0 ;; *) LM_ROOTDEV=/dev/nbd0 ;; esac

# jget KEY JSON: a scalar field at the top level of a one-line JSON object (strings unquoted).
# It walks the text, skipping strings and counting brackets, so it finds KEY whatever the order
# of the fields and whatever nested arrays (the status' "events") come before it.
jget() {
  printf '%s\n' "$2" | awk -v k="$1" '{
    s = $0; n = length(s); depth = 0; i = 1
    while (i <= n) {
      c = substr(s, i, 1)
      if (c == "\"") {
        j = i + 1; str = ""
        while (j <= n) {
          d = substr(s, j, 1)
          if (d == "\\") { str = str substr(s, j, 2); j += 2; continue }
          if (d == "\"") break
          str = str d; j++
        }
        if (depth == 1 && str == k && substr(s, j + 1, 1) == ":") {
          v = substr(s, j + 2)
          if (substr(v, 1, 1) == "\"") { v = substr(v, 2); print substr(v, 1, index(v, "\"") - 1) }
          else { match(v, /^[^,}]*/); print substr(v, 1, RLENGTH) }
          exit
        }
        i = j + 1; continue
      }
      if (c == "{" || c == "[") depth++
      else if (c == "}" || c == "]") depth--
      i++
    }
  }'
}

lmstatus() { "$LM" status --json --control "$LM_CTL"; }

# daemon_child SUP: the pid of the supervisor's child (the daemon proper), if any.
daemon_child() { awk '{print $1}' "/proc/$1/task/$1/children" 2>/dev/null; }

# check_daemon SUP: the root storage daemon is what it should be: a supervisor and its child, both
# named @livemirror, with locked memory, and neither maps nor holds anything on the root it
# serves (checked by device number: the initramfs files they were started from are deleted by
# switch_root but stay mapped, in RAM). Sets CHILD.
check_daemon() {
  _sup=$1
  kill -0 "$_sup" 2>/dev/null || fail "the supervisor (pid $_sup) is not running"
  _a=$(tr '\0' ' ' < "/proc/$_sup/cmdline")
  # After `livemirror upgrade` the binary runs through its staged ELF interpreter, which gets
  # argv[0] "@livemirror" too (what systemd's kill sprees look at).
  case "$_a" in
    @livemirror\ serve\ *|@livemirror\ --library-path\ *) ok "supervisor pid $_sup: $_a" ;;
    *) fail "pid $_sup runs '$_a', not @livemirror serve" ;;
  esac
  CHILD=$(daemon_child "$_sup")
  [ -n "$CHILD" ] || fail "the supervisor has no child daemon"
  case "$(tr '\0' ' ' < "/proc/$CHILD/cmdline")" in
    @livemirror\ serve\ *|@livemirror\ --library-path\ *) ok "daemon pid $CHILD (child of the supervisor) is named @livemirror too" ;;
    *) fail "the supervisor's child $CHILD runs '$(tr '\0' ' ' < "/proc/$CHILD/cmdline")'" ;;
  esac
  _rdev=$(stat -c %D /)
  _rmm=$(printf '%02x:%02x' $((0x$_rdev >> 8)) $((0x$_rdev & 255)))
  for _p in "$_sup" "$CHILD"; do
    _bad=$(awk -v d="$_rmm" '$5 != 0 && $4 == d {print $6}' "/proc/$_p/maps" | sort -u)
    [ -z "$_bad" ] || fail "pid $_p maps files from the served root: $_bad"
    for _f in "/proc/$_p"/fd/* "/proc/$_p/cwd"; do
      [ "$(stat -L -c %D "$_f" 2>/dev/null)" = "$_rdev" ] && fail "pid $_p holds $(readlink "$_f") on the served root"
    done
    _lck=$(awk '/^VmLck:/{print $2}' "/proc/$_p/status")
    [ "${_lck:-0}" -gt 0 ] || fail "pid $_p has no locked memory (VmLck ${_lck:-?} kB)"
  done
  ok "supervisor and daemon map and hold nothing on the served root ($_rmm); memory locked (VmLck $(awk '/^VmLck:/{print $2}' "/proc/$CHILD/status") kB), oom_score_adj $(cat "/proc/$CHILD/oom_score_adj")"
}

# start_watchdog: the guest watchdog, from /run (see watchdog.sh), firing at lm.watchdog seconds
# of uptime. Started after switch_root, so that it runs in the new root.
start_watchdog() {
  _left=$(( $(cmdline watchdog 200) - $(cut -d. -f1 /proc/uptime) ))
  [ "$_left" -gt 10 ] || _left=10
  /run/lmtest/busybox sh /run/lmtest/watchdog.sh "$_left" &
}

# dmesg_errors [PATTERN]: kernel lines that mean the root device failed (I/O errors, ext4
# errors, a read-only remount) plus PATTERN (extended regex).
dmesg_errors() {
  dmesg | grep -aE "I/O error|Buffer I/O error|EXT4-fs error|EXT4-fs warning|Remounting filesystem read-only|blk_update_request|critical medium error${1:+|$1}" || true
}

# check_nbd_timeouts WHEN: the kernel must not have timed out a request on /dev/nbd0 (a
# "Connection timed out" means the daemon left a request unanswered for the whole --nbd-timeout;
# see tests/vm/README.md, bugs found). lm.tolerate=stall (LIVEMIRROR_VM_TOLERATE)
# turns the failure into a NOTE, to exercise the rest of a scenario while that bug is open.
check_nbd_timeouts() {
  _e=$(dmesg | grep -aE 'nbd0: (Connection timed out|Dead connection)' || true)
  if [ -z "$_e" ]; then
    ok "$1: no timed-out NBD request in dmesg"
  elif [ "$(cmdline tolerate none)" = stall ]; then
    note "$1: TOLERATED (lm.tolerate=stall) livemirror left kernel requests unanswered until the NBD timeout: $(echo "$_e" | tr '\n' ';')"
  else
    fail "$1: livemirror left kernel requests unanswered until the NBD timeout (see tests/vm/README.md, bugs found): $(echo "$_e" | tr '\n' ';')"
  fi
}

# Boot 1 of every live-system scenario: / is ext4 on /dev/nbd0 (or /dev/ublkb0) and shows
# this run's base image through the snapshot and livemirror.
check_live_root() {
  _root=$(awk '$2=="/"' /proc/mounts | tail -n 1)
  case "$_root" in "$LM_ROOTDEV / ext4 "*) ok "root is $LM_ROOTDEV: $_root" ;; *) fail "root is not $LM_ROOTDEV: $_root" ;; esac
  grep -q "$(cmdline token none)" /etc/base-marker && ok "base image content visible through the snapshot + livemirror" \
    || fail "/etc/base-marker does not hold this run's token"
}

# Stops the write load (load.sh, pid $1) and checks that it saw no I/O error.
stop_load() {
  touch /run/lmtest/stop
  wait "$1"; _rc=$?
  [ "$_rc" = 0 ] && ok "write load stopped: it saw no I/O error" || fail "write load reported $_rc errors"
}

# Reads every file the load wrote in $1 back from the device (not the page
# cache) against its manifest, and the in-place rewritten hot.bin.
verify_load_files() {
  sync
  echo 3 > /proc/sys/vm/drop_caches
  cd "$1" || fail "cd $1"
  _bad=$(sha256sum -c MANIFEST 2>&1 | grep -v ': OK$' || true)
  [ -z "$_bad" ] && ok "all $(wc -l < MANIFEST) manifest files read back intact after drop_caches" || fail "manifest mismatches: $_bad"
  sha256sum -c hot.sha256 >/dev/null 2>&1 && ok "hot.bin (rewritten in place during every phase) intact" || fail "hot.bin mismatch"
  cd /
}
