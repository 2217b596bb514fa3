//! `coordinator ask`: the Recursive Language Model loop from the command line. The root model's
//! turns and the blocks it runs go to stderr as they happen, the final answer to stdout; with
//! `--json`, one object per event; with `--trajectory FILE`, the same objects kept as JSONL,
//! which `coordinator trajectory FILE` renders as a tree.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
};

use clap::Args;

use kowalski_exo_common::proto::{AskEvent, AskRequest, ask_event::Event};
use serde::{Deserialize, Serialize};

use super::{Failure, PREFIX, connect::Client, print_json, request::read_bytes};

/// What `coordinator ask` takes besides the connection.
#[derive(Args, Debug)]
pub struct AskArgs {
    /// The root model (see `coordinator models`).
    #[arg(long)]
    pub model: String,
    /// The context: a file, or "-" for standard input [default: none]
    #[arg(long, value_name = "FILE")]
    pub context: Option<PathBuf>,
    /// Read the context as JSON (it becomes a list or dict in the session).
    #[arg(long)]
    pub context_json: bool,
    /// The context as a JSON value on the command line: a list or dict in the session, a
    /// JSON string as text.
    #[arg(long, value_name = "JSON", conflicts_with_all = ["context", "context_json"])]
    pub context_value: Option<String>,
    /// Turns before the model is asked for its best answer.
    #[arg(long, default_value_t = crate::rlm::DEFAULT_MAX_ITERATIONS)]
    pub max_iterations: u32,
    /// End the run after this many seconds with the best answer so far.
    #[arg(long, value_name = "SECONDS")]
    pub max_time: Option<u32>,
    /// End the run once the root model's turns and the sub-calls used this many tokens.
    #[arg(long)]
    pub max_tokens: Option<u64>,
    /// End the run after this many failing executions in a row.
    #[arg(long, default_value_t = crate::rlm::DEFAULT_MAX_FAILURES)]
    pub max_failures: u32,
    /// Prompts the code may send to the cluster's models; past it they fail and the run
    /// ends with the best answer so far.
    #[arg(long)]
    pub max_subcalls: Option<u64>,
    /// How deep rlm_query may start child runs (at the limit it asks as llm_query does).
    #[arg(long, default_value_t = crate::rlm::DEFAULT_MAX_DEPTH)]
    pub max_depth: u32,
    /// The root model's window in tokens, past 85% of which older turns are summarised
    /// [default: as its backend reports it; no folding when unknown]
    #[arg(long, value_name = "TOKENS")]
    pub context_window: Option<u32>,
    /// Keep every event of the run in FILE as JSON lines (`coordinator trajectory FILE`
    /// renders it).
    #[arg(long, value_name = "FILE")]
    pub trajectory: Option<PathBuf>,
    /// The question.
    pub question: String,
}

impl AskArgs {
    /// The request these flags ask for, the context read from its file.
    pub fn request(&self) -> Result<AskRequest, Failure> {
        let (context, context_is_json) = match (&self.context, &self.context_value) {
            (Some(file), _) => (read_bytes(file)?, self.context_json),
            (None, Some(value)) => {
                let value: serde_json::Value = serde_json::from_str(value).map_err(|e| {
                    Failure::usage(format!(
                        "--context-value is not JSON ({e}); a text context is a JSON string, as in '\"some text\"'"
                    ))
                })?;
                crate::rlm::chat::context_field(Some(value))
            }
            (None, None) => (Vec::new(), false),
        };
        Ok(AskRequest {
            model: self.model.clone(),
            question: self.question.clone(),
            context,
            context_is_json,
            max_iterations: self.max_iterations,
            max_time_ms: self.max_time.map_or(0, |s| s.saturating_mul(1000)),
            max_tokens: self.max_tokens.unwrap_or(0),
            max_failures: self.max_failures,
            max_subcalls: self.max_subcalls.unwrap_or(0),
            max_depth: self.max_depth,
            context_window: self.context_window.unwrap_or(0),
            ..Default::default()
        })
    }
}

