//! The Recursive Language Model loop (Zhang and Khattab) across the cluster: the context lives
//! in a session as the variable `context`; each turn the root model's reply streams to the
//! caller, its code blocks run in the session (their `llm_query` calls spread over every node
//! serving the model), and their output goes back as the next turn, until a final answer or a
//! budget ends the run.
//!
//! - [`budget`]: time, tokens and sub-calls, shared by a run and its children.
//! - [`prompt`]: what the root model is told, and block output cut to size.
//! - [`final_answer`]: `FINAL(...)` and `FINAL_VAR(name)` in a reply.
//! - [`chat`]: the loop behind the chat APIs, as the model `rlm:MODEL`.
//! - [`folding`]: older turns summarised when the conversation nears the model's window.
//! - [`recent`]: the last few runs, for the dashboard.
//! - [`tokens`]: the conversation's tokens, by the model's own tokenizer where it has one.

pub mod budget;
pub mod chat;
pub mod final_answer;
pub mod folding;
mod notes;
pub mod prompt;
pub mod recent;
pub mod tokens;

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use kowalski_exo_common::{
    Language,
    proto::{
        AskBlock, AskEvent, AskFailover, AskFinished, AskFolded, AskRequest, AskStarted, AskTurn,
        ChatEvent, ChatMessage, ChatRequest, ClusterOpenSessionRequest, OpenSessionRequest,
        RuntimeHealth, ask_event, chat_event,
    },
};
use serde::Deserialize;
use tokio::{sync::mpsc, time::Instant};
use tonic::Status;

use crate::{
    inference::Chats,
    json_events::status_name,
    registry::NodeRegistry,
    sessions::{ClusterSessions, Collected},
};
use budget::Budget;
use final_answer::Final;
use notes::Notes;
use tokens::TokenCounter;

/// Turns before the model is asked for its best answer, unless the request says.
pub const DEFAULT_MAX_ITERATIONS: u32 = 30;
/// Characters of a block's output the model sees, unless the request says.
pub const DEFAULT_MAX_OUTPUT_CHARS: u32 = 20_000;
/// Executions failing in a row that end the run, unless the request says.
pub const DEFAULT_MAX_FAILURES: u32 = 3;
/// How deep rlm_query starts child runs, unless the request says.
pub const DEFAULT_MAX_DEPTH: u32 = 1;
/// Raw context bytes loaded per execution (base64 in the code; under the code size limit).
const CONTEXT_CHUNK: usize = 512 * 1024;
/// Chat events buffered per turn.
const EVENT_BUFFER: usize = 64;

/// Where the events of one run go.
pub type AskSender = mpsc::Sender<Result<AskEvent, Status>>;

/// Numbers the runs of this coordinator, to name their sessions.
static RUNS: AtomicU64 = AtomicU64::new(1);

/// Runs the loop.
#[derive(Clone)]
pub struct Rlm {
    chats: Chats,
    sessions: ClusterSessions,
    registry: NodeRegistry,
}

/// The `answer` dict as the session holds it.
#[derive(Deserialize)]
struct AnswerDict {
    ready: bool,
    content: String,
}

impl Rlm {
    pub fn new(chats: Chats, sessions: ClusterSessions, registry: NodeRegistry) -> Self {
        Rlm {
            chats,
            sessions,
            registry,
        }
    }

    /// Runs `request` to its final answer, streaming events; the last is `finished`.
    pub async fn ask(&self, request: AskRequest, events: &AskSender) {
        let budget = Arc::new(Budget::of(&request));
        self.ask_at(request, 0, budget, events).await;
    }

