#!/usr/bin/env python3
"""Comparative benchmark harness for livemirror (driven by benches/compare/run.sh).

Sections (see README.md next to this file):
  A  serving: fio (nbd engine) against livemirror, qemu-nbd, nbdkit file, nbdkit null
  B  copying: dd / qemu-img convert / nbdcopy vs livemirror attach+sync (disk and tmpfs)
  C  foreground latency of 4K random writes while a sync runs
  D  memory: RSS with a 1 TiB export, after attach, under a 32 MiB write flood
  E  write-intent cost: 4K random writes in state synced with and without --state

Only the Python standard library is used. Needs root for drop_caches.
"""

import argparse
import contextlib
import datetime
import json
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


def proc_ticks(pid):
    """utime+stime of a process (all threads, including exited ones), in ticks."""
    s = read_file(f"/proc/{pid}/stat")
    if not s:
        return None
    f = s[s.rindex(")") + 2:].split()
    return int(f[11]) + int(f[12])


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
    """CPU used by a process (total and per thread name) between start() and stop()."""

    def __init__(self, pid):
        self.pid = pid

    def start(self):
        self.t0 = time.monotonic()
        self.p0 = proc_ticks(self.pid)
        self.th0 = thread_ticks(self.pid)
        self.last = dict(self.th0)
        return self

    def sample(self):
        """Remember per-thread times now (threads that exit before stop() keep their share)."""
        self.last.update(thread_ticks(self.pid))

    def stop(self):
        wall = time.monotonic() - self.t0
        p1 = proc_ticks(self.pid)
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
STOP_HANGS = []  # servers that needed SIGKILL


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


