use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vmlot_schemas::{HypervisorKind, VmConfig};

use super::*;
use crate::driver::api::{BootFiles, SegmentStart};

/// A machine that writes a save file and records the steps asked of it.
/// Its runs take their time on tokio's clock (paused in the owner tests,
/// so they take none).
#[derive(Default)]
struct Fake {
    steps: Arc<Mutex<Vec<String>>>,
    /// How the guest ends while it runs (none: it runs to the end)...
    ends_in_run: Option<SegmentEnd>,
    /// ... after this many runs that did not end it (halfway through the
    /// next one).
    runs_before_end: usize,
    runs: usize,
    save_fails: bool,
}

impl Fake {
    fn log(&self, step: impl Into<String>) {
        self.steps.lock().unwrap().push(step.into());
    }
}

impl Machine for Fake {
    async fn start(&mut self, _: &SegmentPlan, _: &CancellationToken) -> Result<(), DriverError> {
        self.log("start");
        Ok(())
    }

    async fn run(
        &mut self,
        run_for: Duration,
        _: &CancellationToken,
    ) -> Result<Option<SegmentEnd>, DriverError> {
        self.log("run");
        self.runs += 1;
        if self.runs > self.runs_before_end && self.ends_in_run.is_some() {
            tokio::time::sleep(run_for / 2).await;
            return Ok(self.ends_in_run.clone());
        }
        tokio::time::sleep(run_for).await;
        Ok(None)
    }

    async fn pause(&mut self, _: &CancellationToken) -> Result<Option<SegmentEnd>, DriverError> {
        self.log("pause");
        Ok(None)
    }

    async fn resume(&mut self, _: &CancellationToken) -> Result<Option<SegmentEnd>, DriverError> {
        self.log("resume");
        Ok(None)
    }

    async fn notice(&mut self, seconds: u64) -> Result<bool, DriverError> {
        self.log(format!("notice {seconds}"));
        Ok(true)
    }

    async fn save(
        &mut self,
        partial: &Path,
        _: &CancellationToken,
    ) -> Result<Option<SegmentEnd>, DriverError> {
        self.log("save");
        std::fs::write(partial, b"half a save").unwrap();
        if self.save_fails {
            return Err(DriverError::Save("disk full".into()));
        }
        Ok(None)
    }

    async fn stop(&mut self, outcome: Result<&SegmentEnd, &DriverError>) {
        self.log(if outcome.is_ok() { "stop ok" } else { "stop failed" });
    }

    async fn console(&mut self) -> Result<Vec<u8>, DriverError> {
        self.log("console");
        Ok(b"hello\n".to_vec())
    }
}

fn plan(workdir: &Path) -> SegmentPlan {
    SegmentPlan {
        vm: VmConfig {
            hypervisor: HypervisorKind::Qemu,
            arch: "x86_64".into(),
            memory_mib: 128,
            vcpus: 1,
            cmdline: String::new(),
        },
        files: BootFiles {
            kernel: "/k".into(),
            initrd: None,
            disks: vec![PathBuf::from("/d0.raw")],
            memory: None,
        },
        start: SegmentStart::Boot,
        run_for: Duration::ZERO,
        instructions: None,
        workdir: workdir.to_path_buf(),
        owner: None,
    }
}

#[tokio::test]
async fn save_of_a_guest_not_running_and_run_of_a_saved_one_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join(PARTIAL_STATE_FILE);
    let never = CancellationToken::new();
    let fake = Fake::default();
    let steps = Arc::clone(&fake.steps);
    let mut vm = Vm::new(fake);

    let refused = vm.save(&partial, &never).await.unwrap_err();
    assert!(
        matches!(
            refused,
            DriverError::NotRunning {
                step: VmStep::Save,
                state: VmState::Created
            }
        ),
        "{refused}"
    );
    assert_eq!(refused.to_string(), "cannot save a guest that is not started");
    assert!(matches!(
        vm.run(Duration::ZERO, &never).await,
        Err(DriverError::NotRunning {
            step: VmStep::Run,
            state: VmState::Created
        })
    ));

    vm.start(&plan(dir.path()), &never).await.unwrap();
    assert!(matches!(
        vm.start(&plan(dir.path()), &never).await,
        Err(DriverError::AlreadyStarted {
            state: VmState::Running
        })
    ));
    assert_eq!(vm.run(Duration::ZERO, &never).await.unwrap(), None);
    assert_eq!(vm.save(&partial, &never).await.unwrap(), None);
    assert_eq!(vm.state(), VmState::Saved);

    let refused = vm.run(Duration::ZERO, &never).await.unwrap_err();
    assert!(
        matches!(
            refused,
            DriverError::NotRunning {
                step: VmStep::Run,
                state: VmState::Saved
            }
        ),
        "{refused}"
    );
    assert_eq!(refused.to_string(), "cannot run a guest that is saved");
    assert!(matches!(
        vm.save(&partial, &never).await,
        Err(DriverError::NotRunning {
            step: VmStep::Save,
            state: VmState::Saved
        })
    ));
    // The refused steps never reached the hypervisor.
    assert_eq!(*steps.lock().unwrap(), ["start", "run", "save"]);
}

