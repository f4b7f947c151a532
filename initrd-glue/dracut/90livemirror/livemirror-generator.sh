#!/bin/sh
# systemd generator (dracut, livemirror's live stack): with rd.livemirror and rd.livemirror.overlay
# on a root=live:... command line, the root is the kernel device livemirror feeds, which nothing
# else describes (dmsquash-live, whose generator would, is not in this initramfs): write
# sysroot.mount for it. The pre-mount hook starts the daemon before sysroot.mount runs.
type getarg >/dev/null 2>&1 || . /lib/dracut-lib.sh
. /usr/lib/livemirror/initrd.sh
lm_config
lm_enabled && lm_live || exit 0
case $(getarg root=) in live:*) ;; *) exit 0 ;; esac
GENERATOR_DIR=$1
[ -n "$GENERATOR_DIR" ] || exit 1
mkdir -p "$GENERATOR_DIR"
_lm_flags=$(getarg rootflags=)
{
	echo "[Unit]"
	echo "Before=initrd-root-fs.target"
	echo "[Mount]"
	echo "Where=/sysroot"
	echo "What=$LM_NBD"
	[ -n "$_lm_flags" ] && echo "Options=$_lm_flags"
} >"$GENERATOR_DIR/sysroot.mount"
mkdir -p "$GENERATOR_DIR/initrd-root-fs.target.requires"
ln -sf ../sysroot.mount "$GENERATOR_DIR/initrd-root-fs.target.requires/sysroot.mount"
# The device appears when the daemon has connected it, after the medium was found and mounted.
_lm_unit=$(echo "${LM_NBD#/}" | sed 's,/,-,g').device
mkdir -p "$GENERATOR_DIR/$_lm_unit.d"
printf '[Unit]\nJobTimeoutSec=3000\n' >"$GENERATOR_DIR/$_lm_unit.d/timeout.conf"
