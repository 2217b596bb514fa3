//! Supervising one process of a run (the compiler, or the program): spawn it contained, feed
//! stdin, stream its output, and end its whole tree on exit, timeout, output cap or cancel.

use std::{ffi::OsString, io, os::fd::OwnedFd, path::Path, sync::Arc, time::Duration};

use kowalski_exo_common::proto::{self, exec_event::Event};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::unix::pipe,
    time::Instant,
};

use super::{
    launch::Invocation,
    output::{Interruption, RunOutput},
};
use crate::sandbox::{Command, Confinement, Containment, ContainmentReport, Sandbox, TreeLimits};

/// How long output is still read after the program exited, for children that keep its pipes
/// open and escaped the kill.
const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// Size of one read from a pipe, and so the largest output chunk.
const READ_CHUNK: usize = 64 * 1024;

/// One process to run under containment.
pub struct ProcessSpec<'a> {
    pub invocation: Invocation,
    pub workdir: &'a Path,
    pub base_env: &'a [(&'static str, OsString)],
    pub confinement: Confinement<'a>,
    pub stdin: &'a [u8],
    pub limits: TreeLimits,
    pub started: proto::ExecStarted,
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessExit {
    Code(i32),
    Signal(i32),
}

/// What one supervised process came to.
#[derive(Debug)]
pub struct ProcessResult {
    pub interruption: Option<Interruption>,
    pub exit: Option<ProcessExit>,
    pub cpu: Duration,
    pub max_rss_bytes: u64,
    pub containment: ContainmentReport,
}

