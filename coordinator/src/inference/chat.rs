//! Chat answers on the failover loop. An answer goes to a node serving the model (fewest
//! generations in flight, the conversation's last node when it still fits). When that node or
//! its backend fails mid-answer (stream broken, node down or silent, no token within the stall
//! timeout), the answer continues on another node: the conversation is sent again with the
//! text produced so far as a trailing assistant message, max tokens lowered by what was already
//! produced, and the usage added up. The caller sees one stream of text with a failover event
//! where it moved.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use kowalski_exo_common::proto::{
    Answering, ChatEvent, ChatFinished, ChatMessage, ChatRequest, Failover, GenerateDelta,
    GenerateRequest, chat_event, generate_event,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::{Code, Status};

use crate::{
    registry::NodeRegistry,
    scheduling::{
        agents::{AgentConnector, GrpcAgents},
        failover::{self, Attempt, AttemptEnd, CallerGone, Departure, Outcome, Work, loss_reason},
        placement::Requirements,
    },
};

/// A backend that sends no token for this long has failed the answer.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Conversations remembered for stickiness; the oldest are forgotten past this.
const CONVERSATIONS_KEPT: usize = 10_000;

/// Where a chat's events go.
pub type ChatSender = mpsc::Sender<Result<ChatEvent, Status>>;

/// Places chat answers and moves them when nodes fail.
#[derive(Clone)]
pub struct Chats {
    registry: NodeRegistry,
    agents: Arc<dyn AgentConnector>,
    stall_timeout: Duration,
    /// The node that last answered each conversation.
    conversations: Arc<Mutex<HashMap<String, String>>>,
}

impl Chats {
    /// Chats that reach agents over gRPC.
    pub fn new(registry: NodeRegistry) -> Self {
        Self::with_agents(
            registry,
            Arc::new(GrpcAgents::default()),
            DEFAULT_STALL_TIMEOUT,
        )
    }

    pub fn with_agents(
        registry: NodeRegistry,
        agents: Arc<dyn AgentConnector>,
        stall_timeout: Duration,
    ) -> Self {
        Chats {
            registry,
            agents,
            stall_timeout,
            conversations: Arc::default(),
        }
    }

    pub fn registry(&self) -> &NodeRegistry {
        &self.registry
    }

