#!/bin/sh
# dracut cmdline hook (livemirror): check the options early and load the module of the kernel
# device (livemirror.kernel: ublk_drv where it loads, else nbd), so a typo shows up before the
# live image is even looked for.
type getarg > /dev/null 2>&1 || . /lib/dracut-lib.sh
. /usr/lib/livemirror/initrd.sh
lm_config
if lm_enabled; then
    if _lm_door=$(lm_door); then
        [ "$_lm_door" = nbd ] && { modprobe -q nbd || warn "livemirror: cannot load the nbd module"; }
        info "livemirror: will serve $LM_SOURCE through the kernel's $_lm_door driver and mount that device as the root"
    else
        warn "livemirror: livemirror.kernel=ublk, but this kernel has no ublk driver"
    fi
fi
