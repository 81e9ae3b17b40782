//! Manifests stored as the edits from the checkpoint they grew from, against
//! a real nats-server: what a grown checkpoint's manifest costs on the wire
//! (the server's own counters), that every reader rebuilds it exactly, and
//! that records planted by a writer who lies are refused by name.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use rand::{RngCore, SeedableRng};
use vmlot_cas::record::{self, Delta, Edit};
use vmlot_cas::{BlockCache, BlockStore, CasError, PushReport, StoreOptions, pull_file, push_file_over};
use vmlot_schemas::caller::{Caller, Role};
use vmlot_schemas::{
    Chunking, Extent, HashAlgorithm, Manifest, ManifestError, ManifestId, ObjectKind, ProviderId, subjects,
};
use vmlot_tests::NatsServer;

/// `blocks` 4 KiB blocks: every third random, the rest a repeated pattern
/// or zeros, like a guest's RAM.
fn checkpoint_file(path: &Path, blocks: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut pattern = vec![0u8; 4096];
    rng.fill_bytes(&mut pattern);
    let mut data = vec![0u8; blocks * 4096];
    for (i, block) in data.chunks_mut(4096).enumerate() {
        match i % 3 {
            0 => rng.fill_bytes(block),
            1 if i % 2 == 0 => block.copy_from_slice(&pattern),
            _ => {}
        }
    }
    std::fs::File::create(path).unwrap().write_all(&data).unwrap();
    data
}

/// The checkpoint one segment later: `changed` blocks spread over it
/// rewritten, one zero block filled.
fn grown(data: &[u8], changed: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut next = data.to_vec();
    let blocks = data.len() / 4096;
    for k in 0..changed {
        let i = k * blocks / changed;
        rng.fill_bytes(&mut next[i * 4096..(i + 1) * 4096]);
    }
    next[2 * 4096] = 1;
    next
}

/// The record stored under `id` (all of it: these are one part).
async fn stored_record(store: &BlockStore, id: &ManifestId) -> Vec<u8> {
    let stream = store
        .jetstream()
        .get_stream(subjects::MANIFEST_STREAM)
        .await
        .unwrap();
    let msg = stream
        .direct_get_last_for_subject(subjects::manifest_part(id, &store.options().writer, 0))
        .await
        .unwrap();
    msg.payload.to_vec()
}

/// Pushes `path` as a machine state, over `base` when given.
async fn push(store: &BlockStore, path: &Path, base: Option<&ManifestId>) -> PushReport {
    let kind = ObjectKind::MachineState;
    push_file_over(store, None, path, kind, Chunking::FIXED_4K, &HashSet::new(), base)
        .await
        .unwrap()
}

async fn joined(server: &NatsServer) -> (BlockStore, u64) {
    joined_with(server, StoreOptions::default()).await
}

