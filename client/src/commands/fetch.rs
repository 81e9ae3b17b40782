//! `vmlot fetch`: a job's last checkpoint written to a directory with the
//! kernel and initrd it boots from, each file rebuilt from the store with
//! every block verified (so byte-identical to what the store holds), and a
//! `manifest.json` saying which file is what and how the VM is set up:
//! a bundle `vmlot run-local` resumes on the user's own QEMU.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use vmlot_cas::{BlockStore, pull_file};
use vmlot_schemas::market::{GuestState, Image, JobState, JobStatus, ResultCheck};
use vmlot_schemas::{JobId, ManifestId};

use crate::context::Context;
use crate::output::{JobDidNotFinish, print_json};

/// The description written beside the files, last (its presence means the
/// files are complete).
pub const MANIFEST_FILE: &str = "manifest.json";
/// The saved machine state, as the hypervisor wrote it.
pub const MACHINE_STATE_FILE: &str = "machine-state";
/// The guest's RAM, when the machine state leaves it out (QEMU's
/// `x-ignore-shared`): `vmlot run-local` maps it as the guest's memory.
pub const MEMORY_FILE: &str = "memory";
/// The image's kernel and initrd, which a restore boots the same machine from.
pub const KERNEL_FILE: &str = "kernel";
pub const INITRD_FILE: &str = "initrd";

/// `manifest.json`.
#[derive(Serialize, Deserialize)]
pub struct FetchManifest {
    pub job: JobId,
    pub state: JobState,
    pub end_reason: Option<String>,
    /// Segments settled in all.
    pub segments_settled: u32,
    /// The checkpoint is the state at the end of this segment (0-based);
    /// `None` when no segment ended saved (the files are the image's disks).
    pub after_segment: Option<u32>,
    /// What the last segment ended in: `halted` or `crashed` means the
    /// guest stopped during it, after this checkpoint was taken.
    pub last_segment_ended: Option<String>,
    /// The job's segments were exact instruction counts under a virtual
    /// clock (a quorum job on QEMU): its state restores only so.
    #[serde(default)]
    pub deterministic: bool,
    /// The image the checkpoint belongs to: a restore rebuilds the same
    /// machine from it (`vmlot store pull` its manifests).
    pub image: Image,
    pub files: Vec<FetchedFile>,
}

/// One file written.
#[derive(Serialize, Deserialize)]
pub struct FetchedFile {
    /// Name inside the output directory.
    pub file: String,
    /// `machine-state`, `memory`, `disk`, `kernel` or `initrd`.
    pub role: String,
    /// The disk's position in the image's order (disks only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub manifest: ManifestId,
    pub size: u64,
}

/// Writes the checkpoint of `job` into `dir`. A job still running (its
/// latest checkpoint), or one that ended other than done, is refused (exit
/// code 8) unless `any_state`.
pub async fn fetch(ctx: &Context, job: JobId, dir: &Path, any_state: bool) -> Result<()> {
    let status = ctx.api().await?.status(job).await?;
    if status.state != JobState::Done && !any_state {
        return Err(JobDidNotFinish(status.state).into());
    }
    let store = ctx.store().await?;
    let manifest = write_checkpoint(&store, &status, dir).await?;
    if ctx.json {
        print_json(&manifest)?;
    } else {
        match manifest.after_segment {
            Some(k) => println!("checkpoint after segment {k} of job {job}"),
            None => println!("job {job} never saved a checkpoint: the image's disks"),
        }
        for f in &manifest.files {
            println!(
                "  {:<16} {:<14} {:>12} bytes  {}",
                f.file, f.role, f.size, f.manifest
            );
        }
        println!("  {MANIFEST_FILE:<16} describes them");
        if let Some(ended) = &manifest.last_segment_ended {
            let last = manifest.segments_settled.checked_sub(1);
            if manifest.after_segment.is_some() && manifest.after_segment == last {
                println!("note: the guest {ended}; these are its disks as it left them");
            } else {
                println!("note: the guest {ended} in the segment after this checkpoint");
            }
        }
    }
    Ok(())
}

/// Pulls each part of the job's checkpoint, then writes `manifest.json`.
pub async fn write_checkpoint(store: &BlockStore, status: &JobStatus, dir: &Path) -> Result<FetchManifest> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let described = dir.join(MANIFEST_FILE);
    // A stale description must not vouch for files being replaced.
    match std::fs::remove_file(&described) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", described.display()));
        }
        _ => {}
    }
    let checkpoint = &status.checkpoint;
    let mut files = Vec::new();
    if let Some(id) = &checkpoint.machine_state {
        files.push(pull(store, id, dir, MACHINE_STATE_FILE.into(), "machine-state", None).await?);
    }
    if let Some(id) = &checkpoint.memory {
        files.push(pull(store, id, dir, MEMORY_FILE.into(), "memory", None).await?);
    }
    for (i, id) in checkpoint.disks.iter().enumerate() {
        files.push(pull(store, id, dir, format!("disk{i}.raw"), "disk", Some(i)).await?);
    }
    let image = &status.spec.image;
    files.push(pull(store, &image.kernel, dir, KERNEL_FILE.into(), "kernel", None).await?);
    if let Some(initrd) = &image.initrd {
        files.push(pull(store, initrd, dir, INITRD_FILE.into(), "initrd", None).await?);
    }
    // The segment whose result this checkpoint is.
    let after_segment = status
        .settled
        .iter()
        .rev()
        .find(|s| s.guest.state() == Some(checkpoint))
        .map(|s| s.segment);
    let last_segment_ended = status.settled.last().and_then(|s| match &s.guest {
        GuestState::Running { .. } | GuestState::RestoreFailed { .. } => None,
        GuestState::Halted { .. } => Some("halted".to_string()),
        GuestState::Crashed { reason, .. } => Some(format!("crashed ({reason})")),
    });
    let manifest = FetchManifest {
        job: status.job,
        state: status.state,
        end_reason: status.end_reason.clone(),
        segments_settled: status.settled.len() as u32,
        after_segment,
        last_segment_ended,
        deterministic: status.spec.check == ResultCheck::Quorum
            && status.spec.image.vm.hypervisor == vmlot_schemas::HypervisorKind::Qemu,
        image: status.spec.image.clone(),
        files,
    };
    let text = serde_json::to_string_pretty(&manifest)? + "\n";
    std::fs::write(&described, text).with_context(|| format!("writing {}", described.display()))?;
    Ok(manifest)
}

async fn pull(
    store: &BlockStore,
    id: &ManifestId,
    dir: &Path,
    file: String,
    role: &'static str,
    index: Option<usize>,
) -> Result<FetchedFile> {
    let path: PathBuf = dir.join(&file);
    let report = pull_file(store, None, id, &path)
        .await
        .with_context(|| format!("pulling {role} {id} to {}", path.display()))?;
    Ok(FetchedFile {
        file,
        role: role.into(),
        index,
        manifest: *id,
        size: report.manifest.size,
    })
}
