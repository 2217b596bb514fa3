//! AgentRegistry.Attach: the first message registers, then every message counts as a sign of
//! life until the stream closes.

use std::pin::Pin;

use kowalski_exo_common::proto::{
    AgentMessage, CoordinatorMessage, Registered, agent_message,
    agent_registry_server::AgentRegistry, coordinator_message,
};
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::{error::CoordinatorError, registry::NodeRegistry};

#[derive(Clone)]
pub struct RegistryService {
    registry: NodeRegistry,
    /// Ends every agent stream when the coordinator shuts down (agents then reconnect to the
    /// next coordinator by themselves).
    shutdown: CancellationToken,
}

impl RegistryService {
    pub fn new(registry: NodeRegistry, shutdown: CancellationToken) -> Self {
        RegistryService { registry, shutdown }
    }
}

type CommandStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentRegistry for RegistryService {
    type AttachStream = CommandStream;

    async fn attach(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.and_then(|m| m.message).ok_or(
            CoordinatorError::Registration("the stream closed before registering"),
        )?;
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
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    message = inbound.message() => message,
                    _ = shutdown.cancelled() => break,
                };
                match message {
                    Ok(Some(AgentMessage {
                        message: Some(agent_message::Message::Heartbeat(heartbeat)),
                    })) => registry.heartbeat(&node_id, stream_number, heartbeat, Instant::now()),
                    Ok(Some(_)) => {
                        tracing::warn!(%node_id, "ignoring a second registration on one stream")
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            registry.stream_closed(&node_id, stream_number, Instant::now());
            tracing::info!(%node_id, %name, "node stream closed");
            drop(commands);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
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
