//! One node agent, assembled: sandbox, fingerprint, executor, admission and the gRPC server,
//! with a clean shutdown that kills running work and removes its directories.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use kowalski_exo_common::{
    defaults,
    proto::node_agent_server::NodeAgentServer,
    request_size::MAX_MESSAGE_BYTES,
    security::{Peer, Role, files},
    transport::{self, ServeError, ServerBase},
};
use tokio::task::JoinHandle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Request, Status, server::NamedService, service::interceptor::InterceptedService};

use crate::{
    admission::Admission,
    backends::{Backend, Catalog, DEFAULT_OLLAMA_URL, catalog::DEFAULT_POLL_INTERVAL},
    discovery::{self, DiscoveryError, Wanted},
    exec::{ExecDirs, ExecPolicy, Executor},
    fingerprint::{self, SearchPath},
    link::CoordinatorLink,
    membership::{Membership, MembershipError},
    registration::{self, Registration},
    sandbox::{DEFAULT_RUN_UID_BASE, Sandbox, unmount_beneath},
    service::{Identity, NodeAgentService, RevokedClients},
    sessions::{SessionConfig, Sessions},
};

/// How often runtimes are re-probed by default.
pub const DEFAULT_FINGERPRINT_INTERVAL: Duration = Duration::from_secs(30);
/// In a member's data directory: the client certificates the coordinator last said are revoked.
const REVOKED_CLIENTS_FILE: &str = "revoked-clients";
/// How long shutdown waits for killed runs to report and clean up.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Everything an agent needs to start.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub name: String,
    pub listen: String,
    /// Address the coordinator should dial; derived from the listen address when absent.
    pub advertise: Option<String>,
    /// Coordinator to register with, in the background; `None` runs stand-alone, unless
    /// `discover` says which coordinator to find on the LAN.
    pub coordinator: Option<String>,
    /// The coordinator to find on the LAN (mDNS) when `coordinator` is none; it is looked for
    /// while the agent starts.
    pub discover: Option<Wanted>,
    pub labels: HashMap<String, String>,
    /// Runs executed at once.
    pub capacity: usize,
    /// Runs waiting for a slot before new ones are refused.
    pub queue: usize,
    /// What requests may have: default limits, the owner's ceilings, network access.
    pub policy: ExecPolicy,
    /// First uid of the users runs execute as, when the agent is root.
    pub run_uid_base: u32,
    pub max_code_bytes: usize,
    pub dirs: ExecDirs,
    pub fingerprint_interval: Duration,
    pub use_cgroups: bool,
    pub search_path: SearchPath,
    /// Local LLM servers whose models this node offers.
    pub backends: Vec<Backend>,
    /// How often backends are asked for their models and probed.
    pub model_poll_interval: Duration,
    /// Where the node keeps its certificate once it has joined a cluster that runs with TLS.
    pub data_dir: PathBuf,
    /// A join token (`coordinator token`), to join such a cluster the first time.
    pub join: Option<String>,
    /// Serve in plaintext on a non-loopback address without a cluster certificate: anyone who
    /// reaches it can run code here.
    pub insecure: bool,
    /// How many sessions, closed after how long idle.
    pub sessions: SessionConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        AgentConfig {
            name: default_name(),
            listen: defaults::NODE_AGENT_LISTEN.to_string(),
            advertise: None,
            coordinator: None,
            discover: None,
            labels: HashMap::new(),
            capacity: cores,
            queue: cores * 4,
            policy: ExecPolicy::default(),
            run_uid_base: DEFAULT_RUN_UID_BASE,
            max_code_bytes: kowalski_exo_common::request_size::MAX_CODE_BYTES,
            dirs: ExecDirs {
                work_root: default_work_root(),
                cache_dir: default_cache_dir(),
            },
            fingerprint_interval: DEFAULT_FINGERPRINT_INTERVAL,
            use_cgroups: true,
            search_path: SearchPath::from_env(),
            // Ollama on its default port, used when it answers.
            backends: vec![Backend::ollama(DEFAULT_OLLAMA_URL)],
            model_poll_interval: DEFAULT_POLL_INTERVAL,
            data_dir: files::default_dir("node-agent"),
            join: None,
            insecure: false,
            sessions: SessionConfig::default(),
        }
    }
}

/// Without a cluster certificate the agent serves in plaintext: only on loopback, unless its
/// owner says `--insecure` (then every start says what that exposes).
fn check_exposure(addr: SocketAddr, member: bool, insecure: bool) -> Result<(), AgentError> {
    if member || addr.ip().is_loopback() {
        return Ok(());
    }
    if !insecure {
        return Err(AgentError::Exposed(addr));
    }
    tracing::warn!(%addr, "serving without TLS (--insecure): anyone who reaches {addr} can run code on this device");
    Ok(())
}

