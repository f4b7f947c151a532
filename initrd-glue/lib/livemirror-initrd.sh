# shellcheck shell=sh
# shellcheck disable=SC2034 # a library: the scripts that source it read the LM_* it sets
# livemirror-initrd.sh: the part of the initrd glue that initramfs-tools and dracut share.
#
# Installed as /usr/lib/livemirror/initrd.sh on the system and copied from there into the
# initramfs. It is sourced (never run) by:
#   - the initramfs-tools boot scripts (local-top/livemirror, init-bottom/livemirror),
#   - the dracut module's hooks (90livemirror),
#   - the shutdown program /run/initramfs/shutdown (initramfs-tools systems).
# Plain POSIX sh: it runs under busybox ash, klibc sh, dash and bash.
#
# Settings, later ones win:
#   1. defaults below;
#   2. /etc/livemirror/initrd.conf (shell variables, copied into the initramfs when it is built):
#        LIVEMIRROR_ENABLE=1  LIVEMIRROR_SOURCE=...  LIVEMIRROR_KERNEL=...  LIVEMIRROR_NBD=...
#        LIVEMIRROR_STATE=...  LIVEMIRROR_ARGS="..."  LIVEMIRROR_WAIT=...  LIVEMIRROR_LOG=...
#        LIVEMIRROR_OVERLAY=...  LIVEMIRROR_OVERLAY_LIMIT=...
#   3. the kernel command line:
#        rd.livemirror[=0|1]          turn the glue on (off by default)
#        livemirror.source=DEV        the live system's read-write device (/dev/mapper/live-rw)
#        livemirror.kernel=auto|ublk|nbd  the kernel device of the root (auto): ublk, the kernel's
#                                     ublk driver (/dev/ublkbN; Linux 6.5+, module ublk_drv), or
#                                     the kernel NBD client; auto takes ublk where the driver loads
#        livemirror.nbd=/dev/nbdN     the kernel NBD device that becomes the root (/dev/nbd0)
#        livemirror.state=PATH|none   crash-resume state file (/run/livemirror/state)
#        livemirror.args=A,B,...      extra `livemirror serve` arguments, comma separated
#        livemirror.wait=SECS         how long to wait for the source device (60)
#        livemirror.log=PATH          the daemon's log (/run/livemirror/log)
#        rd.livemirror.overlay        dracut: serve the live medium's image (root=live:...) with
#                                     livemirror's own overlay in RAM, without device-mapper
#        livemirror.overlay=PATH|ram|none  serve livemirror.source read-only with its writes in a
#                                     copy-on-write overlay file (ram: /run/livemirror/ram/overlay)
#        livemirror.overlay-limit=SIZE|N%  the most the overlay may hold (50% of the RAM)

# /run/livemirror (a directory on /run, which moves into the real root and is never unmounted)
# holds pid, nbd (the kernel device the root is on: /dev/nbdN or /dev/ublkbN), kernel (nbd or
# ublk), source, cmdline, log, state and the sockets; the binary runs from
# /run/livemirror/bin, a small tmpfs of its own (the initramfs mounts /run noexec).
LM_RUN=/run/livemirror
LM_BIN_DIR=$LM_RUN/bin
# livemirror.overlay=ram: the overlay file, on a tmpfs of its own (lm_start says why).
LM_RAM_DIR=$LM_RUN/ram
LM_CONTROL=$LM_RUN/control.sock
LM_SOCKET=$LM_RUN/nbd.sock

lm_say() { echo "livemirror: $*" >&2; }

# lm_cmdline KEY: prints the value of the last KEY=VALUE on the kernel command line ("1" for a
# bare KEY); returns 1 when KEY is not there.
lm_cmdline() {
	_lm_found=1
	_lm_val=
	# shellcheck disable=SC2013
	for _lm_a in $(cat /proc/cmdline 2>/dev/null); do
		case $_lm_a in
		"$1="*) _lm_val=${_lm_a#*=}; _lm_found=0 ;;
		"$1") _lm_val=1; _lm_found=0 ;;
		esac
	done
	[ "$_lm_found" = 0 ] && echo "$_lm_val"
	return "$_lm_found"
}

