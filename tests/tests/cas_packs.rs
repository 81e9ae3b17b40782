//! Blocks in packs, against a real nats-server: a pull moves a few large
//! messages instead of one per block, a writer learns which blocks the
//! store holds without their bytes (both by the server's own counters),
//! and a stranger with its own credentials who plants lying locations, a
//! garbage pack or a pointer to it cannot make a reader take a wrong byte,
//! nor, by storing garbage under an honest writer's names first, keep it
//! from storing them.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::Path;

use bytes::Bytes;
use rand::{RngCore, SeedableRng};
use vmlot_cas::chunk::manifest_of;
use vmlot_cas::{BlockStore, CasError, PushReport, StoreOptions, pull_file, push_file};
use vmlot_schemas::caller::{Caller, Role};
use vmlot_schemas::{BlockId, Chunking, ObjectKind, PackId, ProviderId, subjects};
use vmlot_tests::NatsServer;

/// `blocks` distinct random 4 KiB blocks.
fn random_file(path: &Path, blocks: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; blocks * 4096];
    rng.fill_bytes(&mut data);
    std::fs::File::create(path).unwrap().write_all(&data).unwrap();
    data
}

/// Pushes `src` as a disk, with no base and nothing known.
async fn push(store: &BlockStore, src: &Path) -> PushReport {
    push_file(
        store,
        None,
        src,
        ObjectKind::Disk,
        Chunking::FIXED_4K,
        &HashSet::new(),
    )
    .await
    .unwrap()
}

async fn keeper(server: &NatsServer) -> BlockStore {
    BlockStore::open(server.client().await.unwrap(), StoreOptions::default())
        .await
        .unwrap()
}

