//! What `exec` and `run` send: the code or document, the program's standard input, the limits
//! and timeout from flags, each read or parsed with an error that names what was wrong.

use std::{
    io::{IsTerminal, Read},
    path::Path,
};

use kowalski_exo_common::{Language, proto::ExecLimits, request_size::MAX_STDIN_BYTES};

use super::Failure;
use crate::codeblocks;

/// `--timeout SECONDS` (fractions allowed; 0 means the agent's default) as milliseconds.
pub fn parse_timeout(s: &str) -> Result<u32, String> {
    codeblocks::timeout_ms(s).ok_or_else(|| format!("'{s}' is not a number of seconds"))
}

/// The limits the flags ask for, or None when they ask for none (the agent's defaults hold).
pub fn limits(
    memory: Option<u64>,
    cpu_seconds: Option<u32>,
    output: Option<u64>,
    disk: Option<u64>,
) -> Option<ExecLimits> {
    let asked = memory.is_some() || cpu_seconds.is_some() || output.is_some() || disk.is_some();
    asked.then(|| ExecLimits {
        memory_bytes: memory.unwrap_or(0),
        cpu_seconds: cpu_seconds.unwrap_or(0),
        output_bytes: output.unwrap_or(0),
        disk_bytes: disk.unwrap_or(0),
        ..Default::default()
    })
}

/// Reads a file's bytes, or standard input's for "-".
pub fn read_bytes(file: &Path) -> Result<Vec<u8>, Failure> {
    let read = if file.as_os_str() == "-" {
        let mut data = Vec::new();
        std::io::stdin().read_to_end(&mut data).map(|_| data)
    } else {
        std::fs::read(file)
    };
    read.map_err(|e| Failure::usage(format!("cannot read {}: {e}", file.display())))
}

/// Reads a file, or standard input for "-".
pub fn read_text(file: &Path) -> Result<String, Failure> {
    let read = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(file)
    };
    read.map_err(|e| Failure::usage(format!("cannot read {}: {e}", file.display())))
}

/// The program's standard input: `--stdin FILE`, else whatever is piped to this command unless
/// the code itself came from standard input or it is a terminal.
pub fn program_stdin(stdin_file: Option<&Path>, code_from_stdin: bool) -> Result<Vec<u8>, Failure> {
    let too_large = || {
        Failure::usage(format!(
            "standard input for the program is over {MAX_STDIN_BYTES} bytes, the most a run takes"
        ))
    };
    let data = match stdin_file {
        Some(path) => std::fs::read(path)
            .map_err(|e| Failure::usage(format!("cannot read {}: {e}", path.display())))?,
        None if code_from_stdin || std::io::stdin().is_terminal() => return Ok(Vec::new()),
        None => {
            let mut data = Vec::new();
            std::io::stdin()
                .take(MAX_STDIN_BYTES as u64 + 1)
                .read_to_end(&mut data)
                .map_err(|e| Failure::usage(format!("cannot read standard input: {e}")))?;
            data
        }
    };
    if data.len() > MAX_STDIN_BYTES {
        return Err(too_large());
    }
    Ok(data)
}

/// Refuses a source file given to `run`, which takes Markdown, pointing at `exec`.
pub fn check_markdown(file: &Path, document: &str) -> Result<(), Failure> {
    let has_fence = document
        .lines()
        .any(|l| l.trim_start().starts_with("```") || l.trim_start().starts_with("~~~"));
    let extension = file.extension().and_then(|e| e.to_str()).unwrap_or("");
    match Language::parse(extension) {
        Ok(language) if !has_fence => Err(Failure::usage(format!(
            "{} is {language} source, not Markdown; run it with `coordinator exec --lang {} {}`",
            file.display(),
            language.name(),
            file.display()
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_timeout_means_the_default_and_fractions_count() {
        assert_eq!(parse_timeout("0"), Ok(0));
        assert_eq!(parse_timeout("0.5"), Ok(500));
        assert!(parse_timeout("soon").is_err());
    }

    #[test]
    fn a_source_file_given_to_run_points_at_exec() {
        let failure = check_markdown(Path::new("script.rs"), "fn main() {}\n").unwrap_err();
        assert_eq!(failure.status, 2);
        assert_eq!(
            failure.message,
            "script.rs is rust source, not Markdown; run it with `coordinator exec --lang rust script.rs`"
        );
        assert!(check_markdown(Path::new("notes.md"), "text").is_ok());
    }
}
