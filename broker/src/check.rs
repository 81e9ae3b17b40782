//! The checks a result passes before anything is paid for it, each refusal
//! named ([`RefusalKind`]) so it can be counted against its provider. Pure:
//! the job's record, the result, when the NATS server received it, and the
//! first bytes of its machine state; `verify` reads the store and `settle`
//! decides what follows.
//!
//! What they catch is the provider that did not run the segment: a result
//! before the segment could have run, the input handed back as the output
//! (or the image's kernel named as a machine state), an ended guest with
//! nothing to show for it, a state another hypervisor or another machine
//! wrote. A provider that runs something else for the right time and
//! returns a well-formed state passes them; continuation and quorum
//! checks are what catch that one.

use std::time::Duration;

use chrono::{DateTime, Utc};
use vmlot_schemas::market::{Checkpoint, GuestState, JobStatus, ResultCheck, SegmentResult};
use vmlot_schemas::standing::RefusalKind;
use vmlot_schemas::{HypervisorKind, ManifestId, Money, VmConfig};

use crate::lifecycle::{self, Refused};

/// A refused result: why, by name and in words.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {why}")]
pub struct Refusal {
    pub kind: RefusalKind,
    pub why: String,
}

impl Refusal {
    pub fn new(kind: RefusalKind, why: impl Into<String>) -> Self {
        Refusal {
            kind,
            why: why.into(),
        }
    }
}

impl From<Refused> for Refusal {
    fn from(refused: Refused) -> Self {
        Refusal::new(RefusalKind::NotOpen, refused.to_string())
    }
}

/// Longest xl save header and domain config read (a config is a few KiB).
const XL_PREFIX: usize = 128 * 1024;

/// How many leading bytes of a machine state [`state_kind`] reads.
pub fn prefix_len(kind: HypervisorKind) -> usize {
    match kind {
        HypervisorKind::Qemu => vmlot_cas::qemusave::HEADER_PREFIX,
        HypervisorKind::Xen => XL_PREFIX,
        HypervisorKind::Synthetic => 4096,
    }
}

/// What a result claims, checked against the job's open attempt and the
/// clock: returns the price owed if the state it names then checks out.
/// `received` is when the NATS server stored the result.
pub fn claims(
    status: &JobStatus,
    result: &SegmentResult,
    received: DateTime<Utc>,
    allowance: Duration,
) -> Result<Money, Refusal> {
    let price = lifecycle::check_result(status, result)?;
    let open = status.open_lot.as_ref().ok_or(Refused::NoOpenLot)?;
    let image = &open.lot.image;
    let partial = crate::partial::ran_ms(open, result, received);
    if partial.is_some() && status.spec.check == ResultCheck::Quorum {
        return Err(Refusal::new(
            RefusalKind::Incomplete,
            "a quorum's replicas run the whole segment; a preempted one cannot be compared",
        ));
    }
    match &result.guest {
        GuestState::Running { checkpoint } => {
            // A partial segment may come early: it says how long it ran,
            // and is paid for no more than the time since its award.
            if let Some(awarded) = open.awarded_at.filter(|_| partial.is_none()) {
                let run = chrono::Duration::seconds(open.lot.segment_seconds as i64);
                let slack = chrono::Duration::from_std(allowance).unwrap_or_default();
                let earliest = awarded + run - slack;
                if received < earliest {
                    return Err(Refusal::new(
                        RefusalKind::TooEarly,
                        format!(
                            "arrived {:.1} s after its award; a {} s segment cannot",
                            (received - awarded).num_milliseconds() as f64 / 1000.0,
                            open.lot.segment_seconds
                        ),
                    ));
                }
            }
            let Some(state) = checkpoint.machine_state else {
                return Err(Refusal::new(
                    RefusalKind::Incomplete,
                    "a running guest's checkpoint needs a machine state",
                ));
            };
            if let Some(input) = open.lot.checkpoint.machine_state
                && input == state
            {
                return Err(Refusal::new(
                    RefusalKind::Unchanged,
                    "the machine state is the one the segment started from",
                ));
            }
            if image_parts(image).any(|part| part == state) || open.lot.checkpoint.disks.contains(&state) {
                return Err(Refusal::new(
                    RefusalKind::Unchanged,
                    "the machine state names a part of the image or a disk",
                ));
            }
            disks_fit(checkpoint, image.disks.len())?;
        }
        GuestState::Halted { final_state } | GuestState::Crashed { final_state, .. } => {
            let Some(last) = final_state else {
                return Err(Refusal::new(
                    RefusalKind::NoFinalState,
                    "an ended guest's result carries its final state (its disks)",
                ));
            };
            disks_fit(last, image.disks.len())?;
            if last.memory.is_some() {
                return Err(Refusal::new(
                    RefusalKind::Incomplete,
                    "an ended guest's final state is its disks: no memory part",
                ));
            }
        }
        // Nothing to check: it claims no work and is never paid.
        GuestState::RestoreFailed { .. } => {}
    }
    Ok(price)
}

fn image_parts(image: &vmlot_schemas::market::Image) -> impl Iterator<Item = ManifestId> + '_ {
    std::iter::once(image.kernel)
        .chain(image.initrd)
        .chain(image.disks.iter().copied())
}

