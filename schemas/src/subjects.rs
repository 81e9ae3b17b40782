//! The NATS subject map. Every subject and stream name is built here, never
//! by `format!` elsewhere, so the map in `docs/ARCHITECTURE.md` stays true.

use crate::caller::{Caller, Role};
use crate::ids::{BlockId, JobId, ManifestId, PackId, ProviderId};
use crate::vm::HypervisorKind;

/// Stream holding blocks: packs, and a pointer per block and writer.
pub const BLOCK_STREAM: &str = "VMLOT_BLOCKS";
/// Subjects of [`BLOCK_STREAM`] naming blocks, one per block and writer
/// ([`block`]): each holds the id of the pack the block is in (its 16
/// bytes, no header), or the block itself.
pub const BLOCK_SUBJECTS: &str = "vmlot.cas.block.*.*.*";
/// Subjects of [`BLOCK_STREAM`] holding packs: many blocks in one message.
pub const PACK_SUBJECTS: &str = "vmlot.cas.pack.*";
/// Stream holding manifests: canonical JSON cut into parts, one message per
/// part, written in one atomic batch and read with direct gets (no consumer
/// per read, unlike an object store).
pub const MANIFEST_STREAM: &str = "VMLOT_MANIFESTS";
/// Subjects of [`MANIFEST_STREAM`]: a manifest's id, its writer (role and
/// name), then the part.
pub const MANIFEST_SUBJECTS: &str = "vmlot.cas.manifest.*.*.*.*";
/// Header of a manifest's part 0: how many parts there are.
pub const MANIFEST_PARTS_HEADER: &str = "Vmlot-Manifest-Parts";
/// Header of a manifest's part 0: its whole size in bytes.
pub const MANIFEST_SIZE_HEADER: &str = "Vmlot-Manifest-Size";

// The store's names are the content's hashes, and whoever wrote first
// under a name would decide what it holds for everyone after: a stranger
// could take the name of a block or manifest an honest writer is about to
// store. So every block pointer and manifest record carries its writer
// (`<role>.<name>`, which the server fences: a user may publish only
// under its own), a writer trusts only its own and the house's (the
// broker role) to learn what is stored, and a reader tries every writer's
// and believes only what hashes to the name.

/// The writer token of a store subject: `<role>.<name>` (or a permission
/// template in place of the name).
pub fn writer_of(role: Role, name: &str) -> String {
    format!("{}.{name}", role.as_str())
}

/// The writer a store subject's `<role>.<name>` tokens name.
fn parse_writer(role: &str, name: &str) -> Option<Caller> {
    if !crate::caller::valid_name(name) {
        return None;
    }
    Some(Caller::new(role.parse().ok()?, name))
}

/// Part `part` of manifest `id`'s record as `writer` stored it.
pub fn manifest_part(id: &ManifestId, writer: &Caller, part: u32) -> String {
    format!(
        "vmlot.cas.manifest.{id}.{}.{part}",
        writer_of(writer.role, &writer.name)
    )
}
/// Part `part` of manifest `id`'s record, by any writer.
pub fn manifest_part_any(id: &ManifestId, part: u32) -> String {
    format!("vmlot.cas.manifest.{id}.*.*.{part}")
}
/// Part `part` of manifest `id`'s record, by the house.
pub fn manifest_part_house(id: &ManifestId, part: u32) -> String {
    format!("vmlot.cas.manifest.{id}.{}.*.{part}", Role::Broker.as_str())
}
/// Where the blocks of manifest `id` are stored, as `writer` left it:
/// which pack holds each (a hint; readers check every block anyway).
pub fn manifest_locations(id: &ManifestId, writer: &Caller) -> String {
    manifest_part_named(id, writer, "where")
}
/// Every writer's locations of manifest `id`.
pub fn manifest_locations_any(id: &ManifestId) -> String {
    format!("vmlot.cas.manifest.{id}.*.*.where")
}
fn manifest_part_named(id: &ManifestId, writer: &Caller, last: &str) -> String {
    format!(
        "vmlot.cas.manifest.{id}.{}.{last}",
        writer_of(writer.role, &writer.name)
    )
}
/// What a user of `role` named `name` (a template such as `{{name()}}`)
/// may write in the manifests' stream.
pub fn manifests_of(role: Role, name: &str) -> String {
    format!("vmlot.cas.manifest.*.{}.*", writer_of(role, name))
}
/// The writer of a manifest subject (part or locations).
pub fn manifest_writer(subject: &str) -> Option<Caller> {
    let rest = subject.strip_prefix("vmlot.cas.manifest.")?;
    let mut t = rest.split('.');
    let (_id, role, name, _last) = (t.next()?, t.next()?, t.next()?, t.next()?);
    if t.next().is_some() {
        return None;
    }
    parse_writer(role, name)
}

