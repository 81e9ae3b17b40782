//! A dishonest provider, for the tests of checkable results: it holds its
//! own valid provider credentials, sends heartbeats, bids the lowest price
//! on the lots of the jobs it is told to cheat, takes their awards, and
//! answers each with a lie instead of running anything (one lie per job).
//! It runs no hypervisor; what it stores in the block store is crafted.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use futures::StreamExt;
use rust_decimal::Decimal;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vmlot_cas::synthetic::SyntheticHeader;
use vmlot_cas::{BlockStore, StoreOptions};
use vmlot_schemas::caller::{Caller, Role};
use vmlot_schemas::market::{
    Award, Bid, Checkpoint, GuestState, Heartbeat, Lot, Reply, SegmentResult, ToProvider,
};
use vmlot_schemas::{
    Chunking, HypervisorKind, JobId, ManifestId, Money, ObjectKind, ProviderId, WIRE_VERSION, subjects,
};

use crate::NatsServer;

/// What the cheat answers an award of a job with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lie {
    /// Names the image's kernel as the new machine state.
    KernelAsState,
    /// Hands the segment's input checkpoint back (bids from segment 1 on,
    /// where there is one).
    InputUnchanged,
    /// Claims the guest halted, at once, with nothing to show.
    HaltedAtOnce,
    /// A state that looks run (the right segment count) but for twice the
    /// lot's memory, sent after the segment's length.
    OtherMemorySize,
    /// A state of the right kind, sent as soon as the award comes.
    TooEarly,
    /// As [`Lie::TooEarly`], stored before the award is even answered: the
    /// broker must take a result that comes before its award's reply.
    BeforeTheReply,
    /// A state of the right kind and size, sent after the segment's
    /// length, that passes every check on its own but does not restore
    /// (its data is not what its header says).
    Unrestorable,
    /// A state of the right kind and size, sent after the segment's
    /// length, that passes every check and restores, but is not what the
    /// segment computes (under a quorum check, the minority).
    Forged,
    /// A state of the right kind that restores, sent a second after the
    /// award as a partial segment (its owner "preempted" it) that claims
    /// to have run for an hour.
    Preempted,
}

/// The run time a [`Lie::Preempted`] claims.
pub const PREEMPTED_CLAIM_MS: u64 = 3_600_000;

/// The lie owed to each job, and the only segment it is told on (any, if None).
type Targets = Arc<Mutex<HashMap<JobId, (Lie, Option<u32>)>>>;

/// The cheat's price: below any honest provider's.
const PRICE: &str = "0.01";

/// How many lots the cheat keeps that it did not bid on, in case a test
/// names their job just after the broker offered them.
const KEPT_LOTS: usize = 64;

