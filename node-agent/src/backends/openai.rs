//! An OpenAI-compatible server: `GET {base}/models` and `POST {base}/chat/completions` with
//! server-sent events, parsed by `eventsource-stream`. Which server it is (from the models'
//! `owned_by`) decides how a trailing assistant message is treated: llama.cpp's server continues
//! it, vLLM does when asked to, others (llama-cpp-python, LM Studio) answer it as a new turn.
//! It also decides where the server's own tokenizer is asked to count tokens.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use kowalski_exo_common::proto::{
    GenerateDelta, GenerateEvent, GenerateFinished, GenerateRequest, generate_event,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    BackendError, DiscoveredModel, GenerationStream, get_json, refused, stream::spawn_stream,
    unreachable,
};

#[derive(Clone, Debug)]
pub struct OpenAi {
    base: String,
    client: reqwest::Client,
    /// The server behind each model, as the model list last said (a proxy such as LiteLLM
    /// lists models of several servers).
    servers: Arc<RwLock<HashMap<String, Server>>>,
}

/// The OpenAI-compatible servers whose handling of a trailing assistant message is known.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum Server {
    /// llama.cpp's own server: continues a trailing assistant message.
    LlamaCpp,
    /// vLLM: continues it with `continue_final_message`.
    Vllm,
    /// Anything else: a trailing assistant message may be answered as a new turn.
    #[default]
    Other,
}

impl Server {
    fn of(owned_by: Option<&str>) -> Self {
        match owned_by {
            Some("llamacpp") => Server::LlamaCpp,
            Some("vllm") => Server::Vllm,
            _ => Server::Other,
        }
    }

    fn continues_prefix(self) -> bool {
        self != Server::Other
    }
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelEntry>,
}

#[derive(Deserialize)]
struct ModelEntry {
    id: String,
    /// vLLM's name for the context window.
    max_model_len: Option<u32>,
    context_length: Option<u32>,
    /// llama.cpp's server reports the training context here.
    meta: Option<Value>,
    owned_by: Option<String>,
}

/// A tokenizer's answer: vLLM and llama-cpp-python count, llama.cpp lists the tokens.
#[derive(Deserialize)]
struct Tokenized {
    count: Option<u64>,
    tokens: Option<Vec<Value>>,
}

/// One streamed chunk of a chat completion.
#[derive(Deserialize, Debug, Default)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<Usage>,
}

#[derive(Deserialize, Debug, Default)]
struct Choice {
    #[serde(default)]
    delta: Delta,
    finish_reason: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
struct Delta {
    content: Option<String>,
}

#[derive(Deserialize, Debug, Default, Clone, Copy)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
}

impl OpenAi {
    pub fn new(base: &str, client: reqwest::Client) -> Self {
        OpenAi {
            base: base.trim_end_matches('/').to_string(),
            client,
            servers: Arc::default(),
        }
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    pub async fn models(&self) -> Result<Vec<DiscoveredModel>, BackendError> {
        let list: ModelList = get_json(
            &self.client,
            &self.base,
            "/models",
            "the model list is not what the OpenAI API sends",
        )
        .await?;
        let servers: HashMap<String, Server> = list
            .data
            .iter()
            .map(|m| (m.id.clone(), Server::of(m.owned_by.as_deref())))
            .collect();
        *self.servers.write().expect("servers lock poisoned") = servers.clone();
        Ok(list
            .data
            .into_iter()
            .map(|m| DiscoveredModel {
                context_window: m.max_model_len.or(m.context_length).or_else(|| {
                    m.meta
                        .as_ref()?
                        .get("n_ctx_train")?
                        .as_u64()
                        .map(|n| n as u32)
                }),
                continues_prefix: servers[&m.id].continues_prefix(),
                name: m.id,
            })
            .collect())
    }

    /// The server behind `model`, as the model list last said.
    fn server(&self, model: &str) -> Server {
        self.servers
            .read()
            .expect("servers lock poisoned")
            .get(model)
            .copied()
            .unwrap_or_default()
    }

    /// The tokens of `text` in `model`, counted by the server's own tokenizer beside the API
    /// base: `POST /tokenize` on llama.cpp's server and vLLM, `POST /extras/tokenize/count` on
    /// llama-cpp-python. A server that has no such route has no tokenizer to offer.
    pub async fn count_tokens(&self, model: &str, text: &str) -> Result<u64, BackendError> {
        let root = self.base.strip_suffix("/v1").unwrap_or(&self.base);
        let (path, body) = match self.server(model) {
            Server::LlamaCpp => ("/tokenize", json!({"content": text})),
            Server::Vllm => ("/tokenize", json!({"model": model, "prompt": text})),
            Server::Other => (
                "/extras/tokenize/count",
                json!({"model": model, "input": text}),
            ),
        };
        let response = self
            .client
            .post(format!("{root}{path}"))
            .json(&body)
            .send()
            .await
            .map_err(|e| unreachable(&self.base, e))?;
        if matches!(response.status().as_u16(), 404 | 405) {
            return Err(BackendError::NoTokenizer {
                url: self.base.clone(),
            });
        }
        if !response.status().is_success() {
            return Err(refused(&self.base, response).await);
        }
        let malformed = |reason: String| BackendError::Malformed {
            url: self.base.clone(),
            reason,
        };
        let answer: Tokenized = response
            .json()
            .await
            .map_err(|e| malformed(format!("the tokenizer's answer is not what it sends: {e}")))?;
        answer
            .count
            .or(answer.tokens.map(|t| t.len() as u64))
            .ok_or_else(|| malformed("the tokenizer's answer has no count and no tokens".into()))
    }

    pub async fn generate(
        &self,
        request: &GenerateRequest,
    ) -> Result<GenerationStream, BackendError> {
        let server = self.server(&request.model);
        let response = self
            .client
            .post(format!("{}/chat/completions", self.base))
            .json(&body(request, server))
            .send()
            .await
            .map_err(|e| unreachable(&self.base, e))?;
        if !response.status().is_success() {
            return Err(refused(&self.base, response).await);
        }
        let url = self.base.clone();
        let mut events = response.bytes_stream().eventsource();
        Ok(spawn_stream(move |sink| async move {
            let mut finish: Option<String> = None;
            let mut usage: Option<Usage> = None;
            // Servers that send no usage (llama-cpp-python) stream one token per chunk.
            let mut chunks_with_text = 0;
            loop {
                let event = tokio::select! {
                    event = events.next() => event,
                    _ = sink.closed() => return Ok(()),
                };
                let Some(event) = event else { break };
                let event = event.map_err(|e| BackendError::Malformed {
                    url: url.clone(),
                    reason: format!("the event stream broke: {e}"),
                })?;
                if event.data.trim() == "[DONE]" {
                    break;
                }
                let chunk: Chunk =
                    serde_json::from_str(&event.data).map_err(|e| BackendError::Malformed {
                        url: url.clone(),
                        reason: format!("a chunk is not JSON ({e}): {}", event.data),
                    })?;
                if chunk.usage.is_some() {
                    usage = chunk.usage;
                }
                for choice in chunk.choices {
                    if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                        chunks_with_text += 1;
                        if !sink.send(delta(text)).await {
                            return Ok(());
                        }
                    }
                    if choice.finish_reason.is_some() {
                        finish = choice.finish_reason;
                    }
                }
            }
            let reason = finish.ok_or_else(|| BackendError::Malformed {
                url,
                reason: "the stream ended before the answer finished".into(),
            })?;
            let usage = usage.unwrap_or(Usage {
                prompt_tokens: 0,
                completion_tokens: chunks_with_text,
            });
            sink.send(finished(
                reason,
                usage.prompt_tokens,
                usage.completion_tokens,
            ))
            .await;
            Ok(())
        }))
    }
}

