//! What clients can ask of the cluster, whatever the transport: list and drain nodes, run code,
//! run a document's blocks, plan one, list models, chat. The gRPC `Coordinator` service is a thin layer over this,
//! and the HTTP API will be another.

use std::{collections::BTreeMap, time::Duration};

use kowalski_exo_common::{
    Language,
    proto::{
        AskEvent, AskRequest, ChatEvent, ChatRequest, ClusterEvent, ClusterExecuteRequest,
        ClusterModel, ClusterOpenSessionRequest, IsolationLayer, NodeInfo, OpenSessionRequest,
        PlacementConstraints, PlannedBlock, RunBlocksRequest,
    },
    request_size,
};
use tokio::{sync::mpsc, time::Instant};
use tonic::Status;

use crate::{
    cluster_metrics, codeblocks,
    error::CoordinatorError,
    inference::{Chats, models},
    registry::{NodeRegistry, moves::RecentMoves},
    rlm::{self, Rlm, recent::RecentRuns},
    scheduling::{
        dispatch::{Dispatcher, Outcome, RunSpec, bounded_timeout},
        document::{self, BlockDefaults, DocumentSession},
        placement::{Requirements, place, with_candidates},
    },
    sessions::{ClusterSessions, SessionSettings},
};

/// Events buffered per stream before a slow client holds the run back.
const EVENT_BUFFER: usize = 64;

/// The events of one run or document, ending when it does; an `Err` is a node's refusal of
/// the request itself, passed on as it came.
pub type EventReceiver = mpsc::Receiver<Result<ClusterEvent, Status>>;

/// The events of one Recursive Language Model run, ending with its answer.
pub type AskReceiver = mpsc::Receiver<Result<AskEvent, Status>>;

/// The events of one chat answer, ending with it; an `Err` is a node's refusal of the request
/// itself.
pub type ChatReceiver = mpsc::Receiver<Result<ChatEvent, Status>>;

/// The cluster as clients see it.
#[derive(Clone)]
pub struct ClusterService {
    dispatcher: Dispatcher,
    chats: Chats,
    sessions: ClusterSessions,
    rlm: Rlm,
    recent: RecentRuns,
}

impl ClusterService {
    /// The service over `dispatcher` and `chats`, keeping sessions as `sessions` says.
    pub fn new(dispatcher: Dispatcher, chats: Chats, sessions: SessionSettings) -> Self {
        let sessions = ClusterSessions::new(dispatcher.clone(), sessions);
        ClusterService {
            rlm: Rlm::new(
                chats.clone(),
                sessions.clone(),
                dispatcher.registry().clone(),
            ),
            sessions,
            dispatcher,
            chats,
            recent: RecentRuns::default(),
        }
    }

    /// Checks a question and starts the Recursive Language Model loop on it, streaming its
    /// events. Without a time budget of its own, the run ends with its best answer so far at
    /// `deadline`, when the client stops listening.
    pub fn ask(
        &self,
        mut request: AskRequest,
        deadline: Option<Instant>,
    ) -> Result<AskReceiver, CoordinatorError> {
        if let Some(deadline) = deadline
            && request.max_time_ms == 0
        {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .as_millis();
            request.max_time_ms = left.clamp(1, u128::from(u32::MAX)) as u32;
        }
        if request.model.is_empty() {
            return Err(CoordinatorError::MissingField("model"));
        }
        if request.question.is_empty() {
            return Err(CoordinatorError::MissingField("question"));
        }
        let wanted = Requirements {
            model: Some(&request.model),
            ..Default::default()
        };
        if let Err(reason) = with_candidates(self.registry(), Instant::now(), |nodes| {
            place(nodes, &wanted).map(|_| ())
        }) && !reason.is_transient()
        {
            return Err(reason.into());
        }
        let (events, receiver) = mpsc::channel(EVENT_BUFFER);
        let (loop_events, mut from_loop) = mpsc::channel(EVENT_BUFFER);
        let rlm = self.rlm.clone();
        let run = self.recent.begin(&request.model, &request.question);
        tokio::spawn(async move { rlm.ask(request, &loop_events).await });
        // Kept for the dashboard on the way; a caller gone ends the run, as it would anyway.
        let recent = self.recent.clone();
        tokio::spawn(async move {
            while let Some(event) = from_loop.recv().await {
                if let Ok(event) = &event {
                    recent.record(run, event);
                }
                if events.send(event).await.is_err() {
                    return;
                }
            }
        });
        Ok(receiver)
    }

    /// The last few runs of the loop.
    pub fn recent_runs(&self) -> &RecentRuns {
        &self.recent
    }

    /// The work lately moved off nodes that failed it.
    pub fn recent_moves(&self) -> &RecentMoves {
        self.registry().moves()
    }

    /// The Recursive Language Model loop.
    pub fn rlm(&self) -> &Rlm {
        &self.rlm
    }

    /// The cluster's named sessions.
    pub fn sessions(&self) -> &ClusterSessions {
        &self.sessions
    }

    /// The model names the chat APIs list: each model served, then each as `rlm:MODEL`.
    pub fn chat_model_names(&self) -> Vec<String> {
        rlm::chat::listed(self.list_models().into_iter().map(|m| m.name).collect())
    }

    /// Every model some node serves, with the nodes serving it.
    pub fn list_models(&self) -> Vec<ClusterModel> {
        models::list(self.registry(), Instant::now())
    }

