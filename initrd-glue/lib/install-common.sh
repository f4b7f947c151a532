# shellcheck shell=sh disable=SC2034 # (it shares variables with livemirror-install)
# install-common.sh: what every part of livemirror-install uses: its words on the terminal
# (steps, what was done, why it stopped) and the block-device helpers.
# Installed as /usr/lib/livemirror/install-common.sh; sourced by livemirror-install (never run).
# Plain POSIX sh (dash, bash, busybox ash).

PROG=livemirror-install

# With --json (JSON=1), fd 3 carries the JSON stream (the script's stdout) and everything a
# human reads goes to stderr. Each JSON line is made by `livemirror generate json`, which escapes
# the text (a reason or a device name may hold anything).
JSON=
# emit PAIR...: one JSON line (KEY=TEXT, KEY:=JSON); nothing without --json.
emit() {
	[ -n "$JSON" ] || return 0
	if ! "$LM" generate json "$@" >&3; then
		JSON=
		die "$LM generate json could not write the JSON stream"
	fi
}
# jv KEY VALUE: a pair for emit: KEY=VALUE, or KEY:=null when VALUE is empty.
jv() { if [ -n "$2" ]; then printf '%s=%s' "$1" "$2"; else printf '%s:=null' "$1"; fi; }
# jn KEY VALUE: a number pair for emit (KEY:=null when VALUE is not a number).
jn() {
	case $2 in [0-9]* | -[0-9]*) printf '%s:=%s' "$1" "$2" ;; *) printf '%s:=null' "$1" ;; esac
}

say() { echo "$PROG: $*"; }
now() { date +%s; }
T_START=$(now)
T_STEP=$T_START
STEP=
STEP_NAME=
STEP_STATUS=
STEP_REASON=
# step N NAME TEXT: a step begins (the previous one ends). NAME is the step's stable name in
# the JSON stream, TEXT its heading.
step() {
	step_end
	T_STEP=$(now)
	STEP=$1
	STEP_NAME=$2
	STEP_STATUS=ok
	STEP_REASON=
	shift 2
	echo
	echo "==> [$STEP/$NSTEPS] $*"
	emit event=step "step:=$STEP" "name=$STEP_NAME" status=started "title=$*"
}
# step_end: the current step ends (ok, or skipped).
step_end() {
	[ -n "$STEP" ] || return 0
	echo "    (step $STEP took $(($(now) - T_STEP)) s)"
	emit event=step "step:=$STEP" "name=$STEP_NAME" "status=$STEP_STATUS" "seconds:=$(($(now) - T_STEP))" \
		${STEP_REASON:+"reason=$STEP_REASON"}
	_R_LAST=$STEP
	STEP=
}
# did TEXT: what the step did, for a human (a "message" in the JSON stream).
did() {
	echo "    $*"
	emit event=message "step:=${STEP:-0}" "name=${STEP_NAME:-}" "text=$*"
}
# skip TEXT: the step has nothing to do (TEXT says why).
skip() {
	did "$*"
	STEP_STATUS=skipped
	STEP_REASON=$*
}
HINT=
# die REASON: the current step fails; the run ends with exit status 1.
die() {
	echo "$PROG: FAILED${STEP:+ at step $STEP}: $*" >&2
	[ -n "$HINT" ] && echo "$PROG: hint: $HINT" >&2
	if [ -n "$JSON" ]; then
		[ -n "$STEP" ] && emit event=step "step:=$STEP" "name=$STEP_NAME" status=error "seconds:=$(($(now) - T_STEP))" "reason=$*" \
			${HINT:+"hint=$HINT"}
		result error 1 "$*"
	fi
	exit 1
}
# result STATUS CODE [REASON]: the last line of the JSON stream: how it ended and what the
# disk now holds (fields that do not apply, or are not known yet, are null).
result() {
	[ -n "$JSON" ] || return 0
	_r_pt=
	[ -n "${DISK:-}" ] && [ -b "${DISK:-}" ] && _r_pt=$(sfdisk -d "$DISK" 2>/dev/null | sed -n 's/^label: //p')
	_r_bytes=
	[ -n "${PART:-}" ] && [ -b "${PART:-}" ] && _r_bytes=$(size_of "$PART")
	_r_last=${STEP:-$_R_LAST}
	emit event=result "status=$1" "exit_code:=$2" ${3:+"reason=$3"} "$(jn last_step "$_r_last")" \
		"$(jv target "${TARGET:-}")" "$(jv disk "${DISK:-}")" "$(jv root "${PART:-}")" "$(jn root_bytes "$_r_bytes")" \
		"$(jv root_uuid "${UUID:-}")" "$(jv partition_table "$_r_pt")" "$(jv firmware "${FIRMWARE_DONE:-}")" \
		"$(jv esp "${ESP_DEV:-}")" "$(jv esp_uuid "${ESP_UUID:-}")" "$(jv bootloader "${LOADER_DONE:-}")" \
		"$(jv initramfs "${GENERATOR_DONE:-}")" "seconds:=$(($(now) - T_START))"
}
_R_LAST=
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
