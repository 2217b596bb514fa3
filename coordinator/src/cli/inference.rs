//! `coordinator models` and `coordinator chat`: the cluster's models, and answers streamed to
//! stdout as they come.

use std::io::Write;

use kowalski_exo_common::{
    error_text::broken_transport,
    proto::{
        BackendKind, BackendState, ChatMessage, ChatRequest, ClusterModel, ListModelsRequest,
        SamplingOptions, chat_event,
    },
};
use serde::Serialize;
use tonic::Code;

use super::{EXIT_INFRASTRUCTURE, EXIT_NO_NODE, Failure, PREFIX, connect::Client, print_json};

/// One node and backend serving a model, as `models --json` prints it.
#[derive(Serialize, Debug, PartialEq)]
pub struct ServingLine {
    pub node: String,
    pub node_id: String,
    /// ollama or openai.
    pub backend: &'static str,
    pub backend_url: String,
    /// ready or down.
    pub state: &'static str,
    /// Tokens; null when the backend does not say.
    pub context_window: Option<u32>,
    pub in_flight: u32,
}

/// One model as `coordinator models --json` prints it. Field names are stable.
#[derive(Serialize, Debug, PartialEq)]
pub struct ModelLine {
    pub model: String,
    pub served_by: Vec<ServingLine>,
}

impl From<&ClusterModel> for ModelLine {
    fn from(model: &ClusterModel) -> Self {
        ModelLine {
            model: model.name.clone(),
            served_by: model
                .served_by
                .iter()
                .map(|p| {
                    let offer = p.offer.clone().unwrap_or_default();
                    ServingLine {
                        node: p.node_name.clone(),
                        node_id: p.node_id.clone(),
                        backend: match offer.backend() {
                            BackendKind::Ollama => "ollama",
                            _ => "openai",
                        },
                        backend_url: offer.backend_url.clone(),
                        state: match offer.state() {
                            BackendState::Ready => "ready",
                            _ => "down",
                        },
                        context_window: (offer.context_window > 0).then_some(offer.context_window),
                        in_flight: offer.in_flight,
                    }
                })
                .collect(),
        }
    }
}

/// The `coordinator models` table: one line per model and node.
pub fn models_table(models: &[ClusterModel]) -> String {
    let mut out = format!(
        "{:<24} {:<16} {:<6} {:>8} {:>9}  {}\n",
        "MODEL", "NODE", "STATE", "CONTEXT", "IN-FLIGHT", "BACKEND"
    );
    for model in models {
        for serving in ModelLine::from(model).served_by {
            out.push_str(&format!(
                "{:<24} {:<16} {:<6} {:>8} {:>9}  {} {}\n",
                model.name,
                serving.node,
                serving.state,
                serving
                    .context_window
                    .map_or("-".to_string(), |n| n.to_string()),
                serving.in_flight,
                serving.backend,
                serving.backend_url
            ));
        }
    }
    out
}

/// `coordinator models`.
pub async fn list(mut client: Client, addr: &str, json: bool) -> Result<u8, Failure> {
    let models = client
        .list_models(ListModelsRequest {})
        .await
        .map_err(|s| Failure::from_status(s, addr))?
        .into_inner()
        .models;
    if json {
        for model in &models {
            print_json(&ModelLine::from(model));
        }
    } else if models.is_empty() {
        eprintln!(
            "{PREFIX} no models yet; start agents with --ollama URL or --openai URL (or an Ollama on their default port)"
        );
    } else {
        print!("{}", models_table(&models));
    }
    Ok(0)
}

