//! The doctor's checks of the hypervisors this provider offers: QEMU (on
//! `PATH`, its version, the mapped-ram capability), KVM, the icount-stop
//! plugin, a scavenger's guest cgroups, and Xen's `xl`.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::{Check, Status};
use crate::cgroup::{self, CgroupError, Place};
use crate::driver::host::find_binary;
use crate::driver::{qemu, xen};

/// QEMU older than this is refused: the driver's QMP commands (`migrate`
/// with `channels`, `exit-on-error`) and the save format the broker checks
/// are QEMU 10.0's.
pub const MIN_QEMU: (u32, u32) = (10, 0);
/// `qemu-system-x86_64 --version` and the QMP capability query start no
/// guest (`-machine none`): tens of milliseconds.
const QEMU_TIMEOUT: Duration = Duration::from_secs(5);
/// `xl info` is quick in dom0, slow under nested emulation.
const XL_TIMEOUT: Duration = Duration::from_secs(20);

/// QEMU's version from `qemu-system-x86_64 --version`:
/// `QEMU emulator version 10.0.2 (Debian …)` gives `(10, 0, 2)`.
pub fn parse_qemu_version(text: &str) -> Option<(u32, u32, u32)> {
    let rest = &text[text.find("version ")? + "version ".len()..];
    let word = rest.split_whitespace().next()?;
    let mut parts = word.split('.').map(|p| p.parse::<u32>().ok());
    let major = parts.next()??;
    let minor = parts.next()??;
    let micro = parts.next().flatten().unwrap_or(0);
    Some((major, minor, micro))
}

/// The QEMU binary the driver runs is on `PATH` and is at least [`MIN_QEMU`].
/// Returns the binary when it can be asked further.
pub(super) async fn qemu_binary() -> (Check, Option<PathBuf>) {
    const NAME: &str = "qemu";
    let install = format!(
        "install Debian's {} ≥ {}.{} (on bookworm from bookworm-backports; `make deps`)",
        qemu::PACKAGE,
        MIN_QEMU.0,
        MIN_QEMU.1
    );
    let binary = match find_binary(Path::new(qemu::DEFAULT_BINARY), qemu::PACKAGE) {
        Ok(binary) => binary,
        Err(_) => {
            let detail = format!("{} not found on PATH: {install}", qemu::DEFAULT_BINARY);
            return (Check::new(NAME, Status::Missing, detail), None);
        }
    };
    let out = match run(&binary, &["--version"], None, QEMU_TIMEOUT).await {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
        Err(e) => {
            let detail = format!("{} --version: {e}", binary.display());
            return (Check::new(NAME, Status::Missing, detail), None);
        }
    };
    let check = match parse_qemu_version(&out) {
        Some(v @ (major, minor, micro)) if (v.0, v.1) >= MIN_QEMU => Check::new(
            NAME,
            Status::Ok,
            format!(
                "{}: QEMU {major}.{minor}.{micro} (≥ {}.{} wanted)",
                binary.display(),
                MIN_QEMU.0,
                MIN_QEMU.1
            ),
        ),
        Some((major, minor, micro)) => Check::new(
            NAME,
            Status::Missing,
            format!(
                "{}: QEMU {major}.{minor}.{micro}, older than the {}.{} the driver speaks (QMP, save format): {install}",
                binary.display(),
                MIN_QEMU.0,
                MIN_QEMU.1
            ),
        ),
        None => Check::new(
            NAME,
            Status::Warning,
            format!(
                "{}: could not read a version in `--version` ({:?}); the driver needs QEMU ≥ {}.{}",
                binary.display(),
                out.lines().next().unwrap_or(""),
                MIN_QEMU.0,
                MIN_QEMU.1
            ),
        ),
    };
    (check, Some(binary))
}

/// Whether QEMU's answer to `query-migrate-capabilities` (QMP lines on
/// stdout) lists `mapped-ram`; `None` when no answer to it is among them.
pub fn lists_mapped_ram(qmp_output: &str) -> Option<bool> {
    qmp_output
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find_map(|v| {
            let caps = v.get("return")?.as_array()?;
            (!caps.is_empty()).then(|| {
                caps.iter()
                    .any(|c| c.get("capability").and_then(|n| n.as_str()) == Some("mapped-ram"))
            })
        })
}

