//! The synthetic book the ledger benchmark reads: credits, holds,
//! settlements with their details, posts, refunds, the job records beside
//! them, and the providers' deposits: each provider puts 1 CRD of its
//! earnings in as soon as it has them (and tops the deposit up again
//! after a forfeit or a release), a few take part of it back, and a few
//! forfeit part of it, of each cause, where the job records and the books
//! prove the cheating: a quorum job's minority result (the provider among
//! the job's `refused`), or a checkpoint that did not restore (the
//! provider's payment voided, the segment run again as the next attempt).
//!
//! Every record is built exactly as `Books::record` builds it, so the book
//! verifies clean.

use std::collections::HashMap;

use anyhow::{Context, Result};
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::FuturesUnordered;
use futures::{StreamExt, TryStreamExt};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use rust_decimal::Decimal;
use vmlot_schemas::ledger::{Account, Settlement, Transaction, TxKind};
use vmlot_schemas::market::{
    Checkpoint, GuestState, Image, JobSpec, JobState, JobStatus, ResultCheck, SegmentCount, SegmentResult,
    SegmentTimings, SettledSegment,
};
use vmlot_schemas::{
    HypervisorKind, JobId, LotId, ManifestId, Money, ProviderId, VmConfig, WIRE_VERSION, subjects,
};

use super::{Args, FEE_RATE, UNIT};

mod deposits;

use deposits::Owed;

/// One job in this many checks its results by quorum (three replicas).
const QUORUM_ONE_IN: u64 = 8;

/// The book's random choices, from a seeded generator: the same book every run.
struct Dice(StdRng);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0.gen_range(0..n)
    }

    fn uuid(&mut self) -> uuid::Uuid {
        let mut bytes = [0u8; 16];
        self.0.fill_bytes(&mut bytes);
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }

    fn manifest(&mut self) -> ManifestId {
        ManifestId::of(
            vmlot_schemas::HashAlgorithm::Sha256,
            &self.0.next_u64().to_le_bytes(),
        )
    }
}

/// A job being written: its record, and what is left to write.
struct Running {
    status: JobStatus,
    segments: u32,
    price: Decimal,
    held: bool,
    /// The last settlement, pending until the next one (or the refund) posts it.
    pending: Option<Settlement>,
    /// The attempt the next settlement is for, after one was voided.
    retry: Option<u32>,
}

/// What the fill wrote.
#[derive(Default)]
pub(super) struct Fill {
    pub records: u64,
    pub transactions: u64,
    /// Transactions per kind, in the order of [`TxKind::ALL`].
    pub by_kind: [u64; TxKind::ALL.len()],
    /// Forfeits per cause: minority, unrestorable.
    pub minority: u64,
    pub unrestorable: u64,
    pub began: DateTime<Utc>,
    /// When the last tenth of the records began.
    pub window_start: DateTime<Utc>,
}

impl Fill {
    pub fn of(&self, kind: TxKind) -> u64 {
        self.by_kind[TxKind::ALL.iter().position(|k| *k == kind).expect("a kind")]
    }
}

/// The book being written, with the running balance of every posting subject.
pub(super) struct Book {
    rng: Dice,
    pub users: Vec<String>,
    providers: Vec<ProviderId>,
    pub balances: HashMap<String, Decimal>,
    settlements_of: HashMap<ProviderId, u64>,
    pub jobs: Vec<JobStatus>,
    image: Image,
    owed: Owed,
}

impl Book {
    pub fn new(args: &Args) -> Self {
        let mut rng = Dice(StdRng::seed_from_u64(0x9e37_79b9_7f4a_7c15));
        let providers = (0..args.providers).map(|_| ProviderId(rng.uuid())).collect();
        let image = Image {
            vm: VmConfig {
                hypervisor: HypervisorKind::Qemu,
                arch: "x86_64".into(),
                memory_mib: 128,
                vcpus: 1,
                cmdline: "console=ttyS0 quiet loglevel=1 panic=-1".into(),
            },
            kernel: rng.manifest(),
            initrd: Some(rng.manifest()),
            disks: vec![],
        };
        // About 8 ledger messages per settlement (its own 3, a post's 4,
        // a share of holds, refunds and credits).
        let settlements = (args.records / 8).max(1);
        Self {
            users: (0..args.users).map(|i| format!("u{i:04}")).collect(),
            providers,
            balances: HashMap::new(),
            settlements_of: HashMap::new(),
            jobs: Vec::new(),
            image,
            rng,
            owed: Owed::every((settlements / args.forfeits.max(1)).max(1)),
        }
    }

