//! The QEMU driver against real QEMU guests (the hashchain test guest from
//! scripts/build-guest.sh). Nothing is mocked and nothing is skipped: with
//! QEMU or the guest missing these tests fail and say how to get them.

mod common;
use common::{guest, tcg};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use vmlot_provider::driver::qemu::{Accel, QemuConfig, QemuDriver};
use vmlot_provider::driver::{
    BootFiles, Driver, DriverError, SegmentEnd, SegmentPlan, SegmentReport, SegmentStart,
};
use vmlot_schemas::HypervisorKind;

const BASE_CMDLINE: &str = "console=ttyS0 quiet loglevel=1 panic=-1";

fn plan(
    files: &BootFiles,
    cmdline: &str,
    start: SegmentStart,
    run_for: Duration,
    workdir: &Path,
) -> SegmentPlan {
    common::plan(
        files,
        format!("{BASE_CMDLINE} {cmdline}"),
        start,
        run_for,
        workdir,
    )
}

/// Copies a file keeping zero 4 KiB blocks as holes, the way a provider
/// would materialize a checkpoint it fetched.
fn copy_sparse(from: &Path, to: &Path) {
    use std::os::unix::fs::FileExt;
    let src = std::fs::File::open(from).expect("open checkpoint");
    let len = src.metadata().expect("stat checkpoint").len();
    let dst = std::fs::File::create(to).expect("create copy");
    dst.set_len(len).expect("size copy");
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], off).expect("read checkpoint");
        for (i, block) in buf[..n].chunks(4096).enumerate() {
            if block.iter().any(|&b| b != 0) {
                dst.write_all_at(block, off + (i * 4096) as u64)
                    .expect("write copy");
            }
        }
        off += n as u64;
    }
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// Pids of processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline"))
            && String::from_utf8_lossy(&cmdline).contains(needle)
        {
            pids.push(pid);
        }
    }
    pids
}

fn show(report: &SegmentReport) -> String {
    format!(
        "start {:.2} s, run {:.2} s, save {:.2} s, console {} bytes, {:?}",
        report.start_time.as_secs_f64(),
        report.run_time.as_secs_f64(),
        report.save_time.as_secs_f64(),
        report.console.len(),
        report.end
    )
}

