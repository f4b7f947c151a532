# Edge cases of the NBD transmission phase, driven through libnbd's Python
# binding. Run by tests/interop_libnbd.rs as
#     nbdsh -n -c "exec(open(THIS_FILE).read())"
# with the environment:
#     LM_URI         NBD URI of the export
#     LM_CASE        name of the case function below (without the "case_" prefix)
#     LM_STRUCTURED  "1" (default) or "0": negotiate structured replies or not
#     LM_ARG         optional case argument
# Every case raises (and nbdsh exits non-zero) on the first failed check and
# prints "CASE <name> OK" at the end.

import errno
import os

import nbd

MIB = 1 << 20
MAX_PAYLOAD = 32 * MIB
STATE_HOLE = 1
STATE_ZERO = 2
# A command flag no NBD version defines.
UNKNOWN_FLAG = 1 << 9


def connect(meta=False, strict=True):
    h = nbd.NBD()
    h.set_request_structured_replies(os.environ.get("LM_STRUCTURED", "1") == "1")
    if meta:
        h.add_meta_context("base:allocation")
    h.connect_uri(os.environ["LM_URI"])
    if not strict:
        # Let requests libnbd would refuse itself reach the server.
        h.set_strict_mode(0)
    return h


def pat(seed, n):
    """Deterministic, position-dependent bytes."""
    return bytes(((i * 131 + seed * 7 + (i >> 8)) & 0xFF) for i in range(n))


def expect_err(want, what, f, *args):
    try:
        r = f(*args)
    except nbd.Error as e:
        assert e.errnum == want, "%s: expected %s, got errnum=%s (%s)" % (
            what,
            errno.errorcode[want],
            errno.errorcode.get(e.errnum, e.errnum),
            e.string,
        )
        # A server error, not a client-side refusal by libnbd.
        assert "command failed" in (e.string or ""), "%s: refused by libnbd, not the server: %s" % (what, e.string)
        print("  %s -> %s as expected" % (what, errno.errorcode[want]))
        return
    raise AssertionError("%s: expected %s, but it succeeded (%r)" % (what, errno.errorcode[want], r))


def still_works(h, off=0):
    """The connection is in sync: a write and a read at `off` round-trip."""
    data = pat(off & 0xFF, 4096)
    h.pwrite(data, off)
    got = h.pread(4096, off)
    assert got == data, "connection out of sync: read back differs at %d" % off
    h.flush()


def case_out_of_range():
    h = connect(strict=False)
    size = h.get_size()
    last = h.pread(1, size - 1)
    expect_err(errno.EINVAL, "read straddling the end", h.pread, 2, size - 1)
    expect_err(errno.EINVAL, "read starting at the end", h.pread, 1, size)
    expect_err(errno.EINVAL, "read far past the end", h.pread, 4096, 1 << 60)
    expect_err(errno.ENOSPC, "write straddling the end", h.pwrite, b"ab", size - 1)
    expect_err(errno.ENOSPC, "write past the end", h.pwrite, b"x" * 8192, size)
    expect_err(errno.ENOSPC, "write whose end overflows u64", h.pwrite, b"xy", (1 << 64) - 1)
    expect_err(errno.ENOSPC, "write_zeroes past the end", h.zero, 4096, size - 1)
    expect_err(errno.EINVAL, "trim past the end", h.trim, 4096, size - 1)
    expect_err(errno.EINVAL, "cache past the end", h.cache, 4096, size - 1)
    assert h.pread(1, size - 1) == last, "a refused write changed the last byte"
    # Pipelined: a bad write in the middle of good ones keeps the stream in sync.
    c1 = h.aio_pwrite(b"A" * 512, 0)
    c2 = h.aio_pwrite(b"B" * 100000, size - 50000)
    c3 = h.aio_pwrite(b"C" * 512, 512)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    assert h.aio_command_completed(c1) and h.aio_command_completed(c3)
    try:
        h.aio_command_completed(c2)
        raise AssertionError("pipelined out-of-range write succeeded")
    except nbd.Error as e:
        assert e.errnum == errno.ENOSPC, "pipelined out-of-range write: errnum %s" % e.errnum
    assert h.pread(1024, 0) == b"A" * 512 + b"C" * 512
    still_works(h, size - 4096)
    still_works(h, 0)
    h.shutdown()


def case_zero_length():
    h = connect(strict=False)
    size = h.get_size()
    still_works(h, 8192)
    assert h.pread(0, 0) == b"", "zero-length read returned data"
    assert h.pread(0, size) == b"", "zero-length read at the end returned data"
    h.pwrite(b"", 0)
    h.pwrite(b"", size)
    # Mixed with real requests on the same connection: nothing is out of step.
    h.pwrite(b"Z" * 10, 20000)
    assert h.pread(0, 50) == b""
    assert h.pread(10, 20000) == b"Z" * 10
    still_works(h, 0)
    h.shutdown()


