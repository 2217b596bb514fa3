//! Chat answers on the failover loop. An answer goes to a node serving the model (fewest
//! generations in flight; the conversation's last node while no other is less busy). When that
//! node or its backend fails mid-answer (stream broken, node down or silent, no token within the
//! stall timeout), the answer continues on another node: the conversation is sent again with the
//! text produced so far as a trailing assistant message, max tokens lowered by what was already
//! produced, and the usage added up. A backend that cannot continue a prefix generates the
//! answer again instead, with the same seed, and the text already sent is dropped from its
//! stream. The caller sees one stream of text with a failover event where it moved.

use std::{
    hash::{BuildHasher, Hash, Hasher},
    num::NonZeroUsize,
    sync::{Arc, Mutex},
    time::Duration,
};

use kowalski_exo_common::proto::{
    Answering, BackendState, ChatEvent, ChatFinished, ChatMessage, ChatRequest, CountTokensRequest,
    Failover, GenerateDelta, GenerateRequest, chat_event, generate_event,
};
use lru::LruCache;
use metrics::{counter, histogram};
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::StreamExt;
use tonic::{Code, Status};

use crate::{
    cluster_metrics::{ANSWERS, FAILOVERS, TIME_TO_FIRST_TOKEN, TOKENS},
    registry::{Load, NodeRegistry},
    scheduling::{
        agents::AgentConnector,
        failover::{self, Attempt, AttemptEnd, CallerGone, Departure, Outcome, Work, loss_reason},
        placement::Requirements,
    },
};

/// A backend that sends no token for this long has failed the answer.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Conversations remembered for stickiness; the least recently answered are forgotten.
const CONVERSATIONS_KEPT: NonZeroUsize = NonZeroUsize::new(10_000).expect("not zero");

/// Where a chat's events go.
pub type ChatSender = mpsc::Sender<Result<ChatEvent, Status>>;

/// A node that has not counted tokens within this is not waited for.
const COUNT_TIMEOUT: Duration = Duration::from_secs(5);

/// Chat events buffered while an answer is collected whole.
const WHOLE_BUFFER: usize = 64;

/// An answer collected whole rather than streamed.
#[derive(Debug, Default)]
pub struct WholeAnswer {
    pub text: String,
    /// The node that answered last.
    pub node: String,
    /// Prompt plus completion tokens.
    pub tokens: u64,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// Places chat answers and moves them when nodes fail.
#[derive(Clone)]
pub struct Chats {
    registry: NodeRegistry,
    agents: Arc<dyn AgentConnector>,
    stall_timeout: Duration,
    /// The node that last answered each conversation.
    conversations: Arc<Mutex<LruCache<String, String>>>,
}

impl Chats {
    /// Chats that reach agents through `agents` (gRPC in the product); a node silent for
    /// `stall_timeout` mid-answer loses the answer.
    pub fn new(
        registry: NodeRegistry,
        agents: Arc<dyn AgentConnector>,
        stall_timeout: Duration,
    ) -> Self {
        Chats {
            registry,
            agents,
            stall_timeout,
            conversations: Arc::new(Mutex::new(LruCache::new(CONVERSATIONS_KEPT))),
        }
    }

    /// Answers `request` to its end, with failover, and collects it.
    pub async fn whole(&self, request: ChatRequest) -> WholeAnswer {
        let (events, mut receiver) = mpsc::channel(WHOLE_BUFFER);
        let chats = self.clone();
        tokio::spawn(async move { chats.answer(request, None, &events).await });
        let mut whole = WholeAnswer::default();
        while let Some(event) = receiver.recv().await {
            match event.map(|e| e.event) {
                Ok(Some(chat_event::Event::Answering(answering))) => {
                    whole.node = answering.node_name
                }
                Ok(Some(chat_event::Event::Delta(delta))) => whole.text.push_str(&delta.text),
                Ok(Some(chat_event::Event::Finished(finished))) => {
                    whole.tokens =
                        u64::from(finished.prompt_tokens) + u64::from(finished.completion_tokens);
                    if !finished.error.is_empty() {
                        whole.error = Some(finished.error);
                    }
                }
                Ok(_) => {}
                Err(status) => whole.error = Some(status.message().to_string()),
            }
        }
        whole
    }

    pub fn registry(&self) -> &NodeRegistry {
        &self.registry
    }