lm_true() {
	case $1 in 1 | y | yes | on | true) return 0 ;; *) return 1 ;; esac
}

# lm_config: reads the settings into LM_ENABLE LM_SOURCE LM_KERNEL LM_NBD LM_STATE LM_ARGS LM_WAIT
# LM_LOG LM_LIVE LM_OVERLAY LM_OVERLAY_LIMIT.
lm_config() {
	LIVEMIRROR_ENABLE=0
	LIVEMIRROR_SOURCE=/dev/mapper/live-rw
	LIVEMIRROR_KERNEL=auto
	LIVEMIRROR_NBD=/dev/nbd0
	LIVEMIRROR_STATE=$LM_RUN/state
	LIVEMIRROR_ARGS=
	LIVEMIRROR_WAIT=60
	LIVEMIRROR_LOG=$LM_RUN/log
	LIVEMIRROR_OVERLAY=
	LIVEMIRROR_OVERLAY_LIMIT=50%
	# shellcheck disable=SC1091
	[ -r /etc/livemirror/initrd.conf ] && . /etc/livemirror/initrd.conf
	LM_ENABLE=$(lm_cmdline rd.livemirror) || LM_ENABLE=$LIVEMIRROR_ENABLE
	LM_SOURCE=$(lm_cmdline livemirror.source) || LM_SOURCE=$LIVEMIRROR_SOURCE
	LM_KERNEL=$(lm_cmdline livemirror.kernel) || LM_KERNEL=$LIVEMIRROR_KERNEL
	LM_NBD=$(lm_cmdline livemirror.nbd) || LM_NBD=$LIVEMIRROR_NBD
	LM_STATE=$(lm_cmdline livemirror.state) || LM_STATE=$LIVEMIRROR_STATE
	if _lm_args=$(lm_cmdline livemirror.args); then
		LM_ARGS=$(echo "$_lm_args" | tr ',' ' ')
	else
		LM_ARGS=$LIVEMIRROR_ARGS
	fi
	LM_WAIT=$(lm_cmdline livemirror.wait) || LM_WAIT=$LIVEMIRROR_WAIT
	LM_LOG=$(lm_cmdline livemirror.log) || LM_LOG=$LIVEMIRROR_LOG
	# The live medium mode (dracut): the medium's image, an overlay in RAM, no device-mapper.
	LM_LIVE=$(lm_cmdline rd.livemirror.overlay) || LM_LIVE=0
	lm_true "$LM_LIVE" || LM_LIVE=0
	LM_OVERLAY=$(lm_cmdline livemirror.overlay) || LM_OVERLAY=$LIVEMIRROR_OVERLAY
	[ "$LM_LIVE" = 0 ] || [ -n "$LM_OVERLAY" ] || LM_OVERLAY=ram
	case $LM_OVERLAY in
	ram | 1 | y | yes | on | true) LM_OVERLAY=$LM_RAM_DIR/overlay ;;
	none | 0 | n | no | off | false) LM_OVERLAY= ;;
	esac
	LM_OVERLAY_LIMIT=$(lm_cmdline livemirror.overlay-limit) || LM_OVERLAY_LIMIT=$LIVEMIRROR_OVERLAY_LIMIT
	case $LM_NBD in
	/dev/nbd[0-9]*) ;;
	*) lm_say "livemirror.nbd=$LM_NBD is not a /dev/nbdN device; using /dev/nbd0"; LM_NBD=/dev/nbd0 ;;
	esac
	case $LM_STATE in none | "") LM_STATE= ;; esac
	case $LM_KERNEL in
	auto | ublk | nbd) ;;
	*) lm_say "livemirror.kernel=$LM_KERNEL is not auto, ublk or nbd; using auto"; LM_KERNEL=auto ;;
	esac
}

