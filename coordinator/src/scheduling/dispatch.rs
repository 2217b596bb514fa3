//! Running one piece of code on the cluster, modelled on the Remote Execution API: queued, then
//! placed (node, attempt), output tagged with its attempt, retrying when an attempt is lost to
//! an infrastructure failure, and one finished event.
//!
//! Only infrastructure failures are retried (the node died, went silent past the deadline, or
//! refused for lack of room), each time on a node not tried yet, with exponential backoff and
//! jitter. A non-zero exit is a result.

use std::{sync::Arc, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};
use kowalski_exo_common::{
    Language,
    proto::{
        self, ClusterEvent, ClusterFinished, ExecStatus, ExecuteRequest, Placed, Queued, Retrying,
        cluster_event::Event, exec_event,
    },
};
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::StreamExt;
use tonic::{Code, Status};

use super::{
    agents::{AgentConnector, GrpcAgents},
    placement::{Requirements, Unplaceable, candidates, place},
};
use crate::registry::{NodeRegistry, NodeState};

/// Attempts per run unless the request says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Backoff between attempts.
const RETRY_MIN_DELAY: Duration = Duration::from_millis(20);
const RETRY_MAX_DELAY: Duration = Duration::from_secs(1);
/// How long a run waits for a fitting node to become ready before giving up.
const NONE_READY_WAIT: Duration = Duration::from_secs(10);

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
            exclude,
        }
    }
}

/// What a run came to.
#[derive(Debug)]
pub enum Outcome {
    /// It ran to an end on some node (any exit status).
    Finished(proto::ExecFinished),
    /// Every attempt was lost, or no node could take it.
    Failed(String),
    /// A node rejected the request itself (it would be rejected anywhere).
    Rejected(Status),
    /// The caller went away.
    Cancelled,
}

/// How one attempt ended.
enum AttemptEnd {
    Finished(proto::ExecFinished),
    /// The node failed; it is not tried again for this run.
    Lost(String),
    /// The node had no room; another is preferred.
    Busy(String),
    Rejected(Status),
    Cancelled,
}

/// Places runs and moves them when nodes fail.
#[derive(Clone)]
pub struct Dispatcher {
    registry: NodeRegistry,
    agents: Arc<dyn AgentConnector>,
}

impl Dispatcher {
    /// A dispatcher that reaches agents over gRPC.
    pub fn new(registry: NodeRegistry) -> Self {
        Self::with_agents(registry, Arc::new(GrpcAgents::default()))
    }

    pub fn with_agents(registry: NodeRegistry, agents: Arc<dyn AgentConnector>) -> Self {
        Dispatcher { registry, agents }
    }

    pub fn registry(&self) -> &NodeRegistry {
        &self.registry
    }

    /// Fails early when no node could ever take the run. While the cluster has no live node, or
    /// the pinned node has not joined, waits until `wait_until` for one, so a client started
    /// together with its cluster finds it.
    pub async fn admit(&self, spec: &RunSpec, wait_until: Instant) -> Result<(), Unplaceable> {
        let mut changes = self.registry.subscribe();
        loop {
            changes.borrow_and_update();
            let candidates = candidates(&self.registry, Instant::now());
            let reason = match place(&candidates, &spec.requirements(&[])) {
                Err(reason) if !reason.is_transient() => reason,
                _ => return Ok(()),
            };
            let joining = matches!(reason, Unplaceable::UnknownNode { .. })
                || candidates.iter().all(|c| c.state == NodeState::Down);
            if !joining || Instant::now() >= wait_until {
                return Err(reason);
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep_until(wait_until) => {}
            }
        }
    }

    /// Why no other node could take the run after the nodes in `failed`, if none can.
    fn no_retry(&self, spec: &RunSpec, failed: &[String]) -> Option<Unplaceable> {
        let candidates = candidates(&self.registry, Instant::now());
        match place(&candidates, &spec.requirements(failed)) {
            Err(reason) if !reason.is_transient() => Some(reason),
            _ => None,
        }
    }

    /// Runs `spec` to its end, streaming events; the last is `finished`, except when a node
    /// rejected the request itself (`Outcome::Rejected`), which the caller reports.
    pub async fn run(&self, spec: &RunSpec, events: &ClusterSender) -> Outcome {
        let mut last_placed = None;
        let outcome = self.run_attempts(spec, events, &mut last_placed).await;
        let (node_id, node_name, attempt) = last_placed
            .map(|p: Placed| (p.node_id, p.node_name, p.attempt))
            .unwrap_or_default();
        let finished = |result, error| ClusterFinished {
            result,
            node_id,
            node_name,
            attempt,
            error,
        };
        let last = match &outcome {
            Outcome::Finished(result) => finished(Some(result.clone()), String::new()),
            Outcome::Failed(error) => finished(None, error.clone()),
            Outcome::Rejected(_) | Outcome::Cancelled => return outcome,
        };
        let _ = send(events, spec.block, Event::Finished(last)).await;
        outcome
    }

