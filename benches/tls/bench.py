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


def start(server, mode, work, img, creds, repo):
    sock = os.path.join(work, f"{server}-{mode}.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    if server == "livemirror":
        cmd = [os.path.join(repo, "target/release/livemirror"), "serve", "--source", img,
               "--listen", f"unix:{sock}", "--control", os.path.join(work, "ctl.sock")]
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
    cmd = ["nbdcopy", "--connections=1", f"--request-size={request_size}", f"--requests={requests}", u, "null:"]
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
    a = ap.parse_args()
    size = (64 if a.quick else 256) << 20
    reps = a.reps or (1 if a.quick else 3)
    passes_1m = 4
    out = a.out or os.path.join(a.repo, "benches/tls/results/latest.md")
    for t in ["qemu-nbd", "nbdkit", "nbdcopy", "certtool", "psktool"]:
        if not shutil.which(t):
            sys.exit(f"{t} is not installed")

    work = tempfile.mkdtemp(prefix="lmtls", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        creds = os.path.join(work, "creds")
        subprocess.run(["bash", os.path.join(a.repo, "tests/scripts/tls_creds.sh"), creds], check=True)
        img = os.path.join(work, "export.img")
        with open(img, "wb") as f:
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
        n4k = size // 4096
        rows, commands = {}, []
        for server in SERVERS:
            for mode in MODES:
                proc, sock, cmd = start(server, mode, work, img, creds, a.repo)
                commands.append(" ".join(cmd))
                try:
                    u = uri(sock, mode, creds)
                    copy(u, 1 << 20, 8, 1, proc.pid)  # warm the page cache and the server
                    lat, cpu, mbs = [], [], []
                    for _ in range(reps):
                        secs, ticks = copy(u, 4096, 1, 1, proc.pid)
                        lat.append(secs * 1e6 / n4k)
                        cpu.append(ticks * TICK_US / n4k)
                        secs, _ = copy(u, 1 << 20, 8, passes_1m, proc.pid)
                        mbs.append(passes_1m * size / (1 << 20) / secs)
                    rows[(server, mode)] = (statistics.median(lat), statistics.median(cpu), statistics.median(mbs))
                    print(f"{server:10} {mode:5}  4K QD1 {rows[(server, mode)][0]:6.1f} us/req, "
                          f"server CPU {rows[(server, mode)][1]:5.1f} us/req, 1M QD8 {rows[(server, mode)][2]:7.0f} MiB/s",
                          file=sys.stderr)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        lines = [
            f"# TLS serving cost ({datetime.date.today().isoformat()})",
            "",
            f"`{os.environ.get('LMBENCH_CMDLINE', 'benches/tls/run.sh')}`; nbdcopy {size >> 20} MiB of random data "
            f"from /dev/shm to null:, one connection; median of {reps}. 4K: --request-size=4096 --requests=1 "
            f"(queue depth 1), wall time and server CPU per request. 1M: --request-size=1048576 --requests=8.",
            "",
            "| server | transport | 4K QD1 µs/request | vs plaintext | server CPU µs per 4K | 1M QD8 MiB/s | vs plaintext |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        names = {"plain": "plaintext", "x509": "TLS, X.509", "psk": "TLS, PSK"}
        for server in SERVERS:
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
