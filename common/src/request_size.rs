//! How large a run request may be. The coordinator checks before placing a run and the agent
//! before running it, with the same limits and the same messages.

use crate::proto::ExecuteRequest;

/// Largest accepted source code, unless an agent is configured otherwise.
pub const MAX_CODE_BYTES: usize = 1024 * 1024;
/// Largest total size of a request's program arguments (well inside the launcher's job size).
pub const MAX_ARGS_BYTES: usize = 256 * 1024;
/// Most program arguments a request may pass.
pub const MAX_ARGS: usize = 4096;
/// Largest accepted standard input.
pub const MAX_STDIN_BYTES: usize = 16 * 1024 * 1024;

/// Largest gRPC message a server accepts: a request at every limit above, with room for the
/// rest of its fields. (tonic's own default, 4 MiB, would refuse stdin the limits allow.)
pub const MAX_MESSAGE_BYTES: usize = MAX_CODE_BYTES + MAX_ARGS_BYTES + MAX_STDIN_BYTES + 64 * 1024;

/// Longest session name, on agents and the coordinator alike.
pub const MAX_SESSION_NAME_BYTES: usize = 128;

/// A session name: 1 to 128 letters, digits, `.`, `_` and `-` (it names files and cgroups).
pub fn is_session_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SESSION_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// What makes a request too large or malformed to run anywhere.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OversizedRequest {
    #[error("code is {size} bytes; at most {limit} bytes are accepted")]
    Code { size: usize, limit: usize },
    #[error("arguments take {size} bytes; at most {limit} bytes are accepted")]
    Args { size: usize, limit: usize },
    #[error("{count} arguments; at most {limit} are accepted")]
    TooManyArgs { count: usize, limit: usize },
    #[error("argument {index} contains a NUL byte, which a program argument cannot hold")]
    NulInArgument { index: usize },
    #[error("stdin is {size} bytes; at most {limit} bytes are accepted")]
    Stdin { size: usize, limit: usize },
}

/// Checks code (against `max_code_bytes`), arguments and stdin.
pub fn check(request: &ExecuteRequest, max_code_bytes: usize) -> Result<(), OversizedRequest> {
    if request.code.len() > max_code_bytes {
        return Err(OversizedRequest::Code {
            size: request.code.len(),
            limit: max_code_bytes,
        });
    }
    if request.args.len() > MAX_ARGS {
        return Err(OversizedRequest::TooManyArgs {
            count: request.args.len(),
            limit: MAX_ARGS,
        });
    }
    let args_size: usize = request.args.iter().map(|a| a.len() + 1).sum();
    if args_size > MAX_ARGS_BYTES {
        return Err(OversizedRequest::Args {
            size: args_size,
            limit: MAX_ARGS_BYTES,
        });
    }
    if let Some(index) = request.args.iter().position(|a| a.contains('\0')) {
        return Err(OversizedRequest::NulInArgument { index });
    }
    if request.stdin.len() > MAX_STDIN_BYTES {
        return Err(OversizedRequest::Stdin {
            size: request.stdin.len(),
            limit: MAX_STDIN_BYTES,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_limit_is_named_with_the_size_found() {
        let request = |code: usize, args: Vec<String>, stdin: usize| ExecuteRequest {
            code: "x".repeat(code),
            args,
            stdin: vec![0; stdin],
            ..Default::default()
        };
        assert_eq!(check(&request(10, vec![], 0), 10), Ok(()));
        assert_eq!(
            check(&request(11, vec![], 0), 10),
            Err(OversizedRequest::Code {
                size: 11,
                limit: 10
            })
        );
        assert_eq!(
            check(&request(1, vec!["a\0b".into()], 0), 10),
            Err(OversizedRequest::NulInArgument { index: 0 })
        );
        let err = check(&request(1, vec![], MAX_STDIN_BYTES + 1), 10).unwrap_err();
        assert!(
            err.to_string().starts_with("stdin is 16777217 bytes"),
            "{err}"
        );
    }
}