    /// The tokens of each of `texts` as `model`'s own tokenizer counts them, asked of a node
    /// whose backend serves the model and works; why not, when none could count them.
    pub async fn count_tokens(&self, model: &str, texts: Vec<String>) -> Result<Vec<u64>, String> {
        let serving = super::models::list(&self.registry, Instant::now())
            .into_iter()
            .filter(|m| m.name == model)
            .flat_map(|m| m.served_by)
            .find(|p| {
                p.offer
                    .as_ref()
                    .is_some_and(|o| o.state() == BackendState::Ready)
            })
            .ok_or_else(|| format!("no node serves {model} with a working backend"))?;
        let address = self
            .registry
            .address(&serving.node_id)
            .ok_or_else(|| format!("{} left the cluster", serving.node_name))?;
        let attempt = Attempt {
            node_id: serving.node_id,
            node_name: serving.node_name,
            address,
            number: 1,
        };
        let request = CountTokensRequest {
            model: model.to_string(),
            texts,
        };
        match tokio::time::timeout(COUNT_TIMEOUT, self.agents.count_tokens(&attempt, request)).await
        {
            Ok(counted) => counted.map_err(|status| status.message().to_string()),
            Err(_) => Err(format!(
                "{} did not count within {COUNT_TIMEOUT:?}",
                attempt.node_name
            )),
        }
    }

    /// Answers `request` to its end, streaming events; the last is `finished`, unless the
    /// caller left. Past `deadline` the answer ends with an error after the text already sent.
    pub async fn answer(
        &self,
        mut request: ChatRequest,
        deadline: Option<Instant>,
        events: &ChatSender,
    ) {
        let conversation = conversation_key(&request);
        let prefer = self
            .conversations
            .lock()
            .expect("conversations lock poisoned")
            .get(&conversation)
            .cloned();
        // A seed makes the answer repeatable, so a node that must generate it again after a
        // failover says the same words.
        let options = request.options.get_or_insert_default();
        options.seed = options.seed.or_else(|| Some(fresh_seed()));
        let mut answer = Answer {
            request,
            prefer,
            events,
            agents: self.agents.as_ref(),
            registry: &self.registry,
            stall_timeout: self.stall_timeout,
            text: String::new(),
            usage: (0, 0),
            lost: None,
            replay: None,
            failovers: 0,
            diverged: false,
            asked_at: Instant::now(),
            first_token: false,
        };
        let run = failover::run(&self.registry, &mut answer);
        let (outcome, last) = match deadline {
            None => run.await,
            Some(deadline) => match tokio::time::timeout_at(deadline, run).await {
                Ok(ended) => ended,
                Err(_) => (
                    Outcome::Failed("the caller's deadline passed before the answer ended".into()),
                    None,
                ),
            },
        };
        let model = answer.request.model.clone();
        counter!(TOKENS, "model" => model.clone()).increment(answer.usage.1.into());
        let ended = match &outcome {
            Outcome::Finished(_) => "finished",
            Outcome::Failed(_) => "failed",
            Outcome::Rejected(_) => "rejected",
            Outcome::Cancelled => "cancelled",
        };
        counter!(ANSWERS, "model" => model, "outcome" => ended).increment(1);
        let finished = match outcome {
            Outcome::Finished(reason) => {
                if let Some(last) = last {
                    self.conversations
                        .lock()
                        .expect("conversations lock poisoned")
                        .put(conversation, last.node_id);
                }
                ChatFinished {
                    finish_reason: reason,
                    ..answer.totals()
                }
            }
            Outcome::Failed(error) => ChatFinished {
                error,
                ..answer.totals()
            },
            Outcome::Rejected(status) => {
                let _ = events.send(Err(status)).await;
                return;
            }
            Outcome::Cancelled => return,
        };
        let _ = send(events, chat_event::Event::Finished(finished)).await;
    }
}

/// What makes answers one conversation: the id the caller gave, else the model and the
/// messages up to the first user message (a system prompt and the opening question), which
/// every later turn repeats.
fn conversation_key(request: &ChatRequest) -> String {
    if !request.conversation_id.is_empty() {
        return format!("id:{}", request.conversation_id);
    }
    let opening = request
        .messages
        .iter()
        .position(|m| m.role == "user")
        .map_or(request.messages.len(), |i| i + 1);
    let mut hasher = std::hash::DefaultHasher::new();
    request.model.hash(&mut hasher);
    for message in &request.messages[..opening] {
        message.role.hash(&mut hasher);
        message.content.hash(&mut hasher);
    }
    format!("opening:{:016x}", hasher.finish())
}

/// A seed no other answer is likely to share.
fn fresh_seed() -> i64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    // Backends take seeds as non-negative 32-bit numbers.
    i64::from(hasher.finish() as u32 >> 1)
}

