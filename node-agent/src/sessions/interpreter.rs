//! One warm interpreter of a session: its driver, started contained like a run (cgroup, user,
//! namespaces, Landlock) and kept, and the loop that runs one cell in it: output streamed,
//! sub-calls answered, an interrupt at the timeout, a kill when it will not stop.

use std::{io, os::fd::OwnedFd, sync::Arc, time::Duration};

use kowalski_exo_common::{
    Language,
    proto::{self, ExecStatus, exec_event::Event},
};
use nix::{sys::signal::Signal, unistd::Pid};
use serde::Deserialize;
use tokio::{
    net::{UnixStream, unix::pipe},
    task::JoinHandle,
    time::Instant,
};

use super::{
    driver,
    frames::{ChannelReader, FrameReader, FrameWriter, Received},
    subcalls::Subcalls,
};
use crate::{
    exec::{
        ExecLimits, Executor, finished_event,
        output::{Interruption, RunOutput},
        process::{self, ProcessResult},
    },
    sandbox::{Command, Confinement, Containment, TreeLimits, Workspace, runtime_tree},
};

/// How long an interrupted cell has to stop before its interpreter is killed.
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(2);
/// How often the interrupt is sent again during the grace period.
const INTERRUPT_REPEAT: Duration = Duration::from_millis(200);
/// How long a driver has to say it is ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Size of one read from an output pipe.
const READ_CHUNK: usize = 64 * 1024;
/// Most of a failed driver's stderr quoted when it cannot start.
const STARTUP_ERROR_BYTES: usize = 2048;

/// A running interpreter.
pub struct Interpreter {
    language: Language,
    pid: u32,
    runtime_version: String,
    isolation: proto::IsolationLevel,
    /// Taken when the interpreter is killed and reaped.
    containment: Option<Arc<Containment>>,
    stdout: Option<pipe::Receiver>,
    stderr: Option<pipe::Receiver>,
    frames: ChannelReader,
    writer: FrameWriter,
    /// Completes when the process has exited (it stays a zombie until reaped).
    exited: JoinHandle<()>,
    next_cell: u64,
}

/// Where and under which limits an interpreter runs.
pub struct Place<'a> {
    pub executor: &'a Executor,
    pub workspace: &'a Workspace,
    pub limits: &'a ExecLimits,
    pub network: bool,
    /// Largest frame the code may send (a batch of prompts).
    pub max_frame: usize,
}

/// How a cell ended.
pub struct CellEnd {
    pub finished: proto::ExecFinished,
    /// The interpreter is gone (reaped); the session starts a new one for the next cell.
    pub lost: bool,
}

/// The driver's account of a cell.
#[derive(Debug, Deserialize)]
struct Outcome {
    status: String,
    #[serde(default)]
    exit_code: Option<i32>,
    #[serde(default)]
    error: Option<String>,
}

/// Why an interpreter could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Runtime(#[from] crate::error::ExecError),
    #[error("{0}")]
    Failed(String),
}

impl Interpreter {
    /// Starts `language`'s driver in the session's work directory and waits until it is ready.
    pub async fn start(place: Place<'_>, language: Language) -> Result<Interpreter, StartError> {
        let invocation = driver::invocation(language, place.max_frame).ok_or_else(|| {
            StartError::Failed(format!(
                "sessions hold {} interpreters, not {language}",
                Language::session_names()
            ))
        })?;
        let (executable, runtime_version) = place.executor.runtime(language)?;
        let sandbox = place.executor.sandbox();
        let program = sandbox.program_path(&executable);
        let tree = runtime_tree(&program);
        let workdir = place.workspace.path();
        let env = place.executor.base_env(workdir, &place.workspace.tmp());
        let command = Command {
            program: &program,
            args: &invocation.args,
            env: &env,
            cwd: workdir,
            confinement: Confinement {
                workspace: place.workspace,
                network: place.network,
                runtime: tree.as_deref(),
            },
            keep_channel: true,
        };
        let limits = TreeLimits {
            cpu_seconds: place.limits.cpu_seconds,
            memory_bytes: place.limits.memory_bytes,
            max_processes: place.limits.max_processes,
            file_size_bytes: place.limits.file_size_bytes,
            open_files: place.limits.open_files,
            address_space_rlimit: invocation.address_space_rlimit,
        };
        let failed = |e: io::Error| StartError::Failed(format!("cannot start {language}: {e}"));
        let (launched, containment) = sandbox.spawn(command, limits).await.map_err(failed)?;
        let pid = launched.pid;
        // Cells read no input: stdin is at its end from the start.
        drop(launched.stdin);
        let pipes = (|| {
            Ok::<_, io::Error>((
                pipe::Receiver::from_owned_fd(launched.stdout)?,
                pipe::Receiver::from_owned_fd(launched.stderr)?,
                channel(launched.channel)?,
            ))
        })();
        let containment = Arc::new(containment);
        let (stdout, stderr, channel) = match pipes {
            Ok(pipes) => pipes,
            Err(e) => {
                process::kill_tree(&containment, pid, false).await;
                let _ = process::reap(pid).await;
                process::release(containment).await;
                return Err(failed(e));
            }
        };
        let (reading, writing) = channel.into_split();
        let mut interpreter = Interpreter {
            language,
            pid,
            runtime_version,
            isolation: place.executor.isolation(),
            containment: Some(containment),
            stdout: Some(stdout),
            stderr: Some(stderr),
            frames: FrameReader::new(reading, place.max_frame),
            writer: FrameWriter::new(writing),
            exited: tokio::task::spawn_blocking(move || process::wait_exited(pid)),
            next_cell: 1,
        };
        match interpreter.wait_ready().await {
            Ok(()) => Ok(interpreter),
            Err(reason) => {
                interpreter.stop().await;
                Err(StartError::Failed(format!(
                    "the {language} interpreter did not start: {reason}"
                )))
            }
        }
    }

