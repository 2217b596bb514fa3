//! The coordinator at scale: a simulator opens N real AgentRegistry streams (each registers a
//! node, then heartbeats at the agents' interval, 500 ms) and serves one real NodeAgent
//! endpoint that every simulated node answers through (a run finishes at once, ok). A load
//! generator then places runs through Coordinator.Execute. Reported per N, side by side: the
//! coordinator's CPU (share of one core) and resident memory while only heartbeats flow and
//! under load, the placement decision (the coordinator's own code choosing a node among N, in
//! process, p50 and p99), a run's wait for its `placed` event as a client sees it under load,
//! and nodes wrongly marked not ready while all heartbeat.
//!
//! Run with `scripts/bench-scale.sh` (builds the release binaries first). Options:
//! `--agents N,N,...` (default 1000,5000,10000), `--runs N` (default 2000), `--quiet-secs N`
//! (default 10).

use std::{
    pin::Pin,
    time::{Duration, Instant},
};

use futures_util::Stream;
use kowalski_exo_common::proto::{
    self, AgentMessage, ClusterExecuteRequest, ExecEvent, ExecFinished, ExecStatus, ExecuteRequest,
    Heartbeat, ListNodesRequest, NodeLoad, Register, Runtime, RuntimeFingerprint, RuntimeHealth,
    agent_message, agent_registry_client::AgentRegistryClient, cluster_event,
    coordinator_client::CoordinatorClient, exec_event, node_agent_server,
};
use kowalski_exo_tests::{Daemon, bench::ms, channel};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, transport::Channel};

/// Streams per connection to the coordinator.
const STREAMS_PER_CONNECTION: usize = 100;
const HEARTBEAT: Duration = Duration::from_millis(500);
/// Runs placed at once by the load generator.
const LOAD_PARALLELISM: usize = 32;

type Events<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The NodeAgent every simulated node answers through: a run finishes at once, ok.
struct SimulatedAgent;

#[tonic::async_trait]
impl node_agent_server::NodeAgent for SimulatedAgent {
    type ExecuteStream = Events<ExecEvent>;
    type GenerateStream = Events<proto::GenerateEvent>;
    type ExecuteInSessionStream = Events<ExecEvent>;

    async fn execute(
        &self,
        _request: Request<ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let finished = ExecEvent {
            event: Some(exec_event::Event::Finished(ExecFinished {
                status: ExecStatus::Ok as i32,
                exit_code: Some(0),
                ..Default::default()
            })),
        };
        Ok(Response::new(Box::pin(tokio_stream::iter([Ok(finished)]))))
    }

    async fn describe(
        &self,
        _request: Request<proto::DescribeRequest>,
    ) -> Result<Response<proto::NodeDescription>, Status> {
        Err(Status::unimplemented("a simulated node"))
    }

    async fn generate(
        &self,
        _request: Request<proto::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        Err(Status::unimplemented("a simulated node"))
    }

    async fn count_tokens(
        &self,
        _request: Request<proto::CountTokensRequest>,
    ) -> Result<Response<proto::CountTokensResponse>, Status> {
        Err(Status::unimplemented("a simulated node"))
    }

    async fn open_session(
        &self,
        _request: Request<proto::OpenSessionRequest>,
    ) -> Result<Response<proto::SessionInfo>, Status> {
        Err(Status::unimplemented("a simulated node"))
    }

    async fn execute_in_session(
        &self,
        _request: Request<proto::SessionExecuteRequest>,
    ) -> Result<Response<Self::ExecuteInSessionStream>, Status> {
        Err(Status::unimplemented("a simulated node"))
    }

    async fn close_session(
        &self,
        _request: Request<proto::CloseSessionRequest>,
    ) -> Result<Response<proto::CloseSessionResponse>, Status> {
        Err(Status::unimplemented("a simulated node"))
    }

    async fn list_sessions(
        &self,
        _request: Request<proto::ListSessionsRequest>,
    ) -> Result<Response<proto::ListSessionsResponse>, Status> {
        Err(Status::unimplemented("a simulated node"))
    }
}

/// Serves the simulated NodeAgent on loopback; returns its URL.
async fn serve_simulated_agent() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(node_agent_server::NodeAgentServer::new(SimulatedAgent))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