/// One answer as work for the failover loop.
struct Answer<'a> {
    request: ChatRequest,
    prefer: Option<String>,
    events: &'a ChatSender,
    agents: &'a dyn AgentConnector,
    registry: &'a NodeRegistry,
    stall_timeout: Duration,
    /// Text sent to the caller so far, over every attempt.
    text: String,
    /// Prompt and completion tokens of the attempts so far.
    usage: (u32, u32),
    /// The attempt lost last, with why, until the next one is placed.
    lost: Option<(Attempt, String)>,
    /// Set while the current attempt generates the answer again from the start.
    replay: Option<Replay>,
    failovers: u32,
    /// A regenerated answer did not repeat the text already sent.
    diverged: bool,
    asked_at: Instant,
    /// Whether the caller has had text yet.
    first_token: bool,
}

/// A regenerated answer's text, matched against what the caller already has and dropped up to
/// its length.
struct Replay {
    sent: String,
    /// Bytes of `sent` the new stream has covered.
    covered: usize,
}

impl Replay {
    /// Whether the new stream has not yet covered all that was sent.
    fn short(&self) -> bool {
        self.covered < self.sent.len()
    }

    /// The part of `text` past what was already sent, and whether the covered part differed.
    fn pass<'t>(&mut self, text: &'t str) -> (&'t str, bool) {
        let remaining = self.sent.len() - self.covered;
        if remaining == 0 {
            return (text, false);
        }
        let mut cut = remaining.min(text.len());
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        let expected =
            &self.sent.as_bytes()[self.covered..(self.covered + cut).min(self.sent.len())];
        let differs = !text.as_bytes().starts_with(expected);
        self.covered = (self.covered + cut).min(self.sent.len());
        (&text[cut..], differs)
    }
}

impl Answer<'_> {
    fn totals(&self) -> ChatFinished {
        ChatFinished {
            prompt_tokens: self.usage.0,
            completion_tokens: self.usage.1,
            failovers: self.failovers,
            prefix_diverged: self.diverged,
            ..Default::default()
        }
    }

    /// Whether the next attempt asks a node to continue text already sent.
    fn continuing(&self) -> bool {
        !self.text.is_empty() && self.replay.is_none()
    }

    /// Whether `node` continues a trailing assistant message of this model.
    fn continues_prefix(&self, node_id: &str) -> bool {
        self.registry
            .profile(node_id)
            .and_then(|p| {
                let model = p.capabilities.serving(&self.request.model)?;
                Some(model.continues_prefix)
            })
            .unwrap_or(false)
    }

    /// The request for the next attempt: the conversation, then what was already said as the
    /// start of the assistant's answer with the token budget that is left, unless the answer
    /// is generated again from the start.
    fn generate_request(&self) -> GenerateRequest {
        let mut messages = self.request.messages.clone();
        let mut options = self.request.options.clone().unwrap_or_default();
        if self.continuing() {
            match messages.last_mut() {
                // The caller began the answer itself (a prefill): the text goes on from there.
                Some(last) if last.role == "assistant" => last.content.push_str(&self.text),
                _ => messages.push(ChatMessage {
                    role: "assistant".into(),
                    content: self.text.clone(),
                }),
            }
            if options.max_tokens > 0 {
                options.max_tokens = options.max_tokens.saturating_sub(self.usage.1);
            }
        }
        GenerateRequest {
            model: self.request.model.clone(),
            messages,
            options: Some(options),
            request_id: self.request.conversation_id.clone(),
        }
    }
}

