//! Containment of executed code: a fresh process session, rlimits, and the [`layers`] the host
//! offers: a cgroup per run (process count, memory, whole-tree kill), a user of its own, a
//! network namespace, a mount namespace with a size-capped work dir, and Landlock.
//! Programs start through [`launcher`]s; with cgroups a [`pool`] keeps some ready. A
//! [`sentinel`] process ends every run when the agent dies without shutting down.

mod cgroup;
mod confine;
mod forked;
mod launcher;
pub mod layers;
mod pool;
mod process_tree;
mod run_users;
mod sentinel;
mod steps;
mod workspace;

use std::{
    ffi::OsString,
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use kowalski_exo_common::proto::IsolationLevel;

pub use cgroup::{CgroupLimits, CgroupRoot, RunCgroup};
pub use confine::{Confinement, runtime_tree};
pub use launcher::{CHANNEL_FD, Job, Launched, Launcher, MAX_JOB_BYTES, Rlimit};
pub use layers::Layers;
use pool::LauncherPool;
pub use run_users::DEFAULT_BASE as DEFAULT_RUN_UID_BASE;
use run_users::RunUsers;
use sentinel::Sentinel;
pub use workspace::{Workspace, own_prefix, unmount_beneath};

/// How this agent contains runs, found once at start.
#[derive(Clone, Debug)]
pub struct Sandbox {
    cgroups: Option<CgroupRoot>,
    pool: Option<Arc<LauncherPool>>,
    sentinel: Option<Arc<Sentinel>>,
    layers: Arc<Layers>,
    users: Option<Arc<RunUsers>>,
    /// With no user layer, all runs may read (everything beside the agent's own directories).
    readable: Option<Arc<Vec<PathBuf>>>,
    /// Work directories mounted now.
    mounted: workspace::Mounted,
}

/// Limits the sandbox applies to one process tree.
#[derive(Clone, Copy, Debug)]
pub struct TreeLimits {
    pub cpu_seconds: u32,
    pub memory_bytes: u64,
    pub max_processes: u32,
    pub file_size_bytes: u64,
    pub open_files: u32,
    /// Also cap address space with RLIMIT_AS when no cgroup limits memory. Off for runtimes
    /// that reserve large virtual ranges up front (the JVM, V8, Go).
    pub address_space_rlimit: bool,
}

/// What the sandbox learned about a finished run.
#[derive(Clone, Copy, Debug, Default)]
pub struct ContainmentReport {
    pub peak_memory_bytes: Option<u64>,
    pub oom_killed: bool,
    pub process_limit_hit: bool,
}

/// One program to start.
#[derive(Debug)]
pub struct Command<'a> {
    pub program: &'a Path,
    pub args: &'a [OsString],
    pub env: &'a [(&'static str, OsString)],
    pub cwd: &'a Path,
    pub confinement: Confinement<'a>,
    /// Keep the channel to the agent open in the program (a session's interpreter).
    pub keep_channel: bool,
}

impl Sandbox {
    /// Uses cgroups when `use_cgroups` and the host lets this process create them, keeping
    /// `warm` launchers ready, and every other layer the host has; runs get users from
    /// `run_uid_base` on. Says at start which layers are missing and why. Fails when the agent
    /// is root but no block of run users is free: code would run as root. Call within a tokio
    /// runtime.
    pub fn detect(
        use_cgroups: bool,
        warm: usize,
        run_uid_base: u32,
        work_root: &Path,
    ) -> io::Result<Sandbox> {
        let cgroups = if use_cgroups {
            CgroupRoot::detect()
        } else {
            None
        };
        let cgroup = match (&cgroups, use_cgroups) {
            (Some(_), _) => Ok(()),
            (None, false) => Err("turned off (--no-cgroups)".to_string()),
            (None, true) => Err("no cgroup hierarchy this process may write".to_string()),
        };
        let layers = Layers::detect(cgroup);
        let users = if layers.user {
            Some(RunUsers::claim(run_uid_base, !layers.cgroup).map_err(|e| {
                io::Error::new(e.kind(), format!("no users of their own for runs: {e}"))
            })?)
        } else {
            None
        };
        let layers = Arc::new(layers);
        tracing::info!(layers = %layers, "isolation layers for runs");
        for (layer, reason) in &layers.missing {
            tracing::warn!(
                layer = kowalski_exo_common::isolation::name(*layer),
                reason = %reason,
                "an isolation layer is missing"
            );
        }
        let pool = cgroups.clone().map(|root| {
            let pool = LauncherPool::new(root, warm, layers.network);
            pool.refill();
            pool
        });
        let sentinel = match Sentinel::start(cgroups.clone(), Some(work_root.to_path_buf())) {
            Ok(sentinel) => Some(Arc::new(sentinel)),
            Err(e) => {
                tracing::warn!(error = %e, "no sentinel: runs may outlive a crash of this agent");
                None
            }
        };
        Ok(Sandbox {
            cgroups,
            pool,
            sentinel,
            layers,
            users,
            readable: None,
            mounted: Arc::default(),
        })
    }

