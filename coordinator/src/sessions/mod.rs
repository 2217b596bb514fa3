//! Sessions across the cluster: a named session is placed like a run and then stays on its
//! node; its executions run there one at a time, in order. The coordinator keeps each session's
//! successful executions, so when its node dies the session is opened on another node and they
//! are replayed there ([`cell`]). Code in a session asks the cluster's models through the
//! [`SubcallRelay`].

mod cell;
mod subcalls;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use kowalski_exo_common::{
    Language,
    proto::{
        AskRequest, ClusterFinished, ClusterOpenSessionRequest, ClusterSessionExecuteRequest,
        ClusterSessionInfo, ExecFinished, ExecStatus, IsolationLayer, OpenSessionRequest,
        OutputStream, SessionExecuteRequest, SessionMoved, cluster_event::Event,
    },
    request_size::{self, MAX_CODE_BYTES, OversizedRequest},
};
use prost::Message;
use tokio::{sync::mpsc, time::Instant};
use tonic::Status;

use crate::{
    error::CoordinatorError,
    registry::NodeState,
    rlm::budget::Budget,
    scheduling::{
        dispatch::{Dispatcher, RunEvents},
        failover::{self, Attempt, Outcome},
    },
    service::EventReceiver,
};
use cell::SessionCell;
pub use subcalls::SubcallRelay;

/// A session unused this long is forgotten, unless the coordinator is told otherwise (its node
/// closes it after as long, by its own default: agents are told the same with
/// `--session-idle`).
pub const DEFAULT_IDLE: Duration = Duration::from_secs(600);
/// The most a session's kept executions may take (their encoded requests), unless the
/// coordinator is told otherwise.
pub const DEFAULT_HISTORY_BYTES: u64 = 64 << 20;

/// How the coordinator keeps its sessions.
#[derive(Clone, Copy, Debug)]
pub struct SessionSettings {
    /// A session unused this long is forgotten.
    pub idle: Duration,
    /// A session whose successful executions take more than this stops keeping them: it
    /// starts afresh where it moves (and says so) instead of growing without end.
    pub history_bytes: u64,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            idle: DEFAULT_IDLE,
            history_bytes: DEFAULT_HISTORY_BYTES,
        }
    }
}
/// Events buffered per execution before a slow client holds it back.
const EVENT_BUFFER: usize = 64;

/// The cluster's sessions.
#[derive(Clone)]
pub struct ClusterSessions {
    dispatcher: Dispatcher,
    settings: SessionSettings,
    table: Arc<Mutex<HashMap<String, Entry>>>,
    /// Sessions whose sub-calls someone follows (an RLM run), by name.
    watched: Arc<Mutex<HashMap<String, SubcallWatch>>>,
}

/// What follows a session's sub-calls: where each answered prompt is told, and the budgets
/// of the run they spend.
#[derive(Clone, Debug)]
pub struct SubcallWatch {
    pub notes: mpsc::UnboundedSender<RunNote>,
    pub budget: Arc<Budget>,
    /// The run's depth (0 for a root run) and how its children are asked (rlm_query).
    pub depth: u32,
    pub children: AskRequest,
}

/// What a run hears of its session besides its executions' output.
#[derive(Debug)]
pub enum RunNote {
    Subcall(SubcallNote),
    Moved(SessionMoved),
}

/// One prompt a session's code sent, answered.
#[derive(Clone, Debug, Default)]
pub struct SubcallNote {
    /// The node that generated it; empty from the cache.
    pub node: String,
    pub model: String,
    pub wall_ms: u64,
    pub cached: bool,
    pub error: String,
    pub tokens: u64,
    /// A child run (rlm_query), with its turns and its own sub-calls.
    pub child: bool,
    pub iterations: u32,
    pub subcalls: u64,
}

#[derive(Clone)]
struct Entry {
    record: Arc<tokio::sync::Mutex<Record>>,
    facts: Arc<Mutex<Facts>>,
    /// Which opening of the name this is: a name closed and opened again is another session,
    /// with answers cached apart.
    incarnation: u64,
}

/// Numbers the sessions this coordinator opened.
static INCARNATIONS: AtomicU64 = AtomicU64::new(1);