/// Spawns and supervises one process. `Err` means it could not be started at all.
pub async fn supervise(
    spec: ProcessSpec<'_>,
    sandbox: &Sandbox,
    out: &mut RunOutput,
) -> io::Result<ProcessResult> {
    let env: Vec<(&'static str, OsString)> = spec
        .base_env
        .iter()
        .chain(&spec.invocation.env)
        .cloned()
        .collect();
    let command = Command {
        program: &spec.invocation.program,
        args: &spec.invocation.args,
        env: &env,
        cwd: spec.workdir,
        confinement: spec.confinement,
        keep_channel: false,
    };
    let (launched, containment) = sandbox.spawn(command, spec.limits).await?;
    let containment = Arc::new(containment);
    let pid = launched.pid;
    let streams = (|| {
        Ok::<_, io::Error>((
            pipe::Receiver::from_owned_fd(launched.stdout)?,
            pipe::Receiver::from_owned_fd(launched.stderr)?,
            feed_stdin(launched.stdin, spec.stdin.to_vec())?,
        ))
    })();
    let (stdout, stderr, stdin_writer) = match streams {
        Ok(streams) => streams,
        Err(e) => {
            kill_tree(&containment, pid, false).await;
            let _ = reap(pid).await;
            release(containment).await;
            return Err(e);
        }
    };
    let (mut stdout, mut stderr) = (Some(stdout), Some(stderr));
    // Waits for the exit but leaves the zombie, so the pid (and its process group) cannot be
    // reused before the tree is killed.
    let mut exited = tokio::task::spawn_blocking(move || wait_exited(pid));

    let mut interruption = out
        .send(Event::Started(proto::ExecStarted {
            pid,
            ..spec.started
        }))
        .await
        .err();
    let mut has_exited = false;
    let mut drain_deadline = out.deadline();
    let (mut out_buf, mut err_buf) = (vec![0u8; READ_CHUNK], vec![0u8; READ_CHUNK]);
    while interruption.is_none() && (!has_exited || stdout.is_some() || stderr.is_some()) {
        // Order matters: stopping conditions first, output before the drain deadline gives up.
        tokio::select! {
            biased;
            _ = out.cancel_token().cancelled() => interruption = Some(Interruption::Cancelled),
            _ = out.caller_gone() => interruption = Some(Interruption::Cancelled),
            _ = tokio::time::sleep_until(out.deadline()), if !has_exited => {
                interruption = Some(Interruption::Timeout)
            }
            _ = &mut exited, if !has_exited => {
                has_exited = true;
                // The run ends with its program: children it left behind go too.
                kill_tree(&containment, pid, true).await;
                drain_deadline = Instant::now() + DRAIN_GRACE;
            }
            read = read_some(&mut stdout, &mut out_buf) => {
                interruption = forward(read, &mut stdout, &out_buf, proto::OutputStream::Stdout, out).await;
            }
            read = read_some(&mut stderr, &mut err_buf) => {
                interruption = forward(read, &mut stderr, &err_buf, proto::OutputStream::Stderr, out).await;
            }
            _ = tokio::time::sleep_until(drain_deadline), if has_exited => break,
        }
    }
    stdin_writer.abort();
    if interruption.is_some() {
        kill_tree(&containment, pid, has_exited).await;
    }
    // Whatever is still unread (an escaped child holding a pipe, or a stopped run) is counted.
    discard_buffered(&mut stdout, &mut out_buf, out);
    discard_buffered(&mut stderr, &mut err_buf, out);
    let reaped = reap(pid).await;
    let containment = release(containment).await;
    let (exit, cpu, max_rss_bytes) = match reaped {
        Ok(w) => (Some(w.exit), w.cpu, w.max_rss_bytes),
        Err(e) => {
            tracing::warn!(pid, error = %e, "cannot collect exit status");
            (None, Duration::ZERO, 0)
        }
    };
    Ok(ProcessResult {
        interruption,
        exit,
        cpu,
        max_rss_bytes,
        containment,
    })
}

/// Reads what the program wrote, plus whatever else is already waiting in the pipe, so a
/// `print` that makes two writes (text, then newline) travels as one chunk.
pub(crate) async fn read_some(
    pipe: &mut Option<pipe::Receiver>,
    buf: &mut [u8],
) -> io::Result<usize> {
    let Some(pipe) = pipe else {
        return std::future::pending().await;
    };
    let mut filled = pipe.read(buf).await?;
    while filled > 0 && filled < buf.len() {
        match pipe.try_read(&mut buf[filled..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => filled += n,
        }
    }
    Ok(filled)
}

/// Sends what was read; closes the pipe at end of file.
async fn forward(
    read: io::Result<usize>,
    pipe: &mut Option<pipe::Receiver>,
    buf: &[u8],
    stream: proto::OutputStream,
    out: &mut RunOutput,
) -> Option<Interruption> {
    match read {
        Ok(0) | Err(_) => {
            *pipe = None;
            None
        }
        Ok(n) => out.output(stream, &buf[..n]).await.err(),
    }
}

/// Counts what is still buffered in a pipe after the run was stopped.
pub(crate) fn discard_buffered(
    pipe: &mut Option<pipe::Receiver>,
    buf: &mut [u8],
    out: &mut RunOutput,
) {
    if let Some(receiver) = pipe.take() {
        while let Ok(n) = receiver.try_read(buf) {
            if n == 0 {
                break;
            }
            out.discard(n);
        }
    }
}

fn feed_stdin(fd: OwnedFd, data: Vec<u8>) -> io::Result<tokio::task::JoinHandle<()>> {
    let mut sender = pipe::Sender::from_owned_fd(fd)?;
    Ok(tokio::spawn(async move {
        // A program that exits without reading its input closes the pipe: not an error.
        let _ = sender.write_all(&data).await;
    }))
}

pub(crate) async fn kill_tree(containment: &Arc<Containment>, leader: u32, leader_exited: bool) {
    let containment = containment.clone();
    let _ = tokio::task::spawn_blocking(move || containment.kill_tree(leader, leader_exited)).await;
}

/// Reaps the program once it has exited (killed or not). Waits for it if it has not yet.
pub(crate) async fn reap(pid: u32) -> io::Result<Waited> {
    tokio::task::spawn_blocking(move || wait_for(pid))
        .await
        .map_err(io::Error::other)?
}

/// Blocks until `pid` has exited, leaving it a zombie (waitid with WNOWAIT).
pub(crate) fn wait_exited(pid: u32) {
    loop {
        // SAFETY: an all-zero siginfo is a valid out-parameter for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes only into `info`.
        let done =
            unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if done == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

pub(crate) async fn release(containment: Arc<Containment>) -> ContainmentReport {
    tokio::task::spawn_blocking(move || match Arc::try_unwrap(containment) {
        Ok(containment) => containment.finish(),
        Err(_) => ContainmentReport::default(),
    })
    .await
    .unwrap_or_default()
}

/// Exit status and resource use of a reaped process.
pub(crate) struct Waited {
    pub exit: ProcessExit,
    pub cpu: Duration,
    pub max_rss_bytes: u64,
}

/// Reaps `pid` with wait4, which also reports its CPU time and peak resident size.
pub(crate) fn wait_for(pid: u32) -> io::Result<Waited> {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: wait4 writes only into the two out-parameters we own.
        let reaped = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut usage) };
        if reaped >= 0 {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    let exit = if libc::WIFSIGNALED(status) {
        ProcessExit::Signal(libc::WTERMSIG(status))
    } else {
        ProcessExit::Code(libc::WEXITSTATUS(status))
    };
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Ok(Waited {
        exit,
        cpu: Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime)),
        max_rss_bytes: usage.ru_maxrss as u64 * 1024,
    })
}
