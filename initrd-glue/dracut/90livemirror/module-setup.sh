#!/bin/bash
# dracut module "livemirror": serve the live system's read-write device (a dm snapshot such as
# dmsquash-live's /dev/mapper/live-rw) with livemirror and mount the kernel NBD device it feeds
# (/dev/nbd0) as the root, so the running system can later be installed onto a disk without a
# reboot (livemirror-install). Turned on by rd.livemirror on the kernel command line.
#
# With rd.livemirror.overlay it is the whole live stack itself, without device-mapper: it finds
# the medium named by root=live:..., mounts it and its squashfs, and serves LiveOS/rootfs.img with
# livemirror's own overlay in RAM. Build such an initramfs without dmsquash-live:
#   dracut --add livemirror --omit dmsquash-live ...
#
# Install: copy this directory to /usr/lib/dracut/modules.d/90livemirror, put the shared code at
# /usr/lib/livemirror/initrd.sh (initrd-glue/install.sh does both), then build with
#   dracut --add "dmsquash-live livemirror" ...
# The module is only included when asked for (check returns 255).

LIVEMIRROR_BIN=
# shellcheck disable=SC1091
[[ -r /etc/livemirror/initrd.conf ]] && . /etc/livemirror/initrd.conf

livemirror_bin() {
    local b
    if [[ $LIVEMIRROR_BIN ]]; then
        echo "$LIVEMIRROR_BIN"
        return 0
    fi
    for b in /usr/sbin/livemirror /usr/local/sbin/livemirror /usr/bin/livemirror /usr/local/bin/livemirror; do
        [[ -x $b ]] && echo "$b" && return 0
    done
    return 1
}

# called by dracut
check() {
    livemirror_bin > /dev/null || {
        derror "livemirror: no livemirror binary (set LIVEMIRROR_BIN in /etc/livemirror/initrd.conf)"
        return 1
    }
    [[ -r /usr/lib/livemirror/initrd.sh ]] || {
        derror "livemirror: /usr/lib/livemirror/initrd.sh is missing"
        return 1
    }
    return 255
}

# called by dracut
depends() {
    return 0
}

# called by dracut
installkernel() {
    instmods nbd
    # Where the kernel has it (Linux 6.5+ with CONFIG_BLK_DEV_UBLK): the ublk door
    # (livemirror.kernel=auto|ublk). instmods skips a module the kernel lacks.
    instmods ublk_drv
    # The live medium (rd.livemirror.overlay): a CD or a disk, its squashfs on a loop device.
    hostonly='' instmods squashfs loop isofs sr_mod cdrom
}

# called by dracut
install() {
    # The binary lands in the initramfs, i.e. in RAM; at boot the glue copies it to its own tmpfs
    # at /run/livemirror, which survives switch_root. dracut strips it unless --nostrip.
    inst_binary "$(livemirror_bin)" /usr/sbin/livemirror
    inst_simple /usr/lib/livemirror/initrd.sh /usr/lib/livemirror/initrd.sh
    [[ -r /etc/livemirror/initrd.conf ]] && inst_simple /etc/livemirror/initrd.conf
    inst_multiple cat cp chmod ln mkdir mount sleep tail tr grep kill awk sed readlink
    inst_multiple -o mountpoint udevadm modprobe losetup umount blkid
    # shellcheck disable=SC2154 # dracut sets moddir
    inst_hook cmdline 95 "$moddir/parse-livemirror.sh"
    inst_hook pre-mount 50 "$moddir/livemirror-pre-mount.sh"
    inst_simple "$moddir/livemirror-live.sh" /usr/lib/livemirror/live.sh
    # A CD's label only shows in /dev/disk/by-label once cdrom_id has looked at the medium.
    inst_rules 60-cdrom_id.rules
    if dracut_module_included "systemd"; then
        # shellcheck disable=SC2154 # dracut sets systemdutildir
        inst_script "$moddir/livemirror-generator.sh" "$systemdutildir"/system-generators/dracut-livemirror-generator
    fi
    # Before 90dm's dm-shutdown (25): the snapshot cannot go while the daemon holds it.
    inst_hook shutdown 10 "$moddir/livemirror-shutdown.sh"
}
