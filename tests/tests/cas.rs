//! The content-addressed store against a real nats-server: round trips,
//! deduplication, compression, the cache, and every kind of bad data.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::Path;

use rand::{RngCore, SeedableRng};
use sha1::{Digest, Sha1};
use vmlot_cas::pack::Pack;
use vmlot_cas::{BlockCache, BlockStore, CasError, Seed, StoreOptions, pull_file, pull_file_over, push_file};
use vmlot_schemas::{BlockId, Chunking, HashAlgorithm, ManifestError, ManifestId, ObjectKind, subjects};
use vmlot_tests::{NatsCluster, NatsServer};

fn sha1_file(path: &Path) -> [u8; 20] {
    let mut file = std::fs::File::open(path).unwrap();
    let mut hasher = Sha1::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            return hasher.finalize().into();
        }
        hasher.update(&buf[..n]);
    }
}

/// `mib` MiB of data, a quarter random, the rest repeated patterns and zeros
/// and, at the end, a sparse hole.
fn mixed_file(path: &Path, mib: usize, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut file = std::fs::File::create(path).unwrap();
    let mut pattern = vec![0u8; 1 << 20];
    rng.fill_bytes(&mut pattern);
    let mut chunk = vec![0u8; 1 << 20];
    let data_mib = mib - mib / 8;
    for i in 0..data_mib {
        match i % 4 {
            0 => {
                rng.fill_bytes(&mut chunk);
                file.write_all(&chunk).unwrap();
            }
            1 | 2 => file.write_all(&pattern).unwrap(),
            _ => file.write_all(&vec![0u8; 1 << 20]).unwrap(),
        }
    }
    // A hole, then a short unaligned tail.
    file.set_len((mib as u64) << 20).unwrap();
    drop(file);
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(b"tail that is not block aligned").unwrap();
}

