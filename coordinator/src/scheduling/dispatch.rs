//! Code runs on the cluster, modelled on the Remote Execution API: queued, then placed (node,
//! attempt), output tagged with its attempt, retrying when an attempt is lost to an
//! infrastructure failure, and one finished event. A lost attempt runs again from the start on
//! another node ([`failover`] does the moving); a non-zero exit is a result.

use std::{sync::Arc, time::Duration};

use kowalski_exo_common::{
    Language,
    proto::{
        self, ClusterEvent, ClusterFinished, ExecStatus, ExecuteRequest, IsolationLayer, Placed,
        Queued, Retrying, cluster_event::Event, exec_event,
    },
};
use metrics::{counter, histogram};
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::StreamExt;
use tonic::{Code, Status};

use super::{
    agents::{AgentConnector, ExecStream},
    failover::{self, Attempt, AttemptEnd, CallerGone, Departure, Work, loss_reason},
    placement::{Requirements, Unplaceable, place, with_candidates},
};
use crate::{
    cluster_metrics,
    registry::{NodeRegistry, NodeState},
};

pub use super::failover::DEFAULT_MAX_ATTEMPTS;

/// What a code run came to.
pub type Outcome = failover::Outcome<proto::ExecFinished>;

/// Time kept between the run's timeout and the client's deadline, so the `finished` event (with
/// its timeout status) reaches the client before its deadline cuts the stream.
const DEADLINE_MARGIN: Duration = Duration::from_millis(200);

/// The run's timeout, shortened to just inside the client's deadline when that comes first.
pub fn bounded_timeout(timeout_ms: u32, deadline: Option<Duration>) -> u32 {
    match deadline {
        Some(deadline) => {
            let inside = deadline.saturating_sub(DEADLINE_MARGIN.min(deadline / 2));
            let deadline_ms = inside.as_millis().clamp(1, u128::from(u32::MAX)) as u32;
            if timeout_ms == 0 {
                deadline_ms
            } else {
                timeout_ms.min(deadline_ms)
            }
        }
        None => timeout_ms,
    }
}

/// Where a run's events go.
pub type ClusterSender = mpsc::Sender<Result<ClusterEvent, Status>>;

/// One run to place.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub execution: ExecuteRequest,
    pub language: Language,
    pub node: Option<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Isolation layers the node must give the run.
    pub isolation: Vec<IsolationLayer>,
    pub max_attempts: u32,
    /// Block index, for RunBlocks; 0 for Execute.
    pub block: u32,
    /// Line of the block's opening fence, for RunBlocks; 0 for Execute.
    pub line: u32,
}

impl RunSpec {
    pub fn requirements<'a>(&'a self, exclude: &'a [String]) -> Requirements<'a> {
        Requirements {
            language: Some(self.language),
            node: self.node.as_deref(),
            labels: self.labels.clone(),
            isolation: &self.isolation,
            network: self.execution.network,
            exclude,
            ..Default::default()
        }
    }
}

/// Places runs and moves them when nodes fail.
#[derive(Clone)]
pub struct Dispatcher {
    registry: NodeRegistry,
    agents: Arc<dyn AgentConnector>,
}

impl Dispatcher {
    /// A dispatcher that reaches agents through `agents` (gRPC in the product).
    pub fn new(registry: NodeRegistry, agents: Arc<dyn AgentConnector>) -> Self {
        Dispatcher { registry, agents }
    }

    pub fn registry(&self) -> &NodeRegistry {
        &self.registry
    }

    pub fn agents(&self) -> &Arc<dyn AgentConnector> {
        &self.agents
    }

    /// Fails early when no node could ever take the run. While the cluster has no live node, or
    /// the pinned node has not joined, waits until `wait_until` for one, so a client started
    /// together with its cluster finds it.
    pub async fn admit(&self, spec: &RunSpec, wait_until: Instant) -> Result<(), Unplaceable> {
        let mut changes = self.registry.subscribe();
        loop {
            changes.borrow_and_update();
            let wanted = spec.requirements(&[]);
            let (reason, all_down) = with_candidates(&self.registry, Instant::now(), |nodes| {
                let all_down = nodes.iter().all(|c| c.state == NodeState::Down);
                (place(nodes, &wanted).err(), all_down)
            });
            let reason = match reason {
                Some(reason) if !reason.is_transient() => reason,
                _ => return Ok(()),
            };
            let joining = matches!(reason, Unplaceable::UnknownNode { .. }) || all_down;
            if !joining || Instant::now() >= wait_until {
                return Err(reason);
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep_until(wait_until) => {}
            }
        }
    }

