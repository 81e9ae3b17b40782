//! The canonical digest of real QEMU 10.0 mapped-ram saves
//! (`vmlot_cas::qemucanon`): QEMU started twice the way the deterministic
//! segments prototype starts it (docs/research/deterministic-segments.md)
//! and saved at icount 0 gives one digest; a byte changed in a RAM page
//! the save holds or in a device field changes it, a byte changed in the
//! masked host-time fields of the `timer` section does not. A third guest,
//! run for a while so that its RAM and timer fields are filled, measures
//! what the digest costs on a 128 MiB save.

use std::cell::Cell;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vmlot_cas::qemucanon::{self, DeviceLeaf, PAGE_SIZE, SaveBytes};
use vmlot_cas::qemusave::{HEADER_PREFIX, RAM_BLOCK_RECORD_MAX, parse_header};
use vmlot_tests::vm::guest_files;

const SETUP: &str = "run `make deps guest` in the repository root (and install qemu-system-x86)";

/// A save file read through `pread`, counting what is read.
struct SaveFile {
    file: File,
    len: u64,
    reads: Cell<u64>,
    bytes: Cell<u64>,
}

impl SaveFile {
    fn open(path: &Path) -> Self {
        let file = File::open(path).unwrap();
        let len = file.metadata().unwrap().len();
        Self {
            file,
            len,
            reads: Cell::new(0),
            bytes: Cell::new(0),
        }
    }
}

impl SaveBytes for SaveFile {
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; len];
        self.file.read_exact_at(&mut buf, offset)?;
        self.reads.set(self.reads.get() + 1);
        self.bytes.set(self.bytes.get() + len as u64);
        Ok(buf)
    }
    fn len(&self) -> u64 {
        self.len
    }
}

/// A copy of a save with the byte at `at` flipped (without copying it).
struct Flipped<'a> {
    save: &'a SaveFile,
    at: u64,
}

impl SaveBytes for Flipped<'_> {
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = self.save.read_at(offset, len)?;
        if let Some(i) = self.at.checked_sub(offset).filter(|&i| i < len as u64) {
            buf[i as usize] ^= 0x5a;
        }
        Ok(buf)
    }
    fn len(&self) -> u64 {
        self.save.len
    }
}

/// The digest with the pages' SHA-256 read from the save itself.
fn digest(save: &(impl SaveBytes + ?Sized)) -> [u8; 32] {
    qemucanon::canonical_digest(save, qemucanon::page_sha256(save)).unwrap()
}

/// A QEMU of the prototype's command line, stopped (`-S`), with QMP.
struct Qemu {
    child: Child,
    qmp: BufReader<UnixStream>,
}

