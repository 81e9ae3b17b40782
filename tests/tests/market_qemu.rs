//! Real VMs through the market: a broker, QEMU providers and the `vmlot`
//! CLI as real processes on a real nats-server, the hash-chain test guest
//! (scripts/build-guest.sh) pushed as an image. A job's guest migrates
//! segment by segment between providers; the console joined from its
//! settled segments (`vmlot logs`) must be byte for byte the console of one
//! uninterrupted QEMU run of the same guest.
//!
//! The tests take turns (one lock): each runs QEMU guests against the
//! wall clock, and this machine may have two cores only.

use std::path::Path;
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use vmlot_schemas::caller::Role;
use vmlot_schemas::market::{GuestState, JobStatus};
use vmlot_schemas::{ManifestId, ProviderId};
use vmlot_tests::market::{QemuProviderSpec, kill_pids, processes_mentioning, wait_for};
use vmlot_tests::vm::{
    GuestImage, MEMORY_MIB, SEGMENT_SECONDS, Timed, VmMarket, assert_console_exact, direct_run, qemu_image,
    reference_console, segment_seconds_spanning,
};
use vmlot_tests::workspace_binary;

/// One market at a time: guests run against the clock.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A market with these QEMU providers.
fn qemu_market(providers: &[&QemuProviderSpec], allowance_s: u32) -> VmMarket {
    let mut m = VmMarket::start(allowance_s);
    for spec in providers {
        m.market.add_qemu_provider(spec).unwrap();
    }
    m
}

fn money(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// A market of the cheapest provider, which lies by `fault` with its own
/// credentials, and two honest ones; the test guest's image pushed. The
/// market, the liar's id and the image.
async fn market_with_a_liar(
    fault: &'static str,
    allowance_s: u32,
) -> (VmMarket, ProviderId, std::path::PathBuf) {
    let liar = QemuProviderSpec {
        fault: Some(fault),
        ..QemuProviderSpec::new("liar", "0.05")
    };
    let liar_id = ProviderId(liar.id);
    let specs = [
        liar,
        QemuProviderSpec::new("h1", "0.10"),
        QemuProviderSpec::new("h2", "0.20"),
    ];
    let m = qemu_market(&specs.iter().collect::<Vec<_>>(), allowance_s);
    m.market.ready(3).await.unwrap();
    let image = m.push_image(&qemu_image(&[]));
    (m, liar_id, image)
}

/// `provider`'s standing as `vmlot --json standing` prints it.
fn standing_of(m: &VmMarket, provider: ProviderId) -> serde_json::Value {
    let standing = m.vmlot_ok(&["--json", "standing"]);
    let standing: serde_json::Value = serde_json::from_slice(&standing).unwrap();
    standing
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["provider"] == provider.to_string())
        .cloned()
        .unwrap_or_else(|| panic!("no standing of {provider}: {standing:#}"))
}