/// Over TLS, every caller holds a certificate of the cluster's authority, not one the
/// coordinator revoked; a node's is not enough to call another node (a device taken over cannot
/// run code on the others).
fn admit_caller(request: Request<()>, revoked: &RevokedClients) -> Result<Request<()>, Status> {
    match Peer::of(&request) {
        None => Ok(request),
        Some(Ok(peer)) if peer.role == Role::Node => Err(Status::permission_denied(format!(
            "'{}' holds a node certificate: nodes do not call each other; use the coordinator, or a client certificate (`coordinator cert issue`)",
            peer.name
        ))),
        Some(Ok(peer))
            if revoked
                .read()
                .expect("revoked clients lock poisoned")
                .contains(&peer.fingerprint) =>
        {
            Err(Status::permission_denied(format!(
                "the certificate of '{}' was revoked (`coordinator cert revoke`)",
                peer.name
            )))
        }
        Some(Ok(_)) => Ok(request),
        Some(Err(e)) => Err(Status::permission_denied(e.to_string())),
    }
}

/// The host name, or "node" when it cannot be read.
pub fn default_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_string())
}

/// `/run/kowalski-exo/work/agent-PID` for root (a directory only root may write: root follows
/// paths there), else `$TMPDIR/kowalski-exo/agent-PID`: this agent's own, so dead agents' roots
/// can be found.
fn default_work_root() -> PathBuf {
    let parent = if nix::unistd::geteuid().is_root() {
        PathBuf::from(ROOT_WORK_PARENT)
    } else {
        std::env::temp_dir().join("kowalski-exo")
    };
    parent.join(format!("{WORK_ROOT_PREFIX}{}", std::process::id()))
}

/// Parent of the work roots of agents run as root.
const ROOT_WORK_PARENT: &str = "/run/kowalski-exo/work";

fn default_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("kowalski-exo")
}

/// Failure to start an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("cannot prepare {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error(
        "without a cluster certificate this agent would run code for anyone who reaches {0}: join a cluster with --join TOKEN, listen on loopback (--listen 127.0.0.1:50052), or pass --insecure"
    )]
    Exposed(SocketAddr),
}

/// A started agent.
pub struct RunningAgent {
    /// The address the gRPC server listens on (with the real port when 0 was asked).
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ServeError>>,
}

impl RunningAgent {
    /// Cancelling this token shuts the agent down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Shuts down: running work is killed, work and cgroup directories removed.
    pub async fn stop(self) -> Result<(), ServeError> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits until the agent has shut down.
    pub async fn wait(self) -> Result<(), ServeError> {
        self.task.await.unwrap_or(Ok(()))
    }
}

/// Prefix of an agent's own work root under the shared default parent; its pid follows.
const WORK_ROOT_PREFIX: &str = "agent-";

/// Removes the default work roots of agents that died without cleaning up (`agent-PID` beside
/// this agent's, where PID no longer runs). Explicit `--work-dir`s may be shared, so they are
/// left alone.
fn remove_dead_agents_work_roots(work_root: &Path) {
    let (Some(parent), Some(own)) = (work_root.parent(), work_root.file_name()) else {
        return;
    };
    if !own.to_string_lossy().starts_with(WORK_ROOT_PREFIX) {
        return;
    }
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(WORK_ROOT_PREFIX)
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            == Err(nix::errno::Errno::ESRCH);
        if !gone {
            continue;
        }
        unmount_beneath(&entry.path());
        if std::fs::remove_dir_all(entry.path()).is_ok() {
            tracing::warn!(dir = %entry.path().display(), "removed work left by an agent that is gone");
        }
    }
}

