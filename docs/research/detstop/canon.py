#!/usr/bin/env python3
"""Canonical hash of a QEMU 10.0 migration stream saved with mapped-ram.

  canon.py FILE...            one JSON line per file: {hash, ram, devices, ...}
  canon.py --diff A B         the device-state leaves that differ between two saves
  canon.py --dump FILE        every device-state leaf (path, hex), masked ones marked

The stream is walked with its own description: QEMU appends a JSON
"vmdesc" (section type 0x06) after the EOF marker that lists, for every
device section it wrote, each field's name, type and size, with nested
structs, arrays and the subsections actually sent. Each device section is
parsed field by field with it; leaves named in MASK (looked up by section
name and field path in the vmdesc, an error if absent) are replaced by a
marker before hashing. RAM is not taken from the stream's ram sections
(their number varies with the migration thread's timing): it is read from
the mapped-ram layout: per block, the pages whose bit is set in the
block's bitmap and whose content is not all zero, hashed with the block
name and page index. A zero page and an absent page hash the same.

Python stdlib only.
"""

import hashlib
import json
import mmap
import os
import struct
import sys

# (section name, field path) -> why. Host-time fields of vmstate "timer"
# (softmmu cpu timers): cpu_ticks_offset / cpu_clock_offset hold host
# clock readings taken at cpu_disable_ticks() when the VM stops.
MASK = {
    ("timer", ("cpu_ticks_offset",)): "host time at vm stop",
    ("timer", ("cpu_clock_offset",)): "host time at vm stop",
}

EOF, START, PART, END, FULL, SUBSECTION, VMDESC, CONFIG, COMMAND = range(9)
FOOTER = 0x7E
RAM_FLAG_ZERO = 0x02
RAM_FLAG_MEM_SIZE = 0x04
RAM_FLAG_PAGE = 0x08
RAM_FLAG_EOS = 0x10
RAM_FLAG_CONTINUE = 0x20
RAM_FLAG_MULTIFD_FLUSH = 0x200


class StreamError(Exception):
    pass


class Reader:
    def __init__(self, mm):
        self.mm = mm
        self.pos = 0

    def read(self, n):
        if self.pos + n > len(self.mm):
            raise StreamError(f"truncated at {self.pos:#x}")
        b = self.mm[self.pos:self.pos + n]
        self.pos += n
        return b

    def u8(self):
        return self.read(1)[0]

    def u16(self):
        return struct.unpack(">H", self.read(2))[0]

    def u32(self):
        return struct.unpack(">I", self.read(4))[0]

    def u64(self):
        return struct.unpack(">Q", self.read(8))[0]

    def str8(self):
        return self.read(self.u8()).decode()


def find_vmdesc(mm):
    """The JSON after the last QEMU_VM_VMDESCRIPTION marker at the end."""
    tail_start = max(0, len(mm) - 16 * 1024 * 1024)
    tail = mm[tail_start:]
    nul = tail.rfind(b"\0")
    brace = tail.find(b"{", nul)
    hdr = tail_start + brace - 5
    if brace < 0 or mm[hdr] != VMDESC:
        raise StreamError("no vmdesc at the end of the stream")
    (length,) = struct.unpack(">I", mm[hdr + 1:hdr + 5])
    raw = bytes(mm[hdr + 5:hdr + 5 + length])
    return json.loads(raw), raw, hdr


def expand(fields):
    out = []
    for f in fields:
        n = f.get("array_len")
        if n is None:
            out.append((f, f["name"]))
        else:
            for i in range(n):
                out.append((f, f"{f['name']}[{i}]"))
    return out