    /// Waits for the driver's `ready` frame; on failure, says why with what it printed.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut stderr_text = Vec::new();
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            tokio::select! {
                frame = self.frames.next() => match frame {
                    Ok(Some(Received::Frame(frame))) if frame.kind == "ready" => return Ok(()),
                    Ok(Some(_)) => return Err("it spoke before it was ready".to_string()),
                    Ok(None) | Err(_) => break,
                },
                read = process::read_some(&mut self.stderr, &mut buf) => match read {
                    Ok(n) if n > 0 => {
                        let room = STARTUP_ERROR_BYTES.saturating_sub(stderr_text.len());
                        stderr_text.extend_from_slice(&buf[..n.min(room)]);
                    }
                    _ => self.stderr = None,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(format!("not ready within {START_TIMEOUT:?}"));
                }
            }
        }
        let text = String::from_utf8_lossy(&stderr_text).trim().to_string();
        Err(if text.is_empty() {
            "it exited".to_string()
        } else {
            format!("it exited, saying: {text}")
        })
    }

    /// Runs one cell to its end.
    pub async fn run_cell(
        &mut self,
        code: &str,
        started: proto::ExecStarted,
        out: &mut RunOutput,
        limits: &ExecLimits,
        subcalls: &Subcalls,
    ) -> CellEnd {
        // `limits`: the session's, with this cell's timeout and output cap.
        let cell = self.next_cell;
        self.next_cell += 1;
        let (mut out_buf, mut err_buf) = (vec![0u8; READ_CHUNK], vec![0u8; READ_CHUNK]);
        // Whatever was printed between cells (a background process) belongs to none.
        discard_pending(&mut self.stdout, &mut out_buf);
        discard_pending(&mut self.stderr, &mut err_buf);
        let mut interruption = out
            .send(Event::Started(proto::ExecStarted {
                pid: self.pid,
                runtime_version: self.runtime_version.clone(),
                ..started
            }))
            .await
            .err();
        if interruption.is_some() {
            // The caller left before the cell was sent: it never runs.
            return CellEnd {
                finished: finished_cell(b"{}", interruption, 0, self.isolation),
                lost: false,
            };
        }
        // An interpreter that does not read its channel cannot hold the cell past its timeout.
        let exec = self.writer.send("exec", cell, code.as_bytes());
        let sent = tokio::time::timeout_at(out.deadline(), exec).await;
        if !matches!(sent, Ok(Ok(()))) {
            let interruption = interruption.or(sent.is_err().then_some(Interruption::Timeout));
            return self.lost(interruption, limits).await;
        }
        let mut grace_ends = None;
        loop {
            // SIGINT again and again through the grace period: one that lands before the cell
            // starts, or while the cell catches it, must not cost the session its state.
            let again = grace_ends.map(|ends| next_repeat(ends, Instant::now()));
            tokio::select! {
                biased;
                _ = out.cancel_token().cancelled(), if interruption.is_none() => {
                    interruption = Some(Interruption::Cancelled);
                    grace_ends = Some(self.interrupt());
                }
                _ = out.caller_gone(), if interruption.is_none() => {
                    interruption = Some(Interruption::Cancelled);
                    grace_ends = Some(self.interrupt());
                }
                _ = tokio::time::sleep_until(out.deadline()), if interruption.is_none() => {
                    interruption = Some(Interruption::Timeout);
                    grace_ends = Some(self.interrupt());
                }
                _ = sleep_until(grace_ends) => return self.lost(interruption, limits).await,
                _ = sleep_until(again) => {
                    self.interrupt();
                }
                _ = &mut self.exited => return self.lost(interruption, limits).await,
                read = process::read_some(&mut self.stdout, &mut out_buf) => {
                    self.forward(read, proto::OutputStream::Stdout, &out_buf, out, &mut interruption, &mut grace_ends).await;
                }
                read = process::read_some(&mut self.stderr, &mut err_buf) => {
                    self.forward(read, proto::OutputStream::Stderr, &err_buf, out, &mut interruption, &mut grace_ends).await;
                }
                frame = self.frames.next() => match frame {
                    Ok(Some(Received::Frame(frame))) if frame.kind == "done" && frame.id == cell => {
                        self.drain(proto::OutputStream::Stdout, &mut out_buf, out).await;
                        self.drain(proto::OutputStream::Stderr, &mut err_buf, out).await;
                        return CellEnd {
                            finished: finished_cell(&frame.payload, interruption, out.dropped(), self.isolation),
                            lost: false,
                        };
                    }
                    Ok(Some(Received::Frame(frame))) => {
                        subcalls.answer(&frame.kind, frame.id, frame.payload, &self.writer);
                    }
                    Ok(Some(Received::Oversized { kind, id, length })) => {
                        subcalls.refuse_oversized(&kind, id, length, &self.writer);
                    }
                    Ok(None) | Err(_) => return self.lost(interruption, limits).await,
                },
            }
        }
    }

    /// Sends what a pipe gave; past the output cap the cell is interrupted.
    async fn forward(
        &mut self,
        read: io::Result<usize>,
        stream: proto::OutputStream,
        buf: &[u8],
        out: &mut RunOutput,
        interruption: &mut Option<Interruption>,
        grace_ends: &mut Option<Instant>,
    ) {
        let n = match read {
            Ok(n) if n > 0 => n,
            _ => {
                match stream {
                    proto::OutputStream::Stderr => self.stderr = None,
                    _ => self.stdout = None,
                }
                return;
            }
        };
        if interruption.is_some() {
            out.discard(n);
            return;
        }
        if let Err(reason) = out.output(stream, &buf[..n]).await {
            *interruption = Some(reason);
            *grace_ends = Some(self.interrupt());
        }
    }

    /// Sends what is still in a pipe once the cell is done (all it printed is there by then).
    async fn drain(&mut self, stream: proto::OutputStream, buf: &mut [u8], out: &mut RunOutput) {
        let pipe = match stream {
            proto::OutputStream::Stderr => &mut self.stderr,
            _ => &mut self.stdout,
        };
        let Some(receiver) = pipe else { return };
        while let Ok(n) = receiver.try_read(buf) {
            if n == 0 {
                break;
            }
            if out.output(stream, &buf[..n]).await.is_err() {
                break;
            }
        }
    }

    /// Interrupts the running cell (SIGINT to the interpreter's process group); returns when
    /// the grace period ends.
    fn interrupt(&self) -> Instant {
        let _ = nix::sys::signal::killpg(Pid::from_raw(self.pid as i32), Signal::SIGINT);
        Instant::now() + INTERRUPT_GRACE
    }

    /// The interpreter died or would not stop: kill what is left, reap it, and say why.
    /// `limits` are the session's with the cell's timeout and output cap, named in messages.
    async fn lost(&mut self, interruption: Option<Interruption>, limits: &ExecLimits) -> CellEnd {
        let result = self.end(interruption).await;
        let mut finished = finished_event(&result, limits, self.isolation);
        finished.state_lost = true;
        let what = match (interruption, result.exit) {
            (Some(_), _) => {
                format!("did not stop within {INTERRUPT_GRACE:?} of the interrupt and was killed")
            }
            (None, Some(process::ProcessExit::Code(code))) => format!("exited with status {code}"),
            (None, Some(process::ProcessExit::Signal(signal))) => {
                format!("was killed by signal {signal}")
            }
            (None, None) => "ended".to_string(),
        };
        let detail = match finished.message.as_str() {
            "" => String::new(),
            message => format!("{message}; "),
        };
        finished.message = format!(
            "{detail}the {} interpreter {what}: it starts afresh at the next execution, without what the session held",
            self.language
        );
        CellEnd {
            finished,
            lost: true,
        }
    }

    /// Kills the whole tree and reaps the interpreter.
    async fn end(&mut self, interruption: Option<Interruption>) -> ProcessResult {
        let has_exited = self.exited.is_finished();
        let containment = self.containment.take().expect("an interpreter ends once");
        process::kill_tree(&containment, self.pid, has_exited).await;
        self.stdout = None;
        self.stderr = None;
        let reaped = process::reap(self.pid).await;
        let containment = process::release(containment).await;
        let (exit, cpu, max_rss_bytes) = match reaped {
            Ok(w) => (Some(w.exit), w.cpu, w.max_rss_bytes),
            Err(_) => (None, Duration::ZERO, 0),
        };
        ProcessResult {
            interruption,
            exit,
            cpu,
            max_rss_bytes,
            containment,
        }
    }

    /// Ends the interpreter (the session closes).
    pub async fn stop(mut self) {
        if self.containment.is_some() {
            self.end(None).await;
        }
    }
}

