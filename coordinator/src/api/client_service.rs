//! The Coordinator service clients call: translates requests into runs for the dispatcher and
//! its outcomes back into events.

use std::{collections::BTreeMap, pin::Pin, time::Duration};

use kowalski_exo_common::{
    Language,
    proto::{
        BlockSkipped, ClusterEvent, ClusterExecuteRequest, ClusterFinished, DrainRequest,
        DrainResponse, ExecStatus, ExecuteRequest, ListNodesRequest, ListNodesResponse,
        PlacementConstraints, PlanRequest, PlanResponse, PlannedBlock, RunBlocksRequest,
        cluster_event::Event, coordinator_server::Coordinator,
    },
};
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, metadata::MetadataMap};

use crate::{
    codeblocks::{self, CodeBlock},
    registry::{NodeLookupError, NodeRegistry},
    scheduling::{
        dispatch::{Dispatcher, Outcome, RunSpec},
        placement::{Requirements, place},
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

/// Time kept between the run's timeout and the client's deadline, so the `finished` event (with
/// its timeout status) reaches the client before its deadline cuts the stream.
const DEADLINE_MARGIN: Duration = Duration::from_millis(200);

/// The run's timeout, shortened to just inside the client's deadline when that comes first.
fn bounded_timeout(timeout_ms: u32, deadline: Option<Duration>) -> u32 {
    match deadline {
        Some(deadline) => {
            let inside = deadline.saturating_sub(DEADLINE_MARGIN.min(deadline / 2));
            let deadline_ms = inside.as_millis().clamp(1, u128::from(u32::MAX)) as u32;
            if timeout_ms == 0 {
                deadline_ms
            } else {
                timeout_ms.min(deadline_ms)
            }
        }
        None => timeout_ms,
    }
}

fn constraints(
    placement: Option<PlacementConstraints>,
) -> (Option<String>, BTreeMap<String, String>) {
    let placement = placement.unwrap_or_default();
    let node = (!placement.node.is_empty()).then_some(placement.node);
    (node, placement.labels.into_iter().collect())
}

/// The run for a block, with the block's attributes over the request's defaults.
fn block_spec(
    block: &CodeBlock,
    request: &RunBlocksRequest,
    deadline: Option<Duration>,
) -> Option<RunSpec> {
    let language = block.language?;
    let (node, mut labels) = constraints(request.placement.clone());
    labels.extend(block.attributes.labels.clone());
    let timeout_ms = block
        .attributes
        .timeout_seconds
        .map_or(request.timeout_ms, |s| s.saturating_mul(1000));
    Some(RunSpec {
        execution: ExecuteRequest {
            language: language.name().to_string(),
            code: block.code.clone(),
            timeout_ms: bounded_timeout(timeout_ms, deadline),
            limits: request.limits,
            ..Default::default()
        },
        language,
        node: block.attributes.node.clone().or(node),
        labels,
        max_attempts: request.max_attempts,
        block: block.index as u32,
    })
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
        let deadline = deadline(request.metadata());
        let request = request.into_inner();
        let mut execution = request
            .execution
            .ok_or_else(|| Status::invalid_argument("the request has no `execution`"))?;
        let language = Language::parse(&execution.language)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        execution.timeout_ms = bounded_timeout(execution.timeout_ms, deadline);
        let (node, labels) = constraints(request.placement);
        let spec = RunSpec {
            execution,
            language,
            node,
            labels,
            max_attempts: request.max_attempts,
            block: 0,
        };
        self.dispatcher
            .check(&spec)
            .map_err(|reason| Status::failed_precondition(reason.to_string()))?;
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
        let deadline = deadline(request.metadata());
        let request = request.into_inner();
        let blocks = codeblocks::parse(&request.document);
        let (events, stream) = mpsc::channel(EVENT_BUFFER);
        let dispatcher = self.dispatcher.clone();
        tokio::spawn(async move {
            for block in &blocks {
                let skip = |reason: String, no_node: bool| ClusterEvent {
                    block: block.index as u32,
                    event: Some(Event::Skipped(BlockSkipped {
                        line: block.line as u32,
                        reason,
                        no_node,
                    })),
                };
                if let Some(problem) = &block.problem {
                    if events.send(Ok(skip(problem.clone(), false))).await.is_err() {
                        return;
                    }
                    continue;
                }
                let Some(spec) = block_spec(block, &request, deadline) else {
                    continue;
                };
                if let Err(reason) = dispatcher.check(&spec) {
                    if events
                        .send(Ok(skip(reason.to_string(), true)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
                let succeeded = match dispatcher.run(&spec, &events).await {
                    Outcome::Finished(result) => result.status() == ExecStatus::Ok,
                    Outcome::Cancelled => return,
                    Outcome::Failed(_) => false,
                    Outcome::Rejected(status) => {
                        // Reported as this block's end, so the document can go on.
                        let finished = ClusterEvent {
                            block: block.index as u32,
                            event: Some(Event::Finished(ClusterFinished {
                                error: format!("rejected: {}", status.message()),
                                ..Default::default()
                            })),
                        };
                        if events.send(Ok(finished)).await.is_err() {
                            return;
                        }
                        false
                    }
                };
                if !succeeded && !request.keep_going {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
    }

    async fn plan(&self, request: Request<PlanRequest>) -> Result<Response<PlanResponse>, Status> {
        let request = request.into_inner();
        let (node, labels) = constraints(request.placement);
        let candidates = self.registry().candidates(Instant::now());
        let blocks = codeblocks::parse(&request.document)
            .into_iter()
            .map(|block| {
                let mut planned = PlannedBlock {
                    block: block.index as u32,
                    line: block.line as u32,
                    language: block
                        .language
                        .map(|l| l.name().to_string())
                        .unwrap_or_default(),
                    code: block.code.clone(),
                    ..Default::default()
                };
                if let Some(problem) = block.problem {
                    planned.reason = problem;
                    return planned;
                }
                let mut wanted_labels = labels.clone();
                wanted_labels.extend(block.attributes.labels.clone());
                let wanted = Requirements {
                    language: block.language,
                    node: block.attributes.node.as_deref().or(node.as_deref()),
                    labels: wanted_labels,
                    exclude: &[],
                };
                match place(&candidates, &wanted) {
                    Ok(chosen) => {
                        planned.node_id = chosen.id.clone();
                        planned.node_name = chosen.name.clone();
                    }
                    Err(reason) => planned.reason = reason.to_string(),
                }
                planned
            })
            .collect();
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
    fn grpc_timeout_header_bounds_the_run() {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", "1500m".parse().unwrap());
        let deadline = deadline(&metadata);
        assert_eq!(deadline, Some(Duration::from_millis(1500)));
        assert_eq!(bounded_timeout(0, deadline), 1300);
        assert_eq!(bounded_timeout(900, deadline), 900);
        assert_eq!(bounded_timeout(5000, deadline), 1300);
        assert_eq!(bounded_timeout(5000, None), 5000);
        assert_eq!(bounded_timeout(0, Some(Duration::from_millis(100))), 50);
    }
}
