//! Sessions: warm interpreters that keep their state across executions, each session in a work
//! directory of its own and under the same containment as a run. Bounded in number, closed when
//! idle, and reached by executions one at a time.
//!
//! - [`session`]: one session's work directory, interpreters and limits.
//! - [`interpreter`]: one interpreter's driver process and the loop that runs a cell in it.
//! - [`driver`]: the embedded per-language drivers.
//! - [`frames`]: the private channel between the agent and an interpreter.
//! - [`subcalls`]: what code in a session asks of the cluster's models.

mod driver;
mod frames;
mod interpreter;
mod session;
mod subcalls;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use kowalski_exo_common::{
    Language,
    proto::{self, ExecStatus},
    request_size::{self, MAX_CODE_BYTES, OversizedRequest},
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use interpreter::{INTERRUPT_GRACE, StartError};

use crate::{
    admission::Admission,
    error::{ExecError, SessionError},
    exec::{EventSender, Executor, output::RunOutput},
    link::CoordinatorLink,
};
use session::Session;
use subcalls::Subcalls;

/// Largest call code in a session may send (a batch of prompts with its options).
pub const MAX_SUBCALL_BYTES: usize = 8 * 1024 * 1024;
/// Prompts of one session in flight at once, unless it asks for another number.
pub const DEFAULT_SUBCALLS_IN_FLIGHT: usize = 64;
/// The most prompts in flight a session may ask for.
const MAX_SUBCALLS_IN_FLIGHT: usize = 256;
/// Idle sessions close after this long, unless the owner says otherwise (`--session-idle`).
pub const DEFAULT_IDLE: Duration = Duration::from_secs(600);
/// Sessions a node holds at once, unless the owner says otherwise (`--max-sessions`).
pub const DEFAULT_MAX_SESSIONS: usize = 32;
/// CPU seconds a session's interpreter may use over its life, unless it asks for other.
const SESSION_CPU_SECONDS: u32 = 3600;

/// What the owner lets sessions be.
#[derive(Clone, Copy, Debug)]
pub struct SessionConfig {
    /// A session unused this long is closed.
    pub idle: Duration,
    /// Sessions held at once.
    pub max_sessions: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            idle: DEFAULT_IDLE,
            max_sessions: DEFAULT_MAX_SESSIONS,
        }
    }
}

/// The sessions of this agent.
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Inner>,
}

struct Inner {
    executor: Arc<Executor>,
    admission: Admission,
    config: SessionConfig,
    table: Mutex<HashMap<String, Entry>>,
    /// Parent of every session's cancellation: the agent's shutdown.
    shutdown: CancellationToken,
    serial: AtomicU64,
    /// How code in a session reaches the cluster's models; `None` stand-alone.
    link: Option<CoordinatorLink>,
}

/// A session and what can be said of it without waiting for its lock.
#[derive(Clone)]
struct Entry {
    session: Arc<tokio::sync::Mutex<Session>>,
    facts: Arc<Mutex<Facts>>,
    /// Cancelled when the session closes: a running execution is interrupted.
    closing: CancellationToken,
}

#[derive(Debug, Clone)]
struct Facts {
    languages: Vec<Language>,
    executions: u64,
    /// When the last execution ended; `None` while one runs.
    idle_since: Option<Instant>,
    /// Executions admitted and not yet finished (running or waiting for their turn).
    pending: usize,
    model: String,
    network: bool,
}

impl Sessions {
    pub fn new(
        executor: Arc<Executor>,
        admission: Admission,
        config: SessionConfig,
        shutdown: CancellationToken,
        link: Option<CoordinatorLink>,
    ) -> Self {
        Sessions {
            inner: Arc::new(Inner {
                executor,
                admission,
                config,
                table: Mutex::new(HashMap::new()),
                shutdown,
                serial: AtomicU64::new(1),
                link,
            }),
        }
    }