impl Qemu {
    fn start(dir: &Path, name: &str) -> Self {
        let (kernel, initrd) = guest_files();
        let socket = dir.join(format!("{name}.qmp"));
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg,thread=single", "-icount", "shift=0,sleep=off"])
            .args(["-rtc", "clock=vm,base=2024-01-01T00:00:00"])
            .args([
                "-machine",
                "q35",
                "-m",
                "128",
                "-smp",
                "1",
                "-nodefaults",
                "-no-user-config",
            ])
            .args(["-display", "none", "-no-reboot", "-no-shutdown"])
            .arg("-chardev")
            .arg(format!(
                "file,id=console,path={}",
                dir.join(format!("{name}.console")).display()
            ))
            .args(["-serial", "chardev:console"])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", "console=ttyS0 quiet loglevel=0"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=qmp,path={},server=on,wait=off",
                socket.display()
            ))
            .args(["-mon", "chardev=qmp,mode=control", "-S"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("qemu-system-x86_64: {e}: {SETUP}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(&socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => panic!("QMP {}: {e}", socket.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut qemu = Self {
            child,
            qmp: BufReader::new(stream),
        };
        let greeting = qemu.line();
        assert!(greeting.get("QMP").is_some(), "QMP greeting {greeting}");
        qemu.cmd("qmp_capabilities", json!({}));
        qemu
    }

    fn line(&mut self) -> Value {
        let mut line = String::new();
        self.qmp.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP said {line:?}: {e}"))
    }

    /// Runs a QMP command; its `return`.
    fn cmd(&mut self, execute: &str, arguments: Value) -> Value {
        let msg = json!({"execute": execute, "arguments": arguments});
        writeln!(self.qmp.get_mut(), "{msg}").unwrap();
        loop {
            let reply = self.line();
            if let Some(r) = reply.get("return") {
                return r.clone();
            }
            assert!(reply.get("event").is_some(), "QMP {execute}: {reply}");
        }
    }

    /// Saves the stopped VM to `path` with mapped-ram.
    fn save(&mut self, path: &Path) {
        let caps = json!({"capabilities": [{"capability": "mapped-ram", "state": true}]});
        self.cmd("migrate-set-capabilities", caps);
        self.cmd("migrate", json!({"uri": format!("file:{}", path.display())}));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let info = self.cmd("query-migrate", json!({}));
            match info["status"].as_str() {
                Some("completed") => return,
                Some("failed" | "cancelled") => panic!("migration: {info}"),
                _ if Instant::now() > deadline => panic!("migration still {info}"),
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Saves a fresh QEMU at icount 0 (it never ran) to `dir/name.sav`.
fn save_at_icount_zero(dir: &Path, name: &str) -> PathBuf {
    let mut qemu = Qemu::start(dir, name);
    assert_eq!(qemu.cmd("query-replay", json!({}))["icount"], 0);
    let path = dir.join(format!("{name}.sav"));
    qemu.save(&path);
    path
}

/// File offsets of the pages whose bitmap bit is set, per RAM block.
fn pages_held(save: &SaveFile) -> Vec<(String, Vec<u64>)> {
    let mut head = parse_header(&save.read_at(0, HEADER_PREFIX).unwrap()).unwrap();
    while let Some(at) = head.next_block_at() {
        let len = RAM_BLOCK_RECORD_MAX.min((save.len - at) as usize);
        head.read_next_block(&save.read_at(at, len).unwrap()).unwrap();
    }
    let mut held = Vec::new();
    for block in head.ram_blocks {
        let mapped = block.mapped.unwrap();
        let pages = block.used_length / PAGE_SIZE;
        let bitmap = save
            .read_at(mapped.bitmap_offset, pages.div_ceil(8) as usize)
            .unwrap();
        let set = (0..pages).filter(|&i| bitmap[(i / 8) as usize] >> (i % 8) & 1 == 1);
        held.push((
            block.id,
            set.map(|i| mapped.pages_offset + i * PAGE_SIZE).collect(),
        ));
    }
    held
}

fn leaf<'a>(leaves: &'a [DeviceLeaf], key: &str) -> &'a DeviceLeaf {
    leaves
        .iter()
        .find(|l| l.key == key)
        .unwrap_or_else(|| panic!("no leaf {key}"))
}

/// Flipping a byte at `at` changes the digest (`base`) exactly when `changes`.
fn assert_flip(save: &SaveFile, base: [u8; 32], at: u64, changes: bool, what: &str) {
    let flipped = digest(&Flipped { save, at });
    assert_eq!(flipped != base, changes, "a byte flipped {what} at {at:#x}");
}

#[test]
fn replicas_saved_at_icount_zero_have_one_digest() {
    let dir = tempfile::tempdir().unwrap();
    let paths = [
        save_at_icount_zero(dir.path(), "a"),
        save_at_icount_zero(dir.path(), "b"),
    ];
    let [a, b] = paths.each_ref().map(|p| SaveFile::open(p));
    assert_eq!(a.len, b.len);
    let mut differing = 0;
    for at in (0..a.len).step_by(1 << 20) {
        let n = (a.len - at).min(1 << 20) as usize;
        let (x, y) = (a.read_at(at, n).unwrap(), b.read_at(at, n).unwrap());
        differing += x.iter().zip(&y).filter(|(x, y)| x != y).count();
    }
    // QEMU reads the host clock into the timer fields when the VM starts
    // and stops; a VM saved before it ever ran has zeros there, so these
    // two are byte for byte equal (the masked fields' differences are
    // exercised on the run guest below and by flipping bytes here).
    eprintln!("two icount-0 saves of {} bytes: {differing} bytes differ", a.len);
    let base = digest(&a);
    assert_eq!(base, digest(&b));

    let held = pages_held(&a);
    let (block, pages) = held.iter().find(|(_, p)| !p.is_empty()).unwrap();
    assert_flip(&a, base, pages[0] + 123, true, &format!("in a page of {block}"));
    // A page whose bit is clear is not in the save (QEMU does not load it).
    let (pc_ram, pc_pages) = &held[0];
    assert_eq!(
        (pc_ram.as_str(), pc_pages.len()),
        ("pc.ram", 0),
        "pc.ram at icount 0"
    );
    let head = parse_header(&a.read_at(0, HEADER_PREFIX).unwrap()).unwrap();
    let absent = head.guest_ram().unwrap().mapped.unwrap().pages_offset + 7 * PAGE_SIZE;
    assert_flip(&a, base, absent, false, "in an absent page");

    let leaves = qemucanon::device_leaves(&a).unwrap();
    let masked: Vec<&str> = leaves
        .iter()
        .filter(|l| l.masked)
        .map(|l| l.key.as_str())
        .collect();
    assert_eq!(
        masked,
        ["timer/0@v2:cpu_ticks_offset", "timer/0@v2:cpu_clock_offset"]
    );
    let icount = leaf(&leaves, "timer/0@v2:timer/icount@v1/qemu_icount");
    assert_flip(&a, base, icount.at + 7, true, "in timer's qemu_icount");
    let eip = leaf(&leaves, "cpu/0@v12:env.eip");
    assert_flip(&a, base, eip.at, true, "in the cpu's eip");
    for key in &masked {
        let l = leaf(&leaves, key);
        assert_flip(&a, base, l.at + 3, false, &format!("in the masked {key}"));
    }
}

#[test]
fn a_run_guest_save_digests_in_a_fraction_of_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let mut qemu = Qemu::start(dir.path(), "run");
    // Booting, for about 3e9 instructions (3–6 s; 12,000 pc.ram pages
    // held at 3.1e9).
    qemu.cmd("cont", json!({}));
    let (started, icount) = (Instant::now(), |q: &mut Qemu| {
        q.cmd("query-replay", json!({}))["icount"].as_u64()
    });
    while icount(&mut qemu) < Some(3_000_000_000) && started.elapsed() < Duration::from_secs(12) {
        std::thread::sleep(Duration::from_millis(100));
    }
    qemu.cmd("stop", json!({}));
    let icount = icount(&mut qemu).unwrap();
    let path = dir.path().join("run.sav");
    qemu.save(&path);
    drop(qemu);

    // As the broker would: page digests from elsewhere (a manifest), no page read.
    let save = SaveFile::open(&path);
    let t = Instant::now();
    let named = qemucanon::canonical_digest(&save, |offset| {
        let mut id = [0; 32];
        id[..8].copy_from_slice(&offset.to_be_bytes());
        Ok(Some(id))
    })
    .unwrap();
    let structure = t.elapsed();
    let (reads, bytes) = (save.reads.get(), save.bytes.get());
    let t = Instant::now();
    let hashed = digest(&save);
    let whole = t.elapsed();
    assert_ne!(named, hashed);
    let held = pages_held(&save);
    let pc_ram = &held[0].1;
    eprintln!(
        "save after {icount} instructions, {} bytes, {} pc.ram pages held: digest without \
         reading pages {:.1} ms ({reads} reads, {bytes} bytes), with the pages' SHA-256 {:.1} ms",
        save.len,
        pc_ram.len(),
        structure.as_secs_f64() * 1e3,
        whole.as_secs_f64() * 1e3,
    );
    assert!(
        pc_ram.len() > 1000,
        "the guest ran: {} pc.ram pages",
        pc_ram.len()
    );

    let leaves = qemucanon::device_leaves(&save).unwrap();
    for key in ["timer/0@v2:cpu_ticks_offset", "timer/0@v2:cpu_clock_offset"] {
        let l = leaf(&leaves, key);
        let value = save.read_at(l.at, 8).unwrap();
        assert_ne!(value, [0; 8], "{key}: a host clock reading");
        assert_flip(&save, hashed, l.at + 6, false, &format!("in the masked {key}"));
    }
    assert_flip(
        &save,
        hashed,
        pc_ram[pc_ram.len() / 2] + 4000,
        true,
        "in a pc.ram page",
    );
}