def read_struct(r, desc, path, leaves):
    for f, name in expand(desc.get("fields", [])):
        p = path + (name,)
        t = f["type"]
        if t == "struct":
            read_struct(r, f["struct"], p, leaves)
        elif t == "capability":
            leaves.append((p, r.read(r.u8())))
        else:
            leaves.append((p, r.read(int(f["size"]))))
    for sub in desc.get("subsections", []):
        if r.u8() != SUBSECTION:
            raise StreamError(f"subsection {sub.get('vmsd_name')} missing at {r.pos:#x}")
        name = r.str8()
        version = r.u32()
        read_struct(r, sub, path + (f"{name}@v{version}",), leaves)


def read_ram(r, page_size, mapped, blocks):
    """One part of the ram section; with mapped-ram the setup part lists the
    blocks, each record followed (at its own offsets) by bitmap and pages."""
    while True:
        addr = r.u64()
        flags = addr & (page_size - 1)
        addr &= ~(page_size - 1)
        if flags & RAM_FLAG_MEM_SIZE:
            total = addr
            while total > 0:
                name = r.str8()
                length = r.u64()
                total -= length
                blk = {"id": name, "used_length": length}
                if mapped:
                    version = r.u32()
                    psize = r.u64()
                    if version != 1 or psize != page_size:
                        raise StreamError(f"mapped-ram header of {name}: v{version} page {psize}")
                    blk["bitmap_offset"] = r.u64()
                    blk["pages_offset"] = r.u64()
                    r.pos = blk["pages_offset"] + length
                blocks.append(blk)
            flags &= ~RAM_FLAG_MEM_SIZE
        if flags & (RAM_FLAG_ZERO | RAM_FLAG_PAGE):
            raise StreamError("page data inside the stream: not a mapped-ram save")
        if flags & RAM_FLAG_MULTIFD_FLUSH:
            flags &= ~RAM_FLAG_MULTIFD_FLUSH
            if not flags:
                continue
        if flags & RAM_FLAG_EOS:
            return
        if flags:
            raise StreamError(f"unknown ram flags {flags:#x} at {r.pos:#x}")


def parse(path):
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    desc, desc_raw, desc_at = find_vmdesc(mm)
    page_size = desc.get("page_size", 4096)
    devices = {(d["name"], d["instance_id"]): d for d in desc["devices"]}
    r = Reader(mm)
    if r.read(4) != b"QEVM" or r.u32() != 3:
        raise StreamError("not a QEMU v3 migration stream")
    sections = {}      # section_id -> (name, instance, version)
    states = []        # (name, instance, version, leaves) in stream order
    blocks = []
    caps = []
    ram_parts = 0
    while True:
        t = r.u8()
        if t == EOF:
            break
        if t == CONFIG:
            leaves = []
            cdesc = desc.get("configuration")
            if cdesc is None:
                r.read(r.u32())
            else:
                read_struct(r, cdesc, ("configuration",), leaves)
            caps = [v.decode() for p, v in leaves if p[-1].startswith("capabilities")]
            states.append(("configuration", 0, 0, leaves))
        elif t in (START, FULL):
            sid = r.u32()
            name = r.str8()
            inst = r.u32()
            ver = r.u32()
            sections[sid] = (name, inst, ver)
            if name == "ram":
                read_ram(r, page_size, "mapped-ram" in caps, blocks)
                ram_parts += 1
            else:
                d = devices.get((name, inst))
                if d is None:
                    raise StreamError(f"section {name}/{inst} not in vmdesc")
                leaves = []
                read_struct(r, d, (), leaves)
                states.append((name, inst, ver, leaves))
        elif t in (PART, END):
            sid = r.u32()
            name = sections[sid][0]
            if name != "ram":
                raise StreamError(f"iterative section {name} not supported")
            read_ram(r, page_size, "mapped-ram" in caps, blocks)
            ram_parts += 1
        elif t == FOOTER:
            r.u32()
        elif t == COMMAND:
            r.u16()
            r.read(r.u16())
        else:
            raise StreamError(f"unknown section type {t:#x} at {r.pos - 1:#x}")
    return {"mm": mm, "desc": desc, "desc_raw": desc_raw, "states": states,
            "blocks": blocks, "caps": caps, "ram_parts": ram_parts,
            "page_size": page_size, "end": r.pos, "vmdesc_at": desc_at}


