//! How dispatch and inference reach node agents. The product speaks gRPC ([`GrpcAgents`]); the trait is the
//! boundary that lets dispatch be tested with agents that are just scripted streams.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
};

use kowalski_exo_common::{
    proto::{
        ExecEvent, ExecuteRequest, GenerateEvent, GenerateRequest,
        node_agent_client::NodeAgentClient,
    },
    transport,
};
use tokio_stream::Stream;
use tonic::{Status, transport::Channel};

/// The events of one run on an agent.
pub type ExecStream = Pin<Box<dyn Stream<Item = Result<ExecEvent, Status>> + Send>>;

/// The events of one generation on an agent.
pub type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateEvent, Status>> + Send>>;

/// Starts runs and generations on agents by address.
#[tonic::async_trait]
pub trait AgentConnector: Send + Sync + 'static {
    /// Calls `NodeAgent.Execute` on the agent at `address`.
    async fn execute(&self, address: &str, request: ExecuteRequest) -> Result<ExecStream, Status>;

    /// Calls `NodeAgent.Generate` on the agent at `address`.
    async fn generate(
        &self,
        address: &str,
        request: GenerateRequest,
    ) -> Result<GenerateStream, Status>;
}

/// gRPC channels to agents, one per address, connected lazily and reused.
#[derive(Clone, Default)]
pub struct GrpcAgents {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl GrpcAgents {
    fn client(&self, address: &str) -> Result<NodeAgentClient<Channel>, Status> {
        let mut channels = self.channels.lock().expect("channel cache poisoned");
        if let Some(channel) = channels.get(address) {
            return Ok(NodeAgentClient::new(channel.clone()));
        }
        let channel = transport::endpoint(address)
            .map_err(|e| {
                Status::unavailable(format!("node address '{address}' is not a URL: {e}"))
            })?
            .connect_lazy();
        channels.insert(address.to_string(), channel.clone());
        Ok(NodeAgentClient::new(channel))
    }
}

#[tonic::async_trait]
impl AgentConnector for GrpcAgents {
    async fn execute(&self, address: &str, request: ExecuteRequest) -> Result<ExecStream, Status> {
        let mut client = self.client(address)?;
        let stream = client.execute(request).await?.into_inner();
        Ok(Box::pin(stream))
    }

    async fn generate(
        &self,
        address: &str,
        request: GenerateRequest,
    ) -> Result<GenerateStream, Status> {
        let mut client = self.client(address)?;
        let stream = client.generate(request).await?.into_inner();
        Ok(Box::pin(stream))
    }
}
