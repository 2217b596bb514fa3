//! The coordinator's HTTP API (axum): health, and the OpenAI-, Ollama- and Anthropic-compatible
//! APIs over the cluster's models. Every route sits behind [`router`], so a layer added there (authentication, in the
//! security issue) covers them all.

mod anthropic;
mod health;
mod ollama;
mod openai;

use axum::Router;
use serde::Deserialize;
use serde_json::Value;

use crate::service::ClusterService;

/// Every route of the HTTP API.
pub fn router(cluster: ClusterService) -> Router {
    Router::new()
        .merge(health::routes())
        .merge(openai::routes())
        .merge(ollama::routes())
        .merge(anthropic::routes())
        .with_state(cluster)
}

/// A message's content as the OpenAI and Anthropic APIs send it: text, or parts (blocks) of
/// which the text ones are kept.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
}

impl Content {
    fn text(self) -> String {
        match self {
            Content::Text(text) => text,
            Content::Parts(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect(),
        }
    }
}
