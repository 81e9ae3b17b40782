//! `xl save` files: for a pair of saves (the same domain seconds apart, or
//! from two hosts), what each chunking finds of the second in the first and
//! what would cross the wire to a receiver holding the first, against rsync's
//! delta transfer of the same pair (rsync's default, and `--inplace` as the
//! QEMU benchmark runs it) and raw SHA-1 over the same bytes.

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::json;
use sha1::{Digest, Sha1};
use vmlot_cas::chunk::{ManifestBuilder, Piece, manifest_of};
use vmlot_cas::xensave::{XenWalk, chunk_xen_save};
use vmlot_schemas::{BlockId, Chunking, Extent, HashAlgorithm, Manifest, ObjectKind};

use crate::baseline::{best_of, rsync_delta_with, version};

#[derive(clap::Args)]
pub struct Args {
    /// The save the receiver already holds.
    #[arg(long)]
    old: PathBuf,
    /// The save to send.
    #[arg(long)]
    new: PathBuf,
    /// Timed runs over the new file in memory; the fastest counts.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

const MB: f64 = 1_000_000.0;

/// Names by SHA-1, against raw SHA-1: this compares cutters, not hashes
/// (`bench cas` has chunk+hash by SHA-1 and SHA-256 side by side).
const HASH: HashAlgorithm = HashAlgorithm::Sha1;

/// One chunking's figures for the pair.
struct Row {
    name: &'static str,
    chunking: Chunking,
    /// Stored-block extents of the new file (zero runs excluded).
    blocks: usize,
    unique_blocks: usize,
    /// Bytes of the new file in zero runs (never stored or sent).
    zero_bytes: u64,
    /// Distinct block bytes of the new file already in the old one.
    hot_bytes: u64,
    /// Distinct block bytes of the new file the old one lacks: the wire.
    cold_bytes: u64,
    /// The new file's manifest, which crosses the wire too.
    manifest_bytes: usize,
    /// Chunk + hash of the new file in memory, seconds.
    chunk_s: f64,
}

pub async fn run(args: Args) -> Result<()> {
    let chunkings = [
        ("fixed 4 KiB", Chunking::FIXED_4K),
        ("FastCDC 16 KiB", Chunking::FASTCDC_16K),
        ("Xen records", Chunking::XEN_RECORDS),
    ];
    let size_old = std::fs::metadata(&args.old)
        .with_context(|| format!("{}", args.old.display()))?
        .len();
    let new_data = std::fs::read(&args.new).with_context(|| format!("{}", args.new.display()))?;
    let runs = args.runs.max(1);

    let (_, walk_old) = xen_manifest(&std::fs::read(&args.old)?)?;
    let (_, walk_new) = xen_manifest(&new_data)?;

    let mut rows = Vec::new();
    for (name, chunking) in chunkings {
        let old = manifest_of(
            std::fs::File::open(&args.old)?,
            ObjectKind::MachineState,
            chunking,
            HASH,
        )?;
        let new = manifest_of(&new_data[..], ObjectKind::MachineState, chunking, HASH)?;
        new.validate()?;
        let chunk_s = best_of(runs, || {
            std::hint::black_box(
                manifest_of(&new_data[..], ObjectKind::MachineState, chunking, HASH).unwrap(),
            );
        });
        rows.push(compare(name, chunking, &old, &new, chunk_s));
    }
    let sha1_s = best_of(runs, || {
        std::hint::black_box(Sha1::digest(&new_data));
    });
    let rsync = rsync_delta_with(&args.old, &args.new, false)?;
    let rsync_inplace = rsync_delta_with(&args.old, &args.new, true)?;

    let new_mb = new_data.len() as f64 / MB;
    println!("old: {} ({:.1} MB)", args.old.display(), size_old as f64 / MB);
    println!("new: {} ({new_mb:.1} MB)", args.new.display());
    println!("rsync: {}", version("rsync".as_ref(), "--version"));
    for (which, walk) in [("old", &walk_old), ("new", &walk_new)] {
        println!("xen walk of {which}: {}", describe(walk));
    }
    println!("\n## Sending the new save to a receiver holding the old one\n");
    println!(
        "| method | blocks | unique blocks | zero MB | hot % (bytes) | wire MB | manifest MB | chunk+hash MB/s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.0} |",
            r.name,
            r.blocks,
            r.unique_blocks,
            r.zero_bytes as f64 / MB,
            hot_share(r) * 100.0,
            r.cold_bytes as f64 / MB,
            r.manifest_bytes as f64 / MB,
            new_mb / r.chunk_s,
        );
    }
    for (name, r) in [("", &rsync), (" --inplace", &rsync_inplace)] {
        println!(
            "| rsync --no-whole-file{name} (old as basis) | | | | | {:.2} | | {:.0} (wall, incl. its own I/O) |",
            r.literal as f64 / MB,
            new_mb / r.seconds
        );
    }
    println!(
        "| raw SHA-1 over the new file (memory) | | | | | | | {:.0} |",
        new_mb / sha1_s
    );