/// One event as `coordinator ask --json` prints it. Field names are stable; absent fields are
/// left out.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct AskLine {
    /// started, delta, turn, block, subcall, folded or finished.
    pub event: String,
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
    pub block: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    /// The budgets' use after a turn: tokens of the whole run, and time since it started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_used: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub elapsed_ms: Option<u64>,
    /// What a failover moved: turn (the root model's answer) or session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub what: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executions_replayed: Option<u32>,
    /// A sub-call that was a child run (rlm_query); its turns are `iterations`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub child: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subcalls: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subcall_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_before: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_after: Option<u64>,
    /// What counted the tokens: model (its own tokenizer) or cl100k.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
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
                event: "started".into(),
                session: Some(s.session.clone()),
                node: Some(s.node.clone()),
                context_length: Some(s.context_length),
                ..Default::default()
            },
            Event::Delta(d) => AskLine {
                event: "delta".into(),
                text: Some(d.text.clone()),
                ..Default::default()
            },
            Event::Turn(t) => AskLine {
                event: "turn".into(),
                turn: Some(t.number),
                node: Some(t.node.clone()),
                prompt_tokens: Some(t.prompt_tokens.into()),
                completion_tokens: Some(t.completion_tokens.into()),
                wall_ms: Some(t.wall_ms),
                tokens_used: Some(t.tokens_used),
                elapsed_ms: Some(t.elapsed_ms),
                ..Default::default()
            },
            Event::Failover(f) => AskLine {
                event: "failover".into(),
                turn: Some(f.turn),
                what: Some(f.what.clone()),
                from_node: Some(f.from_node.clone()),
                to_node: Some(f.to_node.clone()),
                reason: (!f.reason.is_empty()).then(|| f.reason.clone()),
                executions_replayed: (f.what == "session").then_some(f.executions_replayed),
                ..Default::default()
            },
            Event::Block(b) => AskLine {
                event: "block".into(),
                turn: Some(b.turn),
                index: Some(b.index),
                language: Some(b.language.clone()),
                code: Some(b.code.clone()),
                output: Some(b.output.clone()),
                status: Some(b.status.clone()),
                wall_ms: Some(b.wall_ms),
                ..Default::default()
            },
            Event::Folded(f) => AskLine {
                event: "folded".into(),
                turn: Some(f.turn),
                tokens_before: Some(f.tokens_before),
                tokens_after: Some(f.tokens_after),
                tokenizer: Some(f.tokenizer.clone()),
                ..Default::default()
            },
            Event::Subcall(c) => AskLine {
                event: "subcall".into(),
                turn: Some(c.turn),
                block: Some(c.block),
                node: (!c.node.is_empty()).then(|| c.node.clone()),
                model: Some(c.model.clone()),
                wall_ms: Some(c.wall_ms),
                cached: Some(c.cached),
                tokens: Some(c.tokens),
                error: (!c.error.is_empty()).then(|| c.error.clone()),
                child: c.child.then_some(true),
                iterations: c.child.then_some(c.iterations),
                subcalls: c.child.then_some(c.subcalls),
                ..Default::default()
            },
            Event::Finished(f) => AskLine {
                event: "finished".into(),
                subcalls: Some(f.subcalls),
                subcall_tokens: Some(f.subcall_tokens),
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

/// A trajectory file being written.
#[derive(Debug)]
struct Trajectory(BufWriter<File>);

impl Trajectory {
    fn create(path: &Path) -> Result<Self, Failure> {
        File::create(path)
            .map(|file| Trajectory(BufWriter::new(file)))
            .map_err(|e| Failure::usage(format!("cannot write {}: {e}", path.display())))
    }

    fn keep(&mut self, line: &AskLine) {
        if let Ok(text) = serde_json::to_string(line) {
            let _ = writeln!(self.0, "{text}");
            let _ = self.0.flush();
        }
    }
}

/// `coordinator ask`: runs the loop and prints it; exits 0 with an answer, 4 when the run
/// could not go on. `trajectory` keeps every event as a JSON line.
pub async fn ask(
    mut client: Client,
    addr: &str,
    request: AskRequest,
    json: bool,
    trajectory: Option<&Path>,
) -> Result<u8, Failure> {
    let mut kept = trajectory.map(Trajectory::create).transpose()?;
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
        if let Some(line) = AskLine::from_event(&event) {
            if json {
                print_json(&line);
            }
            if let Some(kept) = &mut kept {
                kept.keep(&line);
            }
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
                        "{PREFIX} answered after {} turns ({}; {} prompt and {} completion tokens, {} sub-calls with {} tokens)",
                        finished.iterations,
                        finished.reason,
                        finished.prompt_tokens,
                        finished.completion_tokens,
                        finished.subcalls,
                        finished.subcall_tokens
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
            Event::Subcall(_) => {}
            Event::Failover(f) => {
                let _ = writeln!(
                    err,
                    "{PREFIX} {}",
                    moved(
                        &f.what,
                        &f.from_node,
                        &f.to_node,
                        &f.reason,
                        f.executions_replayed
                    )
                );
            }
            Event::Folded(f) => {
                let _ = writeln!(
                    err,
                    "{PREFIX} the conversation was folded before turn {}: {} tokens, now {} ({})",
                    f.turn, f.tokens_before, f.tokens_after, f.tokenizer
                );
            }
        }
    }
    Err(Failure::infrastructure(
        "the coordinator ended the run without an answer",
    ))
}

