//! The catalogue of published JSON Schemas (`schemas/json/`): the top of
//! the crate, naming the types of every layer below, so a client in
//! another language gets each message's schema by file name.

use crate::{api, ledger, manifest, market, money, recipe, standing, vm};

/// Every schema published in `schemas/json/`, by file stem.
pub fn json_schemas() -> Vec<(&'static str, schemars::Schema)> {
    vec![
        ("manifest", schemars::schema_for!(manifest::Manifest)),
        ("money", schemars::schema_for!(money::Money)),
        ("vm-config", schemars::schema_for!(vm::VmConfig)),
        ("submit-job", schemars::schema_for!(market::SubmitJob)),
        ("lot", schemars::schema_for!(market::Lot)),
        ("bid", schemars::schema_for!(market::Bid)),
        ("to-provider", schemars::schema_for!(market::ToProvider)),
        ("segment-result", schemars::schema_for!(market::SegmentResult)),
        ("heartbeat", schemars::schema_for!(market::Heartbeat)),
        ("job-ref", schemars::schema_for!(market::JobRef)),
        ("job-status", schemars::schema_for!(market::JobStatus)),
        ("transaction", schemars::schema_for!(ledger::Transaction)),
        ("posting", schemars::schema_for!(ledger::Posting)),
        ("credit-request", schemars::schema_for!(ledger::CreditRequest)),
        ("deposit-request", schemars::schema_for!(api::DepositRequest)),
        ("deposited", schemars::schema_for!(api::Deposited)),
        ("settlement", schemars::schema_for!(ledger::Settlement)),
        ("market-view", schemars::schema_for!(market::MarketView)),
        ("standing", schemars::schema_for!(standing::Standing)),
        ("recipe", schemars::schema_for!(recipe::Recipe)),
        ("build-request", schemars::schema_for!(recipe::BuildRequest)),
        ("build-progress", schemars::schema_for!(recipe::BuildProgress)),
        ("image-record", schemars::schema_for!(recipe::ImageRecord)),
        ("reply-built", schemars::schema_for!(market::Reply<recipe::Built>)),
        (
            "reply-submitted",
            schemars::schema_for!(market::Reply<market::Submitted>),
        ),
        (
            "reply-job-status",
            schemars::schema_for!(market::Reply<market::JobStatus>),
        ),
    ]
}