/// The guest run in segments a fifth of its uninterrupted run, each restored in a fresh workdir from
/// a copy of the previous checkpoint, prints exactly what it prints when
/// run in one go: no output lost, none repeated, the work continued. The
/// first two segments keep the guest's RAM in QEMU (mapped-ram saves that
/// hold it); from the third on it is a file of its own (`x-ignore-shared`
/// saves of the device state only, the RAM file copied beside them): the
/// third loads a state that brings its RAM into that file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segmented_run_matches_uninterrupted_run() {
    let files = guest();
    let root = tempfile::tempdir().expect("tempdir");
    // A raw disk rides along (the guest does not use it): restores must
    // rebuild the machine with it.
    let disk = root.path().join("disk.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(4 << 20))
        .expect("create disk");
    let files = BootFiles {
        disks: vec![disk.clone()],
        ..files
    };
    // 4.5–8.5 s of boot and 12–30 s of work under TCG on the machines this
    // has run on; the segments are sized from the uninterrupted run below,
    // so a faster machine still gets several.
    let cmdline = "vmlot.mode=hashchain vmlot.steps=400 vmlot.work_kib=256";
    let never = CancellationToken::new();

    // Auto probes KVM once (here /dev/kvm opens but guests hang: TCG),
    // then answers from its cache.
    let auto = QemuDriver::new(QemuConfig {
        binary: None,
        accel: Accel::Auto,
        ..Default::default()
    });
    let t = Instant::now();
    let accel = auto.accel_for(&files.kernel, &never).await.expect("probe");
    let probe_time = t.elapsed();
    let t = Instant::now();
    assert_eq!(
        auto.accel_for(&files.kernel, &never).await.expect("cached probe"),
        accel
    );
    assert!(
        t.elapsed() < Duration::from_millis(50),
        "the probe answer is cached"
    );
    assert!(matches!(accel, Accel::Kvm | Accel::Tcg));
    eprintln!(
        "auto accelerator: {accel:?} (probe {:.2} s)",
        probe_time.as_secs_f64()
    );

    let whole_dir = root.path().join("whole");
    let t = Instant::now();
    let whole = auto
        .run_segment(
            &plan(
                &files,
                cmdline,
                SegmentStart::Boot,
                Duration::from_secs(180),
                &whole_dir,
            ),
            never.clone(),
        )
        .await
        .expect("uninterrupted run");
    eprintln!(
        "uninterrupted: {} ({:.1} s)",
        show(&whole),
        t.elapsed().as_secs_f64()
    );
    assert_eq!(
        whole.end,
        SegmentEnd::Halted,
        "console: {}",
        String::from_utf8_lossy(&whole.console)
    );
    let text = String::from_utf8_lossy(&whole.console);
    assert!(
        text.contains("vmlot-guest: hashchain steps=400"),
        "console: {text}"
    );
    assert!(text.contains("step 400/400 "), "console: {text}");

    // Segments, each "on another provider": a fresh workdir, a copy of the
    // checkpoint and of the disk, the same accelerator.
    // A fifth of the uninterrupted run (at least 2 s, so a segment gets past
    // the boot): four or more saves on any machine's speed.
    let segment_for = (whole.run_time / 5).max(Duration::from_secs(2));
    eprintln!("segments of {:.2} s", segment_for.as_secs_f64());
    let mut console = Vec::new();
    let mut previous: Option<(tempfile::TempDir, PathBuf, PathBuf, Option<PathBuf>)> = None;
    let (mut saved, mut restored_beside_ram) = (0, 0);
    let t = Instant::now();
    for n in 0.. {
        assert!(n < 40, "the guest should have halted by segment {n}");
        let dir = tempfile::tempdir_in(root.path()).expect("tempdir");
        let memory = (n >= 2).then(|| dir.path().join("memory"));
        let (start, disk) = match &previous {
            None => (SegmentStart::Boot, disk.clone()),
            Some((_, state, old_disk, old_memory)) => {
                let copy = dir.path().join("fetched-state");
                copy_sparse(state, &copy);
                let new_disk = dir.path().join("disk.raw");
                copy_sparse(old_disk, &new_disk);
                if let (Some(old), Some(new)) = (old_memory, &memory) {
                    copy_sparse(old, new);
                    restored_beside_ram += 1;
                }
                (SegmentStart::Restore { machine_state: copy }, new_disk)
            }
        };
        let files = BootFiles {
            disks: vec![disk],
            memory: memory.clone(),
            ..files.clone()
        };
        let driver = QemuDriver::new(QemuConfig {
            binary: None,
            accel,
            ..Default::default()
        });
        let workdir = dir.path().join("work");
        let report = driver
            .run_segment(
                &plan(&files, cmdline, start, segment_for, &workdir),
                never.clone(),
            )
            .await
            .unwrap_or_else(|e| panic!("segment {n}: {e}"));
        eprintln!("segment {n}: {}", show(&report));
        let needle = workdir.display().to_string();
        assert_eq!(
            processes_mentioning(&needle),
            Vec::<u32>::new(),
            "QEMU outlived segment {n}"
        );
        console.extend_from_slice(&report.console);
        match report.end {
            SegmentEnd::Saved {
                machine_state,
                memory: saved_memory,
                disks,
            } => {
                saved += 1;
                let size = std::fs::metadata(&machine_state).expect("state").len();
                let head = std::fs::read(&machine_state).expect("state");
                let header =
                    vmlot_cas::qemusave::parse_header(&head[..head.len().min(4096)]).expect("a QEMU save");
                assert_eq!(saved_memory, memory, "the RAM file is reported beside the state");
                if let Some(ram) = &saved_memory {
                    assert!(header.ignore_shared && !header.mapped_ram, "{header:?}");
                    assert!(size < 4 << 20, "the state without the RAM is {size} bytes");
                    assert_eq!(
                        std::fs::metadata(ram).expect("RAM file").len(),
                        u64::from(common::MEMORY_MIB) << 20
                    );
                } else {
                    assert!(header.mapped_ram && !header.ignore_shared, "{header:?}");
                    assert!(
                        allocated(&machine_state) < size,
                        "mapped-ram state should be sparse: {} allocated of {size}",
                        allocated(&machine_state)
                    );
                }
                assert_eq!(disks, files.disks);
                previous = Some((dir, machine_state, disks[0].clone(), saved_memory));
            }
            SegmentEnd::Halted => break,
            SegmentEnd::Crashed { reason } => panic!("segment {n} crashed: {reason}"),
        }
    }
    eprintln!("segmented: {saved} saves, {:.1} s", t.elapsed().as_secs_f64());
    assert!(
        saved >= 3 && restored_beside_ram >= 1,
        "the run should span several segments and restore a state saved beside its RAM file, \
         had {saved} saves and {restored_beside_ram} such restores"
    );
    let text = String::from_utf8_lossy(&console);
    assert!(
        console == whole.console,
        "segmented console differs from the uninterrupted one:\n--- segmented\n{text}\n--- whole\n{}",
        String::from_utf8_lossy(&whole.console)
    );
    let last = text.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("vmlot-guest: done "),
        "last console line: {last:?}"
    );
}

