# shellcheck shell=sh disable=SC2034 # (it shares variables with livemirror-install)
# install-release.sh: step 8 of livemirror-install, taking apart what the system ran from before
# detach-source. Installed as /usr/lib/livemirror/install-release.sh; sourced by
# livemirror-install (never run).
#
# release_source SRC looks at what the daemon's source was and releases it by kind:
#   - a device-mapper or loop device: the live medium's stack, taken apart from the top down
#     (release_dev below): dracut's dmsquash-live and stacks built like it;
#   - a regular file: livemirror's own live stack (rd.livemirror.overlay): the image the daemon
#     served read-only, on the live medium's squashfs (a read-only loop device over a file on
#     the CD); its overlay went with detach-source (release_image_source below);
#   - a partition or disk (moving an installed system's root): nothing to take apart; the old
#     device is closed and may be removed.
# The daemon's `status --get source` names the source; nothing here assumes a device name.
# What dracut's dmsquash-live leaves behind, and how it comes apart:
#   live-rw  = snapshot(loop(rootfs.img), loop(/overlay in RAM))   live-base = linear(loop(rootfs.img))
#   rootfs.img lives in a squashfs (already lazily unmounted) on loop(squashfs.img), which lives
#   on the CD mounted at /run/initramfs/live.
# release_dev DEV: DEV goes, then what it was built from: a dm device is removed and its slaves
# released; a loop device is detached once no other dm device uses it (sibling dm devices
# that nobody holds open, such as live-base, go first), its backing file deleted when it is in
# RAM, the file system that held the file released in turn (through the backing device number,
# which also finds a squashfs that is no longer mounted anywhere), and a mount under /run of
# the medium unmounted.
RELEASED=
EJECT_FOUND=
dm_open() { dmsetup info -c --noheadings -o open "$1" 2>/dev/null | tr -d ' '; }
wait_loop_gone() { # wait_loop_gone K: an auto-cleared loop device is unbound once released
	_w=0
	while [ -n "$(cat "/sys/class/block/$1/loop/backing_file" 2>/dev/null)" ]; do
		_w=$((_w + 1))
		[ $_w -gt 100 ] && return 1
		sleep 0.1 2>/dev/null || sleep 1
	done
	return 0
}
# (local: the walk recurses, and every level needs its own variables afterwards; dash, bash,
# busybox and mksh all have it)
# shellcheck disable=SC3043
release_dev() {
	local _dev _depth _k _name _deps _d _h _file _back _mnt _mdev _fs
	_dev=$1
	_depth=${2:-0}
	[ "$_depth" -lt 8 ] || return 0
	[ -b "$_dev" ] || return 0
	_k=$(kname "$_dev")
	[ -n "$_k" ] || return 0 # (a dm device removed earlier in the walk)
	case $_k in
	dm-*)
		_name=$(cat "/sys/class/block/$_k/dm/name")
		_deps=$(ls "/sys/class/block/$_k/slaves" 2>/dev/null)
		if [ -n "$(ls "/sys/class/block/$_k/holders" 2>/dev/null)" ] || [ "$(dm_open "$_name")" != 0 ]; then
			did "kept /dev/mapper/$_name: still in use"
			return 0
		fi
		if ! dmsetup remove --retry "$_name" >/dev/null 2>&1; then
			did "could not remove /dev/mapper/$_name (still open?)"
			return 0
		fi
		did "removed /dev/mapper/$_name"
		RELEASED="$RELEASED $_name"
		for _d in $_deps; do release_dev "/dev/$_d" $((_depth + 1)); done
		;;
	loop*)
		[ -d "/sys/class/block/$_k/loop" ] || return 0 # (detached earlier in the walk)
		for _h in /sys/class/block/"$_k"/holders/dm-*; do
			[ -e "$_h" ] && release_dev "/dev/$(basename "$_h")" $((_depth + 1))
		done
		# (releasing a holder may have released this device too, further down the walk)
		[ -n "$(cat "/sys/class/block/$_k/loop/backing_file" 2>/dev/null)" ] || return 0
		if [ -n "$(ls "/sys/class/block/$_k/holders" 2>/dev/null)" ] || grep -q "^/dev/$_k " /proc/mounts; then
			did "kept /dev/$_k (still in use)"
			return 0
		fi
		_file=$(cat "/sys/class/block/$_k/loop/backing_file" 2>/dev/null)
		_back=$(losetup -n -O BACK-MAJ:MIN "/dev/$_k" 2>/dev/null | tr -d ' ')
		# (a file on a mounted file system: where it is, before the loop lets go of it)
		_mnt='' _mdev='' _fs=''
		case $_file in "" | *" (deleted)") ;; *)
			if [ -e "$_file" ]; then
				_fs=$(stat -f -c %T "$_file" 2>/dev/null)
				_mnt=$(df -P "$_file" 2>/dev/null | awk 'NR == 2 {print $6}')
				_mdev=$(df -P "$_file" 2>/dev/null | awk 'NR == 2 {print $1}')
			fi ;;
		esac
		if ! losetup -d "/dev/$_k" 2>/dev/null; then
			did "could not detach /dev/$_k"
			return 0
		fi
		wait_loop_gone "$_k" || did "/dev/$_k is still bound (it detaches once its last user closes it)"
		did "detached /dev/$_k (${_file:-no backing file})"
		RELEASED="$RELEASED $_k"
		case $_file in *" (deleted)")
			did "its backing file was already deleted: the kernel frees it now" ;;
		esac
		if [ "$_fs" = tmpfs ] || [ "$_fs" = ramfs ]; then
			if [ -n "$KEEP_OVERLAY" ]; then
				did "kept $_file in RAM (--keep-overlay)"
			elif rm -f "$_file"; then
				did "deleted $_file (RAM overlay)"
			fi
			return 0
		fi
		if [ -n "$_mnt" ]; then
			case $_mnt in
			/run/?*)
				if umount "$_mnt" 2>/dev/null; then
					did "unmounted $_mnt ($_mdev)"
					case $_mdev in
					/dev/sr* | /dev/cdrom*) EJECT_FOUND=$_mdev ;;
					/dev/*) release_dev "$_mdev" $((_depth + 1)) ;;
					esac
				else
					did "kept $_mnt mounted (busy)"
				fi
				;;
			esac
			return 0
		fi
		# The backing file's file system is mounted nowhere (dmsquash-live lazily unmounts the
		# squashfs that holds rootfs.img): release its device, found by number.
		if [ -n "$_back" ] && [ -e "/sys/dev/block/$_back" ]; then
			release_dev "/dev/$(basename "$(readlink -f "/sys/dev/block/$_back")")" $((_depth + 1))
		fi
		;;
	*)
		did "$_dev is not in use any more (not a dm or loop device: nothing to take apart)"
		;;
	esac
}
# cow_bytes NAME: RAM a dm snapshot's or thin pool's overlay holds now (from dmsetup status).
cow_bytes() {
	dmsetup status "$1" 2>/dev/null | awk '
		$3 == "snapshot" { split($4, a, "/"); print a[1] * 512; exit }
		{ print 0 }'
}

# release_source SRC: takes apart what SRC, the detached source, was built from (see the top of
# this file). Sets RELEASED (what went), EJECT_FOUND (a CD whose mount went) and says what it did.
release_source() {
	_rs_src=$1
	if [ -f "$_rs_src" ]; then
		release_image_source "$_rs_src"
		return 0
	fi
	case $(kname "$_rs_src") in
	dm-* | loop*) release_live_stack "$_rs_src" ;;
	"") skip "nothing to release (the source $_rs_src is gone)" ;;
	*)
		# A disk or partition: the system was moved off an installed disk.
		did "$_rs_src is closed: nothing runs from it any more; the disk can be removed"
		did "note: it still holds the old copy, with the same file-system UUID as the new one: take it out, or wipe it (wipefs -a $_rs_src), before a boot that sees both"
		RELEASED=$_rs_src
		;;
	esac
}

# release_image_source FILE: the file system holding FILE is unmounted when the live medium
# mounted it under /run (the squashfs on /run/initramfs/squashfs), and what it was mounted from
# is released in turn (release_dev: its loop device, the CD's mount, the CD to eject).
release_image_source() {
	_ri_mnt=$(df -P "$1" 2>/dev/null | awk 'NR == 2 {print $6}')
	_ri_dev=$(df -P "$1" 2>/dev/null | awk 'NR == 2 {print $1}')
	case $_ri_mnt in
	/run/?*) ;;
	*)
		did "kept $1's file system ${_ri_mnt:-?} mounted: not one the live medium mounted under /run"
		RELEASED=$1
		return 0
		;;
	esac
	if ! umount "$_ri_mnt" 2>/dev/null; then
		did "kept $_ri_mnt mounted (busy: $(fuser -m "$_ri_mnt" 2>/dev/null | tr -s ' ' || true))"
		RELEASED=$1
		return 0
	fi
	did "unmounted $_ri_mnt ($_ri_dev), which held the image livemirror served ($1)"
	RELEASED="$RELEASED $_ri_mnt"
	case $_ri_dev in
	/dev/sr* | /dev/cdrom*) EJECT_FOUND=$_ri_dev ;;
	/dev/*) release_dev "$_ri_dev" ;;
	esac
	# The overlay's own tmpfs (livemirror.overlay=ram), empty since detach-source deleted the file.
	if [ -d /run/livemirror/ram ] && [ -z "$(ls -A /run/livemirror/ram 2>/dev/null)" ] && umount /run/livemirror/ram 2>/dev/null; then
		did "unmounted the overlay's tmpfs /run/livemirror/ram"
	fi
	# (the glue's link to the medium, which nothing reads once the medium is unmounted)
	grep -q ' /run/initramfs/live ' /proc/mounts || rm -f /run/initramfs/livedev
	return 0
}

# mem_came_back WHAT: says WHAT and how much MemAvailable grew since M0 (KiB), once the kernel has
# freed the pages that went (it frees them as the last references go: give it a moment).
mem_came_back() {
	_mc1=$(mem_avail)
	_mci=0
	while [ $_mci -lt 20 ]; do
		sleep 0.5 2>/dev/null || sleep 1
		_mc2=$(mem_avail)
		[ $((_mc2 - _mc1)) -lt 256 ] && break
		_mc1=$_mc2
		_mci=$((_mci + 1))
	done
	did "$1; MemAvailable: $((M0 / 1024)) MiB -> $((_mc1 / 1024)) MiB ($(((_mc1 - M0) / 1024)) MiB came back)"
}

# release_live_stack SRC: a dm snapshot and the loop devices, file systems and RAM under it.
release_live_stack() {
	case $(kname "$1") in
	dm-*) COW=$(cow_bytes "$(cat "/sys/class/block/$(kname "$1")/dm/name")") ;;
	*) COW=0 ;;
	esac
	[ "${COW:-0}" -gt 0 ] && did "the RAM overlay holds $(mib "$COW") of writes"
	M0=$(mem_avail)
	release_dev "$1"
	[ -n "$RELEASED" ] || die "could not release $1 (see above)"
	# dmsquash-live's /dev/live-base link pointed at the released base loop device.
	[ -L /dev/live-base ] && [ ! -e /dev/live-base ] && rm -f /dev/live-base
	mem_came_back "released the live medium's stack"
}

# eject_medium: ejects the CD the release unmounted (--eject-device: the one named).
eject_medium() {
	[ "$EJECT" = dev ] || { [ "$EJECT" = auto ] && [ -n "$EJECT_FOUND" ]; } || return 0
	D=${EJECT_DEV:-$EJECT_FOUND}
	if [ ! -b "$D" ]; then
		did "no $D to eject"
	elif grep -q "^$D " /proc/mounts; then
		did "not ejecting $D: it is still mounted"
	elif ! command -v eject >/dev/null 2>&1; then
		did "cannot eject $D: no eject command (take the medium out yourself)"
	elif eject "$D" 2>/dev/null; then
		did "ejected $D"
	else
		did "could not eject $D (take the medium out yourself)"
	fi
}
