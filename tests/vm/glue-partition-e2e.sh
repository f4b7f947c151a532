#!/bin/bash
# vm-seconds: 600 (expected time on the CI machine, warm cache; run-all.sh starts the longest first)
# Scenario glue-partition-e2e: glue-e2e with a partition TARGET on a UEFI machine (OVMF). The
# host gives the second disk a GPT with an empty EFI system partition and an empty partition for
# the system; `livemirror-install --bootloader systemd-boot /dev/vdb2` installs onto the
# partition (the disk's partition table is not data on it), formats the ESP, puts systemd-boot,
# the kernel and the initramfs update-initramfs made on it and adds an NVRAM boot entry. Boot 2
# starts with a fresh variable store and the disk alone: OVMF starts the disk's
# EFI/BOOT/BOOTX64.EFI, systemd-boot the installed system. Boots 3 and 4 move the installed root
# onto another disk on UEFI (systemd-boot chosen by the installer itself, the new ESP on
# /boot/efi). Everything else is glue-e2e's (see glue-e2e.sh).
# Usage: LIVEMIRROR_BIN=path/to/livemirror tests/vm/glue-partition-e2e.sh
LIVEMIRROR_VM_GLUE_TARGET=partition exec bash "$(dirname "$0")/glue-e2e.sh" "$@"