    /// Closes idle sessions from now until shutdown, then every session.
    pub async fn keep_tidy(self) {
        let tick =
            (self.inner.config.idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let mut ticker = tokio::time::interval(tick);
        loop {
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let idle: Vec<String> = self
                .table()
                .iter()
                .filter(|(_, entry)| {
                    let facts = entry.facts.lock().expect("session facts poisoned");
                    facts.pending == 0
                        && facts
                            .idle_since
                            .is_some_and(|since| since.elapsed() >= self.inner.config.idle)
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in idle {
                tracing::info!(session = %id, idle = ?self.inner.config.idle, "closing an idle session");
                let _ = self.close(&id).await;
            }
        }
        let all: Vec<String> = self.table().keys().cloned().collect();
        for id in all {
            let _ = self.close(&id).await;
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.inner.table.lock().expect("session table poisoned")
    }

    /// Opens a session and starts the interpreters it names.
    pub async fn open(
        &self,
        request: proto::OpenSessionRequest,
    ) -> Result<proto::SessionInfo, SessionError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(ExecError::ShuttingDown.into());
        }
        let id = match request.session_id.as_str() {
            "" => format!(
                "session-{}-{}",
                std::process::id(),
                self.inner.serial.fetch_add(1, Ordering::Relaxed)
            ),
            name => check_name(name)?.to_string(),
        };
        let languages = request
            .languages
            .iter()
            .map(|name| session_language(name))
            .collect::<Result<Vec<_>, _>>()?;
        let executor = &self.inner.executor;
        let policy = executor.policy();
        if request.network && !policy.allow_network {
            return Err(ExecError::NetworkRefused.into());
        }
        self.check_room(&id)?;
        let defaults = crate::exec::ExecLimits {
            cpu_seconds: SESSION_CPU_SECONDS,
            ..policy.defaults
        };
        let limits = defaults.with_request(0, request.limits.as_ref(), &policy.ceiling);
        let subcalls_limit = match request.max_subcalls_in_flight {
            0 => DEFAULT_SUBCALLS_IN_FLIGHT,
            n => (n as usize).min(MAX_SUBCALLS_IN_FLIGHT),
        };
        let workspace = executor
            .workspace(limits.disk_bytes)
            .await
            .map_err(SessionError::Start)?;
        let subcalls = Subcalls::new(
            id.clone(),
            request.model.clone(),
            subcalls_limit,
            self.inner.link.clone(),
        );
        let mut session = Session::new(workspace, limits, request.network, subcalls);
        for language in languages {
            if let Err(e) = session.ensure(executor, language).await {
                session.close().await;
                return Err(e.into());
            }
        }
        let facts = Facts {
            languages: session.languages(),
            executions: 0,
            idle_since: Some(Instant::now()),
            pending: 0,
            model: request.model,
            network: request.network,
        };
        let entry = Entry {
            session: Arc::new(tokio::sync::Mutex::new(session)),
            facts: Arc::new(Mutex::new(facts)),
            closing: self.inner.shutdown.child_token(),
        };
        let refused = {
            let mut table = self.table();
            let refused = self.refusal(&table, &id);
            if refused.is_none() {
                table.insert(id.clone(), entry.clone());
            }
            refused
        };
        if let Some(refused) = refused {
            entry.session.lock().await.close().await;
            return Err(refused);
        }
        tracing::info!(session = %id, languages = ?entry.facts.lock().expect("session facts poisoned").languages, "session opened");
        Ok(info(&id, &entry))
    }

    /// Refuses a name in use, or a session past the node's limit.
    fn check_room(&self, id: &str) -> Result<(), SessionError> {
        match self.refusal(&self.table(), id) {
            Some(refused) => Err(refused),
            None => Ok(()),
        }
    }

    fn refusal(&self, table: &HashMap<String, Entry>, id: &str) -> Option<SessionError> {
        if table.contains_key(id) {
            return Some(SessionError::Exists(id.to_string()));
        }
        (table.len() >= self.inner.config.max_sessions).then_some(SessionError::TooMany {
            limit: self.inner.config.max_sessions,
        })
    }

    fn entry(&self, id: &str) -> Result<Entry, SessionError> {
        self.table()
            .get(id)
            .cloned()
            .ok_or_else(|| SessionError::NotFound {
                id: id.to_string(),
                idle: self.inner.config.idle,
            })
    }

    /// Checks an execution and takes its place in the agent's queue; the returned run does the
    /// rest.
    pub fn prepare(
        &self,
        request: proto::SessionExecuteRequest,
    ) -> Result<PreparedCell, SessionError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(ExecError::ShuttingDown.into());
        }
        let language = session_language(&request.language)?;
        if request.code.len() > MAX_CODE_BYTES {
            return Err(ExecError::Oversized(OversizedRequest::Code {
                size: request.code.len(),
                limit: MAX_CODE_BYTES,
            })
            .into());
        }
        let entry = self.entry(&request.session_id)?;
        let ticket = self.inner.admission.enter().map_err(ExecError::from)?;
        entry.facts.lock().expect("session facts poisoned").pending += 1;
        Ok(PreparedCell {
            sessions: self.clone(),
            _pending: Pending(entry.facts.clone()),
            entry,
            language,
            request,
            ticket,
        })
    }

    /// Closes a session: a running execution is interrupted, the interpreters killed and the
    /// work directory removed.
    pub async fn close(&self, id: &str) -> Result<proto::SessionInfo, SessionError> {
        let entry = self
            .table()
            .remove(id)
            .ok_or_else(|| SessionError::NotFound {
                id: id.to_string(),
                idle: self.inner.config.idle,
            })?;
        entry.closing.cancel();
        let described = info(id, &entry);
        entry.session.lock().await.close().await;
        tracing::info!(session = %id, "session closed");
        Ok(described)
    }

