#!/usr/bin/env python3
"""Produce real QEMU checkpoints of the vmlot memwriter guest for a benchmark.

Usage: scripts/qemu-checkpoints.py OUT_DIR [--mem 128] [--gap 5] [--warmup 10]

Writes to OUT_DIR:
  same-a.{mapped,classic}  one running guest, saved after --warmup ticks
  same-b.{mapped,classic}  the same guest, --gap seconds of running later
  other.{mapped,classic}   a second boot of the same image, same warmup
  console-*.log, qemu-*.stderr
and prints one JSON summary line on stdout (progress goes to stderr).
Each moment is saved in both formats from the same stopped guest state:
the running QEMU saves it with the mapped-ram capability (sparse file, RAM
pages at fixed offsets); QEMU then refuses a second outgoing migration
("Can't migrate the vm that was paused due to previous migration") until the
guest runs again, so a "twin" QEMU (-incoming defer) loads that mapped-ram
file and saves it in the classic stream format, before the guest resumes.
Finally same-b.mapped is restored into another QEMU, which must keep ticking.

Needs the guest from scripts/build-guest.sh and QEMU >= 9 (mapped-ram).
Python stdlib only: QMP is spoken over a unix socket.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK_RE = re.compile(rb"memwriter: tick (\d+) ")


def log(msg):
    print(f"qemu-checkpoints: {msg}", file=sys.stderr, flush=True)


class Fail(Exception):
    pass


class QMP:
    """Minimal QMP client: one command at a time, events are kept aside."""

    def __init__(self, path, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise Fail(f"QMP socket {path} did not come up")
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rb")
        self.events = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise Fail(f"unexpected QMP greeting: {greeting}")
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.file.readline()
        if not line:
            raise Fail("QMP connection closed (QEMU exited?)")
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            resp = self._read()
            if "event" in resp:
                self.events.append(resp)
            elif "error" in resp:
                raise Fail(f"QMP {name} failed: {resp['error'].get('desc', resp['error'])}")
            elif "return" in resp:
                return resp["return"]

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class VM:
    """One QEMU process running the guest, with its console log and QMP."""

    def __init__(self, args, name, sockdir, incoming=False, console=True):
        self.name = name
        self.console = os.path.join(args.out_dir, f"console-{name}.log") if console else None
        self.stderr_path = os.path.join(args.out_dir, f"qemu-{name}.stderr")
        sock = os.path.join(sockdir, f"{name}.qmp")
        # loglevel=1 still shows KERN_EMERG lines such as an early "Kernel
        # panic" (loglevel=0 would hide them); /init silences the rest.
        append = ("console=ttyS0 quiet loglevel=1 panic=-1 "
                  f"vmlot.mode=memwriter vmlot.rate_kib={args.rate_kib}")
        cmd = [args.qemu, "-accel", "tcg", "-machine", "q35", "-m", str(args.mem),
               "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
               # A guest that panics or powers off ends QEMU instead of looping.
               "-no-reboot",
               "-serial", f"file:{self.console}" if console else "null",
               "-kernel", args.kernel, "-initrd", args.initrd, "-append", append,
               "-qmp", f"unix:{sock},server=on,wait=off"]
        if incoming:
            cmd += ["-incoming", "defer"]
        for p in (self.console, sock):
            if p and os.path.exists(p):
                os.unlink(p)
        self.stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                     stdout=self.stderr, stderr=self.stderr)
        self.started = time.monotonic()
        self.qmp = None
        try:
            self.qmp = QMP(sock)
        except BaseException:
            died = self.proc.poll() is not None
            self.close()
            if died:
                raise Fail(self.exit_message())
            raise

    def exit_message(self):
        with open(self.stderr_path, "rb") as f:
            err = f.read().decode(errors="replace").strip()
        msg = f"QEMU '{self.name}' exited with {self.proc.returncode}: {err or '(no stderr)'}"
        if self.console and os.path.exists(self.console):
            # e.g. a kernel panic: the guest powers off via panic=-1 + -no-reboot.
            with open(self.console, "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
            shown = [l for l in lines if "Kernel panic" in l] or lines[-5:]
            msg += f"; console {self.console}: " + " | ".join(shown)
        return msg

    def check_alive(self):
        if self.proc.poll() is not None:
            raise Fail(self.exit_message())

    def ticks(self):
        if not self.console:
            return []
        try:
            with open(self.console, "rb") as f:
                return [int(m.group(1)) for m in TICK_RE.finditer(f.read())]
        except FileNotFoundError:
            return []

    def wait_tick(self, at_least, timeout):
        deadline = time.monotonic() + timeout
        while True:
            t = self.ticks()
            if t and t[-1] >= at_least:
                return t[-1]
            self.check_alive()
            if time.monotonic() > deadline:
                raise Fail(f"guest '{self.name}' did not reach memwriter tick {at_least} "
                           f"within {timeout:.0f} s (console: {self.console})")
            time.sleep(0.05)

    def close(self):
        if self.qmp:
            # A clean quit keeps qemu-*.stderr empty (and so removed) unless
            # something went wrong; SIGTERM is the fallback.
            try:
                self.qmp.sock.settimeout(5)
                self.qmp.cmd("quit")
            except (Fail, OSError, ValueError):
                pass
            self.qmp.close()
            self.qmp = None
        if self.proc.poll() is None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.stderr.closed:
            self.stderr.close()
            if os.path.getsize(self.stderr_path) == 0:
                os.unlink(self.stderr_path)


def set_mapped_ram(qmp, on):
    qmp.cmd("migrate-set-capabilities",
            capabilities=[{"capability": "mapped-ram", "state": on}])


def wait_migration(vm, timeout=300.0):
    """Poll query-migrate until completed; returns its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        info = vm.qmp.cmd("query-migrate")
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise Fail(f"migration {status}: {info.get('error-desc', info)}")
        vm.check_alive()
        if time.monotonic() > deadline:
            raise Fail(f"migration still '{status}' after {timeout:.0f} s")
        time.sleep(0.01)


