//! The NodeAgent gRPC service: translates between the wire and the executor, nothing more.

use std::{collections::HashMap, sync::Arc, time::Duration};

use kowalski_exo_common::proto::{
    self, DescribeRequest, ExecEvent, ExecStatus, GenerateEvent, GenerateRequest, NodeDescription,
    exec_event, node_agent_server::NodeAgent,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Request, Response, Status};

use crate::{
    admission::Admission,
    backends::Catalog,
    error::{ExecError, InferenceError},
    exec::Executor,
    fingerprint::FingerprintWatch,
    sessions::Sessions,
};

/// Events buffered per run before a slow caller holds the program back.
const EVENT_BUFFER: usize = 32;
/// How long a finished run waits for its caller to take the last event.
const FINISH_GRACE: Duration = Duration::from_secs(30);

/// Who this agent is, as it describes itself.
#[derive(Clone, Debug)]
pub struct Identity {
    pub name: String,
    pub labels: HashMap<String, String>,
}

/// The NodeAgent service of one agent.
#[derive(Clone)]
pub struct NodeAgentService {
    executor: Arc<Executor>,
    catalog: Catalog,
    admission: Admission,
    identity: Identity,
    shutdown: CancellationToken,
    runs: TaskTracker,
    /// Client certificates the coordinator revoked (SHA-256, hex), refused as callers.
    revoked_clients: RevokedClients,
    /// Where that list is kept, so a restarted agent refuses them before it attaches again.
    revocations_file: Option<std::path::PathBuf>,
    sessions: Sessions,
}

/// The revoked client certificates, as the coordinator last sent them.
pub type RevokedClients = Arc<std::sync::RwLock<std::collections::HashSet<String>>>;

impl NodeAgentService {
    pub fn new(
        executor: Arc<Executor>,
        catalog: Catalog,
        admission: Admission,
        identity: Identity,
        shutdown: CancellationToken,
        runs: TaskTracker,
        sessions: Sessions,
    ) -> Self {
        NodeAgentService {
            sessions,
            executor,
            catalog,
            admission,
            identity,
            shutdown,
            runs,
            revoked_clients: RevokedClients::default(),
            revocations_file: None,
        }
    }

    /// Keeps the revoked client certificates in `file` (one per line), starting from what it
    /// already holds.
    pub fn keep_revocations_in(mut self, file: std::path::PathBuf) -> Self {
        match kowalski_exo_common::security::files::read(&file) {
            Ok(Some(kept)) => {
                *self
                    .revoked_clients
                    .write()
                    .expect("revoked clients lock poisoned") =
                    kept.lines().map(|l| l.trim().to_string()).collect();
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(
                error = %e,
                "cannot read the revoked client certificates: none is refused until the coordinator sends them"
            ),
        }
        self.revocations_file = Some(file);
        self
    }

    /// The client certificates refused as callers.
    pub fn revoked_clients(&self) -> RevokedClients {
        self.revoked_clients.clone()
    }

    /// Replaces the revoked client certificates with the coordinator's list.
    pub fn set_revoked_clients(&self, fingerprints: Vec<String>) {
        let count = fingerprints.len();
        if let Some(file) = &self.revocations_file {
            let text: String = fingerprints.iter().map(|f| format!("{f}\n")).collect();
            if let Err(e) = kowalski_exo_common::security::files::write_private(file, &text) {
                tracing::warn!(error = %e, "cannot keep the revoked client certificates");
            }
        }
        *self
            .revoked_clients
            .write()
            .expect("revoked clients lock poisoned") = fingerprints.into_iter().collect();
        tracing::info!(count, "revoked client certificates updated");
    }

    /// The models the device's backends serve.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The live runtime fingerprint.
    pub fn runtimes(&self) -> FingerprintWatch {
        self.executor.runtimes().clone()
    }

    /// Runs in progress and runs queued, right now.
    pub fn occupancy(&self) -> (u32, u32) {
        (
            self.admission.running() as u32,
            self.admission.queued() as u32,
        )
    }

    /// What this agent is and can do right now.
    pub fn description(&self) -> NodeDescription {
        NodeDescription {
            name: self.identity.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            labels: self.identity.labels.clone(),
            runtimes: Some(self.executor.runtimes().borrow().to_proto()),
            isolation: self.executor.isolation() as i32,
            capacity: self.admission.capacity() as u32,
            queue_capacity: self.admission.queue_capacity() as u32,
            running: self.occupancy().0,
            queued: self.occupancy().1,
            models: self.catalog.offers(),
            isolation_layers: self
                .executor
                .sandbox()
                .layers()
                .achieved()
                .into_iter()
                .map(|layer| layer as i32)
                .collect(),
            allows_network: self.executor.allows_network(),
        }
    }
}

/// Sends a run's last event. A caller that stopped reading must not hold a run slot, nor the
/// run's task for long.
async fn send_last(
    events: &mpsc::Sender<Result<ExecEvent, Status>>,
    last: Result<ExecEvent, Status>,
    cancel: &CancellationToken,
) {
    tokio::select! {
        biased;
        _ = events.send(last) => {}
        _ = tokio::time::sleep(FINISH_GRACE) => {}
        _ = cancel.cancelled() => {}
    }
}

#[tonic::async_trait]
impl NodeAgent for NodeAgentService {
    type ExecuteStream = ReceiverStream<Result<ExecEvent, Status>>;
    type GenerateStream = ReceiverStream<Result<GenerateEvent, Status>>;
    type ExecuteInSessionStream = ReceiverStream<Result<ExecEvent, Status>>;