    async fn run_attempts(
        &self,
        spec: &RunSpec,
        events: &ClusterSender,
        last_placed: &mut Option<Placed>,
    ) -> Outcome {
        if send(
            events,
            spec.block,
            Event::Queued(Queued { line: spec.line }),
        )
        .await
        .is_err()
        {
            return Outcome::Cancelled;
        }
        let max_attempts = match spec.max_attempts {
            0 => DEFAULT_MAX_ATTEMPTS,
            n => n,
        };
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(RETRY_MIN_DELAY)
            .with_max_delay(RETRY_MAX_DELAY)
            .with_jitter()
            .without_max_times()
            .build();
        // Nodes that failed this run are not tried again; nodes that were only full are
        // avoided while another fits.
        let mut failed: Vec<String> = Vec::new();
        let mut busy: Vec<String> = Vec::new();
        let mut losses: Vec<String> = Vec::new();
        for attempt in 1..=max_attempts {
            let node = match self.wait_for_node(spec, &failed, &busy, events).await {
                Ok(node) => node,
                Err(None) => return Outcome::Cancelled,
                Err(Some(reason)) => {
                    losses.push(reason);
                    return Outcome::Failed(losses.join("; "));
                }
            };
            let placed = Placed {
                node_id: node.0.clone(),
                node_name: node.1.clone(),
                attempt,
            };
            *last_placed = Some(placed.clone());
            if send(events, spec.block, Event::Placed(placed))
                .await
                .is_err()
            {
                return Outcome::Cancelled;
            }
            let end = self.attempt(spec, &node.0, attempt, events).await;
            let reason = match end {
                AttemptEnd::Finished(finished) => return Outcome::Finished(finished),
                AttemptEnd::Rejected(status) => return Outcome::Rejected(status),
                AttemptEnd::Cancelled => return Outcome::Cancelled,
                AttemptEnd::Busy(reason) => {
                    busy.push(node.0.clone());
                    reason
                }
                AttemptEnd::Lost(reason) => {
                    failed.push(node.0.clone());
                    reason
                }
            };
            tracing::warn!(node = %node.1, attempt, %reason, "attempt lost");
            losses.push(format!("attempt {attempt} on {}: {reason}", node.1));
            if attempt == max_attempts {
                break;
            }
            if let Some(why) = self.no_retry(spec, &failed) {
                return Outcome::Failed(format!("{}; {why}", losses.join("; ")));
            }
            let retrying = Retrying {
                attempt,
                node_id: node.0,
                node_name: node.1,
                reason,
            };
            if send(events, spec.block, Event::Retrying(retrying))
                .await
                .is_err()
            {
                return Outcome::Cancelled;
            }
            tokio::select! {
                _ = tokio::time::sleep(delays.next().unwrap_or(RETRY_MAX_DELAY)) => {}
                _ = events.closed() => return Outcome::Cancelled,
            }
        }
        Outcome::Failed(format!(
            "gave up after {max_attempts} attempts: {}",
            losses.join("; ")
        ))
    }

    /// Waits until placement chooses a node: `Err(None)` when the caller left, `Err(Some)` when
    /// no node can take the run.
    async fn wait_for_node(
        &self,
        spec: &RunSpec,
        failed: &[String],
        busy: &[String],
        events: &ClusterSender,
    ) -> Result<(String, String), Option<String>> {
        let mut changes = self.registry.subscribe();
        let avoid: Vec<String> = failed.iter().chain(busy).cloned().collect();
        let mut none_ready_since: Option<Instant> = None;
        loop {
            changes.borrow_and_update();
            let candidates = candidates(&self.registry, Instant::now());
            let choice = match place(&candidates, &spec.requirements(&avoid)) {
                // Only full nodes remain: one of them, once it has room, beats failing.
                Err(Unplaceable::Exhausted { .. }) if !busy.is_empty() => {
                    place(&candidates, &spec.requirements(failed))
                }
                other => other,
            };
            match choice {
                Ok(node) => return Ok((node.id.clone(), node.name.clone())),
                Err(reason @ Unplaceable::NoneReady { .. }) => {
                    let since = *none_ready_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= NONE_READY_WAIT {
                        return Err(Some(reason.to_string()));
                    }
                }
                Err(reason) if !reason.is_transient() => return Err(Some(reason.to_string())),
                Err(_) => none_ready_since = None,
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep(NONE_READY_WAIT) => {}
                _ = events.closed() => return Err(None),
            }
        }
    }

