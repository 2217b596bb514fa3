//! Sub-calls from code in a session (`llm_query`): read from the interpreter's channel, bounded
//! per session, sent to the coordinator over the agent's link, and answered on the channel. An
//! `llm` frame carries JSON (prompts, model, options) and gets JSON back; an `ask` frame (bash)
//! carries one prompt for the session's model and gets the answer's text.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use kowalski_exo_common::proto::{SamplingOptions, Subcall, SubcallAnswer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::Semaphore;

use super::frames::FrameWriter;
use crate::link::CoordinatorLink;

/// Refusals written back at once, at most; past them a flood of calls the code does not read
/// the answers of is dropped (its calls then wait until the cell's timeout interrupts them).
const REFUSALS_PENDING: usize = 64;

/// The sub-calls of one session.
#[derive(Clone, Debug)]
pub struct Subcalls {
    session_id: String,
    /// The model a call that names none asks.
    model: String,
    /// Prompts in flight at once.
    permits: Arc<Semaphore>,
    limit: usize,
    /// `None` on an agent that runs stand-alone.
    link: Option<CoordinatorLink>,
    /// Refusals not yet written.
    refusals: Arc<AtomicUsize>,
}

/// What an `llm` frame asks.
#[derive(Deserialize)]
struct Call {
    prompts: Vec<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    options: Map<String, Value>,
    /// rlm_query: each prompt's context.
    #[serde(default)]
    contexts: Vec<String>,
}

/// The JSON answer to an `llm` frame.
#[derive(Serialize)]
#[serde(untagged)]
enum Reply {
    Answers { results: Vec<PromptReply> },
    Refused { error: String },
}

#[derive(Serialize)]
#[serde(untagged)]
enum PromptReply {
    Text { text: String },
    Failed { error: String },
}

impl Subcalls {
    pub fn new(
        session_id: String,
        model: String,
        limit: usize,
        link: Option<CoordinatorLink>,
    ) -> Self {
        Subcalls {
            session_id,
            model,
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            link,
            refusals: Arc::default(),
        }
    }

    /// Answers a frame the interpreter sent during a cell, in the background.
    pub fn answer(&self, kind: &str, id: u64, payload: Vec<u8>, writer: &FrameWriter) {
        let call = match kind {
            "ask" => Ok(Call {
                prompts: vec![String::from_utf8_lossy(&payload).into_owned()],
                model: None,
                options: Map::new(),
                contexts: Vec::new(),
            }),
            "recurse" => recursion(&payload).map(|(prompt, context)| Call {
                prompts: vec![prompt],
                model: None,
                options: Map::new(),
                contexts: vec![context],
            }),
            "llm" | "rlm" => serde_json::from_slice::<Call>(&payload)
                .map_err(|e| format!("the call is not valid JSON: {e}")),
            other => Err(format!("'{other}' is not a call the agent knows")),
        };
        let subcall = call.and_then(|call| {
            Ok(Subcall {
                call_id: 0,
                session_id: self.session_id.clone(),
                model: call
                    .model
                    .filter(|m| !m.is_empty())
                    .unwrap_or_else(|| self.model.clone()),
                options: Some(sampling(&call.options)?),
                prompts: call.prompts,
                recursive: matches!(kind, "rlm" | "recurse"),
                contexts: call.contexts,
            })
        });
        let subcall = match subcall {
            Ok(subcall) => subcall,
            Err(reason) => return self.refuse(kind, id, &reason, writer),
        };
        let count = subcall.prompts.len();
        let Ok(in_flight) = self.permits.clone().try_acquire_many_owned(count as u32) else {
            let reason = format!(
                "{count} more prompts would pass the session's limit of {} in flight at once",
                self.limit
            );
            return self.refuse(kind, id, &reason, writer);
        };
        let Some(link) = self.link.clone() else {
            let reason = "this node runs stand-alone, without a coordinator, so code here cannot ask the cluster's models";
            return self.refuse(kind, id, reason, writer);
        };
        let (writer, bash) = (writer.clone(), is_bash(kind));
        tokio::spawn(async move {
            let answered = link.ask(subcall).await;
            let _ = writer.send("result", id, &reply(answered, bash)).await;
            // Held until the answer is written: code that never reads its answers cannot pile
            // up more calls than its limit.
            drop(in_flight);
        });
    }

    /// Answers a frame whose payload was over the limit (and was skipped).
    pub fn refuse_oversized(&self, kind: &str, id: u64, length: u64, writer: &FrameWriter) {
        let reason = format!(
            "the call takes {length} bytes, over the session's limit of {} bytes per call",
            super::MAX_SUBCALL_BYTES
        );
        self.refuse(kind, id, &reason, writer);
    }