fn disks_fit(state: &Checkpoint, image_disks: usize) -> Result<(), Refusal> {
    if state.disks.len() != image_disks {
        return Err(Refusal::new(
            RefusalKind::Incomplete,
            format!(
                "the state has {} disk(s), the image {image_disks}",
                state.disks.len()
            ),
        ));
    }
    Ok(())
}

/// The machine state is what the lot's hypervisor writes, for the lot's
/// machine: `prefix` is its first bytes ([`prefix_len`] of them, or all of
/// a shorter state), `size` its length, `segment` the segment it ends;
/// `memory` the size of the checkpoint's memory part, if it has one (a
/// QEMU state saved with `x-ignore-shared` needs one of the machine's
/// memory size, and any other state none).
pub fn state_kind(
    vm: &VmConfig,
    segment: u32,
    size: u64,
    prefix: &[u8],
    memory: Option<u64>,
) -> Result<(), Refusal> {
    let wrong = |why: String| Refusal::new(RefusalKind::WrongKind, why);
    let want = u64::from(vm.memory_mib) << 20;
    match (vm.hypervisor, memory) {
        (HypervisorKind::Qemu, _) => {}
        (_, None) => {}
        (kind, Some(_)) => return Err(wrong(format!("a {kind:?} state holds its RAM: no memory part"))),
    }
    match vm.hypervisor {
        HypervisorKind::Qemu => {
            let header = vmlot_cas::qemusave::parse_header(prefix)
                .map_err(|e| wrong(format!("not a QEMU save as the driver writes it: {e}")))?;
            match (header.mapped_ram, header.ignore_shared, memory) {
                (true, false, None) => {}
                (false, true, Some(bytes)) if bytes == want => {}
                (false, true, Some(bytes)) => {
                    return Err(wrong(format!(
                        "the memory part holds {bytes} bytes, the lot's machine {want}"
                    )));
                }
                (false, true, None) => {
                    return Err(Refusal::new(
                        RefusalKind::Incomplete,
                        "the state leaves the guest's RAM out (x-ignore-shared) and the checkpoint has no memory part",
                    ));
                }
                (true, _, Some(_)) => {
                    return Err(wrong(
                        "a memory part beside a state that holds the guest's RAM".into(),
                    ));
                }
                _ => {
                    return Err(wrong(
                        "a QEMU save with neither mapped-ram nor x-ignore-shared".into(),
                    ));
                }
            }
            // The provider's QEMU driver runs every guest as a q35 machine.
            if !header
                .machine
                .as_deref()
                .is_some_and(|m| m.starts_with("pc-q35-"))
            {
                return Err(wrong(format!("machine {:?}, not a q35", header.machine)));
            }
            let ram = header
                .guest_ram()
                .ok_or_else(|| wrong("no guest RAM block in the save".into()))?;
            if ram.used_length != want {
                return Err(wrong(format!(
                    "guest RAM is {} MiB in the save, {} MiB in the lot",
                    ram.used_length >> 20,
                    vm.memory_mib
                )));
            }
            Ok(())
        }
        HypervisorKind::Xen => {
            let saved =
                vmlot_cas::read_saved_config(prefix).map_err(|e| wrong(format!("not an xl save: {e}")))?;
            if let Some(why) = saved.differs_from(vm.memory_mib, vm.vcpus) {
                return Err(wrong(why));
            }
            Ok(())
        }
        HypervisorKind::Synthetic => synthetic_kind(vm, segment, size, prefix),
    }
}

#[cfg(feature = "synthetic")]
fn synthetic_kind(vm: &VmConfig, segment: u32, size: u64, prefix: &[u8]) -> Result<(), Refusal> {
    use vmlot_cas::synthetic::SyntheticHeader;
    let wrong = |why: String| Refusal::new(RefusalKind::WrongKind, why);
    let header = SyntheticHeader::decode(prefix).ok_or_else(|| wrong("not a synthetic state".into()))?;
    if header.counter != u64::from(segment) + 1 {
        return Err(Refusal::new(
            RefusalKind::Unchanged,
            format!(
                "the state has run {} segment(s), not {}",
                header.counter,
                segment + 1
            ),
        ));
    }
    if u64::from(header.state_kib) * 1024 != size {
        return Err(wrong(format!(
            "the header says {} KiB, the state is {size} bytes",
            header.state_kib
        )));
    }
    // The job's cmdline may shrink the state for load tests; otherwise it
    // is the machine's memory.
    let asked = vm
        .cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("synthetic.state_kib="))
        .and_then(|k| k.parse::<u64>().ok())
        .unwrap_or(u64::from(vm.memory_mib) * 1024);
    if u64::from(header.state_kib) != asked {
        return Err(wrong(format!(
            "the state is {} KiB, the lot's machine {asked} KiB",
            header.state_kib
        )));
    }
    Ok(())
}

#[cfg(not(feature = "synthetic"))]
fn synthetic_kind(_: &VmConfig, _: u32, _: u64, _: &[u8]) -> Result<(), Refusal> {
    Err(Refusal::new(
        RefusalKind::WrongKind,
        "this broker runs no synthetic jobs",
    ))
}

#[cfg(test)]
mod tests;
