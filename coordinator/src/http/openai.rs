//! The OpenAI-compatible API: `GET /v1/models` and `POST /v1/chat/completions`, streaming
//! (server-sent chunks, usage last when asked, then `[DONE]`) and not. Errors come in OpenAI's
//! error body with the matching HTTP status. A failover shows only as the stream going on.

use std::{
    convert::Infallible,
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{get, post},
};
use futures_util::{Stream, StreamExt};
use kowalski_exo_common::proto::{
    ChatEvent, ChatMessage, ChatRequest, SamplingOptions, chat_event,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tonic::Status;

use super::{
    Content, NO_TOOLS, Refusal, conversation, mark_failovers, offers_tools, opened, with_failovers,
};
use crate::{error::CoordinatorError, service::ClusterService};

pub fn routes() -> Router<ClusterService> {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
}

/// An error in OpenAI's shape.
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    message: String,
}

impl ApiError {
    fn invalid(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            message: message.into(),
        }
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        let status = refusal.status();
        ApiError {
            status,
            kind: if status.is_client_error() {
                "invalid_request_error"
            } else {
                "server_error"
            },
            code: (status == StatusCode::NOT_FOUND).then_some("model_not_found"),
            message: refusal.message(),
        }
    }
}

impl From<CoordinatorError> for ApiError {
    fn from(err: CoordinatorError) -> Self {
        let message = err.to_string();
        match Status::from(err).code() {
            tonic::Code::NotFound => ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "invalid_request_error",
                code: Some("model_not_found"),
                message,
            },
            tonic::Code::InvalidArgument => ApiError::invalid(message),
            _ => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "server_error",
                code: None,
                message,
            },
        }
    }
}

async fn models(State(cluster): State<ClusterService>) -> Json<Value> {
    let data: Vec<Value> = cluster
        .chat_model_names()
        .into_iter()
        .map(
            |name| json!({"id": name, "object": "model", "created": 0, "owned_by": "kowalski-exo"}),
        )
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// The fields of a chat completion request this API reads.
#[derive(Deserialize)]
struct CompletionRequest {
    model: String,
    messages: Vec<Message>,
    /// Ours, for `rlm:` models: the context the loop reads.
    context: Option<Value>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    stop: Option<Stop>,
    seed: Option<i64>,
    n: Option<u32>,
    tools: Option<Value>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Content,
}

impl CompletionRequest {
    fn into_chat(self) -> Result<(ChatRequest, bool, bool), ApiError> {
        if self.n.is_some_and(|n| n > 1) {
            return Err(ApiError::invalid(
                "n > 1 is not supported: ask once per answer",
            ));
        }
        if offers_tools(&self.tools) {
            return Err(ApiError::invalid(NO_TOOLS));
        }
        let include_usage = self.stream_options.is_some_and(|o| o.include_usage);
        let (context, context_is_json) = crate::rlm::chat::context_field(self.context);
        let request = ChatRequest {
            model: self.model,
            messages: self
                .messages
                .into_iter()
                .map(|m| ChatMessage {
                    role: m.role,
                    content: m.content.text(),
                })
                .collect(),
            options: Some(SamplingOptions {
                temperature: self.temperature,
                top_p: self.top_p,
                max_tokens: self.max_completion_tokens.or(self.max_tokens).unwrap_or(0),
                stop: match self.stop {
                    Some(Stop::One(stop)) => vec![stop],
                    Some(Stop::Many(stops)) => stops,
                    None => Vec::new(),
                },
                seed: self.seed,
            }),
            conversation_id: String::new(),
            max_attempts: 0,
            context,
            context_is_json,
        };
        Ok((request, self.stream, include_usage))
    }
}

async fn chat_completions(
    State(cluster): State<ClusterService>,
    headers: HeaderMap,
    body: Result<Json<CompletionRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::invalid(e.body_text()))?;
    let (mut request, stream, include_usage) = body.into_chat()?;
    request.conversation_id = conversation(&headers);
    let model = request.model.clone();
    let events = opened(cluster.chat(request, None)?).await?;
    let id = format!("chatcmpl-{:x}", rand_id());
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if stream {
        let chunks = chunks(events, id, model, created, include_usage);
        return Ok(Sse::new(chunks)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    whole_answer(events, id, model, created).await
}

/// The stream as OpenAI's chunks: the role first, then text, then the finish reason, usage
/// when asked, and `[DONE]`.
fn chunks(
    events: impl Stream<Item = Result<ChatEvent, Status>> + Send + 'static,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let chunk = move |delta: Value, finish: Option<String>| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    };
    let first = chunk(json!({"role": "assistant", "content": ""}), None);
    let usage_chunk = chunk.clone();
    let body = events.flat_map(move |event| {
        let lines: Vec<Value> = match event {
            Ok(ChatEvent {
                event: Some(chat_event::Event::Delta(d)),
            }) => vec![chunk(json!({"content": d.text}), None)],
            Ok(ChatEvent {
                event: Some(chat_event::Event::Finished(f)),
            }) if f.error.is_empty() => {
                let mut finish = chunk(json!({}), Some(f.finish_reason.clone()));
                mark_failovers(&mut finish, &f);
                let mut lines = vec![finish];
                if include_usage {
                    let mut usage = usage_chunk(json!({}), None);
                    usage["choices"] = json!([]);
                    usage["usage"] = json!({
                        "prompt_tokens": f.prompt_tokens,
                        "completion_tokens": f.completion_tokens,
                        "total_tokens": f.prompt_tokens + f.completion_tokens,
                    });
                    lines.push(usage);
                }
                lines
            }
            Ok(ChatEvent {
                event: Some(chat_event::Event::Finished(f)),
            }) => vec![json!({"error": {"message": f.error, "type": "server_error"}})],
            Ok(_) => Vec::new(),
            Err(status) => vec![
                json!({"error": {"message": status.message(), "type": "invalid_request_error"}}),
            ],
        };
        futures_util::stream::iter(lines)
    });
    futures_util::stream::once(async move { first })
        .chain(body)
        .map(|value| Event::default().data(value.to_string()))
        .chain(futures_util::stream::once(async {
            Event::default().data("[DONE]")
        }))
        .map(Ok)
}

/// The whole answer in one body.
async fn whole_answer(
    mut events: impl Stream<Item = Result<ChatEvent, Status>> + Unpin,
    id: String,
    model: String,
    created: u64,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(event) = events.next().await {
        match event.map_err(|s| ApiError::invalid(s.message()))?.event {
            Some(chat_event::Event::Delta(d)) => text.push_str(&d.text),
            Some(chat_event::Event::Finished(f)) if !f.error.is_empty() => {
                return Err(ApiError {
                    status: StatusCode::BAD_GATEWAY,
                    kind: "server_error",
                    code: None,
                    message: f.error,
                });
            }
            Some(chat_event::Event::Finished(f)) => {
                let body = json!({
                    "id": id, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": f.finish_reason,
                    }],
                    "usage": {
                        "prompt_tokens": f.prompt_tokens,
                        "completion_tokens": f.completion_tokens,
                        "total_tokens": f.prompt_tokens + f.completion_tokens,
                    },
                });
                return Ok(with_failovers(Json(body).into_response(), &f));
            }
            _ => {}
        }
    }
    Err(ApiError {
        status: StatusCode::BAD_GATEWAY,
        kind: "server_error",
        code: None,
        message: "the answer ended without finishing".into(),
    })
}

/// A completion id unique enough to tell answers apart.
fn rand_id() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(SystemTime::now())
}
