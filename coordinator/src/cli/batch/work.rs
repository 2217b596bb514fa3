//! Running one task on the cluster: an exec task in a fresh sandbox (or in one of the batch's
//! warm sessions), an ask task through the Recursive Language Model loop. Its result is the
//! finishing attempt's alone: output of an attempt lost to a dead node is dropped when the
//! coordinator retries elsewhere. A call the infrastructure failed (the coordinator unreachable
//! or restarting, every attempt lost) is tried again a few times with a growing pause, then the
//! task is recorded as failed with the reason, never retried forever.

use std::time::{Duration, Instant};

use kowalski_exo_common::proto::{
    AskRequest, ClusterEvent, ClusterExecuteRequest, ClusterOpenSessionRequest,
    ClusterSessionExecuteRequest, ExecStatus, ExecuteRequest, OpenSessionRequest,
    PlacementConstraints, ask_event, cluster_event,
};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tonic::{Code, Status};

use super::tasks::{Task, Work};
use crate::{cli::connect::Client, json_events::status_name};

/// Tries of a task whose call the infrastructure failed, the first included.
const TRIES: u32 = 5;
/// The pause before the second try; it doubles with each.
const FIRST_PAUSE: Duration = Duration::from_millis(250);

/// What every exec task of the batch gets unless it says otherwise.
#[derive(Clone, Debug, Default)]
pub struct ExecDefaults {
    pub timeout_ms: u32,
    pub attempts: u32,
    pub wait_for_nodes_ms: u32,
}

/// What a task came to: its result line and whether it ended well.
#[derive(Debug)]
pub struct Outcome {
    pub ok: bool,
    pub line: Value,
}

/// Runs tasks; shared by the batch's concurrent tasks.
pub struct Runner {
    client: Client,
    defaults: ExecDefaults,
    /// The batch's warm sessions, each free one waiting in the pool.
    sessions: Option<Mutex<tokio::sync::mpsc::Receiver<String>>>,
    give_back: tokio::sync::mpsc::Sender<String>,
    /// Every one of them, free or not, to close at the end.
    session_names: Vec<String>,
}

/// How one try ended.
enum Tried {
    Done(Outcome),
    /// The infrastructure failed the call: worth another try.
    Lost(String),
}

impl Runner {
    /// A runner of exec tasks in fresh sandboxes, or in the warm sessions named `sessions`.
    pub fn new(client: Client, defaults: ExecDefaults, sessions: Vec<String>) -> Self {
        let (give_back, pool) = tokio::sync::mpsc::channel(sessions.len().max(1));
        let warm = !sessions.is_empty();
        for name in &sessions {
            give_back
                .try_send(name.clone())
                .expect("room for every session");
        }
        Runner {
            client,
            defaults,
            sessions: warm.then(|| Mutex::new(pool)),
            give_back,
            session_names: sessions,
        }
    }

