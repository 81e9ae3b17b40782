//! The segment template, written once for every hypervisor: boot or
//! restore, run, save to a partial file, rename it into place, end the
//! guest, read its console, and time each step. A hypervisor only fills in
//! the steps ([`Machine`]); the order, the partial-then-rename rule, the
//! clean-up and the timings are here.
//!
//! The guest's state is checked by name at every step ([`Vm`]): a save of a
//! guest that is not running, or a run of one already saved, is refused
//! with [`DriverError::NotRunning`] before the hypervisor is asked.
//!
//! On a scavenging provider the owner comes first ([`OwnerPolicy`]): the
//! guest runs in slices of the policy's poll interval, and after each one
//! the owner's activity is asked. A busy owner gets the machine at once
//! (the guest is paused); an owner still busy after the policy's
//! `suspend_for` gets it for good: the guest is resumed, given notice
//! ([`Machine::notice`]), run that long, and saved early (the segment is
//! preempted). Paused time is not run time. Deterministic segments are
//! never paused: their replicas must run an exact instruction count.

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::api::{DriverError, OwnerPolicy, SegmentEnd, SegmentPlan, SegmentReport, VmState, VmStep};
use super::host::io_err;

/// The file a saved segment leaves in its state directory.
pub const STATE_FILE: &str = "machine-state";
/// Where a save is written before it is whole: a failed save leaves no
/// half file under [`STATE_FILE`], and a checkpoint restored from that
/// path survives until its successor is complete.
pub const PARTIAL_STATE_FILE: &str = "machine-state.partial";
/// The shortest slice a guest runs between two looks at its owner.
const MIN_POLL: Duration = Duration::from_millis(10);

/// One hypervisor's steps for one segment's guest. The template calls
/// them in order: `start` once; `run` (once, or slice after slice under an
/// [`OwnerPolicy`], with `pause` and `resume` between slices and at most
/// one `notice`); then `save` only if the guest still runs, then `stop`
/// whatever happened, then `console` only if the segment succeeded.
pub(crate) trait Machine: Send {
    /// Boots the image or restores the checkpoint; returns once the guest runs.
    async fn start(&mut self, plan: &SegmentPlan, cancel: &CancellationToken) -> Result<(), DriverError>;

    /// Lets the guest run until `run_for` has passed (`None`) or it ended.
    async fn run(
        &mut self,
        run_for: Duration,
        cancel: &CancellationToken,
    ) -> Result<Option<SegmentEnd>, DriverError>;

    /// Holds the running guest still, its memory and devices kept: `None`
    /// once it is paused, or how it ended if it powered off or crashed
    /// just before.
    async fn pause(&mut self, cancel: &CancellationToken) -> Result<Option<SegmentEnd>, DriverError>;

    /// Lets the paused guest go on: `None`, or how it ended (a hypervisor
    /// that went away meanwhile).
    async fn resume(&mut self, cancel: &CancellationToken) -> Result<Option<SegmentEnd>, DriverError>;

    /// Tells the running guest it will be saved in `seconds`: true once
    /// the notice is on its way, false where the hypervisor has no channel
    /// into the guest (or the channel failed: the save goes ahead anyway).
    async fn notice(&mut self, seconds: u64) -> Result<bool, DriverError>;

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

    pub(crate) async fn pause(
        &mut self,
        cancel: &CancellationToken,
    ) -> Result<Option<SegmentEnd>, DriverError> {
        self.expect_running(VmStep::Pause)?;
        let ended = self.machine.pause(cancel).await?;
        self.state = if ended.is_some() {
            VmState::Ended
        } else {
            VmState::Paused
        };
        Ok(ended)
    }

    pub(crate) async fn resume(
        &mut self,
        cancel: &CancellationToken,
    ) -> Result<Option<SegmentEnd>, DriverError> {
        if self.state != VmState::Paused {
            return Err(DriverError::NotRunning {
                step: VmStep::Resume,
                state: self.state,
            });
        }
        let ended = self.machine.resume(cancel).await?;
        self.state = if ended.is_some() {
            VmState::Ended
        } else {
            VmState::Running
        };
        Ok(ended)
    }

    pub(crate) async fn notice(&mut self, seconds: u64) -> Result<bool, DriverError> {
        self.expect_running(VmStep::Notice)?;
        self.machine.notice(seconds).await
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
    tracing::info!(
        end = ?ran.end,
        bytes = console.len(),
        run_time = ?ran.run_time,
        suspended = ?ran.suspended,
        preempted = ran.preempted,
        "segment done"
    );
    Ok(SegmentReport {
        end: ran.end,
        console,
        start_time: ran.start_time,
        run_time: ran.run_time,
        save_time: ran.save_time,
        suspended: ran.suspended,
        preempted: ran.preempted,
    })
}

/// How the guest's part of a segment went, and how long each step took.
struct Ran {
    end: SegmentEnd,
    start_time: Duration,
    run_time: Duration,
    save_time: Duration,
    suspended: Duration,
    preempted: bool,
}

/// How the run step went: the guest's end if it ended, the time it ran
/// and was paused, and whether the owner cut it short.
struct Run {
    ended: Option<SegmentEnd>,
    run_time: Duration,
    suspended: Duration,
    preempted: bool,
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

