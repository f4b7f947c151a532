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
    else
        warn "livemirror: livemirror.kernel=ublk, but this kernel has no ublk driver"
    fi
    if lm_live; then
        # livemirror's own live stack: the medium is the root= dracut must wait for (dmsquash-live,
        # which would handle root=live:..., is not in this initramfs).
        . /usr/lib/livemirror/live.sh
        _lm_dev=$(lm_live_device "$(getarg root=)")
        if [ -n "$_lm_dev" ]; then
            # shellcheck disable=SC2034 # read by dracut once the cmdline hooks have run
            rootok=1
            wait_for_dev -n "$_lm_dev"
            info "livemirror: will serve the live medium $_lm_dev's image with an overlay in RAM through the kernel's ${_lm_door:-nbd} driver"
        else
            warn "livemirror: rd.livemirror.overlay needs root=live:CDLABEL=... (or LABEL=, UUID=, /dev/...)"
        fi
    else
        info "livemirror: will serve $LM_SOURCE through the kernel's ${_lm_door:-nbd} driver and mount that device as the root"
    fi
fi
