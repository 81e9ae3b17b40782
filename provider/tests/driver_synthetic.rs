//! The synthetic driver (market load tests only; no VM).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use vmlot_provider::driver::synthetic::{SyntheticConfig, SyntheticDriver};
use vmlot_provider::driver::{
    BootFiles, Driver, DriverError, OwnerPolicy, SegmentEnd, SegmentPlan, SegmentReport, SegmentStart,
};
use vmlot_schemas::{HypervisorKind, VmConfig};

const BLOCK: usize = 4096;

fn plan(
    cmdline: &str,
    memory_mib: u32,
    start: SegmentStart,
    run_for: Duration,
    workdir: &Path,
) -> SegmentPlan {
    SegmentPlan {
        vm: VmConfig {
            hypervisor: HypervisorKind::Synthetic,
            arch: "x86_64".into(),
            memory_mib,
            vcpus: 1,
            cmdline: cmdline.into(),
        },
        files: BootFiles {
            kernel: "/nonexistent/never-read".into(),
            initrd: None,
            disks: Vec::new(),
            memory: None,
        },
        start,
        run_for,
        instructions: None,
        workdir: workdir.to_path_buf(),
        owner: None,
    }
}

fn driver(changed_fraction: f64) -> SyntheticDriver {
    SyntheticDriver::new(SyntheticConfig { changed_fraction })
}

/// Runs a job segment by segment, each in its own workdir under `root`,
/// until it halts or `max` segments ran. Returns the reports and the saved
/// states (in order).
async fn run_job(
    driver: &SyntheticDriver,
    cmdline: &str,
    memory_mib: u32,
    root: &Path,
    max: usize,
) -> (Vec<SegmentReport>, Vec<PathBuf>) {
    let mut reports = Vec::new();
    let mut states: Vec<PathBuf> = Vec::new();
    for n in 0..max {
        let start = match states.last() {
            None => SegmentStart::Boot,
            Some(state) => SegmentStart::Restore {
                machine_state: state.clone(),
            },
        };
        let workdir = root.join(format!("seg-{n}"));
        let plan = plan(cmdline, memory_mib, start, Duration::ZERO, &workdir);
        let report = driver
            .run_segment(&plan, CancellationToken::new())
            .await
            .expect("segment");
        let end = report.end.clone();
        reports.push(report);
        match end {
            SegmentEnd::Saved { machine_state, .. } => states.push(machine_state),
            _ => break,
        }
    }
    (reports, states)
}

fn blocks(path: &Path) -> Vec<Vec<u8>> {
    std::fs::read(path)
        .expect("read state")
        .chunks(BLOCK)
        .map(<[u8]>::to_vec)
        .collect()
}

#[tokio::test]
async fn same_segments_give_identical_states_and_consoles() {
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    let cmdline = "synthetic.seed=lot-42";
    let (ra, sa) = run_job(&driver(0.05), cmdline, 8, a.path(), 5).await;
    let (rb, sb) = run_job(&driver(0.05), cmdline, 8, b.path(), 5).await;
    assert_eq!(sa.len(), 5);
    for (n, (x, y)) in ra.iter().zip(&rb).enumerate() {
        assert_eq!(x.console, y.console, "segment {n} console");
        let line = String::from_utf8_lossy(&x.console);
        assert!(
            line.starts_with(&format!("synthetic: segment {n} digest ")),
            "{line}"
        );
    }
    for (x, y) in sa.iter().zip(&sb) {
        assert!(
            std::fs::read(x).expect("a") == std::fs::read(y).expect("b"),
            "states differ"
        );
    }
    // Every segment changes the state, and another seed is another job.
    let digests: std::collections::HashSet<_> = ra.iter().map(|r| r.console.clone()).collect();
    assert_eq!(digests.len(), ra.len());
    let c = tempfile::tempdir().expect("tempdir");
    let (rc, _) = run_job(&driver(0.05), "synthetic.seed=lot-43", 8, c.path(), 1).await;
    assert_ne!(rc[0].console, ra[0].console);
}

#[tokio::test]
async fn each_segment_changes_the_configured_fraction() {
    for fraction in [0.05, 0.3] {
        let root = tempfile::tempdir().expect("tempdir");
        let (_, states) = run_job(&driver(fraction), "synthetic.seed=f", 16, root.path(), 3).await;
        let data_blocks = 16 * 256 - 1;
        let expected = (data_blocks as f64 * fraction).round() as usize;
        // Boot: zero RAM plus one segment of changes.
        let first = blocks(&states[0]);
        assert_eq!(first.len(), data_blocks + 1);
        let nonzero = first[1..].iter().filter(|b| b.iter().any(|&x| x != 0)).count();
        assert_eq!(nonzero, expected, "fraction {fraction}: blocks written at boot");
        // The state file stays sparse: unwritten RAM is holes.
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&states[0]).expect("stat");
        assert!(meta.blocks() * 512 < meta.len(), "sparse state");
        for pair in states.windows(2) {
            let (old, new) = (blocks(&pair[0]), blocks(&pair[1]));
            let changed = old[1..].iter().zip(&new[1..]).filter(|(x, y)| x != y).count();
            assert_eq!(
                changed, expected,
                "fraction {fraction}: blocks changed by a segment"
            );
        }
    }
}

