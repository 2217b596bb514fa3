//! What the client subcommands print: tables and raw program output for people, one JSON
//! object per line (stable field names) for scripts, and the exit status.

pub mod events;
pub mod nodes;
pub mod plan;

use kowalski_exo_common::proto::{ExecFinished, ExecStatus};

/// Bad usage (clap uses it too).
pub const EXIT_USAGE: u8 = 2;
/// No node can run the code.
pub const EXIT_NO_NODE: u8 = 3;
/// The cluster failed: coordinator unreachable, or every attempt lost.
pub const EXIT_INFRASTRUCTURE: u8 = 4;
/// The code ran past its timeout.
pub const EXIT_TIMEOUT: u8 = 124;
/// The code went over its output, memory or CPU limit.
pub const EXIT_LIMIT: u8 = 125;
/// The run was cancelled.
pub const EXIT_CANCELLED: u8 = 130;

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

/// The lower-case status name used in JSON lines, e.g. `nonzero_exit`.
pub fn status_name(status: ExecStatus) -> String {
    status
        .as_str_name()
        .trim_start_matches("EXEC_STATUS_")
        .to_ascii_lowercase()
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
        assert_eq!(status_name(ExecStatus::NonzeroExit), "nonzero_exit");
    }
}