async fn joined_with(server: &NatsServer, opts: StoreOptions) -> (BlockStore, u64) {
    let (client, cid) = server.counted_client().await.unwrap();
    let store = BlockStore::join(client, opts, None).await.unwrap();
    (store, cid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grown_checkpoint_s_manifest_costs_what_changed() {
    let server = NatsServer::start().unwrap();
    let writer = BlockStore::open(server.client().await.unwrap(), StoreOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let data_a = checkpoint_file(&a, 12_000, 1);
    let data_b = grown(&data_a, 40, 2);
    std::fs::write(&b, &data_b).unwrap();
    let first = push(&writer, &a, None).await;
    let second = push(&writer, &b, Some(&first.manifest_id)).await;
    assert_eq!(second.sent_blocks, 41, "only the changed blocks are sent");

    // What is stored: the first whole and compressed, the second as edits.
    let whole = second.manifest.canonical_bytes().len();
    let record_a = stored_record(&writer, &first.manifest_id).await;
    let record_b = stored_record(&writer, &second.manifest_id).await;
    assert!(record_a.starts_with(record::WHOLE_MAGIC));
    assert!(record_b.starts_with(record::DELTA_MAGIC));
    assert!(
        record_b.len() * 50 < whole,
        "the delta record is {} bytes, the manifest {whole}",
        record_b.len()
    );

    // A provider that ran the first checkpoint (its blocks and manifest in
    // its cache) pulls the second: the server's own counters on its
    // connection see the changed blocks and little else.
    let cache = BlockCache::open(dir.path().join("cache"), 1 << 30).unwrap();
    let (reader, cid) = joined(&server).await;
    pull_file(
        &reader,
        Some(&cache),
        &first.manifest_id,
        &dir.path().join("a.back"),
    )
    .await
    .unwrap();
    let (reader, cid2) = joined(&server).await;
    let before = server.connection_traffic(cid2).unwrap();
    let pulled = pull_file(
        &reader,
        Some(&cache),
        &second.manifest_id,
        &dir.path().join("b.back"),
    )
    .await
    .unwrap();
    let moved = server.connection_traffic(cid2).unwrap() - before;
    assert_eq!(std::fs::read(dir.path().join("b.back")).unwrap(), data_b);
    assert_eq!(pulled.fetched_blocks, 41);
    // The blocks, the delta record and the replies' headers (~200 bytes
    // a message); the whole manifest would be 13× that margin.
    let blocks = 41 * 4096;
    assert!(
        moved.total() < blocks + 32 * 1024 && ((whole as u64) > 10 * 32 * 1024),
        "pulling 41 changed blocks moved {moved:?} (manifest {whole} bytes whole)"
    );
    assert!(cid != cid2);

    // A reader with nothing follows the delta to its base in the store.
    let (fresh, _) = joined(&server).await;
    pull_file(&fresh, None, &second.manifest_id, &dir.path().join("b.fresh"))
        .await
        .unwrap();
    assert_eq!(std::fs::read(dir.path().join("b.fresh")).unwrap(), data_b);

    // A third checkpoint on the second: a chain of two, read back exactly.
    let c = dir.path().join("c");
    let data_c = grown(&data_b, 25, 3);
    std::fs::write(&c, &data_c).unwrap();
    let third = push(&writer, &c, Some(&second.manifest_id)).await;
    assert!(
        stored_record(&writer, &third.manifest_id)
            .await
            .starts_with(record::DELTA_MAGIC)
    );
    let (fresh, _) = joined(&server).await;
    pull_file(&fresh, None, &third.manifest_id, &dir.path().join("c.fresh"))
        .await
        .unwrap();
    assert_eq!(std::fs::read(dir.path().join("c.fresh")).unwrap(), data_c);
}

#[tokio::test]
async fn records_that_lie_are_refused_by_name() {
    let server = NatsServer::start().unwrap();
    let limited = StoreOptions {
        max_manifest_bytes: 256 << 10,
        ..Default::default()
    };
    BlockStore::open(server.client().await.unwrap(), limited.clone())
        .await
        .unwrap();
    // The liar is a provider with its own valid credentials: it may write
    // blocks and manifests, as every provider writes its checkpoints.
    let name = ProviderId::new().to_string();
    let liar = server.client_as(Role::Provider, &name).await.unwrap();
    let as_liar = StoreOptions {
        writer: Caller::new(Role::Provider, name),
        ..limited.clone()
    };
    let store = BlockStore::join(liar, as_liar, None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    checkpoint_file(&a, 600, 4);
    let first = push(&store, &a, None).await;
    let base: &Manifest = &first.manifest;
    let dest = dir.path().join("dest");
    let edit_first_block = |b: ManifestId| Delta {
        base: b,
        version: base.version,
        kind: base.kind,
        hash: base.hash,
        chunking: base.chunking,
        size: base.size,
        edits: vec![Edit {
            at: 0,
            del: 1,
            ins: vec![Extent::Zero { z: 4096 }],
        }],
    };
    let refused = |err: CasError| match err {
        CasError::Manifest { source, .. } => source,
        other => panic!("expected a manifest error, got {other}"),
    };
    // Each lie is read by a fresh reader.
    let reader = || async { joined_with(&server, limited.clone()).await.0 };

    // A delta whose rebuilt manifest is not what its name says.
    let lying = ManifestId::of(HashAlgorithm::Sha256, b"claims to be something else");
    store
        .put_manifest_bytes(
            &lying,
            &record::encode_delta(&edit_first_block(first.manifest_id)),
        )
        .await
        .unwrap();
    let err = refused(pull_file(&reader().await, None, &lying, &dest).await.unwrap_err());
    assert!(matches!(err, ManifestError::IdMismatch { .. }), "{err}");

    // A delta on a base nobody stored.
    let nowhere = ManifestId::of(HashAlgorithm::Sha256, b"no such base");
    let orphan = ManifestId::of(HashAlgorithm::Sha256, b"orphan");
    store
        .put_manifest_bytes(&orphan, &record::encode_delta(&edit_first_block(nowhere)))
        .await
        .unwrap();
    let err = pull_file(&reader().await, None, &orphan, &dest)
        .await
        .unwrap_err();
    assert!(
        matches!(err, CasError::MissingManifest(id) if id == nowhere),
        "{err}"
    );

    // Two deltas on each other: a chain that never ends.
    let (x, y) = (
        ManifestId::of(HashAlgorithm::Sha256, b"x"),
        ManifestId::of(HashAlgorithm::Sha256, b"y"),
    );
    for (id, on) in [(x, y), (y, x)] {
        store
            .put_manifest_bytes(&id, &record::encode_delta(&edit_first_block(on)))
            .await
            .unwrap();
    }
    let err = refused(pull_file(&reader().await, None, &x, &dest).await.unwrap_err());
    assert!(
        matches!(err, ManifestError::Garbled(ref why) if why.contains("chain")),
        "{err}"
    );

    // A small record that unpacks past the size limit.
    let bomb = ManifestId::of(HashAlgorithm::Sha256, b"bomb");
    store
        .put_manifest_bytes(&bomb, &record::encode_whole_bytes(&vec![b' '; 8 << 20]))
        .await
        .unwrap();
    let err = refused(pull_file(&reader().await, None, &bomb, &dest).await.unwrap_err());
    assert!(matches!(err, ManifestError::TooLarge { .. }), "{err}");

    // Garbage after the delta magic.
    let junk = ManifestId::of(HashAlgorithm::Sha256, b"junk");
    let mut bytes = record::DELTA_MAGIC.to_vec();
    bytes.extend_from_slice(b"this is not zstd");
    store.put_manifest_bytes(&junk, &bytes).await.unwrap();
    let err = refused(pull_file(&reader().await, None, &junk, &dest).await.unwrap_err());
    assert!(matches!(err, ManifestError::Garbled(_)), "{err}");

    assert!(!dest.exists(), "a refused pull writes nothing");
    // The honest manifest still reads, through a reader that met every lie.
    pull_file(&reader().await, None, &first.manifest_id, &dest)
        .await
        .unwrap();
}