    let run = match &plan.owner {
        // Deterministic segments run their exact count, owner or not.
        Some(owner) if plan.instructions.is_none() => run_for_owner(vm, plan.run_for, owner, cancel).await?,
        _ => {
            let run_started = Instant::now();
            let ended = vm.run(plan.run_for, cancel).await?;
            Run {
                ended,
                run_time: run_started.elapsed(),
                suspended: Duration::ZERO,
                preempted: false,
            }
        }
    };
    let Run {
        ended,
        run_time,
        suspended,
        preempted,
    } = run;
    if let Some(end) = ended {
        return Ok(Ran {
            end,
            start_time,
            run_time,
            save_time: Duration::ZERO,
            suspended,
            preempted: false,
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
                memory: plan.files.memory.clone(),
                disks: plan.files.disks.clone(),
            }
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    // A guest that powered off just before the save was not preempted.
    let preempted = preempted && matches!(end, SegmentEnd::Saved { .. });
    Ok(Ran {
        end,
        start_time,
        run_time,
        save_time: save_started.elapsed(),
        suspended,
        preempted,
    })
}

/// Runs the guest for `run_for` of its own time, in slices of the policy's
/// poll interval, giving the machine to its owner when `owner` says so
/// (see the module docs).
async fn run_for_owner<M: Machine>(
    vm: &mut Vm<M>,
    run_for: Duration,
    owner: &OwnerPolicy,
    cancel: &CancellationToken,
) -> Result<Run, DriverError> {
    // A zero interval would ask the owner in a busy loop.
    let poll = owner.poll.max(MIN_POLL);
    let mut run = Run {
        ended: None,
        run_time: Duration::ZERO,
        suspended: Duration::ZERO,
        preempted: false,
    };
    loop {
        let left = run_for.saturating_sub(run.run_time);
        if left.is_zero() {
            return Ok(run);
        }
        let slice_started = Instant::now();
        run.ended = vm.run(left.min(poll), cancel).await?;
        run.run_time += slice_started.elapsed();
        if run.ended.is_some() {
            return Ok(run);
        }
        // The last slice is followed by the save, owner or not.
        if run.run_time >= run_for || !owner.is_busy() {
            continue;
        }
        if !owner.suspend_for.is_zero() {
            let paused_at = Instant::now();
            tracing::info!(suspend_for = ?owner.suspend_for, "owner busy: guest paused");
            run.ended = vm.pause(cancel).await?;
            if run.ended.is_some() {
                run.suspended += paused_at.elapsed();
                return Ok(run);
            }
            let idle = owner_idle_within(owner, poll, paused_at + owner.suspend_for, cancel).await?;
            run.ended = vm.resume(cancel).await?;
            run.suspended += paused_at.elapsed();
            if run.ended.is_some() {
                return Ok(run);
            }
            if idle {
                tracing::info!(paused = ?paused_at.elapsed(), "owner idle again: guest resumed");
                continue;
            }
        }
        // Never more notice than what is left of the segment; the guest is
        // told the whole seconds it can count on.
        let left = run_for.saturating_sub(run.run_time);
        let notice = owner.notice.min(left);
        let seconds = notice.as_secs();
        tracing::info!(seconds, ran = ?run.run_time, "owner still busy: preempting");
        if !vm.notice(seconds).await? {
            tracing::info!(
                seconds,
                "no notice channel into this guest: it is saved without one"
            );
        }
        let notice_started = Instant::now();
        if !notice.is_zero() {
            run.ended = vm.run(notice, cancel).await?;
        }
        run.run_time += notice_started.elapsed();
        // The segment's time ran out during the notice: a full segment.
        run.preempted = run.ended.is_none() && notice < left;
        return Ok(run);
    }
}

/// Asks the owner every `poll` until `until`: true as soon as the owner is
/// idle, false if still busy then.
async fn owner_idle_within(
    owner: &OwnerPolicy,
    poll: Duration,
    until: Instant,
    cancel: &CancellationToken,
) -> Result<bool, DriverError> {
    loop {
        let now = Instant::now();
        if now >= until {
            return Ok(false);
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(DriverError::Cancelled),
            _ = tokio::time::sleep((until - now).min(poll)) => {}
        }
        if !owner.is_busy() {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests;
