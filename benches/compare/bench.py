#!/usr/bin/env python3
"""Comparative benchmark harness for livemirror (driven by benches/compare/run.sh).

Sections (see README.md next to this file):
  A  serving: fio (nbd engine) against livemirror, qemu-nbd, nbdkit file, nbd-server, nbdkit null,
     over a Unix socket (A) and over TCP loopback (A2)
  B  copying: dd / qemu-img convert / nbdcopy vs livemirror attach+sync with default flags (disk and tmpfs)
  C  foreground latency of 4K random writes while a sync runs
  D  memory: RSS with a 1 TiB export, after attach, under a 32 MiB write flood
  E  write-intent cost: 4K random writes in state synced with and without --state

Only the Python standard library is used. Needs root for drop_caches.
"""

import argparse
import contextlib
import ctypes
import datetime
import json
import mmap
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

GiB = 1 << 30
MiB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")

# --------------------------------------------------------------------------
# small helpers


def log(msg):
    ts = time.strftime("%H:%M:%S")
    print(f"[{ts}] {msg}", file=sys.stderr, flush=True)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def sh(argv, check=True, **kw):
    return subprocess.run(argv, check=check, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def first_line(argv):
    try:
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=20)
        return r.stdout.strip().splitlines()[0] if r.stdout.strip() else "?"
    except Exception as e:  # noqa: BLE001
        return f"? ({e})"


def read_file(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def child_pids(pid):
    """Live children of pid (of any of its threads)."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        out += [int(c) for c in read_file(f"/proc/{pid}/task/{tid}/children").split()]
    return out


def tree_ticks(pid):
    """CPU ticks of a process and its descendants: its own utime+stime, the cutime+cstime of the
    children it has reaped, and the same for every live descendant. A server that forks a
    process per connection (nbd-server) is then measured whole."""
    s = read_file(f"/proc/{pid}/stat")
    if not s:
        return None
    kids = child_pids(pid)
    f = s[s.rindex(")") + 2:].split()
    t = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return t + sum(tree_ticks(k) or 0 for k in kids)


def thread_ticks(pid):
    """{tid: (name, ticks)} for the live threads of pid."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        s = read_file(f"/proc/{pid}/task/{tid}/stat")
        if not s:
            continue
        name = s[s.index("(") + 1:s.rindex(")")]
        f = s[s.rindex(")") + 2:].split()
        out[tid] = (name, int(f[11]) + int(f[12]))
    return out


class CpuMeter:
    """CPU used by a process with its descendants (total) and by its threads (per thread name)
    between start() and stop()."""

    def __init__(self, pid):
        self.pid = pid

    def start(self):
        self.t0 = time.monotonic()
        self.p0 = tree_ticks(self.pid)
        self.th0 = thread_ticks(self.pid)
        self.last = dict(self.th0)
        return self

    def sample(self):
        """Remember per-thread times now (threads that exit before stop() keep their share)."""
        self.last.update(thread_ticks(self.pid))

    def stop(self):
        wall = time.monotonic() - self.t0
        # a per-connection child (nbd-server) exits once its client is gone: give its parent a
        # moment to reap it, so that its time lands in the parent's cutime instead of vanishing
        t = time.monotonic()
        while child_pids(self.pid) and time.monotonic() - t < 1.0:
            time.sleep(0.01)
        p1 = tree_ticks(self.pid)
        self.sample()
        res = {"wall_s": wall, "cpu_pct": None, "threads": {}}
        if self.p0 is not None and p1 is not None and wall > 0:
            res["cpu_pct"] = 100.0 * (p1 - self.p0) / CLK_TCK / wall
        per_name = {}
        for tid, (name, t1) in self.last.items():
            t0 = self.th0.get(tid, (name, 0))[1]
            name = re.sub(r"-\d+$", "", name)  # iou-wrk-1234 -> iou-wrk (io_uring's io-wq workers)
            per_name[name] = per_name.get(name, 0) + (t1 - t0)
        if wall > 0:
            res["threads"] = {
                n: round(100.0 * t / CLK_TCK / wall, 1) for n, t in sorted(per_name.items(), key=lambda kv: -kv[1]) if t > 0
            }
        return res


def sys_busy_ticks():
    """(busy, total) ticks over all CPUs from /proc/stat."""
    f = read_file("/proc/stat").splitlines()[0].split()[1:9]
    v = [int(x) for x in f]
    return sum(v) - v[3] - v[4], sum(v)


def children_cpu_s():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class Usage:
    """Machine-wide CPU during a measurement, split into ours (server + client children) and
    everybody else's (other processes on this shared machine: the noise indicator)."""

    def start(self):
        self.t0 = time.monotonic()
        self.b0 = sys_busy_ticks()[0]
        self.c0 = children_cpu_s()
        return self

    def stop(self, server_pct=None):
        wall = time.monotonic() - self.t0
        busy = (sys_busy_ticks()[0] - self.b0) / CLK_TCK
        client = children_cpu_s() - self.c0
        res = {"client_cpu_pct": 100.0 * client / wall if wall > 0 else None,
               "machine_busy_pct": 100.0 * busy / wall if wall > 0 else None}
        if wall > 0:
            res["other_cpu_pct"] = max(0.0, 100.0 * (busy - client) / wall - (server_pct or 0.0))
        return res


class Quiet:
    """Waits (within a total budget) until the machine is idle before a measurement."""

    def __init__(self, threshold_pct=15.0):
        self.budget, self.threshold = 0.0, threshold_pct  # budget: seconds left for the current section
        self.waited = 0.0
        self.gave_up = 0
        self.checks = 0

    def busy_pct(self, interval=0.5):
        b0, t0 = sys_busy_ticks()
        time.sleep(interval)
        b1, t1 = sys_busy_ticks()
        return 100.0 * (b1 - b0) / max(1, t1 - t0)  # percent of the whole machine

    def wait(self):
        self.checks += 1
        t = time.monotonic()
        while True:
            b = self.busy_pct()
            if b < self.threshold:
                break
            if time.monotonic() - t >= self.budget:
                self.gave_up += 1
                break
        dt = time.monotonic() - t
        self.waited += dt
        self.budget = max(0.0, self.budget - dt)
        return b


def rss_kib(pid, field="VmRSS"):
    for line in read_file(f"/proc/{pid}/status").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def disk_stat_path(path):
    """/sys/.../stat of the block device holding `path`, or None (tmpfs and other virtual filesystems)."""
    dev = os.stat(path).st_dev
    if os.major(dev) == 0:
        return None
    p = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat"
    return p if os.path.exists(p) else None


def settle_disk(path, quiet_s=1.0, limit_s=20.0):
    """Waits until the disk holding `path` has had no I/O in flight and no new writes for `quiet_s`
    (the previous copy's write-back must not slow the next one down). Returns the seconds waited."""
    stat = disk_stat_path(path)
    if stat is None:
        return 0.0
    t0 = time.monotonic()
    last, quiet_since = None, None
    while time.monotonic() - t0 < limit_s:
        with open(stat) as f:
            fields = f.read().split()
        writes, in_flight = int(fields[6]), int(fields[8])  # sectors written, I/Os in flight
        now = time.monotonic()
        if in_flight == 0 and writes == last:
            quiet_since = quiet_since or now
            if now - quiet_since >= quiet_s:
                break
        else:
            quiet_since = None
        last = writes
        time.sleep(0.1)
    return time.monotonic() - t0


def drop_caches(notes):
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as e:
        msg = f"could not drop the page cache ({e}); disk results include cached data"
        if msg not in notes:
            notes.append(msg)
        return False


def fmt_iops(x):
    if x is None:
        return "n/a"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.1f}"


def fmt_gbs(x):
    return "n/a" if x is None else f"{x / 1e9:.3f}"


def fmt_ratio(a, b):
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}×"


def fmt_us(ns):
    return "n/a" if ns is None else f"{ns / 1000:.0f}"


def fmt_pct(x):
    return "n/a" if x is None else f"{x:.0f}%"


def fmt_mib(kib):
    return "n/a" if kib is None else f"{kib / 1024:.1f} MiB"


def noise_line(records):
    """One line on other processes' CPU use during a section's measurements."""
    xs = [r.get("other_cpu_pct") for r in records if isinstance(r, dict) and r.get("other_cpu_pct") is not None]
    if not xs:
        return "- Other processes' CPU during these measurements: n/a"
    noisy = sum(1 for r in records if isinstance(r, dict) and r.get("noisy"))
    return (f"- Other processes' CPU during these measurements (noise): median {statistics.median(xs):.0f}% of a core, "
            f"max {max(xs):.0f}%" + (f"; {noisy} run(s) kept although others used > 25% of a core" if noisy else ""))


def top_threads(threads, n=4):
    if not threads:
        return "n/a"
    return ", ".join(f"{k} {v:.0f}%" for k, v in list(threads.items())[:n])


# --------------------------------------------------------------------------
# processes: everything we start is tracked and killed on exit

LIVE = []
LIVE_DAEMONS = []  # pids of servers that detached from us (nbd-server), killed on exit too
STOP_HANGS = []  # servers that needed SIGKILL


def pid_alive(pid):
    """Whether pid runs (a zombie does not count: a detached daemon is reaped by init)."""
    s = read_file(f"/proc/{pid}/stat")
    return bool(s) and s[s.rindex(")") + 2:].split()[0] not in ("Z", "X")


def kill_all():
    for p in list(LIVE):
        if p.poll() is None:
            try:
                p.kill()
                p.wait(timeout=10)
            except Exception:  # noqa: BLE001
                pass
        if p in LIVE:
            LIVE.remove(p)
    for pid in list(LIVE_DAEMONS):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        LIVE_DAEMONS.remove(pid)


