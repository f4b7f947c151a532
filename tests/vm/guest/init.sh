#!/bin/sh
# /sbin/init of the test root image. Booted over NBD by stage 1 it performs the rebootless
# install (stage2.sh), with lm.mode=kill the crash-and-resume install (kill-stage2.sh), or with
# lm.mode=multiconn many kernel connections under a deep-queue load (multiconn-stage2.sh); booted
# straight from the installed disk (lm.mode=installed) it checks that everything arrived
# (installed.sh).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
case "$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^lm\.mode=//p' | tail -n 1)" in
  installed) exec /bin/sh /lmtest/installed.sh ;;
  kill) exec /bin/sh /lmtest/kill-stage2.sh ;;
  multiconn) exec /bin/sh /lmtest/multiconn-stage2.sh ;;
  *) exec /bin/sh /lmtest/stage2.sh ;;
esac
