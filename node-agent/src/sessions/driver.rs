//! The per-language drivers: small programs, embedded in the agent, that the interpreter runs to
//! become a session's REPL. Each reads cells from the channel and answers with frames.

use std::ffi::OsString;

use kowalski_exo_common::Language;

use crate::sandbox::CHANNEL_FD;

const PYTHON: &str = include_str!("drivers/python.py");
const JAVASCRIPT: &str = include_str!("drivers/javascript.js");
const BASH: &str = include_str!("drivers/bash.sh");

/// How to start a language's driver.
#[derive(Debug)]
pub struct DriverInvocation {
    pub args: Vec<OsString>,
    /// Whether RLIMIT_AS may cap memory when no cgroup does (not for V8, which reserves large
    /// virtual ranges up front).
    pub address_space_rlimit: bool,
}

/// The arguments that make `language`'s runtime the session driver; `None` for a language
/// without one. `max_frame` bounds what the code may send the agent in one frame.
pub fn invocation(language: Language, max_frame: usize) -> Option<DriverInvocation> {
    let fd = CHANNEL_FD.to_string();
    let max = max_frame.to_string();
    let (args, address_space_rlimit): (Vec<&str>, bool) = match language {
        // Unbuffered, so output streams as it is printed; no .pyc files in the work directory.
        Language::Python => (vec!["-u", "-B", "-c", PYTHON, &fd, &max], true),
        Language::Javascript => (vec!["-e", JAVASCRIPT, "--", &fd, &max], false),
        Language::Bash => (vec!["--norc", "-c", BASH, "bash", &fd, &max], true),
        _ => return None,
    };
    Some(DriverInvocation {
        args: args.into_iter().map(OsString::from).collect(),
        address_space_rlimit,
    })
}