/// The guest moves p1 → p2 → p3: each provider joins, cheaper than those
/// before it, while the previous segment runs, so it wins the next lot on
/// price. Nobody is stopped; the console is exactly the uninterrupted one,
/// both from `vmlot logs` afterwards and from `vmlot logs --follow` started
/// with the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_migrated_across_three_providers_prints_what_an_uninterrupted_run_prints() {
    let _turn = TURN.lock().await;
    let _timed = Timed::start("migration across 3 providers");
    let reference = reference_console().await;
    // Three providers each run a segment and the guest still has work
    // after: five segments of the uninterrupted run leave room for the
    // time a restore and a save take from each.
    let segment_seconds = segment_seconds_spanning(5).await;
    let specs = [
        QemuProviderSpec::new("p1", "0.30"),
        QemuProviderSpec::new("p2", "0.20"),
        QemuProviderSpec::new("p3", "0.10"),
    ];
    let ids: Vec<ProviderId> = specs.iter().map(|s| ProviderId(s.id)).collect();
    let mut m = qemu_market(&[&specs[0]], 30);
    m.market.ready(1).await.unwrap();
    let image = m.push_image(&qemu_image(&[]));
    let job = m.submit(&image, &segment_seconds, "until-halt", "1");
    let follow_out = m.market.path().join("follow.out");
    let operator = m
        .market
        .server
        .creds(Role::Operator, vmlot_tests::market::TEST_OPERATOR)
        .unwrap();
    let mut follow = Command::new(workspace_binary("vmlot").unwrap())
        .env("VMLOT_NATS", m.market.server.url())
        .env("VMLOT_TLS_CA", vmlot_tests::tls_ca_beside(&operator).unwrap())
        .env("VMLOT_CREDS", operator)
        .args(["logs", "--follow", &job.to_string()])
        .stdout(std::fs::File::create(&follow_out).unwrap())
        .spawn()
        .unwrap();

    for k in [0u32, 1] {
        // Segment k runs on the cheapest provider so far; the next, cheaper
        // one joins before it ends, and wins segment k + 1.
        let winner = m
            .until(job, "segment awarded", |s| {
                s.open_lot
                    .as_ref()
                    .filter(|o| o.lot.segment == k && !o.awarded.is_empty())
                    .map(|o| o.awarded[0].0)
            })
            .await;
        assert_eq!(
            winner, ids[k as usize],
            "segment {k} went to the cheapest provider up"
        );
        let next = k as usize + 1;
        m.market.add_qemu_provider(&specs[next]).unwrap();
        m.market.ready(next + 1).await.unwrap();
        let s = m.status(job).await;
        assert_eq!(
            s.settled.len() as u32,
            k,
            "provider {} should have joined while segment {k} ran",
            next + 1
        );
    }

    let done = m.wait_final(job).await;
    let ran: Vec<ProviderId> = done.settled.iter().map(|s| s.provider).collect();
    assert!(
        ran.len() >= 3,
        "the guest should span a segment on each provider ({segment_seconds} s segments): {ran:?}"
    );
    let attempts: Vec<(u32, u32, &str)> = done
        .settled
        .iter()
        .map(|s| {
            let who = ids.iter().position(|i| *i == s.provider).unwrap();
            (s.segment, s.attempt, specs[who].name.as_str())
        })
        .collect();
    assert_eq!(
        ran[..3],
        ids[..],
        "segments 0, 1, 2 ran on p1, p2, p3: (segment, attempt, provider) {attempts:?}\n{}",
        m.market.logs()
    );
    let logs = m.vmlot_ok(&["logs", &job.to_string()]);
    assert_console_exact(&logs, reference, &done, "vmlot logs");
    assert!(follow.wait().unwrap().success(), "vmlot logs --follow failed");
    assert_console_exact(
        &std::fs::read(&follow_out).unwrap(),
        reference,
        &done,
        "vmlot logs --follow",
    );
    m.assert_paid_once(done.job).await;
    let price = |p: &ProviderId| money(&specs[ids.iter().position(|i| i == p).unwrap()].price);
    for s in &done.settled {
        assert_eq!(s.price.amount, price(&s.provider), "pay-as-bid");
    }
    // The status table names the providers.
    let table = String::from_utf8(m.vmlot_ok(&["status", &job.to_string()])).unwrap();
    for name in ["p1", "p2", "p3"] {
        assert!(table.contains(&format!("{name} (")), "{table}");
    }
    eprintln!("{table}");
}

