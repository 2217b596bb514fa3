//! A document's blocks, run in order: the verdict for each block (its run, or why it is skipped)
//! that Plan and RunBlocks share, the rule that a failed block stops the rest unless told to keep
//! going, and a notice for every block left unrun.

use std::{collections::BTreeMap, time::Duration};

use kowalski_exo_common::{
    proto::{
        BlockSkipped, ClusterEvent, ClusterOpenSessionRequest, ExecStatus, ExecuteRequest,
        IsolationLayer, PlannedBlock, RunBlocksRequest, SessionExecuteRequest, SkipKind,
        cluster_event::Event,
    },
    request_size,
};
use tokio::time::Instant;

use super::{
    dispatch::{ClusterSender, Dispatcher, Outcome, RunEvents, RunSpec, bounded_timeout},
    placement::{Candidate, place, with_candidates},
};
use crate::{codeblocks::CodeBlock, sessions::ClusterSessions};

/// Why a block does not run.
#[derive(Clone, Debug, PartialEq)]
pub struct Skip {
    pub kind: SkipKind,
    pub reason: String,
}

impl Skip {
    /// A skipped block that the document should not run past.
    fn stops(&self) -> bool {
        !matches!(self.kind, SkipKind::NoLanguage)
    }

    fn event(&self, block: &CodeBlock) -> ClusterEvent {
        ClusterEvent {
            block: block.index as u32,
            event: Some(Event::Skipped(BlockSkipped {
                line: block.line as u32,
                reason: self.reason.clone(),
                no_node: self.kind == SkipKind::NoNode,
                kind: self.kind as i32,
            })),
        }
    }
}

/// What applies to every block unless the block's attributes say otherwise.
#[derive(Clone, Debug, Default)]
pub struct BlockDefaults {
    pub node: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub isolation: Vec<IsolationLayer>,
    pub network: bool,
    pub timeout_ms: u32,
    pub limits: Option<kowalski_exo_common::proto::ExecLimits>,
    pub max_attempts: u32,
    /// When the client's gRPC deadline passes; every block's timeout stays inside it.
    pub deadline: Option<Instant>,
}

impl BlockDefaults {
    pub fn of(request: &RunBlocksRequest) -> Self {
        let placement = request.placement.clone().unwrap_or_default();
        BlockDefaults {
            isolation: placement.required_layers(),
            node: (!placement.node.is_empty()).then_some(placement.node),
            labels: placement.labels.into_iter().collect(),
            network: request.network,
            timeout_ms: request.timeout_ms,
            limits: request.limits,
            max_attempts: request.max_attempts,
            deadline: None,
        }
    }

    /// The run for a block, with the block's attributes over these defaults, or why it cannot
    /// run from what the block itself holds.
    pub fn spec(&self, block: &CodeBlock) -> Result<RunSpec, Skip> {
        let Some(language) = block.language else {
            return Err(Skip {
                kind: SkipKind::NoLanguage,
                reason: block
                    .problem
                    .clone()
                    .unwrap_or_else(|| "the block names no language".into()),
            });
        };
        if let Some(problem) = &block.problem {
            return Err(Skip {
                kind: SkipKind::Invalid,
                reason: problem.clone(),
            });
        }
        let mut labels = self.labels.clone();
        labels.extend(block.attributes.labels.clone());
        let execution = ExecuteRequest {
            language: language.name().to_string(),
            code: block.code.clone(),
            timeout_ms: block.attributes.timeout_ms.unwrap_or(self.timeout_ms),
            limits: self.limits,
            network: block.attributes.network.unwrap_or(self.network),
            ..Default::default()
        };
        let mut isolation = self.isolation.clone();
        isolation.extend(&block.attributes.isolation);
        request_size::check(&execution, request_size::MAX_CODE_BYTES).map_err(|e| Skip {
            kind: SkipKind::Invalid,
            reason: e.to_string(),
        })?;
        Ok(RunSpec {
            execution,
            language,
            node: block.attributes.node.clone().or(self.node.clone()),
            labels,
            isolation,
            max_attempts: self.max_attempts,
            block: block.index as u32,
            line: block.line as u32,
        })
    }
}

/// Where each block would run now, with the same verdicts RunBlocks reaches.
pub fn plan(
    dispatcher: &Dispatcher,
    blocks: &[CodeBlock],
    defaults: &BlockDefaults,
) -> Vec<PlannedBlock> {
    with_candidates(dispatcher.registry(), Instant::now(), |candidates| {
        blocks
            .iter()
            .map(|block| plan_block(candidates, block, defaults))
            .collect()
    })
}