/// Header naming a block's stored encoding when stored whole (`zstd`;
/// absent: raw bytes, or a pointer to its pack).
pub const BLOCK_ENCODING_HEADER: &str = "Vmlot-Encoding";

/// Subject of block `id` as `writer` stored it (its pointer, or the block).
pub fn block(id: &BlockId, writer: &Caller) -> String {
    format!("vmlot.cas.block.{id}.{}", writer_of(writer.role, &writer.name))
}
/// Block `id` by any writer.
pub fn block_any(id: &BlockId) -> String {
    format!("vmlot.cas.block.{id}.>")
}
/// Block `id` by the house.
pub fn block_house(id: &BlockId) -> String {
    format!("vmlot.cas.block.{id}.{}.*", Role::Broker.as_str())
}
/// What a user of `role` named `name` (a template such as `{{name()}}`)
/// may write in the blocks' pointers.
pub fn blocks_of(role: Role, name: &str) -> String {
    format!("vmlot.cas.block.*.{}", writer_of(role, name))
}
/// The writer of a block subject.
pub fn block_writer(subject: &str) -> Option<Caller> {
    let rest = subject.strip_prefix("vmlot.cas.block.")?;
    let mut t = rest.split('.');
    let (_id, role, name) = (t.next()?, t.next()?, t.next()?);
    if t.next().is_some() {
        return None;
    }
    parse_writer(role, name)
}

/// Subject of one pack (its id is random: nobody can take it first).
pub fn pack(id: &PackId) -> String {
    format!("vmlot.cas.pack.{id}")
}

// The market. Scoped per provider wherever a provider publishes or
// receives, so NATS permissions can fence each provider to its own
// subjects: provider P may publish only `vmlot.bid.P.*`, `vmlot.result.P.*`,
// `vmlot.heartbeat.P` and subscribe only to `vmlot.lot.>` and
// `vmlot.award.P`. A bid's and a result's last token is the partition of
// the lot's job ([`partition_of`]): only the broker holding that
// partition listens there.

/// Prefix of the broker's job API (a NATS micro service named `vmlot-broker`);
/// a request's subject is `vmlot.api.<role>.<name>.<endpoint>`, naming its
/// caller, and each user may publish only under its own role and name.
pub const API_PREFIX: &str = "vmlot.api";
/// Name of the broker's micro service.
pub const API_SERVICE: &str = "vmlot-broker";

/// One endpoint of the job API, as `caller` sends it.
pub fn api(caller: &Caller, endpoint: &str) -> String {
    format!("{}.{endpoint}", api_of(caller.role, &caller.name))
}

/// Everything under which `role`'s user `name` (a literal, or a NATS
/// permission template such as `{{name()}}`) sends API requests; the
/// endpoint is the next token.
pub fn api_of(role: Role, name: &str) -> String {
    format!("{API_PREFIX}.{}.{name}", role.as_str())
}

/// What the broker's endpoint listens on, below [`API_PREFIX`]: the
/// endpoint's requests from every caller.
pub fn api_endpoint(endpoint: &str) -> String {
    format!("*.*.{endpoint}")
}

/// The caller an API request's subject names, if it is one.
pub fn api_caller(subject: &str) -> Option<Caller> {
    let rest = subject.strip_prefix(API_PREFIX)?.strip_prefix('.')?;
    let mut tokens = rest.split('.');
    let (role, name, _endpoint) = (tokens.next()?, tokens.next()?, tokens.next()?);
    if tokens.next().is_some() || !crate::caller::valid_name(name) {
        return None;
    }
    Some(Caller::new(role.parse().ok()?, name))
}

/// The inbox prefix of the user whose public key is `key` (a literal, or
/// the template `{{subject()}}`): replies to a user come only there, and
/// only it may subscribe there.
pub fn inbox_of(key: &str) -> String {
    format!("{INBOX_PREFIX}{key}")
}

/// Where every inbox lives; the broker answers requests only there.
pub const INBOX_PREFIX: &str = "_INBOX.";