    let line = json!({
        "bench": "xen-save",
        "old": args.old.display().to_string(),
        "new": args.new.display().to_string(),
        "old_bytes": size_old,
        "new_bytes": new_data.len(),
        "xen_walk_old": walk_json(&walk_old),
        "xen_walk_new": walk_json(&walk_new),
        "chunkings": rows.iter().map(|r| json!({
            "name": r.name,
            "chunking": r.chunking,
            "blocks": r.blocks,
            "unique_blocks": r.unique_blocks,
            "zero_bytes": r.zero_bytes,
            "hot_bytes": r.hot_bytes,
            "hot_share": hot_share(r),
            "wire_bytes": r.cold_bytes,
            "manifest_bytes": r.manifest_bytes,
            "chunk_hash_mb_s": new_mb / r.chunk_s,
        })).collect::<Vec<_>>(),
        "rsync": { "literal_bytes": rsync.literal, "seconds": rsync.seconds },
        "rsync_inplace": { "literal_bytes": rsync_inplace.literal, "seconds": rsync_inplace.seconds },
        "sha1_mb_s": new_mb / sha1_s,
    });
    println!("\n{line}");
    Ok(())
}

/// The Xen-record manifest together with what the walk found.
fn xen_manifest(data: &[u8]) -> Result<(Manifest, XenWalk)> {
    let Chunking::XenRecords { max } = Chunking::XEN_RECORDS else {
        unreachable!("XEN_RECORDS is a XenRecords chunking")
    };
    let mut builder = ManifestBuilder::new(ObjectKind::MachineState, Chunking::XEN_RECORDS, HASH);
    let walk = chunk_xen_save(data, max, HASH, |piece| {
        match piece {
            Piece::Zero(n) => builder.zero(n),
            Piece::Data(id, d) => builder.block(id, d.len() as u32),
        }
        Ok(())
    })?;
    Ok((builder.finish(), walk))
}

fn compare(name: &'static str, chunking: Chunking, old: &Manifest, new: &Manifest, chunk_s: f64) -> Row {
    let have: HashSet<BlockId> = old.unique_blocks().into_iter().map(|(id, _)| id).collect();
    let unique = new.unique_blocks();
    let (hot_bytes, cold_bytes) = unique.iter().fold((0u64, 0u64), |(h, c), (id, n)| {
        if have.contains(id) {
            (h + *n as u64, c)
        } else {
            (h, c + *n as u64)
        }
    });
    Row {
        name,
        chunking,
        blocks: new
            .extents
            .iter()
            .filter(|e| matches!(e, Extent::Block { .. }))
            .count(),
        unique_blocks: unique.len(),
        zero_bytes: new
            .extents
            .iter()
            .map(|e| match e {
                Extent::Zero { z } => *z,
                Extent::Block { .. } => 0,
            })
            .sum(),
        hot_bytes,
        cold_bytes,
        manifest_bytes: new.canonical_bytes().len(),
        chunk_s,
    }
}

fn hot_share(r: &Row) -> f64 {
    r.hot_bytes as f64 / (r.hot_bytes + r.cold_bytes).max(1) as f64
}

fn describe(w: &XenWalk) -> String {
    let tail = match &w.fallback {
        None => "parsed to the end".to_string(),
        Some(f) => format!("fixed 4 KiB from offset {} ({})", f.offset, f.reason),
    };
    format!(
        "{} pages of {} B ({} zero) in {} PAGE_DATA records; {tail}",
        w.pages, w.page_size, w.zero_pages, w.page_records
    )
}

fn walk_json(w: &XenWalk) -> serde_json::Value {
    json!({
        "pages": w.pages,
        "zero_pages": w.zero_pages,
        "page_records": w.page_records,
        "page_size": w.page_size,
        "fallback": w.fallback.as_ref().map(|f| json!({"offset": f.offset, "reason": f.reason})),
    })
}
