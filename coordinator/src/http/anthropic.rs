//! The Anthropic-compatible API: `POST /v1/messages`, whole or streamed with its event types
//! (message_start, content_block_start, content_block_delta, content_block_stop, message_delta,
//! message_stop).

use std::convert::Infallible;

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::post,
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
    Router::new().route("/v1/messages", post(messages))
}

/// An error in Anthropic's shape.
struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"type": "error", "error": {"type": self.1, "message": self.2}});
        (self.0, Json(body)).into_response()
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        let status = refusal.status();
        let kind = match status {
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_client_error() => "invalid_request_error",
            _ => "api_error",
        };
        ApiError(status, kind, refusal.message())
    }
}

impl From<CoordinatorError> for ApiError {
    fn from(err: CoordinatorError) -> Self {
        let message = err.to_string();
        match Status::from(err).code() {
            tonic::Code::NotFound => ApiError(StatusCode::NOT_FOUND, "not_found_error", message),
            tonic::Code::InvalidArgument => {
                ApiError(StatusCode::BAD_REQUEST, "invalid_request_error", message)
            }
            _ => ApiError(StatusCode::SERVICE_UNAVAILABLE, "overloaded_error", message),
        }
    }
}

#[derive(Deserialize)]
struct MessagesRequest {
    model: String,
    max_tokens: u32,
    messages: Vec<Message>,
    system: Option<Content>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    stream: bool,
    tools: Option<Value>,
    /// Ours, for `rlm:` models: the context the loop reads.
    context: Option<Value>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Content,
}

/// Anthropic's name for why an answer stopped.
fn stop_reason(finish_reason: &str) -> &'static str {
    match finish_reason {
        "length" => "max_tokens",
        _ => "end_turn",
    }
}

async fn messages(
    State(cluster): State<ClusterService>,
    headers: HeaderMap,
    body: Result<Json<MessagesRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            e.body_text(),
        )
    })?;
    if offers_tools(&body.tools) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            NO_TOOLS.into(),
        ));
    }
    let mut messages: Vec<ChatMessage> = body
        .system
        .map(|system| ChatMessage {
            role: "system".into(),
            content: system.text(),
        })
        .into_iter()
        .collect();
    messages.extend(body.messages.into_iter().map(|m| ChatMessage {
        role: m.role,
        content: m.content.text(),
    }));
    let model = body.model.clone();
    let (context, context_is_json) = crate::rlm::chat::context_field(body.context);
    let request = ChatRequest {
        context,
        context_is_json,
        model: body.model,
        messages,
        options: Some(SamplingOptions {
            temperature: body.temperature,
            top_p: body.top_p,
            max_tokens: body.max_tokens,
            stop: body.stop_sequences.unwrap_or_default(),
            seed: None,
        }),
        conversation_id: conversation(&headers),
        ..Default::default()
    };
    let events = opened(cluster.chat(request, None)?).await?;
    let id = format!(
        "msg_{:x}",
        std::hash::BuildHasher::hash_one(
            &std::hash::RandomState::new(),
            std::time::SystemTime::now()
        )
    );
    if body.stream {
        return Ok(Sse::new(stream(events, id, model))
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    whole(events, id, model).await
}

fn message(id: &str, model: &str, content: Value, stop: Value, input: u32, output: u32) -> Value {
    json!({
        "id": id, "type": "message", "role": "assistant", "model": model, "content": content,
        "stop_reason": stop, "stop_sequence": null,
        "usage": {"input_tokens": input, "output_tokens": output},
    })
}

fn stream(
    events: impl Stream<Item = Result<ChatEvent, Status>> + Send + 'static,
    id: String,
    model: String,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let named = |name: &str, data: Value| Event::default().event(name).data(data.to_string());
    let start = vec![
        named(
            "message_start",
            json!({"type": "message_start", "message": message(&id, &model, json!([]), Value::Null, 0, 0)}),
        ),
        named(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
    ];
    let body = events.flat_map(move |event| {
        let out = match event {
            Ok(ChatEvent {
                event: Some(chat_event::Event::Delta(d)),
            }) => vec![named(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": d.text}}),
            )],
            Ok(ChatEvent {
                event: Some(chat_event::Event::Finished(f)),
            }) if f.error.is_empty() => {
                let mut last = json!({"type": "message_delta",
                       "delta": {"stop_reason": stop_reason(&f.finish_reason), "stop_sequence": null},
                       "usage": {"output_tokens": f.completion_tokens}});
                mark_failovers(&mut last, &f);
                vec![
                    named("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
                    named("message_delta", last),
                    named("message_stop", json!({"type": "message_stop"})),
                ]
            }
            Ok(ChatEvent {
                event: Some(chat_event::Event::Finished(f)),
            }) => vec![named(
                "error",
                json!({"type": "error", "error": {"type": "api_error", "message": f.error}}),
            )],
            Ok(_) => Vec::new(),
            Err(status) => vec![named(
                "error",
                json!({"type": "error", "error": {"type": "invalid_request_error", "message": status.message()}}),
            )],
        };
        futures_util::stream::iter(out)
    });
    futures_util::stream::iter(start).chain(body).map(Ok)
}

async fn whole(
    mut events: impl Stream<Item = Result<ChatEvent, Status>> + Unpin,
    id: String,
    model: String,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(event) = events.next().await {
        let event = event.map_err(|s| {
            ApiError(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                s.message().into(),
            )
        })?;
        match event.event {
            Some(chat_event::Event::Delta(d)) => text.push_str(&d.text),
            Some(chat_event::Event::Finished(f)) if !f.error.is_empty() => {
                return Err(ApiError(StatusCode::BAD_GATEWAY, "api_error", f.error));
            }
            Some(chat_event::Event::Finished(f)) => {
                let content = json!([{"type": "text", "text": text}]);
                let stop = json!(stop_reason(&f.finish_reason));
                let body = message(
                    &id,
                    &model,
                    content,
                    stop,
                    f.prompt_tokens,
                    f.completion_tokens,
                );
                return Ok(with_failovers(Json(body).into_response(), &f));
            }
            _ => {}
        }
    }
    Err(ApiError(
        StatusCode::BAD_GATEWAY,
        "api_error",
        "the answer ended without finishing".into(),
    ))
}
