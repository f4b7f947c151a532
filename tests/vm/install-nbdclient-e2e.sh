#!/bin/bash
# vm-seconds: 35 (expected time on the CI machine, warm cache; run-all.sh starts the longest first)
# Scenario 1b: scenario 1 with the standard client: `nbd-client -unix /run/livemirror/nbd.sock
# /dev/nbd0` connects the kernel device instead of livemirror's own netlink attach. Shorter: no
# resize step (livemirror cannot resize a device nbd-client configured) and no boot 2.
# Reconnecting after a daemon crash needs livemirror's own attach as well (serve --nbd-device),
# so the kill scenario does not use this mode. Knobs: as install-e2e.sh.
export LIVEMIRROR_VM_NBD=${LIVEMIRROR_VM_NBD:-nbd-client}
export LIVEMIRROR_VM_SHORT=1
export LIVEMIRROR_VM_NAME=${LIVEMIRROR_VM_NAME:-install-nbdclient-e2e}
exec bash "$(dirname "$0")/install-e2e.sh" "$@"
