#!/usr/bin/python3
"""A write load that outlives its server's restarts (tests/upgrade.rs).

    nbd_writer.py URI SEED MODEL_OUT STOP_FILE

Reads the whole export into a byte model, then writes random data at random
unaligned offsets until STOP_FILE exists, updating the model after each
acknowledged write. When the server closes the connection (a daemon handing
over to its successor ends its network connections once their requests are
answered), it connects again and writes the interrupted request again: a write
is idempotent, so the model stays what the export must hold. A connection that
is refused, or any other error, ends the run with status 1. At the end it
writes the model to MODEL_OUT and prints "writes N reconnects M".
"""
import errno
import os
import random
import sys
import time

import nbd

uri, seed, model_out, stop_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
rng = random.Random(seed)


def connect():
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def lost(e):
    """True for a connection the server ended (not refused: listeners never close).
    libnbd's error carries the errno by name (e.errno) and number (e.errnum)."""
    return e.errnum in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ESHUTDOWN) or any(
        w in str(e).lower() for w in ("disconnected", "dead", "end of file", "shut down")
    )


h = connect()
reconnects = 0


def retried(op):
    """op(h), connecting again (and again doing op) while the connection is lost."""
    global h, reconnects
    while True:
        try:
            return op(h)
        except nbd.Error as e:
            if not lost(e):
                raise
            reconnects += 1
            for _ in range(200):
                try:
                    h = connect()
                    break
                except nbd.Error as e2:
                    if e2.errnum == errno.ECONNREFUSED:
                        print(f"connection refused after a disconnect: {e2}", file=sys.stderr)
                        sys.exit(1)
                    time.sleep(0.05)
            else:
                print("could not connect again within 10 s", file=sys.stderr)
                sys.exit(1)


size = h.get_size()
model = bytearray()
off = 0
while off < size:
    n = min(8 << 20, size - off)
    model += retried(lambda h: h.pread(n, off))
    off += n

writes = 0
longest = 0.0
while not os.path.exists(stop_file):
    length = rng.randint(1, 65536)
    offset = rng.randrange(0, size - length)
    data = rng.randbytes(length)
    t0 = time.monotonic()
    try:
        retried(lambda h: h.pwrite(data, offset))
    except nbd.Error as e:
        print(f"write at {offset}+{length} failed: {e}", file=sys.stderr)
        sys.exit(1)
    longest = max(longest, time.monotonic() - t0)
    model[offset:offset + length] = data
    writes += 1

retried(lambda h: h.flush())
with open(model_out, "wb") as f:
    f.write(model)
print(f"writes {writes} reconnects {reconnects} longest_write_ms {longest * 1000:.0f}")