def check_masks(states):
    present = {(name, path) for name, _, _, leaves in states for path, _ in leaves}
    for key in MASK:
        if key not in present:
            raise StreamError(f"masked field {key} not in the stream's vmdesc")


def device_leaves(p):
    """(section, path, bytes-or-None) for every leaf; None = masked."""
    for name, inst, ver, leaves in p["states"]:
        for path, data in leaves:
            masked = (name, path) in MASK
            yield f"{name}/{inst}@v{ver}", path, None if masked else bytes(data)


def ram_hash(p):
    mm, ps = p["mm"], p["page_size"]
    zero = bytes(ps)
    h = hashlib.sha256()
    stats = {}
    for b in p["blocks"]:
        n = b["used_length"] // ps
        h.update(b"block\0" + b["id"].encode() + b"\0" + struct.pack(">Q", b["used_length"]))
        bm = mm[b["bitmap_offset"]:b["bitmap_offset"] + (n + 7) // 8]
        base = b["pages_offset"]
        set_bits = pages = 0
        for byte_i, byte in enumerate(bm):
            if not byte:
                continue
            for bit in range(8):
                if byte >> bit & 1:
                    i = byte_i * 8 + bit
                    if i >= n:
                        break
                    set_bits += 1
                    page = mm[base + i * ps:base + (i + 1) * ps]
                    if page != zero:
                        pages += 1
                        h.update(struct.pack(">Q", i) + page)
        stats[b["id"]] = {"bits_set": set_bits, "nonzero_pages": pages}
    return h.hexdigest(), stats


def canonical_hash(path):
    p = parse(path)
    check_masks(p["states"])
    dh = hashlib.sha256()
    for sec, fpath, data in device_leaves(p):
        key = (sec + ":" + "/".join(fpath)).encode()
        dh.update(struct.pack(">I", len(key)) + key)
        if data is None:
            dh.update(b"\xffMASKED")
        else:
            dh.update(struct.pack(">I", len(data)) + data)
    rh, stats = ram_hash(p)
    total = hashlib.sha256(b"vmlot-canon-v1\0" + bytes.fromhex(rh) + bytes.fromhex(dh.hexdigest()))
    return {"hash": total.hexdigest(), "ram": rh, "devices": dh.hexdigest(),
            "vmdesc_sha256": hashlib.sha256(p["desc_raw"]).hexdigest(),
            "ram_parts": p["ram_parts"], "sections": len(p["states"]),
            "blocks": stats, "masked": sorted(f"{s}:{'/'.join(f)}" for s, f in MASK)}


def main(argv):
    if len(argv) == 3 and argv[0] == "--diff":
        a, b = parse(argv[1]), parse(argv[2])
        la = {(s, f): d for s, f, d in device_leaves(a)}
        lb = {(s, f): d for s, f, d in device_leaves(b)}
        for k in sorted(set(la) | set(lb)):
            if la.get(k, b"?") != lb.get(k, b"?"):
                print(f"{k[0]}:{'/'.join(k[1])}: "
                      f"{la.get(k, b'').hex() if la.get(k) else la.get(k)} != "
                      f"{lb.get(k, b'').hex() if lb.get(k) else lb.get(k)}")
        print(f"vmdesc identical: {a['desc_raw'] == b['desc_raw']}")
        print(f"ram parts: {a['ram_parts']} vs {b['ram_parts']}")
        return
    if len(argv) == 2 and argv[0] == "--dump":
        p = parse(argv[1])
        for s, f, d in device_leaves(p):
            print(f"{s}:{'/'.join(f)} = {'MASKED' if d is None else d.hex()}")
        return
    import time
    for path in argv:
        t0 = time.monotonic()
        out = canonical_hash(path)
        out["file"] = path
        out["seconds"] = round(time.monotonic() - t0, 3)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
