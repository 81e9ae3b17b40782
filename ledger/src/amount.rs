//! Amounts as the books take them: a segment's price split into the
//! provider's share and the operator's fee, and an amount typed by a
//! person. Pure arithmetic, used by the builders and the CLI alike.

use rust_decimal::{Decimal, RoundingStrategy};

/// Splits a segment's price into the provider's share and the operator's
/// fee at `fee_rate` (0.05 = 5 %). The fee is rounded half-to-even to
/// [`vmlot_schemas::ledger::MAX_SCALE`] decimal places (the finest amount
/// the books hold), and the provider gets the rest, so the two always add
/// up to the price exactly.
pub fn split_fee(price: Decimal, fee_rate: Decimal) -> (Decimal, Decimal) {
    if fee_rate <= Decimal::ZERO {
        return (price, Decimal::ZERO);
    }
    let fee = (price * fee_rate.min(Decimal::ONE))
        .round_dp_with_strategy(
            vmlot_schemas::ledger::MAX_SCALE,
            RoundingStrategy::MidpointNearestEven,
        )
        .normalize()
        .min(price);
    (price - fee, fee)
}

/// Parses an amount as typed by a person: a plain decimal, no exponent,
/// at most [`vmlot_schemas::ledger::MAX_SCALE`] places.
pub fn parse_amount(text: &str) -> Result<Decimal, String> {
    let amount = vmlot_schemas::money::plain_decimal::parse(text.trim())?;
    if amount.scale() > vmlot_schemas::ledger::MAX_SCALE {
        return Err(format!(
            "{text} has more than {} decimal places",
            vmlot_schemas::ledger::MAX_SCALE
        ));
    }
    Ok(amount)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn the_fee_and_the_share_add_up_to_the_price() {
        let d = |s: &str| Decimal::from_str(s).unwrap();
        assert_eq!(split_fee(d("1.00"), d("0")), (d("1.00"), d("0")));
        assert_eq!(split_fee(d("1.00"), d("0.05")), (d("0.95"), d("0.05")));
        assert_eq!(split_fee(d("0.5"), d("0.1")), (d("0.45"), d("0.05")));
        // 0.000000125 rounds half to even at 8 places: 0.00000012.
        assert_eq!(
            split_fee(d("0.0000025"), d("0.05")),
            (d("0.00000238"), d("0.00000012"))
        );
        assert_eq!(
            split_fee(d("3"), d("2")),
            (d("0"), d("3")),
            "a fee never exceeds the price"
        );
        for (p, r) in [("0.07", "0.3333"), ("123.456", "0.015"), ("1", "0.999")] {
            let (share, fee) = split_fee(d(p), d(r));
            assert_eq!(share + fee, d(p));
            assert!(share >= Decimal::ZERO && fee >= Decimal::ZERO);
        }
    }

    #[test]
    fn amounts_are_plain_decimals() {
        assert_eq!(
            parse_amount("12.50").unwrap(),
            Decimal::from_str("12.50").unwrap()
        );
        assert!(parse_amount("1e3").is_err());
        assert!(parse_amount("0.000000001").is_err());
        assert!(parse_amount("abc").is_err());
    }
}