/// QEMU has the `mapped-ram` migration capability checkpoints are saved
/// with: asked over QMP on stdio of a QEMU with no machine (`-machine
/// none`, no guest started), which answers in tens of milliseconds.
pub(super) async fn mapped_ram(binary: &Path) -> Check {
    const NAME: &str = "mapped-ram";
    let args = [
        "-machine",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-S",
        "-qmp",
        "stdio",
    ];
    let input = b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-migrate-capabilities\"}\n{\"execute\":\"quit\"}\n";
    let out = match run(binary, &args, Some(input), QEMU_TIMEOUT).await {
        Ok(out) => out,
        Err(e) => {
            return Check::new(
                NAME,
                Status::Warning,
                format!("could not ask {} over QMP: {e}", binary.display()),
            );
        }
    };
    match lists_mapped_ram(&String::from_utf8_lossy(&out.stdout)) {
        Some(true) => Check::new(
            NAME,
            Status::Ok,
            "QEMU lists the mapped-ram migration capability (QMP query-migrate-capabilities)",
        ),
        Some(false) => Check::new(
            NAME,
            Status::Missing,
            format!(
                "this QEMU has no mapped-ram migration capability, which checkpoints are saved with: install QEMU ≥ {}.{}",
                MIN_QEMU.0, MIN_QEMU.1
            ),
        ),
        None => Check::new(
            NAME,
            Status::Warning,
            format!(
                "QEMU gave no answer to query-migrate-capabilities ({}; stderr: {})",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ),
    }
}

/// Opens `/dev/kvm` read-write, as QEMU does for `-accel kvm`.
pub(super) fn open_kvm() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| e.to_string())
}

/// KVM for the configured accelerator (`auto`, `kvm`, `tcg`), given how
/// opening `/dev/kvm` went. Without KVM an `auto` provider still runs,
/// under TCG (a warning); a provider told `kvm` cannot.
pub fn kvm_check(accel: &str, opened: Result<(), String>) -> Check {
    const NAME: &str = "kvm";
    let hint = "load kvm_intel or kvm_amd (with virtualization on in the firmware) and run the provider \
                as root or as a user in group kvm";
    match (accel, opened) {
        ("tcg", _) => Check::new(NAME, Status::Ok, "not used: qemu_accel = tcg"),
        ("kvm", Ok(())) => Check::new(NAME, Status::Ok, "/dev/kvm opens read-write (qemu_accel = kvm)"),
        ("kvm", Err(e)) => Check::new(
            NAME,
            Status::Missing,
            format!("/dev/kvm: {e}, and qemu_accel = kvm needs it: {hint}, or set qemu_accel = auto"),
        ),
        (_, Ok(())) => Check::new(
            NAME,
            Status::Ok,
            "/dev/kvm opens read-write (the driver confirms KVM by booting its first segment's kernel)",
        ),
        (_, Err(e)) => Check::new(
            NAME,
            Status::Warning,
            format!("/dev/kvm: {e}: segments will run under TCG, many times slower; {hint}"),
        ),
    }
}

/// The `vmlot-icount-stop` plugin deterministic segments need, where the
/// driver looks for it (the setting, else beside this binary).
pub(super) fn icount_plugin(configured: Option<&Path>) -> Check {
    const NAME: &str = "icount-stop";
    let path = configured.map(Path::to_path_buf).or_else(|| {
        std::env::current_exe()
            .ok()?
            .parent()
            .map(|dir| dir.join(qemu::PLUGIN_FILE))
    });
    match path {
        Some(path) if path.is_file() => Check::new(NAME, Status::Ok, format!("{} found", path.display())),
        other => Check::new(
            NAME,
            Status::Warning,
            format!(
                "{} not found at {}: deterministic segments (jobs checked by quorum) fail here; \
                 build it with `cargo build --release -p vmlot-icount-stop` and put it beside \
                 vmlot-provider, or set qemu_icount_stop_plugin",
                qemu::PLUGIN_FILE,
                other.map_or("(no path)".into(), |p| p.display().to_string())
            ),
        ),
    }
}

/// Whether a scavenging provider (`idle_load` set) can give each QEMU
/// guest a cgroup of its own under its cgroup: `probed` is what
/// [`cgroup::probe`] found, `None` for a provider that does not scavenge.
/// Without it guests still run (a warning, not a failure).
pub fn guest_cgroup(headroom_mib: u64, probed: Option<Result<Place, CgroupError>>) -> Check {
    const NAME: &str = "cgroup";
    match probed {
        None => Check::new(
            NAME,
            Status::Ok,
            "not used: idle_load unset (a provider that does not scavenge runs its guests in its own cgroup)",
        ),
        Some(Ok(place)) => Check::new(
            NAME,
            Status::Ok,
            format!(
                "{place}: each guest in a cgroup of its own in {}/, memory ceiling the guest's memory + {headroom_mib} MiB, the lowest CPU weight",
                cgroup::GUESTS
            ),
        ),
        Some(Err(e)) => Check::new(
            NAME,
            Status::Warning,
            format!(
                "guests cannot be confined ({e}): they run under SCHED_IDLE but with no memory ceiling; \
                 run the provider as the systemd unit (Delegate=yes) or with write access to its cgroup's memory controller"
            ),
        ),
    }
}

/// The value of `field` in `xl info`'s `field : value` lines.
pub fn xl_info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == field).then(|| value.trim())
    })
}

