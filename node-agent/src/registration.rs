//! Joining the cluster: one AgentRegistry.Attach stream to the coordinator, opened in the
//! background and reopened with backoff whenever it breaks, so the agent works stand-alone and
//! joins as soon as a coordinator exists; a coordinator found on the LAN is looked for there
//! again when it cannot be reached.

use std::{net::SocketAddr, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};
use kowalski_exo_common::{
    error_text::root_cause,
    proto::{
        self, AgentMessage, NodeLoad, agent_message, agent_registry_client::AgentRegistryClient,
        coordinator_message,
    },
    transport::{self, ClientTls},
};
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::{
    discovery::{self, Wanted},
    link::CoordinatorLink,
    load::LoadSampler,
    service::NodeAgentService,
};

/// Heartbeat interval used until the coordinator names its own.
const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(500);
/// While the coordinator stays unreachable, the log says so at most this often.
const UNREACHABLE_LOG_EVERY: Duration = Duration::from_secs(60);
/// Reconnect backoff bounds.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// A coordinator found on the LAN that fails this many attempts in a row is looked for again,
/// for at most `LOOK_AGAIN_FOR` each time: it may be back at another address.
const LOOK_AGAIN_AFTER: u32 = 3;
const LOOK_AGAIN_FOR: Duration = Duration::from_millis(1500);

/// The address to advertise for a listen address. An unspecified host (0.0.0.0) is kept: the
/// coordinator then dials the host the stream came from.
pub fn advertise_address(listen: SocketAddr) -> String {
    format!("http://{listen}")
}

/// When to tell the log that the coordinator cannot be reached: at the first failure, then at
/// most once a period while failures go on; a success starts over.
#[derive(Debug, Default)]
struct UnreachableLog {
    last_said: Option<Instant>,
}

impl UnreachableLog {
    fn failed(&mut self, now: Instant) -> bool {
        let say = self
            .last_said
            .is_none_or(|last| now.duration_since(last) >= UNREACHABLE_LOG_EVERY);
        if say {
            self.last_said = Some(now);
        }
        say
    }

    fn attached(&mut self) {
        self.last_said = None;
    }
}

/// The agent's side of its registry stream.
pub struct Registration {
    coordinator: String,
    advertise: String,
    service: NodeAgentService,
    /// Mutual TLS with the node's certificate, in a cluster that runs with TLS.
    tls: Option<ClientTls>,
    /// Kept across reconnects so the coordinator recognises this node.
    node_id: String,
    load: LoadSampler,
    /// What other parts of the agent send the coordinator while attached.
    link: CoordinatorLink,
    /// The coordinator was found on the LAN: what to look for when it cannot be reached.
    found_as: Option<Wanted>,
}

