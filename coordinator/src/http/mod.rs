//! The coordinator's HTTP API (axum): health, metrics, and the OpenAI-, Ollama- and
//! Anthropic-compatible APIs over the cluster's models. With TLS, every route but `/healthz`
//! sits behind the API keys (`Authorization: Bearer KEY`, or Anthropic's `x-api-key`), a
//! refusal answered with 401 in the route's own API's error format.

mod anthropic;
mod health;
pub mod https;
mod ollama;
mod openai;

use std::{pin::Pin, sync::Arc};

use axum::{
    Router,
    extract::Request,
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::IntoResponse,
};
use futures_util::{Stream, StreamExt};
use kowalski_exo_common::proto::{ChatEvent, ChatFinished, chat_event};
use serde::Deserialize;
use serde_json::Value;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use kowalski_exo_common::security::trust::ClusterTrust;

use crate::service::{ChatReceiver, ClusterService};

/// Every route of the HTTP API; with `keys`, all but `/healthz` need one.
pub fn router(cluster: ClusterService, keys: Option<Arc<ClusterTrust>>) -> Router {
    Router::new()
        .merge(health::metrics_routes())
        .merge(openai::routes())
        .merge(ollama::routes())
        .merge(anthropic::routes())
        .route_layer(middleware::from_fn(move |request, next| {
            require_key(keys.clone(), request, next)
        }))
        .merge(health::routes())
        .with_state(cluster)
}

/// Passes a request on when its key is one in force (or no keys are asked for); otherwise
/// answers 401 as the route's API would.
async fn require_key(
    keys: Option<Arc<ClusterTrust>>,
    request: Request,
    next: Next,
) -> axum::response::Response {
    let Some(trust) = keys else {
        return next.run(request).await;
    };
    let headers = request.headers();
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(kowalski_exo_common::security::bearer)
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
    match trust.authorize(presented) {
        Ok(_) => next.run(request).await,
        Err(refused) => unauthorized(request.uri().path(), &refused.to_string()),
    }
}

/// A 401 in the error format of the API `path` belongs to.
fn unauthorized(path: &str, message: &str) -> axum::response::Response {
    let body = if path.starts_with("/api/") {
        serde_json::json!({"error": message})
    } else if path.starts_with("/v1/messages") {
        serde_json::json!({"type": "error", "error": {"type": "authentication_error", "message": message}})
    } else if path.starts_with("/v1/") {
        serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}})
    } else {
        return (StatusCode::UNAUTHORIZED, message.to_string()).into_response();
    };
    (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response()
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
/// Set (header `true`, field `x_kowalski_prefix_diverged`) when a node that generated a moved
/// answer again did not repeat the text already sent, so what follows may not read on from it.
pub const DIVERGED_HEADER: &str = "x-kowalski-prefix-diverged";
const DIVERGED_FIELD: &str = "x_kowalski_prefix_diverged";

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

/// Marks a streamed answer's last chunk when the answer moved: how often, and whether a node
/// that generated it again did not repeat the text already sent.
fn mark_failovers(last: &mut Value, finished: &ChatFinished) {
    if finished.failovers > 0 {
        last[FAILOVERS_FIELD] = finished.failovers.into();
    }
    if finished.prefix_diverged {
        last[DIVERGED_FIELD] = true.into();
    }
}

/// Adds the failover headers to a whole answer when it moved.
fn with_failovers(
    mut response: axum::response::Response,
    finished: &ChatFinished,
) -> axum::response::Response {
    if finished.failovers > 0 {
        response
            .headers_mut()
            .insert(FAILOVERS_HEADER, finished.failovers.into());
    }
    if finished.prefix_diverged {
        response.headers_mut().insert(
            DIVERGED_HEADER,
            "true".parse().expect("a valid header value"),
        );
    }
    response
}

/// A chat's events, from the first one on.
type ChatEvents = Pin<Box<dyn Stream<Item = Result<ChatEvent, Status>> + Send>>;

/// Why an answer did not start: a node refused the request, or no node could answer it.
enum Refusal {
    Refused(Status),
    Failed(String),
}

impl Refusal {
    /// The HTTP status it is answered with.
    fn status(&self) -> StatusCode {
        match self {
            Refusal::Refused(status) => match status.code() {
                Code::InvalidArgument => StatusCode::BAD_REQUEST,
                Code::NotFound => StatusCode::NOT_FOUND,
                Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
                Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::BAD_GATEWAY,
            },
            Refusal::Failed(_) => StatusCode::BAD_GATEWAY,
        }
    }

    fn message(&self) -> String {
        match self {
            Refusal::Refused(status) => status.message().to_string(),
            Refusal::Failed(error) => error.clone(),
        }
    }
}

/// The answer's events once its first text, its end, or a refusal has come, so a streamed
/// answer that cannot start gets an HTTP error status rather than 200 and an error chunk. A
/// refusal or a failure before any text is the `Err`; otherwise every event, none lost.
async fn opened(events: ChatReceiver) -> Result<ChatEvents, Refusal> {
    let mut events = ReceiverStream::new(events);
    let mut seen = Vec::new();
    while let Some(event) = events.next().await {
        let event = event.map_err(Refusal::Refused)?;
        match &event.event {
            Some(chat_event::Event::Finished(f)) if !f.error.is_empty() => {
                return Err(Refusal::Failed(f.error.clone()));
            }
            Some(chat_event::Event::Delta(_) | chat_event::Event::Finished(_)) => {
                seen.push(Ok(event));
                break;
            }
            _ => seen.push(Ok(event)),
        }
    }
    Ok(Box::pin(futures_util::stream::iter(seen).chain(events)))
}
