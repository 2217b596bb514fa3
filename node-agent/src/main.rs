//! The `node-agent` binary: serve (the default) or print the runtime fingerprint.

use std::{collections::HashMap, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use kowalski_exo_common::{
    cli_args, defaults, exit, security::files, shutdown::ShutdownSignals, telemetry,
};
use kowalski_exo_node_agent::{
    AgentConfig,
    agent::AgentError,
    backends::Backend,
    discovery,
    exec::{ExecLimits, ExecPolicy},
    fingerprint::{RuntimeHealth, SearchPath, probe_all},
    sessions::{self, SessionConfig},
};

/// Runs code for a Kowalski Exo cluster on this device.
#[derive(Parser, Debug)]
#[command(name = "node-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the systemd unit that runs this agent as a service (`scripts/install.sh`
    /// installs it), then exit.
    InstallService {
        /// The binary the unit runs [default: this one]
        #[arg(long, value_name = "PATH")]
        bin: Option<PathBuf>,
        /// Flags the unit passes the agent, after `--` (e.g. -- --name laptop --label gpu=none).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Print the runtimes this device has, then exit.
    Runtimes {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Coordinator to join, kept trying in the background until it answers (also read from
    /// COORDINATOR_ADDR, the older name) [default: found on the LAN when the agent has a join
    /// token, a membership or --cluster; else http://127.0.0.1:50051]
    #[arg(long, env = cli_args::COORDINATOR_ENV, value_parser = cli_args::parse_coordinator_url)]
    coordinator: Option<String>,
    /// The cluster to find on the LAN when no --coordinator is given: its coordinator's
    /// `--cluster-name`.
    #[arg(long, value_name = "NAME", conflicts_with = "coordinator")]
    cluster: Option<String>,
    /// Run stand-alone: do not try to join a coordinator.
    #[arg(long, conflicts_with = "coordinator")]
    standalone: bool,
    /// Address the NodeAgent gRPC server listens on.
    #[arg(long, default_value = defaults::NODE_AGENT_LISTEN)]
    listen: String,
    /// Address the coordinator should dial (default: the listen address; an unspecified host
    /// means the address the agent connects from).
    #[arg(long)]
    advertise: Option<String>,
    /// Node name (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// A label, as key=value; repeatable.
    #[arg(long = "label", value_parser = cli_args::parse_label)]
    labels: Vec<(String, String)>,
    /// Runs at once (default: the number of cores).
    #[arg(long)]
    capacity: Option<usize>,
    /// Runs waiting for a slot before new ones are refused (default: 4 x capacity).
    #[arg(long)]
    queue: Option<usize>,
    /// Parent directory of per-run work directories [default: $TMPDIR/kowalski-exo/agent-PID]
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Directory for cached builds [default: ~/.cache/kowalski-exo]
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Seconds between runtime re-probes.
    #[arg(long, default_value_t = 30)]
    fingerprint_interval: u64,
    /// An Ollama server whose models this node offers, e.g. http://127.0.0.1:11434; repeatable
    /// [default: Ollama on its default port, when it answers]
    #[arg(long = "ollama", value_name = "URL", value_parser = cli_args::parse_http_url)]
    ollama: Vec<String>,
    /// An OpenAI-compatible server (llama.cpp, vLLM, LM Studio, exo), as the API base the
    /// OpenAI SDK takes, e.g. http://127.0.0.1:8000/v1; repeatable
    #[arg(long = "openai", value_name = "URL", value_parser = cli_args::parse_http_url)]
    openai: Vec<String>,
    /// Seconds between asking backends for their models and probing them.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    model_poll_interval: u64,
    /// Do not use cgroups even where the host offers them.
    #[arg(long, env = "KOWALSKI_NO_CGROUPS")]
    no_cgroups: bool,
    /// Join a cluster that runs with TLS, once, with the token `coordinator token` prints;
    /// the node's certificate is kept in --data-dir and used from then on.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "KOWALSKI_JOIN_TOKEN",
        hide_env_values = true
    )]
    join: Option<String>,
    /// Serve in plaintext on a non-loopback address without having joined a cluster: anyone
    /// who reaches it can run code on this device.
    #[arg(long)]
    insecure: bool,
    /// Where this agent keeps its certificate (several agents on one machine need one each).
    #[arg(long, value_name = "DIR", default_value_os_t = files::default_dir("node-agent"))]
    data_dir: PathBuf,
    /// Let runs that ask for it use the network; without it every run has only a loopback of
    /// its own.
    #[arg(long)]
    allow_network: bool,
    /// The most memory a run may ask for (e.g. 2G) [default: 64G]
    #[arg(long, value_name = "SIZE", value_parser = cli_args::parse_size)]
    max_memory: Option<u64>,
    /// The most processes a run may ask for [default: 4096]
    #[arg(long, value_name = "N")]
    max_processes: Option<u32>,
    /// The longest timeout a run may ask for, in seconds [default: 3600]
    #[arg(long, value_name = "SECONDS")]
    max_timeout: Option<u64>,
    /// The most disk a run may ask for (e.g. 1G) [default: 64G]
    #[arg(long, value_name = "SIZE", value_parser = cli_args::parse_size)]
    max_disk: Option<u64>,
    /// First uid of the unprivileged users runs execute as when the agent runs as root (one per
    /// run at a time, 1024 in all)
    #[arg(long, value_name = "UID", default_value_t = kowalski_exo_node_agent::sandbox::DEFAULT_RUN_UID_BASE)]
    run_uid_base: u32,
    /// Close a session after this long without an execution (e.g. 90s, 10m, 1h)
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    session_idle: Duration,
    /// Sessions this node holds at once; past it opening one is refused
    #[arg(long, value_name = "N", default_value_t = sessions::DEFAULT_MAX_SESSIONS)]
    max_sessions: usize,
}

impl ServeArgs {
    /// The owner's ceilings over what requests may ask for.
    fn policy(&self) -> ExecPolicy {
        let most = ExecLimits::ceiling();
        let ceiling = ExecLimits {
            memory_bytes: self.max_memory.unwrap_or(most.memory_bytes),
            max_processes: self.max_processes.unwrap_or(most.max_processes),
            timeout: self
                .max_timeout
                .map_or(most.timeout, |s| Duration::from_secs(s.max(1))),
            disk_bytes: self.max_disk.unwrap_or(most.disk_bytes),
            ..most
        };
        ExecPolicy {
            defaults: ExecLimits::default().capped(&ceiling),
            ceiling,
            allow_network: self.allow_network,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Runtimes { json }) => print_runtimes(json).await,
        Some(Command::InstallService { bin, args }) => {
            let bin = bin
                .or_else(|| std::env::current_exe().ok())
                .unwrap_or_default();
            print!(
                "{}",
                kowalski_exo_node_agent::service_unit::unit(&bin, &args)
            );
            ExitCode::SUCCESS
        }
        None => {
            telemetry::init();
            match serve(cli.serve).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("node-agent: {e:#}");
                    let status = match e.downcast_ref::<AgentError>() {
                        Some(AgentError::Serve(serve)) => serve.exit_status(),
                        _ => exit::INFRASTRUCTURE,
                    };
                    ExitCode::from(status)
                }
            }
        }
    }
}

