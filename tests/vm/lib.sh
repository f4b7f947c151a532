# shellcheck shell=bash
# shellcheck disable=SC2034 # a library: the scripts that source it read the LM_* it sets
# tests/vm/lib.sh — the livemirror VM test rig: functions sourced by the scenario scripts.
#
# A Debian kernel (which has nbd, dm-snapshot, loop) boots under QEMU/TCG with a hand-made
# busybox initramfs; guest scripts print marker lines on the serial console
#   LMTEST OK: ...   LMTEST FAIL: ...   LMTEST NOTE: ...   LMTEST INFO: ...   LMTEST DONE
# and the host judges them. Nothing is installed on the host: the kernel and QEMU come from
# `apt-get download` + `dpkg -x` into a cache dir, so a second run downloads nothing.
#
# Knobs (environment):
#   LIVEMIRROR_VM_CACHE   cache dir (default /var/cache/livemirror-vm, or ~/.cache/livemirror-vm
#                         when that is not writable)
#   LIVEMIRROR_VM_OUT     where a run's images and logs go (default: a fresh /tmp/livemirror-vm.*)
#   LIVEMIRROR_VM_KEEP=1  keep the output dir even when everything passed
#   LIVEMIRROR_VM_REFRESH=1  look up the newest kernel package again instead of the cached one
#   LIVEMIRROR_VM_KFLAVOUR  cloud-amd64 (default; ext4 built in) or amd64
#   LIVEMIRROR_VM_KERNEL  kernel series: 6.1 (default: Debian 12's own, no ublk) or 6.12 (Debian 12's
#                         security suite, linux-image-6.12.*+deb12-*-unsigned: has ublk_drv); a scenario
#                         that needs one sets LM_KSERIES after sourcing this file
#   LIVEMIRROR_VM_SMP, LIVEMIRROR_VM_MEM  guest CPUs (default 2) and MiB (default 768)
#   LIVEMIRROR_VM_VERBOSE=1  stream the whole serial console, not only the marker lines
#
# Everything here is plain bash; functions are prefixed lm_. Scripts must `set -euo pipefail`.

export LC_ALL=C
LM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LM_GUEST=$LM_DIR/guest

if [ -n "${LIVEMIRROR_VM_CACHE:-}" ]; then
  LM_CACHE=$LIVEMIRROR_VM_CACHE
elif mkdir -p /var/cache/livemirror-vm 2>/dev/null && [ -w /var/cache/livemirror-vm ]; then
  LM_CACHE=/var/cache/livemirror-vm
else
  LM_CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/livemirror-vm
fi
LM_SMP=${LIVEMIRROR_VM_SMP:-2}
LM_MEM=${LIVEMIRROR_VM_MEM:-768}
LM_KFLAVOUR=${LIVEMIRROR_VM_KFLAVOUR:-cloud-amd64}
LM_KSERIES=${LIVEMIRROR_VM_KERNEL:-6.1}

# ------------------------------------------------------------------------- logging + timing
lm_now() { local t=${EPOCHREALTIME/./}; echo "${t#0}"; }   # microseconds
LM_T0=${LM_T0:-$(lm_now)}
export LM_T0
lm_secs() { printf '%d.%01d' $(($1 / 1000000)) $((($1 / 100000) % 10)); }
lm_say() { printf '[%6ss] %s\n' "$(lm_secs $(($(lm_now) - LM_T0)))" "$*"; }
lm_die() { lm_say "ERROR: $*" >&2; exit 1; }

LM_TIMINGS=()
lm_phase() { LM_PHASE_NAME=$1; LM_PHASE_START=$(lm_now); lm_say "--- $1"; }
lm_phase_end() {
  local d=$(($(lm_now) - LM_PHASE_START))
  LM_TIMINGS+=("$(printf '%-28s %7ss' "$LM_PHASE_NAME" "$(lm_secs "$d")")")
  lm_say "--- $LM_PHASE_NAME done in $(lm_secs "$d")s"
}
lm_timings() { local t; lm_say "phase timings:"; for t in "${LM_TIMINGS[@]}"; do echo "    $t"; done; }

# Host-side checks use the same words as the guest's marker lines.
LM_OK=0 LM_FAIL=0
lm_ok() { LM_OK=$((LM_OK + 1)); echo "LMTEST OK (host): $*"; }
lm_fail() { LM_FAIL=$((LM_FAIL + 1)); echo "LMTEST FAIL (host): $*"; }
lm_check() { # lm_check "description" command...   (ok iff the command exits 0)
  local what=$1; shift
  if "$@"; then lm_ok "$what"; else lm_fail "$what (command: $*)"; fi
}

