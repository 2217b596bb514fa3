//! The coordinator's HTTP API (axum): health, metrics, the dashboard, and the OpenAI-, Ollama-
//! and Anthropic-compatible APIs over the cluster's models. With TLS, every route but `/healthz`
//! sits behind the API keys (`Authorization: Bearer KEY`, Basic with the key as password, as a
//! browser sends it to the dashboard, or Anthropic's `x-api-key`), a refusal answered with 401
//! in the route's own API's error format.

mod anthropic;
mod dashboard;
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

use kowalski_exo_common::security::gate::{self, Gate};

use crate::service::{ChatReceiver, ClusterService};

/// Every route of the HTTP API; with `keys`, all but `/healthz` need one, within its rate.
pub fn router(cluster: ClusterService, keys: Option<Arc<Gate>>) -> Router {
    Router::new()
        .merge(dashboard::routes(&cluster))
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

/// Passes a request on when its key is one in force (or no keys are asked for) and within its
/// rate; otherwise answers 401 or 429 as the route's API would.
async fn require_key(
    keys: Option<Arc<Gate>>,
    request: Request,
    next: Next,
) -> axum::response::Response {
    let Some(gate) = keys else {
        return next.run(request).await;
    };
    let headers = request.headers();
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let basic = authorization.and_then(basic_password);
    let presented = basic
        .as_deref()
        .or_else(|| authorization.map(kowalski_exo_common::security::bearer))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
    match gate.admit(presented) {
        Ok(_) => next.run(request).await,
        Err(refusal) => {
            let path = request.uri().path().to_string();
            // Read what the client is still sending (up to a bound) before answering: an HTTP/2
            // stream answered mid-upload is reset, and clients report that instead of the 401.
            let _ = axum::body::to_bytes(request.into_body(), REFUSED_BODY_READ).await;
            turned_away(&path, &refusal)
        }
    }
}

/// The password of `Basic BASE64(USER:PASSWORD)`: the key a browser was given for the dashboard.
fn basic_password(authorization: &str) -> Option<String> {
    use base64::Engine;
    let encoded = authorization.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':')
        .map(|(_, password)| password.to_string())
}

/// The most of a refused request's body read before answering it.
const REFUSED_BODY_READ: usize = 1024 * 1024;

/// A 401 (no key in force) or 429 (over the key's rate, with Retry-After) in the error format
/// of the API `path` belongs to.
fn turned_away(path: &str, refusal: &gate::Refusal) -> axum::response::Response {
    let message = refusal.to_string();
    let (status, anthropic_type, openai_type, openai_code) = match refusal {
        gate::Refusal::Key(_) => (
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_request_error",
            "invalid_api_key",
        ),
        gate::Refusal::Rate { .. } => (
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "rate_limit_exceeded",
            "rate_limit_exceeded",
        ),
    };
    let mut response = if path.starts_with("/api/") {
        (status, axum::Json(serde_json::json!({"error": message}))).into_response()
    } else if path.starts_with("/v1/messages") {
        let body = serde_json::json!({"type": "error", "error": {"type": anthropic_type, "message": message}});
        (status, axum::Json(body)).into_response()
    } else if path.starts_with("/v1/") {
        let body = serde_json::json!({"error": {"message": message, "type": openai_type, "param": null, "code": openai_code}});
        (status, axum::Json(body)).into_response()
    } else {
        let mut response = (status, message).into_response();
        // The dashboard's pages: a browser asks its user for the key (as the password).
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"Kowalski Exo\", charset=\"UTF-8\""),
            );
        }
        response
    };
    if let gate::Refusal::Rate { retry_after, .. } = refusal {
        let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
    }
    response
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::to_bytes;

    use super::*;

    async fn body(response: axum::response::Response) -> Value {
        let bytes = to_bytes(response.into_body(), 1 << 16).await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn an_exhausted_key_gets_429_with_retry_after_in_each_apis_format() {
        let refusal = gate::Refusal::Rate {
            key: "flood".into(),
            rate: 10,
            burst: 20,
            retry_after: Duration::from_millis(1500),
        };
        let openai = turned_away("/v1/chat/completions", &refusal);
        assert_eq!(openai.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(openai.headers()[header::RETRY_AFTER], "2");
        let error = &body(openai).await["error"];
        assert_eq!(error["type"], "rate_limit_exceeded");
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("more than 10 requests per second")
        );
        let anthropic = body(turned_away("/v1/messages", &refusal)).await;
        assert_eq!(anthropic["error"]["type"], "rate_limit_error");
        let ollama = turned_away("/api/chat", &refusal);
        assert_eq!(ollama.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(
            body(ollama).await["error"]
                .as_str()
                .unwrap()
                .contains("'flood'")
        );
        let unknown = turned_away(
            "/v1/models",
            &gate::Refusal::Key(kowalski_exo_common::security::trust::KeyRefused::Unknown),
        );
        assert_eq!(unknown.status(), StatusCode::UNAUTHORIZED);
        assert!(unknown.headers().get(header::RETRY_AFTER).is_none());
        assert_eq!(body(unknown).await["error"]["code"], "invalid_api_key");
        assert!(unknown_has_no_basic_prompt());
        let page = turned_away(
            "/",
            &gate::Refusal::Key(kowalski_exo_common::security::trust::KeyRefused::Unknown),
        );
        assert_eq!(page.status(), StatusCode::UNAUTHORIZED);
        assert!(
            page.headers()[header::WWW_AUTHENTICATE]
                .to_str()
                .unwrap()
                .starts_with("Basic realm=")
        );
    }

    /// The APIs' refusals do not make a browser prompt for a password.
    fn unknown_has_no_basic_prompt() -> bool {
        let refused = turned_away(
            "/v1/models",
            &gate::Refusal::Key(kowalski_exo_common::security::trust::KeyRefused::Unknown),
        );
        refused.headers().get(header::WWW_AUTHENTICATE).is_none()
    }

    #[test]
    fn a_browser_sends_the_key_as_the_basic_password() {
        use base64::Engine;
        let encoded = base64::engine::general_purpose::STANDARD.encode("anyone:kx_key:with:colons");
        assert_eq!(
            basic_password(&format!("Basic {encoded}")).as_deref(),
            Some("kx_key:with:colons")
        );
        assert_eq!(basic_password("Bearer kx_key"), None);
        assert_eq!(basic_password("Basic !!!"), None);
    }
}
