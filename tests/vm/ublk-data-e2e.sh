#!/bin/bash
# vm-seconds: 90 (expected time on the CI machine, warm cache; run-all.sh starts the longest first)
# Scenario ublk-data-e2e: a data device over ublk (serve --ublk-device) on Debian 12's 6.12
# kernel, in one boot (guest/ublk-data.sh, the initramfs' /init; no root file system):
#   the device's parameters in sysfs; a byte-for-byte model, discard and write-zeroes; fio's
#   verify mode (every write read back and CRC-checked while it runs) through an attach, a
#   kill -9 of the daemon mid-sync and its restart (user recovery: the device and its I/O wait,
#   the new daemon takes over); sync, verify, detach-source; grow refused on a kernel without
#   UPDATE_SIZE; SIGTERM removes the device; a root storage daemon leaves its device on SIGTERM,
#   I/O issued meanwhile waits and completes through the next daemon; ublk-remove.
#   disks: vda the source (96 MiB of random data), vdb the target (160 MiB), vdc the tools
#   (fio, util-linux blkdiscard).
#   host: the guest's marker lines; vdb holds the model at its offset.
# Usage: LIVEMIRROR_BIN=path/to/livemirror tests/vm/ublk-data-e2e.sh
# Knobs: LIVEMIRROR_VM_TIMEOUT (420 s), the lib.sh knobs (LIVEMIRROR_VM_SMP: 2 CPUs, 2 queues).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
# shellcheck disable=SC2034  # read by lib.sh: the 6.12 kernel, which has ublk_drv
LM_KSERIES=6.12

NAME=ublk-data-e2e
BIN=${LIVEMIRROR_BIN:-$LM_DIR/../../target/release/livemirror}
TIMEOUT1=${LIVEMIRROR_VM_TIMEOUT:-420}
VDA_MB=96 VDB_MB=160

[ -x "$BIN" ] || lm_die "no livemirror binary at $BIN (cargo build --release, or set LIVEMIRROR_BIN)"
lm_need fio:fio blkdiscard:util-linux || exit 1
lm_prepare || exit 1
lm_outdir "$NAME"
lm_say "$NAME: binary $BIN, kernel $LM_KVER, output $LM_OUT"

lm_phase "build: source, target, tools disk, initramfs"
O=$LM_OUT
head -c $((VDA_MB << 20)) /dev/urandom > "$O/vda.img"
rm -f "$O/vdb.img"; truncate -s "${VDB_MB}M" "$O/vdb.img"
lm_tools_image "$O/vdc.img" fio blkdiscard || lm_die "building the tools disk failed"
lm_strip "$BIN" "$O/livemirror"
R=$O/initramfs
mkdir -p "$R"/{dev,proc,sys,run,tmp,etc,lmtest}
lm_busybox "$R"
lm_copy_bin "$R" "$O/livemirror" /usr/sbin/livemirror
install -m755 "$LM_GUEST/ublk-data.sh" "$R/init"
install -m644 "$LM_GUEST"/{common,watchdog}.sh "$R/lmtest/"
lm_install_modules "$R" virtio_pci virtio_blk ublk_drv ext4 || lm_die "the kernel lacks a module"
lm_initramfs "$R" "$O/initrd.gz"
lm_say "modules: $(tr '\n' ' ' < "$R/etc/modules.order"); initrd $(du -k "$O/initrd.gz" | cut -f1) KiB"
lm_phase_end

lm_phase "boot: the data device over ublk"
set +e
lm_boot "$O/boot1.log" "$TIMEOUT1" "$O/initrd.gz" "lm.watchdog=$((TIMEOUT1 - 30))" \
  -drive "file=$O/vda.img,if=virtio,format=raw" \
  -drive "file=$O/vdb.img,if=virtio,format=raw" \
  -drive "file=$O/vdc.img,if=virtio,format=raw,readonly=on"
RC=$?
set -e
[ "$RC" = 0 ] || lm_fail "boot: QEMU exited $RC$([ "$RC" = 124 ] && echo " (host timeout ${TIMEOUT1}s)")"
lm_judge "$O/boot1.log" || true
lm_phase_end

lm_summary "$NAME"