/// Redundancy 2: two providers run each segment, the first valid result
/// settles it, the other replica is cancelled and never shows in the
/// console or the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_per_segment_still_print_exactly_the_uninterrupted_console() {
    let _turn = TURN.lock().await;
    let _timed = Timed::start("redundancy 2");
    let reference = reference_console().await;
    let specs = [
        QemuProviderSpec::new("r1", "0.10"),
        QemuProviderSpec::new("r2", "0.20"),
        QemuProviderSpec::new("r3", "0.30"),
    ];
    let m = qemu_market(&specs.iter().collect::<Vec<_>>(), 30);
    m.market.ready(3).await.unwrap();
    let image = m.push_image(&qemu_image(&[]));
    let job = m.submit(&image, SEGMENT_SECONDS, "until-halt", "2");
    let done = m.wait_final(job).await;
    let logs = m.vmlot_ok(&["logs", &job.to_string()]);
    assert_console_exact(&logs, reference, &done, "vmlot logs");
    m.assert_paid_once(done.job).await;

    // Lots really went to two providers at once.
    let doubled = done.settled.iter().filter(|s| s.awarded.len() == 2).count();
    assert!(
        doubled > 0,
        "no settled lot was awarded to two providers: {:#?}",
        done.settled.iter().map(|s| &s.awarded).collect::<Vec<_>>()
    );
}

/// Deterministic segments under a quorum check (r = 2): every segment is
/// a count of guest instructions, stopped exactly there, and settles when
/// two replicas' states agree on their canonical digest. The cheapest of
/// three providers flips one byte of guest RAM in each save it makes: in
/// the first segment it is awarded, its state disagrees with its honest
/// partner's, the third provider breaks the tie, and the liar is the
/// minority, refused, unpaid and kept off the job. The console is still
/// byte-identical to the direct run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_of_deterministic_replicas_outvotes_a_provider_that_alters_guest_ram() {
    let _turn = TURN.lock().await;
    let _timed = Timed::start("quorum of deterministic replicas");
    let reference = reference_console().await;
    let (m, liar_id, image) = market_with_a_liar("flip-ram-byte", 60).await;
    let job = m.submit_checked(&image, SEGMENT_SECONDS, "until-halt", "2", "quorum");
    // Its latest checkpoint, fetched while it runs, is resumed outside the
    // market once it is done (below).
    m.until(job, "two segments settled", |s| {
        (s.settled.len() >= 2).then_some(())
    })
    .await;
    let bundle = m.market.path().join("bundle");
    m.vmlot_ok(&[
        "fetch",
        &job.to_string(),
        "--any-state",
        "-o",
        bundle.to_str().unwrap(),
    ]);
    let done = m.wait_final(job).await;
    let logs = m.vmlot_ok(&["logs", &job.to_string()]);
    assert_console_exact(&logs, reference, &done, "vmlot logs of a quorum job");
    assert_resumes_where_the_market_was(&m, &done, &bundle, reference);
    m.assert_paid_once(done.job).await;
    assert!(
        done.settled.iter().all(|s| s.provider != liar_id),
        "the liar settled a segment: {:?}\n{}",
        done.settled
            .iter()
            .map(|s| (s.segment, s.attempt, s.provider == liar_id, &s.guest))
            .collect::<Vec<_>>(),
        m.market.logs()
    );
    assert_eq!(done.refused, vec![liar_id], "the liar is off the job");
    let tie_broken = done.settled.iter().filter(|s| s.awarded.len() == 3).count();
    assert!(
        tie_broken >= 1,
        "a third replica broke the tie: {:#?}",
        done.settled
    );
    assert!(
        done.settled.iter().all(|s| s.awarded.len() >= 2),
        "every segment ran twice"
    );
    let of_liar = standing_of(&m, liar_id);
    assert_eq!(of_liar["refused"]["minority"], 1, "{of_liar:#}");
}