#[tokio::test]
async fn missing_binary_is_reported() {
    let files = guest();
    let dir = tempfile::tempdir().expect("tempdir");
    for binary in ["/nonexistent/qemu-system-x86_64", "vmlot-no-such-qemu"] {
        let driver = QemuDriver::new(QemuConfig {
            binary: Some(binary.into()),
            accel: Accel::Auto,
            ..Default::default()
        });
        let plan = plan(&files, "", SegmentStart::Boot, Duration::from_secs(1), dir.path());
        match driver.run_segment(&plan, CancellationToken::new()).await {
            Err(DriverError::MissingBinary { binary: b, package }) => {
                assert_eq!(b, binary);
                assert_eq!(package, "qemu-system-x86");
            }
            other => panic!("expected MissingBinary for {binary}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn missing_image_files_are_bad_images() {
    let files = guest();
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        BootFiles {
            kernel: dir.path().join("no-vmlinuz"),
            ..files.clone()
        },
        BootFiles {
            initrd: Some(dir.path().join("no-initrd")),
            ..files.clone()
        },
        BootFiles {
            disks: vec![dir.path().join("no-disk.raw")],
            ..files.clone()
        },
    ];
    for files in cases {
        let plan = plan(&files, "", SegmentStart::Boot, Duration::from_secs(1), dir.path());
        match tcg().run_segment(&plan, CancellationToken::new()).await {
            Err(DriverError::BadImage(msg)) => assert!(msg.contains("no-"), "{msg}"),
            other => panic!("expected BadImage, got {other:?}"),
        }
    }
    let mut plan = plan(&files, "", SegmentStart::Boot, Duration::from_secs(1), dir.path());
    plan.vm.arch = "aarch64".into();
    assert!(matches!(
        tcg().run_segment(&plan, CancellationToken::new()).await,
        Err(DriverError::BadImage(_))
    ));
    plan.vm.arch = "x86_64".into();
    plan.vm.hypervisor = HypervisorKind::Xen;
    assert!(matches!(
        tcg().run_segment(&plan, CancellationToken::new()).await,
        Err(DriverError::WrongHypervisor { .. })
    ));
}

#[tokio::test]
async fn cancel_ends_the_segment_and_qemu() {
    let files = guest();
    let dir = tempfile::tempdir().expect("tempdir");
    let workdir = dir.path().join("cancelled");
    let needle = workdir.display().to_string();
    let plan = plan(
        &files,
        "vmlot.steps=1000",
        SegmentStart::Boot,
        Duration::from_secs(120),
        &workdir,
    );
    let cancel = CancellationToken::new();
    let driver = tcg();
    let run = driver.run_segment(&plan, cancel.clone());
    let canceller = async {
        // Wait until QEMU is really up, then give the guest a moment.
        let t = Instant::now();
        while processes_mentioning(&needle).is_empty() {
            assert!(t.elapsed() < Duration::from_secs(20), "QEMU never started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        cancel.cancel();
        Instant::now()
    };
    let (result, cancelled_at) = tokio::join!(run, canceller);
    let took = cancelled_at.elapsed();
    eprintln!("cancel returned after {:.3} s", took.as_secs_f64());
    assert!(matches!(result, Err(DriverError::Cancelled)), "got {result:?}");
    assert!(took < Duration::from_secs(2), "cancel took {took:?}");
    assert_eq!(
        processes_mentioning(&needle),
        Vec::<u32>::new(),
        "QEMU left behind"
    );
    assert!(!workdir.join("machine-state").exists());

    // Cancelled before it starts: nothing is spawned.
    let cancel = CancellationToken::new();
    cancel.cancel();
    assert!(matches!(
        driver.run_segment(&plan, cancel).await,
        Err(DriverError::Cancelled)
    ));
    assert_eq!(processes_mentioning(&needle), Vec::<u32>::new());
}

/// A kernel panic (no init, no root: panic=-1 resets, -no-reboot ends it)
/// is a crash, not a halt.
#[tokio::test]
async fn guest_panic_is_a_crash() {
    let files = guest();
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = plan(
        &files,
        "rdinit=/nonexistent",
        SegmentStart::Boot,
        Duration::from_secs(120),
        dir.path(),
    );
    let report = tcg()
        .run_segment(&plan, CancellationToken::new())
        .await
        .expect("segment");
    eprintln!("panic: {}", show(&report));
    assert_eq!(
        report.end,
        SegmentEnd::Crashed {
            reason: "guest-reset".into()
        }
    );
    assert!(
        String::from_utf8_lossy(&report.console).contains("Kernel panic"),
        "console: {}",
        String::from_utf8_lossy(&report.console)
    );
}

#[tokio::test]
async fn a_bad_checkpoint_fails_the_restore() {
    let files = guest();
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("garbage");
    std::fs::write(&state, vec![0x5au8; 1 << 20]).expect("write");
    let start = SegmentStart::Restore { machine_state: state };
    let plan = plan(&files, "", start, Duration::from_secs(5), &dir.path().join("w"));
    match tcg().run_segment(&plan, CancellationToken::new()).await {
        Err(DriverError::Restore(msg)) => eprintln!("restore error: {msg}"),
        other => panic!("expected Restore, got {other:?}"),
    }
    let start = SegmentStart::Restore {
        machine_state: dir.path().join("absent"),
    };
    let plan = SegmentPlan { start, ..plan };
    assert!(matches!(
        tcg().run_segment(&plan, CancellationToken::new()).await,
        Err(DriverError::Restore(_))
    ));
}

#[tokio::test]
async fn qemu_refusing_to_start_reports_its_stderr() {
    let files = guest();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut plan = plan(&files, "", SegmentStart::Boot, Duration::from_secs(5), dir.path());
    plan.vm.vcpus = 100_000;
    match tcg().run_segment(&plan, CancellationToken::new()).await {
        Err(DriverError::Start(msg)) => {
            eprintln!("start error: {msg}");
            assert!(msg.contains("CPU"), "{msg}");
        }
        other => panic!("expected Start, got {other:?}"),
    }
}