    /// One attempt on one node.
    async fn attempt(
        &self,
        spec: &RunSpec,
        node_id: &str,
        attempt: u32,
        events: &ClusterSender,
    ) -> AttemptEnd {
        let _in_flight = self.registry.begin_run(node_id);
        let Some(address) = self.registry.address(node_id) else {
            return AttemptEnd::Lost("the node left the cluster".into());
        };
        let mut request = spec.execution.clone();
        if !request.run_id.is_empty() {
            request.run_id = format!("{}-{attempt}", request.run_id);
        }
        let mut changes = self.registry.subscribe();
        let call = self.agents.execute(&address, request);
        let mut stream = tokio::select! {
            response = call => match response {
                Ok(stream) => stream,
                Err(status) => return classify(status, events),
            },
            _ = silent(&self.registry, node_id, &mut changes) => {
                return AttemptEnd::Lost(silence_reason(&self.registry));
            }
            _ = events.closed() => return AttemptEnd::Cancelled,
        };
        loop {
            let message = tokio::select! {
                message = stream.next() => message.transpose(),
                _ = silent(&self.registry, node_id, &mut changes) => {
                    return AttemptEnd::Lost(silence_reason(&self.registry));
                }
                _ = events.closed() => return AttemptEnd::Cancelled,
            };
            match message {
                Ok(Some(proto::ExecEvent { event: Some(event) })) => match event {
                    exec_event::Event::Started(_) => {}
                    exec_event::Event::Output(chunk) => {
                        let output = proto::AttemptOutput {
                            attempt,
                            chunk: Some(chunk),
                        };
                        if send(events, spec.block, Event::Output(output))
                            .await
                            .is_err()
                        {
                            return AttemptEnd::Cancelled;
                        }
                    }
                    exec_event::Event::Finished(finished)
                        if finished.status() == ExecStatus::Cancelled && !events.is_closed() =>
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
                Err(status) => return classify(status, events),
            }
        }
    }
}

/// Completes when the node has been silent past the deadline. Wakes on registry changes and
/// at the deadline itself, which passes without any change when the node's stream is gone.
async fn silent(
    registry: &NodeRegistry,
    node_id: &str,
    changes: &mut tokio::sync::watch::Receiver<u64>,
) {
    loop {
        if registry.in_flight_lost(node_id, Instant::now()) {
            return;
        }
        let Some(deadline) = registry.silence_deadline(node_id) else {
            return;
        };
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    tokio::time::sleep_until(deadline).await;
                }
            }
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

fn silence_reason(registry: &NodeRegistry) -> String {
    format!("the node was silent for {:?}", registry.config().down_after)
}

/// Infrastructure failures are retried elsewhere; a bad request is not. A cancellation is the
/// caller's only when the caller is in fact gone.
fn classify(status: Status, events: &ClusterSender) -> AttemptEnd {
    let reason = loss_reason(&status);
    match status.code() {
        Code::InvalidArgument => AttemptEnd::Rejected(status),
        Code::Cancelled if events.is_closed() => AttemptEnd::Cancelled,
        Code::ResourceExhausted => AttemptEnd::Busy(reason),
        _ => AttemptEnd::Lost(reason),
    }
}

/// A sentence for a failed call; a broken transport says the node was lost instead of quoting
/// HTTP/2 internals.
fn loss_reason(status: &Status) -> String {
    const TRANSPORT: [&str; 5] = [
        "h2 protocol error",
        "transport error",
        "connection",
        "broken pipe",
        "error reading a body",
    ];
    let message = status.message().to_ascii_lowercase();
    let transport = matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
    ) && TRANSPORT.iter().any(|words| message.contains(words));
    if transport {
        "the connection to the node was lost".into()
    } else {
        format!("{}: {}", code_name(status.code()), status.message())
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Unavailable => "unavailable",
        Code::ResourceExhausted => "no room",
        Code::FailedPrecondition => "runtime unavailable there",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::Internal => "internal error",
        Code::Unknown => "connection lost",
        _ => "failed",
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
            address: &str,
            _request: ExecuteRequest,
        ) -> Result<ExecStream, Status> {
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
        let dispatcher = Dispatcher::with_agents(registry, agents.clone());
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
        let dispatcher = Dispatcher::with_agents(registry, agents.clone());
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
        let dispatcher = Dispatcher::with_agents(registry, agents.clone());
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
        let dispatcher = Dispatcher::with_agents(registry, agents.clone());
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
        let dispatcher = Dispatcher::with_agents(registry, agents.clone());
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
        let dispatcher = Dispatcher::with_agents(registry, agents.clone());
        let (outcome, _) = run(&dispatcher).await;
        assert!(matches!(outcome, Outcome::Rejected(_)), "{outcome:?}");
        assert_eq!(agents.calls().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pinned_run_whose_node_is_lost_announces_no_retry() {
        let (registry, _) = cluster(&["a", "b"]);
        let agents = ScriptedAgents::with(vec![("a", vec![Script::DieAfterOutput("partial")])]);
        let dispatcher = Dispatcher::with_agents(registry, agents.clone());
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
        let dispatcher = Dispatcher::with_agents(registry.clone(), ScriptedAgents::with(vec![]));
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
