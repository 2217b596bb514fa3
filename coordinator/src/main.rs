//! The `coordinator` binary: the server (`serve`) and the client subcommands.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use kowalski_exo_common::{
    defaults,
    proto::{
        ClusterExecuteRequest, DrainRequest, ExecuteRequest, ListNodesRequest,
        PlacementConstraints, PlanRequest, RunBlocksRequest, cluster_event::Event,
        coordinator_client::CoordinatorClient,
    },
    telemetry,
};
use kowalski_exo_coordinator::{
    cli::{
        self, EXIT_INFRASTRUCTURE, EXIT_NO_NODE, EXIT_USAGE,
        events::{EventLine, HumanPrinter},
        nodes::{NodeLine, nodes_table},
        plan::{PlanLine, plan_table},
    },
    server::{self, RunningCoordinator},
};
use kowalski_exo_node_agent::AgentConfig;
use tonic::{Code, Status, Streaming, transport::Channel};

/// How long `--local` waits for its agent to join.
const LOCAL_JOIN_TIMEOUT: Duration = Duration::from_secs(20);

/// The Kowalski Exo coordinator and its client.
#[derive(Parser, Debug)]
#[command(name = "coordinator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the coordinator server.
    Serve {
        /// gRPC listen address (Coordinator and AgentRegistry).
        #[arg(long, default_value_t = format!("0.0.0.0:{}", defaults::COORDINATOR_GRPC_PORT))]
        listen: String,
        /// Also run a node agent in this process: a whole single-device cluster.
        #[arg(long)]
        local_agent: bool,
    },
    /// List the nodes of the cluster.
    Nodes {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Run code on a node of the cluster.
    Exec {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        placement: PlacementArgs,
        /// Language (python, bash, js, rs, ...).
        #[arg(long)]
        lang: String,
        /// The code to run.
        #[arg(short = 'c', conflicts_with = "file")]
        code: Option<String>,
        /// A file holding the code ("-" for standard input).
        #[arg(required_unless_present = "code")]
        file: Option<PathBuf>,
        /// Arguments passed to the program.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run every fenced code block of a Markdown file, in order.
    Run {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        placement: PlacementArgs,
        /// The Markdown file ("-" for standard input).
        file: PathBuf,
        /// Show what would run where, and run nothing.
        #[arg(long)]
        plan: bool,
        /// Run the remaining blocks after one fails.
        #[arg(long)]
        keep_going: bool,
    },
    /// Give a node no new work; running work finishes.
    Drain {
        #[command(flatten)]
        client: ClientArgs,
        /// Node name or id.
        node: String,
    },
    /// Let a drained node take work again.
    Undrain {
        #[command(flatten)]
        client: ClientArgs,
        /// Node name or id.
        node: String,
    },
}

#[derive(Args, Debug)]
struct ClientArgs {
    /// Coordinator to talk to.
    #[arg(long, env = "COORDINATOR_ADDR", default_value = defaults::COORDINATOR_URL)]
    addr: String,
    /// One JSON object per line, with stable field names.
    #[arg(long)]
    json: bool,
    /// Start an in-process coordinator and agent instead of dialing one.
    #[arg(long)]
    local: bool,
}

#[derive(Args, Debug)]
struct PlacementArgs {
    /// Run only on this node (name or id).
    #[arg(long)]
    node: Option<String>,
    /// Run only on nodes with this label, as key=value; repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Wall-clock timeout in seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// Attempts before giving up when nodes fail.
    #[arg(long, default_value_t = 3)]
    attempts: u32,
}

impl PlacementArgs {
    fn constraints(&self) -> PlacementConstraints {
        PlacementConstraints {
            node: self.node.clone().unwrap_or_default(),
            labels: self.labels.iter().cloned().collect(),
        }
    }

    fn timeout_ms(&self) -> u32 {
        self.timeout
            .map_or(0, |s| (s * 1000.0).clamp(1.0, f64::from(u32::MAX)) as u32)
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label '{s}' is not key=value")),
    }
}

/// A command that could not do its job, with the exit status it means.
#[derive(Debug)]
struct Failure {
    status: u8,
    message: String,
}

impl Failure {
    fn new(status: u8, message: impl Into<String>) -> Self {
        Failure {
            status,
            message: message.into(),
        }
    }

    fn from_status(status: Status) -> Self {
        let exit = match status.code() {
            Code::FailedPrecondition => EXIT_NO_NODE,
            Code::InvalidArgument | Code::NotFound => EXIT_USAGE,
            _ => EXIT_INFRASTRUCTURE,
        };
        Failure::new(exit, status.message().to_string())
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            listen,
            local_agent,
        } => {
            telemetry::init();
            serve(&listen, local_agent).await
        }
        Command::Nodes { client } => with_client(&client, |c| nodes(c, client.json)).await,
        Command::Exec {
            client,
            placement,
            lang,
            code,
            file,
            args,
        } => match code.map_or_else(|| read_input(file.as_ref()), Ok) {
            Ok(code) => {
                let request = ClusterExecuteRequest {
                    execution: Some(ExecuteRequest {
                        language: lang,
                        code,
                        args,
                        timeout_ms: placement.timeout_ms(),
                        ..Default::default()
                    }),
                    placement: Some(placement.constraints()),
                    max_attempts: placement.attempts,
                };
                with_client(&client, |c| exec(c, request, client.json)).await
            }
            Err(failure) => Err(failure),
        },
        Command::Run {
            client,
            placement,
            file,
            plan,
            keep_going,
        } => match read_input(Some(&file)) {
            Ok(document) if plan => {
                let request = PlanRequest {
                    document,
                    placement: Some(placement.constraints()),
                };
                with_client(&client, |c| show_plan(c, request, client.json)).await
            }
            Ok(document) => {
                let request = RunBlocksRequest {
                    document,
                    keep_going,
                    placement: Some(placement.constraints()),
                    timeout_ms: placement.timeout_ms(),
                    limits: None,
                    max_attempts: placement.attempts,
                };
                with_client(&client, |c| run_blocks(c, request, client.json)).await
            }
            Err(failure) => Err(failure),
        },
        Command::Drain { client, node } => {
            with_client(&client, |c| drain(c, node, true, client.json)).await
        }
        Command::Undrain { client, node } => {
            with_client(&client, |c| drain(c, node, false, client.json)).await
        }
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(failure) => {
            eprintln!("coordinator: {}", failure.message);
            ExitCode::from(failure.status)
        }
    }
}

