#!/usr/bin/env python3
"""TLS serving benchmark: see run.sh for what it measures and how."""
import argparse
import datetime
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")
MODES = ["plain", "x509", "psk"]
SERVERS = ["livemirror", "qemu-nbd", "nbdkit"]


def cpu_ticks(pid):
    """utime + stime of a process and its threads, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def busy_fraction(interval=0.5):
    """Share of the machine's CPU time that was busy over `interval`."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]
    t0, i0 = snap()
    time.sleep(interval)
    t1, i1 = snap()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def wait_idle(stats, limit=0.25, budget=float(os.environ.get("LMBENCH_IDLE_BUDGET", "8"))):
    """Waits (at most `budget` s, LMBENCH_IDLE_BUDGET) until other work
    leaves the machine idle."""
    deadline = time.time() + budget
    while busy_fraction() > limit:
        if time.time() > deadline:
            stats["gave_up"] += 1
            return
        stats["waited"] += 0.5


def wait_socket(path, proc, what):
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited ({proc.returncode}) before listening")
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
                s.close()
                return
            except OSError:
                pass
        time.sleep(0.05)
    sys.exit(f"{what} does not listen on {path}")


def start(server, mode, work, img, creds, bins):
    sock = os.path.join(work, f"{server}-{mode}.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    if server in bins:
        cmd = [bins[server], "serve", "--source", img,
               "--listen", f"unix:{sock}", "--control", os.path.join(work, f"ctl-{server}-{mode}.sock")]
        if mode == "x509":
            cmd += ["--tls", "require", "--tls-certs", os.path.join(creds, "server")]
        elif mode == "psk":
            cmd += ["--tls", "require", "--tls-psk", os.path.join(creds, "psk/keys.psk")]
    elif server == "qemu-nbd":
        cmd = ["qemu-nbd", "-f", "raw", "-k", sock, "-t", "-e", "4", "--aio=threads"]
        if mode == "x509":
            cmd += ["--object", f"tls-creds-x509,id=tls0,dir={creds}/server,endpoint=server,verify-peer=off",
                    "--tls-creds", "tls0"]
        elif mode == "psk":
            cmd += ["--object", f"tls-creds-psk,id=tls0,dir={creds}/psk,endpoint=server", "--tls-creds", "tls0"]
        cmd.append(img)
    else:
        cmd = ["nbdkit", "-f", "-U", sock]
        if mode == "x509":
            cmd += ["--tls=require", f"--tls-certificates={creds}/server"]
        elif mode == "psk":
            cmd += ["--tls=require", f"--tls-psk={creds}/psk/keys.psk"]
        cmd += ["file", img]
    log = open(os.path.join(work, f"{server}-{mode}.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    wait_socket(sock, proc, server)
    return proc, sock, cmd


def uri(sock, mode, creds):
    if mode == "plain":
        return f"nbd+unix:///?socket={sock}"
    if mode == "x509":
        return f"nbds+unix:///?socket={sock}&tls-certificates={creds}/anon"
    return f"nbds+unix://alice@/?socket={sock}&tls-psk-file={creds}/psk/keys.psk"


def copy(u, request_size, requests, passes, pid):
    """Runs nbdcopy `passes` times; returns (seconds, server CPU ticks)."""
    # --no-extents: every byte is read (no block status between the requests).
    cmd = ["nbdcopy", "--no-extents", "--connections=1", f"--request-size={request_size}",
           f"--requests={requests}", u, "null:"]
    c0, t0 = cpu_ticks(pid), time.perf_counter()
    for _ in range(passes):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return time.perf_counter() - t0, cpu_ticks(pid) - c0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True)
    ap.add_argument("--quick", action="store_true", help="a 64 MiB export and one run each")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--baseline", default=None,
                    help="also measure this livemirror binary (the build before a change), as the server "
                         "livemirror-baseline, alternating with the others")
    ap.add_argument("--servers", default=",".join(SERVERS),
                    help="which servers to measure (default all: " + ",".join(SERVERS) + ")")
    a = ap.parse_args()
    servers = [x for x in a.servers.split(",") if x]
    bins = {"livemirror": os.path.join(a.repo, "target/release/livemirror")}
    if a.baseline:
        bins["livemirror-baseline"] = os.path.abspath(a.baseline)
        servers.insert(servers.index("livemirror") + 1 if "livemirror" in servers else 0, "livemirror-baseline")
    unknown = [x for x in servers if x not in SERVERS and x not in bins]
    if unknown:
        sys.exit(f"unknown servers: {unknown}")
    size = (64 if a.quick else 256) << 20
    reps = a.reps or (1 if a.quick else 5)
    passes_1m = 4
    out = a.out or os.path.join(a.repo, "benches/tls/results/latest.md")
    for t in ["qemu-nbd", "nbdkit", "nbdcopy", "certtool", "psktool"]:
        if not shutil.which(t):
            sys.exit(f"{t} is not installed")

    work = tempfile.mkdtemp(prefix="lmtls", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        creds = os.path.join(work, "creds")
        subprocess.run(["bash", os.path.join(a.repo, "tests/scripts/tls_creds.sh"), creds], check=True)
        # One image per transport: livemirror holds its source exclusively,
        # and the three servers of a kind run at once so their runs alternate.
        # One image per server and transport: livemirror holds its source
        # exclusively. Every server runs from the start, so that each
        # repetition goes through all of them in turn (noise hits them alike).
        imgs = {}
        with open("/dev/urandom", "rb") as r:
            data = r.read(size)
        for server in servers:
            for mode in MODES:
                imgs[(server, mode)] = os.path.join(work, f"export-{server}-{mode}.img")
                with open(imgs[(server, mode)], "wb") as f:
                    f.write(data)
        del data
        n4k = size // 4096
        rows, commands, stats = {}, [], {"waited": 0.0, "gave_up": 0}
        t_start = time.time()
        procs = {}
        try:
            for server in servers:
                for mode in MODES:
                    procs[(server, mode)] = start(server, mode, work, imgs[(server, mode)], creds, bins)
                    commands.append(" ".join(procs[(server, mode)][2]))
            keys = [(s, m) for s in servers for m in MODES]
            lat, cpu, mbs = ({k: [] for k in keys} for _ in range(3))
            for k in keys:  # warm the page cache and the servers
                copy(uri(procs[k][1], k[1], creds), 1 << 20, 8, 1, procs[k][0].pid)
            for _ in range(reps):
                for k in keys:
                    proc, sock, _ = procs[k]
                    u = uri(sock, k[1], creds)
                    wait_idle(stats)
                    secs, ticks = copy(u, 4096, 1, 1, proc.pid)
                    lat[k].append(secs * 1e6 / n4k)
                    cpu[k].append(ticks * TICK_US / n4k)
                    wait_idle(stats)
                    secs, _ = copy(u, 1 << 20, 8, passes_1m, proc.pid)
                    mbs[k].append(passes_1m * size / (1 << 20) / secs)
            for k in keys:
                rows[k] = tuple(statistics.median(x[k]) for x in (lat, cpu, mbs))
                r = rows[k]
                print(f"{k[0]:10} {k[1]:5}  4K QD1 {r[0]:6.1f} us/req, server CPU {r[1]:5.1f} us/req, "
                      f"1M QD8 {r[2]:7.0f} MiB/s", file=sys.stderr)
        finally:
            for proc, _, _ in procs.values():
                proc.send_signal(signal.SIGTERM)
            for proc, _, _ in procs.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        lines = [
            f"# TLS serving cost ({datetime.date.today().isoformat()})",
            "",
            f"`{os.environ.get('LMBENCH_CMDLINE', 'benches/tls/run.sh')}`; nbdcopy --no-extents {size >> 20} MiB of "
            f"random data from /dev/shm to null:, one connection; median of {reps} alternating runs (every server "
            f"and transport runs at once, and each repetition goes through all in turn). 4K: "
            f"--request-size=4096 --requests=1 (queue depth 1), wall time "
            f"and server CPU per request. 1M: --request-size=1048576 --requests=8. Client and server share "
            f"{os.cpu_count()} cores. Before each run the harness waited for an idle machine "
            f"({stats['waited']:.0f} s in all, gave up {stats['gave_up']} time(s)); the run took "
            f"{(time.time() - t_start) / 60:.1f} min.",
            "",
            "| server | transport | 4K QD1 µs/request | vs plaintext | server CPU µs per 4K | 1M QD8 MiB/s | vs plaintext |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        names = {"plain": "plaintext", "x509": "TLS, X.509", "psk": "TLS, PSK"}
        for server in servers:
            base = rows[(server, "plain")]
            for mode in MODES:
                lat, cpu, mbs = rows[(server, mode)]
                lines.append(f"| {server} | {names[mode]} | {lat:.1f} | {lat / base[0]:.2f}× | {cpu:.1f} | "
                             f"{mbs:.0f} | {mbs / base[2]:.2f}× |")
        lines += ["", "Servers:"] + [f"- `{c}`" for c in commands]
        text = "\n".join(lines) + "\n"
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            f.write(text)
        print(text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