    async fn execute(
        &self,
        request: Request<proto::ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        if self.shutdown.is_cancelled() {
            return Err(ExecError::ShuttingDown.into());
        }
        let prepared = self.executor.prepare(request.into_inner())?;
        let ticket = self.admission.enter().map_err(ExecError::from)?;
        let (events, stream) = mpsc::channel(EVENT_BUFFER);
        let executor = self.executor.clone();
        let cancel = self.shutdown.child_token();
        self.runs.spawn(async move {
            let slot = tokio::select! {
                slot = ticket.wait_for_slot() => slot,
                _ = events.closed() => return,
                _ = cancel.cancelled() => {
                    let _ = events.send(Err(ExecError::ShuttingDown.into())).await;
                    return;
                }
            };
            let finished = executor.run(prepared, &events, cancel.clone()).await;
            drop(slot);
            // A run cut short by the agent's shutdown is an infrastructure failure, not a result:
            // say so, so that a coordinator runs it elsewhere.
            let finished = if cancel.is_cancelled() && finished.status() == ExecStatus::Cancelled {
                Err(ExecError::ShuttingDown.into())
            } else {
                Ok(ExecEvent {
                    event: Some(exec_event::Event::Finished(finished)),
                })
            };
            send_last(&events, finished, &cancel).await;
        });
        Ok(Response::new(ReceiverStream::new(stream)))
    }

    async fn describe(
        &self,
        _request: Request<DescribeRequest>,
    ) -> Result<Response<NodeDescription>, Status> {
        Ok(Response::new(self.description()))
    }

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        if self.shutdown.is_cancelled() {
            return Err(InferenceError::ShuttingDown.into());
        }
        let request = request.into_inner();
        let backend = self
            .catalog
            .backend_for(&request.model)
            .map_err(InferenceError::from)?;
        let turn = self.catalog.turn(&backend).await;
        let generating = self.catalog.generating(&request.model);
        let mut answer = backend
            .generate(&request)
            .await
            .map_err(InferenceError::from)?;
        let (events, stream) = mpsc::channel(EVENT_BUFFER);
        let cancel = self.shutdown.child_token();
        self.runs.spawn(async move {
            let _generating = (generating, turn);
            loop {
                // Dropping `answer` (caller gone, shutdown) closes the backend request.
                let event = tokio::select! {
                    event = answer.next() => event,
                    _ = events.closed() => return,
                    _ = cancel.cancelled() => {
                        let _ = events.send(Err(InferenceError::ShuttingDown.into())).await;
                        return;
                    }
                };
                let Some(event) = event else { return };
                let event = event.map_err(|e| InferenceError::from(e).into());
                let failed = event.is_err();
                if events.send(event).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(stream)))
    }

    async fn count_tokens(
        &self,
        request: Request<proto::CountTokensRequest>,
    ) -> Result<Response<proto::CountTokensResponse>, Status> {
        let request = request.into_inner();
        let backend = self
            .catalog
            .backend_for(&request.model)
            .map_err(InferenceError::from)?;
        let counts = backend
            .count_tokens(&request.model, &request.texts)
            .await
            .map_err(InferenceError::from)?;
        Ok(Response::new(proto::CountTokensResponse { counts }))
    }

    async fn open_session(
        &self,
        request: Request<proto::OpenSessionRequest>,
    ) -> Result<Response<proto::SessionInfo>, Status> {
        // Run to its end even when the caller goes away, so nothing is left half made.
        let sessions = self.sessions.clone();
        let opened = self
            .runs
            .spawn(async move { sessions.open(request.into_inner()).await })
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(opened?))
    }

    async fn execute_in_session(
        &self,
        request: Request<proto::SessionExecuteRequest>,
    ) -> Result<Response<Self::ExecuteInSessionStream>, Status> {
        let cell = self.sessions.prepare(request.into_inner())?;
        let (events, stream) = mpsc::channel(EVENT_BUFFER);
        let cancel = self.shutdown.clone();
        self.runs.spawn(async move {
            let finished = match cell.run(&events).await {
                Ok(Some(finished)) if !cancel.is_cancelled() => Ok(ExecEvent {
                    event: Some(exec_event::Event::Finished(finished)),
                }),
                Err(closed) => Err(closed.into()),
                // Cut short by the agent's shutdown: an infrastructure failure, not a result.
                Ok(_) => Err(ExecError::ShuttingDown.into()),
            };
            send_last(&events, finished, &cancel).await;
        });
        Ok(Response::new(ReceiverStream::new(stream)))
    }

    async fn close_session(
        &self,
        request: Request<proto::CloseSessionRequest>,
    ) -> Result<Response<proto::CloseSessionResponse>, Status> {
        let sessions = self.sessions.clone();
        let id = request.into_inner().session_id;
        let session = self
            .runs
            .spawn(async move { sessions.close(&id).await })
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(proto::CloseSessionResponse {
            session: Some(session),
        }))
    }

    async fn list_sessions(
        &self,
        _request: Request<proto::ListSessionsRequest>,
    ) -> Result<Response<proto::ListSessionsResponse>, Status> {
        Ok(Response::new(proto::ListSessionsResponse {
            sessions: self.sessions.list(),
        }))
    }
}
