#!/bin/sh
# livemirror's own live stack for dracut (rd.livemirror.overlay), sourced by the pre-mount hook:
# what dmsquash-live does for a Fedora-style medium, without device-mapper. The medium named by
# root=live:... is mounted read-only on /run/initramfs/live, its LiveOS/squashfs.img (if there is
# one) on /run/initramfs/squashfs, and the file-system image inside (LiveOS/rootfs.img, or
# ext3fs.img) becomes the daemon's source; the daemon keeps the writes in its own overlay in RAM.
# Same places as dmsquash-live's, so livemirror-install releases either stack the same way.

# lm_live_device ROOT: the device a root=live:... option names (nothing if it names none).
lm_live_device() {
	_lm_r=${1#live:}
	case $_lm_r in
	CDLABEL=* | LABEL=*) echo "/dev/disk/by-label/$(echo "${_lm_r#*LABEL=}" | sed 's,/,\\x2f,g;s, ,\\x20,g')" ;;
	UUID=*) echo "/dev/disk/by-uuid/${_lm_r#UUID=}" ;;
	PARTUUID=*) echo "/dev/disk/by-partuuid/${_lm_r#PARTUUID=}" ;;
	PARTLABEL=*) echo "/dev/disk/by-partlabel/${_lm_r#PARTLABEL=}" ;;
	/dev/*) echo "$_lm_r" ;;
	esac
}

# lm_live_mount: mounts the medium and its squashfs; sets LM_SOURCE to the image inside.
lm_live_mount() {
	_lm_dev=$(lm_live_device "$(getarg root=)")
	[ -n "$_lm_dev" ] || { warn "livemirror: rd.livemirror.overlay needs root=live:CDLABEL=... (or LABEL=, UUID=, /dev/...)"; return 1; }
	lm_wait_block "$_lm_dev" "$LM_WAIT" || { warn "livemirror: the live medium $_lm_dev did not appear within $LM_WAIT s"; return 1; }
	_lm_dir=$(getarg rd.live.dir) || _lm_dir=LiveOS
	[ -n "$_lm_dir" ] || _lm_dir=LiveOS
	_lm_sq=$(getarg rd.live.squashimg) || _lm_sq=squashfs.img
	[ -n "$_lm_sq" ] || _lm_sq=squashfs.img
	modprobe -q squashfs 2>/dev/null
	modprobe -q loop 2>/dev/null
	mkdir -p /run/initramfs/live
	if ! grep -q " /run/initramfs/live " /proc/mounts; then
		mount -n -o ro "$_lm_dev" /run/initramfs/live ||
			{ warn "livemirror: cannot mount the live medium $_lm_dev"; return 1; }
	fi
	ln -sf "$(readlink -f "$_lm_dev")" /run/initramfs/livedev
	_lm_base=/run/initramfs/live/$_lm_dir
	if [ -f "$_lm_base/$_lm_sq" ]; then
		mkdir -p /run/initramfs/squashfs
		if ! grep -q " /run/initramfs/squashfs " /proc/mounts; then
			# A read-only loop device: the squashfs is only ever read.
			_lm_loop=$(losetup -r -f --show "$_lm_base/$_lm_sq") ||
				{ warn "livemirror: cannot set up a loop device for $_lm_base/$_lm_sq"; return 1; }
			mount -n -t squashfs -o ro "$_lm_loop" /run/initramfs/squashfs ||
				{ warn "livemirror: cannot mount $_lm_base/$_lm_sq"; return 1; }
		fi
		_lm_base=/run/initramfs/squashfs/LiveOS
	fi
	for _lm_img in "$_lm_base/rootfs.img" "$_lm_base/ext3fs.img"; do
		if [ -f "$_lm_img" ]; then
			# shellcheck disable=SC2034 # (read by the hook that sources this file)
			LM_SOURCE=$_lm_img
			return 0
		fi
	done
	warn "livemirror: no LiveOS/rootfs.img on the live medium: its squashfs holds the root tree itself (as on Fedora 41 and later), which livemirror cannot serve as a block device; boot it with rd.live.overlay.overlayfs instead"
	return 1
}
