#!/bin/bash
# vm-seconds: 160 (expected time on the CI machine, warm cache; run-all.sh starts the longest first)
# Scenario glue-partition-e2e: glue-e2e with a partition TARGET. The host gives the second disk
# an MBR partition table with one empty partition; `livemirror-install --no-bootloader
# /dev/vdb1` installs onto it (the disk's partition table must not count as data on the
# partition), the export grows to the partition, and boot 2 mounts root=/dev/vda1 and checks
# that /etc/fstab names it by UUID. Everything else is glue-e2e's (see glue-e2e.sh).
# Usage: LIVEMIRROR_BIN=path/to/livemirror tests/vm/glue-partition-e2e.sh
LIVEMIRROR_VM_GLUE_TARGET=partition exec bash "$(dirname "$0")/glue-e2e.sh" "$@"