/// Messages on the block stream under `filter`.
async fn count(store: &BlockStore, filter: &str) -> u64 {
    let stream = store
        .jetstream()
        .get_stream(subjects::BLOCK_STREAM)
        .await
        .unwrap();
    let info = stream.info_with_subjects(filter).await.unwrap();
    use futures::TryStreamExt;
    let subjects: Vec<(String, usize)> = info.try_collect().await.unwrap();
    subjects.len() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_moves_packs_and_a_writer_asks_for_pointers_not_bytes() {
    const BLOCKS: usize = 2048;
    let server = NatsServer::start().unwrap();
    let writer = keeper(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("object");
    let data = random_file(&src, BLOCKS, 7);
    let pushed = push(&writer, &src).await;
    assert_eq!(pushed.sent_blocks, BLOCKS as u64);
    assert_eq!(count(&writer, subjects::BLOCK_SUBJECTS).await, BLOCKS as u64);
    let packs = count(&writer, subjects::PACK_SUBJECTS).await;
    // 256 KiB packs of 4 KiB blocks, cut within each uploader's 1 000.
    assert!((32..=35).contains(&packs), "{packs} packs");

    // A reader with nothing pulls it: the server sends it about the
    // object's bytes in a few dozen messages (one per block before packs:
    // ~9 % more bytes in 2 048 messages).
    let (client, cid) = server.counted_client().await.unwrap();
    let reader = BlockStore::join(client, StoreOptions::default(), None)
        .await
        .unwrap();
    let before = server.connection_traffic(cid).unwrap();
    pull_file(&reader, None, &pushed.manifest_id, &dir.path().join("back"))
        .await
        .unwrap();
    let pulled = server.connection_traffic(cid).unwrap() - before;
    assert_eq!(std::fs::read(dir.path().join("back")).unwrap(), data);
    let object = data.len() as u64;
    // Beyond the blocks: the packs' indexes (a name and 9 bytes a block)
    // and the manifest (~45 bytes a block compressed, SHA-256 names are
    // random). One message per block cost ~380 bytes a block more.
    assert!(
        pulled.total() < object + object * 3 / 100,
        "pulled {} bytes for a {object}-byte object",
        pulled.total()
    );
    assert!(pulled.out_msgs < 64, "{} messages", pulled.out_msgs);

    // A second writer pushes the same file with no base: it learns that
    // every block is stored from their pointers, not their bytes.
    let before = server.connection_traffic(cid).unwrap();
    let again = push(&reader, &src).await;
    let asked = server.connection_traffic(cid).unwrap() - before;
    assert_eq!(again.sent_blocks, 0);
    assert_eq!(again.manifest_id, pushed.manifest_id);
    // About 520 bytes a block: the block's subject with its writer, asked
    // and answered, and the answer's headers.
    assert!(
        asked.total() < object / 7,
        "{} bytes to learn that {BLOCKS} blocks are stored",
        asked.total()
    );
}

#[tokio::test]
async fn lying_locations_and_bad_packs_from_a_stranger_change_no_byte_read() {
    let server = NatsServer::start().unwrap();
    let honest = keeper(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let (stranger, stranger_client) = provider(&server).await;
    let js = async_nats::jetstream::new(stranger_client);

    // An object whose blocks are stored but whose locations are not yet
    // written: the stranger writes them first, every block in a pack of
    // its own holding other blocks, then in a garbage pack.
    let src = dir.path().join("object");
    let data = random_file(&src, 300, 11);
    let manifest = manifest_of(
        std::fs::File::open(&src).unwrap(),
        ObjectKind::Disk,
        Chunking::FIXED_4K,
        honest.hash(),
    )
    .unwrap();
    let blocks: Vec<(BlockId, Bytes)> = data
        .chunks(4096)
        .map(|b| (BlockId::of(honest.hash(), b), Bytes::copy_from_slice(b)))
        .collect();
    honest.put_blocks(&blocks).await.unwrap();
    let id = honest.put_manifest(&manifest).await.unwrap();
    let decoy: Vec<(BlockId, Bytes)> = (0..4u8)
        .map(|i| {
            let b = vec![i; 4096];
            (BlockId::of(honest.hash(), &b), Bytes::from(b))
        })
        .collect();
    let written = stranger.put_blocks(&decoy).await.unwrap();
    let decoy_pack = *written.packs.values().next().unwrap();
    let garbage_pack = PackId::new();
    js.publish(
        subjects::pack(&garbage_pack),
        Bytes::from_static(b"VMP2 not a pack"),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let lies: HashMap<BlockId, PackId> = manifest
        .unique_blocks()
        .iter()
        .enumerate()
        .map(|(i, (b, _))| (*b, if i % 2 == 0 { decoy_pack } else { garbage_pack }))
        .collect();
    stranger.put_locations(&id, &manifest, &lies).await;
    assert_eq!(
        honest.get_locations(&id, &manifest).await,
        lies,
        "the lie is stored"
    );
    let back = dir.path().join("back");
    pull_file(&honest, None, &id, &back).await.unwrap();
    assert_eq!(
        std::fs::read(&back).unwrap(),
        data,
        "every block found by its name"
    );

    // Locations once written are not rewritten, and a stranger cannot
    // write under the honest writer's name.
    let pushed = push(&honest, &src).await;
    let mine = subjects::manifest_locations(&pushed.manifest_id, &honest.options().writer);
    let rewrite = async_nats::jetstream::new(server.client().await.unwrap())
        .publish(mine.clone(), "VML1".into())
        .await
        .unwrap()
        .await;
    assert!(
        rewrite.is_err(),
        "a second record on a writer's locations subject"
    );
    assert!(
        refused(&js, mine, "VML1").await,
        "a stranger wrote under the house's name"
    );

    // A pointer planted for a block nobody has stored yet, naming the
    // garbage pack: its next writer does not believe it (it counts only
    // its own and the house's), and a reader is refused by name, never
    // handed bytes, until the block's honest writer stores it.
    let fresh = vec![0xA5u8; 4096];
    let fresh_id = BlockId::of(honest.hash(), &fresh);
    plant_pointer(&js, &fresh_id, &stranger.options().writer, &garbage_pack).await;
    let err = honest.get_blocks(&[fresh_id], |_, _| Ok(())).await.unwrap_err();
    assert!(
        matches!(err, CasError::BadPack { pack, .. } if pack == garbage_pack),
        "{err}"
    );
    assert!(honest.missing(&[fresh_id]).await.unwrap().contains(&fresh_id));
    honest
        .put_blocks(&[(fresh_id, Bytes::from(fresh.clone()))])
        .await
        .unwrap();
    let got = std::sync::Mutex::new(Vec::new());
    honest
        .get_blocks(&[fresh_id], |_, b| {
            got.lock().unwrap().push(b);
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(got.into_inner().unwrap(), vec![Bytes::from(fresh)]);

    // ... and one naming a real pack that lacks it.
    let other = vec![0x5Au8; 4096];
    let other_id = BlockId::of(honest.hash(), &other);
    plant_pointer(&js, &other_id, &stranger.options().writer, &decoy_pack).await;
    let err = honest.get_blocks(&[other_id], |_, _| Ok(())).await.unwrap_err();
    assert!(
        matches!(err, CasError::NotInPack { block, pack } if block == other_id && pack == decoy_pack),
        "{err}"
    );
}

/// The quorum's attack: a replica computes the same checkpoint as the
/// honest one and, before it, stores under every one of its names (each
/// block's pointer, the manifest's record, its locations) garbage of its
/// own. The honest writer believes none of it and stores everything; a
/// third participant reads the honest bytes; the broker's check finds the
/// blocks stored by their producer, and by nobody else's pointers.
#[tokio::test]
async fn a_stranger_who_takes_an_honest_writers_names_first_changes_nothing() {
    const BLOCKS: usize = 300;
    let server = NatsServer::start().unwrap();
    let house = keeper(&server).await;
    let (honest, _) = provider(&server).await;
    let (mallory, mallory_client) = provider(&server).await;
    let (reader, _) = provider(&server).await;
    let js = async_nats::jetstream::new(mallory_client);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("checkpoint");
    let data = random_file(&src, BLOCKS, 23);
    let manifest = manifest_of(
        std::fs::File::open(&src).unwrap(),
        ObjectKind::Disk,
        Chunking::FIXED_4K,
        house.hash(),
    )
    .unwrap();
    let id = manifest.id();
    let ids: Vec<BlockId> = manifest.unique_blocks().into_iter().map(|(b, _)| b).collect();

    // Mallory goes first: a garbage pack, a pointer to it for every block,
    // a garbage record under the manifest's id, locations naming the pack.
    let garbage_pack = PackId::new();
    js.publish(subjects::pack(&garbage_pack), Bytes::from_static(b"VMP2 garbage"))
        .await
        .unwrap()
        .await
        .unwrap();
    for block in &ids {
        plant_pointer(&js, block, &mallory.options().writer, &garbage_pack).await;
    }
    mallory.put_manifest_bytes(&id, b"not a manifest").await.unwrap();
    let lies: HashMap<BlockId, PackId> = ids.iter().map(|b| (*b, garbage_pack)).collect();
    mallory.put_locations(&id, &manifest, &lies).await;
    assert_eq!(
        honest.missing(&ids).await.unwrap().len(),
        BLOCKS,
        "the honest writer believed mallory's pointers"
    );

    // Mallory cannot write under the honest writer's name.
    assert!(
        refused(&js, subjects::block(&ids[0], &honest.options().writer), "garbage").await,
        "mallory wrote a pointer under the honest writer's name"
    );
    assert!(
        refused(
            &js,
            subjects::manifest_part(&id, &honest.options().writer, 0),
            "garbage"
        )
        .await,
        "mallory wrote a manifest record under the honest writer's name"
    );

    // The honest writer stores every block and its own record.
    let pushed = push(&honest, &src).await;
    assert_eq!(pushed.manifest_id, id);
    assert_eq!(pushed.sent_blocks, BLOCKS as u64, "blocks left unwritten");
    // Another stranger stores garbage under the manifest's id after it,
    // so the last record stored is a lie too.
    let (late, _) = provider(&server).await;
    late.put_manifest_bytes(&id, b"late garbage").await.unwrap();
    late.put_locations(&id, &manifest, &lies).await;

    // A third participant reads the honest bytes, by the manifest's
    // locations and by names alone.
    let back = dir.path().join("back");
    pull_file(&reader, None, &id, &back).await.unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), data);
    let (by_name, _) = provider(&server).await;
    let got = std::sync::Mutex::new(HashMap::new());
    by_name
        .get_blocks(&ids, |b, bytes| {
            got.lock().unwrap().insert(b, bytes);
            Ok(())
        })
        .await
        .unwrap();
    let got = got.into_inner().unwrap();
    assert_eq!(got.len(), BLOCKS);
    assert!(
        got.iter()
            .all(|(b, bytes)| BlockId::of(house.hash(), bytes) == *b)
    );

    // The honest writer's own pointers cover every block; another
    // provider's cover none (mallory's garbage is no one's but mallory's).
    let producer = honest.options().writer.clone();
    assert!(house.missing_by(&ids, &[producer]).await.unwrap().is_empty());
    let other = reader.options().writer.clone();
    assert_eq!(house.missing_by(&ids, &[other]).await.unwrap().len(), BLOCKS);

    // A second provider with the same checkpoint checks the honest
    // writer's packs (mallory's garbage pack fails the check) and stores
    // nothing again; its manifest's locations name the honest packs.
    let (second, _) = provider(&server).await;
    let again = push(&second, &src).await;
    assert_eq!(
        again.sent_blocks, 0,
        "blocks checked in the honest packs were stored again"
    );
    let back2 = dir.path().join("back2");
    let (fourth, _) = provider(&server).await;
    pull_file(&fourth, None, &id, &back2).await.unwrap();
    assert_eq!(std::fs::read(&back2).unwrap(), data);
}

/// A store handle of a new provider with its own credentials, and its client.
async fn provider(server: &NatsServer) -> (BlockStore, async_nats::Client) {
    let name = ProviderId::new().to_string();
    let client = server.client_as(Role::Provider, &name).await.unwrap();
    let options = StoreOptions {
        writer: Caller::new(Role::Provider, name),
        ..StoreOptions::default()
    };
    let store = BlockStore::join(client.clone(), options, None).await.unwrap();
    (store, client)
}

/// `writer`'s pointer for `block`, naming `pack`, published as is.
async fn plant_pointer(js: &async_nats::jetstream::Context, block: &BlockId, writer: &Caller, pack: &PackId) {
    js.publish(
        subjects::block(block, writer),
        bytes::Bytes::copy_from_slice(pack.0.as_bytes()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// True when a publish to `subject` is refused (the server drops it: no
/// acknowledgement comes) and what is stored there stays as it was.
async fn refused(js: &async_nats::jetstream::Context, subject: String, payload: &'static str) -> bool {
    let stream = if subject.starts_with("vmlot.cas.manifest") {
        subjects::MANIFEST_STREAM
    } else {
        subjects::BLOCK_STREAM
    };
    let stream = js.get_stream_no_info(stream).await.unwrap();
    let stored = async || {
        stream
            .direct_get_last_for_subject(subject.clone())
            .await
            .ok()
            .map(|m| (m.sequence, m.payload))
    };
    let before = stored().await;
    let sent = match js.publish(subject.clone(), payload.into()).await {
        Ok(ack) => ack.await.is_err(),
        Err(_) => true,
    };
    sent && stored().await == before
}
