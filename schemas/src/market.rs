//! Market messages: jobs, lots, bids, awards, results.
//!
//! Who sends what (the subject map, `subjects`, is a layer above):
//! client → broker: [`SubmitJob`]; broker → all providers: [`Lot`];
//! provider → broker: [`Bid`], [`SegmentResult`], [`Heartbeat`];
//! broker → one provider: [`Award`], [`CancelAttempt`].

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ids::{JobId, LotId, ManifestId, ProviderId, shard_of};
use crate::money::Money;
use crate::vm::{HypervisorKind, VmConfig};

/// A VM's state and a segment's timings are VM-level types the ledger
/// shares; they keep their old path here.
pub use crate::vm::{Checkpoint, GuestState, SegmentTimings};

/// What a job starts from: kernel, optional initrd and disks, each a
/// manifest in the content-addressed store, and the VM to run them in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Image {
    pub vm: VmConfig,
    pub kernel: ManifestId,
    pub initrd: Option<ManifestId>,
    #[serde(default)]
    pub disks: Vec<ManifestId>,
}

/// How many segments a job runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SegmentCount {
    /// Exactly this many segments (fewer if the guest halts first).
    Count(u32),
    /// Until the guest halts (or the budget is spent).
    UntilHalt,
}

/// A job as submitted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub image: Image,
    /// Length T of one segment, in seconds (0 only for synthetic load tests).
    pub segment_seconds: u32,
    pub segments: SegmentCount,
    /// Providers that run each segment at once (r); the fastest valid result wins.
    pub redundancy: u32,
    /// The most the job pays for one segment.
    pub reserve_price: Money,
    /// The most the job pays in all; held in escrow at submission.
    pub budget: Money,
    /// The account that pays: always the submitter's own, set by the
    /// broker from the caller's identity (a client may leave it empty; a
    /// request naming another account is refused).
    #[serde(default)]
    pub account: String,
    /// How a provider's result is checked before it is paid.
    #[serde(default)]
    pub check: ResultCheck,
}

/// How a job's results are checked before their providers are paid (every
/// result is first checked for what it claims: its timing, its state's
/// kind and size, its blocks in the store).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ResultCheck {
    /// Paid at settlement: nothing proves the state restores.
    None,
    /// Paid into pending, posted once another provider restored the state
    /// (the next segment's, or the check restore after the last one) and
    /// voided when enough providers cannot.
    #[default]
    Continuation,
    /// Every segment runs on r ≥ 2 replicas of a deterministic guest; a
    /// result is paid when another replica's state agrees with it on its
    /// canonical digest (the first of the agreeing results is paid; a
    /// replica whose state differs from the agreed one is paid nothing);
    /// a disagreement is broken by one more replica.
    Quorum,
}

/// client → broker: submit a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitJob {
    pub version: u32,
    pub spec: JobSpec,
}

/// broker → providers: the offer of one segment attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Lot {
    pub version: u32,
    pub lot: LotId,
    pub job: JobId,
    /// Segment k of the job (0-based).
    pub segment: u32,
    /// Attempt number of this segment (a lot is re-offered as a new attempt).
    pub attempt: u32,
    pub image: Image,
    /// C(k): where the segment starts.
    pub checkpoint: Checkpoint,
    pub segment_seconds: u32,
    pub reserve_price: Money,
    /// Bids arriving after this are ignored.
    pub bid_deadline: DateTime<Utc>,
    /// The provider shards invited to bid ([`shard_of`]); `None`:
    /// every provider. A lot needs a handful of bids, not one from every
    /// provider on the market.
    pub shards: Option<Vec<u16>>,
    /// Invited by name whatever their shard (each gets the lot on its own
    /// subject): providers the broker knows have a free slot, and the one
    /// that ran the previous segment, which holds its blocks hot.
    pub invited: Vec<ProviderId>,
    /// A check restore, not a segment of the job: offered once the job's
    /// segments have all run, to prove that the last checkpoint restores
    /// on another provider before the payment that produced it is posted.
    /// It runs like a segment (for the broker's `--check-seconds`), is
    /// paid like one, and its result is recorded in [`JobStatus::check`];
    /// the job's checkpoint stays the last segment's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub check: bool,
    /// A deterministic segment (a quorum job on QEMU): the guest runs
    /// exactly this many instructions under a virtual clock, the
    /// segment's seconds converted at [`INSTRUCTIONS_PER_SECOND`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instructions: Option<u64>,
}