/// The request body: the conversation, streaming with usage, and the sampling options set.
fn body(request: &GenerateRequest, server: Server) -> Value {
    let messages: Vec<Value> = request
        .messages
        .iter()
        .map(|m| json!({"role": m.role, "content": m.content}))
        .collect();
    let mut body = json!({
        "model": request.model,
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let ends_with_answer = request
        .messages
        .last()
        .is_some_and(|m| m.role == "assistant");
    if server == Server::Vllm && ends_with_answer {
        body["continue_final_message"] = json!(true);
        body["add_generation_prompt"] = json!(false);
    }
    if let Some(options) = &request.options {
        if let Some(t) = options.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(p) = options.top_p {
            body["top_p"] = json!(p);
        }
        if options.max_tokens > 0 {
            body["max_tokens"] = json!(options.max_tokens);
        }
        if !options.stop.is_empty() {
            body["stop"] = json!(options.stop);
        }
        if let Some(seed) = options.seed {
            body["seed"] = json!(seed);
        }
    }
    body
}

pub(super) fn delta(text: String) -> GenerateEvent {
    GenerateEvent {
        event: Some(generate_event::Event::Delta(GenerateDelta { text })),
    }
}

pub(super) fn finished(
    reason: String,
    prompt_tokens: u32,
    completion_tokens: u32,
) -> GenerateEvent {
    GenerateEvent {
        event: Some(generate_event::Event::Finished(GenerateFinished {
            finish_reason: reason,
            prompt_tokens,
            completion_tokens,
        })),
    }
}

#[cfg(test)]
mod tests {
    use kowalski_exo_common::proto::{ChatMessage, SamplingOptions};

    use super::*;

    #[test]
    fn the_body_streams_with_usage_and_carries_only_the_options_set() {
        let request = GenerateRequest {
            model: "tiny".into(),
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }],
            options: Some(SamplingOptions {
                temperature: Some(0.5),
                max_tokens: 8,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            body(&request, Server::Other),
            json!({
                "model": "tiny",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": true,
                "stream_options": {"include_usage": true},
                "temperature": 0.5,
                "max_tokens": 8,
            })
        );
    }

    #[test]
    fn vllm_is_asked_to_continue_a_trailing_assistant_message_and_no_other_server_is() {
        let request = GenerateRequest {
            model: "m".into(),
            messages: vec![
                ChatMessage {
                    role: "user".into(),
                    content: "Count.".into(),
                },
                ChatMessage {
                    role: "assistant".into(),
                    content: "1, 2,".into(),
                },
            ],
            ..Default::default()
        };
        let vllm = body(&request, Server::Vllm);
        assert_eq!(vllm["continue_final_message"], json!(true));
        assert_eq!(vllm["add_generation_prompt"], json!(false));
        for server in [Server::LlamaCpp, Server::Other] {
            assert!(
                body(&request, server)
                    .get("continue_final_message")
                    .is_none()
            );
        }
        assert!(Server::of(Some("llamacpp")).continues_prefix());
        assert!(Server::of(Some("vllm")).continues_prefix());
        assert!(!Server::of(Some("me")).continues_prefix());
        assert!(!Server::of(None).continues_prefix());
    }
}