/// `coordinator trajectory FILE`: a kept run as a tree: turns, the blocks under them, their
/// output's first lines, and the answer, with timings.
pub fn render(path: &Path) -> Result<u8, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(format!("cannot read {}: {e}", path.display())))?;
    let mut lines = Vec::new();
    for (number, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let line: AskLine = serde_json::from_str(line).map_err(|e| {
            Failure::usage(format!(
                "{} line {} is not a trajectory event: {e}",
                path.display(),
                number + 1
            ))
        })?;
        lines.push(line);
    }
    print!("{}", tree(&lines));
    Ok(0)
}

/// What a failover event says: what moved, from where to where, and why or what it replayed.
fn moved(what: &str, from: &str, to: &str, reason: &str, replayed: u32) -> String {
    let from = if from.is_empty() {
        "a node that forgot it"
    } else {
        from
    };
    if what == "session" {
        format!("the session moved from {from} to {to} ({replayed} executions replayed)")
    } else {
        format!("the root model's answer moved from {from} to {to}: {reason}")
    }
}

/// Output lines shown under a block in the tree.
const OUTPUT_LINES: usize = 3;

pub fn tree(events: &[AskLine]) -> String {
    let mut out = String::new();
    let mut said = String::new();
    for line in events {
        let number = |n: Option<u32>| n.unwrap_or_default();
        match line.event.as_str() {
            "started" => out.push_str(&format!(
                "ask: context of {} in session {} on {}\n",
                line.context_length.unwrap_or_default(),
                line.session.as_deref().unwrap_or_default(),
                line.node.as_deref().unwrap_or_default()
            )),
            "delta" => said.push_str(line.text.as_deref().unwrap_or_default()),
            "turn" => {
                out.push_str(&format!(
                    "├─ turn {} on {}: {} + {} tokens, {} ms{}\n",
                    number(line.turn),
                    line.node.as_deref().unwrap_or_default(),
                    line.prompt_tokens.unwrap_or_default(),
                    line.completion_tokens.unwrap_or_default(),
                    line.wall_ms.unwrap_or_default(),
                    match (line.tokens_used, line.elapsed_ms) {
                        (Some(tokens), Some(ms)) =>
                            format!(" (run so far: {tokens} tokens, {ms} ms)"),
                        _ => String::new(),
                    }
                ));
                if let Some(first) = said.lines().find(|l| !l.trim().is_empty()) {
                    out.push_str(&format!("│  │ {}\n", first.trim()));
                }
                said.clear();
            }
            "block" => {
                out.push_str(&format!(
                    "│  ├─ block {} ({}): {}, {} ms\n",
                    number(line.index),
                    line.language.as_deref().unwrap_or_default(),
                    line.status.as_deref().unwrap_or_default(),
                    line.wall_ms.unwrap_or_default()
                ));
                let output = line.output.as_deref().unwrap_or_default();
                for text in output.lines().take(OUTPUT_LINES) {
                    out.push_str(&format!("│  │  │ {text}\n"));
                }
            }
            "folded" => out.push_str(&format!(
                "├─ folded before turn {}: {} tokens, now {} ({})\n",
                number(line.turn),
                line.tokens_before.unwrap_or_default(),
                line.tokens_after.unwrap_or_default(),
                line.tokenizer.as_deref().unwrap_or("cl100k")
            )),
            "failover" => out.push_str(&format!(
                "├─ {}\n",
                moved(
                    line.what.as_deref().unwrap_or_default(),
                    line.from_node.as_deref().unwrap_or_default(),
                    line.to_node.as_deref().unwrap_or_default(),
                    line.reason.as_deref().unwrap_or_default(),
                    line.executions_replayed.unwrap_or_default()
                )
            )),
            "subcall" => out.push_str(&format!(
                "│  │  ├─ {} {}: {}, {} ms{}\n",
                if line.child == Some(true) {
                    format!(
                        "child run ({} turns, {} sub-calls)",
                        line.iterations.unwrap_or_default(),
                        line.subcalls.unwrap_or_default()
                    )
                } else {
                    "sub-call".to_string()
                },
                line.model.as_deref().unwrap_or_default(),
                match (&line.error, line.cached, &line.node) {
                    (Some(error), _, _) => format!("failed ({error})"),
                    (None, Some(true), _) => "from the cache".to_string(),
                    (None, _, node) => format!("on {}", node.as_deref().unwrap_or("?")),
                },
                line.wall_ms.unwrap_or_default(),
                line.tokens
                    .map_or(String::new(), |t| format!(", {t} tokens"))
            )),
            "finished" => out.push_str(&format!(
                "└─ {} after {} turns ({}; {} + {} tokens): {}\n",
                if line.error.is_some() {
                    "failed"
                } else {
                    "answer"
                },
                line.iterations.unwrap_or_default(),
                line.reason.as_deref().unwrap_or_default(),
                line.prompt_tokens.unwrap_or_default(),
                line.completion_tokens.unwrap_or_default(),
                line.error
                    .as_deref()
                    .or(line.answer.as_deref())
                    .unwrap_or_default()
            )),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(json: &str) -> AskLine {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_trajectory_renders_as_turns_with_their_blocks_and_the_answer() {
        let events = [
            line(r#"{"event":"started","session":"ask-1","node":"a","context_length":9}"#),
            line(r#"{"event":"delta","text":"Looking.\n```repl"}"#),
            line(
                r#"{"event":"turn","turn":1,"node":"a","prompt_tokens":10,"completion_tokens":5,"wall_ms":40}"#,
            ),
            line(
                r#"{"event":"block","turn":1,"index":1,"language":"python","status":"ok","wall_ms":3,"output":"9\nmore\nlines\nhidden"}"#,
            ),
            line(
                r#"{"event":"subcall","turn":1,"block":1,"node":"b","model":"m","wall_ms":7,"cached":false,"tokens":12}"#,
            ),
            line(
                r#"{"event":"subcall","turn":1,"block":1,"model":"m","wall_ms":0,"cached":true,"tokens":0}"#,
            ),
            line(
                r#"{"event":"subcall","turn":1,"block":1,"node":"c","model":"m","wall_ms":90,"cached":false,"tokens":300,"child":true,"iterations":2,"subcalls":4}"#,
            ),
            line(
                r#"{"event":"failover","turn":1,"what":"session","from_node":"a","to_node":"b","executions_replayed":2}"#,
            ),
            line(r#"{"event":"delta","text":"Done."}"#),
            line(
                r#"{"event":"turn","turn":2,"node":"b","prompt_tokens":20,"completion_tokens":2,"wall_ms":30,"tokens_used":337,"elapsed_ms":250}"#,
            ),
            line(
                r#"{"event":"failover","turn":2,"what":"turn","from_node":"b","to_node":"a","reason":"node b was lost"}"#,
            ),
            line(
                r#"{"event":"finished","answer":"nine","reason":"final","iterations":1,"prompt_tokens":10,"completion_tokens":5}"#,
            ),
        ];
        assert_eq!(
            tree(&events),
            "ask: context of 9 in session ask-1 on a\n\
├─ turn 1 on a: 10 + 5 tokens, 40 ms\n\
│  │ Looking.\n\
│  ├─ block 1 (python): ok, 3 ms\n\
│  │  │ 9\n\
│  │  │ more\n\
│  │  │ lines\n\
│  │  ├─ sub-call m: on b, 7 ms, 12 tokens\n\
│  │  ├─ sub-call m: from the cache, 0 ms, 0 tokens\n\
│  │  ├─ child run (2 turns, 4 sub-calls) m: on c, 90 ms, 300 tokens\n\
├─ the session moved from a to b (2 executions replayed)\n\
├─ turn 2 on b: 20 + 2 tokens, 30 ms (run so far: 337 tokens, 250 ms)\n\
│  │ Done.\n\
├─ the root model's answer moved from b to a: node b was lost\n\
└─ answer after 1 turns (final; 10 + 5 tokens): nine\n"
        );
    }
}
