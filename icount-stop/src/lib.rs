//! vmlot-icount-stop: a QEMU 10.0 TCG plugin that brings a single-vCPU guest to a
//! halt at a plugin-counted instruction boundary, so the host can stop it
//! there with QMP `stop` without racing the vCPU.
//!
//! Arguments: `-plugin libvmlot_icount_stop.so,target=N,ctl=/path/to/unix.sock`
//!   target=N  trigger after N executed guest instructions (counted per
//!             translation block, at block entry); 0 or absent = disarmed
//!   ctl=PATH  unix stream socket the host listens on (line protocol below)
//!
//! Counting: every TB gets an inline `counter += n_insns` at entry, then a
//! conditional callback `if counter >= BIAS`. Arming with K sets
//! counter = BIAS - K, so the callback fires in the first TB whose entry
//! brings the executed count to >= K (BIAS is constant: no retranslation
//! is needed to re-arm).
//!
//! Stopping (the part that must not race):
//!  1. The conditional callback calls `qemu_plugin_reset`, which queues
//!     "safe" work on the vCPU and kicks it: the vCPU finishes the current
//!     TB and leaves cpu_exec at the next TB boundary (deterministic: the
//!     kick comes from the vCPU thread itself).
//!  2. QEMU runs the reset in the vCPU thread, outside cpu_exec, in an
//!     exclusive section and WITHOUT the BQL; our reset callback tells the
//!     host `parked <executed>` and blocks.
//!  3. The host sends QMP `stop` and waits until QEMU's trace log shows
//!     `qmp_enter_stop`: from then until pause_all_vcpus() sleeps, the main
//!     thread holds the BQL and sets runstate=paused and cpu->stop.
//!  4. The host sends `release`. Our callback returns; the vCPU thread must
//!     take the BQL before it can decide to run guest code again, so it
//!     only gets it after cpu->stop is set, and stops without executing
//!     another guest instruction.
//!
//! Host -> plugin lines: `arm K`, `release`.  Plugin -> host: `hello`,
//! `parked E` (E = instructions counted since the last arm), `armed K`.

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};

use qemu_plugin_sys::*;

#[unsafe(no_mangle)]
pub static qemu_plugin_version: c_int = QEMU_PLUGIN_VERSION as c_int;

/// Counter value at which the conditional callback fires.
const BIAS: u64 = 1 << 62;

struct Entry(qemu_plugin_u64);
// The scoreboard is owned by QEMU and lives as long as the plugin.
unsafe impl Send for Entry {}
unsafe impl Sync for Entry {}

struct State {
    id: qemu_plugin_id_t,
    counter: Entry,
    out: Mutex<Option<UnixStream>>,
    released: Mutex<bool>,
    cv: Condvar,
}

static STATE: OnceLock<State> = OnceLock::new();
static TRIGGERED: AtomicBool = AtomicBool::new(false);
/// Counter value at the last arm (BIAS - K), to report instructions executed.
static ARMED_AT: AtomicU64 = AtomicU64::new(0);

fn st() -> &'static State {
    STATE.get().expect("icount-stop not installed")
}

fn send(line: &str) {
    if let Some(s) = st().out.lock().unwrap().as_mut() {
        let _ = s.write_all(line.as_bytes());
        let _ = s.write_all(b"\n");
        let _ = s.flush();
    }
}

fn log(msg: &str) {
    let c = std::ffi::CString::new(format!("icount-stop: {msg}\n")).unwrap();
    unsafe { qemu_plugin_outs(c.as_ptr()) };
}

fn counter_get() -> u64 {
    unsafe { qemu_plugin_u64_get(qemu_plugin_u64 { ..st().counter.0 }, 0) }
}

fn counter_set(v: u64) {
    unsafe { qemu_plugin_u64_set(qemu_plugin_u64 { ..st().counter.0 }, 0, v) }
}

/// Arms the trigger K instructions from now (K = 0: disarm). Only called
/// while the vCPU does not run guest code (before the first `cont`, or
/// while the VM is stopped).
fn arm(k: u64) {
    if k == 0 {
        ARMED_AT.store(0, Ordering::SeqCst);
        counter_set(0);
    } else {
        ARMED_AT.store(BIAS - k, Ordering::SeqCst);
        counter_set(BIAS - k);
    }
    TRIGGERED.store(false, Ordering::SeqCst);
}

unsafe extern "C" fn tb_trans(_id: qemu_plugin_id_t, tb: *mut qemu_plugin_tb) {
    // SAFETY: called by QEMU per its plugin API with valid arguments;
    // the calls below follow the same API's contracts.
    unsafe {
        let n = qemu_plugin_tb_n_insns(tb) as u64;
        let e = qemu_plugin_u64 { ..st().counter.0 };
        // Registration order is emission order: add first, then compare, so
        // the comparison sees the count including this whole TB.
        qemu_plugin_register_vcpu_tb_exec_inline_per_vcpu(
            tb,
            qemu_plugin_op::QEMU_PLUGIN_INLINE_ADD_U64,
            e,
            n,
        );
        qemu_plugin_register_vcpu_tb_exec_cond_cb(
            tb,
            Some(on_reached),
            qemu_plugin_cb_flags::QEMU_PLUGIN_CB_NO_REGS,
            qemu_plugin_cond::QEMU_PLUGIN_COND_GE,
            qemu_plugin_u64 { ..st().counter.0 },
            BIAS,
            std::ptr::null_mut(),
        );
    }
}