def save(vm, path, mapped):
    # QEMU truncates the target, but unlinking first guarantees a fresh sparse
    # file even if an old one is still open elsewhere.
    if os.path.exists(path):
        os.unlink(path)
    set_mapped_ram(vm.qmp, mapped)
    t0 = time.monotonic()
    vm.qmp.cmd("migrate", uri=f"file:{path}")
    info = wait_migration(vm)
    elapsed = time.monotonic() - t0
    st = os.stat(path)
    return {
        "size": st.st_size,
        # mapped-ram files are sparse: allocated < size.
        "allocated": st.st_blocks * 512,
        "save_s": round(elapsed, 3),
        "qemu_total_ms": info.get("total-time"),
    }


def load(vm, path):
    """Load a mapped-ram checkpoint into a QEMU started with -incoming defer."""
    set_mapped_ram(vm.qmp, True)
    t0 = time.monotonic()
    vm.qmp.cmd("migrate-incoming", uri=f"file:{path}")
    wait_migration(vm)
    return time.monotonic() - t0


def save_moment(args, sockdir, vm, stem, results):
    """Stop the guest, save it in both formats, resume it."""
    vm.qmp.cmd("stop")
    tick = (vm.ticks() or [None])[-1]
    mapped = os.path.join(args.out_dir, f"{stem}.mapped")
    results[f"{stem}.mapped"] = save(vm, mapped, True)
    # The stopped source is now in 'postmigrate' and only 'cont' would let it
    # migrate again: take the classic save from a twin holding the same state.
    twin = VM(args, f"{stem}-twin", sockdir, incoming=True, console=False)
    try:
        load_s = load(twin, mapped)
        results[f"{stem}.classic"] = save(twin, os.path.join(args.out_dir, f"{stem}.classic"), False)
        results[f"{stem}.classic"]["saved_by"] = f"twin QEMU loaded from {stem}.mapped in {load_s:.3f} s"
    finally:
        twin.close()
    vm.qmp.cmd("cont")
    for fmt in ("mapped", "classic"):
        r = results[f"{stem}.{fmt}"]
        r["tick"] = tick
        log(f"{stem}.{fmt}: {r['size']} bytes ({r['allocated']} allocated) in {r['save_s']} s")
    return tick


