//! The sealed-bid reverse auction of one lot: pure, so every rule is a unit test.

use std::collections::HashSet;

use rust_decimal::Decimal;
use vmlot_schemas::market::Bid;
use vmlot_schemas::{Money, ProviderId};

/// How winners are paid: a broker setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PricingRule {
    /// Each winner is paid its own bid.
    #[default]
    PayAsBid,
    /// Each winner is paid the lowest losing bid (the (r+1)-th price), or the
    /// reserve when there is none — truthful bidding is the best strategy.
    SecondPrice,
}

impl std::str::FromStr for PricingRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pay-as-bid" => Ok(PricingRule::PayAsBid),
            "second-price" => Ok(PricingRule::SecondPrice),
            other => Err(format!(
                "unknown pricing rule {other:?} (pay-as-bid | second-price)"
            )),
        }
    }
}

/// Why a bid was not considered.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BidRefused {
    #[error("price {0} is not positive")]
    NotPositive(Money),
    #[error("price unit {got} differs from the lot's {expected}")]
    WrongUnit { got: String, expected: String },
    #[error("price {price} is above the reserve {reserve}")]
    AboveReserve { price: Money, reserve: Money },
    #[error("price {price} is above the job's remaining budget {remaining}")]
    AboveBudget { price: Money, remaining: Money },
    #[error("provider {0} already bid on this lot")]
    Duplicate(ProviderId),
    #[error("provider {0} was not invited to bid on this lot")]
    NotInvited(ProviderId),
    #[error("provider {0} does not offer the lot's hypervisor, architecture or memory")]
    Unfit(ProviderId),
}

impl BidRefused {
    /// The refusal's name, for counting (a bounded set of words).
    pub fn kind(&self) -> &'static str {
        match self {
            BidRefused::NotPositive(_) => "not-positive",
            BidRefused::WrongUnit { .. } => "wrong-unit",
            BidRefused::AboveReserve { .. } => "above-reserve",
            BidRefused::AboveBudget { .. } => "above-budget",
            BidRefused::Duplicate(_) => "duplicate",
            BidRefused::NotInvited(_) => "not-invited",
            BidRefused::Unfit(_) => "unfit",
        }
    }
}

/// Checks one bid against the lot's reserve and the job's remaining budget.
pub fn check_bid(bid: &Bid, reserve: &Money, remaining: &Money) -> Result<(), BidRefused> {
    if bid.price.unit != reserve.unit {
        return Err(BidRefused::WrongUnit {
            got: bid.price.unit.clone(),
            expected: reserve.unit.clone(),
        });
    }
    if bid.price.amount <= Decimal::ZERO {
        return Err(BidRefused::NotPositive(bid.price.clone()));
    }
    if bid.price.amount > reserve.amount {
        return Err(BidRefused::AboveReserve {
            price: bid.price.clone(),
            reserve: reserve.clone(),
        });
    }
    if bid.price.amount > remaining.amount {
        return Err(BidRefused::AboveBudget {
            price: bid.price.clone(),
            remaining: remaining.clone(),
        });
    }
    Ok(())
}

/// Picks up to `r` winners among valid bids from distinct providers: lowest
/// price first; ties go to more hot bytes, then the earlier bid. Returns
/// each winner with the price it will be paid if its result settles.
pub fn award(bids: Vec<Bid>, r: usize, rule: PricingRule, reserve: &Money) -> Vec<(ProviderId, Money)> {
    let bids = rank(bids);
    let winners: Vec<&Bid> = bids.iter().take(r).collect();
    let clearing = match rule {
        PricingRule::PayAsBid => None,
        PricingRule::SecondPrice => Some(
            bids.get(r)
                .map(|b| b.price.clone())
                .unwrap_or_else(|| reserve.clone()),
        ),
    };
    winners
        .into_iter()
        .map(|b| (b.provider, clearing.clone().unwrap_or_else(|| b.price.clone())))
        .collect()
}