/// `xl` is installed and `xl info` answers (this is dom0, the toolstack
/// runs), for a provider that offers Xen.
pub(super) async fn xen_toolstack(configured: Option<&Path>) -> Check {
    const NAME: &str = "xen";
    let wanted = configured.unwrap_or(Path::new(xen::DEFAULT_BINARY));
    let binary = match find_binary(wanted, xen::PACKAGE) {
        Ok(binary) => binary,
        Err(_) => {
            return Check::new(
                NAME,
                Status::Missing,
                format!(
                    "{} not found: install Debian's {} and boot this host as Xen's dom0 (or set xl_binary)",
                    wanted.display(),
                    xen::PACKAGE
                ),
            );
        }
    };
    match run(&binary, &["info"], None, XL_TIMEOUT).await {
        Ok(out) if out.status.success() => {
            let info = String::from_utf8_lossy(&out.stdout);
            let version = xl_info_field(&info, "xen_version").unwrap_or("(version not listed)");
            Check::new(
                NAME,
                Status::Ok,
                format!("{}: `xl info` answers, Xen {version}", binary.display()),
            )
        }
        Ok(out) => Check::new(
            NAME,
            Status::Missing,
            format!(
                "`{} info` failed ({}: {}): run as root in dom0 with xencommons started",
                binary.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ),
        Err(e) => Check::new(
            NAME,
            Status::Missing,
            format!(
                "`{} info`: {e}: run as root in dom0 with xencommons started",
                binary.display()
            ),
        ),
    }
}

/// Runs `program args` with `input` on stdin, killed after `limit`.
async fn run(program: &Path, args: &[&str], input: Option<&[u8]>, limit: Duration) -> Result<Output, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start it: {e}"))?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(input)
            .await
            .map_err(|e| format!("writing its input: {e}"))?;
    }
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(out) => out.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {}s", limit.as_secs())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_versions_are_read_from_their_banner() {
        let debian =
            "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright (c) 2003-2025";
        assert_eq!(parse_qemu_version(debian), Some((10, 0, 2)));
        let old = "QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u12)";
        assert_eq!(parse_qemu_version(old), Some((7, 2, 15)));
        assert_eq!(
            parse_qemu_version("QEMU emulator version 9.2.50 (v9.2.0-12-gabc)"),
            Some((9, 2, 50))
        );
        assert_eq!(parse_qemu_version("QEMU emulator version 10.1"), Some((10, 1, 0)));
        assert_eq!(parse_qemu_version("qemu-system-x86_64: command not found"), None);
        assert_eq!(parse_qemu_version("QEMU emulator version x.y"), None);
        assert!((9, 2) < MIN_QEMU && (10, 0) >= MIN_QEMU && (10, 1) >= MIN_QEMU);
    }

    #[test]
    fn mapped_ram_is_found_in_the_qmp_answer() {
        let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}}, "capabilities": ["oob"]}}"#;
        let with = format!(
            "{greeting}\n{{\"return\": {{}}}}\n{{\"return\": [{{\"state\": false, \"capability\": \"xbzrle\"}}, {{\"state\": false, \"capability\": \"mapped-ram\"}}]}}\n"
        );
        assert_eq!(lists_mapped_ram(&with), Some(true));
        let without = format!(
            "{greeting}\n{{\"return\": {{}}}}\n{{\"return\": [{{\"state\": false, \"capability\": \"xbzrle\"}}]}}\n"
        );
        assert_eq!(lists_mapped_ram(&without), Some(false));
        assert_eq!(
            lists_mapped_ram(&format!("{greeting}\n{{\"return\": {{}}}}\n")),
            None
        );
        assert_eq!(lists_mapped_ram(""), None);
    }

    #[test]
    fn kvm_missing_is_a_warning_unless_kvm_is_required() {
        let denied = || Err("Permission denied (os error 13)".to_string());
        assert_eq!(kvm_check("auto", Ok(())).status, Status::Ok);
        let tcg = kvm_check("auto", denied());
        assert_eq!(tcg.status, Status::Warning);
        assert!(
            tcg.detail.contains("TCG") && tcg.detail.contains("group kvm"),
            "{}",
            tcg.detail
        );
        assert_eq!(kvm_check("kvm", denied()).status, Status::Missing);
        assert_eq!(kvm_check("kvm", Ok(())).status, Status::Ok);
        assert_eq!(kvm_check("tcg", denied()).status, Status::Ok);
    }

    #[test]
    fn guest_cgroups_missing_is_a_warning() {
        let place = Place::V1 {
            memory: "/sys/fs/cgroup/memory/system.slice/vmlot-provider.service".into(),
            cpu: None,
        };
        let ok = guest_cgroup(512, Some(Ok(place)));
        assert_eq!(ok.status, Status::Ok);
        assert!(
            ok.detail.contains("+ 512 MiB") && ok.detail.contains("vmlot-provider.service"),
            "{}",
            ok.detail
        );
        let denied = CgroupError::Unavailable("no memory controller".into());
        let warning = guest_cgroup(512, Some(Err(denied)));
        assert_eq!(warning.status, Status::Warning);
        assert!(warning.detail.contains("Delegate=yes"), "{}", warning.detail);
        assert_eq!(guest_cgroup(512, None).status, Status::Ok);
    }

    #[test]
    fn xl_info_fields() {
        let info =
            "host                   : dom0\nxen_version            : 4.17.5\nxen_caps : xen-3.0-x86_64\n";
        assert_eq!(xl_info_field(info, "xen_version"), Some("4.17.5"));
        assert_eq!(xl_info_field(info, "nr_cpus"), None);
    }
}