# ------------------------------------------------------------------------- host prerequisites
# Tools the rig runs on the host (or copies into the guest). QEMU and the kernel are NOT here:
# they are fetched into the cache. Fails loudly with the apt-get line that fixes it.
LM_HOST_PKGS="busybox-static nbd-client dmsetup e2fsprogs coreutils gzip binutils"
# lm_need CMD:PKG...: every CMD must be on PATH (with /usr/sbin and /sbin); otherwise print
# the apt-get line that installs the missing ones and fail.
lm_need() {
  local missing=() pkgs=() pair cmd pkg
  for pair in "$@"; do
    cmd=${pair%%:*} pkg=${pair#*:}
    if ! PATH=$PATH:/usr/sbin:/sbin command -v "$cmd" >/dev/null 2>&1; then
      missing+=("$cmd"); pkgs+=("$pkg")
    fi
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "livemirror VM rig: missing host tools: ${missing[*]}" >&2
    echo "install them with:" >&2
    echo "  apt-get update && apt-get install -y --no-install-recommends $(printf '%s\n' "${pkgs[@]}" | sort -u | tr '\n' ' ')" >&2
    return 1
  fi
}
lm_check_host() {
  lm_need busybox:busybox-static nbd-client:nbd-client dmsetup:dmsetup mke2fs:e2fsprogs \
          debugfs:e2fsprogs e2fsck:e2fsprogs resize2fs:e2fsprogs timeout:coreutils \
          sha256sum:coreutils truncate:coreutils gzip:gzip ldd:libc-bin strip:binutils \
          apt-get:apt dpkg:dpkg flock:util-linux || return 1
  if [[ "$(busybox cpio --help 2>&1)" != *"-o"* ]]; then
    echo "livemirror VM rig: this busybox cannot create cpio archives; install busybox-static:" >&2
    echo "  apt-get install -y --no-install-recommends busybox-static" >&2
    return 1
  fi
  export PATH=$PATH:/usr/sbin:/sbin
}

# ------------------------------------------------------------------------- package cache
# apt-get download needs package lists. Refresh them only when the package is unknown.
lm_apt_ready() {
  local pkg=$1
  # (no "| grep -q" on a producer anywhere here: under pipefail its SIGPIPE fails the pipeline)
  lm_has_candidate() { [[ "$(apt-cache policy "$1" 2>/dev/null)" == *"Candidate: "[0-9]* ]]; }
  if lm_has_candidate "$pkg"; then return 0; fi
  if [ "$(id -u)" = 0 ]; then
    lm_say "apt: no candidate for $pkg; running apt-get update"
    apt-get update -q >&2 || true
    lm_has_candidate "$pkg" && return 0
  fi
  echo "livemirror VM rig: apt knows no package $pkg; run: apt-get update" >&2
  return 1
}

lm_download() { # lm_download PKG... into $LM_CACHE/debs (one apt-get call for the missing ones)
  local p want=()
  mkdir -p "$LM_CACHE/debs"
  for p in "$@"; do
    compgen -G "$LM_CACHE/debs/${p}_*.deb" >/dev/null || want+=("$p")
  done
  [ ${#want[@]} -gt 0 ] || return 0
  lm_apt_ready "${want[0]}" || return 1
  lm_say "apt-get download ${want[*]}"
  (cd "$LM_CACHE/debs" && apt-get download -q "${want[@]}" 2>&1 | grep -v 'unsandboxed' | grep -E '^(E|Err):' >&2 || true)
  for p in "${want[@]}"; do
    compgen -G "$LM_CACHE/debs/${p}_*.deb" >/dev/null || { echo "livemirror VM rig: apt-get download $p failed" >&2; return 1; }
  done
}
lm_deb() { # newest cached .deb of a package
  local f; f=$(ls -1 "$LM_CACHE/debs/${1}"_*.deb 2>/dev/null | sort -V | tail -1)
  [ -n "$f" ] || { echo "no cached deb for $1" >&2; return 1; }
  echo "$f"
}

lm_installed() { [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == *"ok installed"* ]]; }

lm_lock_cache() { mkdir -p "$LM_CACHE"; exec {LM_LOCKFD}>"$LM_CACHE/.lock"; flock "$LM_LOCKFD"; }
lm_unlock_cache() { [ -n "${LM_LOCKFD:-}" ] && { flock -u "$LM_LOCKFD"; exec {LM_LOCKFD}>&-; LM_LOCKFD=; }; return 0; }

# The 6.12 kernels live in Debian 12's security suite. A machine whose apt sources lack it (a
# fresh CI image may) gets it added, as root, in a file of its own; Debian's archive key signs it.
LM_SECURITY_SOURCES=/etc/apt/sources.list.d/livemirror-vm-bookworm-security.sources
lm_security_suite() {
  if grep -rqs 'bookworm-security' /etc/apt/sources.list /etc/apt/sources.list.d/; then return 0; fi
  [ "$(id -u)" = 0 ] || { echo "livemirror VM rig: apt has no bookworm-security suite (the 6.12 kernel is there); add it as root" >&2; return 1; }
  lm_say "apt: adding Debian 12's security suite ($LM_SECURITY_SOURCES) for the 6.12 kernel"
  printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian-security' 'Suites: bookworm-security' \
    'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' > "$LM_SECURITY_SOURCES"
  apt-get update -q >&2 || true
}

# lm_kernel_package: the versioned linux-image package of series $LM_KSERIES.
#   6.1: the dependency of linux-image-<flavour>; 6.12: the newest linux-image-6.12.N+deb12-<flavour>-unsigned.
lm_kernel_package() {
  local names
  case $LM_KSERIES in
    6.1)
      lm_apt_ready "linux-image-$LM_KFLAVOUR" || return 1
      apt-cache depends "linux-image-$LM_KFLAVOUR" | awk '/Depends: linux-image-/{print $2; exit}' ;;
    6.12)
      lm_security_suite || return 1
      names=$(apt-cache search --names-only "^linux-image-6\.12\.[0-9]+\+deb12-$LM_KFLAVOUR-unsigned\$" | awk '{print $1}')
      if [ -z "$names" ] && [ "$(id -u)" = 0 ]; then
        apt-get update -q >&2 || true
        names=$(apt-cache search --names-only "^linux-image-6\.12\.[0-9]+\+deb12-$LM_KFLAVOUR-unsigned\$" | awk '{print $1}')
      fi
      printf '%s\n' "$names" | sort -V | tail -n 1 ;;
    *) echo "livemirror VM rig: LIVEMIRROR_VM_KERNEL=$LM_KSERIES: expected 6.1 or 6.12" >&2; return 1 ;;
  esac
}

