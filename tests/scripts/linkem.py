#!/usr/bin/env python3
"""A point-to-point link with latency and a bandwidth cap between two network
namespaces, for tests and benchmarks of remote devices.

The kernel here has no netem qdisc, so the link is emulated in userspace: a
TUN device in each namespace, and this process moves IP packets between them.
Each direction is a bottleneck of RATE bit/s (a packet leaves once the one
before it has been serialised) followed by DELAY ms of propagation; a packet
that would wait more than QUEUE ms for the bottleneck is dropped, as a
router's queue would. TCP over it sees a real round-trip time and a real
bandwidth-delay product.

Usage: linkem.py NS_A ADDR_A NS_B ADDR_B [--delay-ms D] [--rate-mbit R]
                 [--mtu M] [--queue-ms Q]
Prints "ready" once both ends are up, and "stats A2B B2A" (bytes delivered
each way) on SIGUSR1; runs until SIGTERM or SIGINT. The TUN
devices disappear with the process; the namespaces are the caller's.
"""
import argparse
import fcntl
import heapq
import os
import select
import signal
import struct
import subprocess
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def open_tun(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def ip(*args):
    subprocess.run(["ip", *args], check=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ns_a")
    ap.add_argument("addr_a")
    ap.add_argument("ns_b")
    ap.add_argument("addr_b")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay")
    ap.add_argument("--rate-mbit", type=float, default=0.0, help="per direction; 0 = no cap")
    ap.add_argument("--mtu", type=int, default=65000)
    ap.add_argument("--queue-ms", type=float, default=200.0)
    a = ap.parse_args()

    tag = "%05d" % (os.getpid() % 100000)
    names = ("lme%sa" % tag, "lme%sb" % tag)
    fds = [open_tun(n) for n in names]
    for name, ns, addr in ((names[0], a.ns_a, a.addr_a), (names[1], a.ns_b, a.addr_b)):
        ip("link", "set", name, "netns", ns)
        ip("-n", ns, "addr", "add", addr + "/30", "dev", name)
        ip("-n", ns, "link", "set", name, "mtu", str(a.mtu), "up")
        ip("-n", ns, "link", "set", "lo", "up")

    stop = []
    sent = [0, 0]  # bytes delivered a->b and b->a
    signal.signal(signal.SIGUSR1, lambda *_: print("stats %d %d" % (sent[0], sent[1]), flush=True))
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    print("ready", flush=True)

    delay = a.delay_ms / 1000.0
    byte_time = 8.0 / (a.rate_mbit * 1e6) if a.rate_mbit > 0 else 0.0
    queue = a.queue_ms / 1000.0
    link_free = [0.0, 0.0]  # when each direction's bottleneck is free again
    due = []  # (time, seq, out_fd, packet)
    seq = 0
    while not stop:
        now = time.monotonic()
        timeout = max(0.0, min(due[0][0] - now, 0.05)) if due else 0.05
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            continue
        for fd in ready:
            d = 0 if fd == fds[0] else 1
            out = fds[1 - d]
            while True:
                try:
                    pkt = os.read(fd, 70000)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                now = time.monotonic()
                start = max(now, link_free[d])
                if start - now > queue:
                    continue  # the bottleneck's queue is full: dropped
                link_free[d] = start + len(pkt) * byte_time
                seq += 1
                heapq.heappush(due, (link_free[d] + delay, seq, out, pkt, d))
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, _, out, pkt, d = heapq.heappop(due)
            try:
                os.write(out, pkt)
                sent[d] += len(pkt)
            except OSError:
                pass  # that end is down: the packet is lost, as on a cut link


if __name__ == "__main__":
    sys.exit(main())