/// A chat request from the command line; the prompt from standard input when absent or "-".
pub fn request(
    model: String,
    system: Option<String>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    conversation: Option<String>,
    prompt: Option<String>,
) -> Result<ChatRequest, Failure> {
    let prompt = match prompt.as_deref() {
        None | Some("-") => super::request::read_text(std::path::Path::new("-"))?,
        Some(text) => text.to_string(),
    };
    let message = |role: &str, content: String| ChatMessage {
        role: role.into(),
        content,
    };
    let mut messages: Vec<ChatMessage> = system.map(|s| message("system", s)).into_iter().collect();
    messages.push(message("user", prompt));
    Ok(ChatRequest {
        model,
        messages,
        options: Some(SamplingOptions {
            temperature,
            max_tokens: max_tokens.unwrap_or(0),
            ..Default::default()
        }),
        conversation_id: conversation.unwrap_or_default(),
        ..Default::default()
    })
}

/// One chat event as `chat --json` prints it. Field names are stable.
#[derive(Serialize, Debug, Default)]
struct ChatLine {
    /// answering, delta, failover or finished.
    event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempt: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from_node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    to_node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens_so_far: Option<u32>,
    /// On a failover: the new node generates the answer again and its repeat is dropped.
    #[serde(skip_serializing_if = "Option::is_none")]
    regenerated: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finish_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failovers: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix_diverged: Option<bool>,
}

/// `coordinator chat`: the answer's text to stdout as it comes; moves between nodes noted on
/// stderr.
pub async fn chat(
    mut client: Client,
    addr: &str,
    request: ChatRequest,
    json: bool,
) -> Result<u8, Failure> {
    let failure = |status: tonic::Status| match status.code() {
        // No node serves the model, or every backend serving it is down.
        Code::NotFound => Failure::new(EXIT_NO_NODE, status.message()),
        Code::Unavailable if !broken_transport(&status) => {
            Failure::new(EXIT_NO_NODE, status.message())
        }
        _ => Failure::from_status(status, addr),
    };
    let mut stream = client.chat(request).await.map_err(failure)?.into_inner();
    let mut stdout = std::io::stdout();
    let mut ends_with_newline = true;
    while let Some(event) = stream.message().await.map_err(failure)? {
        let Some(event) = event.event else { continue };
        let line = match event {
            chat_event::Event::Answering(a) => ChatLine {
                event: "answering",
                node: Some(a.node_name),
                attempt: Some(a.attempt),
                ..Default::default()
            },
            chat_event::Event::Delta(d) => {
                if !json {
                    let _ = stdout.write_all(d.text.as_bytes());
                    let _ = stdout.flush();
                    ends_with_newline = d.text.ends_with('\n');
                }
                ChatLine {
                    event: "delta",
                    text: Some(d.text),
                    ..Default::default()
                }
            }
            chat_event::Event::Failover(f) => {
                if !json {
                    let how = if f.regenerated {
                        "it is generated again there, and what you already have is left out"
                    } else {
                        "it goes on where it stopped"
                    };
                    eprintln!(
                        "\n{PREFIX} the answer moved from {} to {} ({}); {how}",
                        f.from_node, f.to_node, f.reason
                    );
                }
                ChatLine {
                    event: "failover",
                    from_node: Some(f.from_node),
                    to_node: Some(f.to_node),
                    reason: Some(f.reason),
                    tokens_so_far: Some(f.tokens_so_far),
                    regenerated: Some(f.regenerated),
                    ..Default::default()
                }
            }
            chat_event::Event::Finished(f) => {
                if !json && !ends_with_newline {
                    println!();
                }
                if f.prefix_diverged && !json {
                    eprintln!(
                        "{PREFIX} the node that took the answer over did not repeat the text already sent; the text after the move may not follow on from it"
                    );
                }
                if !f.error.is_empty() {
                    return Err(Failure::new(
                        EXIT_INFRASTRUCTURE,
                        format!("the answer could not be completed: {}", f.error),
                    ));
                }
                ChatLine {
                    event: "finished",
                    finish_reason: Some(f.finish_reason),
                    prompt_tokens: Some(f.prompt_tokens),
                    completion_tokens: Some(f.completion_tokens),
                    failovers: Some(f.failovers),
                    prefix_diverged: Some(f.prefix_diverged),
                    ..Default::default()
                }
            }
        };
        if json {
            print_json(&line);
        }
    }
    Ok(0)
}
