//! `vmlot run-local DIR`: a bundle written by `vmlot fetch` resumed on this
//! machine's own QEMU, outside the market, with the guest's console on
//! standard output. The providers' QEMU driver does it, so the machine is
//! rebuilt with exactly the arguments the state was saved under; the guest
//! runs until it powers off (or crashes), and its disks in DIR are written
//! in place as it goes. Interrupted (Ctrl-C), nothing is saved.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tokio_util::sync::CancellationToken;
use vmlot_provider::driver::qemu::{Accel, CONSOLE_FILE, QemuConfig, QemuDriver};
use vmlot_provider::driver::{BootFiles, Driver, SegmentEnd, SegmentPlan, SegmentStart};
use vmlot_schemas::HypervisorKind;

use crate::commands::fetch::{
    FetchManifest, INITRD_FILE, KERNEL_FILE, MACHINE_STATE_FILE, MANIFEST_FILE, MEMORY_FILE,
};

/// Longest a local run goes on before it is stopped: a guest that never
/// powers off is ended by its user.
const FOREVER: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How often the console file is read while the guest runs.
const TAIL_EVERY: Duration = Duration::from_millis(100);

/// Resumes the bundle in `dir` with `accel` (`auto`, `kvm` or `tcg`).
pub async fn run_local(dir: &Path, accel: &str) -> Result<()> {
    let described = dir.join(MANIFEST_FILE);
    let text = std::fs::read(&described).with_context(|| {
        format!(
            "reading {} (write the bundle with `vmlot fetch`)",
            described.display()
        )
    })?;
    let manifest: FetchManifest = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a fetch manifest", described.display()))?;
    let vm = manifest.image.vm.clone();
    if vm.hypervisor != HypervisorKind::Qemu {
        bail!(
            "job {} ran on {:?}: run-local resumes QEMU jobs only",
            manifest.job,
            vm.hypervisor
        );
    }
    let accel =
        accel_for(accel, manifest.deterministic).with_context(|| format!("resuming job {}", manifest.job))?;
    let has = |role: &str| manifest.files.iter().any(|f| f.role == role);
    if !has("kernel") {
        bail!(
            "{} names no kernel: fetch it again with this vmlot",
            described.display()
        );
    }
    let mut disks: Vec<(usize, PathBuf)> = manifest
        .files
        .iter()
        .filter(|f| f.role == "disk")
        .map(|f| (f.index.unwrap_or(0), dir.join(&f.file)))
        .collect();
    disks.sort();
    let start = if has("machine-state") {
        SegmentStart::Restore {
            machine_state: dir.join(MACHINE_STATE_FILE),
        }
    } else {
        SegmentStart::Boot
    };
    let workdir = tempfile::Builder::new()
        .prefix(".run-local-")
        .tempdir_in(dir)
        .with_context(|| format!("a work directory in {}", dir.display()))?;
    let plan = SegmentPlan {
        vm,
        files: BootFiles {
            kernel: dir.join(KERNEL_FILE),
            initrd: has("initrd").then(|| dir.join(INITRD_FILE)),
            disks: disks.into_iter().map(|(_, path)| path).collect(),
            // Mapped and written in place, as the disks are.
            memory: has("memory").then(|| dir.join(MEMORY_FILE)),
        },
        start,
        run_for: FOREVER,
        instructions: None,
        workdir: workdir.path().to_path_buf(),
        owner: None,
    };
    let driver = QemuDriver::new(QemuConfig {
        accel,
        ..QemuConfig::default()
    });
    let cancel = CancellationToken::new();
    let interrupt = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                cancel.cancel();
            }
        })
    };
    eprintln!(
        "resuming job {} {} on this machine's QEMU; Ctrl-C ends it",
        manifest.job,
        match manifest.after_segment {
            Some(k) => format!("after segment {k}"),
            None => "from its image".into(),
        }
    );
    let console = workdir.path().join(CONSOLE_FILE);
    let mut shown = 0;
    let run = driver.run_segment(&plan, cancel.clone());
    tokio::pin!(run);
    let report = loop {
        tokio::select! {
            report = &mut run => break report,
            _ = tokio::time::sleep(TAIL_EVERY) => shown = show(&console, shown)?,
        }
    };
    interrupt.abort();
    let report = report.context("running the guest")?;
    // What the driver read at the end: the tail not shown yet.
    if let Some(rest) = report.console.get(shown..) {
        std::io::stdout().write_all(rest)?;
    }
    std::io::stdout().flush()?;
    match report.end {
        SegmentEnd::Halted => eprintln!(
            "the guest powered off; its disks in {} are as it left them",
            dir.display()
        ),
        SegmentEnd::Crashed { reason } => bail!("the guest crashed: {reason}"),
        SegmentEnd::Saved { .. } => bail!("the guest was stopped before it powered off"),
    }
    Ok(())
}

/// The accelerator a bundle resumes under, from `--accel`: a deterministic
/// job's state (segments counted in instructions under a virtual clock)
/// restores only into that machine, under TCG, with no stop; any other
/// job's under what its user asks for.
fn accel_for(asked: &str, deterministic: bool) -> Result<Accel> {
    Ok(match (asked, deterministic) {
        ("auto" | "tcg", true) => Accel::Icount,
        ("kvm", true) => bail!(
            "its segments were deterministic (a quorum on QEMU): its state restores only under TCG with an instruction-count clock, not under KVM; drop --accel kvm"
        ),
        ("auto", false) => Accel::Auto,
        ("kvm", false) => Accel::Kvm,
        ("tcg", false) => Accel::Tcg,
        (other, _) => bail!("accelerator {other:?}: want auto, kvm or tcg"),
    })
}

/// Writes what the console file holds past `shown` to stdout; the new
/// count shown.
fn show(console: &Path, shown: usize) -> Result<usize> {
    let bytes = match std::fs::read(console) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(shown),
        Err(e) => return Err(e).with_context(|| format!("reading {}", console.display())),
    };
    if let Some(new) = bytes.get(shown..).filter(|b| !b.is_empty()) {
        let mut out = std::io::stdout().lock();
        out.write_all(new)?;
        out.flush()?;
        return Ok(bytes.len());
    }
    Ok(shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deterministic_bundle_resumes_under_icount_only() {
        assert_eq!(accel_for("auto", true).unwrap(), Accel::Icount);
        assert_eq!(accel_for("tcg", true).unwrap(), Accel::Icount);
        let kvm = accel_for("kvm", true).unwrap_err().to_string();
        assert!(kvm.contains("not under KVM"), "{kvm}");
        assert_eq!(accel_for("auto", false).unwrap(), Accel::Auto);
        assert_eq!(accel_for("kvm", false).unwrap(), Accel::Kvm);
        assert_eq!(accel_for("tcg", false).unwrap(), Accel::Tcg);
        assert!(accel_for("xen", false).is_err());
    }
}