    /// Keeps runs out of `dirs` (the agent's data directory, build cache and work root) when
    /// they run as the agent's own user, with Landlock. Those that exist count.
    pub fn hide(mut self, dirs: &[&Path]) -> Sandbox {
        let hidden: Vec<PathBuf> = dirs
            .iter()
            .filter_map(|dir| std::fs::canonicalize(dir).ok())
            .collect();
        if !self.layers.user && !hidden.is_empty() {
            self.readable = Some(Arc::new(confine::readable_beside(&hidden)));
        }
        self
    }

    pub fn layers(&self) -> &Layers {
        &self.layers
    }

    /// The path runs start `program` by: with users of their own, one they can reach.
    pub fn program_path(&self, program: &Path) -> PathBuf {
        if self.layers.user {
            confine::reachable_program(program, self.layers.mount)
        } else {
            program.to_path_buf()
        }
    }

    /// A work directory for one run at `dir`, with a user of its own where there are, and a
    /// tmpfs of `disk_bytes` with the mount layer. Blocking.
    pub fn workspace(&self, dir: PathBuf, disk_bytes: u64) -> io::Result<Workspace> {
        let user = self.users.as_ref().map(|users| users.take()).transpose()?;
        Workspace::create(
            dir,
            user,
            self.layers.mount.then_some((disk_bytes, &self.mounted)),
        )
    }

    /// The work directories mounted now but `own`.
    fn others_mounted(&self, own: &Workspace) -> Vec<PathBuf> {
        self.mounted
            .lock()
            .expect("mounted workspaces poisoned")
            .iter()
            .filter(|dir| dir.as_path() != own.path())
            .cloned()
            .collect()
    }

    pub fn level(&self) -> IsolationLevel {
        self.cgroups
            .as_ref()
            .map(CgroupRoot::level)
            .unwrap_or(IsolationLevel::ProcessGroup)
    }

    /// Kills whatever still runs and removes this agent's cgroups (at shutdown). Blocking.
    pub fn tear_down(&self) {
        if let Some(pool) = &self.pool {
            pool.drain();
        }
        if let Some(root) = &self.cgroups {
            root.remove_all();
        }
    }

