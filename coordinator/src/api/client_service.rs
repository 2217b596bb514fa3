//! The Coordinator gRPC service clients call: translates between the wire and the
//! [`ClusterService`], which does the work.

use std::{pin::Pin, time::Duration};

use kowalski_exo_common::proto::{
    AskEvent, AskRequest, ChatEvent, ChatRequest, CloseSessionRequest, ClusterEvent,
    ClusterExecuteRequest, ClusterOpenSessionRequest, ClusterSessionExecuteRequest,
    ClusterSessionInfo, DrainRequest, DrainResponse, ListClusterSessionsResponse,
    ListModelsRequest, ListModelsResponse, ListNodesRequest, ListNodesResponse,
    ListSessionsRequest, PlanRequest, PlanResponse, RunBlocksRequest,
    coordinator_server::Coordinator,
};
use tokio::time::Instant;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, metadata::MetadataMap};

use crate::service::ClusterService;

type EventStream = Pin<Box<dyn Stream<Item = Result<ClusterEvent, Status>> + Send>>;
type ChatStream = Pin<Box<dyn Stream<Item = Result<ChatEvent, Status>> + Send>>;

#[derive(Clone)]
pub struct ClientService {
    cluster: ClusterService,
}

impl ClientService {
    pub fn new(cluster: ClusterService) -> Self {
        ClientService { cluster }
    }
}

/// The client's gRPC deadline (`grpc-timeout`), so the run on the agent ends with it.
fn deadline(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// When the client's deadline passes, counted from now.
fn deadline_at(metadata: &MetadataMap) -> Option<Instant> {
    deadline(metadata).map(|d| Instant::now() + d)
}

#[tonic::async_trait]
impl Coordinator for ClientService {
    type ExecuteStream = EventStream;
    type RunBlocksStream = EventStream;
    type ChatStream = ChatStream;
    type ExecuteInSessionStream = EventStream;
    type AskStream = Pin<Box<dyn Stream<Item = Result<AskEvent, Status>> + Send>>;

    async fn list_nodes(
        &self,
        _request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        Ok(Response::new(ListNodesResponse {
            nodes: self.cluster.list_nodes(),
        }))
    }

    async fn execute(
        &self,
        request: Request<ClusterExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let deadline = deadline_at(request.metadata());
        let events = self.cluster.execute(request.into_inner(), deadline).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(events))))
    }

    async fn run_blocks(
        &self,
        request: Request<RunBlocksRequest>,
    ) -> Result<Response<Self::RunBlocksStream>, Status> {
        let deadline = deadline_at(request.metadata());
        let events = self.cluster.run_blocks(request.into_inner(), deadline);
        Ok(Response::new(Box::pin(ReceiverStream::new(events))))
    }

    async fn plan(&self, request: Request<PlanRequest>) -> Result<Response<PlanResponse>, Status> {
        let request = request.into_inner();
        let blocks = self.cluster.plan(&request.document, request.placement);
        Ok(Response::new(PlanResponse { blocks }))
    }

    async fn drain(
        &self,
        request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        let node = self
            .cluster
            .set_draining(&request.into_inner().node, true)?;
        Ok(Response::new(DrainResponse { node: Some(node) }))
    }

    async fn undrain(
        &self,
        request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        let node = self
            .cluster
            .set_draining(&request.into_inner().node, false)?;
        Ok(Response::new(DrainResponse { node: Some(node) }))
    }

    async fn list_models(
        &self,
        _request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        Ok(Response::new(ListModelsResponse {
            models: self.cluster.list_models(),
        }))
    }

    async fn chat(
        &self,
        request: Request<ChatRequest>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        let deadline = deadline_at(request.metadata());
        let events = self.cluster.chat(request.into_inner(), deadline)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(events))))
    }

    async fn open_session(
        &self,
        request: Request<ClusterOpenSessionRequest>,
    ) -> Result<Response<ClusterSessionInfo>, Status> {
        let info = self.cluster.sessions().open(request.into_inner()).await?;
        Ok(Response::new(info))
    }

    async fn execute_in_session(
        &self,
        request: Request<ClusterSessionExecuteRequest>,
    ) -> Result<Response<Self::ExecuteInSessionStream>, Status> {
        let events = self.cluster.sessions().execute(request.into_inner())?;
        Ok(Response::new(Box::pin(ReceiverStream::new(events))))
    }

    async fn close_session(
        &self,
        request: Request<CloseSessionRequest>,
    ) -> Result<Response<ClusterSessionInfo>, Status> {
        let name = request.into_inner().session_id;
        Ok(Response::new(self.cluster.sessions().close(&name).await?))
    }

    async fn list_sessions(
        &self,
        _request: Request<ListSessionsRequest>,
    ) -> Result<Response<ListClusterSessionsResponse>, Status> {
        Ok(Response::new(ListClusterSessionsResponse {
            sessions: self.cluster.sessions().list(),
        }))
    }

    async fn ask(&self, request: Request<AskRequest>) -> Result<Response<Self::AskStream>, Status> {
        let deadline = deadline_at(request.metadata());
        let events = self.cluster.ask(request.into_inner(), deadline)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(events))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_is_read() {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", "1500m".parse().unwrap());
        let deadline = deadline(&metadata);
        assert_eq!(deadline, Some(Duration::from_millis(1500)));
    }
}
