//! The Coordinator service clients call.

use std::time::Instant;

use kowalski_exo_common::proto::{
    ListNodesRequest, ListNodesResponse, coordinator_server::Coordinator,
};
use tonic::{Request, Response, Status};

use crate::registry::NodeRegistry;

#[derive(Clone)]
pub struct ClientService {
    registry: NodeRegistry,
}

impl ClientService {
    pub fn new(registry: NodeRegistry) -> Self {
        ClientService { registry }
    }
}

#[tonic::async_trait]
impl Coordinator for ClientService {
    async fn list_nodes(
        &self,
        _request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        Ok(Response::new(ListNodesResponse {
            nodes: self.registry.list(Instant::now()),
        }))
    }
}