    /// Runs `task` to its outcome, trying again while the infrastructure fails it.
    pub async fn run(&self, task: &Task) -> Outcome {
        let started = Instant::now();
        let mut pause = FIRST_PAUSE;
        let mut tries = 0;
        loop {
            tries += 1;
            let tried = match &task.work {
                Work::Exec { .. } => self.exec(task).await,
                Work::Ask { .. } => self.ask(task).await,
            };
            match tried {
                Tried::Done(mut outcome) => {
                    outcome.line["tries"] = json!(tries);
                    outcome.line["wall_ms"] = json!(started.elapsed().as_millis() as u64);
                    return outcome;
                }
                Tried::Lost(_) if tries < TRIES => {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Tried::Lost(error) => {
                    return Outcome {
                        ok: false,
                        line: json!({
                            "id": task.id, "kind": kind(&task.work), "status": "failed",
                            "error": error, "tries": tries,
                            "wall_ms": started.elapsed().as_millis() as u64,
                        }),
                    };
                }
            }
        }
    }

    async fn exec(&self, task: &Task) -> Tried {
        let Work::Exec {
            language,
            code,
            stdin,
            args,
            timeout_ms,
        } = &task.work
        else {
            unreachable!("exec is given exec tasks");
        };
        let timeout_ms = match timeout_ms {
            0 => self.defaults.timeout_ms,
            ms => *ms,
        };
        let mut client = self.client.clone();
        let Some(pool) = &self.sessions else {
            let request = ClusterExecuteRequest {
                execution: Some(ExecuteRequest {
                    language: language.name().to_string(),
                    code: code.clone(),
                    stdin: stdin.clone().into_bytes(),
                    args: args.clone(),
                    timeout_ms,
                    run_id: task.id.clone(),
                    ..Default::default()
                }),
                placement: Some(PlacementConstraints::default()),
                max_attempts: self.defaults.attempts,
                wait_for_nodes_ms: self.defaults.wait_for_nodes_ms,
            };
            let events = client.execute(request).await;
            return collect(task, events).await;
        };
        if !stdin.is_empty() || !args.is_empty() {
            return Tried::Done(refused(
                task,
                "a task in a warm session takes no stdin or args: run the batch without --sessions",
            ));
        }
        let session = pool
            .lock()
            .await
            .recv()
            .await
            .expect("the pool outlives its runner");
        let request = ClusterSessionExecuteRequest {
            execution: Some(kowalski_exo_common::proto::SessionExecuteRequest {
                session_id: session.clone(),
                language: language.name().to_string(),
                code: code.clone(),
                timeout_ms,
                ..Default::default()
            }),
            open: Some(ClusterOpenSessionRequest {
                session: Some(OpenSessionRequest::default()),
                placement: Some(PlacementConstraints::default()),
                wait_for_nodes_ms: self.defaults.wait_for_nodes_ms,
            }),
            max_attempts: self.defaults.attempts,
        };
        let events = client.execute_in_session(request).await;
        let tried = collect(task, events).await;
        let _ = self.give_back.send(session).await;
        tried
    }

    async fn ask(&self, task: &Task) -> Tried {
        let Work::Ask {
            question,
            model,
            context,
            context_is_json,
        } = &task.work
        else {
            unreachable!("ask is given ask tasks");
        };
        let request = AskRequest {
            model: model.clone(),
            question: question.clone(),
            context: context.clone(),
            context_is_json: *context_is_json,
            ..Default::default()
        };
        let mut stream = match self.client.clone().ask(request).await {
            Ok(stream) => stream.into_inner(),
            Err(status) => return failed_call(task, status),
        };
        loop {
            match stream.message().await {
                Ok(Some(event)) => {
                    if let Some(ask_event::Event::Finished(f)) = event.event {
                        let ok = f.error.is_empty();
                        let mut line = json!({
                            "id": task.id, "kind": "ask", "status": if ok { "ok" } else { "failed" },
                            "answer": f.answer, "reason": f.reason, "iterations": f.iterations,
                            "prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                            "subcalls": f.subcalls,
                        });
                        if !ok {
                            line["error"] = json!(f.error);
                        }
                        return Tried::Done(Outcome { ok, line });
                    }
                }
                Ok(None) => return Tried::Lost("the run ended without its answer".into()),
                Err(status) => return failed_call(task, status),
            }
        }
    }

    /// Closes the batch's warm sessions, those a task held when the batch was interrupted too
    /// (its calls are gone by then). A session never opened is not there to close.
    pub async fn close_sessions(&self) {
        for name in &self.session_names {
            let request = kowalski_exo_common::proto::CloseSessionRequest {
                session_id: name.clone(),
            };
            let _ = self.client.clone().close_session(request).await;
        }
    }
}

fn kind(work: &Work) -> &'static str {
    match work {
        Work::Exec { .. } => "exec",
        Work::Ask { .. } => "ask",
    }
}

/// Collects an execution's events into its result line: the output of the finishing attempt
/// only (a `retrying` event drops what the lost attempt printed).
async fn collect(
    task: &Task,
    events: Result<tonic::Response<tonic::Streaming<ClusterEvent>>, Status>,
) -> Tried {
    let mut stream = match events {
        Ok(stream) => stream.into_inner(),
        Err(status) => return failed_call(task, status),
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    loop {
        let event = match stream.message().await {
            Ok(Some(event)) => event.event,
            Ok(None) => return Tried::Lost("the run ended without its result".into()),
            Err(status) => return failed_call(task, status),
        };
        match event {
            Some(cluster_event::Event::Output(output)) => {
                let chunk = output.chunk.unwrap_or_default();
                if chunk.stream() == kowalski_exo_common::proto::OutputStream::Stderr {
                    stderr.extend_from_slice(&chunk.data);
                } else {
                    stdout.extend_from_slice(&chunk.data);
                }
            }
            Some(cluster_event::Event::Retrying(_)) => {
                stdout.clear();
                stderr.clear();
            }
            Some(cluster_event::Event::Finished(finished)) => {
                let Some(result) = finished.result else {
                    return Tried::Lost(finished.error);
                };
                let ok = result.status() == ExecStatus::Ok;
                let line = json!({
                    "id": task.id, "kind": "exec", "status": status_name(result.status()),
                    "exit_code": result.exit_code, "signal": result.signal,
                    "stdout": String::from_utf8_lossy(&stdout),
                    "stderr": String::from_utf8_lossy(&stderr),
                    "node": finished.node_name, "attempts": finished.attempt,
                });
                return Tried::Done(Outcome { ok, line });
            }
            _ => {}
        }
    }
}

/// A call that failed: refused for good (bad task, no node can run it), or lost to the
/// infrastructure and worth another try.
fn failed_call(task: &Task, status: Status) -> Tried {
    match status.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::FailedPrecondition
        | Code::Unauthenticated
        | Code::PermissionDenied => Tried::Done(refused(task, status.message())),
        _ => Tried::Lost(status.message().to_string()),
    }
}

fn refused(task: &Task, error: &str) -> Outcome {
    Outcome {
        ok: false,
        line: json!({"id": task.id, "kind": kind(&task.work), "status": "refused", "error": error}),
    }
}