#[tonic::async_trait]
impl Work for Answer<'_> {
    /// The finish reason.
    type Result = String;

    fn what(&self) -> String {
        format!("answer of {}", self.request.model)
    }

    fn requirements<'b>(&'b self, exclude: &'b [String]) -> Requirements<'b> {
        Requirements {
            model: Some(&self.request.model),
            continuing: !self.text.is_empty(),
            prefer: self.prefer.as_deref(),
            exclude,
            ..Default::default()
        }
    }

    fn max_attempts(&self) -> u32 {
        self.request.max_attempts
    }

    fn load(&self) -> Load<'_> {
        Load::Generation(&self.request.model)
    }

    fn departure(&self) -> Departure {
        let events = self.events.clone();
        Box::pin(async move { events.closed().await })
    }

    async fn queued(&mut self) -> Result<(), CallerGone> {
        Ok(())
    }

    async fn placed(&mut self, attempt: &Attempt) -> Result<(), CallerGone> {
        self.replay =
            (!self.text.is_empty() && !self.continues_prefix(&attempt.node_id)).then(|| Replay {
                sent: self.text.clone(),
                covered: 0,
            });
        if let Some((lost, reason)) = self.lost.take() {
            self.failovers += 1;
            if !self.text.is_empty() {
                counter!(FAILOVERS, "model" => self.request.model.clone()).increment(1);
            }
            send(
                self.events,
                chat_event::Event::Failover(Failover {
                    from_node: lost.node_name,
                    to_node: attempt.node_name.clone(),
                    reason,
                    tokens_so_far: self.usage.1,
                    regenerated: self.replay.is_some(),
                }),
            )
            .await?;
        }
        send(
            self.events,
            chat_event::Event::Answering(Answering {
                node_id: attempt.node_id.clone(),
                node_name: attempt.node_name.clone(),
                attempt: attempt.number,
            }),
        )
        .await
    }

    async fn attempt(&mut self, attempt: &Attempt) -> AttemptEnd<String> {
        // Earlier attempts may already have said all the tokens the caller allowed.
        let budget = self.request.options.as_ref().map_or(0, |o| o.max_tokens);
        if budget > 0 && self.usage.1 >= budget {
            return AttemptEnd::Finished("length".into());
        }
        let request = self.generate_request();
        let call = self.agents.generate(attempt, request);
        let mut stream = match tokio::time::timeout(self.stall_timeout, call).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(status)) => return classify(status, self.continuing(), self.events),
            Err(_) => {
                return AttemptEnd::Lost(format!("no answer for {:?}", self.stall_timeout));
            }
        };
        // Deltas of this attempt, counted as they come: the loop may drop this attempt at any
        // await (silence), and what was said must still count.
        let mut produced = 0;
        loop {
            let next = match tokio::time::timeout(self.stall_timeout, stream.next()).await {
                Ok(next) => next,
                Err(_) => {
                    return AttemptEnd::Lost(format!("no token for {:?}", self.stall_timeout));
                }
            };
            match next {
                Some(Ok(event)) => match event.event {
                    Some(generate_event::Event::Delta(delta)) => {
                        produced += 1;
                        let text = match &mut self.replay {
                            None => delta.text.as_str(),
                            Some(replay) => {
                                let (new, differs) = replay.pass(&delta.text);
                                if differs && !self.diverged {
                                    tracing::warn!(node = %attempt.node_name, "the regenerated answer differs from the text already sent");
                                    self.diverged = true;
                                }
                                new
                            }
                        };
                        if text.is_empty() {
                            continue;
                        }
                        let sent = send(
                            self.events,
                            chat_event::Event::Delta(GenerateDelta { text: text.into() }),
                        )
                        .await;
                        if sent.is_err() {
                            return AttemptEnd::Cancelled;
                        }
                        if !self.first_token {
                            self.first_token = true;
                            histogram!(TIME_TO_FIRST_TOKEN, "model" => self.request.model.clone())
                                .record(self.asked_at.elapsed().as_secs_f64());
                        }
                        // Only text the caller has is the answer so far.
                        self.text.push_str(text);
                        self.usage.1 += 1;
                    }
                    Some(generate_event::Event::Finished(finished)) => {
                        if self.replay.as_ref().is_some_and(Replay::short) {
                            // Ended before it said again all that was already sent.
                            self.diverged = true;
                        }
                        self.usage.0 += finished.prompt_tokens;
                        self.usage.1 += finished.completion_tokens.saturating_sub(produced);
                        return AttemptEnd::Finished(finished.finish_reason);
                    }
                    None => {}
                },
                Some(Err(status)) => return classify(status, self.continuing(), self.events),
                None => {
                    return AttemptEnd::Lost(
                        "the node ended the answer without finishing it".into(),
                    );
                }
            }
        }
    }

    async fn retrying(&mut self, lost: &Attempt, reason: &str) -> Result<(), CallerGone> {
        self.lost = Some((lost.clone(), reason.to_string()));
        Ok(())
    }
}