/// JetStream API subjects a user may be granted on one stream.
pub mod js {
    /// A stream's configuration and state (also how a client opens it).
    pub fn stream_info(stream: &str) -> String {
        format!("$JS.API.STREAM.INFO.{stream}")
    }
    /// Direct gets on a stream: by sequence or batch (the bare subject) and
    /// by subject (the subject appended).
    pub fn direct_get(stream: &str) -> [String; 2] {
        [
            format!("$JS.API.DIRECT.GET.{stream}"),
            format!("$JS.API.DIRECT.GET.{stream}.>"),
        ]
    }
    /// Creating, reading and deleting consumers of a stream (reading it in order).
    pub fn consumers(stream: &str) -> [String; 5] {
        [
            format!("$JS.API.CONSUMER.CREATE.{stream}"),
            format!("$JS.API.CONSUMER.CREATE.{stream}.>"),
            format!("$JS.API.CONSUMER.INFO.{stream}.>"),
            format!("$JS.API.CONSUMER.DELETE.{stream}.>"),
            format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.>"),
        ]
    }
}

/// Stream of results: a result is durable once the provider has its ack.
pub const RESULT_STREAM: &str = "VMLOT_RESULTS";
pub const RESULT_SUBJECTS: &str = "vmlot.result.*.*";

/// The results of one partition's jobs, from any provider: what the
/// partition's durable consumer reads.
pub fn results_of_partition(partition: u16) -> String {
    format!("vmlot.result.*.{partition}")
}

/// The durable consumer of one partition's results, shared by whichever
/// broker holds the partition (a broker taking it over reads on where the
/// last one stopped).
pub fn results_consumer(partition: u16) -> String {
    format!("broker-p{partition}")
}
/// Stream of the books: transactions and the per-account postings that
/// index them (see [`crate::ledger`]).
pub const LEDGER_STREAM: &str = "VMLOT_LEDGER";
/// Where the books' exports (their streams' direct gets and info) are
/// imported into the market account: `vmlot.books.DIRECT.GET.<stream>`
/// answers as `$JS.API.DIRECT.GET.<stream>` does inside the books' account.
pub const BOOKS_API: &str = "vmlot.books";
pub const LEDGER_SUBJECTS: &str = "vmlot.ledger.>";
/// Every transaction.
pub const LEDGER_TX_ALL: &str = "vmlot.ledger.tx.>";
/// Every posting.
pub const LEDGER_POST_ALL: &str = "vmlot.ledger.post.>";

/// Whether NATS subject filter `filter` names `subject` (`*` one token,
/// `>` one or more at the end), as the server matches them.
pub fn filter_matches(filter: &str, subject: &str) -> bool {
    let (mut f, mut s) = (filter.split('.'), subject.split('.'));
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some(a), Some(b)) if a == "*" || a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// True when `subject` is a transaction's (under [`LEDGER_TX_ALL`]).
pub fn is_ledger_tx(subject: &str) -> bool {
    subject.starts_with("vmlot.ledger.tx.")
}

/// True when `subject` is a posting's (under [`LEDGER_POST_ALL`]).
pub fn is_ledger_posting(subject: &str) -> bool {
    subject.starts_with("vmlot.ledger.post.")
}
/// Key-value bucket of job records, keyed by job id.
pub const JOB_BUCKET: &str = "vmlot-jobs";
/// The stream under [`JOB_BUCKET`] (JetStream names a bucket's stream `KV_<bucket>`).
pub const JOB_BUCKET_STREAM: &str = "KV_vmlot-jobs";
/// Every job record's subject in [`JOB_BUCKET_STREAM`].
pub const JOB_BUCKET_SUBJECTS: &str = "$KV.vmlot-jobs.>";

/// The index of unsettled jobs (running, or ended with their escrow not
/// yet refunded): one empty message per job, beside the job records in
/// the books' account, so a broker reads the jobs in flight without
/// reading every job ever run.
pub const UNSETTLED_STREAM: &str = "VMLOT_UNSETTLED";
/// Every subject of [`UNSETTLED_STREAM`].
pub const UNSETTLED_SUBJECTS: &str = "vmlot.unsettled.>";
/// The entries of [`UNSETTLED_STREAM`], one per job.
pub const UNSETTLED_ENTRIES: &str = "vmlot.unsettled.*.*";
/// Written once the index holds every unsettled job of the records that
/// came before it (a bucket of job records older than the index).
pub const UNSETTLED_INDEXED: &str = "vmlot.unsettled.indexed";