/// The fixed rate at which a deterministic segment's seconds become guest
/// instructions: about what TCG under `-icount` runs on one core here
/// (0.45–0.55 × 10⁹ a second), so a segment takes about its length.
pub const INSTRUCTIONS_PER_SECOND: u64 = 500_000_000;

impl Lot {
    /// True when `provider` is invited to bid on this lot.
    pub fn invites(&self, provider: &ProviderId) -> bool {
        self.shards
            .as_ref()
            .is_none_or(|shards| shards.contains(&shard_of(provider)))
            || self.invited.contains(provider)
    }
}

/// provider → broker: a sealed price for one lot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Bid {
    pub version: u32,
    pub lot: LotId,
    pub provider: ProviderId,
    pub price: Money,
    /// Bytes of the lot's checkpoint the provider already holds.
    pub hot_bytes: u64,
    /// Segments the provider runs at once: the broker never has more of its
    /// awards outstanding than this, however many lots it bid on.
    pub slots: u32,
    pub sent_at: DateTime<Utc>,
}

/// broker → provider: you won this lot; run it and report by `deadline`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Award {
    pub version: u32,
    pub lot: Lot,
    pub provider: ProviderId,
    /// What the provider is paid if its result settles the lot.
    pub price: Money,
    pub deadline: DateTime<Utc>,
}

/// broker → provider: stop working on this lot (another replica won, or the job ended).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelAttempt {
    pub version: u32,
    pub lot: LotId,
    pub reason: String,
}

/// provider → broker: the outcome of an awarded lot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SegmentResult {
    pub version: u32,
    pub lot: LotId,
    pub job: JobId,
    pub segment: u32,
    pub attempt: u32,
    pub provider: ProviderId,
    pub guest: GuestState,
    /// The guest's console output during this segment, as a manifest (it can be large).
    pub console: Option<ManifestId>,
    pub timings: SegmentTimings,
    /// Block bytes fetched from the store for C(k).
    pub fetched_bytes: u64,
    /// Block bytes sent to the store for C(k+1).
    pub sent_bytes: u64,
    pub finished_at: DateTime<Utc>,
    /// The provider's machine owner needed the machine back: the guest was
    /// saved before its segment's time was up (a partial segment). The
    /// broker takes it as progress, pays it by its `--partial-pay` setting
    /// for the time run, and offers the rest of the segment as the next lot.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preempted: bool,
}

/// provider → broker: I am alive, and this is what I can run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub version: u32,
    pub provider: ProviderId,
    pub name: String,
    pub hypervisors: Vec<HypervisorKind>,
    pub arch: String,
    pub memory_mib: u32,
    pub slots: u32,
    pub free_slots: u32,
    /// False while the machine's owner needs it (cycle scavenging).
    pub idle: bool,
    pub sent_at: DateTime<Utc>,
}

/// Any reply of the broker's API: the value, or an error with a code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Reply<T> {
    Ok(T),
    Error(ApiError),
}

/// A refused request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ApiError {
    /// Stable, machine-readable: `bad-request`, `not-found`, `insufficient-funds`, …
    pub code: String,
    pub message: String,
}

/// Where a job stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Segments are being offered and run.
    Running,
    /// The guest halted or the segment count was reached.
    Done,
    /// The guest crashed.
    Failed,
    Cancelled,
    /// The next segment could not be paid for.
    BudgetSpent,
}

