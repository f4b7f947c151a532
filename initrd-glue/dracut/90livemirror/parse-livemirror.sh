#!/bin/sh
# dracut cmdline hook (livemirror): check the options early and load nbd, so a typo shows up
# before the live image is even looked for.
type getarg > /dev/null 2>&1 || . /lib/dracut-lib.sh
. /usr/lib/livemirror/initrd.sh
lm_config
if lm_enabled; then
    modprobe -q nbd || warn "livemirror: cannot load the nbd module"
    info "livemirror: will serve $LM_SOURCE on $LM_NBD and mount $LM_NBD as the root"
fi
