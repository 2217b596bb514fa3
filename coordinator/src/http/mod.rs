//! The coordinator's HTTP API (axum): health, and the OpenAI-, Ollama- and Anthropic-compatible
//! APIs over the cluster's models. Every route sits behind [`router`], so a layer added there (authentication, in the
//! security issue) covers them all.

mod anthropic;
mod health;
mod ollama;
mod openai;

use axum::{Router, http::HeaderMap};
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

/// The header that names the conversation a chat request belongs to, so its answers stay on one
/// node (any of the APIs). Without it, a conversation is known by its opening messages.
pub const CONVERSATION_HEADER: &str = "x-kowalski-conversation";
/// How many times an answer moved to another node: a header on whole answers, a field of the
/// last chunk or line of streamed ones (`x_kowalski_failovers`), present only when it moved.
pub const FAILOVERS_HEADER: &str = "x-kowalski-failovers";
const FAILOVERS_FIELD: &str = "x_kowalski_failovers";

/// Why a request that offers the model tools is refused: an answer that calls one could not be
/// continued on another node mid-call.
const NO_TOOLS: &str = "tools are not supported by this cluster yet: ask without them";

/// True when a request offers tools (a `tools` field that is neither null nor empty).
fn offers_tools(tools: &Option<Value>) -> bool {
    match tools {
        None | Some(Value::Null) => false,
        Some(Value::Array(tools)) => !tools.is_empty(),
        Some(_) => true,
    }
}

/// The conversation id a request's headers give, or empty.
fn conversation(headers: &HeaderMap) -> String {
    headers
        .get(CONVERSATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// Adds the failover count to a streamed answer's last chunk when the answer moved.
fn mark_failovers(last: &mut Value, failovers: u32) {
    if failovers > 0 {
        last[FAILOVERS_FIELD] = failovers.into();
    }
}

/// Adds the failover header to a whole answer when it moved.
fn with_failovers(
    mut response: axum::response::Response,
    failovers: u32,
) -> axum::response::Response {
    if failovers > 0 {
        response
            .headers_mut()
            .insert(FAILOVERS_HEADER, failovers.into());
    }
    response
}
