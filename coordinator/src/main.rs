//! The `coordinator` binary: the server (`serve`) and the client subcommands.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kowalski_exo_common::{
    defaults,
    proto::{ListNodesRequest, coordinator_client::CoordinatorClient},
    telemetry,
};
use kowalski_exo_coordinator::{
    cli::{NodeLine, nodes_table},
    server,
};
use kowalski_exo_node_agent::AgentConfig;

/// Exit status when the coordinator cannot be reached or fails.
const EXIT_INFRASTRUCTURE: u8 = 4;

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
        /// Coordinator to ask.
        #[arg(long, env = "COORDINATOR_ADDR", default_value = defaults::COORDINATOR_URL)]
        addr: String,
        /// One JSON object per node, one per line.
        #[arg(long)]
        json: bool,
    },
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
        Command::Nodes { addr, json } => nodes(&addr, json).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coordinator: {e:#}");
            ExitCode::from(EXIT_INFRASTRUCTURE)
        }
    }
}

async fn serve(listen: &str, local_agent: bool) -> anyhow::Result<()> {
    let agent = local_agent.then(|| AgentConfig {
        listen: "127.0.0.1:0".into(),
        ..AgentConfig::default()
    });
    let running = server::start(listen, agent).await?;
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
    running.wait().await?;
    Ok(())
}

async fn nodes(addr: &str, json: bool) -> anyhow::Result<()> {
    let mut client = CoordinatorClient::connect(addr.to_string())
        .await
        .map_err(|e| {
            anyhow::Error::new(e).context(format!("cannot reach the coordinator at {addr}"))
        })?;
    let nodes = client
        .list_nodes(ListNodesRequest {})
        .await?
        .into_inner()
        .nodes;
    if json {
        for node in &nodes {
            println!("{}", serde_json::to_string(&NodeLine::from(node))?);
        }
    } else {
        print!("{}", nodes_table(&nodes));
    }
    Ok(())
}
