#!/usr/bin/env python3
"""Run one deterministic segment of the vmlot test guest under QEMU TCG.

Boots (or restores a mapped-ram save), runs EXACTLY --n guest instructions
(QEMU icount), stops, saves with the mapped-ram capability and prints one
JSON line: {icount_start, icount, n, wall_s, console_bytes, canonical_hash, ...}.

Usage:
  segment.py --n N --save OUT [--restore IN] [--workdir DIR]

How the exact stop works (see REPORT.md):
  QEMU runs with -icount shift=0,sleep=off -accel tcg,thread=single and the
  detstop plugin (plugin/). The plugin counts instructions per translation
  block and, armed with K, parks the vCPU outside cpu_exec at the first TB
  boundary after >= K counted instructions. The host then sends QMP `stop`,
  waits for QEMU's `qmp_enter_stop` trace line (main thread now holds the
  BQL until cpu->stop is set) and releases the plugin; the vCPU stops
  without executing anything more. The plugin count is an upper bound of
  the icount progress (it also counts instructions that fault or are
  replayed), so the host never overshoots: one coarse leg to target-margin,
  then legs with `one-insn-per-tb on` (each TB one instruction) of
  target - icount until icount == target, read with QMP query-replay.

Python stdlib only.
"""

import argparse
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MAIN = "/work/main"
sys.path.insert(0, HERE)
import canon  # noqa: E402

DEFAULT_APPEND = ("console=ttyS0 quiet loglevel=0 vmlot.mode=hashchain "
                  "vmlot.steps=40 vmlot.work_kib=256")
RTC_BASE = "2024-01-01T00:00:00"


class Fail(Exception):
    pass


def log(msg):
    print(f"segment: {msg}", file=sys.stderr, flush=True)


