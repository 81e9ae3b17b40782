//! The segment template, written once for every hypervisor: boot or
//! restore, run, save to a partial file, rename it into place, end the
//! guest, read its console, and time each step. A hypervisor only fills in
//! the steps ([`Machine`]); the order, the partial-then-rename rule, the
//! clean-up and the timings are here.
//!
//! The guest's state is checked by name at every step ([`Vm`]): a save of a
//! guest that is not running, or a run of one already saved, is refused
//! with [`DriverError::NotRunning`] before the hypervisor is asked.

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::api::{DriverError, SegmentEnd, SegmentPlan, SegmentReport, VmState, VmStep};
use super::host::io_err;

/// The file a saved segment leaves in its state directory.
pub const STATE_FILE: &str = "machine-state";
/// Where a save is written before it is whole: a failed save leaves no
/// half file under [`STATE_FILE`], and a checkpoint restored from that
/// path survives until its successor is complete.
pub const PARTIAL_STATE_FILE: &str = "machine-state.partial";

/// One hypervisor's steps for one segment's guest. The template calls
/// them in order, each at most once: `start`, `run`, then `save` only if
/// the guest still runs, then `stop` whatever happened, then `console`
/// only if the segment succeeded.
pub(crate) trait Machine: Send {
    /// Boots the image or restores the checkpoint; returns once the guest runs.
    async fn start(&mut self, plan: &SegmentPlan, cancel: &CancellationToken) -> Result<(), DriverError>;

    /// Lets the guest run until `run_for` has passed (`None`) or it ended.
    async fn run(
        &mut self,
        run_for: Duration,
        cancel: &CancellationToken,
    ) -> Result<Option<SegmentEnd>, DriverError>;

    /// Stops the guest and saves it to `partial`: `None` once the file is
    /// whole, or how the guest ended if it powered off or crashed just
    /// before (the template then removes the partial file).
    async fn save(
        &mut self,
        partial: &Path,
        cancel: &CancellationToken,
    ) -> Result<Option<SegmentEnd>, DriverError>;

    /// Ends whatever is left of the guest: gently after a segment that
    /// went well (`outcome` is how it ended), by force after a failure.
    /// Never cancelled, never fails: what cannot be undone is logged.
    async fn stop(&mut self, outcome: Result<&SegmentEnd, &DriverError>);

    /// Everything the guest wrote to its console during the segment.
    async fn console(&mut self) -> Result<Vec<u8>, DriverError>;
}

/// A [`Machine`] and where its guest stands: each step is allowed from one
/// state only, and the state follows what the steps report.
pub(crate) struct Vm<M> {
    machine: M,
    state: VmState,
}

impl<M: Machine> Vm<M> {
    pub(crate) fn new(machine: M) -> Self {
        Vm {
            machine,
            state: VmState::Created,
        }
    }

    #[cfg(test)]
    pub(crate) fn state(&self) -> VmState {
        self.state
    }

    pub(crate) async fn start(
        &mut self,
        plan: &SegmentPlan,
        cancel: &CancellationToken,
    ) -> Result<(), DriverError> {
        if self.state != VmState::Created {
            return Err(DriverError::AlreadyStarted { state: self.state });
        }
        self.machine.start(plan, cancel).await?;
        self.state = VmState::Running;
        Ok(())
    }

    pub(crate) async fn run(
        &mut self,
        run_for: Duration,
        cancel: &CancellationToken,
    ) -> Result<Option<SegmentEnd>, DriverError> {
        self.expect_running(VmStep::Run)?;
        let ended = self.machine.run(run_for, cancel).await?;
        if ended.is_some() {
            self.state = VmState::Ended;
        }
        Ok(ended)
    }

    pub(crate) async fn save(
        &mut self,
        partial: &Path,
        cancel: &CancellationToken,
    ) -> Result<Option<SegmentEnd>, DriverError> {
        self.expect_running(VmStep::Save)?;
        let ended = self.machine.save(partial, cancel).await?;
        self.state = if ended.is_some() {
            VmState::Ended
        } else {
            VmState::Saved
        };
        Ok(ended)
    }

