//! The client subcommands: connecting (or starting a local cluster), building requests, and
//! what they print: tables and raw program output for people, one JSON object per line (the
//! shape in [`crate::json_events`]) for scripts, and the exit status.

pub mod ask;
pub mod batch;
pub mod connect;
pub mod follow;
pub mod inference;
pub mod nodes;
pub mod plan;
pub mod request;
pub mod service_unit;
pub mod sessions;
pub mod trust;

use kowalski_exo_common::{
    error_text::broken_transport,
    exit,
    proto::{ExecFinished, ExecStatus},
};
use serde::Serialize;
use tonic::{Code, Status};

use crate::json_events::ErrorLine;

/// Bad usage (clap uses it too).
pub const EXIT_USAGE: u8 = exit::USAGE;
/// No node can run the code.
pub const EXIT_NO_NODE: u8 = 3;
/// The cluster failed: coordinator unreachable, or every attempt lost.
pub const EXIT_INFRASTRUCTURE: u8 = exit::INFRASTRUCTURE;
/// The coordinator wants an API key, or not this one.
pub const EXIT_UNAUTHENTICATED: u8 = 5;
/// The code ran past its timeout.
pub const EXIT_TIMEOUT: u8 = 124;
/// The code went over its output, memory or CPU limit.
pub const EXIT_LIMIT: u8 = 125;
/// The run was cancelled.
pub const EXIT_CANCELLED: u8 = 130;

/// The prefix of every message the CLI writes itself.
pub const PREFIX: &str = "coordinator:";

/// The exit status for what a run came to: the code's own status when it ran.
pub fn exit_status(result: &ExecFinished) -> u8 {
    match result.status() {
        ExecStatus::Ok => 0,
        ExecStatus::NonzeroExit | ExecStatus::CompileError => {
            match (result.exit_code, result.signal) {
                (Some(code), _) => code.clamp(0, 255) as u8,
                (None, Some(signal)) => (128 + signal).clamp(0, 255) as u8,
                (None, None) => 1,
            }
        }
        ExecStatus::Timeout => EXIT_TIMEOUT,
        ExecStatus::OutputLimit | ExecStatus::MemoryLimit | ExecStatus::CpuLimit => EXIT_LIMIT,
        ExecStatus::Cancelled => EXIT_CANCELLED,
        ExecStatus::FailedToStart | ExecStatus::Unspecified => EXIT_INFRASTRUCTURE,
    }
}

/// A command that could not do its job, with the exit status it means.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub status: u8,
    /// The stable name of what went wrong, for the JSON `error` event: invalid_request,
    /// no_node, infrastructure or block_failed.
    pub code: &'static str,
    pub message: String,
    /// The block it concerns (RunBlocks), 1-based, with its line.
    pub block: Option<(u32, u32)>,
}

impl Failure {
    /// A failure named after its exit status.
    pub fn new(status: u8, message: impl Into<String>) -> Self {
        let code = match status {
            EXIT_USAGE => "invalid_request",
            EXIT_NO_NODE => "no_node",
            EXIT_UNAUTHENTICATED => "unauthenticated",
            _ => "infrastructure",
        };
        Failure {
            status,
            code,
            message: message.into(),
            block: None,
        }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Failure::new(EXIT_USAGE, message)
    }

    pub fn infrastructure(message: impl Into<String>) -> Self {
        Failure::new(EXIT_INFRASTRUCTURE, message)
    }

    /// A status from the coordinator at `addr`, as a sentence: a broken connection says so
    /// rather than quoting the transport.
    pub fn from_status(status: Status, addr: &str) -> Self {
        let exit = match status.code() {
            Code::FailedPrecondition => EXIT_NO_NODE,
            Code::InvalidArgument | Code::NotFound => EXIT_USAGE,
            Code::Unauthenticated | Code::PermissionDenied => EXIT_UNAUTHENTICATED,
            _ => EXIT_INFRASTRUCTURE,
        };
        if broken_transport(&status) {
            // A plaintext client talking to a TLS server sees only a broken connection.
            let hint = if addr.starts_with("http://") {
                " (a coordinator that runs with TLS needs --ca FILE, its authority.pem)"
            } else {
                ""
            };
            return Failure::new(
                exit,
                format!("lost the connection to the coordinator at {addr}{hint}"),
            );
        }
        Failure::new(exit, status.message().to_string())
    }

    /// Says what went wrong: on stderr, and with `json` as an `error` event on stdout too.
    pub fn report(&self, json: bool) {
        eprintln!("{PREFIX} {}", self.message);
        if json {
            print_json(&ErrorLine {
                event: "error",
                code: self.code,
                message: self.message.clone(),
                block: self.block.map(|(block, _)| block),
                line: self.block.map(|(_, line)| line),
            });
        }
    }
}

/// Prints one JSON object on a line of stdout.
pub fn print_json<T: Serialize>(value: &T) {
    match serde_json::to_string(value) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("{PREFIX} cannot encode JSON: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_is_the_codes_own_when_it_ran() {
        let finished = |status: ExecStatus, exit_code, signal| ExecFinished {
            status: status as i32,
            exit_code,
            signal,
            ..Default::default()
        };
        assert_eq!(exit_status(&finished(ExecStatus::Ok, Some(0), None)), 0);
        assert_eq!(
            exit_status(&finished(ExecStatus::NonzeroExit, Some(3), None)),
            3
        );
        assert_eq!(
            exit_status(&finished(ExecStatus::NonzeroExit, None, Some(9))),
            137
        );
        assert_eq!(
            exit_status(&finished(ExecStatus::Timeout, None, Some(9))),
            124
        );
        assert_eq!(
            exit_status(&finished(ExecStatus::MemoryLimit, None, Some(9))),
            125
        );
    }

    #[test]
    fn a_broken_transport_is_a_sentence_not_h2_jargon() {
        let status = Status::unknown("h2 protocol error: error reading a body from connection");
        let failure = Failure::from_status(status, "http://10.0.0.2:50051");
        assert_eq!(
            failure.message,
            "lost the connection to the coordinator at http://10.0.0.2:50051 (a coordinator that runs with TLS needs --ca FILE, its authority.pem)"
        );
        assert_eq!((failure.status, failure.code), (4, "infrastructure"));
        let refused =
            Failure::from_status(Status::failed_precondition("no node can run perl"), "x");
        assert_eq!((refused.status, refused.code), (3, "no_node"));
    }
}
