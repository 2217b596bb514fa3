//! One execution in a cluster session as work for the failover loop: it goes to the session's
//! node; on any other node (the first use, or after its node was lost) the session is opened
//! there first and its successful executions replayed, silently, before the code runs.

use kowalski_exo_common::proto::{
    self, ExecStatus, OpenSessionRequest, SessionExecuteRequest, SessionMoved, cluster_event::Event,
};
use metrics::counter;
use tokio_stream::StreamExt;
use tonic::Code;

use super::Record;
use crate::{
    cluster_metrics,
    registry::{NodeRegistry, NodeState},
    scheduling::{
        agents::AgentConnector,
        dispatch::RunEvents,
        failover::{Attempt, AttemptEnd, CallerGone, Departure, Work},
        placement::Requirements,
    },
};

/// An execution (or, with no code, the opening alone) in a session.
pub struct SessionCell<'a> {
    pub record: &'a mut Record,
    /// `None` when the session is only being opened.
    pub execution: Option<SessionExecuteRequest>,
    pub max_attempts: u32,
    /// Where its events go, with the block of a document and the line of its fence (RunBlocks);
    /// 0 for ExecuteInSession.
    pub events: RunEvents<'a>,
    pub agents: &'a dyn AgentConnector,
    pub registry: &'a NodeRegistry,
    /// For a session not yet placed: the node holding the fewest sessions, taken when it fits.
    pub prefer: Option<String>,
    /// The session's node failed an attempt (not merely full): it moves.
    pub home_lost: bool,
}

impl SessionCell<'_> {
    /// Opens the session on the attempt's node and replays its history there.
    async fn open_here(
        &mut self,
        attempt: &Attempt,
    ) -> Result<(), AttemptEnd<proto::ExecFinished>> {
        let request = OpenSessionRequest {
            session_id: self.record.name.clone(),
            ..self.record.open.clone()
        };
        let opened = match self.agents.open_session(attempt, request.clone()).await {
            // Left from an earlier stay on this node: what it holds may be stale.
            Err(status) if status.code() == Code::AlreadyExists => {
                let _ = self.agents.close_session(attempt, &self.record.name).await;
                self.agents.open_session(attempt, request).await
            }
            other => other,
        };
        if let Err(status) = opened {
            return Err(self.events.classify(status));
        }
        let from = self.record.home.clone();
        for past in self.record.history.clone() {
            let stream = self.agents.execute_in_session(attempt, past).await;
            let mut stream = stream.map_err(|status| self.events.classify(status))?;
            // Replayed output is not shown again; a replay that no longer succeeds is logged.
            let mut status = None;
            while let Some(event) = stream.next().await {
                match event {
                    Ok(proto::ExecEvent {
                        event: Some(proto::exec_event::Event::Finished(finished)),
                    }) => status = Some(finished.status()),
                    Ok(_) => {}
                    Err(refused) => return Err(self.events.classify(refused)),
                }
            }
            if status != Some(ExecStatus::Ok) {
                tracing::warn!(session = %self.record.name, node = %attempt.node_name, ?status, "a replayed execution did not succeed again");
            }
        }
        let replayed = self.record.history.len() as u32;
        self.record.home = Some(attempt.clone());
        if from.is_some() || replayed > 0 {
            counter!(cluster_metrics::SESSION_MOVES).increment(1);
            self.record.moves += 1;
            let moved = SessionMoved {
                session: self.record.name.clone(),
                from_node: from.map(|home| home.node_name).unwrap_or_default(),
                to_node: attempt.node_name.clone(),
                executions_replayed: replayed,
            };
            tracing::info!(session = %self.record.name, to = %attempt.node_name, replayed, "session moved");
            if self.events.send(Event::SessionMoved(moved)).await.is_err() {
                return Err(AttemptEnd::Cancelled);
            }
        }
        Ok(())
    }

    /// Runs the execution on the session's node, its output passed on tagged with the attempt.
    async fn run_here(
        &mut self,
        attempt: &Attempt,
        execution: SessionExecuteRequest,
    ) -> AttemptEnd<proto::ExecFinished> {
        let started = self.agents.execute_in_session(attempt, execution).await;
        self.events.follow(started, attempt).await
    }
}

#[tonic::async_trait]
impl Work for SessionCell<'_> {
    type Result = proto::ExecFinished;

    fn what(&self) -> String {
        format!("session {}", self.record.name)
    }

    fn requirements<'b>(&'b self, exclude: &'b [String]) -> Requirements<'b> {
        // At home while its node lives (a full node is waited for, not left); placed anew
        // (within the session's constraints) when not.
        let home = self.record.home.as_ref().filter(|home| {
            !self.home_lost
                && self
                    .registry
                    .state(&home.node_id)
                    .is_some_and(|state| state != NodeState::Down)
        });
        let language = self
            .execution
            .as_ref()
            .and_then(|e| kowalski_exo_common::Language::parse(&e.language).ok());
        Requirements {
            language,
            node: home
                .map(|home| home.node_id.as_str())
                .or(self.record.placement.node.as_deref()),
            labels: self.record.placement.labels.clone(),
            isolation: &self.record.placement.isolation,
            network: self.record.open.network,
            exclude,
            prefer: self.prefer.as_deref().filter(|_| home.is_none()),
            ..Default::default()
        }
    }

    fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    fn departure(&self) -> Departure {
        self.events.departure()
    }

    async fn queued(&mut self) -> Result<(), CallerGone> {
        self.events.queued().await
    }

    async fn placed(&mut self, attempt: &Attempt) -> Result<(), CallerGone> {
        self.events.placed(attempt).await
    }

    async fn attempt(&mut self, attempt: &Attempt) -> AttemptEnd<proto::ExecFinished> {
        let at_home = self
            .record
            .home
            .as_ref()
            .is_some_and(|home| home.node_id == attempt.node_id);
        if !at_home && let Err(end) = self.open_here(attempt).await {
            return end;
        }
        let Some(execution) = self.execution.clone() else {
            return AttemptEnd::Finished(proto::ExecFinished {
                status: ExecStatus::Ok as i32,
                ..Default::default()
            });
        };
        let end = match self.run_here(attempt, execution.clone()).await {
            // The node forgot the session (it restarted, or closed it when idle): open it there
            // again.
            AttemptEnd::Rejected(status) if status.code() == Code::NotFound => {
                if let Err(end) = self.open_here(attempt).await {
                    return end;
                }
                self.run_here(attempt, execution).await
            }
            end => end,
        };
        if matches!(end, AttemptEnd::Lost(_)) {
            self.home_lost = true;
        }
        end
    }

    async fn retrying(&mut self, lost: &Attempt, reason: &str) -> Result<(), CallerGone> {
        self.events.retrying(lost, reason).await
    }
}
