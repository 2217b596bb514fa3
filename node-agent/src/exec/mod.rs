//! Running code: a request is checked ([`Executor::prepare`]), then run in a fresh work
//! directory, through a compile step where the language has one, with every event streamed.

mod build_cache;
mod launch;
pub mod limits;
pub(crate) mod output;
pub(crate) mod process;

use std::{
    ffi::OsString,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use kowalski_exo_common::{
    Language,
    proto::{self, ExecStatus, IsolationLevel},
    request_size,
};
use tokio_util::sync::CancellationToken;

pub use build_cache::BuildCache;
pub use limits::ExecLimits;
pub use output::EventSender;

use crate::{
    error::ExecError,
    fingerprint::{FingerprintWatch, RuntimeHealth},
    sandbox::{Confinement, Sandbox, TreeLimits, Workspace, runtime_tree},
};
use output::{Interruption, RunOutput};
use process::{ProcessExit, ProcessResult, ProcessSpec};

/// Memory and process floors for compilers, which need more than a small program.
const COMPILE_MEMORY_FLOOR: u64 = 2 * 1024 * 1024 * 1024;
const COMPILE_PROCESSES_FLOOR: u32 = 256;
/// Locale given to every run.
const RUN_LANG: &str = "C.UTF-8";
/// Go's build cache inside the work directory.
const GO_CACHE_DIR: &str = ".cache/go-build";
/// Directories searched after the runtimes' own, inside runs.
const RUN_BASE_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// What the agent's owner lets requests have.
#[derive(Clone, Copy, Debug)]
pub struct ExecPolicy {
    /// Limits of a request that names none.
    pub defaults: ExecLimits,
    /// The most a request may ask for.
    pub ceiling: ExecLimits,
    /// Runs that ask for the network get it (node-agent --allow-network).
    pub allow_network: bool,
}

impl Default for ExecPolicy {
    fn default() -> Self {
        ExecPolicy {
            defaults: ExecLimits::default(),
            ceiling: ExecLimits::ceiling(),
            allow_network: false,
        }
    }
}

/// Where runs live on disk.
#[derive(Clone, Debug)]
pub struct ExecDirs {
    /// Parent of the per-run work directories.
    pub work_root: PathBuf,
    /// Compiled programs and compiler caches.
    pub cache_dir: PathBuf,
}

/// A checked request, ready to run.
#[derive(Debug)]
pub struct PreparedRun {
    language: Language,
    runtime: PathBuf,
    runtime_version: String,
    code: String,
    stdin: Vec<u8>,
    args: Vec<String>,
    limits: ExecLimits,
    network: bool,
    run_id: String,
}

/// Numbers runs across every executor in this process, so names never collide.
static RUN_SERIAL: AtomicU64 = AtomicU64::new(1);

/// Runs code on this device under the sandbox.
pub struct Executor {
    sandbox: Sandbox,
    runtimes: FingerprintWatch,
    policy: ExecPolicy,
    max_code_bytes: usize,
    dirs: ExecDirs,
    builds: BuildCache,
}

impl Executor {
    pub fn new(
        sandbox: Sandbox,
        runtimes: FingerprintWatch,
        policy: ExecPolicy,
        max_code_bytes: usize,
        dirs: ExecDirs,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dirs.work_root)?;
        // Runs may enter their own directory here, not list the others.
        std::fs::set_permissions(&dirs.work_root, std::fs::Permissions::from_mode(0o711))?;
        let builds = BuildCache::new(dirs.cache_dir.join("builds"))?;
        Ok(Executor {
            sandbox,
            runtimes,
            policy,
            max_code_bytes,
            dirs,
            builds,
        })
    }

    pub fn isolation(&self) -> IsolationLevel {
        self.sandbox.level()
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    pub fn allows_network(&self) -> bool {
        self.policy.allow_network
    }

    pub fn runtimes(&self) -> &FingerprintWatch {
        &self.runtimes
    }

    /// Checks a request: language known, runtime present here, sizes within limits.
    pub fn prepare(&self, request: proto::ExecuteRequest) -> Result<PreparedRun, ExecError> {
        let language = Language::parse(&request.language)?;
        request_size::check(&request, self.max_code_bytes)?;
        if request.network && !self.policy.allow_network {
            return Err(ExecError::NetworkRefused);
        }
        let (executable, runtime_version) = self.runtime(language)?;
        let serial = RUN_SERIAL.fetch_add(1, Ordering::Relaxed);
        let run_id = if request.run_id.is_empty() {
            format!("{}-{serial}", std::process::id())
        } else {
            request.run_id.clone()
        };
        Ok(PreparedRun {
            language,
            runtime: executable,
            runtime_version,
            limits: self.policy.defaults.with_request(
                request.timeout_ms,
                request.limits.as_ref(),
                &self.policy.ceiling,
            ),
            network: request.network,
            code: request.code,
            stdin: request.stdin,
            args: request.args,
            run_id,
        })
    }

    /// The executable and version of the healthy runtime for `language` on this device.
    pub fn runtime(&self, language: Language) -> Result<(PathBuf, String), ExecError> {
        let runtime = self.runtimes.borrow().get(language);
        let Some(executable) = runtime.healthy_executable().cloned() else {
            let reason = match runtime.health {
                RuntimeHealth::Broken(reason) => reason,
                _ => format!("no {language} runtime is installed on this device"),
            };
            return Err(ExecError::RuntimeUnavailable {
                language,
                reason,
                available: self.runtimes.borrow().healthy_languages().join(", "),
            });
        };
        Ok((executable, runtime.version))
    }

    pub fn policy(&self) -> &ExecPolicy {
        &self.policy
    }

    /// A fresh work directory under the work root, named so the sentinel finds it, with a
    /// user of its own where there are and `disk_bytes` of space with the mount layer.
    pub async fn workspace(&self, disk_bytes: u64) -> Result<Workspace, String> {
        let sandbox = self.sandbox.clone();
        let serial = RUN_SERIAL.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .dirs
            .work_root
            .join(format!("{}{serial}", crate::sandbox::own_prefix()));
        tokio::task::spawn_blocking(move || sandbox.workspace(dir, disk_bytes))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot create a work directory: {e}"))
    }

    /// Removes a work directory, off the async threads (a large tree takes a while).
    pub fn remove_workspace(workspace: Workspace) {
        tokio::task::spawn_blocking(move || {
            let path = workspace.path().to_path_buf();
            if let Err(e) = workspace.close() {
                tracing::warn!(dir = %path.display(), error = %e, "cannot remove work directory");
            }
        });
    }

    /// Runs a prepared request to its end, streaming its events, and returns the `finished`
    /// event for the caller to send once the run's slot is free.
    pub async fn run(
        &self,
        run: PreparedRun,
        events: &EventSender,
        cancel: CancellationToken,
    ) -> proto::ExecFinished {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + run.limits.timeout;
        let mut out = RunOutput::new(events.clone(), cancel, deadline, run.limits.output_bytes);
        let finished = match self.run_in_workdir(&run, &mut out).await {
            Ok(mut finished) => {
                finished.wall_micros = started.elapsed().as_micros() as u64;
                finished.bytes_dropped = out.dropped();
                finished
            }
            Err(message) => proto::ExecFinished {
                status: ExecStatus::FailedToStart as i32,
                message,
                wall_micros: started.elapsed().as_micros() as u64,
                isolation: self.isolation() as i32,
                ..Default::default()
            },
        };
        tracing::info!(
            run_id = %run.run_id,
            language = %run.language,
            status = ?finished.status(),
            exit_code = ?finished.exit_code,
            wall_ms = finished.wall_micros / 1000,
            "run finished"
        );
        finished
    }

    async fn run_in_workdir(
        &self,
        run: &PreparedRun,
        out: &mut RunOutput,
    ) -> Result<proto::ExecFinished, String> {
        let workspace = self.workspace(run.limits.disk_bytes).await?;
        let result = self.run_stages(run, &workspace, out).await;
        Self::remove_workspace(workspace);
        result
    }

    async fn run_stages(
        &self,
        run: &PreparedRun,
        workspace: &Workspace,
        out: &mut RunOutput,
    ) -> Result<proto::ExecFinished, String> {
        let workdir = workspace.path();
        let source = workdir.join(launch::source_file_name(run.language));
        std::fs::write(&source, &run.code)
            .map_err(|e| format!("cannot write {}: {e}", source.display()))?;
        let base_env = self.base_env(workdir, &workspace.tmp());
        let runtime = self.sandbox.program_path(&run.runtime);
        let runtime_tree = runtime_tree(&runtime);
        let confinement = Confinement {
            workspace,
            network: run.network,
            runtime: runtime_tree.as_deref(),
        };
        let limits = TreeLimits {
            cpu_seconds: run.limits.cpu_seconds,
            memory_bytes: run.limits.memory_bytes,
            max_processes: run.limits.max_processes,
            file_size_bytes: run.limits.file_size_bytes,
            open_files: run.limits.open_files,
            address_space_rlimit: true,
        };
        let started = |stage: proto::ExecStage| proto::ExecStarted {
            pid: 0,
            stage: stage as i32,
            isolation: self.isolation() as i32,
            run_id: run.run_id.clone(),
            runtime_version: run.runtime_version.clone(),
        };
        // Go's build cache is the run's own: a shared one could be poisoned for later runs.
        let go_cache = workdir.join(GO_CACHE_DIR);
        let (invocation, cached_build) = match launch::interpret(
            run.language,
            &runtime,
            &source,
            &run.limits,
            &run.args,
            &go_cache,
        ) {
            Some(invocation) => (invocation, false),
            None => {
                let key =
                    BuildCache::key(run.language, &run.runtime, &run.runtime_version, &run.code);
                let binary = workdir.join(launch::BINARY_NAME);
                match self.builds.lookup(&key) {
                    Some(cached) => {
                        std::fs::copy(&cached, &binary)
                            .map_err(|e| format!("cannot copy the cached program: {e}"))?;
                        (launch::run_binary(&binary, &run.args), true)
                    }
                    None => {
                        let compiler = launch::compile(run.language, &runtime, &source, &binary);
                        let compile_limits = TreeLimits {
                            memory_bytes: limits.memory_bytes.max(COMPILE_MEMORY_FLOOR),
                            max_processes: limits.max_processes.max(COMPILE_PROCESSES_FLOOR),
                            address_space_rlimit: compiler.address_space_rlimit,
                            ..limits
                        };
                        let spec = ProcessSpec {
                            invocation: compiler,
                            workdir,
                            base_env: &base_env,
                            confinement,
                            stdin: &[],
                            limits: compile_limits,
                            started: started(proto::ExecStage::Compile),
                        };
                        let compiled = process::supervise(spec, &self.sandbox, out)
                            .await
                            .map_err(|e| e.to_string())?;
                        if compiled.interruption.is_some()
                            || compiled.exit != Some(ProcessExit::Code(0))
                        {
                            let mut finished = self.finished(&compiled, &run.limits);
                            if compiled.interruption.is_none() {
                                finished.status = ExecStatus::CompileError as i32;
                                finished.message =
                                    format!("{} rejected the code", run.runtime.display());
                            }
                            return Ok(finished);
                        }
                        self.builds
                            .store(&key, &binary)
                            .map_err(|e| format!("cannot cache the compiled program: {e}"))?;
                        (launch::run_binary(&binary, &run.args), false)
                    }
                }
            }
        };
        let spec = ProcessSpec {
            limits: TreeLimits {
                address_space_rlimit: invocation.address_space_rlimit,
                ..limits
            },
            invocation,
            workdir,
            base_env: &base_env,
            confinement,
            stdin: &run.stdin,
            started: started(proto::ExecStage::Run),
        };
        let result = process::supervise(spec, &self.sandbox, out)
            .await
            .map_err(|e| e.to_string())?;
        let mut finished = self.finished(&result, &run.limits);
        finished.cached_build = cached_build;
        Ok(finished)
    }

    /// The small environment every run gets; nothing of the agent's own.
    pub(crate) fn base_env(&self, workdir: &Path, tmp: &Path) -> Vec<(&'static str, OsString)> {
        let mut path_dirs: Vec<PathBuf> = Vec::new();
        for runtime in &self.runtimes.borrow().runtimes {
            if let Some(dir) = runtime.healthy_executable().and_then(|e| e.parent())
                && !path_dirs.iter().any(|d| d == dir)
            {
                path_dirs.push(dir.to_path_buf());
            }
        }
        path_dirs.extend(std::env::split_paths(RUN_BASE_PATH));
        let path = std::env::join_paths(path_dirs).unwrap_or_else(|_| RUN_BASE_PATH.into());
        vec![
            ("PATH", path),
            ("HOME", workdir.into()),
            ("TMPDIR", tmp.into()),
            ("LANG", RUN_LANG.into()),
        ]
    }

    /// The finished event for a supervised process.
    fn finished(&self, result: &ProcessResult, limits: &ExecLimits) -> proto::ExecFinished {
        finished_event(result, limits, self.isolation())
    }
}

/// The finished event for a supervised process that ran under `limits`.
pub(crate) fn finished_event(
    result: &ProcessResult,
    limits: &ExecLimits,
    isolation: IsolationLevel,
) -> proto::ExecFinished {
    let (exit_code, signal) = match result.exit {
        Some(ProcessExit::Code(code)) => (Some(code), None),
        Some(ProcessExit::Signal(signal)) => (None, Some(signal)),
        None => (None, None),
    };
    let cpu_exhausted = signal == Some(libc::SIGXCPU)
        || (signal == Some(libc::SIGKILL)
            && result.cpu >= Duration::from_secs(limits.cpu_seconds.into()));
    let (status, message) = match result.interruption {
        Some(Interruption::Timeout) => (
            ExecStatus::Timeout,
            format!("killed after the {:?} timeout", limits.timeout),
        ),
        Some(Interruption::OutputLimit) => (
            ExecStatus::OutputLimit,
            format!(
                "killed after printing more than {} bytes",
                limits.output_bytes
            ),
        ),
        Some(Interruption::Cancelled) => (
            ExecStatus::Cancelled,
            "cancelled before it finished".to_string(),
        ),
        None if result.containment.oom_killed => (
            ExecStatus::MemoryLimit,
            format!(
                "killed for using more than {} bytes of memory",
                limits.memory_bytes
            ),
        ),
        None if cpu_exhausted => (
            ExecStatus::CpuLimit,
            format!("killed after {} CPU seconds", limits.cpu_seconds),
        ),
        None if exit_code == Some(0) => (ExecStatus::Ok, String::new()),
        None if result.containment.process_limit_hit => (
            ExecStatus::NonzeroExit,
            format!(
                "the run reached its limit of {} processes",
                limits.max_processes
            ),
        ),
        None => (ExecStatus::NonzeroExit, String::new()),
    };
    proto::ExecFinished {
        status: status as i32,
        exit_code,
        signal,
        cpu_micros: result.cpu.as_micros() as u64,
        peak_memory_bytes: result
            .containment
            .peak_memory_bytes
            .unwrap_or(result.max_rss_bytes),
        message,
        isolation: isolation as i32,
        ..Default::default()
    }
}