/// The entries of partition `p` in [`UNSETTLED_STREAM`].
pub fn unsettled_of_partition(p: u16) -> String {
    format!("vmlot.unsettled.{p}.*")
}

/// `job`'s entry in [`UNSETTLED_STREAM`], under its partition.
pub fn unsettled_entry(job: &JobId) -> String {
    format!("vmlot.unsettled.{}.{job}", partition_of(job))
}

/// The job and partition of an entry of [`UNSETTLED_STREAM`]; none for
/// any other subject.
pub fn unsettled_job(subject: &str) -> Option<(u16, JobId)> {
    let mut tokens = subject.strip_prefix("vmlot.unsettled.")?.split('.');
    let (partition, job) = (tokens.next()?.parse().ok()?, tokens.next()?.parse().ok()?);
    (tokens.next().is_none() && partition_of(&job) == partition).then_some((partition, job))
}

/// Key-value bucket of providers' standing, keyed by provider id; only the
/// broker reaches it (it lives beside the job records).
pub const STANDING_BUCKET: &str = "vmlot-standing";

/// The subject of `provider`'s entry in [`STANDING_BUCKET`] (only the
/// broker may publish it: a provider writing its own standing is refused
/// by the server).
pub fn standing_entry(provider: &ProviderId) -> String {
    format!("$KV.{STANDING_BUCKET}.{provider}")
}

/// The one subject an attempt's settlement may be written to: the stream
/// refuses a second message there, so an attempt at a segment is paid at
/// most once (its replicas race for it). Another attempt at the same
/// segment is paid only after this one's payment was voided.
pub fn settlement_tx(job: &crate::ids::JobId, segment: u32, attempt: u32) -> String {
    format!("vmlot.ledger.tx.settlement.{job}.{segment}.{attempt}")
}

/// The one subject the post or the void of [`settlement_tx`]'s settlement
/// may be written to: it takes one message, so a settlement is resolved
/// once, one way.
pub fn resolve_tx(job: &crate::ids::JobId, segment: u32, attempt: u32) -> String {
    format!("vmlot.ledger.tx.resolve.{job}.{segment}.{attempt}")
}

/// The one subject a job's hold (budget into escrow) may be written to.
pub fn hold_tx(job: &crate::ids::JobId) -> String {
    format!("vmlot.ledger.tx.hold.{job}")
}

/// The one subject a job's refund (escrow back to the submitter) may be written to.
pub fn refund_tx(job: &crate::ids::JobId) -> String {
    format!("vmlot.ledger.tx.refund.{job}")
}

/// The one subject a credit request may be written to.
pub fn credit_tx(request: &uuid::Uuid) -> String {
    format!("vmlot.ledger.tx.credit.{request}")
}

/// The one subject a provider's deposit request may be written to: the
/// provider chooses the request id, and a retry with the same id deposits
/// once (as [`credit_tx`]).
pub fn deposit_tx(request: &uuid::Uuid) -> String {
    format!("vmlot.ledger.tx.deposit.{request}")
}

/// The one subject a provider's release request (its deposit back to its
/// earnings) may be written to; the same id releases once.
pub fn release_tx(request: &uuid::Uuid) -> String {
    format!("vmlot.ledger.tx.release.{request}")
}

/// The one subject the forfeit of `provider`'s deposit for its cheating
/// on an attempt at a segment may be written to: it takes one message, so
/// one proof takes from a deposit once.
pub fn forfeit_tx(job: &crate::ids::JobId, segment: u32, attempt: u32, provider: &ProviderId) -> String {
    format!("vmlot.ledger.tx.forfeit.{job}.{segment}.{attempt}.{provider}")
}

/// Every forfeit for one job: a token deeper than [`ledger_tx_job`]
/// reaches, so a reader of a job's transactions reads these as well.
pub fn forfeits_of_job(job: &crate::ids::JobId) -> String {
    format!("vmlot.ledger.tx.forfeit.{job}.>")
}

/// Every transaction of one kind.
pub fn ledger_tx_kind(kind: crate::ledger::TxKind) -> String {
    format!("vmlot.ledger.tx.{}.>", kind.subject_token())
}

