//! What this provider bids on a lot. It knows exactly what it bids on (one
//! segment) and promises nothing beyond it.

use rust_decimal::Decimal;
use vmlot_schemas::Money;
use vmlot_schemas::market::Lot;

use crate::config::ProviderConfig;

/// Why no bid is made.
#[derive(Debug, PartialEq, Eq)]
pub enum NoBid {
    WrongHypervisor,
    WrongArch,
    TooMuchMemory,
    WrongUnit,
    NoFreeSlot,
    Busy,
    AboveReserve(Money),
}

/// The price for `lot`, given the share of its checkpoint already held.
pub fn price(config: &ProviderConfig, lot: &Lot, hot_share: Decimal) -> Money {
    let base = (config.price_per_second * Decimal::from(lot.segment_seconds)).max(config.min_price);
    let discount = Decimal::ONE - config.hot_discount.clamp(Decimal::ZERO, Decimal::ONE) * hot_share;
    Money::new((base * discount).round_dp(6).normalize(), config.unit.clone())
}

/// Decides whether to bid and at what price.
pub fn decide(
    config: &ProviderConfig,
    lot: &Lot,
    free_slots: u32,
    idle: bool,
    hot_share: Decimal,
) -> Result<Money, NoBid> {
    if !config.hypervisors.contains(&lot.image.vm.hypervisor) {
        return Err(NoBid::WrongHypervisor);
    }
    if lot.image.vm.arch != config.arch {
        return Err(NoBid::WrongArch);
    }
    if lot.image.vm.memory_mib > config.memory_mib {
        return Err(NoBid::TooMuchMemory);
    }
    if lot.reserve_price.unit != config.unit {
        return Err(NoBid::WrongUnit);
    }
    if free_slots == 0 {
        return Err(NoBid::NoFreeSlot);
    }
    if !idle {
        return Err(NoBid::Busy);
    }
    let price = price(config, lot, hot_share);
    if price.amount > lot.reserve_price.amount {
        return Err(NoBid::AboveReserve(price));
    }
    Ok(price)
}