# lm_door: which kernel device serves the root: prints ublk or nbd. ublk needs the driver's control
# device (the module is loaded first if it is there); asked for explicitly and missing, it fails
# (returns 1) rather than falling back.
lm_door() {
	if [ "$LM_KERNEL" != nbd ] && [ ! -e /dev/ublk-control ]; then
		modprobe ublk_drv 2>/dev/null || true
		[ -e /dev/ublk-control ] || lm_wait_block /dev/ublk-control 2 2>/dev/null || true
	fi
	case $LM_KERNEL in
	nbd) echo nbd ;;
	ublk)
		[ -e /dev/ublk-control ] || { lm_say "livemirror.kernel=ublk, but this kernel has no ublk driver (no /dev/ublk-control; the module ublk_drv needs Linux 6.5 or later)"; return 1; }
		echo ublk ;;
	*) if [ -e /dev/ublk-control ]; then echo ublk; else echo nbd; fi ;;
	esac
}

lm_enabled() { lm_true "$LM_ENABLE"; }

# lm_live: the live medium mode (rd.livemirror.overlay) is asked for.
lm_live() { [ "$LM_LIVE" != 0 ]; }

# lm_overlay_limit: --overlay-limit's value: SIZE as given, N% of the RAM in bytes.
lm_overlay_limit() {
	case $LM_OVERLAY_LIMIT in
	"" | none) ;;
	*%)
		_lm_kib=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo 2>/dev/null)
		echo $((${_lm_kib:-0} * 1024 * ${LM_OVERLAY_LIMIT%\%} / 100))
		;;
	*) echo "$LM_OVERLAY_LIMIT" ;;
	esac
}

# Is PATH a mount point? (busybox and util-linux have mountpoint; klibc does not)
lm_is_mounted() {
	if command -v mountpoint >/dev/null 2>&1; then
		mountpoint -q "$1"
	else
		grep -q " $1 " /proc/mounts
	fi
}

lm_uptime() { read -r _lm_up _ </proc/uptime; echo "${_lm_up%.*}"; }

# lm_wait_block DEV SECS: waits until DEV is a block (or character) device (or, as the read-only
# image under an overlay, a regular file); returns 1 after SECS seconds.
lm_wait_block() {
	_lm_end=$(($(lm_uptime) + $2))
	while [ ! -b "$1" ] && [ ! -c "$1" ] && { [ -z "${LM_OVERLAY:-}" ] || [ ! -f "$1" ]; }; do
		[ "$(lm_uptime)" -ge "$_lm_end" ] && return 1
		if command -v udevadm >/dev/null 2>&1; then
			udevadm settle --timeout=1 --exit-if-exists="$1" 2>/dev/null || sleep 1
		else
			sleep 1
		fi
	done
}

lm_nbd_sysfs() { echo "/sys/block/${1#/dev/}"; }

