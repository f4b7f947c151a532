# shellcheck shell=sh disable=SC2034 # (it shares variables with livemirror-install)
# install-common.sh: what every part of livemirror-install uses: its words on the terminal
# (steps, what was done, why it stopped) and the block-device helpers.
# Installed as /usr/lib/livemirror/install-common.sh; sourced by livemirror-install (never run).
# Plain POSIX sh (dash, bash, busybox ash).

PROG=livemirror-install

say() { echo "$PROG: $*"; }
now() { date +%s; }
T_START=$(now)
T_STEP=$T_START
STEP=
STEP_NAME=
# step N NAME TEXT: a step begins (the previous one ends).
step() {
	step_end
	T_STEP=$(now)
	STEP=$1
	STEP_NAME=$2
	shift 2
	echo
	echo "==> [$STEP/$NSTEPS] $*"
}
step_end() {
	[ -n "$STEP" ] && echo "    (step $STEP took $(($(now) - T_STEP)) s)"
	return 0
}
did() { echo "    $*"; }
HINT=
die() {
	echo "$PROG: FAILED${STEP:+ at step $STEP}: $*" >&2
	[ -n "$HINT" ] && echo "$PROG: hint: $HINT" >&2
	exit 1
}
usage_error() {
	echo "$PROG: $*" >&2
	echo "Try '$PROG --help'." >&2
	exit 2
}
# need TOOL WHAT HOWTO: a tool a later step runs must exist now, before anything changes.
need() {
	command -v "$1" >/dev/null 2>&1 || die "$1 is missing ($2); install it, or $3"
}

mib() { echo "$(($1 / 1048576)) MiB"; }
size_of() { blockdev --getsize64 "$1" 2>/dev/null || echo 0; }
sector_size_of() { blockdev --getss "$1" 2>/dev/null || echo 512; }
# devnum DEV: major:minor of a block device node, from ls (stat -c differs between
# implementations).
devnum() {
	# shellcheck disable=SC2012
	ls -lL "$1" 2>/dev/null | awk '{sub(",", "", $5); print $5 ":" $6}'
}
# kname DEV: the kernel name (sda1, nbd0, dm-3) of a block device path; nothing if it is none.
kname() {
	_kn=$(devnum "$1")
	[ -n "$_kn" ] && [ -e "/sys/dev/block/$_kn" ] && basename "$(readlink -f "/sys/dev/block/$_kn")"
	return 0
}
# partitions_of K: the partitions of disk K (kernel names), one a line.
partitions_of() {
	for _p in /sys/class/block/"$1"/"$1"*; do
		[ -e "$_p/partition" ] && basename "$_p"
	done
}
# partition_n K N: the kernel name of partition number N of disk K (nothing if there is none).
partition_n() {
	for _p in /sys/class/block/"$1"/"$1"*; do
		[ -e "$_p/partition" ] && [ "$(cat "$_p/partition")" = "$2" ] && basename "$_p" && return 0
	done
	return 1
}
# disk_of K: the kernel name of the whole disk that partition K is on (K itself for a disk).
disk_of() {
	if [ -e "/sys/class/block/$1/partition" ]; then
		basename "$(dirname "$(readlink -f "/sys/class/block/$1")")"
	else
		echo "$1"
	fi
}
root_source() { awk '$2 == "/" {d = $1} END {print d}' /proc/mounts; }
root_fstype() { awk '$2 == "/" {t = $3} END {print t}' /proc/mounts; }
root_kib() { df -kP / | awk 'NR == 2 {print $2}'; }
mem_avail() { awk '/^MemAvailable:/ {print $2}' /proc/meminfo; }
is_mounted_dev() { grep -q "^$1 " /proc/mounts || grep -q "^$1 " /proc/swaps; }
# mount_source DIR: the device mounted on DIR (the last mount there), nothing if none.
mount_source() { awk -v m="$1" '$2 == m {d = $1} END {print d}' /proc/mounts; }
# blkid_probe DEV: what a low-level probe finds on DEV (file system, RAID, LVM, partition
# table), in words; nothing when it finds nothing.
blkid_probe() {
	blkid -p -o export "$1" 2>/dev/null | awk -F= '
		$1 == "PTTYPE" { o = o (o ? ", " : "") "a " $2 " partition table" }
		$1 == "TYPE" { o = o (o ? ", " : "") "a " $2 " signature" }
		END { print o }'
}
# fs_type DEV: the file system type a low-level probe finds on DEV (nothing if none).
fs_type() { blkid -p -o value -s TYPE "$1" 2>/dev/null; }
fs_uuid() { blkid -p -o value -s UUID "$1" 2>/dev/null; }
# wait_until SECS COMMAND...: polls COMMAND every 0.1 s until it succeeds; 1 after SECS.
wait_until() {
	_wu_n=$(($1 * 10))
	shift
	while ! "$@"; do
		_wu_n=$((_wu_n - 1))
		[ "$_wu_n" -gt 0 ] || return 1
		sleep 0.1 2>/dev/null || sleep 1
	done
	return 0
}
settle() { command -v udevadm >/dev/null 2>&1 && udevadm settle --timeout=10 2>/dev/null; return 0; }
