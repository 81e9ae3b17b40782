//! OS Farm (issue 18): a recipe built with mmdebstrap from Debian's
//! archive, stored and indexed by its id, booted by a QEMU provider in the
//! market, its command's output in the job's console; the same recipe
//! answered without a build; a second recipe on the same base sending only
//! the blocks the store lacks, by the farm's own count and by the server's
//! byte counters; strangers refused and nothing changed.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use vmlot_cas::BlockStore;
use vmlot_client::api::{ImageBuild, ImageList, ImageShow};
use vmlot_schemas::caller::{Caller, Role};
use vmlot_schemas::market::{GuestState, JobState};
use vmlot_schemas::recipe::{
    BuildRequest, Built, ImageFormat, ImageRecord, RECIPE_VERSION, Recipe, RecipeFile, RecipeRef,
};
use vmlot_schemas::subjects;
use vmlot_schemas::{BlockId, ManifestId};
use vmlot_tests::market::{QemuProviderSpec, wait_for};
use vmlot_tests::vm::VmMarket;

fn recipe(packages: &[&str], command: &str) -> Recipe {
    Recipe {
        version: RECIPE_VERSION,
        distribution: "debian".into(),
        suite: "bookworm".into(),
        architecture: "amd64".into(),
        packages: packages.iter().map(|p| p.to_string()).collect(),
        files: vec![RecipeFile {
            path: "/etc/vmlot-test".into(),
            mode: 0o644,
            content: "a file the recipe added\n".into(),
        }],
        command: Some(command.into()),
        disk_mib: 384,
        format: Default::default(),
    }
}

fn write(dir: &Path, name: &str, recipe: &Recipe) -> String {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(recipe).unwrap()).unwrap();
    path.display().to_string()
}

/// `vmlot --json image build FILE` as the submitter.
fn build(vm: &VmMarket, file: &str) -> Built {
    build_with_progress(vm, file).0
}

/// The same, with what the CLI printed of the build's progress.
fn build_with_progress(vm: &VmMarket, file: &str) -> (Built, String) {
    let out = vm.vmlot_as(Role::Submitter, "default", &["--json", "image", "build", file]);
    let progress = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "image build {file}: {progress}\n{}",
        vm.market.logs()
    );
    (serde_json::from_slice(&out.stdout).unwrap(), progress)
}

/// The distinct blocks an object's manifest names.
async fn blocks(store: &BlockStore, id: &ManifestId) -> HashSet<BlockId> {
    let manifest = store.get_manifest(id).await.unwrap();
    manifest.unique_blocks().into_iter().map(|(b, _)| b).collect()
}