def restore(args, sockdir, path, saved_tick):
    vm = VM(args, "restore", sockdir, incoming=True)
    try:
        elapsed = load(vm, path)
        status = vm.qmp.cmd("query-status")["status"]
        # The source was paused when saved, so QEMU leaves the restored VM
        # paused too (it does not autostart); cont is harmless if running.
        vm.qmp.cmd("cont")
        # The restored guest's console log starts empty: its first tick line
        # must continue the saved counter, proving the guest really resumed.
        t1 = time.monotonic()
        tick = vm.wait_tick(saved_tick + 2, timeout=60)
        ticks = vm.ticks()
        if ticks[0] != saved_tick + 1:
            raise Fail(f"restored guest printed tick {ticks[0]} first, expected {saved_tick + 1}")
        return {
            "file": os.path.basename(path),
            "restore_s": round(elapsed, 3),
            "status_after_load": status,
            "saved_tick": saved_tick,
            "ticks_after_cont": ticks,
            "s_to_tick": round(time.monotonic() - t1, 3),
            "ok": tick >= saved_tick + 2,
        }
    finally:
        vm.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--mem", type=int, default=128, help="guest RAM in MiB")
    ap.add_argument("--gap", type=float, default=5,
                    help="seconds the guest runs between same-a and same-b")
    ap.add_argument("--warmup", type=int, default=10,
                    help="memwriter ticks (about seconds after boot) before same-a/other")
    ap.add_argument("--rate-kib", type=int, default=256,
                    help="KiB of new random data the guest writes per second")
    ap.add_argument("--guest-dir", default=os.path.join(ROOT, ".tools", "guest"))
    ap.add_argument("--qemu", default=os.environ.get("QEMU", "qemu-system-x86_64"))
    args = ap.parse_args()

    qemu = shutil.which(args.qemu)
    if not qemu:
        raise Fail(f"{args.qemu} not found (run scripts/deps.sh)")
    args.qemu = qemu
    args.kernel = os.path.join(args.guest_dir, "vmlinuz")
    args.initrd = os.path.join(args.guest_dir, "initrd.cpio.gz")
    for p in (args.kernel, args.initrd):
        if not os.path.isfile(p):
            raise Fail(f"missing {p} (run scripts/build-guest.sh {args.guest_dir})")
    os.makedirs(args.out_dir, exist_ok=True)
    args.out_dir = os.path.abspath(args.out_dir)

    version = subprocess.run([args.qemu, "--version"], capture_output=True,
                             text=True).stdout.split("\n")[0]
    files = {}
    # Unix socket paths are limited to ~108 bytes, so not under OUT_DIR.
    sockdir = tempfile.mkdtemp(prefix="vmlot-qmp-")
    boot_timeout = 120 + args.warmup * 3
    vms = []
    try:
        log(f"booting guest 'same' ({version})")
        vm = VM(args, "same", sockdir)
        vms.append(vm)
        caps = {c["capability"] for c in vm.qmp.cmd("query-migrate-capabilities")}
        if "mapped-ram" not in caps:
            raise Fail(f"{version} has no mapped-ram migration capability (need QEMU >= 9)")
        vm.wait_tick(args.warmup, boot_timeout)
        uptime = time.monotonic() - vm.started
        tick_a = save_moment(args, sockdir, vm, "same-a", files)
        # Guest clocks stand still while stopped, so this is guest running time.
        time.sleep(args.gap)
        tick_b = save_moment(args, sockdir, vm, "same-b", files)
        vm.close()
        vms.remove(vm)

        log("booting guest 'other'")
        vm = VM(args, "other", sockdir)
        vms.append(vm)
        vm.wait_tick(args.warmup, boot_timeout)
        other_uptime = time.monotonic() - vm.started
        save_moment(args, sockdir, vm, "other", files)
        vm.close()
        vms.remove(vm)

        log("restoring same-b.mapped")
        rest = restore(args, sockdir, os.path.join(args.out_dir, "same-b.mapped"), tick_b)
        log(f"restore: {rest['restore_s']} s, ticks after cont {rest['ticks_after_cont']}")
    finally:
        for vm in vms:
            vm.close()
        shutil.rmtree(sockdir, ignore_errors=True)

    print(json.dumps({
        "qemu": version,
        "mem_mib": args.mem,
        "rate_kib": args.rate_kib,
        "warmup_ticks": args.warmup,
        "gap_s": args.gap,
        # Host seconds from QEMU start to the save (boot included).
        "uptime_s": {"same-a": round(uptime, 2), "other": round(other_uptime, 2)},
        "ticks": {"same-a": tick_a, "same-b": tick_b},
        "files": files,
        "restore": rest,
    }), flush=True)


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so the finally blocks kill our QEMUs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        main()
    except Fail as e:
        log(f"error: {e}")
        sys.exit(1)
