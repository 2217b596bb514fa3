//! The coordinator server assembled: registry, its two gRPC services, health and reflection,
//! and optionally an in-process node agent so one process is a whole single-device cluster.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use axum::serve::ListenerExt;
use kowalski_exo_common::{
    defaults,
    proto::{agent_registry_server::AgentRegistryServer, coordinator_server::CoordinatorServer},
    request_size::MAX_MESSAGE_BYTES,
    security::{Identity, TlsError},
    transport::{self, ServeError, ServerBase},
};
use kowalski_exo_node_agent::{AgentConfig, RunningAgent};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::{server::NamedService, service::interceptor::InterceptedService};

use kowalski_exo_common::security::{api_keys::KeyCheck, gate::Gate, trust::ClusterTrust};

use crate::{
    announce::Announcement,
    api::{client_service::ClientService, registry_service::RegistryService},
    cluster_metrics,
    http::{self, https::HttpsListener},
    inference::{Chats, chat::DEFAULT_STALL_TIMEOUT},
    registry::NodeRegistry,
    scheduling::agents::{AgentConnector, GrpcAgents},
    scheduling::dispatch::Dispatcher,
    service::ClusterService,
    sessions::{SessionSettings, SubcallRelay},
};

/// How long shutdown waits for open client streams.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Failure to start a coordinator.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("cannot start the local agent: {0}")]
    LocalAgent(#[from] kowalski_exo_node_agent::agent::AgentError),
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] TlsError),
}

/// A started coordinator.
pub struct RunningCoordinator {
    /// The gRPC address it listens on (with the real port when 0 was asked).
    pub addr: SocketAddr,
    /// The HTTP API's address, when it serves one.
    pub http_addr: Option<SocketAddr>,
    pub registry: NodeRegistry,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ServeError>>,
    local_agent: Option<RunningAgent>,
    /// Withdrawn when the coordinator stops.
    _announcement: Option<Announcement>,
}

impl RunningCoordinator {
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until shutdown is asked for, then stops the local agent and the server, giving
    /// open streams a few seconds to end.
    pub async fn wait(self) -> Result<(), ServeError> {
        self.shutdown.cancelled().await;
        if let Some(agent) = self.local_agent {
            agent.stop().await?;
        }
        match tokio::time::timeout(SHUTDOWN_GRACE, self.task).await {
            Ok(served) => served.unwrap_or(Ok(())),
            Err(_) => {
                tracing::warn!("client streams still open after {SHUTDOWN_GRACE:?}; closing");
                Ok(())
            }
        }
    }

    pub async fn stop(self) -> Result<(), ServeError> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// The HTTP API's address: as given, none for `off`, else port 8080 on the listen host.
pub fn http_address(listen: &str, http: Option<&str>) -> Option<String> {
    match http {
        Some("off") => None,
        Some(addr) => Some(addr.to_string()),
        None => {
            let host = listen.rsplit_once(':').map_or(listen, |(host, _)| host);
            Some(format!("{host}:{}", defaults::COORDINATOR_HTTP_PORT))
        }
    }
}

/// What a coordinator serves, and how.
pub struct CoordinatorConfig {
    /// The gRPC address.
    pub listen: String,
    /// The HTTP API's address; none: no HTTP API.
    pub http: Option<String>,
    /// A node agent to run in this process.
    pub local_agent: Option<AgentConfig>,
    /// A chat answer whose node sends no token for this long moves to another node.
    pub stall_timeout: Duration,
    /// How named sessions are kept: how long unused, how much history.
    pub sessions: SessionSettings,
    /// Cluster identity over TLS; none: plaintext, for a coordinator on loopback (or one told
    /// `--insecure`).
    pub tls: Option<TlsSetup>,
    /// The cluster's name, announced on the LAN (mDNS/DNS-SD) when the coordinator listens
    /// beyond loopback; none: no announcement.
    pub announce: Option<String>,
}

/// Where the cluster's authority is kept, and the names the coordinator's certificate carries
/// besides its addresses and `localhost`.
#[derive(Clone, Debug)]
pub struct TlsSetup {
    pub data_dir: PathBuf,
    pub names: Vec<String>,
    /// Requests per second each API key may make; 0 for no limit.
    pub rate_limit: u32,
}

impl CoordinatorConfig {
    /// A coordinator on `listen` with the defaults: no HTTP API, no local agent.
    pub fn new(listen: &str) -> Self {
        CoordinatorConfig {
            listen: listen.to_string(),
            http: None,
            local_agent: None,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            sessions: SessionSettings::default(),
            tls: None,
            announce: None,
        }
    }
}

/// Serves the HTTP API on `listener` until `stop`: HTTPS as `identity` when the coordinator
/// runs with TLS.
fn serve_http(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    identity: Option<&Identity>,
    stop: CancellationToken,
) -> Result<(), TlsError> {
    let report = |served: std::io::Result<()>| {
        if let Err(e) = served {
            tracing::warn!(error = %e, "the HTTP API stopped");
        }
    };
    match identity {
        Some(identity) => {
            let listener = HttpsListener::new(listener, identity)?;
            tokio::spawn(async move {
                report(
                    axum::serve(listener, router)
                        .with_graceful_shutdown(stop.cancelled_owned())
                        .await,
                )
            });
        }
        None => {
            // Each text chunk goes out at once: without TCP_NODELAY the first one waits for
            // the client's delayed ACK of the response head (about 40 ms).
            let listener = listener.tap_io(|tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY on an HTTP connection");
                }
            });
            tokio::spawn(async move {
                report(
                    axum::serve(listener, router)
                        .with_graceful_shutdown(stop.cancelled_owned())
                        .await,
                )
            });
        }
    }
    Ok(())
}

