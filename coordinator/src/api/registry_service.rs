//! AgentRegistry: Attach, whose first message registers, then every message counts as a sign
//! of life until the stream closes; and Join, by which a device gets its node certificate in a
//! cluster that runs with TLS. There, a node attaches only with its certificate, under the name
//! the certificate carries, with an id derived from it.

use std::pin::Pin;

use std::{sync::Arc, time::Duration};

use kowalski_exo_common::{
    proto::{
        AgentMessage, CoordinatorMessage, JoinRequest, JoinResponse, Registered, Revocations,
        agent_message, agent_registry_server::AgentRegistry, coordinator_message,
    },
    security::{Peer, Role},
};
use tokio::{sync::mpsc, task::JoinSet, time::Instant};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use kowalski_exo_common::security::trust::{ClusterTrust, Refused};

use crate::{error::CoordinatorError, registry::NodeRegistry, sessions::SubcallRelay};

#[derive(Clone)]
pub struct RegistryService {
    registry: NodeRegistry,
    /// Ends every agent stream when the coordinator shuts down (agents then reconnect to the
    /// next coordinator by themselves).
    shutdown: CancellationToken,
    /// The cluster's authority, when the coordinator runs with TLS.
    trust: Option<Arc<ClusterTrust>>,
    /// Answers the sub-calls of code in sessions.
    relay: SubcallRelay,
}

impl RegistryService {
    pub fn new(
        registry: NodeRegistry,
        shutdown: CancellationToken,
        trust: Option<Arc<ClusterTrust>>,
        relay: SubcallRelay,
    ) -> Self {
        RegistryService {
            registry,
            shutdown,
            trust,
            relay,
        }
    }

    /// With TLS, the node the request's certificate names, if it may attach: checked before
    /// the stream says anything.
    fn admit(
        &self,
        peer: Option<Result<Peer, kowalski_exo_common::security::TlsError>>,
    ) -> Result<Option<Peer>, Status> {
        let Some(trust) = &self.trust else {
            return Ok(None);
        };
        let peer = match peer {
            Some(Ok(peer)) if peer.role == Role::Node => peer,
            Some(Ok(peer)) => {
                return Err(Status::permission_denied(format!(
                    "'{}' holds a {} certificate, not a node's",
                    peer.name,
                    peer.role.name()
                )));
            }
            Some(Err(e)) => return Err(Status::permission_denied(e.to_string())),
            None => {
                return Err(Status::unauthenticated(
                    "this coordinator runs with TLS: a node attaches with its certificate; join once with `node-agent --join TOKEN` (`coordinator token` prints one)",
                ));
            }
        };
        trust
            .check_node(&peer)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        Ok(Some(peer))
    }

    /// The revoked client certificates, when they differ from `sent` (then remembered there).
    fn revocations_news(&self, sent: &mut Option<Vec<String>>) -> Option<CoordinatorMessage> {
        let trust = self.trust.as_ref()?;
        let revoked = match trust.revoked_clients() {
            Ok(revoked) => revoked,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the revoked client certificates");
                return None;
            }
        };
        if sent.as_ref() == Some(&revoked) {
            return None;
        }
        *sent = Some(revoked.clone());
        Some(CoordinatorMessage {
            message: Some(coordinator_message::Message::Revocations(Revocations {
                client_certificates: revoked,
            })),
        })
    }

    /// Whether the certificate `peer` attached with is still in force (not revoked since).
    fn still_admitted(&self, peer: &Option<Peer>) -> Result<(), Status> {
        match (&self.trust, peer) {
            (Some(trust), Some(peer)) => trust
                .check_node(peer)
                .map_err(|e| Status::permission_denied(e.to_string())),
            _ => Ok(()),
        }
    }
}

/// A stream that has not registered within this is closed.
const FIRST_MESSAGE: Duration = Duration::from_secs(10);
/// How often an attached node's certificate is checked against revocations (and the revoked
/// client certificates sent again when they changed).
const REVOCATION_CHECK: Duration = Duration::from_secs(2);

type CommandStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentRegistry for RegistryService {
    type AttachStream = CommandStream;

    async fn attach(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let peer = request.remote_addr();
        let node = self.admit(Peer::of(&request))?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(FIRST_MESSAGE, inbound.message())
            .await
            .map_err(|_| CoordinatorError::Registration("no registration within the first 10 s"))??
            .and_then(|m| m.message)
            .ok_or(CoordinatorError::Registration(
                "the stream closed before registering",
            ))?;
        let agent_message::Message::Register(mut registration) = first else {
            return Err(CoordinatorError::Registration(
                "the first message on an Attach stream must be `register`",
            )
            .into());
        };
        if registration.name.is_empty() {
            return Err(
                CoordinatorError::Registration("registration has an empty node name").into(),
            );
        }
        if let Some(node) = &node {
            if node.name != registration.name {
                return Err(Status::permission_denied(format!(
                    "this node's certificate is for '{}', not '{}'",
                    node.name, registration.name
                )));
            }
            // The id is the certificate's, whatever the node says.
            registration.node_id = format!("node-{}", &node.fingerprint[..12]);
        }
        registration.address = dial_address(&registration.address, peer);
        let name = registration.name.clone();
        let (node_id, stream_number) = self.registry.register(registration, Instant::now());
        tracing::info!(%node_id, %name, "node registered");
        let (commands, stream) = mpsc::channel(8);
        let _ = commands
            .send(Ok(CoordinatorMessage {
                message: Some(coordinator_message::Message::Registered(Registered {
                    node_id: node_id.clone(),
                    heartbeat_interval_ms: self.registry.config().heartbeat_interval.as_millis()
                        as u32,
                })),
            }))
            .await;
        let registry = self.registry.clone();
        let shutdown = self.shutdown.clone();
        let service = self.clone();
        let mut revocations_sent = None;
        if let Some(news) = self.revocations_news(&mut revocations_sent) {
            let _ = commands.send(Ok(news)).await;
        }
        tokio::spawn(async move {
            let mut recheck = tokio::time::interval(REVOCATION_CHECK);
            // The node's sub-calls being answered: dropped with the stream, as the agent fails
            // the calls still waiting when its stream breaks, so their answers would go nowhere.
            let mut subcalls = JoinSet::new();
            loop {
                while subcalls.try_join_next().is_some() {}
                let message = tokio::select! {
                    message = inbound.message() => message,
                    _ = shutdown.cancelled() => break,
                    _ = recheck.tick() => {
                        if let Err(revoked) = service.still_admitted(&node) {
                            tracing::warn!(%node_id, %name, "closing the stream of a revoked node");
                            let _ = commands.send(Err(revoked)).await;
                            break;
                        }
                        if let Some(news) = service.revocations_news(&mut revocations_sent) {
                            let _ = commands.send(Ok(news)).await;
                        }
                        continue;
                    }
                };
                match message {
                    Ok(Some(AgentMessage {
                        message: Some(agent_message::Message::Heartbeat(heartbeat)),
                    })) => registry.heartbeat(&node_id, stream_number, heartbeat, Instant::now()),
                    Ok(Some(AgentMessage {
                        message: Some(agent_message::Message::Subcall(call)),
                    })) => {
                        let (relay, commands) = (service.relay.clone(), commands.clone());
                        let node_id = node_id.clone();
                        subcalls.spawn(async move {
                            let answer = relay.answer(call, &node_id).await;
                            let _ = commands
                                .send(Ok(CoordinatorMessage {
                                    message: Some(coordinator_message::Message::SubcallAnswer(
                                        answer,
                                    )),
                                }))
                                .await;
                        });
                    }
                    Ok(Some(_)) => {
                        tracing::warn!(%node_id, "ignoring a second registration on one stream")
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            registry.stream_closed(&node_id, stream_number, Instant::now());
            if !subcalls.is_empty() {
                tracing::info!(%node_id, calls = subcalls.len(), "cancelling the sub-calls of a node whose stream closed");
            }
            drop(subcalls);
            tracing::info!(%node_id, %name, "node stream closed");
            drop(commands);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let Some(trust) = &self.trust else {
            return Err(Status::failed_precondition(
                "this coordinator runs without TLS: agents attach with no token",
            ));
        };
        let request = request.into_inner();
        if request.name.is_empty() {
            return Err(Status::invalid_argument("a joining node needs a name"));
        }
        let chain = trust
            .join(&request.token_secret, &request.name, &request.csr_pem)
            .map_err(|e| match e {
                Refused::WrongToken | Refused::Revoked(_) => {
                    Status::permission_denied(e.to_string())
                }
                Refused::Taken { .. } => Status::already_exists(e.to_string()),
                Refused::Tls(_) | Refused::BadName(_) => Status::invalid_argument(e.to_string()),
            })?;
        tracing::info!(node = %request.name, "node joined");
        Ok(Response::new(JoinResponse {
            certificate_chain_pem: chain,
            authority_pem: trust.authority_pem().to_string(),
        }))
    }
}

/// An agent listening on an unspecified host (0.0.0.0) is dialled at the address its stream
/// came from, on the port it advertised.
fn dial_address(advertised: &str, peer: Option<std::net::SocketAddr>) -> String {
    let Some(peer) = peer else {
        return advertised.to_string();
    };
    let rest = advertised.strip_prefix("http://").unwrap_or(advertised);
    match rest.parse::<std::net::SocketAddr>() {
        Ok(addr) if addr.ip().is_unspecified() => {
            format!(
                "http://{}",
                std::net::SocketAddr::new(peer.ip(), addr.port())
            )
        }
        _ => advertised.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::dial_address;

    #[test]
    fn unspecified_host_takes_the_peer_address() {
        let peer = Some("192.0.2.7:41000".parse().unwrap());
        assert_eq!(
            dial_address("http://0.0.0.0:50052", peer),
            "http://192.0.2.7:50052"
        );
        assert_eq!(
            dial_address("http://10.1.1.1:50052", peer),
            "http://10.1.1.1:50052"
        );
        assert_eq!(
            dial_address("http://0.0.0.0:50052", None),
            "http://0.0.0.0:50052"
        );
    }
}
