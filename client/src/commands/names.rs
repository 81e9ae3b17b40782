//! Provider names for people: the broker's recent heartbeats map ids to
//! the names providers chose. Names are a courtesy, never a reason to fail.

use std::collections::HashMap;

use vmlot_client::Api;
use vmlot_schemas::ProviderId;

use crate::output::short;

/// Names of the providers the broker has heard from recently (empty if it
/// does not answer).
pub async fn provider_names(api: &Api) -> HashMap<ProviderId, String> {
    match api.providers().await {
        Ok(list) => list.into_iter().map(|h| (h.provider, h.name)).collect(),
        Err(_) => HashMap::new(),
    }
}

/// Provider names, asked again when an unknown provider shows up.
pub struct Names {
    pub known: HashMap<ProviderId, String>,
}

impl Names {
    /// The names the broker knows now.
    pub async fn load(api: &Api) -> Self {
        Self {
            known: provider_names(api).await,
        }
    }

    /// `id`'s name, or the start of its id if the broker does not know it.
    pub async fn of(&mut self, api: &Api, id: &ProviderId) -> String {
        if !self.known.contains_key(id) {
            self.known.extend(provider_names(api).await);
        }
        match self.known.get(id) {
            Some(name) => name.clone(),
            None => short(id),
        }
    }
}
