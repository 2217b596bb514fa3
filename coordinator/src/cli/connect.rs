//! Reaching a coordinator for a client subcommand: the one at `--addr`, or with `--local` an
//! in-process coordinator and agent on loopback ports the OS picks, stopped afterwards.

use std::{path::PathBuf, time::Duration};

use kowalski_exo_common::{
    cli_args,
    error_text::{error_chain, root_cause},
    proto::coordinator_client::CoordinatorClient,
    telemetry,
    transport::{self, ClientTls},
};
use kowalski_exo_node_agent::AgentConfig;
use tonic::{
    Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

use super::Failure;
use crate::server::{self, CoordinatorConfig, RunningCoordinator};

/// How long `--local` waits for its agent to join.
const LOCAL_JOIN_TIMEOUT: Duration = Duration::from_secs(20);

/// The agent of a one-process cluster (`serve --local-agent`, `--local`).
pub fn local_agent_config() -> AgentConfig {
    AgentConfig {
        name: "local".into(),
        listen: "127.0.0.1:0".into(),
        ..AgentConfig::default()
    }
}

/// Which coordinator a client command talks to, and how.
#[derive(Clone, Debug, Default)]
pub struct Dial {
    /// `http://HOST:PORT` (or `https://`).
    pub addr: String,
    /// Start an in-process coordinator and agent instead.
    pub local: bool,
    /// The cluster authority's certificate, to reach a coordinator that runs with TLS.
    pub ca: Option<PathBuf>,
    /// The API key such a coordinator asks for.
    pub api_key: Option<String>,
}

/// A client of the coordinator, each call carrying the API key when there is one.
pub type Client = CoordinatorClient<InterceptedService<Channel, WithKey>>;

/// Adds `authorization: Bearer KEY` to every call.
#[derive(Clone)]
pub struct WithKey(Option<MetadataValue<Ascii>>);

impl WithKey {
    fn new(key: Option<&str>) -> Result<Self, Failure> {
        key.map(|key| {
            format!("Bearer {}", key.trim())
                .parse()
                .map_err(|_| Failure::usage("--api-key holds characters no key has"))
        })
        .transpose()
        .map(WithKey)
    }
}

impl Interceptor for WithKey {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl Dial {
    fn tls(&self) -> Result<Option<ClientTls>, Failure> {
        let Some(ca) = &self.ca else {
            if self.addr.starts_with("https://") {
                return Err(Failure::usage(format!(
                    "{} runs with TLS: pass --ca FILE (the cluster authority, `authority.pem` in the coordinator's data directory, or KOWALSKI_CA)",
                    self.addr
                )));
            }
            return Ok(None);
        };
        let authority_pem = std::fs::read_to_string(ca)
            .map_err(|e| Failure::usage(format!("--ca {}: {e}", ca.display())))?;
        Ok(Some(ClientTls {
            authority_pem,
            identity: None,
            server_name: None,
        }))
    }
}

/// True when `url` (`http://HOST:PORT`) names this machine.
fn dials_loopback(url: &str) -> bool {
    cli_args::is_loopback(cli_args::url_host_port(url))
}

/// Connects to the coordinator `dial` names (or a local cluster), runs `command` with the
/// client and the address it dialled, and stops the local cluster.
pub async fn with_client<F, Fut>(dial: &Dial, command: F) -> Result<u8, Failure>
where
    F: FnOnce(Client, String) -> Fut,
    Fut: Future<Output = Result<u8, Failure>>,
{
    let tls = if dial.local { None } else { dial.tls()? };
    if tls.is_none() && dial.api_key.is_some() && !dial.local && !dials_loopback(&dial.addr) {
        return Err(Failure::usage(format!(
            "not sending the API key in plaintext to {}: pass --ca FILE (the coordinator's authority.pem) so it goes over TLS",
            dial.addr
        )));
    }
    let key = WithKey::new(dial.api_key.as_deref())?;
    let local = if dial.local {
        Some(start_local().await?)
    } else {
        None
    };
    let addr = match &local {
        Some(cluster) => format!("http://{}", cluster.addr),
        None => dial.addr.clone(),
    };
    let channel = match transport::endpoint(&addr, tls.as_ref()) {
        Ok(endpoint) => endpoint.connect().await,
        Err(e) => Err(e),
    };
    let result = match channel {
        Ok(channel) => command(CoordinatorClient::with_interceptor(channel, key), addr).await,
        Err(e) => Err(Failure::infrastructure(format!(
            "cannot reach the coordinator at {addr} ({}); start one with `coordinator serve`, or pass --local",
            root_cause(&e)
        ))),
    };
    if let Some(cluster) = local {
        let _ = cluster.stop().await;
    }
    result
}

/// An in-process coordinator with one agent, on loopback ports the OS picks.
async fn start_local() -> Result<RunningCoordinator, Failure> {
    if std::env::var_os("RUST_LOG").is_some() {
        telemetry::init();
    }
    let cluster = server::start(CoordinatorConfig {
        http: Some("127.0.0.1:0".into()),
        local_agent: Some(local_agent_config()),
        ..CoordinatorConfig::new("127.0.0.1:0")
    })
    .await
    .map_err(|e| {
        Failure::infrastructure(format!(
            "cannot start the local cluster: {}",
            error_chain(&e)
        ))
    })?;
    let started = tokio::time::Instant::now();
    while !cluster
        .registry
        .list(tokio::time::Instant::now())
        .iter()
        .any(|n| n.state == "ready")
    {
        if started.elapsed() > LOCAL_JOIN_TIMEOUT {
            let _ = cluster.stop().await;
            return Err(Failure::infrastructure(format!(
                "the local agent did not join within {LOCAL_JOIN_TIMEOUT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(cluster)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_is_not_sent_in_plaintext_off_this_machine() {
        let dial = Dial {
            addr: "http://10.0.0.5:50051".into(),
            api_key: Some("kxk_secret".into()),
            ..Dial::default()
        };
        let refused = with_client(&dial, |_, _| async { Ok(0) })
            .await
            .unwrap_err();
        assert_eq!(refused.status, kowalski_exo_common::exit::USAGE);
        assert!(
            refused.message.contains("pass --ca FILE"),
            "{}",
            refused.message
        );
        assert!(dials_loopback("http://127.0.0.1:50051"));
        assert!(dials_loopback("http://localhost:50051"));
        assert!(!dials_loopback("http://10.0.0.5:50051"));
    }
}