    fn refuse(&self, kind: &str, id: u64, reason: &str, writer: &FrameWriter) {
        if self.refusals.fetch_add(1, Ordering::AcqRel) >= REFUSALS_PENDING {
            self.refusals.fetch_sub(1, Ordering::AcqRel);
            tracing::debug!(session = %self.session_id, "dropping a refusal: too many unread");
            return;
        }
        let payload = reply(Err(reason.to_string()), is_bash(kind));
        let (writer, refusals) = (writer.clone(), self.refusals.clone());
        tokio::spawn(async move {
            let _ = writer.send("result", id, &payload).await;
            refusals.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// Whether frames of `kind` come from bash, which sends and reads plain text.
fn is_bash(kind: &str) -> bool {
    matches!(kind, "ask" | "recurse")
}

/// The prompt and context of bash's `rlm_query`: the prompt's length in bytes on a line of its
/// own, then the prompt, then the context.
fn recursion(payload: &[u8]) -> Result<(String, String), String> {
    let malformed = || "rlm_query's call is not a length, a prompt and a context".to_string();
    let line = payload
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(malformed)?;
    let length: usize = std::str::from_utf8(&payload[..line])
        .ok()
        .and_then(|n| n.parse().ok())
        .ok_or_else(malformed)?;
    let rest = &payload[line + 1..];
    if length > rest.len() {
        return Err(malformed());
    }
    let (prompt, context) = rest.split_at(length);
    Ok((
        String::from_utf8_lossy(prompt).into_owned(),
        String::from_utf8_lossy(context).into_owned(),
    ))
}

/// The payload of a `result` frame: JSON, or for bash the text (or `Error: ...`).
fn reply(answered: Result<SubcallAnswer, String>, bash: bool) -> Vec<u8> {
    let answered = answered.and_then(|answer| match answer.error.as_str() {
        "" => Ok(answer.answers),
        error => Err(error.to_string()),
    });
    if bash {
        return match answered {
            Ok(answers) => match answers.into_iter().next() {
                Some(answer) if answer.error.is_empty() => answer.text,
                Some(answer) => format!("Error: {}", answer.error),
                None => "Error: no answer came back".to_string(),
            },
            Err(error) => format!("Error: {error}"),
        }
        .into_bytes();
    }
    let reply = match answered {
        Ok(answers) => Reply::Answers {
            results: answers
                .into_iter()
                .map(|answer| match answer.error.as_str() {
                    "" => PromptReply::Text { text: answer.text },
                    _ => PromptReply::Failed {
                        error: answer.error,
                    },
                })
                .collect(),
        },
        Err(error) => Reply::Refused { error },
    };
    serde_json::to_vec(&reply).unwrap_or_default()
}

/// The sampling options a call names; an unknown one, or one of the wrong type, is refused.
fn sampling(options: &Map<String, Value>) -> Result<SamplingOptions, String> {
    let mut sampling = SamplingOptions::default();
    for (name, value) in options {
        let wrong = || format!("the option {name}={value} has the wrong type");
        match name.as_str() {
            "temperature" => sampling.temperature = Some(value.as_f64().ok_or_else(wrong)? as f32),
            "top_p" => sampling.top_p = Some(value.as_f64().ok_or_else(wrong)? as f32),
            "max_tokens" => {
                sampling.max_tokens = value
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(wrong)?
            }
            "seed" => sampling.seed = Some(value.as_i64().ok_or_else(wrong)?),
            "stop" => {
                sampling.stop = match value {
                    Value::String(stop) => vec![stop.clone()],
                    Value::Array(stops) => stops
                        .iter()
                        .map(|s| s.as_str().map(str::to_string).ok_or_else(wrong))
                        .collect::<Result<_, _>>()?,
                    _ => return Err(wrong()),
                }
            }
            _ => {
                return Err(format!(
                    "unknown option '{name}'; llm_query takes temperature, top_p, max_tokens, stop and seed"
                ));
            }
        }
    }
    Ok(sampling)
}

#[cfg(test)]
mod tests {
    use kowalski_exo_common::proto::PromptAnswer;

    use super::*;

    #[test]
    fn bash_rlm_query_sends_a_length_a_prompt_and_a_context() {
        // "héllo" is 6 bytes: the length counts bytes, not characters.
        let call = "6\nhéllocontext\n".as_bytes();
        assert_eq!(
            recursion(call).unwrap(),
            ("héllo".to_string(), "context\n".to_string())
        );
        assert_eq!(recursion(b"0\n").unwrap(), (String::new(), String::new()));
        for malformed in [&b"no length"[..], b"x\nabc", b"9\nshort"] {
            assert!(recursion(malformed).is_err(), "{malformed:?}");
        }
    }

    #[test]
    fn options_are_read_by_name_and_unknown_ones_refused() {
        let options: Map<String, Value> = serde_json::from_str(
            r#"{"temperature": 0.5, "max_tokens": 9, "stop": "\n", "seed": 3}"#,
        )
        .unwrap();
        let sampling = sampling(&options).unwrap();
        assert_eq!(sampling.temperature, Some(0.5));
        assert_eq!((sampling.max_tokens, sampling.seed), (9, Some(3)));
        assert_eq!(sampling.stop, ["\n"]);
        let unknown: Map<String, Value> = serde_json::from_str(r#"{"temprature": 1}"#).unwrap();
        assert!(
            super::sampling(&unknown)
                .unwrap_err()
                .contains("unknown option 'temprature'")
        );
    }

    #[test]
    fn a_failed_prompt_is_an_error_for_that_prompt_only() {
        let answer = SubcallAnswer {
            answers: vec![
                PromptAnswer {
                    text: "fine".into(),
                    ..Default::default()
                },
                PromptAnswer {
                    error: "the backend failed".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            String::from_utf8(reply(Ok(answer), false)).unwrap(),
            r#"{"results":[{"text":"fine"},{"error":"the backend failed"}]}"#
        );
        assert_eq!(
            String::from_utf8(reply(Err("no such model".into()), true)).unwrap(),
            "Error: no such model"
        );
    }
}
