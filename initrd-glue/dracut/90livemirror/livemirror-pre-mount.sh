#!/bin/sh
# dracut pre-mount hook (livemirror). By now the initqueue has built the live device
# (dmsquash-live's /dev/mapper/live-rw). Start the root storage daemon on it and make its kernel
# device (/dev/nbd0, or /dev/ublkbN with livemirror.kernel=ublk|auto) the root:
#   - systemd in the initramfs: a drop-in for sysroot.mount (What=the device), then a reload;
#     sysroot.mount is ordered after dracut-pre-mount.service, so it has not run yet.
#   - dracut's own init: a mount hook that sorts before every other one.
# The daemon is spared at switch_root (argv[0] starts with '@'; dracut's hook services use
# KillMode=process) and need_shutdown asks dracut to restore /run/initramfs at shutdown, where
# livemirror-shutdown.sh detaches it.
type getarg > /dev/null 2>&1 || . /lib/dracut-lib.sh
. /usr/lib/livemirror/initrd.sh
lm_config
# Live media whose root is overlayfs (rd.live.overlay.overlayfs, or a squashfs that holds the root
# tree itself, as on Fedora 41 and later) have no block device to serve: dmsquash-live mounted
# /run/rootfsbase instead of building live-rw. Say so and boot the medium as it is.
if lm_enabled && ! lm_live && [ ! -b "$LM_SOURCE" ] && { getargbool 0 rd.live.overlay.overlayfs || [ -e /run/rootfsbase ]; }; then
    warn "livemirror: this live medium's root is overlayfs, which has no block device to serve: booting without livemirror (livemirror-install cannot install it; see initrd-glue/README.md)"
    # shellcheck disable=SC2034 # read by lm_enabled (initrd.sh)
    LM_ENABLE=0
fi
if lm_enabled && lm_live; then
    # livemirror's own live stack: mount the medium and its squashfs; the source is the image.
    . /usr/lib/livemirror/live.sh
    lm_live_mount || die "livemirror: cannot set up the live medium (see above)"
fi
if lm_enabled; then
    lm_wait_block "$LM_SOURCE" "$LM_WAIT" \
        || die "livemirror: $LM_SOURCE did not appear within $LM_WAIT s (livemirror.source=, livemirror.wait=)"
    lm_start /usr/sbin/livemirror \
        || die "livemirror: could not serve $LM_SOURCE on $LM_NBD (boot without rd.livemirror to use the live device directly)"
    need_shutdown
    if [ -n "$DRACUT_SYSTEMD" ]; then
        mkdir -p /run/systemd/system/sysroot.mount.d
        printf '[Mount]\nWhat=%s\n' "$LM_NBD" > /run/systemd/system/sysroot.mount.d/90-livemirror.conf
        systemctl daemon-reload
    else
        _lm_o=rw
        getarg ro > /dev/null && _lm_o=ro
        _lm_f=$(getarg rootflags=) && _lm_o="$_lm_o,$_lm_f"
        # shellcheck disable=SC2016,SC2154 # $NEWROOT expands when the hook runs; dracut sets hookdir
        printf 'mount -o %s %s "$NEWROOT"\n' "$_lm_o" "$LM_NBD" > "$hookdir/mount/00-livemirror.sh"
    fi
fi
