#!/usr/bin/env python3
"""Cost baseline: boot the guest and run it to its own poweroff under
  tcg      plain -accel tcg (no icount, no plugin): the project's setting
  icount   -icount shift=0,sleep=off -accel tcg,thread=single, no plugin
  plugin   icount + detstop loaded, counting but never triggering
Prints one JSON line per run: {mode, wall_s (cont -> SHUTDOWN), icount, console_bytes}.

Usage: bench.py MODE [MODE...] [--reps R]
"""

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import segment  # noqa: E402


def run(mode, a, work):
    os.makedirs(work, exist_ok=True)
    console = os.path.join(work, "console.log")
    sockdir = tempfile.mkdtemp(prefix="dsb-")
    qmp_path = os.path.join(sockdir, "qmp")
    args = segment.machine_args(a, console)
    if mode == "tcg":
        # the project's machine: no icount, default accel options
        i = args.index("-accel")
        args[i + 1] = "tcg"
        i = args.index("-icount")
        del args[i:i + 2]
        i = args.index("-rtc")
        del args[i:i + 2]
    cmd = [shutil.which("qemu-system-x86_64")] + args + [
        "-qmp", f"unix:{qmp_path},server=on,wait=off", "-S"]
    if mode == "plugin":
        cmd += ["-plugin", f"{a.plugin},target=0"]
    err = open(os.path.join(work, "qemu.stderr"), "wb")
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        q = segment.QMP(qmp_path)
        t0 = time.monotonic()
        q.cmd("cont")
        while True:
            msg = json.loads(q.io.readline(600))
            if msg.get("event") == "SHUTDOWN":
                break
        wall = time.monotonic() - t0
        icount = q.icount() if mode != "tcg" else None
        q.cmd("quit")
    finally:
        if p.poll() is None:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(sockdir, ignore_errors=True)
    with open(console, "rb") as f:
        con = f.read()
    return {"mode": mode, "wall_s": round(wall, 3), "icount": icount,
            "console_bytes": len(con), "console_sha256": hashlib.sha256(con).hexdigest()[:16],
            "last_line": con.decode(errors="replace").strip().splitlines()[-1:]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("modes", nargs="+", choices=["tcg", "icount", "plugin"])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--workdir", default="runs/bench")
    ap.add_argument("--mem", type=int, default=128)
    ap.add_argument("--append", default=segment.DEFAULT_APPEND)
    ap.add_argument("--kernel", default=os.path.join(segment.MAIN, ".tools/guest/vmlinuz"))
    ap.add_argument("--initrd", default=os.path.join(segment.MAIN, ".tools/guest/initrd.cpio.gz"))
    ap.add_argument("--plugin", default="/work/proto/target/release/libdetstop.so")
    a = ap.parse_args()
    for r in range(a.reps):
        for m in a.modes:
            print(json.dumps(run(m, a, os.path.join(a.workdir, f"{m}-{r}"))), flush=True)


if __name__ == "__main__":
    main()