/// A running dishonest provider; stopped on drop.
pub struct Cheat {
    pub id: ProviderId,
    targets: Targets,
    retarget: Arc<Notify>,
    told: Arc<Mutex<Vec<(JobId, Lie)>>>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Cheat {
    /// Connects as provider `id` (its own credentials) and starts cheating
    /// on the jobs it is later told to.
    pub async fn start(server: &NatsServer) -> Result<Cheat> {
        let id = ProviderId::new();
        let client = server.client_as(Role::Provider, &id.to_string()).await?;
        let options = StoreOptions {
            writer: Caller::new(Role::Provider, id.to_string()),
            ..StoreOptions::default()
        };
        let store = BlockStore::join(client.clone(), options, Some(Duration::from_secs(30))).await?;
        let dir = tempfile::tempdir()?;
        let (targets, told) = (Arc::default(), Arc::default());
        let stop = CancellationToken::new();
        let retarget = Arc::new(Notify::new());
        let cheat = Run {
            id,
            client,
            store,
            dir: dir.path().to_path_buf(),
            targets: Arc::clone(&targets),
            retarget: Arc::clone(&retarget),
            passed: Mutex::default(),
            told: Arc::clone(&told),
            stop: stop.clone(),
        };
        let mut lots = futures::stream::select_all(Vec::new());
        for subject in [
            subjects::lot(HypervisorKind::Synthetic, "x86_64"),
            subjects::lot_shard(HypervisorKind::Synthetic, "x86_64", subjects::shard_of(&id)),
            subjects::lot_for(HypervisorKind::Synthetic, "x86_64", &id),
        ] {
            lots.push(cheat.client.subscribe(subject).await?);
        }
        let awards = cheat.client.subscribe(subjects::award(&id)).await?;
        let task = tokio::spawn(async move {
            let _dir = dir;
            cheat.run(lots, awards).await
        });
        Ok(Cheat {
            id,
            targets,
            retarget,
            told,
            stop,
            task: Some(task),
        })
    }

    /// From now on, answers an award of `job` with `lie` (once). A lot of
    /// the job offered before this call (the broker offers as soon as it
    /// accepts the job, before its submitter hears back) is bid on now.
    pub fn target(&self, job: JobId, lie: Lie) {
        self.targets.lock().unwrap().insert(job, (lie, None));
        self.retarget.notify_one();
    }

    /// From now on, answers the award of `segment` of `job` (not its
    /// check restore) with `lie` (once); a lot offered before the call is
    /// bid on now, as [`Cheat::target`] does.
    pub fn target_at(&self, job: JobId, lie: Lie, segment: u32) {
        self.targets.lock().unwrap().insert(job, (lie, Some(segment)));
        self.retarget.notify_one();
    }

    /// The lies told so far, by job.
    pub fn told(&self) -> Vec<(JobId, Lie)> {
        self.told.lock().unwrap().clone()
    }
}

impl Drop for Cheat {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The cheat's own task.
struct Run {
    id: ProviderId,
    client: async_nats::Client,
    store: BlockStore,
    dir: PathBuf,
    targets: Targets,
    /// Told when a job is named, to look again at the lots passed over.
    retarget: Arc<Notify>,
    /// The last [`KEPT_LOTS`] lots not bid on.
    passed: Mutex<VecDeque<Lot>>,
    told: Arc<Mutex<Vec<(JobId, Lie)>>>,
    stop: CancellationToken,
}

impl Run {
    async fn run(
        self,
        mut lots: futures::stream::SelectAll<async_nats::Subscriber>,
        mut awards: async_nats::Subscriber,
    ) {
        let me = Arc::new(self);
        let mut beat = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = me.stop.cancelled() => return,
                _ = beat.tick() => me.heartbeat().await,
                Some(msg) = lots.next() => {
                    if let Ok(lot) = serde_json::from_slice::<Lot>(&msg.payload) {
                        if me.lie_for(&lot).is_some() {
                            me.bid(&lot).await;
                        } else {
                            let mut passed = me.passed.lock().unwrap();
                            if passed.len() == KEPT_LOTS {
                                passed.pop_front();
                            }
                            passed.push_back(lot);
                        }
                    }
                }
                _ = me.retarget.notified() => {
                    let now = {
                        let mut passed = me.passed.lock().unwrap();
                        let (now, later): (VecDeque<Lot>, VecDeque<Lot>) = std::mem::take(&mut *passed)
                            .into_iter()
                            .partition(|lot| me.lie_for(lot).is_some());
                        *passed = later;
                        now
                    };
                    for lot in &now {
                        me.bid(lot).await;
                    }
                }
                Some(msg) = awards.next() => {
                    let mut award = match serde_json::from_slice(&msg.payload) {
                        Ok(ToProvider::Award(award)) => Some(award),
                        _ => None,
                    };
                    if let Some(first) = award.take_if(|a| me.lie_for(&a.lot) == Some(Lie::BeforeTheReply)) {
                        me.lie(*first).await;
                    }
                    if let Some(reply) = msg.reply.clone() {
                        let ok = serde_json::to_vec(&Reply::Ok(())).unwrap();
                        let _ = me.client.publish(reply, ok.into()).await;
                    }
                    if let Some(award) = award {
                        let me = Arc::clone(&me);
                        tokio::spawn(async move { me.lie(*award).await });
                    }
                }
            }
        }
    }

    async fn heartbeat(&self) {
        let hb = Heartbeat {
            version: WIRE_VERSION,
            provider: self.id,
            name: "cheat".into(),
            hypervisors: vec![HypervisorKind::Synthetic],
            arch: "x86_64".into(),
            memory_mib: 4096,
            slots: 8,
            free_slots: 8,
            idle: true,
            sent_at: chrono::Utc::now(),
        };
        let body = serde_json::to_vec(&hb).unwrap();
        let _ = self
            .client
            .publish(subjects::heartbeat(&self.id), body.into())
            .await;
    }

    /// The lie this lot would get, if the cheat still owes its job one.
    fn lie_for(&self, lot: &Lot) -> Option<Lie> {
        let (lie, at) = *self.targets.lock().unwrap().get(&lot.job)?;
        if at.is_some_and(|segment| lot.check || lot.segment != segment) {
            return None;
        }
        let told = self.told.lock().unwrap().iter().any(|(j, _)| *j == lot.job);
        let fits = lie != Lie::InputUnchanged || lot.checkpoint.machine_state.is_some();
        (!told && fits).then_some(lie)
    }

    async fn bid(&self, lot: &Lot) {
        if self.lie_for(lot).is_none() {
            return;
        }
        let bid = Bid {
            version: WIRE_VERSION,
            lot: lot.lot,
            provider: self.id,
            price: Money::new(Decimal::from_str(PRICE).unwrap(), lot.reserve_price.unit.clone()),
            hot_bytes: lot.checkpoint.stored_bytes,
            slots: 8,
            sent_at: chrono::Utc::now(),
        };
        let body = serde_json::to_vec(&bid).unwrap();
        let _ = self
            .client
            .publish(
                subjects::bid(&self.id, subjects::partition_of(&lot.job)),
                body.into(),
            )
            .await;
    }

