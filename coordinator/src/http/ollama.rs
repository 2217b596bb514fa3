//! The Ollama-compatible API: `GET /api/tags`, `POST /api/chat` and `POST /api/generate`,
//! streaming one JSON object per line (Ollama's default) or answering whole with
//! `"stream": false`. Kowalski's own client speaks this API, so it can use the whole cluster.

use std::time::SystemTime;

use axum::{
    Json, Router,
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use futures_util::StreamExt;
use kowalski_exo_common::proto::{
    ChatEvent, ChatMessage, ChatRequest, SamplingOptions, chat_event,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tonic::Status;

use super::{
    NO_TOOLS, Refusal, conversation, mark_failovers, offers_tools, opened, with_failovers,
};
use crate::{error::CoordinatorError, service::ClusterService};

pub fn routes() -> Router<ClusterService> {
    Router::new()
        .route("/api/tags", get(tags))
        .route("/api/chat", post(chat))
        .route("/api/generate", post(generate))
}

/// An error as Ollama sends one: `{"error": "..."}` with the HTTP status.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        ApiError(refusal.status(), refusal.message())
    }
}

impl From<CoordinatorError> for ApiError {
    fn from(err: CoordinatorError) -> Self {
        let message = err.to_string();
        let status = match Status::from(err).code() {
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(status, message)
    }
}

async fn tags(State(cluster): State<ClusterService>) -> Json<Value> {
    let models: Vec<Value> = cluster
        .chat_model_names()
        .into_iter()
        .map(|name| {
            json!({"name": name, "model": name, "modified_at": "1970-01-01T00:00:00Z",
                   "size": 0, "digest": "", "details": {}})
        })
        .collect();
    Json(json!({"models": models}))
}

#[derive(Deserialize, Default)]
struct Options {
    temperature: Option<f32>,
    top_p: Option<f32>,
    num_predict: Option<i64>,
    stop: Option<Vec<String>>,
    seed: Option<i64>,
}

impl Options {
    fn sampling(self) -> SamplingOptions {
        SamplingOptions {
            temperature: self.temperature,
            top_p: self.top_p,
            // Ollama's -1 (and -2) mean "no limit".
            max_tokens: self.num_predict.filter(|n| *n > 0).map_or(0, |n| n as u32),
            stop: self.stop.unwrap_or_default(),
            seed: self.seed,
        }
    }
}

#[derive(Deserialize)]
struct OllamaMessage {
    role: String,
    #[serde(default)]
    content: String,
}

#[derive(Deserialize)]
struct ChatBody {
    model: String,
    messages: Vec<OllamaMessage>,
    /// Ours, for `rlm:` models: the context the loop reads.
    context: Option<Value>,
    stream: Option<bool>,
    options: Option<Options>,
    tools: Option<Value>,
}

#[derive(Deserialize)]
struct GenerateBody {
    model: String,
    prompt: String,
    system: Option<String>,
    stream: Option<bool>,
    options: Option<Options>,
}

/// What one line of an answer carries: a chat message or a generate response.
#[derive(Clone, Copy)]
enum Shape {
    Chat,
    Generate,
}

impl Shape {
    fn line(self, model: &str, text: &str, done: Option<(&str, u32, u32)>) -> Value {
        let mut line = json!({"model": model, "created_at": now(), "done": done.is_some()});
        match self {
            Shape::Chat => line["message"] = json!({"role": "assistant", "content": text}),
            Shape::Generate => line["response"] = json!(text),
        }
        if let Some((reason, prompt, completion)) = done {
            line["done_reason"] = json!(reason);
            line["prompt_eval_count"] = json!(prompt);
            line["eval_count"] = json!(completion);
        }
        line
    }
}

/// The time now as Ollama writes it, RFC 3339 in UTC.
fn now() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

async fn chat(
    State(cluster): State<ClusterService>,
    headers: HeaderMap,
    body: Result<Json<ChatBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    if offers_tools(&body.tools) {
        return Err(ApiError(StatusCode::BAD_REQUEST, NO_TOOLS.into()));
    }
    let (context, context_is_json) = crate::rlm::chat::context_field(body.context);
    let request = ChatRequest {
        context,
        context_is_json,
        model: body.model,
        messages: body
            .messages
            .into_iter()
            .map(|m| ChatMessage {
                role: m.role,
                content: m.content,
            })
            .collect(),
        options: Some(body.options.unwrap_or_default().sampling()),
        conversation_id: conversation(&headers),
        ..Default::default()
    };
    answer(cluster, request, body.stream.unwrap_or(true), Shape::Chat).await
}

async fn generate(
    State(cluster): State<ClusterService>,
    headers: HeaderMap,
    body: Result<Json<GenerateBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let mut messages: Vec<ChatMessage> = body
        .system
        .map(|content| ChatMessage {
            role: "system".into(),
            content,
        })
        .into_iter()
        .collect();
    messages.push(ChatMessage {
        role: "user".into(),
        content: body.prompt,
    });
    let request = ChatRequest {
        model: body.model,
        messages,
        options: Some(body.options.unwrap_or_default().sampling()),
        conversation_id: conversation(&headers),
        ..Default::default()
    };
    answer(
        cluster,
        request,
        body.stream.unwrap_or(true),
        Shape::Generate,
    )
    .await
}

async fn answer(
    cluster: ClusterService,
    request: ChatRequest,
    stream: bool,
    shape: Shape,
) -> Result<Response, ApiError> {
    let model = request.model.clone();
    let events = opened(cluster.chat(request, None)?).await?;
    if stream {
        let lines = events.filter_map(move |event| {
            let line = line_for(shape, &model, event);
            async move { line.map(|l| Ok::<_, std::io::Error>(format!("{l}\n"))) }
        });
        return Ok((
            [(header::CONTENT_TYPE, "application/x-ndjson")],
            Body::from_stream(lines),
        )
            .into_response());
    }
    let mut events = events;
    let mut text = String::new();
    while let Some(event) = events.next().await {
        match event
            .map_err(|s| ApiError(StatusCode::BAD_REQUEST, s.message().to_string()))?
            .event
        {
            Some(chat_event::Event::Delta(d)) => text.push_str(&d.text),
            Some(chat_event::Event::Finished(f)) if !f.error.is_empty() => {
                return Err(ApiError(StatusCode::BAD_GATEWAY, f.error));
            }
            Some(chat_event::Event::Finished(f)) => {
                let done = (
                    f.finish_reason.as_str(),
                    f.prompt_tokens,
                    f.completion_tokens,
                );
                let body = Json(shape.line(&model, &text, Some(done)));
                return Ok(with_failovers(body.into_response(), &f));
            }
            _ => {}
        }
    }
    Err(ApiError(
        StatusCode::BAD_GATEWAY,
        "the answer ended without finishing".into(),
    ))
}

/// The line for one chat event, if it makes one.
fn line_for(shape: Shape, model: &str, event: Result<ChatEvent, Status>) -> Option<Value> {
    match event {
        Ok(ChatEvent {
            event: Some(chat_event::Event::Delta(d)),
        }) => Some(shape.line(model, &d.text, None)),
        Ok(ChatEvent {
            event: Some(chat_event::Event::Finished(f)),
        }) if f.error.is_empty() => {
            let done = (
                f.finish_reason.as_str(),
                f.prompt_tokens,
                f.completion_tokens,
            );
            let mut last = shape.line(model, "", Some(done));
            mark_failovers(&mut last, &f);
            Some(last)
        }
        Ok(ChatEvent {
            event: Some(chat_event::Event::Finished(f)),
        }) => Some(json!({"error": f.error})),
        Ok(_) => None,
        Err(status) => Some(json!({"error": status.message()})),
    }
}