    /// Runs `spec` to its end, streaming events; the last is `finished`, except when a node
    /// rejected the request itself (`Outcome::Rejected`), which the caller reports.
    pub async fn run(&self, spec: &RunSpec, events: &ClusterSender) -> Outcome {
        let mut run = CodeRun {
            spec,
            events: RunEvents {
                events,
                block: spec.block,
                line: spec.line,
            },
            agents: self.agents.as_ref(),
        };
        let (outcome, last) = failover::run(&self.registry, &mut run).await;
        let last = last.unwrap_or_default();
        let finished = |result, error| ClusterFinished {
            result,
            node_id: last.node_id,
            node_name: last.node_name,
            attempt: last.number,
            error,
        };
        let finished = match &outcome {
            Outcome::Finished(result) => {
                let status = result.status().as_str_name();
                let status = status
                    .trim_start_matches("EXEC_STATUS_")
                    .to_ascii_lowercase();
                counter!(cluster_metrics::RUNS, "status" => status).increment(1);
                histogram!(cluster_metrics::EXEC_SECONDS).record(result.wall_micros as f64 / 1e6);
                finished(Some(result.clone()), String::new())
            }
            Outcome::Failed(error) => {
                counter!(cluster_metrics::RUNS, "status" => "failed").increment(1);
                finished(None, error.clone())
            }
            Outcome::Rejected(_) | Outcome::Cancelled => return outcome,
        };
        let _ = send(events, spec.block, Event::Finished(finished)).await;
        outcome
    }
}

/// Where the events of one code run (or one execution in a session) go, tagged with its
/// block: what every kind of code work tells its caller.
#[derive(Clone, Copy)]
pub struct RunEvents<'a> {
    pub events: &'a ClusterSender,
    pub block: u32,
    pub line: u32,
}

impl<'a> RunEvents<'a> {
    /// Events of work that is not a document's block.
    pub fn of(events: &'a ClusterSender) -> Self {
        RunEvents {
            events,
            block: 0,
            line: 0,
        }
    }

    pub async fn send(&self, event: Event) -> Result<(), CallerGone> {
        send(self.events, self.block, event)
            .await
            .map_err(|()| CallerGone)
    }

    /// Completes when the caller has gone away.
    pub fn departure(&self) -> Departure {
        let events = self.events.clone();
        Box::pin(async move { events.closed().await })
    }

    pub async fn queued(&self) -> Result<(), CallerGone> {
        self.send(Event::Queued(Queued { line: self.line })).await
    }

    pub async fn placed(&self, attempt: &Attempt) -> Result<(), CallerGone> {
        self.send(Event::Placed(Placed {
            node_id: attempt.node_id.clone(),
            node_name: attempt.node_name.clone(),
            attempt: attempt.number,
        }))
        .await
    }

    pub async fn retrying(&self, lost: &Attempt, reason: &str) -> Result<(), CallerGone> {
        counter!(cluster_metrics::RUN_RETRIES).increment(1);
        self.send(Event::Retrying(Retrying {
            attempt: lost.number,
            node_id: lost.node_id.clone(),
            node_name: lost.node_name.clone(),
            reason: reason.to_string(),
        }))
        .await
    }

