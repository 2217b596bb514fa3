//! How dispatch and inference reach node agents. The product speaks gRPC ([`GrpcAgents`]); the trait is the
//! boundary that lets dispatch be tested with agents that are just scripted streams.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
};

use kowalski_exo_common::{
    proto::{
        CloseSessionRequest, CountTokensRequest, ExecEvent, ExecuteRequest, GenerateEvent,
        GenerateRequest, OpenSessionRequest, SessionExecuteRequest, SessionInfo,
        node_agent_client::NodeAgentClient,
    },
    security::node_dns_name,
    transport::{self, ClientTls},
};
use tokio_stream::Stream;
use tonic::{Status, transport::Channel};

use super::failover::Attempt;

/// The events of one run on an agent.
pub type ExecStream = Pin<Box<dyn Stream<Item = Result<ExecEvent, Status>> + Send>>;

/// The events of one generation on an agent.
pub type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateEvent, Status>> + Send>>;

/// Starts runs and generations on the agent an attempt goes to.
#[tonic::async_trait]
pub trait AgentConnector: Send + Sync + 'static {
    /// Calls `NodeAgent.Execute` on the attempt's agent.
    async fn execute(&self, agent: &Attempt, request: ExecuteRequest)
    -> Result<ExecStream, Status>;

    /// Calls `NodeAgent.Generate` on the attempt's agent.
    async fn generate(
        &self,
        agent: &Attempt,
        request: GenerateRequest,
    ) -> Result<GenerateStream, Status>;

    /// Calls `NodeAgent.CountTokens` on the attempt's agent.
    async fn count_tokens(
        &self,
        agent: &Attempt,
        request: CountTokensRequest,
    ) -> Result<Vec<u64>, Status>;

    /// Calls `NodeAgent.OpenSession` on the attempt's agent.
    async fn open_session(
        &self,
        agent: &Attempt,
        request: OpenSessionRequest,
    ) -> Result<SessionInfo, Status>;

    /// Calls `NodeAgent.ExecuteInSession` on the attempt's agent.
    async fn execute_in_session(
        &self,
        agent: &Attempt,
        request: SessionExecuteRequest,
    ) -> Result<ExecStream, Status>;

    /// Calls `NodeAgent.CloseSession` on the attempt's agent.
    async fn close_session(&self, agent: &Attempt, session_id: &str) -> Result<(), Status>;
}

/// gRPC channels to agents, one per address and node, connected lazily and reused. With TLS,
/// each agent must prove it is the node placement chose, by its node certificate.
#[derive(Clone, Default)]
pub struct GrpcAgents {
    channels: Arc<Mutex<HashMap<(String, String), Channel>>>,
    tls: Option<ClientTls>,
}

impl GrpcAgents {
    /// Agents reached over mutual TLS as `tls` says.
    pub fn with_tls(tls: ClientTls) -> Self {
        GrpcAgents {
            channels: Arc::default(),
            tls: Some(tls),
        }
    }

    fn client(&self, agent: &Attempt) -> Result<NodeAgentClient<Channel>, Status> {
        let key = (agent.address.clone(), agent.node_name.clone());
        let mut channels = self.channels.lock().expect("channel cache poisoned");
        if let Some(channel) = channels.get(&key) {
            return Ok(NodeAgentClient::new(channel.clone()));
        }
        let tls = self.tls.as_ref().map(|tls| ClientTls {
            server_name: Some(node_dns_name(&agent.node_name)),
            ..tls.clone()
        });
        let address = &agent.address;
        let channel = transport::endpoint(address, tls.as_ref())
            .map_err(|e| {
                Status::unavailable(format!("node address '{address}' is not usable: {e}"))
            })?
            .connect_lazy();
        channels.insert(key, channel.clone());
        Ok(NodeAgentClient::new(channel))
    }
}

#[tonic::async_trait]
impl AgentConnector for GrpcAgents {
    async fn execute(
        &self,
        agent: &Attempt,
        request: ExecuteRequest,
    ) -> Result<ExecStream, Status> {
        let mut client = self.client(agent)?;
        let stream = client.execute(request).await?.into_inner();
        Ok(Box::pin(stream))
    }

    async fn generate(
        &self,
        agent: &Attempt,
        request: GenerateRequest,
    ) -> Result<GenerateStream, Status> {
        let mut client = self.client(agent)?;
        let stream = client.generate(request).await?.into_inner();
        Ok(Box::pin(stream))
    }

    async fn count_tokens(
        &self,
        agent: &Attempt,
        request: CountTokensRequest,
    ) -> Result<Vec<u64>, Status> {
        let counted = self.client(agent)?.count_tokens(request).await?;
        Ok(counted.into_inner().counts)
    }

    async fn open_session(
        &self,
        agent: &Attempt,
        request: OpenSessionRequest,
    ) -> Result<SessionInfo, Status> {
        Ok(self
            .client(agent)?
            .open_session(request)
            .await?
            .into_inner())
    }

    async fn execute_in_session(
        &self,
        agent: &Attempt,
        request: SessionExecuteRequest,
    ) -> Result<ExecStream, Status> {
        let mut client = self.client(agent)?;
        let stream = client.execute_in_session(request).await?.into_inner();
        Ok(Box::pin(stream))
    }

    async fn close_session(&self, agent: &Attempt, session_id: &str) -> Result<(), Status> {
        self.client(agent)?
            .close_session(CloseSessionRequest {
                session_id: session_id.to_string(),
            })
            .await?;
        Ok(())
    }
}
