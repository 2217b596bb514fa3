//! One execution in a cluster session as work for the failover loop: it goes to the session's
//! node; on any other node (the first use, or after its node was lost) the session is opened
//! there first and its successful executions replayed before the code runs: their output is
//! not shown again, but a replay that does not succeed again is told in the move.

use kowalski_exo_common::proto::{
    self, ExecStatus, OpenSessionRequest, OutputStream, SessionExecuteRequest, SessionMoved,
    cluster_event::Event,
};
use metrics::counter;
use tokio_stream::StreamExt;
use tonic::Code;

use super::Record;
use crate::{
    cluster_metrics,
    json_events::status_name,
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
        let mut replay_failures = Vec::new();
        // A history given up on has nothing to replay: the session starts afresh, and keeps
        // its executions again from here.
        if let Some(why) = self.record.history_given_up.take() {
            replay_failures.push(format!("{why}: the session starts afresh here"));
        }
        for (number, past) in self.record.history.clone().into_iter().enumerate() {
            let stream = self.agents.execute_in_session(attempt, past).await;
            let mut stream = stream.map_err(|status| self.events.classify(status))?;
            // Replayed output is not shown again; a replay that no longer succeeds is told.
            let mut status = None;
            let mut stderr = Vec::new();
            while let Some(event) = stream.next().await {
                match event {
                    Ok(proto::ExecEvent {
                        event: Some(proto::exec_event::Event::Finished(finished)),
                    }) => status = Some(finished.status()),
                    Ok(proto::ExecEvent {
                        event: Some(proto::exec_event::Event::Output(chunk)),
                    }) if chunk.stream() == OutputStream::Stderr => stderr.extend(chunk.data),
                    Ok(_) => {}
                    Err(refused) => return Err(self.events.classify(refused)),
                }
            }
            if status != Some(ExecStatus::Ok) {
                let failure = replay_failure(number + 1, status, &stderr);
                tracing::warn!(session = %self.record.name, node = %attempt.node_name, %failure, "a replayed execution did not succeed again");
                replay_failures.push(failure);
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
                replay_failures,
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

/// How the replay of execution `number` (from 1) ended when it did not succeed again: its
/// status and the last line it wrote to stderr (a Python exception's, say).
fn replay_failure(number: usize, status: Option<ExecStatus>, stderr: &[u8]) -> String {
    let status = status.map_or("no result".to_string(), status_name);
    let stderr = String::from_utf8_lossy(stderr);
    match stderr.lines().rev().map(str::trim).find(|l| !l.is_empty()) {
        Some(last) => {
            let last: String = last.chars().take(LAST_LINE_CHARS).collect();
            format!("execution {number}: {status} ({last})")
        }
        None => format!("execution {number}: {status}"),
    }
}

/// The most of a failed replay's last stderr line that is kept.
const LAST_LINE_CHARS: usize = 200;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_replay_is_told_by_its_number_status_and_last_error_line() {
        let traceback = b"Traceback (most recent call last):\n  File \"<cell>\", line 1\nNameError: name 'x' is not defined\n\n";
        assert_eq!(
            replay_failure(2, Some(ExecStatus::NonzeroExit), traceback),
            "execution 2: nonzero_exit (NameError: name 'x' is not defined)"
        );
        assert_eq!(
            replay_failure(1, Some(ExecStatus::Timeout), b""),
            "execution 1: timeout"
        );
        assert_eq!(replay_failure(4, None, b"  \n"), "execution 4: no result");
        let long = "e".repeat(500);
        let told = replay_failure(3, Some(ExecStatus::NonzeroExit), long.as_bytes());
        assert_eq!(
            told.len(),
            "execution 3: nonzero_exit ()".len() + LAST_LINE_CHARS
        );
    }
}