async fn store(server: &NatsServer, opts: StoreOptions) -> BlockStore {
    BlockStore::open(server.client().await.unwrap(), opts)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1gib_mixed_file_round_trips_byte_identically() {
    let server = NatsServer::start().unwrap();
    let store = store(&server, StoreOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.img");
    mixed_file(&src, 1024, 1);

    let pushed = push_file(
        &store,
        None,
        &src,
        ObjectKind::Disk,
        Chunking::FIXED_4K,
        &HashSet::new(),
    )
    .await
    .unwrap();
    // 224 random MiB + one repeated MiB are all that is stored.
    let expected_unique = (224 + 1) * 256 + 1;
    assert_eq!(pushed.unique_blocks, expected_unique);
    assert_eq!(pushed.sent_blocks, expected_unique);

    let dest = dir.path().join("back.img");
    let pulled = pull_file(&store, None, &pushed.manifest_id, &dest).await.unwrap();
    assert_eq!(pulled.fetched_blocks, expected_unique);
    assert_eq!(sha1_file(&src), sha1_file(&dest));
    assert_eq!(
        std::fs::metadata(&src).unwrap().len(),
        std::fs::metadata(&dest).unwrap().len()
    );

    // The same file again sends nothing.
    let again = push_file(
        &store,
        None,
        &src,
        ObjectKind::Disk,
        Chunking::FIXED_4K,
        &HashSet::new(),
    )
    .await
    .unwrap();
    assert_eq!(again.manifest_id, pushed.manifest_id);
    assert_eq!(again.sent_blocks, 0);
    assert_eq!(again.sent_bytes, 0);
}

#[tokio::test]
async fn only_changed_blocks_cross_the_wire_and_known_blocks_are_not_asked_for() {
    let server = NatsServer::start().unwrap();
    let store = store(&server, StoreOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    mixed_file(&a, 8, 2);
    let first = push_file(
        &store,
        None,
        &a,
        ObjectKind::Disk,
        Chunking::FIXED_4K,
        &HashSet::new(),
    )
    .await
    .unwrap();

    // Change 3 blocks in place.
    let mut data = std::fs::read(&a).unwrap();
    for block in [0usize, 100, 1000] {
        data[block * 4096 + 7] ^= 0xff;
    }
    let b = dir.path().join("b");
    std::fs::write(&b, &data).unwrap();
    let known: HashSet<BlockId> = first
        .manifest
        .unique_blocks()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let second = push_file(&store, None, &b, ObjectKind::Disk, Chunking::FIXED_4K, &known)
        .await
        .unwrap();
    assert_eq!(second.sent_blocks, 3);
    // One pack: its head (9 bytes) and index (the start of each name, 4
    // bytes, and 5 more per raw block), then the three blocks.
    assert_eq!(second.sent_bytes, 9 + 3 * (4 + 5) + 3 * 4096);
    let back = dir.path().join("b.back");
    pull_file(&store, None, &second.manifest_id, &back).await.unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), data);
}

/// A pull onto an older copy of the object (a provider's own last RAM
/// file) writes and fetches only what differs at each offset, zeros
/// included, and leaves the new object byte for byte; the copy is taken.
#[tokio::test]
async fn a_pull_onto_an_older_copy_fetches_and_writes_only_what_changed() {
    let server = NatsServer::start().unwrap();
    let store = store(&server, StoreOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // 512 random blocks, blocks 100..120 zero (a hole once stored).
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut data = vec![0u8; 512 * 4096];
    rng.fill_bytes(&mut data);
    data[100 * 4096..120 * 4096].fill(0);
    let a = dir.path().join("a");
    std::fs::write(&a, &data).unwrap();
    let push = async |path: &std::path::Path| {
        push_file(
            &store,
            None,
            path,
            ObjectKind::Memory,
            Chunking::FIXED_4K,
            &HashSet::new(),
        )
        .await
        .unwrap()
    };
    let first = push(&a).await;
    // Two blocks changed, one zeroed, one zero block written, and the
    // object one block longer.
    for block in [1usize, 300] {
        data[block * 4096 + 11] ^= 0x5a;
    }
    data[2 * 4096..3 * 4096].fill(0);
    data[105 * 4096 + 5] = 7;
    data.extend_from_slice(&[9u8; 4096]);
    let b = dir.path().join("b");
    std::fs::write(&b, &data).unwrap();
    let second = push(&b).await;

    let seed = dir.path().join("seed");
    std::fs::copy(&a, &seed).unwrap();
    let onto = dir.path().join("b.onto");
    let report = pull_file_over(
        &store,
        None,
        &second.manifest_id,
        &onto,
        Some(Seed {
            path: &seed,
            manifest: &first.manifest,
        }),
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(&onto).unwrap(), data);
    assert!(!seed.exists(), "the seed is taken over");
    // The two changed blocks, the one written into the hole and the new
    // last block; the zeroed one is written, not fetched.
    assert_eq!(report.fetched_blocks, 4, "{report:?}");
    // Without a seed, every block of the object.
    let whole = pull_file(&store, None, &second.manifest_id, &dir.path().join("b.whole"))
        .await
        .unwrap();
    assert_eq!(whole.fetched_blocks, second.unique_blocks);
}

#[tokio::test]
async fn fastcdc_and_zstd_round_trip_and_keep_block_names() {
    let server = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    mixed_file(&src, 16, 3);
    let plain = store(&server, StoreOptions::default()).await;
    let packed = store(
        &server,
        StoreOptions {
            compression: Some(3),
            ..Default::default()
        },
    )
    .await;
    let cdc = push_file(
        &packed,
        None,
        &src,
        ObjectKind::Blob,
        Chunking::FASTCDC_16K,
        &HashSet::new(),
    )
    .await
    .unwrap();
    // Compression changed what crossed the wire, not the names.
    let fixed_zstd = push_file(
        &packed,
        None,
        &src,
        ObjectKind::Blob,
        Chunking::FIXED_4K,
        &HashSet::new(),
    )
    .await
    .unwrap();
    let fixed_plain = push_file(
        &plain,
        None,
        &src,
        ObjectKind::Blob,
        Chunking::FIXED_4K,
        &HashSet::new(),
    )
    .await
    .unwrap();
    assert_eq!(fixed_zstd.manifest_id, fixed_plain.manifest_id);
    assert_eq!(
        fixed_plain.sent_blocks, 0,
        "every block was already stored by the compressed push"
    );
    for (id, path) in [
        (cdc.manifest_id, "cdc.back"),
        (fixed_zstd.manifest_id, "zstd.back"),
    ] {
        let dest = dir.path().join(path);
        pull_file(&plain, None, &id, &dest).await.unwrap();
        assert_eq!(sha1_file(&src), sha1_file(&dest));
    }
}

#[tokio::test]
async fn the_cache_answers_have_without_network_and_serves_pulls() {
    let server = NatsServer::start().unwrap();
    let store = store(&server, StoreOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    mixed_file(&src, 8, 4);
    let pushed = push_file(
        &store,
        None,
        &src,
        ObjectKind::Disk,
        Chunking::FIXED_4K,
        &HashSet::new(),
    )
    .await
    .unwrap();
    let cache = BlockCache::open(dir.path().join("cache"), 1 << 30).unwrap();
    let cold = cache.have(&pushed.manifest);
    assert_eq!(cold.hot_blocks, 0);
    assert_eq!(cold.cold_blocks, pushed.unique_blocks);

    let first = pull_file(&store, Some(&cache), &pushed.manifest_id, &dir.path().join("one"))
        .await
        .unwrap();
    assert_eq!(first.fetched_blocks, pushed.unique_blocks);
    let hot = cache.have(&pushed.manifest);
    assert_eq!((hot.hot_blocks, hot.cold_blocks), (pushed.unique_blocks, 0));
    assert_eq!(hot.hot_bytes, pushed.manifest.stored_bytes());

    let second = pull_file(&store, Some(&cache), &pushed.manifest_id, &dir.path().join("two"))
        .await
        .unwrap();
    assert_eq!((second.fetched_blocks, second.fetched_bytes), (0, 0));
    assert_eq!(
        std::fs::read(dir.path().join("two")).unwrap(),
        std::fs::read(&src).unwrap()
    );
}

/// Pushes a small file and returns its manifest id and one of its blocks.
async fn small_object(store: &BlockStore, dir: &Path) -> (ManifestId, BlockId) {
    let src = dir.join("small");
    mixed_file(&src, 2, 5);
    let pushed = push_file(
        store,
        None,
        &src,
        ObjectKind::Disk,
        Chunking::FIXED_4K,
        &HashSet::new(),
    )
    .await
    .unwrap();
    (pushed.manifest_id, pushed.manifest.unique_blocks()[3].0)
}

async fn purge(store: &BlockStore, subject: String) {
    let stream = store
        .jetstream()
        .get_stream(subjects::BLOCK_STREAM)
        .await
        .unwrap();
    stream.purge().filter(subject).await.unwrap();
}

/// The pack holding `block`, read back.
async fn pack_of(store: &BlockStore, block: &BlockId) -> Pack {
    let id = store.locate(&[*block]).await.unwrap()[block].expect("stored in a pack");
    let stream = store
        .jetstream()
        .get_stream(subjects::BLOCK_STREAM)
        .await
        .unwrap();
    let msg = stream
        .direct_get_last_for_subject(subjects::pack(&id))
        .await
        .unwrap();
    Pack::parse(id, store.hash(), msg.payload).unwrap()
}

#[tokio::test]
async fn a_tampered_block_fails_the_pull_with_a_named_error_and_writes_nothing() {
    let server = NatsServer::start().unwrap();
    let store = store(&server, StoreOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (manifest, block) = small_object(&store, dir.path()).await;
    // The block's bytes in its pack replaced, the index unchanged.
    let pack = pack_of(&store, &block).await;
    let tampered: Vec<(BlockId, bytes::Bytes)> = pack
        .blocks()
        .map(|(id, data)| match id == block {
            true => (id, vec![0x55u8; 4096].into()),
            false => (id, data.unwrap()),
        })
        .collect();
    purge(&store, subjects::pack(&pack.id())).await;
    store
        .jetstream()
        .publish(
            subjects::pack(&pack.id()),
            vmlot_cas::pack::encode(store.hash(), &tampered, None).unwrap(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let dest = dir.path().join("dest");
    let err = pull_file(&store, None, &manifest, &dest).await.unwrap_err();
    assert!(
        matches!(err, CasError::CorruptBlock { block: b, .. } if b == block),
        "{err}"
    );
    assert!(!dest.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no partial file left behind"
    );
}

#[tokio::test]
async fn a_missing_block_fails_the_pull_naming_it() {
    let server = NatsServer::start().unwrap();
    let store = store(&server, StoreOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (manifest, block) = small_object(&store, dir.path()).await;
    // The pack gone with every pointer to it: its blocks are lost.
    let pack = pack_of(&store, &block).await;
    let lost: HashSet<BlockId> = pack.ids().collect();
    purge(&store, subjects::pack(&pack.id())).await;
    for id in &lost {
        purge(&store, subjects::block(id, &store.options().writer)).await;
    }
    let dest = dir.path().join("dest");
    let err = pull_file(&store, None, &manifest, &dest).await.unwrap_err();
    assert!(
        matches!(err, CasError::MissingBlock(b) if lost.contains(&b)),
        "{err}"
    );
    assert!(!dest.exists());
}

#[tokio::test]
async fn a_stored_block_is_never_overwritten() {
    let server = NatsServer::start().unwrap();
    let store = store(&server, StoreOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (manifest, block) = small_object(&store, dir.path()).await;
    let overwrite = store
        .jetstream()
        .publish(
            subjects::block(&block, &store.options().writer),
            vec![0u8; 10].into(),
        )
        .await
        .unwrap()
        .await;
    assert!(
        overwrite.is_err(),
        "the server must refuse a second message on a block subject"
    );
    pull_file(&store, None, &manifest, &dir.path().join("dest"))
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_manifests_are_refused_by_name() {
    let server = NatsServer::start().unwrap();
    let store = store(
        &server,
        StoreOptions {
            max_manifest_bytes: 64 << 10,
            ..Default::default()
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (good, _) = small_object(&store, dir.path()).await;
    let bytes = store.get_manifest(&good).await.unwrap().canonical_bytes();
    let dest = dir.path().join("dest");

    let refused = |err: CasError| match err {
        CasError::Manifest { source, .. } => source,
        other => panic!("expected a manifest error, got {other}"),
    };

    // Truncated, under the id of the real manifest.
    let truncated = ManifestId::of(HashAlgorithm::Sha256, b"truncated");
    store
        .put_manifest_bytes(&truncated, &bytes[..bytes.len() / 2])
        .await
        .unwrap();
    let err = refused(pull_file(&store, None, &truncated, &dest).await.unwrap_err());
    assert!(matches!(err, ManifestError::Garbled(_)), "{err}");

    // Well-formed JSON whose bytes do not hash to the id.
    let mut garbled = bytes.clone();
    let at = garbled.iter().rposition(|b| b.is_ascii_digit()).unwrap();
    garbled[at] = if garbled[at] == b'1' { b'2' } else { b'1' };
    let swapped = ManifestId::of(HashAlgorithm::Sha256, b"swapped");
    store.put_manifest_bytes(&swapped, &garbled).await.unwrap();
    let err = refused(pull_file(&store, None, &swapped, &dest).await.unwrap_err());
    assert!(matches!(err, ManifestError::IdMismatch { .. }), "{err}");

    // An unknown hash algorithm, under a name of the store's.
    let other_hash = String::from_utf8(bytes.clone())
        .unwrap()
        .replace("\"sha256\"", "\"blake3\"")
        .into_bytes();
    let other_id = ManifestId::of(HashAlgorithm::Sha256, &other_hash);
    store.put_manifest_bytes(&other_id, &other_hash).await.unwrap();
    let err = refused(pull_file(&store, None, &other_id, &dest).await.unwrap_err());
    assert!(
        matches!(err, ManifestError::UnsupportedHash(ref h) if h == "blake3"),
        "{err}"
    );

    // A manifest that says sha256 stored under its SHA-1 name: SHA-1 names
    // are refused in a SHA-256 store before anything is read.
    let sha1_id = ManifestId::of(HashAlgorithm::Sha1, &bytes);
    store.put_manifest_bytes(&sha1_id, &bytes).await.unwrap();
    let err = pull_file(&store, None, &sha1_id, &dest).await.unwrap_err();
    assert!(matches!(err, CasError::WrongHash { .. }), "{err}");

    // Oversized: refused before it is read.
    let huge = vec![b' '; 100 << 10];
    let huge_id = ManifestId::of(HashAlgorithm::Sha256, &huge);
    store.put_manifest_bytes(&huge_id, &huge).await.unwrap();
    let err = refused(pull_file(&store, None, &huge_id, &dest).await.unwrap_err());
    assert!(matches!(err, ManifestError::TooLarge { .. }), "{err}");

    // Part headers that lie: more parts than the size needs, or none at all.
    let js = store.jetstream();
    for (name, parts, size) in [("lying-parts", Some("5"), Some("10")), ("no-headers", None, None)] {
        let id = ManifestId::of(HashAlgorithm::Sha256, name.as_bytes());
        let mut headers = async_nats::HeaderMap::new();
        if let (Some(parts), Some(size)) = (parts, size) {
            headers.insert(subjects::MANIFEST_PARTS_HEADER, parts);
            headers.insert(subjects::MANIFEST_SIZE_HEADER, size);
        }
        js.publish_with_headers(
            subjects::manifest_part(&id, &store.options().writer, 0),
            headers,
            bytes.clone().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        let err = refused(pull_file(&store, None, &id, &dest).await.unwrap_err());
        assert!(matches!(err, ManifestError::Garbled(_)), "{name}: {err}");
    }

    // Unknown id.
    let unknown = ManifestId::of(HashAlgorithm::Sha256, b"nobody stored this");
    assert!(
        matches!(pull_file(&store, None, &unknown, &dest).await, Err(CasError::MissingManifest(id)) if id == unknown)
    );
    assert!(!dest.exists());
}

#[tokio::test]
async fn a_store_names_everything_by_the_algorithm_it_was_made_with() {
    let server = NatsServer::start().unwrap();
    let sha1 = StoreOptions {
        hash: HashAlgorithm::Sha1,
        ..Default::default()
    };
    let closed = store(&server, sha1.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let (manifest, block) = small_object(&closed, dir.path()).await;
    assert_eq!(
        (manifest.algorithm(), block.algorithm()),
        (HashAlgorithm::Sha1, HashAlgorithm::Sha1)
    );
    assert_eq!(manifest.to_hex().len(), 40);

    // A participant learns the algorithm from the store, whatever it asked.
    let joined = BlockStore::join(server.client().await.unwrap(), StoreOptions::default(), None)
        .await
        .unwrap();
    assert_eq!(joined.hash(), HashAlgorithm::Sha1);
    pull_file(&joined, None, &manifest, &dir.path().join("back"))
        .await
        .unwrap();

    // The keeper cannot change it after the fact.
    let reopened = BlockStore::open(server.client().await.unwrap(), StoreOptions::default()).await;
    assert!(
        matches!(
            reopened,
            Err(CasError::HashChanged {
                made: HashAlgorithm::Sha1,
                asked: HashAlgorithm::Sha256
            })
        ),
        "{:?}",
        reopened.err()
    );

    // Names of the other algorithm are refused, written or read.
    let data = bytes::Bytes::from_static(b"a block named by the wrong algorithm");
    let wrong = BlockId::of(HashAlgorithm::Sha256, &data);
    let err = joined.put_blocks(&[(wrong, data)]).await.unwrap_err();
    assert!(matches!(err, CasError::WrongHash { .. }), "{err}");
    let other = ManifestId::of(HashAlgorithm::Sha256, b"anything");
    let err = joined.get_manifest(&other).await.unwrap_err();
    assert!(matches!(err, CasError::WrongHash { .. }), "{err}");

    // A fresh store is SHA-256 by default, with 64-digit names.
    let open_server = NatsServer::start().unwrap();
    let open = store(&open_server, StoreOptions::default()).await;
    let (manifest, block) = small_object(&open, dir.path()).await;
    assert_eq!(
        (manifest.algorithm(), block.algorithm()),
        (HashAlgorithm::Sha256, HashAlgorithm::Sha256)
    );
    assert_eq!(block.to_hex().len(), 64);
}

#[tokio::test]
async fn blocks_survive_a_server_crash_and_restart() {
    let mut server = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = {
        let store = store(&server, StoreOptions::default()).await;
        small_object(&store, dir.path()).await.0
    };
    server.restart().unwrap();
    let store = store(&server, StoreOptions::default()).await;
    let dest = dir.path().join("dest");
    pull_file(&store, None, &manifest, &dest).await.unwrap();
    assert_eq!(sha1_file(&dest), sha1_file(&dir.path().join("small")));
}

#[tokio::test]
async fn a_three_node_cluster_keeps_blocks_replicated() {
    let cluster = NatsCluster::start(3).unwrap();
    let client = cluster.client().await.unwrap();
    cluster.wait_jetstream(&client).await.unwrap();
    let store = BlockStore::open(
        client,
        StoreOptions {
            replicas: 3,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let info = store
        .jetstream()
        .get_stream(subjects::BLOCK_STREAM)
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(info.config.num_replicas, 3);
    let dir = tempfile::tempdir().unwrap();
    let (manifest, _) = small_object(&store, dir.path()).await;
    let dest = dir.path().join("dest");
    pull_file(&store, None, &manifest, &dest).await.unwrap();
    assert_eq!(sha1_file(&dest), sha1_file(&dir.path().join("small")));
}