/// Every transaction of one job (its hold, settlements, their posts and
/// voids, and its refund).
pub fn ledger_tx_job(job: &crate::ids::JobId) -> [String; 2] {
    [
        format!("vmlot.ledger.tx.*.{job}"),
        format!("vmlot.ledger.tx.*.{job}.*.*"),
    ]
}

/// Postings of one account in one unit: the last one holds its balance.
pub fn posting(account: &crate::ledger::Account, unit: &str) -> String {
    format!("vmlot.ledger.post.{}.{unit}", account.token())
}

/// Postings of one account, every unit.
pub fn postings_of(account: &crate::ledger::Account) -> String {
    format!("vmlot.ledger.post.{}.*", account.token())
}

/// Between brokers: "the record of this job (a [`crate::market::JobRef`])
/// changed outside its task; look again", sent to the broker holding the
/// job's partition by one that served a submission or a cancel for it.
pub fn broker_poke(partition: u16) -> String {
    format!("vmlot.broker.poke.{partition}")
}

/// The brokers' lease bucket (in the books' account): `member.<broker>`
/// for each live broker and `partition.<k>` for each partition held, each
/// entry lapsing unless renewed.
pub const LEASE_BUCKET: &str = "vmlot-leases";

/// OS Farm's images by recipe id (KV; only the farm writes it).
pub const IMAGE_BUCKET: &str = "vmlot-images";
/// Name of OS Farm's micro service (its endpoints are under [`API_PREFIX`]
/// like the broker's, so a caller is named by its subject the same way).
pub const FARM_SERVICE: &str = "vmlot-farm";
/// Header on a message the farm sends on a build request's reply subject
/// before its answer: a line of the build's progress.
pub const PROGRESS_HEADER: &str = "Vmlot-Progress";

/// Every bid, of any provider and partition.
pub const ALL_BIDS: &str = "vmlot.bid.*.*";
pub const ALL_HEARTBEATS: &str = "vmlot.heartbeat.*";

/// The bids on one partition's lots, from any provider.
pub fn bids_of_partition(partition: u16) -> String {
    format!("vmlot.bid.*.{partition}")
}

/// The provider a per-provider subject names (`vmlot.<kind>.<provider>`,
/// then perhaps a partition), if it is one.
pub fn provider_of(subject: &str) -> Option<ProviderId> {
    subject.split('.').nth(2)?.parse().ok()
}

/// The partition a bid's or a result's subject names, if it is one.
pub fn partition_in(subject: &str) -> Option<u16> {
    subject
        .split('.')
        .nth(3)?
        .parse()
        .ok()
        .filter(|p| *p < PARTITIONS)
}

pub use crate::ids::{PARTITIONS, partition_of};

/// Lots for one hypervisor kind and architecture, so providers subscribe
/// only to what they can run.
pub fn lot(hypervisor: HypervisorKind, arch: &str) -> String {
    format!("vmlot.lot.{}.{}.all", hypervisor.as_str(), subject_token(arch))
}

/// How many lot shards there are, and which one a provider listens on
/// besides the `all` subject (see [`lot_shard`]).
pub use crate::ids::{LOT_SHARDS, shard_of};

/// Lots offered to one provider by name.
pub fn lot_for(hypervisor: HypervisorKind, arch: &str, provider: &ProviderId) -> String {
    format!(
        "vmlot.lot.{}.{}.{provider}",
        hypervisor.as_str(),
        subject_token(arch)
    )
}

/// Lots for one shard of the providers of a kind and architecture.
pub fn lot_shard(hypervisor: HypervisorKind, arch: &str, shard: u16) -> String {
    format!(
        "vmlot.lot.{}.{}.{shard}",
        hypervisor.as_str(),
        subject_token(arch)
    )
}

/// A provider's bids on the lots of jobs in `partition`.
pub fn bid(provider: &ProviderId, partition: u16) -> String {
    format!("vmlot.bid.{provider}.{partition}")
}

/// Every partition's bids of a provider named by a literal or a permission
/// template.
pub fn bid_of(name: &str) -> String {
    format!("vmlot.bid.{name}.*")
}

/// Awards and cancels for one provider, core request/reply: the provider
/// answers an award with `Reply<()>` once it has taken it. (The award is
/// durable in the job's record; a provider that is gone answers nothing and
/// the lot is offered again at once.)
pub fn award(provider: &ProviderId) -> String {
    award_of(&provider.to_string())
}

/// [`award`] for a provider named by a literal or a permission template.
pub fn award_of(name: &str) -> String {
    format!("vmlot.award.{name}")
}

