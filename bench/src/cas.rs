//! Checkpoint transfer: for each save format and chunking, how much of the
//! next checkpoint is already there, what crosses the wire, how fast
//! chunk+hash runs against plain SHA-1, and how fast push/pull run against
//! raw JetStream on the same server; rsync's delta transfer of the same
//! pair alongside.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::StreamExt;
use vmlot_cas::chunk::manifest_of;
use vmlot_cas::{BlockCache, BlockStore, StoreOptions, pull_file, push_file, push_file_over};
use vmlot_schemas::ids::Digest;
use vmlot_schemas::{BlockId, Chunking, HashAlgorithm, Manifest, ObjectKind};
use vmlot_tests::NatsServer;

use crate::baseline::{Cpu, best_of, publish_pipelined, rsync_delta, rsync_delta_args, version};

#[derive(clap::Args)]
pub struct Args {
    /// Directory with same-a/same-b/other × .mapped/.classic checkpoints.
    #[arg(long)]
    dir: PathBuf,
}

const MB: f64 = 1_000_000.0;

/// What the store names blocks by in this benchmark: the default of a new
/// store (the transfer and push/pull tables; chunk+hash shows both).
const HASH: HashAlgorithm = HashAlgorithm::Sha256;

pub async fn run(args: Args) -> Result<()> {
    let formats = [("mapped-ram", "mapped"), ("classic", "classic")];
    let chunkings = [
        ("fixed 4 KiB", Chunking::FIXED_4K),
        ("FastCDC 16 KiB", Chunking::FASTCDC_16K),
    ];
    let pairs = [
        ("same VM, 5 s apart", "same-a", "same-b"),
        ("different boot", "same-a", "other"),
    ];

    println!(
        "nats-server: {}",
        version(vmlot_tests::nats_server_binary()?.as_os_str(), "--version")
    );
    println!("rsync: {}", version("rsync".as_ref(), "--version"));
    println!("fsync: sync_interval always (every acknowledged write is on disk)\n");

    println!("## Transfer of the second checkpoint given the first\n");
    println!(
        "Wire: what the NATS server counted on the connection (message bytes both ways, from its \
         `/connz`), each step on a fresh server with only the first checkpoint stored. Pull: a \
         reader whose cache holds the first checkpoint (pulled before) pulls the second. Push: a \
         writer that ran the first pushes the second, its manifest stored as the edits from the \
         first. rsync: `--no-whole-file --inplace` of the second onto a copy of the first, its \
         total bytes sent plus received.\n"
    );
    println!(
        "| pair | format | chunking | file MB | hot % | cold block MB | manifest MB whole | pull wire MB | push wire MB | rsync total MB | pull/rsync | push/rsync | rsync literal MB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (pair_name, a, b) in pairs {
        for (format_name, ext) in formats {
            let path_a = args.dir.join(format!("{a}.{ext}"));
            let path_b = args.dir.join(format!("{b}.{ext}"));
            let rsync = rsync_delta(&path_a, &path_b)?;
            for (chunk_name, chunking) in chunkings {
                let (ma, mb) = (
                    file_manifest(&path_a, chunking)?,
                    file_manifest(&path_b, chunking)?,
                );
                let have: HashSet<BlockId> = ma.unique_blocks().into_iter().map(|(id, _)| id).collect();
                let (hot, cold) = mb.unique_blocks().iter().fold((0u64, 0u64), |(h, c), (id, n)| {
                    if have.contains(id) {
                        (h + *n as u64, c)
                    } else {
                        (h, c + *n as u64)
                    }
                });
                let wire = wire_of_second(&path_a, &path_b, chunking, store_options()).await?;
                println!(
                    "| {pair_name} | {format_name} | {chunk_name} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                    mb.size as f64 / MB,
                    hot as f64 / (hot + cold).max(1) as f64 * 100.0,
                    cold as f64 / MB,
                    mb.canonical_bytes().len() as f64 / MB,
                    wire.pull as f64 / MB,
                    wire.push as f64 / MB,
                    rsync.total as f64 / MB,
                    wire.pull as f64 / rsync.total as f64,
                    wire.push as f64 / rsync.total as f64,
                    rsync.literal as f64 / MB,
                );
            }
        }
    }

    println!("\n## The same, compressed on both sides\n");
    println!(
        "Store: blocks written with zstd level 3 (`--zstd 3`; names stay the hashes of the raw \
         blocks). rsync: `-z` as well as `--no-whole-file --inplace`. Fixed 4 KiB blocks.\n"
    );
    println!("| pair | format | pull wire MB | push wire MB | rsync -z total MB | pull/rsync | push/rsync |");
    println!("|---|---|---|---|---|---|---|");
    for (pair_name, a, b) in pairs {
        for (format_name, ext) in formats {
            let path_a = args.dir.join(format!("{a}.{ext}"));
            let path_b = args.dir.join(format!("{b}.{ext}"));
            let rsync = rsync_delta_args(&path_a, &path_b, &["--inplace", "-z"])?;
            let options = StoreOptions {
                compression: Some(3),
                ..store_options()
            };
            let wire = wire_of_second(&path_a, &path_b, Chunking::FIXED_4K, options).await?;
            println!(
                "| {pair_name} | {format_name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                wire.pull as f64 / MB,
                wire.push as f64 / MB,
                rsync.total as f64 / MB,
                wire.pull as f64 / rsync.total as f64,
                wire.push as f64 / rsync.total as f64,
            );
        }
    }

    println!(
        "\n## Chunk + hash by SHA-1 and by SHA-256 against the plain hash over the same bytes (in memory)\n"
    );
    println!("| format | chunking | hash | MB | raw hash MB/s | chunk+hash MB/s | ratio |");
    println!("|---|---|---|---|---|---|---|");
    for (format_name, ext) in formats {
        let data = std::fs::read(args.dir.join(format!("same-a.{ext}")))?;
        for hash in [HashAlgorithm::Sha1, HashAlgorithm::Sha256] {
            let raw = best_of(3, || {
                std::hint::black_box(Digest::of(hash, &data));
            });
            for (chunk_name, chunking) in chunkings {
                let chunked = best_of(3, || {
                    std::hint::black_box(
                        manifest_of(&data[..], ObjectKind::MachineState, chunking, hash).unwrap(),
                    );
                });
                let mbs = data.len() as f64 / MB;
                println!(
                    "| {format_name} | {chunk_name} | {hash} | {mbs:.1} | {:.0} | {:.0} | {:.2} |",
                    mbs / raw,
                    mbs / chunked,
                    raw / chunked
                );
            }
        }
    }

    println!("\n## Push and pull through NATS against raw JetStream on the same server\n");
    println!(
        "Raw: the same stored bytes as 1 MiB messages, pipelined acknowledged publishes into a plain stream, \
         read back by a pull consumer without acks, 16 MiB a pull. Store: the first checkpoint pushed into an empty store (every \
         block cold), then pulled into an empty directory with no cache.\n"
    );
    println!(
        "| format | chunking | stored MB | raw publish MB/s | push MB/s | push/raw | raw read MB/s | pull MB/s | pull/raw |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut profile: Vec<String> = Vec::new();
    for (format_name, ext) in formats {
        let path = args.dir.join(format!("same-a.{ext}"));
        for (chunk_name, chunking) in chunkings {
            let server = NatsServer::start()?;
            let client = server.client().await?;
            let manifest = file_manifest(&path, chunking)?;
            let stored = stored_bytes(&path, &manifest)?;
            let (raw_pub, raw_read) = raw_jetstream(&client, &stored).await?;
            let store = BlockStore::open(client, store_options()).await?;
            let cpu = Cpu::now(&server);
            let started = Instant::now();
            let none = HashSet::new();
            let pushed = push_file(&store, None, &path, ObjectKind::MachineState, chunking, &none).await?;
            let push_s = started.elapsed().as_secs_f64();
            let push_cpu = cpu.stop(&server);
            let tmp = tempfile::tempdir()?;
            let cpu = Cpu::now(&server);
            let started = Instant::now();
            pull_file(&store, None, &pushed.manifest_id, &tmp.path().join("out")).await?;
            let pull_s = started.elapsed().as_secs_f64();
            let pull_cpu = cpu.stop(&server);
            for (step, wall, (server_cpu, client_cpu)) in
                [("push", push_s, push_cpu), ("pull", pull_s, pull_cpu)]
            {
                profile.push(format!(
                    "| {format_name} | {chunk_name} | {step} | {wall:.2} | {server_cpu:.2} | {client_cpu:.2} |"
                ));
            }
            let mb = stored.len() as f64 / MB;
            println!(
                "| {format_name} | {chunk_name} | {mb:.1} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} |",
                mb / raw_pub,
                mb / push_s,
                raw_pub / push_s,
                mb / raw_read,
                mb / pull_s,
                raw_read / pull_s,
            );
        }
    }
    println!("\nWhere the time goes (CPU seconds of nats-server and of this client process; 2 cores):\n");
    println!("| format | chunking | step | wall s | nats-server CPU s | client CPU s |");
    println!("|---|---|---|---|---|---|");
    for line in profile {
        println!("{line}");
    }
    Ok(())
}

/// Bytes the server counted moving the second checkpoint, each way summed.
struct Wire {
    pull: u64,
    push: u64,
}

/// On a fresh server: a writer pushes `a`, then `b` over it (the push
/// measured); a reader pulls `a` into its cache, then `b` (measured).
async fn wire_of_second(a: &Path, b: &Path, chunking: Chunking, options: StoreOptions) -> Result<Wire> {
    let server = NatsServer::start()?;
    let kind = ObjectKind::MachineState;
    let none = HashSet::new();
    let (client, writer_cid) = server.counted_client().await?;
    let writer = BlockStore::open(client, options.clone()).await?;
    let writer_cache = tempfile::tempdir()?;
    let writer_cache = BlockCache::open(writer_cache.path(), 4 << 30)?;
    let first = push_file(&writer, Some(&writer_cache), a, kind, chunking, &none).await?;
    let before = server.connection_traffic(writer_cid)?;
    let second = push_file_over(
        &writer,
        Some(&writer_cache),
        b,
        kind,
        chunking,
        &none,
        Some(&first.manifest_id),
    )
    .await?;
    let push = (server.connection_traffic(writer_cid)? - before).total();

    let (client, reader_cid) = server.counted_client().await?;
    let reader = BlockStore::join(client, options, None).await?;
    let dir = tempfile::tempdir()?;
    let cache = BlockCache::open(dir.path().join("cache"), 4 << 30)?;
    pull_file(&reader, Some(&cache), &first.manifest_id, &dir.path().join("a")).await?;
    let before = server.connection_traffic(reader_cid)?;
    pull_file(&reader, Some(&cache), &second.manifest_id, &dir.path().join("b")).await?;
    let pull = (server.connection_traffic(reader_cid)? - before).total();
    if std::fs::read(dir.path().join("b"))? != std::fs::read(b)? {
        bail!("the pulled second checkpoint differs from the file");
    }
    Ok(Wire { pull, push })
}

/// The manifest of the checkpoint at `path`, names by [`HASH`], storing nothing.
fn file_manifest(path: &Path, chunking: Chunking) -> Result<Manifest> {
    Ok(manifest_of(
        std::fs::File::open(path)?,
        ObjectKind::MachineState,
        chunking,
        HASH,
    )?)
}

/// Store tuning, overridable for experiments (`VMLOT_BENCH_CONCURRENCY`, `VMLOT_BENCH_BATCH`).
fn store_options() -> StoreOptions {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    let defaults = StoreOptions::default();
    StoreOptions {
        concurrency: env("VMLOT_BENCH_CONCURRENCY").unwrap_or(defaults.concurrency),
        batch: env("VMLOT_BENCH_BATCH").unwrap_or(defaults.batch),
        ..defaults
    }
}

/// The distinct non-zero block bytes of an object, concatenated: what the
/// store has to move, so the raw baseline moves exactly the same bytes.
fn stored_bytes(path: &Path, manifest: &Manifest) -> Result<Vec<u8>> {
    let data = std::fs::read(path)?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut at = 0usize;
    for extent in &manifest.extents {
        let len = extent.len() as usize;
        if let vmlot_schemas::Extent::Block { b, .. } = extent
            && seen.insert(*b)
        {
            out.extend_from_slice(&data[at..at + len]);
        }
        at += len;
    }
    Ok(out)
}

/// What the raw baseline's reader asks for in one pull.
const RAW_READ_BATCH_BYTES: usize = 16 << 20;

/// How long the raw reader waits for its next message before the run
/// fails (it stalled once: a benchmark that hangs has failed).
const RAW_READ_STALL: std::time::Duration = std::time::Duration::from_secs(60);

/// Seconds to publish `bytes` as 1 MiB messages with pipelined acks, and to
/// read them back through a pull consumer asking for at most
/// [`RAW_READ_BATCH_BYTES`] at a time (no acks, so nothing but the reads).
///
/// An ordered consumer asks for 500 messages a pull whatever their size:
/// 500 MiB of 1 MiB messages, past the server's 64 MiB limit on what it
/// holds for one client, and on 2026-12-05 such a reader stalled after
/// 17 of 69 messages. This reader asks for 16 MiB a pull, eight times
/// what the store's own reads keep in flight (8 packs of 256 KiB), so the
/// baseline is not held back by it.
async fn raw_jetstream(client: &async_nats::Client, bytes: &[u8]) -> Result<(f64, f64)> {
    let js = jetstream::new(client.clone());
    let stream = js
        .create_stream(stream::Config {
            name: "RAW_BASELINE".into(),
            subjects: vec!["raw.baseline".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let pieces = bytes
        .chunks(1 << 20)
        .map(|piece| Ok(Bytes::copy_from_slice(piece)));
    publish_pipelined(&js, "raw.baseline", pieces, 64).await?;
    let publish_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::None,
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer
        .stream()
        .max_bytes_per_batch(RAW_READ_BATCH_BYTES)
        .max_messages_per_batch(RAW_READ_BATCH_BYTES >> 20)
        .messages()
        .await?;
    let mut read = 0usize;
    while read < bytes.len() {
        let Some(msg) = tokio::time::timeout(RAW_READ_STALL, messages.next())
            .await
            .with_context(|| format!("the raw reader stalled after {read} bytes"))?
        else {
            bail!("the raw reader's messages ended early")
        };
        read += msg?.payload.len();
    }
    let read_s = started.elapsed().as_secs_f64();
    js.delete_stream("RAW_BASELINE").await?;
    Ok((publish_s, read_s))
}
