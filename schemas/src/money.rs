//! Money: an exact decimal amount with a unit code. Never a float.

use std::fmt;

use rust_decimal::Decimal;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An amount of some unit (a currency code such as `EUR`, or a credit unit).
/// Serialized as `{"amount": "12.50", "unit": "CRD"}`: the amount is a
/// decimal string so no JSON reader turns it into a float.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub struct Money {
    #[serde(with = "plain_decimal")]
    #[schemars(with = "String", regex(pattern = r"^-?[0-9]+(\.[0-9]+)?$"))]
    pub amount: Decimal,
    /// Unit code: 3 to 8 upper-case ASCII letters.
    #[schemars(regex(pattern = r"^[A-Z]{3,8}$"))]
    pub unit: String,
}

impl Money {
    pub fn new(amount: Decimal, unit: impl Into<String>) -> Self {
        Self {
            amount,
            unit: unit.into(),
        }
    }

    /// True when the unit code is well-formed.
    pub fn unit_is_valid(&self) -> bool {
        (3..=8).contains(&self.unit.len()) && self.unit.bytes().all(|b| b.is_ascii_uppercase())
    }
}

/// A decimal amount on the wire: a string of digits with at most one
/// point and an optional leading minus, as the schema's pattern says. No
/// exponent (`1e3`), no JSON number, nothing a reader could round.
pub mod plain_decimal {
    use std::str::FromStr;

    use rust_decimal::Decimal;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Decimal, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    /// Parses `text` if it is a plain decimal.
    pub fn parse(text: &str) -> Result<Decimal, String> {
        let digits = text.strip_prefix('-').unwrap_or(text);
        let mut parts = digits.split('.');
        let plain =
            |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        let whole = plain(parts.next());
        let ok = match parts.next() {
            None => whole,
            Some(frac) => whole && plain(Some(frac)) && parts.next().is_none(),
        };
        if !ok {
            return Err(format!("{text:?} is not a plain decimal amount"));
        }
        Decimal::from_str(text).map_err(|e| format!("{text:?}: {e}"))
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.amount, self.unit)
    }
}

impl fmt::Debug for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn amount_is_a_string_on_the_wire() {
        let m = Money::new(Decimal::from_str("0.10").unwrap(), "CRD");
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"amount":"0.10","unit":"CRD"}"#);
        let back: Money = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        assert!(serde_json::from_str::<Money>(r#"{"amount":0.1,"unit":"CRD"}"#).is_err());
        for bad in ["1e3", "1.", ".5", "--1", "1.2.3", "", " 1", "+1", "0x10"] {
            let json = format!(r#"{{"amount":"{bad}","unit":"CRD"}}"#);
            assert!(serde_json::from_str::<Money>(&json).is_err(), "{bad:?} accepted");
        }
        for good in ["0", "-2.50", "123456789.12345678"] {
            let json = format!(r#"{{"amount":"{good}","unit":"CRD"}}"#);
            assert!(serde_json::from_str::<Money>(&json).is_ok(), "{good:?} refused");
        }
    }
}
