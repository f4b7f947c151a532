#!/usr/bin/env python3
"""Writes the hand-made seed corpus under corpus/<target>/.

The seeds are committed; rerun this (python3 gen_corpus.py) after changing the
input layout of a target. Layouts are documented at the top of each
fuzz_targets/*.rs. Existing seed files are overwritten, others are left alone.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10
OPT_EXTENDED_HEADERS = 11
EXTENDED_REQUEST_MAGIC = 0x21E41C71
INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 1, 2, 3
FIXED, NO_ZEROES = 1, 2
MAX_OPTION_LEN = 64 << 10

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = range(8)
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO, FLAG_PAYLOAD_LEN = 1, 2, 4, 8, 16, 32


def u16(v): return struct.pack(">H", v)
def u32(v): return struct.pack(">I", v)
def u64(v): return struct.pack(">Q", v)
def nbd_str(s): return u32(len(s)) + s


def opt(o, data=b""):
    return u64(IHAVEOPT) + u32(o) + u32(len(data)) + data


def go(name=b"", infos=(), o=OPT_GO):
    return opt(o, nbd_str(name) + u16(len(infos)) + b"".join(u16(i) for i in infos))


def meta(name=b"", queries=(b"base:allocation",), o=OPT_SET_META_CONTEXT):
    return opt(o, nbd_str(name) + u32(len(queries)) + b"".join(nbd_str(q) for q in queries))


def request(kind, flags=0, offset=0, length=0, cookie=0x1122334455667788):
    return u32(REQUEST_MAGIC) + u16(flags) + u16(kind) + u64(cookie) + u64(offset) + u32(length)


def ext_request(kind, flags=0, offset=0, length=0, cookie=0x1122334455667788):
    return u32(EXTENDED_REQUEST_MAGIC) + u16(flags) + u16(kind) + u64(cookie) + u64(offset) + u64(length)


TLS_OFF, TLS_OFFERED, TLS_REQUIRED = 0, 1, 2


def hs(body, exports=0, chunks=0, reps=0, split=0, tls=TLS_OFF):
    """handshake target input: 5-byte harness header + client stream."""
    cfg = exports | (tls << 2) | (0xA0 if reps else 0)
    return bytes([cfg, chunks, reps]) + u16(split) + body


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


flags = u32(FIXED | NO_ZEROES)
full = (flags + opt(OPT_STRUCTURED_REPLY) + meta() +
        go(b"", (INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION)) + request(CMD_READ, 0, 0, 4096))

handshake = {
    "go-structured-meta": hs(full),
    "go-structured-meta-bytewise": hs(full, chunks=1),
    "go-structured-meta-chunked": hs(full, chunks=3),
    "export-name-zeroes": hs(u32(FIXED) + opt(OPT_EXPORT_NAME, b"")),
    "export-name-no-zeroes": hs(flags + opt(OPT_EXPORT_NAME, b"disk2") + b"\x25\x60"),
    "export-name-unknown": hs(flags + opt(OPT_EXPORT_NAME, b"nope")),
    "list-then-go-ro": hs(flags + opt(OPT_LIST) + go(b"ro", (INFO_NAME,))),
    "list-many-exports": hs(flags + opt(OPT_LIST) + opt(OPT_LIST, b"x") + go(b"export-03-nnnnnnnnnnnnnnnnnnnnnnnn"), exports=3),
    "abort": hs(flags + opt(OPT_ABORT)),
    "info-listmeta-go": hs(flags + opt(OPT_STRUCTURED_REPLY) + go(b"disk2", (INFO_DESCRIPTION,), OPT_INFO) +
                           meta(b"disk2", (b"base:",), OPT_LIST_META_CONTEXT) + meta(b"disk2", (), OPT_LIST_META_CONTEXT) +
                           meta(b"", ()) + go(b"disk2")),
    "meta-other-export": hs(flags + opt(OPT_STRUCTURED_REPLY) + meta(b"ro") + go(b"")),
    "meta-without-structured": hs(flags + meta() + opt(OPT_STRUCTURED_REPLY) + opt(OPT_STRUCTURED_REPLY) + go(b"")),
    "starttls-unknown-go": hs(flags + opt(OPT_STARTTLS) + opt(99, b"whatever") + go(b"")),
    "go-unknown-export": hs(flags + go(b"nope") + go(b"\x00\x01\xe2\x82\xac") + go(b"", (), OPT_GO)[:-2]),
    # An unknown export name long enough that the error message naming it is
    # cut at MAX_STRING bytes (the cut falls between two characters here).
    "go-unknown-long-name": hs(flags + go(b"x" * 101 + "\u00e9".encode() * 1989) + go(b"")),
    "no-exports": hs(flags + opt(OPT_LIST) + go(b""), exports=2),
    "malformed-go": hs(flags + opt(OPT_GO, u32(100) + b"abc") + opt(OPT_GO, u32(0) + u16(3) + u16(1)) +
                       opt(OPT_GO, u32(0) + u16(0) + b"x") + go(b"")),
    "bad-client-flags": hs(u32(0x80000000)),
    "bad-option-magic": hs(flags + b"\x00" * 16),
    # One oversized option, its data streamed by repetition, then LIST headers.
    "oversized-option": hs(flags + u64(IHAVEOPT) + u32(OPT_GO) + u32(MAX_OPTION_LEN + 16 * 7) + opt(OPT_LIST),
                           exports=1, chunks=128, reps=65, split=20),
    # LIST headers repeated past MAX_OPTIONS.
    "too-many-options": hs(flags + opt(OPT_LIST), exports=1, chunks=128, reps=65, split=4),
    # Extended headers: the option's rules, then GO (and EXPORT_NAME after it).
    "extended-go": hs(flags + opt(OPT_EXTENDED_HEADERS, b"x") + opt(OPT_EXTENDED_HEADERS) + opt(OPT_EXTENDED_HEADERS) +
                      opt(OPT_STRUCTURED_REPLY) + meta() + go(b"", (INFO_BLOCK_SIZE,))),
    "extended-export-name": hs(flags + opt(OPT_EXTENDED_HEADERS) + opt(OPT_EXPORT_NAME, b"")),
    # TLS: STARTTLS at the end of a feed (byte-wise chunks), then negotiation
    # inside TLS; required mode refusing plaintext options; plaintext behind
    # STARTTLS in one feed.
    "tls-offered-starttls-go": hs(flags + opt(OPT_STRUCTURED_REPLY) + opt(OPT_STARTTLS) + opt(OPT_STARTTLS) +
                                  opt(OPT_EXTENDED_HEADERS) + meta() + go(b""), chunks=1, tls=TLS_OFFERED),
    "tls-required-refusals": hs(flags + opt(OPT_LIST) + go(b"") + opt(OPT_STARTTLS, b"x") + opt(99, b"y") +
                                opt(OPT_STARTTLS) + go(b""), chunks=1, tls=TLS_REQUIRED),
    "tls-required-export-name": hs(flags + opt(OPT_EXPORT_NAME, b""), tls=TLS_REQUIRED),
    "tls-required-abort": hs(flags + opt(OPT_GO, b"\0" * 100) + opt(OPT_ABORT), chunks=2, tls=TLS_REQUIRED),
    "tls-injection": hs(flags + opt(OPT_STARTTLS) + go(b""), tls=TLS_REQUIRED),
    "tls-not-fixed": hs(u32(0) + opt(OPT_STARTTLS), tls=TLS_OFFERED),
    "tls-off-starttls": hs(flags + opt(OPT_STARTTLS) + go(b"")),
    # An oversized option before the required TLS: refused without storing it.
    "tls-required-oversized": hs(flags + u64(IHAVEOPT) + u32(OPT_GO) + u32(MAX_OPTION_LEN + 16 * 7) + opt(OPT_LIST),
                                 exports=1, chunks=128, reps=65, split=20, tls=TLS_REQUIRED),
}
for name, data in handshake.items():
    write("handshake", name, data)

S_STRUCT, S_BASE, S_RO = 1, 2, 4
ctx1 = S_BASE | (1 << 3)
GiB = 1 << 30


# Transmission flags: HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES,
# SEND_DF, SEND_CACHE, SEND_FAST_ZERO (what a writable export advertises).
TF_ALL = (1 << 0) | (1 << 2) | (1 << 3) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 10) | (1 << 11)
TF_BARE = (1 << 0) | (1 << 2)


MAX_32M, MAX_1M, MAX_4K, MAX_ODD = 0, 1, 2, 3


def req(kind, flags=0, offset=0, length=0, session=S_STRUCT | ctx1, size=GiB, tflags=TF_ALL, extended=False, maxp=MAX_32M):
    """request target input: a 32-byte header (compact ones padded), session, size, flags."""
    hdr = ext_request(kind, flags, offset, length) if extended else request(kind, flags, offset, length) + b"\0" * 4
    return hdr + bytes([session, int(extended) | (maxp << 1)]) + u64(size) + tflags.to_bytes(2, "big")


requests = {
    "read": req(CMD_READ, 0, 4096, 4096),
    "read-df": req(CMD_READ, FLAG_DF, 0, 65536),
    "write": req(CMD_WRITE, 0, 8192, 512),
    "write-fua": req(CMD_WRITE, FLAG_FUA, GiB - 512, 512),
    "write-read-only": req(CMD_WRITE, 0, 0, 512, session=S_RO),
    "write-too-big": req(CMD_WRITE, 0, 0, (32 << 20) + 1),
    "flush": req(CMD_FLUSH),
    "disc": req(CMD_DISC),
    "trim": req(CMD_TRIM, 0, 0, 1 << 20),
    "cache": req(CMD_CACHE, 0, 0, 1 << 20),
    "write-zeroes": req(CMD_WRITE_ZEROES, FLAG_NO_HOLE | FLAG_FAST_ZERO, 4096, 1 << 20),
    "block-status": req(CMD_BLOCK_STATUS, FLAG_REQ_ONE, 0, 1 << 20),
    "block-status-no-context": req(CMD_BLOCK_STATUS, 0, 0, 1 << 20, session=S_STRUCT),
    "read-past-end": req(CMD_READ, 0, (1 << 64) - 1, 2),
    "trim-not-advertised": req(CMD_TRIM, 0, 0, 4096, tflags=TF_BARE),
    "write-fua-not-advertised": req(CMD_WRITE, FLAG_FUA, 0, 512, tflags=TF_BARE),
    "payload-flag-compact": req(CMD_WRITE, FLAG_PAYLOAD_LEN, 0, 512),
    # Extended headers: 64-bit effect lengths, the payload flag, small maxima.
    "ext-write-payload": req(CMD_WRITE, FLAG_PAYLOAD_LEN | FLAG_FUA, 4096, 4096, extended=True),
    "ext-write-unflagged": req(CMD_WRITE, 0, 4096, 4096, extended=True),
    "ext-trim-64": req(CMD_TRIM, 0, 0, 5 << 32, size=1 << 40, extended=True),
    "ext-zeroes-64": req(CMD_WRITE_ZEROES, FLAG_NO_HOLE, 4096, 5 << 32, size=1 << 40, extended=True),
    "ext-block-status-64": req(CMD_BLOCK_STATUS, 0, 0, 1 << 40, size=1 << 40, extended=True),
    "ext-read-payload": req(CMD_READ, FLAG_PAYLOAD_LEN, 0, 100, extended=True),
    "ext-read-too-big": req(CMD_READ, 0, 0, 1 << 33, size=1 << 40, extended=True),
    "ext-write-over-max": req(CMD_WRITE, FLAG_PAYLOAD_LEN, 0, (1 << 20) + 1, extended=True, maxp=MAX_1M),
    "ext-write-odd-max": req(CMD_WRITE, FLAG_PAYLOAD_LEN, 0, (3 << 20) + 1, extended=True, maxp=MAX_ODD),
    "ext-compact-magic": request(CMD_READ, 0, 0, 512) + b"\0" * 4 + bytes([S_STRUCT, 1]) + u64(GiB) + TF_ALL.to_bytes(2, "big"),
}
for name, data in requests.items():
    write("request", name, data)

roundtrip = {
    "read": request(CMD_READ, 0, 4096, 4096),
    "ext-write": ext_request(CMD_WRITE, FLAG_PAYLOAD_LEN, 1 << 40, 5 << 32),
    "write-fua": request(CMD_WRITE, FLAG_FUA, 1 << 40, 65536, cookie=0xdeadbeef01020304),
    "bad-magic": b"\x00" * 28,
}
for name, data in roundtrip.items():
    write("transmission_roundtrip", name, data)

# tls_session: byte 0 = PSK (1) | offered (2) | injection (4); the rest is the
# option stream sent inside TLS.
inside = opt(OPT_EXTENDED_HEADERS) + meta() + go(b"", (INFO_BLOCK_SIZE,))
tls_session = {
    "x509-required-go": bytes([0]) + inside,
    "psk-required-go": bytes([1]) + inside,
    "x509-offered-list-abort": bytes([2]) + opt(OPT_LIST) + opt(OPT_STARTTLS) + opt(OPT_ABORT),
    "psk-export-name": bytes([1]) + opt(OPT_STRUCTURED_REPLY) + opt(OPT_EXPORT_NAME, b"ro"),
    "x509-injection": bytes([4]) + go(b""),
    "psk-injection": bytes([5]) + opt(OPT_LIST),
    "x509-garbage": bytes([0]) + b"\x00" * 40,
}
for name, data in tls_session.items():
    write("tls_session", name, data)

def huge_claim(file):
    """The same file with both headers claiming a 32 TiB export at 4 KiB
    regions: 2^33 regions, 4 GiB of bitmaps per slot, in a 16 KiB file (the
    decoder must refuse it before allocating; the header CRCs are redone)."""
    import zlib
    out = bytearray(file)
    for slot in (0, 1):
        h = slot * 4096
        # The fields end where the header's CRC of them is stored.
        end = next(e for e in range(53, 4092) if zlib.crc32(out[h:h + e]) == struct.unpack_from("<I", out, h + e)[0])
        regions = 1 << 33
        area = -(-4 * -(-regions // 64) * 8 // 4096) * 4096
        struct.pack_into("<Q", out, h + 12, area)
        struct.pack_into("<I", out, h + 28, 12)
        struct.pack_into("<Q", out, h + 33, regions << 12)
        struct.pack_into("<Q", out, h + 41, regions)
        struct.pack_into("<I", out, h + end, zlib.crc32(out[h:h + end]))
    return bytes(out)


# state_file: whole state files, written by the daemon itself (so they follow
# the format the engine writes today): serving, synced with a target, and a
# partial sync of a larger export with small regions. Needs the livemirror
# binary (LIVEMIRROR_BIN, default ../../target/debug/livemirror: cargo build).
def state_files():
    import shutil
    import subprocess
    import tempfile
    import time

    binary = os.environ.get("LIVEMIRROR_BIN", os.path.join(HERE, "..", "..", "target", "debug", "livemirror"))
    if not os.access(binary, os.X_OK):
        raise SystemExit(f"gen_corpus.py: {binary} is not built (cargo build, or set LIVEMIRROR_BIN)")
    tmp = tempfile.mkdtemp(prefix="lm-state-seeds.")
    try:
        def run(*args):
            subprocess.run([binary, *args], check=True, stdout=subprocess.DEVNULL)

        def daemon(name, size, region, rate=None):
            src, state, ctl = (os.path.join(tmp, name + x) for x in (".src", ".state", ".ctl"))
            with open(src, "wb") as f:
                f.truncate(size)
            args = ["serve", "--source", src, "--listen", f"unix:{tmp}/{name}.sock", "--control", ctl,
                    "--state", state, "--region-size", region]
            proc = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.time() + 30
            while not os.path.exists(ctl):
                if time.time() > deadline or proc.poll() is not None:
                    raise SystemExit(f"gen_corpus.py: the daemon for {name} did not start")
                time.sleep(0.05)
            return proc, ctl, state

        def stop(name, proc, state):
            proc.terminate()
            proc.wait(timeout=30)
            with open(state, "rb") as f:
                write("state_file", name, f.read())

        proc, ctl, state = daemon("serving", 1 << 20, "4K")
        stop("serving-1m-4k", proc, state)
        with open(os.path.join(HERE, "corpus", "state_file", "serving-1m-4k"), "rb") as f:
            write("state_file", "claims-4g-bitmaps", huge_claim(f.read()))

        proc, ctl, state = daemon("synced", 4 << 20, "64K")
        target = os.path.join(tmp, "synced.tgt")
        with open(target, "wb") as f:
            f.truncate(8 << 20)
        run("attach", "--control", ctl, target)
        run("wait", "--control", ctl, "--timeout", "60")
        stop("synced-4m-64k", proc, state)

        proc, ctl, state = daemon("syncing", 64 << 20, "4K")
        run("set-rate", "--control", ctl, "1M")
        target = os.path.join(tmp, "syncing.tgt")
        with open(target, "wb") as f:
            f.truncate(64 << 20)
        run("attach", "--control", ctl, target)
        time.sleep(1)
        run("pause", "--control", ctl)
        stop("syncing-paused-64m-4k", proc, state)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


state_files()