def free_tcp_port():
    """A port on 127.0.0.1 that nobody listens on right now (a fresh one for every server start,
    so that no server meets the TIME_WAIT connections of the previous one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process listening on a Unix socket (`sock`) or on 127.0.0.1:`tcp`, maybe with a
    livemirror control socket (`ctl`); ready once every one of them accepts a connection. `uri` is
    what a client connects to. A server that daemonizes itself (nbd-server has no foreground mode
    that serves more than one connection) is given `pidfile`: the process started must exit 0,
    and the pid in the file is then the server."""

    def __init__(self, name, argv, sock, logpath, ctl=None, tcp=None, uri=None, pidfile=None):
        self.name, self.argv, self.sock, self.logpath, self.ctl = name, argv, sock, logpath, ctl
        self.tcp, self.uri, self.pidfile = tcp, uri, pidfile
        self.proc = None
        self.daemon_pid = None

    @property
    def pid(self):
        return self.daemon_pid if self.pidfile else self.proc.pid

    def _ready(self):
        return (all(p is None or _can_connect(p) for p in (self.sock, self.ctl))
                and (self.tcp is None or _can_connect_tcp(self.tcp)))

    def start(self, timeout=30):
        for p in (self.sock, self.ctl, self.pidfile):
            if p and os.path.exists(p):
                os.unlink(p)
        self.logf = open(self.logpath, "a")
        self.logf.write(f"\n=== {' '.join(self.argv)}\n")
        self.logf.flush()
        self.proc = subprocess.Popen(self.argv, stdout=self.logf, stderr=self.logf, stdin=subprocess.DEVNULL)
        LIVE.append(self.proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pidfile and self.daemon_pid is None:
                rc = self.proc.poll()
                if rc is not None and rc != 0:
                    self._cleanup()
                    raise RuntimeError(f"{self.name} exited with {rc}: {self.log_tail()}")
                pid = read_file(self.pidfile).strip()
                if rc == 0 and pid.isdigit():
                    self.daemon_pid = int(pid)
                    LIVE_DAEMONS.append(self.daemon_pid)
                time.sleep(0.02)
                continue
            if not self.running():
                self._cleanup()
                how = "exited" if self.pidfile else f"exited with {self.proc.returncode}"
                raise RuntimeError(f"{self.name} {how}: {self.log_tail()}")
            if self._ready():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout}s: {self.log_tail()}")

    def running(self):
        if self.pidfile:
            return self.daemon_pid is not None and pid_alive(self.daemon_pid)
        return self.proc.poll() is None

    def log_tail(self, n=3):
        lines = [ln for ln in read_file(self.logpath).splitlines() if ln.strip() and not ln.startswith("===")]
        return " | ".join(lines[-n:])

    def stop(self, timeout=20):
        if self.proc is None:
            return
        if self.running():
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.running() and time.monotonic() < deadline:
                if not self.pidfile:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(timeout=0.2)
                else:
                    time.sleep(0.02)
            if self.running():
                log(f"{self.name} did not stop on SIGTERM within {timeout}s; SIGKILL (threads: {self.threads_desc()})")
                STOP_HANGS.append(f"{self.name} (`{' '.join(self.argv[1:3])} ...`) did not exit within {timeout} s of "
                                  f"SIGTERM and was killed; threads: {self.threads_desc()}; last log: {self.log_tail(2)}")
                os.kill(self.pid, signal.SIGKILL)
                if self.pidfile:
                    while pid_alive(self.daemon_pid):
                        time.sleep(0.02)
                else:
                    self.proc.wait()
        if self.pidfile and self.daemon_pid is None and self.proc.poll() is None:
            self.proc.kill()  # never got as far as detaching
        if self.pidfile:
            self.proc.wait()
        self._cleanup()

    def threads_desc(self):
        out = []
        pid = self.pid
        try:
            for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
                comm = read_file(f"/proc/{pid}/task/{tid}/comm").strip()
                wchan = read_file(f"/proc/{pid}/task/{tid}/wchan").strip()
                state = read_file(f"/proc/{pid}/task/{tid}/stat")
                state = state[state.rindex(")") + 2:].split()[0] if state else "?"
                out.append(f"{comm}[{state}:{wchan}]")
        except (OSError, TypeError):
            pass
        return " ".join(out)

    def _cleanup(self):
        if self.proc in LIVE:
            LIVE.remove(self.proc)
        if self.daemon_pid in LIVE_DAEMONS:
            LIVE_DAEMONS.remove(self.daemon_pid)
        self.logf.close()
        for p in (self.sock, self.ctl, self.pidfile):
            if p and os.path.exists(p):
                os.unlink(p)  # a socket (or pid file) left behind by the server
        for p in (self.sock, self.ctl):
            assert not (p and os.path.exists(p)), f"socket {p} still there"


