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
  if [ -f /run/livemirror.log ]; then
    tail -n 40 /run/livemirror.log | sed 's/^/LMLOG daemon: /'
  fi
  if [ -S "$LM_CTL" ]; then
    timeout 10 /run/livemirror/run status --control "$LM_CTL" 2>&1 | sed 's/^/LMLOG status: /'
  fi
  dmesg | grep -aiE 'nbd|device-mapper|dm-|snapshot|EXT4|I/O error|blk_update|hung|blocked|Call Trace|livemirror' \
    | tail -n 30 | sed 's/^/LMLOG dmesg: /'
}

# cmdline VAR DEFAULT: value of lm.VAR=... on the kernel command line.
cmdline() {
  _v=$(tr ' ' '\n' < /proc/cmdline | sed -n "s/^lm\.$1=//p" | tail -n 1)
  echo "${_v:-$2}"
}

# jget KEY JSON: a scalar field of a flat one-line JSON object (strings unquoted).
jget() {
  echo "$2" | sed 's/,"events":.*//' | sed -n "s/.*\"$1\":\(\"[^\"]*\"\|[^,}]*\).*/\1/p" | sed 's/^"\(.*\)"$/\1/'
}

lmstatus() { "$LM" status --json --control "$LM_CTL"; }