impl Drop for Interpreter {
    /// An interpreter dropped without [`Interpreter::stop`] (the task holding it was
    /// cancelled) is killed and reaped all the same, off the async threads.
    fn drop(&mut self) {
        let Some(containment) = self.containment.take() else {
            return;
        };
        let pid = self.pid;
        let end = move || {
            containment.kill_tree(pid, false);
            let _ = process::wait_for(pid);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(end)),
            Err(_) => end(),
        }
    }
}

/// The finished event for a cell its driver reported done.
fn finished_cell(
    payload: &[u8],
    interruption: Option<Interruption>,
    dropped: u64,
    isolation: proto::IsolationLevel,
) -> proto::ExecFinished {
    let outcome: Outcome = serde_json::from_slice(payload).unwrap_or(Outcome {
        status: "error".to_string(),
        exit_code: Some(1),
        error: Some("the interpreter's report of the cell could not be read".to_string()),
    });
    let (status, exit_code, message) = match (interruption, outcome.status.as_str()) {
        (Some(Interruption::Timeout), _) => (
            ExecStatus::Timeout,
            None,
            "interrupted at its timeout; the session keeps its state".to_string(),
        ),
        (Some(Interruption::OutputLimit), _) => (
            ExecStatus::OutputLimit,
            None,
            "interrupted after printing past its output limit; the session keeps its state"
                .to_string(),
        ),
        (Some(Interruption::Cancelled), _) => (
            ExecStatus::Cancelled,
            None,
            "cancelled; the session keeps its state".to_string(),
        ),
        (None, "ok") => (ExecStatus::Ok, Some(0), String::new()),
        (None, "exit") => match outcome.exit_code.unwrap_or(0) {
            0 => (ExecStatus::Ok, Some(0), String::new()),
            code => (ExecStatus::NonzeroExit, Some(code), String::new()),
        },
        (None, "interrupted") => (
            ExecStatus::NonzeroExit,
            Some(1),
            "KeyboardInterrupt".to_string(),
        ),
        (None, _) => (
            ExecStatus::NonzeroExit,
            Some(1),
            outcome.error.unwrap_or_default(),
        ),
    };
    proto::ExecFinished {
        status: status as i32,
        exit_code,
        message,
        bytes_dropped: dropped,
        isolation: isolation as i32,
        ..Default::default()
    }
}

fn channel(fd: OwnedFd) -> io::Result<UnixStream> {
    let stream = std::os::unix::net::UnixStream::from(fd);
    stream.set_nonblocking(true)?;
    UnixStream::from_std(stream)
}

/// Reads and drops what a pipe holds now.
fn discard_pending(pipe: &mut Option<pipe::Receiver>, buf: &mut [u8]) {
    if let Some(receiver) = pipe {
        while let Ok(n) = receiver.try_read(buf) {
            if n == 0 {
                break;
            }
        }
    }
}

/// The next moment to interrupt again, on a grid of [`INTERRUPT_REPEAT`] from the first
/// interrupt (the grace period ending at `grace_ends`).
fn next_repeat(grace_ends: Instant, now: Instant) -> Instant {
    let first = grace_ends - INTERRUPT_GRACE;
    let repeats = now.saturating_duration_since(first).as_millis() / INTERRUPT_REPEAT.as_millis();
    first + INTERRUPT_REPEAT * (repeats as u32 + 1)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