#[tokio::test]
async fn a_guest_that_ended_is_neither_run_nor_saved() {
    let dir = tempfile::tempdir().unwrap();
    let never = CancellationToken::new();
    let mut vm = Vm::new(Fake {
        ends_in_run: Some(SegmentEnd::Halted),
        ..Fake::default()
    });
    vm.start(&plan(dir.path()), &never).await.unwrap();
    assert_eq!(
        vm.run(Duration::ZERO, &never).await.unwrap(),
        Some(SegmentEnd::Halted)
    );
    for refused in [
        vm.run(Duration::ZERO, &never).await.map(|_| ()),
        vm.save(&dir.path().join("p"), &never).await.map(|_| ()),
    ] {
        assert!(matches!(
            refused,
            Err(DriverError::NotRunning {
                state: VmState::Ended,
                ..
            })
        ));
    }
}

#[tokio::test]
async fn a_saved_segment_is_renamed_into_place_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let steps = Arc::clone(&fake.steps);
    let report = run_segment(fake, &plan(dir.path()), dir.path(), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(
        report.end,
        SegmentEnd::Saved {
            machine_state: dir.path().join(STATE_FILE),
            memory: None,
            disks: vec![PathBuf::from("/d0.raw")],
        }
    );
    assert_eq!(report.console, b"hello\n");
    assert_eq!(
        std::fs::read(dir.path().join(STATE_FILE)).unwrap(),
        b"half a save"
    );
    assert!(!dir.path().join(PARTIAL_STATE_FILE).exists());
    assert_eq!(
        *steps.lock().unwrap(),
        ["start", "run", "save", "stop ok", "console"]
    );
}

#[tokio::test]
async fn a_guest_that_ends_is_not_saved_and_a_failed_save_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake {
        ends_in_run: Some(SegmentEnd::Crashed {
            reason: "guest-panic".into(),
        }),
        ..Fake::default()
    };
    let steps = Arc::clone(&fake.steps);
    let report = run_segment(fake, &plan(dir.path()), dir.path(), &CancellationToken::new())
        .await
        .unwrap();
    assert!(matches!(report.end, SegmentEnd::Crashed { .. }));
    assert_eq!(report.save_time, Duration::ZERO);
    assert_eq!(*steps.lock().unwrap(), ["start", "run", "stop ok", "console"]);

    let fake = Fake {
        save_fails: true,
        ..Fake::default()
    };
    let steps = Arc::clone(&fake.steps);
    let err = run_segment(fake, &plan(dir.path()), dir.path(), &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::Save(_)), "{err}");
    assert!(!dir.path().join(PARTIAL_STATE_FILE).exists());
    assert!(!dir.path().join(STATE_FILE).exists());
    assert_eq!(*steps.lock().unwrap(), ["start", "run", "save", "stop failed"]);
}

/// The owner busy from `from` after now (tokio's clock) until `to` (none:
/// for good).
fn owner_busy(from: Duration, to: Option<Duration>, suspend_for: u64, notice: u64) -> OwnerPolicy {
    let base = Instant::now();
    let busy = move || {
        let t = base.elapsed();
        t >= from && to.is_none_or(|to| t < to)
    };
    OwnerPolicy::new(
        Arc::new(busy),
        Duration::from_secs(suspend_for),
        Duration::from_secs(notice),
    )
}

fn owner_plan(workdir: &Path, run_for: u64, owner: OwnerPolicy) -> SegmentPlan {
    SegmentPlan {
        run_for: Duration::from_secs(run_for),
        owner: Some(owner),
        ..plan(workdir)
    }
}

/// The steps, each run of consecutive slices as one `run`.
fn steps_of(steps: &Mutex<Vec<String>>) -> Vec<String> {
    let mut steps = steps.lock().unwrap().clone();
    steps.dedup_by(|a, b| a == "run" && b == "run");
    steps
}

async fn run_fake(fake: Fake, plan: &SegmentPlan, dir: &Path) -> (SegmentReport, Vec<String>) {
    let steps = Arc::clone(&fake.steps);
    let report = run_segment(fake, plan, dir, &CancellationToken::new())
        .await
        .unwrap();
    (report, steps_of(&steps))
}