/// vCPU thread, inside cpu_exec, at the entry of the TB that reached K.
unsafe extern "C" fn on_reached(_vcpu: c_uint, _udata: *mut c_void) {
    // SAFETY: called by QEMU per its plugin API with valid arguments;
    // the calls below follow the same API's contracts.
    unsafe {
        if !TRIGGERED.swap(true, Ordering::SeqCst) {
            // Queues safe work + kicks this vCPU: it leaves cpu_exec at the end
            // of this TB. Also unregisters our callbacks and flushes all TBs.
            qemu_plugin_reset(st().id, Some(on_reset));
        }
    }
}

/// vCPU thread, outside cpu_exec, exclusive section, BQL not held.
unsafe extern "C" fn on_reset(id: qemu_plugin_id_t) {
    // SAFETY: called by QEMU per its plugin API with valid arguments;
    // the calls below follow the same API's contracts.
    unsafe {
        let executed = counter_get().wrapping_sub(ARMED_AT.load(Ordering::SeqCst));
        let s = st();
        *s.released.lock().unwrap() = false;
        send(&format!("parked {executed}"));
        let has_host = s.out.lock().unwrap().is_some();
        if has_host {
            let mut rel = s.released.lock().unwrap();
            while !*rel {
                rel = s.cv.wait(rel).unwrap();
            }
        }
        // Disarmed until the host arms again; counting goes on.
        arm(0);
        qemu_plugin_register_vcpu_tb_trans_cb(id, Some(tb_trans));
    }
}

static INITIAL: AtomicU64 = AtomicU64::new(0);

extern "C" fn vcpu_init(_id: qemu_plugin_id_t, vcpu: c_uint) {
    if vcpu == 0 {
        arm(INITIAL.load(Ordering::SeqCst));
    }
}

fn reader(stream: UnixStream) {
    let r = BufReader::new(stream);
    for line in r.lines() {
        let Ok(line) = line else { break };
        let mut it = line.split_whitespace();
        match (it.next(), it.next()) {
            (Some("arm"), Some(k)) => match k.parse::<u64>() {
                Ok(k) if k < BIAS => {
                    arm(k);
                    send(&format!("armed {k}"));
                }
                _ => send(&format!("error bad arm {k}")),
            },
            (Some("release"), None) => {
                let s = st();
                *s.released.lock().unwrap() = true;
                s.cv.notify_all();
            }
            (Some("count"), None) => {
                let v = counter_get().wrapping_sub(ARMED_AT.load(Ordering::SeqCst));
                send(&format!("count {v}"));
            }
            _ => send(&format!("error unknown {line}")),
        }
    }
    // Host went away: never leave a vCPU parked forever.
    let s = st();
    *s.out.lock().unwrap() = None;
    *s.released.lock().unwrap() = true;
    s.cv.notify_all();
}

/// QEMU's entry point into the plugin.
///
/// # Safety
///
/// Called once by QEMU at start-up, with `info` and `argv` (`argc`
/// strings) valid for the call, as its plugin API promises.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qemu_plugin_install(
    id: qemu_plugin_id_t,
    info: *const qemu_info_t,
    argc: c_int,
    argv: *mut *mut c_char,
) -> c_int {
    // SAFETY: called by QEMU per its plugin API with valid arguments;
    // the calls below follow the same API's contracts.
    unsafe {
        let mut target: u64 = 0;
        let mut ctl: Option<String> = None;
        for i in 0..argc as isize {
            let arg = CStr::from_ptr(*argv.offset(i)).to_string_lossy().into_owned();
            match arg.split_once('=') {
                Some(("target", v)) => match v.parse() {
                    Ok(v) => target = v,
                    Err(_) => {
                        log(&format!("bad target {v}"));
                        return -1;
                    }
                },
                Some(("ctl", v)) => ctl = Some(v.to_string()),
                _ => {
                    log(&format!("unknown argument {arg}"));
                    return -1;
                }
            }
        }
        let info = &*info;
        if !info.system_emulation || info.__bindgen_anon_1.system.smp_vcpus != 1 {
            log("needs system emulation with exactly one vCPU (-smp 1)");
            return -1;
        }
        let score = qemu_plugin_scoreboard_new(std::mem::size_of::<u64>());
        let stream = match &ctl {
            Some(path) => match UnixStream::connect(path) {
                Ok(s) => Some(s),
                Err(e) => {
                    log(&format!("cannot connect {path}: {e}"));
                    return -1;
                }
            },
            None => None,
        };
        let reader_stream = stream.as_ref().map(|s| s.try_clone().expect("clone"));
        let _ = STATE.set(State {
            id,
            counter: Entry(qemu_plugin_u64 { score, offset: 0 }),
            out: Mutex::new(stream),
            released: Mutex::new(false),
            cv: Condvar::new(),
        });
        // The scoreboard has no vCPU slots yet: arm when vCPU 0 exists.
        INITIAL.store(target, Ordering::SeqCst);
        qemu_plugin_register_vcpu_init_cb(id, Some(vcpu_init));
        if let Some(rs) = reader_stream {
            std::thread::Builder::new()
                .name("icount-stop-ctl".into())
                .spawn(move || reader(rs))
                .expect("spawn");
        }
        qemu_plugin_register_vcpu_tb_trans_cb(id, Some(tb_trans));
        send(&format!("hello target={target}"));
        0
    }
}