/// What one execution printed and came to.
#[derive(Debug, Default)]
pub struct Collected {
    pub stdout: String,
    pub stderr: String,
    /// How it ended; `None` when no attempt could finish (see `error`).
    pub result: Option<ExecFinished>,
    pub error: String,
}

impl Collected {
    /// It ran and exited 0.
    pub fn ok(&self) -> bool {
        self.result
            .as_ref()
            .is_some_and(|r| r.status() == ExecStatus::Ok)
    }
}

/// Where a session may be placed.
#[derive(Clone, Debug, Default)]
struct Placement {
    node: Option<String>,
    labels: BTreeMap<String, String>,
    isolation: Vec<IsolationLayer>,
}

/// A session, behind its lock: executions wait for it in turn.
pub struct Record {
    name: String,
    /// How it is opened on a node (without its name).
    open: OpenSessionRequest,
    placement: Placement,
    /// The node it lives on now; `None` before it is first placed.
    home: Option<Attempt>,
    /// Its successful executions, in order, replayed where it moves.
    history: Vec<SessionExecuteRequest>,
    /// What `history` takes, encoded.
    history_bytes: u64,
    /// Why `history` was given up on this node (it went past its limit): the session starts
    /// afresh where it moves, and says so.
    history_given_up: Option<String>,
    moves: u32,
}

impl Record {
    /// Keeps a successful execution for replay, unless the history would go past `limit`:
    /// then it is given up on, until the session moves.
    fn remember(&mut self, execution: &SessionExecuteRequest, limit: u64) {
        if self.history_given_up.is_some() {
            return;
        }
        let size = execution.encoded_len() as u64;
        if self.history_bytes + size > limit {
            tracing::warn!(session = %self.name, limit, "a session's history went past its limit: it will start afresh where it moves");
            self.history.clear();
            self.history_bytes = 0;
            self.history_given_up = Some(format!(
                "its executions took more than the {} kept for a session (coordinator serve --session-history), so none were kept",
                size_text(limit)
            ));
            return;
        }
        self.history.push(execution.clone());
        self.history_bytes += size;
    }

    /// Drops the kept executions of `language`: its interpreter started afresh.
    fn forget_language(&mut self, language: &str) {
        self.history
            .retain(|past| !same_language(&past.language, language));
        self.history_bytes = self.history.iter().map(|e| e.encoded_len() as u64).sum();
    }
}

/// `bytes` as `64M`, `1K`, or in bytes when not a whole number of either.
fn size_text(bytes: u64) -> String {
    [(30, "G"), (20, "M"), (10, "K")]
        .into_iter()
        .find(|(shift, _)| bytes >= 1 << shift && bytes.is_multiple_of(1 << shift))
        .map_or(format!("{bytes} bytes"), |(shift, unit)| {
            format!("{}{unit}", bytes >> shift)
        })
}

/// What can be said of a session without waiting for its lock.
#[derive(Clone, Debug)]
struct Facts {
    node_id: String,
    node_name: String,
    languages: BTreeSet<&'static str>,
    executions: u64,
    moves: u32,
    model: String,
    /// When its last execution ended; `None` while one runs.
    idle_since: Option<Instant>,
}