async fn print_runtimes(json: bool) -> ExitCode {
    let fingerprint = probe_all(&SearchPath::from_env()).await;
    if json {
        // One object per runtime and line, like every other --json; a missing one says why.
        for runtime in &fingerprint.runtimes {
            let mut line = match serde_json::to_value(runtime) {
                Ok(line) => line,
                Err(e) => {
                    eprintln!("node-agent: cannot encode the fingerprint: {e}");
                    return ExitCode::from(exit::INFRASTRUCTURE);
                }
            };
            if runtime.health == RuntimeHealth::Missing {
                line["reason"] = format!("no {} executable on PATH", runtime.language).into();
            }
            println!("{line}");
        }
    } else {
        print!("{}", fingerprint.table());
    }
    ExitCode::SUCCESS
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (coordinator, discover) = match (args.standalone, args.coordinator.clone()) {
        (true, _) => (None, None),
        (false, Some(url)) => (Some(url), None),
        (false, None) => discovery::coordinator_to_join(
            &args.data_dir,
            args.join.as_deref(),
            args.cluster.clone(),
        )?,
    };
    let mut config = AgentConfig {
        policy: args.policy(),
        run_uid_base: args.run_uid_base,
        listen: args.listen,
        advertise: args.advertise,
        coordinator,
        discover,
        labels: args.labels.into_iter().collect::<HashMap<_, _>>(),
        fingerprint_interval: Duration::from_secs(args.fingerprint_interval.max(1)),
        use_cgroups: !args.no_cgroups,
        model_poll_interval: Duration::from_secs(args.model_poll_interval.max(1)),
        join: args.join,
        data_dir: args.data_dir,
        insecure: args.insecure,
        sessions: SessionConfig {
            idle: args.session_idle,
            max_sessions: args.max_sessions.max(1),
        },
        ..AgentConfig::default()
    };
    if !args.ollama.is_empty() || !args.openai.is_empty() {
        config.backends = args.ollama.iter().map(|url| Backend::ollama(url)).collect();
        config
            .backends
            .extend(args.openai.iter().map(|url| Backend::openai(url)));
    }
    if let Some(name) = args.name {
        config.name = name;
    }
    if let Some(capacity) = args.capacity {
        config.capacity = capacity;
        config.queue = capacity * 4;
    }
    if let Some(queue) = args.queue {
        config.queue = queue;
    }
    if let Some(dir) = args.work_dir {
        config.dirs.work_root = dir;
    }
    if let Some(dir) = args.cache_dir {
        config.dirs.cache_dir = dir;
    }
    let signals = ShutdownSignals::listen()?;
    let agent = kowalski_exo_node_agent::start(config).await?;
    let shutdown = agent.shutdown_token();
    tokio::spawn(async move {
        signals.received().await;
        tracing::info!("shutting down: killing running work");
        shutdown.cancel();
    });
    agent.wait().await?;
    Ok(())
}