    /// Answers `request` to its end, streaming events; the last is `finished`.
    pub async fn answer(&self, request: ChatRequest, events: &ChatSender) {
        let prefer = (!request.conversation_id.is_empty())
            .then(|| {
                self.conversations
                    .lock()
                    .expect("conversations lock poisoned")
                    .get(&request.conversation_id)
                    .cloned()
            })
            .flatten();
        let mut answer = Answer {
            request,
            prefer,
            events,
            agents: self.agents.as_ref(),
            stall_timeout: self.stall_timeout,
            text: String::new(),
            usage: (0, 0),
            lost: None,
            failovers: 0,
        };
        let (outcome, last) = failover::run(&self.registry, &mut answer).await;
        if let Some(last) = &last
            && !answer.request.conversation_id.is_empty()
        {
            let mut conversations = self
                .conversations
                .lock()
                .expect("conversations lock poisoned");
            if conversations.len() >= CONVERSATIONS_KEPT {
                conversations.clear();
            }
            conversations.insert(answer.request.conversation_id.clone(), last.node_id.clone());
        }
        let finished = match outcome {
            Outcome::Finished(reason) => ChatFinished {
                finish_reason: reason,
                ..answer.totals()
            },
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

/// One answer as work for the failover loop.
struct Answer<'a> {
    request: ChatRequest,
    prefer: Option<String>,
    events: &'a ChatSender,
    agents: &'a dyn AgentConnector,
    stall_timeout: Duration,
    /// Text sent to the caller so far, over every attempt.
    text: String,
    /// Prompt and completion tokens of the attempts so far.
    usage: (u32, u32),
    /// The attempt lost last, with why, until the next one is placed.
    lost: Option<(Attempt, String)>,
    failovers: u32,
}

impl Answer<'_> {
    fn totals(&self) -> ChatFinished {
        ChatFinished {
            prompt_tokens: self.usage.0,
            completion_tokens: self.usage.1,
            failovers: self.failovers,
            ..Default::default()
        }
    }

    /// The request for the next attempt: the conversation, then what was already said as the
    /// start of the assistant's answer, with the token budget that is left.
    fn generate_request(&self) -> GenerateRequest {
        let mut messages = self.request.messages.clone();
        let mut options = self.request.options.clone().unwrap_or_default();
        if !self.text.is_empty() {
            messages.push(ChatMessage {
                role: "assistant".into(),
                content: self.text.clone(),
            });
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

    fn requirements<'b>(&'b self, exclude: &'b [String]) -> Requirements<'b> {
        Requirements {
            model: Some(&self.request.model),
            prefer: self.prefer.as_deref(),
            exclude,
            ..Default::default()
        }
    }

    fn max_attempts(&self) -> u32 {
        self.request.max_attempts
    }

    fn takes_run_slot(&self) -> bool {
        false
    }

    fn departure(&self) -> Departure {
        let events = self.events.clone();
        Box::pin(async move { events.closed().await })
    }

    async fn queued(&mut self) -> Result<(), CallerGone> {
        Ok(())
    }

    async fn placed(&mut self, attempt: &Attempt) -> Result<(), CallerGone> {
        if let Some((lost, reason)) = self.lost.take() {
            self.failovers += 1;
            send(
                self.events,
                chat_event::Event::Failover(Failover {
                    from_node: lost.node_name,
                    to_node: attempt.node_name.clone(),
                    reason,
                    tokens_so_far: self.usage.1,
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
        let call = self.agents.generate(&attempt.address, request);
        let mut stream = match tokio::time::timeout(self.stall_timeout, call).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(status)) => return classify(status, self.events),
            Err(_) => {
                return AttemptEnd::Lost(format!("no answer for {:?}", self.stall_timeout));
            }
        };
        // Tokens of this attempt, counted as they come: the loop may drop this attempt at any
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
                        let sent = send(
                            self.events,
                            chat_event::Event::Delta(GenerateDelta {
                                text: delta.text.clone(),
                            }),
                        )
                        .await;
                        if sent.is_err() {
                            return AttemptEnd::Cancelled;
                        }
                        // Only text the caller has is the answer so far.
                        self.text.push_str(&delta.text);
                        produced += 1;
                        self.usage.1 += 1;
                    }
                    Some(generate_event::Event::Finished(finished)) => {
                        self.usage.0 += finished.prompt_tokens;
                        self.usage.1 += finished.completion_tokens.saturating_sub(produced);
                        return AttemptEnd::Finished(finished.finish_reason);
                    }
                    None => {}
                },
                Some(Err(status)) => return classify(status, self.events),
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
/// (unknown model there, bad options) is not.
fn classify(status: Status, events: &ChatSender) -> AttemptEnd<String> {
    match status.code() {
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
    use std::collections::VecDeque;

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
            _address: &str,
            _request: kowalski_exo_common::proto::ExecuteRequest,
        ) -> Result<ExecStream, Status> {
            Err(Status::unimplemented("these agents only generate"))
        }

        async fn generate(
            &self,
            address: &str,
            request: GenerateRequest,
        ) -> Result<GenerateStream, Status> {
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
    }

    /// A registry whose nodes each serve model `m` with a working backend.
    fn cluster(nodes: &[&str]) -> NodeRegistry {
        let registry = NodeRegistry::default();
        for node in nodes {
            let offer = ModelOffer {
                name: "m".into(),
                state: BackendState::Ready as i32,
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
        registry
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
        let chats = Chats::with_agents(registry, backends.clone(), stall_timeout);
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
        chats.answer(request, &events).await;
        drop(events);
        let mut seen = Vec::new();
        while let Some(Ok(event)) = received.recv().await {
            seen.push(match event.event.unwrap() {
                chat_event::Event::Answering(a) => {
                    format!("answering {} #{}", a.node_name, a.attempt)
                }
                chat_event::Event::Delta(d) => format!("delta {}", d.text),
                chat_event::Event::Failover(f) => format!(
                    "failover {} -> {} after {} tokens ({})",
                    f.from_node, f.to_node, f.tokens_so_far, f.reason
                ),
                chat_event::Event::Finished(f) => format!(
                    "finished {}{} {}+{} tokens {} failovers",
                    f.finish_reason, f.error, f.prompt_tokens, f.completion_tokens, f.failovers
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

    #[tokio::test(start_paused = true)]
    async fn a_conversation_stays_on_its_node_while_it_fits() {
        let (chats, backends) = chats(
            cluster(&["a", "b"]),
            vec![
                (
                    "a",
                    vec![
                        Script::Answer(&["one"], "stop"),
                        Script::Answer(&["two"], "stop"),
                    ],
                ),
                (
                    "b",
                    vec![
                        Script::Answer(&["one"], "stop"),
                        Script::Answer(&["two"], "stop"),
                    ],
                ),
            ],
        );
        let request = ChatRequest {
            conversation_id: "c1".into(),
            ..question(0)
        };
        trace(&chats, request.clone()).await;
        trace(&chats, request).await;
        let requests = backends.requests.lock().unwrap();
        assert_eq!(
            requests[0].0, requests[1].0,
            "the conversation changed node"
        );
    }
}