    /// Follows one attempt on its node: output passed on tagged with the attempt, until the
    /// finished event or the stream's end.
    pub async fn follow(
        &self,
        started: Result<ExecStream, Status>,
        attempt: &Attempt,
    ) -> AttemptEnd<proto::ExecFinished> {
        let mut stream = match started {
            Ok(stream) => stream,
            Err(status) => return self.classify(status),
        };
        loop {
            match stream.next().await.transpose() {
                Ok(Some(proto::ExecEvent { event: Some(event) })) => match event {
                    exec_event::Event::Started(_) => {}
                    exec_event::Event::Output(chunk) => {
                        let output = proto::AttemptOutput {
                            attempt: attempt.number,
                            chunk: Some(chunk),
                        };
                        if self.send(Event::Output(output)).await.is_err() {
                            return AttemptEnd::Cancelled;
                        }
                    }
                    exec_event::Event::Finished(finished)
                        if finished.status() == ExecStatus::Cancelled
                            && !self.events.is_closed() =>
                    {
                        return AttemptEnd::Lost(format!(
                            "the node stopped the run: {}",
                            finished.message
                        ));
                    }
                    exec_event::Event::Finished(finished) => return AttemptEnd::Finished(finished),
                },
                Ok(Some(_)) => {}
                Ok(None) => {
                    return AttemptEnd::Lost("the node ended the run without a result".into());
                }
                Err(status) => return self.classify(status),
            }
        }
    }

    /// Infrastructure failures are retried elsewhere; a bad request is not, nor a session the
    /// node does not know (or already has). A cancellation is the caller's only when the
    /// caller is in fact gone.
    pub fn classify(&self, status: Status) -> AttemptEnd<proto::ExecFinished> {
        let reason = loss_reason(&status);
        match status.code() {
            Code::InvalidArgument | Code::NotFound | Code::AlreadyExists => {
                AttemptEnd::Rejected(status)
            }
            Code::Cancelled if self.events.is_closed() => AttemptEnd::Cancelled,
            Code::ResourceExhausted => AttemptEnd::Busy(reason),
            _ => AttemptEnd::Lost(reason),
        }
    }
}

/// A code run as work for the failover loop.
struct CodeRun<'a> {
    spec: &'a RunSpec,
    events: RunEvents<'a>,
    agents: &'a dyn AgentConnector,
}

#[tonic::async_trait]
impl Work for CodeRun<'_> {
    type Result = proto::ExecFinished;

    fn requirements<'b>(&'b self, exclude: &'b [String]) -> Requirements<'b> {
        self.spec.requirements(exclude)
    }

    fn what(&self) -> String {
        format!("{} run", self.spec.language)
    }

    fn max_attempts(&self) -> u32 {
        self.spec.max_attempts
    }

    fn departure(&self) -> Departure {
        self.events.departure()
    }

    async fn queued(&mut self) -> Result<(), CallerGone> {
        self.events.queued().await
    }

    async fn placed(&mut self, attempt: &Attempt) -> Result<(), CallerGone> {
        self.events.placed(attempt).await
    }

    /// The code from the start, its output passed on tagged with the attempt.
    async fn attempt(&mut self, attempt: &Attempt) -> AttemptEnd<proto::ExecFinished> {
        let mut request = self.spec.execution.clone();
        if !request.run_id.is_empty() {
            request.run_id = format!("{}-{}", request.run_id, attempt.number);
        }
        let started = self.agents.execute(attempt, request).await;
        self.events.follow(started, attempt).await
    }

    async fn retrying(&mut self, lost: &Attempt, reason: &str) -> Result<(), CallerGone> {
        self.events.retrying(lost, reason).await
    }
}

