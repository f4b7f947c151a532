#!/usr/bin/env python3
"""Overlay serving benchmark: see run.sh for what it measures and how."""
import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROWS = [
    # (name, fio args, measure)
    ("4K randwrite QD32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"], "write"),
    ("4K randread QD32, unwritten data", ["--rw=randread", "--bs=4k", "--iodepth=32"], "read"),
    ("1M seqwrite QD8", ["--rw=write", "--bs=1m", "--iodepth=8"], "write"),
]
CONFIGS = ["plain", "overlay"]


def wait_socket(path, proc):
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"livemirror exited ({proc.returncode}) before listening")
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"livemirror does not listen on {path}")


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def one(repo, work, config, pristine, size, row, secs):
    img = os.path.join(work, f"{config}.img")
    ov = os.path.join(work, f"{config}.ov")
    shutil.copyfile(pristine, img)
    if os.path.exists(ov):
        os.unlink(ov)
    sock = os.path.join(work, f"{config}.sock")
    cmd = [os.path.join(repo, "target/release/livemirror"), "serve", "--source", img,
           "--listen", f"unix:{sock}", "--control", os.path.join(work, f"{config}.ctl")]
    if config == "overlay":
        cmd += ["--overlay", ov]
    log = open(os.path.join(work, f"{config}.log"), "a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        wait_socket(sock, proc)
        name, args, kind = row
        c0 = cpu_ticks(proc.pid)
        r = subprocess.run(["fio", "--name=o", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
                            f"--size={size}", "--time_based", f"--runtime={secs}", "--norandommap",
                            "--randrepeat=0", "--output-format=json"] + args, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"fio failed: {r.stderr}")
        j = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0][kind]
        cpu = (cpu_ticks(proc.pid) - c0) / os.sysconf("SC_CLK_TCK") / secs
        used = 0
        if config == "overlay":
            used = os.stat(ov).st_blocks * 512
        return j["iops"], j["bw_bytes"], cpu, used
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--secs", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-build", action="store_true")
    a = ap.parse_args()
    reps = a.reps or (1 if a.quick else 5)
    secs = a.secs or (3 if a.quick else 10)
    size = (256 if a.quick else 1024) << 20
    out = a.out or os.path.join(a.repo, "benches/overlay/results/latest.md")
    if not shutil.which("fio"):
        sys.exit("fio is not installed")
    work = tempfile.mkdtemp(prefix="lmovb", dir="/dev/shm")
    t0 = time.time()
    try:
        pristine = os.path.join(work, "pristine.img")
        with open("/dev/urandom", "rb") as r, open(pristine, "wb") as f:
            for _ in range(size >> 20):
                f.write(r.read(1 << 20))
        res = {}
        for row in ROWS:
            runs = {c: [] for c in CONFIGS}
            for i in range(reps):
                order = CONFIGS if i % 2 == 0 else CONFIGS[::-1]
                for c in order:
                    runs[c].append(one(a.repo, work, c, pristine, size, row, secs))
            res[row[0]] = {c: tuple(statistics.median(x[k] for x in runs[c]) for k in range(4)) for c in CONFIGS}
            p, o = res[row[0]]["plain"], res[row[0]]["overlay"]
            print(f"{row[0]:36} plain {p[0]:9.0f} IOPS  overlay {o[0]:9.0f} IOPS  {o[0] / p[0]:.2f}x", file=sys.stderr)
        goals = {"4K randwrite QD32": 0.9, "4K randread QD32, unwritten data": 0.95, "1M seqwrite QD8": 0.9}
        lines = [
            f"# Serving through the overlay ({datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M')} UTC)",
            "",
            f"`{os.environ.get('LMBENCH_CMDLINE', 'benches/overlay/run.sh')}`: livemirror serving a {size >> 20} MiB "
            f"random-data image on tmpfs, plain and with `--overlay` (also on tmpfs), fio's nbd engine over a Unix "
            f"socket for {secs} s per run, a fresh image copy and a fresh overlay for every run, the two alternating; "
            f"median of {reps}. {os.cpu_count()} cores shared by fio and the server; the run took "
            f"{(time.time() - t0) / 60:.1f} min.",
            "",
            "| workload | plain IOPS / MB/s | overlay IOPS / MB/s | overlay / plain | goal | server CPU plain / overlay | overlay file after the run |",
            "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
        ]
        for name, _, _ in ROWS:
            p, o = res[name]["plain"], res[name]["overlay"]
            ratio = o[0] / p[0]
            g = goals[name]
            lines.append(
                f"| {name} | {p[0] / 1000:.1f}k / {p[1] / 1e6:.0f} | {o[0] / 1000:.1f}k / {o[1] / 1e6:.0f} | "
                f"**{ratio:.2f}×** | ≥ {g}× ({'met' if ratio >= g else 'not met'}) | {p[2] * 100:.0f}% / "
                f"{o[2] * 100:.0f}% | {o[3] / (1 << 20):.0f} MiB |")
        text = "\n".join(lines) + "\n"
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            f.write(text)
        print(text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
