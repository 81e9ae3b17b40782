//! The NATS subject map. Every subject and stream name is built here, never
//! by `format!` elsewhere, so the map in `docs/ARCHITECTURE.md` stays true.

use crate::ids::{BlockId, ManifestId, ProviderId};
use crate::vm::HypervisorKind;

/// Stream holding one message per block, subject [`block`].
pub const BLOCK_STREAM: &str = "VMLOT_BLOCKS";
/// Subjects of [`BLOCK_STREAM`].
pub const BLOCK_SUBJECTS: &str = "vmlot.cas.block.*";
/// Stream holding manifests: canonical JSON cut into parts, one message per
/// part, written in one atomic batch and read with direct gets (no consumer
/// per read, unlike an object store).
pub const MANIFEST_STREAM: &str = "VMLOT_MANIFESTS";
/// Subjects of [`MANIFEST_STREAM`].
pub const MANIFEST_SUBJECTS: &str = "vmlot.cas.manifest.*.*";
/// Header of a manifest's part 0: how many parts there are.
pub const MANIFEST_PARTS_HEADER: &str = "Vmlot-Manifest-Parts";
/// Header of a manifest's part 0: its whole size in bytes.
pub const MANIFEST_SIZE_HEADER: &str = "Vmlot-Manifest-Size";

/// Part `part` of manifest `id`.
pub fn manifest_part(id: &ManifestId, part: u32) -> String {
    format!("vmlot.cas.manifest.{id}.{part}")
}
/// Header naming a block's stored encoding (absent: raw bytes).
pub const BLOCK_ENCODING_HEADER: &str = "Vmlot-Encoding";

/// Subject of one block.
pub fn block(id: &BlockId) -> String {
    format!("vmlot.cas.block.{id}")
}

// The market. Scoped per provider wherever a provider publishes or
// receives, so NATS permissions can fence each provider to its own
// subjects: provider P may publish only `vmlot.bid.P`, `vmlot.result.P`,
// `vmlot.heartbeat.P` and subscribe only to `vmlot.lot.>` and
// `vmlot.award.P`.

/// Prefix of the broker's job API (a NATS micro service named `vmlot-broker`);
/// endpoints: `submit`, `status`, `list`, `cancel`, `providers`, `market`.
pub const API_PREFIX: &str = "vmlot.api";
/// Name of the broker's micro service.
pub const API_SERVICE: &str = "vmlot-broker";

/// One endpoint of the job API.
pub fn api(endpoint: &str) -> String {
    format!("{API_PREFIX}.{endpoint}")
}

/// Stream of results: a result is durable once the provider has its ack.
pub const RESULT_STREAM: &str = "VMLOT_RESULTS";
pub const RESULT_SUBJECTS: &str = "vmlot.result.*";
/// Stream of the books: transactions and the per-account postings that
/// index them (see [`crate::ledger`]).
pub const LEDGER_STREAM: &str = "VMLOT_LEDGER";
pub const LEDGER_SUBJECTS: &str = "vmlot.ledger.>";
/// Every transaction.
pub const LEDGER_TX_ALL: &str = "vmlot.ledger.tx.>";
/// Every posting.
pub const LEDGER_POST_ALL: &str = "vmlot.ledger.post.>";

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

/// The one subject a segment's settlement may be written to: the stream
/// refuses a second message there, so a segment is paid at most once.
pub fn settlement_tx(job: &crate::ids::JobId, segment: u32) -> String {
    format!("vmlot.ledger.tx.settlement.{job}.{segment}")
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

/// Every transaction of one kind.
pub fn ledger_tx_kind(kind: crate::ledger::TxKind) -> String {
    format!("vmlot.ledger.tx.{}.>", kind.as_str())
}

/// Every transaction of one job (its hold, settlements and refund).
pub fn ledger_tx_job(job: &crate::ids::JobId) -> [String; 2] {
    [
        format!("vmlot.ledger.tx.*.{job}"),
        format!("vmlot.ledger.tx.settlement.{job}.*"),
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

/// Every lot, of any kind (the broker's own view).
pub const ALL_BIDS: &str = "vmlot.bid.*";
pub const ALL_HEARTBEATS: &str = "vmlot.heartbeat.*";

/// The provider a per-provider subject names, if it is one.
pub fn provider_of(subject: &str) -> Option<ProviderId> {
    subject.rsplit('.').next()?.parse().ok()
}

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

/// A provider's bids.
pub fn bid(provider: &ProviderId) -> String {
    format!("vmlot.bid.{provider}")
}

/// Awards and cancels for one provider, core request/reply: the provider
/// answers an award with `Reply<()>` once it has taken it. (The award is
/// durable in the job's record; a provider that is gone answers nothing and
/// the lot is offered again at once.)
pub fn award(provider: &ProviderId) -> String {
    format!("vmlot.award.{provider}")
}

/// A provider's results.
pub fn result(provider: &ProviderId) -> String {
    format!("vmlot.result.{provider}")
}

/// A provider's heartbeats.
pub fn heartbeat(provider: &ProviderId) -> String {
    format!("vmlot.heartbeat.{provider}")
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
    fn ledger_subjects_are_told_apart() {
        let job = crate::ids::JobId::new();
        assert!(is_ledger_tx(&settlement_tx(&job, 0)) && !is_ledger_posting(&settlement_tx(&job, 0)));
        let escrow = crate::ledger::Account::Escrow(job);
        assert!(is_ledger_posting(&posting(&escrow, "CRD")) && !is_ledger_tx(&posting(&escrow, "CRD")));
    }

    #[test]
    fn the_job_bucket_stream_is_the_buckets() {
        assert_eq!(JOB_BUCKET_STREAM, format!("KV_{JOB_BUCKET}"));
        assert_eq!(JOB_BUCKET_SUBJECTS, format!("$KV.{JOB_BUCKET}.>"));
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
}