def _can_connect(path):
    if not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _can_connect_tcp(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class Control:
    """livemirror's control socket. Status is polled over the socket (one JSON line per
    request, see engine/src/control.rs) to keep polling cheap; if that ever fails the
    documented CLI (`livemirror status --json`) is used instead."""

    def __init__(self, lm, ctl):
        self.lm, self.ctl = lm, ctl
        self.sock = None
        self.cli_only = False

    def status(self):
        if not self.cli_only:
            try:
                if self.sock is None:
                    self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self.sock.settimeout(10)
                    self.sock.connect(self.ctl)
                    self.rf = self.sock.makefile("r")
                self.sock.sendall(b'{"cmd":"status"}\n')
                r = json.loads(self.rf.readline())
                if r.get("ok") and isinstance(r.get("status"), dict):
                    return r["status"]
            except (OSError, ValueError):
                pass
            self.close()
            self.cli_only = True
        r = sh([self.lm, "status", "--json", "--control", self.ctl], check=False)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def cli(self, *args):
        r = sh([self.lm, *args, "--control", self.ctl], check=False)
        if r.returncode != 0:
            raise RuntimeError(f"livemirror {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
        return r.stdout

    def close(self):
        if self.sock is not None:
            try:
                self.rf.close()  # the file object holds the socket open too
                self.sock.close()
            except OSError:
                pass
        self.sock = None


class StatusPoller(threading.Thread):
    """Samples (monotonic time, status) every `interval` s in the background."""

    def __init__(self, lm, ctl, interval):
        super().__init__(daemon=True)
        self.c = Control(lm, ctl)
        self.interval = interval
        self.samples = []
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            try:
                st = self.c.status()
            except Exception:  # noqa: BLE001
                st = None
            if st is not None:
                self.samples.append((time.monotonic(), st))
            self.halt.wait(self.interval)
        self.c.close()

    def stop(self):
        self.halt.set()
        self.join()
        return self.samples


def event_time(status, prefix):
    """unix_time of the last event whose message starts with prefix."""
    t = None
    for ev in (status or {}).get("events", []) or []:
        if str(ev.get("message", "")).startswith(prefix):
            t = ev.get("unix_time")
    return t


# --------------------------------------------------------------------------
# fio


def run_fio(uri, rw, bs, iodepth, numjobs, runtime, size=None, timeout_extra=120, meter_pid=None):
    argv = [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
        f"--iodepth={iodepth}", f"--numjobs={numjobs}", "--group_reporting", "--time_based",
        f"--runtime={runtime}", "--output-format=json",
    ]
    if size:
        argv.append(f"--size={size}")
    meter = CpuMeter(meter_pid).start() if meter_pid else None
    usage = Usage().start()
    t0 = time.monotonic()
    try:
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=runtime + timeout_extra)
    except subprocess.TimeoutExpired:
        return {"error": "fio timed out", "argv": argv}
    wall = time.monotonic() - t0
    cpu = meter.stop() if meter else None
    res = {"argv": argv, "wall_s": wall, "server_cpu": cpu}
    res.update(usage.stop((cpu or {}).get("cpu_pct")))
    out = r.stdout
    if "{" not in out:
        res["error"] = f"fio exit {r.returncode}: {r.stderr.strip()[-300:]}"
        return res
    try:
        d = json.loads(out[out.index("{"):])
    except ValueError as e:
        res["error"] = f"fio JSON: {e}; stderr: {r.stderr.strip()[-300:]}"
        return res
    j = d["jobs"][0]
    if j.get("error") or r.returncode != 0:
        res["error"] = f"fio job error {j.get('error')} exit {r.returncode}: {r.stderr.strip()[-300:]}"
    io = j["write"] if "write" in rw else j["read"]
    pct = (io.get("clat_ns") or {}).get("percentile") or {}
    res.update({
        "iops": io["iops"],
        "bw_bytes": io["bw_bytes"],
        "clat_p50_ns": pct.get("50.000000"),
        "clat_p99_ns": pct.get("99.000000"),
        "clat_mean_ns": (io.get("clat_ns") or {}).get("mean"),
        "fio_cpu_pct": res.get("client_cpu_pct"),
        "runtime_ms": j.get("job_runtime") or io.get("runtime"),
    })
    return res


def fio_medians(runs):
    ok = [r for r in runs if "iops" in r and not r.get("error")]
    errs = [r["error"] for r in runs if r.get("error")]
    m = {
        "n": len(ok),
        "iops": median([r["iops"] for r in ok]),
        "bw_bytes": median([r["bw_bytes"] for r in ok]),
        "clat_p50_ns": median([r.get("clat_p50_ns") for r in ok]),
        "clat_p99_ns": median([r.get("clat_p99_ns") for r in ok]),
        "server_cpu_pct": median([(r.get("server_cpu") or {}).get("cpu_pct") for r in ok]),
        "fio_cpu_pct": median([r.get("fio_cpu_pct") for r in ok]),
        "other_cpu_pct": median([r.get("other_cpu_pct") for r in ok]),
        "other_cpu_max_pct": max([r.get("other_cpu_pct") or 0 for r in ok], default=None),
        "errors": errs,
    }
    # thread breakdown of the median run (by iops)
    if ok:
        mid = sorted(ok, key=lambda r: r["iops"])[len(ok) // 2]
        m["server_threads"] = (mid.get("server_cpu") or {}).get("threads")
    return m


# --------------------------------------------------------------------------
# the harness

READ_BASELINE_DEEP = "read-only baseline (2 MiB huge-page buffers × 16)"


def hugepage_read(path, chunk, depth, direct):
    """Reads `path` from start to end the way livemirror's copier reads its source: `depth`
    threads, each with a `chunk`-byte buffer of its own on transparent huge pages (an anonymous
    mapping aligned to 2 MiB, MADV_HUGEPAGE), O_DIRECT if `direct`. A disk that is bound by
    requests per second (this machine's virtual disk is) delivers per request what one
    physically contiguous buffer holds, so this is the source's ceiling for a copier that
    reads like that; `dd` (one 1 MiB buffer of ordinary pages, split into ~1 MiB requests) and
    fio (the same pages) stay far below it there. Returns (bytes read, seconds)."""
    hp = 2 * MiB
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    size = os.fstat(fd).st_size
    lock, state, errors = threading.Lock(), {"next": 0, "bytes": 0}, []
    bufs = []
    for _ in range(depth):
        m = mmap.mmap(-1, chunk + hp, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        c = ctypes.c_char.from_buffer(m)
        off = (-ctypes.addressof(c)) % hp
        del c
        if hasattr(mmap, "MADV_HUGEPAGE"):
            m.madvise(mmap.MADV_HUGEPAGE, off, chunk)
        buf = memoryview(m)[off:off + chunk]
        buf[:] = bytes(chunk)  # fault the pages in before the clock starts (the copier pools its buffers)
        bufs.append(buf)

    def worker(buf):
        try:
            while True:
                with lock:
                    pos = state["next"]
                    state["next"] += chunk
                if pos >= size:
                    return
                n = os.preadv(fd, [buf[:min(chunk, size - pos)]], pos)
                with lock:
                    state["bytes"] += n
        except OSError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=worker, args=(b,)) for b in bufs]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.monotonic() - t0
    os.close(fd)
    if errors:
        raise OSError(errors[0])
    return state["bytes"], dt


class Bench:
    def __init__(self, args):
        self.a = args
        self.quick = args.quick
        self.reps = args.reps if args.reps else (1 if args.quick else 5)
        self.runtime = 3 if args.quick else 10
        self.repo = args.repo
        self.lm = os.path.join(self.repo, "target/release/livemirror")
        for d in os.listdir("/tmp"):  # log directories of earlier runs whose harness is gone
            m = re.fullmatch(r"lmbench\.(\d+)", d)
            if m and not os.path.exists(f"/proc/{m.group(1)}"):
                shutil.rmtree(os.path.join("/tmp", d), ignore_errors=True)
        tag = f"lmbench.{os.getpid()}"
        self.run_dir = os.path.join("/tmp", tag)  # sockets, logs (short paths)
        self.shm = os.path.join(args.tmpfs_dir, tag)
        self.disk = os.path.join(args.disk_dir, tag)
        for d in (self.run_dir, self.shm, self.disk):
            os.makedirs(d, exist_ok=True)
        self.sock = os.path.join(self.run_dir, "nbd.sock")
        self.ctl = os.path.join(self.run_dir, "ctl.sock")
        self.uri = f"nbd+unix:///?socket={self.sock}"
        self.notes = []
        self.results = {}
        # waiting for a quiet machine before each measurement, and re-running a measurement
        # during which other processes used more than NOISE_PCT of a core, both within budgets
        # per-section budgets (so that the first section cannot use them all up):
        # seconds of waiting for a quiet machine, and re-runs of noisy measurements
        self.quiet = Quiet()
        self.budgets = ({"A": (20, 3), "A2": (20, 3), "B": (10, 2), "C": (5, 1), "D": (3, 0), "E": (5, 1)} if args.quick else
                        {"A": (40, 6), "A2": (40, 6), "B": (20, 4), "C": (15, 3), "D": (5, 0), "E": (15, 2)})
        self.retries_left = 0
        self.retried = 0
        self.noisy_kept = 0

    NOISE_PCT = 25.0

    @contextlib.contextmanager
    def realtime(self):
        """With --rt: SCHED_RR for the harness during a section, inherited by every server,
        client and copy tool it starts. Other work on the machine then gets only what the
        kernel's RT throttling leaves (5%), so it is opt-in."""
        if not self.a.rt:
            yield
            return
        old = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(10))
        try:
            yield
        finally:
            os.sched_setscheduler(0, old[0], old[1])

    def measure(self, fn):
        """Run fn() (which returns a record with other_cpu_pct) after waiting for a quiet
        machine; repeat it once if other processes were busy during it."""
        for attempt in range(2):
            self.quiet.wait()
            rec = fn()
            noisy = (rec.get("other_cpu_pct") or 0) > self.NOISE_PCT
            if noisy and attempt == 0 and self.retries_left > 0 and not rec.get("error"):
                self.retries_left -= 1
                self.retried += 1
                log(f"  (other processes used {rec['other_cpu_pct']:.0f}% of a core during that run; repeating it)")
                continue
            if noisy:
                rec["noisy"] = True
                self.noisy_kept += 1
            return rec

    # -------- files

    def random_file(self, path, size):
        """Fill path with `size` bytes from /dev/urandom, two dd processes in parallel."""
        half = size // 2 // MiB
        procs = []
        with open(path, "wb") as f:
            f.truncate(size)
        for i in range(2):
            procs.append(subprocess.Popen(
                ["dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={half}", f"seek={i * half}",
                 "conv=notrunc", "status=none"]))
        for p in procs:
            if p.wait() != 0:
                raise RuntimeError("dd from /dev/urandom failed")

    def copy_file(self, src, dst, direct_out=False):
        argv = ["dd", f"if={src}", f"of={dst}", "bs=4M", "status=none"]
        if direct_out:
            argv.append("oflag=direct")
        sh(argv)

    def zero_file(self, path, size, direct=False):
        argv = ["dd", "if=/dev/zero", f"of={path}", "bs=4M", f"count={size // (4 * MiB)}", "status=none"]
        if direct:
            argv.append("oflag=direct")
        sh(argv)

    def rm(self, *paths):
        for p in paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    # -------- servers

    def lm_server(self, source, *extra, name="livemirror", listen=None, tcp=None, uri=None):
        argv = [self.lm, "serve", "--source", source, "--listen", listen or f"unix:{self.sock}", "--control", self.ctl,
                *extra]
        return Server(name, argv, None if tcp else self.sock, os.path.join(self.run_dir, "livemirror.log"),
                      ctl=self.ctl, tcp=tcp, uri=uri or self.uri)

    # -------- machine

    def fstype(self, path):
        """The type of the filesystem `path` is on, as the kernel reports it (statfs: "tmpfs",
        "ext2/ext3", ...); findmnt -T lists every mount stacked on the mount point."""
        return sh(["stat", "-f", "-c", "%T", path], check=False).stdout.strip()

    def machine(self):
        cpu = "?"
        for line in read_file("/proc/cpuinfo").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kib = 0
        for line in read_file("/proc/meminfo").splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])

        def fs(path):
            r = sh(["findmnt", "-no", "FSTYPE,SOURCE", "-T", path], check=False)
            lines = r.stdout.strip().splitlines()
            return " on ".join(lines[0].split()) if lines else "?"

        git = sh(["git", "-C", self.repo, "rev-parse", "--short", "HEAD"], check=False).stdout.strip()
        dirty = sh(["git", "-C", self.repo, "status", "--porcelain", "--untracked-files=no"], check=False).stdout.strip()
        return {
            "cpu_model": cpu,
            "cores": os.cpu_count(),
            "ram_gib": round(mem_kib / 1024 / 1024, 1),
            "kernel": platform.release(),
            "disk_dir": self.a.disk_dir,
            "disk_fs": fs(self.a.disk_dir),
            "tmpfs_dir": self.a.tmpfs_dir,
            "tmpfs_fs": fs(self.a.tmpfs_dir),
            "loadavg_start": read_file("/proc/loadavg").split()[:3],
            "versions": {
                "livemirror": first_line([self.lm, "--version"]) + (f" (git {git}{', dirty tree' if dirty else ''})" if git else ""),
                "qemu-nbd": first_line(["qemu-nbd", "--version"]),
                "qemu-img": first_line(["qemu-img", "--version"]),
                "nbdkit": first_line(["nbdkit", "--version"]),
                "nbd-server": (first_line(["nbd-server", "-V"]).replace("This is ", "")
                               if shutil.which("nbd-server") else "nbd-server not installed"),
                "nbdcopy": first_line(["nbdcopy", "--version"]),
                "fio": first_line(["fio", "--version"]),
                "dd": first_line(["dd", "--version"]),
            },
        }

    # ======================================================================
    # A / A2. serving, over a Unix socket / over TCP loopback

    EXPORT = "bench"  # every server of section A serves this export name (nbd-server needs one)
    A_PEERS = ("qemu-nbd", "nbdkit-file", "nbd-server")
    # name, fio rw, bs, iodepth, numjobs, goal vs nbdkit-null (issue 17; every row also >= 1.0x the best peer)
    A_WORKLOADS = [
        ("4K randread QD32", "randread", "4k", 32, 1, 1.0),
        ("4K randwrite QD32", "randwrite", "4k", 32, 1, 1.0),
        ("1M seqread QD8", "read", "1m", 8, 1, 0.9),
        ("1M seqwrite QD8", "write", "1m", 8, 1, 0.85),
        ("4K randread QD32, numjobs=4", "randread", "4k", 32, 4, 1.0),
    ]
    A_PEER_GOAL = 1.0
    A_TRANSPORTS = {"A": "unix", "A2": "tcp"}

    def section_a(self):
        self._serving("A")

    def section_a2(self):
        self._serving("A2")

    def _endpoint(self, transport):
        """(Unix socket, TCP port, client URI) for one server start: a fresh port every time on TCP."""
        if transport == "unix":
            return self.sock, None, f"nbd+unix:///{self.EXPORT}?socket={self.sock}"
        port = free_tcp_port()
        return None, port, f"nbd://127.0.0.1:{port}/{self.EXPORT}"

    def _nbd_server_conf(self, src, sock, port):
        # nbd-server's own defaults otherwise (4 worker threads, no splice, a process per connection);
        # with unixsock set it does not listen on TCP at all
        listen = f"unixsock = {sock}" if sock else f"listenaddr = 127.0.0.1\n    port = {port}"
        return f"[generic]\n    {listen}\n[{self.EXPORT}]\n    exportname = {src}\n"

    def _a_servers(self, src, transport, qemu_cache, logp):
        """(name, factory) for every server of section A on one transport."""

        def livemirror():
            sock, port, uri = self._endpoint(transport)
            return self.lm_server(src, "--export-name", self.EXPORT, listen=f"unix:{sock}" if sock else f"tcp:127.0.0.1:{port}",
                                  tcp=port, uri=uri)

        def qemu():
            sock, port, uri = self._endpoint(transport)
            where = ["-k", sock] if sock else ["-b", "127.0.0.1", "-p", str(port)]
            return Server("qemu-nbd", ["qemu-nbd", *where, "-x", self.EXPORT, "-t", "-e", "8", f"--cache={qemu_cache}",
                                       "--aio=io_uring", "-f", "raw", src], sock, logp, tcp=port, uri=uri)

        def nbdkit(plugin, *args):
            def mk():
                sock, port, uri = self._endpoint(transport)
                where = ["-U", sock] if sock else ["-i", "127.0.0.1", "-p", str(port)]
                return Server(f"nbdkit-{plugin}", ["nbdkit", *where, "-f", plugin, *args], sock, logp, tcp=port, uri=uri)
            return mk

        def nbd_server():
            sock, port, uri = self._endpoint(transport)
            conf = os.path.join(self.run_dir, "nbd-server.conf")
            with open(conf, "w") as f:
                f.write(self._nbd_server_conf(src, sock, port))
            return Server("nbd-server", ["nbd-server", "-C", conf, "-p", os.path.join(self.run_dir, "nbd-server.pid")],
                          sock, logp, tcp=port, uri=uri, pidfile=os.path.join(self.run_dir, "nbd-server.pid"))

        servers = [("livemirror", livemirror), ("qemu-nbd", qemu), ("nbdkit-file", nbdkit("file", src))]
        if shutil.which("nbd-server"):
            servers.append(("nbd-server", nbd_server))
        servers.append(("nbdkit-null", nbdkit("null", "1G")))
        return servers

    def _serving(self, key):
        transport = self.A_TRANSPORTS[key]
        log(f"{key}: serving over {'a Unix socket' if transport == 'unix' else 'TCP loopback'}")
        src = os.path.join(self.shm, "a_src.img")
        sh(["dd", f"if={self.base}", f"of={src}", "bs=4M", "count=256", "status=none"])  # first 1 GiB
        logp = os.path.join(self.run_dir, "servers.log")
        qemu_cache = "none"
        # qemu-nbd needs O_DIRECT for --cache=none; check that it starts on this tmpfs
        probe = dict(self._a_servers(src, transport, qemu_cache, logp))["qemu-nbd"]()
        try:
            probe.start()
            probe.stop()
        except RuntimeError as e:
            qemu_cache = "writeback"
            self.notes.append(f"{key}: qemu-nbd --cache=none failed on {self.a.tmpfs_dir} ({e}); used --cache=writeback")
        servers = self._a_servers(src, transport, qemu_cache, logp)
        names = [s for s, _ in servers]
        if "nbd-server" not in names:
            self.notes.append(f"{key}: nbd-server is not installed; its column is empty")
        workloads = self.A_WORKLOADS
        raw = {s: {w[0]: [] for w in workloads} for s in names}
        commands = {}
        # Servers are interleaved per workload (a fresh server for every run, the order rotating),
        # so that whatever else happens on the machine hits every server about equally.
        for rep in range(self.reps):
            for wi, (wname, rw, bs, qd, nj, _) in enumerate(workloads):
                k = (rep + wi) % len(servers)
                for sname, mk in servers[k:] + servers[:k]:
                    srv = mk()
                    commands.setdefault(sname, " ".join(srv.argv))
                    try:
                        srv.start()
                    except RuntimeError as e:
                        log(f"{key}: {sname} failed to start: {e}")
                        raw[sname][wname].append({"error": str(e)})
                        continue
                    try:
                        r = self.measure(lambda: run_fio(srv.uri, rw, bs, qd, nj, self.runtime, meter_pid=srv.pid))
                    finally:
                        srv.stop()
                    raw[sname][wname].append(r)
                    log(f"{key} rep{rep + 1} {sname:12s} {wname:30s} "
                        + (f"{fmt_iops(r.get('iops'))} IOPS {fmt_gbs(r.get('bw_bytes'))} GB/s "
                           f"srv-cpu {fmt_pct((r.get('server_cpu') or {}).get('cpu_pct'))} "
                           f"fio-cpu {fmt_pct(r.get('client_cpu_pct'))} others {fmt_pct(r.get('other_cpu_pct'))}"
                           if not r.get("error") else r["error"]))
        self.rm(src)
        rows = []
        for wname, *_, null_goal in workloads:
            med = {s: fio_medians(raw[s][wname]) for s in names}
            lm, null = med["livemirror"]["iops"], med["nbdkit-null"]["iops"]
            peers = {s: med[s]["iops"] for s in self.A_PEERS if s in med and med[s]["iops"] is not None}
            best_name = max(peers, key=peers.get) if peers else None
            best = peers.get(best_name)
            vs_peer = lm / best if lm and best else None
            vs_null = lm / null if lm and null else None
            goal = None
            if vs_peer is not None and vs_null is not None:
                goal = vs_peer >= self.A_PEER_GOAL and vs_null >= null_goal
            rows.append({"workload": wname, "transport": transport, "median": med, "best_peer": best_name,
                         "ratio_vs_best_peer": vs_peer, "ratio_vs_null": vs_null,
                         "goal_vs_best_peer": self.A_PEER_GOAL, "goal_vs_null": null_goal, "goal_met": goal})
        self.results[key] = {"transport": transport, "qemu_nbd_cache": qemu_cache, "servers": names, "rows": rows,
                             "raw": raw, "runtime_s": self.runtime, "reps": self.reps, "commands": commands,
                             "export_name": self.EXPORT,
                             "nbd_server_conf": self._nbd_server_conf(src, self.sock if transport == "unix" else None,
                                                                      None if transport == "unix" else "PORT")}

    def md_a(self, key="A"):
        r = self.results[key]
        qc, tr = r["qemu_nbd_cache"], r["transport"]
        names = r["servers"]
        has_nbds = "nbd-server" in names
        if tr == "unix":
            head = f"## {key}. Serving over a Unix socket (NBD server; fio nbd engine)"
            where = (f"over a Unix socket (fio `--uri=nbd+unix:///{r['export_name']}?socket=S`; servers: livemirror "
                     "`--listen unix:S`, qemu-nbd `-k S`, nbdkit `-U S`, nbd-server `unixsock = S`)")
        else:
            head = f"## {key}. Serving over TCP loopback (127.0.0.1; fio nbd engine)"
            where = (f"over TCP to 127.0.0.1, a fresh port P for every run (fio `--uri=nbd://127.0.0.1:P/{r['export_name']}`; "
                     "servers: livemirror `--listen tcp:127.0.0.1:P`, qemu-nbd `-b 127.0.0.1 -p P`, nbdkit `-i 127.0.0.1 -p P`, "
                     "nbd-server `listenaddr = 127.0.0.1`, `port = P`)")
        peers_txt = ", ".join(p for p in self.A_PEERS if p in names)
        out = [
            head,
            "",
            f"1 GiB random-filled file on tmpfs, served {where}; a fresh server for every run, started when the previous "
            "one has exited and measured once it accepts a connection. "
            f"fio `--ioengine=nbd --numjobs=1 --time_based --runtime={r['runtime_s']}`, "
            f"median of {r['reps']} run(s). Every server exports the name `{r['export_name']}`. Servers: "
            f"`livemirror serve --export-name {r['export_name']}` (otherwise defaults), "
            f"`qemu-nbd -t -e 8 --cache={qc} --aio=io_uring -f raw -x {r['export_name']}`, `nbdkit -f file`, "
            + ("`nbd-server -C CONF` (the config names only the socket and the export's file, so its defaults: "
               "4 worker threads, no splice, a process forked per connection), " if has_nbds else "")
            + "`nbdkit -f null 1G` (client ceiling). Cells: IOPS / GB/s. Ratios are on IOPS (same as on bandwidth) vs "
            f"the best of {peers_txt} on the same transport, and vs nbdkit null. Goal (issue 17): every row ≥ "
            f"{self.A_PEER_GOAL:.1f}× the best peer, and vs null ≥ 1.0× for the 4K rows, ≥ 0.9× for 1M reads, ≥ 0.85× "
            "for 1M writes.",
            "",
            f"| transport | workload | livemirror | qemu-nbd (cache={qc}) | nbdkit file | nbd-server | nbdkit null (ceiling) | "
            "best peer | livemirror / best peer | livemirror / null | goal (peer, null) |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |",
        ]
        for row in r["rows"]:
            m = row["median"]

            def cell(s):
                if s not in m:
                    return "—"
                if m[s]["iops"] is None:
                    return "error" if m[s]["errors"] else "n/a"
                return f"{fmt_iops(m[s]['iops'])} / {fmt_gbs(m[s]['bw_bytes'])}"

            rv = f"{row['ratio_vs_best_peer']:.2f}×" if row["ratio_vs_best_peer"] else "n/a"
            rn = f"{row['ratio_vs_null']:.2f}×" if row["ratio_vs_null"] else "n/a"
            thr = f"≥ {row['goal_vs_best_peer']:.1f}×, ≥ {row['goal_vs_null']:.2f}×"
            if row["goal_met"] is None:
                goal = f"n/a ({thr})"
            elif row["goal_met"]:
                goal = f"met ({thr})"
            else:
                missed = [w for w, ok in (("peer", row["ratio_vs_best_peer"] >= row["goal_vs_best_peer"]),
                                          ("null", row["ratio_vs_null"] >= row["goal_vs_null"])) if not ok]
                goal = f"**not met**: {' and '.join(missed)} ({thr})"
            out.append(f"| {row.get('transport', tr)} | {row['workload']} | {cell('livemirror')} | {cell('qemu-nbd')} | "
                       f"{cell('nbdkit-file')} | {cell('nbd-server')} | {cell('nbdkit-null')} | {row['best_peer'] or 'n/a'} | "
                       f"**{rv}** | {rn} | {goal} |")
        met = [row["goal_met"] for row in r["rows"] if row["goal_met"] is not None]
        out += [
            "",
            f"- Goal met in {sum(met)} of {len(r['rows'])} rows" + (f" ({len(r['rows']) - len(met)} without data)"
                                                                    if len(met) < len(r["rows"]) else "") + ".",
            "",
            "Server CPU (% of one core, whole process with its children, median run) and fio's own CPU; livemirror's "
            "busiest threads:",
            "",
            "| transport | workload | livemirror | qemu-nbd | nbdkit file | nbd-server | nbdkit null | fio (vs livemirror) | "
            "livemirror threads |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for row in r["rows"]:
            m = row["median"]

            def cpu(s):
                return fmt_pct(m[s]["server_cpu_pct"]) if s in m else "—"

            out.append(f"| {row.get('transport', tr)} | {row['workload']} | {cpu('livemirror')} | {cpu('qemu-nbd')} | "
                       f"{cpu('nbdkit-file')} | {cpu('nbd-server')} | {cpu('nbdkit-null')} | "
                       f"{fmt_pct(m['livemirror']['fio_cpu_pct'])} | {top_threads(m['livemirror'].get('server_threads'))} |")
        out += ["", noise_line([x for srv in r["raw"].values() for runs in srv.values() for x in runs])]
        errs = [f"{s} / {row['workload']}: {e}" for row in r["rows"] for s, m in row["median"].items() for e in m["errors"]]
        if errs:
            out += ["", "Errors: " + "; ".join(errs[:8])]
        if r.get("commands"):
            out += ["", "Commands:", ""] + [f"- {s}: `{c}`" for s, c in r["commands"].items()]
            if has_nbds:
                conf = r["nbd_server_conf"].strip().replace("\n", "; ").replace("    ", "")
                out.append(f"- nbd-server config: `{conf}`")
        return out

    def md_a2(self):
        return self.md_a("A2")

    # ======================================================================
    # B. copying

    def section_b(self):
        log("B: copying")
        res = {}
        for where, d in (("disk", self.disk), ("tmpfs", self.shm)):
            S = os.path.join(d, "b_src.img")
            T = os.path.join(d, "b_tgt.img")
            log(f"B: preparing 2 GiB source and target on {where} ({d})")
            if where == "tmpfs":
                shutil.copyfile(self.base, S)
                self.zero_file(T, 2 * GiB)
            else:
                self.copy_file(self.base, S, direct_out=True)
                self.zero_file(T, 2 * GiB, direct=True)
            os.sync()
            res[where] = self._copy_methods(where, S, T, 2 * GiB)
            self.rm(S, T)
        self.results["B"] = res

    def _direct_ok(self, path):
        r = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", "count=1", "iflag=direct", "status=none"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return r.returncode == 0

    def _copy_methods(self, where, S, T, size):
        direct = self._direct_ok(S)
        notes = []
        if not direct:
            notes.append(f"O_DIRECT not supported on {where}: dd without iflag/oflag=direct, qemu-img -t/-T writeback, "
                         "livemirror --cache buffered")
        dflag_in = ["iflag=direct"] if direct else []
        dflag_out = ["oflag=direct"] if direct else []
        qcache = "none" if direct else "writeback"
        # livemirror runs with its default flags (`--cache auto`: O_DIRECT for files on disk
        # filesystems, the page cache for files in RAM); the mode auto should pick here gets
        # checked against what status reports, and the other mode is measured too
        ram_fs = self.fstype(S) in ("tmpfs", "ramfs")
        auto = "direct" if direct and not ram_fs else "buffered"
        other = "buffered" if auto == "direct" else ("direct" if direct else None)
        methods = {
            "read-only baseline (dd → /dev/null)": ("cmd", ["dd", f"if={S}", "of=/dev/null", "bs=1M", *dflag_in, "status=none"]),
            # dd reads 1 MiB at a time from ordinary pages; the copier keeps 16 × 2 MiB in flight
            # from huge pages: what the source delivers when read like that is the fairer ceiling
            READ_BASELINE_DEEP: ("own", [sys.executable, os.path.abspath(__file__), "--hugepage-read", S, str(2 * MiB),
                                         "16", "direct" if direct else "buffered"]),
            "dd": ("cmd", ["dd", f"if={S}", f"of={T}", "bs=1M", *dflag_in, *dflag_out, "conv=notrunc", "status=none"]),
            "qemu-img convert": ("cmd", ["qemu-img", "convert", "-n", "-t", qcache, "-T", qcache, "-W", "-m", "16",
                                         "-f", "raw", "-O", "raw", S, T]),
            "nbdcopy": ("cmd", ["nbdcopy", "--flush", S, T]),
            "livemirror sync": ("lm", None),
        }
        if other:
            methods[f"livemirror sync, --cache {other}"] = ("lm", other)
        raw = {m: [] for m in methods}
        names = list(methods)
        for rep in range(self.reps):
            # Rotated and, every other repetition, reversed: no method always runs right after the
            # same other one (a disk still writing back the previous copy slows the next).
            order = names[rep % len(names):] + names[:rep % len(names)]
            if rep % 2:
                order.reverse()
            for m in order:
                kind, spec = methods[m]
                drop_caches(self.notes)
                settled = settle_disk(S)
                if settled > 5:
                    log(f"B {where}: waited {settled:.1f} s for the disk to go quiet")
                if kind in ("cmd", "own"):
                    rec = self.measure(lambda: self._copy_cmd(spec, size, own_time=kind == "own"))
                else:
                    rec = self.measure(lambda: self._lm_sync(S, T, spec, size))
                raw[m].append(rec)
                log(f"B {where} rep{rep + 1} {m:38s} " + (f"{rec['gbs'] / 1e9:.3f} GB/s ({rec['seconds']:.2f} s)"
                                                           if "gbs" in rec else rec.get("error", "?")))
        med = {}
        for m in names:
            ok = [x for x in raw[m] if "gbs" in x]
            med[m] = {"gbs": median([x["gbs"] for x in ok]), "seconds": median([x["seconds"] for x in ok]),
                      "errors": [x["error"] for x in raw[m] if "error" in x]}
            if m.startswith("livemirror sync"):
                med[m]["internal_gbs"] = median([x.get("internal_gbs") for x in ok])
                med[m]["reported_copy_rate"] = median([x.get("reported_copy_rate") for x in ok])
                med[m]["server_cpu_pct"] = median([x.get("server_cpu_pct") for x in ok])
                for k in ("source_io", "target_io"):
                    seen = sorted({str(x[k]) for x in ok if x.get(k)})
                    med[m][k] = "/".join(seen) if seen else None
                ths = [x.get("threads") for x in ok if x.get("threads")]
                med[m]["threads"] = ths[len(ths) // 2] if ths else None
        peers = [med[m]["gbs"] for m in ("dd", "qemu-img convert", "nbdcopy") if med[m]["gbs"]]
        best = max(peers) if peers else None
        best_name = next((m for m in ("dd", "qemu-img convert", "nbdcopy") if best and med[m]["gbs"] == best), None)
        lm = med["livemirror sync"]
        if lm.get("source_io") and (lm["source_io"] != auto or lm.get("target_io") != auto):
            notes.append(f"`--cache auto` was expected to pick {auto} here (O_DIRECT {'works' if direct else 'fails'}, "
                         f"{'a RAM' if ram_fs else 'a disk'} filesystem) but status shows source_io {lm['source_io']}, "
                         f"target_io {lm.get('target_io')}")

        def ratio(a, b):
            return a / b if a and b else None

        baselines = [med[m]["gbs"] for m in ("read-only baseline (dd → /dev/null)", READ_BASELINE_DEEP) if med[m]["gbs"]]
        goals = {"vs_qemu_img": ratio(lm["gbs"], med["qemu-img convert"]["gbs"]),
                 "vs_read_baseline": ratio(lm["gbs"], max(baselines) if baselines else None),
                 "vs_dd_read": ratio(lm["gbs"], med["read-only baseline (dd → /dev/null)"]["gbs"]),
                 "vs_hugepage_read": ratio(lm["gbs"], med[READ_BASELINE_DEEP]["gbs"])}
        return {"raw": raw, "median": med, "best_peer": best_name, "best_peer_gbs": best, "notes": notes,
                "o_direct": direct, "ram_fs": ram_fs, "auto_expected": auto, "goals": goals,
                "commands": {m: (" ".join(s) if k in ("cmd", "own") else
                                 f"livemirror serve --source S{' --cache ' + s if s else ''}; livemirror attach T; "
                                 "poll status until synced")
                             for m, (k, s) in methods.items()}}

    def _copy_cmd(self, argv, size, own_time=False):
        """Runs a copy (or read) command, timed from start to exit; with own_time the command
        prints {"bytes", "seconds"} itself (the harness' own reader: its time without the
        interpreter's start)."""
        usage = Usage().start()
        t0 = time.monotonic()
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        dt = time.monotonic() - t0
        if r.returncode != 0:
            return {"error": f"exit {r.returncode}: {r.stderr.strip()[-300:]}"}
        rec = {"seconds": dt, "gbs": size / dt}
        if own_time:
            try:
                own = json.loads(r.stdout)
            except ValueError:
                return {"error": f"no result from {argv[2]}: {r.stdout.strip()[-200:]}"}
            if own.get("bytes") != size:
                return {"error": f"read {own.get('bytes')} bytes, not {size}"}
            rec = {"seconds": own["seconds"], "gbs": size / own["seconds"], "wall_seconds": dt}
        rec.update(usage.stop())
        return rec

    def _lm_sync(self, S, T, cache, size):
        srv = self.lm_server(S, *(["--cache", cache] if cache else []))
        try:
            srv.start()
        except RuntimeError as e:
            return {"error": str(e)}
        ctl = Control(self.lm, self.ctl)
        rec = {}
        try:
            drop_caches(self.notes)
            meter = CpuMeter(srv.pid).start()
            usage = Usage().start()
            t0 = time.monotonic()
            t0_unix = time.time()
            ctl.cli("attach", T)
            rates = []
            st = None
            deadline = t0 + 600
            while time.monotonic() < deadline:
                st = ctl.status()
                if st is None:
                    raise RuntimeError("status failed")
                if st.get("state") == "synced":
                    break
                if st.get("state") != "syncing" or st.get("error"):
                    raise RuntimeError(f"state {st.get('state')}, error {st.get('error')}")
                if st.get("copy_rate_bytes_per_sec"):
                    rates.append(st["copy_rate_bytes_per_sec"])
                meter.sample()
                time.sleep(0.05)
            polled_dt = time.monotonic() - t0
            cpu = meter.stop()
            if not st or st.get("state") != "synced":
                raise RuntimeError("not synced after 600 s")
            ta, ts = event_time(st, "attached"), event_time(st, "synced")
            # The copy ends when the daemon records `synced` (T flushed), not when the next
            # poll notices: the poll interval would add up to 50 ms to a sub-second copy.
            dt = (ts - t0_unix) if ts and ts > t0_unix else polled_dt
            rec = {"seconds": dt, "gbs": size / dt, "polled_seconds": polled_dt, "bytes_copied": st.get("bytes_copied"),
                   "internal_seconds": (ts - ta) if ta and ts else None,
                   "internal_gbs": size / (ts - ta) if ta and ts and ts > ta else None,
                   "reported_copy_rate": median(rates), "server_cpu_pct": cpu["cpu_pct"], "threads": cpu["threads"],
                   "source_io": st.get("source_io"), "target_io": st.get("target_io")}
            rec.update(usage.stop(cpu["cpu_pct"]))
        except Exception as e:  # noqa: BLE001
            rec = {"error": f"{e}; log: {srv.log_tail()}"}
        finally:
            ctl.close()
            srv.stop()
        return rec

    def md_b(self):
        r = self.results["B"]
        out = [
            "## B. Copying (2 GiB, random data; sync engine vs one-shot copy tools)",
            "",
            f"Source and target (pre-written, same size) in the same directory; page cache dropped before every run, "
            "and on the disk a wait until it has had no I/O for 1 s (the previous copy's write-back); the order of the "
            f"methods is rotated and reversed between repetitions; median of {self.reps} run(s). livemirror: "
            "`serve --source S` with its default flags (`--cache auto`: O_DIRECT for files on disk filesystems, the page "
            "cache for files in RAM; the choice status reports as `source_io`/`target_io` is listed below) started first "
            "(not timed), then the "
            "wall time from just before `livemirror attach T` runs until the daemon records its `synced` event (T flushed; "
            "read from the event's timestamp, so the 50 ms status polling adds nothing); \"internal\" is the "
            "time between the daemon's own `attached` and `synced` events. The mode `auto` does not pick is measured too "
            "(`--cache buffered` on the disk, `--cache direct` on tmpfs, where the kernel emulates O_DIRECT). "
            "dd and qemu-img use O_DIRECT on both sides wherever it works. nbdcopy gets `--flush` (without it, a 2 GiB copy "
            "into the page cache never reaches the disk within the timed run). Goal (issue 17): livemirror with default "
            "flags ≥ 1.2× qemu-img convert on the disk and ≥ 0.95× the read-only baseline of the same disk, judged "
            "against the better of the two baselines: `dd` reads 1 MiB at a time from ordinary pages; the harness' own "
            "reader reads like the copier, 16 threads with a 2 MiB buffer each on transparent huge pages (O_DIRECT where "
            "it works; its time runs from the first read to the last, like livemirror's from `attach` to `synced`). A "
            "disk bound by requests per second, like this virtual one, gives each request what one physically "
            "contiguous buffer holds, so the two baselines can differ a lot there.",
            "",
            "| method | disk → disk GB/s | vs best peer | tmpfs → tmpfs GB/s | vs best peer |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        where = [w for w in ("disk", "tmpfs") if w in r]
        names = []
        for w in where:
            names += [m for m in r[w]["median"] if m not in names]

        def cell(w, m, key="gbs"):
            if w not in r or m not in r[w]["median"]:
                return "—", ""
            mm = r[w]["median"][m]
            v = mm.get(key)
            if v is None:
                return ("error" if mm.get("errors") else "n/a"), "n/a"
            return f"{v / 1e9:.3f}", fmt_ratio(v, r[w]["best_peer_gbs"])

        for m in names:
            d, dr = cell("disk", m)
            t, tr = cell("tmpfs", m)
            bold = m.startswith("livemirror sync")
            out.append(f"| {m} | {d} | {'**' + dr + '**' if bold and dr else dr} | {t} | {'**' + tr + '**' if bold and tr else tr} |")
            if m == "livemirror sync":
                d, dr = cell("disk", m, "internal_gbs")
                t, tr = cell("tmpfs", m, "internal_gbs")
                out.append(f"| ↳ same, internal time (attached → synced events) | {d} | {dr} | {t} | {tr} |")
                d, dr = cell("disk", m, "reported_copy_rate")
                t, tr = cell("tmpfs", m, "reported_copy_rate")
                out.append(f"| ↳ same, livemirror's `copy_rate_bytes_per_sec` (median while syncing) | {d} | {dr} | {t} | {tr} |")
        out.append("")
        for w in where:
            out.append(f"- {w}: best peer **{r[w]['best_peer'] or 'n/a'}**.")
            g = r[w].get("goals") or {}
            if g:
                def rt(x):
                    return fmt_ratio(x, 1) if x else "n/a"

                vq, vb = g.get("vs_qemu_img"), g.get("vs_read_baseline")
                both = f"vs dd {rt(g.get('vs_dd_read'))}, vs the huge-page reader {rt(g.get('vs_hugepage_read'))}"
                if w == "disk":
                    q = "n/a" if vq is None else ("met" if vq >= 1.2 else "**not met**")
                    b = "n/a" if vb is None else ("met" if vb >= 0.95 else "**not met**")
                    out.append(f"- {w}, livemirror sync (default flags): **{rt(vq)}** qemu-img convert (goal ≥ 1.2×: {q}), "
                               f"**{rt(vb)}** the better read-only baseline (goal ≥ 0.95×: {b}; {both}).")
                else:
                    out.append(f"- {w}, livemirror sync (default flags): {rt(vq)} qemu-img convert, {rt(vb)} the better "
                               f"read-only baseline ({both}).")
            for mname, mm in r[w]["median"].items():
                if mname.startswith("livemirror"):
                    io = (f"source_io {mm.get('source_io') or 'n/a'}, target_io {mm.get('target_io') or 'n/a'}; "
                          if "source_io" in mm else "")
                    out.append(f"- {w}, {mname}: {io}daemon CPU {fmt_pct(mm.get('server_cpu_pct'))} of one core "
                               f"({top_threads(mm.get('threads'))}).")
            for n in r[w]["notes"]:
                out.append(f"- {w}: {n}")
            for mname, mm2 in r[w]["median"].items():
                for e in mm2.get("errors", [])[:2]:
                    out.append(f"- {w}: {mname} error: {e}")
        out.append(noise_line([x for w in where for runs in r[w]["raw"].values() for x in runs]))
        out += ["", "Commands:", ""]
        for w in where:
            for mname, c in r[w]["commands"].items():
                out.append(f"- {w}, {mname}: `{c}`")
        return out

    # ======================================================================
    # C. foreground latency during a sync

    def section_c(self):
        log("C: foreground latency during a sync")
        S = os.path.join(self.shm, "c_src.img")
        T = os.path.join(self.shm, "c_tgt.img")
        size = 4 * GiB
        with open(S, "wb") as out:
            for _ in range(2):
                with open(self.base, "rb") as inp:
                    shutil.copyfileobj(inp, out, 16 * MiB)
        conds = [("idle (no target)", [], False), ("during sync, default settings", [], True),
                 ("during sync, serve --max-rate 200M", ["--max-rate", "200M"], True)]
        # --floors: the same load with other copy floors (how fast the copy could go under load,
        # and what that costs the writers), alternating with the rows above
        for f in (self.a.floors.split(",") if self.a.floors else []):
            conds.append((f"during sync, serve --min-rate {f}", ["--min-rate", f], True))
        raw = {c[0]: [] for c in conds}
        for rep in range(self.reps):
            for cname, extra, sync in conds:
                rec = self.measure(lambda: self._c_run(S, T, size, extra, sync))
                raw[cname].append(rec)
                log(f"C rep{rep + 1} {cname:38s} " + (
                    f"{fmt_iops(rec.get('iops'))} IOPS p50 {fmt_us(rec.get('clat_p50_ns'))} us "
                    f"p99 {fmt_us(rec.get('clat_p99_ns'))} us copy {fmt_gbs(rec.get('copy_rate'))} GB/s "
                    f"synced_at {rec.get('synced_after_s')}" if not rec.get("error") else rec["error"]))
        self.rm(S)
        med = {}
        for cname, *_ in conds:
            runs = raw[cname]
            m = fio_medians(runs)
            ok = [x for x in runs if "iops" in x and not x.get("error")]
            m["copy_rate"] = median([x.get("copy_rate") for x in ok])
            m["copy_bytes"] = median([x.get("copy_bytes") for x in ok])
            m["reported_copy_rate"] = median([x.get("reported_copy_rate") for x in ok])
            sa = [x.get("synced_after_s") for x in ok if x.get("synced_after_s") is not None]
            m["synced_after_s"] = median(sa) if sa else None
            m["synced_runs"] = len(sa)
            med[cname] = m
        self.results["C"] = {"raw": raw, "median": med, "idle": conds[0][0], "runtime_s": self.runtime, "reps": self.reps}

    def _c_run(self, S, T, size, extra, sync):
        srv = self.lm_server(S, *extra)
        rec = {}
        poller = None
        try:
            srv.start()
            if sync:
                self.rm(T)
                with open(T, "wb") as f:
                    f.truncate(size)
                poller = StatusPoller(self.lm, self.ctl, 0.1)
                poller.start()
                Control(self.lm, self.ctl).cli("attach", T)
            t0 = time.monotonic()
            rec = run_fio(self.uri, "randwrite", "4k", 32, 1, self.runtime, meter_pid=srv.pid)
            t1 = time.monotonic()
            if poller:
                samples = poller.stop()
                poller = None
                rec.update(self._copy_window(samples, t0, t1))
            if sync:
                try:
                    Control(self.lm, self.ctl).cli("detach-target")
                except RuntimeError as e:
                    rec["detach_error"] = str(e)
        except Exception as e:  # noqa: BLE001
            rec = {"error": f"{e}; log: {srv.log_tail()}"}
        finally:
            if poller:
                poller.stop()
            srv.stop()
            self.rm(T)
        return rec

    def _copy_window(self, samples, t0, t1):
        """Copy progress within [t0, t1] from status samples."""
        if not samples:
            return {}
        before = [s for s in samples if s[0] <= t0]
        within = [s for s in samples if t0 <= s[0] <= t1]
        a = before[-1] if before else samples[0]
        b = within[-1] if within else samples[-1]
        res = {}
        if b[0] > a[0]:
            res["copy_bytes"] = b[1].get("bytes_copied", 0) - a[1].get("bytes_copied", 0)
            res["copy_rate"] = res["copy_bytes"] / (b[0] - a[0])
        rates = [s[1].get("copy_rate_bytes_per_sec") for s in within
                 if s[1].get("state") == "syncing" and s[1].get("copy_rate_bytes_per_sec")]
        res["reported_copy_rate"] = median(rates)
        synced = [s for s in within if s[1].get("state") == "synced"]
        res["synced_after_s"] = round(synced[0][0] - t0, 2) if synced else None
        res["state_at_end"] = b[1].get("state")
        return res

    def md_c(self):
        r = self.results["C"]
        idle = r["median"][r["idle"]]
        out = [
            "## C. Foreground latency during a sync",
            "",
            f"livemirror serving a 4 GiB random-filled tmpfs file; fio 4K randwrite QD32 (nbd engine, numjobs=1) for "
            f"{r['runtime_s']} s; in the sync rows `livemirror attach` of a sparse 4 GiB tmpfs target right before fio starts. "
            f"Median of {r['reps']} run(s). Copy rate = `bytes_copied` delta over the fio run (status polled every 100 ms). "
            "Goal: p99 during sync ≤ 2× idle while the copy progresses.",
            "",
            "| condition | IOPS | p50 µs | p99 µs | IOPS vs idle | p99 vs idle | copy rate during run (GB/s) | synced before fio ended | goal |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        ]
        for cname, m in r["median"].items():
            is_idle = cname == r["idle"]
            goal = ""
            if not is_idle and m["clat_p99_ns"] and idle["clat_p99_ns"]:
                ok = m["clat_p99_ns"] <= 2 * idle["clat_p99_ns"] and (m["copy_rate"] or 0) > 0
                goal = "met" if ok else "**not met**"
                noisy = any(x.get("noisy") for c in (cname, r["idle"]) for x in r["raw"][c])
                if noisy:
                    goal += " (noisy runs: unreliable)"
            synced = "" if is_idle else (
                f"{m['synced_runs']}/{m['n']} runs (median at {m['synced_after_s']} s)" if m["synced_runs"] else "no")
            out.append(
                f"| {cname} | {fmt_iops(m['iops'])} | {fmt_us(m['clat_p50_ns'])} | {fmt_us(m['clat_p99_ns'])} | "
                f"{'' if is_idle else fmt_ratio(m['iops'], idle['iops'])} | "
                f"{'' if is_idle else '**' + fmt_ratio(m['clat_p99_ns'], idle['clat_p99_ns']) + '**'} | "
                f"{'' if is_idle else fmt_gbs(m['copy_rate'])} | {synced} | {goal} |")
        out.append("")
        for cname, m in r["median"].items():
            out.append(f"- {cname}: daemon CPU {fmt_pct(m['server_cpu_pct'])} ({top_threads(m.get('server_threads'))}), "
                       f"fio CPU {fmt_pct(m['fio_cpu_pct'])}"
                       + ("" if cname == r["idle"] else f", livemirror's own copy_rate median {fmt_gbs(m['reported_copy_rate'])} GB/s")
                       + (f"; errors: {'; '.join(m['errors'][:2])}" if m["errors"] else ""))
        out.append(noise_line([x for runs in r["raw"].values() for x in runs]))
        return out

    # ======================================================================
    # D. memory

    def section_d(self):
        log("D: memory")
        S = os.path.join(self.shm, "d_src_1T.img")
        T = os.path.join(self.disk, "d_tgt_1T.img")
        for p in (S, T):
            with open(p, "wb") as f:
                f.truncate(1 << 40)
        res = {"region_size": "64K", "buffer_budget": "256M (default)", "target_dir": self.a.disk_dir}
        srv = self.lm_server(S, "--region-size", "64K")
        try:
            srv.start()
            time.sleep(2)
            res["idle_rss_kib"] = rss_kib(srv.pid)
            ctl = Control(self.lm, self.ctl)
            ctl.cli("attach", T)
            peak = 0
            t_end = time.monotonic() + 5
            while time.monotonic() < t_end:
                peak = max(peak, rss_kib(srv.pid) or 0)
                time.sleep(0.1)
            res["attached_rss_kib"] = rss_kib(srv.pid)
            res["attached_peak_rss_kib"] = peak
            st = ctl.status() or {}
            res["attached_bytes_copied_5s"] = st.get("bytes_copied")
            res["attached_regions_discarded"] = st.get("regions_discarded")
            ctl.cli("detach-target")
            ctl.close()
            time.sleep(1)
            res["after_detach_rss_kib"] = rss_kib(srv.pid)
            res["hwm_kib_before_flood"] = rss_kib(srv.pid, "VmHWM")
        except Exception as e:  # noqa: BLE001
            res["error"] = f"{e}; log: {srv.log_tail()}"
        finally:
            srv.stop()
        self.rm(T)
        # the flood, on a fresh daemon so that VmHWM covers only it
        srv = self.lm_server(S, "--region-size", "64K")
        try:
            srv.start()
            samples = []
            halt = threading.Event()

            def sampler():
                while not halt.is_set():
                    v = rss_kib(srv.pid)
                    if v:
                        samples.append(v)
                    halt.wait(0.05)

            th = threading.Thread(target=sampler, daemon=True)
            th.start()
            # --size=2g: the writes stay within the first 2 GiB of the sparse tmpfs file
            self.quiet.wait()
            r = run_fio(self.uri, "write", "32m", 32, 4, 5, size="2g", meter_pid=srv.pid)
            halt.set()
            th.join()
            res["flood"] = {"iops": r.get("iops"), "bw_bytes": r.get("bw_bytes"), "error": r.get("error"),
                            "peak_rss_sampled_kib": max(samples) if samples else None,
                            "vmhwm_kib": rss_kib(srv.pid, "VmHWM"), "rss_after_kib": rss_kib(srv.pid)}
        except Exception as e:  # noqa: BLE001
            res["flood"] = {"error": f"{e}; log: {srv.log_tail()}"}
        finally:
            srv.stop()
        self.rm(S)
        self.results["D"] = res
        log(f"D: {json.dumps(res)}")

    def md_d(self):
        r = self.results["D"]
        fl = r.get("flood", {})
        out = [
            "## D. Memory (RSS of the livemirror daemon)",
            "",
            "1 TiB sparse source on tmpfs, `--region-size 64K` (16 Mi regions), default `--buffer-budget 256M`. "
            f"The 1 TiB sparse target lives in {r['target_dir']}. The flood runs on a freshly started daemon: "
            "fio `--rw=write --bs=32m --iodepth=32 --numjobs=4 --size=2g` for 5 s.",
            "",
            "| phase | VmRSS |",
            "| --- | ---: |",
            f"| idle, serving the 1 TiB export | {fmt_mib(r.get('idle_rss_kib'))} |",
            f"| 5 s after `attach` of a 1 TiB sparse target (peak sampled every 100 ms) | {fmt_mib(r.get('attached_rss_kib'))} "
            f"(peak {fmt_mib(r.get('attached_peak_rss_kib'))}) |",
            f"| after `detach-target` | {fmt_mib(r.get('after_detach_rss_kib'))} |",
            f"| 32 MiB write flood, 4 connections × QD32: peak sampled every 50 ms | {fmt_mib(fl.get('peak_rss_sampled_kib'))} |",
            f"| 32 MiB write flood: VmHWM (high-water mark) | {fmt_mib(fl.get('vmhwm_kib'))} |",
            "",
            f"- copied in the 5 s after attach: {fmt_gbs(r.get('attached_bytes_copied_5s'))} GB "
            f"(regions_discarded {r.get('attached_regions_discarded')}); flood throughput "
            f"{fmt_gbs(fl.get('bw_bytes'))} GB/s ({fl.get('iops') and round(fl['iops'], 1)} IOPS).",
            "- expected bound under the flood: budget 256 MiB + baseline; per connection at most a quarter of the budget.",
        ]
        for k in ("error",):
            if r.get(k):
                out.append(f"- error: {r[k]}")
        if fl.get("error"):
            out.append(f"- flood error: {fl['error']}")
        return out

    # ======================================================================
    # E. write-intent cost

    def section_e(self):
        log("E: write-intent cost")
        helptext = sh([self.lm, "serve", "--help"], check=False).stdout
        S = os.path.join(self.shm, "e_src.img")
        T = os.path.join(self.shm, "e_tgt.img")
        state = os.path.join(self.disk, "e_state.bin")
        sh(["dd", f"if={self.base}", f"of={S}", "bs=4M", "count=256", "status=none"])
        conds = [("synced, no --state", False), (f"synced, --state on {self.a.disk_dir}", True)]
        raw = {c[0]: [] for c in conds}
        na = None
        if "--state" not in helptext:
            na = "n/a (not implemented yet)"
        for rep in range(self.reps):
            for cname, use_state in conds:
                if use_state and na:
                    continue
                rec = self.measure(lambda: self._e_run(S, T, state, use_state))
                if rec.get("state_unsupported"):
                    na = f"n/a (not implemented yet: {rec['state_unsupported'][:120]})"
                    continue
                raw[cname].append(rec)
                log(f"E rep{rep + 1} {cname:40s} " + (
                    f"{fmt_iops(rec.get('iops'))} IOPS p99 {fmt_us(rec.get('clat_p99_ns'))} us"
                    if not rec.get("error") else rec["error"]))
        self.rm(S, T, state)
        med = {c: fio_medians(raw[c]) for c, _ in conds}
        self.results["E"] = {"raw": raw, "median": med, "na": na, "conds": [c for c, _ in conds]}

    def _e_run(self, S, T, state, use_state):
        self.rm(T, state)
        with open(T, "wb") as f:
            f.truncate(GiB)
        extra = ["--target", T] + (["--state", state] if use_state else [])
        srv = self.lm_server(S, *extra)
        rec = {}
        try:
            try:
                srv.start()
            except RuntimeError as e:
                if use_state:
                    return {"state_unsupported": str(e)}
                raise
            ctl = Control(self.lm, self.ctl)
            deadline = time.monotonic() + 120
            st = {}
            while time.monotonic() < deadline:
                st = ctl.status() or {}
                if st.get("state") == "synced":
                    break
                time.sleep(0.05)
            ctl.close()
            if st.get("state") != "synced":
                raise RuntimeError(f"not synced: {st.get('state')} {st.get('error')}")
            rec = run_fio(self.uri, "randwrite", "4k", 32, 1, self.runtime, meter_pid=srv.pid)
        except Exception as e:  # noqa: BLE001
            rec = {"error": f"{e}; log: {srv.log_tail()}"}
        finally:
            srv.stop()
        return rec

    def md_e(self):
        r = self.results["E"]
        c0, c1 = r["conds"]
        base = r["median"][c0]
        out = [
            "## E. Write-intent cost (`serve --state`)",
            "",
            f"1 GiB tmpfs source mirrored to a 1 GiB tmpfs target (`serve --target`, measured once `synced`, so every write "
            f"goes to both and needs its region's intent bit durable first); the state file is on the disk "
            f"({self.a.disk_dir}). fio 4K randwrite QD32 for {self.runtime} s, median of {self.reps} run(s).",
            "",
            "| condition | IOPS | p50 µs | p99 µs | IOPS vs no --state | p99 vs no --state |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            f"| {c0} | {fmt_iops(base['iops'])} | {fmt_us(base['clat_p50_ns'])} | {fmt_us(base['clat_p99_ns'])} | | |",
        ]
        if r["na"]:
            out.append(f"| {c1} | {r['na']} | | | | |")
        else:
            m = r["median"][c1]
            out.append(f"| {c1} | {fmt_iops(m['iops'])} | {fmt_us(m['clat_p50_ns'])} | {fmt_us(m['clat_p99_ns'])} | "
                       f"**{fmt_ratio(m['iops'], base['iops'])}** | {fmt_ratio(m['clat_p99_ns'], base['clat_p99_ns'])} |")
        out.append("")
        for c in r["conds"]:
            m = r["median"][c]
            out.append(f"- {c}: daemon CPU {fmt_pct(m['server_cpu_pct'])} ({top_threads(m.get('server_threads'))})"
                       + (f"; errors: {'; '.join(m['errors'][:2])}" if m["errors"] else ""))
        out.append(noise_line([x for runs in r["raw"].values() for x in runs]))
        return out

    # ======================================================================

    def run(self):
        t_start = time.monotonic()
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.mach = self.machine()
        log(f"machine: {self.mach['cpu_model']}, {self.mach['cores']} cores; mode {'quick' if self.quick else 'full'}")
        self.base = os.path.join(self.shm, "random_2G.img")
        log("generating 2 GiB of random data on tmpfs")
        self.random_file(self.base, 2 * GiB)
        for s in self.a.section_list:
            t = time.monotonic()
            self.quiet.budget, self.retries_left = self.budgets[s]
            try:
                with self.realtime():
                    getattr(self, f"section_{s.lower()}")()
            except Exception as e:  # noqa: BLE001
                log(f"section {s} failed: {e}")
                self.results[s] = {"failed": str(e)}
                kill_all()
            log(f"section {s} took {time.monotonic() - t:.0f} s")
        self.rm(self.base)
        self.mach["loadavg_end"] = read_file("/proc/loadavg").split()[:3]
        self.elapsed = time.monotonic() - t_start
        return self.write()

    def write(self):
        m = self.mach
        v = m["versions"]
        lines = [
            "# livemirror comparative benchmark",
            "",
            f"- Date (UTC): {self.started.strftime('%Y-%m-%d %H:%M')}; run took {self.elapsed / 60:.1f} min",
            f"- Command: `{os.environ.get('LMBENCH_CMDLINE') or ' '.join(sys.argv)}` "
            f"({'quick' if self.quick else 'full'} mode: {self.reps} repetition(s), {self.runtime} s fio runs; medians)",
            f"- Machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, kernel {m['kernel']}; "
            f"disk path {m['disk_dir']} ({m['disk_fs']}), tmpfs path {m['tmpfs_dir']} ({m['tmpfs_fs']})",
            f"- Load average at start {' '.join(m['loadavg_start'])}, at end {' '.join(m.get('loadavg_end', []))}",
            f"- Versions: {v['livemirror']}; {v['qemu-nbd']}; {v['qemu-img']}; {v['nbdkit']}; {v.get('nbd-server', 'nbd-server ?')}; "
            f"{v['nbdcopy']}; {v['fio']}; {v['dd']}",
            "- Client (fio) and servers share the same 2 cores: every number includes the client's CPU cost.",
            f"- Noise control: all benchmark processes ran at nice {self.a.nice_applied if self.a.nice_applied is not None else 0}"
            f"{' and under SCHED_RR (--rt)' if self.a.rt else ''}; "
            f"before each measurement the harness waited for the machine to be idle (< 15% busy; "
            f"{self.quiet.waited:.0f} s waited in all, {self.quiet.gave_up} time(s) gave up after the wait budget); "
            f"{self.retried} measurement(s) were repeated because other processes used > 25% of a core during them, "
            f"{self.noisy_kept} noisy one(s) kept.",
            "",
        ]
        for s in SECTIONS:
            if s not in self.results:
                continue
            if "failed" in self.results[s]:
                lines += [f"## {s}. failed", "", f"{self.results[s]['failed']}", ""]
                continue
            try:
                lines += getattr(self, f"md_{s.lower()}")()
            except Exception as e:  # noqa: BLE001
                lines += [f"## {s}. (report failed: {e})"]
            lines.append("")
        notes = self.notes + STOP_HANGS
        if notes:
            lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
        md = "\n".join(lines)
        out = self.a.out
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(md)
        jpath = os.path.splitext(out)[0] + ".json"
        with open(jpath, "w") as f:
            json.dump({"date_utc": self.started.isoformat(), "command": os.environ.get("LMBENCH_CMDLINE"),
                       "mode": "quick" if self.quick else "full", "reps": self.reps, "runtime_s": self.runtime,
                       "elapsed_s": self.elapsed, "machine": m, "notes": notes, "sections": self.results},
                      f, indent=1, default=str)
        print(md)
        log(f"wrote {out} and {jpath}")
        return 0

    def cleanup(self):
        kill_all()
        for d in (self.shm, self.disk):
            shutil.rmtree(d, ignore_errors=True)
        # keep the server logs; remove whatever else is in the run directory
        for name in os.listdir(self.run_dir):
            if not name.endswith(".log"):
                self.rm(os.path.join(self.run_dir, name))
        log(f"server logs kept in {self.run_dir}")


SECTIONS = ("A", "A2", "B", "C", "D", "E")  # result keys, in run order; "A" is the Unix socket pass


def parse_sections(spec):
    """Section keys for a --sections value: "A" = both serving passes, "A1" the Unix socket one
    (key "A"), "A2" the TCP one; B-E as they are. None if the value has anything else."""
    spec = spec.upper().replace(",", "").replace(" ", "")
    toks = re.findall(r"A[12]?|[B-E]", spec)
    if "".join(toks) != spec or not toks:
        return None
    keys = set()
    for t in toks:
        keys |= {"A": {"A", "A2"}, "A1": {"A"}}.get(t, {t})
    return [s for s in SECTIONS if s in keys]


def main():
    ap = argparse.ArgumentParser(description="livemirror comparative benchmark (see benches/compare/README.md)")
    ap.add_argument("--repo", default=os.path.abspath(os.path.join(os.path.dirname(__file__), "../..")))
    ap.add_argument("--quick", action="store_true", help="1 repetition, 3 s fio runs (~5 min)")
    ap.add_argument("--out", default=None, help="markdown output (default benches/compare/results/latest.md, "
                                                "with --quick quick.md); the JSON goes next to it")
    ap.add_argument("--sections", default="ABCDE",
                    help="sections to run (default all): A (serving: both passes, A1 over a Unix socket and A2 over TCP "
                         "loopback; name A1 or A2 alone for one of them), B, C, D, E")
    ap.add_argument("--reps", type=int, default=None,
                    help="repetitions per measurement (default 5, or 1 with --quick); the tables show medians")
    ap.add_argument("--disk-dir", default="/var/tmp", help="directory on a real disk for section B/D/E files")
    ap.add_argument("--tmpfs-dir", default="/dev/shm", help="tmpfs directory")
    ap.add_argument("--no-build", action="store_true", help="(run.sh) skip cargo build")
    ap.add_argument("--nice", type=int, default=-10,
                    help="scheduling niceness for the harness and everything it starts (default -10 when root: "
                         "the measured processes win over other work on a shared machine; 0 to leave as is)")
    ap.add_argument("--floors", default=None,
                    help="section C: also measure the sync under load with these copy floors (serve --min-rate), "
                         "comma-separated, e.g. 64M,128M,256M")
    ap.add_argument("--rt", action="store_true",
                    help="run the measurements under SCHED_RR (much less noise from other work on the machine, "
                         "which starves meanwhile; needs root)")
    a = ap.parse_args()
    a.section_list = parse_sections(a.sections)
    if a.section_list is None:
        print(f"--sections {a.sections!r}: expected letters among A B C D E, or A1 / A2 (e.g. ABCDE, A2, A1B)",
              file=sys.stderr)
        return 2
    if a.out is None:
        # a quick run must not replace the full run's results, which README's tables come from
        a.out = os.path.join(a.repo, "benches/compare/results", "quick.md" if a.quick else "latest.md")
    missing = [t for t in ("fio", "qemu-nbd", "qemu-img", "nbdkit", "nbdcopy", "dd", "findmnt") if not shutil.which(t)]
    if missing:
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    if not os.path.exists(os.path.join(a.repo, "target/release/livemirror")):
        print("target/release/livemirror not built (run cargo build --release)", file=sys.stderr)
        return 2
    a.nice_applied = None
    if a.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, a.nice)
            a.nice_applied = a.nice
        except OSError as e:
            print(f"note: could not set niceness {a.nice}: {e}", file=sys.stderr)
    b = Bench(a)

    def on_signal(signum, _frame):
        b.cleanup()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return b.run()
    finally:
        b.cleanup()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--hugepage-read"]:  # section B's read-only baseline, run as a command of its own
        n, secs = hugepage_read(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "direct")
        print(json.dumps({"bytes": n, "seconds": secs}))
        sys.exit(0)
    sys.exit(main())
