//! Sub-calls from code in a session (`llm_query`): read from the interpreter's channel, bounded
//! per session, and answered on the same channel. An `llm` frame carries JSON (prompts, model,
//! options) and gets JSON back; an `ask` frame (bash) carries one prompt and gets its text.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::frames::FrameWriter;

/// The sub-calls of one session.
#[derive(Clone, Debug)]
pub struct Subcalls {
    /// Prompts in flight at once.
    permits: Arc<Semaphore>,
    limit: usize,
}

/// What an `llm` frame asks.
#[derive(Deserialize)]
struct Call {
    prompts: Vec<String>,
}

/// The JSON answer to an `llm` frame when the call as a whole was refused.
#[derive(Serialize)]
struct Refusal<'a> {
    error: &'a str,
}

impl Subcalls {
    pub fn new(limit: usize) -> Self {
        Subcalls {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    /// Answers a frame the interpreter sent during a cell.
    pub fn answer(&self, kind: &str, id: u64, payload: Vec<u8>, writer: &FrameWriter) {
        let prompts = match kind {
            "ask" => 1,
            _ => match serde_json::from_slice::<Call>(&payload) {
                Ok(call) => call.prompts.len(),
                Err(e) => {
                    return self.refuse(
                        kind,
                        id,
                        &format!("the call is not valid JSON: {e}"),
                        writer,
                    );
                }
            },
        };
        let Ok(_in_flight) = self.permits.clone().try_acquire_many_owned(prompts as u32) else {
            let reason = format!(
                "{prompts} more prompts would pass the session's limit of {} in flight at once",
                self.limit
            );
            return self.refuse(kind, id, &reason, writer);
        };
        let reason = "this node is not attached to a coordinator, so code here cannot ask the cluster's models (start node-agent with --coordinator)";
        self.refuse(kind, id, reason, writer);
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
        let payload = match kind {
            "ask" => format!("Error: {reason}").into_bytes(),
            _ => serde_json::to_vec(&Refusal { error: reason }).unwrap_or_default(),
        };
        let writer = writer.clone();
        tokio::spawn(async move {
            let _ = writer.send("result", id, &payload).await;
        });
    }
}