# lm_start BIN: starts the root storage daemon serving $LM_SOURCE on the kernel device lm_door
# chose and waits until that device has its size; sets LM_NBD to it (/dev/nbdN, or the
# /dev/ublkbN the daemon made). The daemon runs from a copy of BIN in /run/livemirror/bin, a
# tmpfs of its own: the initramfs is emptied by switch_root, the root it serves must not hold its
# code, and the initramfs mounts /run noexec. /run moves into the real root with what is mounted
# below.
lm_start() {
	_lm_bin=$1
	LM_DOOR=$(lm_door) || return 1
	if [ "$LM_DOOR" = nbd ]; then
		_lm_sys=$(lm_nbd_sysfs "$LM_NBD")
		if [ ! -e "$_lm_sys" ]; then
			modprobe nbd 2>/dev/null || true
			lm_wait_block "$LM_NBD" 10 || { lm_say "no $LM_NBD (is the nbd module in the initramfs?)"; return 1; }
		fi
		if [ -e "$_lm_sys/pid" ] || [ "$(cat "$_lm_sys/size" 2>/dev/null)" != 0 ]; then
			lm_say "$LM_NBD is already connected; not starting another daemon"
			return 1
		fi
		_lm_door_args="--nbd-device $LM_NBD"
	else
		_lm_door_args="--ublk-device auto"
	fi
	mkdir -p "$LM_BIN_DIR"
	chmod 0700 "$LM_RUN"
	if ! lm_is_mounted "$LM_BIN_DIR"; then
		mount -t tmpfs -o mode=0755,nosuid,nodev,size=64m livemirror-bin "$LM_BIN_DIR" ||
			{ lm_say "cannot mount a tmpfs on $LM_BIN_DIR"; return 1; }
	fi
	cp "$_lm_bin" "$LM_BIN_DIR/livemirror" || { lm_say "cannot copy $_lm_bin to $LM_BIN_DIR"; return 1; }
	chmod 0755 "$LM_BIN_DIR/livemirror"
	# argv[0] "@livemirror": a root storage daemon (locked memory, supervised restarts, spared by
	# systemd's killing sprees). A shell passes the name it looked up in PATH as argv[0].
	ln -sf livemirror "$LM_BIN_DIR/@livemirror"
	echo "$LM_DOOR" >"$LM_RUN/kernel"
	echo "$LM_SOURCE" >"$LM_RUN/source"
	_lm_limit=
	[ -z "$LM_OVERLAY" ] || _lm_limit=$(lm_overlay_limit)
	if [ "${LM_OVERLAY%/*}" = "$LM_RAM_DIR" ] && ! lm_is_mounted "$LM_RAM_DIR"; then
		# The overlay in RAM gets a tmpfs of its own, as large as the RAM (a tmpfs takes memory
		# only for what it holds): /run is a fifth of the RAM, shared with the whole system,
		# and an overlay that filled it would fail below --overlay-limit and starve systemd.
		mkdir -p "$LM_RAM_DIR"
		_lm_kib=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo 2>/dev/null)
		mount -t tmpfs -o "mode=0700,nosuid,nodev,noexec,size=${_lm_kib:-1048576}k" livemirror-overlay "$LM_RAM_DIR" ||
			{ lm_say "cannot mount a tmpfs on $LM_RAM_DIR for the overlay"; return 1; }
	fi
	# shellcheck disable=SC2086
	set -- serve --source "$LM_SOURCE" $_lm_door_args --control "$LM_CONTROL" \
		--listen "unix:$LM_SOCKET" ${LM_STATE:+--state "$LM_STATE"} \
		${LM_OVERLAY:+--overlay "$LM_OVERLAY"} ${_lm_limit:+--overlay-limit "$_lm_limit"} $LM_ARGS
	echo "@livemirror $*" >"$LM_RUN/cmdline"
	lm_say "starting @livemirror $*"
	(
		cd / || exit 1
		PATH=$LM_BIN_DIR:$PATH
		exec @livemirror "$@" </dev/null >>"$LM_LOG" 2>&1
	) &
	_lm_pid=$!
	echo "$_lm_pid" >"$LM_RUN/pid"
	# sysvinit's sendsigs spares the pids listed here at shutdown (systemd ignores the file).
	if [ -d /run/sendsigs.omit.d ] || mkdir -p /run/sendsigs.omit.d 2>/dev/null; then
		echo "$_lm_pid" >/run/sendsigs.omit.d/livemirror
	fi
	_lm_end=$(($(lm_uptime) + ${LM_READY:-60}))
	while :; do
		if ! kill -0 "$_lm_pid" 2>/dev/null; then
			lm_say "the daemon exited at start; its log ($LM_LOG):"
			tail -n 20 "$LM_LOG" >&2
			return 1
		fi
		if [ "$LM_DOOR" = ublk ]; then
			# The daemon names the device it made (or took over).
			_lm_k=$("$LM_BIN_DIR/livemirror" status --get kernel_device --control "$LM_CONTROL" 2>/dev/null) &&
				[ -b "$_lm_k" ] && LM_NBD=$_lm_k && _lm_sys=$(lm_nbd_sysfs "$LM_NBD")
		fi
		if [ -n "${_lm_sys:-}" ] && [ "$(cat "$_lm_sys/size" 2>/dev/null || echo 0)" != 0 ] &&
			"$LM_BIN_DIR/livemirror" status --control "$LM_CONTROL" >/dev/null 2>&1; then
			break
		fi
		if [ "$(lm_uptime)" -ge "$_lm_end" ]; then
			lm_say "the daemon is not ready after ${LM_READY:-60} s; its log ($LM_LOG):"
			tail -n 20 "$LM_LOG" >&2
			return 1
		fi
		sleep 0.2 2>/dev/null || sleep 1
	done
	for _lm_c in $(cat "/proc/$_lm_pid/task/$_lm_pid/children" 2>/dev/null); do
		echo "$_lm_c" >>/run/sendsigs.omit.d/livemirror
	done
	echo "$LM_NBD" >"$LM_RUN/nbd"
	lm_say "serving $LM_SOURCE on $LM_NBD ($(($(cat "$_lm_sys/size") / 2048)) MiB), pid $_lm_pid"
}

