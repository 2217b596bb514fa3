//! The Coordinator service clients call: translates requests into runs for the dispatcher and
//! its outcomes back into events.

use std::{collections::BTreeMap, pin::Pin, time::Duration};

use kowalski_exo_common::{
    Language,
    proto::{
        ClusterEvent, ClusterExecuteRequest, DrainRequest, DrainResponse, ListNodesRequest,
        ListNodesResponse, PlacementConstraints, PlanRequest, PlanResponse, RunBlocksRequest,
        coordinator_server::Coordinator,
    },
    request_size,
};
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, metadata::MetadataMap};

use crate::{
    codeblocks,
    registry::{NodeLookupError, NodeRegistry},
    scheduling::{
        dispatch::{self, Dispatcher, Outcome, RunSpec},
        document::{self, BlockDefaults},
    },
};

/// Events buffered per stream before a slow client holds the run back.
const EVENT_BUFFER: usize = 64;

type EventStream = Pin<Box<dyn Stream<Item = Result<ClusterEvent, Status>> + Send>>;

#[derive(Clone)]
pub struct ClientService {
    dispatcher: Dispatcher,
}

impl ClientService {
    pub fn new(dispatcher: Dispatcher) -> Self {
        ClientService { dispatcher }
    }

    fn registry(&self) -> &NodeRegistry {
        self.dispatcher.registry()
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

fn constraints(
    placement: Option<PlacementConstraints>,
) -> (Option<String>, BTreeMap<String, String>) {
    let placement = placement.unwrap_or_default();
    let node = (!placement.node.is_empty()).then_some(placement.node);
    (node, placement.labels.into_iter().collect())
}

#[tonic::async_trait]
impl Coordinator for ClientService {
    type ExecuteStream = EventStream;
    type RunBlocksStream = EventStream;

    async fn list_nodes(
        &self,
        _request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        Ok(Response::new(ListNodesResponse {
            nodes: self.registry().list(Instant::now()),
        }))
    }

    async fn execute(
        &self,
        request: Request<ClusterExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let deadline = deadline(request.metadata()).map(|d| Instant::now() + d);
        let request = request.into_inner();
        let execution = request
            .execution
            .ok_or_else(|| Status::invalid_argument("the request has no `execution`"))?;
        let language = Language::parse(&execution.language)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        request_size::check(&execution, request_size::MAX_CODE_BYTES)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (node, labels) = constraints(request.placement);
        let mut spec = RunSpec {
            execution,
            language,
            node,
            labels,
            max_attempts: request.max_attempts,
            block: 0,
            line: 0,
        };
        let wait = Duration::from_millis(request.wait_for_nodes_ms.into());
        self.dispatcher
            .admit(&spec, Instant::now() + wait)
            .await
            .map_err(|reason| Status::failed_precondition(reason.to_string()))?;
        // Bounded after the wait for nodes, which the client's deadline also counted.
        spec.execution.timeout_ms =
            dispatch::bounded_timeout(spec.execution.timeout_ms, document::remaining(deadline));
        let (events, stream) = mpsc::channel(EVENT_BUFFER);
        let dispatcher = self.dispatcher.clone();
        tokio::spawn(async move {
            if let Outcome::Rejected(status) = dispatcher.run(&spec, &events).await {
                let _ = events.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
    }

    async fn run_blocks(
        &self,
        request: Request<RunBlocksRequest>,
    ) -> Result<Response<Self::RunBlocksStream>, Status> {
        let deadline = deadline(request.metadata()).map(|d| Instant::now() + d);
        let request = request.into_inner();
        let blocks = codeblocks::parse(&request.document);
        let defaults = BlockDefaults {
            deadline,
            ..BlockDefaults::of(&request)
        };
        let wait = Duration::from_millis(request.wait_for_nodes_ms.into());
        let (events, stream) = mpsc::channel(EVENT_BUFFER);
        let dispatcher = self.dispatcher.clone();
        tokio::spawn(async move {
            document::run(
                &dispatcher,
                &blocks,
                &defaults,
                request.keep_going,
                wait,
                &events,
            )
            .await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
    }

    async fn plan(&self, request: Request<PlanRequest>) -> Result<Response<PlanResponse>, Status> {
        let request = request.into_inner();
        let defaults = BlockDefaults::of(&RunBlocksRequest {
            placement: request.placement,
            ..Default::default()
        });
        let blocks = document::plan(
            &self.dispatcher,
            &codeblocks::parse(&request.document),
            &defaults,
        );
        Ok(Response::new(PlanResponse { blocks }))
    }

    async fn drain(
        &self,
        request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        self.set_draining(request.into_inner(), true)
    }

    async fn undrain(
        &self,
        request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        self.set_draining(request.into_inner(), false)
    }
}

impl ClientService {
    fn set_draining(
        &self,
        request: DrainRequest,
        draining: bool,
    ) -> Result<Response<DrainResponse>, Status> {
        let node = self
            .registry()
            .set_draining(&request.node, draining, Instant::now())
            .map_err(|e| match e {
                NodeLookupError::Unknown(_) => Status::not_found(e.to_string()),
                NodeLookupError::Ambiguous(_) => Status::invalid_argument(e.to_string()),
            })?;
        Ok(Response::new(DrainResponse { node: Some(node) }))
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