/// The bids in the auction's order (cheapest, then most blocks held, then
/// earliest), one per provider.
fn rank(mut bids: Vec<Bid>) -> Vec<Bid> {
    bids.sort_by(|a, b| {
        a.price
            .amount
            .cmp(&b.price.amount)
            .then(b.hot_bytes.cmp(&a.hot_bytes))
            .then(a.sent_at.cmp(&b.sent_at))
    });
    let mut seen = HashSet::new();
    bids.retain(|b| seen.insert(b.provider));
    bids
}

/// Up to `n` bidders that rank after `winners`, each at its own price: a
/// quorum's tie-breakers, awarded one by one if its replicas disagree.
pub fn standby(bids: Vec<Bid>, winners: &[(ProviderId, Money)], n: usize) -> Vec<(ProviderId, Money)> {
    rank(bids)
        .into_iter()
        .filter(|b| !winners.iter().any(|(w, _)| *w == b.provider))
        .take(n)
        .map(|b| (b.provider, b.price))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, Utc};
    use std::str::FromStr;
    use vmlot_schemas::LotId;

    fn money(s: &str) -> Money {
        Money::new(Decimal::from_str(s).unwrap(), "CRD")
    }

    fn bid(provider: ProviderId, price: &str, hot: u64, offset_ms: i64) -> Bid {
        Bid {
            version: 1,
            lot: LotId::new(),
            provider,
            price: money(price),
            hot_bytes: hot,
            slots: 1,
            sent_at: Utc::now() + Duration::milliseconds(offset_ms),
        }
    }

    #[test]
    fn lowest_price_wins_then_hot_bytes_then_earlier() {
        let (a, b, c, d) = (
            ProviderId::new(),
            ProviderId::new(),
            ProviderId::new(),
            ProviderId::new(),
        );
        let bids = vec![
            bid(a, "3", 0, 0),
            bid(b, "2", 0, 5),
            bid(c, "2", 100, 10),
            bid(d, "2", 100, 0),
        ];
        let won = award(bids, 2, PricingRule::PayAsBid, &money("5"));
        assert_eq!(won, vec![(d, money("2")), (c, money("2"))]);
    }

    #[test]
    fn second_price_pays_the_lowest_loser_or_the_reserve() {
        let (a, b, c) = (ProviderId::new(), ProviderId::new(), ProviderId::new());
        let bids = vec![bid(a, "1", 0, 0), bid(b, "2", 0, 0), bid(c, "4", 0, 0)];
        let won = award(bids.clone(), 2, PricingRule::SecondPrice, &money("5"));
        assert_eq!(won, vec![(a, money("4")), (b, money("4"))]);
        let won = award(bids, 3, PricingRule::SecondPrice, &money("5"));
        assert!(won.iter().all(|(_, p)| *p == money("5")));
    }

    #[test]
    fn one_bid_per_provider_counts() {
        let a = ProviderId::new();
        let won = award(
            vec![bid(a, "1", 0, 0), bid(a, "1.5", 0, 1)],
            2,
            PricingRule::PayAsBid,
            &money("5"),
        );
        assert_eq!(won.len(), 1);
    }

    #[test]
    fn bad_prices_are_refused() {
        let p = ProviderId::new();
        let reserve = money("5");
        let remaining = money("3");
        assert!(matches!(
            check_bid(&bid(p, "-1", 0, 0), &reserve, &remaining),
            Err(BidRefused::NotPositive(_))
        ));
        assert!(matches!(
            check_bid(&bid(p, "0", 0, 0), &reserve, &remaining),
            Err(BidRefused::NotPositive(_))
        ));
        assert!(matches!(
            check_bid(&bid(p, "6", 0, 0), &reserve, &remaining),
            Err(BidRefused::AboveReserve { .. })
        ));
        assert!(matches!(
            check_bid(&bid(p, "4", 0, 0), &reserve, &remaining),
            Err(BidRefused::AboveBudget { .. })
        ));
        let mut other_unit = bid(p, "1", 0, 0);
        other_unit.price.unit = "EUR".into();
        assert!(matches!(
            check_bid(&other_unit, &reserve, &remaining),
            Err(BidRefused::WrongUnit { .. })
        ));
        assert!(check_bid(&bid(p, "3", 0, 0), &reserve, &remaining).is_ok());
    }
}