/// Starts an agent: probes runtimes, binds, serves, and registers in the background.
pub async fn start(config: AgentConfig) -> Result<RunningAgent, AgentError> {
    let shutdown = CancellationToken::new();
    // Bound first, so a taken port or a bad address leaves nothing behind.
    let (listener, addr) = transport::bind(&config.listen).await?;
    // Looked for while the sandbox is set up and runtimes are probed.
    let looking = match (&config.coordinator, config.discover.clone()) {
        (None, Some(wanted)) => Some(tokio::spawn(async move { discovery::find(&wanted).await })),
        _ => None,
    };
    if config.dirs.work_root == default_work_root() {
        remove_dead_agents_work_roots(&config.dirs.work_root);
    }
    let sandbox = Sandbox::detect(
        config.use_cgroups,
        config.capacity.max(1),
        config.run_uid_base,
        &config.dirs.work_root,
    )
    .map_err(|source| AgentError::Io {
        what: "the sandbox".to_string(),
        source,
    })?;
    for dir in [&config.dirs.work_root, &config.dirs.cache_dir] {
        std::fs::create_dir_all(dir).map_err(|source| AgentError::Io {
            what: format!("directory {}", dir.display()),
            source,
        })?;
    }
    let sandbox = sandbox.hide(&[
        &config.data_dir,
        &config.dirs.cache_dir,
        &config.dirs.work_root,
    ]);
    let runtimes = fingerprint::spawn_refresh(
        config.search_path.clone(),
        config.fingerprint_interval,
        shutdown.clone(),
    )
    .await;
    let executor = Executor::new(
        sandbox.clone(),
        runtimes,
        config.policy,
        config.max_code_bytes,
        config.dirs.clone(),
    )
    .map_err(|source| {
        sandbox.tear_down();
        AgentError::Io {
            what: format!(
                "work directory {} and cache {}",
                config.dirs.work_root.display(),
                config.dirs.cache_dir.display()
            ),
            source,
        }
    })?;
    let joined = async {
        let coordinator = match looking {
            Some(task) => Some(task.await.map_err(|e| AgentError::Io {
                what: "the search for the coordinator".to_string(),
                source: std::io::Error::other(e),
            })??),
            None => config.coordinator.clone(),
        };
        let membership = Membership::resolve(
            &config.data_dir,
            coordinator.as_deref(),
            config.join.as_deref(),
            &config.name,
        )
        .await?;
        check_exposure(addr, membership.is_some(), config.insecure)?;
        Ok::<_, AgentError>((coordinator, membership))
    };
    let (coordinator, membership) = joined.await.inspect_err(|_| sandbox.tear_down())?;
    let admission = Admission::new(config.capacity, config.queue);
    let runs = TaskTracker::new();
    let identity = Identity {
        name: config.name.clone(),
        labels: config.labels.clone(),
    };
    let catalog = Catalog::new(config.backends.clone());
    catalog
        .spawn_refresh(config.model_poll_interval, shutdown.clone())
        .await;
    let executor = Arc::new(executor);
    let link = coordinator.as_ref().map(|_| CoordinatorLink::default());
    let sessions = Sessions::new(
        executor.clone(),
        admission.clone(),
        config.sessions,
        shutdown.clone(),
        link.clone(),
    );
    runs.spawn(sessions.clone().keep_tidy());
    let mut service = NodeAgentService::new(
        executor,
        catalog,
        admission,
        identity,
        shutdown.clone(),
        runs.clone(),
        sessions,
    );
    if membership.is_some() {
        service = service.keep_revocations_in(config.data_dir.join(REVOKED_CLIENTS_FILE));
    }
    let mut server = ServerBase::new(&[NodeAgentServer::<NodeAgentService>::NAME])?;
    server.routes().add_service(InterceptedService::new(
        NodeAgentServer::new(service.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
        {
            let revoked = service.revoked_clients();
            move |request| admit_caller(request, &revoked)
        },
    ));
    server
        .health()
        .set_serving::<NodeAgentServer<NodeAgentService>>()
        .await;
    tracing::info!(
        %addr,
        name = %config.name,
        isolation = ?sandbox.level(),
        layers = %sandbox.layers(),
        languages = ?service.runtimes().borrow().healthy_languages(),
        tls = membership.is_some(),
        "node agent listening"
    );
    if let Some(coordinator) = coordinator {
        let advertise = config
            .advertise
            .clone()
            .unwrap_or_else(|| registration::advertise_address(addr));
        let registration = Registration::new(
            coordinator,
            advertise,
            service.clone(),
            membership.as_ref().map(Membership::client_tls),
            link.unwrap_or_default(),
        )
        .found_as(
            config
                .coordinator
                .is_none()
                .then_some(config.discover)
                .flatten(),
        );
        tokio::spawn(registration.run(shutdown.clone()));
    }
    let stop = shutdown.clone();
    let work_root = config.dirs.work_root.clone();
    let task = tokio::spawn(async move {
        let tls = membership.as_ref().map(Membership::server_tls);
        let served = server.serve(listener, tls, stop.cancelled_owned()).await;
        runs.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, runs.wait())
            .await
            .is_err()
        {
            tracing::warn!("runs still finishing after {SHUTDOWN_GRACE:?}; leaving them");
        }
        let _ = tokio::task::spawn_blocking(move || {
            sandbox.tear_down();
            unmount_beneath(&work_root);
            let _ = std::fs::remove_dir_all(&work_root);
        })
        .await;
        tracing::info!("node agent stopped");
        served
    });
    Ok(RunningAgent {
        addr,
        shutdown,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_certificate_only_loopback_is_served_unless_told() {
        let lan: SocketAddr = "10.0.0.5:50052".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:50052".parse().unwrap();
        let refused = check_exposure(lan, false, false).unwrap_err().to_string();
        assert!(refused.contains("--join TOKEN"), "{refused}");
        assert!(check_exposure(local, false, false).is_ok());
        assert!(check_exposure(lan, true, false).is_ok());
        assert!(check_exposure(lan, false, true).is_ok());
    }

    #[test]
    fn work_roots_of_dead_agents_are_removed_and_live_ones_kept() {
        let parent = tempfile::tempdir().unwrap();
        let own = parent.path().join(format!("agent-{}", std::process::id()));
        // pid_max is at most 2^22 on Linux: this pid cannot exist.
        let dead = parent.path().join("agent-99999999");
        let unrelated = parent.path().join("keep-me");
        for dir in [&own, &dead, &unrelated] {
            std::fs::create_dir_all(dir.join("run-1")).unwrap();
        }
        remove_dead_agents_work_roots(&own);
        assert!(own.exists());
        assert!(!dead.exists());
        assert!(unrelated.exists());
    }
}
