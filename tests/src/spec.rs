//! A synthetic provider's description (name, id, prices, slots), shared by
//! the two ways the harness runs one: as a process ([`crate::market`]) and
//! as a task ([`crate::in_process`]).

/// A provider of the synthetic driver (market tests; never a VM).
pub struct ProviderSpec {
    pub name: String,
    pub id: uuid::Uuid,
    pub price_per_second: String,
    pub min_price: String,
    pub hot_discount: String,
    pub slots: u32,
    /// More flags for the provider process (e.g. `--metrics-listen ADDR`).
    pub args: Vec<String>,
}

impl ProviderSpec {
    pub fn synthetic(name: &str, min_price: &str) -> Self {
        Self {
            name: name.into(),
            id: uuid::Uuid::new_v4(),
            price_per_second: "0".into(),
            min_price: min_price.into(),
            hot_discount: "0".into(),
            slots: 1,
            args: Vec::new(),
        }
    }
}