fn read_input(file: Option<&PathBuf>) -> Result<String, Failure> {
    let Some(file) = file else {
        return Err(Failure::new(
            EXIT_USAGE,
            "give the code with -c CODE or a FILE",
        ));
    };
    let read = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(file)
    };
    read.map_err(|e| Failure::new(EXIT_USAGE, format!("cannot read {}: {e}", file.display())))
}

async fn serve(listen: &str, local_agent: bool) -> Result<u8, Failure> {
    let agent = local_agent.then(local_agent_config);
    let running = server::start(listen, agent)
        .await
        .map_err(|e| Failure::new(EXIT_INFRASTRUCTURE, e.to_string()))?;
    let shutdown = running.shutdown_token();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            shutdown.cancel();
        }
    });
    running
        .wait()
        .await
        .map_err(|e| Failure::new(EXIT_INFRASTRUCTURE, e.to_string()))?;
    Ok(0)
}

fn local_agent_config() -> AgentConfig {
    AgentConfig {
        name: "local".into(),
        listen: "127.0.0.1:0".into(),
        ..AgentConfig::default()
    }
}

/// Connects (starting a local cluster first with `--local`), runs `command`, and shuts the
/// local cluster down.
async fn with_client<F, Fut>(args: &ClientArgs, command: F) -> Result<u8, Failure>
where
    F: FnOnce(CoordinatorClient<Channel>) -> Fut,
    Fut: Future<Output = Result<u8, Failure>>,
{
    let local = if args.local {
        Some(start_local().await?)
    } else {
        None
    };
    let addr = match &local {
        Some(cluster) => format!("http://{}", cluster.addr),
        None => args.addr.clone(),
    };
    let client = CoordinatorClient::connect(addr.clone()).await.map_err(|e| {
        Failure::new(
            EXIT_INFRASTRUCTURE,
            format!(
                "cannot reach the coordinator at {addr}: {}; start one with `coordinator serve` or pass --local",
                error_chain(&e)
            ),
        )
    })?;
    let result = command(client).await;
    if let Some(cluster) = local {
        let _ = cluster.stop().await;
    }
    result
}