    async fn lie(&self, award: Award) {
        let lot = award.lot;
        let Some(lie) = self.lie_for(&lot) else { return };
        self.told.lock().unwrap().push((lot.job, lie));
        let after_the_segment = Duration::from_secs(lot.segment_seconds as u64 + 1);
        let guest = match lie {
            Lie::KernelAsState => {
                tokio::time::sleep(after_the_segment).await;
                running(Checkpoint {
                    machine_state: Some(lot.image.kernel),
                    disks: lot.checkpoint.disks.clone(),
                    stored_bytes: lot.checkpoint.stored_bytes,
                    memory: None,
                })
            }
            Lie::InputUnchanged => {
                tokio::time::sleep(after_the_segment).await;
                running(lot.checkpoint.clone())
            }
            Lie::HaltedAtOnce => GuestState::Halted { final_state: None },
            Lie::OtherMemorySize => {
                let state = self.crafted_state(&lot, 2).await;
                tokio::time::sleep(after_the_segment).await;
                running(state)
            }
            Lie::TooEarly | Lie::BeforeTheReply => running(self.crafted_state(&lot, 1).await),
            Lie::Forged => {
                let state = self.crafted_state_restoring(&lot).await;
                tokio::time::sleep(after_the_segment).await;
                running(state)
            }
            Lie::Unrestorable => {
                let state = self.crafted_state(&lot, 1).await;
                tokio::time::sleep(after_the_segment).await;
                running(state)
            }
            Lie::Preempted => {
                let state = self.crafted_state_restoring(&lot).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                running(state)
            }
        };
        let result = SegmentResult {
            version: WIRE_VERSION,
            lot: lot.lot,
            job: lot.job,
            segment: lot.segment,
            attempt: lot.attempt,
            provider: self.id,
            guest,
            console: None,
            timings: vmlot_schemas::market::SegmentTimings {
                run_ms: if lie == Lie::Preempted {
                    PREEMPTED_CLAIM_MS
                } else {
                    0
                },
                ..Default::default()
            },
            fetched_bytes: 0,
            sent_bytes: 0,
            finished_at: chrono::Utc::now(),
            preempted: lie == Lie::Preempted,
        };
        let body = serde_json::to_vec(&result).unwrap();
        let js = async_nats::jetstream::new(self.client.clone());
        if let Ok(ack) = js
            .publish(
                subjects::result(&self.id, subjects::partition_of(&result.job)),
                body.into(),
            )
            .await
        {
            let _ = ack.await;
        }
    }

    /// A synthetic state that says it ran the lot's segment, `times` the
    /// size the lot's machine has, stored for real; its checkpoint. Its
    /// data is zeros, not what its header's digest says.
    async fn crafted_state(&self, lot: &Lot, times: u32) -> Checkpoint {
        self.crafted(lot, times, false).await
    }

    /// A synthetic state of the lot's size that says it ran the lot's
    /// segment and restores (its data matches its digest), but holds
    /// made-up data.
    async fn crafted_state_restoring(&self, lot: &Lot) -> Checkpoint {
        self.crafted(lot, 1, true).await
    }

    async fn crafted(&self, lot: &Lot, times: u32, restores: bool) -> Checkpoint {
        let asked = lot
            .image
            .vm
            .cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix("synthetic.state_kib="))
            .and_then(|k| k.parse::<u32>().ok())
            .unwrap_or(lot.image.vm.memory_mib * 1024);
        let state_kib = asked * times;
        let header_block = vmlot_cas::synthetic::HEADER_BLOCK;
        let fill = if restores { 0xc4 } else { 0 };
        let data = vec![fill; state_kib as usize * 1024 - header_block];
        let digest = if restores {
            use sha1::Digest as _;
            sha1::Sha1::digest(&data).into()
        } else {
            [0xc4; 20]
        };
        let mut bytes = SyntheticHeader {
            seed: 0,
            counter: u64::from(lot.segment) + 1,
            digest: [0xc4; 20],
            state_kib,
            data: digest,
        }
        .encode();
        bytes.extend_from_slice(&data);
        let path = self.dir.join(format!("{}-{}-{restores}", lot.lot, times));
        std::fs::write(&path, &bytes).unwrap();
        let pushed = vmlot_cas::push_file(
            &self.store,
            None,
            &path,
            ObjectKind::MachineState,
            Chunking::FIXED_4K,
            &HashSet::new(),
        )
        .await
        .unwrap();
        let disks: u64 = {
            let mut total = 0;
            for id in &lot.checkpoint.disks {
                total += stored_bytes(&self.store, id).await;
            }
            total
        };
        Checkpoint {
            machine_state: Some(pushed.manifest_id),
            disks: lot.checkpoint.disks.clone(),
            stored_bytes: pushed.manifest.stored_bytes() + disks,
            memory: None,
        }
    }
}

async fn stored_bytes(store: &BlockStore, id: &ManifestId) -> u64 {
    store
        .get_manifest(id)
        .await
        .map(|m| m.stored_bytes())
        .unwrap_or(0)
}

fn running(checkpoint: Checkpoint) -> GuestState {
    GuestState::Running { checkpoint }
}