/// Every lot, of every kind and shard (what a provider may listen to).
pub const ALL_LOTS: &str = "vmlot.lot.>";

/// A provider's results for jobs in `partition`.
pub fn result(provider: &ProviderId, partition: u16) -> String {
    format!("vmlot.result.{provider}.{partition}")
}

/// Every partition's results of a provider named by a literal or a
/// permission template.
pub fn result_of(name: &str) -> String {
    format!("vmlot.result.{name}.*")
}

/// A provider's heartbeats.
pub fn heartbeat(provider: &ProviderId) -> String {
    heartbeat_of(&provider.to_string())
}

/// [`heartbeat`] for a provider named by a literal or a permission template.
pub fn heartbeat_of(name: &str) -> String {
    format!("vmlot.heartbeat.{name}")
}

/// A string made safe as one subject token (no dots, wildcards or spaces).
fn subject_token(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_subjects_name_their_caller() {
        let alice = Caller::new(Role::Submitter, "alice");
        let subject = api(&alice, "submit");
        assert_eq!(subject, "vmlot.api.submitter.alice.submit");
        assert_eq!(api_caller(&subject), Some(alice));
        for bad in [
            "vmlot.api.submit",
            "vmlot.api.king.alice.submit",
            "vmlot.api.submitter.alice.submit.x",
            "vmlot.apix.submitter.a.b",
        ] {
            assert_eq!(api_caller(bad), None, "{bad}");
        }
    }

    #[test]
    fn ledger_subjects_are_told_apart() {
        let job = crate::ids::JobId::new();
        assert!(is_ledger_tx(&settlement_tx(&job, 0, 1)) && !is_ledger_posting(&settlement_tx(&job, 0, 1)));
        assert!(is_ledger_tx(&resolve_tx(&job, 0, 1)));
        let escrow = crate::ledger::Account::Escrow(job);
        assert!(is_ledger_posting(&posting(&escrow, "CRD")) && !is_ledger_tx(&posting(&escrow, "CRD")));
    }

    #[test]
    fn filters_match_as_the_server_matches() {
        let posting = "vmlot.ledger.post.user:alice.CRD";
        assert!(filter_matches("vmlot.ledger.post.>", posting));
        assert!(filter_matches("vmlot.ledger.post.*.CRD", posting));
        assert!(filter_matches(posting, posting));
        assert!(filter_matches(">", posting));
        assert!(!filter_matches("vmlot.ledger.tx.>", posting));
        assert!(!filter_matches("vmlot.ledger.post.*", posting));
        assert!(!filter_matches("vmlot.ledger.post.user:alice.CRD.>", posting));
        assert!(!filter_matches("vmlot.ledger.post.user:alice", posting));
        assert!(!filter_matches("vmlot.ledger.post.user:alice.CRD.x", posting));
    }

    #[test]
    fn deposits_releases_and_forfeits_have_subjects_of_their_own() {
        use crate::ledger::TxKind;
        let (job, provider, request) = (crate::ids::JobId::new(), ProviderId::new(), uuid::Uuid::new_v4());
        let deposit = deposit_tx(&request);
        let release = release_tx(&request);
        let forfeit = forfeit_tx(&job, 3, 1, &provider);
        assert_eq!(deposit, format!("vmlot.ledger.tx.deposit.{request}"));
        assert_eq!(forfeit, format!("vmlot.ledger.tx.forfeit.{job}.3.1.{provider}"));
        for (kind, subject) in [
            (TxKind::Deposit, &deposit),
            (TxKind::Release, &release),
            (TxKind::Forfeit, &forfeit),
        ] {
            assert!(is_ledger_tx(subject) && !is_ledger_posting(subject));
            assert!(filter_matches(LEDGER_TX_ALL, subject) && filter_matches(LEDGER_SUBJECTS, subject));
            assert!(filter_matches(&ledger_tx_kind(kind), subject), "{subject}");
            for other in TxKind::ALL
                .into_iter()
                .filter(|k| k.subject_token() != kind.as_str())
            {
                assert!(
                    !filter_matches(&ledger_tx_kind(other), subject),
                    "{other:?} {subject}"
                );
            }
        }
        // A job's forfeits sit below the subjects of its other transactions.
        assert!(filter_matches(&forfeits_of_job(&job), &forfeit));
        assert!(!filter_matches(
            &forfeits_of_job(&crate::ids::JobId::new()),
            &forfeit
        ));
        assert!(!ledger_tx_job(&job).iter().any(|f| filter_matches(f, &forfeit)));
        assert!(
            ledger_tx_job(&job)
                .iter()
                .any(|f| filter_matches(f, &settlement_tx(&job, 3, 1)))
        );
        // One forfeit per provider and attempt.
        assert_ne!(forfeit, forfeit_tx(&job, 3, 1, &ProviderId::new()));
        assert_ne!(forfeit, forfeit_tx(&job, 3, 2, &provider));
    }

    #[test]
    fn the_job_bucket_stream_is_the_buckets() {
        assert_eq!(JOB_BUCKET_STREAM, format!("KV_{JOB_BUCKET}"));
        assert_eq!(JOB_BUCKET_SUBJECTS, format!("$KV.{JOB_BUCKET}.>"));
    }

    #[test]
    fn an_unsettled_entry_names_its_job_and_partition() {
        let job = crate::ids::JobId::new();
        let entry = unsettled_entry(&job);
        assert!(filter_matches(UNSETTLED_ENTRIES, &entry));
        assert!(filter_matches(UNSETTLED_SUBJECTS, &entry));
        assert!(filter_matches(
            &unsettled_of_partition(partition_of(&job)),
            &entry
        ));
        assert_eq!(unsettled_job(&entry), Some((partition_of(&job), job)));
        // The marker, another job's partition, extra tokens: no entry.
        assert_eq!(unsettled_job(UNSETTLED_INDEXED), None);
        let wrong = (partition_of(&job) + 1) % PARTITIONS;
        assert_eq!(unsettled_job(&format!("vmlot.unsettled.{wrong}.{job}")), None);
        assert_eq!(unsettled_job(&format!("{entry}.x")), None);
        assert_eq!(unsettled_job("vmlot.unsettled.1.not-a-job"), None);
    }

    #[test]
    fn hostile_arch_cannot_escape_its_token() {
        assert_eq!(lot(HypervisorKind::Qemu, "x86_64"), "vmlot.lot.qemu.x86_64.all");
        assert_eq!(lot(HypervisorKind::Xen, "a.>*b c"), "vmlot.lot.xen.a___b_c.all");
        assert_eq!(
            lot_shard(HypervisorKind::Qemu, "x86_64", 7),
            "vmlot.lot.qemu.x86_64.7"
        );
    }

    #[test]
    fn store_subjects_name_their_writer_and_match_their_filters() {
        let block = BlockId::of(crate::HashAlgorithm::Sha256, b"page");
        let manifest = ManifestId::of(crate::HashAlgorithm::Sha256, b"{}");
        let eve = Caller::new(Role::Provider, "eve");
        let pointer = self::block(&block, &eve);
        assert_eq!(pointer, format!("vmlot.cas.block.{block}.provider.eve"));
        assert_eq!(block_writer(&pointer), Some(eve.clone()));
        assert!(filter_matches(BLOCK_SUBJECTS, &pointer));
        assert!(filter_matches(&block_any(&block), &pointer));
        assert!(!filter_matches(&block_house(&block), &pointer));
        assert!(filter_matches(&blocks_of(Role::Provider, "eve"), &pointer));
        assert!(!filter_matches(&blocks_of(Role::Provider, "bob"), &pointer));
        let house = self::block(&block, &Caller::new(Role::Broker, "broker"));
        assert!(filter_matches(&block_house(&block), &house));
        for part in [
            manifest_part(&manifest, &eve, 0),
            manifest_locations(&manifest, &eve),
        ] {
            assert_eq!(manifest_writer(&part), Some(eve.clone()), "{part}");
            assert!(filter_matches(MANIFEST_SUBJECTS, &part));
            assert!(filter_matches(&manifests_of(Role::Provider, "eve"), &part));
            assert!(!filter_matches(&manifests_of(Role::Submitter, "eve"), &part));
        }
        assert!(filter_matches(
            &manifest_part_any(&manifest, 0),
            &manifest_part(&manifest, &eve, 0)
        ));
        assert!(filter_matches(
            &manifest_locations_any(&manifest),
            &manifest_locations(&manifest, &eve)
        ));
        assert!(block_writer("vmlot.cas.block.x.provider.a.b").is_none());
        assert!(block_writer("vmlot.cas.block.x.nobody.a").is_none());
    }
}
