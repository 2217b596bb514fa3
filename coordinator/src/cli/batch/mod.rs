//! `coordinator batch FILE.jsonl`: every task of a file over the cluster, N at a time, one
//! result line per task in the order they finish. State lives in SQLite, so a batch stopped
//! anyhow (Ctrl-C, a kill of the CLI, the coordinator restarting) goes on with `--resume`
//! without running a finished task again, and every task's result is recorded exactly once.
//!
//! - [`tasks`]: the file's tasks, checked before anything runs.
//! - [`store`]: the database of results.
//! - [`work`]: one task on the cluster.
//! - [`progress`]: the bar or the plain progress lines.

mod progress;
mod store;
mod tasks;
mod work;

use std::{
    collections::HashSet,
    fs::File,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
};

use clap::Args;
use futures_util::StreamExt;
use kowalski_exo_common::security::{self, files};

use super::{EXIT_CANCELLED, Failure, PREFIX, connect::Client, request::read_text};
use progress::Progress;
use store::Store;
use work::{ExecDefaults, Runner};

/// What `coordinator batch` takes besides the connection.
#[derive(Args, Debug)]
pub struct BatchArgs {
    /// The tasks, one JSON object per line: {"id", "lang", "code", "stdin"?, "args"?,
    /// "timeout"?} or {"id", "ask", "model", "context"?}.
    pub file: PathBuf,
    /// Where the result lines go [default: standard output]
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// The batch's database [default: batches/NAME-HASH.sqlite in the data directory]
    #[arg(long, value_name = "FILE")]
    pub db: Option<PathBuf>,
    /// Tasks in flight at once.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: u32,
    /// Go on with the batch the database holds: tasks recorded there are not run again.
    #[arg(long)]
    pub resume: bool,
    /// Run exec tasks in N warm sessions (python, js, bash), one task at a time each, instead
    /// of a fresh sandbox per task; what a task leaves in its session, the next one there sees.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub sessions: u32,
    /// Timeout of each exec task that sets none, in seconds.
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = super::request::parse_timeout)]
    pub timeout: u32,
    /// Attempts of each exec task on different nodes when nodes fail.
    #[arg(long, default_value_t = 3)]
    pub attempts: u32,
}

/// `coordinator batch`: runs the file's tasks that have no result yet; exits 0 when every task
/// of the file ended ok, 1 when some did not, 130 when interrupted.
pub async fn batch(client: Client, args: &BatchArgs) -> Result<u8, Failure> {
    let text = read_text(&args.file)?;
    let tasks = tasks::parse(&text)?;
    let digest = security::fingerprint(text.as_bytes());
    let db = match &args.db {
        Some(db) => db.clone(),
        None => default_db(&args.file)?,
    };
    let store = Store::open(&db, &digest, args.resume)?;
    let failed_db = |e: rusqlite::Error| Failure::infrastructure(format!("{}: {e}", db.display()));
    let recorded = store.results().map_err(failed_db)?;
    let ids: HashSet<&str> = tasks.iter().map(|t| t.id.as_str()).collect();
    let recorded: Vec<_> = recorded
        .into_iter()
        .filter(|r| ids.contains(r.id.as_str()))
        .collect();
    let mut out = Output::open(args.out.as_deref())?;
    // What was recorded before comes first, so the output holds every task once.
    for result in &recorded {
        out.line(&result.line)?;
    }
    let done: HashSet<&str> = recorded.iter().map(|r| r.id.as_str()).collect();
    let pending: Vec<&tasks::Task> = tasks
        .iter()
        .filter(|t| !done.contains(t.id.as_str()))
        .collect();
    eprintln!(
        "{PREFIX} batch of {} tasks, {} to run; state in {}",
        tasks.len(),
        pending.len(),
        db.display()
    );
    let failed_before = recorded.iter().filter(|r| !r.ok).count() as u64;
    let mut progress = Progress::new(tasks.len() as u64, done.len() as u64, failed_before);
    let defaults = ExecDefaults {
        timeout_ms: args.timeout,
        attempts: args.attempts,
        wait_for_nodes_ms: 5000,
    };
    let sessions = (0..args.sessions)
        .map(|i| format!("batch-{}-{i}", std::process::id()))
        .collect();
    let runner = Runner::new(client, defaults, sessions);
    let concurrency = args.concurrency as usize;
    let total = pending.len();
    let mut running = futures_util::stream::iter(pending)
        .map(|task| {
            let runner = &runner;
            async move { (task, runner.run(task).await) }
        })
        .buffer_unordered(concurrency);
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let (mut finished, mut failed) = (0, failed_before);
    progress.set_running(total.min(concurrency) as u64);
    let ended = loop {
        tokio::select! {
            next = running.next() => {
                let Some((task, outcome)) = next else { break "finished" };
                let line = outcome.line.to_string();
                if store.record(&task.id, outcome.ok, &line).map_err(failed_db)? {
                    out.line(&line)?;
                }
                finished += 1;
                if !outcome.ok {
                    failed += 1;
                }
                progress.set_running((total - finished).min(concurrency) as u64);
                progress.finished_one(outcome.ok);
            }
            _ = &mut interrupted => break "interrupted",
        }
    };
    // Tasks still in flight are dropped: their calls end, and --resume runs them again.
    drop(running);
    runner.close_sessions().await;
    progress.set_running(0);
    if ended == "interrupted" {
        progress.end("interrupted (--resume goes on with it)");
        return Ok(EXIT_CANCELLED);
    }
    progress.end(ended);
    Ok(u8::from(failed > 0))
}

/// Where result lines go, each flushed as it is written.
enum Output {
    File(BufWriter<File>, PathBuf),
    Stdout,
}

impl Output {
    fn open(path: Option<&Path>) -> Result<Output, Failure> {
        Ok(match path {
            Some(path) => {
                let file = File::create(path)
                    .map_err(|e| Failure::usage(format!("cannot write {}: {e}", path.display())))?;
                Output::File(BufWriter::new(file), path.to_path_buf())
            }
            None => Output::Stdout,
        })
    }

    fn line(&mut self, line: &str) -> Result<(), Failure> {
        match self {
            Output::File(file, path) => writeln!(file, "{line}")
                .and_then(|()| file.flush())
                .map_err(|e| {
                    Failure::infrastructure(format!("cannot write {}: {e}", path.display()))
                }),
            Output::Stdout => {
                let mut stdout = std::io::stdout().lock();
                writeln!(stdout, "{line}")
                    .and_then(|()| stdout.flush())
                    .map_err(|e| Failure::infrastructure(format!("cannot write the output: {e}")))
            }
        }
    }
}

/// The default database of a batch file: named after it and where it is, in the data directory.
fn default_db(file: &Path) -> Result<PathBuf, Failure> {
    if file.as_os_str() == "-" {
        return Err(Failure::usage(
            "a batch read from standard input needs --db FILE to keep its state in",
        ));
    }
    let absolute = std::fs::canonicalize(file)
        .map_err(|e| Failure::usage(format!("cannot read {}: {e}", file.display())))?;
    let place = security::fingerprint(absolute.as_os_str().as_encoded_bytes());
    let stem = file
        .file_stem()
        .map_or("batch".into(), |s| s.to_string_lossy());
    Ok(files::default_dir("batches").join(format!("{stem}-{}.sqlite", &place[..12])))
}
