# shellcheck shell=dash # run or sourced by busybox sh in the guest
# Guest watchdog, run as "/run/lmtest/busybox sh /run/lmtest/watchdog.sh SECS &" after
# switch_root. Everything it runs is in /run (tmpfs), so it still works when the NBD root hangs:
# if the run has not finished after SECS seconds it dumps the daemon's log and status and the
# kernel's blocked tasks, then powers off (the host sees FAIL and no DONE, with the reason).
BB=/run/lmtest/busybox
$BB sleep "$1"
[ -e /run/lmtest/done ] && exit 0
echo "LMTEST FAIL: guest watchdog: the run did not finish within $1 s (phase: $($BB cat /run/lmtest/phase 2>/dev/null))"
for f in /run/livemirror.log /run/livemirror/log; do
  [ -f "$f" ] && $BB tail -n 60 "$f" 2>/dev/null | $BB sed 's/^/LMLOG daemon: /'
done
$BB timeout 10 /run/livemirror/livemirror status --control /run/livemirror/control.sock 2>&1 | $BB sed 's/^/LMLOG status: /'
$BB dmesg | $BB tail -n 30 | $BB sed 's/^/LMLOG dmesg: /'
echo w > /proc/sysrq-trigger
$BB sleep 3
echo o > /proc/sysrq-trigger
