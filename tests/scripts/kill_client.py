# An NBD client for tests/faults.rs (SIGKILL while clients are connected).
# Run as
#     nbdsh -n -c "exec(open(THIS_FILE).read())"
# with LM_URI set. It writes 16 unaligned half-MiB blocks of byte 0x40+i at
# i MiB + 777, flushes, writes two more blocks with FUA (0x60 at 17 MiB + 1,
# 0x61 at 18 MiB + 4095), prints "ACKED", then keeps writing 64 KiB blocks of
# 0xee over [20 MiB, 24 MiB) without flushing until the server goes away.

import os
import sys

import nbd

MIB = 1 << 20

h = nbd.NBD()
h.connect_uri(os.environ["LM_URI"])
for i in range(16):
    h.pwrite(bytes([0x40 + i]) * (MIB // 2), i * MIB + 777)
h.flush()
h.pwrite(b"\x60" * 100000, 17 * MIB + 1, nbd.CMD_FLAG_FUA)
h.pwrite(b"\x61" * 3, 18 * MIB + 4095, nbd.CMD_FLAG_FUA)
print("ACKED", flush=True)
i = 0
while True:
    try:
        h.pwrite(b"\xee" * 65536, 20 * MIB + (i % 64) * 65536)
    except nbd.Error as e:
        print("server gone after %d more writes: %s" % (i, e), flush=True)
        sys.exit(0)
    i += 1
