//! `coordinator ask`: the Recursive Language Model loop from the command line. The root model's
//! turns and the blocks it runs go to stderr as they happen, the final answer to stdout; with
//! `--json`, one object per event.

use std::io::Write;

use kowalski_exo_common::proto::{AskEvent, AskRequest, ask_event::Event};
use serde::Serialize;

use super::{Failure, PREFIX, connect::Client, print_json};

/// One event as `coordinator ask --json` prints it. Field names are stable; absent fields are
/// left out.
#[derive(Serialize, Debug, Default, PartialEq)]
pub struct AskLine {
    /// started, delta, turn, block or finished.
    pub event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub turn: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wall_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// Why the run ended: final, final_var, answer, max_iterations, max_time, max_tokens,
    /// failures, or error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iterations: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AskLine {
    pub fn from_event(event: &AskEvent) -> Option<AskLine> {
        Some(match event.event.as_ref()? {
            Event::Started(s) => AskLine {
                event: "started",
                session: Some(s.session.clone()),
                node: Some(s.node.clone()),
                context_length: Some(s.context_length),
                ..Default::default()
            },
            Event::Delta(d) => AskLine {
                event: "delta",
                text: Some(d.text.clone()),
                ..Default::default()
            },
            Event::Turn(t) => AskLine {
                event: "turn",
                turn: Some(t.number),
                node: Some(t.node.clone()),
                prompt_tokens: Some(t.prompt_tokens.into()),
                completion_tokens: Some(t.completion_tokens.into()),
                wall_ms: Some(t.wall_ms),
                ..Default::default()
            },
            Event::Block(b) => AskLine {
                event: "block",
                turn: Some(b.turn),
                index: Some(b.index),
                language: Some(b.language.clone()),
                code: Some(b.code.clone()),
                output: Some(b.output.clone()),
                status: Some(b.status.clone()),
                wall_ms: Some(b.wall_ms),
                ..Default::default()
            },
            Event::Finished(f) => AskLine {
                event: "finished",
                answer: Some(f.answer.clone()),
                reason: Some(f.reason.clone()),
                iterations: Some(f.iterations),
                prompt_tokens: Some(f.prompt_tokens),
                completion_tokens: Some(f.completion_tokens),
                error: (!f.error.is_empty()).then(|| f.error.clone()),
                ..Default::default()
            },
        })
    }
}

/// `coordinator ask`: runs the loop and prints it; exits 0 with an answer, 4 when the run
/// could not go on.
pub async fn ask(
    mut client: Client,
    addr: &str,
    request: AskRequest,
    json: bool,
) -> Result<u8, Failure> {
    let mut stream = client
        .ask(request)
        .await
        .map_err(|s| Failure::from_status(s, addr))?
        .into_inner();
    let mut err = std::io::stderr();
    while let Some(event) = stream
        .message()
        .await
        .map_err(|s| Failure::from_status(s, addr))?
    {
        if json && let Some(line) = AskLine::from_event(&event) {
            print_json(&line);
        }
        let Some(event) = event.event else { continue };
        match event {
            Event::Finished(finished) if !finished.error.is_empty() => {
                return Err(Failure::infrastructure(finished.error));
            }
            Event::Finished(finished) => {
                if !json {
                    let _ = writeln!(
                        err,
                        "{PREFIX} answered after {} turns ({}; {} prompt and {} completion tokens)",
                        finished.iterations,
                        finished.reason,
                        finished.prompt_tokens,
                        finished.completion_tokens
                    );
                    println!("{}", finished.answer);
                }
                return Ok(0);
            }
            _ if json => {}
            Event::Started(s) => {
                let _ = writeln!(
                    err,
                    "{PREFIX} context of {} loaded in session {} on {}",
                    s.context_length, s.session, s.node
                );
            }
            Event::Delta(d) => {
                let _ = write!(err, "{}", d.text);
            }
            Event::Turn(t) => {
                let _ = writeln!(
                    err,
                    "\n── turn {} on {} ({} + {} tokens, {} ms) ──",
                    t.number, t.node, t.prompt_tokens, t.completion_tokens, t.wall_ms
                );
            }
            Event::Block(b) => {
                let _ = writeln!(
                    err,
                    "── block {} of turn {}: {} ({} ms) ──\n{}",
                    b.index, b.turn, b.status, b.wall_ms, b.output
                );
            }
        }
    }
    Err(Failure::infrastructure(
        "the coordinator ended the run without an answer",
    ))
}