/// Attaches `count` simulated nodes and keeps them heartbeating until the returned senders are
/// dropped.
async fn attach(
    coordinator: &str,
    agent_url: &str,
    count: usize,
) -> Vec<mpsc::Sender<AgentMessage>> {
    let mut senders = Vec::with_capacity(count);
    let mut client = None;
    for i in 0..count {
        if i % STREAMS_PER_CONNECTION == 0 {
            client = Some(AgentRegistryClient::new(
                channel(coordinator)
                    .await
                    .expect("connect to the coordinator"),
            ));
        }
        let (tx, rx) = mpsc::channel(4);
        tx.send(AgentMessage {
            message: Some(agent_message::Message::Register(registration(i, agent_url))),
        })
        .await
        .unwrap();
        let mut answers = client
            .as_mut()
            .unwrap()
            .attach(ReceiverStream::new(rx))
            .await
            .expect("attach")
            .into_inner();
        tokio::spawn(async move { while let Ok(Some(_)) = answers.message().await {} });
        senders.push(tx);
    }
    let heartbeating = senders.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(HEARTBEAT);
        loop {
            every.tick().await;
            for tx in &heartbeating {
                let beat = AgentMessage {
                    message: Some(agent_message::Message::Heartbeat(Heartbeat {
                        load: Some(NodeLoad::default()),
                        ..Default::default()
                    })),
                };
                if tx.send(beat).await.is_err() {
                    return;
                }
            }
        }
    });
    senders
}

/// The coordinator's CPU seconds so far and resident memory, from /proc.
fn usage(pid: i32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // /proc counts in USER_HZ, 100 a second on Linux whatever the kernel's own tick.
    let hz = 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (ticks / hz, rss_kb * 1024)
}

/// Nodes not ready, as the coordinator lists them.
async fn not_ready(client: &mut CoordinatorClient<Channel>) -> (usize, usize) {
    let nodes = client
        .list_nodes(ListNodesRequest {})
        .await
        .expect("ListNodes")
        .into_inner()
        .nodes;
    let ready = nodes.iter().filter(|n| n.state == "ready").count();
    (nodes.len(), nodes.len() - ready)
}

