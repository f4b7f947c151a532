#!/bin/sh
# Installs the livemirror initrd glue into a system (or a chroot / image tree with --root).
# See README.md in this directory. Afterwards, rebuild the initramfs:
#   initramfs-tools: update-initramfs -u -k all      dracut: dracut -f --add livemirror
set -eu

usage() {
	cat <<'EOF'
Usage: install.sh [--root DIR] [--initramfs-tools] [--dracut] [--bin PATH]

Installs, below DIR (default /):
  /usr/lib/livemirror/initrd.sh, /usr/lib/livemirror/shutdown   shared glue code
  /usr/sbin/livemirror-install                                    the rebootless installer
  with --initramfs-tools (the default when DIR has /usr/share/initramfs-tools):
    /etc/initramfs-tools/hooks/livemirror
    /etc/initramfs-tools/scripts/local-top/livemirror
    /etc/initramfs-tools/scripts/init-bottom/livemirror
  with --dracut (the default when DIR has /usr/lib/dracut/modules.d):
    /usr/lib/dracut/modules.d/90livemirror/
  with --bin PATH: PATH as /usr/sbin/livemirror (stripped of debug information if strip is
    available); otherwise the livemirror binary must already be installed there or in
    /usr/local/sbin, /usr/bin, /usr/local/bin, or named in /etc/livemirror/initrd.conf.
EOF
}

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=
ITOOLS=
DRACUT=
BIN=
while [ $# -gt 0 ]; do
	case $1 in
	--root) ROOT=${2%/}; shift ;;
	--initramfs-tools) ITOOLS=1 ;;
	--dracut) DRACUT=1 ;;
	--bin) BIN=$2; shift ;;
	-h | --help) usage; exit 0 ;;
	*) echo "install.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
	esac
	shift
done
if [ -z "$ITOOLS$DRACUT" ]; then
	[ -d "$ROOT/usr/share/initramfs-tools" ] && ITOOLS=1
	[ -d "$ROOT/usr/lib/dracut/modules.d" ] && DRACUT=1
	if [ -z "$ITOOLS$DRACUT" ]; then
		echo "install.sh: neither initramfs-tools nor dracut found under ${ROOT:-/}; say --initramfs-tools or --dracut" >&2
		exit 1
	fi
fi

inst() { # inst MODE SRC DEST
	mkdir -p "$ROOT$(dirname "$3")"
	cp "$2" "$ROOT$3"
	chmod "$1" "$ROOT$3"
	echo "installed $3"
}

inst 0644 "$HERE/lib/livemirror-initrd.sh" /usr/lib/livemirror/initrd.sh
inst 0755 "$HERE/lib/shutdown" /usr/lib/livemirror/shutdown
inst 0755 "$HERE/livemirror-install" /usr/sbin/livemirror-install
if [ -n "$BIN" ]; then
	mkdir -p "$ROOT/usr/sbin"
	if command -v strip >/dev/null 2>&1; then
		strip --strip-debug -o "$ROOT/usr/sbin/livemirror" "$BIN"
	else
		cp "$BIN" "$ROOT/usr/sbin/livemirror"
	fi
	chmod 0755 "$ROOT/usr/sbin/livemirror"
	echo "installed /usr/sbin/livemirror (from $BIN)"
fi
if [ -n "$ITOOLS" ]; then
	inst 0755 "$HERE/initramfs-tools/hooks/livemirror" /etc/initramfs-tools/hooks/livemirror
	inst 0755 "$HERE/initramfs-tools/scripts/local-top/livemirror" /etc/initramfs-tools/scripts/local-top/livemirror
	inst 0755 "$HERE/initramfs-tools/scripts/init-bottom/livemirror" /etc/initramfs-tools/scripts/init-bottom/livemirror
fi
if [ -n "$DRACUT" ]; then
	for f in "$HERE"/dracut/90livemirror/*.sh; do
		inst 0755 "$f" "/usr/lib/dracut/modules.d/90livemirror/$(basename "$f")"
	done
fi
echo "now rebuild the initramfs (update-initramfs -u, or dracut -f --add livemirror) and boot with rd.livemirror"
