//! The cluster's models: every model some node serves, with the nodes and backends serving it.

use std::collections::BTreeMap;

use kowalski_exo_common::proto::{ClusterModel, ModelOffer, ModelPlacement};
use tokio::time::Instant;

use crate::registry::NodeRegistry;

/// Every model some node reports, by name, each with where it is served.
pub fn list(registry: &NodeRegistry, now: Instant) -> Vec<ClusterModel> {
    let mut models: BTreeMap<String, Vec<ModelPlacement>> = BTreeMap::new();
    for node in registry.snapshot(now) {
        let offers = node.registration.models.iter().flat_map(|c| &c.models);
        for offer in offers {
            models
                .entry(offer.name.clone())
                .or_default()
                .push(ModelPlacement {
                    node_id: node.id.clone(),
                    node_name: node.registration.name.clone(),
                    offer: Some(ModelOffer {
                        // This coordinator's own count, where it has one, is the fresher.
                        in_flight: node
                            .generations
                            .get(&offer.name)
                            .copied()
                            .unwrap_or(offer.in_flight),
                        ..offer.clone()
                    }),
                });
        }
    }
    models
        .into_iter()
        .map(|(name, served_by)| ClusterModel { name, served_by })
        .collect()
}