/// Where one block would run among `candidates`.
fn plan_block(
    candidates: &[Candidate<'_>],
    block: &CodeBlock,
    defaults: &BlockDefaults,
) -> PlannedBlock {
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
    let spec = match defaults.spec(block) {
        Ok(spec) => spec,
        Err(skip) => {
            planned.reason = skip.reason;
            planned.kind = skip.kind as i32;
            return planned;
        }
    };
    match place(candidates, &spec.requirements(&[])) {
        Ok(chosen) => {
            planned.node_id = chosen.id().to_string();
            planned.node_name = chosen.name().to_string();
        }
        Err(reason) if reason.is_transient() => {
            planned.reason = format!("would wait: {reason}");
        }
        Err(reason) => {
            planned.reason = reason.to_string();
            planned.kind = SkipKind::NoNode as i32;
        }
    }
    planned
}

/// The session a document's blocks run in (those in languages sessions hold).
pub struct DocumentSession<'a> {
    pub sessions: &'a ClusterSessions,
    pub open: ClusterOpenSessionRequest,
}

/// Runs the blocks in order. A block that fails (or cannot run) stops the rest unless
/// `keep_going`; every block left unrun is reported as such. The wait for nodes to join is one
/// budget for the whole document.
pub async fn run(
    dispatcher: &Dispatcher,
    blocks: &[CodeBlock],
    defaults: &BlockDefaults,
    keep_going: bool,
    wait_for_nodes: Duration,
    session: Option<&DocumentSession<'_>>,
    events: &ClusterSender,
) {
    let mut stopped_at: Option<&CodeBlock> = None;
    let wait_until = Instant::now() + wait_for_nodes;
    for block in blocks {
        if let Some(failed) = stopped_at {
            let skip = Skip {
                kind: SkipKind::NotRun,
                reason: format!(
                    "not run: block {} (line {}) failed; --keep-going runs the rest",
                    failed.index + 1,
                    failed.line
                ),
            };
            if events.send(Ok(skip.event(block))).await.is_err() {
                return;
            }
            continue;
        }
        let admitted = match defaults.spec(block) {
            Ok(mut spec) => {
                let admitted = tokio::select! {
                    admitted = dispatcher.admit(&spec, wait_until) => admitted,
                    _ = events.closed() => return,
                };
                spec.execution.timeout_ms =
                    bounded_timeout(spec.execution.timeout_ms, remaining(defaults.deadline));
                admitted.map(|()| spec).map_err(|reason| Skip {
                    kind: SkipKind::NoNode,
                    reason: reason.to_string(),
                })
            }
            Err(skip) => Err(skip),
        };
        let succeeded = match admitted {
            Err(skip) => {
                if events.send(Ok(skip.event(block))).await.is_err() {
                    return;
                }
                !skip.stops()
            }
            Ok(spec) => match run_one(dispatcher, &spec, session, events).await {
                Outcome::Finished(result) => result.status() == ExecStatus::Ok,
                Outcome::Cancelled => return,
                Outcome::Failed(_) => false,
                // The node refused the request itself, as any node would.
                Outcome::Rejected(status) => {
                    let skip = Skip {
                        kind: SkipKind::Invalid,
                        reason: status.message().to_string(),
                    };
                    if events.send(Ok(skip.event(block))).await.is_err() {
                        return;
                    }
                    false
                }
            },
        };
        if !succeeded && !keep_going {
            stopped_at = Some(block);
        }
    }
}

/// Runs one block: in the document's session when it has one that holds the block's language,
/// else on its own.
async fn run_one(
    dispatcher: &Dispatcher,
    spec: &RunSpec,
    session: Option<&DocumentSession<'_>>,
    events: &ClusterSender,
) -> Outcome {
    let Some(session) = session.filter(|_| spec.language.in_sessions()) else {
        return dispatcher.run(spec, events).await;
    };
    let open = session.open.session.clone().unwrap_or_default();
    let execution = SessionExecuteRequest {
        session_id: open.session_id,
        language: spec.execution.language.clone(),
        code: spec.execution.code.clone(),
        timeout_ms: spec.execution.timeout_ms,
        output_bytes: spec
            .execution
            .limits
            .map(|l| l.output_bytes)
            .unwrap_or_default(),
        run_id: spec.execution.run_id.clone(),
    };
    let events = RunEvents {
        events,
        block: spec.block,
        line: spec.line,
    };
    match session
        .sessions
        .run_block(&session.open, execution, spec.max_attempts, events)
        .await
    {
        Ok(outcome) => outcome,
        Err(e) => Outcome::Rejected(e.into()),
    }
}

/// Time left until `deadline`, if there is one.
pub fn remaining(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|at| at.saturating_duration_since(Instant::now()))
}