class Server:
    """A server process listening on a Unix socket (and maybe a livemirror control socket)."""

    def __init__(self, name, argv, sock, logpath, ctl=None):
        self.name, self.argv, self.sock, self.logpath, self.ctl = name, argv, sock, logpath, ctl
        self.proc = None

    @property
    def pid(self):
        return self.proc.pid

    def start(self, timeout=30):
        for p in (self.sock, self.ctl):
            if p and os.path.exists(p):
                os.unlink(p)
        self.logf = open(self.logpath, "a")
        self.logf.write(f"\n=== {' '.join(self.argv)}\n")
        self.logf.flush()
        self.proc = subprocess.Popen(self.argv, stdout=self.logf, stderr=self.logf, stdin=subprocess.DEVNULL)
        LIVE.append(self.proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._cleanup()
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            if all(p is None or _can_connect(p) for p in (self.sock, self.ctl)):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout}s: {self.log_tail()}")

    def log_tail(self, n=3):
        lines = [ln for ln in read_file(self.logpath).splitlines() if ln.strip() and not ln.startswith("===")]
        return " | ".join(lines[-n:])

    def stop(self, timeout=20):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop on SIGTERM within {timeout}s; SIGKILL (threads: {self.threads_desc()})")
                STOP_HANGS.append(f"{self.name} (`{' '.join(self.argv[1:3])} ...`) did not exit within {timeout} s of "
                                  f"SIGTERM and was killed; threads: {self.threads_desc()}; last log: {self.log_tail(2)}")
                self.proc.kill()
                self.proc.wait()
        self._cleanup()

    def threads_desc(self):
        out = []
        pid = self.proc.pid
        try:
            for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
                comm = read_file(f"/proc/{pid}/task/{tid}/comm").strip()
                wchan = read_file(f"/proc/{pid}/task/{tid}/wchan").strip()
                state = read_file(f"/proc/{pid}/task/{tid}/stat")
                state = state[state.rindex(")") + 2:].split()[0] if state else "?"
                out.append(f"{comm}[{state}:{wchan}]")
        except OSError:
            pass
        return " ".join(out)

    def _cleanup(self):
        if self.proc in LIVE:
            LIVE.remove(self.proc)
        self.logf.close()
        for p in (self.sock, self.ctl):
            if p and os.path.exists(p):
                os.unlink(p)  # a socket left behind by the server
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
        self.budgets = ({"A": (20, 3), "B": (10, 2), "C": (5, 1), "D": (3, 0), "E": (5, 1)} if args.quick else
                        {"A": (40, 6), "B": (20, 4), "C": (15, 3), "D": (5, 0), "E": (15, 2)})
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

    def lm_server(self, source, *extra, name="livemirror"):
        argv = [self.lm, "serve", "--source", source, "--listen", f"unix:{self.sock}", "--control", self.ctl, *extra]
        return Server(name, argv, self.sock, os.path.join(self.run_dir, "livemirror.log"), ctl=self.ctl)

    # -------- machine

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
                "nbdcopy": first_line(["nbdcopy", "--version"]),
                "fio": first_line(["fio", "--version"]),
                "dd": first_line(["dd", "--version"]),
            },
        }

    # ======================================================================
    # A. serving

    def section_a(self):
        log("A: serving")
        src = os.path.join(self.shm, "a_src.img")
        sh(["dd", f"if={self.base}", f"of={src}", "bs=4M", "count=256", "status=none"])  # first 1 GiB
        logp = os.path.join(self.run_dir, "servers.log")
        qemu_cache = "none"
        # qemu-nbd needs O_DIRECT for --cache=none; check that it starts on this tmpfs
        probe = Server("qemu-nbd", ["qemu-nbd", "-k", self.sock, "-t", "-e", "8", "--cache=none", "--aio=io_uring",
                                    "-f", "raw", src], self.sock, logp)
        try:
            probe.start()
            probe.stop()
        except RuntimeError as e:
            qemu_cache = "writeback"
            self.notes.append(f"A: qemu-nbd --cache=none failed on {self.a.tmpfs_dir} ({e}); used --cache=writeback")
        servers = [
            ("livemirror", lambda: self.lm_server(src)),
            (f"qemu-nbd", lambda: Server("qemu-nbd", ["qemu-nbd", "-k", self.sock, "-t", "-e", "8",
                                                      f"--cache={qemu_cache}", "--aio=io_uring", "-f", "raw", src],
                                         self.sock, logp)),
            ("nbdkit-file", lambda: Server("nbdkit-file", ["nbdkit", "-U", self.sock, "-f", "file", src], self.sock, logp)),
            ("nbdkit-null", lambda: Server("nbdkit-null", ["nbdkit", "-U", self.sock, "-f", "null", "1G"], self.sock, logp)),
        ]
        workloads = [
            ("4K randread QD32", "randread", "4k", 32, 1),
            ("4K randwrite QD32", "randwrite", "4k", 32, 1),
            ("1M seqread QD8", "read", "1m", 8, 1),
            ("1M seqwrite QD8", "write", "1m", 8, 1),
            ("4K randread QD32, numjobs=4", "randread", "4k", 32, 4),
        ]
        raw = {s: {w[0]: [] for w in workloads} for s, _ in servers}
        # Servers are interleaved per workload (a fresh server for every run, the order rotating),
        # so that whatever else happens on the machine hits every server about equally.
        for rep in range(self.reps):
            for wi, (wname, rw, bs, qd, nj) in enumerate(workloads):
                k = (rep + wi) % len(servers)
                for sname, mk in servers[k:] + servers[:k]:
                    srv = mk()
                    try:
                        srv.start()
                    except RuntimeError as e:
                        log(f"A: {sname} failed to start: {e}")
                        raw[sname][wname].append({"error": str(e)})
                        continue
                    try:
                        r = self.measure(lambda: run_fio(self.uri, rw, bs, qd, nj, self.runtime, meter_pid=srv.pid))
                    finally:
                        srv.stop()
                    raw[sname][wname].append(r)
                    log(f"A rep{rep + 1} {sname:12s} {wname:30s} "
                        + (f"{fmt_iops(r.get('iops'))} IOPS {fmt_gbs(r.get('bw_bytes'))} GB/s "
                           f"srv-cpu {fmt_pct((r.get('server_cpu') or {}).get('cpu_pct'))} "
                           f"fio-cpu {fmt_pct(r.get('client_cpu_pct'))} others {fmt_pct(r.get('other_cpu_pct'))}"
                           if not r.get("error") else r["error"]))
        self.rm(src)
        rows = []
        for wname, *_ in workloads:
            med = {s: fio_medians(raw[s][wname]) for s, _ in servers}
            peers = [med[s]["iops"] for s in ("qemu-nbd", "nbdkit-file") if med[s]["iops"] is not None]
            best = max(peers) if peers else None
            best_name = None
            for s in ("qemu-nbd", "nbdkit-file"):
                if best is not None and med[s]["iops"] == best:
                    best_name = s
            rows.append({"workload": wname, "median": med, "best_peer": best_name,
                         "ratio_vs_best_peer": (med["livemirror"]["iops"] / best) if best and med["livemirror"]["iops"] else None,
                         "ratio_vs_null": (med["livemirror"]["iops"] / med["nbdkit-null"]["iops"])
                         if med["livemirror"]["iops"] and med["nbdkit-null"]["iops"] else None})
        self.results["A"] = {"qemu_nbd_cache": qemu_cache, "rows": rows, "raw": raw,
                             "runtime_s": self.runtime, "reps": self.reps}

    def md_a(self):
        r = self.results["A"]
        qc = r["qemu_nbd_cache"]
        out = [
            "## A. Serving (NBD server; fio nbd engine over a Unix socket)",
            "",
            f"1 GiB random-filled file on tmpfs; fio `--ioengine=nbd --numjobs=1 --time_based --runtime={r['runtime_s']}`, "
            f"median of {r['reps']} run(s). Servers: `livemirror serve` (defaults), "
            f"`qemu-nbd -t -e 8 --cache={qc} --aio=io_uring -f raw`, `nbdkit -f file`, `nbdkit -f null 1G` (client ceiling). "
            "Cells: IOPS / GB/s. Ratios are on IOPS (same as on bandwidth) vs the better of qemu-nbd and nbdkit file.",
            "",
            f"| workload | livemirror | qemu-nbd (cache={qc}) | nbdkit file | nbdkit null (ceiling) | best peer | livemirror / best peer | livemirror / null |",
            "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
        ]
        for row in r["rows"]:
            m = row["median"]

            def cell(s):
                if m[s]["iops"] is None:
                    return "error" if m[s]["errors"] else "n/a"
                return f"{fmt_iops(m[s]['iops'])} / {fmt_gbs(m[s]['bw_bytes'])}"

            rv = f"{row['ratio_vs_best_peer']:.2f}×" if row["ratio_vs_best_peer"] else "n/a"
            rn = f"{row['ratio_vs_null']:.2f}×" if row["ratio_vs_null"] else "n/a"
            out.append(f"| {row['workload']} | {cell('livemirror')} | {cell('qemu-nbd')} | {cell('nbdkit-file')} | "
                       f"{cell('nbdkit-null')} | {row['best_peer'] or 'n/a'} | **{rv}** | {rn} |")
        out += [
            "",
            "Server CPU (% of one core, whole process, median run) and fio's own CPU; livemirror's busiest threads:",
            "",
            "| workload | livemirror | qemu-nbd | nbdkit file | nbdkit null | fio (vs livemirror) | livemirror threads |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for row in r["rows"]:
            m = row["median"]
            out.append(f"| {row['workload']} | {fmt_pct(m['livemirror']['server_cpu_pct'])} | {fmt_pct(m['qemu-nbd']['server_cpu_pct'])} | "
                       f"{fmt_pct(m['nbdkit-file']['server_cpu_pct'])} | {fmt_pct(m['nbdkit-null']['server_cpu_pct'])} | "
                       f"{fmt_pct(m['livemirror']['fio_cpu_pct'])} | {top_threads(m['livemirror'].get('server_threads'))} |")
        out += ["", noise_line([x for srv in r["raw"].values() for runs in srv.values() for x in runs])]
        errs = [f"{s} / {row['workload']}: {e}" for row in r["rows"] for s, m in row["median"].items() for e in m["errors"]]
        if errs:
            out += ["", "Errors: " + "; ".join(errs[:8])]
        return out

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
        lmcache = "direct" if direct else "buffered"
        methods = {
            "read-only baseline (dd → /dev/null)": ("cmd", ["dd", f"if={S}", "of=/dev/null", "bs=1M", *dflag_in, "status=none"]),
            "dd": ("cmd", ["dd", f"if={S}", f"of={T}", "bs=1M", *dflag_in, *dflag_out, "conv=notrunc", "status=none"]),
            "qemu-img convert": ("cmd", ["qemu-img", "convert", "-n", "-t", qcache, "-T", qcache, "-W", "-m", "16",
                                         "-f", "raw", "-O", "raw", S, T]),
            "nbdcopy": ("cmd", ["nbdcopy", "--flush", S, T]),
            "livemirror sync": ("lm", lmcache),
        }
        if where == "tmpfs":
            # O_DIRECT on tmpfs is emulated; the page-cache path is the natural one there
            methods["livemirror sync, --cache buffered"] = ("lm", "buffered")
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
                if kind == "cmd":
                    rec = self.measure(lambda: self._copy_cmd(spec, size))
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
                ths = [x.get("threads") for x in ok if x.get("threads")]
                med[m]["threads"] = ths[len(ths) // 2] if ths else None
        peers = [med[m]["gbs"] for m in ("dd", "qemu-img convert", "nbdcopy") if med[m]["gbs"]]
        best = max(peers) if peers else None
        best_name = next((m for m in ("dd", "qemu-img convert", "nbdcopy") if best and med[m]["gbs"] == best), None)
        return {"raw": raw, "median": med, "best_peer": best_name, "best_peer_gbs": best, "notes": notes,
                "o_direct": direct, "commands": {m: (" ".join(s) if k == "cmd" else f"livemirror serve --source S --cache {s}; livemirror attach T; poll status until synced")
                                                  for m, (k, s) in methods.items()}}

    def _copy_cmd(self, argv, size):
        usage = Usage().start()
        t0 = time.monotonic()
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        dt = time.monotonic() - t0
        if r.returncode != 0:
            return {"error": f"exit {r.returncode}: {r.stderr.strip()[-300:]}"}
        rec = {"seconds": dt, "gbs": size / dt}
        rec.update(usage.stop())
        return rec

    def _lm_sync(self, S, T, cache, size):
        srv = self.lm_server(S, "--cache", cache)
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
                   "reported_copy_rate": median(rates), "server_cpu_pct": cpu["cpu_pct"], "threads": cpu["threads"]}
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
            f"methods is rotated and reversed between repetitions; median of {self.reps} run(s). livemirror: `serve --source S --cache direct` started first (not timed), then the "
            "wall time from just before `livemirror attach T` runs until the daemon records its `synced` event (T flushed; "
            "read from the event's timestamp, so the 50 ms status polling adds nothing); \"internal\" is the "
            "time between the daemon's own `attached` and `synced` events. nbdcopy gets `--flush` (without it, a 2 GiB copy "
            "into the page cache never reaches the disk within the timed run). On tmpfs livemirror is also run with "
            "`--cache buffered` (O_DIRECT on tmpfs is emulated by the kernel).",
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
            for mname, mm in r[w]["median"].items():
                if mname.startswith("livemirror"):
                    out.append(f"- {w}, {mname}: daemon CPU {fmt_pct(mm.get('server_cpu_pct'))} of one core "
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
        secs = self.a.sections.upper()
        for s in "ABCDE":
            if s in secs:
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
            f"- Versions: {v['livemirror']}; {v['qemu-nbd']}; {v['qemu-img']}; {v['nbdkit']}; {v['nbdcopy']}; {v['fio']}; {v['dd']}",
            "- Client (fio) and servers share the same 2 cores: every number includes the client's CPU cost.",
            f"- Noise control: all benchmark processes ran at nice {self.a.nice_applied if self.a.nice_applied is not None else 0}"
            f"{' and under SCHED_RR (--rt)' if self.a.rt else ''}; "
            f"before each measurement the harness waited for the machine to be idle (< 15% busy; "
            f"{self.quiet.waited:.0f} s waited in all, {self.quiet.gave_up} time(s) gave up after the wait budget); "
            f"{self.retried} measurement(s) were repeated because other processes used > 25% of a core during them, "
            f"{self.noisy_kept} noisy one(s) kept.",
            "",
        ]
        for s in "ABCDE":
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


def main():
    ap = argparse.ArgumentParser(description="livemirror comparative benchmark (see benches/compare/README.md)")
    ap.add_argument("--repo", default=os.path.abspath(os.path.join(os.path.dirname(__file__), "../..")))
    ap.add_argument("--quick", action="store_true", help="1 repetition, 3 s fio runs (~5 min)")
    ap.add_argument("--out", default=None, help="markdown output (default benches/compare/results/latest.md); "
                                                "the JSON goes next to it")
    ap.add_argument("--sections", default="ABCDE", help="subset of ABCDE to run (default all)")
    ap.add_argument("--reps", type=int, default=None,
                    help="repetitions per measurement (default 5, or 1 with --quick); the tables show medians")
    ap.add_argument("--disk-dir", default="/var/tmp", help="directory on a real disk for section B/D/E files")
    ap.add_argument("--tmpfs-dir", default="/dev/shm", help="tmpfs directory")
    ap.add_argument("--no-build", action="store_true", help="(run.sh) skip cargo build")
    ap.add_argument("--nice", type=int, default=-10,
                    help="scheduling niceness for the harness and everything it starts (default -10 when root: "
                         "the measured processes win over other work on a shared machine; 0 to leave as is)")
    ap.add_argument("--rt", action="store_true",
                    help="run the measurements under SCHED_RR (much less noise from other work on the machine, "
                         "which starves meanwhile; needs root)")
    a = ap.parse_args()
    if a.out is None:
        a.out = os.path.join(a.repo, "benches/compare/results/latest.md")
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
    sys.exit(main())