    /// Ends the guest once; a second call does nothing.
    pub(crate) async fn stop(&mut self, outcome: Result<&SegmentEnd, &DriverError>) {
        if self.state != VmState::Stopped {
            self.machine.stop(outcome).await;
            self.state = VmState::Stopped;
        }
    }

    pub(crate) async fn console(&mut self) -> Result<Vec<u8>, DriverError> {
        self.machine.console().await
    }

    fn expect_running(&self, step: VmStep) -> Result<(), DriverError> {
        match self.state {
            VmState::Running => Ok(()),
            state => Err(DriverError::NotRunning { step, state }),
        }
    }
}

/// Runs one segment on `machine` and reports it. The saved state goes to
/// `<state_dir>/`[`STATE_FILE`], by way of [`PARTIAL_STATE_FILE`].
pub(crate) async fn run_segment<M: Machine>(
    machine: M,
    plan: &SegmentPlan,
    state_dir: &Path,
    cancel: &CancellationToken,
) -> Result<SegmentReport, DriverError> {
    let mut vm = Vm::new(machine);
    let started = Instant::now();
    let outcome = drive(&mut vm, plan, state_dir, started, cancel).await;
    vm.stop(outcome.as_ref().map(|ran| &ran.end)).await;
    let ran = outcome?;
    let console = vm.console().await?;
    tracing::info!(end = ?ran.end, bytes = console.len(), "segment done");
    Ok(SegmentReport {
        end: ran.end,
        console,
        start_time: ran.start_time,
        run_time: ran.run_time,
        save_time: ran.save_time,
    })
}

/// How the guest's part of a segment went, and how long each step took.
struct Ran {
    end: SegmentEnd,
    start_time: Duration,
    run_time: Duration,
    save_time: Duration,
}

/// Start → run → save and rename; the caller stops the guest.
async fn drive<M: Machine>(
    vm: &mut Vm<M>,
    plan: &SegmentPlan,
    state_dir: &Path,
    started: Instant,
    cancel: &CancellationToken,
) -> Result<Ran, DriverError> {
    vm.start(plan, cancel).await?;
    let start_time = started.elapsed();
    tracing::info!(?start_time, "guest running");

    let run_started = Instant::now();
    let ended = vm.run(plan.run_for, cancel).await?;
    let run_time = run_started.elapsed();
    if let Some(end) = ended {
        return Ok(Ran {
            end,
            start_time,
            run_time,
            save_time: Duration::ZERO,
        });
    }

    let partial = state_dir.join(PARTIAL_STATE_FILE);
    let state = state_dir.join(STATE_FILE);
    let save_started = Instant::now();
    let end = match vm.save(&partial, cancel).await {
        Ok(Some(end)) => {
            let _ = std::fs::remove_file(&partial);
            end
        }
        Ok(None) => {
            std::fs::rename(&partial, &state).map_err(|e| io_err("rename", &partial, e))?;
            SegmentEnd::Saved {
                machine_state: state,
                disks: plan.files.disks.clone(),
            }
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    Ok(Ran {
        end,
        start_time,
        run_time,
        save_time: save_started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    use vmlot_schemas::{HypervisorKind, VmConfig};

    use super::*;
    use crate::driver::api::{BootFiles, SegmentStart};

    /// A machine that writes a save file and records the steps asked of it.
    #[derive(Default)]
    struct Fake {
        steps: Arc<Mutex<Vec<String>>>,
        /// How the guest ends while it runs (none: it runs to the end).
        ends_in_run: Option<SegmentEnd>,
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
            _: Duration,
            _: &CancellationToken,
        ) -> Result<Option<SegmentEnd>, DriverError> {
            self.log("run");
            Ok(self.ends_in_run.clone())
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
            },
            start: SegmentStart::Boot,
            run_for: Duration::ZERO,
            instructions: None,
            workdir: workdir.to_path_buf(),
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
}