async fn send(events: &ClusterSender, block: u32, event: Event) -> Result<(), ()> {
    events
        .send(Ok(ClusterEvent {
            block,
            event: Some(event),
        }))
        .await
        .map_err(|_| ())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_clients_deadline_bounds_the_run() {
        let deadline = Some(Duration::from_millis(1500));
        assert_eq!(bounded_timeout(0, deadline), 1300);
        assert_eq!(bounded_timeout(900, deadline), 900);
        assert_eq!(bounded_timeout(5000, deadline), 1300);
        assert_eq!(bounded_timeout(5000, None), 5000);
        assert_eq!(bounded_timeout(0, Some(Duration::from_millis(100))), 50);
    }

    use std::{
        collections::{HashMap, VecDeque},
        sync::Mutex,
    };

    use kowalski_exo_common::proto::{
        ExecEvent, ExecFinished, Heartbeat, OutputChunk, Register, Runtime, RuntimeFingerprint,
        RuntimeHealth, exec_event,
    };

    use super::*;
    use crate::scheduling::agents::ExecStream;

    /// What a scripted agent does with the next run it gets.
    enum Script {
        Refuse(Status),
        Finish(&'static str, i32),
        DieAfterOutput(&'static str),
        Hang,
    }

    /// Agents that are scripted streams: no network, no processes, no sleeps.
    #[derive(Default)]
    struct ScriptedAgents {
        scripts: Mutex<HashMap<String, VecDeque<Script>>>,
        calls: Mutex<Vec<String>>,
    }

    impl ScriptedAgents {
        fn with(scripts: Vec<(&str, Vec<Script>)>) -> Arc<Self> {
            let agents = ScriptedAgents::default();
            for (node, steps) in scripts {
                agents
                    .scripts
                    .lock()
                    .unwrap()
                    .insert(address(node), steps.into());
            }
            Arc::new(agents)
        }

        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    fn output(text: &str) -> Result<ExecEvent, Status> {
        Ok(ExecEvent {
            event: Some(exec_event::Event::Output(OutputChunk {
                data: text.as_bytes().to_vec(),
                ..Default::default()
            })),
        })
    }

    fn finished(exit_code: i32) -> Result<ExecEvent, Status> {
        let status = if exit_code == 0 {
            ExecStatus::Ok
        } else {
            ExecStatus::NonzeroExit
        };
        Ok(ExecEvent {
            event: Some(exec_event::Event::Finished(ExecFinished {
                status: status as i32,
                exit_code: Some(exit_code),
                ..Default::default()
            })),
        })
    }

    #[tonic::async_trait]
    impl AgentConnector for ScriptedAgents {
        async fn execute(
            &self,
            agent: &Attempt,
            _request: ExecuteRequest,
        ) -> Result<ExecStream, Status> {
            let address = &agent.address;
            self.calls.lock().unwrap().push(address.to_string());
            let next = self
                .scripts
                .lock()
                .unwrap()
                .get_mut(address)
                .and_then(VecDeque::pop_front);
            match next.unwrap_or(Script::Refuse(Status::unavailable("no script left"))) {
                Script::Refuse(status) => Err(status),
                Script::Finish(text, code) => {
                    Ok(Box::pin(tokio_stream::iter([output(text), finished(code)])))
                }
                Script::DieAfterOutput(text) => Ok(Box::pin(tokio_stream::iter([
                    output(text),
                    Err(Status::unavailable("connection reset")),
                ]))),
                Script::Hang => Ok(Box::pin(tokio_stream::pending())),
            }
        }

        async fn generate(
            &self,
            _agent: &Attempt,
            _request: kowalski_exo_common::proto::GenerateRequest,
        ) -> Result<crate::scheduling::agents::GenerateStream, Status> {
            Err(Status::unimplemented("these agents only run code"))
        }

        async fn count_tokens(
            &self,
            _agent: &Attempt,
            _request: kowalski_exo_common::proto::CountTokensRequest,
        ) -> Result<Vec<u64>, Status> {
            Err(Status::unimplemented("these agents only run code"))
        }

        async fn open_session(
            &self,
            _agent: &Attempt,
            _request: kowalski_exo_common::proto::OpenSessionRequest,
        ) -> Result<kowalski_exo_common::proto::SessionInfo, Status> {
            Err(Status::unimplemented("these agents only run code"))
        }

        async fn execute_in_session(
            &self,
            _agent: &Attempt,
            _request: kowalski_exo_common::proto::SessionExecuteRequest,
        ) -> Result<crate::scheduling::agents::ExecStream, Status> {
            Err(Status::unimplemented("these agents only run code"))
        }

        async fn close_session(&self, _agent: &Attempt, _session_id: &str) -> Result<(), Status> {
            Err(Status::unimplemented("these agents only run code"))
        }
    }

    fn address(node: &str) -> String {
        format!("http://{node}:50052")
    }

    /// A node with a healthy python and two slots joins `registry`.
    fn register(registry: &NodeRegistry, node: &str) -> (String, u64) {
        let registration = Register {
            name: node.to_string(),
            address: address(node),
            capacity: 2,
            runtimes: Some(RuntimeFingerprint {
                runtimes: vec![Runtime {
                    language: "python".into(),
                    health: RuntimeHealth::Healthy as i32,
                    ..Default::default()
                }],
                probed_at_unix_ms: 0,
            }),
            ..Default::default()
        };
        registry.register(registration, Instant::now())
    }

    /// A registry holding `nodes`, each with a healthy python and two slots.
    fn cluster(nodes: &[&str]) -> (NodeRegistry, HashMap<String, (String, u64)>) {
        let registry = NodeRegistry::default();
        let mut ids = HashMap::new();
        for node in nodes {
            ids.insert(node.to_string(), register(&registry, node));
        }
        (registry, ids)
    }

    fn spec() -> RunSpec {
        RunSpec {
            execution: ExecuteRequest {
                language: "python".into(),
                code: "print(1)".into(),
                ..Default::default()
            },
            language: Language::Python,
            node: None,
            labels: Default::default(),
            isolation: Vec::new(),
            max_attempts: 0,
            block: 0,
            line: 0,
        }
    }

    async fn run(dispatcher: &Dispatcher) -> (Outcome, Vec<Event>) {
        run_spec(dispatcher, spec()).await
    }

    async fn run_spec(dispatcher: &Dispatcher, spec: RunSpec) -> (Outcome, Vec<Event>) {
        let (events, mut received) = mpsc::channel(64);
        let outcome = dispatcher.run(&spec, &events).await;
        drop(events);
        let mut seen = Vec::new();
        while let Some(Ok(event)) = received.recv().await {
            seen.extend(event.event);
        }
        (outcome, seen)
    }

    /// Events as short strings, to compare whole sequences.
    fn trace(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                Event::Queued(_) => "queued".to_string(),
                Event::Placed(p) => format!("placed {} #{}", p.node_name, p.attempt),
                Event::Output(o) => format!(
                    "output #{} {}",
                    o.attempt,
                    String::from_utf8_lossy(&o.chunk.as_ref().unwrap().data)
                ),
                Event::Retrying(r) => format!("retrying {} #{}", r.node_name, r.attempt),
                Event::Finished(f) => format!("finished {} #{}", f.node_name, f.attempt),
                Event::Skipped(_) => "skipped".to_string(),
                Event::SessionMoved(m) => format!("moved to {}", m.to_node),
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_attempt_is_retried_on_another_node_with_each_attempt_marked() {
        let (registry, _) = cluster(&["a", "b"]);
        let agents = ScriptedAgents::with(vec![
            ("a", vec![Script::DieAfterOutput("partial")]),
            ("b", vec![Script::Finish("whole", 0)]),
        ]);
        let dispatcher = Dispatcher::new(registry, agents.clone());
        let (outcome, events) = run(&dispatcher).await;
        assert!(matches!(outcome, Outcome::Finished(_)), "{outcome:?}");
        assert_eq!(
            trace(&events),
            [
                "queued",
                "placed a #1",
                "output #1 partial",
                "retrying a #1",
                "placed b #2",
                "output #2 whole",
                "finished b #2"
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_nonzero_exit_is_a_result_and_not_retried() {
        let (registry, _) = cluster(&["a", "b"]);
        let agents = ScriptedAgents::with(vec![("a", vec![Script::Finish("", 3)])]);
        let dispatcher = Dispatcher::new(registry, agents.clone());
        let (outcome, _) = run(&dispatcher).await;
        match outcome {
            Outcome::Finished(result) => assert_eq!(result.exit_code, Some(3)),
            other => panic!("expected a result, got {other:?}"),
        }
        assert_eq!(agents.calls(), [address("a")]);
    }

    #[tokio::test(start_paused = true)]
    async fn after_three_lost_attempts_on_three_nodes_it_gives_up_naming_each() {
        let (registry, _) = cluster(&["a", "b", "c", "d"]);
        let refuse = || vec![Script::Refuse(Status::unavailable("refused"))];
        let agents = ScriptedAgents::with(vec![("a", refuse()), ("b", refuse()), ("c", refuse())]);
        let dispatcher = Dispatcher::new(registry, agents.clone());
        let (outcome, _) = run(&dispatcher).await;
        let Outcome::Failed(reason) = outcome else {
            panic!("expected failure, got {outcome:?}")
        };
        assert!(reason.starts_with("gave up after 3 attempts"), "{reason}");
        for node in ["a", "b", "c"] {
            assert!(
                reason.contains(&format!("on {node}: unavailable: refused")),
                "{reason}"
            );
        }
        assert_eq!(agents.calls(), [address("a"), address("b"), address("c")]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_node_is_tried_again_after_backoff_when_no_other_fits() {
        let (registry, _) = cluster(&["a"]);
        let agents = ScriptedAgents::with(vec![(
            "a",
            vec![
                Script::Refuse(Status::resource_exhausted("busy")),
                Script::Finish("ok", 0),
            ],
        )]);
        let dispatcher = Dispatcher::new(registry, agents.clone());
        let (outcome, events) = run(&dispatcher).await;
        assert!(matches!(outcome, Outcome::Finished(_)), "{outcome:?}");
        assert_eq!(trace(&events).last().unwrap(), "finished a #2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_node_loses_its_run_at_the_deadline() {
        let (registry, ids) = cluster(&["a", "b"]);
        let (b_id, b_stream) = ids["b"].clone();
        let beating = registry.clone();
        // b keeps sending heartbeats; a falls silent while its run hangs.
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                beating.heartbeat(&b_id, b_stream, Heartbeat::default(), Instant::now());
            }
        });
        let agents = ScriptedAgents::with(vec![
            ("a", vec![Script::Hang]),
            ("b", vec![Script::Finish("ok", 0)]),
        ]);
        let dispatcher = Dispatcher::new(registry, agents.clone());
        let started = Instant::now();
        let (outcome, events) = run(&dispatcher).await;
        assert!(matches!(outcome, Outcome::Finished(_)), "{outcome:?}");
        let retry = events.iter().find_map(|e| match e {
            Event::Retrying(r) => Some(r.reason.clone()),
            _ => None,
        });
        assert!(retry.unwrap().contains("silent"));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(5) && waited < Duration::from_secs(7),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_a_node_rejects_is_not_retried() {
        let (registry, _) = cluster(&["a", "b"]);
        let agents = ScriptedAgents::with(vec![(
            "a",
            vec![Script::Refuse(Status::invalid_argument("code too large"))],
        )]);
        let dispatcher = Dispatcher::new(registry, agents.clone());
        let (outcome, _) = run(&dispatcher).await;
        assert!(matches!(outcome, Outcome::Rejected(_)), "{outcome:?}");
        assert_eq!(agents.calls().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pinned_run_whose_node_is_lost_announces_no_retry() {
        let (registry, _) = cluster(&["a", "b"]);
        let agents = ScriptedAgents::with(vec![("a", vec![Script::DieAfterOutput("partial")])]);
        let dispatcher = Dispatcher::new(registry, agents.clone());
        let pinned = RunSpec {
            node: Some("a".into()),
            ..spec()
        };
        let (outcome, events) = run_spec(&dispatcher, pinned).await;
        assert_eq!(
            trace(&events),
            [
                "queued",
                "placed a #1",
                "output #1 partial",
                "finished a #1"
            ]
        );
        let Outcome::Failed(reason) = outcome else {
            panic!("expected failure, got {outcome:?}")
        };
        assert!(reason.contains("no other node can take it"), "{reason}");
        assert_eq!(agents.calls(), [address("a")]);
    }

    #[tokio::test(start_paused = true)]
    async fn admission_waits_for_the_first_node_to_join_and_no_longer() {
        let registry = NodeRegistry::default();
        let dispatcher = Dispatcher::new(registry.clone(), ScriptedAgents::with(vec![]));
        let refused = dispatcher
            .admit(&spec(), Instant::now() + Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(
            refused.to_string(),
            "no node can run python: the cluster has no nodes"
        );
        let joining = registry.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            register(&joining, "a");
        });
        let started = Instant::now();
        dispatcher
            .admit(&spec(), Instant::now() + Duration::from_secs(5))
            .await
            .expect("admitted once a node joined");
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }
}