impl JobState {
    pub fn is_final(&self) -> bool {
        !matches!(self, JobState::Running)
    }
}

/// One settled segment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SettledSegment {
    pub segment: u32,
    pub attempt: u32,
    pub lot: LotId,
    pub provider: ProviderId,
    /// Every provider awarded the attempt that settled (r of them); only
    /// `provider`, whose result came first, is paid.
    #[serde(default)]
    pub awarded: Vec<ProviderId>,
    pub price: Money,
    pub guest: GuestState,
    pub console: Option<ManifestId>,
    pub timings: SegmentTimings,
    pub fetched_bytes: u64,
    pub sent_bytes: u64,
    pub settled_at: DateTime<Utc>,
    /// When the provider finished the segment (its result's time), as the
    /// payment on the books says (`Settlement::finished_at`): the record
    /// holds all the payment is written from. Absent from a record written
    /// before it was kept (its payment was written from the result).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// False while its payment is pending (its checkpoint not yet restored
    /// by the next segment's provider); true once it is posted.
    #[serde(default)]
    pub posted: bool,
    /// Under a quorum check, an attempt awarded to one trusted provider
    /// only (adaptive replication): it settled on that provider's result
    /// alone, and its payment waits for another provider to continue from
    /// it, as under a continuation check.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unreplicated: bool,
    /// A partial segment: its provider was preempted by its machine's
    /// owner after this many milliseconds of the lot's time (the broker's
    /// measure: the run time the provider reports, never more than the
    /// time since the award). It counts as progress, not as one of the
    /// job's segments: the next lot runs the rest of the segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_ms: Option<u64>,
}

/// The lot a running job has out now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenLot {
    pub lot: Lot,
    /// Providers awarded this attempt, with their prices; empty while bidding.
    pub awarded: Vec<(ProviderId, Money)>,
    pub award_deadline: Option<DateTime<Utc>>,
    /// When the awards went out: no honest result of a running guest
    /// arrives before this plus the segment's length.
    #[serde(default)]
    pub awarded_at: Option<DateTime<Utc>>,
    /// Under a quorum check: the next bidders of the auction, in its order
    /// and at their own prices, awarded one by one when the replicas
    /// disagree.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub standby: Vec<(ProviderId, Money)>,
    /// Under a quorum check: awarded to one trusted provider only, chosen
    /// at random by adaptive replication; it settles on that provider's
    /// first valid result. The provider is not told.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unreplicated: bool,
}

/// A job's durable record (the broker's KV value) and what `status` returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobStatus {
    pub version: u32,
    pub job: JobId,
    pub spec: JobSpec,
    pub state: JobState,
    /// Where the next segment starts.
    pub checkpoint: Checkpoint,
    pub settled: Vec<SettledSegment>,
    pub open_lot: Option<OpenLot>,
    /// Attempts offered so far for the current segment.
    pub attempts: u32,
    /// True when the last offer drew no bid: the job waits for providers.
    pub waiting_for_providers: bool,
    /// Providers whose result for this job was refused: never awarded
    /// one of its lots again.
    #[serde(default)]
    pub refused: Vec<ProviderId>,
    /// Providers that reported that the job's current checkpoint does not
    /// restore (cleared whenever the checkpoint changes): not awarded it
    /// again; enough of them void the payment that produced it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restore_failures: Vec<ProviderId>,
    /// The check restore of the last checkpoint ([`Lot::check`]), once a
    /// result of it was accepted and paid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<SettledSegment>,
    /// Set by `stop`: the job runs no segment from this one on (the one
    /// running when it was asked still settles), then ends done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_after: Option<u32>,
    pub spent: Money,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Why the job ended, for people.
    pub end_reason: Option<String>,
    /// True once the job has ended and what was left in its escrow went
    /// back to the submitter.
    #[serde(default)]
    pub refunded: bool,
}

