#!/bin/sh
# dracut shutdown hook (livemirror). dracut's shutdown has moved the old root's /run to
# /oldsys/run and unmounted the old root; stop the daemon (SIGTERM: it flushes and persists its
# state) and disconnect the NBD device or remove the ublk device (lm_detach). Returning non-zero makes dracut call the hook
# again later (the root may still be mounted on the first rounds).
. /usr/lib/livemirror/initrd.sh
_lm_d=/oldsys/run/livemirror
[ -r "$_lm_d/pid" ] || _lm_d=/run/livemirror
if [ -r "$_lm_d/pid" ]; then
    lm_detach "$_lm_d"
fi
