#!/usr/bin/env python3
"""Checks the JSON stream of `livemirror-install --json` (live-uefi-e2e keeps it on the installed
disk): every line one JSON object; every step started and ended once, in order; progress lines
only during the copy, never going back; a last result line that matches the disk.
Usage: check-install-json.py FILE ROOT_FS_UUID ESP_FS_UUID ROOT_PARTITION_BYTES"""
import json, sys
path, root_uuid, esp_uuid, root_bytes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
lines = open(path, encoding="utf-8").read().splitlines()
assert len(lines) > 20, f"only {len(lines)} lines"
ev = [json.loads(l) for l in lines]                      # every line one JSON object
assert all(isinstance(e, dict) and "event" in e for e in ev)
assert ev[0] == {"event": "start", "version": 1, "program": "livemirror-install", "target": "/dev/vda"}, ev[0]
names = ["checks", "partition", "trim", "attach", "copy", "verify", "detach", "release", "grow", "fstab", "boot"]
open_step, done, progress, messages = None, [], [], 0
for e in ev[1:-1]:
    k = e["event"]
    if k == "step" and e["status"] == "started":
        assert open_step is None, f"step {e['step']} started inside step {open_step}"
        assert e["step"] == len(done) + 1 and e["name"] == names[e["step"] - 1], e
        assert isinstance(e["title"], str) and e["title"], e
        open_step = e["step"]
    elif k == "step":
        assert e["step"] == open_step and e["name"] == names[open_step - 1], e
        assert e["status"] in ("ok", "skipped"), e
        assert isinstance(e["seconds"], int) and e["seconds"] >= 0, e
        assert e["status"] == "ok" or e["reason"], e
        done.append((e["step"], e["status"])); open_step = None
    elif k == "progress":
        assert open_step == 5 and e["step"] == 5 and e["name"] == "copy", e
        progress.append(e)
    elif k == "message":
        assert e["step"] == open_step and isinstance(e["text"], str), e
        messages += 1
    else:
        raise AssertionError(f"unknown event {e}")
assert open_step is None and [d[0] for d in done] == list(range(1, 12)), done
assert all(s == "ok" for n, s in done if n != 3), done
assert len(progress) >= 3, f"{len(progress)} progress lines"
for a, b in zip(progress, progress[1:]):
    assert b["bytes_copied"] >= a["bytes_copied"] and b["elapsed_seconds"] >= a["elapsed_seconds"], (a, b)
for p in progress:
    assert p["regions_total"] > 0 and 0 <= p["regions_clean"] <= p["regions_total"], p
    assert p["eta_seconds"] is None or p["eta_seconds"] >= 0, p
last = progress[-1]
assert last["percent"] == 100.0 and last["regions_clean"] == last["regions_total"], last
assert any(p["percent"] < 100.0 for p in progress), "no progress line before the copy ended"
r = ev[-1]
want = {"event": "result", "status": "ok", "exit_code": 0, "last_step": 11, "target": "/dev/vda", "disk": "/dev/vda",
        "root": "/dev/vda2", "root_bytes": root_bytes, "root_uuid": root_uuid, "partition_table": "gpt",
        "firmware": "uefi", "esp": "/dev/vda1", "esp_uuid": esp_uuid, "bootloader": "grub", "initramfs": "dracut"}
for key, value in want.items():
    assert r.get(key) == value, f"result {key}: {r.get(key)!r}, the disk says {value!r}"
assert "reason" not in r and isinstance(r["seconds"], int), r
print(f"json: {len(ev)} lines: 11 steps started and ended, {len(progress)} progress lines "
      f"({progress[0]['percent']}% .. 100.0%, bytes {progress[0]['bytes_copied']} .. {last['bytes_copied']}), "
      f"{messages} messages; result matches the disk (root {root_uuid}, ESP {esp_uuid})")