/// A provider with its own credentials that runs its segment for real but
/// leaves the guest's RAM out of its result (a device state saved with
/// x-ignore-shared, no memory part: a checkpoint nobody could restore) is
/// refused as incomplete, never paid and kept off the job; the job runs
/// on the honest providers to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_without_its_ram_is_refused_as_incomplete_and_never_paid() {
    let _turn = TURN.lock().await;
    let _timed = Timed::start("a state without its RAM");
    let (m, liar_id, image) = market_with_a_liar("drop-ram-part", 30).await;
    let job = m.submit(&image, SEGMENT_SECONDS, "2", "1");
    let done = m.wait_final(job).await;
    assert_eq!(
        done.state,
        vmlot_schemas::market::JobState::Done,
        "{:?}\n{}",
        done.end_reason,
        m.market.logs()
    );
    assert!(
        m.market
            .providers
            .iter()
            .any(|p| p.name() == "liar" && p.log().contains("fault injected: the guest's RAM part left out")),
        "the liar never got to lie\n{}",
        m.market.logs()
    );
    assert_eq!(done.refused, vec![liar_id], "the liar is off the job");
    assert_eq!(done.settled.len(), 2);
    assert!(
        done.payments().all(|s| s.provider != liar_id),
        "the liar was paid: {:#?}",
        done.settled
    );
    m.assert_paid_once(done.job).await;
    let of_liar = standing_of(&m, liar_id);
    assert_eq!(of_liar["refused"]["incomplete"], 1, "{of_liar:#}");
    assert_eq!(of_liar["valid"], 0, "{of_liar:#}");
}

/// `vmlot run-local` of a deterministic job's bundle fetched mid-job
/// (under icount, as its segments ran): the consoles of the segments up to
/// its checkpoint, then the local run's, are the uninterrupted run's.
fn assert_resumes_where_the_market_was(m: &VmMarket, done: &JobStatus, bundle: &Path, reference: &[u8]) {
    let described: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(described["deterministic"], true, "{described:#}");
    let after = described["after_segment"].as_u64().expect("a checkpoint") as usize;
    let mut joined = Vec::new();
    // A segment that printed nothing has no console.
    for settled in &done.settled[..=after] {
        let Some(console) = settled.console else { continue };
        let out = m.market.path().join(format!("console-{}", settled.segment));
        m.vmlot_ok(&["store", "pull", &console.to_string(), "-o", out.to_str().unwrap()]);
        joined.extend(std::fs::read(&out).unwrap());
    }
    let local = m.vmlot_ok(&["run-local", bundle.to_str().unwrap()]);
    assert!(!local.is_empty(), "run-local printed nothing");
    joined.extend(local);
    assert!(
        joined == reference,
        "the market's console to segment {after} and the local run's differ from an uninterrupted run:\n{}",
        String::from_utf8_lossy(&joined)
    );
}

