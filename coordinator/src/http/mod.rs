//! The coordinator's HTTP API (axum): health, and the OpenAI-, Ollama- and Anthropic-compatible
//! APIs over the cluster's models. Every route sits behind [`router`], so a layer added there (authentication, in the
//! security issue) covers them all.

mod anthropic;
mod health;
mod ollama;
mod openai;

use axum::Router;

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