    /// Starts a program under the limits, in its own session (and cgroup, where there are).
    pub async fn spawn(
        &self,
        command: Command<'_>,
        limits: TreeLimits,
    ) -> io::Result<(Launched, Containment)> {
        let mut rlimits = vec![
            rlimit(
                libc::RLIMIT_CPU,
                limits.cpu_seconds.into(),
                u64::from(limits.cpu_seconds) + 1,
            ),
            rlimit(
                libc::RLIMIT_FSIZE,
                limits.file_size_bytes,
                limits.file_size_bytes,
            ),
            rlimit(
                libc::RLIMIT_NOFILE,
                limits.open_files.into(),
                limits.open_files.into(),
            ),
            rlimit(libc::RLIMIT_CORE, 0, 0),
        ];
        if self.pool.is_none() && limits.address_space_rlimit {
            rlimits.push(rlimit(
                libc::RLIMIT_AS,
                limits.memory_bytes,
                limits.memory_bytes,
            ));
        }
        // Without a cgroup to count them, a run with a user of its own has its processes
        // counted by the kernel per user (set last, once the run is that user).
        if self.cgroups.is_none() && command.confinement.workspace.uid().is_some() {
            let most = u64::from(limits.max_processes);
            rlimits.push(rlimit(libc::RLIMIT_NPROC, most, most));
        }
        let steps = confine::steps(
            &self.layers,
            &command.confinement,
            self.readable.as_deref().map(Vec::as_slice),
            &self.others_mounted(command.confinement.workspace),
        )?;
        let job = Job {
            program: command.program,
            args: command.args,
            env: command.env,
            cwd: command.cwd,
            rlimits: &rlimits,
            steps: steps.as_bytes(),
            keep_channel: command.keep_channel,
        }
        .encode()?;
        let isolate_network = self.layers.network && !command.confinement.network;
        let launcher = match &self.pool {
            Some(pool) => pool.take(isolate_network).await?,
            None => tokio::task::spawn_blocking(move || Launcher::fork(None, isolate_network))
                .await
                .map_err(io::Error::other)??,
        };
        // Watched from before the program starts, so no moment of its life escapes the sentinel.
        let pgid = launcher.pid();
        if let Some(sentinel) = &self.sentinel {
            sentinel.running(pgid);
        }
        let launched = self.launch(launcher, job, limits).await;
        if let Some(pool) = &self.pool {
            pool.refill();
        }
        let mut launched = match launched {
            Ok(launched) => launched,
            Err(e) => {
                if let Some(sentinel) = &self.sentinel {
                    sentinel.ended(pgid);
                }
                return Err(e);
            }
        };
        let containment = Containment {
            cgroup: launched.cgroup.take(),
            sentinel: self.sentinel.clone(),
        };
        Ok((launched, containment))
    }
}

impl Sandbox {
    /// Sets the cgroup's limits and hands the launcher its job.
    async fn launch(
        &self,
        launcher: Launcher,
        job: launcher::EncodedJob,
        limits: TreeLimits,
    ) -> io::Result<Launched> {
        if let Some(cgroup) = launcher.cgroup() {
            cgroup.set_limits(CgroupLimits {
                memory_bytes: limits.memory_bytes,
                max_processes: limits.max_processes,
            })?;
        }
        tokio::task::spawn_blocking(move || launcher.launch(&job))
            .await
            .map_err(io::Error::other)?
    }
}

fn rlimit(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> Rlimit {
    Rlimit {
        resource,
        soft,
        hard,
    }
}

/// The containment of one process tree, from its start until it is torn down.
#[derive(Debug)]
pub struct Containment {
    cgroup: Option<RunCgroup>,
    /// Told when the tree is gone, so it no longer kills the group at the agent's death.
    sentinel: Option<Arc<Sentinel>>,
}

impl Containment {
    /// Kills every process of the tree led by `leader`, which must not be reaped yet (a zombie
    /// leader keeps its pid and process group from being reused). Once the leader has exited its
    /// children belong to init, so `leader_exited` skips the useless /proc walk. Blocking: call
    /// off the async runtime.
    pub fn kill_tree(&self, leader: u32, leader_exited: bool) {
        match &self.cgroup {
            Some(cgroup) => {
                if !cgroup.kill_all() {
                    tracing::warn!(leader, "processes survived the cgroup kill");
                }
            }
            None if leader_exited => process_tree::kill_group(leader as i32),
            None => process_tree::kill_tree(leader as i32),
        }
        if let Some(sentinel) = &self.sentinel {
            sentinel.ended(leader);
        }
    }

    /// Reads what the cgroup recorded, then removes it. Blocking: call off the async runtime.
    pub fn finish(self) -> ContainmentReport {
        let Some(cgroup) = self.cgroup else {
            return ContainmentReport::default();
        };
        cgroup.kill_all();
        ContainmentReport {
            peak_memory_bytes: cgroup.peak_memory(),
            oom_killed: cgroup.oom_killed(),
            process_limit_hit: cgroup.process_limit_hit(),
        }
    }
}