/// Why one registry stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("cannot reach the coordinator ({})", root_cause(.0))]
    Connect(#[from] tonic::transport::Error),
    #[error("the coordinator refused the stream: {0}")]
    Refused(#[from] tonic::Status),
    #[error("the coordinator closed the stream")]
    Closed,
}

impl Registration {
    pub fn new(
        coordinator: String,
        advertise: String,
        service: NodeAgentService,
        tls: Option<ClientTls>,
        link: CoordinatorLink,
    ) -> Self {
        Registration {
            coordinator,
            advertise,
            service,
            tls,
            node_id: String::new(),
            load: LoadSampler::default(),
            link,
            found_as: None,
        }
    }

    /// The coordinator was found on the LAN as `wanted`: look for it again when it cannot be
    /// reached (a device that came back with another address, say).
    pub fn found_as(self, wanted: Option<Wanted>) -> Self {
        Registration {
            found_as: wanted,
            ..self
        }
    }

    /// Keeps a registry stream open until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let backoff = || {
            ExponentialBuilder::default()
                .with_min_delay(RECONNECT_MIN)
                .with_max_delay(RECONNECT_MAX)
                .with_jitter()
                .without_max_times()
                .build()
        };
        let mut delays = backoff();
        let mut unreachable = UnreachableLog::default();
        let mut failed_in_a_row = 0;
        loop {
            let attached = tokio::select! {
                _ = shutdown.cancelled() => return,
                result = self.attach(&shutdown) => result,
            };
            match attached {
                Ok(true) => {
                    delays = backoff();
                    unreachable.attached();
                    failed_in_a_row = 0;
                }
                Ok(false) => return,
                Err(e) => {
                    failed_in_a_row += 1;
                    if unreachable.failed(Instant::now()) {
                        tracing::warn!(
                            coordinator = %self.coordinator,
                            "{e}; retrying in the background (said again at most once a minute)"
                        );
                    } else {
                        tracing::debug!(coordinator = %self.coordinator, error = %e, "not attached");
                    }
                }
            }
            if failed_in_a_row >= LOOK_AGAIN_AFTER {
                let moved = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    moved = self.look_again() => moved,
                };
                if moved {
                    delays = backoff();
                    continue;
                }
            }
            let delay = delays.next().unwrap_or(RECONNECT_MAX);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Looks on the LAN for the coordinator it found there before; true when it announces
    /// another address now, which the next attempt dials.
    async fn look_again(&mut self) -> bool {
        let Some(wanted) = &self.found_as else {
            return false;
        };
        match discovery::look_again(wanted, LOOK_AGAIN_FOR).await {
            Ok(Some(url)) if url != self.coordinator => {
                tracing::info!(from = %self.coordinator, to = %url, "the coordinator announces another address now");
                self.coordinator = url;
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::debug!(error = %e, "could not look for the coordinator again");
                false
            }
        }
    }

    /// One stream: register, then heartbeat until it breaks. `Ok(true)` when it was registered
    /// before it ended (so the next attempt starts with a short delay), `Ok(false)` at shutdown.
    async fn attach(&mut self, shutdown: &CancellationToken) -> Result<bool, StreamError> {
        let channel = transport::endpoint(&self.coordinator, self.tls.as_ref())?
            .connect()
            .await?;
        let mut client = AgentRegistryClient::new(channel)
            .max_decoding_message_size(kowalski_exo_common::request_size::MAX_MESSAGE_BYTES);
        let (outbound, queue) = mpsc::channel(8);
        let mut runtimes = self.service.runtimes();
        runtimes.mark_unchanged();
        let mut models = self.service.catalog().subscribe();
        models.mark_unchanged();
        let description = self.service.description();
        let register = proto::Register {
            name: description.name,
            address: self.advertise.clone(),
            labels: description.labels,
            runtimes: description.runtimes,
            capacity: description.capacity,
            version: description.version,
            isolation: description.isolation,
            isolation_layers: description.isolation_layers,
            allows_network: description.allows_network,
            node_id: self.node_id.clone(),
            models: Some(proto::ModelCatalog {
                models: description.models,
            }),
        };
        send(&outbound, agent_message::Message::Register(register)).await?;
        let mut inbound = client
            .attach(ReceiverStream::new(queue))
            .await?
            .into_inner();
        let registered = match inbound.message().await?.and_then(|m| m.message) {
            Some(coordinator_message::Message::Registered(r)) => r,
            // The coordinator answers `registered` first: anything else ends the stream.
            Some(_) | None => return Err(StreamError::Closed),
        };
        self.node_id = registered.node_id.clone();
        let interval = match registered.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT,
            ms => Duration::from_millis(ms.into()),
        };
        tracing::info!(coordinator = %self.coordinator, node_id = %self.node_id, "registered");
        let _attached = self.link.attach(outbound.clone());
        let mut ticker = tokio::time::interval(interval);
        loop {
            let changed_runtimes = tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                _ = ticker.tick() => None,
                Ok(()) = runtimes.changed() => Some(runtimes.borrow_and_update().to_proto()),
                message = inbound.message() => match message {
                    Ok(Some(proto::CoordinatorMessage {
                        message: Some(coordinator_message::Message::Revocations(revocations)),
                    })) => {
                        self.service.set_revoked_clients(revocations.client_certificates);
                        continue;
                    }
                    Ok(Some(proto::CoordinatorMessage {
                        message: Some(coordinator_message::Message::SubcallAnswer(answer)),
                    })) => {
                        self.link.answered(answer);
                        continue;
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => return Ok(true),
                    Err(status) => {
                        tracing::info!(%status, "registry stream broke");
                        return Ok(true);
                    }
                },
            };
            // Model changes (backend state, generations in flight) ride the next heartbeat.
            let changed_models = models.has_changed().unwrap_or(false).then(|| {
                models.mark_unchanged();
                proto::ModelCatalog {
                    models: self.service.catalog().offers(),
                }
            });
            let heartbeat = proto::Heartbeat {
                load: Some(self.load()),
                runtimes: changed_runtimes,
                models: changed_models,
            };
            if send(&outbound, agent_message::Message::Heartbeat(heartbeat))
                .await
                .is_err()
            {
                return Ok(true);
            }
        }
    }

    fn load(&mut self) -> NodeLoad {
        let (running, queued) = self.service.occupancy();
        let host = self.load.sample();
        NodeLoad {
            cpu_percent: host.cpu_percent,
            memory_used_bytes: host.memory_used_bytes,
            memory_total_bytes: host.memory_total_bytes,
            load_average_1m: host.load_average_1m,
            running,
            queued,
        }
    }
}

async fn send(
    outbound: &mpsc::Sender<AgentMessage>,
    message: agent_message::Message,
) -> Result<(), StreamError> {
    outbound
        .send(AgentMessage {
            message: Some(message),
        })
        .await
        .map_err(|_| StreamError::Closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_coordinator_is_logged_at_once_then_once_a_minute() {
        let start = Instant::now();
        let mut log = UnreachableLog::default();
        assert!(log.failed(start));
        assert!(!log.failed(start + Duration::from_secs(1)));
        assert!(!log.failed(start + Duration::from_millis(59_999)));
        assert!(log.failed(start + UNREACHABLE_LOG_EVERY));
        log.attached();
        assert!(log.failed(start + Duration::from_secs(61)));
    }
}