impl ClusterSessions {
    pub fn new(dispatcher: Dispatcher, settings: SessionSettings) -> Self {
        ClusterSessions {
            dispatcher,
            settings,
            table: Arc::default(),
            watched: Arc::default(),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.table.lock().expect("session table poisoned")
    }

    /// Forgets sessions idle past the settings' time (their nodes close them after as long).
    fn forget_idle(&self) {
        let idle = self.settings.idle;
        self.table().retain(|_, entry| {
            let facts = entry.facts.lock().expect("session facts poisoned");
            facts.idle_since.is_none_or(|since| since.elapsed() < idle)
        });
    }

    /// The session `open` names, created if it does not exist (`Ok(false)` then says it was
    /// there already).
    fn entry(&self, open: &ClusterOpenSessionRequest) -> Result<(Entry, bool), CoordinatorError> {
        self.forget_idle();
        let session = open.session.clone().unwrap_or_default();
        check_name(&session.session_id)?;
        let mut table = self.table();
        if let Some(entry) = table.get(&session.session_id) {
            return Ok((entry.clone(), false));
        }
        let placement = open.placement.clone().unwrap_or_default();
        let record = Record {
            name: session.session_id.clone(),
            placement: Placement {
                isolation: placement.required_layers(),
                node: (!placement.node.is_empty()).then_some(placement.node),
                labels: placement.labels.into_iter().collect(),
            },
            open: OpenSessionRequest {
                session_id: String::new(),
                ..session.clone()
            },
            home: None,
            history: Vec::new(),
            history_bytes: 0,
            history_given_up: None,
            moves: 0,
        };
        let entry = Entry {
            record: Arc::new(tokio::sync::Mutex::new(record)),
            facts: Arc::new(Mutex::new(Facts {
                node_id: String::new(),
                node_name: String::new(),
                languages: BTreeSet::new(),
                executions: 0,
                moves: 0,
                model: session.model,
                idle_since: Some(Instant::now()),
            })),
            incarnation: INCARNATIONS.fetch_add(1, Ordering::Relaxed),
        };
        table.insert(session.session_id, entry.clone());
        Ok((entry, true))
    }

    /// Opens a named session now, on a node placed like a run.
    pub async fn open(
        &self,
        request: ClusterOpenSessionRequest,
    ) -> Result<ClusterSessionInfo, Status> {
        let (entry, created) = self.entry(&request)?;
        let name = request.session.unwrap_or_default().session_id;
        if !created {
            return Err(Status::already_exists(format!(
                "a session named '{name}' is open already"
            )));
        }
        let (events, mut receiver) = mpsc::channel(EVENT_BUFFER);
        let outcome = self.run(&entry, None, 0, RunEvents::of(&events)).await;
        drop(events);
        while receiver.try_recv().is_ok() {}
        match outcome {
            Outcome::Finished(_) => Ok(info(&name, &entry)),
            Outcome::Failed(error) => {
                self.table().remove(&name);
                Err(Status::unavailable(format!(
                    "cannot open session '{name}': {error}"
                )))
            }
            Outcome::Rejected(status) => {
                self.table().remove(&name);
                Err(status)
            }
            Outcome::Cancelled => {
                self.table().remove(&name);
                Err(Status::cancelled("the client went away"))
            }
        }
    }

    /// Runs code in a named session (opened on first use), streaming its events.
    pub fn execute(
        &self,
        request: ClusterSessionExecuteRequest,
    ) -> Result<EventReceiver, CoordinatorError> {
        let execution = request
            .execution
            .ok_or(CoordinatorError::MissingField("execution"))?;
        let language = Language::parse(&execution.language)?;
        if !language.in_sessions() {
            return Err(CoordinatorError::NoSessionLanguage(language));
        }
        if execution.code.len() > MAX_CODE_BYTES {
            return Err(OversizedRequest::Code {
                size: execution.code.len(),
                limit: MAX_CODE_BYTES,
            }
            .into());
        }
        let mut open = request.open.unwrap_or_default();
        let mut session = open.session.unwrap_or_default();
        session.session_id = execution.session_id.clone();
        open.session = Some(session);
        let (entry, _) = self.entry(&open)?;
        let (events, receiver) = mpsc::channel(EVENT_BUFFER);
        let sessions = self.clone();
        tokio::spawn(async move {
            let outcome = sessions
                .run(
                    &entry,
                    Some(execution),
                    request.max_attempts,
                    RunEvents::of(&events),
                )
                .await;
            if let Outcome::Rejected(status) = outcome {
                let _ = events.send(Err(status)).await;
            }
        });
        Ok(receiver)
    }

    /// Runs code in a named session (opened already) and collects what it printed instead of
    /// streaming it.
    pub async fn run_collected(
        &self,
        session: &str,
        language: &str,
        code: String,
    ) -> Result<Collected, Status> {
        let request = ClusterSessionExecuteRequest {
            execution: Some(SessionExecuteRequest {
                session_id: session.to_string(),
                language: language.to_string(),
                code,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut events = self.execute(request)?;
        let mut collected = Collected::default();
        while let Some(event) = events.recv().await {
            match event?.event {
                Some(Event::Output(output)) => {
                    let chunk = output.chunk.unwrap_or_default();
                    let text = String::from_utf8_lossy(&chunk.data);
                    match chunk.stream() {
                        OutputStream::Stderr => collected.stderr.push_str(&text),
                        _ => collected.stdout.push_str(&text),
                    }
                }
                Some(Event::Retrying(_)) => collected = Collected::default(),
                Some(Event::SessionMoved(moved)) => {
                    if let Some(watch) = self.subcall_watch(session) {
                        let _ = watch.notes.send(RunNote::Moved(moved));
                    }
                }
                Some(Event::Finished(finished)) => {
                    collected.error = finished.error;
                    collected.result = finished.result;
                }
                _ => {}
            }
        }
        Ok(collected)
    }

    /// Runs a document's block in the session `open` names (opened on first use), streaming
    /// its events like [`crate::scheduling::dispatch::Dispatcher::run`].
    pub async fn run_block(
        &self,
        open: &ClusterOpenSessionRequest,
        execution: SessionExecuteRequest,
        max_attempts: u32,
        events: RunEvents<'_>,
    ) -> Result<Outcome<ExecFinished>, CoordinatorError> {
        let (entry, _) = self.entry(open)?;
        Ok(self
            .run(&entry, Some(execution), max_attempts, events)
            .await)
    }

    /// Runs an execution (or, with none, the opening alone) through the failover loop, then
    /// records it; sends the finished event.
    async fn run(
        &self,
        entry: &Entry,
        execution: Option<SessionExecuteRequest>,
        max_attempts: u32,
        events: RunEvents<'_>,
    ) -> Outcome<ExecFinished> {
        let mut record = tokio::select! {
            record = entry.record.lock() => record,
            _ = events.departure() => return Outcome::Cancelled,
        };
        entry
            .facts
            .lock()
            .expect("session facts poisoned")
            .idle_since = None;
        let registry = self.dispatcher.registry();
        let mut cell = SessionCell {
            record: &mut record,
            execution: execution.clone(),
            max_attempts,
            events,
            agents: self.dispatcher.agents().as_ref(),
            registry,
            prefer: self.least_used_node(),
            home_lost: false,
        };
        let (outcome, last) = failover::run(registry, &mut cell).await;
        if let (Outcome::Finished(finished), Some(execution)) = (&outcome, &execution) {
            if finished.state_lost {
                // Its interpreter started afresh: what the language's history built is gone
                // there, and must not come back where the session moves.
                record.forget_language(&execution.language);
            } else if finished.status() == ExecStatus::Ok {
                record.remember(execution, self.settings.history_bytes);
            }
        }
        {
            let mut facts = entry.facts.lock().expect("session facts poisoned");
            if let Some(home) = &record.home {
                facts.node_id = home.node_id.clone();
                facts.node_name = home.node_name.clone();
            }
            if let Some(execution) = &execution
                && let Ok(language) = Language::parse(&execution.language)
            {
                facts.languages.insert(language.name());
                facts.executions += 1;
            }
            facts.moves = record.moves;
            facts.idle_since = Some(Instant::now());
        }
        if execution.is_some() {
            let last = last.unwrap_or_default();
            let finished = |result, error| ClusterFinished {
                result,
                node_id: last.node_id.clone(),
                node_name: last.node_name.clone(),
                attempt: last.number,
                error,
            };
            let finished = match &outcome {
                Outcome::Finished(result) => finished(Some(result.clone()), String::new()),
                Outcome::Failed(error) => finished(None, error.clone()),
                Outcome::Rejected(_) | Outcome::Cancelled => return outcome,
            };
            let _ = events.send(Event::Finished(finished)).await;
        }
        outcome
    }

    /// The ready node holding the fewest sessions (by name among equals): sessions hold
    /// interpreters, so they are spread even while none runs anything.
    fn least_used_node(&self) -> Option<String> {
        let mut held: HashMap<String, usize> = HashMap::new();
        for entry in self.table().values() {
            let node = entry
                .facts
                .lock()
                .expect("session facts poisoned")
                .node_id
                .clone();
            *held.entry(node).or_default() += 1;
        }
        self.dispatcher
            .registry()
            .snapshot(Instant::now())
            .into_iter()
            .filter(|node| node.state == NodeState::Ready)
            .min_by_key(|node| held.get(&node.id).copied().unwrap_or(0))
            .map(|node| node.id)
    }

    /// Closes a session on its node and forgets it.
    pub async fn close(&self, name: &str) -> Result<ClusterSessionInfo, Status> {
        let entry = self.table().remove(name).ok_or_else(|| {
            Status::not_found(format!(
                "no session named '{name}' (sessions unused for {} are closed)",
                humantime::format_duration(self.settings.idle)
            ))
        })?;
        let described = info(name, &entry);
        let record = entry.record.lock().await;
        if let Some(home) = &record.home
            && let Err(status) = self.dispatcher.agents().close_session(home, name).await
        {
            tracing::info!(session = %name, node = %home.node_name, %status, "the node could not close the session");
        }
        Ok(described)
    }

    /// Follows the named session's sub-calls from now on: spending `budget` (shared with the
    /// run's parent and children), at `depth`, children asked like `children`.
    pub fn watch_subcalls(
        &self,
        session: &str,
        budget: Arc<Budget>,
        depth: u32,
        children: AskRequest,
    ) -> mpsc::UnboundedReceiver<RunNote> {
        let (notes, receiver) = mpsc::unbounded_channel();
        let watch = SubcallWatch {
            notes,
            budget,
            depth,
            children,
        };
        self.watched
            .lock()
            .expect("watches poisoned")
            .insert(session.to_string(), watch);
        receiver
    }

    /// Stops following the named session's sub-calls.
    pub fn unwatch_subcalls(&self, session: &str) {
        self.watched
            .lock()
            .expect("watches poisoned")
            .remove(session);
    }

    /// Who follows the named session's sub-calls, if anyone.
    pub fn subcall_watch(&self, session: &str) -> Option<SubcallWatch> {
        self.watched
            .lock()
            .expect("watches poisoned")
            .get(session)
            .cloned()
    }

    /// Which opening of the named session is live, if the coordinator holds it.
    pub fn incarnation(&self, name: &str) -> Option<u64> {
        self.table().get(name).map(|entry| entry.incarnation)
    }

    pub fn list(&self) -> Vec<ClusterSessionInfo> {
        self.forget_idle();
        let mut sessions: Vec<ClusterSessionInfo> = self
            .table()
            .iter()
            .map(|(name, entry)| info(name, entry))
            .collect();
        sessions.sort_by(|a, b| a.name.cmp(&b.name));
        sessions
    }
}

/// Whether two language names (aliases allowed) are one language.
fn same_language(a: &str, b: &str) -> bool {
    matches!((Language::parse(a), Language::parse(b)), (Ok(a), Ok(b)) if a == b)
}

fn info(name: &str, entry: &Entry) -> ClusterSessionInfo {
    let facts = entry.facts.lock().expect("session facts poisoned").clone();
    ClusterSessionInfo {
        name: name.to_string(),
        node_id: facts.node_id,
        node_name: facts.node_name,
        languages: facts.languages.iter().map(|l| l.to_string()).collect(),
        executions: facts.executions,
        idle_ms: facts
            .idle_since
            .map_or(0, |since| since.elapsed().as_millis() as u64),
        model: facts.model,
        moves: facts.moves,
    }
}

/// A session name: letters, digits, `.`, `_` and `-`, at most 128 bytes.
fn check_name(name: &str) -> Result<(), CoordinatorError> {
    if request_size::is_session_name(name) {
        Ok(())
    } else {
        Err(CoordinatorError::SessionName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_told_in_the_units_they_are_given_in() {
        assert_eq!(size_text(64 << 20), "64M");
        assert_eq!(size_text(1024), "1K");
        assert_eq!(size_text(3 << 30), "3G");
        assert_eq!(size_text(1536), "1536 bytes");
        assert_eq!(size_text(100), "100 bytes");
    }
}