/// A provider SIGKILLed while its QEMU runs segment 1: the attempt is lost,
/// the lot is offered again after its deadline, another provider runs it
/// from the same checkpoint, and the console is still exact; nobody is paid
/// twice and the dead provider is paid for nothing after segment 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_killed_mid_segment_loses_one_attempt_and_the_console_stays_exact() {
    let _turn = TURN.lock().await;
    let _timed = Timed::start("provider killed mid-segment");
    let reference = reference_console().await;
    let specs = [
        QemuProviderSpec::new("k1", "0.10"),
        QemuProviderSpec::new("k2", "0.20"),
        QemuProviderSpec::new("k3", "0.30"),
    ];
    let ids: Vec<ProviderId> = specs.iter().map(|s| ProviderId(s.id)).collect();
    let mut m = qemu_market(&specs.iter().collect::<Vec<_>>(), 12);
    m.market.ready(3).await.unwrap();
    let image = m.push_image(&qemu_image(&[]));
    let job = m.submit(&image, SEGMENT_SECONDS, "until-halt", "1");

    // Whoever runs segment 1: wait until its QEMU is up and the guest has
    // run a moment, then kill the provider (and, as a dying machine would,
    // its QEMU).
    let (victim, lot) = m
        .until(job, "segment 1 awarded", |s| {
            s.open_lot
                .as_ref()
                .filter(|o| o.lot.segment == 1 && !o.awarded.is_empty())
                .map(|o| (o.awarded[0].0, o.lot.lot))
        })
        .await;
    let index = ids.iter().position(|p| *p == victim).unwrap();
    let work = m.market.work_dir(&specs[index].name).join(lot.to_string());
    let needle = work.display().to_string();
    wait_for(Duration::from_secs(60), async || {
        (!processes_mentioning(&needle).is_empty()).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("QEMU of segment 1 never started: {e}\n{}", m.market.logs()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    m.market.providers[index].kill();
    // The kernel ends QEMU with its provider (PR_SET_PDEATHSIG).
    let orphaned = wait_for(Duration::from_secs(10), async || {
        processes_mentioning(&needle).is_empty().then_some(())
    })
    .await;
    let orphans = processes_mentioning(&needle);
    kill_pids(&orphans);
    assert!(
        orphaned.is_ok(),
        "QEMU left running by the killed provider: {orphans:?}"
    );

    let done = m.wait_final(job).await;
    assert!(
        done.settled[1].attempt >= 2,
        "segment 1 needed another attempt: {:#?}",
        done.settled[1]
    );
    assert!(
        done.settled[1..].iter().all(|s| s.provider != victim),
        "the killed provider settled nothing after its death"
    );
    let logs = m.vmlot_ok(&["logs", &job.to_string()]);
    assert_console_exact(&logs, reference, &done, "vmlot logs");
    m.assert_paid_once(done.job).await;
}

/// `vmlot fetch` of a job stopped by its segment count: the machine state
/// and the disk, byte-identical to `vmlot store pull` of the checkpoint's
/// manifests, and a manifest.json naming them. Before the job is done,
/// fetch refuses with exit code 8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_writes_the_last_checkpoint_as_the_store_holds_it() {
    let _turn = TURN.lock().await;
    let _timed = Timed::start("fetch");
    let m = qemu_market(&[&QemuProviderSpec::new("f1", "0.10")], 30);
    m.market.ready(1).await.unwrap();
    let disk = m.market.path().join("disk.raw");
    let mut content = vec![0u8; 4 << 20];
    for (i, b) in content.iter_mut().enumerate().skip(1 << 20).take(64 << 10) {
        *b = (i % 251) as u8;
    }
    std::fs::write(&disk, &content).unwrap();
    let image = m.push_image(&qemu_image(&[&disk]));
    // One provider: nobody else could check its checkpoints.
    let job = m.submit_checked(&image, SEGMENT_SECONDS, "2", "1", "none");
    let out_dir = m.market.path().join("fetched");
    let early = m.vmlot(&["fetch", &job.to_string(), "-o", out_dir.to_str().unwrap()]);
    assert_eq!(
        early.status.code(),
        Some(8),
        "fetch of a running job: {}",
        String::from_utf8_lossy(&early.stderr)
    );
    let watch = m.vmlot(&["watch", &job.to_string()]);
    assert!(
        watch.status.success(),
        "{}",
        String::from_utf8_lossy(&watch.stderr)
    );
    let watched = String::from_utf8_lossy(&watch.stdout);
    assert!(watched.contains("segment 2/2 settled: f1"), "{watched}");

    let done = m.wait_final(job).await;
    assert_eq!(done.settled.len(), 2);
    assert!(
        done.settled
            .iter()
            .all(|s| matches!(s.guest, GuestState::Running { .. }))
    );
    m.vmlot_ok(&["fetch", &job.to_string(), "-o", out_dir.to_str().unwrap()]);

    let described: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(described["after_segment"], 1);
    let checkpoint = &done.checkpoint;
    let image = &done.spec.image;
    // The guest ran with its RAM in a file of its own: the checkpoint's
    // memory part beside a machine state of its devices only.
    let expected: [(&str, ManifestId); 5] = [
        ("machine-state", checkpoint.machine_state.unwrap()),
        ("memory", checkpoint.memory.expect("a memory part")),
        ("disk0.raw", checkpoint.disks[0]),
        ("kernel", image.kernel),
        ("initrd", image.initrd.unwrap()),
    ];
    let files = described["files"].as_array().unwrap();
    assert_eq!(files.len(), expected.len(), "{described:#}");
    for ((name, manifest), file) in expected.iter().zip(files) {
        assert_eq!(file["file"], *name);
        assert_eq!(file["manifest"], manifest.to_string());
        let pulled = m.market.path().join(format!("pulled-{name}"));
        m.vmlot_ok(&[
            "store",
            "pull",
            &manifest.to_string(),
            "-o",
            pulled.to_str().unwrap(),
        ]);
        let fetched = std::fs::read(out_dir.join(name)).unwrap();
        assert!(
            fetched == std::fs::read(&pulled).unwrap(),
            "{name} differs from the store's"
        );
        assert_eq!(file["size"], fetched.len());
    }
    // The guest never touched its disk: the checkpoint's is the image's.
    assert!(std::fs::read(out_dir.join("disk0.raw")).unwrap() == content);
    // The machine state is the devices' (a few hundred KiB); the memory
    // part is the guest's RAM, exactly its size.
    assert!(std::fs::metadata(out_dir.join("machine-state")).unwrap().len() < 4 << 20);
    assert_eq!(
        std::fs::metadata(out_dir.join("memory")).unwrap().len(),
        (MEMORY_MIB as u64) << 20
    );
}

/// The job's output comes home (issue 15): the guest computes over
/// several segments, writes its answer at the start of its disk and powers
/// off. The job's last checkpoint is the disk as the guest left it, and
/// `vmlot fetch` writes it, byte-identical to the disk of one
/// uninterrupted QEMU run of the same guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_a_guest_writes_to_its_disk_before_powering_off_is_fetched() {
    let _turn = TURN.lock().await;
    let _timed = Timed::start("answer on disk");
    const ANSWERING: &str =
        "console=ttyS0 quiet loglevel=1 panic=-1 vmlot.steps=24 vmlot.work_kib=2048 vmlot.answer=1";
    let m = qemu_market(&[&QemuProviderSpec::new("a1", "0.10")], 30);
    m.market.ready(1).await.unwrap();
    let disk = m.market.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let direct_disk = m.market.path().join("direct-disk.raw");
    std::fs::copy(&disk, &direct_disk).unwrap();
    let direct_console = {
        let direct_disk = direct_disk.clone();
        tokio::task::spawn_blocking(move || direct_run(ANSWERING, Some(&direct_disk)))
            .await
            .unwrap()
    };
    let direct_text = String::from_utf8_lossy(&direct_console).into_owned();
    let answer = direct_text
        .lines()
        .find_map(|l| l.strip_prefix("vmlot-guest: done "))
        .unwrap_or_else(|| panic!("the direct run did not finish:\n{direct_text}"));
    assert!(
        direct_text.contains("vmlot-guest: answer written"),
        "{direct_text}"
    );
    let direct_bytes = std::fs::read(&direct_disk).unwrap();
    assert!(
        direct_bytes.starts_with(format!("vmlot-answer {answer}\n").as_bytes()),
        "the direct run's disk holds no answer"
    );

    let image = m.push_image(&GuestImage {
        cmdline: ANSWERING,
        ..qemu_image(&[&disk])
    });
    let job = m.submit_checked(&image, SEGMENT_SECONDS, "until-halt", "1", "none");
    let done = m.wait_final(job).await;
    assert!(
        done.settled.len() >= 2,
        "powered off in a later segment: {done:#?}"
    );
    let last = done.settled.last().unwrap();
    assert!(
        matches!(&last.guest, GuestState::Halted { final_state: Some(_) }),
        "{:#?}",
        last.guest
    );
    let logs = m.vmlot_ok(&["logs", &job.to_string()]);
    assert_console_exact(&logs, &direct_console, &done, "vmlot logs");
    let out_dir = m.market.path().join("fetched");
    m.vmlot_ok(&["fetch", &job.to_string(), "-o", out_dir.to_str().unwrap()]);
    let fetched = std::fs::read(out_dir.join("disk0.raw")).unwrap();
    assert!(
        fetched == direct_bytes,
        "the fetched disk differs from the direct run's"
    );
    m.assert_paid_once(done.job).await;
}