    pub fn balance(&self, account: &Account) -> Decimal {
        self.balances
            .get(&subjects::posting(account, UNIT))
            .copied()
            .unwrap_or_default()
    }

    pub fn busiest_provider(&self) -> ProviderId {
        self.settlements_of
            .iter()
            .max_by_key(|(p, n)| (**n, **p))
            .map(|(p, _)| *p)
            .unwrap_or(self.providers[0])
    }

    /// The messages `Books::record` writes for `tx` on `subject`: the
    /// transaction, then one posting per entry carrying the balance it leaves.
    fn record(&mut self, subject: String, tx: &Transaction) -> Vec<(String, Bytes)> {
        assert!(tx.malformed().is_none(), "{subject}: {:?}", tx.malformed());
        let mut out = Vec::with_capacity(tx.entries.len() + 1);
        out.push((
            subject,
            Bytes::from(serde_json::to_vec(tx).expect("transaction serializes")),
        ));
        for entry in &tx.entries {
            let posting_subject = subjects::posting(&entry.account, &tx.unit);
            let balance = self.balances.entry(posting_subject.clone()).or_default();
            let after = *balance + entry.signed();
            assert!(
                !(after.is_sign_negative() && !after.is_zero() && !entry.account.may_go_negative()),
                "{} below zero",
                entry.account
            );
            *balance = after;
            let posting = vmlot_ledger::build::posting(tx, entry, after);
            out.push((
                posting_subject,
                serde_json::to_vec(&posting).expect("posting serializes").into(),
            ));
        }
        out
    }

    fn credit(&mut self, user: &str, amount: Decimal) -> Vec<(String, Bytes)> {
        let request = self.rng.uuid();
        let (subject, tx) = vmlot_ledger::build::credit(
            &request,
            &Account::User(user.to_string()),
            &Money::new(amount, UNIT),
            "bench top-up",
        );
        self.record(subject, &tx)
    }

    fn new_job(&mut self) -> Running {
        let user = self.users[self.rng.below(self.users.len() as u64) as usize].clone();
        let segments = 1 + self.rng.below(15) as u32;
        let price = Decimal::new(10 + self.rng.below(51) as i64, 2);
        let quorum = self.rng.below(QUORUM_ONE_IN) == 0;
        let now = Utc::now();
        let spec = JobSpec {
            image: self.image.clone(),
            segment_seconds: 60,
            segments: SegmentCount::Count(segments),
            redundancy: if quorum { 3 } else { 1 + self.rng.below(2) as u32 },
            check: if quorum {
                ResultCheck::Quorum
            } else {
                ResultCheck::Continuation
            },
            reserve_price: Money::new(Decimal::new(60, 2), UNIT),
            budget: Money::new(Decimal::from(10), UNIT),
            account: user,
        };
        Running {
            status: JobStatus::submitted(JobId(self.rng.uuid()), spec, start(), now),
            segments,
            price,
            held: false,
            pending: None,
            retry: None,
        }
    }

    /// A provider for the next attempt of `status`'s job, none it refused
    /// nor any of `besides`.
    fn provider_for(&mut self, status: &JobStatus, besides: &[ProviderId]) -> ProviderId {
        loop {
            let p = self.providers[self.rng.below(self.providers.len() as u64) as usize];
            let taken = status.refused.contains(&p) || besides.contains(&p);
            if !taken || self.providers.len() <= status.refused.len() + besides.len() {
                return p;
            }
        }
    }

    /// `tx` on `subject` written to `out`, its kind to `kinds`.
    fn write(
        &mut self,
        (subject, tx): (String, Transaction),
        out: &mut Vec<(String, Bytes)>,
        kinds: &mut Vec<TxKind>,
    ) {
        out.extend(self.record(subject, &tx));
        kinds.push(tx.kind);
    }

