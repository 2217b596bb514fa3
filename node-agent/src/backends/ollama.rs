//! Ollama's own API: `GET /api/tags` and `POST /api/show` for the models and their context
//! windows, `POST /api/chat` streaming one JSON object per line.

use futures_util::StreamExt;
use kowalski_exo_common::proto::GenerateRequest;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    BackendError, DiscoveredModel, GenerationStream, get_json,
    openai::{delta, finished},
    refused,
    stream::spawn_stream,
    unreachable,
};

#[derive(Clone, Debug)]
pub struct Ollama {
    url: String,
    client: reqwest::Client,
}

#[derive(Deserialize)]
struct Tags {
    models: Vec<Tag>,
}

#[derive(Deserialize)]
struct Tag {
    name: String,
}

/// One line of a streamed chat answer.
#[derive(Deserialize, Debug, Default)]
struct Line {
    message: Option<Message>,
    #[serde(default)]
    done: bool,
    done_reason: Option<String>,
    #[serde(default)]
    prompt_eval_count: u32,
    #[serde(default)]
    eval_count: u32,
    error: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
struct Message {
    #[serde(default)]
    content: String,
}

impl Ollama {
    pub fn new(url: &str, client: reqwest::Client) -> Self {
        Ollama {
            url: url.trim_end_matches('/').to_string(),
            client,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn models(&self) -> Result<Vec<DiscoveredModel>, BackendError> {
        let tags: Tags = get_json(
            &self.client,
            &self.url,
            "/api/tags",
            "the model list is not what Ollama sends",
        )
        .await?;
        let mut models = Vec::new();
        for tag in tags.models {
            models.push(DiscoveredModel {
                context_window: self.context_window(&tag.name).await,
                name: tag.name,
                // Ollama renders a trailing assistant message as the start of the answer.
                continues_prefix: true,
            });
        }
        Ok(models)
    }

    /// `model_info["<architecture>.context_length"]` from /api/show, when it says.
    async fn context_window(&self, model: &str) -> Option<u32> {
        let shown: Value = self
            .client
            .post(format!("{}/api/show", self.url))
            .json(&json!({"model": model}))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        shown
            .get("model_info")?
            .as_object()?
            .iter()
            .find(|(key, _)| key.ends_with(".context_length"))?
            .1
            .as_u64()
            .map(|n| n as u32)
    }

    pub async fn generate(
        &self,
        request: &GenerateRequest,
    ) -> Result<GenerationStream, BackendError> {
        let response = self
            .client
            .post(format!("{}/api/chat", self.url))
            .json(&body(request))
            .send()
            .await
            .map_err(|e| unreachable(&self.url, e))?;
        if !response.status().is_success() {
            return Err(refused(&self.url, response).await);
        }
        let url = self.url.clone();
        let mut bytes = response.bytes_stream();
        Ok(spawn_stream(move |sink| async move {
            let mut pending: Vec<u8> = Vec::new();
            loop {
                let read = tokio::select! {
                    read = bytes.next() => read,
                    _ = sink.closed() => return Ok(()),
                };
                let Some(read) = read else { break };
                let chunk = read.map_err(|e| BackendError::Malformed {
                    url: url.clone(),
                    reason: format!("the answer broke off: {e}"),
                })?;
                pending.extend_from_slice(&chunk);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let raw: Vec<u8> = pending.drain(..=end).collect();
                    let text = String::from_utf8_lossy(&raw);
                    if text.trim().is_empty() {
                        continue;
                    }
                    let line: Line =
                        serde_json::from_str(text.trim()).map_err(|e| BackendError::Malformed {
                            url: url.clone(),
                            reason: format!("a line is not JSON ({e}): {}", text.trim()),
                        })?;
                    if let Some(message) = line.error {
                        return Err(BackendError::Refused {
                            url,
                            status: 200,
                            message,
                        });
                    }
                    if let Some(text) = line.message.map(|m| m.content).filter(|t| !t.is_empty())
                        && !sink.send(delta(text)).await
                    {
                        return Ok(());
                    }
                    if line.done {
                        let reason = line.done_reason.unwrap_or_else(|| "stop".into());
                        sink.send(finished(reason, line.prompt_eval_count, line.eval_count))
                            .await;
                        return Ok(());
                    }
                }
            }
            Err(BackendError::Malformed {
                url,
                reason: "the answer ended before Ollama said it was done".into(),
            })
        }))
    }
}

/// The request body: the conversation, streaming, and the options set in Ollama's names.
fn body(request: &GenerateRequest) -> Value {
    let messages: Vec<Value> = request
        .messages
        .iter()
        .map(|m| json!({"role": m.role, "content": m.content}))
        .collect();
    let mut options = serde_json::Map::new();
    if let Some(o) = &request.options {
        if let Some(t) = o.temperature {
            options.insert("temperature".into(), json!(t));
        }
        if let Some(p) = o.top_p {
            options.insert("top_p".into(), json!(p));
        }
        if o.max_tokens > 0 {
            options.insert("num_predict".into(), json!(o.max_tokens));
        }
        if !o.stop.is_empty() {
            options.insert("stop".into(), json!(o.stop));
        }
        if let Some(seed) = o.seed {
            options.insert("seed".into(), json!(seed));
        }
    }
    json!({
        "model": request.model,
        "messages": messages,
        "stream": true,
        "options": options,
    })
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use kowalski_exo_common::proto::{ChatMessage, GenerateEvent, generate_event::Event};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// A scripted Ollama: answers each path with its body (and the end of the stream closes
    /// the connection), so tests can make it misbehave on cue.
    async fn scripted(routes: Vec<(&'static str, String)>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let routes = routes.clone();
                tokio::spawn(async move {
                    let mut request = vec![0u8; 64 * 1024];
                    let n = socket.read(&mut request).await.unwrap_or(0);
                    let head = String::from_utf8_lossy(&request[..n]).to_string();
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    let body = routes
                        .iter()
                        .find(|(p, _)| *p == path)
                        .map(|(_, b)| b.clone());
                    let response = match body {
                        Some(body) => format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\nconnection: close\r\n\r\n{body}"
                        ),
                        None => "HTTP/1.1 404 Not Found\r\ncontent-length: 31\r\nconnection: close\r\n\r\n{\"error\":\"model 'x' not found\"}".to_string(),
                    };
                    let _ = socket.write_all(response.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        url
    }

    fn chat(model: &str) -> GenerateRequest {
        GenerateRequest {
            model: model.into(),
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }],
            ..Default::default()
        }
    }

    async fn collect(ollama: &Ollama, model: &str) -> Vec<Result<GenerateEvent, String>> {
        let stream = match ollama.generate(&chat(model)).await {
            Ok(stream) => stream,
            Err(e) => return vec![Err(e.to_string())],
        };
        stream.map(|e| e.map_err(|e| e.to_string())).collect().await
    }

    #[tokio::test]
    async fn models_come_with_their_context_windows() {
        let url = scripted(vec![
            ("/api/tags", r#"{"models":[{"name":"llama3:8b"}]}"#.into()),
            (
                "/api/show",
                r#"{"model_info":{"llama.context_length":8192}}"#.into(),
            ),
        ])
        .await;
        let ollama = Ollama::new(&url, reqwest::Client::new());
        assert_eq!(
            ollama.models().await.unwrap(),
            [DiscoveredModel {
                name: "llama3:8b".into(),
                context_window: Some(8192),
                continues_prefix: true,
            }]
        );
    }

    #[tokio::test]
    async fn a_streamed_answer_becomes_deltas_then_one_finished_event() {
        let lines = [
            r#"{"message":{"role":"assistant","content":"Hel"},"done":false}"#,
            r#"{"message":{"role":"assistant","content":"lo"},"done":false}"#,
            r#"{"message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","prompt_eval_count":12,"eval_count":2}"#,
        ];
        let url = scripted(vec![("/api/chat", lines.join("\n") + "\n")]).await;
        let events = collect(&Ollama::new(&url, reqwest::Client::new()), "m").await;
        let events: Vec<Event> = events
            .into_iter()
            .map(|e| e.unwrap().event.unwrap())
            .collect();
        assert_eq!(events.len(), 3, "{events:?}");
        let text: String = events
            .iter()
            .filter_map(|e| match e {
                Event::Delta(d) => Some(d.text.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(text, "Hello");
        match &events[2] {
            Event::Finished(f) => {
                assert_eq!(
                    (
                        f.finish_reason.as_str(),
                        f.prompt_tokens,
                        f.completion_tokens
                    ),
                    ("stop", 12, 2)
                );
            }
            other => panic!("expected finished, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn errors_say_what_the_backend_said_or_what_broke() {
        let url = scripted(vec![(
            "/api/chat",
            concat!(
                r#"{"message":{"content":"partial"},"done":false}"#,
                "\n",
                "not json\n"
            )
            .into(),
        )])
        .await;
        let ollama = Ollama::new(&url, reqwest::Client::new());
        let events = collect(&ollama, "m").await;
        assert!(events[0].is_ok());
        let broken = events[1].as_ref().unwrap_err();
        assert!(broken.contains("a line is not JSON"), "{broken}");

        let cut = scripted(vec![(
            "/api/chat",
            r#"{"message":{"content":"partial"},"done":false}"#.to_string() + "\n",
        )])
        .await;
        let events = collect(&Ollama::new(&cut, reqwest::Client::new()), "m").await;
        let cut_short = events.last().unwrap().as_ref().unwrap_err();
        assert!(
            cut_short.contains("ended before Ollama said it was done"),
            "{cut_short}"
        );

        let refused = scripted(vec![]).await;
        let events = collect(&Ollama::new(&refused, reqwest::Client::new()), "x").await;
        assert_eq!(
            events[0].as_ref().unwrap_err(),
            &format!("the backend at {refused} answered 404: model 'x' not found")
        );
    }
}
