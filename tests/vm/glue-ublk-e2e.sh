#!/bin/bash
# vm-seconds: 290 (expected time on the CI machine, warm cache; run-all.sh starts the longest first)
# Scenario glue-ublk-e2e: glue-e2e on Debian 12's 6.12 kernel, where the glue's default
# livemirror.kernel=auto puts the live root on /dev/ublkb0: the hook put ublk_drv into the
# initramfs made by mkinitramfs, livemirror-install's grow is refused (no online resize before
# Linux 6.16) and leaves the growth to the first boot (x-systemd.growfs), the shutdown removes
# /dev/ublkb0, and boot 2 (the disk's GRUB, by the firmware alone) has systemd grow the file
# system to its partition. No move (boots 3 and 4 are glue-e2e's; LIVEMIRROR_VM_GLUE_MOVE=1 adds
# them). Everything else is glue-e2e's (see glue-e2e.sh, LIVEMIRROR_VM_GLUE_DOOR).
# Usage: LIVEMIRROR_BIN=path/to/livemirror tests/vm/glue-ublk-e2e.sh
LIVEMIRROR_VM_GLUE_DOOR=ublk exec bash "$(dirname "$0")/glue-e2e.sh" "$@"
