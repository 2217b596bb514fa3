//! Errors of the coordinator's services, and their one mapping to gRPC status codes.

use kowalski_exo_common::{Language, language::UnknownLanguage, request_size::OversizedRequest};
use tonic::Status;

use crate::{registry::NodeLookupError, scheduling::placement::Unplaceable};

/// Why a client's or an agent's request was refused.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("the request has no `{0}`")]
    MissingField(&'static str),
    #[error(transparent)]
    UnknownLanguage(#[from] UnknownLanguage),
    #[error(transparent)]
    Oversized(#[from] OversizedRequest),
    /// No node can ever take the run.
    #[error(transparent)]
    Unplaceable(#[from] Unplaceable),
    #[error(transparent)]
    NodeLookup(#[from] NodeLookupError),
    #[error(
        "sessions hold {} interpreters; {} has none: run it without a session",
        Language::session_names(),
        .0
    )]
    NoSessionLanguage(Language),
    #[error("'{0}' cannot name a session: use 1 to 128 letters, digits, '.', '_' and '-'")]
    SessionName(String),
    #[error(
        "`context` is read by the Recursive Language Model loop only: ask rlm:{0} to answer over it, or send it as a message to {0}"
    )]
    ContextWithoutLoop(String),
    /// An agent's registry stream broke the protocol.
    #[error("{0}")]
    Registration(&'static str),
}

impl From<CoordinatorError> for Status {
    fn from(err: CoordinatorError) -> Status {
        let message = err.to_string();
        match err {
            CoordinatorError::MissingField(_)
            | CoordinatorError::UnknownLanguage(_)
            | CoordinatorError::Oversized(_)
            | CoordinatorError::Registration(_)
            | CoordinatorError::NoSessionLanguage(_)
            | CoordinatorError::SessionName(_)
            | CoordinatorError::ContextWithoutLoop(_)
            | CoordinatorError::NodeLookup(NodeLookupError::Ambiguous(_)) => {
                Status::invalid_argument(message)
            }
            CoordinatorError::Unplaceable(Unplaceable::NoModel { .. }) => {
                Status::not_found(message)
            }
            CoordinatorError::Unplaceable(Unplaceable::ModelDown { .. }) => {
                Status::unavailable(message)
            }
            CoordinatorError::Unplaceable(_) => Status::failed_precondition(message),
            CoordinatorError::NodeLookup(NodeLookupError::Unknown(_)) => Status::not_found(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn each_refusal_has_its_status_and_keeps_its_message() {
        let cases = [
            (
                CoordinatorError::MissingField("execution"),
                Code::InvalidArgument,
            ),
            (
                CoordinatorError::NodeLookup(NodeLookupError::Unknown("nas".into())),
                Code::NotFound,
            ),
            (
                CoordinatorError::Unplaceable(Unplaceable::AllBusy),
                Code::FailedPrecondition,
            ),
            (
                CoordinatorError::Unplaceable(Unplaceable::NoModel {
                    model: "m".into(),
                    offered: Vec::new(),
                }),
                Code::NotFound,
            ),
            (
                CoordinatorError::Unplaceable(Unplaceable::ModelDown {
                    model: "m".into(),
                    down: vec![("a".into(), "connection refused".into())],
                }),
                Code::Unavailable,
            ),
        ];
        for (err, code) in cases {
            let message = err.to_string();
            let status = Status::from(err);
            assert_eq!((status.code(), status.message()), (code, message.as_str()));
        }
    }
}