def case_oversize():
    h = connect(strict=False)
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == MAX_PAYLOAD
    before = h.pread(4096, 0)
    expect_err(errno.EINVAL, "read of 32 MiB + 1", h.pread, MAX_PAYLOAD + 1, 0)
    expect_err(errno.EINVAL, "write of 32 MiB + 1", h.pwrite, b"\xee" * (MAX_PAYLOAD + 1), 0)
    # The refused write's payload was skipped, not written and not parsed as requests.
    assert h.pread(4096, 0) == before, "a refused oversize write changed the export"
    still_works(h, 4096)
    # Exactly the maximum is fine, both ways.
    big = pat(3, 4096) * (MAX_PAYLOAD // 4096)
    h.pwrite(big, 0)
    assert h.pread(MAX_PAYLOAD, 0) == big, "32 MiB write/read round trip"
    still_works(h, MAX_PAYLOAD)
    h.shutdown()


def case_bad_flags():
    h = connect(strict=False)
    structured = h.get_structured_replies_negotiated()
    still_works(h, 0)
    expect_err(errno.EINVAL, "read with an unknown flag", h.pread, 4096, 0, UNKNOWN_FLAG)
    before = h.pread(4096, 4096)
    expect_err(errno.EINVAL, "write with an unknown flag", h.pwrite, b"\xab" * 4096, 4096, UNKNOWN_FLAG)
    assert h.pread(4096, 4096) == before, "a refused write changed the export"
    expect_err(errno.EINVAL, "write with NO_HOLE", h.pwrite, b"\xab" * 4096, 4096, nbd.CMD_FLAG_NO_HOLE)
    expect_err(errno.EINVAL, "write with FAST_ZERO", h.pwrite, b"\xab" * 4096, 4096, nbd.CMD_FLAG_FAST_ZERO)
    expect_err(errno.EINVAL, "trim with NO_HOLE", h.trim, 4096, 0, nbd.CMD_FLAG_NO_HOLE)
    expect_err(errno.EINVAL, "trim with FAST_ZERO", h.trim, 4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    expect_err(errno.EINVAL, "flush with REQ_ONE", h.flush, nbd.CMD_FLAG_REQ_ONE)
    expect_err(errno.EINVAL, "cache with an unknown flag", h.cache, 4096, 0, UNKNOWN_FLAG)
    expect_err(errno.EINVAL, "write_zeroes with REQ_ONE", h.zero, 4096, 0, nbd.CMD_FLAG_REQ_ONE)
    if structured:
        # DF is valid on reads once structured replies are negotiated.
        assert h.pread(4096, 0, nbd.CMD_FLAG_DF) == h.pread(4096, 0)
    else:
        expect_err(errno.EINVAL, "DF without structured replies", h.pread, 4096, 0, nbd.CMD_FLAG_DF)
    # FUA is valid on every command once advertised.
    h.flush(nbd.CMD_FLAG_FUA)
    still_works(h, 8192)
    h.shutdown()


def case_cache_fua_flush():
    h = connect()
    size = h.get_size()
    assert h.can_cache() and h.can_fua() and h.can_flush()
    h.cache(65536, 0)
    h.cache(size, 0)
    h.cache(1, size - 1)
    data = pat(9, 65536)
    h.pwrite(data, 65536, nbd.CMD_FLAG_FUA)
    h.pwrite(data[:1000], 200000 + 3, nbd.CMD_FLAG_FUA)
    h.flush()
    assert h.pread(65536, 65536) == data
    assert h.pread(1000, 200003) == data[:1000]
    h.shutdown()


def case_block_status():
    h = connect(meta=True)
    assert h.can_meta_context("base:allocation"), "base:allocation was not negotiated"
    size = h.get_size()
    data_off, data_len = MIB, 65536
    h.pwrite(pat(5, data_len), data_off)
    h.flush()

    def extents(count, off, flags=0):
        got = []

        def cb(ctx, start, entries, err):
            assert ctx == "base:allocation", ctx
            assert start == off, "extents start at %d, not %d" % (start, off)
            got.extend(zip(entries[0::2], entries[1::2]))
            return 0

        h.block_status(count, off, cb, flags)
        assert got, "no extents"
        out, pos = [], off
        for ln, fl in got:
            assert ln > 0, "empty extent in %r" % got
            out.append((pos, pos + ln, fl))
            pos += ln
        return out

    def flags_at(ext, byte):
        for a, b, fl in ext:
            if a <= byte < b:
                return fl
        raise AssertionError("no extent covers %d in %r" % (byte, ext))

    ext = extents(size, 0)
    print("  extents:", ext)
    assert ext[0][0] == 0
    assert ext[-1][1] <= size, "extents reach past the export"
    assert ext[-1][1] > data_off + data_len + MIB, "extents stop before the written data: %r" % ext
    assert flags_at(ext, 0) == STATE_HOLE | STATE_ZERO, "never-written start is not hole+zero: %r" % ext
    assert flags_at(ext, data_off - 1) == STATE_HOLE | STATE_ZERO, "never-written area is not hole+zero: %r" % ext
    assert flags_at(ext, data_off) == 0, "written data is not reported as data: %r" % ext
    assert flags_at(ext, data_off + data_len - 1) == 0, "written data is not reported as data: %r" % ext
    assert flags_at(ext, data_off + data_len + MIB) == STATE_HOLE | STATE_ZERO, "area after the data: %r" % ext
    # A query starting inside the data.
    ext = extents(8192, data_off + 4096)
    assert all(fl == 0 for a, b, fl in ext if a < data_off + data_len), "inside the data: %r" % ext
    # REQ_ONE: one extent, not longer than asked.
    ext = extents(data_off + 4096, 0, nbd.CMD_FLAG_REQ_ONE)
    assert len(ext) == 1, "REQ_ONE returned %r" % ext
    assert ext[0][1] <= data_off + 4096 and ext[0][2] == STATE_HOLE | STATE_ZERO, ext
    ext = extents(4096, data_off, nbd.CMD_FLAG_REQ_ONE)
    assert len(ext) == 1 and ext[0][2] == 0 and ext[0][1] <= data_off + 4096, ext
    # A query at the very end.
    ext = extents(1, size - 1)
    assert ext == [(size - 1, size, STATE_HOLE | STATE_ZERO)], ext
    # Malformed queries are refused by the server and the connection goes on.
    h.set_strict_mode(0)
    nothing = lambda *a: 0
    expect_err(errno.EINVAL, "block status past the end", h.block_status, 8192, size - 4096, nothing)
    expect_err(errno.EINVAL, "block status at the end", h.block_status, 1, size, nothing)
    expect_err(errno.EINVAL, "block status of length 0", h.block_status, 0, 0, nothing)
    expect_err(errno.EINVAL, "block status with NO_HOLE", h.block_status, 4096, 0, nothing, nbd.CMD_FLAG_NO_HOLE)
    assert extents(4096, data_off) == [(data_off, data_off + 4096, 0)]
    h.shutdown()

    # Without the context negotiated, BLOCK_STATUS is refused.
    h = connect(meta=False, strict=False)
    assert not h.can_meta_context("base:allocation")
    expect_err(errno.EINVAL, "block status without a context", h.block_status, 4096, 0, nothing)
    still_works(h, 2 * MIB)
    h.shutdown()


def case_options():
    """Option haggling (LM_ARG = the export's name)."""
    name = os.environ.get("LM_ARG", "")
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(os.environ["LM_URI"])
    assert h.aio_is_negotiating()
    exports = []
    h.opt_list(lambda n, d: exports.append((n, d)))
    assert [n for n, d in exports] == [name], "NBD_OPT_LIST: %r" % exports
    assert exports[0][1], "no description in NBD_OPT_LIST"
    got = []
    h.set_export_name(name)
    assert h.opt_list_meta_context(lambda c: got.append(c)) == 1 and got == ["base:allocation"], got
    h.add_meta_context("base:")
    got = []
    assert h.opt_list_meta_context(lambda c: got.append(c)) == 1 and got == ["base:allocation"], got
    h.clear_meta_contexts()
    h.add_meta_context("qemu:dirty-bitmap:nope")
    got = []
    assert h.opt_list_meta_context(lambda c: got.append(c)) == 0 and got == [], got
    h.set_export_name(name + "-wrong")
    try:
        h.opt_info()
        raise AssertionError("NBD_OPT_INFO for a wrong name succeeded")
    except nbd.Error as e:
        assert e.errnum == errno.ENOENT, "NBD_OPT_INFO for a wrong name: %s" % e
    # Still negotiating after the refusal.
    assert h.aio_is_negotiating()
    h.set_export_name(name)
    h.opt_info()
    size = h.get_size()
    assert size > 0 and h.can_multi_conn()
    h.clear_meta_contexts()
    h.add_meta_context("base:allocation")
    h.opt_go()
    assert h.aio_is_ready() and h.get_size() == size
    assert h.can_meta_context("base:allocation")
    still_works(h, 0)
    h.shutdown()
    # NBD_OPT_ABORT ends the negotiation cleanly.
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(os.environ["LM_URI"])
    h.opt_abort()
    assert h.aio_is_closed() or h.aio_is_dead()


def case_trim():
    h = connect()
    assert h.can_trim()
    region = 65536
    before = h.pread(3 * region, 0)
    assert before[region : 2 * region] != bytes(region), "test image must not start zeroed"
    h.trim(region, region)
    h.flush()
    got = h.pread(3 * region, 0)
    assert got[region : 2 * region] == bytes(region), "trimmed region does not read back as zeroes"
    assert got[:region] == before[:region], "trim changed the region before"
    assert got[2 * region :] == before[2 * region :], "trim changed the region after"
    # With FUA, and then rewriting the trimmed area works.
    h.trim(region, 4 * region, nbd.CMD_FLAG_FUA)
    assert h.pread(region, 4 * region) == bytes(region)
    h.pwrite(b"\x77" * 4096, 4 * region + 4096)
    assert h.pread(4096, 4 * region + 4096) == b"\x77" * 4096
    h.shutdown()


def case_fast_zero():
    h = connect()
    assert h.can_zero() and h.can_fast_zero()
    assert h.pread(4096, 1000) != bytes(4096), "test image must not start zeroed"
    h.zero(70000, 1000, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(70000, 1000) == bytes(70000), "fast zero did not zero"
    h.zero(65536, 262144, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(65536, 262144) == bytes(65536)
    h.zero(12345, 400000, nbd.CMD_FLAG_FUA)
    assert h.pread(12345, 400000) == bytes(12345)
    h.flush()
    h.shutdown()


def case_fast_zero_whole():
    """The intended use: fast-zero the whole export (longer than the maximum
    payload, which is allowed for commands without a payload), then write."""
    h = connect()
    size = h.get_size()
    assert size > MAX_PAYLOAD
    h.zero(size, 0, nbd.CMD_FLAG_FAST_ZERO)
    for off in range(0, size, 8 * MIB):
        n = min(8 * MIB, size - off)
        assert h.pread(n, off) == bytes(n), "not zero after whole-export fast zero at %d" % off
    h.pwrite(b"\x42" * 4096, size - 4096)
    h.flush()
    h.shutdown()


def case_read_only():
    h = connect(strict=False)
    size = h.get_size()
    assert h.is_read_only(), "export is not advertised read-only"
    assert not h.can_trim() and not h.can_zero() and not h.can_fast_zero()
    before = h.pread(8192, 0)
    expect_err(errno.EPERM, "write on a read-only export", h.pwrite, b"\x01" * 4096, 0)
    expect_err(errno.EPERM, "write with FUA on a read-only export", h.pwrite, b"\x01" * 4096, 0, nbd.CMD_FLAG_FUA)
    expect_err(errno.EPERM, "trim on a read-only export", h.trim, 4096, 0)
    expect_err(errno.EPERM, "write_zeroes on a read-only export", h.zero, 4096, 0)
    assert h.pread(8192, 0) == before, "read-only export changed"
    # Reading, caching and flushing stay allowed.
    h.cache(size, 0)
    h.flush()
    assert h.pread(8192, 0) == before
    h.shutdown()


def case_write_stripes():
    """LM_ARG = "K N FILE CHUNK": write chunks j with j % N == K from FILE."""
    k, n, path, chunk = os.environ["LM_ARG"].split()
    k, n, chunk = int(k), int(n), int(chunk)
    data = open(path, "rb").read()
    h = connect()
    assert h.can_multi_conn(), "server does not advertise multi-conn"
    pending = []
    for j in range(k, len(data) // chunk, n):
        off = j * chunk
        pending.append(h.aio_pwrite(data[off : off + chunk], off))
        while h.aio_in_flight() >= 16:
            h.poll(-1)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in pending:
        assert h.aio_command_completed(c)
    h.flush()
    h.shutdown()


def case_read_compare():
    """LM_ARG = FILE: the whole export reads back as FILE."""
    data = open(os.environ["LM_ARG"], "rb").read()
    h = connect()
    assert h.get_size() == len(data)
    step = 4 * MIB
    for off in range(0, len(data), step):
        got = h.pread(min(step, len(data) - off), off)
        if got != data[off : off + step]:
            bad = next(i for i in range(len(got)) if got[i] != data[off + i])
            raise AssertionError("export differs from the expected image at byte %d" % (off + bad))
    h.shutdown()


name = os.environ["LM_CASE"]
print("CASE %s (structured=%s)" % (name, os.environ.get("LM_STRUCTURED", "1")))
globals()["case_" + name]()
print("CASE %s OK" % name)