/// Take the VM back (issue 15 step 2): `vmlot stop` ends a running job
/// after its current segment, `vmlot fetch` writes that checkpoint with the
/// kernel and initrd, and `vmlot run-local` resumes it on plain QEMU
/// outside the market: the market's console and the local run's, joined,
/// are byte for byte the console of one uninterrupted run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_job_resumes_on_plain_qemu_where_the_market_left_it() {
    let _turn = TURN.lock().await;
    let _timed = Timed::start("stop, fetch, run-local");
    let reference = reference_console().await;
    let m = qemu_market(&[&QemuProviderSpec::new("s1", "0.10")], 30);
    m.market.ready(1).await.unwrap();
    let image = m.push_image(&qemu_image(&[]));
    let job = m.submit_checked(&image, SEGMENT_SECONDS, "until-halt", "1", "none");
    // Stopped once the guest has printed something in the market (it
    // boots in 4.5-9 s under TCG), so both halves of the console count.
    m.until(job, "two segments settled", |s| {
        (s.settled.len() >= 2).then_some(())
    })
    .await;
    m.vmlot_ok(&["stop", &job.to_string()]);
    let done = m.wait_final(job).await;
    assert!(
        done.end_reason.as_deref().is_some_and(|r| r.contains("stopped")),
        "{:?}",
        done.end_reason
    );
    let last = done.settled.last().unwrap();
    assert!(
        matches!(last.guest, GuestState::Running { .. }),
        "{:#?}",
        last.guest
    );
    assert_eq!(done.stop_after, Some(done.settled.len() as u32));

    let bundle = m.market.path().join("bundle");
    m.vmlot_ok(&["fetch", &job.to_string(), "-o", bundle.to_str().unwrap()]);
    let local = m.vmlot_ok(&["run-local", bundle.to_str().unwrap(), "--accel", "tcg"]);
    let market = m.vmlot_ok(&["logs", &job.to_string()]);
    assert!(
        !local.is_empty(),
        "run-local printed nothing; the market's console:\n{}",
        String::from_utf8_lossy(&market)
    );
    let joined = [market, local].concat();
    assert!(
        joined == reference,
        "the market's console and the local run's differ from an uninterrupted run:\n{}",
        String::from_utf8_lossy(&joined)
    );
}

