//! How each language is started: the command line of the compile step (rust, c) or of the
//! interpreter, with the runtime's own memory flags where an address-space rlimit would break it.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use kowalski_exo_common::Language;

use super::limits::ExecLimits;

/// Name of the compiled program inside the work directory.
pub const BINARY_NAME: &str = "program";

/// One process to start.
#[derive(Clone, Debug)]
pub struct Invocation {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Variables added to the run's small base environment.
    pub env: Vec<(&'static str, OsString)>,
    /// See [`crate::sandbox::TreeLimits::address_space_rlimit`].
    pub address_space_rlimit: bool,
}

impl Invocation {
    fn new(program: &Path) -> Self {
        Invocation {
            program: program.to_path_buf(),
            args: Vec::new(),
            env: Vec::new(),
            address_space_rlimit: true,
        }
    }

    fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    fn env(mut self, key: &'static str, value: impl Into<OsString>) -> Self {
        self.env.push((key, value.into()));
        self
    }
}

/// File name the code is written to (single-file Java launch needs a .java name).
pub fn source_file_name(language: Language) -> String {
    match language {
        Language::Java => "Main.java".to_string(),
        other => format!("main.{}", other.extension()),
    }
}

/// The interpreter command for an interpreted language, or `None` for compiled ones.
pub fn interpret(
    language: Language,
    runtime: &Path,
    source: &Path,
    limits: &ExecLimits,
    user_args: &[String],
    go_cache: &Path,
) -> Option<Invocation> {
    let memory_mib = (limits.memory_bytes / (1024 * 1024)).max(16);
    let plain = Invocation::new(runtime);
    let invocation = match language {
        Language::Python => plain
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .arg(source),
        Language::Bash | Language::Sh | Language::Ruby | Language::Perl => plain.arg(source),
        Language::Javascript => Invocation {
            address_space_rlimit: false,
            ..plain
        }
        .arg(format!("--max-old-space-size={}", memory_mib * 3 / 4))
        .arg(source),
        Language::Java => Invocation {
            address_space_rlimit: false,
            ..plain
        }
        .args([
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-XX:-UsePerfData",
        ])
        .arg(format!("-Xmx{}m", memory_mib / 2))
        .arg(source),
        Language::Go => Invocation {
            address_space_rlimit: false,
            ..plain
        }
        .env("GOCACHE", go_cache)
        .env("GOTOOLCHAIN", "local")
        .env("GOMEMLIMIT", format!("{memory_mib}MiB"))
        .arg("run")
        .arg(source),
        Language::Rust | Language::C => return None,
    };
    Some(invocation.args(user_args))
}

/// The compiler command that turns `source` into `output`, for compiled languages.
pub fn compile(language: Language, compiler: &Path, source: &Path, output: &Path) -> Invocation {
    let compiler = Invocation {
        address_space_rlimit: false,
        ..Invocation::new(compiler)
    };
    match language {
        Language::Rust => compiler
            .args([
                "--edition",
                "2021",
                "-C",
                "opt-level=2",
                "-C",
                "debuginfo=0",
                "-o",
            ])
            .arg(output)
            .arg(source),
        _ => compiler
            .args(["-O2", "-o"])
            .arg(output)
            .arg(source)
            .arg("-lm"),
    }
}

/// The command that runs a compiled program.
pub fn run_binary(binary: &Path, user_args: &[String]) -> Invocation {
    Invocation::new(binary).args(user_args)
}
