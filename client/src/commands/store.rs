//! `vmlot store …`: push, pull and inspect objects in the content-addressed store.

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Subcommand, ValueEnum};
use serde_json::json;
use vmlot_cas::{BlockCache, StoreOptions, pull_file, push_file_over};
use vmlot_schemas::{Chunking, ManifestId, ObjectKind};

use crate::context::Context;

#[derive(Clone, Copy, ValueEnum)]
pub enum ChunkingArg {
    /// Fixed 4 KiB blocks (disks, mapped-ram machine state).
    Fixed4k,
    /// FastCDC, 16 KiB average (objects with no 4 KiB grid).
    Fastcdc,
    /// `xl save` files: a block per guest page, cut along the stream's records.
    Xen,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum KindArg {
    Kernel,
    Initrd,
    Disk,
    MachineState,
    Blob,
}

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Store a file; only blocks the store lacks are sent. Prints the manifest id.
    Push {
        file: PathBuf,
        #[arg(long, value_enum, default_value = "blob")]
        kind: KindArg,
        #[arg(long, value_enum, default_value = "fixed4k")]
        chunking: ChunkingArg,
        /// Compress blocks on the wire and at rest with this zstd level.
        #[arg(long)]
        zstd: Option<i32>,
        /// Block cache to fill with what is pushed.
        #[arg(long)]
        cache: Option<PathBuf>,
        /// The object this one grew from (e.g. the previous checkpoint): its
        /// blocks are taken as stored without asking, and the manifest is
        /// stored as the edits from it when that is smaller.
        #[arg(long)]
        base: Option<ManifestId>,
    },
    /// Rebuild an object from its manifest, verifying every block.
    Pull {
        manifest: ManifestId,
        #[arg(short, long)]
        output: PathBuf,
        /// Block cache to take hot blocks from and keep fetched ones in.
        #[arg(long)]
        cache: Option<PathBuf>,
    },
    /// How much of an object a block cache already holds (asks only for the manifest).
    Have {
        manifest: ManifestId,
        #[arg(long)]
        cache: PathBuf,
    },
}

/// Default size cap of a client's block cache.
const CACHE_CAP: u64 = 4 << 30;

impl StoreCommand {
    pub async fn run(&self, ctx: &Context) -> Result<()> {
        let store = ctx.store().await?;
        match self {
            StoreCommand::Push {
                file,
                kind,
                chunking,
                zstd,
                cache,
                base,
            } => {
                let store = if zstd.is_some() {
                    ctx.store_with(StoreOptions {
                        compression: *zstd,
                        ..Default::default()
                    })
                    .await?
                } else {
                    store
                };
                let cache = cache
                    .as_ref()
                    .map(|dir| BlockCache::open(dir, CACHE_CAP))
                    .transpose()?;
                let kind = match kind {
                    KindArg::Kernel => ObjectKind::Kernel,
                    KindArg::Initrd => ObjectKind::Initrd,
                    KindArg::Disk => ObjectKind::Disk,
                    KindArg::MachineState => ObjectKind::MachineState,
                    KindArg::Blob => ObjectKind::Blob,
                };
                let chunking = match chunking {
                    ChunkingArg::Fixed4k => Chunking::FIXED_4K,
                    ChunkingArg::Fastcdc => Chunking::FASTCDC_16K,
                    ChunkingArg::Xen => Chunking::XEN_RECORDS,
                };
                let none = HashSet::new();
                let report =
                    push_file_over(&store, cache.as_ref(), file, kind, chunking, &none, base.as_ref())
                        .await
                        .with_context(|| format!("pushing {}", file.display()))?;
                if ctx.json {
                    println!(
                        "{}",
                        json!({
                            "manifest": report.manifest_id,
                            "size": report.manifest.size,
                            "unique_blocks": report.unique_blocks,
                            "sent_blocks": report.sent_blocks,
                            "sent_bytes": report.sent_bytes,
                            "seconds": report.elapsed.as_secs_f64(),
                        })
                    );
                } else {
                    println!("manifest      {}", report.manifest_id);
                    println!("size          {} bytes", report.manifest.size);
                    println!(
                        "blocks        {} distinct, {} sent",
                        report.unique_blocks, report.sent_blocks
                    );
                    println!(
                        "on the wire   {} bytes in {:.2} s",
                        report.sent_bytes,
                        report.elapsed.as_secs_f64()
                    );
                }
            }
            StoreCommand::Pull {
                manifest,
                output,
                cache,
            } => {
                let cache = cache
                    .as_ref()
                    .map(|dir| BlockCache::open(dir, CACHE_CAP))
                    .transpose()?;
                let report = pull_file(&store, cache.as_ref(), manifest, output).await?;
                if ctx.json {
                    println!(
                        "{}",
                        json!({
                            "manifest": manifest,
                            "size": report.manifest.size,
                            "unique_blocks": report.unique_blocks,
                            "cached_blocks": report.cached_blocks,
                            "fetched_blocks": report.fetched_blocks,
                            "fetched_bytes": report.fetched_bytes,
                            "seconds": report.elapsed.as_secs_f64(),
                        })
                    );
                } else {
                    println!(
                        "wrote         {} ({} bytes)",
                        output.display(),
                        report.manifest.size
                    );
                    println!(
                        "blocks        {} distinct: {} from cache, {} fetched",
                        report.unique_blocks, report.cached_blocks, report.fetched_blocks
                    );
                    println!(
                        "on the wire   {} bytes in {:.2} s",
                        report.fetched_bytes,
                        report.elapsed.as_secs_f64()
                    );
                }
            }
            StoreCommand::Have { manifest, cache } => {
                let cache = BlockCache::open(cache, CACHE_CAP)?;
                let manifest = store.get_manifest_via(manifest, Some(&cache)).await?;
                let have = cache.have(&manifest);
                if ctx.json {
                    println!(
                        "{}",
                        json!({
                            "hot_blocks": have.hot_blocks, "cold_blocks": have.cold_blocks,
                            "hot_bytes": have.hot_bytes, "cold_bytes": have.cold_bytes,
                        })
                    );
                } else {
                    println!("hot   {} blocks, {} bytes", have.hot_blocks, have.hot_bytes);
                    println!("cold  {} blocks, {} bytes", have.cold_blocks, have.cold_bytes);
                }
            }
        }
        Ok(())
    }
}