    /// Checks a chat request and starts answering it, streaming its events; `deadline` is when
    /// the client stops listening.
    pub fn chat(
        &self,
        request: ChatRequest,
        deadline: Option<Instant>,
    ) -> Result<ChatReceiver, CoordinatorError> {
        if request.model.is_empty() {
            return Err(CoordinatorError::MissingField("model"));
        }
        if request.messages.is_empty() {
            return Err(CoordinatorError::MissingField("messages"));
        }
        if let Some(ask) = rlm::chat::ask_request(&request) {
            let asked = self.ask(ask?, deadline)?;
            let (events, receiver) = mpsc::channel(EVENT_BUFFER);
            rlm::chat::as_chat(asked, events);
            return Ok(receiver);
        }
        if !request.context.is_empty() {
            return Err(CoordinatorError::ContextWithoutLoop(request.model));
        }
        let wanted = Requirements {
            model: Some(&request.model),
            ..Default::default()
        };
        if let Err(reason) = with_candidates(self.registry(), Instant::now(), |nodes| {
            place(nodes, &wanted).map(|_| ())
        }) && !reason.is_transient()
        {
            metrics::counter!(cluster_metrics::ANSWERS, "model" => request.model.clone(), "outcome" => "refused")
                .increment(1);
            return Err(reason.into());
        }
        let (events, receiver) = mpsc::channel(EVENT_BUFFER);
        let chats = self.chats.clone();
        tokio::spawn(async move { chats.answer(request, deadline, &events).await });
        Ok(receiver)
    }

    fn registry(&self) -> &NodeRegistry {
        self.dispatcher.registry()
    }

    /// The cluster's metrics in Prometheus's text format.
    pub fn metrics(&self) -> String {
        crate::cluster_metrics::render(self.registry())
    }

    /// Every node the coordinator knows, with its state and load.
    pub fn list_nodes(&self) -> Vec<NodeInfo> {
        self.registry().list(Instant::now())
    }

    /// No new work for a node (`draining`), or work again.
    pub fn set_draining(&self, node: &str, draining: bool) -> Result<NodeInfo, CoordinatorError> {
        Ok(self
            .registry()
            .set_draining(node, draining, Instant::now())?)
    }

    /// Checks and places a run, then streams its events; `deadline` is when the client stops
    /// listening.
    pub async fn execute(
        &self,
        request: ClusterExecuteRequest,
        deadline: Option<Instant>,
    ) -> Result<EventReceiver, CoordinatorError> {
        let execution = request
            .execution
            .ok_or(CoordinatorError::MissingField("execution"))?;
        let language = Language::parse(&execution.language)?;
        request_size::check(&execution, request_size::MAX_CODE_BYTES)?;
        let (node, labels, isolation) = constraints(request.placement);
        let mut spec = RunSpec {
            execution,
            language,
            node,
            labels,
            isolation,
            max_attempts: request.max_attempts,
            block: 0,
            line: 0,
        };
        let wait = Duration::from_millis(request.wait_for_nodes_ms.into());
        self.dispatcher.admit(&spec, Instant::now() + wait).await?;
        // Bounded after the wait for nodes, which the client's deadline also counted.
        spec.execution.timeout_ms =
            bounded_timeout(spec.execution.timeout_ms, document::remaining(deadline));
        let (events, receiver) = mpsc::channel(EVENT_BUFFER);
        let dispatcher = self.dispatcher.clone();
        tokio::spawn(async move {
            if let Outcome::Rejected(status) = dispatcher.run(&spec, &events).await {
                let _ = events.send(Err(status)).await;
            }
        });
        Ok(receiver)
    }

    /// Runs a document's blocks in order, streaming their events.
    pub fn run_blocks(
        &self,
        request: RunBlocksRequest,
        deadline: Option<Instant>,
    ) -> EventReceiver {
        let blocks = codeblocks::parse(&request.document);
        let defaults = BlockDefaults {
            deadline,
            ..BlockDefaults::of(&request)
        };
        let wait = Duration::from_millis(request.wait_for_nodes_ms.into());
        let (events, receiver) = mpsc::channel(EVENT_BUFFER);
        let dispatcher = self.dispatcher.clone();
        let sessions = self.sessions.clone();
        tokio::spawn(async move {
            let open = (!request.session.is_empty()).then(|| ClusterOpenSessionRequest {
                session: Some(OpenSessionRequest {
                    session_id: request.session.clone(),
                    model: request.session_model.clone(),
                    limits: request.limits,
                    network: request.network,
                    ..Default::default()
                }),
                placement: request.placement.clone(),
                wait_for_nodes_ms: request.wait_for_nodes_ms,
            });
            let session = open.map(|open| DocumentSession {
                sessions: &sessions,
                open,
            });
            document::run(
                &dispatcher,
                &blocks,
                &defaults,
                request.keep_going,
                wait,
                session.as_ref(),
                &events,
            )
            .await;
        });
        receiver
    }

    /// Where each block of a document would run now; runs nothing.
    pub fn plan(
        &self,
        document: &str,
        placement: Option<PlacementConstraints>,
    ) -> Vec<PlannedBlock> {
        let defaults = BlockDefaults::of(&RunBlocksRequest {
            placement,
            ..Default::default()
        });
        document::plan(&self.dispatcher, &codeblocks::parse(document), &defaults)
    }
}

/// The pinned node, the labels and the isolation layers a request's placement asks for.
fn constraints(
    placement: Option<PlacementConstraints>,
) -> (
    Option<String>,
    BTreeMap<String, String>,
    Vec<IsolationLayer>,
) {
    let placement = placement.unwrap_or_default();
    let isolation = placement.required_layers();
    let node = (!placement.node.is_empty()).then_some(placement.node);
    (node, placement.labels.into_iter().collect(), isolation)
}