/// What the coordinator's certificate is valid for: the address it listens on (every address
/// of the machine when it listens on all), the machine's name, `localhost`, and `extra`.
fn certificate_names(addr: SocketAddr, extra: &[String]) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    if addr.ip().is_unspecified() {
        if let Ok(interfaces) = nix::ifaddrs::getifaddrs() {
            names.extend(interfaces.filter_map(|i| i.address).filter_map(|a| {
                a.as_sockaddr_in()
                    .map(|v4| v4.ip().to_string())
                    .or_else(|| a.as_sockaddr_in6().map(|v6| v6.ip().to_string()))
            }));
        }
        names.push(kowalski_exo_node_agent::agent::default_name());
    } else {
        names.push(addr.ip().to_string());
    }
    names.extend(extra.iter().cloned());
    names.sort();
    names.dedup();
    names
}

/// Binds its addresses and serves until the returned handle is stopped.
pub async fn start(config: CoordinatorConfig) -> Result<RunningCoordinator, StartError> {
    let CoordinatorConfig {
        listen,
        http,
        local_agent,
        stall_timeout,
        sessions,
        tls,
        announce,
    } = config;
    // Counted from the start, whether or not anyone scrapes them.
    cluster_metrics::install();
    let registry = NodeRegistry::default();
    registry.spawn_liveness_ticker();
    let shutdown = CancellationToken::new();
    let (listener, addr) = transport::bind(&listen).await?;
    let http_listener = match &http {
        Some(http) => Some(transport::bind(http).await?),
        None => None,
    };
    let trust = match &tls {
        Some(setup) => {
            let trust = Arc::new(ClusterTrust::open(&setup.data_dir)?);
            let identity = trust.coordinator_identity(&certificate_names(addr, &setup.names))?;
            let gate = Arc::new(Gate::new(trust.clone(), setup.rate_limit));
            Some((trust, identity, gate))
        }
        None => None,
    };
    let agents: Arc<dyn AgentConnector> = match &trust {
        Some((trust, identity, _)) => Arc::new(GrpcAgents::with_tls(trust.agent_tls(identity))),
        None => Arc::new(GrpcAgents::default()),
    };
    let chats = Chats::new(registry.clone(), agents.clone(), stall_timeout);
    let dispatcher = Dispatcher::new(registry.clone(), agents);
    let cluster = ClusterService::new(dispatcher, chats.clone(), sessions);
    let relay = SubcallRelay::new(
        chats,
        registry.clone(),
        cluster.sessions().clone(),
        cluster.rlm().clone(),
    );
    let mut server = ServerBase::new(&[
        AgentRegistryServer::<RegistryService>::NAME,
        CoordinatorServer::<ClientService>::NAME,
    ])?;
    server
        .routes()
        .add_service(
            AgentRegistryServer::new(RegistryService::new(
                registry.clone(),
                shutdown.clone(),
                trust.as_ref().map(|(trust, _, _)| trust.clone()),
                relay,
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(InterceptedService::new(
            CoordinatorServer::new(ClientService::new(cluster.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            KeyCheck(trust.as_ref().map(|(_, _, gate)| gate.clone())),
        ));
    let health = server.health();
    health
        .set_serving::<AgentRegistryServer<RegistryService>>()
        .await;
    health
        .set_serving::<CoordinatorServer<ClientService>>()
        .await;
    let stop = shutdown.clone();
    let server_tls = trust
        .as_ref()
        .map(|(trust, identity, _)| trust.server_tls(identity));
    let task = tokio::spawn(async move {
        server
            .serve(listener, server_tls, stop.cancelled_owned())
            .await
    });
    tracing::info!(%addr, tls = trust.is_some(), "coordinator listening");
    let http_addr = match http_listener {
        Some((listener, http_addr)) => {
            let router = http::router(cluster, trust.as_ref().map(|(_, _, gate)| gate.clone()));
            let identity = trust.as_ref().map(|(_, identity, _)| identity);
            serve_http(listener, router, identity, shutdown.clone())?;
            tracing::info!(addr = %http_addr, https = identity.is_some(), "http api listening");
            Some(http_addr)
        }
        None => None,
    };
    let announcement = match announce {
        Some(cluster) if !addr.ip().is_loopback() => {
            let authority = trust.as_ref().map(|(trust, _, _)| trust.fingerprint());
            match Announcement::start(&cluster, addr.port(), authority.as_deref()) {
                Ok(announcement) => Some(announcement),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot announce the coordinator on the LAN; agents need --coordinator");
                    None
                }
            }
        }
        _ => None,
    };
    let local_agent = match local_agent {
        Some(config) => {
            let dial = if addr.ip().is_unspecified() {
                SocketAddr::from(([127, 0, 0, 1], addr.port()))
            } else {
                addr
            };
            let mut config = AgentConfig {
                coordinator: Some(format!("http://{dial}")),
                ..config
            };
            if let (Some((trust, _, _)), Some(setup)) = (&trust, &tls) {
                // The in-process agent joins like any other, with the token, and keeps its
                // certificate beside the coordinator's authority.
                config.join = Some(trust.token()?.to_string());
                config.data_dir = setup.data_dir.join("local-agent");
            }
            match kowalski_exo_node_agent::start(config).await {
                Ok(agent) => Some(agent),
                Err(e) => {
                    shutdown.cancel();
                    return Err(StartError::LocalAgent(e));
                }
            }
        }
        None => None,
    };
    Ok(RunningCoordinator {
        addr,
        http_addr,
        registry,
        shutdown,
        task,
        local_agent,
        _announcement: announcement,
    })
}