# Kernel of series $LM_KSERIES: its versioned package; dpkg -x; compressed modules (6.12 ships
# .ko.xz) decompressed in the cache, so busybox's depmod and insmod take them; busybox depmod.
# Sets LM_KVER LM_KROOT LM_VMLINUZ LM_MODDIR.
lm_fetch_kernel() {
  local cur=$LM_CACHE/kernel-$LM_KFLAVOUR.current kpkg
  [ "$LM_KSERIES" = 6.1 ] || cur=$LM_CACHE/kernel-$LM_KSERIES-$LM_KFLAVOUR.current
  if [ -z "${LIVEMIRROR_VM_REFRESH:-}" ] && [ -s "$cur" ] && [ -f "$LM_CACHE/kernel/$(cat "$cur")/.complete" ]; then
    LM_KVER=$(cat "$cur")
  else
    [ "$LM_KSERIES" = 6.1 ] || lm_need xz:xz-utils || return 1
    kpkg=$(lm_kernel_package) || return 1
    [ -n "$kpkg" ] || { echo "cannot resolve a $LM_KSERIES linux-image-*-$LM_KFLAVOUR package" >&2; return 1; }
    LM_KVER=${kpkg#linux-image-}
    LM_KVER=${LM_KVER%-unsigned}
    if [ ! -f "$LM_CACHE/kernel/$LM_KVER/.complete" ]; then
      lm_download "$kpkg" || return 1
      rm -rf "$LM_CACHE/kernel/$LM_KVER.tmp"; mkdir -p "$LM_CACHE/kernel/$LM_KVER.tmp"
      dpkg -x "$(lm_deb "$kpkg")" "$LM_CACHE/kernel/$LM_KVER.tmp"
      find "$LM_CACHE/kernel/$LM_KVER.tmp/lib/modules" -name '*.ko.xz' -print0 | xargs -0 -r -n 64 xz -d
      find "$LM_CACHE/kernel/$LM_KVER.tmp/lib/modules" -name '*.ko.zst' -print0 | xargs -0 -r -n 64 zstd -q -d --rm
      # The package ships no modules.dep.
      busybox depmod -b "$LM_CACHE/kernel/$LM_KVER.tmp" "$LM_KVER"
      touch "$LM_CACHE/kernel/$LM_KVER.tmp/.complete"
      rm -rf "$LM_CACHE/kernel/$LM_KVER"; mv "$LM_CACHE/kernel/$LM_KVER.tmp" "$LM_CACHE/kernel/$LM_KVER"
    fi
    echo "$LM_KVER" > "$cur"
  fi
  LM_KROOT=$LM_CACHE/kernel/$LM_KVER
  LM_VMLINUZ=$LM_KROOT/boot/vmlinuz-$LM_KVER
  LM_MODDIR=$LM_KROOT/lib/modules/$LM_KVER
  [ -f "$LM_VMLINUZ" ] && [ -f "$LM_MODDIR/modules.dep" ] || { echo "broken kernel cache $LM_KROOT" >&2; return 1; }
}

# QEMU: Debian 12's qemu-system-x86 must NOT be apt-get installed (it Breaks the machine's
# qemu-utils 10.x and apt would remove it). dpkg -x it, plus every library package it depends
# on that is not installed, into one folder; run it with LD_LIBRARY_PATH. Sets LM_QEMU (array).
lm_fetch_qemu() {
  local root=$LM_CACHE/qemu-root tmp p pkgs missing
  if [ ! -f "$root/.complete" ]; then
    tmp=$root.tmp; rm -rf "$tmp"; mkdir -p "$tmp"
    lm_apt_ready qemu-system-x86 || return 1
    # qemu-system-common holds the TCG accelerator module (accel-tcg-x86_64.so).
    pkgs=(qemu-system-x86 qemu-system-common qemu-system-data seabios)
    for p in $(apt-cache depends qemu-system-x86 | awk '$1 ~ /Depends:$/ && $2 !~ /^</ {print $2}' | sort -u); do
      case $p in qemu-system-common|qemu-system-data|seabios|ipxe-qemu) continue ;; esac
      lm_installed "$p" || pkgs+=("$p")
    done
    lm_download "${pkgs[@]}" || return 1
    for p in "${pkgs[@]}"; do dpkg -x "$(lm_deb "$p")" "$tmp"; done
    # Libraries of those libraries, if any are still missing (a few rounds at most).
    for _ in 1 2 3; do
      missing=$(for b in "$tmp/usr/bin/qemu-system-x86_64" "$tmp/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so"; do
                  LD_LIBRARY_PATH=$tmp/usr/lib/x86_64-linux-gnu:$tmp/lib/x86_64-linux-gnu ldd "$b"; done | awk '/not found/{print $1}' | sort -u)
      [ -z "$missing" ] && break
      local more=()
      for p in "${pkgs[@]}"; do
        for d in $(apt-cache depends "$p" | awk '$1 ~ /Depends:$/ && $2 !~ /^</ {print $2}'); do
          lm_installed "$d" && continue
          [[ " ${pkgs[*]} ${more[*]} " == *" $d "* ]] || more+=("$d")
        done
      done
      [ ${#more[@]} -gt 0 ] || break
      lm_download "${more[@]}" || return 1
      for p in "${more[@]}"; do dpkg -x "$(lm_deb "$p")" "$tmp"; done
      pkgs+=("${more[@]}")
    done
    if [ -n "$missing" ]; then
      echo "livemirror VM rig: qemu-system-x86_64 still lacks: $missing" >&2; return 1
    fi
    touch "$tmp/.complete"; rm -rf "$root"; mv "$tmp" "$root"
  fi
  LM_QEMU=(env "LD_LIBRARY_PATH=$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu"
           "QEMU_MODULE_DIR=$root/usr/lib/x86_64-linux-gnu/qemu"
           "$root/usr/bin/qemu-system-x86_64" -L "$root/usr/share/qemu" -L "$root/usr/share/seabios")
  "${LM_QEMU[@]}" --version >/dev/null 2>&1 || {
    echo "livemirror VM rig: the cached QEMU does not run:" >&2; "${LM_QEMU[@]}" --version >&2; return 1; }
}

# A Debian root for the glue scenario: debootstrap (minbase + systemd, initramfs-tools, busybox,
# dmsetup), trimmed of documentation and apt caches. Cached as $LM_CACHE/rootfs-SUITE; never
# modify it (copy it). Needs root and debootstrap. Sets LM_ROOTFS.
#   LIVEMIRROR_VM_SUITE (default bookworm), LIVEMIRROR_VM_MIRROR (default http://deb.debian.org/debian)
# lm_fetch_rootfs NAME INCLUDE APT_PKGS builds another tree the same way, $LM_CACHE/rootfs-NAME:
# debootstrap --include=INCLUDE, then `apt-get install APT_PKGS` in the chroot (apt chooses
# between alternatives the way a user's apt would, which debootstrap cannot: the kernel's
# "initramfs-tools | linux-initramfs-tool" with dracut).
LM_SUITE=${LIVEMIRROR_VM_SUITE:-bookworm}
LM_ROOTFS_PKGS="systemd-sysv,udev,initramfs-tools,busybox,dmsetup,e2fsprogs,kmod"
# The live tree (live-iso-e2e's medium; benches/guest/live-stack.sh extracts it): debootstrap's
# part, then what apt installs into it. One definition, so both find the same cached tree.
LM_LIVE_INCLUDE="systemd-sysv,udev,busybox,dmsetup,e2fsprogs,kmod,fdisk,eject,dosfstools"
LM_LIVE_APT="dracut dracut-live linux-image-cloud-amd64 grub-pc grub-efi-amd64-bin efibootmgr zstd"
lm_fetch_rootfs() {
  local name=${1:-$LM_SUITE} include=${2:-$LM_ROOTFS_PKGS} aptpkgs=${3:-}
  local dir=$LM_CACHE/rootfs-$name key mirror=${LIVEMIRROR_VM_MIRROR:-http://deb.debian.org/debian} t rc
  key="$LM_SUITE minbase $include"
  [ -n "$aptpkgs" ] && key="$key apt:$aptpkgs"
  LM_ROOTFS=$dir
  if [ -f "$dir.complete" ] && [ "$(cat "$dir.complete")" = "$key" ] && [ -d "$dir" ]; then return 0; fi
  if [ "$(id -u)" != 0 ]; then echo "livemirror VM rig: building the Debian root needs root (debootstrap, chroot)" >&2; return 1; fi
  lm_need debootstrap:debootstrap || return 1
  lm_say "debootstrap $LM_SUITE (minbase + $include${aptpkgs:+, then apt-get install $aptpkgs}) from $mirror into the cache; takes a few minutes"
  t=$(lm_now)
  # (a run killed during the apt step below leaves /proc and /sys mounted in the tree)
  umount -l "$dir.tmp/proc" "$dir.tmp/sys" 2>/dev/null || true
  rm -rf --one-file-system "$dir.tmp" "$dir.complete"
  if ! debootstrap --variant=minbase --include="$include" "$LM_SUITE" "$dir.tmp" "$mirror" > "$LM_CACHE/debootstrap.log" 2>&1; then
    tail -n 20 "$LM_CACHE/debootstrap.log" >&2
    echo "livemirror VM rig: debootstrap failed (log: $LM_CACHE/debootstrap.log)" >&2
    return 1
  fi
  if [ -n "$aptpkgs" ]; then
    # Package scripts (the kernel's, dracut's) want /proc and /sys; both are unmounted again
    # before anything else touches the tree.
    mount -t proc proc "$dir.tmp/proc" && mount -t sysfs sysfs "$dir.tmp/sys" || { umount -l "$dir.tmp/proc" 2>/dev/null; return 1; }
    # shellcheck disable=SC2086
    chroot "$dir.tmp" /usr/bin/env DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin \
      apt-get install -y -q --no-install-recommends $aptpkgs >> "$LM_CACHE/debootstrap.log" 2>&1 && rc=0 || rc=$?
    umount "$dir.tmp/sys"; umount "$dir.tmp/proc"
    if [ "$rc" != 0 ]; then
      tail -n 20 "$LM_CACHE/debootstrap.log" >&2
      echo "livemirror VM rig: apt-get install $aptpkgs in the new root failed (log: $LM_CACHE/debootstrap.log)" >&2
      return 1
    fi
  fi
  rm -rf "$dir.tmp"/usr/share/doc/* "$dir.tmp"/usr/share/man/* "$dir.tmp"/usr/share/info/* \
         "$dir.tmp"/usr/share/locale/* "$dir.tmp"/var/cache/apt/*.bin "$dir.tmp"/var/cache/apt/archives/*.deb \
         "$dir.tmp"/var/lib/apt/lists/* "$dir.tmp"/var/log/*.log
  rm -rf --one-file-system "$dir"; mv "$dir.tmp" "$dir"
  echo "$key" > "$dir.complete"
  lm_say "debootstrap done in $(lm_secs $(($(lm_now) - t)))s: $(du -sm "$dir" | cut -f1) MiB"
}

# All of the above, under the cache lock.
lm_prepare() {
  lm_phase "prepare: host tools, cache ($LM_CACHE)"
  lm_check_host || return 1
  lm_lock_cache
  lm_fetch_kernel || { lm_unlock_cache; return 1; }
  lm_fetch_qemu || { lm_unlock_cache; return 1; }
  lm_unlock_cache
  lm_say "kernel $LM_KVER; $("${LM_QEMU[@]}" --version | head -1)"
  lm_phase_end
}

# ------------------------------------------------------------------------- building images
lm_libs() { # the libraries (and the ELF interpreter) a binary loads, one path a line
  ldd "$1" 2>/dev/null | awk '/=> \//{print $3} /^[ \t]*\/[^ ]+ \(/{print $1}' || true
}

# lm_copy_bin ROOT SRC [DEST]: SRC at ROOT/DEST (default /usr/sbin/NAME) and every library at
# the path ldd names.
lm_copy_bin() {
  local root=$1 src dest l
  src=$(readlink -f "$2"); dest=${3:-/usr/sbin/$(basename "$2")}
  install -D -m755 "$src" "$root$dest"
  for l in $(lm_libs "$src"); do
    [ -e "$root$l" ] || install -D -m755 "$(readlink -f "$l")" "$root$l"
  done
}

# lm_bundle DIR SRC: a self-contained copy: DIR/bin/NAME and DIR/lib/* (loader included), run as
#   DIR/lib/ld-linux-x86-64.so.2 --library-path DIR/lib DIR/bin/NAME ...
# so nothing it maps comes from anywhere but DIR.
lm_bundle() {
  local dir=$1 src l
  src=$(readlink -f "$2")
  install -D -m755 "$src" "$dir/bin/$(basename "$2")"
  mkdir -p "$dir/lib"
  for l in $(lm_libs "$src"); do install -m755 "$(readlink -f "$l")" "$dir/lib/$(basename "$l")"; done
  [ -e "$dir/lib/ld-linux-x86-64.so.2" ] || { echo "lm_bundle: no ld-linux-x86-64.so.2 for $src" >&2; return 1; }
}

# lm_tools_image IMG TOOL...: a read-only disk of programs the guest runs from a disk of their
# own: load generators and peer servers (fio with its libraries is 80 MB, too much for the root
# images, and the load should not be read from the device under test). Each TOOL is a command
# on the host's PATH, bundled with every library it loads (lm_bundle: IMG's /bin and /lib);
# /run-tool runs one with those libraries only: mounted at /tools, `/tools/run-tool fio ARGS`.
# Fails loudly when a TOOL is missing (lm_need TOOL:PACKAGE first for the apt-get line).
lm_tools_image() {
  local img=$1 t p dir mb; shift
  dir=$(dirname "$img")/tools-tree
  rm -rf "$dir"; mkdir -p "$dir"
  for t in "$@"; do
    p=$(PATH=$PATH:/usr/sbin:/sbin command -v "$t") || { echo "lm_tools_image: no $t on this host" >&2; return 1; }
    lm_bundle "$dir" "$p" || return 1
  done
  cat > "$dir/run-tool" <<'EOF2'
#!/bin/sh
# run-tool NAME ARGS...: NAME from this disk, with the libraries beside it and nothing else.
d=${0%/*}; n=$1; shift
exec "$d/lib/ld-linux-x86-64.so.2" --library-path "$d/lib" "$d/bin/$n" "$@"
EOF2
  chmod 755 "$dir/run-tool"
  mb=$(( $(du -sm "$dir" | cut -f1) * 115 / 100 + 16 ))
  lm_ext4 "$dir" "$img" "${mb}M" -L lmtools
  rm -rf "$dir"
}

# lm_busybox ROOT: busybox at /bin/busybox and a symlink per applet in /bin.
lm_busybox() {
  local root=$1 a
  lm_copy_bin "$root" "$(command -v busybox)" /bin/busybox
  for a in $(busybox --list); do
    [ -e "$root/bin/$a" ] || [ -e "$root/sbin/$a" ] || [ -e "$root/usr/sbin/$a" ] || ln -s busybox "$root/bin/$a"
  done
}

# lm_strip SRC DEST: DEST is SRC without debug info (the release build carries debug=1).
lm_strip() {
  if command -v strip >/dev/null 2>&1; then strip --strip-debug -o "$2" "$1"; else cp "$1" "$2"; fi
  chmod 755 "$2"
}

# lm_module_order MOD...: module files (relative to LM_MODDIR) in load order, dependencies
# first; modules built into the kernel are skipped. Fails on an unknown module.
lm_module_order() {
  local m rel
  declare -A LM_SEEN=()
  LM_ORDER=()
  _lm_add_mod() {
    local r=$1 d
    [ -n "${LM_SEEN[$r]:-}" ] && return 0
    LM_SEEN[$r]=1
    for d in $(awk -v m="$r:" '$1==m{for(i=2;i<=NF;i++)print $i}' "$LM_MODDIR/modules.dep"); do _lm_add_mod "$d"; done
    LM_ORDER+=("$r")
  }
  for m in "$@"; do
    # modules.* spell names with - or _ interchangeably; try both.
    local alt=${m//-/_} alt2=${m//_/-}
    if grep -qE "/($m|$alt|$alt2)\.ko\$" "$LM_MODDIR/modules.builtin"; then continue; fi
    rel=$(awk -F: -v a="/$m.ko" -v b="/$alt.ko" -v c="/$alt2.ko" '
      { n=$1; for (i=0;i<3;i++) { s=(i==0?a:(i==1?b:c)); if (length(n)>=length(s) && substr(n,length(n)-length(s)+1)==s) { print n; exit } } }' \
      "$LM_MODDIR/modules.dep")
    [ -n "$rel" ] || { echo "kernel module $m: neither built in nor in modules.dep" >&2; return 1; }
    _lm_add_mod "$rel"
  done
  printf '%s\n' "${LM_ORDER[@]}"
}

# lm_install_modules ROOT MOD...: copy the .ko files to ROOT/lib/modules and write their load
# order to ROOT/etc/modules.order (the guest insmods them in that order).
lm_install_modules() {
  local root=$1 rel order; shift
  order=$(lm_module_order "$@") || return 1
  mkdir -p "$root/lib/modules" "$root/etc"
  : > "$root/etc/modules.order"
  for rel in $order; do
    local f=$LM_MODDIR/$rel
    case $f in
      *.ko) cp "$f" "$root/lib/modules/" ;;
      *.ko.xz) xz -dc "$f" > "$root/lib/modules/$(basename "$f" .xz)"; rel=${rel%.xz} ;;
      *.ko.zst) zstd -qdc "$f" > "$root/lib/modules/$(basename "$f" .zst)"; rel=${rel%.zst} ;;
    esac
    basename "$rel" >> "$root/etc/modules.order"
  done
}

# lm_initramfs ROOT OUT: gzip'd newc cpio of ROOT.
lm_initramfs() {
  (cd "$1" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$2"
}

# lm_ext4 SRC OUT SIZE [extra mke2fs args]: an ext4 image made from a directory (no mount, no
# root needed). 4 KiB blocks; inode tables initialised now so the guest does no lazy init.
lm_ext4() {
  local src=$1 out=$2 size=$3; shift 3
  rm -f "$out"; truncate -s "$size" "$out"   # (an existing file keeps mke2fs quiet)
  mke2fs -q -F -t ext4 -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 -d "$src" "$@" "$out" "$size"
}

# lm_build_live_images OUT BIN VDA_MB VDB_MB: the images of the hand-made live system the
# install and kill scenarios boot: OUT/vda.img (read-only base: busybox, livemirror, dmsetup,
# resize2fs, nbd-client, the guest scripts, /etc/base-marker with $TOKEN), OUT/vdb.img (blank
# target), OUT/initrd1.gz (stage 1: the live stack + @livemirror) and OUT/initrd2.gz (boot 2:
# mounts vda as root). LM_EXTRA_MODULES (e.g. ublk_drv) go into initrd1 too.
lm_build_live_images() {
  local O=$1 bin=$2 vda_mb=$3 vdb_mb=$4 RF R R2 b
  lm_strip "$bin" "$O/livemirror"
  RF=$O/rootfs
  mkdir -p "$RF"/{dev,proc,sys,run,tmp,mnt,etc,sbin,lmtest}
  lm_busybox "$RF"
  lm_copy_bin "$RF" "$O/livemirror" /usr/sbin/livemirror
  for b in dmsetup resize2fs nbd-client; do lm_copy_bin "$RF" "$(command -v $b)"; done
  install -m755 "$LM_GUEST/init.sh" "$RF/sbin/init"
  install -m644 "$LM_GUEST"/{common,stage2,kill-stage2,multiconn-stage2,load,installed}.sh "$RF/lmtest/"
  echo "base-marker $TOKEN" > "$RF/etc/base-marker"
  lm_ext4 "$RF" "$O/vda.img" "${vda_mb}M" -L lmroot
  rm -f "$O/vdb.img"; truncate -s "${vdb_mb}M" "$O/vdb.img"
  # Boot 1 initramfs: busybox (static), nbd-client, dmsetup, livemirror at /usr/sbin with its
  # libraries (stage 1 copies the binary to /run/livemirror), the modules.
  R=$O/initramfs1
  mkdir -p "$R"/{dev,proc,sys,run,tmp,newroot,etc,lmtest}
  lm_busybox "$R"
  for b in nbd-client dmsetup; do lm_copy_bin "$R" "$(command -v $b)"; done
  lm_copy_bin "$R" "$O/livemirror" /usr/sbin/livemirror
  install -m755 "$LM_GUEST/stage1-init.sh" "$R/init"
  install -m644 "$LM_GUEST"/{common,watchdog}.sh "$R/lmtest/"
  # shellcheck disable=SC2086
  lm_install_modules "$R" virtio_pci virtio_blk nbd dm-snapshot loop ext4 ${LM_EXTRA_MODULES:-} || return 1
  lm_initramfs "$R" "$O/initrd1.gz"
  # Boot 2 initramfs: just enough to mount /dev/vda as root.
  R2=$O/initramfs2
  mkdir -p "$R2"/{dev,proc,sys,newroot,etc,lmtest}
  lm_busybox "$R2"
  install -m755 "$LM_GUEST/boot2-init.sh" "$R2/init"
  install -m644 "$LM_GUEST/common.sh" "$R2/lmtest/"
  lm_install_modules "$R2" virtio_pci virtio_blk ext4 || return 1
  lm_initramfs "$R2" "$O/initrd2.gz"
  lm_say "modules: $(tr '\n' ' ' < "$R/etc/modules.order")"
  lm_say "initrd1 $(du -k "$O/initrd1.gz" | cut -f1) KiB, initrd2 $(du -k "$O/initrd2.gz" | cut -f1) KiB, vda ${vda_mb} MiB, vdb ${vdb_mb} MiB"
}

# lm_host_check_files IMG PHASES...: e2fsck -fn IMG must be clean; debugfs extracts /data and
# the host checks the sha256 of every manifest file and of one file of each PHASE (a file that
# started and ended in it), and /etc/base-marker's token. Extracted files go to $LM_OUT/files.
lm_host_check_files() {
  local img=$1 X=$LM_OUT/files p f n; shift
  if e2fsck -fn "$img" > "$LM_OUT/e2fsck.log" 2>&1; then
    lm_ok "e2fsck -fn on $(basename "$img"): clean"
  else
    lm_fail "e2fsck -fn on $(basename "$img") reported problems: $(tail -n 3 "$LM_OUT/e2fsck.log" | tr '\n' ' ')"
  fi
  rm -rf "$X"; mkdir -p "$X"
  debugfs -R "rdump /data $X" "$img" >/dev/null 2>&1 || true
  debugfs -R "cat /etc/base-marker" "$img" 2>/dev/null > "$X/base-marker" || true
  lm_check "base image marker (token $TOKEN) on $(basename "$img")" grep -q "$TOKEN" "$X/base-marker"
  if [ ! -s "$X/data/MANIFEST" ] || [ ! -s "$X/data/PHASES" ]; then
    lm_fail "no /data/MANIFEST or /data/PHASES on $(basename "$img")"; return 0
  fi
  for p in "$@"; do
    f=$(awk -v a="$p" '$2==a && $3==a {print $1; exit}' "$X/data/PHASES")
    if [ -z "$f" ]; then lm_fail "host: no file written entirely in phase $p"; continue; fi
    if [ -f "$X/data/$f" ] && [ "$(sha256sum "$X/data/$f" | cut -d' ' -f1)" = "$(awk -v f="$f" '$2==f{print $1}' "$X/data/MANIFEST")" ]; then
      lm_ok "host: sha256 of $f (written in phase $p) matches"
    else
      lm_fail "host: sha256 of $f (written in phase $p) does not match the manifest"
    fi
  done
  n=$(wc -l < "$X/data/MANIFEST")
  if (cd "$X/data" && sha256sum --quiet -c MANIFEST > "$LM_OUT/host-sha.log" 2>&1); then
    lm_ok "host: all $n manifest files intact on $(basename "$img")"
  else
    lm_fail "host: manifest mismatches: $(head -n 5 "$LM_OUT/host-sha.log" | tr '\n' ' ')"
  fi
  lm_check "host: hot.bin matches its final sha256" bash -c "cd '$X/data' && sha256sum --quiet -c hot.sha256"
}

# ------------------------------------------------------------------------- booting
# lm_qemu LOG TIMEOUT [qemu args...]: QEMU under TCG with the serial console to LOG, bounded by
# TIMEOUT; streams the marker lines while it runs. No kernel of its own: the arguments say what
# boots (the firmware boots a disk or CD when there is no -kernel). Returns QEMU's exit status
# (124 = the host timeout killed it).
lm_qemu() {
  local log=$1 tmo=$2 rc qpid; shift 2
  : > "$log"
  timeout -k 5 "$tmo" "${LM_QEMU[@]}" -accel tcg -m "$LM_MEM" -smp "$LM_SMP" \
    -nographic -no-reboot -nodefaults -serial stdio "$@" </dev/null >>"$log" 2>&1 &
  qpid=$!
  local filter='LMTEST|LMLOG|Kernel panic|BUG:|Call Trace|blocked for more than|livemirror: |lmtest-'
  [ -n "${LIVEMIRROR_VM_VERBOSE:-}" ] && filter='.'
  tail -s 0.2 -n +1 -F --pid="$qpid" "$log" 2>/dev/null | tr -d '\r' | grep -a --line-buffered -E "$filter" | sed -u 's/^/  | /' || true
  wait "$qpid" && rc=0 || rc=$?
  return "$rc"
}

# lm_boot LOG TIMEOUT INITRD APPEND [qemu args...]: boot the cached kernel with INITRD.
lm_boot() {
  local log=$1 tmo=$2 initrd=$3 append=$4; shift 4
  [ -n "${LIVEMIRROR_VM_TOLERATE:-}" ] && append="$append lm.tolerate=$LIVEMIRROR_VM_TOLERATE"
  lm_qemu "$log" "$tmo" -monitor none -kernel "$LM_VMLINUZ" -initrd "$initrd" \
    -append "console=ttyS0 panic=-1 loglevel=4 $append" "$@"
}

# lm_judge LOG: count the guest's marker lines into LM_OK/LM_FAIL. A guest run passes when it
# printed LMTEST DONE and no LMTEST FAIL, and the kernel did not panic. Leaves LOG.txt (no CRs).
lm_judge() {
  local log=$1 txt=$1.txt ok fail
  tr -d '\r' < "$log" > "$txt"
  ok=$(grep -ac 'LMTEST OK:' "$txt" || true)
  fail=$(grep -ac 'LMTEST FAIL:' "$txt" || true)
  LM_OK=$((LM_OK + ok)); LM_FAIL=$((LM_FAIL + fail))
  if ! grep -aq 'LMTEST DONE' "$txt"; then
    lm_fail "guest never printed LMTEST DONE ($(basename "$log"))"
    grep -av 'LMTEST' "$txt" | tail -n 25 | sed 's/^/  console| /'
  fi
  if grep -aq 'Kernel panic' "$txt"; then lm_fail "guest kernel panic ($(basename "$log"))"; fi
  [ "$fail" = 0 ]
}

# lm_marker LOG KEY: the value of the last "LMTEST INFO: KEY=VALUE" line (after lm_judge).
lm_marker() { sed -n "s/.*LMTEST INFO: $2=\([^ ]*\).*/\1/p" "$1.txt" | tail -n 1; }

# lm_outdir NAME: a fresh output dir for one scenario run. Sets LM_OUT.
lm_outdir() {
  if [ -n "${LIVEMIRROR_VM_OUT:-}" ]; then LM_OUT=$LIVEMIRROR_VM_OUT/$1; rm -rf "$LM_OUT"; mkdir -p "$LM_OUT"
  else LM_OUT=$(mktemp -d "/tmp/livemirror-vm.$1.XXXXXX"); fi
}

# lm_summary NAME: prints the scenario's result line; returns non-zero on any failure.
lm_summary() {
  lm_timings
  lm_say "$1: $LM_OK checks passed, $LM_FAIL failed (output: $LM_OUT)"
  if [ "$LM_FAIL" -eq 0 ] && [ "$LM_OK" -gt 0 ]; then
    [ -n "${LIVEMIRROR_VM_KEEP:-}" ] || [ -n "${LIVEMIRROR_VM_OUT:-}" ] || rm -rf "$LM_OUT"
    return 0
  fi
  return 1
}

# lm_boot_installed OUTDIR TIMEOUT INITRD CMDLINE [FSIMG]: boot 2, the installed disk
# (OUTDIR/vdb.img) alone as root; then the host checks the file system on FSIMG (default the
# whole image; "IMG?offset=N" for a partition): e2fsck, and the file boot 2 wrote.
lm_boot_installed() {
  local o=$1 timeout=$2 initrd=$3 cmdline=$4 fs=${5:-$1/vdb.img} rc b2
  set +e
  lm_boot "$o/boot2.log" "$timeout" "$initrd" "$cmdline" -drive "file=$o/vdb.img,if=virtio,format=raw"
  rc=$?
  set -e
  [ "$rc" = 0 ] || lm_fail "boot 2: QEMU exited $rc"
  lm_judge "$o/boot2.log" || true
  if e2fsck -fn "$fs" > "$o/e2fsck2.log" 2>&1; then
    lm_ok "e2fsck -fn after boot 2: clean"
  else
    lm_fail "e2fsck -fn after boot 2 reported problems: $(tail -n 3 "$o/e2fsck2.log" | tr '\n' ' ')"
  fi
  b2=$(debugfs -R "cat /data/boot2.bin" "$fs" 2>/dev/null | sha256sum | cut -d' ' -f1)
  lm_check "host: the file boot 2 wrote is on the disk" bash -c "debugfs -R 'cat /data/boot2.sha256' '$fs' 2>/dev/null | grep -q '^$b2 '"
}

# ------------------------------------------------------------------------- the Debian package
# lm_livemirror_deb BIN DIR [VERSION]: livemirror's Debian package around BIN, built into DIR by
# scripts/build-deb.sh (VERSION: another package version than Cargo.toml's); sets
# LM_LIVEMIRROR_DEB to its path. Without VERSION, $LIVEMIRROR_DEB is used instead when set:
# scripts/test-all.sh builds the package once and every scenario installs that one.
lm_livemirror_deb() {
  local bin=$1 dir=$2 version=${3:-} out
  if [ -n "${LIVEMIRROR_DEB:-}" ] && [ -z "$version" ]; then
    [ -f "$LIVEMIRROR_DEB" ] || { echo "LIVEMIRROR_DEB=$LIVEMIRROR_DEB: no such file" >&2; return 1; }
    LM_LIVEMIRROR_DEB=$(readlink -f "$LIVEMIRROR_DEB")
    return 0
  fi
  mkdir -p "$dir"
  if ! out=$(bash "$LM_DIR/../../scripts/build-deb.sh" --bin "$bin" --output "$dir" ${version:+--deb-version "$version"} 2>"$dir/build-deb.log"); then
    cat "$dir/build-deb.log" >&2
    return 1
  fi
  LM_LIVEMIRROR_DEB=${out##*$'\n'}
}

# lm_install_deb TREE DEB: installs the package DEB into the Debian tree TREE with the tree's own
# dpkg, so its maintainer scripts run in the chroot, as `apt install ./DEB` would run them on that
# system. dpkg's output goes to stdout; the status is dpkg's.
lm_install_deb() {
  local tree=$1 deb=$2 name rc
  name=$(basename "$deb")
  cp "$deb" "$tree/tmp/$name" || return 1
  chroot "$tree" /usr/bin/env DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    dpkg -i "/tmp/$name" && rc=0 || rc=$?
  rm -f "$tree/tmp/$name"
  return "$rc"
}

# ------------------------------------------------------------------------- UEFI firmware
# lm_ovmf VARS: QEMU's arguments for a UEFI machine in LM_OVMF (array): OVMF from Debian's ovmf
# package (read-only code) and VARS, a writable copy of its blank variable store, made fresh
# when VARS does not exist (delete it for a machine that has never stored a boot entry). The
# default machine type (i440fx) is kept: its IDE CD drive is what the Debian cloud kernel drives.
LM_OVMF_CODE=${LIVEMIRROR_VM_OVMF_CODE:-/usr/share/OVMF/OVMF_CODE_4M.fd}
LM_OVMF_VARS=${LIVEMIRROR_VM_OVMF_VARS:-/usr/share/OVMF/OVMF_VARS_4M.fd}
lm_ovmf() {
  if [ ! -r "$LM_OVMF_CODE" ] || [ ! -r "$LM_OVMF_VARS" ]; then
    echo "livemirror VM rig: no UEFI firmware ($LM_OVMF_CODE, $LM_OVMF_VARS); install it with:" >&2
    echo "  apt-get install -y --no-install-recommends ovmf" >&2
    return 1
  fi
  [ -f "$1" ] || cp "$LM_OVMF_VARS" "$1"
  LM_OVMF=(-drive "if=pflash,format=raw,unit=0,readonly=on,file=$LM_OVMF_CODE" -drive "if=pflash,format=raw,unit=1,file=$1")
}