/// The coordinator's placement decision among `agents` registered nodes, in process: the
/// candidates from the registry and the choice, as Execute makes it; p50 and p99 in ms.
fn decision(agents: usize) -> (f64, f64) {
    use kowalski_exo_coordinator::{
        registry::NodeRegistry,
        scheduling::placement::{Requirements, place, with_candidates},
    };
    let registry = NodeRegistry::default();
    let now = tokio::time::Instant::now();
    for i in 0..agents {
        registry.register(registration(i, "http://127.0.0.1:1"), now);
    }
    let wanted = Requirements {
        language: Some(kowalski_exo_common::Language::Python),
        ..Default::default()
    };
    let mut times: Vec<f64> = (0..1000)
        .map(|_| {
            let started = Instant::now();
            let chosen = with_candidates(&registry, now, |nodes| {
                let chosen = place(nodes, &wanted).expect("a node fits");
                (chosen.id().to_string(), chosen.name().to_string())
            });
            std::hint::black_box(chosen);
            ms(started.elapsed())
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times[499], times[989])
}

/// A simulated node's registration.
fn registration(i: usize, agent_url: &str) -> Register {
    Register {
        name: format!("sim-{i}"),
        address: agent_url.to_string(),
        capacity: 4,
        runtimes: Some(RuntimeFingerprint {
            runtimes: vec![Runtime {
                language: "python".into(),
                health: RuntimeHealth::Healthy as i32,
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

struct Figures {
    agents: usize,
    decision_p50: f64,
    decision_p99: f64,
    quiet_cpu: f64,
    quiet_rss: u64,
    load_cpu: f64,
    load_rss: u64,
    p50: f64,
    p99: f64,
    runs_per_s: f64,
    wrongly_not_ready: usize,
}

async fn measure(agents: usize, runs: usize, quiet: Duration) -> Figures {
    let coordinator = Daemon::start(
        "coordinator",
        // HTTP on, as by default: the dashboard samples every node's load every 2 s.
        &["serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"],
        &[],
        "coordinator listening",
    );
    let agent_url = serve_simulated_agent().await;
    let senders = attach(&coordinator.url(), &agent_url, agents).await;
    let mut client = CoordinatorClient::new(channel(&coordinator.url()).await.unwrap());
    let start = Instant::now();
    loop {
        let (listed, not_ready) = not_ready(&mut client).await;
        if listed == agents && not_ready == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{listed} of {agents} listed, {not_ready} not ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Heartbeats only: CPU, memory, and nodes the failure detector gives up on.
    let (cpu0, _) = usage(coordinator.pid());
    let quiet_start = Instant::now();
    let mut wrongly_not_ready = 0;
    while quiet_start.elapsed() < quiet {
        tokio::time::sleep(Duration::from_millis(500)).await;
        wrongly_not_ready = wrongly_not_ready.max(not_ready(&mut client).await.1);
    }
    let (cpu1, quiet_rss) = usage(coordinator.pid());
    let quiet_cpu = (cpu1 - cpu0) / quiet_start.elapsed().as_secs_f64();

    // Under load: runs placed over the simulated nodes.
    let load_start = Instant::now();
    let (cpu0, _) = usage(coordinator.pid());
    let mut latencies = Vec::with_capacity(runs);
    let (done_tx, mut done_rx) = mpsc::channel(runs);
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(LOAD_PARALLELISM));
    for _ in 0..runs {
        let permit = permits.clone().acquire_owned().await.unwrap();
        let mut client = client.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            let sent = Instant::now();
            let request = ClusterExecuteRequest {
                execution: Some(ExecuteRequest {
                    language: "python".into(),
                    code: "print(1)".into(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let mut events = client.execute(request).await.expect("Execute").into_inner();
            let mut placed = None;
            while let Some(event) = events.message().await.expect("the run's events") {
                match event.event {
                    Some(cluster_event::Event::Placed(_)) => placed = Some(sent.elapsed()),
                    Some(cluster_event::Event::Finished(f)) => {
                        assert!(f.error.is_empty(), "{}", f.error);
                    }
                    _ => {}
                }
            }
            drop(permit);
            let _ = done.send(placed.expect("a placed event")).await;
        });
    }
    drop(done_tx);
    while let Some(latency) = done_rx.recv().await {
        latencies.push(ms(latency));
    }
    let load_seconds = load_start.elapsed().as_secs_f64();
    let (cpu1, load_rss) = usage(coordinator.pid());
    wrongly_not_ready = wrongly_not_ready.max(not_ready(&mut client).await.1);
    latencies.sort_by(f64::total_cmp);
    let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    drop(senders);
    let (decision_p50, decision_p99) = decision(agents);
    Figures {
        agents,
        decision_p50,
        decision_p99,
        quiet_cpu,
        quiet_rss,
        load_cpu: (cpu1 - cpu0) / load_seconds,
        load_rss,
        p50: at(0.5),
        p99: at(0.99),
        runs_per_s: runs as f64 / load_seconds,
        wrongly_not_ready,
    }
}

fn agents_arg() -> Vec<usize> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--agents")
        .and_then(|i| args.get(i + 1))
        .map(|list| list.split(',').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_else(|| vec![1000, 5000, 10000])
}

#[tokio::main]
async fn main() {
    let runs = kowalski_exo_tests::bench::arg("--runs", 2000);
    let quiet = Duration::from_secs(kowalski_exo_tests::bench::arg("--quiet-secs", 10) as u64);
    let mut all = Vec::new();
    for agents in agents_arg() {
        eprintln!("measuring {agents} simulated agents");
        all.push(measure(agents, runs, quiet).await);
    }
    println!(
        "The coordinator with simulated agents (real AgentRegistry streams, heartbeats every 500 ms), {runs} runs placed {LOAD_PARALLELISM} at a time"
    );
    println!(
        "  {:>7} | {:>9} {:>9} | {:>9} {:>9} | {:>12} {:>8} | {:>12} {:>9} {:>7} | {:>9}",
        "agents",
        "idle CPU",
        "idle RSS",
        "load CPU",
        "load RSS",
        "decision p50",
        "p99",
        "placed p50",
        "p99",
        "runs/s",
        "not ready"
    );
    for f in &all {
        println!(
            "  {:>7} | {:>8.1}% {:>7.0}MB | {:>8.1}% {:>7.0}MB | {:>10.3}ms {:>6.3}ms | {:>10.1}ms {:>7.1}ms {:>7.0} | {:>9}",
            f.agents,
            f.quiet_cpu * 100.0,
            f.quiet_rss as f64 / 1e6,
            f.load_cpu * 100.0,
            f.load_rss as f64 / 1e6,
            f.decision_p50,
            f.decision_p99,
            f.p50,
            f.p99,
            f.runs_per_s,
            f.wrongly_not_ready
        );
    }
    println!(
        "  goals at 10,000: idle CPU < 50% of one core, RSS < 500 MB, placement p99 < 1 ms, no node wrongly not ready\n  (decision: the coordinator's placement code in process; placed: a client's wait for the `placed` event under load, queueing included)"
    );
}