    /// A child run (rlm_query) at `depth`, spending its parent's budgets.
    pub async fn child(
        &self,
        template: &AskRequest,
        depth: u32,
        budget: Arc<Budget>,
        question: String,
        context: String,
    ) -> ChildRun {
        let request = AskRequest {
            question,
            context: context.into_bytes(),
            context_is_json: false,
            ..template.clone()
        };
        let (events, mut receiver) = mpsc::channel(EVENT_BUFFER);
        let rlm = self.clone();
        tokio::spawn(async move { rlm.ask_at(request, depth, budget, &events).await });
        let mut node = String::new();
        while let Some(event) = receiver.recv().await {
            match event.ok().and_then(|e| e.event) {
                Some(ask_event::Event::Started(started)) => node = started.node,
                Some(ask_event::Event::Finished(finished)) => return ChildRun { finished, node },
                _ => {}
            }
        }
        ChildRun {
            finished: AskFinished {
                reason: "error".to_string(),
                error: "the child run ended without an answer".to_string(),
                ..Default::default()
            },
            node,
        }
    }

    async fn ask_at(
        &self,
        request: AskRequest,
        depth: u32,
        budget: Arc<Budget>,
        events: &AskSender,
    ) {
        let session = format!(
            "ask-{}-{}",
            std::process::id(),
            RUNS.fetch_add(1, Ordering::Relaxed)
        );
        let children = AskRequest {
            question: String::new(),
            context: Vec::new(),
            ..request.clone()
        };
        let notes = self
            .sessions
            .watch_subcalls(&session, budget.clone(), depth, children);
        let notes = Notes(notes);
        let finished = match self.run(&request, &session, &budget, notes, events).await {
            Ok(finished) => finished,
            Err(error) => AskFinished {
                reason: "error".to_string(),
                error,
                ..Default::default()
            },
        };
        self.sessions.unwatch_subcalls(&session);
        let _ = self.sessions.close(&session).await;
        let _ = send(events, ask_event::Event::Finished(finished)).await;
    }

