//! `vmlot image push` (and the image half of `submit`): an image's files
//! pushed to the store, only cold blocks crossing the wire, and the
//! description a job names.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use clap::{Args, ValueEnum};
use vmlot_cas::push_file;
use vmlot_schemas::market::Image;
use vmlot_schemas::{Chunking, HypervisorKind, ManifestId, ObjectKind, VmConfig};

use crate::context::Context;

#[derive(Clone, Copy, ValueEnum)]
pub enum HypervisorArg {
    Qemu,
    Xen,
    Synthetic,
}

/// The files and VM of an image.
#[derive(Args)]
pub struct ImageArgs {
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    #[arg(long = "disk")]
    pub disks: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "qemu")]
    pub hypervisor: HypervisorArg,
    #[arg(long, default_value = "x86_64")]
    pub arch: String,
    #[arg(long, default_value_t = 128)]
    pub memory: u32,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    #[arg(long, default_value = "console=ttyS0")]
    pub cmdline: String,
}

/// `vmlot image push`: pushes the files, writes the description to
/// `output` (or stdout).
pub async fn push(ctx: &Context, args: &ImageArgs, output: Option<&Path>) -> Result<()> {
    let image = push_image(ctx, args).await?;
    let text = serde_json::to_string_pretty(&image)?;
    match output {
        Some(path) => std::fs::write(path, text + "\n")?,
        None => println!("{text}"),
    }
    Ok(())
}

/// Pushes an image's files (only cold blocks cross the wire) and describes it.
pub async fn push_image(ctx: &Context, args: &ImageArgs) -> Result<Image> {
    let kernel = args.kernel.as_ref().context("--kernel is required")?;
    let store = ctx.store().await?;
    let none = HashSet::new();
    let push = async |path: &Path, kind| -> Result<ManifestId> {
        let report = push_file(&store, None, path, kind, Chunking::FIXED_4K, &none)
            .await
            .with_context(|| format!("pushing {}", path.display()))?;
        Ok(report.manifest_id)
    };
    let kernel = push(kernel, ObjectKind::Kernel).await?;
    let initrd = match &args.initrd {
        Some(p) => Some(push(p, ObjectKind::Initrd).await?),
        None => None,
    };
    let mut disks = Vec::new();
    for d in &args.disks {
        disks.push(push(d, ObjectKind::Disk).await?);
    }
    let hypervisor = match args.hypervisor {
        HypervisorArg::Qemu => HypervisorKind::Qemu,
        HypervisorArg::Xen => HypervisorKind::Xen,
        HypervisorArg::Synthetic => HypervisorKind::Synthetic,
    };
    Ok(Image {
        vm: VmConfig {
            hypervisor,
            arch: args.arch.clone(),
            memory_mib: args.memory,
            vcpus: args.vcpus,
            cmdline: args.cmdline.clone(),
        },
        kernel,
        initrd,
        disks,
    })
}
