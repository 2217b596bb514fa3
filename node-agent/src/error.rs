//! Errors of the node agent (runs and generations), and their one mapping to gRPC status codes.

use kowalski_exo_common::{Language, language::UnknownLanguage, request_size::OversizedRequest};
use tonic::Status;

use crate::backends::{BackendError, catalog::ModelUnavailable};

/// Why an execution request was refused before it ran.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    UnknownLanguage(#[from] UnknownLanguage),
    #[error(transparent)]
    Oversized(#[from] OversizedRequest),
    #[error("{language} cannot run on this device: {reason}; healthy runtimes here: {available}")]
    RuntimeUnavailable {
        language: Language,
        reason: String,
        available: String,
    },
    #[error(
        "this agent is busy: {capacity} runs in progress and {queue} queued, the most it takes; retry later or on another node"
    )]
    Busy { capacity: usize, queue: usize },
    #[error("the agent is shutting down; running work was stopped")]
    ShuttingDown,
    #[error(
        "this node does not let runs use the network (its owner can allow it with node-agent --allow-network); run without network access or on another node"
    )]
    NetworkRefused,
}

impl From<ExecError> for Status {
    fn from(err: ExecError) -> Status {
        let message = err.to_string();
        match err {
            ExecError::UnknownLanguage(_) | ExecError::Oversized(_) => {
                Status::invalid_argument(message)
            }
            ExecError::RuntimeUnavailable { .. } | ExecError::NetworkRefused => {
                Status::failed_precondition(message)
            }
            ExecError::Busy { .. } => Status::resource_exhausted(message),
            ExecError::ShuttingDown => Status::unavailable(message),
        }
    }
}

/// Why a session request was refused.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(
        "no session '{id}' on this node: it was never opened here, was closed, or closed after {idle:?} idle"
    )]
    NotFound {
        id: String,
        idle: std::time::Duration,
    },
    #[error("a session named '{0}' is open on this node already")]
    Exists(String),
    #[error(
        "this node holds {limit} sessions, the most it keeps (node-agent --max-sessions); close one, or open it on another node"
    )]
    TooMany { limit: usize },
    #[error("'{0}' cannot name a session: use at most 128 letters, digits, '.', '_' and '-'")]
    InvalidName(String),
    #[error(
        "sessions hold {} interpreters; {} has none: run it without a session",
        Language::session_names(),
        .0
    )]
    NoInterpreter(Language),
    #[error("{0}")]
    Start(String),
}

impl From<crate::sessions::StartError> for SessionError {
    fn from(err: crate::sessions::StartError) -> Self {
        match err {
            crate::sessions::StartError::Runtime(e) => SessionError::Exec(e),
            crate::sessions::StartError::Failed(message) => SessionError::Start(message),
        }
    }
}

impl From<SessionError> for Status {
    fn from(err: SessionError) -> Status {
        let message = err.to_string();
        match err {
            SessionError::Exec(e) => e.into(),
            SessionError::NotFound { .. } => Status::not_found(message),
            SessionError::Exists(_) => Status::already_exists(message),
            SessionError::TooMany { .. } => Status::resource_exhausted(message),
            SessionError::InvalidName(_) | SessionError::NoInterpreter(_) => {
                Status::invalid_argument(message)
            }
            SessionError::Start(_) => Status::failed_precondition(message),
        }
    }
}

/// Why a generation was refused or broke off.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error(transparent)]
    Model(#[from] ModelUnavailable),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("the agent is shutting down; generations were stopped")]
    ShuttingDown,
}

impl From<InferenceError> for Status {
    fn from(err: InferenceError) -> Status {
        let message = err.to_string();
        match err {
            InferenceError::Model(ModelUnavailable::Unknown { .. })
            | InferenceError::Backend(BackendError::Refused { status: 404, .. }) => {
                Status::not_found(message)
            }
            InferenceError::Backend(BackendError::Refused { status: 429, .. }) => {
                Status::resource_exhausted(message)
            }
            // The request itself is wrong; another backend would refuse it too.
            InferenceError::Backend(BackendError::Refused {
                status: 400 | 413 | 422,
                ..
            }) => Status::invalid_argument(message),
            InferenceError::Backend(BackendError::Malformed { .. }) => Status::internal(message),
            InferenceError::Backend(BackendError::NoTokenizer { .. }) => {
                Status::unimplemented(message)
            }
            InferenceError::Model(ModelUnavailable::Down { .. })
            | InferenceError::Backend(_)
            | InferenceError::ShuttingDown => Status::unavailable(message),
        }
    }
}

impl From<crate::admission::Full> for ExecError {
    fn from(full: crate::admission::Full) -> Self {
        ExecError::Busy {
            capacity: full.capacity,
            queue: full.queue,
        }
    }
}