class Lines:
    """Line reader over a socket that can be polled with select."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def fileno(self):
        return self.sock.fileno()

    def pending(self):
        return b"\n" in self.buf

    def pop(self):
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def fill(self, timeout):
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return False
        data = self.sock.recv(65536)
        if not data:
            raise Fail("connection closed (QEMU exited?)")
        self.buf += data
        return True

    def readline(self, timeout):
        deadline = time.monotonic() + timeout
        while not self.pending():
            left = deadline - time.monotonic()
            if left <= 0:
                raise Fail("timeout waiting for a line")
            self.fill(left)
        return self.pop()

    def send(self, line):
        self.sock.sendall(line.encode() + b"\n")


class QMP:
    def __init__(self, path, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise Fail(f"QMP socket {path} did not come up")
                time.sleep(0.02)
        self.io = Lines(s)
        self.events = []
        greeting = json.loads(self.io.readline(timeout))
        if "QMP" not in greeting:
            raise Fail(f"bad QMP greeting {greeting}")
        self.cmd("qmp_capabilities")

    def send(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.io.send(json.dumps(msg))

    def wait_return(self, name, timeout=60.0):
        while True:
            resp = json.loads(self.io.readline(timeout))
            if "event" in resp:
                self.events.append(resp)
            elif "error" in resp:
                raise Fail(f"QMP {name}: {resp['error'].get('desc', resp['error'])}")
            elif "return" in resp:
                return resp["return"]

    def cmd(self, name, timeout=60.0, **args):
        self.send(name, **args)
        return self.wait_return(name, timeout)

    def poll_events(self):
        """Moves complete event lines already received into self.events."""
        while self.io.pending():
            resp = json.loads(self.io.pop())
            if "event" in resp:
                self.events.append(resp)

    def hmp(self, line):
        return self.cmd("human-monitor-command", **{"command-line": line})

    def icount(self):
        return self.cmd("query-replay")["icount"]


def machine_args(a, console):
    """The machine: identical for boot and restore (cf. provider args.rs),
    plus the determinism options."""
    return [
        "-accel", "tcg,thread=single",
        "-icount", "shift=0,sleep=off",
        "-rtc", f"clock=vm,base={RTC_BASE}",
        "-machine", "q35", "-m", str(a.mem), "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-no-reboot", "-no-shutdown",
        "-chardev", f"file,id=console,path={console}",
        "-serial", "chardev:console",
        "-kernel", a.kernel, "-initrd", a.initrd, "-append", a.append,
    ]


class Segment:
    def __init__(self, a):
        self.a = a
        self.work = os.path.abspath(a.workdir or tempfile.mkdtemp(prefix="detstop-"))
        os.makedirs(self.work, exist_ok=True)
        # unix socket paths must stay short
        self.sockdir = tempfile.mkdtemp(prefix="ds-")
        self.console = os.path.join(self.work, "console.log")
        self.tracelog = os.path.join(self.work, "qemu-trace.log")
        self.stderr_path = os.path.join(self.work, "qemu.stderr")
        self.proc = None
        self.qmp = None
        self.ctl = None
        self.trace_f = None
        self.trace_buf = b""
        self.trace_stops = 0
        self.legs = []

    # -- processes ---------------------------------------------------------
    def start(self):
        a = self.a
        qmp_path = os.path.join(self.sockdir, "qmp")
        ctl_path = os.path.join(self.sockdir, "ctl")
        for p in (self.console, self.tracelog):
            if os.path.exists(p):
                os.unlink(p)
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(ctl_path)
        lsock.listen(1)
        first = max(a.n - a.margin, 1) if a.n > 2 * a.margin else 0
        self.first_arm = first
        cmd = [a.qemu] + machine_args(a, self.console) + [
            "-chardev", f"socket,id=qmp,path={qmp_path},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-plugin", f"{a.plugin},target={first},ctl={ctl_path}",
            "-D", self.tracelog, "-trace", "qmp_enter_stop",
        ]
        cmd += ["-incoming", "defer"] if a.restore else ["-S"]
        self.cmdline = cmd
        self.stderr = open(self.stderr_path, "wb")
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                     stdout=self.stderr, stderr=self.stderr)
        lsock.settimeout(30)
        try:
            conn, _ = lsock.accept()
        except socket.timeout:
            raise Fail(f"plugin did not connect; stderr: {self.read_stderr()}")
        finally:
            lsock.close()
        self.ctl = Lines(conn)
        hello = self.ctl.readline(10).decode()
        if not hello.startswith("hello"):
            raise Fail(f"plugin said {hello!r}")
        self.qmp = QMP(qmp_path)
        self.trace_f = open(self.tracelog, "rb")

    def read_stderr(self):
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

    def close(self):
        if self.qmp:
            try:
                self.qmp.cmd("quit", timeout=5)
            except Exception:
                pass
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.trace_f:
            self.trace_f.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)

    # -- the stop protocol -------------------------------------------------
    def trace_stop_count(self):
        chunk = self.trace_f.read()
        if chunk:
            self.trace_buf += chunk
            *lines, self.trace_buf = self.trace_buf.split(b"\n")
            self.trace_stops += sum(1 for l in lines if b"qmp_enter_stop" in l)
        return self.trace_stops

    def leg(self, arm, fine):
        """Runs until the plugin parks (after >= arm counted instructions,
        or the install-time target when arm is None) or the guest ends.
        Returns the icount at the stop."""
        t0 = time.monotonic()
        if arm is not None:
            self.ctl.send(f"arm {arm}")
            reply = self.ctl.readline(10).decode()
            if reply != f"armed {arm}":
                raise Fail(f"plugin: {reply!r}")
        self.qmp.cmd("cont")
        # wait for "parked" on ctl, or a SHUTDOWN event on QMP
        parked = None
        while parked is None:
            self.qmp.poll_events()
            for ev in self.qmp.events:
                if ev["event"] in ("SHUTDOWN", "RESET"):
                    self.ended = ev
                    self.qmp.events.clear()
                    return None
            if self.ctl.pending():
                line = self.ctl.pop().decode()
                if line.startswith("parked "):
                    parked = int(line.split()[1])
                    break
                raise Fail(f"plugin: {line!r}")
            r, _, _ = select.select([self.ctl, self.qmp.io], [], [], 1.0)
            for src in r:
                src.fill(0)
            if self.proc.poll() is not None:
                raise Fail(f"QEMU exited: {self.read_stderr()}")
        t_parked = time.monotonic()
        n0 = self.trace_stop_count()
        if self.a.release == "before":       # deliberately wrong (experiment)
            self.ctl.send("release")
            time.sleep(0.005)
        self.qmp.send("stop")
        if self.a.release == "trace":
            deadline = time.monotonic() + 30
            while self.trace_stop_count() == n0:
                if time.monotonic() > deadline:
                    raise Fail("no qmp_enter_stop trace line")
                time.sleep(0.0002)
        if self.a.release != "before":
            self.ctl.send("release")
        self.qmp.wait_return("stop")
        ic = self.qmp.icount()
        self.legs.append({"arm": arm if arm is not None else self.first_arm,
                          "fine": fine, "plugin_counted": parked, "icount": ic,
                          "run_s": round(t_parked - t0, 4),
                          "stop_s": round(time.monotonic() - t_parked, 4)})
        return ic

    def run(self):
        a = self.a
        self.ended = None
        self.start()
        if a.restore:
            self.qmp.cmd("migrate-set-capabilities",
                         capabilities=[{"capability": "mapped-ram", "state": True}])
            t0 = time.monotonic()
            self.qmp.cmd("migrate-incoming", uri=f"file:{os.path.abspath(a.restore)}")
            self.wait_migration()
            self.restore_s = time.monotonic() - t0
        icount0 = self.qmp.icount()
        target = icount0 + a.n
        t_run = time.monotonic()
        ic = icount0
        # coarse leg: counted per TB, stops < target (margin >= 2 max TB sizes)
        if self.first_arm:
            ic = self.leg(None, False)
        # more coarse legs while far away: the plugin overcounts icount by
        # ~0.07% (faulting and replayed instructions), so each coarse leg
        # shrinks the distance ~1000x and stays short of the target.
        while ic is not None and target - ic > 2 * a.margin + a.fine_max:
            ic = self.leg(target - ic - a.margin, False)
        if ic is not None and ic < target:
            self.qmp.hmp("one-insn-per-tb on")
            while ic is not None and ic < target:
                ic = self.leg(target - ic, True)
            self.qmp.hmp("one-insn-per-tb off")
        wall = time.monotonic() - t_run
        if ic is None:
            # The guest powered off (or reset) before the target. QEMU stops
            # the VM from its main loop after the request, so the icount
            # read now is NOT deterministic (the vCPU runs on for a while).
            with open(self.console, "rb") as f:
                con = f.read()
            return {"ended": self.ended["event"], "icount_start": icount0,
                    "icount_at_end": self.qmp.icount(), "target": target,
                    "status": self.qmp.cmd("query-status")["status"],
                    "wall_s": round(wall, 3), "console_bytes": len(con),
                    "console_sha256": hashlib.sha256(con).hexdigest(),
                    "legs": len(self.legs)}
        if ic != target:
            raise Fail(f"overshoot: icount {ic} != target {target}")
        out = {"icount_start": icount0, "icount": ic, "n": a.n,
               "wall_s": round(wall, 3)}
        if a.save:
            out.update(self.save(a.save))
        out["total_s"] = round(time.monotonic() - self.t_start, 3)
        with open(self.console, "rb") as f:
            con = f.read()
        out["console_bytes"] = len(con)
        out["console_sha256"] = hashlib.sha256(con).hexdigest()
        out["legs"] = len(self.legs)
        if a.verbose:
            out["leg_detail"] = self.legs
        return out

    def wait_migration(self, timeout=300):
        deadline = time.monotonic() + timeout
        while True:
            info = self.qmp.cmd("query-migrate")
            st = info.get("status")
            if st == "completed":
                return info
            if st in ("failed", "cancelled"):
                raise Fail(f"migration {st}: {info.get('error-desc', info)}")
            if time.monotonic() > deadline:
                raise Fail(f"migration still {st}")
            time.sleep(0.01)

    def save(self, path):
        path = os.path.abspath(path)
        if os.path.exists(path):
            os.unlink(path)
        self.qmp.cmd("migrate-set-capabilities",
                     capabilities=[{"capability": "mapped-ram", "state": True}])
        t0 = time.monotonic()
        self.qmp.cmd("migrate", uri=f"file:{path}")
        self.wait_migration()
        save_s = time.monotonic() - t0
        t1 = time.monotonic()
        h = canon.canonical_hash(path)
        return {"save": path, "save_s": round(save_s, 3),
                "canon_s": round(time.monotonic() - t1, 3),
                "canonical_hash": h["hash"], "ram_hash": h["ram"],
                "devices_hash": h["devices"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, required=True, help="guest instructions to run")
    ap.add_argument("--save", help="mapped-ram save file to write at the end")
    ap.add_argument("--restore", help="mapped-ram save file to start from")
    ap.add_argument("--workdir")
    ap.add_argument("--mem", type=int, default=128)
    ap.add_argument("--margin", type=int, default=1024,
                    help="coarse leg stops this many counted insns short (>= 2*512)")
    ap.add_argument("--fine-max", type=int, default=8192,
                    help="largest distance run with one-insn-per-tb")
    ap.add_argument("--append", default=DEFAULT_APPEND)
    ap.add_argument("--kernel", default=os.path.join(MAIN, ".tools/guest/vmlinuz"))
    ap.add_argument("--initrd", default=os.path.join(MAIN, ".tools/guest/initrd.cpio.gz"))
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--plugin", default=os.environ.get(
        "DETSTOP_PLUGIN", "/work/proto/target/release/libdetstop.so"))
    ap.add_argument("--release", choices=["trace", "immediate", "before"], default="trace",
                    help="when to release the parked vCPU: after the qmp_enter_stop trace "
                         "line (correct), right after sending stop, or before it (experiments)")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    a.qemu = shutil.which(a.qemu) or a.qemu
    seg = Segment(a)
    try:
        out = seg.run()
    finally:
        seg.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        main()
    except Fail as e:
        log(f"error: {e}")
        sys.exit(1)
