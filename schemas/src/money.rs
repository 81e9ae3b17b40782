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
    #[serde(with = "rust_decimal::serde::str")]
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
    }
}
