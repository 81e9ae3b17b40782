//! The owner comes first (issue 15 steps 3 and 4) on a real QEMU guest:
//! while the machine's owner is busy the guest is paused; an owner still
//! busy after the pause gets the machine back for good: the guest is
//! resumed, told on its second serial port that it will be saved (the test
//! guest prints what it reads there with `vmlot.notice=1`), and saved
//! early. The early save restores and the guest's work goes on.
//!
//! The hashchain test guest from scripts/build-guest.sh; nothing is mocked
//! and nothing is skipped: with QEMU or the guest missing the test fails
//! and says how to get them. About 20 s under TCG.

mod common;
use common::{guest, tcg};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use vmlot_provider::driver::qemu::CONSOLE_FILE;
use vmlot_provider::driver::{
    BootFiles, Driver, OwnerPolicy, SegmentEnd, SegmentPlan, SegmentReport, SegmentStart,
};

/// Enough work that neither segment sees the end of it (~0.05 s a step).
const CMDLINE: &str = "console=ttyS0 quiet loglevel=1 panic=-1 vmlot.mode=hashchain \
                       vmlot.steps=2000 vmlot.work_kib=256 vmlot.notice=1";
const STEPS: u32 = 2000;

fn plan(files: &BootFiles, start: SegmentStart, run_for: Duration, workdir: &Path) -> SegmentPlan {
    common::plan(files, CMDLINE.into(), start, run_for, workdir)
}

/// An owner who gets busy `after` the guest's work began (its hashchain
/// line on the console: boot takes 5–8 s under TCG, and a notice sent
/// before the guest reads its second serial port would be lost) and stays
/// busy.
fn owner_busy_after_work_began(
    console: PathBuf,
    after: Duration,
) -> impl Fn() -> bool + Send + Sync + 'static {
    let began: Mutex<Option<Instant>> = Mutex::new(None);
    move || {
        let mut began = began.lock().unwrap_or_else(|e| e.into_inner());
        if began.is_none()
            && std::fs::read(&console)
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("vmlot-guest: hashchain"))
        {
            *began = Some(Instant::now());
        }
        began.is_some_and(|at| at.elapsed() >= after)
    }
}

fn show(report: &SegmentReport) -> String {
    format!(
        "start {:.2} s, run {:.2} s, suspended {:.2} s, save {:.2} s, preempted {}, console {} bytes, {:?}",
        report.start_time.as_secs_f64(),
        report.run_time.as_secs_f64(),
        report.suspended.as_secs_f64(),
        report.save_time.as_secs_f64(),
        report.preempted,
        report.console.len(),
        report.end
    )
}

/// The step numbers of the hashchain's `step i/N` lines, in order.
fn steps(console: &str) -> Vec<u32> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("step "))
        .filter_map(|l| l.split('/').next()?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_owner_pauses_then_preempts_the_guest_with_a_notice() {
    let files = guest();
    let root = tempfile::tempdir().expect("tempdir");
    let never = CancellationToken::new();
    let started = Instant::now();

    // Segment 1: the owner gets busy 3 s into the guest's work and stays
    // busy; the guest is paused 2 s, then given 2 s notice, then saved.
    let first_dir = root.path().join("first");
    let busy = owner_busy_after_work_began(first_dir.join(CONSOLE_FILE), Duration::from_secs(3));
    let run_for = Duration::from_secs(60);
    let mut first = plan(&files, SegmentStart::Boot, run_for, &first_dir);
    first.owner = Some(OwnerPolicy::new(
        Arc::new(busy),
        Duration::from_secs(2),
        Duration::from_secs(2),
    ));
    let t = Instant::now();
    let report = tcg()
        .run_segment(&first, never.clone())
        .await
        .expect("first segment");
    eprintln!(
        "preempted segment: {} ({:.1} s)",
        show(&report),
        t.elapsed().as_secs_f64()
    );
    let first_console = String::from_utf8_lossy(&report.console).into_owned();
    let SegmentEnd::Saved { machine_state, .. } = report.end else {
        panic!("expected a save, got {:?}; console:\n{first_console}", report.end);
    };
    assert!(report.preempted, "console:\n{first_console}");
    assert!(
        report.suspended >= Duration::from_secs(2) && report.suspended < Duration::from_secs(3),
        "suspended {:?}",
        report.suspended
    );
    assert!(report.run_time < run_for, "run {:?}", report.run_time);
    assert!(
        first_console
            .lines()
            .any(|l| l == "vmlot-guest: notice vmlot-preempt 2"),
        "console:\n{first_console}"
    );
    let before = steps(&first_console);
    assert!(!before.is_empty(), "no step before the save:\n{first_console}");

    // Segment 2, elsewhere: the early save restores and the chain goes on.
    let second_dir = root.path().join("second");
    let second = plan(
        &files,
        SegmentStart::Restore { machine_state },
        Duration::from_secs(4),
        &second_dir,
    );
    let t = Instant::now();
    let report = tcg()
        .run_segment(&second, never.clone())
        .await
        .expect("second segment");
    eprintln!(
        "restored segment: {} ({:.1} s)",
        show(&report),
        t.elapsed().as_secs_f64()
    );
    assert!(matches!(report.end, SegmentEnd::Saved { .. }), "{:?}", report.end);
    assert!(!report.preempted);
    assert_eq!(report.suspended, Duration::ZERO);
    // The consoles end to end: every step once, in order, and the second
    // segment's steps continue the first's (a line cut by the save is
    // whole once joined).
    let joined = first_console + &String::from_utf8_lossy(&report.console);
    let all = steps(&joined);
    let want: Vec<u32> = (1..=all.len() as u32).collect();
    assert_eq!(all, want, "console:\n{joined}");
    assert!(
        all.len() > before.len() + 1 && all.len() < STEPS as usize,
        "{} steps before the save, {} after the second segment",
        before.len(),
        all.len()
    );
    assert_eq!(
        joined.matches("vmlot-guest: notice").count(),
        1,
        "console:\n{joined}"
    );
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
}
