//! The `coordinator` binary: argument parsing, and dispatch to the server (`serve`) or to the
//! client subcommands in [`kowalski_exo_coordinator::cli`].

use std::{io::IsTerminal, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use kowalski_exo_common::{
    cli_args, defaults,
    error_text::error_chain,
    isolation,
    proto::{
        ClusterEvent, ClusterExecuteRequest, ClusterOpenSessionRequest,
        ClusterSessionExecuteRequest, ExecLimits, ExecuteRequest, IsolationLayer,
        OpenSessionRequest, PlacementConstraints, PlanRequest, RunBlocksRequest,
        SessionExecuteRequest,
    },
    security::files,
    shutdown::ShutdownSignals,
    telemetry,
};
use kowalski_exo_coordinator::{
    cli::{
        Failure, ask, batch,
        connect::{Client, Dial, local_agent_config, with_client},
        follow::{FollowOptions, follow},
        inference, nodes, plan,
        request::{check_markdown, limits, parse_timeout, program_stdin, read_text},
        service_unit, sessions, trust,
    },
    inference::chat::DEFAULT_STALL_TIMEOUT,
    server::{self, CoordinatorConfig, TlsSetup},
    sessions::SessionSettings,
};
use tonic::Streaming;

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
        /// HTTP API address (health, OpenAI-compatible API), or `off` [default: port 8080 on the
        /// listen host]
        #[arg(long, value_name = "ADDR")]
        http: Option<String>,
        /// Also run a node agent in this process: a whole single-device cluster.
        #[arg(long)]
        local_agent: bool,
        /// Seconds without a token after which a chat answer moves to another node (0: the
        /// default).
        #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = parse_timeout)]
        stall_timeout: u32,
        /// Forget a named session after this long without an execution (e.g. 90s, 10m, 1h);
        /// give agents the same `--session-idle`
        #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
        session_idle: Duration,
        /// The most a session's successful executions may take to be kept for replay where it
        /// moves (e.g. 64M); past it the session starts afresh where it moves, and says so
        #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = cli_args::parse_size)]
        session_history: u64,
        /// The cluster's name, announced on the LAN (mDNS, `_kowalski-exo._tcp`) so agents
        /// find the coordinator with no --coordinator; tells clusters on one LAN apart
        /// [default: the host name]
        #[arg(long, value_name = "NAME")]
        cluster_name: Option<String>,
        /// Do not announce the coordinator on the LAN.
        #[arg(long)]
        no_announce: bool,
        #[command(flatten)]
        security: SecurityArgs,
    },
    /// Print the systemd unit that runs the coordinator as a service (`scripts/install.sh
    /// --coordinator` installs it), then exit.
    InstallService {
        /// The binary the unit runs [default: this one]
        #[arg(long, value_name = "PATH")]
        bin: Option<PathBuf>,
        /// Flags the unit passes `coordinator serve`, after `--` (e.g. -- --cluster-name home).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Print the token a device joins the cluster with (`node-agent --join TOKEN`).
    Token {
        /// Replace it: the old one lets no device join from now on.
        #[arg(long)]
        new: bool,
        #[command(flatten)]
        data: DataDirArg,
    },
    /// Issue a client certificate, to call agents directly (grpcurl, scripts).
    Cert {
        #[command(subcommand)]
        action: CertAction,
        #[command(flatten)]
        data: DataDirArg,
    },
    /// Make, list or revoke the API keys clients of a coordinator with TLS need.
    Apikey {
        #[command(subcommand)]
        action: trust::ApiKeyAction,
        #[command(flatten)]
        data: DataDirArg,
    },
    /// List the nodes of the cluster, or revoke one.
    Nodes {
        #[command(subcommand)]
        action: Option<NodesAction>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Run code on a node of the cluster.
    Exec {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        run: RunArgs,
        /// Language (python, bash, js, rs, ...).
        #[arg(long)]
        lang: String,
        /// The code to run.
        #[arg(short = 'c', conflicts_with = "file")]
        code: Option<String>,
        /// A file holding the code ("-" for standard input).
        #[arg(required_unless_present = "code")]
        file: Option<PathBuf>,
        /// The program's standard input, from a file [default: what is piped to this command,
        /// unless the code itself comes from standard input]
        #[arg(long)]
        stdin: Option<PathBuf>,
        /// Arguments passed to the program.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run every fenced code block of a Markdown file, in order.
    Run {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        run: RunArgs,
        /// The Markdown file ("-" for standard input).
        file: PathBuf,
        /// Show what would run where, and run nothing.
        #[arg(long)]
        plan: bool,
        /// Run the remaining blocks after one fails.
        #[arg(long)]
        keep_going: bool,
    },
    /// List the models the cluster's nodes serve.
    Models {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Ask a model served by the cluster; the answer streams to stdout.
    Chat {
        #[command(flatten)]
        client: ClientArgs,
        /// The model (see `coordinator models`).
        #[arg(long)]
        model: String,
        /// A system prompt.
        #[arg(long)]
        system: Option<String>,
        /// Most tokens to generate [default: the backend's]
        #[arg(long)]
        max_tokens: Option<u32>,
        /// Sampling temperature [default: the backend's]
        #[arg(long)]
        temperature: Option<f32>,
        /// Answers with the same id prefer the same node (its prompt cache stays warm).
        #[arg(long)]
        conversation: Option<String>,
        /// The prompt ("-" or none: standard input).
        prompt: Option<String>,
    },
    /// Answer a question over a context of any size with the Recursive Language Model loop:
    /// the context stays in a session, the model writes code that reads it and asks models on
    /// the cluster about pieces of it.
    Ask {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        ask: ask::AskArgs,
    },
    /// Run every task of a JSONL file (exec or ask) over the cluster, N at a time, one result
    /// line per task as it finishes; state in a database, so `--resume` goes on after an
    /// interruption without running finished tasks again.
    Batch {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        batch: batch::BatchArgs,
    },
    /// Render a run kept with `ask --trajectory FILE` as a tree: turns, blocks, the answer.
    Trajectory { file: PathBuf },
    /// List the open sessions.
    Sessions {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Manage one session.
    Session {
        #[command(subcommand)]
        action: SessionAction,
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

#[derive(Subcommand, Debug)]
enum CertAction {
    /// Write NAME.pem, NAME.key and ca.pem to DIR.
    Issue {
        /// The client's name, as its certificate carries it.
        #[arg(long = "client", value_name = "NAME")]
        name: String,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Refuse the client's certificates from now on: agents learn it within a few seconds.
    Revoke {
        /// The client's name, as `cert issue --client` was given it.
        #[arg(long = "client", value_name = "NAME")]
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum SessionAction {
    /// End a session: its interpreters stop and its work directory is removed.
    Close {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
enum NodesAction {
    /// Refuse a node's certificate from now on (it may join again with a new token).
    Revoke {
        name: String,
        #[command(flatten)]
        data: DataDirArg,
    },
}

#[derive(Args, Debug)]
struct DataDirArg {
    /// The coordinator's data directory: the cluster's authority, join token, node records.
    #[arg(long, value_name = "DIR", global = true, default_value_os_t = files::default_dir("coordinator"))]
    data_dir: PathBuf,
}

#[derive(Args, Debug)]
struct SecurityArgs {
    #[command(flatten)]
    data: DataDirArg,
    /// TLS and node certificates on loopback too (on any other address they are the default).
    #[arg(long, conflicts_with = "insecure")]
    tls: bool,
    /// No TLS on a non-loopback address: any device that reaches it can run code on every node.
    #[arg(long)]
    insecure: bool,
    /// Another name the coordinator's certificate carries, one clients dial it by (repeatable).
    #[arg(long = "tls-name", value_name = "NAME")]
    tls_names: Vec<String>,
    /// Requests per second each API key may make (bursts of twice as many); 0 for no limit.
    /// Keys, and so the limit, apply with TLS.
    #[arg(long, value_name = "N", default_value_t = kowalski_exo_common::security::gate::DEFAULT_RATE)]
    rate_limit: u32,
}

#[derive(Args, Debug)]
struct ClientArgs {
    /// Coordinator to talk to (also read from COORDINATOR_ADDR, the older name).
    #[arg(long, env = cli_args::COORDINATOR_ENV, default_value_t = cli_args::default_coordinator_url(),
          value_parser = cli_args::parse_coordinator_url)]
    addr: String,
    /// One JSON object per line, with stable field names.
    #[arg(long)]
    json: bool,
    /// Start an in-process coordinator and agent instead of dialing one.
    #[arg(long)]
    local: bool,
    /// The cluster authority's certificate, for a coordinator that runs with TLS
    /// (`authority.pem` in its data directory).
    #[arg(long, value_name = "FILE", env = "KOWALSKI_CA")]
    ca: Option<PathBuf>,
    /// The API key a coordinator that runs with TLS asks for (`coordinator apikey create`).
    #[arg(
        long,
        value_name = "KEY",
        env = "KOWALSKI_API_KEY",
        hide_env_values = true
    )]
    api_key: Option<String>,
}

impl ClientArgs {
    fn dial(&self) -> Dial {
        Dial {
            addr: self.addr.clone(),
            local: self.local,
            ca: self.ca.clone(),
            api_key: self.api_key.clone(),
        }
    }
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Run only on this node (name or id).
    #[arg(long)]
    node: Option<String>,
    /// Run only on nodes with this label, as key=value; repeatable.
    #[arg(long = "label", value_parser = cli_args::parse_label)]
    labels: Vec<(String, String)>,
    /// Wall-clock timeout in seconds, fractions allowed; 0 is the agent's default. A timeout
    /// past 30 s raises the CPU limit with it.
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = parse_timeout)]
    timeout: u32,
    /// Memory for the whole process tree, e.g. 512M or 2G.
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = cli_args::parse_size)]
    memory: u64,
    /// CPU seconds [default: 30, or the timeout when longer]
    #[arg(long, value_name = "SECONDS")]
    cpu_seconds: Option<u32>,
    /// Output over stdout and stderr before the run is stopped, e.g. 1M.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = cli_args::parse_size)]
    output_limit: u64,
    /// Disk the run may fill (work dir, /tmp and /dev/shm together), e.g. 1G [default: 256M]
    #[arg(long, value_name = "SIZE", value_parser = cli_args::parse_size)]
    disk: Option<u64>,
    /// Run only on nodes that give these isolation layers, comma-separated: cgroup, user,
    /// network, mount, landlock (`coordinator nodes` shows what each gives).
    #[arg(long, value_name = "LAYERS", value_delimiter = ',', value_parser = isolation::parse_name)]
    require_isolation: Vec<IsolationLayer>,
    /// Let the code use the network (only nodes whose owner allows it take the run).
    #[arg(long)]
    network: bool,
    /// Attempts before giving up when nodes fail.
    #[arg(long, default_value_t = 3)]
    attempts: u32,
    /// Seconds to wait for a fitting node while the cluster has none yet.
    #[arg(long, value_name = "SECONDS", default_value = "5", value_parser = parse_timeout)]
    wait_for_nodes: u32,
    /// Write output as it comes even when stdout is not a terminal (then a lost attempt's
    /// output shows too, marked where it stops).
    #[arg(long)]
    stream: bool,
    /// Run in this named session (opened on first use): a warm interpreter that keeps
    /// variables, imports and the working directory across executions (python, js, bash).
    #[arg(long, value_name = "NAME")]
    session: Option<String>,
    /// With --session: the model `llm_query` asks when the code names none [default: the only
    /// model the cluster serves]
    #[arg(long, value_name = "MODEL", requires = "session")]
    model: Option<String>,
}

impl RunArgs {
    fn constraints(&self) -> PlacementConstraints {
        PlacementConstraints {
            node: self.node.clone().unwrap_or_default(),
            labels: self.labels.iter().cloned().collect(),
            require_isolation: self.require_isolation.iter().map(|l| *l as i32).collect(),
        }
    }

    fn limits(&self) -> Option<ExecLimits> {
        limits(
            Some(self.memory),
            self.cpu_seconds,
            Some(self.output_limit),
            self.disk,
        )
    }

    /// An execution in a named session; the limits other than timeout and output are the
    /// session's, used when it is opened.
    fn session_request(
        &self,
        session: String,
        language: String,
        code: String,
    ) -> ClusterSessionExecuteRequest {
        ClusterSessionExecuteRequest {
            execution: Some(SessionExecuteRequest {
                session_id: session,
                language,
                code,
                timeout_ms: self.timeout,
                output_bytes: self.output_limit,
                ..Default::default()
            }),
            open: Some(ClusterOpenSessionRequest {
                session: Some(OpenSessionRequest {
                    limits: self.limits(),
                    network: self.network,
                    model: self.model.clone().unwrap_or_default(),
                    ..Default::default()
                }),
                placement: Some(self.constraints()),
                wait_for_nodes_ms: self.wait_for_nodes,
            }),
            max_attempts: self.attempts,
        }
    }

    fn follow_options(&self, json: bool, blocks: bool) -> FollowOptions {
        FollowOptions {
            json,
            blocks,
            stream: self.stream || std::io::stdout().is_terminal(),
            session: self.session.clone(),
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let (result, json) = match cli.command {
        Command::Serve {
            listen,
            http,
            local_agent,
            stall_timeout,
            session_idle,
            session_history,
            cluster_name,
            no_announce,
            security,
        } => {
            telemetry::init();
            let http = server::http_address(&listen, http.as_deref());
            let config = CoordinatorConfig {
                tls: trust::tls_setup(
                    &listen,
                    http.as_deref(),
                    security.tls,
                    security.insecure,
                    &security.data.data_dir,
                    &security.tls_names,
                )
                .map(|setup| TlsSetup {
                    rate_limit: security.rate_limit,
                    ..setup
                }),
                http,
                local_agent: local_agent.then(|| {
                    let mut agent = local_agent_config();
                    agent.sessions.idle = session_idle;
                    agent
                }),
                sessions: SessionSettings {
                    idle: session_idle,
                    history_bytes: session_history,
                },
                stall_timeout: match stall_timeout {
                    0 => DEFAULT_STALL_TIMEOUT,
                    ms => Duration::from_millis(ms.into()),
                },
                announce: (!no_announce).then(|| {
                    cluster_name.unwrap_or_else(kowalski_exo_node_agent::agent::default_name)
                }),
                ..CoordinatorConfig::new(&listen)
            };
            (serve(config).await, false)
        }
        Command::InstallService { bin, args } => {
            let bin = bin
                .or_else(|| std::env::current_exe().ok())
                .unwrap_or_default();
            print!("{}", service_unit::unit(&bin, &args));
            (Ok(0), false)
        }
        Command::Token { new, data } => (trust::token(&data.data_dir, new), false),
        Command::Apikey { action, data } => (trust::api_key(&data.data_dir, &action), false),
        Command::Cert {
            action: CertAction::Issue { name, out },
            data,
        } => (trust::issue_client(&data.data_dir, &name, &out), false),
        Command::Cert {
            action: CertAction::Revoke { name },
            data,
        } => (trust::revoke_client(&data.data_dir, &name), false),
        Command::Nodes {
            action: Some(NodesAction::Revoke { name, data }),
            ..
        } => (trust::revoke(&data.data_dir, &name), false),
        Command::Nodes {
            action: None,
            client,
        } => (
            with_client(&client.dial(), |c, addr| async move {
                nodes::list(c, &addr, client.json).await
            })
            .await,
            client.json,
        ),
        Command::Exec {
            client,
            run,
            lang,
            code,
            file,
            stdin,
            args,
        } => (
            exec(&client, run, lang, code, file, stdin, args).await,
            client.json,
        ),
        Command::Run {
            client,
            run,
            file,
            plan,
            keep_going,
        } => (
            run_document(&client, run, file, plan, keep_going).await,
            client.json,
        ),
        Command::Models { client } => (
            with_client(&client.dial(), |c, addr| async move {
                inference::list(c, &addr, client.json).await
            })
            .await,
            client.json,
        ),
        Command::Chat {
            client,
            model,
            system,
            max_tokens,
            temperature,
            conversation,
            prompt,
        } => {
            let request =
                inference::request(model, system, max_tokens, temperature, conversation, prompt);
            let result = match request {
                Ok(request) => {
                    with_client(&client.dial(), |c, addr| async move {
                        inference::chat(c, &addr, request, client.json).await
                    })
                    .await
                }
                Err(failure) => Err(failure),
            };
            (result, client.json)
        }
        Command::Ask { client, ask } => {
            let result = match ask.request() {
                Ok(request) => {
                    with_client(&client.dial(), |c, addr| async move {
                        ask::ask(c, &addr, request, client.json, ask.trajectory.as_deref()).await
                    })
                    .await
                }
                Err(failure) => Err(failure),
            };
            (result, client.json)
        }
        Command::Batch { client, batch } => (
            with_client(&client.dial(), |c, _| async move {
                batch::batch(c, &batch).await
            })
            .await,
            client.json,
        ),
        Command::Trajectory { file } => (ask::render(&file), false),
        Command::Sessions { client } => (
            with_client(&client.dial(), |c, addr| async move {
                sessions::list(c, &addr, client.json).await
            })
            .await,
            client.json,
        ),
        Command::Session {
            action: SessionAction::Close { name, client },
        } => (
            with_client(&client.dial(), |c, addr| async move {
                sessions::close(c, &addr, name, client.json).await
            })
            .await,
            client.json,
        ),
        Command::Drain { client, node } => (
            with_client(&client.dial(), |c, addr| async move {
                nodes::set_draining(c, &addr, node, true, client.json).await
            })
            .await,
            client.json,
        ),
        Command::Undrain { client, node } => (
            with_client(&client.dial(), |c, addr| async move {
                nodes::set_draining(c, &addr, node, false, client.json).await
            })
            .await,
            client.json,
        ),
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(failure) => {
            failure.report(json);
            ExitCode::from(failure.status)
        }
    }
}

async fn serve(config: CoordinatorConfig) -> Result<u8, Failure> {
    let signals = ShutdownSignals::listen()
        .map_err(|e| Failure::infrastructure(format!("cannot catch SIGTERM and SIGINT: {e}")))?;
    let running = server::start(config).await.map_err(|e| {
        let status = match &e {
            server::StartError::Serve(serve) => serve.exit_status(),
            _ => kowalski_exo_common::exit::INFRASTRUCTURE,
        };
        Failure::new(status, error_chain(&e))
    })?;
    let shutdown = running.shutdown_token();
    tokio::spawn(async move {
        signals.received().await;
        shutdown.cancel();
    });
    running
        .wait()
        .await
        .map_err(|e| Failure::infrastructure(error_chain(&e)))?;
    Ok(0)
}

async fn exec(
    client: &ClientArgs,
    run: RunArgs,
    language: String,
    code: Option<String>,
    file: Option<PathBuf>,
    stdin: Option<PathBuf>,
    args: Vec<String>,
) -> Result<u8, Failure> {
    let code_from_stdin = code.is_none() && file.as_ref().is_some_and(|f| f.as_os_str() == "-");
    let code = match (code, &file) {
        (Some(code), _) => code,
        (None, Some(file)) => read_text(file)?,
        (None, None) => return Err(Failure::usage("give the code with -c CODE or a FILE")),
    };
    if let Some(session) = run.session.clone() {
        if !args.is_empty() || stdin.is_some() {
            return Err(Failure::usage(
                "code in a session takes no arguments or standard input",
            ));
        }
        let request = run.session_request(session, language, code);
        let options = run.follow_options(client.json, false);
        return follow_call(client, options, |mut c| async move {
            c.execute_in_session(request).await
        })
        .await;
    }
    let request = ClusterExecuteRequest {
        execution: Some(ExecuteRequest {
            language,
            code,
            args,
            stdin: program_stdin(stdin.as_deref(), code_from_stdin)?,
            timeout_ms: run.timeout,
            limits: run.limits(),
            network: run.network,
            ..Default::default()
        }),
        placement: Some(run.constraints()),
        max_attempts: run.attempts,
        wait_for_nodes_ms: run.wait_for_nodes,
    };
    let options = run.follow_options(client.json, false);
    follow_call(
        client,
        options,
        |mut c| async move { c.execute(request).await },
    )
    .await
}

async fn run_document(
    client: &ClientArgs,
    run: RunArgs,
    file: PathBuf,
    plan_only: bool,
    keep_going: bool,
) -> Result<u8, Failure> {
    let document = read_text(&file)?;
    check_markdown(&file, &document)?;
    if plan_only {
        let request = PlanRequest {
            document,
            placement: Some(run.constraints()),
        };
        return with_client(&client.dial(), |c, addr| async move {
            plan::show(c, &addr, request, client.json).await
        })
        .await;
    }
    let request = RunBlocksRequest {
        document,
        keep_going,
        placement: Some(run.constraints()),
        timeout_ms: run.timeout,
        limits: run.limits(),
        max_attempts: run.attempts,
        wait_for_nodes_ms: run.wait_for_nodes,
        network: run.network,
        session: run.session.clone().unwrap_or_default(),
        session_model: run.model.clone().unwrap_or_default(),
    };
    let options = run.follow_options(client.json, true);
    follow_call(client, options, |mut c| async move {
        c.run_blocks(request).await
    })
    .await
}

/// Makes a streaming call and follows its events to the end.
async fn follow_call<F, Fut>(
    client: &ClientArgs,
    options: FollowOptions,
    call: F,
) -> Result<u8, Failure>
where
    F: FnOnce(Client) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Streaming<ClusterEvent>>, tonic::Status>>,
{
    with_client(&client.dial(), |c, addr| async move {
        let stream = call(c)
            .await
            .map_err(|s| Failure::from_status(s, &addr))?
            .into_inner();
        follow(stream, options, &addr).await
    })
    .await
}