async fn farm_market() -> (VmMarket, u64) {
    let mut vm = VmMarket::start(60);
    vm.market
        .add_qemu_provider(&QemuProviderSpec::new("p1", "0.1"))
        .unwrap();
    vm.market.add_farm().unwrap();
    vm.market.ready(1).await.unwrap();
    // The farm's one connection, once it has stored its boot kit.
    let farm_log = || vm.market.farm.as_ref().unwrap().log();
    wait_for(Duration::from_secs(120), async || {
        farm_log().contains("boot kit stored").then_some(())
    })
    .await
    .unwrap_or_else(|_| panic!("the farm did not start:\n{}", vm.market.logs()));
    let cid = vm.market.server.connection_named("vmlot-farm").unwrap();
    (vm, cid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recipe_is_built_once_boots_in_the_market_and_a_second_sends_only_its_cold_blocks() {
    let (vm, farm_cid) = farm_market().await;
    let dir = vm.market.path().to_path_buf();
    let one = recipe(&["hello"], "hello; echo farm-recipe-ran; cat /etc/vmlot-test");
    let one_file = write(&dir, "one.json", &one);

    // Built once.
    let (first, progress) = build_with_progress(&vm, &one_file);
    assert!(first.built, "the first request builds");
    // Its progress streamed to the caller, step by step, before the answer.
    for step in ["[bootstrap] I: ", "[files] ", "[disk] ", "[store] "] {
        assert!(
            progress.contains(step),
            "no {step:?} line in the progress:\n{progress}"
        );
    }
    assert_eq!(first.image.recipe_id, one.id());
    assert!(
        first.image.installed.iter().any(|p| p.starts_with("hello=")),
        "{:?}",
        first.image.installed
    );

    // Answered from the index: the same image, no build.
    let again = build(&vm, &one_file);
    assert!(!again.built, "the same recipe is answered without a build");
    assert_eq!(again.image, first.image);
    let farm_log = vm.market.farm.as_ref().unwrap().log();
    assert_eq!(
        farm_log.matches("built before: answered from the index").count(),
        1,
        "{farm_log}"
    );
    assert_eq!(builds(&vm), 1, "{farm_log}");

    // A second recipe on the same base: only the blocks the store lacks
    // cross the wire.
    let store = BlockStore::join(vm.market.server.client().await.unwrap(), Default::default(), None)
        .await
        .unwrap();
    let mut stored: HashSet<BlockId> = HashSet::new();
    for object in [&first.image.kernel, &first.image.initrd, &first.image.disk] {
        stored.extend(blocks(&store, &object.manifest).await);
    }
    // In format `tar`: its root file system is exported as a tar too.
    let two = Recipe {
        format: ImageFormat::Tar,
        ..recipe(&["hello", "bc"], "echo bc says $(echo 6*7 | bc)")
    };
    let traffic_before = vm.market.server.connection_traffic(farm_cid).unwrap();
    let second = build(&vm, &write(&dir, "two.json", &two));
    let sent_wire = vm.market.server.connection_traffic(farm_cid).unwrap() - traffic_before;
    assert!(second.built);
    let disk = blocks(&store, &second.image.disk.manifest).await;
    let cold: HashSet<&BlockId> = disk.iter().filter(|b| !stored.contains(b)).collect();
    assert_eq!(
        second.image.disk.sent_blocks,
        cold.len() as u64,
        "the farm sent exactly the blocks the store lacked"
    );
    assert!(
        cold.len() * 5 < disk.len(),
        "a recipe on the same base shares most of its blocks: {} of {} cold",
        cold.len(),
        disk.len()
    );
    // By the server's own count: the cold blocks' bytes, the manifest and
    // the existence queries, and not the disk's stored bytes.
    // The export's blocks are its own (a tar's file data is not on the 4 KiB grid).
    let stored_bytes = second.image.disk.unique_blocks * 4096;
    let export = second.image.export.as_ref().expect("format tar has an export");
    assert!(
        sent_wire.in_bytes < second.image.disk.sent_bytes + export.sent_bytes + stored_bytes / 10,
        "the farm sent {} bytes for {} cold bytes of a {stored_bytes}-byte disk and a {}-byte export",
        sent_wire.in_bytes,
        second.image.disk.sent_bytes,
        export.sent_bytes
    );
    // The export is the root file system: the recipe's package and file in it.
    let tar = dir.join("two.tar");
    vmlot_cas::pull_file(&store, None, &export.manifest, &tar)
        .await
        .unwrap();
    let listed = std::process::Command::new("tar")
        .arg("-tf")
        .arg(&tar)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    for member in ["./usr/bin/bc", "./etc/vmlot-test", "./usr/sbin/vmlot-init"] {
        // bookworm's /bin and /sbin are links into /usr.
        let old_place = member.replace("./usr/", "./");
        assert!(
            listed.lines().any(|l| l == member || l == old_place),
            "{member} not in the export"
        );
    }
    assert!(first.image.export.is_none(), "format raw has no export");
    eprintln!(
        "second recipe: {} of {} blocks cold ({:.1} % hot); {} bytes sent by the server's count, {} of cold blocks",
        cold.len(),
        disk.len(),
        100.0 * (1.0 - cold.len() as f64 / disk.len() as f64),
        sent_wire.in_bytes,
        second.image.disk.sent_bytes
    );

    // Listed and shown.
    let api = vm.market.submitter("default").await;
    let listed = api.call::<ImageList>(&()).await.unwrap();
    assert_eq!(
        listed.iter().map(|i| i.recipe_id).collect::<HashSet<_>>(),
        HashSet::from([one.id(), two.id()])
    );
    let shown: ImageRecord = api
        .call::<ImageShow>(&RecipeRef { recipe_id: two.id() })
        .await
        .unwrap();
    assert_eq!(shown, second.image);

    // Submitted by its recipe: built before, so answered at once; the
    // guest boots the disk, runs the command and powers off.
    vm.vmlot_ok(&["admin", "credit", "default", "50"]);
    let out = vm.vmlot_ok_as(
        Role::Submitter,
        "default",
        &[
            "--json",
            "submit",
            "--recipe",
            &one_file,
            "--memory",
            "256",
            // Long enough for the boot, the command and the poweroff to
            // fit in the first segment even on a busy machine (the segment
            // ends when the guest does, so it costs nothing): this test is
            // about the image; the market tests migrate guests between
            // segments.
            "--segment-seconds",
            "90",
            "--until-halt",
            "--check",
            "none",
            "--reserve",
            "1",
            "--budget",
            "50",
        ],
    );
    let submitted: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let job = submitted["job"].as_str().unwrap().parse().unwrap();
    let console = |job: &str| {
        String::from_utf8_lossy(&vm.vmlot_ok_as(Role::Submitter, "default", &["logs", job])).into_owned()
    };
    let done = match vm.market.api().await.wait_final(job, vm.patience).await {
        Ok(done) => done,
        Err(e) => panic!(
            "{e}\nthe console of its settled segments:\n{}\n{}",
            console(&job.to_string()),
            vm.market.logs()
        ),
    };
    assert_eq!(done.state, JobState::Done, "{}", vm.market.logs());
    assert!(
        done.settled
            .last()
            .is_some_and(|s| matches!(s.guest, GuestState::Halted { .. })),
        "the guest powered off after its command: {:?}",
        done.settled.last().map(|s| &s.guest)
    );
    let console = console(&job.to_string());
    for line in [
        "Hello, world!",
        "farm-recipe-ran",
        "a file the recipe added",
        "vmlot-image: command exited 0",
    ] {
        assert!(console.contains(line), "{line:?} not in the console:\n{console}");
    }
    let farm_log = vm.market.farm.as_ref().unwrap().log();
    assert_eq!(
        farm_log.matches("built before: answered from the index").count(),
        2,
        "the submission was answered from the index: {farm_log}"
    );
    assert_eq!(builds(&vm), 2, "two recipes, two builds: {farm_log}");
    vm.market.assert_paid_once(done.job).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strangers_and_bad_recipes_build_nothing_and_change_nothing() {
    let (vm, _) = farm_market().await;
    let good = recipe(&["hello"], "hello");
    let submitter = vm.market.submitter("mallory").await;
    let request = |recipe: Recipe| BuildRequest {
        version: RECIPE_VERSION,
        recipe,
    };

    // A provider, with its own valid credentials, may not use the farm.
    let provider = vm
        .market
        .api_as(&Caller::new(
            Role::Provider,
            vmlot_schemas::ProviderId::new().to_string(),
        ))
        .await;
    let refused = provider
        .answer::<ImageBuild>(&request(good.clone()))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(refused.code, "forbidden", "{refused:?}");
    let refused = provider.answer::<ImageList>(&()).await.unwrap().unwrap_err();
    assert_eq!(refused.code, "forbidden");

    // Bad recipes, sent past the CLI's own check: each refused by name.
    let mut bad_suite = good.clone();
    bad_suite.suite = "potato".into();
    let mut injected = good.clone();
    injected.packages.push("--allow-unauthenticated".into());
    let mut escaping = good.clone();
    escaping.files[0].path = "/etc/../../host".into();
    for (bad, word) in [
        (bad_suite, "suite"),
        (injected, "package"),
        (escaping, "file path"),
    ] {
        let refused = submitter
            .answer::<ImageBuild>(&request(bad))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(refused.code, "bad-recipe", "{refused:?}");
        assert!(refused.message.contains(word), "{refused:?}");
    }
    let garbage = submitter
        .answer_body::<ImageBuild>(&serde_json::json!({"version": 1, "recipe": {"surprise": true}}))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(garbage.code, "bad-request");
    let unknown = submitter
        .answer::<ImageShow>(&RecipeRef { recipe_id: good.id() })
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(unknown.code, "not-found");

    // A submitter writing the index itself: a forged image for a recipe
    // nobody built. The server refuses the publish; the index is unchanged.
    let forged = serde_json::json!({"recipe_id": good.id(), "forged": true});
    let key = format!("$KV.{}.{}", subjects::IMAGE_BUCKET, good.id());
    let js = async_nats::jetstream::new(submitter.nats().clone());
    let wrote = js
        .publish(key, serde_json::to_vec(&forged).unwrap().into())
        .await
        .map(|ack| async move { ack.await });
    if let Ok(ack) = wrote {
        assert!(
            ack.await.is_err(),
            "a submitter's write to the index was acknowledged"
        );
    }
    assert!(submitter.call::<ImageList>(&()).await.unwrap().is_empty());

    // Nothing was built, and no build was started.
    let farm_log = vm.market.farm.as_ref().unwrap().log();
    assert_eq!(builds(&vm), 0, "{farm_log}");
    assert!(!farm_log.contains("build failed"), "{farm_log}");
}

/// Builds the farm has finished: its log's one line per build.
fn builds(vm: &VmMarket) -> usize {
    vm.market
        .farm
        .as_ref()
        .unwrap()
        .log()
        .matches("image built and indexed")
        .count()
}