impl JobStatus {
    /// A job as its submission leaves it: running from `checkpoint` (its
    /// disks; no machine state yet), nothing spent, settled or refused.
    pub fn submitted(job: JobId, spec: JobSpec, checkpoint: Checkpoint, now: DateTime<Utc>) -> Self {
        JobStatus {
            version: crate::WIRE_VERSION,
            job,
            spent: Money::new(rust_decimal::Decimal::ZERO, spec.budget.unit.clone()),
            checkpoint,
            spec,
            state: JobState::Running,
            settled: Vec::new(),
            open_lot: None,
            attempts: 0,
            waiting_for_providers: false,
            created_at: now,
            updated_at: now,
            end_reason: None,
            refunded: false,
            refused: Vec::new(),
            restore_failures: Vec::new(),
            check: None,
            stop_after: None,
        }
    }

    /// Every payment the job made: its settled segments, then its check
    /// restore.
    pub fn payments(&self) -> impl Iterator<Item = &SettledSegment> {
        self.settled.iter().chain(self.check.as_ref())
    }

    /// The job's segments that ran their whole length. A partial segment
    /// (preempted by its provider's owner) is progress but not one of the
    /// job's segments: the lot after it runs the rest of the segment.
    pub fn full_segments(&self) -> u32 {
        self.settled.iter().filter(|s| s.partial_ms.is_none()).count() as u32
    }

    /// The milliseconds of the current segment that partial segments ran
    /// already (those since the last full one).
    pub fn partial_ms(&self) -> u64 {
        self.settled.iter().rev().map_while(|s| s.partial_ms).sum()
    }
}

/// Request naming one job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRef {
    pub version: u32,
    pub job: JobId,
}

/// Reply to a submission.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Submitted {
    pub job: JobId,
}

/// What the market looks like now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MarketView {
    pub open_lots: Vec<OpenLot>,
    pub running_jobs: u32,
    pub providers: Vec<Heartbeat>,
}

/// What the broker sends on a provider's award subject, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ToProvider {
    Award(Box<Award>),
    Cancel(CancelAttempt),
}

#[cfg(test)]
mod invite_tests {
    use super::*;

    fn lot(shards: Option<Vec<u16>>) -> Lot {
        Lot {
            version: 1,
            lot: LotId::new(),
            job: JobId::new(),
            segment: 0,
            attempt: 1,
            image: Image {
                vm: VmConfig {
                    hypervisor: HypervisorKind::Synthetic,
                    arch: "x86_64".into(),
                    memory_mib: 16,
                    vcpus: 1,
                    cmdline: String::new(),
                },
                kernel: ManifestId::of(crate::HashAlgorithm::Sha256, b"k"),
                initrd: None,
                disks: vec![],
            },
            checkpoint: Checkpoint {
                machine_state: None,
                disks: vec![],
                stored_bytes: 0,
                memory: None,
            },
            segment_seconds: 0,
            reserve_price: Money::new(rust_decimal::Decimal::ONE, "CRD"),
            bid_deadline: Utc::now(),
            shards,
            invited: vec![],
            check: false,
            instructions: None,
        }
    }

    #[test]
    fn invites_the_providers_of_its_shards_and_those_named() {
        let providers: Vec<ProviderId> = (0..6400).map(|_| ProviderId::new()).collect();
        let all = lot(None);
        assert!(providers.iter().all(|p| all.invites(p)));
        let mut some = lot(Some((0..8).collect()));
        let n = providers.iter().filter(|p| some.invites(p)).count();
        assert!((600..1000).contains(&n), "{n} of 6400 invited by 8 of 64 shards");
        let outsider = *providers
            .iter()
            .find(|p| shard_of(p) >= 8)
            .expect("a provider outside the shards");
        assert!(!some.invites(&outsider));
        some.invited.push(outsider);
        assert!(some.invites(&outsider));
    }
}