    /// The next transactions of `job`, as the broker writes them: its hold
    /// (after a top-up credit if its user is short); a settlement, with
    /// the post of the one before (whose checkpoint it continued from) or
    /// its void; or the last post and the refund (then `true`: the job
    /// has ended). Deposits, releases and forfeits come along where owed
    /// and allowed.
    fn step(&mut self, job: &mut Running, out: &mut Vec<(String, Bytes)>) -> (Vec<TxKind>, bool) {
        let mut kinds = Vec::new();
        let id = job.status.job;
        let user = Account::User(job.status.spec.account.clone());
        if !job.held {
            job.held = true;
            let budget = job.status.spec.budget.amount;
            if self.balance(&user) < budget {
                out.extend(self.credit(&job.status.spec.account, Decimal::from(500)));
                kinds.push(TxKind::Credit);
            }
            let status = &job.status;
            self.write(
                vmlot_ledger::build::hold(id, &status.spec.account, &status.spec.budget),
                out,
                &mut kinds,
            );
            return (kinds, false);
        }
        let segment = job.status.settled.len() as u32;
        if segment < job.segments {
            // A checkpoint owed to fail: the payment that made it is voided
            // instead of posted.
            if self.maybe_unrestorable(job, out, &mut kinds) {
                return (kinds, false);
            }
            self.settle(job, segment, out, &mut kinds);
            self.maybe_release(out, &mut kinds);
            return (kinds, false);
        }
        if let Some(last) = job.pending.take() {
            self.post(&last, out, &mut kinds);
            job.status.settled[last.segment as usize].posted = true;
        }
        // As `Books::refund` does: whatever the escrow holds.
        let left = self.balance(&Account::Escrow(id));
        self.write(
            vmlot_ledger::build::refund(id, &job.status.spec.account, UNIT, left),
            out,
            &mut kinds,
        );
        let status = &mut job.status;
        status.state = JobState::Done;
        status.end_reason = Some("the guest halted".into());
        status.refunded = true;
        status.updated_at = Utc::now();
        (kinds, true)
    }

    /// Settles `segment` of `job`: the settlement, the post of the one
    /// before, and (under a quorum, where owed) a minority replica refused
    /// and its deposit forfeited.
    fn settle(
        &mut self,
        job: &mut Running,
        segment: u32,
        out: &mut Vec<(String, Bytes)>,
        kinds: &mut Vec<TxKind>,
    ) {
        self.owed.settled();
        let id = job.status.job;
        let provider = self.provider_for(&job.status, &[]);
        *self.settlements_of.entry(provider).or_default() += 1;
        let lot = LotId(self.rng.uuid());
        let attempt = job.retry.take().unwrap_or_else(|| self.rng.below(3) as u32);
        let last = segment + 1 == job.segments;
        let guest = if last {
            GuestState::Halted { final_state: None }
        } else {
            GuestState::Running {
                checkpoint: Checkpoint {
                    machine_state: Some(self.rng.manifest()),
                    disks: vec![self.rng.manifest()],
                    stored_bytes: (20 << 20) + self.rng.below(1 << 20),
                    memory: None,
                },
            }
        };
        let timings = SegmentTimings {
            fetch_ms: self.rng.below(2000),
            start_ms: 40 + self.rng.below(100),
            run_ms: 60_000,
            save_ms: 500 + self.rng.below(300),
            upload_ms: self.rng.below(1500),
            suspended_ms: 0,
        };
        let now = Utc::now();
        let result = SegmentResult {
            version: WIRE_VERSION,
            lot,
            job: id,
            segment,
            attempt,
            provider,
            guest: guest.clone(),
            console: Some(self.rng.manifest()),
            timings,
            fetched_bytes: self.rng.below(20 << 20),
            sent_bytes: self.rng.below(4 << 20),
            finished_at: now,
            preempted: false,
        };
        let payment = Settlement {
            job: id,
            segment,
            lot,
            attempt,
            provider,
            payer: job.status.spec.account.clone(),
            amount: Money::new(job.price, UNIT),
            at: now,
            guest: result.guest.clone(),
            console: result.console,
            timings: result.timings,
            fetched_bytes: result.fetched_bytes,
            sent_bytes: result.sent_bytes,
            finished_at: result.finished_at,
            partial_ms: None,
        };
        self.write(vmlot_ledger::build::settlement(payment.clone()), out, kinds);
        if let Some(before) = job.pending.replace(payment) {
            self.post(&before, out, kinds);
            job.status.settled[before.segment as usize].posted = true;
        }
        let mut awarded = vec![provider];
        for _ in 1..job.status.spec.redundancy {
            let other = self.provider_for(&job.status, &awarded);
            awarded.push(other);
        }
        self.maybe_minority(job, segment, attempt, &awarded, out, kinds);
        let status = &mut job.status;
        status.settled.push(SettledSegment {
            segment,
            attempt,
            lot,
            provider,
            awarded,
            price: Money::new(job.price, UNIT),
            guest: result.guest,
            console: result.console,
            timings,
            fetched_bytes: result.fetched_bytes,
            sent_bytes: result.sent_bytes,
            settled_at: now,
            finished_at: Some(result.finished_at),
            posted: false,
            unreplicated: false,
            partial_ms: None,
        });
        status.spent.amount += job.price;
        status.attempts = 0;
        status.updated_at = now;
        if let GuestState::Running { checkpoint } = &status.settled[segment as usize].guest {
            status.checkpoint = checkpoint.clone();
        }
    }