/// An error with its sources, "outer: inner: root".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// An in-process coordinator with one agent, on loopback ports the OS picks.
async fn start_local() -> Result<RunningCoordinator, Failure> {
    if std::env::var_os("RUST_LOG").is_some() {
        telemetry::init();
    }
    let cluster = server::start("127.0.0.1:0", Some(local_agent_config()))
        .await
        .map_err(|e| {
            Failure::new(
                EXIT_INFRASTRUCTURE,
                format!("cannot start the local cluster: {e}"),
            )
        })?;
    let started = tokio::time::Instant::now();
    while !cluster
        .registry
        .list(tokio::time::Instant::now())
        .iter()
        .any(|n| n.state == "ready")
    {
        if started.elapsed() > LOCAL_JOIN_TIMEOUT {
            return Err(Failure::new(
                EXIT_INFRASTRUCTURE,
                "the local agent did not join within 20 s",
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(cluster)
}

async fn nodes(mut client: CoordinatorClient<Channel>, json: bool) -> Result<u8, Failure> {
    let nodes = client
        .list_nodes(ListNodesRequest {})
        .await
        .map_err(Failure::from_status)?
        .into_inner()
        .nodes;
    if json {
        for node in &nodes {
            print_json(&NodeLine::from(node));
        }
    } else {
        print!("{}", nodes_table(&nodes));
    }
    Ok(0)
}

fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string(value) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("coordinator: cannot encode JSON: {e}"),
    }
}

/// Prints a stream of events; returns the exit status it comes to.
async fn follow(
    mut stream: Streaming<kowalski_exo_common::proto::ClusterEvent>,
    json: bool,
    blocks: bool,
) -> Result<u8, Failure> {
    let printer = HumanPrinter { blocks };
    let mut exit: Option<u8> = None;
    let mut skipped_no_node = false;
    let mut finished_any = false;
    // Blocks queued and not yet finished: any left when the stream ends were lost.
    let mut open_blocks = std::collections::BTreeSet::new();
    loop {
        let event = match stream.message().await {
            Ok(Some(event)) => event,
            Ok(None) => break,
            Err(status) => return Err(Failure::from_status(status)),
        };
        if json {
            if let Some(line) = EventLine::from_event(&event, blocks) {
                print_json(&line);
            }
        } else if let Err(e) = printer.print(&event) {
            return Err(Failure::new(
                EXIT_INFRASTRUCTURE,
                format!("cannot write output: {e}"),
            ));
        }
        match &event.event {
            Some(Event::Queued(_)) => {
                open_blocks.insert(event.block);
            }
            Some(Event::Finished(f)) => {
                open_blocks.remove(&event.block);
                finished_any = true;
                let status = match &f.result {
                    Some(result) => cli::exit_status(result),
                    None => EXIT_INFRASTRUCTURE,
                };
                if exit.is_none_or(|e| e == 0) {
                    exit = Some(status);
                }
            }
            Some(Event::Skipped(s)) if s.no_node => skipped_no_node = true,
            _ => {}
        }
    }
    if let Some(block) = open_blocks.first() {
        return Err(Failure::new(
            EXIT_INFRASTRUCTURE,
            format!(
                "the coordinator ended the stream before block {} finished",
                block + 1
            ),
        ));
    }
    match exit {
        Some(status) if status != 0 => Ok(status),
        _ if skipped_no_node => Ok(EXIT_NO_NODE),
        Some(status) => Ok(status),
        None if blocks && !finished_any => Ok(0),
        None => Err(Failure::new(
            EXIT_INFRASTRUCTURE,
            "the coordinator ended the stream without a result",
        )),
    }
}

async fn exec(
    mut client: CoordinatorClient<Channel>,
    request: ClusterExecuteRequest,
    json: bool,
) -> Result<u8, Failure> {
    let stream = client
        .execute(request)
        .await
        .map_err(Failure::from_status)?
        .into_inner();
    follow(stream, json, false).await
}

async fn run_blocks(
    mut client: CoordinatorClient<Channel>,
    request: RunBlocksRequest,
    json: bool,
) -> Result<u8, Failure> {
    let stream = client
        .run_blocks(request)
        .await
        .map_err(Failure::from_status)?
        .into_inner();
    follow(stream, json, true).await
}

async fn show_plan(
    mut client: CoordinatorClient<Channel>,
    request: PlanRequest,
    json: bool,
) -> Result<u8, Failure> {
    let blocks = client
        .plan(request)
        .await
        .map_err(Failure::from_status)?
        .into_inner()
        .blocks;
    if json {
        for block in &blocks {
            print_json(&PlanLine::from(block));
        }
    } else {
        print!("{}", plan_table(&blocks));
    }
    Ok(0)
}

async fn drain(
    mut client: CoordinatorClient<Channel>,
    node: String,
    draining: bool,
    json: bool,
) -> Result<u8, Failure> {
    let request = DrainRequest { node };
    let response = if draining {
        client.drain(request).await
    } else {
        client.undrain(request).await
    }
    .map_err(Failure::from_status)?
    .into_inner();
    if let Some(node) = response.node {
        if json {
            print_json(&NodeLine::from(&node));
        } else {
            println!("{} ({}) is {}", node.name, node.id, node.state);
        }
    }
    Ok(0)
}