    pub fn list(&self) -> Vec<proto::SessionInfo> {
        let mut sessions: Vec<proto::SessionInfo> = self
            .table()
            .iter()
            .map(|(id, entry)| info(id, entry))
            .collect();
        sessions.sort_by(|a, b| a.session_id.cmp(&b.session_id));
        sessions
    }

    /// Sessions held now.
    pub fn count(&self) -> usize {
        self.table().len()
    }
}

/// An execution admitted to the agent's queue.
pub struct PreparedCell {
    sessions: Sessions,
    entry: Entry,
    language: Language,
    request: proto::SessionExecuteRequest,
    ticket: crate::admission::Ticket,
    /// Keeps the session from closing as idle while the execution waits or runs.
    _pending: Pending,
}

/// One execution admitted to a session and not yet finished.
struct Pending(Arc<Mutex<Facts>>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.lock().expect("session facts poisoned").pending -= 1;
    }
}

impl PreparedCell {
    /// Waits for a run slot and the session, runs the cell and returns its finished event:
    /// `Ok(None)` when the caller went away or the agent shut down before it started, NotFound
    /// when the session was closed meanwhile.
    pub async fn run(
        self,
        events: &EventSender,
    ) -> Result<Option<proto::ExecFinished>, SessionError> {
        let PreparedCell {
            sessions,
            entry,
            language,
            request,
            ticket,
            _pending,
        } = self;
        let closed = || SessionError::NotFound {
            id: request.session_id.clone(),
            idle: sessions.inner.config.idle,
        };
        let cancel = entry.closing.child_token();
        let _slot = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(closed()),
            _ = events.closed() => return Ok(None),
            slot = ticket.wait_for_slot() => slot,
        };
        let mut session = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(closed()),
            _ = events.closed() => return Ok(None),
            session = entry.session.lock() => session,
        };
        if cancel.is_cancelled() {
            return Err(closed());
        }
        let began = std::time::Instant::now();
        entry
            .facts
            .lock()
            .expect("session facts poisoned")
            .idle_since = None;
        let executor = &sessions.inner.executor;
        let policy = executor.policy();
        let cell_limits = crate::exec::ExecLimits {
            timeout: policy
                .defaults
                .with_request(request.timeout_ms, None, &policy.ceiling)
                .timeout,
            output_bytes: match request.output_bytes {
                0 => policy.defaults.output_bytes,
                n => n.min(policy.ceiling.output_bytes),
            },
            ..*session.limits()
        };
        let started = proto::ExecStarted {
            stage: proto::ExecStage::Run as i32,
            isolation: executor.isolation() as i32,
            run_id: request.run_id.clone(),
            ..Default::default()
        };
        let mut finished = match session.ensure(executor, language).await {
            Ok(()) => {
                let deadline = Instant::now() + cell_limits.timeout;
                let mut out =
                    RunOutput::new(events.clone(), cancel, deadline, cell_limits.output_bytes);
                session
                    .run(language, &request.code, started, &mut out, &cell_limits)
                    .await
            }
            Err(e) => proto::ExecFinished {
                status: ExecStatus::FailedToStart as i32,
                message: e.to_string(),
                isolation: executor.isolation() as i32,
                ..Default::default()
            },
        };
        finished.wall_micros = began.elapsed().as_micros() as u64;
        {
            let mut facts = entry.facts.lock().expect("session facts poisoned");
            facts.languages = session.languages();
            facts.executions += 1;
            facts.idle_since = Some(Instant::now());
        }
        tracing::debug!(
            session = %request.session_id,
            language = %language,
            status = ?finished.status(),
            wall_us = finished.wall_micros,
            "session execution finished"
        );
        Ok(Some(finished))
    }
}

fn info(id: &str, entry: &Entry) -> proto::SessionInfo {
    let facts = entry.facts.lock().expect("session facts poisoned").clone();
    proto::SessionInfo {
        session_id: id.to_string(),
        languages: facts
            .languages
            .iter()
            .map(|l| l.name().to_string())
            .collect(),
        executions: facts.executions,
        idle_ms: facts
            .idle_since
            .map_or(0, |since| since.elapsed().as_millis() as u64),
        model: facts.model,
        network: facts.network,
        busy: facts.idle_since.is_none(),
    }
}

/// A language sessions hold an interpreter for.
fn session_language(name: &str) -> Result<Language, SessionError> {
    let language = Language::parse(name).map_err(ExecError::from)?;
    if !language.in_sessions() {
        return Err(SessionError::NoInterpreter(language));
    }
    Ok(language)
}

/// A session name: letters, digits, `.`, `_` and `-`, at most 128 bytes.
fn check_name(name: &str) -> Result<&str, SessionError> {
    if request_size::is_session_name(name) {
        Ok(name)
    } else {
        Err(SessionError::InvalidName(name.to_string()))
    }
}