#[tokio::test(start_paused = true)]
async fn an_owner_busy_for_a_moment_pauses_the_guest_and_costs_it_no_run_time() {
    let dir = tempfile::tempdir().unwrap();
    // Busy from 3.5 s to 5.5 s: seen after the fourth 1 s slice, idle again
    // at the second look while paused.
    let owner = owner_busy(
        Duration::from_millis(3500),
        Some(Duration::from_millis(5500)),
        10,
        2,
    );
    let plan = owner_plan(dir.path(), 10, owner);
    let (report, steps) = run_fake(Fake::default(), &plan, dir.path()).await;
    assert!(matches!(report.end, SegmentEnd::Saved { .. }), "{:?}", report.end);
    assert!(!report.preempted);
    assert_eq!(report.suspended, Duration::from_secs(2));
    assert_eq!(report.run_time, Duration::from_secs(10));
    assert_eq!(
        steps,
        [
            "start", "run", "pause", "resume", "run", "save", "stop ok", "console"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn an_owner_that_stays_busy_gets_a_notice_then_an_early_save() {
    let dir = tempfile::tempdir().unwrap();
    // Busy from 3.5 s on: paused at 4 s of run, for 3 s, then 2 s notice.
    let owner = owner_busy(Duration::from_millis(3500), None, 3, 2);
    let (report, steps) = run_fake(Fake::default(), &owner_plan(dir.path(), 10, owner), dir.path()).await;
    assert_eq!(
        report.end,
        SegmentEnd::Saved {
            machine_state: dir.path().join(STATE_FILE),
            memory: None,
            disks: vec![PathBuf::from("/d0.raw")],
        }
    );
    assert!(report.preempted);
    assert_eq!(report.suspended, Duration::from_secs(3));
    assert_eq!(report.run_time, Duration::from_secs(6));
    assert_eq!(
        steps,
        [
            "start", "run", "pause", "resume", "notice 2", "run", "save", "stop ok", "console"
        ]
    );

    // Without a pause (suspend_for zero): the notice at once.
    let owner = owner_busy(Duration::from_millis(3500), None, 0, 2);
    let (report, steps) = run_fake(Fake::default(), &owner_plan(dir.path(), 10, owner), dir.path()).await;
    assert!(report.preempted);
    assert_eq!(report.suspended, Duration::ZERO);
    assert_eq!(report.run_time, Duration::from_secs(6));
    assert_eq!(
        steps,
        ["start", "run", "notice 2", "run", "save", "stop ok", "console"]
    );

    // Never more notice than what is left; the segment's time running out
    // during the notice makes it a full segment.
    let owner = owner_busy(Duration::from_millis(3500), None, 3, 10);
    let (report, steps) = run_fake(Fake::default(), &owner_plan(dir.path(), 5, owner), dir.path()).await;
    assert!(!report.preempted);
    assert_eq!(report.run_time, Duration::from_secs(5));
    assert_eq!(report.suspended, Duration::from_secs(3));
    assert_eq!(
        steps,
        [
            "start", "run", "pause", "resume", "notice 1", "run", "save", "stop ok", "console"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_deterministic_segment_is_never_paused() {
    let dir = tempfile::tempdir().unwrap();
    let owner = owner_busy(Duration::ZERO, None, 3, 2);
    let plan = SegmentPlan {
        instructions: Some(1_000_000),
        ..owner_plan(dir.path(), 10, owner)
    };
    let fake = Fake::default();
    let steps = Arc::clone(&fake.steps);
    let report = run_segment(fake, &plan, dir.path(), &CancellationToken::new())
        .await
        .unwrap();
    assert!(!report.preempted);
    assert_eq!(report.suspended, Duration::ZERO);
    assert_eq!(report.run_time, Duration::from_secs(10));
    // One run, not slices.
    assert_eq!(
        *steps.lock().unwrap(),
        ["start", "run", "save", "stop ok", "console"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_guest_that_halts_during_its_notice_ends_as_halted() {
    let dir = tempfile::tempdir().unwrap();
    let owner = owner_busy(Duration::ZERO, None, 0, 4);
    let fake = Fake {
        ends_in_run: Some(SegmentEnd::Halted),
        runs_before_end: 1,
        ..Fake::default()
    };
    let (report, steps) = run_fake(fake, &owner_plan(dir.path(), 10, owner), dir.path()).await;
    assert_eq!(report.end, SegmentEnd::Halted);
    assert!(!report.preempted);
    assert_eq!(report.save_time, Duration::ZERO);
    // One slice, then half of the 4 s notice.
    assert_eq!(report.run_time, Duration::from_secs(3));
    assert!(!dir.path().join(STATE_FILE).exists());
    assert_eq!(steps, ["start", "run", "notice 4", "run", "stop ok", "console"]);
}

#[tokio::test]
async fn a_paused_guest_is_resumed_before_anything_else() {
    let dir = tempfile::tempdir().unwrap();
    let never = CancellationToken::new();
    let mut vm = Vm::new(Fake::default());
    vm.start(&plan(dir.path()), &never).await.unwrap();
    let refused = vm.resume(&never).await.unwrap_err();
    assert_eq!(refused.to_string(), "cannot resume a guest that is running");
    assert_eq!(vm.pause(&never).await.unwrap(), None);
    assert_eq!(vm.state(), VmState::Paused);
    let refused = vm.save(&dir.path().join("p"), &never).await.unwrap_err();
    assert_eq!(refused.to_string(), "cannot save a guest that is paused");
    assert!(matches!(
        vm.run(Duration::ZERO, &never).await,
        Err(DriverError::NotRunning {
            step: VmStep::Run,
            state: VmState::Paused
        })
    ));
    assert!(matches!(
        vm.notice(1).await,
        Err(DriverError::NotRunning {
            step: VmStep::Notice,
            state: VmState::Paused
        })
    ));
    assert_eq!(vm.resume(&never).await.unwrap(), None);
    assert_eq!(vm.state(), VmState::Running);
    assert!(vm.notice(1).await.unwrap());
}