/// The test guest with its notice reader on (`vmlot.notice=1`).
const NOTICE_CMDLINE: &str =
    "console=ttyS0 quiet loglevel=1 panic=-1 vmlot.steps=48 vmlot.work_kib=2048 vmlot.notice=1";

/// A busy loop: a program of the machine's owner, killed on drop.
struct Hog(std::process::Child);

impl Drop for Hog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The owner comes first (issue 15 steps 3 and 4): a CPU hog, a program of
/// the machine's owner, starts beside a scavenging provider's segment. Its
/// guest is paused; the owner stays busy, so the provider tells the guest
/// (a line on its second serial port), lets it run the notice's seconds,
/// saves it early and returns a partial segment. The broker takes that
/// checkpoint as progress, pays it pro rata for the time it ran, and
/// another provider runs the rest of the segment: the console is the
/// uninterrupted run's, plus the line the guest printed on the notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_owner_suspends_then_preempts_the_guest_and_the_job_goes_on_elsewhere() {
    let _turn = TURN.lock().await;
    let _timed = Timed::start("owner first: suspend, preempt");
    let reference = tokio::task::spawn_blocking(|| direct_run(NOTICE_CMDLINE, None))
        .await
        .unwrap();
    let scavenger = QemuProviderSpec {
        settings: "idle_load = 0.3\nowner_suspend_seconds = 3\npreempt_notice_seconds = 2\n".into(),
        ..QemuProviderSpec::new("scavenger", "0.10")
    };
    let other = QemuProviderSpec::new("other", "0.30");
    let (scavenger_id, other_id) = (ProviderId(scavenger.id), ProviderId(other.id));
    let mut m = qemu_market(&[&scavenger], 30);
    m.market.ready(1).await.unwrap();
    let image = m.push_image(&GuestImage {
        cmdline: NOTICE_CMDLINE,
        ..qemu_image(&[])
    });
    let job = m.submit(&image, "20", "until-halt", "1");
    let lot = m
        .until(job, "segment 0 awarded to the scavenger", |s| {
            s.open_lot
                .as_ref()
                .filter(|o| o.lot.segment == 0 && o.awarded.iter().any(|(p, _)| *p == scavenger_id))
                .map(|o| o.lot.lot)
        })
        .await;
    m.market.add_qemu_provider(&other).unwrap();
    m.market.ready(2).await.unwrap();
    // The guest boots (4.5-9 s under TCG) and starts its work, reading
    // its notice port from then on; a while later the owner starts working.
    let console = m
        .market
        .work_dir("scavenger")
        .join(lot.to_string())
        .join("run")
        .join("console.log");
    wait_for(Duration::from_secs(120), async || {
        let printed = std::fs::read(&console).unwrap_or_default();
        printed.windows(5).any(|w| w == b"step ").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("the guest never started its work: {e}\n{}", m.market.logs()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let hog = Hog(Command::new("sh")
        .args(["-c", "while :; do :; done"])
        .spawn()
        .unwrap());
    let partial = m
        .until(job, "the scavenger's partial segment", |s| {
            s.settled.first().cloned()
        })
        .await;
    drop(hog);

    assert_eq!(partial.provider, scavenger_id);
    assert!(
        matches!(partial.guest, GuestState::Running { .. }),
        "{partial:#?}"
    );
    let ran_ms = partial.partial_ms.expect("a partial segment");
    assert!(ran_ms < 20_000, "{partial:#?}");
    // Paused for the 3 s the owner may take before the guest is preempted.
    assert!(partial.timings.suspended_ms >= 2_500, "{partial:#?}");
    // Pro rata, the broker's default: its bid times the share it ran.
    let share = (money("0.10") * Decimal::from(ran_ms) / Decimal::from(20_000))
        .round_dp_with_strategy(8, rust_decimal::RoundingStrategy::ToZero)
        .normalize();
    assert_eq!(partial.price.amount, share);

    let done = m.wait_final(job).await;
    assert_eq!(done.settled[1].provider, other_id, "the rest ran elsewhere");
    assert_eq!(done.full_segments() as usize, done.settled.len() - 1);
    let logs = m.vmlot_ok(&["logs", &job.to_string()]);
    // The guest's line for the notice, to its end (the console's line end).
    let notice = b"vmlot-guest: notice vmlot-preempt 2";
    let at = logs
        .windows(notice.len())
        .position(|w| w == notice)
        .unwrap_or_else(|| panic!("no notice in the console:\n{}", String::from_utf8_lossy(&logs)));
    let end = at + logs[at..].iter().position(|b| *b == b'\n').expect("a whole line") + 1;
    assert_eq!(
        logs[at + notice.len()..end].trim_ascii(),
        b"",
        "{}",
        String::from_utf8_lossy(&logs)
    );
    let without_notice = [&logs[..at], &logs[end..]].concat();
    assert_console_exact(&without_notice, &reference, &done, "vmlot logs");
    m.assert_paid_once(done.job).await;
    let api = vmlot_ledger::BooksApi::for_server(m.market.server.client().await.unwrap()).await;
    let report = vmlot_ledger::verify::verify(&api).await.unwrap();
    assert!(report.ok(), "{:#?}", report.problems);
}