# lm_pid_alive PID: true while PID runs (a zombie counts as gone: at shutdown the daemon's parent
# is the shutdown program, which may not reap it).
lm_pid_alive() {
	[ -e "/proc/$1/stat" ] || return 1
	read -r _ _ _lm_st _ <"/proc/$1/stat" 2>/dev/null || return 1
	[ "$_lm_st" != Z ]
}

# lm_detach DIR: the shutdown half, once the root file system is unmounted. DIR holds the files
# lm_start wrote (/run/livemirror, or wherever the shutdown code moved /run). NBD: disconnects the
# kernel device, then stops the daemon with SIGTERM (it flushes its devices and persists its
# state) and waits for it. ublk: stops the daemon first (as the root storage daemon it leaves its
# device, with nothing on it any more), then removes the device (livemirror ublk-remove). Returns 1 while the device is still mounted, 2 if it could not stop
# the daemon. The CLI is DIR/bin/livemirror or livemirror in PATH (systemd-shutdown detaches
# the binary's tmpfs before it pivots back into the initramfs).
lm_detach() {
	_lm_dir=$1
	[ -r "$_lm_dir/pid" ] || return 0
	_lm_nbd=$(cat "$_lm_dir/nbd" 2>/dev/null || echo /dev/nbd0)
	_lm_pid=$(cat "$_lm_dir/pid")
	if grep -q "^$_lm_nbd " /proc/mounts; then
		lm_say "$_lm_nbd is still mounted; not detaching yet"
		return 1
	fi
	_lm_cli=$_lm_dir/bin/livemirror
	[ -x "$_lm_cli" ] || _lm_cli=livemirror
	_lm_door=$(cat "$_lm_dir/kernel" 2>/dev/null || echo nbd)
	if [ "$_lm_door" = nbd ] && [ "$(cat "$(lm_nbd_sysfs "$_lm_nbd")/size" 2>/dev/null || echo 0)" != 0 ]; then
		if "$_lm_cli" nbd-disconnect "$_lm_nbd"; then
			lm_say "disconnected $_lm_nbd"
		else
			lm_say "could not disconnect $_lm_nbd (going on)"
		fi
	fi
	if lm_pid_alive "$_lm_pid"; then
		kill -TERM "$_lm_pid" 2>/dev/null
		_lm_i=0
		while lm_pid_alive "$_lm_pid"; do
			_lm_i=$((_lm_i + 1))
			if [ "$_lm_i" -gt 600 ]; then
				lm_say "the daemon (pid $_lm_pid) did not stop within 60 s"
				tail -n 10 "$_lm_dir/log" >&2 2>/dev/null
				return 2
			fi
			sleep 0.1 2>/dev/null || sleep 1
		done
		lm_say "the daemon stopped; last log line: $(tail -n 1 "$_lm_dir/log" 2>/dev/null)"
	fi
	if [ "$_lm_door" = ublk ] && [ -e "$(lm_nbd_sysfs "$_lm_nbd")" ]; then
		if "$_lm_cli" ublk-remove "$_lm_nbd"; then
			lm_say "removed $_lm_nbd"
		else
			lm_say "could not remove $_lm_nbd (going on)"
		fi
	fi
	rm -f "$_lm_dir/pid"
	return 0
}