    async fn run(
        &self,
        request: &AskRequest,
        session: &str,
        budget: &Budget,
        mut notes: Notes,
        events: &AskSender,
    ) -> Result<AskFinished, String> {
        let limits = Limits::of(request);
        let node = self
            .sessions
            .open(ClusterOpenSessionRequest {
                session: Some(OpenSessionRequest {
                    session_id: session.to_string(),
                    languages: vec!["python".to_string()],
                    model: request.model.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map_err(|status| {
                format!(
                    "cannot open a session for the context: {}",
                    status.message()
                )
            })?
            .node_name;
        let (kind, length, preview) = self.load_context(request, session).await?;
        send(
            events,
            ask_event::Event::Started(AskStarted {
                session: session.to_string(),
                node,
                context_length: length,
            }),
        )
        .await?;
        let languages = self.other_languages();
        let mut messages = vec![
            message("system", prompt::system(&languages)),
            message(
                "user",
                prompt::first_turn(&request.question, &kind, length, &preview),
            ),
        ];
        let mut totals = Totals::default();
        let mut failures = 0;
        let window = self.window(request);
        let mut counter = TokenCounter::new(self.chats.clone(), &request.model);
        // Every message, folded or not; the conversation sent is `messages`.
        let mut history = messages.clone();
        for turn in 1..=limits.iterations {
            if let Some(reason) = budget.exceeded() {
                let answer = self.answer_so_far(session).await.unwrap_or_default();
                return Ok(totals.finished(answer, reason, turn - 1));
            }
            if let Some(window) = window
                && let Some((folded, report)) = self
                    .fold(request, session, window, &mut counter, &messages, &history)
                    .await?
            {
                messages = folded;
                let report = AskFolded { turn, ..report };
                send(events, ask_event::Event::Folded(report)).await?;
            }
            let reply = self
                .turn(request, &messages, turn, events, (&mut totals, budget))
                .await?;
            messages.push(message("assistant", reply.clone()));
            history.push(message("assistant", reply.clone()));
            let blocks = runnable_blocks(&reply);
            let mut outputs = Vec::new();
            for (index, (language, code)) in blocks.iter().enumerate() {
                let at = Instant::now();
                let ran = self
                    .sessions
                    .run_collected(session, language, code.clone())
                    .await
                    .map_err(|status| format!("the session failed: {}", status.message()))?;
                let output = prompt::cut(&shown(&ran), limits.output_chars);
                send(
                    events,
                    ask_event::Event::Block(AskBlock {
                        turn,
                        index: index as u32 + 1,
                        language: language.to_string(),
                        code: code.clone(),
                        output: output.clone(),
                        status: ran
                            .result
                            .as_ref()
                            .map_or("failed".to_string(), |r| status_name(r.status())),
                        wall_ms: at.elapsed().as_millis() as u64,
                    }),
                )
                .await?;
                notes
                    .pass_on(turn, index as u32 + 1, &mut totals, events)
                    .await?;
                failures = if ran.ok() { 0 } else { failures + 1 };
                outputs.push(prompt::block_output(index + 1, blocks.len(), &output));
                if failures >= limits.failures {
                    let answer = self.answer_so_far(session).await.unwrap_or_default();
                    return Ok(totals.finished(answer, "failures", turn));
                }
            }
            let ready = self.ready_answer(session).await;
            // The check may have moved the session (its node lost after the last block).
            notes.pass_on(turn, 0, &mut totals, events).await?;
            if let Some(answer) = ready {
                return Ok(totals.finished(answer, "answer", turn));
            }
            match final_answer::find(&reply) {
                Some(Final::Text(answer)) => return Ok(totals.finished(answer, "final", turn)),
                Some(Final::Variable(name)) => {
                    let answer = self.variable(session, &name).await?;
                    return Ok(totals.finished(answer, "final_var", turn));
                }
                None => {}
            }
            let next = if outputs.is_empty() {
                prompt::NO_CODE.to_string()
            } else {
                outputs.join("\n\n")
            };
            messages.push(message("user", next.clone()));
            history.push(message("user", next));
        }
        messages.push(message("user", prompt::LAST_TURN.to_string()));
        let reply = self
            .turn(
                request,
                &messages,
                limits.iterations + 1,
                events,
                (&mut totals, budget),
            )
            .await?;
        let answer = match final_answer::find(&reply) {
            Some(Final::Text(answer)) => answer,
            Some(Final::Variable(name)) => self.variable(session, &name).await?,
            None => reply.trim().to_string(),
        };
        Ok(totals.finished(answer, "max_iterations", limits.iterations))
    }

    /// One call of the root model, its text streamed to the caller.
    async fn turn(
        &self,
        request: &AskRequest,
        messages: &[ChatMessage],
        number: u32,
        events: &AskSender,
        (totals, budget): (&mut Totals, &Budget),
    ) -> Result<String, String> {
        let at = Instant::now();
        let (chat_events, mut receiver) = mpsc::channel(EVENT_BUFFER);
        let chats = self.chats.clone();
        let chat = ChatRequest {
            model: request.model.clone(),
            messages: messages.to_vec(),
            options: request.options.clone(),
            ..Default::default()
        };
        tokio::spawn(async move { chats.answer(chat, None, &chat_events).await });
        let (mut text, mut node) = (String::new(), String::new());
        while let Some(event) = receiver.recv().await {
            match event.map_err(|status| format!("the model refused: {}", status.message()))? {
                ChatEvent {
                    event: Some(chat_event::Event::Answering(answering)),
                } => node = answering.node_name,
                ChatEvent {
                    event: Some(chat_event::Event::Failover(moved)),
                } => {
                    let failover = AskFailover {
                        turn: number,
                        what: "turn".to_string(),
                        from_node: moved.from_node,
                        to_node: moved.to_node,
                        reason: moved.reason,
                        executions_replayed: 0,
                    };
                    send(events, ask_event::Event::Failover(failover)).await?;
                }
                ChatEvent {
                    event: Some(chat_event::Event::Delta(delta)),
                } => {
                    text.push_str(&delta.text);
                    send(events, ask_event::Event::Delta(delta)).await?;
                }
                ChatEvent {
                    event: Some(chat_event::Event::Finished(finished)),
                } => {
                    if !finished.error.is_empty() {
                        return Err(format!("the model failed: {}", finished.error));
                    }
                    totals.prompt_tokens += u64::from(finished.prompt_tokens);
                    totals.completion_tokens += u64::from(finished.completion_tokens);
                    budget.spend_tokens(
                        u64::from(finished.prompt_tokens) + u64::from(finished.completion_tokens),
                    );
                    let (tokens_used, elapsed_ms) =
                        (budget.tokens_used(), budget.elapsed().as_millis() as u64);
                    send(
                        events,
                        ask_event::Event::Turn(AskTurn {
                            number,
                            node: node.clone(),
                            prompt_tokens: finished.prompt_tokens,
                            completion_tokens: finished.completion_tokens,
                            wall_ms: at.elapsed().as_millis() as u64,
                            tokens_used,
                            elapsed_ms,
                        }),
                    )
                    .await?;
                }
                _ => {}
            }
        }
        Ok(text)
    }

    /// Loads the context into the session as `context` (and an empty `answer` dict); returns its
    /// kind, length and preview.
    async fn load_context(
        &self,
        request: &AskRequest,
        session: &str,
    ) -> Result<(String, u64, String), String> {
        self.store(
            session,
            "context",
            &request.context,
            request.context_is_json,
        )
        .await
        .map_err(|e| format!("cannot load the context: {e}"))?;
        let describe = format!(
            "import json\nanswer = {{'content': '', 'ready': False}}\n\
print(json.dumps([type(context).__name__, len(context), context[:{chars}] if isinstance(context, str) else json.dumps(context)[:{chars}]]))",
            chars = 400,
        );
        let described = self.python(session, describe).await?;
        let (kind, length, preview): (String, u64, String) =
            serde_json::from_str(described.stdout.trim())
                .map_err(|e| format!("cannot describe the context: {e}"))?;
        Ok((kind, length, prompt::preview(&preview).to_string()))
    }

    /// Sets the session variable `name` to `bytes`: text, or the value they hold as JSON. Sent
    /// in base64 cells of [`CONTEXT_CHUNK`] bytes, so values of many MiB fit.
    async fn store(
        &self,
        session: &str,
        name: &str,
        bytes: &[u8],
        json: bool,
    ) -> Result<(), String> {
        self.python(session, "_kx_parts = []".to_string()).await?;
        for chunk in bytes.chunks(CONTEXT_CHUNK) {
            let cell = format!("_kx_parts.append('{}')", BASE64.encode(chunk));
            self.python(session, cell).await?;
        }
        let decode = if json {
            "json.loads(_kx_raw)"
        } else {
            "_kx_raw.decode('utf-8', 'replace')"
        };
        let cell = format!(
            "import base64, json\n_kx_raw = b''.join(base64.b64decode(p) for p in _kx_parts)\n\
{name} = {decode}\ndel _kx_parts, _kx_raw"
        );
        self.python(session, cell).await.map(|_| ())
    }

    /// Runs Python the loop itself needs in the session; it must succeed.
    async fn python(&self, session: &str, code: String) -> Result<Collected, String> {
        let ran = self
            .sessions
            .run_collected(session, "python", code)
            .await
            .map_err(|status| status.message().to_string())?;
        if !ran.ok() {
            return Err(format!("{}{}", ran.stderr.trim(), ran.error));
        }
        Ok(ran)
    }

    /// The conversation folded when it passes 85% of the root model's window: the turns
    /// between the opening and the last one summarised by the model, the whole history kept in
    /// the session as `history`. `None` when it needs no folding or has nothing to fold.
    async fn fold(
        &self,
        request: &AskRequest,
        session: &str,
        window: u32,
        counter: &mut TokenCounter,
        messages: &[ChatMessage],
        history: &[ChatMessage],
    ) -> Result<Option<(Vec<ChatMessage>, AskFolded)>, String> {
        let before = counter.count(messages).await;
        if !folding::over(before, window) {
            return Ok(None);
        }
        let Some(turns) = folding::foldable(messages) else {
            return Ok(None);
        };
        let summary = self
            .quietly(request, folding::summary_request(turns))
            .await
            .map_err(|e| format!("cannot fold the conversation: {e}"))?;
        let all: Vec<serde_json::Value> = history
            .iter()
            .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
            .collect();
        let all = serde_json::to_vec(&all).map_err(|e| e.to_string())?;
        self.store(session, "history", &all, true)
            .await
            .map_err(|e| format!("cannot keep the history: {e}"))?;
        let folded = folding::folded(messages, &summary);
        let report = AskFolded {
            turn: 0,
            tokens_before: before,
            tokens_after: counter.count(&folded).await,
            messages_folded: turns.len() as u32,
            tokenizer: counter.tokenizer().to_string(),
        };
        Ok(Some((folded, report)))
    }

    /// One answer of the root model, not streamed to the caller.
    async fn quietly(
        &self,
        request: &AskRequest,
        messages: Vec<ChatMessage>,
    ) -> Result<String, String> {
        let chat = ChatRequest {
            model: request.model.clone(),
            messages,
            options: request.options.clone(),
            ..Default::default()
        };
        let whole = self.chats.whole(chat).await;
        match whole.error {
            Some(error) => Err(error),
            None => Ok(whole.text),
        }
    }

    /// The root model's window: as the request says, else as its backends report it.
    fn window(&self, request: &AskRequest) -> Option<u32> {
        if request.context_window > 0 {
            return Some(request.context_window);
        }
        crate::inference::models::list(&self.registry, Instant::now())
            .into_iter()
            .filter(|m| m.name == request.model)
            .flat_map(|m| m.served_by)
            .filter_map(|p| p.offer.map(|o| o.context_window))
            .filter(|w| *w > 0)
            .min()
    }

    /// The `answer` dict's content when code set it ready.
    async fn ready_answer(&self, session: &str) -> Option<String> {
        let dict = self.answer_dict(session).await?;
        dict.ready.then_some(dict.content)
    }

    /// The `answer` dict's content, ready or not: the best partial answer.
    async fn answer_so_far(&self, session: &str) -> Option<String> {
        self.answer_dict(session).await.map(|dict| dict.content)
    }

    async fn answer_dict(&self, session: &str) -> Option<AnswerDict> {
        let code = "import json as _kx_json\n\
print(_kx_json.dumps({'ready': bool(answer.get('ready')), 'content': str(answer.get('content', ''))} \
if isinstance(answer, dict) else {'ready': False, 'content': ''}))";
        let ran = self
            .sessions
            .run_collected(session, "python", code.to_string())
            .await
            .ok()?;
        serde_json::from_str(ran.stdout.trim()).ok()
    }

    /// The text of a session variable (FINAL_VAR).
    async fn variable(&self, session: &str, name: &str) -> Result<String, String> {
        if !name.chars().all(|c| c.is_alphanumeric() || c == '_') || name.is_empty() {
            return Err(format!(
                "FINAL_VAR names '{name}', which is not a variable name"
            ));
        }
        let ran = self
            .sessions
            .run_collected(session, "python", format!("print(str({name}), end='')"))
            .await
            .map_err(|status| format!("cannot read {name}: {}", status.message()))?;
        if ran.ok() {
            Ok(ran.stdout)
        } else {
            Ok(format!("FINAL_VAR({name}): {}", ran.stderr.trim()))
        }
    }

    /// The session languages besides Python that some node runs.
    fn other_languages(&self) -> Vec<&'static str> {
        let nodes = self.registry.list(Instant::now());
        Language::IN_SESSIONS
            .iter()
            .filter(|l| **l != Language::Python)
            .filter(|l| {
                nodes.iter().any(|node| {
                    node.runtimes
                        .iter()
                        .flat_map(|f| &f.runtimes)
                        .any(|r| r.language == l.name() && r.health() == RuntimeHealth::Healthy)
                })
            })
            .map(|l| l.name())
            .collect()
    }
}

/// What the request allows each run (the budgets shared by the tree are in [`Budget`]).
struct Limits {
    iterations: u32,
    output_chars: usize,
    failures: u32,
}

impl Limits {
    fn of(request: &AskRequest) -> Self {
        let or = |asked: u32, default: u32| if asked == 0 { default } else { asked };
        Limits {
            iterations: or(request.max_iterations, DEFAULT_MAX_ITERATIONS),
            output_chars: or(request.max_output_chars, DEFAULT_MAX_OUTPUT_CHARS) as usize,
            failures: or(request.max_failures, DEFAULT_MAX_FAILURES),
        }
    }
}

/// How a child run ended, and the node its session was on.
pub struct ChildRun {
    pub finished: AskFinished,
    pub node: String,
}

impl ChildRun {
    /// Its final answer, or why there is none: a child whose budget ran out has only a partial
    /// answer, which its parent's code should not take for the answer.
    pub fn answer(&self) -> Result<String, String> {
        let f = &self.finished;
        if !f.error.is_empty() {
            return Err(f.error.clone());
        }
        if budget::is_budget(&f.reason) {
            return Err(format!(
                "the run's budget ran out ({}) before the child answered",
                f.reason
            ));
        }
        Ok(f.answer.clone())
    }

    /// Tokens of all its turns and sub-calls.
    pub fn tokens(&self) -> u64 {
        let f = &self.finished;
        f.prompt_tokens + f.completion_tokens + f.subcall_tokens
    }
}

/// Tokens of the root model's turns, and the sub-calls.
#[derive(Default)]
struct Totals {
    prompt_tokens: u64,
    completion_tokens: u64,
    subcalls: u64,
    subcall_tokens: u64,
}

impl Totals {
    fn finished(&self, answer: String, reason: &str, iterations: u32) -> AskFinished {
        AskFinished {
            answer,
            reason: reason.to_string(),
            iterations,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            error: String::new(),
            subcalls: self.subcalls,
            subcall_tokens: self.subcall_tokens,
        }
    }
}

/// The blocks of a reply that run: those tagged `repl` run as Python (as the reference
/// implementation's prompts write them), and those in a language sessions hold.
fn runnable_blocks(reply: &str) -> Vec<(&'static str, String)> {
    crate::codeblocks::parse(reply)
        .into_iter()
        .filter_map(|block| {
            let language = match block.language {
                _ if block.info_language == "repl" => Language::Python,
                Some(language) if language.in_sessions() => language,
                _ => return None,
            };
            Some((language.name(), block.code))
        })
        .collect()
}

/// What the model is shown of an execution: stdout, then stderr, then why it failed.
fn shown(ran: &Collected) -> String {
    let mut shown = ran.stdout.clone();
    if !ran.stderr.is_empty() {
        shown.push_str(&ran.stderr);
    }
    match &ran.result {
        Some(result) if !result.message.is_empty() => {
            shown.push_str(&format!(
                "\n[{}: {}]",
                status_name(result.status()),
                result.message
            ));
        }
        None => shown.push_str(&format!("\n[failed: {}]", ran.error)),
        _ => {}
    }
    shown
}

fn message(role: &str, content: String) -> ChatMessage {
    ChatMessage {
        role: role.to_string(),
        content,
    }
}

async fn send(events: &AskSender, event: ask_event::Event) -> Result<(), String> {
    events
        .send(Ok(AskEvent { event: Some(event) }))
        .await
        .map_err(|_| "the caller went away".to_string())
}
