#!/usr/bin/env python3
"""Host side of a VM boot: follow QEMU's QMP socket and log what the guest did to its devices.

Usage: qmp-watch.py SOCKET LOG

Connects to SOCKET (QEMU runs with -qmp unix:SOCKET,server=on,wait=off; retried until it
exists), enables the protocol, then writes one JSON object a line to LOG: every event QEMU
sends, and after each DEVICE_TRAY_MOVED event and at SHUTDOWN the answer to query-block (so
the host sees the tray state QEMU itself reports, not only the guest's word; the answer after
SHUTDOWN may be missing, as QEMU exits at once). Ends when QEMU closes the socket. Standard
library only.
"""
import json
import socket
import sys
import time


def main():
    path, log_path = sys.argv[1], sys.argv[2]
    sock = None
    for _ in range(600):
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            break
        except OSError:
            sock.close()
            sock = None
            time.sleep(0.1)
    if sock is None:
        print(f"qmp-watch: cannot connect to {path}", file=sys.stderr)
        return 1
    f = sock.makefile("rw", encoding="utf-8", newline="\n")
    log = open(log_path, "a", encoding="utf-8")

    def send(cmd):
        f.write(json.dumps({"execute": cmd}) + "\n")
        f.flush()

    def record(kind, obj):
        log.write(json.dumps({"kind": kind, "time": time.time(), "data": obj}) + "\n")
        log.flush()

    json.loads(f.readline())  # the greeting
    send("qmp_capabilities")
    pending = []
    while True:
        try:
            line = f.readline()
        except (ConnectionResetError, BrokenPipeError):
            break  # QEMU exits right after a guest power-off (-no-reboot)
        if not line:
            break
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if "event" in msg:
            record("event", msg)
            if msg["event"] in ("DEVICE_TRAY_MOVED", "SHUTDOWN"):
                pending.append(msg["event"])
                try:
                    send("query-block")
                except (ConnectionResetError, BrokenPipeError):
                    break
        elif "return" in msg and pending:
            record("query-block after " + pending.pop(0), msg["return"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