#[tokio::test]
async fn halts_at_the_segment_limit() {
    let root = tempfile::tempdir().expect("tempdir");
    let (reports, states) = run_job(
        &driver(0.05),
        "synthetic.seed=h synthetic.segments=3",
        4,
        root.path(),
        10,
    )
    .await;
    let ends: Vec<_> = reports
        .iter()
        .map(|r| matches!(r.end, SegmentEnd::Saved { .. }))
        .collect();
    assert_eq!(ends, [true, true, false]);
    assert_eq!(reports[2].end, SegmentEnd::Halted);
    let last = String::from_utf8_lossy(&reports[2].console);
    assert!(last.contains("synthetic: segment 2 digest "), "{last}");
    assert!(last.contains("synthetic: done after 3 segments"), "{last}");
    assert_eq!(states.len(), 2);
    assert!(!root.path().join("seg-2").join("machine-state").exists());

    // A limit that is not a positive number is refused.
    let plan = plan(
        "synthetic.segments=0",
        4,
        SegmentStart::Boot,
        Duration::ZERO,
        root.path(),
    );
    assert!(matches!(
        driver(0.05).run_segment(&plan, CancellationToken::new()).await,
        Err(DriverError::BadImage(_))
    ));
}

#[tokio::test]
async fn zero_run_for_does_not_sleep_and_run_for_is_honoured() {
    let root = tempfile::tempdir().expect("tempdir");
    let t = Instant::now();
    let (reports, _) = run_job(&driver(0.05), "synthetic.seed=z", 4, root.path(), 50).await;
    let took = t.elapsed();
    eprintln!("50 segments of 4 MiB with run_for=0: {:.3} s", took.as_secs_f64());
    assert_eq!(reports.len(), 50);
    assert!(took < Duration::from_secs(5), "took {took:?}");

    let plan = plan(
        "synthetic.seed=z",
        4,
        SegmentStart::Boot,
        Duration::from_millis(300),
        root.path(),
    );
    let t = Instant::now();
    let report = driver(0.05)
        .run_segment(&plan, CancellationToken::new())
        .await
        .expect("segment");
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(
        report.run_time >= Duration::from_millis(290),
        "{:?}",
        report.run_time
    );
}

#[tokio::test]
async fn cancel_ends_a_segment_quickly_and_keeps_nothing() {
    let root = tempfile::tempdir().expect("tempdir");
    let plan = plan(
        "synthetic.seed=c",
        4,
        SegmentStart::Boot,
        Duration::from_secs(30),
        root.path(),
    );
    let cancel = CancellationToken::new();
    let d = driver(0.05);
    let run = d.run_segment(&plan, cancel.clone());
    let canceller = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        cancel.cancel();
        Instant::now()
    };
    let (result, at) = tokio::join!(run, canceller);
    assert!(matches!(result, Err(DriverError::Cancelled)), "{result:?}");
    assert!(at.elapsed() < Duration::from_millis(500));
    let left: Vec<_> = std::fs::read_dir(root.path())
        .expect("ls")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test]
async fn refuses_other_kinds_and_foreign_states() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut p = plan("", 4, SegmentStart::Boot, Duration::ZERO, root.path());
    p.vm.hypervisor = HypervisorKind::Qemu;
    assert!(matches!(
        driver(0.05).run_segment(&p, CancellationToken::new()).await,
        Err(DriverError::WrongHypervisor { .. })
    ));
    let junk = root.path().join("junk");
    std::fs::write(&junk, vec![7u8; 4 << 20]).expect("write");
    let p = plan(
        "",
        4,
        SegmentStart::Restore { machine_state: junk },
        Duration::ZERO,
        &root.path().join("w"),
    );
    assert!(matches!(
        driver(0.05).run_segment(&p, CancellationToken::new()).await,
        Err(DriverError::Restore(_))
    ));
    // A state of another memory size is refused too.
    let (_, states) = run_job(&driver(0.05), "", 4, &root.path().join("j"), 1).await;
    let p = plan(
        "",
        8,
        SegmentStart::Restore {
            machine_state: states[0].clone(),
        },
        Duration::ZERO,
        root.path(),
    );
    assert!(matches!(
        driver(0.05).run_segment(&p, CancellationToken::new()).await,
        Err(DriverError::Restore(_))
    ));
}

/// Under an owner policy a segment runs in slices and may be cut short;
/// its state still changes once, as a whole segment's does.
#[tokio::test]
async fn a_segment_in_slices_or_preempted_changes_the_state_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cmdline = "synthetic.seed=lot-7";
    let whole = plan(
        cmdline,
        8,
        SegmentStart::Boot,
        Duration::ZERO,
        &dir.path().join("whole"),
    );
    let whole = driver(0.05)
        .run_segment(&whole, CancellationToken::new())
        .await
        .expect("whole segment");
    for busy in [false, true] {
        let mut sliced = plan(
            cmdline,
            8,
            SegmentStart::Boot,
            Duration::from_millis(300),
            &dir.path().join(format!("busy-{busy}")),
        );
        sliced.owner = Some(OwnerPolicy {
            poll: Duration::from_millis(50),
            ..OwnerPolicy::new(Arc::new(move || busy), Duration::from_millis(100), Duration::ZERO)
        });
        let report = driver(0.05)
            .run_segment(&sliced, CancellationToken::new())
            .await
            .expect("sliced segment");
        assert_eq!(report.preempted, busy);
        assert_eq!(report.console, whole.console);
        let (SegmentEnd::Saved { machine_state: a, .. }, SegmentEnd::Saved { machine_state: b, .. }) =
            (&report.end, &whole.end)
        else {
            panic!("{:?} / {:?}", report.end, whole.end);
        };
        assert!(
            std::fs::read(a).expect("a") == std::fs::read(b).expect("b"),
            "states differ"
        );
        if busy {
            assert!(report.suspended >= Duration::from_millis(100), "{report:?}");
            assert!(report.run_time < Duration::from_millis(300), "{report:?}");
        } else {
            assert!(report.run_time >= Duration::from_millis(300), "{report:?}");
        }
    }
}