/// A backend's or agent's failure is retried on another node; a refusal of the request itself
/// (unknown model there, bad options) is not, unless the request was the coordinator's own
/// continuation of an answer, which another node may take.
fn classify(status: Status, continuing: bool, events: &ChatSender) -> AttemptEnd<String> {
    match status.code() {
        Code::InvalidArgument if continuing => AttemptEnd::Lost(format!(
            "it would not continue the answer: {}",
            status.message()
        )),
        Code::InvalidArgument => AttemptEnd::Rejected(status),
        Code::Cancelled if events.is_closed() => AttemptEnd::Cancelled,
        Code::ResourceExhausted => AttemptEnd::Busy(loss_reason(&status)),
        _ => AttemptEnd::Lost(loss_reason(&status)),
    }
}

async fn send(events: &ChatSender, event: chat_event::Event) -> Result<(), CallerGone> {
    events
        .send(Ok(ChatEvent { event: Some(event) }))
        .await
        .map_err(|_| CallerGone)
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, VecDeque};

    use kowalski_exo_common::proto::{
        BackendState, GenerateEvent, GenerateFinished, ModelCatalog, ModelOffer, Register,
        SamplingOptions,
    };
    use tokio::time::Instant;

    use super::*;
    use crate::scheduling::agents::{ExecStream, GenerateStream};

    /// What a scripted agent's backend does with the next generation.
    enum Script {
        Answer(&'static [&'static str], &'static str),
        DieAfter(&'static [&'static str]),
        StallAfter(&'static [&'static str]),
    }

    /// Agents whose generations are scripted streams; every request is kept.
    #[derive(Default)]
    struct ScriptedBackends {
        scripts: Mutex<HashMap<String, VecDeque<Script>>>,
        requests: Mutex<Vec<(String, GenerateRequest)>>,
    }

    fn delta(text: &str) -> Result<GenerateEvent, Status> {
        Ok(GenerateEvent {
            event: Some(generate_event::Event::Delta(GenerateDelta {
                text: text.into(),
            })),
        })
    }

    #[tonic::async_trait]
    impl AgentConnector for ScriptedBackends {
        async fn execute(
            &self,
            _agent: &Attempt,
            _request: kowalski_exo_common::proto::ExecuteRequest,
        ) -> Result<ExecStream, Status> {
            Err(Status::unimplemented("these agents only generate"))
        }

        async fn generate(
            &self,
            agent: &Attempt,
            request: GenerateRequest,
        ) -> Result<GenerateStream, Status> {
            let address = agent.address.as_str();
            self.requests
                .lock()
                .unwrap()
                .push((address.to_string(), request));
            let script = self
                .scripts
                .lock()
                .unwrap()
                .get_mut(address)
                .and_then(VecDeque::pop_front)
                .ok_or_else(|| Status::unavailable("no script left"))?;
            let deltas = |texts: &[&str]| texts.iter().map(|t| delta(t)).collect::<Vec<_>>();
            Ok(match script {
                Script::Answer(texts, reason) => {
                    let mut events = deltas(texts);
                    events.push(Ok(GenerateEvent {
                        event: Some(generate_event::Event::Finished(GenerateFinished {
                            finish_reason: reason.into(),
                            prompt_tokens: 10,
                            completion_tokens: texts.len() as u32,
                        })),
                    }));
                    Box::pin(tokio_stream::iter(events))
                }
                Script::DieAfter(texts) => {
                    let mut events = deltas(texts);
                    events.push(Err(Status::unavailable("the backend closed the stream")));
                    Box::pin(tokio_stream::iter(events))
                }
                Script::StallAfter(texts) => {
                    Box::pin(tokio_stream::iter(deltas(texts)).chain(tokio_stream::pending()))
                }
            })
        }

        async fn count_tokens(
            &self,
            _agent: &Attempt,
            _request: kowalski_exo_common::proto::CountTokensRequest,
        ) -> Result<Vec<u64>, Status> {
            Err(Status::unimplemented("these agents only generate"))
        }

        async fn open_session(
            &self,
            _agent: &Attempt,
            _request: kowalski_exo_common::proto::OpenSessionRequest,
        ) -> Result<kowalski_exo_common::proto::SessionInfo, Status> {
            Err(Status::unimplemented("these agents only generate"))
        }

        async fn execute_in_session(
            &self,
            _agent: &Attempt,
            _request: kowalski_exo_common::proto::SessionExecuteRequest,
        ) -> Result<crate::scheduling::agents::ExecStream, Status> {
            Err(Status::unimplemented("these agents only generate"))
        }

        async fn close_session(&self, _agent: &Attempt, _session_id: &str) -> Result<(), Status> {
            Err(Status::unimplemented("these agents only generate"))
        }
    }

    /// A registry whose nodes each serve model `m` with a working backend that continues a
    /// prefix.
    fn cluster(nodes: &[&str]) -> NodeRegistry {
        let registry = NodeRegistry::default();
        for node in nodes {
            add_node(&registry, node, true);
        }
        registry
    }

    fn add_node(registry: &NodeRegistry, node: &str, continues_prefix: bool) {
        {
            let offer = ModelOffer {
                name: "m".into(),
                state: BackendState::Ready as i32,
                continues_prefix,
                ..Default::default()
            };
            let registration = Register {
                name: node.to_string(),
                address: format!("http://{node}:50052"),
                capacity: 2,
                models: Some(ModelCatalog {
                    models: vec![offer],
                }),
                ..Default::default()
            };
            registry.register(registration, Instant::now());
        }
    }

    fn chats(
        registry: NodeRegistry,
        scripts: Vec<(&str, Vec<Script>)>,
    ) -> (Chats, Arc<ScriptedBackends>) {
        chats_stalling_after(registry, scripts, DEFAULT_STALL_TIMEOUT)
    }

    fn chats_stalling_after(
        registry: NodeRegistry,
        scripts: Vec<(&str, Vec<Script>)>,
        stall_timeout: Duration,
    ) -> (Chats, Arc<ScriptedBackends>) {
        let backends = ScriptedBackends::default();
        for (node, steps) in scripts {
            backends
                .scripts
                .lock()
                .unwrap()
                .insert(format!("http://{node}:50052"), steps.into());
        }
        let backends = Arc::new(backends);
        let chats = Chats::new(registry, backends.clone(), stall_timeout);
        (chats, backends)
    }

    fn question(max_tokens: u32) -> ChatRequest {
        ChatRequest {
            model: "m".into(),
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "Greet the world.".into(),
            }],
            options: Some(SamplingOptions {
                max_tokens,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Events as short strings, to compare whole sequences.
    async fn trace(chats: &Chats, request: ChatRequest) -> Vec<String> {
        let (events, mut received) = mpsc::channel(64);
        chats.answer(request, None, &events).await;
        drop(events);
        let mut seen = Vec::new();
        while let Some(Ok(event)) = received.recv().await {
            seen.push(match event.event.unwrap() {
                chat_event::Event::Answering(a) => {
                    format!("answering {} #{}", a.node_name, a.attempt)
                }
                chat_event::Event::Delta(d) => format!("delta {}", d.text),
                chat_event::Event::Failover(f) => format!(
                    "failover {} -> {} after {} tokens ({}){}",
                    f.from_node,
                    f.to_node,
                    f.tokens_so_far,
                    f.reason,
                    if f.regenerated { " regenerated" } else { "" }
                ),
                chat_event::Event::Finished(f) => format!(
                    "finished {}{} {}+{} tokens {} failovers{}",
                    f.finish_reason,
                    f.error,
                    f.prompt_tokens,
                    f.completion_tokens,
                    f.failovers,
                    if f.prefix_diverged { " diverged" } else { "" }
                ),
            });
        }
        seen
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_broken_off_continues_on_another_node_from_the_text_already_sent() {
        let (chats, backends) = chats(
            cluster(&["a", "b"]),
            vec![
                ("a", vec![Script::DieAfter(&["Hel", "lo"])]),
                ("b", vec![Script::Answer(&[", world"], "stop")]),
            ],
        );
        assert_eq!(
            trace(&chats, question(10)).await,
            [
                "answering a #1",
                "delta Hel",
                "delta lo",
                "failover a -> b after 2 tokens (unavailable: the backend closed the stream)",
                "answering b #2",
                "delta , world",
                "finished stop 10+3 tokens 1 failovers",
            ]
        );
        let requests = backends.requests.lock().unwrap();
        let (address, continued) = &requests[1];
        assert_eq!(address, "http://b:50052");
        let last = continued.messages.last().unwrap();
        assert_eq!(
            (last.role.as_str(), last.content.as_str()),
            ("assistant", "Hello")
        );
        assert_eq!(continued.options.as_ref().unwrap().max_tokens, 8);
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_that_stalls_loses_the_answer_at_the_stall_timeout() {
        // Shorter than the silence deadline (5 s), which these never-beating nodes would hit.
        let stall = Duration::from_secs(1);
        let (chats, _) = chats_stalling_after(
            cluster(&["a", "b"]),
            vec![
                ("a", vec![Script::StallAfter(&["Hel"])]),
                ("b", vec![Script::Answer(&["lo"], "stop")]),
            ],
            stall,
        );
        let started = Instant::now();
        let events = trace(&chats, question(0)).await;
        assert!(started.elapsed() >= stall);
        assert_eq!(
            events[2],
            "failover a -> b after 1 tokens (no token for 1s)"
        );
        assert_eq!(
            events.last().unwrap(),
            "finished stop 10+2 tokens 1 failovers"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_other_node_serving_the_model_it_ends_with_an_error_after_the_text_sent() {
        let (chats, _) = chats(
            cluster(&["a"]),
            vec![("a", vec![Script::DieAfter(&["Hel"])])],
        );
        let events = trace(&chats, question(0)).await;
        assert_eq!(events[..2], ["answering a #1", "delta Hel"]);
        let last = events.last().unwrap();
        assert!(
            last.starts_with(
                "finished attempt 1 on a: unavailable: the backend closed the stream; no other node"
            ),
            "{last}"
        );
    }

    /// Two turns of one conversation: the first while node a is busy (so it goes to b), the
    /// second with both idle (a would win on its name); returns the nodes asked.
    async fn two_turns(first: ChatRequest, second: ChatRequest) -> Vec<String> {
        let registry = cluster(&["a", "b"]);
        let (chats, backends) = chats(
            registry.clone(),
            vec![
                ("a", vec![Script::Answer(&["one"], "stop")]),
                (
                    "b",
                    vec![
                        Script::Answer(&["one"], "stop"),
                        Script::Answer(&["two"], "stop"),
                    ],
                ),
            ],
        );
        let a = registry.list(Instant::now())[0].id.clone();
        let busy = registry.begin(&a, Load::Generation("m"));
        trace(&chats, first).await;
        drop(busy);
        trace(&chats, second).await;
        let requests = backends.requests.lock().unwrap();
        requests.iter().map(|(node, _)| node.clone()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_conversation_stays_on_its_node_while_no_other_is_less_busy() {
        let turn = ChatRequest {
            conversation_id: "c1".into(),
            ..question(0)
        };
        assert_eq!(
            two_turns(turn.clone(), turn).await,
            ["http://b:50052", "http://b:50052"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_follow_up_repeating_the_opening_stays_with_its_conversation() {
        let mut follow_up = question(0);
        follow_up.messages.extend([
            ChatMessage {
                role: "assistant".into(),
                content: "one".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "Again.".into(),
            },
        ]);
        assert_eq!(
            two_turns(question(0), follow_up).await,
            ["http://b:50052", "http://b:50052"]
        );
    }

    #[test]
    fn a_conversation_is_its_id_or_else_its_model_and_opening() {
        let key = |f: &dyn Fn(&mut ChatRequest)| {
            let mut request = question(0);
            f(&mut request);
            conversation_key(&request)
        };
        let opening = key(&|_| {});
        let later_turn = key(&|r| {
            r.messages.push(ChatMessage {
                role: "assistant".into(),
                content: "Hello!".into(),
            })
        });
        assert_eq!(opening, later_turn);
        assert_ne!(opening, key(&|r| r.model = "other".into()));
        assert_ne!(opening, key(&|r| r.messages[0].content = "Hi.".into()));
        assert_eq!(key(&|r| r.conversation_id = "c".into()), "id:c");
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_that_cannot_continue_a_prefix_regenerates_and_the_sent_text_is_dropped() {
        let registry = cluster(&["a"]);
        add_node(&registry, "b", false);
        let (chats, backends) = chats(
            registry,
            vec![
                ("a", vec![Script::DieAfter(&["Hel", "lo"])]),
                ("b", vec![Script::Answer(&["He", "llo, w", "orld"], "stop")]),
            ],
        );
        assert_eq!(
            trace(&chats, question(10)).await,
            [
                "answering a #1",
                "delta Hel",
                "delta lo",
                "failover a -> b after 2 tokens (unavailable: the backend closed the stream) regenerated",
                "answering b #2",
                "delta , w",
                "delta orld",
                "finished stop 10+4 tokens 1 failovers",
            ]
        );
        let requests = backends.requests.lock().unwrap();
        let (first, again) = (&requests[0].1, &requests[1].1);
        assert_eq!(again.messages, first.messages, "sent again as it was");
        let options = again.options.as_ref().unwrap();
        assert_eq!(
            options.max_tokens, 10,
            "the whole budget, for the whole answer"
        );
        assert!(options.seed.is_some(), "a seed so the answer repeats");
        assert_eq!(options.seed, first.options.as_ref().unwrap().seed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_regenerated_answer_that_differs_from_the_text_sent_is_reported() {
        let registry = cluster(&["a"]);
        add_node(&registry, "b", false);
        let (chats, _) = chats(
            registry,
            vec![
                ("a", vec![Script::DieAfter(&["Hello"])]),
                ("b", vec![Script::Answer(&["Howdy", " there"], "stop")]),
            ],
        );
        let events = trace(&chats, question(0)).await;
        assert_eq!(events[3..5], ["answering b #2", "delta  there"]);
        assert!(events.last().unwrap().ends_with("diverged"), "{events:?}");
    }

    #[test]
    fn a_replay_drops_exactly_the_text_sent_even_across_characters_split_by_deltas() {
        let mut replay = Replay {
            sent: "naïve c".into(),
            covered: 0,
        };
        assert_eq!(replay.pass("na"), ("", false));
        assert_eq!(replay.pass("ïve"), ("", false));
        assert_eq!(replay.pass(" cat"), ("at", false));
        assert_eq!(replay.pass("s"), ("s", false));
        let mut diverging = Replay {
            sent: "ab".into(),
            covered: 0,
        };
        assert_eq!(diverging.pass("xyz"), ("z", true));
        // A repeat that differs mid-character is cut after that character, never inside it.
        let mut mid_character = Replay {
            sent: "ab".into(),
            covered: 0,
        };
        assert_eq!(mid_character.pass("aéz"), ("z", true));
        assert!(!mid_character.short());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_answer_leaves_its_conversation_where_it_was() {
        let (chats, backends) = chats(
            cluster(&["a", "b"]),
            vec![
                ("a", vec![Script::DieAfter(&[])]),
                ("b", vec![Script::DieAfter(&[])]),
            ],
        );
        let a = chats.registry().list(Instant::now())[0].id.clone();
        chats
            .conversations
            .lock()
            .unwrap()
            .put("id:c".into(), a.clone());
        let request = ChatRequest {
            conversation_id: "c".into(),
            max_attempts: 2,
            ..question(0)
        };
        let events = trace(&chats, request).await;
        assert!(
            events.last().unwrap().contains("attempt 2 on b"),
            "{events:?}"
        );
        assert_eq!(backends.requests.lock().unwrap().len(), 2);
        let remembered = chats.conversations.lock().unwrap().peek("id:c").cloned();
        assert_eq!(
            remembered,
            Some(a),
            "the failed answer's last node was recorded"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_past_the_callers_deadline_ends_with_an_error_after_its_text() {
        let (chats, _) = chats(
            cluster(&["a"]),
            vec![("a", vec![Script::StallAfter(&["Hel"])])],
        );
        let (events, mut received) = mpsc::channel(64);
        let deadline = Instant::now() + Duration::from_secs(2);
        chats.answer(question(0), Some(deadline), &events).await;
        drop(events);
        let mut last = None;
        while let Some(Ok(event)) = received.recv().await {
            last = event.event;
        }
        match last {
            Some(chat_event::Event::Finished(f)) => {
                assert!(f.error.contains("deadline"), "{}", f.error);
                assert_eq!(f.completion_tokens, 1);
            }
            other => panic!("no finished event: {other:?}"),
        }
    }
}