    /// Writes the book: every user funded, then jobs `concurrent_jobs` at a
    /// time, one transaction of a random running job after another, until
    /// `records` messages; the jobs still running then stay running. Then
    /// every job's record.
    pub async fn fill(&mut self, js: &jetstream::Context, jobs: &kv::Store, args: &Args) -> Result<Fill> {
        let mut fill = Fill {
            began: Utc::now(),
            window_start: Utc::now(),
            ..Default::default()
        };
        let mut acks = FuturesUnordered::new();
        let mut out = Vec::new();
        let users = self.users.clone();
        let mut active: Vec<Running> = Vec::new();
        let mut user_iter = users.iter();
        let window_at = args.records - args.records / 10;
        let mut window_set = false;
        while fill.records < args.records {
            let kinds = if let Some(user) = user_iter.next() {
                out.extend(self.credit(user, Decimal::from(200)));
                vec![TxKind::Credit]
            } else {
                while active.len() < args.concurrent_jobs {
                    let job = self.new_job();
                    active.push(job);
                }
                let i = self.rng.below(active.len() as u64) as usize;
                let mut job = active.swap_remove(i);
                let (kinds, ended) = self.step(&mut job, &mut out);
                if ended {
                    self.jobs.push(job.status);
                } else {
                    active.push(job);
                }
                kinds
            };
            for kind in &kinds {
                fill.by_kind[TxKind::ALL.iter().position(|k| k == kind).expect("a kind")] += 1;
                fill.transactions += 1;
            }
            fill.records += out.len() as u64;
            if !window_set && fill.records >= window_at {
                window_set = true;
                while let Some(ack) = acks.next().await {
                    ack?;
                }
                if args.recent_pause_s > 0 {
                    println!(
                        "{} records written; pausing {} s before the last tenth",
                        fill.records, args.recent_pause_s
                    );
                    tokio::time::sleep(std::time::Duration::from_secs(args.recent_pause_s)).await;
                }
                fill.window_start = Utc::now();
            }
            for (subject, payload) in out.drain(..) {
                acks.push(js.publish(subject, payload).await?.into_future());
                while acks.len() >= args.in_flight {
                    acks.next().await.context("ack")??;
                }
            }
        }
        // Jobs still running: budget held, some segments paid, no refund.
        for job in active {
            if job.held {
                self.jobs.push(job.status);
            }
        }
        while let Some(ack) = acks.next().await {
            ack?;
        }
        for status in &self.jobs {
            fill.minority += status.refused.len() as u64;
        }
        fill.unrestorable = fill.of(TxKind::Forfeit) - fill.minority;
        futures::stream::iter(&self.jobs)
            .map(|status| async move {
                let payload = serde_json::to_vec(status)?;
                jobs.put(status.job.to_string(), payload.into()).await?;
                anyhow::Ok(())
            })
            .buffer_unordered(args.in_flight)
            .try_collect::<()>()
            .await?;
        Ok(fill)
    }
}

/// Where a job starts: no checkpoint yet.
fn start() -> Checkpoint {
    Checkpoint {
        machine_state: None,
        disks: vec![],
        stored_bytes: 20 << 20,
        memory: None,
    }
}
