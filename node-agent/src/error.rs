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
