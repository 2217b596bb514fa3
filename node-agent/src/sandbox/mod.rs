//! Containment of executed code: a fresh process session, rlimits, and (where the host offers
//! them) a cgroup per run for the process-count limit, the memory limit and the whole-tree kill.

mod cgroup;
mod child;
mod process_tree;

use std::{io, os::unix::process::CommandExt};

use kowalski_exo_common::proto::IsolationLevel;

pub use cgroup::{CgroupLimits, CgroupRoot, RunCgroup};
pub use child::{ChildSetup, Rlimit};

/// How this agent contains runs, found once at start.
#[derive(Clone, Debug)]
pub struct Sandbox {
    cgroups: Option<CgroupRoot>,
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

impl Sandbox {
    /// Uses cgroups when `use_cgroups` and the host lets this process create them.
    pub fn detect(use_cgroups: bool) -> Sandbox {
        let cgroups = if use_cgroups {
            CgroupRoot::detect()
        } else {
            None
        };
        Sandbox { cgroups }
    }

    pub fn level(&self) -> IsolationLevel {
        self.cgroups
            .as_ref()
            .map(CgroupRoot::level)
            .unwrap_or(IsolationLevel::ProcessGroup)
    }

    /// Kills whatever still runs and removes this agent's cgroups (at shutdown).
    pub fn tear_down(&self) {
        if let Some(root) = &self.cgroups {
            root.remove_all();
        }
    }

    /// Prepares containment for one process tree named `name` (unique per run and stage).
    pub fn contain(&self, name: &str, limits: TreeLimits) -> io::Result<Containment> {
        let cgroup = match &self.cgroups {
            Some(root) => Some(root.create_run(
                name,
                CgroupLimits {
                    memory_bytes: limits.memory_bytes,
                    max_processes: limits.max_processes,
                },
            )?),
            None => None,
        };
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
        if cgroup.is_none() && limits.address_space_rlimit {
            rlimits.push(rlimit(
                libc::RLIMIT_AS,
                limits.memory_bytes,
                limits.memory_bytes,
            ));
        }
        let setup = ChildSetup {
            cgroup_fds: cgroup.as_ref().map(RunCgroup::join_fds).unwrap_or_default(),
            rlimits,
        };
        Ok(Containment { cgroup, setup })
    }
}

fn rlimit(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> Rlimit {
    Rlimit {
        resource,
        soft,
        hard,
    }
}

/// The containment of one process tree, from before spawn until it is torn down.
#[derive(Debug)]
pub struct Containment {
    cgroup: Option<RunCgroup>,
    setup: ChildSetup,
}

impl Containment {
    /// Makes the command's child apply the containment before exec.
    pub fn configure(&self, command: &mut std::process::Command) {
        let setup = self.setup.clone();
        // SAFETY: `apply` only makes async-signal-safe syscalls and does not allocate.
        unsafe {
            command.pre_exec(move || setup.apply());
        }
    }

    /// Kills every process of the tree led by `leader`. Blocking: call off the async runtime.
    pub fn kill_tree(&self, leader: u32) {
        match &self.cgroup {
            Some(cgroup) => {
                if !cgroup.kill_all() {
                    tracing::warn!(leader, "processes survived the cgroup kill");
                }
            }
            None => process_tree::kill_tree(leader as i32),
        }
    }

    /// Reads what the cgroup recorded and removes it. Blocking: call off the async runtime.
    pub fn finish(self) -> ContainmentReport {
        let Some(cgroup) = self.cgroup else {
            return ContainmentReport::default();
        };
        cgroup.kill_all();
        let report = ContainmentReport {
            peak_memory_bytes: cgroup.peak_memory(),
            oom_killed: cgroup.oom_killed(),
            process_limit_hit: cgroup.process_limit_hit(),
        };
        cgroup.remove();
        report
    }
}
